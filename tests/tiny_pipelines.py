"""Tiny pipelines of every supported family, built from configs (no downloads), random weights."""

from __future__ import annotations

from pathlib import Path

import torch

from obsdiff.digits.data import BOS, EOS
from obsdiff.digits.train import SCHEDULER_CONFIG, VAE_CONFIG, build_tokenizer, build_untrained_pipeline


def _clip_config(tokenizer, hidden=32, projection=32):
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                          pad_token_id=vocab[EOS], hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=projection)


def _t5_tokenizer(folder: Path):
    """A word-level tokenizer for the tiny T5, built with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from obsdiff.digits.data import vocabulary_words

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(vocabulary_words())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=32)


def tiny_sd(folder: Path, cross_attention_dim: int | None = None, widths: tuple[int, ...] | None = None) -> Path:
    """The default architecture, untrained; ``cross_attention_dim`` changes the text width (e.g. odd sizes),
    ``widths`` the UNet's channels per level (one level per width, each but the last downsampling)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "_tok")
    pipe = build_untrained_pipeline(tokenizer)
    if widths is not None:
        from diffusers import UNet2DConditionModel

        levels = len(widths)
        pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "block_out_channels": widths, "norm_num_groups": 32,
                                            "down_block_types": ("CrossAttnDownBlock2D",) * levels,
                                            "up_block_types": ("CrossAttnUpBlock2D",) * levels,
                                            "attention_head_dim": 4})
        pipe.register_modules(unet=pipe.unet)
    if cross_attention_dim is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        pipe.text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden=cross_attention_dim))
        pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "cross_attention_dim": cross_attention_dim})
        pipe.register_modules(text_encoder=pipe.text_encoder, unet=pipe.unet)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_sdxl(folder: Path) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "_tok")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=CLIPTextModel(_clip_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**{
            k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer.get_vocab()), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0))


def tiny_sd3(folder: Path, t5: bool = False) -> Path:
    """SD3 with two CLIP encoders; ``t5`` adds the third (T5) encoder."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "_tok")
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(**{**VAE_CONFIG, "shift_factor": 0.0, "scaling_factor": 1.0}),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer)), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    if t5:
        t5_tok = _t5_tokenizer(folder / "_t5")
        pipe.register_modules(text_encoder_3=_tiny_t5(t5_tok), tokenizer_3=t5_tok)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_flux(folder: Path, head_dim: int = 16) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "_tok")
    t5_tok = _t5_tokenizer(folder / "_t5")
    t5 = _tiny_t5(t5_tok)
    rope = (head_dim // 4, head_dim // 4, head_dim // 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=rope,
    )
    vae = AutoencoderKL(**{**VAE_CONFIG, "use_quant_conv": False, "use_post_quant_conv": False,
                           "shift_factor": 0.0, "scaling_factor": 1.0})
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=CLIPTextModel(_clip_config(tokenizer)),
        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


BUILDERS = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}

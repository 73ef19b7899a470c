"""Build and train the shipped default pipeline (``make default-model``).

A ``StableDiffusionPipeline`` small enough to train on 2 CPU cores: a CLIP text encoder over a
vocabulary this project writes, an AutoencoderKL (16×16 RGB ↔ 4×8×8 latents), and a cross-attention
UNet at two resolutions with two or more heads per attention and GEGLU feed-forwards. Every Linear
in_features and Conv in_channels meant to be pruned is a multiple of 8.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from obsdiff.digits.data import (
    BOS,
    EOS,
    IMAGE_SIZE,
    TRAIN_TEMPLATES,
    load_digit_images,
    prompt_for,
    split_indices,
    write_tokenizer_files,
)
from obsdiff.resources import MODEL_PROMPTS, calibration_file

log = logging.getLogger(__name__)

# The trained model and judge live in the source tree's models/ (they are not package data).
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "digits-sd"
DEFAULT_JUDGE_DIR = REPO_ROOT / "models" / "digits-judge"

TEXT_CONFIG = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                  latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE)
UNET_CONFIG = dict(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=(2, 4), norm_num_groups=8)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                        beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        prediction_type="epsilon")


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab, merges = write_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77, bos_token=BOS, eos_token=EOS,
                         pad_token=EOS, unk_token=EOS)


def build_untrained_pipeline(tokenizer):
    """The default architecture with random weights (also used by tests as a fast stand-in)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                                 pad_token_id=vocab[EOS], **TEXT_CONFIG)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_CONFIG), text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET_CONFIG), scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + torch.cos(torch.tensor((step - warmup) / max(1, total - warmup) * torch.pi)).item())


def train_vae(vae, images: torch.Tensor, steps: int, seed: int) -> float:
    """Reconstruction + a small KL, so latents stay well scaled; returns the final recon MSE."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    x3 = images.repeat(1, 3, 1, 1)
    bar = tqdm(range(steps), desc="train vae", mininterval=5)
    for _ in bar:
        batch = x3[torch.randint(0, len(x3), (64,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, batch)
        loss = mse + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    return mse.item()


def train_denoiser(pipe, images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int,
                   empty_prompt_fraction: float = 0.1) -> float:
    """Epsilon-prediction training of UNet and text encoder together, with an EMA of both."""
    from diffusers import DDPMScheduler

    gen = torch.Generator().manual_seed(seed)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    with torch.no_grad():
        posterior = vae.encode(images.repeat(1, 3, 1, 1)).latent_dist
        mean, std = posterior.mean, posterior.std
        scale = 1.0 / mean.std().item()
    vae.register_to_config(scaling_factor=scale)
    # Prompt table: row 10 * template + digit, last row the empty prompt.
    prompts = [prompt_for(d, t) for t in TRAIN_TEMPLATES for d in range(10)] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup=200))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(steps), desc="train unet+text", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(images), (64,), generator=gen)
        template = torch.randint(0, len(TRAIN_TEMPLATES), (64,), generator=gen)
        rows = template * 10 + labels[idx]
        rows[torch.rand(64, generator=gen) < empty_prompt_fraction] = len(prompts) - 1
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (64,), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        cond = text_encoder(ids[rows])[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    pipe.unet, pipe.text_encoder = ema_unet.eval(), ema_text.eval()
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)
    return loss.item()


def train_default_model(out_dir: Path, judge_dir: Path, vae_steps: int, unet_steps: int, seed: int) -> dict:
    from obsdiff.digits.judge import train_judge

    torch.manual_seed(seed)
    started = time.time()
    images, labels = load_digit_images()
    train_idx, _ = split_indices(len(images))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    pipe = build_untrained_pipeline(tokenizer)
    log.info("training the judge")
    judge_info = train_judge(judge_dir, seed=seed)
    log.info("judge held-out accuracy %.4f", judge_info["held_out_accuracy"])
    # The generator sees every real digit; the judge's held-out split is for the judge alone.
    vae_mse = train_vae(pipe.vae, images, vae_steps, seed)
    pipe.vae.eval().requires_grad_(False)
    loss = train_denoiser(pipe, images, labels, unet_steps, seed + 1)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    info = {"vae_steps": vae_steps, "unet_steps": unet_steps, "seed": seed, "vae_recon_mse": vae_mse,
            "final_denoising_loss": loss, "train_images": len(images), "judge_train_images": len(train_idx),
            "minutes": (time.time() - started) / 60}
    (staging / "training.json").write_text(json.dumps(info, indent=2))
    shutil.copy(calibration_file("digits.txt"), staging / MODEL_PROMPTS)  # prune's default prompts for this model
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Retrain the shipped default digits pipeline and its judge.")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--judge-out", type=Path, default=DEFAULT_JUDGE_DIR)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(2)
    info = train_default_model(args.out, args.judge_out, args.vae_steps, args.unet_steps, args.seed)
    log.info("done: %s", json.dumps(info))


if __name__ == "__main__":
    main()

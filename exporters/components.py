"""One description per pipeline component: names, dtypes, symbolic axes, sample inputs, wrapper.

Every exporter (ONNX, TensorRT profiles, Core ML input types) and every validator reads these and
nothing else. Names follow optimum's ONNX configs, so optimum's ORT pipelines load our bundles.
Symbolic dims are resolved from the pipeline's own configs and the target's shapes
(``pipeline_dims``); per-encoder sizes are namespaced (``text_encoder_2.hidden``).

Families: Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux. The set of descriptions for a pipeline is built
from its configs, because the text encoders' outputs depend on them (SDXL and SD3 read a
penultimate hidden state, so every ``hidden_states.i`` is an output, as in optimum).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from obsdiff.errors import ExportError, UsageError
from obsdiff.exporters.profiles import DENOISER, TEXT_ENCODER, VAE_DECODER, VAE_ENCODER, Shapes


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    dims: tuple[str | int, ...]  # ints are fixed, strings are symbols resolved per pipeline
    high: str | None = None  # integer inputs: the symbol of their exclusive upper bound (vocabulary, positions)


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # folder name in the bundle (optimum's layout)
    source: str  # pipeline attribute it wraps
    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: Callable[[nn.Module], nn.Module]
    dynamic: tuple[str, ...] = ("batch",)  # symbols that stay dynamic in ONNX
    # Layers (regexes over module names) whose compute stays float when activations are int8 (their weights are
    # still int8 codes, dequantized): the timestep embedding, which conditions every block, and the FFN down
    # projections, whose GEGLU/GELU inputs carry outliers one per-tensor uint8 range cannot hold (on the default
    # model, int8 there costs 4-9 dB of end-to-end PSNR against the fake-quantized PyTorch model).
    float_compute: tuple[str, ...] = ()

    def resolve(self, dims: dict[str, int], spec: TensorSpec) -> tuple[int, ...]:
        try:
            return tuple(d if isinstance(d, int) else dims[d] for d in spec.dims)
        except KeyError as exc:
            raise ExportError(f"{self.name}: no value for dimension {exc}") from None

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            sym = {i: d for i, d in enumerate(t.dims) if isinstance(d, str) and d in self.dynamic}
            if sym:
                axes[t.name] = sym
        return axes

    def sample_inputs(self, dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            shape = self.resolve(dims, t)
            if t.dtype in (torch.int64, torch.int32) and t.high is None:
                raise ExportError(f"{self.name}: integer input {t.name} has no upper bound in its description")
            if t.high is not None:  # token ids or positions (float32 ones in Apple's text encoder input)
                out[t.name] = torch.randint(0, dims[t.high], shape, generator=g).to(t.dtype)
            elif t.name == "timestep":
                out[t.name] = torch.full(shape, float(dims["timestep"]), dtype=t.dtype)
            else:
                out[t.name] = torch.randn(shape, generator=g, dtype=t.dtype)
        return out


# ---- wrappers: small explicit modules, one job each (no patched forwards) -----------------------
# Each keeps the wrapped module as ``model``, so traced weight names start with ``WRAPPED_ATTR``.

WRAPPED_ATTR = "model"


class TextEncoderWrapper(nn.Module):
    """CLIP text model: last hidden state and pooled output (SD 1.x/2.x)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.model = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids, return_dict=False)
        return out[0], out[1]


class TextEncoderHiddenStatesWrapper(nn.Module):
    """CLIP (with or without projection): its two outputs, then every hidden state (SDXL and SD3 read the penultimate)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.model = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids, output_hidden_states=True, return_dict=False)
        return (out[0], out[1], *out[2])


class T5EncoderWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.model = text_encoder

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids, return_dict=False)[0]


class UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.model = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class SDXLUNetWrapper(nn.Module):
    """SDXL's UNet takes the pooled text embedding and the size/crop ids as added conditions."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.model = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False,
                          added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]


class SD3TransformerWrapper(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.model = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class FluxTransformerWrapper(nn.Module):
    """Flux: packed latents, rotary position ids for image and text tokens; guidance only where distilled in."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.model = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                          guidance=guidance, return_dict=False)[0]


class VAEDecoderWrapper(nn.Module):
    """Decodes already-scaled latents (the pipeline divides by scaling_factor, adds shift_factor, first)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.model = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.model.decode(latent_sample, return_dict=False)[0]


class VAEEncoderWrapper(nn.Module):
    """Returns the posterior's parameters (mean and log-variance stacked), as optimum does."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.model = vae

    def forward(self, sample: torch.Tensor):
        return self.model.encode(sample, return_dict=False)[0].parameters


# ---- descriptions ------------------------------------------------------------------------------------

_F32, _I64 = torch.float32, torch.int64
_LATENT = ("unet_batch", "latent_channels", "latent_height", "latent_width")


def _ids(name: str) -> TensorSpec:
    return TensorSpec("input_ids", _I64, ("batch", f"{name}.sequence"), high=f"{name}.vocab")


def _clip(name: str, module: nn.Module, hidden_states: bool) -> ComponentSpec:
    """A CLIP text encoder; with ``hidden_states`` every layer's output too (optimum's SDXL/SD3 configs)."""
    seq, hid = f"{name}.sequence", f"{name}.hidden"
    projected = "WithProjection" in type(module).__name__
    first = (TensorSpec("text_embeds", _F32, ("batch", f"{name}.projection")) if projected
             else TensorSpec("last_hidden_state", _F32, ("batch", seq, hid)))
    second = (TensorSpec("last_hidden_state", _F32, ("batch", seq, hid)) if projected
              else TensorSpec("pooler_output", _F32, ("batch", hid)))
    states = tuple(TensorSpec(f"hidden_states.{i}", _F32, ("batch", seq, hid))
                   for i in range(module.config.num_hidden_layers + 1)) if hidden_states else ()
    return ComponentSpec(name, name, TEXT_ENCODER, inputs=(_ids(name),), outputs=(first, second, *states),
                         wrapper=TextEncoderHiddenStatesWrapper if hidden_states else TextEncoderWrapper)


def _t5(name: str) -> ComponentSpec:
    return ComponentSpec(name, name, TEXT_ENCODER, inputs=(_ids(name),),
                         outputs=(TensorSpec("last_hidden_state", _F32, ("batch", f"{name}.sequence", f"{name}.hidden")),),
                         wrapper=T5EncoderWrapper)


def _vae() -> tuple[ComponentSpec, ComponentSpec]:
    decoder = ComponentSpec(
        "vae_decoder", "vae", VAE_DECODER,
        inputs=(TensorSpec("latent_sample", _F32, ("batch", "vae_latent_channels", "latent_height", "latent_width")),),
        outputs=(TensorSpec("sample", _F32, ("batch", "image_channels", "height", "width")),),
        wrapper=VAEDecoderWrapper)
    encoder = ComponentSpec(
        "vae_encoder", "vae", VAE_ENCODER,
        inputs=(TensorSpec("sample", _F32, ("batch", "image_channels", "height", "width")),),
        outputs=(TensorSpec("latent_parameters", _F32, ("batch", "latent_parameters", "latent_height", "latent_width")),),
        wrapper=VAEEncoderWrapper)
    return decoder, encoder


UNET_FLOAT_COMPUTE = (r"time_embedding\..*", r"add_embedding\..*", r".*\.time_emb_proj", r".*\.ff\.net\.2")
TRANSFORMER_FLOAT_COMPUTE = (r"time_text_embed\..*", r"time_embed\..*", r".*\.ff(_context)?\.net\.2")


def _sd_specs(pipe) -> tuple[ComponentSpec, ...]:
    unet = ComponentSpec(
        "unet", "unet", DENOISER,
        inputs=(TensorSpec("sample", _F32, _LATENT), TensorSpec("timestep", _F32, ()),
                TensorSpec("encoder_hidden_states", _F32, ("unet_batch", "text_encoder.sequence", "text_encoder.hidden"))),
        outputs=(TensorSpec("out_sample", _F32, _LATENT),),
        wrapper=UNetWrapper, dynamic=("unet_batch",), float_compute=UNET_FLOAT_COMPUTE)
    return (_clip("text_encoder", pipe.text_encoder, hidden_states=False), unet, *_vae())


def _sdxl_specs(pipe) -> tuple[ComponentSpec, ...]:
    unet = ComponentSpec(
        "unet", "unet", DENOISER,
        inputs=(TensorSpec("sample", _F32, _LATENT), TensorSpec("timestep", _F32, ()),
                TensorSpec("encoder_hidden_states", _F32, ("unet_batch", "text_encoder.sequence", "cross_attention")),
                TensorSpec("text_embeds", _F32, ("unet_batch", "text_encoder_2.projection")),
                TensorSpec("time_ids", _F32, ("unet_batch", 6))),
        outputs=(TensorSpec("out_sample", _F32, _LATENT),),
        wrapper=SDXLUNetWrapper, dynamic=("unet_batch",), float_compute=UNET_FLOAT_COMPUTE)
    encoders = [_clip(n, getattr(pipe, n), hidden_states=True) for n in ("text_encoder", "text_encoder_2")
                if getattr(pipe, n, None) is not None]
    return (*encoders, unet, *_vae())


def _sd3_specs(pipe) -> tuple[ComponentSpec, ...]:
    transformer = ComponentSpec(
        "transformer", "transformer", DENOISER,
        inputs=(TensorSpec("hidden_states", _F32, _LATENT),
                TensorSpec("encoder_hidden_states", _F32, ("unet_batch", "joint_sequence", "joint_attention")),
                TensorSpec("pooled_projections", _F32, ("unet_batch", "pooled_projection")),
                TensorSpec("timestep", _F32, ("unet_batch",))),
        outputs=(TensorSpec("out_hidden_states", _F32, _LATENT),),
        wrapper=SD3TransformerWrapper, dynamic=("unet_batch",),
        float_compute=TRANSFORMER_FLOAT_COMPUTE)
    encoders = [_clip(n, getattr(pipe, n), hidden_states=True) for n in ("text_encoder", "text_encoder_2")]
    if getattr(pipe, "text_encoder_3", None) is not None:
        encoders.append(_t5("text_encoder_3"))
    return (*encoders, transformer, *_vae())


def _flux_specs(pipe) -> tuple[ComponentSpec, ...]:
    """Flux runs without classifier-free guidance, so the transformer's batch is the prompt batch."""
    inputs = [TensorSpec("hidden_states", _F32, ("batch", "packed_latents", "latent_channels")),
              TensorSpec("encoder_hidden_states", _F32, ("batch", "text_encoder_2.sequence", "joint_attention")),
              TensorSpec("pooled_projections", _F32, ("batch", "pooled_projection")),
              TensorSpec("timestep", _F32, ("batch",)),
              TensorSpec("img_ids", _I64, ("packed_latents", 3), high="latent_height"),  # rotary positions (optimum: int64)
              TensorSpec("txt_ids", _I64, ("text_encoder_2.sequence", 3), high="latent_height")]
    if pipe.transformer.config.guidance_embeds:
        inputs.append(TensorSpec("guidance", _F32, ("batch",)))
    transformer = ComponentSpec(
        "transformer", "transformer", DENOISER, inputs=tuple(inputs),
        outputs=(TensorSpec("out_hidden_states", _F32, ("batch", "packed_latents", "latent_channels")),),
        wrapper=FluxTransformerWrapper, float_compute=TRANSFORMER_FLOAT_COMPUTE)
    return (_clip("text_encoder", pipe.text_encoder, hidden_states=False), _t5("text_encoder_2"), transformer, *_vae())


PIPELINE_SPECS: dict[str, Callable[[object], tuple[ComponentSpec, ...]]] = {
    "StableDiffusionPipeline": _sd_specs,
    "StableDiffusionXLPipeline": _sdxl_specs,
    "StableDiffusion3Pipeline": _sd3_specs,
    "FluxPipeline": _flux_specs,
}

# T5 prompt length each family's __call__ uses by default; SD3 pads the joint sequence to it even without a T5.
T5_SEQUENCE = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512}
# A mid-schedule timestep for sample inputs: UNets and SD3 take 0..1000, Flux takes t/1000.
SAMPLE_TIMESTEP = {"FluxPipeline": 0.5}


# The ONNX component folders every bundle of a family has (optimum's layout); text encoders come from the pipeline's
# own model_index.json (SD3 without its T5, an SDXL refiner without its first encoder).
ONNX_BASE_COMPONENTS = {"StableDiffusionPipeline": ("unet",), "StableDiffusionXLPipeline": ("unet",),
                        "StableDiffusion3Pipeline": ("transformer",), "FluxPipeline": ("transformer",)}


def exported_components(model_index: dict) -> tuple[str, ...]:
    """The component folders an ONNX bundle of this pipeline must hold, from its ``model_index.json``."""
    family = model_index.get("_class_name")
    if family not in ONNX_BASE_COMPONENTS:
        raise ExportError(f"model_index.json names {family!r}, which has no component description")
    encoders = [k for k, v in model_index.items() if k.startswith("text_encoder") and v not in (None, [None, None])]
    return (*sorted(encoders), *ONNX_BASE_COMPONENTS[family], "vae_decoder", "vae_encoder")


def specs_for(pipe) -> tuple[ComponentSpec, ...]:
    name = type(pipe).__name__
    if name not in PIPELINE_SPECS:
        raise ExportError(f"no component description for {name} yet; supported: {', '.join(PIPELINE_SPECS)}")
    return PIPELINE_SPECS[name](pipe)


def denoiser(pipe) -> nn.Module:
    """The UNet or the transformer."""
    module = getattr(pipe, "unet", None)
    return module if module is not None else pipe.transformer


def _as_input(value, t: TensorSpec) -> np.ndarray:
    """A call's argument in the description's dtype (a scalar input as a 0-d array, however the pipeline passed it)."""
    x = torch.as_tensor(value).detach().to(t.dtype)
    return (x if t.dims else x.reshape(())).numpy()


@contextlib.contextmanager
def recorded_calls(module: nn.Module, spec: ComponentSpec) -> Iterator[list[dict[str, np.ndarray]]]:
    """Every call the pipeline makes to ``module`` while the block runs, as the description's named inputs.

    The pipeline's arguments are bound to the module's own signature; names the description uses (``sample``,
    ``timestep``, ``encoder_hidden_states``; SDXL's ``text_embeds`` and ``time_ids`` inside ``added_cond_kwargs``)
    are taken by name, so the recorded inputs are exactly what the exported graph is fed.
    """
    signature = inspect.signature(module.forward)
    calls: list[dict[str, np.ndarray]] = []

    def hook(_module, args, kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        flat = {**{k: v for d in bound.values() if isinstance(d, dict) for k, v in d.items()}, **bound}
        missing = [t.name for t in spec.inputs if flat.get(t.name) is None]
        if missing:
            raise ExportError(f"{spec.name}: the pipeline's call has no {', '.join(missing)} to record")
        calls.append({t.name: _as_input(flat[t.name], t) for t in spec.inputs})

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def packed(pipe) -> bool:
    """Flux packs 2×2 latent patches into tokens, so its latents are (batch, tokens, 4·channels)."""
    return type(pipe).__name__ == "FluxPipeline"


# Pipelines whose default size is a constant of the pipeline class, not of the denoiser's config.
DEFAULT_SAMPLE_SIZE = {"FluxPipeline": 128}


@dataclass(frozen=True)
class SizeRule:
    """Which image sizes a pipeline can export at: its native size, and the multiple every size must be."""

    native: int
    vae_scale: int
    multiple: int  # pixels: VAE scale × what the denoiser halves or patches
    reason: str

    @classmethod
    def from_configs(cls, pipeline: str, denoiser_config: dict, vae_config: dict) -> "SizeRule":
        vae_scale = 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)
        sample = DEFAULT_SAMPLE_SIZE.get(pipeline, denoiser_config.get("sample_size") or 64)
        if "down_block_types" in denoiser_config:  # a UNet halves the latent once per level but the last
            halvings = len(denoiser_config["down_block_types"]) - 1
            factor, why = 2**halvings, f"halved {halvings} times by the UNet's downsamplers"
        else:
            factor = (denoiser_config.get("patch_size") or 1) * (2 if pipeline == "FluxPipeline" else 1)
            why = f"cut into the transformer's {factor}×{factor} patches"
        return cls(sample * vae_scale, vae_scale, vae_scale * factor, why)

    @classmethod
    def from_folder(cls, model_dir) -> "SizeRule":
        """From the folder's JSON configs, before anything heavy is loaded."""
        import json
        from pathlib import Path

        model_dir = Path(model_dir)
        index = json.loads((model_dir / "model_index.json").read_text())
        name = "unet" if (model_dir / "unet" / "config.json").is_file() else "transformer"
        read = lambda p: json.loads(p.read_text()) if p.is_file() else {}  # noqa: E731
        return cls.from_configs(index.get("_class_name", ""), read(model_dir / name / "config.json"),
                                read(model_dir / "vae" / "config.json"))

    def check(self, height: int, width: int) -> None:
        for what, size in (("--height", height), ("--width", width)):
            if size % self.vae_scale:
                raise UsageError(f"{what} {size} is not a multiple of the VAE's scale {self.vae_scale}")
            if size % self.multiple:
                raise UsageError(f"{what} {size} gives a {size // self.vae_scale}-pixel latent, which cannot be "
                                 f"{self.reason}: use a multiple of {self.multiple} (native size {self.native})")

    def resolve(self, shapes: Shapes) -> Shapes:
        """The shapes with the native size filled in, checked."""
        resolved = replace(shapes, height=shapes.height or self.native, width=shapes.width or self.native)
        self.check(resolved.height, resolved.width)
        return resolved


def pipeline_dims(pipe, shapes: Shapes) -> dict[str, int]:
    """Every symbol of the descriptions, from the pipeline's configs and the target shapes (None: native size)."""
    family = type(pipe).__name__
    rule = SizeRule.from_configs(family, dict(denoiser(pipe).config), dict(pipe.vae.config))
    try:
        shapes = rule.resolve(shapes)
    except UsageError as exc:
        raise ExportError(str(exc)) from None
    latent_h, latent_w = shapes.height // pipe.vae_scale_factor, shapes.width // pipe.vae_scale_factor
    dims = {
        "batch": shapes.batch,
        "unet_batch": 2 * shapes.batch,  # classifier-free guidance
        "latent_channels": denoiser(pipe).config.in_channels,
        "vae_latent_channels": pipe.vae.config.latent_channels,
        "latent_parameters": 2 * pipe.vae.config.latent_channels,
        "latent_height": latent_h,
        "latent_width": latent_w,
        "packed_latents": (latent_h // 2) * (latent_w // 2),
        "image_channels": pipe.vae.config.in_channels,
        "height": shapes.height,
        "width": shapes.width,
        "timestep": SAMPLE_TIMESTEP.get(family, 500),  # not a size: the sample inputs' timestep (Flux: a float)
    }
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        config = encoder.config
        tokenizer = getattr(pipe, "tokenizer" + name[len("text_encoder"):])
        t5 = config.model_type == "t5"
        dims[f"{name}.vocab"] = config.vocab_size
        dims[f"{name}.hidden"] = config.d_model if t5 else config.hidden_size
        dims[f"{name}.projection"] = getattr(config, "projection_dim", 0)
        dims[f"{name}.sequence"] = T5_SEQUENCE[family] if t5 else tokenizer.model_max_length
    config = denoiser(pipe).config
    if "cross_attention_dim" in config:
        dims["cross_attention"] = config.cross_attention_dim
    if "joint_attention_dim" in config:
        dims["joint_attention"] = config.joint_attention_dim
        dims["pooled_projection"] = config.pooled_projection_dim
    if family == "StableDiffusion3Pipeline":
        dims["joint_sequence"] = dims["text_encoder.sequence"] + T5_SEQUENCE[family]
    return dims

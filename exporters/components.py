"""One description per pipeline component: names, dtypes, symbolic axes, sample inputs, wrapper.

Every exporter (ONNX, TensorRT profiles, Core ML input types) and every validator reads these and
nothing else. Names follow optimum's ONNX configs, so optimum's ORT pipelines load our bundles.
Symbolic dims are resolved from the component's own config and the target's shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from exporters.profiles import Shapes
from obsdiff.errors import ExportError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    dims: tuple[str | int, ...]  # ints are fixed, strings are symbols resolved per pipeline


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # folder name in the bundle (optimum's layout)
    source: str  # pipeline attribute it wraps
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: Callable[[nn.Module], nn.Module]
    dynamic: tuple[str, ...] = ("batch",)  # symbols that stay dynamic in ONNX

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
            if t.dtype in (torch.int64, torch.int32):
                out[t.name] = torch.randint(0, dims["vocab"], shape, generator=g, dtype=t.dtype)
            elif t.name == "timestep":
                out[t.name] = torch.tensor(float(dims["timestep"]), dtype=t.dtype).reshape(shape)
            else:
                out[t.name] = torch.randn(shape, generator=g, dtype=t.dtype)
        return out


# ---- wrappers: small explicit modules, one job each (no patched forwards) -----------------------


class TextEncoderWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids, return_dict=False)
        return out[0], out[1]


class UNetWrapper(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VAEDecoderWrapper(nn.Module):
    """Decodes already-scaled latents (the pipeline divides by scaling_factor first)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VAEEncoderWrapper(nn.Module):
    """Returns the posterior's parameters (mean and log-variance stacked), as optimum does."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor):
        return self.vae.encode(sample, return_dict=False)[0].parameters


SD_COMPONENTS: tuple[ComponentSpec, ...] = (
    ComponentSpec(
        "text_encoder", "text_encoder",
        inputs=(TensorSpec("input_ids", torch.int64, ("batch", "sequence")),),
        outputs=(TensorSpec("last_hidden_state", torch.float32, ("batch", "sequence", "text_hidden")),
                 TensorSpec("pooler_output", torch.float32, ("batch", "text_hidden"))),
        wrapper=TextEncoderWrapper,
    ),
    ComponentSpec(
        "unet", "unet",
        inputs=(TensorSpec("sample", torch.float32, ("unet_batch", "latent_channels", "latent_height", "latent_width")),
                TensorSpec("timestep", torch.float32, ()),
                TensorSpec("encoder_hidden_states", torch.float32, ("unet_batch", "sequence", "text_hidden"))),
        outputs=(TensorSpec("out_sample", torch.float32,
                            ("unet_batch", "latent_channels", "latent_height", "latent_width")),),
        wrapper=UNetWrapper, dynamic=("unet_batch",),
    ),
    ComponentSpec(
        "vae_decoder", "vae",
        inputs=(TensorSpec("latent_sample", torch.float32, ("batch", "latent_channels", "latent_height", "latent_width")),),
        outputs=(TensorSpec("sample", torch.float32, ("batch", "image_channels", "height", "width")),),
        wrapper=VAEDecoderWrapper,
    ),
    ComponentSpec(
        "vae_encoder", "vae",
        inputs=(TensorSpec("sample", torch.float32, ("batch", "image_channels", "height", "width")),),
        outputs=(TensorSpec("latent_parameters", torch.float32,
                            ("batch", "latent_parameters", "latent_height", "latent_width")),),
        wrapper=VAEEncoderWrapper,
    ),
)

PIPELINE_SPECS: dict[str, tuple[ComponentSpec, ...]] = {
    "StableDiffusionPipeline": SD_COMPONENTS,
}


def specs_for(pipe) -> tuple[ComponentSpec, ...]:
    name = type(pipe).__name__
    if name not in PIPELINE_SPECS:
        raise ExportError(f"no component description for {name} yet; supported: {', '.join(PIPELINE_SPECS)}")
    return PIPELINE_SPECS[name]


def pipeline_dims(pipe, shapes: Shapes) -> dict[str, int]:
    """Every symbol of the SD component descriptions, from the pipeline's configs and the target shapes."""
    scale = pipe.vae_scale_factor
    if shapes.height % scale or shapes.width % scale:
        raise ExportError(f"image size {shapes.height}×{shapes.width} is not a multiple of the VAE factor {scale}")
    return {
        "batch": shapes.batch,
        "unet_batch": 2 * shapes.batch,  # classifier-free guidance
        "sequence": pipe.tokenizer.model_max_length,
        "vocab": pipe.text_encoder.config.vocab_size,
        "text_hidden": pipe.text_encoder.config.hidden_size,
        "latent_channels": pipe.unet.config.in_channels,
        "latent_parameters": 2 * pipe.vae.config.latent_channels,
        "latent_height": shapes.height // scale,
        "latent_width": shapes.width // scale,
        "image_channels": pipe.vae.config.in_channels,
        "height": shapes.height,
        "width": shapes.width,
        "timestep": 500,
    }

"""Calibration: run the real pipeline while one package of layers is hooked.

The runner drives the pipeline's own denoising loop (any diffusers scheduler, classifier-free
guidance batches included) and moves the ``StepContext`` forward through
``callback_on_step_end``; hooks read the step from that context, never from a global.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from obsdiff.errors import CalibrationError
from obsdiff.hessian import HessianAccumulator, StepContext, input_chunks, layer_rows

log = logging.getLogger(__name__)


@dataclass
class CalibrationSettings:
    prompts: list[str]
    steps: int = 25
    guidance: float = 7.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    batch_size: int = 16
    # Global index of each prompt: prompt i always draws its latents from seed + i, so a prompt set
    # sharded across processes sees exactly the noise of a single-process run.
    prompt_ids: list[int] | None = None
    hessian_device: str | None = None  # None: where the activations are
    hessian_dtype: torch.dtype = torch.float32


class PackageHooks:
    """Forward pre-hooks that fill one Hessian accumulator per distinct layer input.

    Layers under the same parent that receive the very same input tensor in the same call (q/k/v of
    a self-attention; k/v of a cross-attention) share one accumulator; the grouping is found on the
    first call and checked on every later one.
    """

    def __init__(self, layers: dict[str, nn.Module], ctx: StepContext, weighted: bool,
                 hessian_device: str | None = None, hessian_dtype: torch.dtype = torch.float32,
                 diagonal_only: bool = False) -> None:
        self.layers = layers
        self.diagonal_only = diagonal_only
        self.hessian_device, self.hessian_dtype = hessian_device, hessian_dtype
        self.ctx = ctx
        self.weighted = weighted
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.owner: dict[str, str] = {}  # layer -> layer whose accumulator it uses
        self._last_input: dict[str, tuple[weakref.ref, str]] = {}  # parent -> (last input, its owner)
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        parent = name.rsplit(".", 1)[0] if "." in name else ""

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                raise CalibrationError(f"layer {name} was called without a tensor input")
            # Identity through a weak reference: a freed tensor whose memory was reused never matches.
            last = self._last_input.get(parent)
            same_input = last is not None and last[0]() is x
            if name not in self.owner:
                self.owner[name] = last[1] if same_input else name
            owner = self.owner[name]
            if owner != name:
                if not (same_input and last[1] == owner):
                    raise CalibrationError(f"layer {name} stopped sharing its input with {owner}")
                return
            self._last_input[parent] = (weakref.ref(x), name)
            alpha, step = (self.ctx.alpha(), self.ctx.step) if self.weighted else (1.0, None)
            for i, part in enumerate(input_chunks(module, x)):
                rows = layer_rows(module, part)
                if not torch.isfinite(rows).all():
                    raise CalibrationError(f"non-finite activations (NaN/Inf) entering layer {name}")
                acc = self.accumulators.get(name)
                if acc is None:
                    acc = self.accumulators[name] = HessianAccumulator(
                        rows.shape[1], self.hessian_device or rows.device, self.hessian_dtype, self.diagonal_only)
                acc.add(rows, alpha, step, count_step=i == 0)

        return hook

    def __enter__(self) -> "PackageHooks":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hessian(self, name: str) -> HessianAccumulator:
        owner = self.owner.get(name)
        if owner is None or owner not in self.accumulators:
            raise CalibrationError(f"layer {name} was never called during calibration")
        return self.accumulators[owner]

    def release(self, name: str) -> None:
        """Free the Hessian ``name`` reads (call once every layer sharing it is solved)."""
        self.accumulators.pop(self.owner.get(name, name), None)


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_pipeline(pipe, settings: CalibrationSettings, ctx: StepContext, *, decode: bool,
                 after_batch: Callable[[torch.Tensor], None] | None = None, desc: str = "calibrate") -> None:
    """Generate every calibration prompt once, with hooks wherever the caller placed them."""
    ids = settings.prompt_ids if settings.prompt_ids is not None else list(range(len(settings.prompts)))
    batches = list(zip(_batches(settings.prompts, settings.batch_size), _batches(ids, settings.batch_size)))
    bar = tqdm(total=len(batches) * settings.steps, desc=desc, unit="step", mininterval=2, leave=False)
    pipe.set_progress_bar_config(disable=True)

    def on_step_end(_pipe, i: int, _t, _kwargs: dict) -> dict:
        ctx.step = i + 1
        bar.update(1)
        return {}

    extra = {}
    if settings.height:
        extra["height"] = settings.height
    if settings.width:
        extra["width"] = settings.width
    try:
        for prompts, prompt_ids in batches:
            ctx.step = 0
            out = pipe(prompts, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                       generator=[torch.Generator().manual_seed(settings.seed + i) for i in prompt_ids],
                       output_type="pt" if decode else "latent", callback_on_step_end=on_step_end, **extra)
            ctx.step = None
            if after_batch is not None:
                after_batch(out.images)
    finally:
        ctx.step = None
        bar.close()


@dataclass(frozen=True)
class ComponentCall:
    """One real call of a component as generation makes it (one prompt, one step, at the calibration size): what
    the FLOP count and the memory plan's activation estimate run on."""

    module: nn.Module  # what the call runs: the denoiser itself, or the VAE's decoder
    prefix: str  # that module's path inside the component ("decoder." for the VAE)
    args: tuple
    kwargs: dict[str, Any]

    @property
    def batch(self) -> int:
        sample = self.args[0] if self.args else self.kwargs.get("sample", self.kwargs.get("hidden_states"))
        return int(sample.shape[0])

    def __call__(self):
        return self.module(*self.args, **self.kwargs)


def capture_call(pipe, name: str, prompt: str, guidance: float, height: int | None, width: int | None) -> ComponentCall:
    """Run the pipeline for one step on ``prompt`` and keep the first call of component ``name`` (the denoiser, or the
    VAE decoder)."""
    component = pipe.components[name]
    module, prefix = (component.decoder, "decoder.") if name == "vae" else (component, "")
    captured: list = []
    handle = module.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.append((args, kwargs)) if not captured else None, with_kwargs=True)
    extra = {k: v for k, v in (("height", height), ("width", width)) if v}
    try:
        with torch.no_grad():
            pipe(prompt, num_inference_steps=1, guidance_scale=guidance, output_type="np" if name == "vae" else "latent",
                 **extra)
    finally:
        handle.remove()
    return ComponentCall(module, prefix, *captured[0])


def vae_encoder_feed(vae) -> Callable[[torch.Tensor], None]:
    """The VAE encoder sees images in generation (img2img): encode each generated batch."""

    def feed(images: torch.Tensor) -> None:
        vae.encode(images.to(vae.dtype) * 2 - 1)

    return feed

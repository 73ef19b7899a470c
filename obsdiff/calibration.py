"""Calibration: run the real denoising while one package of layers is hooked, paying only for what its Hessians need.

Two ways to feed a package:
- ``run_pipeline``: the pipeline's own loop (any diffusers scheduler, classifier-free guidance batches included),
  every prompt, every step, end to end (``--calibration full``; the text encoders' and the VAE's packages).
- ``record_trajectory`` once, then ``replay``: the denoiser's recorded calls (latents, timestep, text states, CFG
  batch) fed straight to the partly pruned denoiser, only as many of them as the package's widest row budget needs,
  each stopped as soon as every hooked layer has seen its input (``StopForward``): the layers after the package are
  never computed (``--calibration replay``, the default).

Either way each hooked layer keeps a row budget: of a call's rows it keeps a seeded uniform subset, sized so that the
layer ends with about ``rows_per_column`` × its columns in total (all rows where they are scarce), weighted so the
statistic stays the α-weighted mean of 2XXᵀ. The step and the prompt batch reach the hooks through the
``StepContext``, never a global; the subset of a call depends only on (seed, layer, batch, step, chunk), so processes
that split the prompts draw exactly what one process would.
"""

from __future__ import annotations

import logging
import random
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from obsdiff.errors import CalibrationError
from obsdiff.hessian import HessianAccumulator, StepContext, input_chunks, sampled_rows

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


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Every hooked layer of the package has seen this call's input: the rest of the forward is not needed."""


def _subset_seed(seed: int, layer: str, batch: int | None, step: int | None, chunk: int) -> int:
    return zlib.crc32(f"{seed}:{layer}:{batch}:{step}:{chunk}".encode())


class PackageHooks:
    """Forward pre-hooks that fill one Hessian accumulator per distinct layer input.

    Layers under the same parent that receive the very same input tensor in the same call (q/k/v of
    a self-attention; k/v of a cross-attention) share one accumulator; the grouping is found on the
    first call and checked on every later one. ``quotas``: rows kept per call for each layer (None: all).
    ``stop_when_done``: raise ``StopForward`` once every hooked layer has fired in the current call.
    Non-finite activations are flagged on the device and checked once per call (``check_finite``), not per layer.
    """

    def __init__(self, layers: dict[str, nn.Module], ctx: StepContext, weighted: bool,
                 hessian_device: str | None = None, hessian_dtype: torch.dtype = torch.float32,
                 diagonal_only: bool = False, quotas: dict[str, int | None] | None = None, seed: int = 0,
                 stop_when_done: bool = False) -> None:
        self.layers = layers
        self.diagonal_only = diagonal_only
        self.hessian_device, self.hessian_dtype = hessian_device, hessian_dtype
        self.ctx = ctx
        self.weighted = weighted
        self.quotas, self.seed, self.stop_when_done = quotas or {}, seed, stop_when_done
        self.accumulators: dict[str, HessianAccumulator] = {}
        self.owner: dict[str, str] = {}  # layer -> layer whose accumulator it uses
        self._last_input: dict[str, tuple[weakref.ref, str]] = {}  # parent -> (last input, its owner)
        self._handles: list = []
        self._fired: set[str] = set()
        self._fired_window: tuple[int, int, int] | None = None  # the slice of the call ``_fired`` counts for
        self._nonfinite: dict[str, torch.Tensor] = {}
        self.update_s = 0.0  # time spent building rows and adding them to the Hessians (the rest is the forwards)

    def _hook(self, name: str) -> Callable:
        parent = name.rsplit(".", 1)[0] if "." in name else ""

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if self.ctx.window != self._fired_window:  # the next slice of a split call: every layer fires again
                self._fired.clear()
                self._fired_window = self.ctx.window
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
            else:
                self._last_input[parent] = (weakref.ref(x), name)
                self._accumulate(name, module, x)
            self._fired.add(name)
            if self.stop_when_done and len(self._fired) == len(self.layers):
                raise StopForward

        return hook

    def _accumulate(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            self._add_rows(name, module, x)
        finally:
            self.update_s += time.perf_counter() - t0

    def _add_rows(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        alpha, step = (self.ctx.alpha(), self.ctx.step) if self.weighted else (1.0, None)
        quota, window = self.quotas.get(name), self.ctx.window
        first_slice = window is None or window[0] == 0  # a split call counts its step once
        for i, part in enumerate(input_chunks(module, x) if quota is None else [x]):
            generator = None if quota is None else \
                torch.Generator().manual_seed(_subset_seed(self.seed, name, self.ctx.batch, step, i))
            rows, represents = sampled_rows(module, part, quota, generator, window)
            bad = ~torch.isfinite(rows).all()
            self._nonfinite[name] = bad if name not in self._nonfinite else self._nonfinite[name] | bad
            acc = self.accumulators.get(name)
            if acc is None:
                acc = self.accumulators[name] = HessianAccumulator(
                    rows.shape[1], self.hessian_device or rows.device, self.hessian_dtype, self.diagonal_only)
            acc.add(rows, alpha, step, count_step=i == 0 and first_slice, represents=represents)

    def new_call(self) -> None:
        """A new forward begins: no hooked layer has fired in it yet."""
        self._fired.clear()
        self._fired_window = self.ctx.window

    def check_finite(self) -> None:
        """One sync for the call: a non-finite activation anywhere is an error naming the layer."""
        for name, flag in self._nonfinite.items():
            if bool(flag):
                raise CalibrationError(f"non-finite activations (NaN/Inf) entering layer {name}")
        self._nonfinite.clear()

    def __enter__(self) -> PackageHooks:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hessian(self, name: str) -> HessianAccumulator:
        """The accumulator ``name`` reads, normalised (once) on first access."""
        owner = self.owner.get(name)
        if owner is None or owner not in self.accumulators:
            raise CalibrationError(f"layer {name} was never called during calibration")
        self.accumulators[owner].finalize()
        return self.accumulators[owner]

    def release(self, name: str) -> None:
        """Free the Hessian ``name`` reads (call once every layer sharing it is solved)."""
        self.accumulators.pop(self.owner.get(name, name), None)


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


PromptInputs = Callable[[list[str]], dict]  # prompts → the call's keywords in their place (``lean.PromptEmbeddings``)


def _prompt_kwargs(prompts: list[str] | str, prompt_inputs: PromptInputs | None) -> dict:
    if prompt_inputs is None:
        return {"prompt": prompts}
    return prompt_inputs([prompts] if isinstance(prompts, str) else prompts)


def run_pipeline(pipe, settings: CalibrationSettings, ctx: StepContext, *, decode: bool,
                 after_batch: Callable[[torch.Tensor], None] | None = None, desc: str = "calibrate",
                 hooks: PackageHooks | None = None, prompt_inputs: PromptInputs | None = None) -> None:
    """Generate every calibration prompt once, with hooks wherever the caller placed them; ``prompt_inputs``: the
    prompts' embeddings in their place (the text encoders already let go)."""
    ids = settings.prompt_ids if settings.prompt_ids is not None else list(range(len(settings.prompts)))
    batches = list(zip(_batches(settings.prompts, settings.batch_size), _batches(ids, settings.batch_size)))
    bar = tqdm(total=len(batches) * settings.steps, desc=desc, unit="step", mininterval=2, leave=False)
    pipe.set_progress_bar_config(disable=True)

    def on_step_end(_pipe, i: int, _t, _kwargs: dict) -> dict:
        ctx.step = i + 1
        if hooks is not None:
            hooks.check_finite()
        bar.update(1)
        return {}

    extra = {}
    if settings.height:
        extra["height"] = settings.height
    if settings.width:
        extra["width"] = settings.width
    try:
        for prompts, prompt_ids in batches:
            ctx.step, ctx.batch = 0, prompt_ids[0] // settings.batch_size
            out = pipe(**_prompt_kwargs(prompts, prompt_inputs), num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance,
                       generator=[torch.Generator().manual_seed(settings.seed + i) for i in prompt_ids],
                       output_type="pt" if decode else "latent", callback_on_step_end=on_step_end, **extra)
            ctx.step = None
            if after_batch is not None:
                after_batch(out.images)
            if hooks is not None:
                hooks.check_finite()
    finally:
        ctx.step = ctx.batch = None
        bar.close()


@dataclass(frozen=True)
class RecordedCall:
    """One denoiser call of the calibration's generation: which prompt batch, which step, and its inputs."""

    batch: int
    step: int
    args: tuple
    kwargs: dict[str, Any] = field(hash=False)


def record_trajectory(pipe, module: nn.Module, settings: CalibrationSettings, ctx: StepContext,
                      desc: str = "record", prompt_inputs: PromptInputs | None = None) -> list[RecordedCall]:
    """Generate every calibration prompt once and keep every call of ``module`` (the denoiser): the inputs a package's
    replay feeds it. Latents are new tensors each step; the text states are one tensor per batch, shared by its calls."""
    calls: list[RecordedCall] = []

    def hook(_module, args, kwargs) -> None:
        calls.append(RecordedCall(ctx.batch, ctx.step, tuple(args), dict(kwargs)))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run_pipeline(pipe, settings, ctx, decode=False, desc=desc, prompt_inputs=prompt_inputs)
    finally:
        handle.remove()
    return calls


def trajectory_to_tensors(calls: list[RecordedCall]) -> tuple[dict[str, torch.Tensor], list]:
    """The recorded calls as flat tensors plus a JSON description (a checkpoint writes them with safetensors, so a
    resumed prune replays the same trajectory without recording it again). A tensor shared by several calls (a
    batch's text states) is stored once."""
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[int, str] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in keys:
                keys[id(value)] = key = str(len(keys))
                tensors[key] = value.detach().to("cpu", copy=True).contiguous()
            return {"tensor": keys[id(value)]}
        if isinstance(value, dict):
            return {"dict": {str(k): encode(v) for k, v in value.items()}}
        if isinstance(value, (tuple, list)):
            return {type(value).__name__: [encode(v) for v in value]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"a denoiser input of type {type(value).__name__} cannot be saved")

    spec = [{"batch": c.batch, "step": c.step, "args": encode(list(c.args)), "kwargs": encode(c.kwargs)}
            for c in calls]
    return tensors, spec


def trajectory_from_tensors(tensors: dict[str, torch.Tensor], spec: list) -> list[RecordedCall]:
    """The inverse of ``trajectory_to_tensors``: shared tensors come back shared."""

    def decode(node: dict) -> Any:
        (kind, value), = node.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {k: decode(v) for k, v in value.items()}
        if kind in ("tuple", "list"):
            items = [decode(v) for v in value]
            return tuple(items) if kind == "tuple" else items
        return value

    return [RecordedCall(c["batch"], c["step"], tuple(decode(c["args"])), decode(c["kwargs"])) for c in spec]


def select_calls(keys: list[tuple[int, int]], count: int, seed: int) -> set[tuple[int, int]]:
    """``count`` of the (batch, step) keys of a whole calibration, a seeded uniform draw (spread over prompts and
    steps), the same in every process."""
    chosen = list(keys)
    random.Random(seed).shuffle(chosen)
    return set(chosen[:count])


def replay(module: nn.Module, calls: list[RecordedCall], ctx: StepContext, hooks: PackageHooks,
           desc: str = "replay") -> None:
    """Feed recorded calls to ``module`` with a package's hooks in place; each stops once every hooked layer has seen
    its input."""
    try:
        with torch.no_grad():
            for call in tqdm(calls, desc=desc, unit="call", mininterval=2, leave=False):
                ctx.step, ctx.batch = call.step, call.batch
                hooks.new_call()
                try:
                    module(*call.args, **call.kwargs)
                except StopForward:
                    pass
                hooks.check_finite()
    finally:
        ctx.step = ctx.batch = None


def call_batch(args: tuple, kwargs: dict) -> int | None:
    """The batch of a denoiser call: its sample's first dimension (``sample`` for a UNet, ``hidden_states`` for a
    transformer), None when it has none."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    return int(sample.shape[0]) if isinstance(sample, torch.Tensor) and sample.dim() else None


@dataclass(frozen=True)
class ComponentCall:
    """One real call of a component as generation makes it (one prompt, one step, at the calibration size): what
    the FLOP count and the memory plan's activation estimate run on."""

    module: nn.Module  # what the call runs: the denoiser itself, or the VAE's decoder
    prefix: str  # that module's path inside the component ("decoder." for the VAE)
    args: tuple
    kwargs: dict[str, Any]

    @property
    def batch(self) -> int | None:
        return call_batch(self.args, self.kwargs)

    def __call__(self):
        return self.module(*self.args, **self.kwargs)


def capture_call(pipe, name: str, prompt: str, guidance: float, height: int | None, width: int | None,
                 prompt_inputs: PromptInputs | None = None) -> ComponentCall:
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
            pipe(**_prompt_kwargs(prompt, prompt_inputs), num_inference_steps=1, guidance_scale=guidance,
                 output_type="np" if name == "vae" else "latent", **extra)
    finally:
        handle.remove()
    return ComponentCall(module, prefix, *captured[0])


def vae_encoder_feed(vae) -> Callable[[torch.Tensor], None]:
    """The VAE encoder sees images in generation (img2img): encode each generated batch."""

    def feed(images: torch.Tensor) -> None:
        vae.encode(images.to(vae.dtype) * 2 - 1)

    return feed

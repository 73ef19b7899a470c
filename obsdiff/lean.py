"""The pipeline as calibration needs it, and no more.

A denoiser package is calibrated on the denoiser alone: the text encoders run once per prompt batch, and the VAE not
at all (the calibration stops at latents). So:

- ``encode_prompts``: every calibration batch's prompt embeddings (and SDXL's / SD3's pooled ones), computed once with
  the pipeline's own ``encode_prompt``, on exactly the batches generation will use (the same numbers a full call
  computes); the pipeline is then called with ``prompt_embeds=…`` instead of the prompt.
- ``release``: the components nothing calls any more (the text encoders, the VAE) are dropped from the pipeline, the
  way diffusers' ``text_encoder_3=None`` drops SD3's T5.
- ``SplitCalls``: each denoiser call runs as consecutive slices of its batch (the two halves of a classifier-free
  guidance batch first): activations shrink with the slice, and the Hessians do not change, since every hook is told
  which slice of the call it sees (``StepContext.window``) and draws its rows from the whole call's draw.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from obsdiff.calibration import StopForward, call_batch
from obsdiff.config import denoiser_name
from obsdiff.errors import CalibrationError
from obsdiff.hessian import StepContext
from obsdiff.model_io import module_bytes, pipeline_components

log = logging.getLogger(__name__)

# What ``encode_prompt`` returns, by tuple length, as ``__call__``'s keyword names (None: not an input of the call).
EMBEDDING_OUTPUTS: dict[int, tuple[str | None, ...]] = {
    2: ("prompt_embeds", "negative_prompt_embeds"),  # SD 1.x / 2.x
    3: ("prompt_embeds", "pooled_prompt_embeds", None),  # Flux (guidance-distilled: no negative; text ids derived)
    4: ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),  # SDXL, SD3
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class PromptEmbeddings:
    """Each prompt batch's ``__call__`` keywords, computed once; small (SDXL: 64 prompts × 2 × 77 × 2048 floats is
    80 MB)."""

    by_batch: dict[tuple[str, ...], dict[str, torch.Tensor]] = field(default_factory=dict)

    def call_kwargs(self, prompts: list[str] | str) -> dict:
        """The keywords that replace ``prompt`` in a pipeline call on these prompts."""
        key = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        if key not in self.by_batch:
            raise CalibrationError(f"no prompt embeddings for the batch {list(key)[:2]}…: the text encoders were "
                                   "released after encoding the calibration's batches")
        return {"prompt": None, **self.by_batch[key]}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kw in self.by_batch.values() for t in kw.values())


def _encode(pipe, prompts: list[str], guidance: float, device: torch.device) -> tuple:
    params = inspect.signature(pipe.encode_prompt).parameters
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    cfg = guidance > 1 and getattr(getattr(denoiser, "config", None), "time_cond_proj_dim", None) is None
    given = {"prompt": prompts, "prompt_2": None, "prompt_3": None, "device": device, "num_images_per_prompt": 1,
             "do_classifier_free_guidance": cfg}
    with torch.no_grad():
        out = pipe.encode_prompt(**{k: v for k, v in given.items() if k in params})
    return out if isinstance(out, tuple) else (out,)


def encode_prompts(pipe, batches: list[list[str]], guidance: float, dtype: torch.dtype) -> PromptEmbeddings | None:
    """Every batch's embeddings, as ``dtype`` (the denoiser's), or None where this pipeline's ``encode_prompt`` gives
    something the call cannot take back."""
    if not callable(getattr(pipe, "encode_prompt", None)):
        return None
    accepted = set(inspect.signature(pipe.__call__).parameters)
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    embeddings = PromptEmbeddings()
    for prompts in batches:
        key = tuple(prompts)
        if key in embeddings.by_batch:
            continue
        out = _encode(pipe, list(prompts), guidance, device)
        names = EMBEDDING_OUTPUTS.get(len(out))
        if names is None or not all(n is None or n in accepted for n in names):
            log.info("%s.encode_prompt returns %d outputs: the text encoders stay loaded", type(pipe).__name__,
                     len(out))
            return None
        embeddings.by_batch[key] = {n: t.to(dtype) for n, t in zip(names, out) if n is not None and t is not None}
    return embeddings


def release(pipe, names: list[str]) -> int:
    """Drop components from the pipeline (diffusers' ``component=None``); the bytes of parameters let go."""
    freed = 0
    for name in names:
        if isinstance(getattr(pipe, name, None), nn.Module):
            freed += module_bytes(getattr(pipe, name), buffers=False)
            setattr(pipe, name, None)
    gc.collect()
    trim_heap()
    return freed


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``). Most weight tensors are below glibc's
    mmap threshold: freed, they stay in the heap and in the resident size until trimmed. Elsewhere: nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def held_bytes(pipe) -> int:
    """Parameter and buffer bytes of the pipeline's components as they are held now."""
    return sum(module_bytes(m) for m in pipeline_components(pipe).values())


def slice_batch(value, batch: int, start: int, stop: int):
    """``value`` with every tensor whose first dimension is the call's batch cut to [start, stop)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: slice_batch(v, batch, start, stop) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(slice_batch(v, batch, start, stop) for v in value)
    return value


def concat_outputs(outputs: list):
    """The slices' outputs joined back along the batch (a tensor, a tuple of them, or a diffusers output)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple):
        return tuple(concat_outputs([o[i] for o in outputs]) if isinstance(first[i], torch.Tensor) else first[i]
                     for i in range(len(first)))
    if isinstance(first, dict):  # diffusers' BaseOutput is an OrderedDict
        return type(first)(**{k: concat_outputs([o[k] for o in outputs]) for k in first})
    raise CalibrationError(f"cannot join split outputs of type {type(first).__name__}")


def slices(batch: int, parts: int) -> Iterator[tuple[int, int]]:
    """``parts`` consecutive slices of ``batch`` (the first ones one larger when it does not divide)."""
    parts = max(1, min(parts, batch))
    edges = [round(i * batch / parts) for i in range(parts + 1)]
    yield from zip(edges[:-1], edges[1:])


class SplitCalls:
    """While active, every call of ``module`` runs as ``parts`` calls on consecutive slices of its batch.

    The module's own hooks (a recording) see the whole call; its layers' hooks see each slice, with
    ``ctx.window = (start, stop, batch)`` telling them which. A slice stopped early (``StopForward``: its package's
    layers have all seen it) does not stop the next one; the call then stops after the last slice.
    """

    def __init__(self, module: nn.Module, parts: int, ctx: StepContext) -> None:
        self.module, self.parts, self.ctx = module, parts, ctx

    def __enter__(self) -> SplitCalls:
        if self.parts > 1:
            original = self.module.forward

            def forward(*args, **kwargs):
                batch = call_batch(args, kwargs)
                if batch is None or batch < 2:
                    return original(*args, **kwargs)
                outputs, stopped = [], False
                try:
                    for start, stop in slices(batch, self.parts):
                        self.ctx.window = (start, stop, batch)
                        try:
                            outputs.append(original(*slice_batch(args, batch, start, stop),
                                                    **slice_batch(kwargs, batch, start, stop)))
                        except StopForward:
                            stopped = True
                finally:
                    self.ctx.window = None
                if stopped:
                    raise StopForward
                return concat_outputs(outputs)

            self.module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        if self.parts > 1:
            del self.module.forward


@dataclass
class LeanPipeline:
    """What calibration let go of: the prompt embeddings that replace the text encoders (None: nothing was released),
    the components dropped and their bytes."""

    embeddings: PromptEmbeddings | None = None
    released: list[str] = field(default_factory=list)
    released_bytes: int = 0

    def to_json(self) -> dict:
        return {"released": self.released, "released_gib": self.released_bytes / 2**30,
                "embeddings_gib": self.embeddings.nbytes / 2**30 if self.embeddings else 0.0}


def lean_for_calibration(pipe, targets: tuple[str, ...], batches: list[list[str]], guidance: float) -> LeanPipeline:
    """Encode every calibration batch once, then let go of every component that neither is pruned nor is the
    denoiser. Nothing is released when a text encoder is pruned (its packages need the prompts themselves), when
    there is no denoiser, or when this pipeline's embeddings cannot be handed back to its call."""
    components = pipeline_components(pipe)
    denoiser = denoiser_name(components)
    if denoiser is None or not batches or any(t in TEXT_ENCODERS for t in targets):
        return LeanPipeline()
    dtype = next(components[denoiser].parameters()).dtype
    embeddings = encode_prompts(pipe, batches, guidance, dtype)
    if embeddings is None:
        return LeanPipeline()
    names = [n for n in components if n != denoiser and n not in targets]
    freed = release(pipe, names)
    log.info("prompts encoded once (%d batches, %.1f MiB); released %s (%.2f GiB)", len(embeddings.by_batch),
             embeddings.nbytes / 2**20, ", ".join(names) or "nothing", freed / 2**30)
    return LeanPipeline(embeddings, names, freed)

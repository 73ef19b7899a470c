"""Comparisons: exported components and pipelines against PyTorch, plus latency (what the gates are made of).

(1) per component on the description's sample inputs: cosine, relative L2, max abs error;
(2) end to end: exported pipeline vs PyTorch pipeline, same prompts, initial latents and scheduler → PSNR;
(3) latency: median and p90 after warm-up. Reference inputs and PyTorch outputs are kept so that a
bundle can be re-validated later (``obsdiff validate``) or on the device.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from obsdiff.exporters.components import ComponentSpec, denoiser, packed
from obsdiff.exporters.device.benchmark import cosine as cosine_similarity
from obsdiff.exporters.device.benchmark import psnr as psnr  # one PSNR, shared with the bundle's scripts
from obsdiff.exporters.device.benchmark import timings

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    cosine: float
    relative_l2: float
    max_abs: float

    @classmethod
    def of(cls, reference: np.ndarray, candidate: np.ndarray) -> "Comparison":
        a = reference.astype(np.float64).ravel()
        b = candidate.astype(np.float64).ravel()
        rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        return cls(cosine_similarity(a, b), rel, float(np.abs(a - b).max()))


TIMING_BUDGET_S = 60.0  # per timed thing: small models get every run, SD-size ones at least 3


def timings_ms(fn: Callable[[], object], warmup: int = 3, runs: int = 20) -> dict[str, float]:
    """Median and p90 after warm-up: the device validator's own loop, so host and device time alike.

    Stops early (after at least 3 runs) once ``TIMING_BUDGET_S`` is spent; ``runs`` says how many were timed.
    """
    return timings(fn, warmup, runs, TIMING_BUDGET_S)


def interleaved_ms(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, dict[str, float]]:
    """Several candidates (dense, pruned) timed alternately, so drift on the machine hits them equally."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) * 1000)
    return {"median_ms": {k: statistics.median(v) for k, v in samples.items()},
            "p90_ms": {k: sorted(v)[min(len(v) - 1, int(0.9 * len(v)))] for k, v in samples.items()}}


@torch.no_grad()
def reference_io(pipe, spec: ComponentSpec, dims: dict[str, int]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sample inputs from the description, and the PyTorch wrapper's outputs on them."""
    inputs = spec.sample_inputs(dims)
    wrapper = spec.wrapper(getattr(pipe, spec.source)).eval()
    outs = wrapper(*inputs.values())
    outs = outs if isinstance(outs, tuple) else (outs,)
    return ({k: v.numpy() for k, v in inputs.items()},
            {t.name: o.float().numpy() for t, o in zip(spec.outputs, outs)})


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, dict]:
    return {name: asdict(Comparison.of(reference[name], candidate[name])) for name in reference}


def initial_latents(pipe, count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The starting noise every compared pipeline gets: (N, C, h, w), or Flux's packed (N, tokens, 4·C)."""
    scale = pipe.vae_scale_factor
    channels = denoiser(pipe).config.in_channels
    if packed(pipe):
        shape = (count, (height // scale // 2) * (width // scale // 2), channels)
    else:
        shape = (count, channels, height // scale, width // scale)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_pipeline_images(pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance: float,
                        height: int, width: int) -> np.ndarray:
    """Images (N, H, W, C) in [0, 1] from a diffusers or optimum ORT pipeline with fixed latents."""
    out = pipe(prompts, latents=latents.clone(), num_inference_steps=steps, guidance_scale=guidance,
               height=height, width=width, output_type="np")
    return np.asarray(out.images, dtype=np.float32)


def save_image_grid(rows: dict[str, np.ndarray], path: Path, scale: int = 4) -> None:
    """One labelled row per source (dense PyTorch, pruned PyTorch, exported), images side by side."""
    from PIL import Image, ImageDraw

    label_w = 110
    first = next(iter(rows.values()))
    n, h, w = first.shape[0], first.shape[1] * scale, first.shape[2] * scale
    canvas = Image.new("RGB", (label_w + n * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * (h + 2) + h // 2 - 5), label, fill="black")
        for i, img in enumerate(images):
            tile = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8).squeeze())
            canvas.paste(tile.resize((w, h), Image.NEAREST), (label_w + i * (w + 2), r * (h + 2)))
    canvas.save(path)

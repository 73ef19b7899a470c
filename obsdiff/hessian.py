"""Hessian statistics: timestep weights, the step context, and accumulators for Linear and Conv.

H = 2·Σ_t α_t X_t X_tᵀ / Σ_t α_t·B_t, with X_t the layer inputs at denoising step t (rows are tokens
or conv patches). The solver only ever sees the finished matrix; the weighting is a setting of the
statistic, not of the solver.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from obsdiff.errors import CalibrationError


class Weighting(enum.StrEnum):
    UNIFORM = "uniform"
    LOG_DECREASE = "log-decrease"
    LOG_INCREASE = "log-increase"
    LINEAR_DECREASE = "linear-decrease"
    LINEAR_INCREASE = "linear-increase"


def timestep_weights(kind: Weighting | str, num_steps: int, alpha_min: float = 0.8, alpha_max: float = 1.2) -> list[float]:
    """α_t for t = 1..T (t = 1 the noisiest step); returned as a list indexed 0..T−1.

    log-decrease: α_t = α_min + (α_max − α_min)/ln T · ln(T − t + 1)  (the paper's default).
    """
    kind = Weighting(kind)
    T = num_steps
    if T < 1:
        raise ValueError("need at least one denoising step")
    span = alpha_max - alpha_min
    out = []
    for t in range(1, T + 1):
        if kind is Weighting.UNIFORM or T == 1:
            a = 1.0
        elif kind is Weighting.LOG_DECREASE:
            a = alpha_min + span / math.log(T) * math.log(T - t + 1)
        elif kind is Weighting.LOG_INCREASE:
            a = alpha_min + span / math.log(T) * math.log(t)
        elif kind is Weighting.LINEAR_DECREASE:
            a = alpha_max - span * (t - 1) / (T - 1)
        else:
            a = alpha_min + span * (t - 1) / (T - 1)
        out.append(a)
    return out


@dataclass
class StepContext:
    """Which denoising step is running; set by the calibration runner, read by the hooks.

    ``step`` is 0-based and ``None`` outside the denoising loop (text encoder, VAE): those
    activations get weight 1.
    """

    weights: list[float] = field(default_factory=list)
    step: int | None = None
    batch: int | None = None  # which prompt batch of the calibration (global index): seeds a call's row subset
    # a denoiser call run in slices (``lean.SplitCalls``): (start, stop, batch) of the slice running now, else None
    window: tuple[int, int, int] | None = None

    def alpha(self) -> float:
        if self.step is None or not self.weights:
            return 1.0
        if self.step >= len(self.weights):
            raise CalibrationError(f"denoising step {self.step + 1} beyond the {len(self.weights)} scheduled")
        return self.weights[self.step]


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as a 2-D matrix whose columns match the weight's (flattened) columns.

    Linear: tokens × in_features. Conv2d: im2col patches × (C·R·S), unfolded with the conv's own
    padding, stride and dilation so each row is exactly what one output position multiplies.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise TypeError(f"no Hessian statistic for {type(module).__name__}")


def row_count(module: nn.Module, x: torch.Tensor) -> int:
    """How many rows ``layer_rows`` would make of ``x``: tokens of a Linear, output positions of a conv."""
    if isinstance(module, nn.Linear):
        return x.numel() // x.shape[-1]
    h, w = _conv_out_size(module, x)
    return x.shape[0] * h * w


def _conv_out_size(module: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    padding = module.padding if module.padding_mode == "zeros" else (0, 0)
    if module.padding_mode != "zeros":
        x_h, x_w = x.shape[2] + 2 * module.padding[0], x.shape[3] + 2 * module.padding[1]
    else:
        x_h, x_w = x.shape[2], x.shape[3]
    return tuple((size + 2 * p - d * (k - 1) - 1) // st + 1 for size, p, d, k, st in
                 zip((x_h, x_w), padding, module.dilation, module.kernel_size, module.stride))


def sampled_rows(module: nn.Module, x: torch.Tensor, keep: int | None, generator: torch.Generator | None,
                 window: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, float]:
    """``keep`` of the layer's rows of ``x``, a uniform draw without replacement (all of them when ``keep`` is None or
    not smaller), and how many rows they stand for. A zero-padded conv gathers only the drawn patches, so a layer with
    thousands of output positions per call never builds its whole im2col matrix.

    ``window``: ``x`` is the slice (start, stop) of a call of ``batch`` samples (rows are sample-major): the draw is
    the whole call's, and this slice keeps the drawn rows that fall in it, each standing for as many rows as in the
    whole call, so that the slices of a call add up to exactly what the call would have added.
    """
    n = row_count(module, x)
    total, offset = n, 0
    if window is not None:
        start, stop, batch = window
        if x.shape[0] != stop - start:
            raise CalibrationError(f"a {type(module).__name__} input of {x.shape[0]} samples in a slice of "
                                   f"{stop - start}: its rows are not sample-major")
        per_sample = n // max(x.shape[0], 1)
        total, offset = per_sample * batch, per_sample * start
    if keep is None or keep >= total:
        return layer_rows(module, x), n
    index = torch.randperm(total, generator=generator)[:keep]
    represents: float = n
    if window is not None:
        index = index[(index >= offset) & (index < offset + n)] - offset
        represents = index.numel() * total / keep
    index = index.to(x.device)
    kept = index.numel()
    if kept == 0:  # a slice the call's draw left no row in
        return x.new_zeros((0, module.weight[0].numel())), represents
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).index_select(0, index), represents
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return layer_rows(module, x).index_select(0, index), represents
    out_h, out_w = _conv_out_size(module, x)
    sample, position = index // (out_h * out_w), index % (out_h * out_w)
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    padded = F.pad(x, (pw, pw, ph, ph))
    ys = (position // out_w)[:, None] * sh + torch.arange(kh, device=x.device) * dh  # [kept, kh]
    xs = (position % out_w)[:, None] * sw + torch.arange(kw, device=x.device) * dw  # [kept, kw]
    patches = padded[sample[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # [kept, kh, kw, C]
    return patches.permute(0, 3, 1, 2).reshape(kept, -1), represents  # unfold's column order: channel slowest


UNFOLD_BYTES = 256 << 20  # one hook call never unfolds more than this at once


def input_chunks(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A conv input split along the batch so that each chunk's im2col matrix stays below UNFOLD_BYTES.

    (A Linear's rows are a view of its input: nothing to bound.) Inputs that fit are not split, so small models
    accumulate exactly as before.
    """
    if not isinstance(module, nn.Conv2d) or x.dim() != 4:
        return [x]
    r, s = module.kernel_size
    per_sample = x.shape[1] * r * s * (x.shape[2] + 2) * (x.shape[3] + 2) * 4  # bounds the conv's output positions
    per_chunk = max(1, UNFOLD_BYTES // max(per_sample, 1))
    return [x] if per_chunk >= x.shape[0] else list(x.split(per_chunk))


GRAM_BLOCK = 256  # the narrowest column block of a half (lower-triangle) update


def gram_blocks(columns: int) -> list[int]:
    """Column-block edges of a lower-triangle ``XᵀX``: up to 8 blocks of at least GRAM_BLOCK columns (one block below
    2·GRAM_BLOCK). Eight blocks compute 9/16 of the square product: measured 0.56–0.59× its time at 2,880–23,040
    columns on 2 cores, bit-identical in the lower triangle."""
    k = max(1, min(8, columns // GRAM_BLOCK))
    return [round(i * columns / k) for i in range(k + 1)]


def add_lower_gram(h: torch.Tensor, rows: torch.Tensor, alpha: float) -> None:
    """``h += alpha · rowsᵀ rows`` on and below the block diagonal only (``mirror_lower`` fills the rest): the symmetric
    update the BLAS calls syrk, which torch does not expose, in block GEMMs that write ``h`` in place."""
    edges, xt = gram_blocks(h.shape[0]), rows.T
    for a, b in zip(edges, edges[1:]):
        h[a:b, :b].addmm_(xt[a:b], rows[:, :b], alpha=alpha)


def mirror_lower(h: torch.Tensor) -> None:
    """Copy the blocks below the block diagonal to their transposes above it, block by block (no c² temporary)."""
    edges = gram_blocks(h.shape[0])
    for a, b in zip(edges, edges[1:]):
        h[a:b, b:].copy_(h[b:, a:b].T)


class HessianAccumulator:
    """The α-weighted mean of 2·XXᵀ (float32 or float64), summed un-normalised and normalised once.

    ``add`` takes one call's rows, or a uniform random subset standing for all of them (weighted n / kept), so the sum
    stays an unbiased estimate of the full one (the row budget: a wide, low-resolution layer keeps every row, a layer with
    thousands of rows per call only what its columns need). ``weight_sum`` counts Σ α·n over every row seen, kept or
    not; ``finalize`` divides once (``PackageHooks.hessian`` calls it), so an all-reduce sums the raw statistics of
    every rank. Until then only the lower block triangle is summed (``add_lower_gram``: half the FLOPs of the update);
``finalize`` mirrors it. ``diagonal_only`` keeps just diag(H) (all Wanda reads: its ‖X_j‖), O(columns) memory.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 diagonal_only: bool = False) -> None:
        # float32 at least, whatever the model dtype; float64 makes the sum independent of its order
        # (how prompts were batched or sharded), at twice the memory and, on most GPUs, far less speed.
        shape = (columns,) if diagonal_only else (columns, columns)
        self.hessian = torch.zeros(shape, dtype=dtype, device=device)
        self.weight_sum = 0.0
        self.rows = 0  # rows seen (before any subset was taken)
        self.kept = 0  # rows added to the sum
        self.finalized = False
        self.steps_seen: Counter[int | None] = Counter()

    @property
    def diagonal_only(self) -> bool:
        return self.hessian.dim() == 1

    def add(self, rows: torch.Tensor, alpha: float, step: int | None = None, count_step: bool = True,
            represents: int | None = None) -> None:
        """One call's rows; when they are a uniform subset of ``represents`` rows, each counts for represents / kept."""
        if self.finalized:
            raise CalibrationError("rows added to a Hessian that was already normalised")
        n = rows.shape[0] if represents is None else represents
        weight = n / rows.shape[0] if rows.shape[0] else 0.0
        rows = rows.detach().to(self.hessian.device, self.hessian.dtype)
        if self.diagonal_only:
            self.hessian.add_((rows * rows).sum(0), alpha=2 * alpha * weight)
        else:
            add_lower_gram(self.hessian, rows, 2 * alpha * weight)
        self.weight_sum += alpha * n
        self.rows += n
        self.kept += rows.shape[0]
        if count_step:
            self.steps_seen[step] += 1

    def finalize(self) -> torch.Tensor:
        """In place, once: the sum becomes the mean 2·E_α[XXᵀ]; returns it."""
        if not self.finalized:
            if not self.diagonal_only:
                mirror_lower(self.hessian)
            if self.weight_sum > 0:
                self.hessian.div_(self.weight_sum)
            self.finalized = True
        return self.hessian

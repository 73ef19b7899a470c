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


class HessianAccumulator:
    """Running α-weighted mean of 2·XXᵀ (float32 or float64), plus which steps contributed.

    ``diagonal_only`` keeps just diag(H) = Σ α·2x_j² / Σ α·B, a vector: all Wanda reads (its ‖X_j‖), at
    O(columns) memory instead of O(columns²).
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 diagonal_only: bool = False) -> None:
        # float32 at least, whatever the model dtype; float64 makes the sum independent of its order
        # (how prompts were batched or sharded), at twice the memory and, on most GPUs, far less speed.
        shape = (columns,) if diagonal_only else (columns, columns)
        self.hessian = torch.zeros(shape, dtype=dtype, device=device)
        self.weight_sum = 0.0
        self.rows = 0
        self.steps_seen: Counter[int | None] = Counter()

    @property
    def diagonal_only(self) -> bool:
        return self.hessian.dim() == 1

    def add(self, rows: torch.Tensor, alpha: float, step: int | None = None, count_step: bool = True) -> None:
        rows = rows.detach().to(self.hessian.device, self.hessian.dtype)
        n = rows.shape[0]
        new_sum = self.weight_sum + alpha * n
        self.hessian *= self.weight_sum / new_sum
        if self.diagonal_only:
            self.hessian.add_((rows * rows).sum(0), alpha=2 * alpha / new_sum)
        else:
            self.hessian.addmm_(rows.T, rows, alpha=2 * alpha / new_sum)
        self.weight_sum = new_sum
        self.rows += n
        if count_step:
            self.steps_seen[step] += 1

    def to_sum(self) -> torch.Tensor:
        """In place: the statistic becomes the un-normalised Σ α·2XXᵀ (for an all-reduce); returns it."""
        return self.hessian.mul_(self.weight_sum)

    def from_sum(self, weight_sum: float) -> None:
        """In place: back to the mean, after the sums of every rank were added into ``hessian``."""
        self.hessian.div_(weight_sum)
        self.weight_sum = weight_sum

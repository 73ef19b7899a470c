"""Weight quantization as one typed value, and the grid the solver rounds onto.

``Quantization(bits, group_size, method)``: symmetric, per output channel (``group_size`` None) or per group of
``group_size`` consecutive columns of a row (int4). ``gptq`` rounds inside the OBS column sweep, so each rounding
error is compensated on the columns not yet visited (GPTQ is OBS applied to rounding, on the same Hessian); ``rtn``
rounds every kept weight to the nearest grid point after pruning (the baseline). Zero is on every symmetric grid, so
pruned zeros stay exactly zero. Pure torch: the solver imports it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from obsdiff.errors import UsageError
from obsdiff.layers import as_matrix, from_matrix

BITS = {"int8": 8, "int4": 4}


class QuantMethod(enum.StrEnum):
    GPTQ = "gptq"
    RTN = "rtn"


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int | None = None
    method: QuantMethod = QuantMethod.GPTQ

    def __post_init__(self) -> None:
        if self.bits not in BITS.values():
            raise UsageError(f"--quantize must be int8 or int4, got int{self.bits}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise UsageError(f"--group-size must be a whole number ≥ 1, got {self.group_size!r}")

    @property
    def levels(self) -> int:
        """The largest code: symmetric codes run from −levels to +levels (127 for int8, 7 for int4)."""
        return 2 ** (self.bits - 1) - 1

    def __str__(self) -> str:
        group = f", groups of {self.group_size}" if self.group_size else ", per output channel"
        return f"int{self.bits} ({self.method}{group})"

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": str(self.method)}


def parse_quantization(text: str | None, group_size: int | None = None, method: str | None = None) -> Quantization | None:
    """``--quantize int8|int4`` with ``--group-size`` and ``--quantize-method``; None when not quantizing."""
    if text is None:
        if group_size is not None or method is not None:
            raise UsageError("--group-size and --quantize-method apply with --quantize int8|int4")
        return None
    if text not in BITS:
        raise UsageError(f"--quantize must be int8 or int4, got {text!r}")
    try:
        m = QuantMethod(method or QuantMethod.GPTQ)
    except ValueError:
        raise UsageError(f"--quantize-method must be gptq or rtn, got {method!r}") from None
    return Quantization(BITS[text], group_size, m)


def scales(weight: torch.Tensor, quant: Quantization) -> torch.Tensor:
    """One scale per row (per output channel), or per row and column group: max |w| / levels (1 for an all-zero row)."""
    w = weight.float().abs()
    if quant.group_size is None:
        peak = w.amax(dim=1, keepdim=True)
    else:
        rows, cols = w.shape
        peak = w.reshape(rows, cols // quant.group_size, quant.group_size).amax(dim=2)
    return torch.where(peak > 0, peak / quant.levels, torch.ones_like(peak))


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, quant: Quantization) -> torch.Tensor:
    """The nearest grid point (clamped to ±levels), as a float: ``scale · clamp(round(v / scale))``."""
    return (values / scale).round().clamp(-quant.levels, quant.levels) * scale


def per_column(scale: torch.Tensor, quant: Quantization) -> torch.Tensor:
    """Scales broadcastable against the weight: a column per row, or each group's scale repeated over its columns."""
    return scale if quant.group_size is None else scale.repeat_interleave(quant.group_size, dim=1)


def codes(weight: torch.Tensor, scale: torch.Tensor, quant: Quantization) -> torch.Tensor:
    """Integer codes of weights already on the grid (what an int8 exporter stores), int8."""
    return (weight.float() / per_column(scale, quant)).round().clamp(-quant.levels, quant.levels).to(torch.int8)


def codes_on_grid(weight: torch.Tensor, scale: torch.Tensor, quant: Quantization) -> str | None:
    """Why ``scale`` cannot be this weight's grid (shape, not finite and positive, weights off the grid, codes out
    of range), or None when every weight is a whole code times its scale."""
    matrix = as_matrix(weight.detach().float())
    rows, cols = matrix.shape
    want = (rows, 1) if quant.group_size is None else (rows, cols // quant.group_size)
    if quant.group_size is not None and cols % quant.group_size:
        return f"{cols} columns do not split into groups of {quant.group_size}"
    if tuple(scale.shape) != want:
        return f"scales of shape {tuple(scale.shape)}, the weight needs {want}"
    if not torch.isfinite(scale).all() or not (scale > 0).all():
        return "scales must be finite and positive"
    cols_scale = per_column(scale.float(), quant)
    code = matrix / cols_scale
    if not torch.isfinite(code).all() or ((code - code.round()).abs() > 1e-3).any():
        return f"weights are not on their int{quant.bits} grid"
    if code.round().abs().max() > quant.levels:
        return f"codes beyond ±{quant.levels}"
    return None


def rtn(weight: torch.Tensor, quant: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest of every weight (zeros stay zero); returns the dequantized weight and its scales."""
    s = scales(weight, quant)
    return round_to_grid(weight.float(), per_column(s, quant), quant), s


@dataclass(frozen=True)
class IntegerWeight:
    """A quantized layer's weight as an exporter stores it: int8 codes in the weight's own layout (Linear ``[out,
    in]``, Conv ``[out, in, kh, kw]``) and float32 scales of the same rank, each axis of the weight a whole number of
    the scale's blocks (per channel: ``[out, 1, …]``; groups: ``[out, in / g]`` or ``[out, C / g, kh, kw]``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    quant: Quantization

    @property
    def per_channel(self) -> bool:
        return self.quant.group_size is None

    def dequantized(self) -> torch.Tensor:
        scale = self.scale
        for axis, (n, blocks) in enumerate(zip(self.codes.shape, scale.shape)):
            if blocks not in (1, n):
                scale = scale.repeat_interleave(n // blocks, dim=axis)
        return self.codes.float() * scale


def integer_weight(weight: torch.Tensor, scale: torch.Tensor, quant: Quantization) -> IntegerWeight:
    """The codes and scales of a weight that the prune left on its grid, in the weight's own layout.

    ``scale`` indexes the solver's columns (a Conv's in (kernel row, kernel column, input channel) order, channel
    fastest). A conv's groups are whole input-channel runs at one kernel tap only when C is a multiple of the group
    size; otherwise no per-axis block layout holds them (ValueError). A weight off its grid is a ValueError too.
    """
    w = weight.detach().float()
    matrix = as_matrix(w)
    cols = per_column(scale.float(), quant)
    q = codes(matrix, scale.float(), quant)
    off = (q.float() * cols - matrix).abs() > 1e-3 * cols
    if off.any():
        raise ValueError(f"{int(off.sum())} weights are not on their int{quant.bits} grid (not written by --quantize?)")
    if w.ndim != 4:
        return IntegerWeight(q, scale.float().contiguous(), quant)
    k, c, r, s = w.shape
    q = from_matrix(q, w.shape).contiguous()
    if quant.group_size is None:
        return IntegerWeight(q, scale.float().reshape(k, 1, 1, 1), quant)
    if c % quant.group_size:
        raise ValueError(f"groups of {quant.group_size} columns straddle kernel taps ({c} input channels)")
    # the group scales are columns too, (kernel row, kernel column, channel group): the same layout at C / g
    return IntegerWeight(q, from_matrix(scale.float(), (k, c // quant.group_size, r, s)).contiguous(), quant)

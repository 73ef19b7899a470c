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


def rtn(weight: torch.Tensor, quant: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest of every weight (zeros stay zero); returns the dequantized weight and its scales."""
    s = scales(weight, quant)
    return round_to_grid(weight.float(), per_column(s, quant), quant), s

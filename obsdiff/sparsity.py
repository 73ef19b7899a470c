"""What a prune removes, as one typed value: ``Dense | Unstructured(s) | NM(n, m) | Structured(heads, ffn, channels, budget)``.

It is parsed once at the edge (the CLI's ``--pattern``/``--sparsity`` options, a target profile's ``[prune]``
table, a pruned folder's ``pruning.json``) and passed typed inward; ``str()`` writes the canonical pattern back
(``"2:4"``, ``"unstructured"``, ``"structured"``, ``"dense"``) and ``to_json``/``from_json`` round-trip it.
``NM.holds`` is the project's one N:M checker, used by the solver's tests, the exporters and ``validate``.
Pure Python and numpy: the solver may import it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from obsdiff.errors import UsageError

DEFAULT_UNSTRUCTURED = 0.5
DEFAULT_STRUCTURED = 0.3


class PatternError(UsageError, ValueError):
    """A pattern or sparsity that cannot be pruned; the message is one line for the user."""


@dataclass(frozen=True)
class Dense:
    """Nothing removed (``ship --pattern dense`` exports the model as it is)."""

    def __str__(self) -> str:
        return "dense"


@dataclass(frozen=True)
class Unstructured:
    """A fraction ``sparsity`` of each targeted layer's weights set to zero, anywhere."""

    sparsity: float = DEFAULT_UNSTRUCTURED

    def __post_init__(self) -> None:
        if not (isinstance(self.sparsity, (int, float)) and 0 < self.sparsity < 1):
            raise PatternError(f"unstructured sparsity must be in (0, 1), got {self.sparsity!r}")

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """At least ``n`` zeros in every group of ``m`` consecutive weights along the reduction axis."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise PatternError(f"N:M pattern needs whole numbers 0 < N < M, got {self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def holds(self, weight: np.ndarray, axis: int) -> bool:
        """Every group of ``m`` along ``axis`` has ≥ ``n`` zeros (False when ``m`` does not divide the axis)."""
        weight = np.asarray(weight)
        if weight.shape[axis] % self.m:
            return False
        moved = np.moveaxis(weight, axis, -1)
        groups = moved.reshape(-1, moved.shape[-1] // self.m, self.m)
        return bool(((groups == 0).sum(-1) >= self.n).all())


class Allocation(enum.StrEnum):
    """How a budget is spread over the units: ranked together by OBS error per unit of cost, or one ratio for all."""

    GLOBAL = "global"
    UNIFORM = "uniform"


class Measure(enum.StrEnum):
    """What a structured budget counts: the denoiser's per-step FLOPs, or its parameters."""

    FLOPS = "flops"
    PARAMS = "params"


@dataclass(frozen=True)
class Budget:
    """Keep ``keep`` of the denoiser's ``measure`` (``--flops 0.7``: 70% of its per-step FLOPs)."""

    measure: Measure
    keep: float
    allocation: Allocation = Allocation.GLOBAL

    def __post_init__(self) -> None:
        if not (isinstance(self.keep, (int, float)) and not isinstance(self.keep, bool) and 0 < self.keep < 1):
            raise PatternError(f"--{self.measure} must be a fraction in (0, 1) of the denoiser's {self.measure} to keep, "
                               f"got {self.keep!r}")

    def __str__(self) -> str:
        return f"{self.measure} {self.keep:g} ({self.allocation})"


@dataclass(frozen=True)
class Structured:
    """Whole attention heads, FFN neurons and resnet channel groups removed, then the layers shrunk.

    Either a fraction of each kind in every unit (``heads``, ``ffn``, ``channels``), or a ``budget``: a share of the
    denoiser's FLOPs or parameters to keep, the units' counts allocated by ``budget.allocation``.
    """

    heads: float = DEFAULT_STRUCTURED
    ffn: float = DEFAULT_STRUCTURED
    channels: float = DEFAULT_STRUCTURED
    budget: Budget | None = None

    def __post_init__(self) -> None:
        for name, value in (("head", self.heads), ("FFN", self.ffn), ("channel", self.channels)):
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise PatternError(f"structured {name} sparsity must be in [0, 1), got {value!r}")

    def __str__(self) -> str:
        return "structured"


SparsitySpec = Dense | Unstructured | NM | Structured
MaskPattern = Unstructured | NM  # what the mask solver takes
KINDS = ("dense", "unstructured", "structured")  # plus any "N:M"


def parse_kind(text: str) -> str:
    """The pattern's canonical name: ``dense``, ``unstructured``, ``structured`` or ``N:M`` (e.g. ``2:4``).

    Surrounding spaces are dropped, so ``" 2:4"`` is ``2:4`` everywhere after this point.
    """
    if not isinstance(text, str):
        raise PatternError(f"pattern must be a string such as 'unstructured' or '2:4', got {text!r}")
    text = text.strip()
    if text in KINDS:
        return text
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise PatternError(f"pattern must be dense, unstructured, structured or N:M such as 2:4, got {text!r}")
    return str(NM(int(parts[0]), int(parts[1])))


def _fraction(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PatternError(f"{name} must be a number, got {value!r}")
    return float(value)


def parse_sparsity(pattern: str, sparsity: float | None = None, *, head_sparsity: float | None = None,
                   ffn_sparsity: float | None = None, channel_sparsity: float | None = None,
                   flops: float | None = None, params: float | None = None,
                   allocation: str | None = None) -> SparsitySpec:
    """``--pattern`` with its optional fractions or budget, as one value; every inconsistent combination is an error."""
    kind = parse_kind(pattern)
    sparsity = _fraction(sparsity, "sparsity")
    fractions = {"--head-sparsity": _fraction(head_sparsity, "head sparsity"),
                 "--ffn-sparsity": _fraction(ffn_sparsity, "FFN sparsity"),
                 "--channel-sparsity": _fraction(channel_sparsity, "channel sparsity")}
    budgets = {Measure.FLOPS: _fraction(flops, "--flops"), Measure.PARAMS: _fraction(params, "--params")}
    given = [m for m, v in budgets.items() if v is not None]
    if kind != "structured":
        if any(v is not None for v in fractions.values()):
            raise PatternError("head, FFN and channel sparsity apply to the structured pattern only")
        if given:
            raise PatternError(f"--{given[0]} is a budget for --pattern structured; {kind} takes --sparsity")
        if allocation is not None:
            raise PatternError("--allocation applies to a structured budget (--flops or --params) only")
    if kind == "dense":
        if sparsity is not None:
            raise PatternError("the dense pattern takes no sparsity")
        return Dense()
    if kind == "unstructured":
        return Unstructured(DEFAULT_UNSTRUCTURED if sparsity is None else sparsity)
    if kind == "structured":
        if given:
            if len(given) > 1:
                raise PatternError("give one budget: --flops or --params, not both")
            fixed = [name for name, v in fractions.items() if v is not None] + (["--sparsity"] if sparsity is not None else [])
            if fixed:
                raise PatternError(f"--{given[0]} allocates the fractions itself; drop {', '.join(fixed)}")
            try:
                alloc = Allocation(allocation or Allocation.GLOBAL)
            except ValueError:
                raise PatternError(f"--allocation must be global or uniform, got {allocation!r}") from None
            return Structured(budget=Budget(given[0], budgets[given[0]], alloc))
        if allocation is not None:
            raise PatternError("--allocation applies to a budget (--flops or --params)")
        base = DEFAULT_STRUCTURED if sparsity is None else sparsity
        heads, ffn, channels = (base if v is None else v for v in fractions.values())
        return Structured(heads, ffn, channels)
    n, m = (int(x) for x in kind.split(":"))
    spec = NM(n, m)
    if sparsity is not None and abs(sparsity - spec.sparsity) > 1e-9:
        raise PatternError(f"pattern {spec} means sparsity {spec.sparsity:g}, not {sparsity:g}")
    return spec


def to_json(spec: SparsitySpec) -> dict:
    """What ``pruning.json`` records: the canonical pattern and its fractions."""
    out: dict = {"pattern": str(spec)}
    if isinstance(spec, (Unstructured, NM)):
        out["sparsity"] = spec.sparsity
    if isinstance(spec, Structured):
        if spec.budget is not None:
            out["budget"] = {str(spec.budget.measure): spec.budget.keep, "allocation": str(spec.budget.allocation)}
        else:
            out.update(head_sparsity=spec.heads, ffn_sparsity=spec.ffn, channel_sparsity=spec.channels)
    return out


def from_json(data: dict) -> SparsitySpec:
    """The inverse of ``to_json`` (raises PatternError on a record that does not parse)."""
    if not isinstance(data, dict) or "pattern" not in data:
        raise PatternError("no sparsity pattern recorded")
    kind = parse_kind(data["pattern"])
    if kind == "structured":
        budget = data.get("budget")
        if isinstance(budget, dict):
            return parse_sparsity(kind, flops=budget.get("flops"), params=budget.get("params"),
                                  allocation=budget.get("allocation"))
        # Records written before channel pruning existed removed no channels.
        return parse_sparsity(kind, head_sparsity=data.get("head_sparsity"), ffn_sparsity=data.get("ffn_sparsity"),
                              channel_sparsity=data.get("channel_sparsity", 0.0))
    if kind == "unstructured":
        return parse_sparsity(kind, data.get("sparsity"))
    return parse_sparsity(kind)  # dense, or N:M whose sparsity is N/M

"""What a prune removes, as one typed value: ``Dense | Unstructured(s) | NM(n, m) | Structured(heads, ffn)``.

It is parsed once at the edge (the CLI's ``--pattern``/``--sparsity`` options, a target profile's ``[prune]``
table, a pruned folder's ``pruning.json``) and passed typed inward; ``str()`` writes the canonical pattern back
(``"2:4"``, ``"unstructured"``, ``"structured"``, ``"dense"``) and ``to_json``/``from_json`` round-trip it.
``NM.holds`` is the project's one N:M checker, used by the solver's tests, the exporters and ``validate``.
Pure Python and numpy: the solver may import it.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Structured:
    """Whole attention heads and FFN neurons removed (fractions of each), then the layers shrunk."""

    heads: float = DEFAULT_STRUCTURED
    ffn: float = DEFAULT_STRUCTURED

    def __post_init__(self) -> None:
        for name, value in (("head", self.heads), ("FFN", self.ffn)):
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
                   ffn_sparsity: float | None = None) -> SparsitySpec:
    """``--pattern`` with its optional fractions, as one value; every inconsistent combination is an error."""
    kind = parse_kind(pattern)
    sparsity = _fraction(sparsity, "sparsity")
    head_sparsity, ffn_sparsity = _fraction(head_sparsity, "head sparsity"), _fraction(ffn_sparsity, "FFN sparsity")
    if kind != "structured" and (head_sparsity is not None or ffn_sparsity is not None):
        raise PatternError("head and FFN sparsity apply to the structured pattern only")
    if kind == "dense":
        if sparsity is not None:
            raise PatternError("the dense pattern takes no sparsity")
        return Dense()
    if kind == "unstructured":
        return Unstructured(DEFAULT_UNSTRUCTURED if sparsity is None else sparsity)
    if kind == "structured":
        base = DEFAULT_STRUCTURED if sparsity is None else sparsity
        return Structured(base if head_sparsity is None else head_sparsity, base if ffn_sparsity is None else ffn_sparsity)
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
        out.update(head_sparsity=spec.heads, ffn_sparsity=spec.ffn)
    return out


def from_json(data: dict) -> SparsitySpec:
    """The inverse of ``to_json`` (raises PatternError on a record that does not parse)."""
    if not isinstance(data, dict) or "pattern" not in data:
        raise PatternError("no sparsity pattern recorded")
    kind = parse_kind(data["pattern"])
    if kind == "structured":
        return parse_sparsity(kind, head_sparsity=data.get("head_sparsity"), ffn_sparsity=data.get("ffn_sparsity"))
    if kind == "unstructured":
        return parse_sparsity(kind, data.get("sparsity"))
    return parse_sparsity(kind)  # dense, or N:M whose sparsity is N/M

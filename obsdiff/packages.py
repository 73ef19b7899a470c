"""Module packages: which layers (or structured units) are calibrated and solved together, and what a package
returns. ``--blocks`` narrows the blocks a prune touches.

Target layers are split in forward order into contiguous groups of whole blocks, so that each package is
calibrated on the model as pruned by the packages before it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch

from obsdiff.adapters import TargetLayer
from obsdiff.errors import UsageError
from obsdiff.pruned_folder import LayerRecord, UnitRecord


@dataclass
class PackageResult:
    """What solving one package gives back: records of what changed, and quantization scales by layer."""

    layers: list[LayerRecord] = field(default_factory=list)
    units: list[UnitRecord] = field(default_factory=list)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


_INDEX_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def check_blocks_spec(spec: str | None) -> None:
    """``--blocks`` syntax, checked before any work: indices, ranges ``a-b`` with a ≤ b, or glob patterns."""
    if spec is None:
        return
    parts = [p.strip() for p in spec.split(",")]
    if not any(parts):
        raise UsageError("--blocks is empty")
    for part in parts:
        m = _INDEX_RANGE.fullmatch(part)
        if m and m[2] is not None and int(m[2]) < int(m[1]):
            raise UsageError(f"--blocks: range {part!r} runs backwards")
        if not m and (not part or part[0] in "-+" or part[0].isdigit()):
            raise UsageError(f"--blocks: {part!r} is neither an index, a range such as 0-3, nor a block name pattern")


def block_filter(spec: str | None, block_names: list[str]):
    """``--blocks``: comma-separated glob patterns over block names, or indices / ranges (``0-3``)."""
    if not spec:
        return None
    check_blocks_spec(spec)
    chosen: set[str] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if m := _INDEX_RANGE.fullmatch(part):
            idx = range(int(m[1]), int(m[2] or m[1]) + 1)
            picked = {block_names[i] for i in idx if i < len(block_names)}
        else:
            picked = {n for n in block_names if fnmatch.fnmatchcase(n, part)}
        if not picked:  # every part must select something: a typo in one pattern is not silently dropped
            raise UsageError(f"--blocks: {part!r} selects no block (there are {len(block_names)}: "
                             f"{', '.join(block_names[:6])}…)")
        chosen |= picked
    return chosen.__contains__


def split_packages(targets: list[TargetLayer], packages: int) -> list[list[TargetLayer]]:
    """Contiguous groups of whole blocks with about equal weight counts."""
    blocks: dict[str, list[TargetLayer]] = {}
    for t in targets:
        blocks.setdefault(t.block, []).append(t)
    sizes = [sum(t.module.weight.numel() for t in layers) for layers in blocks.values()]
    total = sum(sizes)
    groups: list[list[TargetLayer]] = [[] for _ in range(min(packages, len(blocks)))]
    running = 0
    for layers, size in zip(blocks.values(), sizes):
        idx = min(int(running * len(groups) / max(total, 1)), len(groups) - 1)
        groups[idx].extend(layers)
        running += size
    return [g for g in groups if g]


def split_units(units: list, packages: int) -> list[list]:
    """Structured units in block order, as contiguous groups of whole blocks."""
    blocks: dict[str, list] = {}
    for u in units:
        blocks.setdefault(u.block, []).append(u)
    names = list(blocks)
    per = max(1, -(-len(names) // packages))
    return [[u for b in names[i : i + per] for u in blocks[b]] for i in range(0, len(names), per)]

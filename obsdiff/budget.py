"""Structured budgets (``--flops 0.7``, ``--params``): how many groups each unit loses, decided once on the dense model.

``global`` ranks every removable group of every unit by its OBS error, relative to its layer's ‖WX‖², per FLOP (or
parameter) it saves, and takes the cheapest until the budget holds; ``uniform`` finds one fraction for every unit.
The counts come from the dense model; which groups go is still decided package by package on the partly pruned
model, with compensation. ``allocate_budget`` is the pre-pass: it calibrates each package through the function it is
given and returns the counts (and package 1's Hessians, still valid for it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from obsdiff.calibration import PackageHooks
from obsdiff.errors import UsageError
from obsdiff.solver import damped_inverse, fill_dead, group_obs_scores, output_energy
from obsdiff.sparsity import Allocation, Budget, Measure
from obsdiff.structured import Unit, down_matrix

log = logging.getLogger(__name__)


def unit_scores(unit: Unit, hessians: dict[str, torch.Tensor], damp: float) -> torch.Tensor:
    """Each group's OBS removal error relative to its layer's ‖WX‖², summed over the unit's down layers.

    Relative errors make layers of different widths and activation scales comparable, so one ranking can span
    every block (the budget's "error per FLOP saved").
    """
    groups = [torch.as_tensor(g) for g in unit.column_groups()]
    total = torch.zeros(len(groups), dtype=torch.float64)
    for name, layer in unit.down_layers().items():
        h = fill_dead(hessians[name])
        w = down_matrix(layer).float().to(h.device)  # --hessian-device cpu with a GPU model: solve where H is
        energy = 2 * output_energy(w, h)  # the scores are w_S [H⁻¹_SS]⁻¹ w_Sᵀ = 2 × the ½(δW)H(δW)ᵀ error
        scores = group_obs_scores(w, damped_inverse(h, damp), groups).double()
        total += (scores / energy if energy > 0 else scores).cpu()  # GPU scores, one CPU ranking
    return total


@dataclass(frozen=True)
class UnitCost:
    """What removing one group of a unit saves, and how many groups it has."""

    key: str
    kind: str
    groups: int
    saving: float  # FLOPs per forward, or parameters, per group


def unit_costs(units: list[Unit], measure: Measure, flops_by_module: dict[str, int]) -> list[UnitCost]:
    costs = []
    for u in units:
        if measure is Measure.FLOPS:
            saving = sum(flops_by_module.get(p, 0) for p in u.flop_paths()) / u.total
        else:
            saving = u.params_per_group()
        costs.append(UnitCost(u.key, u.kind, u.total, float(saving)))
    return costs


def allocate(costs: list[UnitCost], to_save: float, budget: Budget, scores: dict[str, torch.Tensor] | None = None,
             total: float | None = None) -> dict[str, int]:
    """Groups to remove per unit so that the saving reaches ``to_save``; every unit keeps at least one group.

    global: every group is an item costing (its relative OBS error) / (its saving); the cheapest are taken, each
    unit's in its own ascending order, until the saving is reached. uniform: the smallest single fraction, rounded per
    unit, that reaches it. ``total`` (the denoiser's whole FLOPs or parameters) only words the error.
    """
    check_reachable(costs, to_save, budget, total)
    if budget.allocation is Allocation.UNIFORM:
        return _uniform(costs, to_save)
    if scores is None:
        raise UsageError("global allocation ranks groups by OBS error; it needs calibration (--method obs-diff)")
    items = []
    for c in costs:
        ordered = scores[c.key].sort().values.tolist()[: c.groups - 1]
        items += [(err / max(c.saving, 1e-12), c.key, c.saving) for err in ordered]
    items.sort(key=lambda item: item[0])
    counts = {c.key: 0 for c in costs}
    saved = 0.0
    for _, key, saving in items:
        if saved >= to_save:
            break
        counts[key] += 1
        saved += saving
    return counts


def check_reachable(costs: list[UnitCost], to_save: float, budget: Budget, total: float | None = None) -> None:
    """A budget that needs more than every unit but one group each is refused, naming the unit it would empty."""
    reachable = sum((c.groups - 1) * c.saving for c in costs)
    if reachable >= to_save:
        return
    worst = max(costs, key=lambda c: c.saving * c.groups) if costs else None
    kept = f"{1 - reachable / total:.1%} of its {budget.measure}" if total else "more than the budget"
    raise UsageError(
        f"--{budget.measure} {budget.keep:g} cannot be met without removing every group of some layer: with one group "
        f"left in each of the {len(costs)} units the denoiser still keeps {kept}"
        + (f"; {worst.key} would have to lose all {worst.groups} {worst.kind} groups" if worst else ""))


def _uniform(costs: list[UnitCost], to_save: float) -> dict[str, int]:
    def counts(fraction: float) -> dict[str, int]:
        return {c.key: min(c.groups - 1, int(round(c.groups * fraction))) for c in costs}

    def saved(fraction: float) -> float:
        n = counts(fraction)
        return sum(n[c.key] * c.saving for c in costs)

    low, high = 0.0, 1.0
    for _ in range(60):  # saved() is a non-decreasing step function of the fraction
        mid = (low + high) / 2
        low, high = (mid, high) if saved(mid) < to_save else (low, mid)
    return counts(high)


@dataclass
class BudgetAllocation:
    counts: dict[str, int]  # unit key → groups to remove
    first_package: PackageHooks | None  # package 1's Hessians from the scoring pass (the model is still dense there)


def allocate_budget(name: str, packages: list[list[Unit]], budget: Budget, total: float, by_module: dict[str, int],
                    calibrate: Callable[[int], PackageHooks], damp: float) -> BudgetAllocation:
    """The budget's counts for every unit of component ``name``: from FLOP (or parameter) savings and, for
    ``global``, OBS scores on Hessians that ``calibrate(package index)`` gathers on the dense model."""
    units = [u for p in packages for u in p]
    costs = unit_costs(units, budget.measure, by_module)
    to_save = (1 - budget.keep) * total
    check_reachable(costs, to_save, budget, total)
    scores, first = None, None
    if budget.allocation is Allocation.GLOBAL:
        scores = {}
        # Last package first, so the dense model's Hessians of package 1 are still held when it is pruned.
        for index in reversed(range(len(packages))):
            hooks = calibrate(index)
            for unit in packages[index]:
                scores[unit.key] = unit_scores(unit, {n: hooks.hessian(n).hessian for n in unit.down_layers()}, damp)
            if index == 0:
                first = hooks
            del hooks
    counts = allocate(costs, to_save, budget, scores, total)
    saved = sum(counts[c.key] * c.saving for c in costs)
    kinds = ", ".join(f"{k} {sum(counts[c.key] for c in costs if c.kind == k)}/"
                      f"{sum(c.groups for c in costs if c.kind == k)}" for k in dict.fromkeys(c.kind for c in costs))
    log.info("%s: %s budget keeps %.1f%% of %.4g %s; %d of %d groups go (%s)", name, budget.allocation,
             100 * (1 - saved / total), total, budget.measure, sum(counts.values()), sum(c.groups for c in costs), kinds)
    return BudgetAllocation(counts, first)

"""Mask pruning of one package: unstructured or N:M zeros (or quantize-only), each layer solved on its Hessian.

``MaskSolver`` finds a component's target layers and splits them into packages; ``solve`` takes one calibrated
package (its Hessians, its layers) and returns the layer records and quantization scales. It never sees the
driver: what it needs comes in as arguments.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch
from torch import nn
from tqdm import tqdm

from obsdiff.adapters import Adapter, TargetLayer, find_targets
from obsdiff.calibration import PackageHooks
from obsdiff.config import Method, PruneConfig
from obsdiff.distributed import World, broadcast_layer
from obsdiff.errors import UsageError
from obsdiff.layers import column_permutation, reduction_size, set_weight_matrix, weight_matrix
from obsdiff.packages import PackageResult, block_filter, split_packages
from obsdiff.plan import LayerCost, layer_cost
from obsdiff.pruned_folder import ComponentSummary, LayerRecord, MaskSummary, Skip
from obsdiff.quantize import Quantization, QuantMethod, rtn
from obsdiff.solver import (
    SolveResult,
    finite_or_none,
    inverse_factor,
    magnitude_prune,
    obs_prune,
    obs_prune_factored,
    output_energy,
    reconstruction_error,
    refine_kept_weights,
    wanda_prune,
)
from obsdiff.sparsity import NM, MaskPattern

log = logging.getLogger(__name__)

REFINE_BUFFERS = 10  # weight-sized float32 buffers --refine holds at once (its vectors, H products, the result)


class MaskSolver:
    """Zeros (unstructured, N:M) chosen by OBS or a baseline, the kept weights compensated; shapes stay."""

    reshapes = False

    def __init__(self, config: PruneConfig, pattern: MaskPattern | None) -> None:
        self.config, self.pattern = config, pattern  # pattern None: nothing pruned, only quantized

    def packages(self, name: str, module: nn.Module, adapter: Adapter) -> tuple[list[list[TargetLayer]], list[Skip]]:
        """The component's target layers that fit the pattern, split into packages; the rest with their reasons."""
        all_blocks = [b for b, _ in adapter.block_modules(module)]
        targets, skipped = find_targets(module, adapter, block_filter(self.config.blocks, all_blocks))
        skips = [Skip(s.name, s.reason) for s in skipped]
        self._check_group_size(name, targets)
        fit = []
        for t in targets:
            if isinstance(self.pattern, NM) and reduction_size(t.module) % self.pattern.m:
                reason = f"reduction axis {reduction_size(t.module)} is not a multiple of {self.pattern.m}"
                log.warning("%s.%s skipped: %s", name, t.name, reason)
                skips.append(Skip(t.name, reason))
            else:
                fit.append(t)
        if not fit:
            raise UsageError(f"component {name} has no layer that fits pattern {self.pattern}")
        return split_packages(fit, self.config.packages), skips

    def _check_group_size(self, name: str, targets: list[TargetLayer]) -> None:
        quant = self.config.quantization
        if quant is None or not quant.group_size:
            return
        columns = {t.name: t.module.weight[0].numel() for t in targets}  # in_features, or C·R·S of a conv
        misfits = [f"{n} ({c} columns)" for n, c in columns.items() if c % quant.group_size]
        if misfits:
            raise UsageError(f"--group-size {quant.group_size} does not divide the columns of {len(misfits)} "
                             f"layer(s) of {name}: {', '.join(misfits[:3])}{' …' if len(misfits) > 3 else ''}")

    def hooked_layers(self, package: list[TargetLayer]) -> dict[str, nn.Module]:
        return {t.name: t.module for t in package}

    def layer_costs(self, model: nn.Module, package: list[TargetLayer], statistic: str, dtype_bytes: int,
                    input_shapes: dict) -> list[LayerCost]:
        costs = [layer_cost(model, t.name, t.module, t.block, statistic, dtype_bytes, input_shapes.get(t.name))
                 for t in package]
        if self.config.refine:  # after the sweep (its factor freed): the sweep's weight copies + the CG buffers
            costs = [replace(c, workspace_bytes=max(c.workspace_bytes,
                                                    (6 + REFINE_BUFFERS) * 4 * t.module.weight.numel()))
                     for c, t in zip(costs, package)]
        return costs

    def solve(self, component: str, module: nn.Module, package: list[TargetLayer], index: int,
              hooks: PackageHooks | None, world: World, counts: dict[str, int] | None = None) -> PackageResult:
        """Every layer of the package solved on its own Hessian (of the model as it was when the package calibrated),
        so the order only changes memory: the narrowest first, each Hessian freed after its last reader, so that the
        widest layer is factored when the fewest other Hessians are still held."""
        package = sorted(package, key=lambda t: t.module.weight[0].numel())
        last_use = {hooks.owner.get(t.name, t.name): i for i, t in enumerate(package)} if hooks is not None else {}
        result = PackageResult()
        for i, t in enumerate(tqdm(package, desc=f"solve {component} {index + 1}", leave=False, mininterval=2)):
            owner = world.owner(i)
            record = None
            last = hooks is not None and last_use[hooks.owner.get(t.name, t.name)] == i
            if world.rank == owner:
                record = self._solve_layer(component, t, index, hooks, last, result)
            result.layers.append(broadcast_layer(world, t.module, record, owner))
            if last:
                hooks.release(t.name)  # every layer sharing this Hessian is solved: free it now
        return result

    def _solve_layer(self, component: str, t: TargetLayer, index: int, hooks: PackageHooks | None, last: bool,
                     result: PackageResult) -> LayerRecord:
        t0 = time.time()
        solved = self._solve(weight_matrix(t.module), hooks, t.name, column_permutation(t.module), last)
        solve_s = time.time() - t0
        set_weight_matrix(t.module, solved.weight)
        if solved.scales is not None:
            result.scales[t.name] = solved.scales
        return LayerRecord(component, t.name, type(t.module).__name__, tuple(t.module.weight.shape), index,
                           float((t.module.weight == 0).float().mean()), finite_or_none(solved.error),
                           finite_or_none(solved.relative_error),
                           solved.damp if self.config.method is Method.OBS_DIFF else None, solve_s)

    def _solve(self, weight: torch.Tensor, hooks: PackageHooks | None, name: str, perm: torch.Tensor | None,
               last: bool) -> SolveResult:
        method, quant = self.config.method, self.config.quantization
        if quant is not None and quant.method is QuantMethod.RTN:
            return self._prune_then_round(weight, hooks, name, perm, quant)
        if method is Method.MAGNITUDE:
            return magnitude_prune(weight, self.pattern)
        hessian = hooks.hessian(name).hessian
        weight = weight.to(hessian.device)  # --hessian-device cpu with a GPU model: the solve runs where H is
        if perm is not None:
            perm = perm.to(hessian.device)
        if method is Method.WANDA:
            return wanda_prune(weight, hessian, self.pattern, perm)
        energy = output_energy(weight, hessian, perm)
        factor = inverse_factor(hessian, perm, damp=self.config.damp)
        refine = self.config.refine if quant is None and self.pattern is not None else 0
        if not refine:
            del hessian
            if last:  # the sweep is the solve's peak: H goes first when no later layer reads it
                hooks.release(name)
        solved = obs_prune_factored(weight, factor, self.pattern, energy, quant=quant)
        del factor
        if refine:  # the same zeros, the kept weights re-solved jointly (H held through the sweep for it)
            refined = refine_kept_weights(weight, solved.weight, hessian, perm, solved.damp, refine)
            err, rel = reconstruction_error(weight, refined, hessian, perm)
            solved = SolveResult(refined, solved.mask, err, rel, solved.damp, solved.scales)
        return solved

    def _prune_then_round(self, weight: torch.Tensor, hooks: PackageHooks | None, name: str,
                          perm: torch.Tensor | None, quant: Quantization) -> SolveResult:
        """The RTN baseline: prune as the method does, then round every kept weight to its nearest grid point; the
        error of both together is measured on H (when the method calibrated a full one)."""
        method = self.config.method
        hessian = hooks.hessian(name).hessian if hooks is not None else None
        if hessian is not None:
            weight = weight.to(hessian.device)
            perm = perm.to(hessian.device) if perm is not None else None
        full = hessian if hessian is not None and hessian.dim() == 2 else None
        if self.pattern is None:
            pruned = weight.float()
        elif method is Method.MAGNITUDE:
            pruned = magnitude_prune(weight, self.pattern).weight
        elif method is Method.WANDA:
            pruned = wanda_prune(weight, hessian, self.pattern, perm).weight
        else:
            pruned = obs_prune(weight, hessian, self.pattern, damp=self.config.damp, perm=perm).weight
        rounded, scale = rtn(pruned, quant)
        err, rel = reconstruction_error(weight, rounded, full, perm) if full is not None else (math.nan, math.nan)
        return SolveResult(rounded, rounded == 0, err, rel, self.config.damp, scale)

    def summary(self, name: str, adapter: Adapter, packages: list, skipped: list[Skip], layers: list[LayerRecord],
                units: list, costs: tuple[dict, dict] | None) -> ComponentSummary:
        return ComponentSummary(adapter.family, [[t.name for t in p] for p in packages],
                                [Skip(f"{name}.{s.name}", s.reason) for s in skipped],
                                mask=MaskSummary.of(layers, self.config.quantization))

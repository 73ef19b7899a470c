"""The pruning driver: model folder → packages → calibration → solve → pruned folder.

Target layers of each component are split into P module packages in block order. Each package is
calibrated on the model as pruned so far, then solved layer by layer. After every package the
progress is saved next to the output, so ``resume`` restarts at the first unfinished package.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save, save_model
from tqdm import tqdm

from obsdiff import __version__
from obsdiff.adapters import Adapter, Skipped, TargetLayer, adapter_for, find_targets
from obsdiff.atomic import check_disjoint, discard_staging, fault_point, fsync_file, replace_dir, staging_path, write_bytes_atomic
from obsdiff.calibration import CalibrationSettings, PackageHooks, run_pipeline
from obsdiff.config import DENOISER, Method, PruneConfig
from obsdiff.distributed import World, all_reduce_hessians, barrier, broadcast_layer, device_for, init_world
from obsdiff.errors import ObsdiffError, UsageError
from obsdiff.hessian import StepContext, timestep_weights
from obsdiff.layers import column_permutation, reduction_size, set_weight_matrix, weight_matrix
from obsdiff.model_io import (
    PRUNING_JSON,
    QUANT_SCALES,
    check_model_folder,
    copy_model_files,
    load_pipeline,
    pipeline_components,
    read_pruning_record,
)
from obsdiff.plan import peak_rss
from obsdiff.quantize import Quantization, QuantMethod, rtn
from obsdiff.resources import default_prompts_file, read_prompt_lines
from obsdiff.shrink import apply_shapes
from obsdiff.solver import (
    SolveResult,
    finite_or_none,
    inverse_factor,
    magnitude_prune,
    obs_prune,
    obs_prune_factored,
    output_energy,
    reconstruction_error,
    wanda_prune,
)
from obsdiff.sparsity import NM, Allocation, Dense, MaskPattern, Measure, Structured

__all__ = ["DENOISER", "Method", "PruneConfig", "Pruner", "prune"]

log = logging.getLogger(__name__)


def read_prompts(config: PruneConfig, model_dir: Path) -> list[str]:
    path = config.prompts_file or default_prompts_file(model_dir)
    if not Path(path).is_file():
        raise UsageError(f"prompt file {path} does not exist")
    try:
        prompts = read_prompt_lines(path)
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {path} is not UTF-8 text") from None
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompts")
    return prompts[: config.num_prompts]


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
            chosen.update(block_names[i] for i in idx if i < len(block_names))
        else:
            chosen.update(n for n in block_names if fnmatch.fnmatchcase(n, part))
    if not chosen:
        raise UsageError(f"--blocks {spec!r} selects no block; blocks are: {', '.join(block_names[:8])}…")
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


def _split_units(units: list, packages: int) -> list[list]:
    """Structured units in block order, as contiguous groups of whole blocks."""
    blocks: dict[str, list] = {}
    for u in units:
        blocks.setdefault(u.block, []).append(u)
    names = list(blocks)
    per = max(1, -(-len(names) // packages))
    return [[u for b in names[i : i + per] for u in blocks[b]] for i in range(0, len(names), per)]


@dataclass
class LayerRecord:
    name: str
    kind: str
    shape: list[int]
    package: int
    sparsity: float
    error: float | None
    relative_error: float | None
    damp: float | None
    solve_s: float


@dataclass
class Progress:
    """What is saved after each package, so an interrupted prune can resume."""

    fingerprint: str
    done: dict[str, int] = field(default_factory=dict)  # component -> packages finished
    layers: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    allocation: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> unit -> groups to remove

    def forget(self, component: str) -> None:
        """Start ``component`` over (its checkpoint was unusable)."""
        self.done.pop(component, None)
        self.allocation.pop(component, None)
        self.layers = [r for r in self.layers if r.get("component") != component
                       and not str(r.get("name", "")).startswith(component + ".")]


def resolve_components(requested: tuple[str, ...], available: dict) -> tuple[str, ...]:
    """Replace the ``denoiser`` alias by ``unet`` or ``transformer``, whichever the pipeline has."""
    denoiser = next((n for n in ("unet", "transformer") if n in available), DENOISER)
    return tuple(dict.fromkeys(denoiser if c == DENOISER else c for c in requested))


# ---- checkpoints -------------------------------------------------------------------------------------

PACKAGES_DONE = "obsdiff.packages_done"  # safetensors metadata: which progress state the weights belong to
# Scales index the solver's columns: a Linear's in_features; a Conv's (kernel row, kernel column, input channel).
SCALE_COLUMNS = "linear: in_features; conv: (kernel row, kernel column, input channel), channel fastest"


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.obsdiff-partial")


def _save_checkpoint(partial: Path, progress: Progress, name: str, component) -> None:
    """The component whose package just finished, then the progress: each written whole (temp, fsync, rename).

    The weights carry the package count in their metadata, so a crash between the two renames is detected.
    """
    weights = partial / f"{name}.safetensors"
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_model(component, str(tmp), metadata={PACKAGES_DONE: str(progress.done[name])})  # handles tied weights (T5)
    fsync_file(tmp)
    tmp.replace(weights)
    fault_point("checkpoint-between-files")
    write_bytes_atomic(partial / "progress.json", json.dumps(asdict(progress)).encode())


def _load_checkpoint(partial: Path, fingerprint: str, components: dict) -> Progress:
    """The saved progress, with every component whose checkpoint is unreadable or stale started over (said once)."""
    path = partial / "progress.json"
    try:
        saved = Progress(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("--resume: %s is unreadable (%s); starting over", path, str(exc).splitlines()[0][:120])
        return Progress(fingerprint)
    if saved.fingerprint != fingerprint:
        raise UsageError(f"--resume: {partial} was made with other settings or prompts; remove it or drop --resume")
    for name in list(saved.done):
        weights = partial / f"{name}.safetensors"
        try:
            with safe_open(str(weights), framework="pt") as fh:
                stamp = (fh.metadata() or {}).get(PACKAGES_DONE)
            if stamp != str(saved.done[name]):
                raise ValueError(f"holds package {stamp}, progress says {saved.done[name]}")
            shapes = _structured_shapes(saved.layers, name)
            if shapes:
                apply_shapes(components[name], shapes)
            load_model(components[name], str(weights))
        except Exception as exc:  # a torn or stale file: that component starts over
            log.warning("--resume: checkpoint %s is unusable (%s); %s starts over", weights,
                        str(exc).splitlines()[0][:120], name)
            saved.forget(name)
    return saved


def _merge_shapes(earlier: dict, new: dict) -> dict:
    """Structured shapes of a component pruned twice: the second run's units override the first's."""
    ffn = {e["down"]: e for e in earlier.get("ffn", [])} | {e["down"]: e for e in new.get("ffn", [])}
    return {"attention_heads": {**earlier.get("attention_heads", {}), **new.get("attention_heads", {})},
            "ffn": list(ffn.values()),
            "resnet_groups": {**earlier.get("resnet_groups", {}), **new.get("resnet_groups", {})}}


def _structured_shapes(records: list[dict], component: str) -> dict:
    from obsdiff.structured import shapes_from_records

    recs = [r for r in records if r.get("component") == component and r.get("kind") in ("heads", "ffn", "channels")]
    return shapes_from_records(recs) if recs else {}


# ---- strategies: chosen once per prune ----------------------------------------------------------------


class MaskStrategy:
    """Unstructured or N:M: OBS (or a baseline) sets weights to zero; shapes stay."""

    def __init__(self, config: PruneConfig, pattern: MaskPattern | None) -> None:
        self.config, self.pattern = config, pattern  # pattern None: nothing pruned, only quantized
        self.scales: dict[str, torch.Tensor] = {}  # "component.layer" → quantization scales

    def plan(self, name: str, module, adapter: Adapter) -> tuple[list[list], list[Skipped]]:
        all_blocks = [b for b, _ in adapter.block_modules(module)]
        targets, skipped = find_targets(module, adapter, block_filter(self.config.blocks, all_blocks))
        quant = self.config.quantization
        if quant is not None and quant.group_size:
            columns = {t.name: t.module.weight[0].numel() for t in targets}  # in_features, or C·R·S of a conv
            misfits = [f"{n} ({c} columns)" for n, c in columns.items() if c % quant.group_size]
            if misfits:
                raise UsageError(f"--group-size {quant.group_size} does not divide the columns of {len(misfits)} "
                                 f"layer(s) of {name}: {', '.join(misfits[:3])}{' …' if len(misfits) > 3 else ''}")
        fit = []
        for t in targets:
            if isinstance(self.pattern, NM) and reduction_size(t.module) % self.pattern.m:
                reason = f"reduction axis {reduction_size(t.module)} is not a multiple of {self.pattern.m}"
                log.warning("%s.%s skipped: %s", name, t.name, reason)
                skipped.append(Skipped(t.name, reason))
            else:
                fit.append(t)
        if not fit:
            raise UsageError(f"component {name} has no layer that fits pattern {self.pattern}")
        return split_packages(fit, self.config.packages), skipped

    def hooked_layers(self, package: list[TargetLayer]) -> dict:
        return {t.name: t.module for t in package}

    def before_packages(self, pruner: Pruner, plans: dict, settings: CalibrationSettings, progress: Progress) -> None:
        """Nothing to decide across packages: every layer has its own sparsity."""

    def take_hooks(self, component: str, index: int) -> PackageHooks | None:
        return None

    def solve(self, pruner: Pruner, component: str, package: list[TargetLayer], index: int,
              hooks: PackageHooks | None, progress: Progress) -> None:
        config, world = self.config, pruner.world
        # Layers of a package are solved independently (each on its own Hessian of the model as it was when the
        # package calibrated), so the order only changes memory: the smallest first, each Hessian freed after its
        # last reader, so that the widest layer is factored when the fewest other Hessians are still held.
        package = sorted(package, key=lambda t: t.module.weight[0].numel())
        last_use = {hooks.owner.get(t.name, t.name): i for i, t in enumerate(package)} if hooks is not None else {}
        for i, t in enumerate(tqdm(package, desc=f"solve {component} {index + 1}", leave=False, mininterval=2)):
            owner = world.owner(i)
            record = None
            last = hooks is not None and last_use[hooks.owner.get(t.name, t.name)] == i
            if world.rank == owner:
                t0 = time.time()
                result = self._solve(weight_matrix(t.module), hooks, t.name, column_permutation(t.module), last)
                solve_s = time.time() - t0
                set_weight_matrix(t.module, result.weight)
                if result.scales is not None:
                    self.scales[f"{component}.{t.name}"] = result.scales
                record = asdict(LayerRecord(
                    name=f"{component}.{t.name}", kind=type(t.module).__name__, shape=list(t.module.weight.shape),
                    package=index, sparsity=float((t.module.weight == 0).float().mean()),
                    error=finite_or_none(result.error), relative_error=finite_or_none(result.relative_error),
                    damp=result.damp if config.method is Method.OBS_DIFF else None, solve_s=solve_s))
            progress.layers.append(broadcast_layer(world, t.module, record, owner))
            if last:
                hooks.release(t.name)  # every layer sharing this Hessian is solved: free it now

    def _solve(self, weight: torch.Tensor, hooks: PackageHooks | None, name: str, perm: torch.Tensor | None,
               last: bool) -> SolveResult:
        method, quant = self.config.method, self.config.quantization
        if quant is not None and quant.method is QuantMethod.RTN:
            return self._prune_then_round(weight, hooks, name, perm, quant)
        if method is Method.MAGNITUDE:
            return magnitude_prune(weight, self.pattern)
        hessian = hooks.hessian(name).hessian
        if method is Method.WANDA:
            return wanda_prune(weight, hessian, self.pattern, perm)
        energy = output_energy(weight, hessian, perm)
        factor = inverse_factor(hessian, perm, damp=self.config.damp)
        del hessian
        if last:  # the sweep is the solve's peak: H goes first when no later layer reads it
            hooks.release(name)
        return obs_prune_factored(weight, factor, self.pattern, energy, quant=quant)

    def _prune_then_round(self, weight: torch.Tensor, hooks: PackageHooks | None, name: str,
                          perm: torch.Tensor | None, quant: Quantization) -> SolveResult:
        """The RTN baseline: prune as the method does, then round every kept weight to its nearest grid point; the
        error of both together is measured on H (when the method calibrated a full one)."""
        method = self.config.method
        hessian = hooks.hessian(name).hessian if hooks is not None else None
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

    def summary(self, name: str, adapter: Adapter, packages: list, skipped: list[Skipped], progress: Progress,
                pruner: Pruner) -> dict:
        layers = [r for r in progress.layers if r["name"].startswith(name + ".")]
        pruned = sum(math.prod(r["shape"]) for r in layers)
        zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in layers)
        quant = self.config.quantization
        return {"adapter": adapter.family, "packages": [[t.name for t in p] for p in packages],
                "quantization": str(quant) if quant else None,
                "pruned_layers": len(layers), "pruned_weights": pruned,
                "sparsity_of_pruned_layers": zeros / max(pruned, 1),
                "skipped": [{"name": f"{name}.{s.name}", "reason": s.reason} for s in skipped]}


class StructuredStrategy:
    """Heads, FFN neurons and resnet channel groups: scored, compensated and physically removed; shapes recorded.

    With a budget (``--flops``/``--params``) the per-unit counts are allocated once, on the dense model, before the
    first package (``before_packages``); they are saved with the progress, so a resumed prune keeps them.
    """

    def __init__(self, config: PruneConfig, spec: Structured) -> None:
        self.config, self.spec = config, spec
        self._ready_hooks: dict[tuple[str, int], PackageHooks] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def plan(self, name: str, module, adapter: Adapter) -> tuple[list[list], list[Skipped]]:
        from obsdiff.structured import find_units, fraction_count

        if self.spec.budget is not None and not adapter.denoiser:
            raise UsageError(f"--{self.spec.budget.measure} budgets the denoiser; prune {name} with --head-sparsity, "
                             "--ffn-sparsity or --channel-sparsity")
        found = find_units(module, adapter)
        units = found.units
        if self.spec.budget is None:  # a kind whose fraction is 0 is not calibrated at all
            units = [u for u in units if fraction_count(u, self.spec) > 0]
        if not units:
            raise UsageError(f"component {name} has no attention heads, FFN neurons or resnet channels to remove "
                             f"at these fractions")
        return _split_units(units, self.config.packages), [Skipped(b, r) for b, r in found.skipped]

    def hooked_layers(self, package: list) -> dict:
        return {n: m for unit in package for n, m in unit.down_layers().items()}

    def before_packages(self, pruner: Pruner, plans: dict, settings: CalibrationSettings, progress: Progress) -> None:
        """Allocate a budget over every unit of the component: from FLOP counts and, for ``global``, OBS scores."""
        from obsdiff.structured import allocate, check_reachable, count_params, unit_costs, unit_scores

        budget = self.spec.budget
        if budget is None:
            return
        for name, (adapter, packages, _) in plans.items():
            if name in progress.allocation:  # resumed: the model is no longer dense, keep the saved counts
                self.counts[name] = progress.allocation[name]
                continue
            units = [u for p in packages for u in p]
            if budget.measure is Measure.FLOPS:
                total, by_module = pruner.flops_by_module(name)
            else:
                total, by_module = count_params(pruner.pipe.components[name]), {}
            costs = unit_costs(units, budget.measure, by_module)
            to_save = (1 - budget.keep) * total
            check_reachable(costs, to_save, budget, total)
            scores = None
            if budget.allocation is Allocation.GLOBAL:
                scores = {}
                # Last package first, so the dense model's Hessians of package 1 are still held when it is pruned.
                for index in reversed(range(len(packages))):
                    hooks = pruner._calibrate(name, adapter, self.hooked_layers(packages[index]), index, settings,
                                              progress, what="score")
                    for unit in packages[index]:
                        scores[unit.key] = unit_scores(unit, {n: hooks.hessian(n).hessian for n in unit.down_layers()},
                                                       self.config.damp)
                    if index == 0:
                        self._ready_hooks[(name, 0)] = hooks
                    del hooks
            counts = allocate(costs, to_save, budget, scores, total)
            saved = sum(counts[c.key] * c.saving for c in costs)
            log.info("%s: %s budget keeps %.1f%% of %.4g %s; %d of %d groups go (%s)", name, budget.allocation,
                     100 * (1 - saved / total), total, budget.measure, sum(counts.values()),
                     sum(c.groups for c in costs), ", ".join(
                         f"{k} {sum(counts[c.key] for c in costs if c.kind == k)}/{sum(c.groups for c in costs if c.kind == k)}"
                         for k in dict.fromkeys(c.kind for c in costs)))
            progress.allocation[name] = self.counts[name] = counts

    def take_hooks(self, component: str, index: int) -> PackageHooks | None:
        """Hessians already gathered on the unchanged model for this package (by the allocation pass)."""
        return self._ready_hooks.pop((component, index), None)

    def solve(self, pruner: Pruner, component: str, package: list, index: int, hooks: PackageHooks | None,
              progress: Progress) -> None:
        from obsdiff.structured import prune_unit

        module = pruner.pipe.components[component]
        counts = self.counts.get(component)
        for unit in tqdm(package, desc=f"shrink {component} {index + 1}", leave=False, mininterval=2):
            hessians = {n: hooks.hessian(n).hessian if hooks else None for n in unit.down_layers()}
            n = counts[unit.key] if counts is not None else None
            record = prune_unit(unit, hessians, self.config, module, n)
            progress.layers.append({**record, "component": component, "package": index})
            if hooks is not None:
                for layer in unit.down_layers():
                    hooks.release(layer)

    def summary(self, name: str, adapter: Adapter, packages: list, skipped: list[Skipped], progress: Progress,
                pruner: Pruner) -> dict:
        recs = [r for r in progress.layers if r.get("component") == name]
        before, after = pruner.costs_before[name], pruner.cost(name)

        def removed(kind: str) -> int:
            return sum(r["before"] - r["after"] for r in recs if r["kind"] == kind)

        def total(kind: str) -> int:
            return sum(r["before"] for r in recs if r["kind"] == kind)

        return {
            "adapter": adapter.family, "packages": [[u.key for u in p] for p in packages],
            "units": len(recs),
            "budget": str(self.spec.budget) if self.spec.budget else None,
            "heads_removed": removed("heads"), "heads_total": total("heads"),
            "ffn_neurons_removed": removed("ffn"), "ffn_neurons_total": total("ffn"),
            "channel_groups_removed": removed("channels"), "channel_groups_total": total("channels"),
            "params_before": before["params"], "params_after": after["params"],
            "params_removed": before["params"] - after["params"],
            "flops_before": before["flops"], "flops_after": after["flops"],
            "skipped": [{"name": f"{name}.{s.name}", "reason": s.reason} for s in skipped],
        }


def make_strategy(config: PruneConfig) -> MaskStrategy | StructuredStrategy:
    spec = config.sparsity
    if isinstance(spec, Structured):
        return StructuredStrategy(config, spec)
    return MaskStrategy(config, None if isinstance(spec, Dense) else spec)


# ---- the driver -----------------------------------------------------------------------------------------


class Pruner:
    """Runs one prune; ``stop_after_packages`` lets tests interrupt it the way a crash would."""

    def __init__(self, model_dir: Path, out_dir: Path, config: PruneConfig, *, resume: bool = False,
                 overwrite: bool = False, stop_after_packages: int | None = None, world: World | None = None,
                 device: str | None = None, hessian_device: str | None = None) -> None:
        config.validate()
        check_blocks_spec(config.blocks)
        self.model_dir, self.out_dir, self.config = Path(model_dir), Path(out_dir), config
        self.resume, self.overwrite, self.stop_after = resume, overwrite, stop_after_packages
        self.model_index = check_model_folder(self.model_dir)  # before any work: bad input fails first
        check_disjoint(self.out_dir, {"model": self.model_dir, "prompt file": config.prompts_file})
        if self.out_dir.exists() and not overwrite:
            raise UsageError(f"{self.out_dir} already exists (pass --overwrite to replace it)")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UsageError(f"{self.out_dir} exists and is not a folder")
        if not self.out_dir.parent.is_dir():
            raise UsageError(f"{self.out_dir.parent} does not exist")
        self.strategy = make_strategy(config)
        self.world = world or init_world()
        self.device = device_for(self.world, device)
        self.hessian_device = hessian_device
        self.pipe = None
        self._replay: dict[str, tuple] = {}  # one captured denoiser call per component, for FLOP counts
        self.costs_before: dict[str, dict] = {}

    @functools.cached_property
    def prompts(self) -> list[str]:
        """The calibration prompts, read once (none for a method that needs no calibration)."""
        return read_prompts(self.config, self.model_dir) if self.config.needs_calibration else []

    def run(self) -> dict:
        config = self.config
        started = time.time()
        prompts = self.prompts
        prompts_sha = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
        world = self.world
        if config.quantization is not None and world.size > 1:
            raise UsageError("--quantize runs in one process for now (the scales are not broadcast between ranks)")
        if prompts and -(-len(prompts) // config.batch_size) < world.size:
            raise UsageError(f"{len(prompts)} prompts in batches of {config.batch_size} give fewer batches than "
                             f"the {world.size} processes")
        plans = self._prepare()
        config, pipe = self.config, self.pipe
        components = pipeline_components(pipe)
        if isinstance(self.strategy, StructuredStrategy):
            self.costs_before = {n: self.cost(n) for n in config.components}

        partial = _partial_dir(self.out_dir)
        layout = {name: [[getattr(u, "name", None) or u.key for u in p] for p in packages]
                  for name, (_, packages, _) in plans.items()}  # package boundaries, which a budget may have moved
        fingerprint = config.fingerprint(prompts_sha + json.dumps(layout))
        progress = Progress(fingerprint)
        if self.resume and partial.is_dir():
            progress = _load_checkpoint(partial, fingerprint, components)
            for name in progress.done:
                self._load_scales(name, partial / f"{name}.{QUANT_SCALES}")
            log.info("resuming: %s", ", ".join(f"{c} {n} package(s) done" for c, n in progress.done.items()) or "nothing")
        elif world.is_main:
            staging_path(self.out_dir, ".obsdiff-partial")  # a stale one is removed
        if world.is_main:
            partial.mkdir(parents=True, exist_ok=True)
        barrier(world)

        my_prompts, my_ids = world.shard(prompts, config.batch_size)
        settings = CalibrationSettings(my_prompts, config.steps, config.guidance, config.height, config.width,
                                       config.seed, config.batch_size, prompt_ids=my_ids,
                                       hessian_device=self.hessian_device,
                                       hessian_dtype=getattr(torch, config.hessian_dtype))
        ran = 0
        try:
            self.strategy.before_packages(self, plans, settings, progress)
            for name, (adapter, packages, _skipped) in plans.items():
                for p, package in enumerate(packages):
                    if p < progress.done.get(name, 0):
                        continue
                    if self.stop_after is not None and ran >= self.stop_after:
                        raise KeyboardInterrupt("stopped on request")
                    log.info("%s package %d/%d: %d units", name, p + 1, len(packages), len(package))
                    hooks = self.strategy.take_hooks(name, p)
                    if hooks is None:
                        hooks = self._calibrate(name, adapter, self.strategy.hooked_layers(package), p, settings,
                                                progress)
                    t0 = time.time()
                    self.strategy.solve(self, name, package, p, hooks, progress)
                    del hooks
                    progress.timings["solve_s"] = progress.timings.get("solve_s", 0) + time.time() - t0
                    progress.done[name] = p + 1
                    if world.is_main:
                        self._save_scales(name, partial / f"{name}.{QUANT_SCALES}")
                        _save_checkpoint(partial, progress, name, components[name])
                    ran += 1
                    fault_point("after-package", world.rank)
        except (KeyboardInterrupt, SystemExit) as exc:
            log.warning("interrupted (%s); rerun with --resume to continue from %s", type(exc).__name__, partial)
            raise
        except ObsdiffError:  # bad input or data: nothing to resume
            if world.is_main:
                discard_staging(self.out_dir, ".obsdiff-partial")
            raise
        except BaseException:
            log.error("prune stopped; finished packages are kept in %s: rerun with --resume", partial)
            raise

        summaries = {name: self.strategy.summary(name, adapter, packages, skipped, progress, self)
                     for name, (adapter, packages, skipped) in plans.items()}
        record = self._record(summaries, progress, prompts, prompts_sha, time.time() - started)
        if world.is_main:
            self._write_output(record)
            discard_staging(self.out_dir, ".obsdiff-partial")
        barrier(world)
        return record

    def _prepare(self) -> dict:
        """Load the pipeline and plan every component's packages, sized to the memory budget; nothing calibrates."""
        config = self.config
        self.pipe = load_pipeline(self.model_dir, self.model_index).to(self.device)
        components = pipeline_components(self.pipe)
        config = self.config = replace(config, components=resolve_components(config.components, components))
        unknown = [c for c in config.components if c not in components]
        if unknown:
            raise UsageError(f"unknown component {', '.join(unknown)}; this pipeline has {', '.join(components)}")
        plans = {}
        for name in config.components:
            adapter = adapter_for(components[name])
            plans[name] = (adapter, *self.strategy.plan(name, components[name], adapter))
        self.memory = self._memory_plan(plans, components)
        return plans

    def plan_only(self) -> dict:
        """``--plan``: the packages, their layers and memory, and the expected peak; writes nothing."""
        self._prepare()
        return self.memory

    def _memory_plan(self, plans: dict, components: dict) -> dict:
        """Re-split mask packages that would not fit the budget; the plan goes to pruning.json."""
        from obsdiff.plan import GIB, PackagePlan, activation_bytes, available_memory, current_rss, fit_to_budget, layer_cost

        config = self.config
        denoiser = next((n for n in ("unet", "transformer") if n in components), None)
        activations, input_shapes = 0, {}
        if denoiser is not None and config.needs_calibration:
            args, kwargs, batch = self._component_call(denoiser)
            activations, shapes = activation_bytes(components[denoiser], *_batched(args, kwargs, batch,
                                                                                      config.batch_size * batch))
            input_shapes = {denoiser: shapes}
        # After one real pipeline call: the runtime's own caches and arenas are part of the base, not of the plan.
        base = current_rss()
        budget = int(config.max_memory_gib * GIB) if config.max_memory_gib else available_memory(self.device)
        statistic = {Method.OBS_DIFF: "full", Method.WANDA: "diagonal"}.get(config.method, "none")
        dtype_bytes = 8 if config.hessian_dtype == "float64" else 4
        summary: dict = {"budget_gib": budget / GIB, "budget_from": "--max-memory" if config.max_memory_gib
                         else "available memory", "base_rss_gib": base / GIB, "activation_gib": activations / GIB,
                         "calibration_passes_per_package": -(-len(self.prompts) // config.batch_size) * config.steps
                         if config.needs_calibration else 0, "components": {}}
        worst = 0
        for name, (adapter, packages, skipped) in plans.items():
            if isinstance(self.strategy, StructuredStrategy):
                summary["components"][name] = [{"units": len(p)} for p in packages]
                continue
            module = components[name]
            shapes = input_shapes.get(name, {})
            costs = [[layer_cost(module, t.name, t.module, t.block, statistic, dtype_bytes, shapes.get(t.name))
                      for t in p] for p in packages]
            try:
                fitted = fit_to_budget(costs, budget, activations)
            except UsageError as exc:
                raise UsageError(f"{name}: {exc} (budget from {summary['budget_from']})") from None
            by_name = {t.name: t for p in packages for t in p}
            plans[name] = (adapter, [[by_name[c.name] for c in p] for p in fitted], skipped)
            rows = []
            for p in fitted:
                plan = PackagePlan(p)
                need = plan.need(activations)
                worst = max(worst, need)
                rows.append({"layers": len(p), "first": p[0].name, "last": p[-1].name,
                             "hessians": len({c.hessian for c in p}), "hessian_gib": plan.hessian_bytes / GIB,
                             "largest_layer": plan.largest.name, "workspace_gib": plan.largest.workspace_bytes / GIB,
                             "need_gib": need / GIB, "expected_peak_gib": (base + need) / GIB})
            summary["components"][name] = rows
        summary["expected_peak_gib"] = (base + worst) / GIB
        return summary

    def _called_module(self, name: str) -> tuple[torch.nn.Module, str]:
        """What one call of component ``name`` runs in generation: the denoiser itself, or the VAE's decoder (whose
        path prefix inside the component is returned with it)."""
        component = self.pipe.components[name]
        if name == "vae":
            return component.decoder, "decoder."
        return component, ""

    def _component_call(self, name: str) -> tuple[tuple, dict, int]:
        """The inputs of one real call of the component (the denoiser, or the VAE decoder) at the calibration size
        (one prompt, one step), and its batch."""
        module, _ = self._called_module(name)
        if name not in self._replay:
            captured: list = []
            handle = module.register_forward_pre_hook(
                lambda mod, args, kwargs: captured.append((args, kwargs)) if not captured else None, with_kwargs=True)
            extra = {k: v for k, v in (("height", self.config.height), ("width", self.config.width)) if v}
            prompt = self.prompts[:1] or [""]
            try:
                with torch.no_grad():
                    self.pipe(prompt[0], num_inference_steps=1, guidance_scale=self.config.guidance,
                              output_type="np" if name == "vae" else "latent", **extra)
            finally:
                handle.remove()
            self._replay[name] = captured[0]
        args, kwargs = self._replay[name]
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        return args, kwargs, int(sample.shape[0])

    def _calibrate(self, component: str, adapter: Adapter, layers: dict, index: int,
                   settings: CalibrationSettings, progress: Progress, what: str = "calibrate") -> PackageHooks | None:
        """Hook one package's layers, run the pipeline over this rank's prompts, sum Hessians over ranks."""
        config = self.config
        if not config.needs_calibration:
            return None
        t0 = time.time()
        weights = timestep_weights(config.weighting, config.steps, config.alpha_min, config.alpha_max)
        ctx = StepContext(weights if adapter.denoiser else [])
        hooks = PackageHooks(layers, ctx, weighted=adapter.denoiser, hessian_device=settings.hessian_device,
                             hessian_dtype=settings.hessian_dtype, diagonal_only=config.method is Method.WANDA)
        module = self.pipe.components[component]
        after_batch = _vae_encoder_feed(module) if component == "vae" else None
        with hooks, torch.no_grad():
            run_pipeline(self.pipe, settings, ctx, decode=component == "vae", after_batch=after_batch,
                         desc=f"{what} {component} {index + 1}")
        all_reduce_hessians(self.world, hooks.accumulators)
        progress.timings["calibration_s"] = progress.timings.get("calibration_s", 0) + time.time() - t0
        return hooks

    def cost(self, name: str) -> dict:
        """Parameters and per-call FLOPs of a component, on the inputs of one real pipeline call."""
        from obsdiff.structured import count_params

        return {"params": count_params(self.pipe.components[name]), "flops": self.flops_by_module(name)[0]}

    def flops_by_module(self, name: str) -> tuple[int, dict[str, int]]:
        """FLOPs of one real call of the component, in total and per submodule path (relative to the component)."""
        from obsdiff.structured import flops_by_module

        module, prefix = self._called_module(name)
        args, kwargs, _ = self._component_call(name)
        return flops_by_module(lambda: module(*args, **kwargs), prefix)

    def _record(self, summaries: dict, progress: Progress, prompts: list[str], prompts_sha: str, seconds: float) -> dict:
        config = self.config
        structured = {name: _structured_shapes(progress.layers, name) for name in summaries} \
            if isinstance(self.strategy, StructuredStrategy) else {}
        # A source that was already shrunk keeps its shapes (for the components, or units, not shrunk again here).
        earlier = ((read_pruning_record(self.model_dir) or {}).get("structured") or {}).get("components", {})
        structured = {name: _merge_shapes(earlier.get(name, {}), structured.get(name, {}))
                      for name in {*earlier, *structured}}
        return {
            "tool": "obsdiff", "version": __version__, "source": str(self.model_dir), "settings": config.to_json(),
            "calibration": {"prompts": len(prompts), "prompts_sha256": prompts_sha,
                            "timestep_weights": timestep_weights(config.weighting, config.steps, config.alpha_min,
                                                                 config.alpha_max) if prompts else None},
            "components": summaries, "layers": progress.layers,
            **({"structured": {"components": structured}} if structured else {}),
            "memory_plan": self.memory, "timings": {**progress.timings, "total_s": seconds},
            "peak_rss_mb": peak_rss() / 2**20,
        }

    def _save_scales(self, component: str, path: Path) -> None:
        """The quantization scales of one component's layers, beside its weights (which hold the dequantized values,
        so diffusers loads the folder as it is); an exporter turns weight / scale back into the integer codes."""
        scales = getattr(self.strategy, "scales", {})
        mine = {k.removeprefix(component + ".") + ".weight_scale": v.contiguous()
                for k, v in scales.items() if k.startswith(component + ".")}
        if not mine:
            return
        quant = self.config.quantization
        write_bytes_atomic(path, save(mine, metadata={"bits": str(quant.bits), "group_size": str(quant.group_size or 0),
                                                      "method": str(quant.method), "columns": SCALE_COLUMNS}))

    def _load_scales(self, component: str, path: Path) -> None:
        if path.is_file() and isinstance(self.strategy, MaskStrategy):
            self.strategy.scales.update({f"{component}.{k.removesuffix('.weight_scale')}": v
                                         for k, v in load_file(str(path)).items()})

    def _write_output(self, record: dict) -> None:
        """The pruned folder is built in a staging folder and renamed into place whole."""
        staging = staging_path(self.out_dir)
        try:
            copy_model_files(self.model_dir, staging, skip=set(self.config.components) | {PRUNING_JSON})
            for name in self.config.components:
                self.pipe.components[name].save_pretrained(staging / name, safe_serialization=True)
                self._save_scales(name, staging / name / QUANT_SCALES)
            (staging / PRUNING_JSON).write_text(json.dumps(record, indent=2))
            fault_point("before-publish")
            replace_dir(staging, self.out_dir)
        except BaseException:
            discard_staging(self.out_dir)
            raise


def _batched(args: tuple, kwargs: dict, batch: int, new_batch: int) -> tuple[tuple, dict]:
    """The same call with every batch-sized tensor resized to ``new_batch`` (shapes only: for the meta run)."""
    def resize(x):
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch:
            return x.new_empty((new_batch, *x.shape[1:]), device="meta")
        return x

    return torch.utils._pytree.tree_map(resize, args), torch.utils._pytree.tree_map(resize, kwargs)


def _vae_encoder_feed(vae):
    """The VAE encoder sees images in generation (img2img): encode each generated batch."""

    def feed(images: torch.Tensor) -> None:
        vae.encode(images.to(vae.dtype) * 2 - 1)

    return feed


def prune(model_dir: Path, out_dir: Path, config: PruneConfig, **kwargs) -> dict:
    return Pruner(model_dir, out_dir, config, **kwargs).run()

"""The pruning driver: model folder → packages → calibration → solve → pruned folder.

Target layers of each component are split into P module packages in block order. Each package is
calibrated on the model as pruned so far, then solved layer by layer. After every package the
progress is saved next to the output, so ``resume`` restarts at the first unfinished package.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import json
import logging
import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from obsdiff import __version__
from obsdiff.adapters import Skipped, TargetLayer, adapter_for, find_targets
from obsdiff.calibration import CalibrationSettings, PackageHooks, run_pipeline
from obsdiff.default_model import MODEL_PROMPTS
from obsdiff.distributed import World, all_reduce_hessians, barrier, broadcast_layer, device_for, fault_point, init_world
from obsdiff.errors import ObsdiffError, UsageError
from obsdiff.hessian import StepContext, Weighting, timestep_weights
from obsdiff.layers import column_permutation, permute_hessian, reduction_size, set_weight_matrix, weight_matrix
from obsdiff.model_io import PRUNING_JSON, copy_tree_linked, load_pipeline, pipeline_components
from obsdiff.solver import Pattern, SolveResult, finite_or_none, magnitude_prune, obs_prune, wanda_prune

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERAL_PROMPTS = REPO_ROOT / "calibration_data" / "general.txt"


class Method(str, enum.Enum):
    OBS_DIFF = "obs-diff"
    WANDA = "wanda"
    MAGNITUDE = "magnitude"
    L1 = "l1"  # structured baseline only


DENOISER = "denoiser"  # alias: the pipeline's UNet or transformer


@dataclass
class PruneConfig:
    method: Method = Method.OBS_DIFF
    pattern: str = "unstructured"
    sparsity: float | None = None  # None: 0.5, or N/M for an N:M pattern
    components: tuple[str, ...] = (DENOISER,)
    prompts_file: Path | None = None
    num_prompts: int = 100
    steps: int = 25
    guidance: float = 7.0
    height: int | None = None
    width: int | None = None
    weighting: Weighting = Weighting.LOG_DECREASE
    alpha_min: float = 0.8
    alpha_max: float = 1.2
    packages: int = 4
    damp: float = 0.01
    blocks: str | None = None
    seed: int = 0
    batch_size: int = 16
    hessian_dtype: str = "float32"  # "float64": the sum no longer depends on batching or sharding
    # structured pruning (obsdiff.structured)
    head_sparsity: float | None = None
    ffn_sparsity: float | None = None
    compensate: bool = True

    def validate(self) -> None:
        self.method = Method(self.method)
        self.weighting = Weighting(self.weighting)
        if self.pattern == "structured":
            from obsdiff.structured import validate_structured

            validate_structured(self)
            return
        if self.method is Method.L1:
            raise UsageError("--method l1 is the structured baseline: use it with --pattern structured")
        if not self.compensate:
            raise UsageError("--no-compensate applies to --pattern structured only")
        try:
            pattern = Pattern.parse(self.pattern)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if pattern.is_nm:
            if self.sparsity is not None and abs(self.sparsity - pattern.n / pattern.m) > 1e-9:
                raise UsageError(f"pattern {pattern} means sparsity {pattern.n / pattern.m:g}, not {self.sparsity:g}")
            self.sparsity = pattern.n / pattern.m
        elif self.sparsity is None:
            self.sparsity = 0.5
        if not 0 < self.sparsity < 1:
            raise UsageError(f"--sparsity must be in (0, 1), got {self.sparsity:g}")
        self._validate_common()

    def _validate_common(self) -> None:
        if self.packages < 1:
            raise UsageError("--packages must be ≥ 1")
        if self.steps < 1 or self.num_prompts < 1 or self.batch_size < 1:
            raise UsageError("--steps, --num-prompts and --batch-size must be ≥ 1")
        if not 0 <= self.damp < 1:
            raise UsageError("--damp must be in [0, 1)")
        if self.hessian_dtype not in ("float32", "float64"):
            raise UsageError("--hessian-dtype must be float32 or float64")
        if self.alpha_min <= 0 or self.alpha_max <= 0:
            raise UsageError("--alpha-min and --alpha-max must be positive")

    @property
    def needs_calibration(self) -> bool:
        return self.method not in (Method.MAGNITUDE, Method.L1)

    def fingerprint(self, prompts_sha: str) -> str:
        data = {k: (str(v) if isinstance(v, (Path, enum.Enum)) else v) for k, v in asdict(self).items()}
        return hashlib.sha256(json.dumps({**data, "prompts": prompts_sha}, sort_keys=True).encode()).hexdigest()


def read_prompts(config: PruneConfig, model_dir: Path) -> list[str]:
    path = config.prompts_file
    if path is None:
        path = model_dir / MODEL_PROMPTS if (model_dir / MODEL_PROMPTS).is_file() else GENERAL_PROMPTS
    if not Path(path).is_file():
        raise UsageError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompts")
    return prompts[: config.num_prompts]


def block_filter(spec: str | None, block_names: list[str]):
    """``--blocks``: comma-separated glob patterns over block names, or indices / ranges (``0-3``)."""
    if not spec:
        return None
    chosen: set[str] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.replace("-", "").isdigit():
            lo, _, hi = part.partition("-")
            idx = range(int(lo), int(hi or lo) + 1)
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


@dataclass
class Progress:
    """What is saved after each package, so an interrupted prune can resume."""

    fingerprint: str
    done: dict[str, int] = field(default_factory=dict)  # component -> packages finished
    layers: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _solve(config: PruneConfig, pattern: Pattern, weight: torch.Tensor, hessian: torch.Tensor | None) -> SolveResult:
    if config.method is Method.MAGNITUDE:
        return magnitude_prune(weight, config.sparsity, pattern, hessian)
    if config.method is Method.WANDA:
        return wanda_prune(weight, hessian, config.sparsity, pattern)
    return obs_prune(weight, hessian, config.sparsity, pattern, damp=config.damp)


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.obsdiff-partial")


def _save_progress(partial: Path, progress: Progress, name: str, component) -> None:
    """The component whose package just finished (the others are unchanged since their last save)."""
    tmp = partial / "progress.json.tmp"
    save_model(component, str(partial / f"{name}.safetensors"))  # handles tied weights (T5)
    tmp.write_text(json.dumps(asdict(progress)))
    tmp.replace(partial / "progress.json")


def resolve_components(requested: tuple[str, ...], available: dict) -> tuple[str, ...]:
    """Replace the ``denoiser`` alias by ``unet`` or ``transformer``, whichever the pipeline has."""
    denoiser = next((n for n in ("unet", "transformer") if n in available), DENOISER)
    return tuple(dict.fromkeys(denoiser if c == DENOISER else c for c in requested))


class Pruner:
    """Runs one prune; ``stop_after_packages`` lets tests interrupt it the way a crash would."""

    def __init__(self, model_dir: Path, out_dir: Path, config: PruneConfig, *, resume: bool = False,
                 overwrite: bool = False, stop_after_packages: int | None = None, world: World | None = None,
                 device: str | None = None, hessian_device: str | None = None) -> None:
        config.validate()
        self.model_dir, self.out_dir, self.config = Path(model_dir), Path(out_dir), config
        self.resume, self.overwrite, self.stop_after = resume, overwrite, stop_after_packages
        self.world = world or init_world()
        self.device = device_for(self.world, device)
        self.hessian_device = hessian_device
        self._replay: dict[str, tuple] = {}  # one captured denoiser call per component, for FLOP counts
        self._costs_before: dict[str, dict] = {}
        if self.out_dir.exists() and not overwrite:
            raise UsageError(f"{self.out_dir} already exists (pass --overwrite to replace it)")
        if not self.out_dir.parent.exists():
            raise UsageError(f"{self.out_dir.parent} does not exist")

    def run(self) -> dict:
        config = self.config
        started = time.time()
        prompts = read_prompts(config, self.model_dir) if config.needs_calibration else []
        prompts_sha = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
        world = self.world
        if prompts and -(-len(prompts) // config.batch_size) < world.size:
            raise UsageError(f"{len(prompts)} prompts in batches of {config.batch_size} give fewer batches than "
                             f"the {world.size} processes")
        pipe = load_pipeline(self.model_dir).to(self.device)
        components = pipeline_components(pipe)
        config = self.config = replace(config, components=resolve_components(config.components, components))
        unknown = [c for c in config.components if c not in components]
        if unknown:
            raise UsageError(f"unknown component {', '.join(unknown)}; this pipeline has {', '.join(components)}")
        plans = {name: self._plan(name, components[name]) for name in config.components}
        self._costs_before = {n: self._cost(pipe, n) for n in config.components} if config.pattern == "structured" else {}

        partial = _partial_dir(self.out_dir)
        fingerprint = config.fingerprint(prompts_sha)
        progress = Progress(fingerprint)
        if self.resume and (partial / "progress.json").is_file():
            saved = Progress(**json.loads((partial / "progress.json").read_text()))
            if saved.fingerprint != fingerprint:
                raise UsageError(f"--resume: {partial} was made with other settings or prompts; remove it or drop --resume")
            progress = saved
            for name in progress.done:
                if config.pattern == "structured":
                    from obsdiff.structured import apply_shapes, shapes_from_records

                    apply_shapes(components[name], shapes_from_records(
                        [r for r in progress.layers if r.get("component") == name]))
                load_model(components[name], str(partial / f"{name}.safetensors"))
            log.info("resuming: %s", ", ".join(f"{c} {n} package(s) done" for c, n in progress.done.items()))
        elif world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
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
            for name, (adapter, packages, _skipped) in plans.items():
                for p, package in enumerate(packages):
                    if p < progress.done.get(name, 0):
                        continue
                    if self.stop_after is not None and ran >= self.stop_after:
                        raise KeyboardInterrupt("stopped on request")
                    log.info("%s package %d/%d: %d layers", name, p + 1, len(packages), len(package))
                    self._run_package(pipe, name, adapter, package, p, settings, progress)
                    progress.done[name] = p + 1
                    if world.is_main:
                        _save_progress(partial, progress, name, components[name])
                    ran += 1
                    fault_point(world, ran)
        except KeyboardInterrupt:
            log.warning("interrupted; rerun with --resume to continue from %s", partial)
            raise
        except ObsdiffError:  # bad input or data: nothing to resume
            if world.is_main:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        except Exception:
            log.error("prune failed; finished packages are kept in %s: rerun with --resume", partial)
            raise

        costs_after = {n: self._cost(pipe, n) for n in config.components} if config.pattern == "structured" else {}
        record = self._record(plans, progress, prompts, prompts_sha, time.time() - started, costs_after)
        if world.is_main:
            self._write_output(pipe, record)
            shutil.rmtree(partial, ignore_errors=True)
        barrier(world)
        return record

    def _plan(self, name: str, module) -> tuple:
        adapter = adapter_for(module)
        if self.config.pattern == "structured":
            from obsdiff.structured import find_units

            plan = find_units(module, adapter)
            if not plan.units:
                raise UsageError(f"component {name} has no attention heads or FFN neurons to remove")
            skipped = [Skipped(b, r) for b, r in plan.skipped]
            return adapter, _split_units(plan.units, self.config.packages), skipped
        all_blocks = [b for b, _ in adapter.block_modules(module)]
        targets, skipped = find_targets(module, adapter, block_filter(self.config.blocks, all_blocks))
        pattern = Pattern.parse(self.config.pattern)
        fit = []
        for t in targets:
            if pattern.is_nm and reduction_size(t.module) % pattern.m:
                reason = f"reduction axis {reduction_size(t.module)} is not a multiple of {pattern.m}"
                log.warning("%s.%s skipped: %s", name, t.name, reason)
                skipped.append(Skipped(t.name, reason))
            else:
                fit.append(t)
        if not fit:
            raise UsageError(f"component {name} has no layer that fits pattern {pattern}")
        return adapter, split_packages(fit, self.config.packages), skipped

    def _calibrate(self, pipe, component: str, adapter, layers: dict, index: int,
                   settings: CalibrationSettings, progress: Progress) -> PackageHooks | None:
        """Hook one package's layers, run the pipeline over this rank's prompts, sum Hessians over ranks."""
        config = self.config
        if not config.needs_calibration:
            return None
        t0 = time.time()
        weights = timestep_weights(config.weighting, config.steps, config.alpha_min, config.alpha_max)
        ctx = StepContext(weights if adapter.denoiser else [])
        hooks = PackageHooks(layers, ctx, weighted=adapter.denoiser, hessian_device=settings.hessian_device,
                             hessian_dtype=settings.hessian_dtype)
        module = pipe.components[component]
        after_batch = _vae_encoder_feed(module) if component == "vae" else None
        with hooks, torch.no_grad():
            run_pipeline(pipe, settings, ctx, decode=component == "vae", after_batch=after_batch,
                         desc=f"calibrate {component} {index + 1}")
        all_reduce_hessians(self.world, hooks.accumulators)
        progress.timings["calibration_s"] = progress.timings.get("calibration_s", 0) + time.time() - t0
        return hooks

    def _run_structured_package(self, pipe, component: str, adapter, package: list, index: int,
                                settings: CalibrationSettings, progress: Progress) -> None:
        from obsdiff.structured import AttentionUnit, prune_attention, prune_ffn

        layers = {n: m for unit in package for n, m in unit.down_layers().items()}
        hooks = self._calibrate(pipe, component, adapter, layers, index, settings, progress)
        t0 = time.time()
        module = pipe.components[component]
        for unit in tqdm(package, desc=f"shrink {component} {index + 1}", leave=False, mininterval=2):
            hessians = {n: hooks.hessian(n).hessian if hooks else None for n in unit.down_layers()}
            if isinstance(unit, AttentionUnit):
                record = prune_attention(unit, hessians, self.config)
            else:
                record = prune_ffn(unit, next(iter(hessians.values())), self.config, module)
            progress.layers.append({**record, "component": component, "package": index})
        progress.timings["solve_s"] = progress.timings.get("solve_s", 0) + time.time() - t0

    def _run_package(self, pipe, component: str, adapter, package: list[TargetLayer], index: int,
                     settings: CalibrationSettings, progress: Progress) -> None:
        config = self.config
        if config.pattern == "structured":
            return self._run_structured_package(pipe, component, adapter, package, index, settings, progress)
        pattern = Pattern.parse(config.pattern)
        hooks = self._calibrate(pipe, component, adapter, {t.name: t.module for t in package}, index, settings, progress)
        t0 = time.time()
        for i, t in enumerate(tqdm(package, desc=f"solve {component} {index + 1}", leave=False, mininterval=2)):
            owner = self.world.owner(i)
            record = None
            if self.world.rank == owner:
                hessian = None
                if hooks is not None:
                    hessian = permute_hessian(hooks.hessian(t.name).hessian, column_permutation(t.module))
                result = _solve(config, pattern, weight_matrix(t.module), hessian)
                set_weight_matrix(t.module, result.weight)
                record = asdict(LayerRecord(
                    name=f"{component}.{t.name}", kind=type(t.module).__name__, shape=list(t.module.weight.shape),
                    package=index, sparsity=float((t.module.weight == 0).float().mean()),
                    error=finite_or_none(result.error), relative_error=finite_or_none(result.relative_error),
                    damp=result.damp if config.method is Method.OBS_DIFF else None))
            progress.layers.append(broadcast_layer(self.world, t.module, record, owner))
        progress.timings["solve_s"] = progress.timings.get("solve_s", 0) + time.time() - t0

    def _cost(self, pipe, name: str) -> dict:
        """Parameters and per-forward FLOPs of a component, on the inputs of one real pipeline call."""
        from obsdiff.structured import count_params, forward_flops

        module = pipe.components[name]
        if name not in self._replay:
            captured: list = []
            handle = module.register_forward_pre_hook(
                lambda mod, args, kwargs: captured.append((args, kwargs)) if not captured else None, with_kwargs=True)
            extra = {k: v for k, v in (("height", self.config.height), ("width", self.config.width)) if v}
            try:
                with torch.no_grad():
                    pipe("a handwritten digit five", num_inference_steps=1, output_type="latent", **extra)
            finally:
                handle.remove()
            self._replay[name] = captured[0]
        args, kwargs = self._replay[name]
        return {"params": count_params(module), "flops": forward_flops(module, lambda: module(*args, **kwargs))}

    def _record(self, plans: dict, progress: Progress, prompts: list[str], prompts_sha: str, seconds: float,
                costs_after: dict | None = None) -> dict:
        config = self.config
        per_component = {}
        structured = {}
        for name, (adapter, packages, skipped) in plans.items():
            if config.pattern == "structured":
                from obsdiff.structured import shapes_from_records

                recs = [r for r in progress.layers if r.get("component") == name]
                before, after = self._costs_before[name], costs_after[name]
                structured[name] = shapes_from_records(recs)
                per_component[name] = {
                    "adapter": adapter.family, "packages": [[getattr(u, "path", getattr(u, "down_path", "")) for u in p]
                                                           for p in packages],
                    "units": len(recs),
                    "heads_removed": sum(r["before"] - r["after"] for r in recs if r["kind"] == "heads"),
                    "heads_total": sum(r["before"] for r in recs if r["kind"] == "heads"),
                    "ffn_neurons_removed": sum(r["before"] - r["after"] for r in recs if r["kind"] == "ffn"),
                    "ffn_neurons_total": sum(r["before"] for r in recs if r["kind"] == "ffn"),
                    "params_before": before["params"], "params_after": after["params"],
                    "params_removed": before["params"] - after["params"],
                    "flops_before": before["flops"], "flops_after": after["flops"],
                    "skipped": [{"name": f"{name}.{s.name}", "reason": s.reason} for s in skipped],
                }
                continue
            layers = [r for r in progress.layers if r["name"].startswith(name + ".")]
            pruned = sum(math.prod(r["shape"]) for r in layers)
            zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in layers)
            per_component[name] = {
                "adapter": adapter.family, "packages": [[t.name for t in p] for p in packages],
                "pruned_layers": len(layers), "pruned_weights": pruned,
                "sparsity_of_pruned_layers": zeros / max(pruned, 1),
                "skipped": [{"name": f"{name}.{s.name}", "reason": s.reason} for s in skipped],
            }
        settings = {k: (str(v) if isinstance(v, (Path, enum.Enum)) else v) for k, v in asdict(config).items()}
        return {
            "tool": "obsdiff", "version": __version__, "source": str(self.model_dir), "settings": settings,
            "calibration": {"prompts": len(prompts), "prompts_sha256": prompts_sha,
                            "timestep_weights": timestep_weights(config.weighting, config.steps, config.alpha_min,
                                                                 config.alpha_max) if prompts else None},
            "components": per_component, "layers": progress.layers,
            **({"structured": {"components": structured}} if structured else {}),
            "timings": {**progress.timings, "total_s": seconds},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    def _write_output(self, pipe, record: dict) -> None:
        staging = self.out_dir.with_name(f".{self.out_dir.name}.obsdiff-staging")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            copy_tree_linked(self.model_dir, staging, skip=set(self.config.components) | {PRUNING_JSON})
            for name in self.config.components:
                pipe.components[name].save_pretrained(staging / name, safe_serialization=True)
            (staging / PRUNING_JSON).write_text(json.dumps(record, indent=2))
            if self.out_dir.exists() and self.overwrite:
                shutil.rmtree(self.out_dir)
            staging.rename(self.out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _vae_encoder_feed(vae):
    """The VAE encoder sees images in generation (img2img): encode each generated batch."""

    def feed(images: torch.Tensor) -> None:
        vae.encode(images.to(vae.dtype) * 2 - 1)

    return feed


def prune(model_dir: Path, out_dir: Path, config: PruneConfig, **kwargs) -> dict:
    return Pruner(model_dir, out_dir, config, **kwargs).run()

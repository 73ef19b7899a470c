"""The pruning driver: model folder → packages → calibration → solve → pruned folder.

A short loop, as SparseGPT's sequential driver: plan the packages once (a structured budget's counts too), then for
each package calibrate (hooks on its layers during real denoising), solve (``MaskSolver`` or ``UnitSolver``: Hessians
and layers in, records out), record, checkpoint. The solvers never see this module; the checkpoint
(``obsdiff.checkpoint``) lets ``--resume`` restart at the first unfinished package; ``obsdiff.pruned_folder`` writes
the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from obsdiff import __version__
from obsdiff.adapters import Adapter, adapter_for
from obsdiff.atomic import OutputLock, check_output_dir, discard_staging, fault_point, replace_dir, staging_path
from obsdiff.budget import allocate_budget
from obsdiff.calibration import (
    CalibrationSettings,
    ComponentCall,
    PackageHooks,
    RecordedCall,
    capture_call,
    record_trajectory,
    replay,
    run_pipeline,
    select_calls,
    vae_encoder_feed,
)
from obsdiff.checkpoint import Checkpoint, Progress
from obsdiff.config import DENOISER, Calibration, Method, PruneConfig, denoiser_name
from obsdiff.distributed import World, all_reduce_hessians, barrier, device_for, init_world
from obsdiff.errors import ObsdiffError, UsageError
from obsdiff.hessian import StepContext, timestep_weights
from obsdiff.lean import TEXT_ENCODERS, LeanPipeline, SplitCalls, held_bytes, lean_for_calibration, trim_heap
from obsdiff.mask import MaskSolver
from obsdiff.model_io import copy_model_files, pipeline_components
from obsdiff.packages import PackageResult, check_blocks_spec
from obsdiff.plan import (
    ACTIVATION_SHARE,
    ACTIVATION_TRANSIENT,
    GIB,
    activation_bytes,
    available_memory,
    batched_like,
    check_size_fits,
    device_peak,
    memory_plan,
    peak_rss,
    rows_per_call,
    shared_input_key,
)
from obsdiff.pruned_folder import (
    RECORD_FILE,
    CalibrationRecord,
    ComponentShapes,
    PrunedFolder,
    PruningRecord,
    QuantizedComponent,
    Skip,
    write_pruned_folder,
)
from obsdiff.resources import default_prompts_file, read_prompt_lines
from obsdiff.sparsity import Dense, Measure, Structured
from obsdiff.structured import UnitSolver, count_params, flops_by_module
from obsdiff.timing import PackageTime, flop_shares, image_seconds, solve_seconds, update_rate

__all__ = ["DENOISER", "Method", "PruneConfig", "plan_prune", "prune"]

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


def resolve_components(requested: tuple[str, ...], available: dict) -> tuple[str, ...]:
    """Replace the ``denoiser`` alias by ``unet`` or ``transformer``, whichever the pipeline has."""
    denoiser = denoiser_name(available) or DENOISER
    return tuple(dict.fromkeys(denoiser if c == DENOISER else c for c in requested))


def make_solver(config: PruneConfig) -> MaskSolver | UnitSolver:
    """Chosen once per prune, from the pattern."""
    spec = config.sparsity
    if isinstance(spec, Structured):
        return UnitSolver(config, spec)
    return MaskSolver(config, None if isinstance(spec, Dense) else spec)


@dataclass
class ComponentWork:
    """One component to prune: its adapter, its packages (layers or units), and what stays whole with the reason."""

    adapter: Adapter
    packages: list[list]
    skipped: list[Skip]


@dataclass
class Prepared:
    """What every prune (and ``--plan``) starts from: the pipeline loaded, components resolved, packages planned."""

    config: PruneConfig
    pipe: object
    prompts: list[str]
    solver: MaskSolver | UnitSolver
    work: dict[str, ComponentWork]
    memory: dict
    calls: dict[str, ComponentCall]
    device: torch.device = torch.device("cpu")
    input_shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)  # at the calibration batch
    trajectory: list[RecordedCall] | None = None  # the denoiser's recorded calls (replay calibration)
    trajectory_at: int = 0  # the package the trajectory was recorded before (0: the model as given)
    recording_s: float = 0.0
    lean: LeanPipeline = field(default_factory=LeanPipeline)  # the prompts' embeddings; what calibration let go of
    parts: int = 1  # each denoiser call runs as this many slices of its batch (chosen by the memory plan)

    @property
    def prompt_inputs(self):
        """The pipeline call's keywords for a prompt batch (the embeddings), or None: the prompts themselves."""
        return self.lean.embeddings.call_kwargs if self.lean.embeddings else None

    @property
    def components(self) -> dict[str, nn.Module]:
        return pipeline_components(self.pipe)

    def call(self, name: str) -> ComponentCall:
        """One captured call of component ``name`` at the calibration size (made once, then reused)."""
        if name not in self.calls:
            prompt = (self.prompts[:1] or [""])[0]
            self.calls[name] = capture_call(self.pipe, name, prompt, self.config.guidance, self.config.height,
                                            self.config.width, self.prompt_inputs)
        return self.calls[name]

    def cost(self, name: str) -> dict:
        """Parameters and per-call FLOPs of a component, on the inputs of one real pipeline call."""
        call = self.call(name)
        return {"params": count_params(self.pipe.components[name]), "flops": flops_by_module(call, call.prefix)[0]}


def load_for_calibration(source: PrunedFolder, config: PruneConfig):
    """The pipeline as a prune loads it: SD3's T5 left out on ``--drop-text-encoder-3``, the text encoders that are
    not pruned in ``--text-encoder-dtype``."""
    index, leave_out = source.model_index, ()
    targets = resolve_components(config.components, index)
    if config.drop_text_encoder_3:
        entry = index.get("text_encoder_3")
        if not isinstance(entry, list) or entry[0] is None:
            raise UsageError(f"--drop-text-encoder-3: {source.path} has no text_encoder_3 to drop (only SD3 "
                             "pipelines with a T5 encoder do)")
        if "text_encoder_3" in targets:
            raise UsageError("--drop-text-encoder-3 and --components text_encoder_3 contradict each other")
        leave_out = ("text_encoder_3", "tokenizer_3")
    dtypes = {n: config.text_encoder_dtype.torch_dtype for n in TEXT_ENCODERS
              if n in index and n not in targets and n not in leave_out}
    return source.load_pipeline(dtypes if config.text_encoder_dtype.torch_dtype != torch.float32 else None, leave_out)


def prepare(source: PrunedFolder, config: PruneConfig, prompts: list[str], world: World,
            device: str | None) -> Prepared:
    """Load the pipeline, encode the prompts and let go of what calibration never calls, and plan every component's
    packages, sized to the memory budget; nothing calibrates."""
    solver = make_solver(config)
    pipe = load_for_calibration(source, config)
    components = pipeline_components(pipe)
    config = replace(config, components=resolve_components(config.components, components))
    unknown = [c for c in config.components if c not in components]
    if unknown:
        raise UsageError(f"unknown component {', '.join(unknown)}; this pipeline has {', '.join(components)}")
    batches = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    lean = lean_for_calibration(pipe, config.components, batches + [prompts[:1]] if prompts else [], config.guidance)
    target = device_for(world, device)
    if target.type == "cuda":  # checked before the move: a pipeline that cannot fit fails in one line, not in an OOM
        need, free = held_bytes(pipe), available_memory(target)
        if need > free:
            raise UsageError(f"the pipeline needs {need / GIB:.2f} GiB on {target}, which has {free / GIB:.2f} GiB free")
    pipe = pipe.to(target)
    components = pipeline_components(pipe)
    work = {}
    for name in config.components:
        adapter = adapter_for(components[name])
        work[name] = ComponentWork(adapter, *solver.packages(name, components[name], adapter))
    prepared = Prepared(config, pipe, prompts, solver, work, {}, {}, target, lean=lean)
    prepared.memory = _plan_memory(prepared, device_for(world, device))
    add_time_estimates(prepared)
    return prepared


def add_time_estimates(prepared: Prepared) -> None:
    """Each package's expected seconds (calibration, Hessian updates, solves) and the recording's, from timed probes
    (``obsdiff.timing``), written into the plan beside its memory."""
    config, plan = prepared.config, prepared.memory
    denoiser = denoiser_name(prepared.work)
    replaying = config.needs_calibration and config.calibration is Calibration.REPLAY and denoiser is not None
    per_image, images, shares = 0.0, 0, {}
    if denoiser is not None and config.needs_calibration:
        call = prepared.call(denoiser)
        per_image = image_seconds(call)
        images = batch_fill(config, len(prepared.prompts)) * config.batch_size * call.batch
        total_flops, by_module = flops_by_module(call, call.prefix)
        blocks = [b for b, _ in prepared.work[denoiser].adapter.block_modules(prepared.components[denoiser])]
        shares = flop_shares(blocks, by_module, total_flops)
    recording = total_calls(config, len(prepared.prompts), True) * images * per_image if replaying else 0.0
    total = recording
    plan["rows_per_column_by_width"] = rows_by_width(prepared)
    for name, work in prepared.work.items():
        for row, package in zip(plan["components"][name], work.packages):
            estimate = package_time(prepared, name, package, per_image * images, shares)
            row.update(expected_seconds=estimate.total_s, expected_calibration_seconds=estimate.calibration_s,
                       expected_update_seconds=estimate.update_s, expected_solve_seconds=estimate.solve_s,
                       expected_peak_bytes=int(row.get("expected_peak_gib", 0) * GIB))
            total += estimate.total_s
    plan.update(recording_seconds=recording, seconds_per_image=per_image, expected_seconds=total,
                expected_peak_bytes=int(plan["expected_peak_gib"] * GIB))


def rows_by_width(prepared: Prepared) -> dict[str, float]:
    """For each layer width (columns) of the denoiser, the fewest expected rows per column any layer of it gets: what
    the row budget and the calls a package is fed leave the scarcest layers (a 23,040-column layer at an 8×8 latent
    sees 64 rows per image and call)."""
    name = denoiser_name(prepared.work)
    if name is None or not prepared.config.needs_calibration:
        return {}
    shapes, out = prepared.input_shapes.get(name, {}), {}
    for package in prepared.work[name].packages:
        layers = prepared.solver.hooked_layers(package)
        calls, quotas = package_feed(prepared, name, layers)
        for layer, module in layers.items():
            cols = module.weight[0].numel()
            per_call = call_rows(prepared, module, shapes.get(layer))
            if per_call is None:
                continue
            ratio = calls * min(per_call, quotas.get(layer) or per_call) / cols
            out[str(cols)] = min(out.get(str(cols), ratio), ratio)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def package_time(prepared: Prepared, name: str, package: list, seconds_per_call: float,
                 shares: dict[str, float]) -> PackageTime:
    """One package: the calls it is fed (a replay stops after its last block), its Hessians' updates, its solves."""
    config, work = prepared.config, prepared.work[name]
    if not config.needs_calibration:
        return PackageTime(0.0, 0.0, 0.0)
    layers = prepared.solver.hooked_layers(package)
    calls, quotas = package_feed(prepared, name, layers)
    share = 1.0
    if work.adapter.denoiser and config.calibration is Calibration.REPLAY:
        share = shares.get(package[-1].block, 1.0)
    calibration = calls * seconds_per_call * share if work.adapter.denoiser else 0.0
    shapes = prepared.input_shapes.get(name, {})
    updates, solves, seen = 0.0, 0.0, set()
    module = prepared.components[name]
    for layer, m in layers.items():
        cols = m.weight[0].numel()
        key = shared_input_key(module, layer)
        per_call = call_rows(prepared, m, shapes.get(layer)) or cols
        rows = calls * min(per_call, quotas.get(layer) or per_call)
        if key not in seen:
            seen.add(key)
            width = cols if config.method is Method.WANDA else cols * cols
            updates += 2 * rows * width / update_rate(cols)
        if config.method is Method.OBS_DIFF:
            solves += solve_seconds(m.weight.shape[0], cols)
            # --refine: one rows × c × c product per conjugate-gradient iteration
            solves += config.refine * 2 * m.weight.shape[0] * cols * cols / update_rate(cols)
    if getattr(config.sparsity, "budget", None) is not None:  # the budget's scoring pass calibrates it once more
        calibration, updates = 2 * calibration, 2 * updates
    return PackageTime(calibration, updates, solves)


def _plan_memory(prepared: Prepared, device: torch.device) -> dict:
    """The memory plan (``--plan``, ``pruning.json``); packages over budget are re-split in place."""
    config, components = prepared.config, prepared.components
    denoiser = denoiser_name(components)
    activations, input_shapes = 0, {}
    budget = int(config.max_memory_gib * GIB) if config.max_memory_gib else available_memory(device)
    budget_from = "--max-memory" if config.max_memory_gib else "available memory"
    if denoiser is not None and config.needs_calibration:
        prepared.parts, activations, input_shapes[denoiser] = split_calls(prepared, budget, budget_from, denoiser)
        prepared.input_shapes[denoiser] = input_shapes[denoiser]
    statistic = {Method.OBS_DIFF: "full", Method.WANDA: "diagonal"}.get(config.method, "none")
    dtype_bytes = 8 if config.hessian_dtype == "float64" else 4

    def costs_of(name: str, package: list):
        return prepared.solver.layer_costs(components[name], package, statistic, dtype_bytes,
                                           input_shapes.get(name, {}))

    passes = -(-len(prepared.prompts) // config.batch_size) * config.steps if config.needs_calibration else 0
    def device_costs(name: str, package: list):
        costs = costs_of(name, package)
        if device.type == "cuda" and statistic == "full":  # cuSOLVER's cholesky_inverse is not in place: one more H
            for c in costs:
                c.workspace_bytes += c.columns * c.columns * 4
        return costs

    summary, fitted = memory_plan({n: w.packages for n, w in prepared.work.items()}, device_costs, activations, budget,
                                  budget_from, passes, device)
    for name, packages in fitted.items():
        prepared.work[name].packages = packages
    # what the process holds besides the plan's buffers (inside base_rss_gib), and the peak loading it took
    summary.update(pipeline_held_gib=held_bytes(prepared.pipe) / GIB, calibration_parts=prepared.parts,
                   **prepared.lean.to_json())
    load_peak = device_peak(device) / GIB
    summary["load_peak_gib"] = load_peak
    summary["expected_peak_gib"] = max(summary["expected_peak_gib"], load_peak)
    return summary


def _calibration_activations(prepared: Prepared, denoiser: str, parts: int = 1) -> tuple[int, dict, int]:
    """The denoiser's activations in one calibration call (run as ``parts`` slices of its batch: one slice's),
    measured on ``meta`` (nothing allocated), its convs' input shapes (at the whole call) and the whole call's batch.
    The call is captured at the model's native size (cheap) and resized to the calibration's batch and latent size, so
    that a size too large for memory is refused here instead of failing in an allocation."""
    config = prepared.config
    scale = prepared.pipe.vae_scale_factor
    sample = getattr(prepared.components[denoiser].config, "sample_size", None)
    native_px = sample * scale if isinstance(sample, int) else None
    if (config.height or config.width) and (config.height or native_px, config.width or native_px) != (native_px,) * 2:
        key = f"{denoiser}@native"  # captured once (a real call), at the model's own size
        if key not in prepared.calls:
            prompt = (prepared.prompts[:1] or [""])[0]
            prepared.calls[key] = capture_call(prepared.pipe, denoiser, prompt, config.guidance, None, None,
                                               prepared.prompt_inputs)
        call = prepared.calls[key]
        native = tuple(call.args[0].shape[-2:]) if call.args and call.args[0].dim() == 4 else None
        latent = ((config.height or native[0] * scale) // scale, (config.width or native[1] * scale) // scale) \
            if native else None
    else:  # the calibration's own size is the model's: its call is the one the time estimates probe anyway
        call, native, latent = prepared.call(denoiser), None, None
    batch = config.batch_size * call.batch  # prompts × the guidance batch
    args, kwargs = batched_like(call.args, call.kwargs, call.batch, -(-batch // parts), native, latent)
    return (*activation_bytes(prepared.components[denoiser], args, kwargs), batch)


def split_calls(prepared: Prepared, budget: int, budget_from: str, denoiser: str) -> tuple[int, int, dict]:
    """How many slices each denoiser call runs as, the activations one holds (``ACTIVATION_TRANSIENT`` × what
    ``meta`` counts) and the layers' input shapes.

    Halves first (a classifier-free-guidance batch's two halves), then smaller slices, until one slice's activations
    are at most ``ACTIVATION_SHARE`` of the budget: the Hessians do not change (``lean.SplitCalls``), and the rest of
    the budget goes to Hessians. A budget that one image cannot fit is refused, naming what the denoiser needs."""
    config = prepared.config
    live, input_shapes, call_batch = _calibration_activations(prepared, denoiser)
    parts = 1
    # what a real call holds: the live tensors meta counts, and the kernels' scratch
    while (activations := int(live * ACTIVATION_TRANSIENT)) > ACTIVATION_SHARE * budget and parts < call_batch:
        parts = min(2 * parts, call_batch)
        live = _calibration_activations(prepared, denoiser, parts)[0]
    if activations > budget:
        size = f"{config.height or 'native'}×{config.width or 'native'} px"
        raise UsageError(f"the {budget / GIB:.2f} GiB budget ({budget_from}) is below what the {denoiser} alone "
                         f"needs at {size}: {activations / GIB:.2f} GiB of activations for {-(-call_batch // parts)} "
                         f"image(s) per call, calls already split into {parts}: raise it or lower the size")
    return parts, activations, input_shapes


def batch_fill(config: PruneConfig, prompts: int) -> float:
    """The mean share of a calibration batch its prompts fill (the last batch may be short: 4 prompts in batches of
    16 fill a quarter): the input shapes are taken at the full batch, the calls are this much of it."""
    batches = max(1, -(-prompts // config.batch_size))
    return prompts / (batches * config.batch_size) if prompts else 1.0


def call_rows(prepared: Prepared, module: nn.Module, input_shape: tuple[int, ...] | None) -> int | None:
    """The Hessian rows a layer gets from one calibration call, on average over the calibration's batches."""
    rows = rows_per_call(module, input_shape)
    return None if rows is None else max(1, round(rows * batch_fill(prepared.config, len(prepared.prompts))))


def total_calls(config: PruneConfig, prompts: int, denoiser: bool) -> int:
    """Calls of a component in one calibration: every prompt batch at every step for the denoiser, one per batch for
    the text encoders and the VAE."""
    batches = -(-prompts // config.batch_size)
    return batches * config.steps if denoiser else max(batches, 1)


def package_feed(prepared: Prepared, component: str, layers: dict[str, nn.Module]) -> tuple[int, dict]:
    """How many of the calibration's calls a package needs, and how many rows of each call each layer keeps.

    Each layer should end with ``max(rows_per_column × columns, min_rows)`` rows: a replayed package takes the calls
    its hungriest layer needs (every call where rows are scarce, e.g. 8×8-latent layers with 23,040 columns), and each
    layer keeps of every call just its share. The floor is met with more calls, not more rows of each: rows of one
    call are correlated, and on the default model a floor met from few calls lost 0.1–0.2 of 2:4 accuracy. Without a
    row budget, or rerunning the pipeline, every call is fed.
    """
    config = prepared.config
    adapter = prepared.work[component].adapter
    total = total_calls(config, len(prepared.prompts), adapter.denoiser)
    budget = config.rows_per_column
    if budget is None:
        return total, {}
    shapes = prepared.input_shapes.get(component, {})
    wanted = {name: max(budget * module.weight[0].numel(), config.min_rows) for name, module in layers.items()}
    replaying = adapter.denoiser and config.calibration is Calibration.REPLAY
    calls = total
    if replaying:
        per_call = {name: call_rows(prepared, module, shapes.get(name)) for name, module in layers.items()}
        calls = min(total, max(total if per_call[n] is None else math.ceil(wanted[n] / per_call[n]) for n in layers))
    return calls, {name: math.ceil(wanted[name] / calls) for name in layers}


def calibrate_package(prepared: Prepared, settings: CalibrationSettings, world: World, progress: Progress,
                      component: str, layers: dict[str, nn.Module], index: int,
                      what: str = "calibrate") -> PackageHooks | None:
    """Hook one package's layers, feed them (replayed calls, or the whole pipeline), sum Hessians over ranks."""
    config = prepared.config
    if not config.needs_calibration:
        return None
    t0 = time.time()
    adapter = prepared.work[component].adapter
    ctx = StepContext(timestep_weights(config.weighting, config.steps, config.alpha_min, config.alpha_max)
                      if adapter.denoiser else [])
    calls, quotas = package_feed(prepared, component, layers)
    replaying = adapter.denoiser and config.calibration is Calibration.REPLAY
    hooks = PackageHooks(layers, ctx, weighted=adapter.denoiser, hessian_device=settings.hessian_device,
                         hessian_dtype=settings.hessian_dtype, diagonal_only=config.method is Method.WANDA,
                         quotas=quotas, seed=config.seed, stop_when_done=replaying)
    module = prepared.pipe.components[component]
    with hooks, torch.no_grad(), SplitCalls(module, prepared.parts if adapter.denoiser else 1, ctx):
        if replaying:
            keys = [(b, s) for b in range(-(-len(prepared.prompts) // config.batch_size)) for s in range(config.steps)]
            chosen = select_calls(keys, calls, config.seed * 1_000_003 + index)
            mine = [c for c in prepared.trajectory if (c.batch, c.step) in chosen]
            replay(module, mine, ctx, hooks, desc=f"{what} {component} {index + 1}")
        else:
            after_batch = vae_encoder_feed(module) if component == "vae" else None
            run_pipeline(prepared.pipe, settings, ctx, decode=component == "vae", after_batch=after_batch,
                         desc=f"{what} {component} {index + 1}", hooks=hooks, prompt_inputs=prepared.prompt_inputs)
    all_reduce_hessians(world, hooks.accumulators)
    progress.add_time("calibration_s", time.time() - t0)
    progress.add_time("update_s", hooks.update_s)  # inside calibration_s: forwards = calibration_s − update_s
    # the updates' work as square products (2·kept rows·c², all ranks), so a benchmark can state their FLOP rate
    progress.add_time("update_flops", sum(2.0 * a.kept * a.hessian.shape[0] ** 2 for a in hooks.accumulators.values()
                                          if not a.diagonal_only))
    return hooks


def record_denoiser(prepared: Prepared, settings: CalibrationSettings) -> None:
    """The denoiser's calls over this process's prompts, recorded on the model as it is now (replay calibration)."""
    config = prepared.config
    name = denoiser_name(prepared.work)
    if name is None or not config.needs_calibration or config.calibration is not Calibration.REPLAY:
        return
    t0 = time.time()
    ctx = StepContext(timestep_weights(config.weighting, config.steps, config.alpha_min, config.alpha_max))
    module = prepared.pipe.components[name]
    with SplitCalls(module, prepared.parts, ctx):
        prepared.trajectory = record_trajectory(prepared.pipe, module, settings, ctx, desc=f"record {name}",
                                                prompt_inputs=prepared.prompt_inputs)
    log.info("%s: %d calls recorded in %.1f s", name, len(prepared.trajectory), time.time() - t0)
    prepared.recording_s += time.time() - t0
    trim_heap()  # the recording's activations, freed, would otherwise stay resident beside the Hessians


def check_calibration_size(source: PrunedFolder, config: PruneConfig, world: World, device: str | None) -> None:
    """A calibration size whose activations alone exceed the memory budget is refused before anything loads: at one
    prompt per call (its guidance pair), the least the plan's slices can get to."""
    budget = int(config.max_memory_gib * GIB) if config.max_memory_gib else available_memory(device_for(world, device))
    check_size_fits(source.path, config.height, config.width, 1, budget,
                    "--max-memory" if config.max_memory_gib else "available memory")


def plan_prune(model_dir: Path, config: PruneConfig, device: str | None = None) -> dict:
    """``--plan``: the packages, their layers and memory, and the expected peak; writes nothing."""
    config.validate()
    check_blocks_spec(config.blocks)
    source = PrunedFolder.open(model_dir)
    check_calibration_size(source, config, World(), device)
    if config.stacked:  # the quantize stage planned on the unshrunk model: an upper bound on its memory and time
        shrink, quantize = config.stages()
        return stacked_plan(plan_prune(model_dir, shrink, device), plan_prune(model_dir, quantize, device))
    prompts = read_prompts(config, source.path) if config.needs_calibration else []
    return prepare(source, config, prompts, World(), device).memory


def _check_output(out_dir: Path, source: PrunedFolder, config: PruneConfig, overwrite: bool) -> None:
    check_output_dir(out_dir, {"model": source.path, "prompt file": config.prompts_file}, overwrite)


def _check_world(config: PruneConfig, world: World, prompts: list[str]) -> None:
    if config.quantization is not None and world.size > 1:
        raise UsageError("--quantize runs in one process for now (the scales are not broadcast between ranks)")
    if prompts and -(-len(prompts) // config.batch_size) < world.size:
        raise UsageError(f"{len(prompts)} prompts in batches of {config.batch_size} give fewer batches than "
                         f"the {world.size} processes")


def prune(model_dir: Path, out_dir: Path, config: PruneConfig, *, resume: bool = False, overwrite: bool = False,
          world: World | None = None, device: str | None = None, hessian_device: str | None = None) -> PruningRecord:
    """Prune ``model_dir`` into ``out_dir`` (published whole at the end); returns the record it wrote.

    The writing rank holds ``out_dir``'s lock from before the model loads until the folder is published: a second
    prune into the same output is refused instead of clearing the first one's checkpoint.
    """
    started = time.time()
    config.validate()
    check_blocks_spec(config.blocks)
    source = PrunedFolder.open(model_dir)  # before any work: bad input fails first
    out_dir = Path(out_dir)
    _check_output(out_dir, source, config, overwrite)
    world = world or init_world()
    with OutputLock(out_dir) if world.is_main else contextlib.nullcontext():
        if config.stacked:
            return _prune_stacked(source, out_dir, config, resume, world, device, hessian_device)
        return _prune_locked(source, out_dir, config, resume, world, device, hessian_device, started)


SHRUNK_SUFFIX = ".obsdiff-shrunk"  # a stacked prune's first stage, beside the output until the second is published


def _prune_stacked(source: PrunedFolder, out_dir: Path, config: PruneConfig, resume: bool, world: World,
                   device: str | None, hessian_device: str | None) -> PruningRecord:
    """Shrink, then quantize the shrunk model, as two stages of one prune: the first stage's folder is kept (hidden,
    beside the output) until the second is published, so ``--resume`` continues in whichever stage stopped."""
    shrink, quantize = config.stages()
    _check_world(quantize, world, [])  # before the first stage, not after it
    resolved = replace(config, components=resolve_components(config.components, source.model_index))
    shrunk_dir = out_dir.with_name(f".{out_dir.name}{SHRUNK_SUFFIX}")
    done = _finished_stage(shrunk_dir, shrink, source) if resume else None
    if done is None:
        log.info("stage 1 of 2: shrink (%s)", shrink.sparsity)
        if world.is_main:
            discard_staging(out_dir, SHRUNK_SUFFIX)  # a stale first stage (other settings) starts over
        barrier(world)
        done = _prune_locked(source, shrunk_dir, shrink, resume, world, device, hessian_device, time.time())
    else:
        log.info("--resume: stage 1 (shrink) already done in %s", shrunk_dir)
    log.info("stage 2 of 2: quantize the shrunk model (%s)", quantize.quantization)
    try:
        record = _prune_locked(PrunedFolder.open(shrunk_dir), out_dir, quantize, resume, world, device,
                               hessian_device, time.time(), carried=(source, resolved, done))
    except ObsdiffError:  # bad input or data: nothing to resume
        if world.is_main:
            discard_staging(out_dir, SHRUNK_SUFFIX)
        raise
    if world.is_main:
        discard_staging(out_dir, SHRUNK_SUFFIX)
    return record


def _finished_stage(folder: Path, config: PruneConfig, source: PrunedFolder) -> PruningRecord | None:
    """The first stage's record, when its folder holds a finished prune of ``source`` at these settings."""
    try:
        record = PrunedFolder.open(folder).record
    except Exception:  # absent or unreadable: the stage runs (again)
        return None
    resolved = replace(config, components=resolve_components(config.components, source.model_index))
    if record is None or record.source != str(source.path) or record.settings.to_json() != resolved.to_json():
        return None
    return record


def _prune_locked(source: PrunedFolder, out_dir: Path, config: PruneConfig, resume: bool, world: World,
                  device: str | None, hessian_device: str | None, started: float,
                  carried: tuple[PrunedFolder, PruneConfig, PruningRecord] | None = None) -> PruningRecord:
    """One prune of ``source`` into ``out_dir``; ``carried``: a stacked prune's original source, its settings and its
    first stage's record, which the published record merges with this stage's."""
    prompts = read_prompts(config, source.path) if config.needs_calibration else []
    _check_world(config, world, prompts)
    check_source(source, config)
    check_calibration_size(source, config, world, device)
    prepared = prepare(source, config, prompts, world, device)
    config = prepared.config
    costs_before = {n: prepared.cost(n) for n in config.components} if prepared.solver.reshapes else {}
    layout = {name: [[getattr(u, "name", None) or u.key for u in p] for p in w.packages]
              for name, w in prepared.work.items()}  # package boundaries, which a budget may have moved
    prompts_sha = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    my_prompts, my_ids = world.shard(prompts, config.batch_size)
    settings = CalibrationSettings(my_prompts, config.steps, config.guidance, config.height, config.width,
                                   config.seed, config.batch_size, prompt_ids=my_ids, hessian_device=hessian_device,
                                   hessian_dtype=getattr(torch, config.hessian_dtype))
    fingerprint = config.fingerprint(prompts_sha + json.dumps(layout))
    checkpoint = Checkpoint(out_dir)
    saved = checkpoint.load_trajectory(world.rank, fingerprint, str(prepared.device)) if resume else None
    if saved:
        prepared.trajectory, prepared.trajectory_at = saved
        log.info("--resume: %d recorded calls read from %s", len(prepared.trajectory), checkpoint.folder)
    else:
        record_denoiser(prepared, settings)  # on the model as it is before any package (a resume reads it back)
    progress = checkpoint.start(fingerprint, prepared.components, resume, world.is_main)
    denoiser_done = progress.done.get(denoiser_name(prepared.work) or "", 0)
    if saved and prepared.trajectory_at > denoiser_done:
        # a re-recording newer than the weights the checkpoint could give back (a torn component started over)
        log.warning("--resume: the saved trajectory is newer than the saved weights; recording it again")
        record_denoiser(prepared, settings)
        prepared.trajectory_at, saved = denoiser_done, None
    barrier(world)
    if prepared.trajectory is not None and not saved:
        checkpoint.save_trajectory(prepared.trajectory, world.rank, fingerprint, prepared.trajectory_at)
    try:
        run_packages(prepared, settings, world, progress, checkpoint)
    except (KeyboardInterrupt, SystemExit) as exc:
        log.warning("interrupted (%s); rerun with --resume to continue from %s", type(exc).__name__, checkpoint.folder)
        raise
    except ObsdiffError:  # bad input or data: nothing to resume
        if world.is_main:
            checkpoint.discard()
        raise
    except BaseException:
        log.error("prune stopped; finished packages are kept in %s: rerun with --resume", checkpoint.folder)
        raise
    record = make_record(prepared, source, progress, costs_before, prompts_sha, time.time() - started)
    if carried is not None:
        record = stacked_record(record, *carried)
    if world.is_main:
        publish(source, out_dir, prepared, record, progress.quantized)
        checkpoint.discard()
    barrier(world)
    return record


def check_source(source: PrunedFolder, config: PruneConfig) -> None:
    """A folder that already holds integer codes is not pruned or quantized again: its weights would leave their grid
    (or be rounded twice). Refused in one line, before anything loads."""
    quantized = sorted(set(source.quantization) & set(resolve_components(config.components, source.model_index)))
    if quantized:
        raise UsageError(f"{source.path}: {', '.join(quantized)} already hold integer codes (quantized by an earlier "
                         "prune); prune the float folder it was made from, then quantize in the same prune")


def run_packages(prepared: Prepared, settings: CalibrationSettings, world: World, progress: Progress,
                 checkpoint: Checkpoint) -> None:
    """The loop: for each package not done yet, calibrate, solve, record, checkpoint."""
    solver = prepared.solver

    def calibrate(name: str, package: list, index: int, what: str = "calibrate") -> PackageHooks | None:
        return calibrate_package(prepared, settings, world, progress, name, solver.hooked_layers(package), index, what)

    counts, ready = budget_counts(prepared, progress, calibrate)
    expected = [r.get("expected_seconds", 0.0) for rows in prepared.memory["components"].values() for r in rows]
    # the whole run's bar, in expected seconds: its ETA is the plan's, corrected by every package measured so far
    eta = tqdm(total=round(sum(expected)), desc="prune", unit="s", mininterval=5, leave=False) \
        if expected and world.is_main else _NoBar()
    try:
        _package_loop(prepared, settings, world, progress, checkpoint, calibrate, counts, ready, eta)
    finally:
        eta.close()


def _package_loop(prepared: Prepared, settings: CalibrationSettings, world: World, progress: Progress,
                  checkpoint: Checkpoint, calibrate, counts: dict, ready: dict, eta) -> None:
    solver, components = prepared.solver, prepared.components
    for name, work in prepared.work.items():
        for index, package in enumerate(work.packages):
            if index < progress.done.get(name, 0):
                continue
            log.info("%s package %d/%d: %d units", name, index + 1, len(work.packages), len(package))
            refresh = prepared.config.refresh_every
            if (work.adapter.denoiser and refresh and index and index % refresh == 0 and (name, index) not in ready
                    and prepared.trajectory_at != index):  # a resume may have read this very recording back
                record_denoiser(prepared, settings)  # the partly pruned model's own trajectory from here on
                prepared.trajectory_at = index
                if prepared.trajectory is not None:
                    checkpoint.save_trajectory(prepared.trajectory, world.rank, progress.fingerprint, index)
            t0 = time.time()
            hooks = ready.pop((name, index), None) or calibrate(name, package, index)
            trim_heap()  # the calibration's activations, before the solves' workspaces
            t1 = time.time()
            result = solver.solve(name, components[name], package, index, hooks, world, counts.get(name))
            del hooks
            trim_heap()
            progress.add_time("solve_s", time.time() - t1)
            progress.package_s[f"{name}/{index}"] = {"calibration_s": t1 - t0, "solve_s": time.time() - t1}
            eta.update(progress.package_s[f"{name}/{index}"]["calibration_s"] + time.time() - t1)
            record_package(progress, name, index, result, prepared.config)
            if world.is_main:
                checkpoint.save(progress, name, components[name])
            fault_point("after-package", world.rank)


class _NoBar:
    def update(self, n: float) -> None:
        pass

    def close(self) -> None:
        pass


def budget_counts(prepared: Prepared, progress: Progress, calibrate) -> tuple[dict, dict]:
    """A structured budget's groups to remove per unit, for each component (saved with the progress, so a resumed
    prune keeps them), and the Hessians the scoring pass already gathered for a first package."""
    budget = getattr(prepared.config.sparsity, "budget", None)
    counts: dict[str, dict[str, int]] = {}
    ready: dict[tuple[str, int], PackageHooks] = {}
    if budget is None:
        return counts, ready
    for name, work in prepared.work.items():
        if name in progress.allocation:  # resumed: the model is no longer dense, keep the saved counts
            counts[name] = progress.allocation[name]
            continue
        if budget.measure is Measure.FLOPS:
            call = prepared.call(name)
            total, by_module = flops_by_module(call, call.prefix)
        else:
            total, by_module = count_params(prepared.pipe.components[name]), {}
        allocation = allocate_budget(name, work.packages, budget, total, by_module,
                                     lambda i, n=name, w=work: calibrate(n, w.packages[i], i, "score"),
                                     prepared.config.damp)
        if allocation.first_package is not None:
            ready[(name, 0)] = allocation.first_package
        progress.allocation[name] = counts[name] = allocation.counts
    return counts, ready


def record_package(progress: Progress, name: str, index: int, result: PackageResult, config: PruneConfig) -> None:
    progress.layers += result.layers
    progress.units += result.units
    if result.scales:
        earlier = progress.quantized.get(name)
        scales = {**(earlier.scales if earlier else {}), **result.scales}
        progress.quantized[name] = QuantizedComponent(config.quantization, scales)
    progress.done[name] = index + 1


def make_record(prepared: Prepared, source: PrunedFolder, progress: Progress, costs_before: dict, prompts_sha: str,
                seconds: float) -> PruningRecord:
    config, solver = prepared.config, prepared.solver
    summaries = {}
    for name, work in prepared.work.items():
        layers = [r for r in progress.layers if r.component == name]
        units = [u for u in progress.units if u.component == name]
        costs = (costs_before[name], prepared.cost(name)) if solver.reshapes else None
        summaries[name] = solver.summary(name, work.adapter, work.packages, work.skipped, layers, units, costs)
    # A source that was already shrunk keeps its shapes (for the components, or units, not shrunk again here).
    shapes = {}
    for name in {*(source.record.shapes if source.record else {}), *prepared.work}:
        merged = source.shapes(name).merged(ComponentShapes.from_units([u for u in progress.units if u.component == name]))
        if merged:
            shapes[name] = merged
    for name, rows in prepared.memory.get("components", {}).items():
        for index, row in enumerate(rows):
            measured = progress.package_s.get(f"{name}/{index}")
            if measured:
                row.update(measured_seconds=sum(measured.values()), measured_calibration_seconds=measured["calibration_s"],
                           measured_solve_seconds=measured["solve_s"])
    weights = timestep_weights(config.weighting, config.steps, config.alpha_min, config.alpha_max)
    calibration = CalibrationRecord(len(prepared.prompts), prompts_sha, weights if prepared.prompts else None)
    timings = {**progress.timings, "recording_s": prepared.recording_s, "total_s": seconds}
    return PruningRecord(config, str(source.path), __version__, calibration, summaries, progress.layers,
                         progress.units, shapes, prepared.memory, timings,
                         peak_rss() / 2**20, device_peak_mb=device_peak(prepared.device) / 2**20
                         if prepared.device.type == "cuda" else None, source_fingerprint=source.model_fingerprint)


def stacked_record(second: PruningRecord, source: PrunedFolder, config: PruneConfig,
                   first: PruningRecord) -> PruningRecord:
    """One record for a stacked prune: the original source and settings, the first stage's units and shrink summary,
    the second stage's layers and quantization; times summed per stage."""
    components = {}
    for name, summary in second.components.items():
        shrunk = first.components.get(name)
        components[name] = replace(summary, shrink=shrunk.shrink if shrunk else None,
                                   skipped=[*(shrunk.skipped if shrunk else []), *summary.skipped])
    timings = {f"shrink_{k}": v for k, v in first.timings.items()}
    timings.update({f"quantize_{k}": v for k, v in second.timings.items()})
    timings["total_s"] = first.timings.get("total_s", 0.0) + second.timings.get("total_s", 0.0)
    return replace(second, settings=config, source=str(source.path), source_fingerprint=source.model_fingerprint,
                   components=components, units=first.units,
                   timings=timings,
                   memory_plan=stacked_plan(first.memory_plan, second.memory_plan),
                   peak_rss_mb=max(first.peak_rss_mb, second.peak_rss_mb))


def stacked_plan(shrink: dict, quantize: dict) -> dict:
    """Both stages' plans, and the peak and time over both."""
    plan = {"stages": {"shrink": shrink, "quantize": quantize},
            "expected_peak_gib": max(shrink.get("expected_peak_gib", 0.0), quantize.get("expected_peak_gib", 0.0))}
    if "expected_seconds" in shrink or "expected_seconds" in quantize:
        plan["expected_seconds"] = shrink.get("expected_seconds", 0.0) + quantize.get("expected_seconds", 0.0)
    if "expected_peak_bytes" in quantize:
        plan["expected_peak_bytes"] = max(shrink.get("expected_peak_bytes", 0), quantize["expected_peak_bytes"])
    return plan


def publish(source: PrunedFolder, out_dir: Path, prepared: Prepared, record: PruningRecord,
            quantized: dict[str, QuantizedComponent]) -> None:
    """The pruned folder is built in a staging folder and renamed into place whole."""
    staging = staging_path(out_dir)
    names = prepared.config.components
    dropped = {"text_encoder_3", "tokenizer_3"} if prepared.config.drop_text_encoder_3 else set()
    try:
        copy_model_files(source.path, staging, skip=set(names) | {RECORD_FILE} | dropped)
        if dropped:  # shipped without T5, as diffusers saves text_encoder_3=None
            index = json.loads((staging / "model_index.json").read_text())
            index.update(dict.fromkeys(dropped, [None, None]))
            (staging / "model_index.json").unlink()  # a hard link to the source's: never written through
            (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        write_pruned_folder(staging, {n: prepared.pipe.components[n] for n in names}, record, quantized)
        fault_point("before-publish")
        replace_dir(staging, out_dir)
    except BaseException:
        discard_staging(out_dir)
        raise

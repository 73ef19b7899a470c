"""The ``obsdiff`` command line. Only this module sees argparse.

Every ``ObsdiffError`` becomes one line on stderr and a non-zero exit; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from obsdiff import __version__
from obsdiff.atomic import Terminated, raise_on_sigterm
from obsdiff.config import (
    DEFAULT_MIN_ROWS,
    DEFAULT_NUM_PROMPTS,
    DEFAULT_REFINE,
    DEFAULT_ROWS_PER_COLUMN,
    DEFAULT_STEPS,
)
from obsdiff.errors import ObsdiffError

log = logging.getLogger("obsdiff")


def _components_arg(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _pattern_arg(text: str) -> str:
    """``--pattern``: parsed to its canonical name here, once (``" 2:4"`` is ``2:4``; ``2:x`` is an error)."""
    from obsdiff.sparsity import PatternError, parse_kind

    try:
        return parse_kind(text)
    except PatternError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _float_arg(text: str) -> float:
    """A finite number (``nan`` and ``inf`` are refused here, not deep inside a solve)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _rows_arg(text: str) -> int | None:
    """``--rows-per-column``: a whole number, or ``all`` (every row, no budget)."""
    if text.strip() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1 or 'all', got {text!r}") from None


def cmd_info(args: argparse.Namespace) -> int:
    from obsdiff.adapters import ADAPTERS, find_targets, prunable_layers
    from obsdiff.model_io import pipeline_components
    from obsdiff.pruned_folder import load_pipeline

    pipe = load_pipeline(args.model)
    print(f"{args.model}: {type(pipe).__name__}")
    for name, module in pipeline_components(pipe).items():
        params = sum(p.numel() for p in module.parameters())
        layers = prunable_layers(module)
        adapter = ADAPTERS.get(type(module).__name__)
        targets = find_targets(module, adapter)[0] if adapter else []
        print(f"\n[{name}] {type(module).__name__}: {params:,} parameters, {len(layers)} Linear/Conv layers, "
              f"{len(targets)} prune targets ({adapter.family if adapter else 'no adapter'})")
        target_names = {t.name for t in targets}
        for lname, layer in layers:
            kind = type(layer).__name__
            shape = "×".join(str(s) for s in layer.weight.shape)
            mark = "*" if lname in target_names else " "
            print(f"  {mark} {lname:<60} {kind:<7} {shape}")
    print("\n* = target of the component's adapter")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from obsdiff.prune import PruneConfig, prune
    from obsdiff.quantize import parse_quantization
    from obsdiff.sparsity import parse_sparsity

    quantization = parse_quantization(args.quantize, args.group_size, args.quantize_method)
    spec = parse_sparsity(args.pattern, args.sparsity, head_sparsity=args.head_sparsity, ffn_sparsity=args.ffn_sparsity,
                          channel_sparsity=args.channel_sparsity, flops=args.flops, params=args.params,
                          allocation=args.allocation)
    config = PruneConfig(
        method=args.method, sparsity=spec, components=args.components,
        prompts_file=args.prompts, num_prompts=args.num_prompts, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, weighting=args.weighting, alpha_min=args.alpha_min,
        alpha_max=args.alpha_max, packages=args.packages, damp=args.damp, blocks=args.blocks, seed=args.seed,
        batch_size=args.batch_size, hessian_dtype=args.hessian_dtype, compensate=not args.no_compensate,
        max_memory_gib=args.max_memory, quantization=quantization, rows_per_column=args.rows_per_column,
        min_rows=args.min_rows, calibration=args.calibration, refresh_every=args.refresh_every, refine=args.refine,
        text_encoder_dtype=args.text_encoder_dtype, drop_text_encoder_3=args.drop_text_encoder_3,
    )
    from obsdiff.distributed import init_world, shutdown

    if args.json and not args.plan:
        from obsdiff.errors import UsageError

        raise UsageError("--json prints the plan: use it with --plan")
    if args.plan:
        from obsdiff.prune import plan_prune

        plan = plan_prune(args.model, config, device=args.device)
        print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
        return 0
    world = init_world(args.device)
    try:
        record = prune(args.model, args.out, config, resume=args.resume, overwrite=args.overwrite, world=world,
                       device=args.device, hessian_device=args.hessian_device)
    finally:
        shutdown(world)
    if not world.is_main:
        return 0
    for name, comp in record.components.items():
        if comp.shrink is not None:
            s = comp.shrink
            log.info("%s: %d/%d heads, %d/%d FFN neurons and %d/%d channel groups removed; parameters %d → %d, "
                     "FLOPs/forward %.3g → %.3g (%.1f%% kept)", name, s.heads_removed, s.heads_total,
                     s.ffn_neurons_removed, s.ffn_neurons_total, s.channel_groups_removed, s.channel_groups_total,
                     s.params_before, s.params_after, s.flops_before, s.flops_after,
                     100 * s.flops_after / max(s.flops_before, 1))
        if comp.mask is not None:  # a stacked prune has both: the shrink, then its layers quantized
            m = comp.mask
            log.info("%s: %d layers pruned, sparsity %.3f over %d weights, %d skipped", name, m.pruned_layers,
                     m.sparsity_of_pruned_layers, m.pruned_weights, len(comp.skipped))
    log.info("wrote %s in %.1f s", args.out, record.timings["total_s"])
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from obsdiff.recover import RecoverConfig, recover

    config = RecoverConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           trajectory_steps=args.trajectory_steps, num_prompts=args.num_prompts, guidance=args.guidance,
                           height=args.height, width=args.width, warmup=args.warmup, seed=args.seed,
                           max_memory_gib=args.max_memory,
                           gradient_checkpointing=True if args.gradient_checkpointing else None,
                           checkpoint_every=args.checkpoint_every)
    if args.plan:
        from obsdiff.recover import plan_recover

        plan = plan_recover(args.pruned, config, teacher_dir=args.teacher)
        if args.json:
            print(json.dumps(plan, indent=2))
        else:
            for key, value in plan.items():
                print(f"{key:28s} {value / 2**30:8.2f} GiB" if key.endswith("bytes") else f"{key:28s} {value}")
        return 0
    if args.out is None:
        from obsdiff.errors import UsageError

        raise UsageError("recover needs --out (or --plan)")
    record = recover(args.pruned, args.out, config, teacher_dir=args.teacher, resume=args.resume,
                     overwrite=args.overwrite)
    rec = record.recovery
    first, last = rec.loss_curve[0][1], rec.loss_curve[-1][1]
    log.info("%s: %d steps on %d teacher rows, loss %.4g → %.4g, %.2f s/step, peak %.2f GiB; wrote %s", rec.component,
             config.steps, rec.rows, first, last, rec.seconds_per_step, rec.peak_rss_mb / 1024, args.out)
    return 0


def _add_recover_parser(sub) -> None:
    from obsdiff.recover import RecoverConfig

    defaults = RecoverConfig()
    p = sub.add_parser("recover", help="distil a pruned denoiser from its dense teacher on the calibration prompts, "
                       "keeping every zero, N:M group and shrunk shape")
    p.add_argument("pruned", type=Path, help="a folder written by obsdiff prune (not quantized)")
    p.add_argument("--out", type=Path)
    p.add_argument("--teacher", type=Path, help="the dense folder (default: the source the prune record names)")
    p.add_argument("--steps", type=_int_arg, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument("--lr", type=_float_arg, default=defaults.lr, help=f"AdamW peak learning rate, cosine to zero "
                   f"after a warm-up (default {defaults.lr:g})")
    p.add_argument("--batch-size", type=_int_arg, default=defaults.batch_size,
                   help=f"denoiser rows per step (default {defaults.batch_size})")
    p.add_argument("--trajectory-steps", type=_int_arg, default=defaults.trajectory_steps,
                   help=f"denoising steps of each teacher trajectory (default {defaults.trajectory_steps})")
    p.add_argument("--num-prompts", type=_int_arg, default=defaults.num_prompts, help="trajectories the teacher "
                   f"generates, cycling through the calibration prompts with new noise (default {defaults.num_prompts})")
    p.add_argument("--guidance", type=_float_arg, help="default: the prune's")
    p.add_argument("--height", type=_int_arg, help="default: the prune's (else the model's)")
    p.add_argument("--width", type=_int_arg)
    p.add_argument("--warmup", type=_int_arg, default=defaults.warmup, help="learning-rate warm-up steps")
    p.add_argument("--seed", type=_int_arg, default=defaults.seed)
    p.add_argument("--max-memory", type=_float_arg, metavar="GIB",
                   help="the plan switches gradient checkpointing on, or refuses, to stay within this (default: "
                   "available memory)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="always (default: when the plan needs it)")
    p.add_argument("--checkpoint-every", type=_int_arg, default=defaults.checkpoint_every,
                   help="steps between resumable checkpoints")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recover into the same --out")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--plan", action="store_true", help="print the memory plan (expected peak, gradient checkpointing "
                   "or not) and write nothing")
    p.add_argument("--json", action="store_true", help="with --plan: as JSON (expected_peak_bytes)")
    p.set_defaults(func=cmd_recover)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else \
        f"{seconds:.0f} s"


def format_plan(plan: dict) -> str:
    """``prune --plan``: the budget, one line per package (memory and time), rows per column per width, the totals."""
    if "stages" in plan:  # a stacked prune: both stages, then the totals over both
        return "\n".join(["stage 1 of 2, shrink:", format_plan(plan["stages"]["shrink"]),
                          "stage 2 of 2, quantize (planned on the unshrunk model: an upper bound):",
                          format_plan(plan["stages"]["quantize"]),
                          f"both stages: expected peak RSS {plan['expected_peak_gib']:.2f} GiB"
                          + (f", expected wall time {_duration(plan['expected_seconds'])}"
                             if "expected_seconds" in plan else "")])
    lines = [f"memory budget {plan['budget_gib']:.2f} GiB ({plan['budget_from']}) for Hessians, solve workspace and "
             f"activations ({plan['activation_gib']:.2f} GiB); pipeline loaded and run once: {plan['base_rss_gib']:.2f} GiB RSS; "
             f"{plan['calibration_passes_per_package']} denoising steps of calibration per package at most; "
             f"{plan.get('seconds_per_image', 0):.2f} s per image through the denoiser (probed)"]
    if plan.get("released"):
        lines.append(f"held: {plan['pipeline_held_gib']:.2f} GiB of weights; prompts encoded once "
                     f"({plan['embeddings_gib'] * 1024:.1f} MiB), then released: {', '.join(plan['released'])} "
                     f"({plan['released_gib']:.2f} GiB); loading peaked at {plan['load_peak_gib']:.2f} GiB")
    if plan.get("calibration_parts", 1) > 1:
        lines.append(f"each denoiser call runs as {plan['calibration_parts']} slices of its batch (activations "
                     f"{plan['activation_gib']:.2f} GiB per slice; the Hessians are the same)")
    if plan.get("recording_seconds"):
        lines.append(f"recording the trajectory (every prompt, every step, once): {_duration(plan['recording_seconds'])}")
    for name, packages in plan["components"].items():
        for i, p in enumerate(packages):
            time_part = ""
            if "expected_seconds" in p:
                time_part = (f"; expected {_duration(p['expected_seconds'])} (calibration "
                             f"{_duration(p['expected_calibration_seconds'])}, updates "
                             f"{_duration(p['expected_update_seconds'])}, solves {_duration(p['expected_solve_seconds'])})")
            lines.append(f"{name} package {i + 1}: {p['layers']} layers ({p['first']} … {p['last']}), {p['hessians']} "
                         f"Hessians {p['hessian_gib']:.2f} GiB, largest solve {p['largest_layer']} "
                         f"{p['workspace_gib']:.2f} GiB, needs {p['need_gib']:.2f} GiB, expected peak "
                         f"{p['expected_peak_gib']:.2f} GiB{time_part}")
    widths = plan.get("rows_per_column_by_width")
    if widths:
        lines.append("rows per column, fewest per layer width: " +
                     ", ".join(f"{cols} cols {ratio:.1f}×" for cols, ratio in widths.items()))
    lines.append(f"expected peak RSS: {plan['expected_peak_gib']:.2f} GiB")
    if "expected_seconds" in plan:
        lines.append(f"expected wall time: {_duration(plan['expected_seconds'])} ({plan['expected_seconds']:.0f} s)")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from obsdiff.digits.evaluate import EvalSettings, evaluate_pipeline
    from obsdiff.digits.train import DEFAULT_JUDGE_DIR
    from obsdiff.pruned_folder import load_pipeline

    pipe = load_pipeline(args.model)
    if pipe.scheduler is not None and args.scheduler:
        pipe.scheduler = _scheduler(args.scheduler, pipe.scheduler.config)
    result = evaluate_pipeline(pipe, args.judge or DEFAULT_JUDGE_DIR,
                               EvalSettings(args.samples, args.steps, args.guidance, args.seed))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"conditional accuracy {result['conditional_accuracy']:.3f}  Fréchet distance "
              f"{result['frechet_distance']:.3f}  ({args.samples} samples, {args.steps} steps, "
              f"guidance {args.guidance}, seed {args.seed})")
    return 0


def _scheduler(name: str, config):
    import diffusers

    classes = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}
    return getattr(diffusers, classes[name]).from_config(config)


def _export_options(args: argparse.Namespace):
    """The export options as typed values: parsed here, once, and resolved against the profile by the export plan."""
    from obsdiff.exporters.apple import AppleOptions, parse_attention, parse_layout
    from obsdiff.exporters.export_plan import ExportOptions, ShapeOverrides
    from obsdiff.exporters.profiles import Precision, parse_activations

    apple = AppleOptions(layout=parse_layout(args.layout) if args.layout else None,
                         chunk_unet=True if args.chunk_unet else None,
                         attention=parse_attention(args.attention_implementation) if args.attention_implementation
                         else None)
    shapes = ShapeOverrides(height=args.height, width=args.width, batch=args.batch, gate_prompts=args.gate_prompts,
                            gate_steps=args.gate_steps)
    return ExportOptions(precision=Precision(args.precision) if args.precision else None,
                         activations=parse_activations(args.activations), shapes=shapes, apple=apple,
                         compress=getattr(args, "compress", None),
                         deployment_target=getattr(args, "deployment_target", None), force=args.force, zip=args.zip)


def cmd_export(args: argparse.Namespace) -> int:
    from obsdiff.exporters.bundle import export

    export(args.model, args.target, args.out, _export_options(args), overwrite=args.overwrite, dense_model=args.dense)
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from obsdiff.exporters.ship import ship

    ship(args.target, args.model, args.out, pattern=args.pattern, sparsity=args.sparsity, options=_export_options(args))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from obsdiff.exporters.bundle_check import validate_bundle_on_disk

    validate_bundle_on_disk(args.bundle)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from obsdiff.exporters.bench import bench

    return bench(args.bundle, args.runner_args)


def cmd_compare(args: argparse.Namespace) -> int:
    from obsdiff.exporters.bench import compare

    print(f"wrote {compare(args.results, args.out, args.baseline, args.labels)} and compare.png")
    return 0


def _add_activation_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--activations", metavar="float|int8",
                   help="ONNX targets, int8-quantized folders: int8 activations too (static ranges from the gate "
                        "prompts' denoiser inputs; ONNX Runtime runs QLinearConv/QLinearMatMul). Default: the target's")


def _add_apple_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", help="Core ML: apple (what Apple's Swift StableDiffusion pipeline loads; the ios/macos "
                   "default) or ours (the ONNX bundles' names and layouts)")
    p.add_argument("--chunk-unet", action="store_true",
                   help="Core ML, --layout apple: the UNet as UnetChunk1 + UnetChunk2 of about equal weight (ios does "
                        "it by default above 1 GB)")
    p.add_argument("--attention-implementation", metavar="original|split-einsum",
                   help="Core ML UNet attention: diffusers' own, or Apple's ANE-friendly split-einsum")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error."""

    def error(self, message: str):  # type: ignore[override]
        print(f"obsdiff: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _add_shape_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=_int_arg, help="export height (default: the profile's, else the model's native size)")
    p.add_argument("--width", type=_int_arg, help="export width (default: the profile's, else the model's native size)")
    p.add_argument("--batch", type=_int_arg, help="prompts per call the exported models take")
    p.add_argument("--gate-prompts", type=_int_arg, help="prompts of the end-to-end image gate (default 10)")
    p.add_argument("--gate-steps", type=_int_arg, help="denoising steps of the end-to-end image gate (default 25)")


def _add_device_options(p: argparse.ArgumentParser) -> None:
    """``prune``: where and in what precision the pipeline and the Hessians live, and what is loaded at all."""
    p.add_argument("--device", help="where the pipeline runs (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--hessian-device", help="where Hessians accumulate, e.g. cpu to keep them off the GPU "
                   "(default: with the activations)")
    p.add_argument("--hessian-dtype", default="float32", choices=["float32", "float64"],
                   help="float64 makes results independent of batching and of the number of processes")
    p.add_argument("--text-encoder-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="load the text encoders that are not pruned in this precision: they encode the prompts once "
                        "and are released, so this bounds the load's peak (default float32)")
    p.add_argument("--drop-text-encoder-3", action="store_true",
                   help="SD3: calibrate and ship without the T5 encoder (diffusers' text_encoder_3=None)")


def _add_prune_parser(sub) -> None:
    """``obsdiff prune`` and its options."""
    p = sub.add_parser("prune", help="prune a pipeline folder with OBS-Diff or a baseline")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", default="obs-diff", choices=["obs-diff", "wanda", "magnitude", "l1"])
    p.add_argument("--pattern", default="unstructured", type=_pattern_arg,
                   help="unstructured, N:M (2:4, 4:8) or structured")
    p.add_argument("--sparsity", type=_float_arg, help="fraction removed (default 0.5; N/M for N:M; 0.3 structured)")
    p.add_argument("--components", type=_components_arg, default=("denoiser",),
                   help="comma-separated: denoiser (the UNet or transformer; default), unet, transformer, text_encoder, "
                   "text_encoder_2, text_encoder_3, vae")
    p.add_argument("--prompts", type=Path, help="calibration prompts, one per line (default: the model's "
                   "calibration_prompts.txt, else calibration_data/general.txt)")
    p.add_argument("--num-prompts", type=_int_arg, default=DEFAULT_NUM_PROMPTS)
    p.add_argument("--steps", type=_int_arg, default=DEFAULT_STEPS, help="denoising steps of each calibration prompt "
                   f"(default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=_float_arg, default=7.0)
    p.add_argument("--height", type=_int_arg, help="calibration image height (a multiple of 8; default: the model's)")
    p.add_argument("--width", type=_int_arg)
    p.add_argument("--batch-size", type=_int_arg, default=16, help="prompts per calibration pipeline call")
    p.add_argument("--weighting", default="log-decrease",
                   choices=["log-decrease", "uniform", "linear-decrease", "linear-increase", "log-increase"])
    p.add_argument("--alpha-min", type=_float_arg, default=0.8)
    p.add_argument("--alpha-max", type=_float_arg, default=1.2)
    p.add_argument("--packages", type=_int_arg, default=4)
    p.add_argument("--damp", type=_float_arg, default=0.01)
    p.add_argument("--blocks", help="blocks to prune: glob patterns or indices/ranges, comma-separated")
    p.add_argument("--seed", type=_int_arg, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted prune into the same --out")
    p.add_argument("--rows-per-column", type=_rows_arg, default=DEFAULT_ROWS_PER_COLUMN, metavar="R|all",
                   help="each Hessian's row budget: about R × its columns rows in all, a seeded subset of each call's "
                        f"(default {DEFAULT_ROWS_PER_COLUMN}; all: every row)")
    p.add_argument("--min-rows", type=_int_arg, default=DEFAULT_MIN_ROWS, metavar="N",
                   help="the row budget's floor: each Hessian keeps at least N rows where its calls hold them "
                        f"(default {DEFAULT_MIN_ROWS}; cheap for narrow layers)")
    p.add_argument("--calibration", default="replay", choices=["replay", "full"],
                   help="replay (default): record the denoiser's calls once, then feed each package only the calls "
                        "its row budget needs, stopped after its last layer; full: rerun the whole pipeline per package")
    p.add_argument("--refresh-every", type=_int_arg, default=0, metavar="N",
                   help="replay: re-record the trajectory on the partly pruned model every N packages (0: never)")
    p.add_argument("--refine", type=_int_arg, metavar="N",
                   help="obs-diff masks without --quantize: re-solve each layer's kept weights jointly for the chosen "
                   f"zeros (N conjugate-gradient iterations on H; default {DEFAULT_REFINE}; 0: the sweep's own "
                   "compensation, as in the paper)")
    p.add_argument("--max-memory", type=_float_arg, metavar="GIB",
                   help="packages are split so that Hessians, solve workspace and activations fit (default: available "
                   "memory of the device)")
    p.add_argument("--plan", action="store_true", help="print the packages, their memory and the expected peak; "
                   "calibrate nothing, write nothing")
    p.add_argument("--json", action="store_true", help="with --plan: the plan as one JSON document on stdout (per "
                   "package and in total: expected_seconds, expected_peak_bytes)")
    p.add_argument("--overwrite", action="store_true")
    _add_device_options(p)
    p.add_argument("--head-sparsity", type=_float_arg, help="structured: fraction of heads removed")
    p.add_argument("--ffn-sparsity", type=_float_arg, help="structured: fraction of FFN neurons removed")
    p.add_argument("--channel-sparsity", type=_float_arg,
                   help="structured: fraction of each resnet's GroupNorm channel groups removed")
    p.add_argument("--flops", type=_float_arg,
                   help="structured: keep this fraction of the denoiser's per-step FLOPs (e.g. 0.7); units are chosen "
                        "by --allocation")
    p.add_argument("--params", type=_float_arg, help="structured: keep this fraction of the denoiser's parameters")
    p.add_argument("--allocation", choices=["global", "uniform"],
                   help="structured budget: rank every group of every unit by OBS error per FLOP saved (global, the "
                        "default), or one fraction for all units (uniform)")
    p.add_argument("--no-compensate", action="store_true", help="structured: remove without OBS update")
    p.add_argument("--quantize", metavar="int8|int4",
                   help="also quantize the weights (symmetric, per output channel; --pattern dense: quantize only)")
    p.add_argument("--group-size", type=_int_arg, help="--quantize: one scale per this many columns (e.g. 32 for int4)")
    p.add_argument("--quantize-method", metavar="gptq|rtn",
                   help="gptq (default): rounded inside the OBS sweep, each error compensated; rtn: round to nearest "
                        "after pruning (the baseline)")
    p.set_defaults(func=cmd_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="obsdiff", description="One-shot OBS-Diff pruning of diffusion "
                                     "pipelines and export to ONNX Runtime, TensorRT and Core ML.")
    parser.add_argument("--version", action="version", version=f"obsdiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="components, parameter counts and prunable layers of a pipeline folder")
    p.add_argument("model", type=Path)
    p.set_defaults(func=cmd_info)

    _add_prune_parser(sub)
    _add_recover_parser(sub)

    p = sub.add_parser("evaluate", help="conditional digit accuracy and Fréchet distance (default model family)")
    p.add_argument("model", type=Path)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=["ddim", "euler", "dpm++"])
    p.add_argument("--judge", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a (pruned) pipeline folder to a target bundle and validate it")
    p.add_argument("model", type=Path)
    p.add_argument("--target", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--precision", choices=["fp32", "fp16"], help="override the target's precision")
    p.add_argument("--dense", type=Path, help="the dense model the pruned one came from (for the report)")
    p.add_argument("--compress", choices=["palettize-4bit", "int8"], help="Core ML: compression on top of sparsity")
    p.add_argument("--deployment-target", help="Core ML: e.g. iOS17, macOS14 (default from the target profile)")
    p.add_argument("--zip", action="store_true", help="also write BUNDLE.zip")
    p.add_argument("--force", action="store_true", help="proceed despite a pattern the target cannot use")
    p.add_argument("--overwrite", action="store_true")
    _add_activation_option(p)
    _add_shape_options(p)
    _add_apple_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ship", help="prune with the target's defaults, export, validate (what `make export` runs)")
    p.add_argument("--target", required=True)
    p.add_argument("--model", type=Path, default=Path("models/digits-sd"))
    p.add_argument("--out", type=Path, required=True, help="writes OUT/model (pruned) and OUT/bundle")
    p.add_argument("--pattern", type=_pattern_arg,
                   help="override the target's pattern (unstructured, 2:4, 4:8, structured, dense)")
    p.add_argument("--sparsity", type=_float_arg)
    p.add_argument("--precision", choices=["fp32", "fp16"])
    p.add_argument("--force", action="store_true", help="proceed despite a pattern the target cannot use")
    p.add_argument("--zip", action="store_true")
    _add_activation_option(p)
    _add_shape_options(p)
    _add_apple_options(p)
    p.set_defaults(func=cmd_ship)

    p = sub.add_parser("validate", help="re-check a bundle on disk against its manifest and gates")
    p.add_argument("bundle", type=Path)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("bench", help="run a bundle's benchmark.py here (its flags follow the bundle: --runs, --seconds, "
                       "--mlperf, --warmup, --threads, --components, --json, --runtime)")
    p.add_argument("bundle", type=Path)
    p.add_argument("runner_args", nargs=argparse.REMAINDER, help="passed to benchmark.py")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="benchmark results side by side: compare.md and compare.png")
    p.add_argument("results", type=Path, nargs="+", help="JSON files written by benchmark.py --json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--baseline", help="a result's label or 1-based position: speedups against it (one model only)")
    p.add_argument("--labels", nargs="+", help="names for the results, in order (default: target @ host)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "coremltools", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # diffusers warns at import that optimum-onnx also registers as "optimum"; it is expected with these pins.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    raise_on_sigterm()
    try:
        return args.func(args)
    except Terminated:
        print("obsdiff: terminated; nothing was published", file=sys.stderr)
        return 143
    except ObsdiffError as exc:
        if args.debug:
            raise
        print(f"obsdiff: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("obsdiff: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: still one line unless --debug
        if args.debug:
            raise
        print(f"obsdiff: error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


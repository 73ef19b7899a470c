"""Structured pruning under a FLOP budget on the default model: quality against measured UNet speedup.

For each ``--flops`` budget (0.9, 0.8, 0.7, 0.6) five ways to spend it:
- obs-diff (global): every head, FFN neuron and channel group ranked by OBS error per FLOP, compensated;
- obs-diff (uniform): one fraction for every unit, OBS choice and compensation inside each unit;
- l1: one fraction, smallest L1 norm first, no compensation (the classic baseline);
- no-compensation: the global OBS allocation and choice, but the removed groups are only cut, not compensated;
- torch-pruning: Torch-Pruning's MagnitudePruner (L2 group importance, no fine-tuning), the library behind
  Diff-Pruning. It prunes the residual stream and the resnets' channels, GroupNorm groups kept whole in count; the
  attention blocks' insides stay whole (their head reshapes are not traced), and it stops at the first step at or
  under the budget, so its FLOPs ratio is what it reached. An optional dependency (``pip install torch-pruning``).
Every row prunes with the same 64 calibration prompts × 25 steps, is judged at 200 samples (the project's judge),
and has its UNet exported to ONNX and timed interleaved with the dense UNet on ONNX Runtime CPU (2 threads).

    python -m benchmarks.structured_budget [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.run import run_prune
from obsdiff.digits.evaluate import EvalSettings, evaluate_pipeline
from obsdiff.digits.train import DEFAULT_JUDGE_DIR, DEFAULT_MODEL_DIR
from obsdiff.pruned_folder import load_pipeline
from obsdiff.structured import count_params, forward_flops

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.9, 0.8, 0.7, 0.6)
METHODS = {
    "obs-diff (global)": ["--method", "obs-diff"],
    "obs-diff (uniform)": ["--method", "obs-diff", "--allocation", "uniform"],
    "l1": ["--method", "l1", "--allocation", "uniform"],
    "no-compensation": ["--method", "obs-diff", "--no-compensate"],
}
TIMED_RUNS = 300


def unet_call(pipe) -> tuple[dict, object]:
    """The UNet's sample inputs from the exporters' description (batch 2: classifier-free guidance)."""
    from obsdiff.exporters.components import pipeline_dims, specs_for
    from obsdiff.exporters.profiles import Shapes

    spec = next(s for s in specs_for(pipe) if s.source == "unet")
    dims = pipeline_dims(pipe, Shapes())
    return {"spec": spec, "dims": dims}, spec.sample_inputs(dims)


def export_unet(pipe, folder: Path) -> Path:
    from obsdiff.exporters.onnx import export_onnx

    info, _ = unet_call(pipe)
    return export_onnx(pipe, folder, (info["spec"],), info["dims"], exporter="torch")[info["spec"].name]


def speedup(dense_onnx: Path, pruned_onnx: Path, feeds: dict) -> dict:
    """Dense and pruned UNet graphs timed alternately on ONNX Runtime CPU."""
    from obsdiff.exporters.compare import interleaved_ms
    from obsdiff.exporters.onnx import ort_session

    sessions = {"dense": ort_session(dense_onnx), "pruned": ort_session(pruned_onnx)}
    timed = interleaved_ms({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, TIMED_RUNS)
    return {"median_ms": timed["median_ms"], "speedup": timed["median_ms"]["dense"] / timed["median_ms"]["pruned"]}


def unet_flops(pipe) -> int:
    _, inputs = unet_call(pipe)
    return forward_flops(lambda: pipe.unet(*inputs.values()))


def prune_cli(method_args: list[str], flops: float, out: Path, num_prompts: int) -> dict:
    record, seconds = run_prune(DEFAULT_MODEL_DIR, out, ["--pattern", "structured", "--flops", str(flops),
                                                         "--num-prompts", str(num_prompts), *method_args])
    return {"prune_s": seconds, "record": record}


def torch_pruning_unet(pipe, flops: float) -> dict:
    """Torch-Pruning's magnitude pruner, stepped until the UNet's FLOPs are at or under the budget."""
    import torch_pruning as tp

    unet = pipe.unet
    _, inputs = unet_call(pipe)
    kwargs = dict(zip(("sample", "timestep", "encoder_hidden_states"), inputs.values()))
    before = forward_flops(lambda: unet(**kwargs))
    ignored = [unet.conv_out, unet.time_embedding] + [
        m for n, m in unet.named_modules() if ".transformer_blocks." in n and isinstance(m, torch.nn.Linear)]
    groups = {m: m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)}
    steps = 100
    pruner = tp.pruner.MagnitudePruner(unet, example_inputs=kwargs, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.95, iterative_steps=steps, ignored_layers=ignored,
                                       output_transform=lambda out: out.sample, out_channel_groups=groups,
                                       in_channel_groups=groups)
    t0 = time.time()
    ratio = 1.0
    for _ in range(steps):
        pruner.step()
        for m in unet.modules():  # diffusers' samplers assert their channel count: keep it in step with the conv
            if hasattr(m, "channels") and isinstance(getattr(m, "conv", None), torch.nn.Conv2d):
                m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        ratio = forward_flops(lambda: unet(**kwargs)) / before
        if ratio <= flops:
            break
    return {"prune_s": time.time() - t0, "flops_ratio": ratio, "params": count_params(unet)}


def torch_pruning_version() -> str | None:
    """The installed distribution's version (the module's own ``__version__`` lags the wheel: 1.6.0 in 1.6.1)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="budgets 0.7 only, 100 samples, 32 prompts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    budgets, samples, num_prompts = ((0.7,), 100, 32) if args.quick else (BUDGETS, 200, 64)
    settings = EvalSettings(samples=samples)
    started = time.time()
    dense = load_pipeline(DEFAULT_MODEL_DIR)
    _, inputs = unet_call(dense)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    dense_scores = evaluate_pipeline(dense, DEFAULT_JUDGE_DIR, settings)
    tp_version = torch_pruning_version()
    rows = [{"method": "dense", "flops_target": 1.0, "flops_ratio": 1.0, "speedup": 1.0,
             "accuracy": dense_scores["conditional_accuracy"], "frechet_distance": dense_scores["frechet_distance"]}]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dense_onnx = export_unet(dense, tmp / "dense")
        for flops in budgets:
            for label, method_args in METHODS.items():
                out = tmp / f"{_slug(label)}-{flops}"
                pruned = prune_cli(method_args, flops, out, num_prompts)
                comp = pruned["record"]["components"]["unet"]
                pipe = load_pipeline(out)
                rows.append(_row(label, flops, pipe, settings, dense_onnx, feeds, tmp,
                                 flops_ratio=comp["flops_after"] / comp["flops_before"], prune_s=pruned["prune_s"],
                                 params_ratio=comp["params_after"] / comp["params_before"]))
            if tp_version:
                pipe = load_pipeline(DEFAULT_MODEL_DIR)
                params_before = count_params(pipe.unet)
                tp_result = torch_pruning_unet(pipe, flops)  # its dependency graph is traced with autograd
                rows.append(_row("torch-pruning", flops, pipe, settings, dense_onnx, feeds, tmp,
                                 flops_ratio=tp_result["flops_ratio"], prune_s=tp_result["prune_s"],
                                 params_ratio=tp_result["params"] / params_before))
    result = {"command": f"python -m benchmarks.structured_budget{' --quick' if args.quick else ''}",
              "samples": samples, "num_prompts": num_prompts, "timed_runs": TIMED_RUNS, "threads": 2,
              "torch_pruning": tp_version or "not installed (pip install torch-pruning==1.6.1)",
              "rows": rows, "minutes": (time.time() - started) / 60}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured_budget.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, args.out)
    plot(rows, args.out)
    print(f"[structured_budget] wrote {args.out} in {result['minutes']:.1f} min")
    return result


def _row(label: str, flops: float, pipe, settings: EvalSettings, dense_onnx: Path, feeds: dict, tmp: Path, **extra) -> dict:
    scores = evaluate_pipeline(pipe, DEFAULT_JUDGE_DIR, settings)
    timed = speedup(dense_onnx, export_unet(pipe, tmp / f"onnx-{_slug(label)}-{flops}"), feeds)
    row = {"method": label, "flops_target": flops, **extra, "speedup": timed["speedup"],
           "median_ms": timed["median_ms"], "accuracy": scores["conditional_accuracy"],
           "frechet_distance": scores["frechet_distance"]}
    print(f"[structured_budget] {label} --flops {flops}: FLOPs {extra['flops_ratio']:.3f}, speedup "
          f"{timed['speedup']:.3f}×, accuracy {row['accuracy']:.3f}, FD {row['frechet_distance']:.1f}", flush=True)
    return row


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label)


def write_markdown(result: dict, out: Path) -> None:
    lines = ["# Structured pruning under a FLOP budget (default model)", "",
             f"Command: `{result['command']}` ({result['minutes']:.1f} min, 2 threads). {result['samples']} judged "
             f"samples per row, {result['num_prompts']} calibration prompts × 25 steps, no fine-tuning. Speedup: dense "
             f"UNet median / pruned UNet median, ONNX Runtime CPU, {result['timed_runs']} interleaved runs each. "
             f"Torch-Pruning: {result['torch_pruning']}.", "",
             "| method | --flops | FLOPs kept | params kept | UNet speedup | accuracy | Fréchet dist. | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        params = f"{r['params_ratio']:.3f}" if r.get("params_ratio") is not None else "1.000"
        prune_s = f"{r['prune_s']:.0f}" if r.get("prune_s") is not None else "-"
        lines.append(f"| {r['method']} | {r['flops_target']:g} | {r['flops_ratio']:.3f} | {params} | "
                     f"{r['speedup']:.3f}× | {r['accuracy']:.3f} | {r['frechet_distance']:.1f} | {prune_s} |")
    lines += ["", "![accuracy and Fréchet distance against measured UNet speedup](structured_budget.png)"]
    (out / "structured_budget.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["speedup"], r["accuracy"], r["frechet_distance"]) for r in rows if r["method"] == method)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=method)
    dense = rows[0]
    axes[0].axhline(dense["accuracy"], color="gray", linestyle="--", label="dense")
    axes[1].axhline(dense["frechet_distance"], color="gray", linestyle="--", label="dense")
    axes[0].set_ylabel("conditional digit accuracy")
    axes[1].set_ylabel("Fréchet distance (lower is better)")
    for ax in axes:
        ax.set_xlabel("measured UNet speedup (ONNX Runtime CPU)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "structured_budget.png", dpi=120)


if __name__ == "__main__":
    main()

"""Where a prune's time goes: forwards, Hessian updates and solves, for one package at real size, this code against an
older checkout, back to back, and how far each part is from this machine's fp32 GEMM throughput.

    python -m benchmarks.scale build sd15 /tmp/sd15
    python -m benchmarks.calibration_split --model /tmp/sd15 --blocks 'up_blocks.1.*' --prompts 4 --steps 5 \\
        --old-repo /tmp/base/repo     # a checkout of the older commit with its own .venv

This code's split comes from its record (``timings``: calibration, of which Hessian updates, recording, solves). The
older code records calibration and solves only, so its forwards are timed by running the very same generation
without hooks, and its updates are the difference. Writes ``benchmarks/results/calibration_split.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.publish import publish

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}

FORWARDS_ONLY = """
import json, sys, time, torch
torch.set_num_threads(2)
from obsdiff.model_io import load_pipeline
from obsdiff.resources import default_prompts_file, read_prompt_lines
model, prompts, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = load_pipeline(model)
pipe.set_progress_bar_config(disable=True)
lines = read_prompt_lines(default_prompts_file(model))[:prompts]
t0 = time.time()
with torch.no_grad():
    pipe(lines, num_inference_steps=steps, guidance_scale=7.0,
         generator=[torch.Generator().manual_seed(i) for i in range(len(lines))], output_type="latent")
print(json.dumps({"forwards_s": time.time() - t0}))
"""


def _prune(python: str, cwd: Path, model: Path, out: Path, args: list[str]) -> tuple[dict, float]:
    t0 = time.time()
    proc = subprocess.run([python, "-m", "obsdiff", "-q", "prune", str(model), "--out", str(out), *args, "--refine", "0"], cwd=cwd,
                          capture_output=True, text=True, env=ENV)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads((out / "pruning.json").read_text()), time.time() - t0


def ours(model: Path, args: list[str], tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    record, wall = _prune(sys.executable, REPO, model, tmp / "new", args)
    t = record["timings"]
    forwards = t["calibration_s"] - t.get("update_s", 0.0) + t.get("recording_s", 0.0)
    rows = record["memory_plan"]["components"]["unet"]
    columns = [math.prod(r["shape"][1:]) for r in record["layers"]]
    return {"wall_s": wall, "forwards_s": forwards, "updates_s": t.get("update_s", 0.0), "solves_s": t["solve_s"],
            "update_flops": t.get("update_flops", 0.0), "solve_flops": float(sum(c**3 for c in columns)),
            "expected_s": sum(r.get("expected_seconds", 0) for r in rows) + record["memory_plan"].get("recording_seconds", 0),
            "measured_s": sum(r.get("measured_seconds", 0) for r in rows) + t.get("recording_s", 0.0),
            "layers": len(record["layers"]), "peak_rss_gib": record["peak_rss_mb"] / 1024}


def older(repo: Path, model: Path, args: list[str], prompts: int, steps: int, tmp: Path) -> dict:
    python = str(repo / ".venv" / "bin" / "python")
    record, wall = _prune(python, repo, model, tmp / "old", args)
    proc = subprocess.run([python, "-c", FORWARDS_ONLY, str(model), str(prompts), str(steps)], cwd=repo,
                          capture_output=True, text=True, env=ENV, check=True)
    forwards = json.loads(proc.stdout.strip().splitlines()[-1])["forwards_s"]
    packages = max(1, len(record["components"]["unet"]["packages"]))
    t = record["timings"]
    return {"wall_s": wall, "forwards_s": forwards * packages, "updates_s": t["calibration_s"] - forwards * packages,
            "solves_s": t["solve_s"], "layers": len(record["layers"]), "peak_rss_gib": record["peak_rss_mb"] / 1024,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                     text=True).stdout.strip()}


def gemm_rate() -> float:
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    return 2 * 4096**3 / ((time.perf_counter() - t0) / 3)


def markdown(result: dict) -> list[str]:
    lines = ["# Where a prune's time goes (one package at real size)", "", f"`{result['command']}`", "",
             f"This machine's fp32 GEMM: **{result['gemm_gflops']:.0f} GFLOP/s** (2 threads, 4096² × 4096²).", "",
             "| code | wall s | forwards s | Hessian updates s | solves s | layers | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for label, r in result["runs"].items():
        lines.append(f"| {label} | {r['wall_s']:.0f} | {r['forwards_s']:.0f} | {r['updates_s']:.0f} | {r['solves_s']:.0f} "
                     f"| {r['layers']} | {r['peak_rss_gib']:.2f} |")
    for label, r in result["runs"].items():
        if r.get("from"):
            lines += ["", f"{label}: read from an earlier run of this command with `--old-repo` (a checkout of "
                      f"{r.get('commit', 'the older commit')} with its own .venv), the same day on this machine."]
    gemm = result["gemm_gflops"] * 1e9
    for label, r in result["runs"].items():
        if r.get("update_flops"):
            lines += ["", f"{label}: updates ran at {r['update_flops'] / max(r['updates_s'], 1e-9) / 1e9:.0f} GFLOP/s "
                      f"equivalent ({r['update_flops'] / max(r['updates_s'], 1e-9) / gemm:.0%} of the GEMM), solves "
                      f"{r['solve_flops'] / max(r['solves_s'], 1e-9) / 1e9:.0f} GFLOP/s of c³ "
                      f"({r['solve_flops'] / max(r['solves_s'], 1e-9) / gemm:.0%})."]
    lines += ["", "## Each package measured against its plan (this code, same settings)", "",
              "| blocks | expected s | measured s | measured / expected |", "|---|---|---|---|"]
    for e in result["estimates"]:
        lines.append(f"| `{e['blocks']}` | {e['expected_s']:.0f} | {e['measured_s']:.0f} | "
                     f"{e['measured_s'] / e['expected_s']:.2f} |")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--blocks", default="up_blocks.1.*")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--old-repo", type=Path)
    parser.add_argument("--also", default="down_blocks.1.*,mid_block.*",
                        help="more single packages timed against their plan (this code only), comma-separated")
    parser.add_argument("--old-from", type=Path, help="instead of --old-repo: the older commit's row from an earlier "
                        "run's JSON (same model and settings; the older code does not change)")
    parser.add_argument("--name", default="calibration_split")
    args = parser.parse_args(argv)

    def common(blocks: str) -> list[str]:
        return ["--pattern", args.pattern, "--num-prompts", str(args.prompts), "--steps", str(args.steps),
                "--blocks", blocks, "--packages", "1", "--height", "512", "--width", "512"]

    runs, estimates = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        label = "older commit (every row, full rerun)"
        if args.old_repo:
            runs[label] = older(args.old_repo, args.model, common(args.blocks), args.prompts, args.steps, Path(tmp))
        elif args.old_from:
            runs[label] = {**json.loads(args.old_from.read_text())["runs"][label], "from": str(args.old_from)}
        for blocks in [args.blocks, *filter(None, args.also.split(","))]:
            run = ours(args.model, common(blocks), Path(tmp) / blocks.replace("*", "all"))
            estimates.append({"blocks": blocks, "expected_s": run["expected_s"], "measured_s": run["measured_s"]})
            if blocks == args.blocks:
                runs["this code (defaults: replay, 2 rows per column, floor 32,768)"] = run
    result = {"command": "python -m benchmarks.calibration_split " + " ".join(sys.argv[1:] if argv is None else argv),
              "gemm_gflops": gemm_rate() / 1e9, "runs": runs, "estimates": estimates}
    return publish(result, RESULTS, args.name, markdown)


if __name__ == "__main__":
    main()

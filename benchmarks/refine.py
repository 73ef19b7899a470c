"""``--refine`` on the default model: the same zeros, the kept weights re-solved by N conjugate-gradient iterations.

Each row is ``obsdiff prune models/digits-sd <pattern> --refine N`` (prune's other defaults unless the row says),
then ``obsdiff evaluate`` (200 samples): judge accuracy, Fréchet distance and the mean relative layer error.

    python -m benchmarks.refine [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.publish import publish

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits-sd"
PUBLISHED = ["--steps", "25", "--rows-per-column", "all", "--calibration", "full"]  # make bench's calibration
ROWS = [  # (pattern options, --refine, extra calibration options)
    (["--pattern", "2:4"], 0, []), (["--pattern", "2:4"], 5, []), (["--pattern", "2:4"], 20, []),
    (["--sparsity", "0.7"], 0, []), (["--sparsity", "0.7"], 20, []), (["--sparsity", "0.7"], 50, []),
    (["--sparsity", "0.7"], 20, PUBLISHED), (["--sparsity", "0.7"], 10, PUBLISHED),  # 10: the default
]


def row(pattern: list[str], refine: int, extra: list[str], tmp: Path, env: dict) -> dict:
    out = tmp / f"m{len(list(tmp.iterdir()))}"
    args = [*pattern, "--refine", str(refine), *extra]
    subprocess.run([sys.executable, "-m", "obsdiff", "-q", "prune", str(MODEL), "--out", str(out), *args], check=True,
                   env=env)
    record = json.loads((out / "pruning.json").read_text())
    errors = [r["relative_error"] for r in record["layers"]]
    scores = json.loads(subprocess.run([sys.executable, "-m", "obsdiff", "-q", "evaluate", str(out), "--samples", "200",
                                        "--json"], check=True, capture_output=True, text=True, env=env).stdout)
    result = {"options": args, "accuracy": scores["conditional_accuracy"], "frechet_distance": scores["frechet_distance"],
              "mean_relative_error": sum(errors) / len(errors), "solve_s": record["timings"].get("solve_s")}
    print(f"[refine] {' '.join(args)}: {result['accuracy']:.3f}", flush=True)
    return result


def markdown(result: dict) -> list[str]:
    lines = ["# `--refine` on the default model", "", f"Command: `{result['command']}` (torch threads "
             f"{result['threads']}). Judge: 200 samples, 25 steps, guidance 5, seed 0. Prune's defaults otherwise "
             "(64 prompts × 6 steps, replay, 2 rows per column) unless the options say.", "",
             *([f"*{result['note']}.*", ""] if result.get("note") else []),
             "| options | judge accuracy | Fréchet distance | mean relative layer error |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| `{' '.join(r['options'])}` | {r['accuracy']:.3f} | {r['frechet_distance']:.1f} | "
                     f"{r['mean_relative_error']:.4f} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row(p, n, extra, Path(tmp), env) for p, n, extra in ROWS]
    result = {"command": "python -m benchmarks.refine", "threads": args.threads, "rows": rows}
    return publish(result, args.out, "refine", markdown)


if __name__ == "__main__":
    main()

"""The default model's cpu bundles side by side, and `obsdiff bench` against the bundle's own `benchmark.py`.

    make export TARGET=cpu OUT=build/cmp/cpu-dense EXTRA="--pattern dense"
    make export TARGET=cpu OUT=build/cmp/cpu-structured
    make export TARGET=cpu-int8 OUT=build/cmp/cpu-int8-alone EXTRA="--pattern dense"
    make export TARGET=cpu-int8 OUT=build/cmp/cpu-int8-stacked
    python -m benchmarks.bundle_bench [--runs 50] [--extra result.json ...]

(1) Parity: the structured bundle through `python benchmark.py` and through `obsdiff bench`, back to back, twice in
alternating order; the ratio of their p50s per component and end to end. (2) `obsdiff compare` of the four bundles
(dense as the baseline), plus any results given with --extra (another device's run of the same bundles):
benchmarks/results/bundle_bench/compare.md and compare.png. Needs nothing beyond the project's venv; numbers depend
on the host (its CPU and thread count are in each result).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from obsdiff.exporters.bench import BenchResult, components_of

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {"dense": "build/cmp/cpu-dense", "structured": "build/cmp/cpu-structured",
           "int8": "build/cmp/cpu-int8-alone", "structured+int8": "build/cmp/cpu-int8-stacked"}
OUT = ROOT / "benchmarks" / "results" / "bundle_bench"


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bundle_bench: {' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")


def p50s(path: Path) -> dict[str, float]:
    result = BenchResult.read(path, None)
    return {name: result.stat(name, "p50_ms") for name in components_of([result])}


def parity(bundle: Path, runs: list[str], work: Path) -> list[str]:
    """Runner directly vs `obsdiff bench`, alternating A B B A: each side's mean of two p50s."""
    direct = [sys.executable, str(bundle / "benchmark.py"), "--bundle", str(bundle), *runs]
    hosted = [sys.executable, "-m", "obsdiff", "bench", str(bundle), *runs]
    files = {}
    for i, (side, cmd) in enumerate([("direct", direct), ("bench", hosted), ("bench", hosted), ("direct", direct)]):
        path = work / f"parity_{i}_{side}.json"
        run([*cmd, "--json", str(path)])
        files.setdefault(side, []).append(p50s(path))
    lines = ["| component | benchmark.py p50 ms | obsdiff bench p50 ms | ratio |", "|---|---:|---:|---:|"]
    for name in files["direct"][0]:
        a = sum(r[name] for r in files["direct"]) / 2
        b = sum(r[name] for r in files["bench"]) / 2
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="50")
    parser.add_argument("--extra", nargs="*", type=Path, default=[], help="more results for the comparison")
    args = parser.parse_args(argv)
    bundles = {label: ROOT / path for label, path in BUNDLES.items()}
    missing = [str(p) for p in bundles.values() if not (p / "bundle" / "manifest.json").is_file()]
    if missing:
        raise SystemExit(f"bundle_bench: build these first (see the module docstring): {', '.join(missing)}")
    OUT.mkdir(parents=True, exist_ok=True)
    runs = ["--runs", args.runs, "--warmup", "5", "--e2e-runs", "100"]
    lines = ["# The default model's cpu bundles", "", f"`python -m benchmarks.bundle_bench --runs {args.runs}`.", "",
             "## `obsdiff bench` vs the bundle's `benchmark.py` (structured bundle, back to back, A B B A)", ""]
    lines += parity(bundles["structured"] / "bundle", runs, OUT)
    results = []
    for label, path in bundles.items():
        result = OUT / f"{label}.json"
        run([sys.executable, "-m", "obsdiff", "bench", str(path / "bundle"), *runs, "--json", str(result)])
        results.append(result)
    labels = [*bundles, *(p.stem for p in args.extra)]
    run([sys.executable, "-m", "obsdiff", "compare", *map(str, results), *map(str, args.extra), "--out", str(OUT),
         "--baseline", "1", "--labels", *labels])
    lines += ["", "## The four bundles (dense is the baseline)", "", (OUT / "compare.md").read_text().split("\n", 2)[2]]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print((OUT / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

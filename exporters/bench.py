"""``obsdiff bench`` and ``obsdiff compare``: the bundle's own runner on this host, and results side by side.

``bench`` runs the bundle's ``benchmark.py`` (the file the device runs, not a copy of its logic) with this interpreter,
so host and device numbers come from one program. ``compare`` reads the JSON results it writes (checked against the
runner's schema), and writes ``compare.md`` and ``compare.png``: latency per component and end to end, bundle bytes,
the quality the manifests carry, and, with ``--baseline``, speedups, which only bundles of one model may have.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from obsdiff.errors import UsageError
from obsdiff.exporters.device.benchmark import SCHEMA, SCHEMA_ID, schema_errors

RUNNER = "benchmark.py"


def bench(bundle: Path, runner_args: list[str]) -> int:
    """Run ``bundle/benchmark.py`` here; its exit code and output are the command's."""
    bundle = Path(bundle)
    if not (bundle / "manifest.json").is_file():
        raise UsageError(f"{bundle}: no manifest.json (not an obsdiff bundle)")
    if not (bundle / RUNNER).is_file():
        raise UsageError(f"{bundle}: no {RUNNER} (exported by an obsdiff without the runner: export it again)")
    return subprocess.run([sys.executable, str(bundle / RUNNER), "--bundle", str(bundle), *runner_args]).returncode


@dataclass(frozen=True)
class BenchResult:
    """One result file, checked against the schema once, with the label it is shown under."""

    label: str
    data: dict

    @classmethod
    def read(cls, path: Path, label: str | None) -> BenchResult:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file") from None
        except ValueError as exc:
            raise UsageError(f"{path}: not JSON ({exc})") from None
        errors = schema_errors(data, SCHEMA)
        if errors:
            raise UsageError(f"{path}: does not follow {SCHEMA_ID} (benchmark.schema.json): {errors[0]}")
        return cls(label or f"{data['bundle']['target']} @ {data['device'].get('hostname') or data['device']['cpu']}",
                   data)

    def stat(self, component: str, key: str) -> float | None:
        """A statistic (``p50_ms``, ``p90_ms``) of a component or of ``"end to end"``; None where it was not run."""
        if component == "end to end":
            e2e = self.data["end_to_end"]
            return e2e["stats"][key] if e2e.get("ran") else None
        found = [c["stats"][key] for c in self.data["components"] if c["name"] == component]
        return found[0] if found else None


def read_results(paths: list[Path], labels: list[str] | None) -> list[BenchResult]:
    if labels and len(labels) != len(paths):
        raise UsageError(f"--labels gives {len(labels)} names for {len(paths)} results")
    results = [BenchResult.read(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    unique = []
    for r in results:  # the same bundle on the same host twice: number them
        seen[r.label] = seen.get(r.label, 0) + 1
        unique.append(r if seen[r.label] == 1 else BenchResult(f"{r.label} ({seen[r.label]})", r.data))
    return unique


def pick_baseline(results: list[BenchResult], baseline: str) -> BenchResult:
    """``--baseline``: a label, or a 1-based position; every result must come from the baseline's model."""
    chosen = next((r for r in results if r.label == baseline), None)
    if chosen is None and baseline.isdigit() and 1 <= int(baseline) <= len(results):
        chosen = results[int(baseline) - 1]
    if chosen is None:
        raise UsageError(f"--baseline {baseline!r} is neither a label nor a position 1..{len(results)}")
    model = chosen.data["bundle"]["model_fingerprint"]
    for r in results:
        other = r.data["bundle"]["model_fingerprint"]
        if model is None or other != model:
            raise UsageError(f"{r.label} and {chosen.label} are bundles of different models (fingerprints "
                             f"{str(other)[:12]} vs {str(model)[:12]}): speedups compare one model's bundles; "
                             "leave out --baseline to list them side by side")
    return chosen


def components_of(results: list[BenchResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [c["name"] for c in r.data["components"] if c["name"] not in names]
    return names + (["end to end"] if any(r.data["end_to_end"].get("ran") for r in results) else [])


def compare_markdown(results: list[BenchResult], baseline: BenchResult | None) -> str:
    names = components_of(results)
    lines = ["# obsdiff compare", "", "p50 latency in ms (p90 in brackets); percentiles "
             f"{results[0].data['settings']['percentile_method']}.", ""]
    head = ["result", "target", "device", "runtime", "precision", "pruning", "bundle MB", "export PSNR dB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        b, d, s = r.data["bundle"], r.data["device"], r.data["settings"]
        pruning = b.get("pruning") or "-"
        quality = (b.get("quality") or {}).get("export_psnr_db")
        lines.append(f"| {r.label} | {b['target']} | {d['cpu']} ({d['cores']} cores) | {d['runtime']} "
                     f"{d['runtime_version']} ({', '.join(s['providers_used'])}) | {b.get('precision')} | "
                     f"{pruning} | {b['bytes'] / 1e6:.2f} | "
                     f"{'-' if quality is None else f'{quality:.1f}'} |")
    lines += ["", "| component | " + " | ".join(r.label for r in results) + " |", "|---|" + "---:|" * len(results)]
    for name in names:
        cells = []
        for r in results:
            p50, p90 = r.stat(name, "p50_ms"), r.stat(name, "p90_ms")
            base = baseline.stat(name, "p50_ms") if baseline is not None else None
            cell = "-" if p50 is None else f"{p50:.2f} ({p90:.2f})"
            if base and p50:
                cell += f" **{base / p50:.2f}×**"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if baseline is not None:
        lines += ["", f"Speedups (bold) are the baseline's p50 over each result's: baseline **{baseline.label}**."]
    e2e = [(r.label, r.data["end_to_end"]) for r in results]
    lines += ["", "End to end: " + "; ".join(
        f"{label}: {e['steps']} steps, image {e['psnr_db_vs_reference']:.1f} dB vs the export's" if e.get("ran")
        else f"{label}: not run ({e.get('reason')})" for label, e in e2e) + "."]
    return "\n".join(lines) + "\n"


def compare_plot(results: list[BenchResult], baseline: BenchResult | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = components_of(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        p50 = [r.stat(name, "p50_ms") or 0.0 for r in results]
        p90 = [r.stat(name, "p90_ms") or 0.0 for r in results]
        x = np.arange(len(results))
        ax.bar(x, p50, color=[f"C{i}" for i in range(len(results))])
        ax.errorbar(x, p50, yerr=[np.zeros(len(x)), np.subtract(p90, p50)], fmt="none", ecolor="black", capsize=3)
        ticks = [str(i + 1) for i in x]
        base = baseline.stat(name, "p50_ms") if baseline is not None else None
        if base:  # the speedup under each bar's number
            ticks = [f"{t}\n{base / v:.2f}×" if v else t for t, v in zip(ticks, p50)]
        ax.set_title(name)
        ax.set_xticks(x, ticks, fontsize=7 if len(results) > 4 else 9)
        ax.set_ylabel("p50 ms (bar), p90 (whisker)")
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(results))],
               [f"{i + 1}: {r.label}" for i, r in enumerate(results)], loc="lower center", ncol=min(3, len(results)),
               fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(paths: list[Path], out: Path, baseline: str | None = None, labels: list[str] | None = None) -> Path:
    """Write ``out/compare.md`` and ``out/compare.png``; every input is checked before anything is written."""
    results = read_results(paths, labels)
    base = pick_baseline(results, baseline) if baseline is not None else None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".compare.md.partial"
    partial.write_text(compare_markdown(results, base))
    plot = out / ".compare.partial.png"
    compare_plot(results, base, plot)
    partial.replace(out / "compare.md")
    plot.replace(out / "compare.png")
    return out / "compare.md"

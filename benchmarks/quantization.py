"""Weight quantization in the OBS pass on the default model: GPTQ against round-to-nearest, alone and on sparsity.

Rows: dense; W8, W4 with groups of 32 columns and W4 per output channel, each by GPTQ and by RTN; 2:4 without and
with W8 (GPTQ, in the same sweep); structured ``--flops 0.7`` without and with W8 (a second prune,
``--pattern dense --quantize int8``, on the shrunk folder). Same 64 calibration prompts × 25 steps, the project's
judge at 200 samples, no fine-tuning. The weights stay float holding the dequantized values, so each row runs in
diffusers as it is.

    python -m benchmarks.quantization [--quick] [--out benchmarks/results]
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

RESULTS = Path(__file__).resolve().parent / "results"
W8, W4 = ["--quantize", "int8"], ["--quantize", "int4", "--group-size", "32"]
RUNS: list[tuple[str, str | None, list[str]]] = [  # label, source row (None: the dense model), prune arguments
    ("W8 gptq", None, ["--pattern", "dense", *W8]),
    ("W8 rtn", None, ["--pattern", "dense", *W8, "--quantize-method", "rtn"]),
    ("W4 g32 gptq", None, ["--pattern", "dense", *W4]),
    ("W4 g32 rtn", None, ["--pattern", "dense", *W4, "--quantize-method", "rtn"]),
    ("W4 per channel gptq", None, ["--pattern", "dense", "--quantize", "int4"]),
    ("W4 per channel rtn", None, ["--pattern", "dense", "--quantize", "int4", "--quantize-method", "rtn"]),
    ("2:4", None, ["--pattern", "2:4"]),
    ("2:4 + W8 gptq", None, ["--pattern", "2:4", *W8]),
    ("structured --flops 0.7", None, ["--pattern", "structured", "--flops", "0.7"]),
    ("structured --flops 0.7 + W8 gptq", "structured --flops 0.7", ["--pattern", "dense", *W8]),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 samples, 16 prompts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    samples, num_prompts = (100, 16) if args.quick else (200, 64)
    settings = EvalSettings(samples=samples)
    started = time.time()
    dense = evaluate_pipeline(load_pipeline(DEFAULT_MODEL_DIR), DEFAULT_JUDGE_DIR, settings)
    rows = [{"label": "dense", "accuracy": dense["conditional_accuracy"], "frechet_distance": dense["frechet_distance"]}]
    with tempfile.TemporaryDirectory() as tmp_name:
        folders: dict[str, Path] = {}
        for i, (label, source, prune_args) in enumerate(RUNS):
            out = Path(tmp_name) / f"run{i}"
            record, seconds = run_prune(folders[source] if source else DEFAULT_MODEL_DIR, out,
                                        ["--num-prompts", str(num_prompts), *prune_args])
            folders[label] = out
            errors = [r["relative_error"] for r in record["layers"] if r.get("relative_error") is not None]
            scores = evaluate_pipeline(load_pipeline(out), DEFAULT_JUDGE_DIR, settings)
            row = {"label": label, "args": prune_args, "accuracy": scores["conditional_accuracy"],
                   "frechet_distance": scores["frechet_distance"], "prune_s": seconds,
                   "mean_layer_relative_error": sum(errors) / len(errors) if errors else None}
            rows.append(row)
            print(f"[quantization] {label}: accuracy {row['accuracy']:.3f}, FD {row['frechet_distance']:.1f}", flush=True)
    result = {"command": f"python -m benchmarks.quantization{' --quick' if args.quick else ''}", "samples": samples,
              "num_prompts": num_prompts, "rows": rows, "minutes": (time.time() - started) / 60}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(result, indent=2))
    lines = ["# Weight quantization in the OBS pass (default model)", "",
             f"Command: `{result['command']}` ({result['minutes']:.1f} min, 2 threads). {samples} judged samples per "
             f"row, {num_prompts} calibration prompts × 25 steps, no fine-tuning. Weights are symmetric int8 per output "
             "channel (W8) or int4 per 32 columns (W4 g32), stored as their dequantized float values with the scales "
             "beside them.", "", "| run | accuracy | Fréchet dist. | mean layer rel. error | prune s |",
             "|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['mean_layer_relative_error']:.4f}" if r.get("mean_layer_relative_error") is not None else "-"
        prune_s = f"{r['prune_s']:.0f}" if r.get("prune_s") is not None else "-"
        lines.append(f"| {r['label']} | {r['accuracy']:.3f} | {r['frechet_distance']:.1f} | {err} | {prune_s} |")
    (args.out / "quantization.md").write_text("\n".join(lines) + "\n")
    print(f"[quantization] wrote {args.out} in {result['minutes']:.1f} min")
    return result


if __name__ == "__main__":
    main()

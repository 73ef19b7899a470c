"""Per-layer reconstruction error of obs-diff, Wanda and magnitude on the same Hessians (dense UNet inputs).

    python -m benchmarks.layer_errors [--prompts 32]

Every UNet target layer of the default model is calibrated once (log-decrease weights, 25 steps) and pruned by
each method at 50% unstructured and 2:4 from the same H; prints how often Wanda ≤ magnitude and the median
obs-diff / Wanda error ratio, and writes benchmarks/results/layer_errors.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from obsdiff.adapters import adapter_for, find_targets
from obsdiff.calibration import CalibrationSettings, PackageHooks, run_pipeline
from obsdiff.digits.data import prompt_for
from obsdiff.digits.train import DEFAULT_MODEL_DIR
from obsdiff.hessian import StepContext, timestep_weights
from obsdiff.layers import column_permutation, permute_hessian, weight_matrix
from obsdiff.pruned_folder import load_pipeline
from obsdiff.solver import magnitude_prune, obs_prune, wanda_prune
from obsdiff.sparsity import parse_sparsity


def calibrate_dense_unet(num_prompts: int) -> tuple:
    """The default pipeline, its UNet target layers, and their Hessians from one dense calibration
    (log-decrease weights, 25 steps, digit prompts): what the per-layer benchmarks compare methods on."""
    pipe = load_pipeline(DEFAULT_MODEL_DIR)
    targets, _ = find_targets(pipe.unet, adapter_for(pipe.unet))
    ctx = StepContext(timestep_weights("log-decrease", 25))
    hooks = PackageHooks({t.name: t.module for t in targets}, ctx, weighted=True)
    with hooks, torch.no_grad():
        run_pipeline(pipe, CalibrationSettings([prompt_for(i % 10) for i in range(num_prompts)], batch_size=16), ctx,
                     decode=False)
    return pipe, targets, hooks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    _, targets, hooks = calibrate_dense_unet(args.prompts)
    result = {}
    for pattern in ("unstructured", "2:4"):
        pat = parse_sparsity(pattern)
        rows = []
        for t in targets:
            h = permute_hessian(hooks.hessian(t.name).hessian, column_permutation(t.module))
            w = weight_matrix(t.module)
            rows.append({"layer": t.name, "obs-diff": obs_prune(w, h, pat).relative_error,
                         "wanda": wanda_prune(w, h, pat).relative_error,
                         "magnitude": magnitude_prune(w, pat, h).relative_error})
        summary = {"layers": len(rows), "wanda_le_magnitude": sum(r["wanda"] <= r["magnitude"] for r in rows),
                   "median_obs_over_wanda": statistics.median(r["obs-diff"] / r["wanda"] for r in rows),
                   "obs_le_half_wanda": sum(r["obs-diff"] <= 0.5 * r["wanda"] for r in rows)}
        result[pattern] = {"summary": summary, "layers": rows}
        print(f"{pattern}: wanda ≤ magnitude in {summary['wanda_le_magnitude']}/{summary['layers']} layers; "
              f"median obs-diff/wanda error {summary['median_obs_over_wanda']:.3f}; obs-diff ≤ 0.5× wanda in "
              f"{summary['obs_le_half_wanda']}/{summary['layers']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_errors.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

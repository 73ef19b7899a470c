"""Bytes each rank exchanges per module package in a distributed prune (torch.distributed all-reduce + broadcast).

    python -m benchmarks.comm_volume [MODEL_DIR] [--packages 4] [--hessian-dtype float32]

Per package: one all-reduce of every distinct Hessian (cols², shared q/k/v inputs counted once, found by
running one real calibration step) and one broadcast of every pruned weight from the rank that solved it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from obsdiff.adapters import adapter_for, find_targets
from obsdiff.calibration import CalibrationSettings, PackageHooks, run_pipeline
from obsdiff.hessian import StepContext
from obsdiff.prune import split_packages
from obsdiff.pruned_folder import load_pipeline


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=Path("models/digits-sd"))
    parser.add_argument("--component", default="unet")
    parser.add_argument("--packages", type=int, default=4)
    parser.add_argument("--hessian-dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    module = getattr(pipe, args.component)
    targets, _ = find_targets(module, adapter_for(module))
    hooks = PackageHooks({t.name: t.module for t in targets}, StepContext(), weighted=False)
    with hooks, torch.no_grad():
        run_pipeline(pipe, CalibrationSettings(["a handwritten digit five"], steps=1, batch_size=1), StepContext(), decode=False)
    h_bytes = 4 if args.hessian_dtype == "float32" else 8
    rows = []
    for p, package in enumerate(split_packages(targets, args.packages)):
        owners = {hooks.owner[t.name] for t in package}
        hessian = sum(hooks.accumulators[o].hessian.shape[0] ** 2 * h_bytes + 8 for o in owners)
        weights = sum(t.module.weight.numel() * t.module.weight.element_size() for t in package)
        rows.append({"package": p + 1, "layers": len(package), "hessians": len(owners), "allreduce_bytes": hessian,
                     "broadcast_bytes": weights})
        print(f"package {p + 1}: {len(package)} layers, {len(owners)} Hessians: all-reduce {hessian / 2**20:.2f} MiB, "
              f"broadcast {weights / 2**20:.2f} MiB")
    return rows


if __name__ == "__main__":
    main()

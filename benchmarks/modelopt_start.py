"""NVIDIA ModelOpt's ``sparsegpt`` 2:4 as a start for ``obsdiff recover`` (the peer row of ``benchmarks.recover_quality``).

ModelOpt (``pip install -e .[bench]``) runs as its documentation shows: ``mts.sparsify(unet, "sparsegpt",
config={"forward_loop": ...})`` then ``mts.export``, with its own defaults (damping 0.1, 128-column blocks, every
Linear and Conv2d calibrated at once). The forward loop is obsdiff's calibration at ``obsdiff prune``'s defaults (the
same prompts, steps, guidance and seeds), so the two starts see the same data. What ModelOpt cannot give is a pruned
folder, so the layer list comes from ``obsdiff prune --method magnitude --pattern 2:4`` on the same model (the same
target layers), and every one of those layers' weights is replaced by ModelOpt's; ``modelopt_start.json`` beside
``pruning.json`` says so, and counts the 3×3 convs whose 2:4 groups ModelOpt put across kernel taps (it flattens a conv
to C·R·S) rather than along the input channels that TensorRT reads.

    python -m benchmarks.modelopt_start OUT [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "digits-sd"


def _on_tensorrt_axis(weight: torch.Tensor) -> bool:
    """Every group of 4 along K (Linear) or along C at each kernel tap (Conv) holds at most 2 non-zeros."""
    w = weight.detach()
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return w.shape[-1] % 4 == 0 and bool(((w.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def modelopt_start(out: Path, threads: int = 2) -> dict:
    """Write a pruned folder at ``out`` whose denoiser is ModelOpt's sparsegpt 2:4 prune of the default model."""
    import modelopt.torch.sparsity as mts
    from safetensors.torch import load_file, save_file

    from obsdiff.calibration import CalibrationSettings, run_pipeline
    from obsdiff.config import PruneConfig
    from obsdiff.hessian import StepContext
    from obsdiff.prune import read_prompts
    from obsdiff.pruned_folder import PrunedFolder, load_pipeline

    torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "obsdiff", "-q", "prune", str(DEFAULT_MODEL), "--out", str(staging),
                    "--method", "magnitude", "--pattern", "2:4"], check=True, env=env)
    layers = [layer.layer for layer in PrunedFolder.open(staging).layers("unet")]

    defaults = PruneConfig()
    pipe = load_pipeline(DEFAULT_MODEL)
    settings = CalibrationSettings(prompts=read_prompts(defaults, DEFAULT_MODEL), steps=defaults.steps,
                                   guidance=defaults.guidance, seed=defaults.seed, batch_size=defaults.batch_size)
    started = time.time()
    unet = mts.sparsify(pipe.unet, "sparsegpt", config={
        "forward_loop": lambda _model: run_pipeline(pipe, settings, StepContext(), decode=False, desc="modelopt")})
    unet = mts.export(unet)
    sparsify_s = time.time() - started

    weights_file = staging / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights_file)
    modules = dict(unet.named_modules())
    on_tensorrt_axis, across_taps = 0, []
    for name in layers:
        weight = modules[name].weight.detach().contiguous()
        state[f"{name}.weight"] = weight.to(state[f"{name}.weight"].dtype)
        if _on_tensorrt_axis(weight):
            on_tensorrt_axis += 1
        elif weight.dim() == 4:
            across_taps.append(name)
    save_file(state, weights_file, metadata={"format": "pt"})
    density = sum(int((state[f"{n}.weight"] != 0).sum()) for n in layers) / sum(state[f"{n}.weight"].numel()
                                                                                   for n in layers)
    summary = {"tool": "nvidia-modelopt", "version": _version("nvidia-modelopt"), "mode": "sparsegpt",
               "pattern": "2:4 sparsity", "config": "ModelOpt's defaults (hessian_damp 0.1, col_block_size 128)",
               "calibration": {"prompts": len(settings.prompts), "steps": settings.steps,
                               "guidance": settings.guidance, "seed": settings.seed},
               "layers": len(layers), "layers_2to4_on_tensorrt_axis": on_tensorrt_axis,
               "convs_grouped_across_kernel_taps": across_taps, "density": density, "sparsify_s": sparsify_s,
               "pruning_json": "layer list from `obsdiff prune --method magnitude --pattern 2:4` (the same target "
                               "layers); their weights are ModelOpt's"}
    (staging / "modelopt_start.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return summary


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    summary = modelopt_start(args.out, args.threads)
    print(json.dumps({k: v for k, v in summary.items() if k != "convs_grouped_across_kernel_taps"}, indent=1))
    print(f"{len(summary['convs_grouped_across_kernel_taps'])} convs grouped across kernel taps", flush=True)
    return summary


if __name__ == "__main__":
    main()

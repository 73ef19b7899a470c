"""Half-precision text encoders on the default model: what they change in the embeddings, in the Hessians and in the
pruned model's quality (issue 30).

The prune encodes the prompts once and lets the text encoders go (``obsdiff.lean``); ``--text-encoder-dtype`` loads
them in bf16 or fp16 to bound the load's peak. This measures, for each dtype against fp32:
- the embeddings' relative error (Frobenius norm, every calibration batch);
- the Hessians' relative difference, on every UNet layer the default 2:4 prune targets, calibrated on the same
  trajectory recipe (``prune``'s defaults: prompts, steps, row budget) on the dense model;
- the project judge (conditional accuracy, 200 samples) of ``obsdiff prune --pattern 2:4`` with that dtype, with its
  standard error.

    python -m benchmarks.lean_pipeline [--dtypes bfloat16,float16] [--samples 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.publish import publish
from benchmarks.recover_quality import DEFAULT_MODEL, REPO, _judge


def _embeddings(dtype: str):
    from obsdiff.config import EncoderDtype, PruneConfig
    from obsdiff.lean import lean_for_calibration
    from obsdiff.prune import load_for_calibration, read_prompts
    from obsdiff.pruned_folder import PrunedFolder

    config = PruneConfig(text_encoder_dtype=EncoderDtype(dtype))
    prompts = read_prompts(config, DEFAULT_MODEL)
    batches = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    pipe = load_for_calibration(PrunedFolder.open(DEFAULT_MODEL), config)
    return lean_for_calibration(pipe, ("unet",), batches, config.guidance), batches, config


def _hessians(dtype: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Every 2:4 target layer's Hessian on the dense model, calibrated with the text encoders in ``dtype``."""
    from obsdiff.adapters import adapter_for
    from obsdiff.calibration import CalibrationSettings, PackageHooks, record_trajectory, replay
    from obsdiff.config import PruneConfig
    from obsdiff.hessian import StepContext, timestep_weights
    from obsdiff.mask import MaskSolver
    from obsdiff.pruned_folder import load_pipeline
    from obsdiff.sparsity import NM

    lean, batches, config = _embeddings(dtype)
    pipe = load_pipeline(DEFAULT_MODEL)
    unet = pipe.unet
    solver = MaskSolver(PruneConfig(sparsity=NM(2, 4)), NM(2, 4))
    packages, _ = solver.packages("unet", unet, adapter_for(unet))
    layers = {n: m for package in packages for n, m in solver.hooked_layers(package).items()}
    ctx = StepContext(timestep_weights(config.weighting, config.steps, config.alpha_min, config.alpha_max))
    settings = CalibrationSettings([p for b in batches for p in b], config.steps, config.guidance,
                                   batch_size=config.batch_size)
    calls = record_trajectory(pipe, unet, settings, ctx, prompt_inputs=lean.embeddings.call_kwargs)
    hooks = PackageHooks(layers, ctx, weighted=True, stop_when_done=True)
    with hooks:
        replay(unet, calls, ctx, hooks)
    return {n: hooks.hessian(n).hessian.clone() for n in layers if hooks.owner.get(n) == n}, lean.embeddings.by_batch


def _prune_and_judge(dtype: str, samples: int, tmp: Path, env: dict) -> dict:
    out = tmp / f"pruned_{dtype}"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "obsdiff", "-q", "prune", str(DEFAULT_MODEL), "--out", str(out), "--pattern",
                    "2:4", "--text-encoder-dtype", dtype], check=True, env=env)
    judged = _judge(out, samples, env)
    p = judged["accuracy"]
    return {**judged, "standard_error": math.sqrt(p * (1 - p) / samples), "prune_s": time.time() - t0}


def markdown(result: dict) -> list[str]:
    lines = ["# Half-precision text encoders (`prune --text-encoder-dtype`) on the default model", "",
             f"Command: `{result['command']}`. torch threads: {result['threads']}. The prune encodes each calibration "
             "batch once and releases the text encoders and the VAE; this is what the encoders' precision changes. "
             "Embeddings: relative Frobenius error over every batch's prompt and negative embeddings. Hessians: every "
             f"2:4 target layer of the UNet ({result['layers']} Hessians), calibrated at `prune`'s defaults on the "
             "dense model, relative Frobenius difference to fp32. Judge: `obsdiff prune --pattern 2:4` with that "
             f"dtype, {result['samples']} samples, ± one binomial standard error.", "",
             "| text encoders | embeddings rel. error | Hessians rel. diff (median / max) | 2:4 judge | FD |",
             "|---|---|---|---|---|"]
    for row in result["rows"]:
        emb = f"{row['embedding_error']:.2e}" if row.get("embedding_error") is not None else "0 (reference)"
        hess = (f"{row['hessian_median']:.2e} / {row['hessian_max']:.2e}" if row.get("hessian_max") is not None
                else "0 (reference)")
        lines.append(f"| {row['dtype']} | {emb} | {hess} | {row['accuracy']:.3f} ± {row['standard_error']:.3f} | "
                     f"{row['frechet_distance']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    reference, reference_embeddings = _hessians("float32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append({"dtype": "float32", **_prune_and_judge("float32", args.samples, Path(tmp), env)})
        for dtype in args.dtypes.split(","):
            hessians, embeddings = _hessians(dtype)
            emb = [float((embeddings[k][n] - v).norm() / v.norm()) for k, kw in reference_embeddings.items()
                   for n, v in kw.items()]
            diffs = sorted(float((hessians[n] - h).norm() / h.norm()) for n, h in reference.items())
            rows.append({"dtype": dtype, "embedding_error": max(emb), "hessian_median": diffs[len(diffs) // 2],
                         "hessian_max": diffs[-1], **_prune_and_judge(dtype, args.samples, Path(tmp), env)})
            print(f"[lean] {dtype}: embeddings {max(emb):.2e}, Hessians {diffs[len(diffs) // 2]:.2e} / "
                  f"{diffs[-1]:.2e}, judge {rows[-1]['accuracy']:.3f}", flush=True)
    given = " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": f"python -m benchmarks.lean_pipeline {given}".strip(),
              "threads": args.threads, "samples": args.samples, "layers": len(reference), "rows": rows}
    publish(result, args.out, "lean_pipeline", markdown)
    return result


if __name__ == "__main__":
    main()

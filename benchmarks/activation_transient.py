"""What one real denoiser call holds beyond the live tensors the plan measures on ``meta`` (kernel scratch, allocator
slack): the factor the memory plan adds to calibration activations (``plan.ACTIVATION_TRANSIENT``).

For each model: the pipeline loaded as a prune holds it (prompts encoded, text encoders and VAE released), one
calibration call captured at the size given, its activations measured on ``meta``; then, with the heap trimmed and
the process's peak RSS reset (``/proc/self/clear_refs``), the call run for real. The transient is the peak over the
resident size before the call.

    python -m benchmarks.activation_transient /tmp/sd15:512 /tmp/sdxl:1024 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.publish import publish

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def measure(model: Path, size: int) -> dict:
    """In this process: the meta estimate and the real transient of one guidance-pair call at ``size`` px."""
    import torch

    from obsdiff.calibration import capture_call
    from obsdiff.lean import lean_for_calibration, trim_heap
    from obsdiff.plan import activation_bytes, current_rss, peak_rss
    from obsdiff.pruned_folder import load_pipeline

    pipe = load_pipeline(model)
    prompt = "a photograph of a red bicycle"
    lean = lean_for_calibration(pipe, ("unet",), [[prompt]], 7.0)
    call = capture_call(pipe, "unet", prompt, 7.0, size, size, lean.embeddings.call_kwargs)
    meta, _ = activation_bytes(call.module, call.args, call.kwargs)
    with torch.no_grad():
        call()  # once, so weights and kernels are resident, as in a prune's replay
        trim_heap()
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from here
        base = current_rss()
        call()
    peak = peak_rss()
    return {"model": str(model), "size": size, "batch": call.batch, "meta_gib": meta / GIB,
            "transient_gib": (peak - base) / GIB, "ratio": (peak - base) / meta}


def markdown(result: dict) -> list[str]:
    lines = ["# A real denoiser call against the plan's `meta` activations", "",
             f"Command: `{result['command']}` (torch threads {result['threads']}). One classifier-free-guidance call "
             "(2 images) per model, run after a first call, with the heap trimmed and the peak RSS reset. Transient: "
             "the call's peak RSS over the resident size before it.", "",
             "| model | px | meta activations GiB | real transient GiB | ratio |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['size']} | {r['meta_gib']:.3f} | {r['transient_gib']:.3f} | "
                     f"{r['ratio']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="MODEL:PX")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # MODEL:PX measured in this process (a child)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        model, size = args.one.rsplit(":", 1)
        print(json.dumps(measure(Path(model), int(size))))
        return {}
    rows = []
    for spec in args.models:  # each in its own process: a clean heap and its own peak
        out = subprocess.run([sys.executable, "-m", "benchmarks.activation_transient", "x", "--one", spec,
                              "--threads", str(args.threads)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {"command": "python -m benchmarks.activation_transient " + " ".join(args.models), "threads": args.threads,
              "rows": rows}
    publish(result, args.out, "activation_transient", markdown)
    return result


if __name__ == "__main__":
    main()

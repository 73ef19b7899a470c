"""Peak memory of int8 activation calibration on one fp32 UNet graph: ONNX Runtime's own MinMax calibrator against
``onnx_int8.activation_ranges`` (priority-based order, no arena, no second graph copy), one call each.

    python -m benchmarks.int8_calibration_memory GRAPH.onnx [--height 512] [--limit-gib 20]

GRAPH is an fp32 UNet exported by obsdiff (inputs ``sample``, ``timestep``, ``encoder_hidden_states``), e.g. the
``unet/model.onnx`` of ``obsdiff export … --target cpu --height 512 --width 512`` on SD 1.5 built by
``benchmarks.scale``. Each way runs in its own process (its own peak, ``VmHWM``); a process above ``--limit-gib`` is
stopped and recorded as such, so the machine is not driven out of memory. Both ways produce ranges; the lean ones
are checked equal to ORT's when both finish.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.publish import publish

CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
import numpy as np

def hwm_gib():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20

limit, way, graph, height, context, out = float(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), Path(sys.argv[6])

def watch():
    while True:
        rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 2**20
        if rss > limit:
            out.write_text(json.dumps({"way": way, "stopped_at_gib": rss}))
            os._exit(3)
        time.sleep(0.1)

threading.Thread(target=watch, daemon=True).start()
rng = np.random.default_rng(0)
latent = height // 8
call = {"sample": rng.standard_normal((2, 4, latent, latent)).astype(np.float32),
        "timestep": np.array(500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, context)).astype(np.float32)}
t0 = time.time()
tmp = out.parent
if way == "ort":
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from obsdiff.exporters.onnx_int8 import WEIGHT_OPS, CalibrationFeed
    calibrator = create_calibrator(graph, list(WEIGHT_OPS), augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    calibrator.collect_data(CalibrationFeed([call]))
    save_tensors_data(calibrator.compute_data(), tmp / "ranges-ort.json")
else:
    from obsdiff.exporters.onnx_int8 import activation_ranges
    activation_ranges(graph, [call], True, tmp / "ranges-lean.json")
out.write_text(json.dumps({"way": way, "peak_gib": hwm_gib(), "seconds": time.time() - t0}))
"""


def measure(way: str, graph: Path, height: int, context: int, limit: float, tmp: Path) -> dict:
    out = tmp / f"{way}.json"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(limit), way, str(graph), str(height), str(context),
                           str(out)], capture_output=True, text=True)
    if not out.is_file():
        raise SystemExit(f"{way}: exited {proc.returncode} without a result: {proc.stderr.strip()[-500:]}")
    return json.loads(out.read_text())


def same_ranges(tmp: Path) -> bool | None:
    from onnxruntime.quantization.calibrate import load_tensors_data

    files = [tmp / "ranges-ort.json", tmp / "ranges-lean.json"]
    if not all(f.is_file() for f in files):
        return None
    ort, lean = (load_tensors_data(f).data for f in files)
    return set(ort) == set(lean) and all(
        all(bool((a == b).all()) for a, b in zip(ort[k].range_value, lean[k].range_value)) for k in ort)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graph", type=Path)
    parser.add_argument("--height", type=int, default=512, help="image size (square) of the one calibration call")
    parser.add_argument("--context", type=int, default=768, help="text embedding width (768: SD 1.5)")
    parser.add_argument("--limit-gib", type=float, default=20.0, help="stop a way whose RSS passes this")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    graph_bytes = sum(f.stat().st_size for f in args.graph.parent.glob(args.graph.name + "*"))
    with tempfile.TemporaryDirectory(dir=args.graph.parent, prefix=".calibration-memory-") as tmp:
        ways = [measure(w, args.graph, args.height, args.context, args.limit_gib, Path(tmp)) for w in ("ort", "lean")]
        equal = same_ranges(Path(tmp))
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "graph_gib": graph_bytes / 2**30, "ways": ways,
              "ranges_equal": equal}
    return publish(result, args.out, "int8_calibration_memory", markdown)


def markdown(result: dict) -> list[str]:
    c = result["config"]
    lines = ["# int8 activation calibration: peak memory, one call", "",
             f"Command: `python -m benchmarks.int8_calibration_memory {c['graph']} --height {c['height']} "
             f"--limit-gib {c['limit_gib']}`. fp32 graph of {result['graph_gib']:.2f} GiB, batch 2 (the guidance "
             f"pair), {c['height']}×{c['height']} px; each way in its own process (peak = VmHWM).", "",
             "| way | peak GiB | seconds |", "|---|---|---|"]
    names = {"ort": "ONNX Runtime's MinMax calibrator (default execution order, arena)",
             "lean": "`activation_ranges` (priority-based order, no arena, no second graph copy)"}
    for w in result["ways"]:
        if "peak_gib" in w:
            lines.append(f"| {names[w['way']]} | {w['peak_gib']:.2f} | {w['seconds']:.0f} |")
        else:
            lines.append(f"| {names[w['way']]} | stopped above {w['stopped_at_gib']:.2f} | - |")
    equal = result["ranges_equal"]
    lines += ["", "Ranges equal for every calibrated tensor: "
              + ("yes" if equal else "no" if equal is False else "not compared (a way was stopped)") + "."]
    return lines


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Validate a TensorRT bundle on the device (Jetson / desktop GPU), or its logic with ONNX Runtime.

Runs every component on the reference inputs saved in ``reference/<component>.safetensors``, compares
with the saved ONNX Runtime outputs (cosine, PSNR), measures latency (median / p90 after warm-up),
prints a table, writes ``device_validation.json`` and exits 1 when a gate fails.

    python3 validate_on_device.py                       # TensorRT engines in engines/ (build_engines.sh)
    python3 validate_on_device.py --runtime onnxruntime # the same comparison with ONNX Runtime

Needs numpy, plus polygraphy and tensorrt (device) or onnxruntime, and ``benchmark.py`` beside it (its safetensors
reader, scores and timing). Standalone: no obsdiff import. For latency in the field's terms, run ``benchmark.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__:
    from obsdiff.exporters.device.benchmark import cosine, psnr, read_safetensors, timings
else:  # in a bundle: the runner beside this script holds the reading, the scores and the timing
    from benchmark import cosine, psnr, read_safetensors, timings

class OrtRunner:
    def __init__(self, bundle: Path, component: dict) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(bundle / component["onnx"]), providers=["CPUExecutionProvider"])

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]  # the saved inputs already have the graph's dtypes
        return dict(zip(names, self.session.run(names, feeds)))


class TrtRunner:
    """The engine through polygraphy's TrtRunner. The comparison itself is not polygraphy's ``Comparator``: its
    compare functions gate on per-element atol/rtol, while these gates are cosine and PSNR against the saved ONNX
    Runtime outputs (fp16 engines vs fp32 references make per-element tolerances either loose or flaky)."""

    def __init__(self, bundle: Path, component: dict) -> None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as _Runner

        engine = bundle / component["engine"]
        if not engine.is_file():
            sys.exit(f"validate_on_device: error: {engine} missing; run build_engines.sh first")
        self.runner = _Runner(EngineFromBytes(BytesFromPath(str(engine))))
        self.runner.activate()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.runner.infer(feeds, copy_outputs_to_host=True).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--runtime", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    spec_path = args.bundle / "device.json"
    if not spec_path.is_file():
        sys.exit(f"validate_on_device: error: {spec_path} missing (not an obsdiff TensorRT bundle)")
    spec = json.loads(spec_path.read_text())
    gates = spec["gates"]
    rows, failed = [], []
    for name, component in spec["components"].items():
        ref = read_safetensors(args.bundle / component["reference"])
        feeds = {k[len("input.") :]: v for k, v in ref.items() if k.startswith("input.")}
        expected = {k[len("ort.") :]: v for k, v in ref.items() if k.startswith("ort.")}
        runner = TrtRunner(args.bundle, component) if args.runtime == "tensorrt" else OrtRunner(args.bundle, component)
        got = runner(feeds)
        for out, want in expected.items():
            c, p = cosine(want, got[out]), psnr(want, got[out])
            ok = c >= gates["min_cosine"] and p >= gates["min_psnr_db"]
            rows.append({"component": name, "output": out, "cosine": c, "psnr_db": p, "passed": ok,
                         **timings(lambda r=runner, f=feeds: r(f), args.warmup, args.runs)})
            if not ok:
                failed.append(f"{name}.{out}")
    cw = max([len("component"), *(len(r["component"]) for r in rows)]) + 2
    ow = max([len("output"), *(len(r["output"]) for r in rows)]) + 2
    print(f"{'component':<{cw}}{'output':<{ow}}{'cosine':>10}{'PSNR dB':>10}{'median ms':>11}{'p90 ms':>9}  gate")
    for r in rows:
        print(f"{r['component']:<{cw}}{r['output']:<{ow}}{r['cosine']:>10.6f}{r['psnr_db']:>10.2f}"
              f"{r['median_ms']:>11.3f}{r['p90_ms']:>9.3f}  {'pass' if r['passed'] else 'FAIL'}")
    result = {"runtime": args.runtime, "gates": gates, "rows": rows, "passed": not failed}
    (args.bundle / f"device_validation_{args.runtime}.json").write_text(json.dumps(result, indent=2))
    if failed:
        print(f"validate_on_device: gate failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"validate_on_device: all {len(rows)} outputs pass ({args.runtime})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

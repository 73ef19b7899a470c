"""Which builder and which re-validation serve each bundle format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from exporters.profiles import Format
from obsdiff.errors import GateError, UsageError

log = logging.getLogger(__name__)

_ORT_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
               "tensor(float16)": np.float16}


def make_builder(profile, precision, compress: str | None = None, deployment_target: str | None = None):
    """The bundle builder for a target's format (Core ML alone takes compression options)."""
    if profile.format is Format.COREML:
        from exporters.coreml import CoreMLBundleBuilder

        return CoreMLBundleBuilder(profile, precision, compress, deployment_target)
    if compress or deployment_target:
        raise UsageError("--compress and --deployment-target apply to Core ML targets (ios, macos) only")
    if profile.format is Format.TENSORRT:
        from exporters.tensorrt import TensorRTBundleBuilder

        return TensorRTBundleBuilder(profile, precision)
    from exporters.bundle import OnnxBundleBuilder

    return OnnxBundleBuilder(profile, precision)


def revalidate_onnx(bundle: Path, manifest: dict) -> dict:
    """Run every component's model file on its saved reference inputs; compare with PyTorch's outputs."""
    from exporters.bundle import REFERENCE_DIR, load_reference, ort_session
    from exporters.validate import compare_outputs

    min_cos = manifest["gates"]["min_cosine"]
    results = {}
    for name, comp in manifest["components"].items():
        inputs, reference = load_reference(bundle / REFERENCE_DIR, name)
        session = ort_session(bundle / comp["file"])
        feeds = {i.name: inputs[i.name].astype(_ORT_DTYPES.get(i.type, np.float32)) for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, (o.astype(np.float32) for o in session.run(names, feeds))))
        results[name] = compare_outputs(reference, got)
        worst = min(c["cosine"] for c in results[name].values())
        log.info("%s: cosine %.7f (gate %.4g)", name, worst, min_cos)
        if worst < min_cos:
            raise GateError(f"{bundle}: {name} cosine {worst:.6f} below the gate {min_cos:g}")
    return results


def revalidate(bundle: Path, manifest: dict) -> dict:
    fmt = Format(manifest["format"])
    if fmt is Format.COREML:
        from exporters.coreml import revalidate_coreml

        results = revalidate_coreml(bundle, manifest)
    else:
        results = revalidate_onnx(bundle, manifest)
    log.info("%s: %d files match the manifest; all components pass", bundle, len(manifest["files"]))
    print(json.dumps({"bundle": str(bundle), "target": manifest["target"], "ok": True}, indent=None))
    return results

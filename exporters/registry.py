"""Which builder serves each bundle format: the one module that imports the format builders."""

from __future__ import annotations

from obsdiff.errors import BundleError, UsageError
from obsdiff.exporters.apple import AppleOptions
from obsdiff.exporters.builder import BundleBuilder
from obsdiff.exporters.profiles import Activations, Format, Precision, TargetProfile


def builder_class(fmt: Format | str) -> type[BundleBuilder]:
    try:
        fmt = Format(fmt)
    except ValueError:
        raise BundleError(f"unknown bundle format {fmt!r}") from None
    if fmt is Format.COREML:
        from obsdiff.exporters.coreml import CoreMLBundleBuilder

        return CoreMLBundleBuilder
    if fmt is Format.TENSORRT:
        from obsdiff.exporters.tensorrt import TensorRTBundleBuilder

        return TensorRTBundleBuilder
    from obsdiff.exporters.onnx import OnnxBundleBuilder

    return OnnxBundleBuilder


def make_builder(profile: TargetProfile, precision: Precision, prompts: list[str], compress: str | None = None,
                 deployment_target: str | None = None, apple: AppleOptions | None = None,
                 activations: Activations | None = None) -> BundleBuilder:
    """The bundle builder for a target's format (Core ML alone takes compression and Apple-layout options; the ONNX
    formats alone take int8 activations)."""
    cls = builder_class(profile.format)
    activations = activations or profile.activations
    if activations is Activations.INT8 and profile.format is Format.COREML:
        raise UsageError("--activations int8 is not supported for Core ML: its activation quantization calibrates by "
                         "running the model, and Core ML prediction needs macOS (int8 weights work: prune with "
                         "--quantize int8)")
    if activations is Activations.INT8 and precision is not Precision.FP32:
        raise UsageError("--activations int8 builds fp32 graphs around the int8 kernels; drop --precision fp16")
    if profile.format is Format.COREML:
        return cls(profile, precision, compress, deployment_target, apple or AppleOptions())
    if compress or deployment_target:
        raise UsageError("--compress and --deployment-target apply to Core ML targets (ios, macos) only")
    if apple is not None and apple.given:
        raise UsageError("--layout, --chunk-unet and --attention-implementation apply to Core ML targets (ios, macos) "
                         "only")
    return cls(profile, precision, prompts, activations)

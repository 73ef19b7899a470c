"""Which builder serves each bundle format: the one module that imports the format builders."""

from __future__ import annotations

from obsdiff.errors import BundleError
from obsdiff.exporters.builder import BundleBuilder
from obsdiff.exporters.export_plan import ExportPlan
from obsdiff.exporters.profiles import Format


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


def make_builder(plan: ExportPlan, prompts: list[str]) -> BundleBuilder:
    """The bundle builder for the plan's format, with the gate prompts."""
    return builder_class(plan.profile.format)(plan, prompts)

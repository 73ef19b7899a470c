"""Every export option resolved once, at the edge, into one frozen ``ExportPlan``.

The target profile, the folder being exported (its size rule, pattern and quantization) and the user's overrides
(``ExportOptions``) go in; the plan says the precision, the activations, how integer weights are written, the
shapes, the Apple options, the Core ML deployment target and compression, and the gates. ``export`` and ``ship``
resolve it once; builders receive it and never change it (TensorRT's builder hands the same plan to its ONNX part).
Every combination that cannot be exported is refused here, in one line, before anything heavy is loaded.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace

from obsdiff.api import DENOISERS, Quantization, SparsitySpec, check_image_size
from obsdiff.errors import UsageError
from obsdiff.exporters.apple import AppleOptions, AttentionImplementation, Layout
from obsdiff.exporters.components import SizeRule
from obsdiff.exporters.profiles import Activations, Format, Gates, Precision, Shapes, TargetProfile

log = logging.getLogger(__name__)

# Minimum deployment targets (coremltools): sparse storage iOS16/macOS13; sparse + palettize/int8 iOS18/macOS15.
MIN_TARGET = {None: {"iOS": 16, "macOS": 13}, "palettize-4bit": {"iOS": 18, "macOS": 15},
              "int8": {"iOS": 18, "macOS": 15}}
COMPRESSIONS = ("palettize-4bit", "int8")


class Int8Mode(enum.StrEnum):
    """How a quantized folder's integer codes reach the graph."""

    NONE = "none"  # no integer weights
    WEIGHTS = "weights"  # int8 codes + DequantizeLinear, float compute (or Core ML constexpr codes)
    ACTIVATIONS = "activations"  # ONNX Runtime QDQ: our codes, uint8 activations calibrated on the gate prompts
    SYMMETRIC = "symmetric"  # TensorRT explicit quantization: our codes, symmetric int8 activations (zero point 0)


@dataclass(frozen=True)
class ShapeOverrides:
    """``--height/--width/--batch/--gate-prompts/--gate-steps`` over the profile's ``[shapes]``; None keeps it."""

    height: int | None = None
    width: int | None = None
    batch: int | None = None
    gate_prompts: int | None = None
    gate_steps: int | None = None

    def apply(self, shapes: Shapes) -> Shapes:
        """The profile's shapes with these options over them, each option checked under its own name."""
        for option, value in (("--batch", self.batch), ("--gate-prompts", self.gate_prompts),
                              ("--gate-steps", self.gate_steps)):
            if value is not None and value < 1:
                raise UsageError(f"{option} must be a whole number ≥ 1, got {value}")
        check_image_size("--height", self.height)
        check_image_size("--width", self.width)
        changes = {k: v for k, v in (("height", self.height), ("width", self.width), ("batch", self.batch),
                                     ("gate_prompts", self.gate_prompts), ("steps", self.gate_steps)) if v is not None}
        return replace(shapes, **changes)


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for on top of the target profile (``None``: the profile decides), parsed at the edge."""

    precision: Precision | None = None
    activations: Activations | None = None
    shapes: ShapeOverrides = ShapeOverrides()
    apple: AppleOptions = AppleOptions()
    compress: str | None = None
    deployment_target: str | None = None
    force: bool = False
    zip: bool = False


@dataclass(frozen=True)
class FolderFacts:
    """What the plan needs to know of the folder it exports, read from its configs and record (or, for ``ship``,
    what the prune will make of it)."""

    size: SizeRule
    pattern: SparsitySpec | None
    quantization: dict[str, Quantization]  # component → its quantization


@dataclass(frozen=True)
class ExportPlan:
    """One export, every option decided. ``profile.shapes`` are resolved to the model's size."""

    profile: TargetProfile
    precision: Precision
    activations: Activations
    int8: Int8Mode
    pattern: SparsitySpec | None
    quantized: tuple[str, ...]  # the components whose integer codes are written
    layout: Layout | None = None  # Core ML
    chunk_unet: bool | None = None  # Core ML, None: decided from the UNet's size
    attention: AttentionImplementation = AttentionImplementation.ORIGINAL
    compress: str | None = None
    deployment_target: str | None = None
    zip: bool = False

    @property
    def shapes(self) -> Shapes:
        return self.profile.shapes

    @property
    def gates(self) -> Gates:
        return self.profile.gates

    def min_psnr(self) -> float:
        return self.gates.min_psnr(self.precision, self.activations)


def _parse_target(text: str) -> tuple[str, int]:
    for family in ("iOS", "macOS"):
        if text.startswith(family) and text[len(family):].isdigit():
            return family, int(text[len(family):])
    raise UsageError(f"deployment target must look like iOS17 or macOS14, got {text!r}")


def _check_known(target: str) -> None:
    """A deployment target coremltools can convert for (a newer name would fail halfway through conversion)."""
    import coremltools as ct

    if not hasattr(ct.target, target):
        family = "iOS" if target.startswith("iOS") else "macOS"
        known = [t for t in dir(ct.target) if t.startswith(family) and t[len(family):].isdigit()]
        raise UsageError(f"deployment target {target} is unknown to coremltools {ct.__version__} (it knows up to "
                         f"{max(known, key=lambda t: int(t[len(family):]))})")


def resolve_deployment_target(requested: str | None, default: str, compress: str | None) -> str:
    """The profile's default is raised to what the compression needs; an explicit older request is an error."""
    if compress not in MIN_TARGET:
        raise UsageError(f"--compress must be one of {', '.join(COMPRESSIONS)} (got {compress!r})")
    if requested:
        _check_known(requested)
    family, version = _parse_target(requested or default)
    minimum = MIN_TARGET[compress][family]
    if version >= minimum:
        return f"{family}{version}"
    what = f"sparse weights with {compress}" if compress else "sparse weights"
    if requested:
        raise UsageError(f"deployment target {requested} is too old for {what}: the minimum is {family}{minimum}")
    log.info("raising the deployment target from %s%d to %s%d for %s", family, version, family, minimum, what)
    return f"{family}{minimum}"


def resolve_export_plan(profile: TargetProfile, options: ExportOptions, folder: FolderFacts) -> ExportPlan:
    """The one place export options meet the profile and the folder; every refusal is one line."""
    if folder.pattern is not None:
        profile.check_pattern(folder.pattern, options.force)
    profile = replace(profile, shapes=folder.size.resolve(options.shapes.apply(profile.shapes)))
    precision = options.precision or profile.precision
    activations = options.activations or profile.activations
    if activations is Activations.INT8 and profile.format is Format.COREML:
        raise UsageError("--activations int8 is not supported for Core ML: its activation quantization calibrates by "
                         "running the model, and Core ML prediction needs macOS (int8 weights work: prune with "
                         "--quantize int8)")
    if activations is Activations.INT8 and precision is not Precision.FP32:
        raise UsageError("--activations int8 builds fp32 graphs around the int8 kernels; drop --precision fp16")
    if profile.format is Format.COREML:
        return _coreml_plan(profile, options, folder, precision)
    if options.compress or options.deployment_target:
        raise UsageError("--compress and --deployment-target apply to Core ML targets (ios, macos) only")
    if options.apple.given:
        raise UsageError("--layout, --chunk-unet and --attention-implementation apply to Core ML targets (ios, macos) "
                         "only")
    int8 = Int8Mode.NONE
    if folder.quantization:
        if profile.format is Format.TENSORRT:  # explicit quantization: fp32 graph, symmetric int8 activations
            precision, activations = Precision.FP32, Activations.INT8
        _check_onnx_int8(profile, folder.quantization, precision)
        int8 = Int8Mode.WEIGHTS if activations is Activations.FLOAT else (
            Int8Mode.SYMMETRIC if profile.format is Format.TENSORRT else Int8Mode.ACTIVATIONS)
    if activations is Activations.INT8 and not set(DENOISERS) & set(folder.quantization):
        raise UsageError("--activations int8 needs a folder whose denoiser has int8 weights: prune it with "
                             "--quantize int8")
    return ExportPlan(profile, precision, activations, int8, folder.pattern, tuple(sorted(folder.quantization)),
                      zip=options.zip)


def _check_onnx_int8(profile: TargetProfile, quantization: dict[str, Quantization], precision: Precision) -> None:
    """ONNX graphs take int8 codes with one scale per output channel, in fp32 QDQ graphs."""
    for component, quant in quantization.items():
        if quant.bits != 8 or quant.group_size is not None:
            raise UsageError(f"{component} is quantized as {quant}: ONNX targets take int8 with one scale per "
                             "output channel (int4 and groups: export to Core ML)")
    if precision is not Precision.FP32:
        raise UsageError(f"int8 weights export as fp32 QDQ graphs (ONNX Runtime fuses them into int8 kernels); "
                         f"target {profile.name} is {precision}: pass --precision fp32")


def _coreml_plan(profile: TargetProfile, options: ExportOptions, folder: FolderFacts,
                 precision: Precision) -> ExportPlan:
    """Core ML: layout, chunking, attention, compression and the deployment target (integer codes need iOS 18)."""
    compress = options.compress
    if compress is not None and compress not in COMPRESSIONS:
        raise UsageError(f"--compress must be one of {', '.join(COMPRESSIONS)} (got {compress!r})")
    if folder.quantization and compress:
        raise UsageError(f"--compress {compress} would re-quantize weights this folder already holds as integer "
                         "codes: drop --compress")
    default = profile.coreml.deployment_target
    target = resolve_deployment_target(options.deployment_target, default, compress)
    if folder.quantization:
        target = resolve_deployment_target(options.deployment_target, default, "int8")
    layout, chunk, attention = options.apple.resolve(profile.coreml)
    return ExportPlan(profile, precision, Activations.FLOAT, Int8Mode.WEIGHTS if folder.quantization else Int8Mode.NONE,
                      folder.pattern, tuple(sorted(folder.quantization)), layout, chunk, attention, compress, target,
                      zip=options.zip)

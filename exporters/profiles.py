"""Target profiles: ``targets/<name>.toml`` read into a validated dataclass."""

from __future__ import annotations

import dataclasses
import enum
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from obsdiff.api import (
    DEFAULT_NUM_PROMPTS,
    DEFAULT_STEPS,
    Quantization,
    SparsitySpec,
    Unstructured,
    check_image_size,
    check_number,
    check_whole,
    parse_kind,
    parse_quantization,
    parse_sparsity,
)
from obsdiff.errors import UsageError
from obsdiff.resources import targets_dir


class Precision(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"


class Activations(enum.StrEnum):
    """What the exported graph computes activations in: the precision's float, or int8 (static ranges calibrated on
    the gate prompts' denoiser inputs; needs an int8-quantized folder)."""

    FLOAT = "float"
    INT8 = "int8"


def parse_activations(text: str | None, name: str = "--activations") -> Activations | None:
    """``--activations`` (or a profile's ``activations``) parsed once; None: the profile decides."""
    if text is None:
        return None
    try:
        return Activations(text)
    except ValueError:
        raise UsageError(f"{name} must be float or int8, got {text!r}") from None


class Format(enum.StrEnum):
    ONNX = "onnx"
    TENSORRT = "tensorrt"
    COREML = "coreml"


class Layout(enum.StrEnum):
    """Core ML bundle layout."""

    APPLE = "apple"  # the Swift pipeline's names and layouts
    OURS = "ours"  # the component descriptions of the ONNX bundles


class AttentionImplementation(enum.StrEnum):
    ORIGINAL = "original"
    SPLIT_EINSUM = "split-einsum"


def parse_layout(text: str, name: str = "--layout") -> Layout:
    try:
        return Layout(text)
    except ValueError:
        raise UsageError(f"{name} must be apple or ours, got {text!r}") from None


def parse_attention(text: str, name: str = "--attention-implementation") -> AttentionImplementation:
    try:
        return AttentionImplementation(text)
    except ValueError:
        raise UsageError(f"{name} must be original or split-einsum, got {text!r}") from None


# Which role each component plays; Core ML profiles choose components by role (Core ML ships no VAE encoder).
TEXT_ENCODER, DENOISER, VAE_DECODER, VAE_ENCODER = "text_encoder", "denoiser", "vae_decoder", "vae_encoder"
ROLES = (TEXT_ENCODER, DENOISER, VAE_DECODER, VAE_ENCODER)
GRAPH_OPTIMIZATION_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def check_providers(name: str, providers: tuple[str, ...]) -> None:
    """Execution provider names ONNX Runtime knows (whether this build has them or not): a misspelt one would only
    fail on the device."""
    import onnxruntime as ort

    known = set(ort.get_all_providers())
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise ValueError(f"{name}: unknown execution provider {unknown[0]!r} (ONNX Runtime knows e.g. "
                         "CPUExecutionProvider, XnnpackExecutionProvider, CUDAExecutionProvider, "
                         "TensorrtExecutionProvider, CoreMLExecutionProvider, NnapiExecutionProvider)")


@dataclass(frozen=True)
class SessionOptions:
    """``[session_options]``: the ONNX Runtime session the device should create (copied into the manifest)."""

    execution_providers: tuple[str, ...] = ()
    intra_op_num_threads: int | None = None
    inter_op_num_threads: int | None = None
    xnnpack_intra_op_num_threads: int | None = None
    graph_optimization_level: str | None = None

    def check(self) -> None:
        check_providers("execution_providers", self.execution_providers)
        for name in ("intra_op_num_threads", "inter_op_num_threads", "xnnpack_intra_op_num_threads"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), 1)
        if self.graph_optimization_level not in (None, *GRAPH_OPTIMIZATION_LEVELS):
            raise ValueError(f"graph_optimization_level must be one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}, got "
                             f"{self.graph_optimization_level!r}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v not in (None, ())}


@dataclass(frozen=True)
class TensorRTOptions:
    """``[tensorrt]``: where engines are built and how, and the device validator's gates."""

    build_on: str = "device"  # "device": scripts only; "host": also build here when TensorRT and a GPU exist
    jetpack: str = "-"
    tensorrt: str = "10.x"
    workspace_mb: int = 1024
    builder_optimization_level: int = 3
    device_min_cosine: float = 0.99
    device_min_psnr_db: float = 30.0

    def check(self) -> None:
        if self.build_on not in ("device", "host"):
            raise ValueError(f"build_on must be \"device\" or \"host\", got {self.build_on!r}")
        _whole("workspace_mb", self.workspace_mb, 1)
        _whole("builder_optimization_level", self.builder_optimization_level, 0)
        if self.builder_optimization_level > 5:
            raise ValueError(f"builder_optimization_level must be 0 to 5, got {self.builder_optimization_level}")
        _number("device_min_cosine", self.device_min_cosine, -1.0, 1.0)
        _number("device_min_psnr_db", self.device_min_psnr_db, 0.0)


@dataclass(frozen=True)
class CoreMLOptions:
    """``[coreml]``: layout, UNet chunking, attention, deployment target, compute units and the roles converted."""

    layout: Layout = Layout.OURS
    chunk_unet: bool | None = False  # None: "auto" (above 1 GB of UNet weights, as Apple does for iPhones)
    attention_implementation: AttentionImplementation = AttentionImplementation.ORIGINAL
    deployment_target: str = "iOS17"
    compute_units: str = "ALL"
    components: tuple[str, ...] = (TEXT_ENCODER, DENOISER, VAE_DECODER)

    def check(self) -> None:
        if self.compute_units not in COMPUTE_UNITS:
            raise ValueError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, got {self.compute_units!r}")
        unknown = [c for c in self.components if c not in ROLES]
        if unknown or not self.components:
            raise ValueError(f"components are roles ({', '.join(ROLES)}); unknown: {', '.join(unknown) or 'none given'}")
        family, _, version = self.deployment_target.partition("OS")
        if family not in ("i", "mac") or not version.isdigit():
            raise ValueError(f"deployment_target must look like iOS17 or macOS14, got {self.deployment_target!r}")


def _coreml_enums(raw: dict) -> dict:
    try:
        out = {"layout": parse_layout(raw.get("layout", "ours"), "layout"),
               "attention_implementation": parse_attention(raw.get("attention_implementation", "original"),
                                                           "attention_implementation")}
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    chunk = raw.get("chunk_unet", False)
    if chunk not in (True, False, "auto"):
        raise ValueError(f"chunk_unet must be true, false or \"auto\", got {chunk!r}")
    return {**out, "chunk_unet": None if chunk == "auto" else chunk}


@dataclass(frozen=True)
class Shapes:
    """Export shapes and the end-to-end gate's run. Height and width default to the model's native size."""

    batch: int = 1
    height: int | None = None
    width: int | None = None
    steps: int = 25  # denoising steps of the end-to-end gate
    guidance: float = 5.0
    gate_prompts: int = 10  # prompts of the end-to-end gate (from the model's calibration prompts)

    def check(self) -> None:
        _whole("batch", self.batch, 1)
        _whole("steps", self.steps, 1)
        _whole("gate_prompts", self.gate_prompts, 1)
        for name in ("height", "width"):
            try:
                check_image_size(name, getattr(self, name))
            except UsageError as exc:
                raise ValueError(str(exc).lstrip("-")) from None
        _number("guidance", self.guidance, 0.0)


@dataclass(frozen=True)
class Gates:
    min_cosine: float = 0.9999
    min_image_psnr_db: float = 40.0
    min_image_psnr_db_fp16: float = 30.0
    min_image_psnr_db_int8: float = 35.0  # int8 activations, against the fake-quantized PyTorch model
    max_latency_ms: dict[str, float] = field(default_factory=dict)

    def min_psnr(self, precision: "Precision", activations: "Activations | None" = None) -> float:
        if activations is Activations.INT8:
            return self.min_image_psnr_db_int8
        return self.min_image_psnr_db if precision is Precision.FP32 else self.min_image_psnr_db_fp16

    def check(self) -> None:
        _number("min_cosine", self.min_cosine, -1.0, 1.0)
        _number("min_image_psnr_db", self.min_image_psnr_db, 0.0)
        _number("min_image_psnr_db_fp16", self.min_image_psnr_db_fp16, 0.0)
        _number("min_image_psnr_db_int8", self.min_image_psnr_db_int8, 0.0)
        if not isinstance(self.max_latency_ms, dict):
            raise ValueError(f"max_latency_ms must be a table of component = milliseconds, got {self.max_latency_ms!r}")
        for name, value in self.max_latency_ms.items():
            _number(f"max_latency_ms.{name}", value, 0.0)


@dataclass(frozen=True)
class PruneDefaults:
    """What ``ship`` prunes with, and which patterns the target can use (``accepts``; empty: any)."""

    sparsity: SparsitySpec = field(default_factory=Unstructured)
    quantization: Quantization | None = None  # ``quantize = "int8"`` (with ``group_size``, ``quantize_method``)
    accepts: tuple[str, ...] = ()
    components: tuple[str, ...] = ("denoiser",)
    num_prompts: int = DEFAULT_NUM_PROMPTS
    steps: int = DEFAULT_STEPS

    def check(self) -> None:
        _whole("num_prompts", self.num_prompts, 1)
        _whole("steps", self.steps, 1)
        if not self.components or not all(isinstance(c, str) and c for c in self.components):
            raise ValueError(f"components must be a list of names, got {list(self.components)!r}")
        if self.accepts and not self.accepts_spec(self.sparsity):
            raise ValueError(f"the default pattern {self.sparsity} is not among accepts = {list(self.accepts)}")

    def accepts_spec(self, spec: SparsitySpec) -> bool:
        return not self.accepts or str(spec) in self.accepts


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    format: Format
    precision: Precision
    exporter: str
    providers: tuple[str, ...]
    shapes: Shapes
    gates: Gates
    prune: PruneDefaults
    ort_format: bool = False
    activations: Activations = Activations.FLOAT
    session_options: SessionOptions = field(default_factory=SessionOptions)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)  # read by the tensorrt format only
    coreml: CoreMLOptions = field(default_factory=CoreMLOptions)  # read by the coreml format only
    path: Path | None = None

    @property
    def shipped(self) -> bool:
        """One of obsdiff's own ``targets/`` (not a user's file, which may reuse a shipped name)."""
        return self.path is not None and self.path.resolve().parent == targets_dir().resolve()

    def check_pattern(self, spec: SparsitySpec, force: bool) -> None:
        """A pattern the target cannot use is refused (``--force`` exports it anyway)."""
        if force or self.prune.accepts_spec(spec):
            return
        raise UsageError(f"target {self.name} gains nothing from {spec} weights (it accepts "
                         f"{', '.join(self.prune.accepts)}): choose one of those patterns, or pass --force")


def _whole(name: str, value, minimum: int) -> None:
    """``checks.check_whole`` as a field error (the loader adds the file and table)."""
    try:
        check_whole(name, value, minimum)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _number(name: str, value, low: float, high: float | None = None) -> None:
    try:
        check_number(name, value, low, high)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _profile_activations(data: dict) -> Activations:
    try:
        return parse_activations(data.get("activations", "float"), "activations")
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def available_targets() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.toml"))


_SCALARS = {"int": ((int,), "a whole number"), "int | None": ((int,), "a whole number"),
            "float": ((int, float), "a number"), "str": ((str,), "a string"),
            "bool": ((bool,), "true or false")}


def _table(data: dict, key: str, cls, converters: dict | None = None):
    """One TOML table into its dataclass: unknown keys, wrong types and out-of-range values name the field."""
    raw = data.get(key, {})
    if not isinstance(raw, dict):
        raise ValueError(f"[{key}] must be a table")
    converters = converters or {}
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}  # annotations are strings here
    unknown = set(raw) - set(kinds) - set(converters)
    if unknown:
        raise ValueError(f"unknown key(s) in [{key}]: {', '.join(sorted(unknown))}")
    values = {}
    for name, value in raw.items():
        if name in converters:
            continue
        kind = kinds[name]
        if kind in _SCALARS:
            types, what = _SCALARS[kind]
            if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
                raise ValueError(f"[{key}] {name} must be {what}, got {value!r}")
        elif kind.startswith("tuple"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"[{key}] {name} must be a list of strings, got {value!r}")
            value = tuple(value)
        values[name] = value
    for convert in converters.values():
        values.update(convert(raw))
    obj = cls(**values)
    try:
        obj.check()
    except ValueError as exc:
        raise ValueError(f"[{key}] {exc}") from None
    return obj


BUDGET_KEYS = ("flops", "params", "allocation")
QUANT_OPTION_KEYS = ("group_size", "quantize_method")  # read with ``quantize``


def _prune_quantization(raw: dict) -> dict:
    try:
        return {"quantization": parse_quantization(raw.get("quantize"), raw.get("group_size"),
                                                   raw.get("quantize_method"))}
    except UsageError as exc:  # the command line's option names, as the profile spells them
        message = str(exc)
        for option, key in (("--quantize-method", "quantize_method"), ("--group-size", "group_size"),
                            ("--quantize", "quantize")):
            message = message.replace(option, key)
        raise ValueError(message) from None


def _prune_sparsity(raw: dict) -> dict:
    """``pattern``, ``sparsity`` and a structured budget (``flops``/``params``, ``allocation``) of ``[prune]``, parsed
    once into the typed spec."""
    try:
        return {"sparsity": parse_sparsity(raw.get("pattern", "unstructured"), raw.get("sparsity"),
                                           **{k: raw.get(k) for k in BUDGET_KEYS})}
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _accepts(raw: dict) -> dict:
    accepts = raw.get("accepts", [])
    if not isinstance(accepts, list):
        raise ValueError(f"accepts must be a list of patterns, got {accepts!r}")
    try:
        return {"accepts": tuple(parse_kind(a) for a in accepts)}
    except UsageError as exc:
        raise ValueError(str(exc)) from None


TOP_LEVEL = {"name": str, "description": str, "format": str, "precision": str, "exporter": str, "providers": list,
             "ort_format": bool, "activations": str}
TABLES = ("prune", "shapes", "gates", "session_options", "tensorrt", "coreml")
FORMAT_TABLES = {"tensorrt": Format.TENSORRT, "coreml": Format.COREML}


def _check_top_level(data: dict) -> None:
    """Every top-level key known and of its type; a backend table only in a profile of its format."""
    unknown = sorted(set(data) - set(TOP_LEVEL) - set(TABLES))
    if unknown:
        raise ValueError(f"unknown key(s) at the top level: {', '.join(unknown)} (known: "
                         f"{', '.join([*TOP_LEVEL, *(f'[{t}]' for t in TABLES)])})")
    for key, kind in TOP_LEVEL.items():
        if key in data and not isinstance(data[key], kind):
            raise ValueError(f"{key} must be a {kind.__name__}, got {data[key]!r}")
    if "format" not in data or "name" not in data:
        raise ValueError(f"missing key {'name' if 'name' not in data else 'format'}")
    try:
        fmt = Format(data["format"])
    except ValueError:
        raise ValueError(f"format must be one of {', '.join(f.value for f in Format)}, got {data['format']!r}") from None
    for table, owner in FORMAT_TABLES.items():
        if table in data and fmt is not owner:
            raise ValueError(f"[{table}] applies to format = \"{owner}\" profiles; this one is {fmt}")
    if "providers" in data:
        if not all(isinstance(p, str) for p in data["providers"]):
            raise ValueError(f"providers must be a list of strings, got {data['providers']!r}")
        check_providers("providers", tuple(data["providers"]))
    if data.get("exporter", "torch") not in ("optimum", "torch"):
        raise ValueError(f"exporter must be 'optimum' or 'torch', got {data['exporter']!r}")


def _precision(data: dict) -> Precision:
    try:
        return Precision(data.get("precision", "fp32"))
    except ValueError:
        raise ValueError(f"precision must be fp32 or fp16, got {data['precision']!r}") from None


def load_profile(name_or_path: str | Path) -> TargetProfile:
    """A profile read and checked in full: every key's name, type and range at every level, in one line naming the
    file and the key."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = targets_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise UsageError(f"unknown target {str(name_or_path)!r}; available: {', '.join(available_targets())}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: invalid TOML ({exc})") from None
    try:
        _check_top_level(data)
        return TargetProfile(
            name=data["name"], description=data.get("description", ""), format=Format(data["format"]),
            precision=_precision(data), exporter=data.get("exporter", "torch"),
            providers=tuple(data.get("providers", ["CPUExecutionProvider"])),
            shapes=_table(data, "shapes", Shapes), gates=_table(data, "gates", Gates),
            prune=_table(data, "prune", PruneDefaults, {"pattern": _prune_sparsity, "sparsity": lambda raw: {},
                                                        "accepts": _accepts,
                                                        "quantize": _prune_quantization,
                                                        **{k: (lambda raw: {}) for k in (*BUDGET_KEYS, *QUANT_OPTION_KEYS)}}),
            ort_format=data.get("ort_format", False), activations=_profile_activations(data),
            session_options=_table(data, "session_options", SessionOptions),
            tensorrt=_table(data, "tensorrt", TensorRTOptions),
            coreml=_table(data, "coreml", CoreMLOptions, {k: _coreml_enums for k in
                                                          ("layout", "chunk_unet", "attention_implementation")}),
            path=path,
        )
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None

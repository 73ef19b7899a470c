"""Target profiles: ``targets/<name>.toml`` read into a validated dataclass."""

from __future__ import annotations

import dataclasses
import enum
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from obsdiff.api import (
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
    num_prompts: int = 64
    steps: int = 25

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
    session_options: dict = field(default_factory=dict)
    backend: dict = field(default_factory=dict)  # format-specific settings ([tensorrt], [coreml])
    path: Path | None = None

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


def load_profile(name_or_path: str | Path) -> TargetProfile:
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
        for key, kind in (("name", str), ("description", str), ("format", str), ("precision", str), ("exporter", str),
                          ("providers", list), ("ort_format", bool), ("session_options", dict), ("activations", str)):
            if key in data and not isinstance(data[key], kind):
                raise ValueError(f"{key} must be a {kind.__name__}, got {data[key]!r}")
        if "format" not in data or "name" not in data:
            raise ValueError(f"missing key {'name' if 'name' not in data else 'format'}")
        profile = TargetProfile(
            name=data["name"], description=data.get("description", ""), format=Format(data["format"]),
            precision=Precision(data.get("precision", "fp32")), exporter=data.get("exporter", "torch"),
            providers=tuple(data.get("providers", ["CPUExecutionProvider"])),
            shapes=_table(data, "shapes", Shapes), gates=_table(data, "gates", Gates),
            prune=_table(data, "prune", PruneDefaults, {"pattern": _prune_sparsity, "sparsity": lambda raw: {},
                                                        "accepts": _accepts,
                                                        "quantize": _prune_quantization,
                                                        **{k: (lambda raw: {}) for k in (*BUDGET_KEYS, *QUANT_OPTION_KEYS)}}),
            ort_format=data.get("ort_format", False), activations=_profile_activations(data),
            session_options=data.get("session_options", {}),
            backend=data.get(data["format"], {}), path=path,
        )
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if profile.exporter not in ("optimum", "torch"):
        raise UsageError(f"{path}: exporter must be 'optimum' or 'torch'")
    return profile

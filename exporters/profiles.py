"""Target profiles: ``targets/<name>.toml`` read into a validated dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from obsdiff.errors import UsageError

TARGETS_DIR = Path(__file__).resolve().parents[1] / "targets"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"


class Format(str, enum.Enum):
    ONNX = "onnx"
    TENSORRT = "tensorrt"
    COREML = "coreml"


@dataclass(frozen=True)
class Shapes:
    batch: int = 1
    height: int = 16
    width: int = 16
    steps: int = 25
    guidance: float = 5.0


@dataclass(frozen=True)
class Gates:
    min_cosine: float = 0.9999
    min_image_psnr_db: float = 40.0
    min_image_psnr_db_fp16: float = 30.0
    max_latency_ms: dict[str, float] = field(default_factory=dict)

    def min_psnr(self, precision: "Precision") -> float:
        return self.min_image_psnr_db if precision is Precision.FP32 else self.min_image_psnr_db_fp16


@dataclass(frozen=True)
class PruneDefaults:
    pattern: str = "unstructured"
    sparsity: float | None = 0.5
    components: tuple[str, ...] = ("denoiser",)
    num_prompts: int = 64
    steps: int = 25


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
    session_options: dict = field(default_factory=dict)
    backend: dict = field(default_factory=dict)  # format-specific settings ([tensorrt], [coreml])
    path: Path | None = None


def available_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def _section(data: dict, key: str, cls):
    raw = data.get(key, {})
    allowed = set(cls.__dataclass_fields__)
    unknown = set(raw) - allowed
    if unknown:
        raise UsageError(f"target profile: unknown key(s) in [{key}]: {', '.join(sorted(unknown))}")
    if "components" in raw:
        raw = {**raw, "components": tuple(raw["components"])}
    return cls(**raw)


def load_profile(name_or_path: str | Path) -> TargetProfile:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = TARGETS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UsageError(f"unknown target {str(name_or_path)!r}; available: {', '.join(available_targets())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML ({exc})") from None
    try:
        profile = TargetProfile(
            name=data["name"], description=data.get("description", ""), format=Format(data["format"]),
            precision=Precision(data.get("precision", "fp32")), exporter=data.get("exporter", "torch"),
            providers=tuple(data.get("providers", ["CPUExecutionProvider"])),
            shapes=_section(data, "shapes", Shapes), gates=_section(data, "gates", Gates),
            prune=_section(data, "prune", PruneDefaults), ort_format=bool(data.get("ort_format", False)),
            session_options=data.get("session_options", {}), backend=data.get(data["format"], {}), path=path,
        )
    except KeyError as exc:
        raise UsageError(f"{path}: missing key {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    if profile.exporter not in ("optimum", "torch"):
        raise UsageError(f"{path}: exporter must be 'optimum' or 'torch'")
    if profile.shapes.height % 8 or profile.shapes.width % 8:
        raise UsageError(f"{path}: image height and width must be multiples of 8")
    return profile

"""A pruned folder as one typed value: what ``prune`` wrote, read and written by this module alone.

A pruned folder is an ordinary diffusers folder (safetensors) plus ``pruning.json`` (the record: settings, per-layer
and per-unit records, the shapes structured pruning changed, the memory plan and timings) and, for quantized
components, ``<component>/obsdiff_quantization.safetensors`` (the scales). diffusers gives each artifact a class with
``save_pretrained``/``from_pretrained``; ``PrunedFolder.open`` and ``write_pruned_folder`` are that pair here, and
no other module opens either file.

Record format 2 keeps mask layers (``layers``) and structured units (``units``) apart and names the changed shapes
(``shapes``); format 1 (obsdiff before 2026-11-30: one mixed ``layers`` list, shapes under ``structured``) is read
as well. A newer format is refused in one line.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from obsdiff.atomic import write_bytes_atomic
from obsdiff.config import PruneConfig
from obsdiff.errors import ModelFolderError, UsageError
from obsdiff.model_io import check_model_folder, load_diffusers, load_shrunk_component
from obsdiff.quantize import Quantization, QuantMethod
from obsdiff.shrink import shrink_attention, shrink_ffn, shrink_resnet
from obsdiff.sparsity import PatternError, SparsitySpec

log = logging.getLogger(__name__)

RECORD_FILE = "pruning.json"
SCALES_FILE = "obsdiff_quantization.safetensors"  # beside a component's weights: "<layer>.weight_scale" tensors
FORMAT_VERSION = 2
# Scales index the solver's columns: a Linear's in_features; a Conv's (kernel row, kernel column, input channel).
SCALE_COLUMNS = "linear: in_features; conv: (kernel row, kernel column, input channel), channel fastest"
UNIT_KINDS = ("heads", "ffn", "channels")


def _finite_or_none(value) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class LayerRecord:
    """One layer a mask prune (or quantize-only prune) solved."""

    component: str
    layer: str  # relative to the component
    kind: str  # Linear or Conv2d
    shape: tuple[int, ...]
    package: int
    sparsity: float
    error: float | None
    relative_error: float | None
    damp: float | None
    solve_s: float

    @property
    def name(self) -> str:
        return f"{self.component}.{self.layer}"

    @property
    def numel(self) -> int:
        out = 1
        for s in self.shape:
            out *= s
        return out

    def to_json(self) -> dict:
        data = asdict(self)
        del data["component"], data["layer"]
        return {"name": self.name, **data, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict, components: set[str]) -> LayerRecord:
        name = data["name"]
        component = next((c for c in sorted(components, key=len, reverse=True) if name.startswith(c + ".")), None)
        if component is None:
            component, _, _ = name.partition(".")
        return cls(component, name[len(component) + 1:], data["kind"], tuple(data["shape"]), int(data["package"]),
                   float(data["sparsity"]), _finite_or_none(data.get("error")),
                   _finite_or_none(data.get("relative_error")), _finite_or_none(data.get("damp")),
                   float(data.get("solve_s", 0.0)))


@dataclass(frozen=True)
class LayerError:
    error: float | None
    relative_error: float | None


@dataclass(frozen=True)
class UnitRecord:
    """One attention (heads), FFN (neurons) or resnet (channel groups) that structured pruning shrank."""

    component: str
    unit: str  # the attention or resnet path, or the FFN's down projection
    kind: str  # one of UNIT_KINDS
    before: int
    after: int
    package: int
    layers: dict[str, LayerError]  # the unit's down layers and their errors
    removed: tuple[int, ...] = ()
    head_dim: int | None = None  # heads
    up: str | None = None  # ffn: the up projection
    gated: bool | None = None  # ffn: GEGLU (both halves shrink)
    group_size: int | None = None  # channels

    def to_json(self) -> dict:
        data = {"unit": self.unit, "kind": self.kind, "before": self.before, "after": self.after,
                "component": self.component, "package": self.package,
                "layers": {k: asdict(v) for k, v in self.layers.items()}}
        if self.kind == "heads":
            data.update(head_dim=self.head_dim, removed=list(self.removed))
        elif self.kind == "ffn":
            data.update(up=self.up, gated=self.gated)
        else:
            data.update(group_size=self.group_size, removed=list(self.removed))
        return data

    @classmethod
    def from_json(cls, data: dict) -> UnitRecord:
        if data["kind"] not in UNIT_KINDS:
            raise ValueError(f"unknown unit kind {data['kind']!r}")
        return cls(data["component"], data["unit"], data["kind"], int(data["before"]), int(data["after"]),
                   int(data.get("package", 0)),
                   {k: LayerError(v.get("error"), v.get("relative_error")) for k, v in data.get("layers", {}).items()},
                   tuple(data.get("removed", ())), data.get("head_dim"), data.get("up"), data.get("gated"),
                   data.get("group_size"))


@dataclass(frozen=True)
class FFNShape:
    up: str
    down: str
    inner: int
    gated: bool


@dataclass(frozen=True)
class ComponentShapes:
    """What structured pruning changed in one component: heads per attention, FFN widths, resnet channel groups."""

    attention_heads: dict[str, int] = field(default_factory=dict)
    ffn: tuple[FFNShape, ...] = ()
    resnet_groups: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.attention_heads or self.ffn or self.resnet_groups)

    @classmethod
    def from_units(cls, units: list[UnitRecord]) -> ComponentShapes:
        return cls({u.unit: u.after for u in units if u.kind == "heads"},
                   tuple(FFNShape(u.up, u.unit, u.after, bool(u.gated)) for u in units if u.kind == "ffn"),
                   {u.unit: u.after for u in units if u.kind == "channels"})

    def merged(self, newer: ComponentShapes) -> ComponentShapes:
        """A component shrunk twice: the second prune's units override the first's."""
        ffn = {s.down: s for s in self.ffn} | {s.down: s for s in newer.ffn}
        return ComponentShapes({**self.attention_heads, **newer.attention_heads}, tuple(ffn.values()),
                               {**self.resnet_groups, **newer.resnet_groups})

    def apply(self, component: nn.Module) -> None:
        """Resize a freshly built component to these shapes (keeping the first n); weights are loaded afterwards."""
        for path, heads in self.attention_heads.items():
            shrink_attention(component.get_submodule(path), list(range(heads)))
        for s in self.ffn:
            shrink_ffn(component, s.up, s.down, s.gated, list(range(s.inner)))
        for path, groups in self.resnet_groups.items():
            shrink_resnet(component.get_submodule(path), list(range(groups)))

    def to_json(self) -> dict:
        return {"attention_heads": dict(self.attention_heads), "ffn": [asdict(s) for s in self.ffn],
                "resnet_groups": dict(self.resnet_groups)}

    @classmethod
    def from_json(cls, data: dict) -> ComponentShapes:
        return cls({k: int(v) for k, v in data.get("attention_heads", {}).items()},
                   tuple(FFNShape(e["up"], e["down"], int(e["inner"]), bool(e["gated"])) for e in data.get("ffn", [])),
                   {k: int(v) for k, v in data.get("resnet_groups", {}).items()})


@dataclass(frozen=True)
class Skip:
    name: str  # component-qualified
    reason: str


@dataclass(frozen=True)
class MaskSummary:
    pruned_layers: int
    pruned_weights: int
    sparsity_of_pruned_layers: float
    quantization: str | None

    @classmethod
    def of(cls, layers: list[LayerRecord], quantization: Quantization | None) -> MaskSummary:
        pruned = sum(r.numel for r in layers)
        zeros = sum(r.sparsity * r.numel for r in layers)
        return cls(len(layers), pruned, zeros / max(pruned, 1), str(quantization) if quantization else None)


@dataclass(frozen=True)
class ShrinkSummary:
    units: int
    budget: str | None
    heads_removed: int
    heads_total: int
    ffn_neurons_removed: int
    ffn_neurons_total: int
    channel_groups_removed: int
    channel_groups_total: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    @classmethod
    def of(cls, units: list[UnitRecord], budget: str | None, before: dict, after: dict) -> ShrinkSummary:
        def removed(kind: str) -> int:
            return sum(u.before - u.after for u in units if u.kind == kind)

        def total(kind: str) -> int:
            return sum(u.before for u in units if u.kind == kind)

        return cls(len(units), budget, removed("heads"), total("heads"), removed("ffn"), total("ffn"),
                   removed("channels"), total("channels"), before["params"], after["params"], before["flops"],
                   after["flops"])


@dataclass(frozen=True)
class ComponentSummary:
    """One pruned component: its adapter, packages, what stayed whole and why, and what the prune did."""

    adapter: str
    packages: list[list[str]]
    skipped: list[Skip]
    mask: MaskSummary | None = None
    shrink: ShrinkSummary | None = None

    def to_json(self) -> dict:
        data: dict = {"adapter": self.adapter, "packages": self.packages}
        if self.mask is not None:
            data.update(asdict(self.mask))
        if self.shrink is not None:
            data.update(asdict(self.shrink), params_removed=self.shrink.params_removed)
        return {**data, "skipped": [asdict(s) for s in self.skipped]}

    @classmethod
    def from_json(cls, data: dict) -> ComponentSummary:
        skipped = [Skip(s["name"], s["reason"]) for s in data.get("skipped", [])]
        mask = shrink = None
        if "units" in data:
            shrink = ShrinkSummary(**{f.name: data[f.name] for f in fields(ShrinkSummary)})
        if "pruned_layers" in data or shrink is None:  # a stacked prune (shrink, then quantize) holds both
            mask = MaskSummary(**{f.name: data.get(f.name) for f in fields(MaskSummary)})
        return cls(data.get("adapter", ""), data.get("packages", []), skipped, mask, shrink)


@dataclass(frozen=True)
class CalibrationRecord:
    prompts: int
    prompts_sha256: str
    timestep_weights: list[float] | None


@dataclass(frozen=True)
class RecoveryRecord:
    """What ``obsdiff recover`` did to the pruned denoiser: distilled from which teacher, how long, and the loss."""

    teacher: str
    teacher_fingerprint: str
    component: str
    settings: dict  # RecoverConfig.to_json()
    prompts: int
    rows: int  # teacher outputs trained on (denoiser calls × their batch)
    masked_layers: int
    gradient_checkpointing: bool
    loss_curve: list[list[float]]  # [step, mean loss of the steps since the previous point]
    seconds_per_step: float
    timings: dict[str, float]
    memory_plan: dict
    peak_rss_mb: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RecoveryRecord:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class PruningRecord:
    """Everything ``pruning.json`` holds, typed."""

    settings: PruneConfig
    source: str
    tool_version: str
    calibration: CalibrationRecord
    components: dict[str, ComponentSummary]
    layers: list[LayerRecord]
    units: list[UnitRecord]
    shapes: dict[str, ComponentShapes]
    memory_plan: dict
    timings: dict[str, float]
    peak_rss_mb: float
    device_peak_mb: float | None = None  # a GPU run's max_memory_allocated
    source_fingerprint: str | None = None  # the dense model's (``folder_fingerprint``), inherited through re-prunes
    recovery: RecoveryRecord | None = None  # ``obsdiff recover`` distilled the pruned denoiser afterwards

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "tool": "obsdiff", "version": self.tool_version,
                "source": self.source, "settings": self.settings.to_json(),
                "calibration": asdict(self.calibration),
                "components": {k: v.to_json() for k, v in self.components.items()},
                "layers": [r.to_json() for r in self.layers], "units": [u.to_json() for u in self.units],
                "shapes": {k: v.to_json() for k, v in self.shapes.items() if v},
                "memory_plan": self.memory_plan, "timings": self.timings, "peak_rss_mb": self.peak_rss_mb,
                "device_peak_mb": self.device_peak_mb, "source_fingerprint": self.source_fingerprint,
                **({"recovery": self.recovery.to_json()} if self.recovery else {})}

    def summary_json(self) -> dict:
        """The record without its per-layer and per-unit lists (what a bundle's manifest keeps)."""
        return {k: v for k, v in self.to_json().items() if k not in ("layers", "units")}

    @classmethod
    def from_json(cls, data: dict) -> PruningRecord:
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UsageError(f"record format {version!r} is newer than this obsdiff reads (1 to {FORMAT_VERSION}): "
                             "upgrade obsdiff")
        settings = PruneConfig.from_json(data.get("settings", {}))
        components = {k: ComponentSummary.from_json(v) for k, v in data.get("components", {}).items()}
        names = set(components) | set(settings.components)
        if version == 1:  # one list of mask layers ("name") and structured units ("unit")
            mixed = data.get("layers", [])
            layers = [LayerRecord.from_json(r, names) for r in mixed if "name" in r]
            units = [UnitRecord.from_json(r) for r in mixed if "unit" in r]
            shapes_json = (data.get("structured") or {}).get("components", {})
        else:
            layers = [LayerRecord.from_json(r, names) for r in data.get("layers", [])]
            units = [UnitRecord.from_json(r) for r in data.get("units", [])]
            shapes_json = data.get("shapes", {})
        calibration = data.get("calibration", {})
        return cls(settings, str(data.get("source", "")), str(data.get("version", "")),
                   CalibrationRecord(int(calibration.get("prompts", 0)), str(calibration.get("prompts_sha256", "")),
                                     calibration.get("timestep_weights")),
                   components, layers, units, {k: ComponentShapes.from_json(v) for k, v in shapes_json.items()},
                   data.get("memory_plan", {}), dict(data.get("timings", {})), float(data.get("peak_rss_mb", 0.0)),
                   data.get("device_peak_mb"), data.get("source_fingerprint"),
                   RecoveryRecord.from_json(data["recovery"]) if data.get("recovery") else None)


def folder_fingerprint(path: Path, edge_bytes: int = 1 << 20) -> str:
    """A dense model folder's identity, cheap at any size: each file's path, size, and the SHA-256 of its first and
    last MiB (weights files differ there when they differ at all; a 3.4 GB UNet reads 2 MiB)."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts)):
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(edge_bytes)
            fh.seek(max(size - edge_bytes, 0))
            tail = fh.read(edge_bytes)
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        digest.update(hashlib.sha256(head + tail).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class QuantizedComponent:
    """A component's quantization and its layers' scales (indexed like the solver's columns; see ``SCALE_COLUMNS``).

    The weights beside them hold the dequantized values, so diffusers loads the folder as it is.
    """

    quant: Quantization
    scales: dict[str, torch.Tensor]  # layer (relative to the component) → scales


def write_scales(path: Path, quantized: QuantizedComponent) -> None:
    from safetensors.torch import save

    tensors = {f"{k}.weight_scale": v.contiguous() for k, v in quantized.scales.items()}
    quant = quantized.quant
    write_bytes_atomic(path, save(tensors, metadata={"bits": str(quant.bits), "group_size": str(quant.group_size or 0),
                                                     "method": str(quant.method), "columns": SCALE_COLUMNS}))


def read_scales(path: Path) -> QuantizedComponent:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            quant = Quantization(int(meta["bits"]), int(meta["group_size"]) or None, QuantMethod(meta["method"]))
            scales = {k.removesuffix(".weight_scale"): fh.get_tensor(k) for k in fh.keys()}
    except (KeyError, ValueError, UsageError, OSError) as exc:
        raise ModelFolderError(f"{path}: not an obsdiff quantization file ({str(exc).splitlines()[0][:200]})") from None
    return QuantizedComponent(quant, scales)


def _weight_shapes(folder: Path) -> dict[str, tuple[list[int], Path]]:
    """Parameter name → (shape, file) for a component's safetensors, read from their headers (no weights loaded)."""
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        if file.name == SCALES_FILE:
            continue
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        shapes.update({k: (v["shape"], file) for k, v in header.items() if k != "__metadata__"})
    return shapes


def check_scales(folder: Path, quantized: QuantizedComponent, layers: list[str] | None) -> int:
    """Every quantized layer has its scales (``layers``: those the record lists; None: a folder without a record is
    not a quantized obsdiff folder), each the shape the weight needs, finite and positive, and the weight on its grid.
    Returns how many layers were checked; any failure is one ``ModelFolderError`` naming the layer."""
    from safetensors import safe_open

    from obsdiff.quantize import codes_on_grid

    where = folder / SCALES_FILE
    if layers is None:
        raise ModelFolderError(f"{where}: a scales file without pruning.json beside the folder (not written by "
                               "obsdiff prune)")
    missing = sorted(set(layers) - set(quantized.scales))
    if missing:
        raise ModelFolderError(f"{where}: no scales for {len(missing)} quantized layer(s), e.g. {missing[0]}: "
                               "they would ship as float while the bundle claims integer codes")
    extra = sorted(set(quantized.scales) - set(layers))
    if extra:
        raise ModelFolderError(f"{where}: scales for {extra[0]}, which the record does not list as quantized")
    shapes = _weight_shapes(folder)
    for layer in layers:
        shape, file = shapes.get(f"{layer}.weight", (None, None))
        if shape is None:
            raise ModelFolderError(f"{where}: {layer} has scales but the folder has no weight {layer}.weight")
        problem = codes_on_grid(_read_tensor(safe_open, file, f"{layer}.weight"), quantized.scales[layer],
                                quantized.quant)
        if problem:
            raise ModelFolderError(f"{where}: {layer}: {problem}")
    return len(layers)


def _read_tensor(safe_open, file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as fh:
        return fh.get_tensor(key)


class PrunedFolder:
    """A diffusers pipeline folder, dense or written by ``obsdiff prune``: checked and read once, then asked.

    ``open`` fails in one line on anything that cannot be a pipeline folder or whose record does not parse, before
    any weight is loaded.
    """

    def __init__(self, path: Path, model_index: dict, record: PruningRecord | None) -> None:
        self.path, self.model_index, self.record = path, model_index, record

    @classmethod
    def open(cls, path: Path | str) -> PrunedFolder:
        path = Path(path)
        model_index = check_model_folder(path)
        file = path / RECORD_FILE
        record = None
        if file.is_file():
            try:
                record = PruningRecord.from_json(json.loads(file.read_text()))
            except PatternError as exc:
                raise ModelFolderError(f"{file}: {exc}") from None
            except (ValueError, KeyError, TypeError, AttributeError, UsageError) as exc:
                raise ModelFolderError(f"{file}: not an obsdiff record ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0][:200]})") from None
        return cls(path, model_index, record)

    @functools.cached_property
    def model_fingerprint(self) -> str:
        """Which dense model this folder is (or came from): bundles of one model compare their speed, others do not."""
        if self.record is not None and self.record.source_fingerprint:
            return self.record.source_fingerprint
        return folder_fingerprint(self.path)

    @property
    def sparsity(self) -> SparsitySpec | None:
        """The pattern the folder was pruned with (None: not pruned by obsdiff)."""
        return self.record.settings.sparsity if self.record else None

    @functools.cached_property
    def quantization(self) -> dict[str, QuantizedComponent]:
        """Component → its quantization and scales, for every component that holds a scales file, each checked on
        the way in (``check_scales``): a scale missing, misshapen, not finite and positive, or weights off their grid
        is a one-line error here, before any export work."""
        out = {}
        for file in sorted(self.path.glob(f"*/{SCALES_FILE}")):
            name = file.parent.name
            quantized = read_scales(file)
            layers = [r.layer for r in self.layers(name)] if self.record else None
            self.scales_checked[name] = check_scales(file.parent, quantized, layers)
            out[name] = quantized
        return out

    @functools.cached_property
    def scales_checked(self) -> dict[str, int]:
        """Component → how many quantized layers ``check_scales`` found on their grid (filled by ``quantization``)."""
        return {}

    def shapes(self, component: str) -> ComponentShapes:
        return self.record.shapes.get(component, ComponentShapes()) if self.record else ComponentShapes()

    def layers(self, component: str) -> list[LayerRecord]:
        """The mask layers the prune solved in ``component`` (structured units change shapes, not zeros)."""
        return [r for r in self.record.layers if r.component == component] if self.record else []

    def skipped(self, component: str) -> list[str]:
        """The layers the prune listed but left dense in ``component``, component-qualified."""
        summary = self.record.components.get(component) if self.record else None
        return [s.name for s in summary.skipped] if summary else []

    @property
    def reshaped_or_quantized(self) -> bool:
        """Its speed can differ from the dense model's: shapes changed, or weights became integer codes."""
        return self.record is not None and (any(self.record.shapes.values()) or bool(self.quantization)
                                            or self.record.settings.quantization is not None)

    def load_pipeline(self, dtypes: dict | None = None, leave_out: tuple[str, ...] = ()):
        """The pipeline, with structurally shrunk components rebuilt at their recorded shapes first; ``dtypes``:
        component → dtype to load it in; ``leave_out``: components loaded as None (SD3's T5)."""
        shrunk = {name: shapes for name, shapes in (self.record.shapes.items() if self.record else ()) if shapes}
        replaced = {name: load_shrunk_component(self.path / name, shapes.apply, skip=(SCALES_FILE,))
                    for name, shapes in shrunk.items()}
        return load_diffusers(self.path, self.model_index, {**replaced, **dict.fromkeys(leave_out)}, dtypes)


def load_pipeline(path: Path | str):
    """Load a local diffusers pipeline folder (dense, pruned, or structurally shrunk)."""
    return PrunedFolder.open(path).load_pipeline()


def write_pruned_folder(staging: Path, components: dict[str, nn.Module], record: PruningRecord,
                        quantized: dict[str, QuantizedComponent]) -> None:
    """The pruned components (safetensors), their scales and the record, into ``staging`` (which the caller already
    filled with the source's other files and renames into place)."""
    for name, module in components.items():
        module.save_pretrained(staging / name, safe_serialization=True)
        if name in quantized:
            write_scales(staging / name / SCALES_FILE, quantized[name])
    (staging / RECORD_FILE).write_text(json.dumps(record.to_json(), indent=2))


def copy_record(folder: PrunedFolder, destination: Path) -> None:
    """A bundle's copy of the record (``pruning.json`` beside the manifest), in the current format."""
    if folder.record is not None:
        (destination / RECORD_FILE).write_text(json.dumps(folder.record.to_json(), indent=2))


def with_timings(record: PruningRecord, **timings: float) -> PruningRecord:
    return replace(record, timings={**record.timings, **timings})

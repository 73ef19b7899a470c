"""Resume checkpoints: after every package, what is done so far, saved beside the output.

``.<out>.obsdiff-partial/`` holds ``progress.json`` (the settings' fingerprint, packages done per component, the
records so far, timings and a budget's allocation), each component's weights as its last finished package left
them (their metadata says which package that was), the quantization scales so far, and each process's recorded
trajectory (replay calibration: a resumed prune replays the very calls it would have, without recording them again).
Every file is written whole (temp, fsync, rename); a torn or stale component is named and starts over.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from obsdiff.atomic import discard_staging, fault_point, fsync_file, staging_path, write_bytes_atomic
from obsdiff.calibration import RecordedCall, trajectory_from_tensors, trajectory_to_tensors
from obsdiff.errors import UsageError
from obsdiff.pruned_folder import ComponentShapes, LayerRecord, QuantizedComponent, UnitRecord, read_scales, write_scales

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".obsdiff-partial"
PACKAGES_DONE = "obsdiff.packages_done"  # safetensors metadata: which progress state the weights belong to
FINGERPRINT = "obsdiff.fingerprint"  # trajectory metadata: the settings it was recorded with
RECORDED_AT = "obsdiff.recorded_at"  # trajectory metadata: the package it was recorded before (0: the model as given)
CALLS = "obsdiff.calls"  # trajectory metadata: the calls' structure (trajectory_to_tensors)


@dataclass
class Progress:
    """What is saved after each package, so an interrupted prune can resume."""

    fingerprint: str
    done: dict[str, int] = field(default_factory=dict)  # component -> packages finished
    layers: list[LayerRecord] = field(default_factory=list)
    units: list[UnitRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    allocation: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> unit -> groups to remove
    quantized: dict[str, QuantizedComponent] = field(default_factory=dict)  # component -> scales so far
    package_s: dict[str, dict[str, float]] = field(default_factory=dict)  # "component/index" -> measured seconds

    def forget(self, component: str) -> None:
        """Start ``component`` over (its checkpoint was unusable)."""
        self.done.pop(component, None)
        self.allocation.pop(component, None)
        self.quantized.pop(component, None)
        self.layers = [r for r in self.layers if r.component != component]
        self.package_s = {k: v for k, v in self.package_s.items() if not k.startswith(component + "/")}
        self.units = [u for u in self.units if u.component != component]

    def add_time(self, what: str, seconds: float) -> None:
        self.timings[what] = self.timings.get(what, 0.0) + seconds

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "done": self.done, "layers": [r.to_json() for r in self.layers],
                "units": [u.to_json() for u in self.units], "timings": self.timings, "allocation": self.allocation,
                "package_s": self.package_s}

    @classmethod
    def from_json(cls, data: dict) -> Progress:
        names = set(data["done"])
        return cls(data["fingerprint"], dict(data["done"]), [LayerRecord.from_json(r, names) for r in data["layers"]],
                   [UnitRecord.from_json(u) for u in data["units"]], dict(data["timings"]), dict(data["allocation"]),
                   package_s=dict(data.get("package_s", {})))


class Checkpoint:
    """The hidden folder beside ``out_dir`` that holds the finished packages of an interrupted prune."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.folder = out_dir.with_name(f".{out_dir.name}{PARTIAL_SUFFIX}")

    def start(self, fingerprint: str, components: dict[str, nn.Module], resume: bool, writer: bool) -> Progress:
        """The saved progress (``resume``), its components' weights loaded into ``components``; else a fresh start
        (the ``writer`` clears a stale folder)."""
        if resume and self.folder.is_dir():
            progress = self._load(fingerprint, components)
            log.info("resuming: %s", ", ".join(f"{c} {n} package(s) done" for c, n in progress.done.items())
                     or "nothing")
        else:
            progress = Progress(fingerprint)
            if writer:
                staging_path(self.out_dir, PARTIAL_SUFFIX)  # a stale one is removed
        if writer:
            self.folder.mkdir(parents=True, exist_ok=True)
        return progress

    def save(self, progress: Progress, name: str, component: nn.Module) -> None:
        """The component whose package just finished, its scales, then the progress: each written whole.

        The weights carry the package count in their metadata, so a crash between the renames is detected.
        """
        from safetensors.torch import save_model

        weights = self.folder / f"{name}.safetensors"
        tmp = weights.with_name(f".{weights.name}.tmp")
        save_model(component, str(tmp), metadata={PACKAGES_DONE: str(progress.done[name])})  # handles tied weights
        fsync_file(tmp)
        tmp.replace(weights)
        if name in progress.quantized:
            write_scales(self._scales_file(name), progress.quantized[name])
        fault_point("checkpoint-between-files")
        write_bytes_atomic(self.folder / "progress.json", json.dumps(progress.to_json()).encode())

    def save_trajectory(self, calls: list[RecordedCall], rank: int, fingerprint: str, recorded_at: int) -> None:
        """This process's recorded calls, written whole; a trajectory that cannot be saved only costs a re-recording."""
        from safetensors.torch import save_file

        try:
            tensors, spec = trajectory_to_tensors(calls)
        except TypeError as exc:
            log.warning("the recorded trajectory is not checkpointed (%s): a resume records it again", exc)
            return
        path = self._trajectory_file(rank)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={FINGERPRINT: fingerprint, RECORDED_AT: str(recorded_at),
                                               CALLS: json.dumps(spec)})
        fsync_file(tmp)
        tmp.replace(path)

    def load_trajectory(self, rank: int, fingerprint: str, device: str) -> tuple[list[RecordedCall], int] | None:
        """The saved calls and the package they were recorded before, or None (none saved, other settings, torn)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self._trajectory_file(rank)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            if meta.get(FINGERPRINT) != fingerprint:
                return None
            calls = trajectory_from_tensors(load_file(str(path), device=device), json.loads(meta[CALLS]))
            return calls, int(meta[RECORDED_AT])
        except Exception as exc:  # torn or unreadable: record again
            log.warning("--resume: %s is unusable (%s); recording again", path, str(exc).splitlines()[0][:120])
            return None

    def _trajectory_file(self, rank: int) -> Path:
        return self.folder / f"trajectory.rank{rank}.safetensors"

    def discard(self) -> None:
        discard_staging(self.out_dir, PARTIAL_SUFFIX)

    def _scales_file(self, name: str) -> Path:
        return self.folder / f"{name}.scales.safetensors"

    def _load(self, fingerprint: str, components: dict[str, nn.Module]) -> Progress:
        """The saved progress, with every component whose checkpoint is unreadable or stale started over."""
        path = self.folder / "progress.json"
        try:
            saved = Progress.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("--resume: %s is unreadable (%s); starting over", path, str(exc).splitlines()[0][:120])
            return Progress(fingerprint)
        if saved.fingerprint != fingerprint:
            raise UsageError(f"--resume: {self.folder} was made with other settings or prompts; remove it or drop "
                             "--resume")
        for name in list(saved.done):
            try:
                self._load_component(saved, name, components[name])
            except Exception as exc:  # a torn or stale file: that component starts over
                log.warning("--resume: checkpoint %s is unusable (%s); %s starts over",
                            self.folder / f"{name}.safetensors", str(exc).splitlines()[0][:120], name)
                saved.forget(name)
        return saved

    def _load_component(self, saved: Progress, name: str, module: nn.Module) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_model

        weights = self.folder / f"{name}.safetensors"
        with safe_open(str(weights), framework="pt") as fh:
            stamp = (fh.metadata() or {}).get(PACKAGES_DONE)
        if stamp != str(saved.done[name]):
            raise ValueError(f"holds package {stamp}, progress says {saved.done[name]}")
        shapes = ComponentShapes.from_units([u for u in saved.units if u.component == name])
        if shapes:
            shapes.apply(module)
        load_model(module, str(weights))
        if self._scales_file(name).is_file():
            saved.quantized[name] = read_scales(self._scales_file(name))

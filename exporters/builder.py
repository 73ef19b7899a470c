"""The interface every bundle format implements, and what a build returns; ``registry`` picks a builder per format.

``bundle.export_bundle`` (format-neutral: staging, gates, manifest, report, publish) calls ``build`` and
``report_sections``; ``bundle_check.validate_bundle_on_disk`` calls ``required_files`` and ``revalidate`` after
hashing every file. A build
returns a ``BuildResult``: per component its file and its sparsity report, the gates, notes and the format's own
details; the manifest, ``validation.json`` and the report are written from it.
"""

from __future__ import annotations

import ctypes
import gc
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from obsdiff.api import PrunedFolder
from obsdiff.exporters.export_plan import ExportPlan


@dataclass(frozen=True)
class Gate:
    """One validation gate; a failed one keeps the bundle from being published."""

    name: str
    value: float
    op: str  # ">=" or "<="
    limit: float

    @property
    def passed(self) -> bool:
        return bool(self.value >= self.limit if self.op == ">=" else self.value <= self.limit)

    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value, "op": self.op, "limit": self.limit, "passed": self.passed}


@dataclass(frozen=True)
class SparsityReport:
    """The pruned zeros of one component, in PyTorch and as the exported file stores them."""

    pruned_layers: int
    matched: int = 0  # pruned layers found in the export (through the name map)
    zero_fraction_torch: float = 0.0
    zero_fraction_export: float = 0.0
    zeros_preserved: bool = True
    lost: tuple[str, ...] = ()
    layers: dict[str, dict] = field(default_factory=dict)  # per layer: zero fraction in torch and in the export

    def to_json(self, with_layers: bool = True) -> dict:
        data = {"pruned_layers": self.pruned_layers}
        if self.pruned_layers:
            data.update(matched=self.matched, zero_fraction_torch=self.zero_fraction_torch,
                        zero_fraction_export=self.zero_fraction_export, zeros_preserved=self.zeros_preserved,
                        lost=list(self.lost))
            if with_layers:
                data["layers"] = self.layers
        return data


@dataclass
class ComponentResult:
    file: str  # relative to the bundle: what the device runs
    sparsity: SparsityReport
    details: dict = field(default_factory=dict)  # the format's own: comparisons, latency, sizes, int8 checks

    def to_json(self) -> dict:
        return {"file": self.file, "sparsity": self.sparsity.to_json(), **self.details}


@dataclass
class BuildResult:
    components: dict[str, ComponentResult] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # the format's own: end to end, engines, 2:4 report, layout

    def gate(self, name: str, value: float, op: str, limit: float) -> Gate:
        g = Gate(name, float(value), op, float(limit))
        self.gates.append(g)
        return g

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def to_json(self) -> dict:
        """``validation.json``, and the manifest's ``validation``."""
        return {**self.details, "components": {k: v.to_json() for k, v in self.components.items()},
                "gates": [g.to_json() for g in self.gates], "notes": self.notes}


class TorchPipelines:
    """The PyTorch pipelines an export is compared with: the pruned one and, optionally, the dense one.

    A builder takes what its gates need from them, then calls ``release`` before it loads the exported runtime: at SD
    size a PyTorch UNet and an ONNX Runtime session of the same UNet do not fit side by side in memory.
    """

    def __init__(self, folder: PrunedFolder, pipe, dense=None) -> None:
        self.folder, self._pipe, self._dense = folder, pipe, dense

    @property
    def pipe(self):
        if self._pipe is None:
            raise RuntimeError("the PyTorch pipeline was already released")
        return self._pipe

    @property
    def dense(self):
        return self._dense

    def release(self) -> None:
        self._pipe = self._dense = None
        gc.collect()
        return_freed_memory()


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise), so that the next phase starts low."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class BundleBuilder(ABC):
    """A format's builder: made from the export plan, which it only reads, and the end-to-end gate's prompts."""

    def __init__(self, plan: ExportPlan, prompts: list[str]) -> None:
        self.plan, self.prompts = plan, prompts

    @property
    def profile(self):
        return self.plan.profile

    def component_specs(self, pipe, dims: dict[str, int]) -> tuple:
        """The component descriptions this format writes, which the manifest lists (default: the pipeline's own)."""
        from obsdiff.exporters.components import specs_for

        return specs_for(pipe)

    @abstractmethod
    def build(self, models: TorchPipelines, staging: Path) -> BuildResult:
        """Write the format's files into ``staging``; return what was built and checked."""

    @abstractmethod
    def report_sections(self, result: BuildResult) -> list[str]:
        """Markdown lines for ``report.md`` after the gates table."""

    @classmethod
    @abstractmethod
    def revalidate(cls, bundle: Path, manifest: dict) -> dict:
        """Re-run the format's checks on a published bundle (its files already match the manifest)."""

    @classmethod
    @abstractmethod
    def required_files(cls, bundle: Path, manifest: dict) -> list[str]:
        """What a bundle of this format must hold, from the format, the pipeline family and, for a shipped target,
        its profile: never from the manifest's file list alone (its hashes are already checked against the disk)."""

"""The interface every bundle format implements; ``registry`` picks one per target format.

``bundle.export_bundle`` (format-neutral: staging, gates, manifest, report, publish) calls ``build`` and
``report_sections``; ``bundle.validate_bundle_on_disk`` calls ``revalidate`` after hashing every file.
"""

from __future__ import annotations

import ctypes
import gc
from abc import ABC, abstractmethod
from pathlib import Path

from obsdiff.errors import UsageError


class TorchPipelines:
    """The PyTorch pipelines an export is compared with: the pruned one and, optionally, the dense one.

    A builder takes what its gates need from them, then calls ``release`` before it loads the exported runtime: at SD
    size a PyTorch UNet and an ONNX Runtime session of the same UNet do not fit side by side in memory.
    """

    def __init__(self, pipe, dense=None, quantization: dict | None = None) -> None:
        self._pipe, self._dense = pipe, dense
        # component → (Quantization, layer → scales), from the folder's quantization files (``read_quantization``)
        self.quantization = quantization or {}

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
    def component_specs(self, pipe, dims: dict[str, int]) -> tuple:
        """The component descriptions this format writes, which the manifest lists (default: the pipeline's own)."""
        from obsdiff.exporters.components import specs_for

        return specs_for(pipe)

    def check_quantization(self, quantization: dict) -> None:
        """Refuse, before anything is loaded, a quantized folder (component → (Quantization, scales)) that this
        format cannot carry. Formats that write integer weights override this; the others refuse them rather than
        ship the dequantized floats as if they were the int8 model."""
        if quantization:
            name = getattr(getattr(self, "profile", None), "name", type(self).__name__)
            raise UsageError(f"target {name} cannot carry integer weights ({', '.join(sorted(quantization))} quantized)")

    @abstractmethod
    def build(self, models: TorchPipelines, staging: Path, record: dict | None = None) -> dict:
        """Write the format's files into ``staging``; return results with ``components`` and ``gates``."""

    @abstractmethod
    def report_sections(self, results: dict) -> list[str]:
        """Markdown lines for ``report.md`` after the gates table."""

    @classmethod
    @abstractmethod
    def revalidate(cls, bundle: Path, manifest: dict) -> dict:
        """Re-run the format's checks on a published bundle (its files already match the manifest)."""

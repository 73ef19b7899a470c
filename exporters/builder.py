"""The interface every bundle format implements; ``registry`` picks one per target format.

``bundle.export_bundle`` (format-neutral: staging, gates, manifest, report, publish) calls ``build`` and
``report_sections``; ``bundle.validate_bundle_on_disk`` calls ``revalidate`` after hashing every file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class BundleBuilder(ABC):
    @abstractmethod
    def build(self, pipe, staging: Path, dense_pipe=None, record: dict | None = None) -> dict:
        """Write the format's files into ``staging``; return results with ``components`` and ``gates``."""

    @abstractmethod
    def report_sections(self, results: dict) -> list[str]:
        """Markdown lines for ``report.md`` after the gates table."""

    @classmethod
    @abstractmethod
    def revalidate(cls, bundle: Path, manifest: dict) -> dict:
        """Re-run the format's checks on a published bundle (its files already match the manifest)."""

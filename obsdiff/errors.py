"""Typed errors. The CLI turns any ``ObsdiffError`` into one line on stderr and a non-zero exit."""

from __future__ import annotations


class ObsdiffError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 1


class UsageError(ObsdiffError):
    """Bad options or option combinations."""

    exit_code = 2


class ModelFolderError(ObsdiffError):
    """A model folder is missing, incomplete or corrupted."""


class CalibrationError(ObsdiffError):
    """Calibration saw something it cannot use (non-finite activations, no steps)."""


class SolverError(ObsdiffError):
    """The OBS solve failed even after raising the damping."""


class ExportError(ObsdiffError):
    """An exporter could not produce an artifact."""


class GateError(ObsdiffError):
    """A validation gate failed: the bundle is not published."""

    exit_code = 3


class BundleError(ObsdiffError):
    """A bundle on disk is incomplete or does not match its manifest."""

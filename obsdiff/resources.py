"""Data that ships inside the package: target profiles and calibration prompt sets.

In the source tree they are the top-level ``targets/`` and ``calibration_data/`` folders; setuptools maps them
into the package (``obsdiff.targets``, ``obsdiff.calibration_data``), so an installed wheel finds them through
``importlib.resources`` wherever it is run from.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

MODEL_PROMPTS = "calibration_prompts.txt"  # a model folder may ship its own calibration prompts


def targets_dir() -> Path:
    return Path(str(files("obsdiff.targets")))


def calibration_file(name: str) -> Path:
    return Path(str(files("obsdiff.calibration_data"))) / name


def general_prompts_file() -> Path:
    """220 general captions: the calibration default for models that ship no prompts of their own."""
    return calibration_file("general.txt")


def default_prompts_file(model_dir: Path) -> Path:
    """The model's own ``calibration_prompts.txt`` if it has one, else the general captions."""
    own = Path(model_dir) / MODEL_PROMPTS
    return own if own.is_file() else general_prompts_file()


def read_prompt_lines(path: Path) -> list[str]:
    """Non-empty, non-comment lines."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]


def model_prompts(model_dir: Path, count: int) -> list[str]:
    """The first ``count`` prompts a model is calibrated with (for gates and FLOP counts): never example-specific."""
    return read_prompt_lines(default_prompts_file(model_dir))[:count]

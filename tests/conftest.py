"""Shared fixtures: the shipped default model and tiny pipelines built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

from tiny_pipelines import BUILDERS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "digits-sd"
DEFAULT_JUDGE = REPO / "models" / "digits-judge"


@pytest.fixture(scope="session")
def default_model() -> Path:
    assert (DEFAULT_MODEL / "model_index.json").is_file(), "the shipped default model is missing"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny("sd" | "sdxl" | "sd3" | "flux") → folder, built once per session."""
    cache: dict[str, Path] = {}

    def get(family: str, **kwargs) -> Path:
        key = family + repr(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = BUILDERS[family](tmp_path_factory.mktemp(f"tiny_{family}"), **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def pruned_24(default_model, tmp_path_factory) -> Path:
    """The default model pruned 2:4 with a short calibration (shared by the export tests)."""
    from obsdiff.prune import PruneConfig, prune
    from obsdiff.sparsity import NM

    out = tmp_path_factory.mktemp("p") / "model24"
    prune(default_model, out, PruneConfig(sparsity=NM(2, 4), num_prompts=8, steps=5, batch_size=8, packages=2))
    return out


@pytest.fixture(scope="session")
def cpu_bundle(pruned_24, default_model, tmp_path_factory) -> Path:
    """The 2:4 model exported for the cpu target (shared by the ONNX and the reliability tests)."""
    from obsdiff.exporters.bundle import export_bundle

    out = tmp_path_factory.mktemp("b") / "cpu"
    export_bundle(pruned_24, "cpu", out, dense_model=default_model)
    return out


def run_cli(*args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess (exit codes and stderr as a user sees them)."""
    proc = subprocess.run([sys.executable, "-m", "obsdiff", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"obsdiff {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line; fails if there is a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("obsdiff: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def calibrated_layer(model_dir, name: str):
    """One UNet layer of a pipeline folder and its Hessian from 20 prompts × 10 steps of real calibration."""
    import torch

    from obsdiff.calibration import CalibrationSettings, PackageHooks, run_pipeline
    from obsdiff.digits.data import prompt_for
    from obsdiff.hessian import StepContext, timestep_weights
    from obsdiff.model_io import load_pipeline

    pipe = load_pipeline(model_dir)
    layer = dict(pipe.unet.named_modules())[name]
    ctx = StepContext(timestep_weights("log-decrease", 10))
    hooks = PackageHooks({name: layer}, ctx, weighted=True)
    with hooks, torch.no_grad():
        run_pipeline(pipe, CalibrationSettings([prompt_for(i % 10) for i in range(20)], steps=10, batch_size=10), ctx,
                     decode=False)
    return layer, hooks.hessian(name).hessian

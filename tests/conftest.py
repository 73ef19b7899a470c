"""Shared fixtures: the shipped default model, tiny pipelines, and the expensive prunes and exports, each made once
per session and reused; the command line run in process unless the test is about the process."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
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
FAST = dict(num_prompts=8, steps=5, batch_size=8, packages=2)  # the short calibration most prunes here use


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
    prune(default_model, out, PruneConfig(sparsity=NM(2, 4), **FAST))
    return out


STACKED = dict(num_prompts=4, steps=3, packages=2)  # with Structured(--flops 0.7) + Quantization(8): see stacked_config


def stacked_config():
    """One stacked prune's settings: the denoiser shrunk to 70% of its FLOPs, then GPTQ int8 on the shrunk layers."""
    from obsdiff.prune import PruneConfig
    from obsdiff.quantize import Quantization
    from obsdiff.sparsity import Budget, Measure, Structured

    return PruneConfig(sparsity=Structured(budget=Budget(Measure.FLOPS, 0.7)), quantization=Quantization(8), **STACKED)


@pytest.fixture(scope="session")
def stacked_model(default_model, tmp_path_factory) -> Path:
    """The default model through one stacked prune (shared by the quantization and the int8 export tests)."""
    from obsdiff.prune import prune

    out = tmp_path_factory.mktemp("stacked") / "model"
    prune(default_model, out, stacked_config())
    return out


@pytest.fixture(scope="session")
def pruned_tiny(tiny, tmp_path_factory) -> Path:
    """The tiny SD pipeline pruned 50% unstructured (shared by the gate and reliability tests)."""
    from obsdiff.prune import PruneConfig, prune
    from obsdiff.sparsity import Unstructured

    out = tmp_path_factory.mktemp("pt") / "model"
    prune(tiny("sd"), out, PruneConfig(sparsity=Unstructured(0.5), num_prompts=2, steps=2, packages=1))
    return out


@pytest.fixture(scope="session")
def cpu_bundle(pruned_24, default_model, tmp_path_factory) -> Path:
    """The 2:4 model exported for the cpu target (shared by the ONNX and the reliability tests)."""
    from obsdiff.exporters.bundle import export

    out = tmp_path_factory.mktemp("b") / "cpu"
    export(pruned_24, "cpu", out, dense_model=default_model)
    return out


@pytest.fixture(scope="session")
def android_bundle(pruned_24, tmp_path_factory) -> Path:
    """The 2:4 model for android (ORT format), with a short end-to-end gate."""
    from obsdiff.exporters.bundle import export

    out = tmp_path_factory.mktemp("a") / "android"
    export(pruned_24, "android", out, export_options(gate_prompts=2, gate_steps=5))
    return out


@pytest.fixture(scope="session")
def jetson_bundle(pruned_24, tmp_path_factory) -> Path:
    from obsdiff.exporters.bundle import export

    out = tmp_path_factory.mktemp("j") / "jetson"
    export(pruned_24, "jetson", out, export_options(gate_prompts=2, gate_steps=5))
    return out


@pytest.fixture(scope="session")
def int8_model(default_model, tmp_path_factory) -> Path:
    """The default model's UNet with int8 GPTQ weights (quantize only)."""
    from obsdiff.prune import PruneConfig, prune
    from obsdiff.quantize import Quantization
    from obsdiff.sparsity import Dense

    out = tmp_path_factory.mktemp("int8") / "model"
    prune(default_model, out, PruneConfig(sparsity=Dense(), quantization=Quantization(8), num_prompts=4, steps=3,
                                          packages=2))
    return out


@pytest.fixture(scope="session")
def cpu_int8_bundle(int8_model, tmp_path_factory) -> Path:
    """The int8 model for cpu-int8; two prompts, every step: the activation ranges span the schedule."""
    from obsdiff.exporters.bundle import export

    out = tmp_path_factory.mktemp("i8") / "bundle"
    export(int8_model, "cpu-int8", out, export_options(gate_prompts=2))
    return out


@pytest.fixture(scope="session")
def fast_profile(tmp_path_factory):
    """fast_profile("cpu") → a copy of the profile whose end-to-end gate runs 2 steps (gate tests export in seconds)."""
    folder = tmp_path_factory.mktemp("profiles")

    def get(target: str) -> Path:
        path = folder / f"{target}_fast.toml"
        if not path.exists():
            text = (REPO / "targets" / f"{target}.toml").read_text()
            path.write_text(text.replace("steps = 25\nguidance", "steps = 2\nguidance"))
        return path

    return get


def export_options(**kwargs):
    """``ExportOptions`` with shape overrides by name (height, width, batch, gate_prompts, gate_steps)."""
    from obsdiff.exporters.export_plan import ExportOptions, ShapeOverrides

    shape_keys = {"height", "width", "batch", "gate_prompts", "gate_steps"}
    shapes = ShapeOverrides(**{k: v for k, v in kwargs.items() if k in shape_keys})
    return ExportOptions(shapes=shapes, **{k: v for k, v in kwargs.items() if k not in shape_keys})


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args) -> CliResult:
    """The command line in this process (its exit code, stdout and stderr), for tests not about the process."""
    from obsdiff.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli(*args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess: for what is about the process (signals, exit on a kill)."""
    proc = subprocess.run([sys.executable, "-m", "obsdiff", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"obsdiff {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def shown_lines(stderr: str) -> list[str]:
    """The lines a terminal shows of ``stderr``: a progress bar cleared with carriage returns leaves nothing."""
    return [shown for ln in stderr.split("\n") if (shown := ln.split("\r")[-1].strip())]


def error_line(proc) -> str:
    """The one error line; fails if there is a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in shown_lines(proc.stderr) if ln.startswith("obsdiff: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@contextlib.contextmanager
def interrupted_at(monkeypatch, stage: str, nth: int = 1):
    """Ctrl-C (SIGINT: a KeyboardInterrupt) the ``nth`` time the run reaches ``stage``: ``OBSDIFF_FAULT``, the one
    interruption mechanism, in process."""
    from obsdiff import atomic

    atomic._fault_hits.clear()
    monkeypatch.setenv("OBSDIFF_FAULT", f"{stage}:SIGINT#{nth}")
    try:
        yield
    finally:
        monkeypatch.delenv("OBSDIFF_FAULT")
        atomic._fault_hits.clear()


def calibrated_layer(model_dir, name: str):
    """One UNet layer of a pipeline folder and its Hessian from 20 prompts × 10 steps of real calibration."""
    from obsdiff.calibration import CalibrationSettings, PackageHooks, run_pipeline
    from obsdiff.digits.data import prompt_for
    from obsdiff.hessian import StepContext, timestep_weights
    from obsdiff.pruned_folder import load_pipeline

    pipe = load_pipeline(model_dir)
    layer = dict(pipe.unet.named_modules())[name]
    ctx = StepContext(timestep_weights("log-decrease", 10))
    hooks = PackageHooks({name: layer}, ctx, weighted=True)
    with hooks, torch.no_grad():
        run_pipeline(pipe, CalibrationSettings([prompt_for(i % 10) for i in range(20)], steps=10, batch_size=10), ctx,
                     decode=False)
    return layer, hooks.hessian(name).hessian

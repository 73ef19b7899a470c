"""torchrun with gloo: 2 CPU processes give the single-process result; a dying rank leaves no output."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

ARGS = ["--pattern", "2:4", "--num-prompts", "16", "--steps", "6", "--packages", "2", "--batch-size", "4",
        "--hessian-dtype", "float64"]


def _run(nproc: int, model, out, *extra, env=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    cmd = [*launcher, "-m", "obsdiff", "-q", "prune", str(model), "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _weights(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _max_relative_difference(a, b):
    return max(((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30)).item() for k in a)


@pytest.fixture(scope="module")
def single_process(default_model, tmp_path_factory):
    """The one-process prune both tests compare against."""
    out = tmp_path_factory.mktemp("single") / "one"
    assert _run(1, default_model, out).returncode == 0
    return out


def test_two_processes_equal_one(default_model, single_process, tmp_path):
    double = tmp_path / "two"
    proc = _run(2, default_model, double)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _weights(single_process), _weights(double)
    assert _max_relative_difference(a, b) <= 1e-5
    assert all(torch.equal(a[k] == 0, b[k] == 0) for k in a)
    assert not list(tmp_path.glob(".*partial"))


def test_a_dying_rank_leaves_no_output_and_resume_continues(default_model, single_process, tmp_path):
    out = tmp_path / "out"
    proc = _run(2, default_model, out, env={"OBSDIFF_FAULT": "after-package@1"})  # rank 1 is killed after package 1
    assert proc.returncode != 0 and "exitcode: -9" in proc.stderr
    assert not out.exists()
    assert (tmp_path / ".out.obsdiff-partial" / "progress.json").is_file()
    proc = _run(2, default_model, out, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _max_relative_difference(_weights(single_process), _weights(out)) <= 1e-5

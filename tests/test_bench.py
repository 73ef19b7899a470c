"""Benchmarking where the bundle runs: ``benchmark.py`` in a fresh venv with only onnxruntime and numpy, its numpy
pipeline against the export's image, ``obsdiff bench`` and ``obsdiff compare``, and their bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli, error_line

from obsdiff.exporters.device.benchmark import SCHEMA, ClipTokenizer, schema_errors

RUNS = ["--runs", "3", "--warmup", "1", "--e2e-runs", "1"]


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory) -> Path:
    """A venv with onnxruntime and numpy only (at the project's pins), and jsonschema in a folder of its own: the
    results are checked against the shipped schema by the reference implementation, outside the runner's venv."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root / "env")], check=True)
    pip = [str(root / "env" / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "-c", str(REPO / "constraints.txt")]
    subprocess.run([*pip, "onnxruntime", "numpy"], check=True)
    subprocess.run([*pip, "--target", str(root / "jsonschema"), "jsonschema"], check=True)
    return root


def _copied(bundle: Path, tmp_path: Path) -> Path:
    """The bundle alone, outside the repository and the test tree."""
    out = tmp_path / "device" / bundle.name
    shutil.copytree(bundle, out)
    return out


def _run_fresh(fresh_venv: Path, bundle: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = bundle.parent / f"{bundle.name}.json"
    proc = subprocess.run([str(fresh_venv / "env" / "bin" / "python"), "benchmark.py", *RUNS, "--json", str(result),
                           *args], cwd=bundle, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    check = subprocess.run(  # the reference validator, on the schema file the bundle ships
        [sys.executable, "-c", "import json, sys, jsonschema; jsonschema.Draft202012Validator("
         "json.load(open(sys.argv[1]))).validate(json.load(open(sys.argv[2])))", str(bundle / "benchmark.schema.json"),
         str(result)], capture_output=True, text=True, env={"PYTHONPATH": str(fresh_venv / "jsonschema")})
    assert check.returncode == 0, check.stderr
    return proc, json.loads(result.read_text())


@pytest.mark.parametrize("name", ["cpu_bundle", "cpu_int8_bundle", "android_bundle", "jetson_bundle"])
def test_benchmark_runs_in_a_fresh_venv_and_computes_the_real_pipeline(fresh_venv, tmp_path, request, name):
    bundle = _copied(request.getfixturevalue(name), tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"benchmark.py", "benchmark.schema.json", "reference/pipeline.safetensors"} <= set(manifest["files"])
    extra = ["--runtime", "onnxruntime"] if name == "jetson_bundle" else []
    proc, result = _run_fresh(fresh_venv, bundle, *extra)
    assert schema_errors(result, SCHEMA) == []
    assert {c["name"] for c in result["components"]} == set(manifest["components"])
    for comp in result["components"]:
        assert len(comp["samples_ms"]) == comp["stats"]["runs"] == 3
        assert comp["stats"]["min_ms"] <= comp["stats"]["p50_ms"] <= comp["stats"]["p90_ms"] <= comp["stats"]["max_ms"]
        assert comp["file"] == manifest["components"][comp["name"]]["file"]  # android: the .ort files
    e2e = result["end_to_end"]
    assert e2e["ran"] and e2e["tokens_match_reference"] and e2e["steps"] == manifest["shapes"]["steps"]
    assert e2e["psnr_db_vs_reference"] >= 40.0, e2e
    assert result["bundle"]["model_fingerprint"] and result["peak_rss_mb"] > 0
    if name == "android_bundle":  # XNNPACK is not in the PyPI build: said, and the CPU EP used
        assert any("XnnpackExecutionProvider not in this onnxruntime build" in n for n in result["notes"])
    assert "end to end" in proc.stdout and "p90" in proc.stdout


def test_obsdiff_bench_runs_the_bundle_runner_and_compare_writes_table_and_plot(cpu_bundle, jetson_bundle, tmp_path):
    results = []
    for i, (bundle, extra) in enumerate([(cpu_bundle, []), (cpu_bundle, []), (jetson_bundle, ["--runtime",
                                                                                              "onnxruntime"])]):
        path = tmp_path / f"r{i}.json"
        proc = subprocess.run([sys.executable, "-m", "obsdiff", "bench", str(bundle), *RUNS, "--json", str(path),
                               *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        results.append(path)
    proc = cli("compare", *results, "--out", tmp_path / "cmp", "--baseline", "1")
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| unet |" in table and "| end to end |" in table and "**1.00×**" in table and "jetson" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


def test_compare_refuses_speedups_across_models_and_bad_results(cpu_bundle, tmp_path):
    path = tmp_path / "r.json"
    assert cli("bench", cpu_bundle, "--runs", "2", "--warmup", "0", "--e2e-runs", "0", "--json", path).returncode == 0
    other = json.loads(path.read_text())
    other["bundle"]["model_fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc = cli("compare", path, tmp_path / "other.json", "--out", tmp_path / "cmp", "--baseline", "1")
    assert proc.returncode == 2 and "bundles of different models" in error_line(proc)
    assert cli("compare", path, tmp_path / "other.json", "--out", tmp_path / "cmp").returncode == 0  # side by side
    del other["components"][0]["stats"]["p90_ms"]
    (tmp_path / "broken.json").write_text(json.dumps(other))
    proc = cli("compare", path, tmp_path / "broken.json", "--out", tmp_path / "cmp2")
    assert proc.returncode == 2 and "does not follow obsdiff-benchmark/1" in error_line(proc)
    assert "p90_ms" in error_line(proc) and not (tmp_path / "cmp2").exists()


def test_benchmark_bad_input_is_one_line(cpu_bundle, tmp_path):
    bundle = _copied(cpu_bundle, tmp_path)
    runner = [sys.executable, str(bundle / "benchmark.py")]
    cases = [(["--runs", "0"], "--runs: must be a whole number >= 1"),
             (["--seconds", "-1"], "--seconds: must be a number of seconds > 0"),
             (["--components", "nope"], "no component nope in this bundle")]
    for args, message in cases:
        proc = subprocess.run([*runner, *args], capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "target": "fridge", "format": "tflite"}))
    proc = subprocess.run(runner, capture_output=True, text=True)
    assert proc.returncode == 2 and "target 'fridge' has format 'tflite'" in proc.stderr.strip()
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "format": "coreml"}))
    proc = subprocess.run(runner, capture_output=True, text=True)
    if sys.platform != "darwin":
        assert proc.returncode == 2 and "Core ML prediction needs macOS" in proc.stderr.strip()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([*runner, "--runtime", "tensorrt"], capture_output=True, text=True)
    assert proc.returncode == 2 and "tensorrt or polygraphy is not installed" in proc.stderr.strip()
    hidden = tmp_path / "no_ort"  # a Python without onnxruntime: the runner names the package
    hidden.mkdir()
    (hidden / "onnxruntime.py").write_text("raise ImportError('hidden for this test')\n")
    proc = subprocess.run(runner, capture_output=True, text=True, env={"PYTHONPATH": str(hidden)})
    assert proc.returncode == 2 and "pip install onnxruntime" in proc.stderr.strip()
    proc = cli("bench", tmp_path)
    assert proc.returncode == 2 and "no manifest.json" in error_line(proc)


def test_the_runner_tokenizer_is_clip(default_model):
    """The numpy runner's BPE gives the ids transformers' CLIPTokenizer gives, on every calibration prompt."""
    from transformers import CLIPTokenizer

    ours, theirs = ClipTokenizer(default_model / "tokenizer"), CLIPTokenizer.from_pretrained(default_model / "tokenizer")
    prompts = (default_model / "calibration_prompts.txt").read_text().splitlines()[:200]
    prompts += ["", "  Mixed   CASE, punctuation!? and_underscores 123", "x" * 400]
    for prompt in prompts:
        want = theirs(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours(prompt).tolist() == [want], prompt

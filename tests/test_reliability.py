"""Nothing lost, nothing trusted blindly: inputs are never modified, outputs appear whole or not at all,
``validate`` checks every file on disk, every gate is seen failing, and runs killed at each stage boundary
leave nothing half-written behind."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, cli, error_line, interrupted_at, run_cli
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

from obsdiff.errors import BundleError, GateError, UsageError
from obsdiff.exporters import coreml
from obsdiff.exporters import onnx as onnx_exporter
from obsdiff.exporters.bundle import export
from obsdiff.exporters.bundle_check import validate_bundle_on_disk
from obsdiff.exporters.profiles import load_profile
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder
from obsdiff.quantize import Quantization
from obsdiff.sparsity import Dense, Unstructured

FAST = ["--num-prompts", "2", "--steps", "2", "--packages", "2", "--batch-size", "2"]
KILLED = -9  # SIGKILL: the process gets no chance to clean up


def tree_digest(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links as their target text): equal digests mean nothing was touched."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".obsdiff-" in p.name)


@pytest.fixture(scope="module")
def fast_cpu(fast_profile) -> Path:
    """The cpu profile with a 2-step end-to-end gate, so that the gate tests export in seconds."""
    path = fast_profile("cpu")
    assert load_profile(path).shapes.steps == 2
    return path


# ---- 1, 2: ship and prune never delete or overwrite an input ------------------------------------------------


def test_ship_refuses_an_output_that_holds_its_model(tiny, tmp_path):
    out = tmp_path / "OUT"
    shutil.copytree(tiny("sd"), out / "model")
    before = tree_digest(out)
    proc = cli("ship", "--target", "cpu", "--model", out / "model", "--out", out)
    assert proc.returncode == 2 and "overlaps the model" in error_line(proc)
    assert tree_digest(out) == before


def test_ship_checks_every_option_before_touching_the_previous_output(tiny, tmp_path):
    out = tmp_path / "OUT"
    (out / "model").mkdir(parents=True)
    (out / "model" / "keep.txt").write_text("previous result")
    proc = cli("ship", "--target", "cpu", "--model", tiny("sd"), "--out", out, "--pattern", "unstructured",
                   "--sparsity", "2")
    assert proc.returncode == 2 and "(0, 1)" in error_line(proc)
    assert (out / "model" / "keep.txt").read_text() == "previous result"


def test_a_refused_ship_leaves_no_output_folder(tiny, tmp_path):
    proc = cli("ship", "--target", "jetson", "--model", tiny("sd"), "--out", tmp_path / "j", "--pattern", "unstructured")
    assert proc.returncode == 2 and "accepts 2:4" in error_line(proc)
    assert list(tmp_path.iterdir()) == []


def test_prune_refuses_an_output_equal_to_inside_or_around_its_model(tiny, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny("sd"), model)
    before = tree_digest(model)
    for out in (model, model / "sub", tmp_path):
        proc = cli("prune", model, "--out", out, "--overwrite", *FAST)
        assert proc.returncode == 2 and "overlaps the model" in error_line(proc), out
    assert tree_digest(model) == before


# ---- 3: validate sees every byte ------------------------------------------------------------------------------


@pytest.fixture
def bundle_copy(cpu_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(cpu_bundle, copy)
    return copy


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_validate_refuses_a_changed_file_whose_manifest_line_was_deleted(bundle_copy):
    model = bundle_copy / "unet" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    _edit_manifest(bundle_copy, lambda m: m["files"].pop("unet/model.onnx"))
    proc = cli("validate", bundle_copy)
    assert proc.returncode != 0 and "unet/model.onnx is not listed in the manifest" in error_line(proc)


def test_validate_refuses_extra_files_and_links(bundle_copy):
    (bundle_copy / "notes.txt").write_text("not part of the bundle")
    with pytest.raises(BundleError, match="notes.txt is not listed"):
        validate_bundle_on_disk(bundle_copy)
    (bundle_copy / "notes.txt").unlink()
    (bundle_copy / "unet" / "link.onnx").symlink_to(bundle_copy / "unet" / "model.onnx")
    with pytest.raises(BundleError, match="link.onnx is a symbolic link"):
        validate_bundle_on_disk(bundle_copy)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(files={}), "no 'files' table"),
    (lambda m: m.pop("files"), "no 'files' table"),
    (lambda m: m["files"].update({"../outside.txt": "0" * 64}), "points outside the bundle"),
    (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "points outside the bundle"),
    (lambda m: m.pop("components"), "missing 'components'"),
])
def test_validate_refuses_a_manifest_that_does_not_cover_the_disk(bundle_copy, edit, message):
    (bundle_copy.parent / "outside.txt").write_text("outside")
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        validate_bundle_on_disk(bundle_copy)


# ---- 4, 8, 9: what the loader takes from a model folder ---------------------------------------------------------


def test_pickled_weights_are_refused_in_one_line_with_the_way_out(tiny, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny("sd"), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    proc = cli("-q", "prune", model, "--out", tmp_path / "o", *FAST)
    line = error_line(proc)
    assert proc.returncode != 0 and "pickled weights are not loaded" in line and "safe_serialization=True" in line
    assert proc.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "o").exists()


def test_links_in_the_model_folder_are_not_copied(tiny, tmp_path, caplog):
    model = tmp_path / "m"
    shutil.copytree(tiny("sd"), model)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (model / "notes.txt").symlink_to("/etc/passwd")
    (model / "more").symlink_to(outside)
    out = tmp_path / "o"
    with caplog.at_level("WARNING"):
        assert cli("prune", model, "--out", out, *FAST).returncode == 0
    assert not (out / "notes.txt").exists() and not (out / "more").exists()
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    assert "skipped 2 symbolic link(s)" in caplog.text and "notes.txt" in caplog.text


def test_a_wrong_shape_weight_names_the_tensor_and_both_shapes(tiny, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny("sd"), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    shape = tuple(state["conv_in.weight"].shape)
    state["conv_in.weight"] = torch.zeros(shape[0] + 1, *shape[1:])
    save_file(state, weights)
    line = error_line(cli("info", model))
    assert "conv_in.weight" in line
    assert str(shape[0] + 1) in line and str(shape[0]) in line


# ---- 5: checkpoints are written whole ---------------------------------------------------------------------------


def test_a_torn_checkpoint_is_named_and_its_component_starts_over(tiny, tmp_path, caplog, monkeypatch):
    src = tiny("sd")
    cfg = lambda: PruneConfig(sparsity=Unstructured(0.5), num_prompts=4, steps=3, packages=3)  # noqa: E731
    prune(src, tmp_path / "full", cfg())
    out = tmp_path / "out"
    with interrupted_at(monkeypatch, "after-package", 2), pytest.raises(KeyboardInterrupt):
        prune(src, out, cfg())
    checkpoint = tmp_path / ".out.obsdiff-partial" / "unet.safetensors"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        record = prune(src, out, cfg(), resume=True)
    assert f"checkpoint {checkpoint} is unusable" in caplog.text and "unet starts over" in caplog.text
    a = load_file(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(record.layers) == len(PrunedFolder.open(tmp_path / "full").record.layers)


# ---- 7: every option and profile field is checked before work starts ------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--height", "17"], "--height must be a positive multiple of 8"),
    (["--height", "1"], "--height must be a positive multiple of 8"),
    (["--alpha-min", "nan"], "must be a finite number"),
    (["--blocks", "-1"], "--blocks: '-1' is neither an index"),
    (["--blocks", "3-1"], "runs backwards"),
    (["--packages", "0"], "--packages must be a whole number ≥ 1"),
    (["--damp", "1.5"], "--damp must be a finite number in [0, 1)"),
])
def test_bad_options_fail_in_one_line_before_any_work(default_model, tmp_path, args, message):
    proc = cli("prune", default_model, "--out", tmp_path / "o", *args)
    assert proc.returncode == 2 and message in error_line(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("line,message", [("height = 0", "[shapes] height must be a positive multiple of 8"),
                                          ('height = "sixteen"', "[shapes] height must be a whole number"),
                                          ("batch = 1.5", "[shapes] batch must be a whole number")])
def test_bad_profile_fields_name_the_field_and_the_file(tmp_path, line, message, pruned_tiny):
    key = line.split()[0]
    text = (REPO / "targets" / "cpu.toml").read_text()
    if f"\n{key} =" in text:
        text = "\n".join(line if ln.startswith(f"{key} =") else ln for ln in text.splitlines())
    else:
        text = text.replace("[shapes]\n", f"[shapes]\n{line}\n")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_profile(path)
    assert message in str(info.value) and str(path) in str(info.value)
    proc = cli("export", pruned_tiny, "--target", path, "--out", tmp_path / "b")
    assert proc.returncode == 2 and message in error_line(proc) and not (tmp_path / "b").exists()


# ---- gates seen failing: a broken export is refused by name and never published --------------------------------


def _refused(exc: pytest.ExceptionInfo, gate: str, out: Path) -> None:
    assert gate in str(exc.value) and "bundle not published" in str(exc.value)
    assert "\n" not in str(exc.value)
    assert not out.exists() and leftovers(out.parent) == []


def _corrupt_after_export(monkeypatch, corrupt) -> None:
    """The real ONNX export, then ``corrupt(folder)`` on what it wrote, before the validators run."""
    real = onnx_exporter.export_onnx

    def export_then_corrupt(pipe, out_dir, *args, **kwargs):
        paths = real(pipe, out_dir, *args, **kwargs)
        corrupt(Path(out_dir))
        return paths

    monkeypatch.setattr(onnx_exporter, "export_onnx", export_then_corrupt)


def _edit_unet_initializer(folder: Path, edit) -> None:
    path = folder / "unet" / "model.onnx"
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    biggest.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(biggest).copy()), biggest.name))
    onnx.save(model, str(path))


def test_cosine_gate_refuses_a_flipped_weight(pruned_tiny, fast_cpu, tmp_path, monkeypatch):
    _corrupt_after_export(monkeypatch, lambda f: _edit_unet_initializer(f, lambda w: -w))
    out = tmp_path / "b"
    with pytest.raises(GateError) as exc:
        export(pruned_tiny, str(fast_cpu), out)
    _refused(exc, "unet cosine", out)


def test_zeros_gate_refuses_a_densified_tensor(pruned_tiny, fast_cpu, tmp_path, monkeypatch):
    _corrupt_after_export(monkeypatch, lambda f: _edit_unet_initializer(f, lambda w: np.where(w == 0, 1e-7, w)))
    out = tmp_path / "b"
    with pytest.raises(GateError) as exc:
        export(pruned_tiny, str(fast_cpu), out)
    _refused(exc, "unet pruned zeros survive export", out)
    assert "unet cosine" not in str(exc.value)  # 1e-7 changes nothing the cosine sees: only this gate catches it


def test_image_psnr_gate_refuses_a_wrong_scheduler(pruned_tiny, fast_cpu, tmp_path, monkeypatch):
    def other_schedule(folder: Path) -> None:
        path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        config["beta_end"] = config["beta_end"] * 3
        path.write_text(json.dumps(config))

    _corrupt_after_export(monkeypatch, other_schedule)
    out = tmp_path / "b"
    with pytest.raises(GateError) as exc:
        export(pruned_tiny, str(fast_cpu), out)
    _refused(exc, "image PSNR dB", out)
    assert "cosine" not in str(exc.value)


def test_2of4_gate_refuses_a_forced_unstructured_jetson_export(pruned_tiny, tmp_path, fast_profile):
    path = fast_profile("jetson")
    out = tmp_path / "b"
    proc = cli("export", pruned_tiny, "--target", path, "--out", out)
    assert proc.returncode == 2 and "accepts 2:4" in error_line(proc)
    proc = cli("export", pruned_tiny, "--target", path, "--out", out, "--force")
    line = error_line(proc)
    assert proc.returncode == 3 and "targeted layers 2:4 (checker and polygraphy)" in line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def ios_unet_only(tmp_path_factory) -> Path:
    """The ios profile converting the UNet only: the Core ML gates under test are the UNet's."""
    path = tmp_path_factory.mktemp("profiles") / "ios_unet.toml"
    path.write_text((REPO / "targets" / "ios.toml").read_text().replace(
        'components = ["text_encoder", "denoiser", "vae_decoder"]', 'components = ["denoiser"]'))
    return path


@pytest.fixture(scope="module")
def pruned_one_level(tiny, tmp_path_factory) -> Path:
    """A one-level tiny UNet (resnets, attention, feed-forward) pruned 50%: Core ML converts it in half the time."""
    out = tmp_path_factory.mktemp("p1") / "model"
    prune(tiny("sd", widths=(32,)), out, PruneConfig(sparsity=Unstructured(0.5), num_prompts=2, steps=2, packages=1))
    return out


def test_coreml_size_gate_refuses_dense_storage(pruned_one_level, ios_unet_only, tmp_path, monkeypatch):
    monkeypatch.setattr(coreml, "sparse_passes", lambda min_sparsity, compress: [])  # sparse storage skipped
    out = tmp_path / "b"
    with pytest.raises(GateError) as exc:
        export(pruned_one_level, str(ios_unet_only), out)
    _refused(exc, "Unet weight bytes ≤ (1−s)·dense + 5% + mask", out)


def test_coreml_read_back_gate_refuses_a_swapped_weight(pruned_one_level, ios_unet_only, tmp_path, monkeypatch):
    real = coreml.convert_component

    def convert_with_a_swapped_weight(pipe, spec, *args, **kwargs):
        if spec.source != "unet":
            return real(pipe, spec, *args, **kwargs)
        layer = pipe.unet.down_blocks[0].resnets[0].conv1
        saved = layer.weight.data.clone()
        layer.weight.data = saved.flip(0)  # same values, other places: the package no longer holds the pruned weight
        try:
            return real(pipe, spec, *args, **kwargs)
        finally:
            layer.weight.data = saved

    monkeypatch.setattr(coreml, "convert_component", convert_with_a_swapped_weight)
    out = tmp_path / "b"
    with pytest.raises(GateError) as exc:
        export(pruned_one_level, str(ios_unet_only), out)
    _refused(exc, "Unet pruned weights read back exactly", out)


# ---- faults: killed at each stage boundary, nothing half-written, the rerun succeeds ---------------------------


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "model"
    assert cli("prune", tiny("sd"), "--out", out, *FAST).returncode == 0
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("stage", ["after-package", "checkpoint-between-files", "before-publish"])
def test_prune_killed_at_a_stage_boundary_resumes_to_the_same_result(tiny, tmp_path, uninterrupted, stage):
    model = tmp_path / "m"
    shutil.copytree(tiny("sd"), model)
    before = tree_digest(model)
    out = tmp_path / "out"
    proc = run_cli("prune", model, "--out", out, *FAST, env={"OBSDIFF_FAULT": stage})
    assert proc.returncode == KILLED, proc.stderr[-1500:]
    assert not out.exists() and tree_digest(model) == before
    proc = cli("prune", model, "--out", out, *FAST, "--resume")
    assert proc.returncode == 0, proc.stderr[-1500:]
    got = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(uninterrupted[k], got[k]) for k in got)
    assert tree_digest(model) == before and leftovers(tmp_path) == []


def test_export_killed_or_terminated_publishes_nothing_and_the_rerun_succeeds(pruned_tiny, fast_cpu, tmp_path):
    """SIGTERM after the build (staging removed on the way out), SIGKILL just before publishing (staging left, nothing
    published), then a clean rerun. (Merged from one run per stage with both signals: each signal now at one stage.)"""
    before = tree_digest(pruned_tiny)
    out = tmp_path / "bundle"
    proc = run_cli("export", pruned_tiny, "--target", fast_cpu, "--out", out,
                   env={"OBSDIFF_FAULT": "export-after-build:SIGTERM"})
    assert proc.returncode == 143 and "terminated" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # SIGTERM: staging removed on the way out
    proc = run_cli("export", pruned_tiny, "--target", fast_cpu, "--out", out, env={"OBSDIFF_FAULT": "export-before-publish"})
    assert proc.returncode == KILLED and not out.exists()
    # SIGKILL: nothing can clean up (its staging and its lock file stay), but nothing is published
    assert leftovers(tmp_path) == [".bundle.obsdiff-lock", ".bundle.obsdiff-staging"]
    proc = cli("export", pruned_tiny, "--target", fast_cpu, "--out", out)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert leftovers(tmp_path) == [] and cli("validate", out).returncode == 0
    assert tree_digest(pruned_tiny) == before


# ---- round two: concurrent runs, bundle paths, int8 side files, every profile field, late options, stale outputs ----


def _wait_until_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    """A process that sent itself SIGSTOP (``OBSDIFF_FAULT=stage:SIGSTOP``) holds its lock, stopped mid-run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else "exited"
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.2)
    raise AssertionError("the first run never reached its stop")


def _start(*args, stage: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "obsdiff", *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OBSDIFF_FAULT": f"{stage}:SIGSTOP"})


def _resume(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=600)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]


def test_two_exports_into_one_out_the_second_is_refused_naming_the_first(pruned_tiny, tiny, fast_cpu, tmp_path):
    out = tmp_path / "bundle"
    first = _start("export", pruned_tiny, "--target", fast_cpu, "--out", out, stage="export-after-build")
    try:
        _wait_until_stopped(first)
        proc = cli("export", tiny("sd"), "--target", fast_cpu, "--out", out, "--overwrite")  # another model, same out
        assert proc.returncode == 2 and f"another obsdiff run (pid {first.pid})" in error_line(proc)
        _resume(first)
    finally:
        first.kill()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_model"] == str(pruned_tiny) and manifest["pruning"] is not None  # the first one's, whole
    assert cli("validate", out).returncode == 0 and leftovers(tmp_path) == []


def test_two_prunes_into_one_out_the_second_is_refused_and_the_first_finishes(tiny, tmp_path):
    out = tmp_path / "pruned"
    first = _start("prune", tiny("sd"), "--out", out, *FAST, stage="after-package")
    try:
        _wait_until_stopped(first)
        partial = tmp_path / ".pruned.obsdiff-partial"
        before = tree_digest(partial)
        proc = cli("prune", tiny("sd"), "--out", out, *FAST, "--overwrite")
        assert proc.returncode == 2 and f"pid {first.pid}" in error_line(proc)
        assert tree_digest(partial) == before  # the first run's checkpoint is untouched
        _resume(first)
    finally:
        first.kill()
    assert PrunedFolder.open(out).record.layers and leftovers(tmp_path) == []


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["components"]["unet"].update(file="../outside.onnx"), "is not a file of this bundle"),
    (lambda m: m["components"]["unet"].update(file="/etc/passwd"), "is not a file of this bundle"),
    (lambda m: m.update(components={}), "it is empty"),
    (lambda m: m["components"].update(unet=5), "components['unet'] must be an object"),
    (lambda m: m["components"]["unet"].update(inputs="sample"), "inputs must be a list"),
    (lambda m: m.update(precision="fp8"), "unknown precision 'fp8'"),
    (lambda m: m.update(format="tflite"), "unknown format 'tflite'"),
    (lambda m: m["gates"].update(min_cosine="high"), "gates.min_cosine must be a number"),
])
def test_validate_refuses_a_manifest_that_lies_about_its_models(bundle_copy, edit, message):
    (bundle_copy.parent / "outside.onnx").write_bytes(b"not a model")
    _edit_manifest(bundle_copy, edit)
    proc = cli("validate", bundle_copy)
    assert proc.returncode != 0 and message in error_line(proc)


def test_validate_misses_a_required_file_removed_with_its_manifest_line(bundle_copy):
    for rel in ("reference/unet.safetensors", "model_index.json"):
        copy = bundle_copy.parent / rel.replace("/", "_")
        shutil.copytree(bundle_copy, copy)
        (copy / rel).unlink()
        _edit_manifest(copy, lambda m, rel=rel: m["files"].pop(rel))
        proc = cli("validate", copy)
        assert proc.returncode != 0 and (f"needs {rel}" in error_line(proc) or "model_index.json" in error_line(proc))
    (bundle_copy / "unet" / "model.onnx").unlink()  # a whole component gone, with its lines
    _edit_manifest(bundle_copy, lambda m: (m["files"].pop("unet/model.onnx"), m["components"].pop("unet")))
    proc = cli("validate", bundle_copy)
    assert proc.returncode != 0 and "its pipeline needs" in error_line(proc)


def test_validate_refuses_a_fifo(bundle_copy):
    os.mkfifo(bundle_copy / "unet" / "pipe")
    proc = cli("validate", bundle_copy)
    assert proc.returncode != 0 and "unet/pipe is not a regular file" in error_line(proc)


@pytest.fixture(scope="module")
def int8_tiny(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "model"
    prune(tiny("sd"), out, PruneConfig(sparsity=Dense(), quantization=Quantization(8), num_prompts=2, steps=2,
                                       packages=1))
    return out


@pytest.mark.parametrize("corrupt,message", [
    (lambda s: s.pop(next(iter(s))), "no scales for 1 quantized layer"),
    (lambda s: s.update({k: v[:-1] for k, v in list(s.items())[:1]}), "the weight needs"),
    (lambda s: s.update({k: torch.full_like(v, float("nan")) for k, v in list(s.items())[:1]}), "finite and positive"),
    (lambda s: s.update({k: v * 1.5 for k, v in list(s.items())[:1]}), "not on their int8 grid"),
])
def test_a_quantized_folder_is_checked_when_opened(int8_tiny, fast_cpu, tmp_path, corrupt, message):
    from safetensors import safe_open

    model = tmp_path / "m"
    shutil.copytree(int8_tiny, model)
    file = model / "unet" / "obsdiff_quantization.safetensors"
    with safe_open(str(file), framework="pt") as fh:
        meta = fh.metadata()
    scales = load_file(file)
    corrupt(scales)
    save_file(scales, file, metadata=meta)
    started = time.time()
    proc = cli("export", model, "--target", "cpu-int8", "--out", tmp_path / "b")
    assert proc.returncode != 0 and message in error_line(proc)
    assert time.time() - started < 20 and not (tmp_path / "b").exists()  # before any export work


def test_a_quantized_folder_is_not_pruned_or_quantized_again(int8_tiny, tmp_path):
    for args in (["--pattern", "dense", "--quantize", "int8"], ["--pattern", "2:4"]):
        proc = cli("prune", int8_tiny, "--out", tmp_path / "o", *FAST, *args)
        assert proc.returncode == 2 and "already hold integer codes" in error_line(proc)
    assert not (tmp_path / "o").exists()


def test_the_export_report_counts_the_scales_it_checked(int8_tiny, tmp_path):
    from obsdiff.exporters.bundle import export
    from obsdiff.exporters.export_plan import ExportOptions, ShapeOverrides

    # the cpu target: int8 weights with float activations (an untrained tiny UNet's int8 activations miss the gate)
    manifest = export(int8_tiny, "cpu", tmp_path / "b", ExportOptions(shapes=ShapeOverrides(gate_prompts=1, gate_steps=2)))
    checked = manifest["validation"]["scales_checked"]
    assert checked == {"unet": len(PrunedFolder.open(int8_tiny).layers("unet"))} and checked["unet"] > 100
    assert f"unet {checked['unet']} layers" in (tmp_path / "b" / "report.md").read_text()


@pytest.mark.parametrize("target,old,new,message", [
    ("cpu", 'precision = "fp32"', 'precison = "fp16"', "unknown key(s) at the top level: precison"),
    ("android", "intra_op_num_threads = 1", "intra_op_num_thread = 1", "unknown key(s) in [session_options]"),
    ("ios", 'compute_units = "CPU_AND_NE"', 'compute_unit = "CPU_AND_NE"', "unknown key(s) in [coreml]: compute_unit"),
    ("jetson", 'build_on = "device"', 'build_onn = "host"', "unknown key(s) in [tensorrt]: build_onn"),
    ("cpu", "min_cosine = 0.9999", "min_cosin = 0.9999", "unknown key(s) in [gates]: min_cosin"),
    ("cpu", 'providers = ["CPUExecutionProvider"]', "providers = [1, 2]", "providers must be a list of strings"),
    ("cpu", 'providers = ["CPUExecutionProvider"]', 'providers = ["CPUExecutionProvidr"]',
     "unknown execution provider 'CPUExecutionProvidr'"),
    ("android", '"XnnpackExecutionProvider"', '"XNNPACKProvider"', "unknown execution provider 'XNNPACKProvider'"),
    ("jetson", 'build_on = "device"', 'build_on = "moon"', 'build_on must be "device" or "host"'),
    ("ios", 'compute_units = "CPU_AND_NE"', 'compute_units = "GPU_ONLY"', "compute_units must be one of"),
    ("ios", 'components = ["text_encoder", "denoiser", "vae_decoder"]', 'components = ["unet"]',
     "components are roles"),
    ("cpu", 'format = "onnx"', 'format = "onnx"\n[coreml]\nlayout = "apple"', '[coreml] applies to format = "coreml"'),
    ("android", 'graph_optimization_level = "ORT_ENABLE_ALL"', 'graph_optimization_level = "max"',
     "graph_optimization_level must be one of"),
])
def test_a_typo_or_bad_value_at_every_profile_level_names_the_file_and_key(tmp_path, target, old, new, message):
    text = (REPO / "targets" / f"{target}.toml").read_text()
    assert old in text, old
    path = tmp_path / f"{target}.toml"
    path.write_text(text.replace(old, new, 1))
    proc = cli("export", REPO / "models" / "digits-sd", "--target", path, "--out", tmp_path / "b")
    line = error_line(proc)
    assert proc.returncode == 2 and message in line and str(path) in line, line
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args,message", [
    (("export", "{tiny}", "--target", "ios", "--deployment-target", "iOS99"), "iOS99 is unknown to coremltools"),
    (("export", "{tiny}", "--target", "cpu", "--height", "100000", "--width", "100000"),
     "GiB of denoiser activations per call"),
    (("prune", "{tiny}", "--height", "100000", "--width", "100000"), "GiB of denoiser activations per call"),
    (("prune", "{tiny}", "--height", "512", "--width", "512", "--batch-size", "1", "--max-memory", "0.15", "--plan"),
     "the 0.15 GiB budget (--max-memory) is below what the unet alone needs at 512×512 px"),  # the plan's measure,
    # past the size floor: one image per call (the guidance pair split) still needs 0.20 GiB
    (("prune", "{tiny}", "--pattern", "structured", "--max-memory", "1e-9", "--plan"), "(--max-memory)"),
    (("prune", "{tiny}", "--blocks", "down_blocks.*,nothing*"), "'nothing*' selects no block"),
])
def test_late_option_checks_come_before_any_work(tiny, tmp_path, args, message):
    args = [tiny("sd") if a == "{tiny}" else a for a in args]
    out = ["--out", tmp_path / "o"]
    started = time.time()
    proc = cli(*args, *out)
    assert proc.returncode == 2 and message in error_line(proc), proc.stderr[-500:]
    assert time.time() - started < 30 and not (tmp_path / "o").exists()


def test_stale_outputs_do_not_survive_beside_fresh_ones(tiny, pruned_tiny, fast_cpu, tmp_path):
    """``ship --pattern dense`` removes the OUT/model an earlier (pruning) ship left; ``export --overwrite`` without
    ``--zip`` removes the OUT.zip an earlier export wrote. Both earlier outputs are put in place as those runs left
    them."""
    out = tmp_path / "OUT"
    shutil.copytree(pruned_tiny, out / "model")
    proc = cli("ship", "--target", fast_cpu, "--model", tiny("sd"), "--out", out, "--pattern", "dense",
               "--gate-prompts", "1")
    assert proc.returncode == 0, proc.stderr[-500:]
    assert not (out / "model").exists() and json.loads((out / "bundle" / "manifest.json").read_text())["pruning"] is None
    (out / "bundle.zip").write_bytes(b"an archive of an earlier bundle")
    assert cli("export", tiny("sd"), "--target", fast_cpu, "--out", out / "bundle", "--overwrite",
               "--gate-prompts", "1").returncode == 0
    assert not (out / "bundle.zip").exists() and (out / "bundle" / "manifest.json").is_file()

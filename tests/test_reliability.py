"""Nothing lost, nothing trusted blindly: inputs are never modified, outputs appear whole or not at all,
``validate`` checks every file on disk, every gate is seen failing, and runs killed at each stage boundary
leave nothing half-written behind."""

import hashlib
import json
import shutil
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
from obsdiff.exporters.bundle import export, validate_bundle_on_disk
from obsdiff.exporters.profiles import load_profile
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder
from obsdiff.sparsity import Unstructured

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
    assert leftovers(tmp_path) == [".bundle.obsdiff-staging"]  # SIGKILL: nothing can clean up, but nothing is published
    proc = cli("export", pruned_tiny, "--target", fast_cpu, "--out", out)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert leftovers(tmp_path) == [] and cli("validate", out).returncode == 0
    assert tree_digest(pruned_tiny) == before

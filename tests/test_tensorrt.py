"""TensorRT / jetson target: host side complete here; engine building only where TensorRT and a GPU exist."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cli, error_line, export_options
from torch import nn

from obsdiff.errors import UsageError
from obsdiff.exporters.bundle import export
from obsdiff.exporters.profiles import load_profile
from obsdiff.exporters.sparsity_check import check_2of4, polygraphy_sparsity
from obsdiff.exporters.tensorrt import parse_sparsity_log, tensorrt_available
from obsdiff.hessian import HessianAccumulator, layer_rows
from obsdiff.layers import column_permutation, permute_hessian, set_weight_matrix, weight_matrix
from obsdiff.prune import PruneConfig, prune
from obsdiff.solver import obs_prune
from obsdiff.sparsity import NM, Unstructured


def test_jetson_bundle_host_side(jetson_bundle):
    manifest = json.loads((jetson_bundle / "manifest.json").read_text())
    results = manifest["validation"]
    assert manifest["precision"] == "fp16"
    rep = results["sparsity_2of4"]["unet"]
    assert rep["targeted"] == rep["checker"] == rep["polygraphy"] == rep["both"] > 100
    assert results["engines"]["status"] == "to be built on device"
    report = (jetson_bundle / "report.md").read_text()
    assert f"{rep['targeted']} by both" in report and "to be built on device" in report
    for name in ("build_engines.sh", "validate_on_device.py", "README_DEVICE.md", "device.json"):
        assert (jetson_bundle / name).is_file()


def test_device_scripts_are_valid_and_the_comparison_runs_here(jetson_bundle):
    script = (jetson_bundle / "build_engines.sh").read_text()
    assert "--sparsity=enable" in script and "--fp16" in script and "--exportLayerInfo" in script
    assert "--saveEngine=engines/unet.plan" in script and "sample:2x4x8x8" in script
    assert subprocess.run(["bash", "-n", str(jetson_bundle / "build_engines.sh")]).returncode == 0
    assert subprocess.run([sys.executable, "-m", "py_compile", str(jetson_bundle / "validate_on_device.py")]).returncode == 0
    proc = subprocess.run([sys.executable, str(jetson_bundle / "validate_on_device.py"), "--runtime", "onnxruntime",
                           "--runs", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "all 5 outputs pass" in proc.stdout
    result = json.loads((jetson_bundle / "device_validation_onnxruntime.json").read_text())
    assert result["passed"] and all(r["cosine"] > 0.9999 for r in result["rows"])


def test_device_validator_fails_on_a_wrong_reference(jetson_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(jetson_bundle, copy)
    ref = copy / "reference" / "unet.safetensors"
    raw = bytearray(ref.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    rng = np.random.default_rng(0)
    raw[header:] = rng.integers(0, 255, len(raw) - header, dtype=np.uint8).tobytes()  # garble every tensor
    ref.write_bytes(bytes(raw))
    proc = subprocess.run([sys.executable, str(copy / "validate_on_device.py"), "--runtime", "onnxruntime", "--runs", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "gate failed" in proc.stderr


def _conv_onnx(tmp_path, weight):
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    path = tmp_path / "conv.onnx"
    torch.onnx.export(conv, (torch.randn(1, 8, 6, 6),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    return path


def test_conv_2of4_runs_along_input_channels_not_flattened_taps(tmp_path, monkeypatch):
    """Our conv layout passes both checkers; a 2:4 pattern over flattened C·R·S passes neither."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    acc = HessianAccumulator(8 * 9)
    acc.add(layer_rows(conv, torch.randn(4, 8, 6, 6)), 1.0)
    res = obs_prune(weight_matrix(conv), permute_hessian(acc.finalize(), column_permutation(conv)), NM(2, 4))
    set_weight_matrix(conv, res.weight)
    good = _conv_onnx(tmp_path, conv.weight.detach())
    assert all(c.is_2of4 for c in check_2of4(good))
    monkeypatch.setenv("PATH", "")  # no console script on PATH (pip install --target): polygraphy still runs
    assert polygraphy_sparsity(good)["sparse"]

    flat = torch.randn(8, 18, 4)  # 2:4 along the flattened C·R·S axis (random pair per group): groups straddle taps
    drop = torch.rand(8, 18, 4, generator=torch.Generator().manual_seed(0)).argsort(-1)[..., :2]
    flat = flat.scatter(-1, drop, 0.0).reshape(8, 72)
    assert ((flat.reshape(8, 18, 4) == 0).sum(-1) >= 2).all()
    (tmp_path / "flat").mkdir()
    wrong = _conv_onnx(tmp_path / "flat", flat.reshape(8, 8, 3, 3))
    assert not any(c.is_2of4 for c in check_2of4(wrong))
    assert not polygraphy_sparsity(wrong)["sparse"]


def test_parse_tensorrt_sparsity_log():
    text = ("[V] [TRT] (Sparsity) Layers eligible for sparse math: /unet/conv1, /unet/ff/MatMul\n"
            "[V] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: /unet/conv1\n")
    assert parse_sparsity_log(text) == {"eligible": ["/unet/conv1", "/unet/ff/MatMul"], "picked": ["/unet/conv1"]}


def test_unstructured_for_tensorrt_is_refused_unless_forced(tmp_path):
    proc = cli("ship", "--target", "jetson", "--out", tmp_path / "j", "--pattern", "unstructured")
    assert proc.returncode != 0 and "2:4" in error_line(proc)
    profile = load_profile("jetson")
    with pytest.raises(UsageError, match="accepts 2:4, structured, dense"):
        profile.check_pattern(Unstructured(0.5), force=False)
    profile.check_pattern(Unstructured(0.5), force=True)
    profile.check_pattern(NM(2, 4), force=False)
    with pytest.raises(UsageError):
        profile.check_pattern(NM(4, 8), force=False)


def test_layers_with_dims_not_divisible_by_4_are_listed_dense(tiny, tmp_path):
    src = tiny("sd", cross_attention_dim=30)
    pruned = tmp_path / "p"
    prune(src, pruned, PruneConfig(sparsity=NM(2, 4), num_prompts=2, steps=2, packages=1))
    manifest = export(pruned, "jetson", tmp_path / "b", export_options(gate_prompts=2, gate_steps=5))
    rep = manifest["validation"]["sparsity_2of4"]["unet"]
    assert any(n.endswith("attn2.to_k") for n in rep["dense"])
    assert rep["both"] == rep["targeted"]
    assert "attn2.to_k" in (tmp_path / "b" / "report.md").read_text()


def test_engine_build_with_tensorrt(pruned_24, jetson_bundle, tmp_path):
    """Builds the UNet engine with FP16 + SPARSE_WEIGHTS and reads the sparsity lines of its log."""
    ok, reason = tensorrt_available()
    if not ok:
        pytest.skip(reason)
    from obsdiff.exporters.components import pipeline_dims, specs_for
    from obsdiff.exporters.profiles import load_profile
    from obsdiff.exporters.tensorrt import build_engine
    from obsdiff.pruned_folder import load_pipeline

    pipe = load_pipeline(pruned_24)
    profile = load_profile("tensorrt")
    spec = next(s for s in specs_for(pipe) if s.name == "unet")
    info = build_engine(jetson_bundle / "unet" / "model.onnx", tmp_path / "unet.plan", spec,
                        pipeline_dims(pipe, profile.shapes), profile, tmp_path / "timing.cache")
    assert (tmp_path / "unet.plan").stat().st_size > 0 and info["eligible"]

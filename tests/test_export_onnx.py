"""ONNX export, ONNX Runtime validators, cpu/android bundles, and bundle integrity checks."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import cli, error_line, export_options

from obsdiff.errors import BundleError, UsageError
from obsdiff.exporters.artifacts import WeightProbe
from obsdiff.exporters.bundle import export
from obsdiff.exporters.bundle_check import validate_bundle_on_disk
from obsdiff.exporters.components import pipeline_dims, specs_for
from obsdiff.exporters.onnx import OnnxWeights, export_onnx, match_weights
from obsdiff.exporters.profiles import Precision, Shapes, load_profile
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder, load_pipeline


def test_cpu_bundle_passes_gates_and_keeps_zeros(cpu_bundle):
    manifest = json.loads((cpu_bundle / "manifest.json").read_text())
    gates = {g["name"]: g for g in manifest["validation"]["gates"]}
    assert gates["image PSNR dB"]["value"] >= 40 and gates["unet pruned zeros survive export"]["value"] == 1
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (cpu_bundle / comp / "model.onnx").is_file()
        assert manifest["validation"]["components"][comp]["latency"]["median_ms"] > 0
    sparsity = manifest["validation"]["components"]["unet"]["sparsity"]
    assert sparsity["pruned_layers"] == sparsity["matched"] > 100
    for name, layer in sparsity["layers"].items():  # every pruned weight has the same zero fraction in ONNX
        assert layer["export"] == layer["torch"], name
    assert manifest["pruning"]["settings"]["pattern"] == "2:4"
    assert {f for f in manifest["files"]} >= {"unet/model.onnx", "reference/unet.safetensors", "report.md", "images.png"}
    report = (cpu_bundle / "report.md").read_text()
    assert "image PSNR dB" in report and "images.png" in report and "pruned vs dense" in report


def test_zero_fraction_in_onnx_equals_pytorch(cpu_bundle, pruned_24):
    pipe = load_pipeline(pruned_24)
    inits = OnnxWeights(cpu_bundle / "unet" / "model.onnx")
    weights = {n: m.weight for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    found = match_weights(inits, {n: WeightProbe.of(w) for n, w in weights.items()})
    for name, init_name in found.items():
        assert init_name is not None, name
        assert float((inits[init_name] == 0).mean()) == float((weights[name] == 0).float().mean()), name
        assert np.array_equal(inits[init_name], weights[name].detach().numpy().reshape(inits[init_name].shape)) or \
            np.array_equal(inits[init_name], weights[name].detach().numpy().T), name


def test_weight_probe_tells_a_weight_from_its_lookalikes():
    """Same shape and zeros but other values, or other zeros: not a match; transposed or fp16-rounded: a match."""
    w = torch.randn(8, 12)
    w[:, ::2] = 0
    probe = WeightProbe.of(w)
    assert probe.matches(w.numpy()) and probe.matches(w.numpy().T.copy()) and probe.matches(w.numpy().astype(np.float16))
    other_values = w.clone()
    other_values[0, 1] += 0.5
    other_zeros = w.clone()
    other_zeros[0, 0], other_zeros[0, 1] = w[0, 1], 0.0
    assert not probe.matches(other_values.numpy()) and not probe.matches(other_zeros.numpy())
    assert not probe.matches(w.numpy().reshape(12, 8))  # a reshape is not a layout an exporter writes


def test_optimum_ort_pipeline_loads_the_bundle(cpu_bundle):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(cpu_bundle)
    image = pipe("a handwritten digit four", num_inference_steps=10, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all() and image.std() > 0.05


def test_validate_bundle_and_detect_tampering(cpu_bundle, tmp_path):
    assert cli("validate", cpu_bundle).returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(cpu_bundle, copy)
    onnx_file = copy / "unet" / "model.onnx"
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: len(data) // 3])
    proc = cli("validate", copy)
    assert proc.returncode != 0 and "sha256 of unet/model.onnx" in error_line(proc)

    # truncated and manifest updated to match: loading itself must fail, in one line
    manifest = json.loads((copy / "manifest.json").read_text())
    from obsdiff.exporters.artifacts import sha256

    manifest["files"]["unet/model.onnx"] = sha256(onnx_file)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="cannot load"):
        validate_bundle_on_disk(copy)

    (copy / "unet" / "model.onnx").unlink()
    proc = cli("validate", copy)
    assert proc.returncode != 0 and "missing file unet/model.onnx" in error_line(proc)
    proc = cli("validate", tmp_path)
    assert proc.returncode != 0 and "no manifest.json" in error_line(proc)


def test_android_bundle_has_ort_files_and_session_options(android_bundle):
    out = android_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (out / comp / "model.ort").is_file()
        assert manifest["components"][comp]["file"] == f"{comp}/model.ort"
    ops = (out / "required_operators.config").read_text()
    assert "Conv" in ops and "MatMul" in ops
    assert manifest["session_options"]["execution_providers"][0] == "XnnpackExecutionProvider"
    assert cli("validate", out).returncode == 0


def test_fp16_export_keeps_fidelity_and_zeros(pruned_24, tmp_path):
    manifest = export(pruned_24, "cpu", tmp_path / "fp16", export_options(precision=Precision.FP16, gate_prompts=2, gate_steps=5))
    gates = {g["name"]: g for g in manifest["validation"]["gates"]}
    assert manifest["precision"] == "fp16"
    assert gates["image PSNR dB"]["limit"] == 30 and gates["image PSNR dB"]["value"] >= 30
    assert manifest["validation"]["components"]["unet"]["sparsity"]["zeros_preserved"]
    inits = OnnxWeights(tmp_path / "fp16" / "unet" / "model.onnx")
    assert any(v.dtype == np.float16 for v in inits.values())


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_torch_exporter_writes_the_same_layout(family, tiny, tmp_path):
    """The fallback path (torch.onnx.export from the component description) gives loadable files."""
    from obsdiff.exporters.compare import Comparison, reference_io
    from obsdiff.exporters.onnx import ort_session, run_session

    pipe = load_pipeline(tiny(family))
    specs = specs_for(pipe)
    dims = pipeline_dims(pipe, Shapes(height=16, width=16))
    paths = export_onnx(pipe, tmp_path, specs, dims, exporter="torch")
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "tokenizer" / "vocab.json").is_file()
    for spec in specs:
        inputs, ref = reference_io(pipe, spec, dims)
        got = run_session(ort_session(paths[spec.name]), inputs)
        for name in ref:
            assert Comparison.of(ref[name], got[name]).cosine > 0.99999


@pytest.mark.parametrize("family,kwargs,denoiser", [("sdxl", {}, "unet"), ("sd3", {"t5": True}, "transformer"),
                                                    ("flux", {}, "transformer")])
def test_sdxl_sd3_flux_cpu_bundles(family, kwargs, denoiser, tiny, tmp_path):
    """Pruned with the default component (the denoiser alias), exported through optimum, run end to end by
    optimum's own ORT pipeline for that family (Flux with packed latents and no classifier-free guidance)."""
    prune(tiny(family, **kwargs), tmp_path / "model", PruneConfig(num_prompts=2, steps=2, packages=1))
    assert list(PrunedFolder.open(tmp_path / "model").record.components) == [denoiser]
    # 16 px: Flux's native size is the pipeline's 128-latent default, far too slow for a test
    manifest = export(tmp_path / "model", "cpu", tmp_path / "bundle",
                      export_options(height=16, width=16, gate_prompts=2, gate_steps=5))
    results = manifest["validation"]
    sparsity = results["components"][denoiser]["sparsity"]
    assert sparsity["pruned_layers"] > 5 and sparsity["matched"] == sparsity["pruned_layers"]
    assert sparsity["zero_fraction_export"] == sparsity["zero_fraction_torch"] and abs(sparsity["zero_fraction_torch"] - 0.5) < 0.01
    assert results["end_to_end"]["psnr_db"] >= 40
    encoders = [n for n in manifest["components"] if n.startswith("text_encoder")]
    assert encoders == ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if family == "sd3" else [])
    if family != "flux":  # SDXL and SD3 read CLIP's penultimate hidden state: every hidden state is an output
        outputs = [o["name"] for o in manifest["components"]["text_encoder_2"]["outputs"]]
        assert outputs[0] == "text_embeds" and outputs[-1] == "hidden_states.2"
    validate_bundle_on_disk(tmp_path / "bundle")


def test_unsupported_family_is_one_line(tiny, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    StableDiffusionImg2ImgPipeline.from_pretrained(tiny("sd")).save_pretrained(tmp_path / "img2img")
    proc = cli("export", tmp_path / "img2img", "--target", "cpu", "--out", tmp_path / "x")
    assert proc.returncode != 0 and not (tmp_path / "x").exists()
    assert "no component description for StableDiffusionImg2ImgPipeline yet" in error_line(proc)


def test_export_bad_inputs(pruned_24, default_model, tmp_path):
    proc = cli("export", pruned_24, "--target", "playstation", "--out", tmp_path / "x")
    assert proc.returncode != 0 and "unknown target 'playstation'" in error_line(proc)
    assert not (tmp_path / "x").exists()

    broken = tmp_path / "novae"
    shutil.copytree(default_model, broken)
    shutil.rmtree(broken / "vae")
    proc = cli("export", broken, "--target", "cpu", "--out", tmp_path / "y")
    assert proc.returncode != 0 and "could not load" in error_line(proc)
    assert not (tmp_path / "y").exists()

    a_file = tmp_path / "file"
    a_file.write_text("")
    proc = cli("export", pruned_24, "--target", "cpu", "--out", a_file / "bundle")
    assert proc.returncode != 0 and "not a folder" in error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "novae"]


def test_target_profiles_are_validated(tmp_path):
    cpu = load_profile("cpu")
    assert cpu.precision is Precision.FP32 and cpu.gates.min_image_psnr_db == 40
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nformat = "onnx"\n[gates]\nmin_psnr = 3\n')
    with pytest.raises(UsageError, match="unknown key"):
        load_profile(bad)

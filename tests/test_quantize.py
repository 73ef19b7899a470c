"""Quantization in the OBS pass: GPTQ rounds each kept weight onto its grid inside the sweep; zeros stay zero."""


import pytest
import torch
from conftest import calibrated_layer, cli, error_line, interrupted_at, stacked_config
from safetensors import safe_open
from safetensors.torch import load_file

from obsdiff.layers import column_permutation, permute_hessian, weight_matrix
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder, load_pipeline
from obsdiff.quantize import Quantization, QuantMethod, codes, per_column, rtn
from obsdiff.solver import obs_prune, reconstruction_error
from obsdiff.sparsity import NM, Dense, Unstructured

QUANTS = [Quantization(8), Quantization(4, 16)]


@pytest.mark.parametrize("quant", QUANTS, ids=str)
@pytest.mark.parametrize("pattern", [None, Unstructured(0.5), NM(2, 4)], ids=str)
def test_every_kept_weight_is_on_its_grid_and_zeros_survive(quant, pattern):
    torch.manual_seed(0)
    x = torch.randn(1024, 64) @ torch.randn(64, 64)
    h = 2 * x.T @ x / 1024
    w = torch.randn(24, 64)
    res = obs_prune(w, h, pattern, quant=quant)
    code = res.weight / per_column(res.scales, quant)
    assert torch.allclose(code, code.round(), atol=1e-3) and code.abs().max() <= quant.levels + 1e-3
    assert torch.equal(codes(res.weight, res.scales, quant).float() * per_column(res.scales, quant), res.weight)
    if pattern is not None:
        assert (res.weight[res.mask] == 0).all()
        if isinstance(pattern, NM):
            assert pattern.holds(res.weight.numpy(), axis=1)
        else:
            assert (res.weight == 0).float().mean() >= 0.5 - 1 / 64


@pytest.fixture(scope="module")
def real_layer(default_model):
    """A real UNet conv and its Hessian from 20 prompts × 10 steps of calibration."""
    layer, hessian = calibrated_layer(default_model, "up_blocks.1.resnets.0.conv1")
    return weight_matrix(layer), permute_hessian(hessian, column_permutation(layer))


@pytest.mark.parametrize("quant", [Quantization(8), Quantization(4, 32)], ids=str)
def test_gptq_error_is_at_most_rtn_error_on_a_real_layer(real_layer, quant):
    w, h = real_layer
    gptq = obs_prune(w, h, None, quant=quant)
    rounded, _ = rtn(w, quant)
    rtn_error, _ = reconstruction_error(w, rounded, h)
    assert gptq.error <= rtn_error
    if quant.bits == 4:
        assert gptq.error < 0.8 * rtn_error  # GPTQ's compensation pays most where rounding is coarse


@pytest.mark.parametrize("args,method", [(("--pattern", "dense", "--quantize", "int8"), "gptq"),
                                         (("--pattern", "2:4", "--quantize", "int4", "--group-size", "16",
                                           "--quantize-method", "rtn"), "rtn")])
def test_quantized_folder_loads_and_holds_codes_and_scales(default_model, tmp_path, args, method):
    out = tmp_path / "q"
    assert cli("prune", default_model, "--out", out, "--num-prompts", "4", "--steps", "3", "--packages", "2",
               *args).returncode == 0
    folder = PrunedFolder.open(out)
    record = folder.record
    spec = record.settings.quantization
    assert spec.method is QuantMethod(method) and record.components["unet"].mask.quantization == str(spec)
    assert all(r.error is not None for r in record.layers)  # the per-layer error of pruning and rounding
    assert folder.quantization["unet"].quant == spec
    scales_file = out / "unet" / "obsdiff_quantization.safetensors"
    scales = load_file(scales_file)
    with safe_open(str(scales_file), framework="pt") as fh:
        assert fh.metadata()["bits"] == str(spec.bits)
    pipe = load_pipeline(out)  # diffusers loads the dequantized weights as they are
    modules = dict(pipe.unet.named_modules())
    assert len(scales) == len(record.layers)
    for key, scale in scales.items():
        matrix = weight_matrix(modules[key.removesuffix(".weight_scale")])
        code = matrix / per_column(scale, spec)
        assert torch.allclose(code, code.round(), atol=1e-3) and code.abs().max() <= spec.levels + 1e-3
        if "2:4" in args:
            assert NM(2, 4).holds(matrix.numpy(), axis=1)
    images = pipe(["a handwritten digit five"], num_inference_steps=3, output_type="pt").images
    assert torch.isfinite(images).all()


def test_quantization_bad_input(default_model, tmp_path):
    cases = [
        (("--quantize", "int3"), "--quantize must be int8 or int4"),
        (("--pattern", "dense", "--quantize", "int4", "--group-size", "7"), "--group-size 7 does not divide the columns"),
        (("--group-size", "32"), "apply with --quantize"),
        (("--quantize", "int8", "--method", "wanda"), "needs the full Hessian"),
        (("--quantize", "int8", "--quantize-method", "best"), "--quantize-method must be gptq or rtn"),
    ]
    for i, (args, message) in enumerate(cases):
        proc = cli("prune", default_model, "--out", tmp_path / f"o{i}", "--num-prompts", "2", "--steps", "2", *args)
        assert proc.returncode != 0 and message in error_line(proc), (args, proc.stderr[-400:])
    assert not list(tmp_path.iterdir())
    with pytest.raises(Exception, match="dense pattern prunes nothing"):
        PruneConfig(sparsity=Dense()).validate()


def test_a_shrunk_model_quantized_in_a_second_prune_keeps_its_shapes(default_model, tmp_path):
    """structured + W8: the second prune's pruning.json carries the first one's shapes, so the folder still loads."""
    from obsdiff.sparsity import Structured

    prune(default_model, tmp_path / "s", PruneConfig(sparsity=Structured(0.3, 0.3, 0.25), num_prompts=4, steps=3,
                                                     packages=1))
    prune(tmp_path / "s", tmp_path / "q", PruneConfig(sparsity=Dense(), quantization=Quantization(8), num_prompts=4,
                                                      steps=3, packages=1))
    first, second = load_pipeline(tmp_path / "s").unet, load_pipeline(tmp_path / "q").unet
    assert sum(p.numel() for p in second.parameters()) == sum(p.numel() for p in first.parameters())
    shapes = PrunedFolder.open(tmp_path / "q").shapes("unet")
    assert shapes == PrunedFolder.open(tmp_path / "s").shapes("unet") and shapes.attention_heads and shapes.ffn


def test_one_stacked_prune_shrinks_and_quantizes(stacked_model, default_model, tmp_path):
    stacked = stacked_model
    folder = PrunedFolder.open(stacked)
    record = folder.record
    summary = record.components["unet"]
    assert record.settings.stacked and record.source == str(default_model) and record.units and record.layers
    assert summary.shrink is not None and summary.mask.quantization == str(Quantization(8))
    unet = load_pipeline(stacked).unet
    assert sum(p.numel() for p in unet.parameters()) == summary.shrink.params_after < summary.shrink.params_before
    assert summary.shrink.flops_after / summary.shrink.flops_before <= 0.7
    modules = dict(unet.named_modules())
    scales = folder.quantization["unet"].scales
    assert len(scales) == len(record.layers) == summary.mask.pruned_layers
    for layer, scale in scales.items():  # every kept weight of the shrunk layers on its int8 grid
        matrix = weight_matrix(modules[layer])
        code = matrix / per_column(scale, Quantization(8))
        assert torch.allclose(code, code.round(), atol=1e-3) and code.abs().max() <= 127 + 1e-3, layer
    assert not [p.name for p in stacked.parent.iterdir() if p.name.startswith(".")]  # the first stage is gone
    # a quantized folder is not quantized again
    proc = cli("prune", stacked, "--out", tmp_path / "again", "--pattern", "dense", "--quantize", "int8")
    assert proc.returncode != 0 and "already hold integer codes" in error_line(proc)
    assert not (tmp_path / "again").exists()


def test_a_prune_stopped_in_its_quantize_stage_resumes_there_to_the_same_model(stacked_model, default_model, tmp_path,
                                                                              monkeypatch, caplog):
    """Interrupted after the first quantize package (the shrink stage's two packages done): the resume does not shrink
    again, and ends with the uninterrupted prune's weights and scales. (A stop inside the shrink stage is an ordinary
    resume of that stage.)"""
    stacked, out = stacked_model, tmp_path / "model"
    with interrupted_at(monkeypatch, "after-package", nth=3), pytest.raises(KeyboardInterrupt):
        prune(default_model, out, stacked_config())
    assert not out.exists()
    with caplog.at_level("INFO", logger="obsdiff.prune"):
        prune(default_model, out, stacked_config(), resume=True)
    assert "stage 1 (shrink) already done" in caplog.text
    a = load_file(stacked / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_file(m / "unet" / "obsdiff_quantization.safetensors") for m in (stacked, out))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no stage or checkpoint left

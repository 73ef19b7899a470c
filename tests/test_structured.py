"""Structured OBS-Diff: heads and FFN neurons removed with compensation, models physically smaller."""

import json

import pytest
import torch
from conftest import error_line, run_cli
from safetensors.torch import load_file
from tiny_pipelines import DENOISER

from obsdiff.calibration import CalibrationSettings, PackageHooks, run_pipeline
from obsdiff.digits.data import prompt_for
from obsdiff.hessian import HessianAccumulator, StepContext, timestep_weights
from obsdiff.model_io import load_pipeline
from obsdiff.prune import Method, PruneConfig, prune
from obsdiff.solver import remove_column_groups
from obsdiff.sparsity import Structured
from obsdiff.structured import AttentionUnit, prune_attention

FAST = dict(num_prompts=8, steps=5, batch_size=8, packages=2)


@pytest.fixture(scope="module")
def structured_30(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "s30"
    record = prune(default_model, out, PruneConfig(sparsity=Structured(0.3, 0.3), **FAST))
    return out, record


def test_default_model_shrinks_by_the_recorded_amount(default_model, structured_30):
    out, record = structured_30
    unet = record["components"]["unet"]
    dense = load_pipeline(default_model).unet
    pipe = load_pipeline(out)
    params = sum(p.numel() for p in pipe.unet.parameters())
    assert params == unet["params_after"] == sum(p.numel() for p in dense.parameters()) - unet["params_removed"]
    assert unet["params_removed"] > 0 and unet["flops_after"] < unet["flops_before"]
    assert 0.25 <= unet["heads_removed"] / unet["heads_total"] <= 0.4
    assert unet["ffn_neurons_removed"] / unet["ffn_neurons_total"] == pytest.approx(0.3, abs=0.01)
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    live = pipe.unet.state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == attn.to_q.out_features // 16 < 4  # head count set from the kept rows
    images = pipe(["a handwritten digit two"], num_inference_steps=5, output_type="pt").images
    assert torch.isfinite(images).all()


def test_a_dead_head_goes_first_and_changes_nothing():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    with torch.no_grad():
        attn.to_out[0].weight[:, 16:24] = 0  # head 2 contributes nothing
    x = torch.randn(2, 10, 32)
    before = attn(x).detach()
    acc = HessianAccumulator(32)
    captured = []
    handle = attn.to_out[0].register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, 32)))
    attn(x)
    handle.remove()
    acc.add(captured[0], 1.0)
    unit = AttentionUnit("b", "attn", attn, joint=False)
    config = PruneConfig(sparsity=Structured(0.25, 0.25))
    config.validate()
    record = prune_attention(unit, {"attn.to_out.0": acc.hessian}, config)
    assert record["removed"] == [2] and attn.heads == 3 and attn.to_q.out_features == 24
    assert torch.allclose(attn(x), before, atol=1e-6)


def test_obs_beats_no_compensation_and_l1_on_a_real_layer(default_model):
    pipe = load_pipeline(default_model)
    name = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    layer = dict(pipe.unet.named_modules())[name]
    ctx = StepContext(timestep_weights("log-decrease", 10))
    hooks = PackageHooks({name: layer}, ctx, weighted=True)
    with hooks, torch.no_grad():
        run_pipeline(pipe, CalibrationSettings([prompt_for(i % 10) for i in range(20)], steps=10, batch_size=10), ctx,
                     decode=False)
    h = hooks.hessian(name).hessian
    groups = [[q] for q in range(layer.in_features)]
    n = int(0.3 * layer.in_features)
    w = layer.weight.detach()
    obs = remove_column_groups(w, h, groups, n, batch=n // 8)
    plain = remove_column_groups(w, h, groups, n, compensate=False)
    l1 = remove_column_groups(w, h, groups, n, by_l1_norm=True, compensate=False)
    assert obs.error < 0.5 * plain.error and obs.error < 0.5 * l1.error


@pytest.mark.parametrize("family,kwargs", [("sd", {}), ("sdxl", {}), ("sd3", {}), ("flux", {"head_dim": 128})])
def test_every_family_shrinks_and_still_generates(tiny, tmp_path, family, kwargs):
    src = tiny(family, **kwargs)
    component = DENOISER[family]
    record = prune(src, tmp_path / "out", PruneConfig(sparsity=Structured(0.5, 0.5), components=(component,),
                                                      num_prompts=4, steps=3, batch_size=4, packages=2, height=16,
                                                      width=16))
    comp = record["components"][component]
    assert comp["heads_removed"] > 0 and comp["ffn_neurons_removed"] > 0 and comp["params_after"] < comp["params_before"]
    if family == "sd3":
        assert any("context_pre_only" in s["reason"] for s in comp["skipped"])
    if family == "flux":
        heads = [r for r in record["layers"] if r["kind"] == "heads"]
        assert heads and all(r["head_dim"] == 128 for r in heads)
    pipe = load_pipeline(tmp_path / "out")
    assert sum(p.numel() for p in getattr(pipe, component).parameters()) == comp["params_after"]
    images = pipe(["a handwritten digit six"], num_inference_steps=3, guidance_scale=3.0, height=16, width=16,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()


def test_every_head_cannot_go(default_model, tmp_path):
    record = prune(default_model, tmp_path / "o", PruneConfig(sparsity=Structured(0.99, 0.1),
                                                             num_prompts=2, steps=2, packages=1, method=Method.L1))
    heads = [r for r in record["layers"] if r["kind"] == "heads"]
    assert heads and all(r["after"] == 1 for r in heads)


def test_structured_bad_inputs(default_model, tmp_path):
    proc = run_cli("prune", default_model, "--out", tmp_path / "v", "--pattern", "structured", "--components", "vae")
    assert proc.returncode != 0 and "no layout for AutoencoderKL" in error_line(proc)
    proc = run_cli("prune", default_model, "--out", tmp_path / "w", "--pattern", "structured", "--method", "wanda")
    assert proc.returncode != 0 and "obs-diff or l1" in error_line(proc)
    proc = run_cli("prune", default_model, "--out", tmp_path / "x", "--no-compensate")
    assert proc.returncode != 0 and "structured only" in error_line(proc)
    assert not list(tmp_path.iterdir())


def test_structured_record_lists_shapes_for_the_loader(structured_30):
    out, record = structured_30
    on_disk = json.loads((out / "pruning.json").read_text())
    shapes = on_disk["structured"]["components"]["unet"]
    assert shapes["attention_heads"] and shapes["ffn"]
    assert all(entry["gated"] for entry in shapes["ffn"])  # GEGLU: both halves of the up projection shrank


def test_structured_model_exports_to_onnx(structured_30, tmp_path):
    """Shapes changed by structured pruning go through the same exporter and gates."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from obsdiff.exporters.bundle import export_bundle

    out, record = structured_30
    manifest = export_bundle(out, "cpu", tmp_path / "b")
    assert all(g["passed"] for g in manifest["validation"]["gates"])
    image = ORTStableDiffusionPipeline.from_pretrained(tmp_path / "b")(
        "a handwritten digit one", num_inference_steps=5, height=16, width=16, output_type="np").images
    assert torch.isfinite(torch.from_numpy(image)).all()


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_shrunk_transformer_families_export(family, tiny, tmp_path):
    """A shrunk SDXL UNet or SD3 transformer passes the cpu gates, and its graph is smaller by what was removed."""
    from obsdiff.exporters.bundle import export_bundle
    from obsdiff.exporters.components import pipeline_dims, specs_for
    from obsdiff.exporters.onnx import OnnxWeights, export_onnx
    from obsdiff.exporters.profiles import Shapes

    prune(tiny(family), tmp_path / "model", PruneConfig(sparsity=Structured(0.3, 0.3), num_prompts=2, steps=2,
                                                       packages=1))
    manifest = export_bundle(tmp_path / "model", "cpu", tmp_path / "b")
    assert all(g["passed"] for g in manifest["validation"]["gates"]), manifest["validation"]["gates"]
    dense = load_pipeline(tiny(family))
    export_onnx(dense, tmp_path / "dense", specs_for(dense), pipeline_dims(dense, Shapes()), exporter="optimum")
    name = DENOISER[family]
    graph_size = lambda folder: sum(a.size for a in OnnxWeights(folder / name / "model.onnx").values())  # noqa: E731
    removed = sum(p.numel() for p in getattr(dense, name).parameters()) - sum(
        p.numel() for p in getattr(load_pipeline(tmp_path / "model"), name).parameters())
    assert removed > 0.05 * sum(p.numel() for p in getattr(dense, name).parameters())
    assert graph_size(tmp_path / "dense") - graph_size(tmp_path / "b") == removed


def test_joint_attention_drops_one_head_set_from_both_streams(tiny):
    """MMDiT: image and text projections rank heads differently; the fused ranking removes the same heads from
    both (L1 here, whose per-projection choices disagree), so no zeroed column of a kept head is left behind."""
    from obsdiff.adapters import adapter_for
    from obsdiff.structured import find_units

    transformer = load_pipeline(tiny("sd3")).transformer
    unit = next(u for u in find_units(transformer, adapter_for(transformer)).units
                if isinstance(u, AttentionUnit) and u.joint)
    d = unit.head_dim
    text_out = unit.module.to_add_out.weight.data
    text_out[:, :d] *= 0.01  # the text stream would drop heads 0 and 3, the image stream others
    text_out[:, 3 * d :] *= 0.01
    config = PruneConfig(method=Method.L1, sparsity=Structured(0.5, 0.5))
    config.validate()
    record = prune_attention(unit, {n: None for n in unit.down_layers()}, config)
    assert record["after"] == 2 and unit.module.to_add_out.in_features == unit.module.to_out[0].in_features == 2 * d
    for layer in (unit.module.to_out[0], unit.module.to_add_out):
        assert not (layer.weight == 0).all(0).any()

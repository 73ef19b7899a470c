"""Structured OBS-Diff: heads, FFN neurons and resnet channel groups removed with compensation, models physically
smaller; FLOP and parameter budgets allocated over all of them."""


import pytest
import torch
from conftest import FAST, calibrated_layer, cli, error_line, export_options, interrupted_at, shown_lines
from safetensors.torch import load_file
from tiny_pipelines import DENOISER

from obsdiff.errors import UsageError
from obsdiff.hessian import HessianAccumulator
from obsdiff.prune import Method, PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder, load_pipeline
from obsdiff.solver import remove_column_groups
from obsdiff.sparsity import Structured
from obsdiff.structured import AttentionUnit, prune_attention


@pytest.fixture(scope="module")
def structured_30(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "s30"
    record = prune(default_model, out, PruneConfig(sparsity=Structured(0.3, 0.3), **FAST))
    return out, record


def test_default_model_shrinks_by_the_recorded_amount(default_model, structured_30):
    out, record = structured_30
    unet = record.components["unet"].shrink
    dense = load_pipeline(default_model).unet
    pipe = load_pipeline(out)
    params = sum(p.numel() for p in pipe.unet.parameters())
    assert params == unet.params_after == sum(p.numel() for p in dense.parameters()) - unet.params_removed
    assert unet.params_removed > 0 and unet.flops_after < unet.flops_before
    assert 0.25 <= unet.heads_removed / unet.heads_total <= 0.4
    assert unet.ffn_neurons_removed / unet.ffn_neurons_total == pytest.approx(0.3, abs=0.01)
    assert unet.channel_groups_removed / unet.channel_groups_total == pytest.approx(0.25)  # 2 of 8 per resnet
    resnet = pipe.unet.up_blocks[1].resnets[0]
    assert resnet.norm2.num_groups == 6 and resnet.conv1.out_channels == resnet.conv2.in_channels == 6 * 4
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
    record = prune_attention(unit, {"attn.to_out.0": acc.finalize()}, config)
    assert record.removed == (2,) and attn.heads == 3 and attn.to_q.out_features == 24
    assert torch.allclose(attn(x), before, atol=1e-6)


def test_obs_beats_no_compensation_and_l1_on_a_real_layer(default_model):
    layer, h = calibrated_layer(default_model, "mid_block.attentions.0.transformer_blocks.0.ff.net.2")
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
    comp = record.components[component].shrink
    assert comp.heads_removed > 0 and comp.ffn_neurons_removed > 0 and comp.params_after < comp.params_before
    if family == "sd3":
        assert any("context_pre_only" in s.reason for s in record.components[component].skipped)
    if family == "flux":
        heads = [u for u in record.units if u.kind == "heads"]
        assert heads and all(u.head_dim == 128 for u in heads)
    pipe = load_pipeline(tmp_path / "out")
    assert sum(p.numel() for p in getattr(pipe, component).parameters()) == comp.params_after
    images = pipe(["a handwritten digit six"], num_inference_steps=3, guidance_scale=3.0, height=16, width=16,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()


def test_every_head_cannot_go(default_model, tmp_path):
    record = prune(default_model, tmp_path / "o", PruneConfig(sparsity=Structured(0.99, 0.1),
                                                             num_prompts=2, steps=2, packages=1, method=Method.L1))
    heads = [u for u in record.units if u.kind == "heads"]
    assert heads and all(u.after == 1 for u in heads)


def test_blocks_narrow_a_structured_prune(default_model, tmp_path):
    """``--blocks`` picks the units a structured prune may shrink; every other block keeps its weights."""
    record = prune(default_model, tmp_path / "o", PruneConfig(sparsity=Structured(0.5, 0.5, 0.5), num_prompts=2,
                                                             steps=2, packages=1, method=Method.L1,
                                                             blocks="up_blocks.1.*"))
    assert record.units and all(u.unit.startswith("up_blocks.1.") for u in record.units)
    assert {u.kind for u in record.units} == {"heads", "ffn", "channels"}
    before = load_file(default_model / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "o" / "unet" / "diffusion_pytorch_model.safetensors")
    outside = [k for k in before if not k.startswith("up_blocks.1.")]
    assert outside and all(torch.equal(before[k], after[k]) for k in outside)
    with pytest.raises(UsageError, match="in --blocks"):
        prune(default_model, tmp_path / "p", PruneConfig(sparsity=Structured(0.5, 0.0, 0.0), num_prompts=2, steps=2,
                                                         packages=1, method=Method.L1, blocks="up_blocks.1.resnets.*"))


def test_structured_bad_inputs(default_model, tmp_path):
    proc = cli("prune", default_model, "--out", tmp_path / "v", "--pattern", "structured", "--components",
                   "text_encoder")
    assert proc.returncode != 0 and "no layout for CLIPTextModel" in error_line(proc)
    proc = cli("prune", default_model, "--out", tmp_path / "w", "--pattern", "structured", "--method", "wanda")
    assert proc.returncode != 0 and "obs-diff or l1" in error_line(proc)
    proc = cli("prune", default_model, "--out", tmp_path / "x", "--no-compensate")
    assert proc.returncode != 0 and "structured only" in error_line(proc)
    assert not list(tmp_path.iterdir())


def test_structured_record_lists_shapes_for_the_loader(structured_30):
    out, record = structured_30
    shapes = PrunedFolder.open(out).shapes("unet")
    assert shapes.attention_heads and shapes.ffn and shapes.resnet_groups
    assert all(entry.gated for entry in shapes.ffn)  # GEGLU: both halves of the up projection shrank


def test_structured_model_exports_to_onnx(default_model, structured_30, tmp_path):
    """Shapes changed by structured pruning go through the same exporter and gates."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from obsdiff.exporters.bundle import export

    out, record = structured_30
    manifest = export(out, "cpu", tmp_path / "b", export_options(gate_prompts=2, gate_steps=5), dense_model=default_model)
    # The report puts the measured latency against the dense export next to the FLOP ratio of the prune.
    dense = manifest["validation"]["against_dense"]
    unet = record.components["unet"].shrink
    assert dense["component"] == "unet" and dense["runs"] >= 5
    assert dense["flops_ratio"] == pytest.approx(unet.flops_after / unet.flops_before) and dense["flops_ratio"] < 1
    assert dense["latency_ratio"] == pytest.approx(dense["median_ms"]["pruned"] / dense["median_ms"]["dense"])
    report = (tmp_path / "b" / "report.md").read_text()
    assert "## Against the dense export" in report and f"**{dense['latency_ratio']:.3f}**" in report
    assert not list(tmp_path.glob(".obsdiff-dense-*"))  # the dense graph is not shipped and not left behind
    image = ORTStableDiffusionPipeline.from_pretrained(tmp_path / "b")(
        "a handwritten digit one", num_inference_steps=5, height=16, width=16, output_type="np").images
    assert torch.isfinite(torch.from_numpy(image)).all()


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_shrunk_transformer_families_export(family, tiny, tmp_path):
    """A shrunk SDXL UNet or SD3 transformer passes the cpu gates, and its graph is smaller by what was removed."""
    from obsdiff.exporters.bundle import export
    from obsdiff.exporters.components import pipeline_dims, specs_for
    from obsdiff.exporters.onnx import export_onnx
    from obsdiff.exporters.profiles import Shapes

    prune(tiny(family), tmp_path / "model", PruneConfig(sparsity=Structured(0.3, 0.3), num_prompts=2, steps=2,
                                                       packages=1))
    export(tmp_path / "model", "cpu", tmp_path / "b", export_options(gate_prompts=2, gate_steps=5))
    dense = load_pipeline(tiny(family))
    export_onnx(dense, tmp_path / "dense", specs_for(dense), pipeline_dims(dense, Shapes()), exporter="optimum")
    name = DENOISER[family]
    graph_size = lambda folder: parameters_in_graph(folder / name / "model.onnx")  # noqa: E731
    removed = sum(p.numel() for p in getattr(dense, name).parameters()) - sum(
        p.numel() for p in getattr(load_pipeline(tmp_path / "model"), name).parameters())
    assert removed > 0.05 * sum(p.numel() for p in getattr(dense, name).parameters())
    assert graph_size(tmp_path / "dense") - graph_size(tmp_path / "b") == removed


def parameters_in_graph(path) -> int:
    """Parameter elements in a graph: each initializer once per parameter it stands for. The exporter stores
    equal-valued tensors once (a tiny model's fresh GroupNorm weights are all ones) and aliases the copies with
    Identity nodes, so an initializer counts once per Identity reading it, plus once if other nodes read it directly."""
    from obsdiff.exporters.onnx import OnnxWeights

    weights = OnnxWeights(path)
    aliases: dict[str, int] = {}
    direct: set[str] = set()
    for node in weights.graph.node:
        for name in node.input:
            if node.op_type == "Identity":
                aliases[name] = aliases.get(name, 0) + 1
            else:
                direct.add(name)
    return sum(weights.numel(n) * (aliases.get(n, 0) + (n in direct or n not in aliases)) for n in weights)


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
    assert record.after == 2 and unit.module.to_add_out.in_features == unit.module.to_out[0].in_features == 2 * d
    for layer in (unit.module.to_out[0], unit.module.to_add_out):
        assert not (layer.weight == 0).all(0).any()


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500, 20]), text).sample


@pytest.mark.parametrize("method", ["obs-diff", "l1"])
def test_zero_channel_groups_go_first_and_change_nothing(default_model, tmp_path, method):
    """Groups whose conv2 columns are zero are the ones removed (OBS error 0, L1 norm 0), and the shrunk UNet computes
    exactly what the dense one did: whole GroupNorm groups go, so the kept groups normalise as before."""
    pipe = load_pipeline(default_model)
    zeroed = {}
    for path, block in pipe.unet.named_modules():
        if path.endswith(tuple(f"resnets.{i}" for i in range(3))):
            size = block.norm2.num_channels // block.norm2.num_groups
            groups = [1, block.norm2.num_groups - 2]
            with torch.no_grad():
                for g in groups:
                    block.conv2.weight[:, g * size : (g + 1) * size] = 0
            zeroed[path] = groups
    pipe.save_pretrained(tmp_path / "zeroed", safe_serialization=True)
    dense = _unet_out(pipe.unet)
    record = prune(tmp_path / "zeroed", tmp_path / "out", PruneConfig(
        method=Method(method), sparsity=Structured(0.0, 0.0, 0.25), **FAST))
    channels = {u.unit: list(u.removed) for u in record.units if u.kind == "channels"}
    assert channels == zeroed and not any(u.kind != "channels" for u in record.units)
    shrunk = load_pipeline(tmp_path / "out").unet
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in pipe.unet.parameters())
    torch.testing.assert_close(_unet_out(shrunk), dense, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def flops_budgets(default_model, tmp_path_factory) -> dict:
    """The default model pruned to --flops 0.7 with global and with uniform allocation."""
    from obsdiff.sparsity import Allocation, Budget, Measure

    root = tmp_path_factory.mktemp("flops")
    out = {}
    for alloc in Allocation:
        spec = Structured(budget=Budget(Measure.FLOPS, 0.7, alloc))
        out[alloc] = (root / str(alloc), prune(default_model, root / str(alloc), PruneConfig(sparsity=spec, **FAST)))
    return out


def test_flops_budget_is_met_and_allocations_differ(flops_budgets):
    """--flops 0.7 keeps ≤ 70% of the UNet's FLOPs (measured after the prune, on a real call), within one group's worth;
    global and uniform allocation spend it on different units."""
    from obsdiff.sparsity import Allocation

    for alloc, (folder, record) in flops_budgets.items():
        unet = record.components["unet"].shrink
        assert 0.64 <= unet.flops_after / unet.flops_before <= 0.7
        assert unet.budget == str(record.settings.sparsity.budget) and record.settings.sparsity.budget.allocation is alloc
        assert PrunedFolder.open(folder).record.settings.to_json()["budget"] == {"flops": 0.7, "allocation": str(alloc)}
        pipe = load_pipeline(folder)
        assert sum(p.numel() for p in pipe.unet.parameters()) == unet.params_after
        images = pipe(["a handwritten digit four"], num_inference_steps=3, output_type="pt").images
        assert torch.isfinite(images).all()

    def kept(record):
        return {u.unit: u.after for u in record.units}

    assert kept(flops_budgets[Allocation.GLOBAL][1]) != kept(flops_budgets[Allocation.UNIFORM][1])
    uniform = flops_budgets[Allocation.UNIFORM][1].units
    for kind in ("heads", "ffn", "channels"):  # one fraction everywhere (rounded per unit)
        fractions = {round(1 - u.after / u.before, 1) for u in uniform if u.kind == kind and u.before >= 8}
        assert len(fractions) <= 1, (kind, fractions)


def test_params_budget(default_model, tmp_path):
    from obsdiff.sparsity import Allocation, Budget, Measure

    spec = Structured(budget=Budget(Measure.PARAMS, 0.8, Allocation.GLOBAL))
    unet = prune(default_model, tmp_path / "p", PruneConfig(sparsity=spec, **FAST)).components["unet"].shrink
    assert 0.75 <= unet.params_after / unet.params_before <= 0.8


def test_allocation_ranks_error_per_flop_and_keeps_one_group():
    from obsdiff.budget import UnitCost, allocate
    from obsdiff.sparsity import Allocation, Budget, Measure

    costs = [UnitCost("cheap", "channels", 4, 10.0), UnitCost("dear", "heads", 4, 1.0)]
    scores = {"cheap": torch.tensor([0.1, 0.2, 0.3, 0.4]), "dear": torch.tensor([0.005, 0.025, 0.5, 0.9])}
    budget = Budget(Measure.FLOPS, 0.5, Allocation.GLOBAL)
    # error per FLOP: cheap 0.01, 0.02, 0.03 (one of its 4 groups stays), dear 0.005, 0.025, 0.5; cheapest first:
    # dear (saves 1), cheap (10), cheap (10) reach 21
    assert allocate(costs, 21, budget, scores) == {"cheap": 2, "dear": 1}
    assert allocate(costs, 33, budget, scores) == {"cheap": 3, "dear": 3}
    assert allocate(costs, 20, Budget(Measure.FLOPS, 0.5, Allocation.UNIFORM)) == {"cheap": 2, "dear": 2}
    with pytest.raises(UsageError, match="without removing every group of some layer.*cheap would have to lose all 4"):
        allocate(costs, 34, budget, scores, total=40)


def test_budget_bad_inputs(default_model, tmp_path):
    """Each is one line, a non-zero exit, and nothing written."""
    cases = [
        (["--pattern", "structured", "--flops", "1.5"], "--flops must be a fraction in (0, 1)"),
        (["--pattern", "structured", "--flops", "0"], "--flops must be a fraction in (0, 1)"),
        (["--pattern", "2:4", "--flops", "0.7"], "--flops is a budget for --pattern structured"),
        (["--pattern", "unstructured", "--flops", "0.7"], "--flops is a budget for --pattern structured"),
        (["--pattern", "structured", "--flops", "0.7", "--head-sparsity", "0.2"], "drop --head-sparsity"),
        (["--pattern", "structured", "--flops", "0.7", "--params", "0.7"], "not both"),
        (["--pattern", "structured", "--flops", "0.7", "--method", "l1"], "takes --allocation uniform"),
        (["--pattern", "structured", "--flops", "0.7", "--components", "vae"], "--flops budgets the denoiser"),
        (["--pattern", "structured", "--flops", "0.05", "--num-prompts", "2", "--steps", "2"],
         "cannot be met without removing every group of some layer"),
    ]
    for i, (args, message) in enumerate(cases):
        proc = cli("prune", default_model, "--out", tmp_path / f"o{i}", *args)
        assert proc.returncode != 0 and message in error_line(proc), (args, proc.stderr)
        assert len(shown_lines(proc.stderr)) == 1, proc.stderr
    assert "would have to lose all" in error_line(proc)
    assert not list(tmp_path.iterdir())


def test_budget_prune_resumes_to_the_same_model(default_model, flops_budgets, tmp_path, monkeypatch):
    """The allocation is made once on the dense model and saved with the first package: a resumed prune uses it."""
    from obsdiff.sparsity import Allocation

    whole_dir, whole = flops_budgets[Allocation.GLOBAL]
    config = dict(sparsity=whole.settings.sparsity, **FAST)
    with interrupted_at(monkeypatch, "after-package"), pytest.raises(KeyboardInterrupt):
        prune(default_model, tmp_path / "cut", PruneConfig(**config))
    resumed = prune(default_model, tmp_path / "cut", PruneConfig(**config), resume=True)
    assert [u.after for u in resumed.units] == [u.after for u in whole.units]
    a, b = load_file(whole_dir / "unet" / "diffusion_pytorch_model.safetensors"), \
        load_file(tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sd_unet_and_vae_decoder_shrink_and_export_smaller_graphs(tiny, tmp_path):
    """Channel groups of a tiny SD UNet and of the VAE decoder's resnets go; both generate, pass the cpu gates, and
    each ONNX graph is smaller than the dense one by exactly the parameters removed."""
    from obsdiff.exporters.bundle import export
    from obsdiff.exporters.components import pipeline_dims, specs_for
    from obsdiff.exporters.onnx import export_onnx
    from obsdiff.exporters.profiles import Shapes

    record = prune(tiny("sd"), tmp_path / "model", PruneConfig(sparsity=Structured(0.3, 0.3, 0.5),
                                                              components=("unet", "vae"), num_prompts=2, steps=2,
                                                              packages=1))
    vae = record.components["vae"].shrink
    assert vae.channel_groups_removed > 0 and vae.heads_removed == 0 and vae.flops_after < vae.flops_before
    assert all(u.unit.startswith("decoder.") for u in record.units if u.component == "vae")
    pipe = load_pipeline(tmp_path / "model")
    images = pipe(["a handwritten digit six"], num_inference_steps=3, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()
    export(tmp_path / "model", "cpu", tmp_path / "b", export_options(gate_prompts=2, gate_steps=5))
    dense = load_pipeline(tiny("sd"))
    export_onnx(dense, tmp_path / "dense", specs_for(dense), pipeline_dims(dense, Shapes()), exporter="optimum")
    for name, graph in (("unet", "unet"), ("vae", "vae_decoder")):
        removed = record.components[name].shrink.params_removed
        shrunk_by = parameters_in_graph(tmp_path / "dense" / graph / "model.onnx") - parameters_in_graph(
            tmp_path / "b" / graph / "model.onnx")
        assert removed > 0 and shrunk_by == removed, name

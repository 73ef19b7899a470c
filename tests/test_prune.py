"""OBS-Diff core end to end: patterns on the real model, calibration steps, packages, resume, families."""

import json
import shutil

import pytest
import torch
from conftest import FAST, cli, error_line, interrupted_at
from safetensors.torch import load_file, save_file
from tiny_pipelines import DENOISER

from obsdiff.adapters import adapter_for, find_targets
from obsdiff.calibration import CalibrationSettings, PackageHooks, run_pipeline
from obsdiff.digits.data import prompt_for
from obsdiff.errors import UsageError
from obsdiff.hessian import StepContext, timestep_weights
from obsdiff.layers import PRUNABLE, column_permutation, permute_hessian, weight_matrix
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder, load_pipeline
from obsdiff.solver import magnitude_prune, obs_prune, wanda_prune
from obsdiff.sparsity import NM, Unstructured, parse_sparsity


def _pruned_layers(record, component="unet"):
    return {r.layer: r for r in record.layers if r.component == component}


def test_2of4_on_default_model_follows_the_tensorrt_axis(pruned_24):
    folder = PrunedFolder.open(pruned_24)
    record = folder.record
    pipe = folder.load_pipeline()
    modules = dict(pipe.unet.named_modules())
    layers = _pruned_layers(record)
    assert layers
    for name in layers:
        weight = modules[name].weight.detach().numpy()  # along in_features, or input channels at every (r, s)
        assert NM(2, 4).holds(weight, axis=1), name
    all_weights = sum(m.weight.numel() for m in modules.values() if isinstance(m, PRUNABLE))
    pruned = sum(modules[n].weight.numel() for n in layers)
    assert pruned / all_weights >= 0.8
    assert record.components["unet"].mask.pruned_weights == pruned


def test_refine_lowers_every_first_package_layer_s_error_with_the_same_2of4_zeros(pruned_24, default_model, tmp_path):
    """``--refine`` (on by default for obs-diff masks): package 1 calibrates on the dense model either way, so its
    Hessians are the same with and without; the re-solved kept weights must do better on each of them, with N:M still
    on TensorRT's axis."""
    refined = PrunedFolder.open(pruned_24).record
    assert refined.settings.refine == 10
    swept = prune(default_model, tmp_path / "out", PruneConfig(sparsity=NM(2, 4), refine=0, **FAST))
    before = {r.layer: r for r in swept.layers if r.package == 0}
    after = {r.layer: r for r in refined.layers if r.package == 0}
    assert before.keys() == after.keys() and len(after) > 10
    for name, layer in after.items():
        assert layer.relative_error < before[name].relative_error, name
    mean = sum(r.relative_error for r in after.values()) / len(after)
    assert mean < 0.8 * sum(r.relative_error for r in before.values()) / len(before)
    modules = dict(load_pipeline(pruned_24).unet.named_modules())
    assert all(NM(2, 4).holds(modules[r.layer].weight.detach().numpy(), axis=1) for r in refined.layers)
    assert PruneConfig(method="wanda", sparsity=NM(2, 4)).validate() is None  # the default does not apply: no error


def test_unstructured_half_on_default_model(default_model, tmp_path):
    record = prune(default_model, tmp_path / "out", PruneConfig(sparsity=Unstructured(0.5), **FAST))
    assert PrunedFolder.open(tmp_path / "out").record == record  # what was written reads back as the same record
    for name, layer in _pruned_layers(record).items():
        assert layer.sparsity == pytest.approx(0.5, abs=0.01), name
        assert layer.relative_error is not None and 0 <= layer.relative_error < 1
    assert record.calibration.prompts == 8 and len(record.calibration.prompts_sha256) == 64
    assert {"calibration_s", "solve_s", "total_s"} <= set(record.timings) and record.peak_rss_mb > 0


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_each_hook_sees_every_step_once_per_call(default_model, scheduler):
    import diffusers

    pipe = load_pipeline(default_model)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    steps = 6
    ctx = StepContext(timestep_weights("log-decrease", steps))
    blocks = dict(pipe.unet.named_modules())
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
             "up_blocks.1.resnets.1.conv1"]
    hooks = PackageHooks({n: blocks[n] for n in names}, ctx, weighted=True)
    settings = CalibrationSettings([prompt_for(d) for d in range(4)], steps=steps, batch_size=2)
    with hooks, torch.no_grad():
        run_pipeline(pipe, settings, ctx, decode=False)
    for name, acc in hooks.accumulators.items():
        assert dict(acc.steps_seen) == {s: 2 for s in range(steps)}, name  # 2 batches, CFG in one call
    attn1, attn2 = names[0].rsplit(".", 1)[0], names[3].rsplit(".", 1)[0]
    assert hooks.owner[attn1 + ".to_k"] == hooks.owner[attn1 + ".to_v"] == attn1 + ".to_q"
    assert hooks.owner[attn2 + ".to_v"] == attn2 + ".to_k" and hooks.owner[attn2 + ".to_q"] == attn2 + ".to_q"


def _real_layer_hessian(pipe, name):
    ctx = StepContext(timestep_weights("log-decrease", 10))
    module = dict(pipe.unet.named_modules())[name]
    hooks = PackageHooks({name: module}, ctx, weighted=True)
    with hooks, torch.no_grad():
        run_pipeline(pipe, CalibrationSettings([prompt_for(d % 10) for d in range(20)], steps=10, batch_size=10),
                     ctx, decode=False)
    return module, permute_hessian(hooks.hessian(name).hessian, column_permutation(module))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_obs_halves_wanda_error_on_a_real_layer(default_model, pattern):
    pipe = load_pipeline(default_model)
    module, h = _real_layer_hessian(pipe, "down_blocks.1.resnets.0.conv1")  # a median layer, a 3×3 conv
    w, pat = weight_matrix(module), parse_sparsity(pattern)
    obs = obs_prune(w, h, pat)
    wanda = wanda_prune(w, h, pat)
    mag = magnitude_prune(w, pat, h)
    assert obs.error <= 0.5 * wanda.error
    assert wanda.error <= mag.error


@pytest.mark.parametrize("family,components", [
    ("sd", "unet,text_encoder,vae"), ("sdxl", "unet,text_encoder_2"),
    ("sd3", "transformer,text_encoder"), ("flux", "transformer,text_encoder_2"),
])
def test_every_family_prunes_end_to_end_and_reloads_bit_identical(tiny, tmp_path, family, components):
    src = tiny(family)
    out = tmp_path / "pruned"
    config = PruneConfig(sparsity=NM(2, 4), components=tuple(components.split(",")), num_prompts=4, steps=3,
                         batch_size=4, packages=2, height=16, width=16)
    record = prune(src, out, config)
    pipe = load_pipeline(out)
    for comp in config.components:
        assert record.components[comp].mask.pruned_layers > 0, comp
        saved = load_file(next((out / comp).glob("*.safetensors")))
        live = getattr(pipe, comp).state_dict()
        assert all(torch.equal(saved[k], live[k]) for k in saved), comp
    denoiser = getattr(pipe, DENOISER[family])
    assert any((m.weight == 0).float().mean() > 0.49 for m in denoiser.modules() if isinstance(m, PRUNABLE))
    images = pipe(["a handwritten digit three"], num_inference_steps=3, guidance_scale=3.0, height=16, width=16,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()


def test_layers_that_do_not_fit_the_pattern_are_skipped_and_listed(tiny, tmp_path):
    src = tiny("sd", cross_attention_dim=30)  # attn2.to_k / to_v have in_features 30: not a multiple of 4
    record = prune(src, tmp_path / "out", PruneConfig(sparsity=NM(2, 4), num_prompts=2, steps=2, packages=1))
    skipped = {s.name: s.reason for s in record.components["unet"].skipped}
    bad = [n for n in skipped if n.endswith("attn2.to_k")]
    assert bad and "not a multiple of 4" in skipped[bad[0]]
    assert "unet.conv_in" in skipped


def _same_unet(a_dir, b_dir) -> bool:
    a = load_file(a_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(b_dir / "unet" / "diffusion_pytorch_model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_at_the_first_unfinished_package(tiny, tmp_path, monkeypatch, caplog):
    src = tiny("sd")
    cfg = lambda: PruneConfig(sparsity=Unstructured(0.5), num_prompts=4, steps=3, packages=3)  # noqa: E731
    full = tmp_path / "full"
    prune(src, full, cfg())
    out = tmp_path / "resumed"
    with interrupted_at(monkeypatch, "after-package"), pytest.raises(KeyboardInterrupt):
        prune(src, out, cfg())
    partial = tmp_path / ".resumed.obsdiff-partial"
    assert json.loads((partial / "progress.json").read_text())["done"] == {"unet": 1} and not out.exists()
    assert (partial / "trajectory.rank0.safetensors").is_file()  # the recording is kept: a resume does not redo it
    with pytest.raises(UsageError, match="other settings"):
        prune(src, out, PruneConfig(sparsity=Unstructured(0.4), num_prompts=4, steps=3, packages=3),
              resume=True)
    # an unfinished package's work is redone from the saved state: results equal the uninterrupted run
    with caplog.at_level("INFO", logger="obsdiff.prune"):
        record = prune(src, out, cfg(), resume=True)
    assert "recorded calls read from" in caplog.text and "calls recorded in" not in caplog.text
    assert not partial.exists()
    assert _same_unet(full, out)
    assert len(record.layers) == len(PrunedFolder.open(full).record.layers)


def test_resume_after_a_refreshed_recording_replays_that_recording(tiny, tmp_path, monkeypatch):
    """With ``refresh_every`` 2, package 3 replays the trajectory recorded before package 2 on the partly pruned model:
    a prune interrupted after package 3 resumes with that recording, not the dense one."""
    src = tiny("sd")
    cfg = lambda: PruneConfig(sparsity=Unstructured(0.5), num_prompts=4, steps=3, packages=4,  # noqa: E731
                              refresh_every=2)
    prune(src, tmp_path / "full", cfg())
    out = tmp_path / "resumed"
    with interrupted_at(monkeypatch, "after-package", nth=3), pytest.raises(KeyboardInterrupt):
        prune(src, out, cfg())
    prune(src, out, cfg(), resume=True)
    assert _same_unet(tmp_path / "full", out)
    # the same stop, but the saved weights torn: the UNet starts over, so the re-recording (newer than any weights
    # left) is recorded again on the dense model instead of replayed
    torn = tmp_path / "torn"
    with interrupted_at(monkeypatch, "after-package", nth=3), pytest.raises(KeyboardInterrupt):
        prune(src, torn, cfg())
    (tmp_path / ".torn.obsdiff-partial" / "unet.safetensors").write_bytes(b"torn")
    prune(src, torn, cfg(), resume=True)
    assert _same_unet(tmp_path / "full", torn)


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.5"], "must be in (0, 1)"),
    (["--sparsity", "0"], "must be in (0, 1)"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "means sparsity 0.5"),
    (["--components", "unet,prior"], "unknown component prior"),
    (["--method", "sparsegpt"], "invalid choice"),
    (["--pattern", "3:2"], "0 < N < M"),
    (["--method", "wanda", "--refine", "5"], "--refine re-solves the kept weights of an obs-diff mask"),
    (["--refine", "-1"], "--refine must be a whole number ≥ 0"),
])
def test_bad_prune_options(default_model, tmp_path, args, message):
    out = tmp_path / "out"
    proc = cli("prune", default_model, "--out", out, "--num-prompts", "2", "--steps", "2", *args)
    assert proc.returncode != 0
    assert message in error_line(proc)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_empty_prompt_file_and_nan_activations(default_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    proc = cli("prune", default_model, "--out", tmp_path / "o1", "--prompts", empty)
    assert proc.returncode != 0 and "holds no prompts" in error_line(proc)

    poisoned = tmp_path / "poisoned"
    shutil.copytree(default_model, poisoned)
    weights = poisoned / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.weight"] = torch.full_like(state["conv_in.weight"], float("nan"))
    save_file(state, weights)
    proc = cli("prune", poisoned, "--out", tmp_path / "o2", "--num-prompts", "2", "--steps", "2")
    line = error_line(proc)
    assert proc.returncode != 0 and "non-finite" in line and "layer down_blocks" in line
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2*"))


def test_adapter_targets_are_data(default_model):
    pipe = load_pipeline(default_model)
    adapter = adapter_for(pipe.unet)
    targets, skipped = find_targets(pipe.unet, adapter)
    assert adapter.family == "unet2d-condition" and adapter.denoiser
    time_conditioning = {n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)
                         and (n.startswith("time_embedding.") or n.endswith(".time_emb_proj"))}
    assert time_conditioning and {s.name for s in skipped} == {"conv_in", "conv_out"} | time_conditioning
    assert all("time conditioning" in s.reason for s in skipped if s.name in time_conditioning)
    assert targets[0].block == "down_blocks.0.resnets.0" and targets[-1].block.startswith("up_blocks.1")

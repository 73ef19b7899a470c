"""Calibration that costs only what the Hessians need: row budgets, the recorded trajectory replayed and stopped after
a package's last layer, and the time plan."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, cli, error_line
from torch import nn

from obsdiff.calibration import CalibrationSettings, PackageHooks, record_trajectory, replay, run_pipeline
from obsdiff.digits.data import prompt_for
from obsdiff.hessian import HessianAccumulator, StepContext, layer_rows, sampled_rows, timestep_weights
from obsdiff.prune import PruneConfig, plan_prune, prune
from obsdiff.pruned_folder import load_pipeline
from obsdiff.sparsity import NM


@pytest.mark.parametrize("conv", [nn.Conv2d(5, 7, 3, padding=1), nn.Conv2d(5, 7, 3, stride=2, padding=1),
                                  nn.Conv2d(5, 7, 3, padding=2, dilation=2), nn.Conv2d(5, 7, 1)], ids=str)
def test_a_drawn_subset_of_conv_rows_is_exactly_those_rows_of_im2col(conv):
    """The gather that never builds the whole im2col matrix returns unfold's own rows, in its column order."""
    x = torch.randn(3, 5, 9, 11)
    full = layer_rows(conv, x)
    rows, n = sampled_rows(conv, x, 17, torch.Generator().manual_seed(1))
    assert n == full.shape[0] and torch.equal(rows, full[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:17]])
    everything, _ = sampled_rows(conv, x, None, None)
    assert torch.equal(everything, full)


def test_a_row_budget_keeps_the_statistic_unbiased():
    """Each call's subset stands for all its rows: averaged over draws, the budgeted Hessian is the full one; with a
    budget above the rows available it is the full one exactly."""
    torch.manual_seed(0)
    calls = [torch.randn(400, 6) * (1 + i) for i in range(3)]
    full = HessianAccumulator(6)
    for i, x in enumerate(calls):
        full.add(x, alpha=1.0 + i)
    mean = torch.zeros(6, 6)
    draws = 300
    for seed in range(draws):
        acc = HessianAccumulator(6)
        for i, x in enumerate(calls):
            rows, n = sampled_rows(nn.Linear(6, 2), x, 40, torch.Generator().manual_seed(seed * 10 + i))
            acc.add(rows, alpha=1.0 + i, represents=n)
        mean += acc.finalize() / draws
    assert torch.allclose(mean, full.finalize(), rtol=0.05, atol=0.05 * full.hessian.abs().max().item())
    exact = HessianAccumulator(6)
    for i, x in enumerate(calls):
        rows, n = sampled_rows(nn.Linear(6, 2), x, 1000, None)
        exact.add(rows, alpha=1.0 + i, represents=n)
    assert torch.allclose(exact.finalize(), full.hessian)


def test_a_replayed_package_sees_what_a_full_rerun_sees_and_stops_after_its_last_layer(default_model):
    """On the dense model the recorded calls are the rerun's own: the first package's Hessians are the same; and the
    replay never runs the layers after the package (conv_out is never called)."""
    pipe = load_pipeline(default_model)
    names = ["down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    modules = dict(pipe.unet.named_modules())
    settings = CalibrationSettings([prompt_for(d) for d in range(4)], steps=3, batch_size=2)
    weights = timestep_weights("log-decrease", 3)

    def hessians(feed) -> dict:
        ctx = StepContext(weights)
        hooks = PackageHooks({n: modules[n] for n in names}, ctx, weighted=True, stop_when_done=feed == "replay")
        if feed == "replay":
            calls = record_trajectory(pipe, pipe.unet, settings, StepContext(weights))
            assert len(calls) == 2 * 3 and {c.step for c in calls} == {0, 1, 2}
            seen = []
            handle = pipe.unet.conv_out.register_forward_pre_hook(lambda m, a: seen.append(1))
            with hooks:
                replay(pipe.unet, calls, ctx, hooks)
            handle.remove()
            assert not seen  # stopped after the package: the rest of the UNet never ran
        else:
            with hooks, torch.no_grad():
                run_pipeline(pipe, settings, ctx, decode=False, hooks=hooks)
        return {n: hooks.hessian(n).hessian.clone() for n in names}

    full, replayed = hessians("full"), hessians("replay")
    for name in names:
        assert torch.allclose(full[name], replayed[name], rtol=1e-5, atol=1e-7), name


def test_the_plan_gives_time_and_memory_per_package_as_json(default_model, tmp_path):
    proc = cli("prune", default_model, "--out", tmp_path / "o", "--plan", "--json", "--pattern", "2:4")
    plan = json.loads(proc.stdout)
    rows = plan["components"]["unet"]
    assert rows and all(r["expected_seconds"] > 0 and r["expected_peak_bytes"] > 0 for r in rows)
    assert plan["expected_seconds"] == pytest.approx(plan["recording_seconds"] + sum(r["expected_seconds"] for r in rows))
    assert plan["expected_peak_bytes"] == max(r["expected_peak_bytes"] for r in rows)
    widths = plan["rows_per_column_by_width"]
    assert widths and all(v >= 2 for v in widths.values())
    text = cli("prune", default_model, "--out", tmp_path / "o", "--plan", "--pattern", "2:4").stdout
    assert "expected wall time" in text and "rows per column, fewest per layer width" in text
    assert not (tmp_path / "o").exists()


def test_a_short_batch_is_planned_at_the_images_it_really_holds(default_model):
    """4 prompts in batches of 16 are 4 prompts per call, not 16: the recording's images and each layer's rows per
    column are what they would be in batches of 4 (the input shapes are probed at the full batch)."""
    plans = {b: plan_prune(default_model, PruneConfig(sparsity=NM(2, 4), num_prompts=4, steps=3, batch_size=b))
             for b in (4, 16)}
    assert plans[16]["recording_seconds"] == pytest.approx(4 * 3 * 2 * plans[16]["seconds_per_image"])
    assert plans[16]["rows_per_column_by_width"] == pytest.approx(plans[4]["rows_per_column_by_width"], rel=0.02)


def test_the_record_keeps_each_package_measured_beside_its_estimate(default_model, tmp_path):
    record = prune(default_model, tmp_path / "o", PruneConfig(sparsity=NM(2, 4), **FAST))
    for row in record.memory_plan["components"]["unet"]:
        assert row["measured_seconds"] > 0 and row["expected_seconds"] > 0
    assert record.settings.rows_per_column and record.settings.calibration == "replay"


@pytest.mark.parametrize("value,message", [("0", "--rows-per-column must be a whole number ≥ 1"),
                                           ("-3", "--rows-per-column must be a whole number ≥ 1"),
                                           ("nan", "must be a whole number ≥ 1 or 'all'"),
                                           ("1.5", "must be a whole number ≥ 1 or 'all'")])
def test_a_bad_row_budget_is_one_line_and_writes_nothing(default_model, tmp_path, value, message):
    proc = cli("prune", default_model, "--out", tmp_path / "o", "--rows-per-column", value)
    assert proc.returncode == 2 and message in error_line(proc)
    assert list(tmp_path.iterdir()) == []


def test_json_needs_plan(default_model, tmp_path):
    proc = cli("prune", default_model, "--out", tmp_path / "o", "--json")
    assert proc.returncode == 2 and "use it with --plan" in error_line(proc)

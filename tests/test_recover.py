"""``obsdiff recover``: distillation from the dense teacher keeps every zero, N:M group and shrunk shape, brings the
student closer to its teacher, resumes to the same weights, and refuses bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STACKED, cli, error_line, export_options, interrupted_at, run_cli

from obsdiff.digits.evaluate import final_latents
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder, load_pipeline
from obsdiff.recover import RecoverConfig, recover
from obsdiff.sparsity import NM, Budget, Measure, Structured

QUICK = RecoverConfig(steps=30, batch_size=16, trajectory_steps=4, num_prompts=8, warmup=3, checkpoint_every=10)


@pytest.fixture(scope="module")
def recovered_24(pruned_24, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "model"
    recover(pruned_24, out, QUICK)
    return out


def _weights(folder, component="unet") -> dict[str, torch.Tensor]:
    return dict(load_pipeline(folder).components[component].state_dict())


def test_recover_keeps_every_zero_and_2of4_and_moves_toward_the_teacher(pruned_24, recovered_24, default_model):
    before, after = _weights(pruned_24), _weights(recovered_24)
    record = PrunedFolder.open(recovered_24).record
    layers = [r.layer for r in record.layers if r.component == "unet"]
    assert len(layers) > 50
    for layer in layers:
        key = f"{layer}.weight"
        assert torch.equal(before[key] == 0, after[key] == 0), layer  # the same zeros, exactly
        assert NM(2, 4).holds(after[key].numpy(), axis=1), layer  # along K, or C at every (r, s)
        assert not torch.equal(before[key], after[key]), layer  # the kept weights were trained
    rec = record.recovery
    assert rec.rows == 8 * 4 * 2 and rec.masked_layers == len(layers) and rec.settings["steps"] == 30
    assert rec.loss_curve[-1][1] < rec.loss_curve[0][1] / 2, rec.loss_curve
    assert rec.teacher == str(default_model) and rec.peak_rss_mb > 0
    # held out (other prompts, the evaluation's guidance and noise): the student ends closer to its teacher
    dense, pruned, healed = (final_latents(load_pipeline(f), 10, steps=10) for f in (default_model, pruned_24,
                                                                                     recovered_24))
    assert (healed - dense).square().mean() < 0.9 * (pruned - dense).square().mean()


def test_recover_keeps_a_shrunk_denoiser_s_shapes(default_model, tmp_path):
    shrunk = tmp_path / "shrunk"
    prune(default_model, shrunk, PruneConfig(sparsity=Structured(budget=Budget(Measure.FLOPS, 0.7)), **STACKED))
    out = tmp_path / "rec"
    recover(shrunk, out, RecoverConfig(steps=4, batch_size=8, trajectory_steps=2, num_prompts=4, warmup=0))
    before, after = _weights(shrunk), _weights(out)
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert sum(v.numel() for v in after.values()) < sum(v.numel() for v in _weights(default_model).values())
    assert PrunedFolder.open(out).record.shapes == PrunedFolder.open(shrunk).record.shapes


def test_recover_interrupted_resumes_to_the_same_weights(pruned_tiny, tmp_path, monkeypatch):
    args = ["recover", pruned_tiny, "--steps", "6", "--batch-size", "4", "--trajectory-steps", "2", "--num-prompts", "4",
            "--checkpoint-every", "2", "--warmup", "0"]
    assert cli(*args, "--out", tmp_path / "whole").returncode == 0
    with interrupted_at(monkeypatch, "recover-checkpoint", nth=2):
        assert cli(*args, "--out", tmp_path / "cut").returncode == 130
    assert not (tmp_path / "cut").exists()
    assert (tmp_path / ".cut.obsdiff-recover" / "state.safetensors").is_file()
    assert cli(*args, "--out", tmp_path / "cut", "--resume").returncode == 0
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not (tmp_path / ".cut.obsdiff-recover").exists()
    curve = json.loads((tmp_path / "cut" / "pruning.json").read_text())["recovery"]["loss_curve"]
    assert [step for step, _ in curve] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("case", ["never-pruned", "missing-teacher", "other-architecture", "steps-0", "nan-lr",
                                  "quantized"])
def test_recover_refuses_bad_input_in_one_line(case, pruned_24, default_model, tiny, int8_model, tmp_path):
    folder, extra = pruned_24, ["--num-prompts", "1", "--trajectory-steps", "1", "--batch-size", "1"]
    if case == "never-pruned":
        folder = default_model
    elif case == "missing-teacher":
        extra += ["--teacher", tmp_path / "nowhere"]
    elif case == "other-architecture":
        extra += ["--teacher", tiny("sdxl")]
    elif case == "steps-0":
        extra += ["--steps", "0"]
    elif case == "nan-lr":
        extra += ["--lr", "nan"]
    elif case == "quantized":
        folder = int8_model
    if case != "steps-0":
        extra += ["--steps", "1"]  # should a refusal fail to come, the run is short
    proc = run_cli("recover", folder, "--out", tmp_path / "out", *extra)
    message = {"never-pruned": "was never pruned", "missing-teacher": "does not exist",
               "other-architecture": "architecture differs", "steps-0": "--steps must be a whole number ≥ 1",
               "nan-lr": "finite number", "quantized": "is quantized"}[case]
    assert proc.returncode != 0 and message in error_line(proc)
    assert not any(tmp_path.glob("*out*")), list(tmp_path.iterdir())


def test_recovered_folder_exports_to_cpu_jetson_and_ios(recovered_24, tmp_path):
    from obsdiff.exporters.bundle import export

    for target in ("cpu", "jetson", "ios"):  # export publishes only when every gate passed (else GateError)
        manifest = export(recovered_24, target, tmp_path / target, export_options(gate_prompts=1, gate_steps=3))
        gates = manifest["validation"]["gates"]
        assert gates and all(g["passed"] for g in gates), (target, gates)
        assert manifest["pruning"]["recovery"]["settings"]["steps"] == QUICK.steps


def test_recover_plan_counts_the_training_step_and_refuses_what_cannot_fit(pruned_24, tmp_path):
    proc = run_cli("recover", pruned_24, "--plan", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    student = plan["student_bytes"]
    assert plan["gradient_bytes"] == student and plan["optimizer_bytes"] == 2 * student
    assert plan["training_activation_bytes"] > 0 and plan["backward_bytes"] == 3 * plan["training_activation_bytes"]
    assert plan["expected_peak_bytes"] >= plan["base_bytes"] + 4 * student + 4 * plan["training_activation_bytes"]
    proc = run_cli("recover", pruned_24, "--out", tmp_path / "out", "--max-memory", "0.05", "--steps", "1")
    assert "GiB" in error_line(proc) and "over the 0.05 GiB budget" in error_line(proc)
    assert not any(tmp_path.iterdir())

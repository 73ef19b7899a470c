"""The prune on one CUDA GPU, on the default model: every path that used to mix devices or sync per layer.

Skipped with its reason where there is no GPU (``meta`` tensors cannot stand in: ``cpu += meta`` passes silently).
Each case runs the same prune on the CPU and on the GPU and compares: 2:4 must hold on TensorRT's axis, and layer
errors must be close (the GPU's kernels differ in the last bits, so masks may differ in a few weights).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAST

from obsdiff.config import Method
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import PrunedFolder
from obsdiff.quantize import Quantization
from obsdiff.sparsity import NM, Budget, Dense, Measure, Structured

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the GPU prune "
                                "(device placement, GPU memory plan, syncs) is checked where one exists")

CASES = {
    "2:4": dict(sparsity=NM(2, 4)),
    "wanda 2:4": dict(sparsity=NM(2, 4), method=Method.WANDA),
    "structured --flops 0.7": dict(sparsity=Structured(budget=Budget(Measure.FLOPS, 0.7))),
    "int8": dict(sparsity=Dense(), quantization=Quantization(8)),
    "int4 g32": dict(sparsity=Dense(), quantization=Quantization(4, 32)),
}


def _mean_error(record) -> float:
    errors = [r.relative_error for r in record.layers if r.relative_error is not None]
    errors += [e.relative_error for u in record.units for e in u.layers.values() if e.relative_error is not None]
    return sum(errors) / len(errors)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hessian_device", [None, "cpu"])
def test_a_gpu_prune_matches_the_cpu_prune(default_model, tmp_path, case, hessian_device):
    config = dict(**CASES[case], **FAST)
    on_cpu = prune(default_model, tmp_path / "cpu", PruneConfig(**config), device="cpu")
    on_gpu = prune(default_model, tmp_path / "gpu", PruneConfig(**config), device="cuda", hessian_device=hessian_device)
    assert on_gpu.device_peak_mb and on_gpu.memory_plan["device"].startswith("cuda")
    folder = PrunedFolder.open(tmp_path / "gpu")
    pipe = folder.load_pipeline()
    modules = dict(pipe.unet.named_modules())
    if case.startswith("wanda"):  # no reconstruction error to compare: the masks themselves (ties may flip)
        cpu_modules = dict(PrunedFolder.open(tmp_path / "cpu").load_pipeline().unet.named_modules())
        same = [(modules[r.layer].weight == 0).eq(cpu_modules[r.layer].weight == 0).float().mean().item()
                for r in folder.layers("unet")]
        assert min(same) > 0.99
    else:
        assert _mean_error(on_gpu) == pytest.approx(_mean_error(on_cpu), rel=0.05)
    if "2:4" in case:
        for r in folder.layers("unet"):
            assert NM(2, 4).holds(modules[r.layer].weight.detach().numpy(), axis=1), r.layer
    if "int" in case:
        assert folder.quantization["unet"].quant == CASES[case]["quantization"]  # checked on its grid when opened


def test_a_gpu_prune_exports_for_jetson(default_model, tmp_path):
    from obsdiff.exporters.bundle import export
    from obsdiff.exporters.export_plan import ExportOptions, ShapeOverrides

    prune(default_model, tmp_path / "m", PruneConfig(sparsity=NM(2, 4), **FAST), device="cuda")
    manifest = export(tmp_path / "m", "jetson", tmp_path / "b", ExportOptions(shapes=ShapeOverrides(gate_prompts=2)))
    gates = {g["name"]: g["value"] for g in manifest["validation"]["gates"]}
    assert gates["unet targeted layers 2:4 (checker and polygraphy)"] > 100

"""Integer weights through export: ONNX QDQ graphs that carry our int8 codes (and int8 activations that ONNX Runtime
runs as int8 kernels), Core ML constexpr ops that carry our int8/int4 codes; bad combinations refused in one line."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import cli, error_line, export_options
from onnx import numpy_helper
from safetensors.torch import load_file

from obsdiff.errors import UsageError
from obsdiff.exporters.apple import AppleOptions, Layout
from obsdiff.exporters.bundle import export
from obsdiff.exporters.coreml import stored_codes
from obsdiff.exporters.profiles import load_profile
from obsdiff.layers import weight_matrix
from obsdiff.prune import PruneConfig, prune
from obsdiff.pruned_folder import SCALES_FILE, PrunedFolder, load_pipeline
from obsdiff.quantize import Quantization, per_column
from obsdiff.resources import targets_dir
from obsdiff.sparsity import NM, Dense

IOS_PROFILE = targets_dir() / "ios.toml"


def _torch_codes(model_dir, quant: Quantization) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer → (weight as the solver lays it out, integer codes), recomputed here from the folder's weights and
    scales file."""
    modules = dict(load_pipeline(model_dir).unet.named_modules())
    out = {}
    for key, scale in load_file(model_dir / "unet" / SCALES_FILE).items():
        matrix = weight_matrix(modules[key.removesuffix(".weight_scale")])
        out[key.removesuffix(".weight_scale")] = (matrix, matrix / per_column(scale, quant))
    return out


def test_cpu_int8_bundle_carries_our_codes_and_runs_int8_kernels(cpu_int8_bundle, int8_model):
    bundle = cpu_int8_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    results = manifest["validation"]
    unet = results["components"]["unet"]
    assert unet["int8"]["codes"]["equal"] == unet["int8"]["codes"]["layers"] > 100
    assert unet["int8"]["kernels"]["QLinearConv"] > 10 and unet["int8"]["kernels"]["QLinearMatMul"] > 10
    assert results["end_to_end"]["psnr_db"] >= 35.0  # exported int8 vs the fake-quantized PyTorch pipeline
    _assert_initializers_are_our_codes(bundle, int8_model)


def test_a_stacked_folder_exports_shrunk_int8_with_both_factors(stacked_model, default_model, tmp_path):
    """Structured + int8 from one prune: the graph carries our codes at the shrunk shapes, and the report splits the
    speed against the dense export into its structured and int8 factors, timed together."""
    bundle = tmp_path / "bundle"
    manifest = export(stacked_model, "cpu-int8", bundle, export_options(gate_prompts=1, gate_steps=5),
                      dense_model=default_model)
    results = manifest["validation"]
    unet = results["components"]["unet"]
    assert unet["int8"]["codes"]["equal"] == unet["int8"]["codes"]["layers"] > 100
    _assert_initializers_are_our_codes(bundle, stacked_model)
    dense = results["against_dense"]
    assert dense["structured_speedup"] > 0 and dense["int8_speedup"] > 0
    assert dense["latency_ratio"] * dense["structured_speedup"] * dense["int8_speedup"] == pytest.approx(1.0)
    assert dense["flops_ratio"] <= 0.7 and "Stacked:" in (bundle / "report.md").read_text()


def _assert_initializers_are_our_codes(bundle, model_dir) -> None:
    """Independently of the exporter's own check: every int8 initializer × its scale is a PyTorch weight, exactly."""
    graph = onnx.load(str(bundle / "unet" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    quantized = {n: a for n, a in inits.items() if n.endswith("_quantized")}
    assert quantized and all(a.dtype == np.int8 for a in quantized.values())
    codes = _torch_codes(model_dir, Quantization(8))
    axis = {n.input[0]: next((a.i for a in n.attribute if a.name == "axis"), 1)
            for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    weights = {}
    for name, q in quantized.items():
        scale = inits[name.removesuffix("_quantized") + "_scale"]
        shape = [1] * q.ndim
        shape[axis[name]] = scale.size
        weights[name] = q.astype(np.float32) * scale.reshape(shape)
    # in the solver's layout: a Conv as (out, kh·kw·C); a Linear as Gemm or, transposed, as MatMul stores it
    candidates = [c for deq in weights.values()
                  for c in ((deq.transpose(0, 2, 3, 1).reshape(deq.shape[0], -1),) if deq.ndim == 4 else (deq, deq.T))]
    matched = 0
    for matrix, code in codes.values():
        assert torch.equal(code.round(), code.round().clamp(-127, 127))
        w = matrix.numpy()
        matched += any(c.shape == w.shape and np.allclose(c, w, rtol=0, atol=1e-7) for c in candidates)
    assert matched == len(codes)


@pytest.mark.parametrize("quant,pattern", [(Quantization(8), NM(2, 4)), (Quantization(4, 16), Dense())])
def test_coreml_weights_read_back_as_our_codes(tiny, tmp_path, quant, pattern):
    model = tmp_path / "model"
    # a one-level UNet (resnet convs, attention, feed-forward): every layer kind, half the Core ML conversion time
    prune(tiny("sd", widths=(32,)), model, PruneConfig(sparsity=pattern, quantization=quant, num_prompts=2, steps=2,
                                                       packages=1))
    profile = tmp_path / "ios-unet.toml"  # the ios profile, converting the UNet only (the quantized component)
    profile.write_text(IOS_PROFILE.read_text().replace('components = ["text_encoder", "denoiser", "vae_decoder"]',
                                                       'components = ["denoiser"]'))
    manifest = export(model, profile, tmp_path / "bundle", export_options(apple=AppleOptions(layout=Layout.OURS)))
    assert list(manifest["components"]) == ["unet"]
    results = manifest["validation"]
    assert results["deployment_target"] == "iOS18"
    gates = {g["name"]: g["value"] for g in results["gates"]}
    assert gates["unet integer weights equal obsdiff's codes and scales"] == 1.0
    stored = stored_codes(tmp_path / "bundle" / "Resources" / "Unet.mlpackage")
    codes = _torch_codes(model, quant)
    assert len(codes) > 10
    for layer, (matrix, code) in codes.items():
        key = f"model_{layer.replace('.', '_')}_weight"
        got = next(v for k, v in sorted(stored.items(), key=lambda kv: len(kv[0])) if k.startswith(key))[0]
        if got.ndim == 4:  # the solver's conv columns are (kernel row, kernel column, input channel)
            got = got.transpose(0, 2, 3, 1).reshape(got.shape[0], -1)
        assert np.array_equal(got.astype(np.int64), code.round().numpy().astype(np.int64)), layer
        assert np.abs(got).max() <= quant.levels
        if isinstance(pattern, NM):
            assert ((got == 0) == (matrix.numpy() == 0)).all()  # the 2:4 zeros are code 0


def test_jetson_int8_is_explicit_quantization_qdq(int8_model, tmp_path):
    """TensorRT's int8 input: our int8 weights, symmetric int8 activations (zero point 0), trtexec with --int8."""
    bundle = tmp_path / "bundle"
    manifest = export(int8_model, "jetson", bundle, export_options(gate_prompts=2))
    results = manifest["validation"]
    assert results["components"]["unet"]["int8"]["activations"] == "int8 (symmetric)"
    graph = onnx.load(str(bundle / "unet" / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    zero_points = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert "--fp16 --int8 --sparsity=enable" in (bundle / "build_engines.sh").read_text()


def test_int8_export_bad_input(int8_model, default_model, tiny, tmp_path):
    int4 = tmp_path / "int4"
    prune(tiny("sd"), int4, PruneConfig(sparsity=Dense(), quantization=Quantization(4, 16), num_prompts=2, steps=2,
                                        packages=1))
    cases = [
        ((int8_model, "--target", "ios", "--activations", "int8"), "--activations int8 is not supported for Core ML"),
        ((default_model, "--target", "cpu-int8"), "needs a folder whose denoiser has int8 weights"),
        ((int8_model, "--target", "cpu", "--activations", "int4"), "--activations must be float or int8"),
        ((int4, "--target", "cpu-int8"), "ONNX targets take int8 with one scale per output channel"),
        ((int8_model, "--target", "cpu", "--precision", "fp16"), "pass --precision fp32"),
        ((int8_model, "--target", "ios", "--compress", "int8"), "drop --compress"),
    ]
    for i, (args, message) in enumerate(cases):
        proc = cli("export", *args, "--out", tmp_path / f"b{i}")
        assert proc.returncode != 0 and message in error_line(proc), (args, proc.stderr[-400:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]
    assert PrunedFolder.open(int8_model).record.settings.quantization == Quantization(8)


def test_a_stacked_int4_profile_for_onnx_is_refused_before_the_prune(default_model, tmp_path):
    """structured --flops with int4 on an ONNX target: ship refuses it in one line before pruning, nothing written."""
    profile = tmp_path / "stacked-int4.toml"
    text = (targets_dir() / "cpu-int8.toml").read_text()
    shipped = load_profile(targets_dir() / "cpu-int8.toml").prune  # the shipped default is the stacked prune
    assert shipped.sparsity.budget is not None and shipped.quantization == Quantization(8)
    profile.write_text(text.replace('quantize = "int8"', 'quantize = "int4"\ngroup_size = 32'))
    assert load_profile(profile).prune.quantization == Quantization(4, 32)
    proc = cli("ship", "--target", profile, "--model", default_model, "--out", tmp_path / "out")
    assert proc.returncode != 0 and "ONNX targets take int8 with one scale per output channel" in error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stacked-int4.toml"]


@pytest.mark.parametrize("old,new,message", [
    ('quantize = "int8"', 'quantize = "int3"', "quantize must be int8 or int4, got 'int3'"),
    ('quantize = "int8"', 'quantize = "int8"\ngroup_size = 0', "group_size must be a whole number ≥ 1"),
    ('activations = "int8"', 'activations = "int16"', "activations must be float or int8, got 'int16'"),
])
def test_bad_int8_profile_fields_name_the_field(tmp_path, old, new, message):
    path = tmp_path / "bad.toml"
    path.write_text((targets_dir() / "cpu-int8.toml").read_text().replace(old, new))
    with pytest.raises(UsageError, match=message):
        load_profile(path)
    assert load_profile(targets_dir() / "cpu-int8.toml").prune.quantization == Quantization(8)


def test_lean_activation_ranges_are_ort_calibrations_ranges(tmp_path):
    """The memory-lean calibration (reductions as soon as their input exists, no arena, no second graph copy) gives
    exactly the MinMax ranges of ONNX Runtime's own calibrator, for every tensor it calibrates."""
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

    from obsdiff.exporters.onnx_int8 import WEIGHT_OPS, CalibrationFeed, activation_ranges

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.mix = torch.nn.Conv2d(8, 8, 1)
            self.out = torch.nn.Linear(8, 5)

        def forward(self, x):
            h = self.mix(torch.nn.functional.silu(self.conv(x)))
            return self.out(h.flatten(2).transpose(1, 2))

    torch.manual_seed(0)
    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(2, 4, 6, 6),), str(path), input_names=["x"], dynamo=False)
    rng = np.random.default_rng(0)
    calls = [{"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32) * (i + 1)} for i in range(3)]
    activation_ranges(path, calls, False, tmp_path / "ranges.json")
    ours = load_tensors_data(tmp_path / "ranges.json").data
    reference = create_calibrator(path, list(WEIGHT_OPS), augmented_model_path=str(tmp_path / "augmented.onnx"))
    reference.collect_data(CalibrationFeed(calls))
    expected = reference.compute_data().data
    assert set(ours) == set(expected) and len(ours) >= 6  # three layers' inputs and outputs
    for name, data in expected.items():
        assert all(np.array_equal(a, b) for a, b in zip(ours[name].range_value, data.range_value)), name

"""int8 ONNX graphs that carry obsdiff's own integer weights, not a re-quantization of them.

A quantized folder holds dequantized float weights and their scales (``--quantize``). The exported fp32 graph is
rewritten in QDQ form: each quantized layer's initializer becomes our int8 codes, per-output-channel scales and a
``DequantizeLinear`` (weights only), or, with ``--activations int8``, ONNX Runtime's static quantization
(``quantize_static``: activation ranges from the calibration inputs, QDQ around every Conv/MatMul/Gemm) runs first
and our codes and scales then replace the weights it computed. ORT's CPU graph optimizer fuses those QDQ groups into
int8 kernels (``QLinearConv``, ``QLinearMatMul``, ``MatMulInteger``…); ``int8_kernels`` counts them in the graph a
session actually runs.

Layers obsdiff did not quantize (``conv_in``, ``conv_out``, layers an adapter leaves dense) and products of two
activations (attention's scores and weighted sum) stay float and out of the activation quantization: the exported
graph computes what the fake-quantized PyTorch model computes, up to the rounding of the quantized layers' inputs.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from obsdiff.api import IntegerWeight
from obsdiff.errors import ExportError

log = logging.getLogger(__name__)

INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QGemm")
WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
PROTOBUF_LIMIT = 2 * 1024**3 - (64 << 20)  # protobuf's 2 GB, less room for the graph itself


def needs_external_data(model) -> bool:
    """The weights do not fit one protobuf: save them beside the graph."""
    return sum(len(t.raw_data) for t in model.graph.initializer) > PROTOBUF_LIMIT


@dataclass(frozen=True)
class Placement:
    """Where one quantized PyTorch layer lives in the graph: its weight initializer, and whether the graph stores it
    transposed (a MatMul's ``[in, out]``, a Gemm without ``transB``)."""

    layer: str
    initializer: str
    transposed: bool

    def codes_and_scale(self, weight: IntegerWeight) -> tuple[np.ndarray, np.ndarray, int]:
        """int8 codes in the graph's layout, the 1-D scales, and the axis they run along."""
        if not weight.per_channel:
            raise ExportError(f"{self.layer}: ONNX int8 takes one scale per output channel; this folder was "
                              f"quantized in groups of {weight.quant.group_size} (export it to Core ML, or prune "
                              "again without --group-size)")
        codes = weight.codes.numpy()
        scale = weight.scale.reshape(-1).numpy().astype(np.float32)
        if self.transposed:
            return np.ascontiguousarray(codes.T), scale, 1
        return codes, scale, 0


def place(graph, found: dict[str, str | None]) -> dict[str, Placement]:
    """Each layer's initializer (``found``: layer → initializer, from the weight probes) and its layout, read from
    the node that consumes it. A quantized layer missing from the graph is an error: its codes would be lost."""
    missing = [layer for layer, init in found.items() if init is None]
    if missing:
        raise ExportError(f"{len(missing)} quantized layer(s) not found in the exported graph: {', '.join(missing[:3])}")
    consumers: dict[str, tuple] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, (node, i))
    placements = {}
    for layer, init in found.items():
        node, index = consumers.get(init, (None, None))
        if node is None or node.op_type not in WEIGHT_OPS or index != 1:
            raise ExportError(f"{layer}: its weight {init} does not feed a Conv/MatMul/Gemm as the weight input")
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        placements[layer] = Placement(layer, init, node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b))
    return placements


def _dq_tensors(placement: Placement, weight: IntegerWeight):
    from onnx import numpy_helper

    codes, scale, axis = placement.codes_and_scale(weight)
    name = placement.initializer
    return (numpy_helper.from_array(codes, f"{name}_quantized"), numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero_point"), axis)


def write_weight_codes(model, placements: dict[str, Placement], weights: dict[str, IntegerWeight]) -> None:
    """Weights only: every placed float initializer becomes int8 codes + scales + a ``DequantizeLinear`` whose
    output keeps the old name, so the graph's consumers are unchanged (in place on the loaded ``model``)."""
    from onnx import helper

    inits = {init.name: init for init in model.graph.initializer}
    dq_nodes = []
    for layer, placement in placements.items():
        codes, scale, zero, axis = _dq_tensors(placement, weights[layer])
        model.graph.initializer.remove(inits[placement.initializer])
        model.graph.initializer.extend([codes, scale, zero])
        dq_nodes.append(helper.make_node("DequantizeLinear", [codes.name, scale.name, zero.name],
                                         [placement.initializer], name=f"{placement.initializer}_DequantizeLinear",
                                         axis=axis))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(dq_nodes + nodes)  # initializer-only inputs: first is a valid topological order


def replace_ort_weights(model, placements: dict[str, Placement], weights: dict[str, IntegerWeight]) -> list[str]:
    """After ``quantize_static``: our codes and scales in place of the ones ORT computed for each placed weight.
    Returns the layers ORT left float (op types it skipped), which get weights-only codes instead."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    dq_axis = {n.input[0]: next((a.i for a in n.attribute if a.name == "axis"), 1)
               for n in model.graph.node if n.op_type == "DequantizeLinear"}
    left = []
    for layer, placement in placements.items():
        q_name = f"{placement.initializer}_quantized"
        if q_name not in inits:
            left.append(layer)
            continue
        codes, scale, axis = placement.codes_and_scale(weights[layer])
        if dq_axis.get(q_name) != axis or tuple(inits[q_name].dims) != codes.shape:
            raise ExportError(f"{layer}: ONNX Runtime quantized {placement.initializer} along axis "
                              f"{dq_axis.get(q_name)} {list(inits[q_name].dims)}, not axis {axis} {list(codes.shape)}")
        for name, value in ((q_name, codes), (f"{placement.initializer}_scale", scale),
                            (f"{placement.initializer}_zero_point", np.zeros_like(scale, dtype=np.int8))):
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return left


class CalibrationFeed:
    """``onnxruntime.quantization.CalibrationDataReader`` over recorded denoiser inputs (one dict per call)."""

    def __init__(self, calls: list[dict[str, np.ndarray]]) -> None:
        self._calls = calls
        self._iter: Iterator[dict[str, np.ndarray]] = iter(calls)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._calls)


def activation_ranges(source: Path, calls: list[dict[str, np.ndarray]], large: bool, out: Path) -> None:
    """ONNX Runtime's MinMax ranges of every Conv/MatMul/Gemm input and output over ``calls``, written where
    ``quantize_static`` reads a calibration cache.

    Its own calibration session runs the added ReduceMin/ReduceMax nodes in the default execution order: after the
    whole graph, so every calibrated activation is alive at once (SD 1.5 at 512 px, one call: over 20 GiB; a real
    export was killed at 23 GiB). Here they run as soon as their input exists (priority-based order), without the
    CPU arena, and the calibrator's copy of the graph goes before the session starts: 5.83 GiB
    (``benchmarks.int8_calibration_memory``)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import MinMaxCalibrater, save_tensors_data

    class Reader(CalibrationFeed, CalibrationDataReader):
        pass

    class LeanMinMax(MinMaxCalibrater):
        def create_inference_session(self) -> None:
            self.model = None  # the augmented graph is on disk; the session reads it from there
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ranges by tensor name
            opts.enable_cpu_mem_arena = False
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                      providers=self.execution_providers)

    with tempfile.TemporaryDirectory(dir=source.parent, prefix=".obsdiff-calibrate-") as tmp:
        calibrator = LeanMinMax(source, list(WEIGHT_OPS), str(Path(tmp) / "augmented.onnx"),
                                use_external_data_format=large)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        calibrator.collect_data(Reader(calls))
        save_tensors_data(calibrator.compute_data(), out)
        del calibrator


def quantize_graph(path: Path, placements: dict[str, Placement], weights: dict[str, IntegerWeight],
                   calls: list[dict[str, np.ndarray]] | None, *, float_compute: tuple[str, ...] = (),
                   symmetric_activations: bool = False):
    """The fp32 graph at ``path`` in QDQ form with our weights; ``calls``: activation calibration inputs (None:
    weights only); ``float_compute``: layer regexes whose compute stays float (their weights still int8 codes).
    Returns the model (the caller saves it) and what was done, for the report."""
    import onnx

    if calls is None:
        model = onnx.load(str(path))
        write_weight_codes(model, placements, weights)
        return model, {"activations": "float", "weights_int8": len(placements)}
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(path))
    large = needs_external_data(model)  # quantize_static's intermediate graphs need it too
    ours = {p.initializer for layer, p in placements.items()
            if not any(re.fullmatch(pattern, layer) for pattern in float_compute)}
    unnamed = [n for n in model.graph.node if not n.name]
    for i, node in enumerate(unnamed):
        node.name = f"obsdiff_node_{i}"  # nodes_to_exclude names nodes
    # Nodes whose weight obsdiff did not quantize, or whose compute stays float, keep float activations; so do
    # products of two activations (attention's scores and its weighted sum), which carry no weight of ours: in uint8
    # they cost the default model at --flops 0.6 its image gate (31.2 dB; 38.9 dB with them float).
    excluded = [n.name for n in model.graph.node
                if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] not in ours]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".obsdiff-int8-") as tmp:
        source = path
        if unnamed:
            source = Path(tmp) / "named.onnx"
            onnx.save_model(model, str(source), save_as_external_data=large, location="named.onnx.data")
        del model
        quantized = Path(tmp) / "model.onnx"
        log.info("%s: static int8 quantization (%d calibration calls, %d nodes kept in float)",
                 path.parent.name, len(calls), len(excluded))
        ranges = Path(tmp) / "ranges.json"
        activation_ranges(source, calls, large, ranges)
        quantize_static(  # reads the ranges back instead of calibrating
            str(source), str(quantized), None, calibration_cache_path=str(ranges), quant_format=QuantFormat.QDQ,
            per_channel=True,
            op_types_to_quantize=list(WEIGHT_OPS), nodes_to_exclude=excluded, use_external_data_format=large,
            activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": symmetric_activations,
                           "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "MatMulConstBOnly": True},
        )
        model = onnx.load(str(quantized))
    left = replace_ort_weights(model, placements, weights)
    if left:
        write_weight_codes(model, {k: placements[k] for k in left}, weights)
    return model, {"activations": "int8 (symmetric)" if symmetric_activations else "uint8", "weights_int8": len(placements),
            "weights_only_layers": left, "float_compute_nodes": len(excluded), "calibration_calls": len(calls)}


def minify(model, placements: dict[str, Placement]) -> None:
    """Short names for the graph's internal tensors, no node names, no stored shape annotations (in place).

    ``quantize_static`` names each QDQ tensor after its source (``/down_blocks.0/…/MatMul_output_0_QuantizeLinear_
    Output``); in a small model those names outweigh the int8 weights. Graph inputs and outputs and our weights'
    ``_quantized``/``_scale``/``_zero_point`` initializers keep their names (``check_codes`` reads them).
    """
    graph = model.graph
    keep = {t.name for t in (*graph.input, *graph.output)}
    keep |= {f"{p.initializer}{suffix}" for p in placements.values() for suffix in ("_quantized", "_scale", "_zero_point")}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return short.setdefault(name, f"t{len(short):x}")

    del graph.value_info[:]
    for init in graph.initializer:
        init.name = rename(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]


def check_codes(graph: Mapping[str, np.ndarray], placements: dict[str, Placement],
                weights: dict[str, IntegerWeight]) -> dict:
    """Every placed layer's initializer in the written graph (its initializers by name) is int8 and equal to our
    codes, with our scales."""
    equal, wrong = 0, []
    for layer, placement in placements.items():
        codes, scale, _ = placement.codes_and_scale(weights[layer])
        name = f"{placement.initializer}_quantized"
        got = graph[name] if name in graph else None
        got_scale = graph.get(f"{placement.initializer}_scale")
        if (got is not None and got.dtype == np.int8 and np.array_equal(got, codes) and got_scale is not None
                and np.array_equal(got_scale.astype(np.float32), scale)):
            equal += 1
        else:
            wrong.append(layer)
    return {"layers": len(placements), "equal": equal, "different": wrong[:10]}


def int8_kernels(path: Path, providers: tuple[str, ...]) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime runs after its optimizations (QDQ groups fused into int8 kernels)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="obsdiff-optimized-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # a graph over protobuf's 2 GB (SD 1.5's UNet with some layers left float) cannot be saved in one file
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), opts, providers=list(providers))
        ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node)
    return {"int8": sum(ops[k] for k in INT8_KERNELS), **{k: ops[k] for k in INT8_KERNELS if ops[k]},
            "DequantizeLinear": ops["DequantizeLinear"], "Conv": ops["Conv"], "MatMul": ops["MatMul"]}

"""W8A8 on a realistic-width UNet: ONNX Runtime CPU latency of the int8 graph obsdiff writes vs fp32.

SD 1.5's channel widths (the UNet of ``structured_latency``: random weights, one resnet + transformer per level, a
16×16 latent, batch 2 as with classifier-free guidance). Every layer the UNet adapter targets gets int8 codes
(round-to-nearest here: latency depends on the int8 graph, not on which codes GPTQ picks; the default-model
benchmark ``benchmarks.quantization`` measures quality); the timestep embedding and the FFN down projections compute
in float as the exporter leaves them (``UNET_FLOAT_COMPUTE``). The export path is the one ``obsdiff export --target
cpu-int8`` runs: our codes placed in the fp32 graph, ``quantize_static`` for the activations (ranges from
``--calls`` random denoiser inputs at spread timesteps), ORT's graph optimizer fusing QDQ into int8 kernels.
fp32 and int8 sessions are timed interleaved.

    python -m benchmarks.int8_latency [--runs 20] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.publish import publish
from benchmarks.structured_latency import build_unet, export
from obsdiff.adapters import UNET, find_targets
from obsdiff.exporters.artifacts import WeightProbe
from obsdiff.exporters.compare import interleaved_ms
from obsdiff.exporters.components import UNET_FLOAT_COMPUTE
from obsdiff.exporters.onnx import OnnxWeights, match_weights, save_onnx
from obsdiff.exporters.onnx_int8 import int8_kernels, minify, place, quantize_graph
from obsdiff.layers import set_weight_matrix, weight_matrix
from obsdiff.quantize import Quantization, integer_weight, rtn


def quantize_unet(unet) -> dict[str, torch.Tensor]:
    """Round every targeted layer to int8 per output channel in place; returns layer → scales."""
    targets, _ = find_targets(unet, UNET)
    quant = Quantization(8)
    scales = {}
    for layer in targets:
        rounded, scale = rtn(weight_matrix(layer.module), quant)
        set_weight_matrix(layer.module, rounded)
        scales[layer.name] = scale
    return scales


def write_int8_graph(fp32: Path, int8: Path, probes: dict, weights: dict, calls: list[dict]) -> dict:
    """The int8 graph ``obsdiff export --target cpu-int8`` writes from an fp32 one: our codes placed by their weight
    probes, activations from ``calls``, ``UNET_FLOAT_COMPUTE`` left in float; returns quantize_graph's info."""
    initializers = OnnxWeights(fp32)
    placements = place(initializers.graph, match_weights(initializers, probes))
    del initializers
    model, info = quantize_graph(fp32, placements, weights, calls, float_compute=UNET_FLOAT_COMPUTE)
    minify(model, placements)
    save_onnx(model, int8)
    return info


def main(argv=None) -> dict:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--calls", type=int, default=8, help="calibration calls for the activation ranges")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4, args.latent, args.latent), torch.tensor(500.0), torch.randn(2, 77, 768))
    unet = build_unet(args.layers_per_block, args.latent)
    quant = Quantization(8)
    with torch.no_grad():
        scales = quantize_unet(unet)
    modules = dict(unet.named_modules())
    weights = {name: integer_weight(modules[name].weight, s, quant) for name, s in scales.items()}
    probes = {name: WeightProbe.of(modules[name].weight) for name in scales}
    g = torch.Generator().manual_seed(1)
    calls = [{"sample": torch.randn(inputs[0].shape, generator=g).numpy(),
              "timestep": np.array(float(t), dtype=np.float32),
              "encoder_hidden_states": torch.randn(inputs[2].shape, generator=g).numpy()}
             for t in np.linspace(999, 1, args.calls)]
    result: dict = {"config": {**vars(args), "out": str(args.out)}, "layers_int8": len(weights),
                    "params": sum(p.numel() for p in unet.parameters())}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        fp32, int8 = Path(tmp) / "fp32" / "model.onnx", Path(tmp) / "int8" / "model.onnx"
        fp32.parent.mkdir()
        int8.parent.mkdir()
        export(unet, inputs, fp32)
        del unet, modules
        result["int8_graph"] = write_int8_graph(fp32, int8, probes, weights, calls)
        result["kernels"] = int8_kernels(int8, ("CPUExecutionProvider",))
        result["bytes"] = {"fp32": sum(f.stat().st_size for f in fp32.parent.iterdir()),
                           "int8": sum(f.stat().st_size for f in int8.parent.iterdir())}
        sessions = {}
        for name, path in (("fp32", fp32), ("int8", int8)):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {"sample": inputs[0].numpy(), "timestep": inputs[1].numpy(), "encoder_hidden_states": inputs[2].numpy()}
        outs = {n: s.run(None, feeds)[0].ravel().astype(np.float64) for n, s in sessions.items()}
        result["cosine_int8_vs_fp32"] = float(outs["fp32"] @ outs["int8"] /
                                              (np.linalg.norm(outs["fp32"]) * np.linalg.norm(outs["int8"])))
        timed = interleaved_ms({n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()}, args.runs)
    result["median_ms"] = timed["median_ms"]
    result["speedup"] = timed["median_ms"]["fp32"] / timed["median_ms"]["int8"]
    result["size_ratio"] = result["bytes"]["int8"] / result["bytes"]["fp32"]
    return publish(result, args.out, "int8_latency", markdown, hidden=("config",))


def markdown(result: dict) -> list[str]:
    c, ms, k = result["config"], result["median_ms"], result["kernels"]
    lines = ["# W8A8 on an SD 1.5-width UNet (ONNX Runtime CPU)", "",
             f"Command: `python -m benchmarks.int8_latency --runs {c['runs']} --threads {c['threads']}`. Random weights, "
             f"{result['params'] / 1e6:.0f}M parameters ({c['layers_per_block']} resnet + transformer per level), "
             f"{c['latent']}×{c['latent']} latent, batch 2; {result['layers_int8']} layers with int8 codes, activations "
             f"{result['int8_graph']['activations']} from {c['calls']} calibration calls; fp32 and int8 timed interleaved.", "",
             "| | fp32 | int8 | ratio |", "|---|---|---|---|",
             f"| median ms | {ms['fp32']:.1f} | {ms['int8']:.1f} | **{result['speedup']:.2f}× faster** |",
             f"| model bytes | {result['bytes']['fp32']:,} | {result['bytes']['int8']:,} | {result['size_ratio']:.3f} |", "",
             f"int8 kernels in ONNX Runtime's optimized graph: {k.get('QLinearConv', 0)} QLinearConv, "
             f"{k.get('QLinearMatMul', 0)} QLinearMatMul; cosine int8 vs fp32 output {result['cosine_int8_vs_fp32']:.4f}."]
    return lines


if __name__ == "__main__":
    main()

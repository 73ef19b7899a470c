"""Structured pruning on a realistic-width UNet: ONNX Runtime CPU latency vs FLOP reduction.

SD 1.5's channel widths (320, 640, 1280, 1280), cross-attention width 768 and 8 heads, random weights,
built from config, one resnet + transformer per level to fit 2 cores, at a small latent (16×16, batch 2 as
with classifier-free guidance). Heads, FFN neurons and resnet channel groups are removed with the L1 rule at one
uniform fraction that meets the FLOP budget (``--flops``, counted by the same counter ``prune`` uses): latency depends
only on the shapes that remain, not on which groups were chosen. ``--sparsity`` instead removes that fraction of
heads and FFN neurons only (what structured pruning could do before it reached the convolutions). Dense and pruned
are timed interleaved.

    python -m benchmarks.structured_latency [--flops 0.6 | --sparsity 0.3] [--runs 10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from obsdiff.adapters import UNET
from obsdiff.budget import allocate, unit_costs
from obsdiff.exporters.compare import interleaved_ms
from obsdiff.exporters.components import UNetWrapper
from obsdiff.prune import Method, PruneConfig
from obsdiff.sparsity import Allocation, Budget, Measure, Structured
from obsdiff.structured import count_params, find_units, flops_by_module, prune_unit

SD15_WIDTHS = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def build_unet(layers_per_block: int, latent: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
                                **SD15_WIDTHS).eval()


def shrink(unet, inputs: tuple, flops: float | None, sparsity: float | None) -> None:
    """L1 removal: at one fraction of heads and FFN neurons, or at the uniform fraction of every unit kind that keeps
    ``flops`` of the UNet's FLOPs."""
    units = find_units(unet, UNET).units
    if flops is None:
        spec = Structured(sparsity, sparsity, 0.0)
        counts = None
    else:
        spec = Structured(budget=Budget(Measure.FLOPS, flops, Allocation.UNIFORM))
        total, by_module = flops_by_module(lambda: unet(*inputs))
        counts = allocate(unit_costs(units, Measure.FLOPS, by_module), (1 - flops) * total, spec.budget, total=total)
    config = PruneConfig(sparsity=spec, method=Method.L1)
    config.validate()
    for unit in units:
        prune_unit(unit, {n: None for n in unit.down_layers()}, config, unet, counts[unit.key] if counts else None)


def export(unet, inputs, path: Path) -> None:
    torch.onnx.export(UNetWrapper(unet), inputs, str(path), input_names=["sample", "timestep", "encoder_hidden_states"],
                      output_names=["out_sample"], opset_version=17, dynamo=False)


def main(argv=None) -> dict:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flops", type=float, default=0.6, help="fraction of FLOPs kept (heads, FFN and channels)")
    parser.add_argument("--sparsity", type=float, help="instead: this fraction of heads and FFN neurons only")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    inputs = (torch.randn(2, 4, args.latent, args.latent), torch.tensor(500.0), torch.randn(2, 77, 768))
    models = {"dense": build_unet(args.layers_per_block, args.latent)}
    models["pruned"] = build_unet(args.layers_per_block, args.latent)
    with torch.no_grad():
        shrink(models["pruned"], inputs, None if args.sparsity is not None else args.flops, args.sparsity)
    result = {"config": {**vars(args), "out": str(args.out)}, "models": {}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, unet in models.items():
            path = Path(tmp) / f"{name}.onnx"
            export(unet, inputs, path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            result["models"][name] = {"params": count_params(unet), "flops": flops_by_module(lambda u=unet: u(*inputs))[0]}
        feeds = {"sample": inputs[0].numpy(), "timestep": inputs[1].numpy(), "encoder_hidden_states": inputs[2].numpy()}
        timed = interleaved_ms({n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()}, args.runs)
    for name in sessions:
        result["models"][name]["median_ms"] = timed["median_ms"][name]
    dense, pruned = result["models"]["dense"], result["models"]["pruned"]
    result["flop_reduction"] = dense["flops"] / pruned["flops"]
    result["speedup"] = dense["median_ms"] / pruned["median_ms"]
    result["speedup_over_flop_reduction"] = result["speedup"] / result["flop_reduction"]
    result["flops_kept"] = pruned["flops"] / dense["flops"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured_latency.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    return result


if __name__ == "__main__":
    main()

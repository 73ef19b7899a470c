"""ONNX exporter: optimum-onnx where it works, ``torch.onnx.export`` from the component description
otherwise; both write optimum's diffusers layout (``unet/model.onnx``, ``model_index.json``, …).

fp16 converts the fp32 graphs' float tensors to float16 with ONNX Runtime's own converter and keeps
fp32 inputs and outputs, so callers feed the same arrays. Pruned zeros are kept exactly: an fp32
export copies weights bit for bit, and fp16 rounds only non-zero values.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from exporters.components import ComponentSpec
from exporters.profiles import Precision
from obsdiff.errors import ExportError

log = logging.getLogger(__name__)

OPSET = 17
TWO_GB = 2 * 1024**3


def _write_pipeline_files(pipe, out_dir: Path, specs: tuple[ComponentSpec, ...]) -> None:
    """model_index.json, tokenizer, scheduler and each component's config, as optimum lays them out."""
    pipe.save_config(out_dir)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        comp = getattr(pipe, name, None)
        if comp is not None:
            comp.save_pretrained(out_dir / name)
    for spec in specs:
        module = getattr(pipe, spec.source)
        folder = out_dir / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        if hasattr(module, "save_config"):
            module.save_config(folder)
        else:
            module.config.save_pretrained(folder)


@contextlib.contextmanager
def _decomposed_rms_norm() -> Iterator[None]:
    """torch.onnx's TorchScript exporter has no ``aten::rms_norm`` at opset 17 (Flux's q/k norms use it), so
    while tracing, RMSNorm runs as its own arithmetic — the same thing optimum's exporter does."""
    import torch.nn.functional as F

    def rms_norm(input, normalized_shape, weight=None, eps=None):
        eps = torch.finfo(input.dtype).eps if eps is None else eps
        dims = tuple(range(-len(normalized_shape), 0))
        out = input * torch.rsqrt(input.pow(2).mean(dim=dims, keepdim=True) + eps)
        return out * weight if weight is not None else out

    saved = F.rms_norm
    F.rms_norm = rms_norm
    try:
        yield
    finally:
        F.rms_norm = saved


def _export_with_torch(pipe, out_dir: Path, specs: tuple[ComponentSpec, ...], dims: dict[str, int]) -> None:
    _write_pipeline_files(pipe, out_dir, specs)
    for spec in specs:
        wrapper = spec.wrapper(getattr(pipe, spec.source)).eval()
        sample = spec.sample_inputs(dims)
        path = out_dir / spec.name / "model.onnx"
        log.info("torch.onnx.export %s", spec.name)
        with torch.no_grad(), _decomposed_rms_norm():
            torch.onnx.export(
                wrapper, tuple(sample.values()), str(path), input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                opset_version=OPSET, dynamo=False, do_constant_folding=True,
            )


def _export_with_optimum(pipe, out_dir: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        onnx_export_from_model(pipe, tmp, do_validation=False)
        for item in Path(tmp).iterdir():
            shutil.move(str(item), out_dir / item.name)


def check_io(path: Path, spec: ComponentSpec) -> None:
    """The exported graph's inputs and outputs are exactly the description's names and ranks."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got_in = [(i.name, len(i.type.tensor_type.shape.dim)) for i in model.graph.input]
    got_out = [(o.name, len(o.type.tensor_type.shape.dim)) for o in model.graph.output]
    want_in = [(t.name, len(t.dims)) for t in spec.inputs]
    want_out = [(t.name, len(t.dims)) for t in spec.outputs]
    if got_in != want_in or got_out != want_out:
        raise ExportError(f"{spec.name}: exported IO {got_in}→{got_out} differs from the description {want_in}→{want_out}")


def to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    save_onnx(converted, path)


def save_onnx(model, path: Path) -> None:
    """Single file below 2 GB; external data beside it above."""
    import onnx

    large = model.ByteSize() > TWO_GB
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)


def export_onnx(pipe, out_dir: Path, specs: tuple[ComponentSpec, ...], dims: dict[str, int], *,
                exporter: str, precision: Precision) -> dict[str, Path]:
    """Write every component to ``out_dir/<name>/model.onnx``; returns name → path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if exporter == "optimum":
        try:
            _export_with_optimum(pipe, out_dir)
        except Exception as exc:  # report, then use the path that always works for our specs
            log.warning("optimum export failed (%s); falling back to torch.onnx.export", str(exc).splitlines()[0])
            for item in out_dir.iterdir():
                shutil.rmtree(item) if item.is_dir() else item.unlink()
            exporter = "torch"
    if exporter == "torch":
        _export_with_torch(pipe, out_dir, specs, dims)
    paths = {}
    for spec in specs:
        path = out_dir / spec.name / "model.onnx"
        if not path.is_file():
            raise ExportError(f"{spec.name}: exporter wrote no {path.name}")
        check_io(path, spec)
        if precision is Precision.FP16:
            to_fp16(path)
        paths[spec.name] = path
    return paths


def onnx_initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def match_weights(initializers: dict[str, np.ndarray], weights: dict[str, torch.Tensor]) -> dict[str, str | None]:
    """Find each PyTorch weight among the ONNX initializers (as is, or transposed for MatMul)."""
    by_size: dict[int, list[str]] = {}
    for name, arr in initializers.items():
        by_size.setdefault(arr.size, []).append(name)
    found: dict[str, str | None] = {}
    for wname, w in weights.items():
        ref = w.detach().float().numpy()
        layouts = [ref, ref.T] if ref.ndim == 2 else [ref]
        found[wname] = next((cand for cand in by_size.get(ref.size, []) for layout in layouts
                             if _same_weight(initializers[cand].astype(np.float32), layout)), None)
    return found


def _same_weight(arr: np.ndarray, ref: np.ndarray) -> bool:
    """Equal (fp32 export), or the same zeros and values within fp16 rounding (fp16 export)."""
    return arr.shape == ref.shape and (np.array_equal(arr, ref) or _same_zeros(arr, ref))


def _same_zeros(arr: np.ndarray, ref: np.ndarray) -> bool:
    """fp16 graphs: same zero positions and values within fp16 rounding."""
    return bool(np.array_equal(arr == 0, ref == 0) and np.allclose(arr, ref, rtol=1e-3, atol=1e-4))

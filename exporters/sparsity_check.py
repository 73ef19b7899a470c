"""2:4 checks over an ONNX graph, on the axis TensorRT's sparse kernels read.

- Conv: weight (K, C, R, S): groups of 4 along C at every (k, r, s).
- MatMul: B's K axis (axis 0 of a 2-D initializer B).
- Gemm: K, which is axis 1 of B when transB = 1, else axis 0.

In an int8 QDQ graph the weight is the int8 initializer behind its ``DequantizeLinear`` (a zero weight is code 0).

``polygraphy_sparsity`` runs ``polygraphy inspect sparsity`` (no TensorRT needed) on the same file,
so two independent readers must agree before a layer is called 2:4.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from obsdiff.api import NM
from obsdiff.exporters.onnx import OnnxWeights, save_onnx

TWO_OF_FOUR = NM(2, 4)  # the one pattern TensorRT's sparse tensor cores run


@dataclass
class WeightCheck:
    initializer: str
    op: str
    node: str
    shape: tuple[int, ...]
    reduction: int  # length of the axis groups run along
    eligible: bool  # reduction is a multiple of 4
    is_2of4: bool


def check_2of4(path: Path) -> list[WeightCheck]:
    inits = OnnxWeights(path)  # one weight in memory at a time: SD-size graphs hold gigabytes
    graph = inits.graph
    # fp16 graphs may feed weights through a Cast, int8 graphs through a DequantizeLinear (their codes: 0 is 0);
    # follow one back to the initializer.
    cast_src = {n.output[0]: n.input[0] for n in graph.node
                if n.op_type in ("Cast", "DequantizeLinear") and n.input[0] in inits}
    checks = []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = cast_src.get(node.input[1], node.input[1])
        if name not in inits:
            continue
        w = inits[name]
        if node.op_type == "Conv":
            axis = 1
        elif node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            axis = 0
        else:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 1 if trans_b else 0
        k = w.shape[axis]
        eligible = k % 4 == 0
        ok = TWO_OF_FOUR.holds(w, axis)
        checks.append(WeightCheck(name, node.op_type, node.name, tuple(w.shape), k, eligible, ok))
    return checks


@contextlib.contextmanager
def _polygraphy_readable(path: Path) -> Iterator[Path]:
    """The graph itself, or for an int8 graph a copy whose int8 initializers are float32 holding the same codes:
    polygraphy 0.53 follows a weight's DequantizeLinear to its initializer but skips it ("unsupported type: int8")."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    int8 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) >= 2]
    if not int8:
        del model
        yield path
        return
    for init in int8:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    with tempfile.TemporaryDirectory(prefix="obsdiff-polygraphy-") as tmp:
        copy = Path(tmp) / "model.onnx"
        save_onnx(model, copy)
        del model
        yield copy


def polygraphy_sparsity(path: Path) -> dict:
    """Run ``polygraphy inspect sparsity``; returns the tensors it finds 2:4 sparse and those it does not.

    It runs in this interpreter (``polygraphy.tools.main``), so it works wherever polygraphy is importable, whether or
    not its console script is on PATH (a ``pip install --target`` puts none there)."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return {"ok": False, "error": "polygraphy is not installed (pip install polygraphy)", "sparse": [], "dense": []}
    with _polygraphy_readable(path) as readable:
        cmd = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
               "inspect", "sparsity", str(readable)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"ok": False, "error": " ".join(text.strip().splitlines()[-1:]), "sparse": [], "dense": []}
    sparse, dense = parse_polygraphy_sparsity(text)
    return {"ok": True, "sparse": sparse, "dense": dense}


def parse_polygraphy_sparsity(text: str) -> tuple[list[str], list[str]]:
    """Polygraphy logs 'Found sparse tensor: NAME' and 'Found non-sparse tensor: NAME' per weight."""
    sparse = re.findall(r"Found sparse tensor: (\S+)", text)
    dense = re.findall(r"Found non-sparse tensor: (\S+)", text)
    return sparse, dense

"""Format-neutral pieces of a bundle: file hashes, reference inputs/outputs, and probes of the pruned weights.

Reference files (``reference/<component>.safetensors``) hold the description's sample inputs, the PyTorch
outputs (``output.*``) and, for ONNX formats, the ONNX Runtime outputs (``ort.*``, what devices compare to).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from obsdiff.api import PrunedFolder

REFERENCE_DIR = "reference"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_reference(folder: Path, name: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                   ort_outputs: dict[str, np.ndarray]) -> None:
    """Sample inputs, PyTorch outputs (``output.*``) and ONNX Runtime outputs (``ort.*``, what devices compare to)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"input.{k}": np.array(v, order="C") for k, v in inputs.items()}  # (ascontiguousarray makes 0-d 1-d)
    tensors.update({f"output.{k}": np.array(v, order="C") for k, v in outputs.items()})
    tensors.update({f"ort.{k}": np.array(v, order="C") for k, v in ort_outputs.items()})
    # safetensors stores a 0-d array as shape (1,): keep the true shapes in the metadata.
    shapes = {k: list(np.shape(v)) for k, v in tensors.items()}
    save_file(tensors, folder / f"{name}.safetensors", metadata={"shapes": json.dumps(shapes)})


def save_pipeline_reference(folder: Path, prompt: str, input_ids: np.ndarray | None, latents: np.ndarray,
                            image: np.ndarray, settings: dict) -> None:
    """``reference/pipeline.safetensors``: one prompt's token ids, starting noise and the exported pipeline's image,
    so that ``benchmark.py`` can run the whole pipeline without torch and check that it computed the real thing."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"latents": np.array(latents, dtype=np.float32, order="C"),
               "image": np.array(image, dtype=np.float32, order="C")}
    if input_ids is not None:
        tensors["input_ids"] = np.array(input_ids, dtype=np.int64, order="C")
    metadata = {"prompt": prompt, "negative_prompt": "", **{k: str(v) for k, v in settings.items()}}
    save_file(tensors, folder / "pipeline.safetensors", metadata=metadata)


def load_reference(folder: Path, name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = folder / f"{name}.safetensors"
    with safe_open(str(path), framework="np") as fh:
        shapes = json.loads((fh.metadata() or {}).get("shapes", "{}"))
    data = {k: v.reshape(shapes[k]) if k in shapes else v for k, v in load_file(path).items()}
    return ({k[6:]: v for k, v in data.items() if k.startswith("input.")},
            {k[7:]: v for k, v in data.items() if k.startswith("output.")})


def pruned_weights(pipe, folder: PrunedFolder, source: str) -> dict[str, torch.Tensor]:
    """The weights the prune solved in component ``source`` (structured units change shapes, not zeros: none)."""
    modules = dict(getattr(pipe, source).named_modules())
    return {r.layer: modules[r.layer].weight for r in folder.layers(source) if r.layer in modules}


@dataclass(frozen=True)
class WeightProbe:
    """What the export checks need of one pruned PyTorch weight, kept after the pipeline itself is let go.

    Its zero pattern, packed to one bit per weight, in each layout an exporter may store it (as is, and transposed for
    a MatMul), and float64 sums of w and w². fp16 rounding moves each weight by at most 2⁻¹¹ of itself, so the sums
    by at most ``FP16_RTOL`` × Σ|w| and × Σw². At SD size the full weights cannot stay beside an ONNX Runtime session
    of the same UNet; a probe costs 1/32 of its weight per layout.
    """

    shape: tuple[int, ...]
    zeros: int
    masks: tuple[tuple[tuple[int, ...], np.ndarray], ...]  # (layout shape, packbits of w == 0 in that layout)
    total: float
    magnitude: float  # Σ|w|: the scale of the error in ``total``
    squares: float

    FP16_RTOL: ClassVar[float] = 1e-3

    @classmethod
    def of(cls, weight: torch.Tensor) -> WeightProbe:
        w = weight.detach().float()
        layouts = [w, w.T] if w.ndim == 2 else [w]
        masks = tuple((tuple(x.shape), np.packbits((x == 0).numpy().reshape(-1))) for x in layouts)
        w64 = w.double()
        return cls(tuple(w.shape), int((w == 0).sum()), masks, float(w64.sum()), float(w64.abs().sum()),
                   float((w64 * w64).sum()))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def matches(self, arr: np.ndarray) -> bool:
        """``arr`` is this weight: same zeros in one layout; same values (exactly in fp32, within fp16 rounding)."""
        if arr.size != self.numel or not any(arr.shape == shape for shape, _ in self.masks):
            return False
        rtol = self.FP16_RTOL if arr.dtype == np.float16 else 1e-9  # fp32: the same values, summed in another order
        arr64 = arr.astype(np.float64)
        if (abs(arr64.sum() - self.total) > rtol * self.magnitude + 1e-12
                or abs((arr64 * arr64).sum() - self.squares) > rtol * self.squares + 1e-12):
            return False
        bits = np.packbits((arr == 0).reshape(-1))
        return any(arr.shape == shape and np.array_equal(bits, mask) for shape, mask in self.masks)

    def zeros_kept(self, arr: np.ndarray, exact: bool, transposed: bool = False) -> bool:
        """Every zero of the weight is zero in ``arr`` (the weight as stored, transposed or not); ``exact``: and no
        other (fp32)."""
        shape, mask = self.masks[1 if transposed and len(self.masks) > 1 else 0]
        if arr.shape != shape:
            return False
        ours = np.unpackbits(mask, count=self.numel).astype(bool)
        theirs = (arr == 0).reshape(-1)
        return bool(np.array_equal(ours, theirs) if exact else (theirs | ~ours).all())


def weight_probes(pipe, folder: PrunedFolder, source: str) -> dict[str, WeightProbe]:
    """A probe for every weight the prune record lists in component ``source``."""
    return {name: WeightProbe.of(w) for name, w in pruned_weights(pipe, folder, source).items()}

"""Reading and writing diffusers model folders, with one-line errors for bad input.

Pruned folders are ordinary diffusers folders (safetensors) plus ``pruning.json``. When structured
pruning changed shapes, ``pruning.json`` lists them; ``load_pipeline`` rebuilds each component from
its config, resizes those layers, then loads the safetensors — never a pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from obsdiff.errors import ModelFolderError

log = logging.getLogger(__name__)

PRUNING_JSON = "pruning.json"


def check_model_folder(path: Path) -> dict:
    """Fail early, in one line, on a folder that cannot be a diffusers pipeline."""
    if not path.exists():
        raise ModelFolderError(f"{path}: no such folder")
    if not path.is_dir():
        raise ModelFolderError(f"{path}: not a folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"{path}: no model_index.json (not a diffusers pipeline folder)")
    try:
        model_index = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{index}: invalid JSON ({exc.msg})") from None
    for weights in sorted(path.glob("*/*.safetensors")):
        check_safetensors(weights)
    return model_index


def check_safetensors(path: Path) -> None:
    """Header and size consistency of a safetensors file (a truncated or garbled file fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])
    except Exception as exc:  # safetensors raises several types for a corrupted file
        raise ModelFolderError(f"{path}: corrupted safetensors file ({str(exc).splitlines()[0]})") from None
    # The header says where the data ends; a shorter file is truncated.
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if os.path.getsize(path) < 8 + header_len + end:
        raise ModelFolderError(f"{path}: truncated safetensors file")


def read_pruning_record(path: Path) -> dict | None:
    record = path / PRUNING_JSON
    return json.loads(record.read_text()) if record.is_file() else None


def load_pipeline(path: Path | str):
    """Load a local diffusers pipeline folder (dense, pruned, or structurally shrunk)."""
    path = Path(path)
    model_index = check_model_folder(path)
    # Components saved as [null, null] (SD3 without T5, no safety checker) must be passed as None.
    absent = {k: None for k, v in model_index.items() if isinstance(v, list) and v == [None, None]}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()

    record = read_pruning_record(path)
    shapes = (record or {}).get("structured", {}).get("components", {})
    try:
        if shapes:
            from obsdiff.structured import load_shrunk_components

            components = load_shrunk_components(path, shapes)
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **absent, **components)
        else:
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **absent)
    except ModelFolderError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFolderError(f"{path}: could not load the pipeline ({msg})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_components(pipe) -> dict:
    """Name → torch module for every nn.Module component of a pipeline."""
    from torch import nn

    return {name: comp for name, comp in pipe.components.items() if isinstance(comp, nn.Module)}


def copy_tree_linked(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    """Copy a model folder, hard-linking files where possible (big weights are not duplicated)."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy, ignore=lambda d, names: [n for n in names if n in skip])

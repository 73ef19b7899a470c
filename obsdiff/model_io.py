"""Diffusers model folders on disk, with one-line errors for bad input: checks, loading, copying.

What obsdiff itself records in a folder (``pruning.json``, quantization scales) is read and written by
``obsdiff.pruned_folder`` only; it hands the shrunk components it rebuilt to ``load_diffusers``. Weights are
safetensors, never a pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from obsdiff.errors import ModelFolderError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


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
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and p.name in model_index):
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles and not any(folder.glob("*.safetensors")):
            raise ModelFolderError(
                f"{folder / pickles[0]}: pickled weights are not loaded (safetensors only); convert them once where you "
                f"trust the file, e.g. diffusers' from_pretrained(...).save_pretrained(DIR, safe_serialization=True)")
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


def load_diffusers(path: Path, model_index: dict, replaced: dict, dtypes: dict | None = None):
    """``DiffusionPipeline.from_pretrained`` on a checked local folder, safetensors only, with ``replaced`` components
    (already built: structurally shrunk ones, or None for one left out) passed in, and ``dtypes`` (component →
    torch dtype; the rest fp32); any failure is one ``ModelFolderError`` line."""
    # Components saved as [null, null] (SD3 without T5, no safety checker) must be passed as None.
    absent = {k: None for k, v in model_index.items() if isinstance(v, list) and v == [None, None]}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        extra = {"torch_dtype": {"default": torch.float32, **dtypes}} if dtypes else {}
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                 **{**absent, **replaced}, **extra)
    except ModelFolderError:
        raise
    except Exception as exc:
        raise ModelFolderError(f"{path}: could not load the pipeline ({_one_line(exc)})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _one_line(exc: BaseException) -> str:
    """The informative part of a loader's message on one line (torch's size-mismatch lines come after a header)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    detail = [ln for ln in lines[1:] if "size mismatch" in ln or "Missing key" in ln or "Unexpected key" in ln]
    return " ".join([lines[0], *detail[:3]])[:600]


def load_state_strict(model, state: dict, where: Path) -> None:
    """``load_state_dict(strict=True)`` whose error names every mismatched tensor with both shapes, on one line."""
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if wrong or missing or extra:
        parts = ([f"wrong shape {'; '.join(wrong[:3])}"] if wrong else []) + \
            ([f"missing {', '.join(missing[:3])}"] if missing else []) + ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
        raise ModelFolderError(f"{where}: weights do not fit the config ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


def load_shrunk_component(folder: Path, resize, skip: tuple[str, ...] = ()):
    """Rebuild a structurally shrunk component from its config, ``resize`` it, then load its safetensors (files named
    in ``skip``, such as quantization scales, are not module state)."""
    import diffusers
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    try:
        model = getattr(diffusers, config["_class_name"]).from_config(config)
        resize(model)
    except Exception as exc:
        raise ModelFolderError(f"{folder}: could not rebuild the shrunk component ({_one_line(exc)})") from None
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name not in skip:
            state.update(load_file(f))
    load_state_strict(model, state, folder)
    return model.eval()


def module_bytes(module, buffers: bool = True) -> int:
    """Bytes of a module's parameters (and buffers) as held now."""
    tensors = [*module.parameters(), *(module.buffers() if buffers else ())]
    return sum(t.numel() * t.element_size() for t in tensors)


def pipeline_components(pipe) -> dict:
    """Name → torch module for every nn.Module component of a pipeline."""
    from torch import nn

    return {name: comp for name, comp in pipe.components.items() if isinstance(comp, nn.Module)}


def copy_model_files(src: Path, dst: Path, skip: set[str] = frozenset()) -> list[str]:
    """Copy a model folder's regular files (hard links where possible, so big weights are not duplicated).

    Symbolic links are not followed or copied (a link could point anywhere: ``/etc/passwd``, a folder outside the
    model), nor are obsdiff's own hidden work folders; top-level names in ``skip`` are left out. Returns the
    relative paths of the links that were skipped.
    """
    src, dst = Path(src), Path(dst)
    links: list[str] = []
    for root, dirs, files in os.walk(src, followlinks=False):
        here = Path(root)
        rel = here.relative_to(src)
        for name in list(dirs):
            path = here / name
            if (rel == Path(".") and name in skip) or name.endswith((".obsdiff-partial", ".obsdiff-staging")):
                dirs.remove(name)
            elif path.is_symlink():
                links.append(str(rel / name))
                dirs.remove(name)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            path = here / name
            if rel == Path(".") and name in skip:
                continue
            if path.is_symlink() or not path.is_file():
                links.append(str(rel / name))
                continue
            try:
                os.link(path, dst / rel / name)
            except OSError:
                shutil.copy2(path, dst / rel / name)
    if links:
        log.warning("%s: skipped %d symbolic link(s), which are never copied: %s", src, len(links), ", ".join(links[:5]))
    return links

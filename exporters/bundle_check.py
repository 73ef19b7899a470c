"""``obsdiff validate``: a published bundle checked on disk, trusting neither its files nor its manifest blindly.

1. Every entry under the bundle is a folder or a regular file (links, FIFOs, sockets and devices are refused by name),
   and listed in the manifest with a matching sha256; nothing listed is missing, nothing points outside.
2. The manifest is type-checked entry by entry (components, precision, gates), and every component's file lies
   inside the bundle and is listed.
3. What must exist comes from the target's own file list (``BundleBuilder.required_files``: the format, the
   pipeline family, a shipped profile's components), not from the manifest alone, so a file removed together with
   its manifest line, or an emptied ``components`` table, is missed loudly.
4. Then every model is re-run on its reference inputs (``BundleBuilder.revalidate``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

from obsdiff.errors import BundleError
from obsdiff.exporters.artifacts import sha256
from obsdiff.exporters.profiles import Format, Precision
from obsdiff.exporters.registry import builder_class

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def inside(bundle: Path, rel) -> bool:
    """``rel`` is a relative path that stays inside ``bundle`` (no ``..`` out of it, no absolute path)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return False
    path = (bundle / rel).resolve()
    return bundle.resolve() in path.parents


def entries_on_disk(bundle: Path) -> list[str]:
    """Every file under the bundle except the manifest, as relative paths; anything that is neither a folder nor a
    regular file is refused by name (a link, a FIFO, a socket, a device)."""
    files = []
    for root, dirs, names in os.walk(bundle, followlinks=False):
        for name in [*dirs, *names]:
            path = Path(root) / name
            mode = os.lstat(path).st_mode
            rel = str(path.relative_to(bundle))
            if stat.S_ISLNK(mode):
                raise BundleError(f"{bundle}: {rel} is a symbolic link (a bundle holds only regular files)")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise BundleError(f"{bundle}: {rel} is not a regular file (a bundle holds only regular files)")
            if path != bundle / MANIFEST:
                files.append(rel)
    return sorted(files)


def read_manifest(bundle: Path) -> dict:
    """The manifest, with every field the checks read type-checked (one line naming the field otherwise)."""
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such folder")
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST} (not an obsdiff bundle)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: invalid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: no 'files' table listing the bundle's files and their sha256")
    for key in ("format", "components", "gates", "precision", "target"):
        if key not in manifest:
            raise BundleError(f"{path}: missing '{key}'")
    for rel, digest in files.items():
        if not inside(bundle, rel):
            raise BundleError(f"{path}: entry {rel!r} points outside the bundle")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleError(f"{path}: files[{rel!r}] is not a sha256 hex digest")
    _check_fields(path, manifest)
    return manifest


def _check_fields(path: Path, manifest: dict) -> None:
    for key, allowed in (("format", Format), ("precision", Precision)):
        if manifest[key] not in {v.value for v in allowed}:
            raise BundleError(f"{path}: unknown {key} {manifest[key]!r} (one of {', '.join(v.value for v in allowed)})")
    if not isinstance(manifest["target"], str) or not manifest["target"]:
        raise BundleError(f"{path}: 'target' must be a name")
    gates = manifest["gates"]
    cosine = gates.get("min_cosine") if isinstance(gates, dict) else None
    if isinstance(cosine, bool) or not isinstance(cosine, (int, float)):
        raise BundleError(f"{path}: gates.min_cosine must be a number")
    components = manifest["components"]
    if not isinstance(components, dict) or not components:
        raise BundleError(f"{path}: 'components' must list the bundle's models; it is empty")
    for name, entry in components.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise BundleError(f"{path}: components[{name!r}] must be an object with a 'file'")
        inputs = entry.get("inputs")
        if not isinstance(inputs, list) or not all(
                isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) for d in i["shape"]) for i in inputs):
            raise BundleError(f"{path}: components[{name!r}].inputs must be a list of {{name, shape}} objects")


def validate_bundle_on_disk(bundle: Path) -> dict:
    """Every file on disk listed with a matching sha256, the target's own files present, then every model re-run."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    files = manifest["files"]
    on_disk = entries_on_disk(bundle)
    for rel in on_disk:
        if rel not in files:
            raise BundleError(f"{bundle}: {rel} is not listed in the manifest")
    listed = set(on_disk)
    for rel, digest in files.items():
        if rel not in listed:
            raise BundleError(f"{bundle}: missing file {rel}")
        if sha256(bundle / rel) != digest:
            raise BundleError(f"{bundle}: sha256 of {rel} does not match the manifest")
    builder = builder_class(manifest["format"])
    for name, entry in manifest["components"].items():
        file = entry["file"]
        if not inside(bundle, file) or not (file in files or any(f.startswith(file.rstrip("/") + "/") for f in files)):
            raise BundleError(f"{bundle}: components[{name!r}].file {file!r} is not a file of this bundle")
    missing = [rel for rel in builder.required_files(bundle, manifest) if rel not in files]
    if missing:
        raise BundleError(f"{bundle}: target {manifest['target']} needs {missing[0]}, which is missing (with its "
                          f"manifest line){f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    results = builder.revalidate(bundle, manifest)
    log.info("%s: %d files match the manifest; all components pass", bundle, len(files))
    print(json.dumps({"bundle": str(bundle), "target": manifest.get("target"), "ok": True}, indent=None))
    return results

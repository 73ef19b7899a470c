"""Refactors change no numbers: prune the shipped model in fixed configurations and hash every pruned UNet.

    python -m benchmarks.identity --out /tmp/ids-before.json       # on the old commit
    python -m benchmarks.identity --out /tmp/ids-after.json        # on the new one
    python -m benchmarks.identity --compare /tmp/ids-before.json /tmp/ids-after.json
    python -m benchmarks.identity --gates OLD_OUT NEW_OUT      # two `obsdiff ship` outputs: the same gate numbers?

Each configuration is ``obsdiff prune models/digits-sd --method M --pattern P --num-prompts 8 --steps 5
--packages 2 --batch-size 8`` (plus its own options), run in its own process with 2 threads, as the typed-pattern
refactor checked it. The sha256 of the saved UNet weights (and quantization scales, when any) is what must match:
OBS turns a 1e-7 kernel difference into another mask, so equal hashes mean equal arithmetic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits-sd"
COMMON = ["--num-prompts", "8", "--steps", "5", "--packages", "2", "--batch-size", "8", "--refine", "0"]
CONFIGS = {
    "obs-diff unstructured": ["--method", "obs-diff", "--pattern", "unstructured"],
    "obs-diff 2:4": ["--method", "obs-diff", "--pattern", "2:4"],
    "wanda unstructured": ["--method", "wanda", "--pattern", "unstructured"],
    "magnitude 2:4": ["--method", "magnitude", "--pattern", "2:4"],
    "obs-diff structured": ["--method", "obs-diff", "--pattern", "structured"],
    "l1 structured": ["--method", "l1", "--pattern", "structured"],
    "obs-diff structured --flops 0.7": ["--method", "obs-diff", "--pattern", "structured", "--flops", "0.7"],
    "obs-diff dense --quantize int8": ["--pattern", "dense", "--quantize", "int8"],
    "obs-diff 2:4 --quantize int4 g32": ["--pattern", "2:4", "--quantize", "int4", "--group-size", "32"],
}


def _digest(folder: Path) -> str:
    """Every tensor of the UNet's safetensors files (name, dtype, shape, bytes) and their metadata, in sorted order:
    the file bytes themselves are not reproducible (safetensors writes metadata in hash-map order)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted((folder / "unet").glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            h.update(f"{f.name} {json.dumps(fh.metadata() or {}, sort_keys=True)}".encode())
            for key in sorted(fh.keys()):
                t = fh.get_tensor(key)
                h.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
                h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def measure(out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    hashes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in CONFIGS.items():
            folder = Path(tmp) / name.replace(" ", "_").replace(":", "of")
            subprocess.run([sys.executable, "-m", "obsdiff", "-q", "prune", str(MODEL), "--out", str(folder), *COMMON,
                            *args], check=True, env=env)
            hashes[name] = _digest(folder)
            print(f"{name}: {hashes[name]}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=MODEL.parents[1]).stdout.strip()
    result = {"commit": commit, "configs": {k: [*COMMON, *v] for k, v in CONFIGS.items()}, "sha256": hashes}
    out.write_text(json.dumps(result, indent=2))
    return result


def compare(a: Path, b: Path) -> int:
    old, new = json.loads(a.read_text()), json.loads(b.read_text())
    differ = [k for k in old["sha256"] if old["sha256"][k] != new["sha256"].get(k)]
    for k in old["sha256"]:
        print(f"{'same' if k not in differ else 'DIFFERENT':9} {k}")
    print(f"{old['commit']} vs {new['commit']}: {len(old['sha256']) - len(differ)} of {len(old['sha256'])} bit-identical")
    return 1 if differ else 0


def compare_gates(a: Path, b: Path) -> int:
    """The gates of two bundles (``OUT/bundle`` of ``ship``, or the bundle folder itself): same names, same values.
    Latency gates are timings, not arithmetic, and are left out."""
    def gates(folder: Path) -> dict[str, float]:
        bundle = folder / "bundle" if (folder / "bundle").is_dir() else folder
        manifest = json.loads((bundle / "manifest.json").read_text())
        return {g["name"]: g["value"] for g in manifest["validation"]["gates"] if "latency" not in g["name"]}

    old, new = gates(a), gates(b)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    for k in sorted(old.keys() | new.keys()):
        print(f"{'same' if k not in differ else 'DIFFERENT':9} {k}: {old.get(k)} → {new.get(k)}")
    print(f"{len(old.keys() | new.keys()) - len(differ)} of {len(old.keys() | new.keys())} gates report the same number")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", type=Path, nargs=2)
    parser.add_argument("--gates", type=Path, nargs=2)
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.gates:
        return compare_gates(*args.gates)
    if not args.out:
        parser.error("--out or --compare")
    measure(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

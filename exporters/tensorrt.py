"""TensorRT sparse engines: ONNX (fp16) → 2:4 checks → engines on the device (or here when possible).

TensorRT accelerates only 2:4 weights whose groups run along the reduction axis; a sparse tactic is
picked only when faster. Engines are specific to the GPU and TensorRT version, so the bundle carries
``build_engines.sh`` (trtexec) and ``validate_on_device.py``; where ``import tensorrt`` and a GPU exist
and the profile says ``build_on = "host"``, engines are built here as well, through polygraphy's loaders.
Which patterns the target accepts is data (``accepts`` in its profile), checked before export.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from obsdiff.api import Dense, Structured
from obsdiff.errors import ExportError
from obsdiff.exporters.artifacts import WeightProbe
from obsdiff.exporters.builder import BuildResult, BundleBuilder, TorchPipelines
from obsdiff.exporters.components import ComponentSpec
from obsdiff.exporters.export_plan import ExportPlan, Int8Mode
from obsdiff.exporters.onnx import OnnxBundleBuilder, onnx_required_files, revalidate_onnx
from obsdiff.exporters.profiles import TargetProfile
from obsdiff.exporters.sparsity_check import check_2of4, polygraphy_sparsity

log = logging.getLogger(__name__)

DEVICE_DIR = Path(__file__).resolve().parent / "device"
DEVICE_FILES = ("build_engines.sh", "validate_on_device.py", "device.json", "README_DEVICE.md")

_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math: (.*)")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers: (.*)")


def tensorrt_available() -> tuple[bool, str]:
    """Whether engines can be built here, and why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed here (no wheel for this machine); engines are built on the device"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU here; engines are built on the device"
    except ImportError:
        pass
    return True, ""


def parse_sparsity_log(text: str) -> dict[str, list[str]]:
    """Layer names from TensorRT's verbose build log: eligible for sparse math, and picked sparse."""
    def names(pattern: re.Pattern) -> list[str]:
        out: list[str] = []
        for m in pattern.finditer(text):
            out += [n.strip() for n in m.group(1).split(",") if n.strip()]
        return out

    return {"eligible": names(_ELIGIBLE), "picked": names(_PICKED)}


def shape_args(spec: ComponentSpec, dims: dict[str, int]) -> str:
    """trtexec's ``name:AxBxC`` list for inputs with dynamic axes (static profile: min = opt = max)."""
    parts = []
    for t in spec.inputs:
        if any(isinstance(d, str) and d in spec.dynamic for d in t.dims):
            parts.append(f"{t.name}:" + "x".join(str(s) for s in spec.resolve(dims, t)))
    return ",".join(parts)


def build_script(specs: tuple[ComponentSpec, ...], dims: dict[str, int], profile: TargetProfile, int8: bool = False) -> str:
    trt_cfg = profile.tensorrt
    lines = [
        "#!/usr/bin/env bash",
        f"# Build TensorRT engines for this bundle on the device (target {profile.name}: "
        f"JetPack {trt_cfg.jetpack}, TensorRT {trt_cfg.tensorrt}).",
        "# fp16 + 2:4 sparse weights" + (" + int8 Q/DQ (explicit quantization)" if int8 else "") +
        "; static shapes from the target profile; verbose logs and layer info kept.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        '[ -x "$TRTEXEC" ] || { echo "build_engines.sh: trtexec not found (set TRTEXEC=...)" >&2; exit 2; }',
        "mkdir -p engines logs",
    ]
    for spec in specs:
        shapes = shape_args(spec, dims)
        shape_flags = f"--minShapes={shapes} --optShapes={shapes} --maxShapes={shapes} " if shapes else ""
        lines += [
            f'echo "building {spec.name}..."',
            f'"$TRTEXEC" --onnx={spec.name}/model.onnx --saveEngine=engines/{spec.name}.plan '
            f"--fp16 {'--int8 ' if int8 else ''}--sparsity=enable {shape_flags}"
            f"--memPoolSize=workspace:{trt_cfg.workspace_mb}M "
            f"--builderOptimizationLevel={trt_cfg.builder_optimization_level} "
            f"--timingCacheFile=engines/timing.cache --profilingVerbosity=detailed "
            f"--exportLayerInfo=engines/{spec.name}.layers.json --verbose > logs/{spec.name}.build.log 2>&1 "
            f'|| {{ echo "build_engines.sh: {spec.name} failed, see logs/{spec.name}.build.log" >&2; exit 1; }}',
            f'grep -h "(Sparsity)" logs/{spec.name}.build.log > logs/{spec.name}.sparsity.txt || true',
        ]
    lines += ['echo "engines in engines/; which layers ran sparse: logs/*.sparsity.txt"',
              'echo "next: python3 validate_on_device.py"']
    return "\n".join(lines) + "\n"


def build_engine(onnx_path: Path, engine_path: Path, spec: ComponentSpec, dims: dict[str, int], profile: TargetProfile,
                 timing_cache: Path, int8: bool = False) -> dict:
    """Polygraphy's loaders over TensorRT: FP16 + sparse weights, a static profile, a timing cache, layer info.

    Polygraphy forwards TensorRT's log to its own logger; at VERBOSE it carries the "(Sparsity)" lines that say
    which layers were eligible for sparse math and which ran sparse, so the log goes to a file beside the engine.
    """
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine
    from polygraphy.logger import G_LOGGER

    opt = Profile()
    for t in spec.inputs:
        shape = spec.resolve(dims, t)
        opt.add(t.name, min=shape, opt=shape, max=shape)
    config = CreateConfig(
        fp16=True, int8=int8, sparse_weights=True, profiles=[opt], profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: profile.tensorrt.workspace_mb << 20},
        builder_optimization_level=profile.tensorrt.builder_optimization_level,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None)
    log_path = engine_path.with_suffix(".build.log")
    saved_severity, saved_file = G_LOGGER.module_severity, G_LOGGER.log_file
    G_LOGGER.module_severity, G_LOGGER.log_file = G_LOGGER.VERBOSE, str(log_path)
    try:
        engine = engine_from_network(network_from_onnx_path(str(onnx_path)), config=config,
                                     save_timing_cache=str(timing_cache))()
    except Exception as exc:
        raise ExportError(f"TensorRT failed to build {spec.name}: {str(exc).splitlines()[0][:200]}") from None
    finally:
        G_LOGGER.module_severity, G_LOGGER.log_file = saved_severity, saved_file
    save_engine(engine, str(engine_path))
    layer_info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    engine_path.with_suffix(".layers.json").write_text(layer_info)
    return {"engine": engine_path.name, **parse_sparsity_log(log_path.read_text() if log_path.is_file() else "")}


class TensorRTBundleBuilder(BundleBuilder):
    """The ONNX bundle (fp16, ORT-validated; or explicit-quantization QDQ for an int8 folder) plus 2:4 checks,
    device scripts and, where possible, engines. Its ONNX part is built from the same plan."""

    def __init__(self, plan: ExportPlan, prompts: list[str]) -> None:
        super().__init__(plan, prompts)
        self.onnx = OnnxBundleBuilder(plan, prompts)

    @property
    def int8(self) -> bool:
        return self.plan.int8 is Int8Mode.SYMMETRIC

    @classmethod
    def revalidate(cls, bundle: Path, manifest: dict) -> dict:
        """The ONNX files on their references (engines are checked on the device by validate_on_device.py)."""
        return revalidate_onnx(bundle, manifest)

    @classmethod
    def required_files(cls, bundle: Path, manifest: dict) -> list[str]:
        """The ONNX bundle's files, and what the device needs to build and check its engines."""
        return [*onnx_required_files(bundle, manifest), *DEVICE_FILES]

    def build(self, models: TorchPipelines, staging: Path) -> BuildResult:
        built = self.onnx.build_onnx(models, staging)
        result, side = built.result, built.side
        result.details["sparsity_2of4"] = {}
        # The layers a prune zeroed must be 2:4; a quantize-only (dense) or structured record zeroed none.
        pattern = self.plan.pattern
        for spec in () if pattern is None or isinstance(pattern, (Dense, Structured)) else side.specs:
            placed = built.placements.get(spec.name, {})
            names = ({k: f"{p.initializer}_quantized" for k, p in placed.items()} if placed else
                     {k: p.initializer for k, p in built.names[spec.name].items()})
            report = two_of_four_report(side.probes[spec.name], models.folder.skipped(spec.source),
                                        staging / spec.name / "model.onnx", names)
            if report["targeted"]:
                result.details["sparsity_2of4"][spec.name] = report
                result.gate(f"{spec.name} targeted layers 2:4 (checker and polygraphy)", float(report["both"]), ">=",
                            float(report["targeted"]))
        self._write_device_files(staging, side.specs, side.dims)
        result.details["engines"] = self._maybe_build_engines(staging, side.specs, side.dims)
        result.notes.append(
            "TensorRT picks a sparse tactic only when it is faster; the device build log lists the layers that ran sparse "
            "(logs/*.sparsity.txt after build_engines.sh).")
        return result

    def report_sections(self, result: BuildResult) -> list[str]:
        """The ONNX sections, then which targeted layers are 2:4, then the engines' status."""
        lines = self.onnx.report_sections(result)
        results = result.details
        for comp, rep in results.get("sparsity_2of4", {}).items():
            lines += ["", f"## 2:4 sparsity of `{comp}` (TensorRT's axis: Conv input channels, MatMul/Gemm K)", "",
                      f"{rep['targeted']} layers targeted by the prune: {rep['checker']} 2:4 by our checker, "
                      f"{rep['polygraphy']} by `polygraphy inspect sparsity`, {rep['both']} by both.", "",
                      "| layer | ONNX op | initializer | checker | polygraphy |", "|---|---|---|---|---|"]
            for name, layer in rep["layers"].items():
                lines.append(f"| {name} | {layer['op']} | {layer['initializer']} | {'2:4' if layer['checker'] else 'no'} | "
                             f"{'2:4' if layer['polygraphy'] else 'no'} |")
            if rep["dense"]:
                lines += ["", "Left dense (listed by the prune): " + ", ".join(f"`{n}`" for n in rep["dense"])]
        engines = results.get("engines")
        if engines:
            lines += ["", "## TensorRT engines", "", f"Status: **{engines['status']}**" +
                      (f" — {engines['reason']}" if engines.get("reason") else "")]
            for comp, info in engines.get("components", {}).items():
                lines.append(f"- {comp}: {len(info['picked'])} layers picked sparse of {len(info['eligible'])} eligible")
        return lines

    def _write_device_files(self, staging: Path, specs: tuple[ComponentSpec, ...], dims: dict[str, int]) -> None:
        script = staging / "build_engines.sh"
        script.write_text(build_script(specs, dims, self.profile, self.int8))
        script.chmod(0o755)
        shutil.copy(DEVICE_DIR / "validate_on_device.py", staging / "validate_on_device.py")
        backend = self.profile.tensorrt
        device = {
            "target": self.profile.name,
            "gates": {"min_cosine": backend.device_min_cosine, "min_psnr_db": backend.device_min_psnr_db},
            "components": {s.name: {"onnx": f"{s.name}/model.onnx", "engine": f"engines/{s.name}.plan",
                                    "reference": f"reference/{s.name}.safetensors",
                                    "inputs": {t.name: list(s.resolve(dims, t)) for t in s.inputs}} for s in specs},
        }
        (staging / "device.json").write_text(json.dumps(device, indent=2))
        (staging / "README_DEVICE.md").write_text(DEVICE_README.format(target=self.profile.name,
                                                                      jetpack=backend.jetpack,
                                                                      trt=backend.tensorrt))

    def _maybe_build_engines(self, staging: Path, specs, dims) -> dict:
        if self.profile.tensorrt.build_on != "host":
            return {"status": "to be built on device", "reason": "engines are specific to the device GPU and TensorRT "
                    "version: run build_engines.sh on the device"}
        ok, reason = tensorrt_available()
        if not ok:
            log.warning("engines not built: %s", reason)
            return {"status": "to be built on device", "reason": reason}
        (staging / "engines").mkdir(exist_ok=True)
        cache = staging / "engines" / "timing.cache"
        built = {s.name: build_engine(staging / s.name / "model.onnx", staging / "engines" / f"{s.name}.plan", s, dims,
                                      self.profile, cache, self.int8) for s in specs}
        return {"status": "built", "components": built}


def two_of_four_report(probes: dict[str, WeightProbe], skipped: list[str], onnx_path: Path,
                       names: dict[str, str]) -> dict:
    """For each layer the prune targeted: is its ONNX initializer (from the name map; in an int8 graph, its int8 codes)
    2:4 by our checker and by polygraphy? ``skipped``: the layers the prune listed but left dense."""
    if not probes:
        return {"targeted": 0, "both": 0, "layers": {}, "dense": skipped}
    ours = {c.initializer: c for c in check_2of4(onnx_path)}
    poly = polygraphy_sparsity(onnx_path)
    if not poly["ok"]:  # a 2:4 count of 0 would read as "not sparse"; the check itself did not run
        raise ExportError(f"{onnx_path.name}: polygraphy inspect sparsity did not run: {poly['error']}")
    poly_sparse = set(poly["sparse"])
    layers = {}
    for name in probes:
        init = names.get(name)
        check = ours.get(init) if init else None
        layers[name] = {"initializer": init, "op": check.op if check else None,
                        "checker": bool(check and check.is_2of4), "polygraphy": init in poly_sparse}
    both = sum(v["checker"] and v["polygraphy"] for v in layers.values())
    return {"targeted": len(layers), "both": both, "checker": sum(v["checker"] for v in layers.values()),
            "polygraphy": sum(v["polygraphy"] for v in layers.values()), "polygraphy_ok": poly["ok"],
            "layers": layers, "dense": skipped}


DEVICE_README = """# Running this bundle on the device (target `{target}`)

Assumes JetPack {jetpack} (TensorRT {trt}, CUDA 12) on a Jetson Orin, or TensorRT {trt} on an Ampere-or-newer GPU.

1. Copy this folder to the device.
2. `bash build_engines.sh` — builds `engines/<component>.plan` with trtexec (`--fp16 --sparsity=enable`, the
   static shapes of `device.json`), keeps verbose logs in `logs/`, and the layer info (`HasSparseWeights`) in
   `engines/*.layers.json`. `logs/<component>.sparsity.txt` lists the layers eligible for sparse math and those
   TensorRT picked a sparse implementation for (it does so only when it is faster).
3. `pip3 install polygraphy` (once), then `python3 validate_on_device.py` — runs the engines on
   `reference/*.safetensors` inputs, compares with the saved ONNX Runtime outputs (cosine, PSNR), measures
   latency (median, p90) and exits non-zero on a failed gate.
   `python3 validate_on_device.py --runtime onnxruntime` runs the same comparison with ONNX Runtime.
4. `python3 benchmark.py --json result.json` — latency in the field's terms (cold/warm engine load, first inference,
   per-run samples, p50/p90/p95/p99, `--mlperf` minimums), per engine and end to end; `obsdiff compare` puts
   results from several devices side by side.

Engines are tied to the GPU and TensorRT version that built them: rebuild after a JetPack upgrade.
"""

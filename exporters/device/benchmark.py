#!/usr/bin/env python3
"""Benchmark this bundle where it runs: each component on its reference inputs, and the whole pipeline in numpy.

    python3 benchmark.py                          # the bundle's runtime: 20 runs per component after 3 warm-ups
    python3 benchmark.py --seconds 10 --json r.json
    python3 benchmark.py --mlperf                 # single-stream minimums per component: >= 1,024 runs and >= 60 s
    python3 benchmark.py --runtime onnxruntime    # a TensorRT bundle's ONNX files through ONNX Runtime

Needs numpy and the bundle's runtime only (onnxruntime; tensorrt + polygraphy; coremltools on macOS): no obsdiff,
torch or diffusers. It follows the field's conventions: onnxruntime_perf_test's session creation time, first
inference and percentiles (sorted[int(n·p)]); trtexec's warm-up and per-run samples; MLPerf single-stream's minimums
with p90 as its metric; Core ML's cold and warm load. The end-to-end pipeline (tokenizer → text encoder → the
denoising loop with the bundle's scheduler → VAE decoder) runs in numpy on the bundle's own reference prompt and
starting noise, and its image is compared with the reference image the export saved, so the timing is of the real
computation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA_ID = "obsdiff-benchmark/1"
PERCENTILE_METHOD = "nearest rank on the sorted samples: sorted[min(n - 1, int(n * p))] (onnxruntime_perf_test's)"
MLPERF_MIN_RUNS, MLPERF_MIN_SECONDS = 1024, 60.0
PIPELINE_REFERENCE = "reference/pipeline.safetensors"
RUNTIMES = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "coreml": "coreml"}  # bundle format → default runtime
INSTALL = {"onnxruntime": "pip install onnxruntime", "tensorrt": "JetPack's TensorRT plus pip install polygraphy",
           "coreml": "pip install coremltools (on macOS)"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "F64": np.float64,
           "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}
_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "float64": np.float64}


class BenchError(Exception):
    """Bad input or a missing runtime: one line, exit 2."""


# ---------------------------------------------------------------------------------------------------------- reading


def read_safetensors(path: Path, with_metadata: bool = False):
    """A safetensors file is an 8-byte header length, a JSON header and raw little-endian data (0-d arrays keep their
    true shapes in the metadata's ``shapes``)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    metadata = header.pop("__metadata__", {}) or {}
    shapes = json.loads(metadata.get("shapes", "{}"))
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        arr = np.frombuffer(raw[8 + n + start : 8 + n + end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = arr.reshape(shapes[name]) if name in shapes else arr
    return (out, metadata) if with_metadata else out


def read_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BenchError(f"{bundle}: no manifest.json (not an obsdiff bundle)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise BenchError(f"{path}: not JSON ({exc})") from None
    fmt = manifest.get("format")
    if fmt not in RUNTIMES:
        raise BenchError(f"{bundle}: bundle of target {manifest.get('target')!r} has format {fmt!r}, which this runner "
                         f"does not know ({', '.join(RUNTIMES)})")
    return manifest


def reference_inputs(bundle: Path, name: str, component: dict) -> dict[str, np.ndarray]:
    """The export's sample inputs; where a bundle has none (Core ML off macOS), seeded values of the manifest's
    shapes."""
    path = bundle / "reference" / f"{name}.safetensors"
    if path.is_file():
        return {k[len("input.") :]: v for k, v in read_safetensors(path).items() if k.startswith("input.")}
    rng = np.random.default_rng(0)
    feeds = {}
    for t in component["inputs"]:
        dtype = _NUMPY.get(t["dtype"], np.float32)
        feeds[t["name"]] = (rng.integers(0, 100, t["shape"]) if np.issubdtype(dtype, np.integer)
                            else rng.standard_normal(t["shape"])).astype(dtype)
    return feeds


# ------------------------------------------------------------------------------------------------------- statistics


def percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def summarize(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {"runs": len(ordered), "min_ms": ordered[0], "max_ms": ordered[-1], "mean_ms": statistics.fmean(ordered),
            "std_ms": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            **{f"p{int(p * 100)}_ms": percentile(ordered, p) for p in (0.5, 0.9, 0.95, 0.99)}}


def sample(fn, warmup: int, runs: int | None, seconds: float | None, min_runs: int = 1) -> list[float]:
    """Per-run milliseconds after ``warmup`` calls: ``runs`` of them, or as many as fit in ``seconds`` (at least
    ``min_runs``); both given: until both are met (MLPerf's rule)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
        enough_runs = runs is None or len(samples) >= runs
        enough_time = seconds is None or time.perf_counter() - start >= seconds
        if enough_runs and enough_time and len(samples) >= min_runs:
            return samples


def timings(fn, warmup: int, runs: int, budget_s: float | None = None) -> dict[str, float]:
    """Median and p90 of ``runs`` calls after ``warmup``; with ``budget_s``, fewer (at least 3) once that much time
    has been spent, so that a real-size model on a slow host is timed in minutes, not hours (the export's gates)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if budget_s is not None and time.perf_counter() - start > budget_s / 4:
            break  # one slow warm-up is warm enough
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
        if budget_s is not None and len(samples) >= 3 and time.perf_counter() - start > budget_s:
            break
    samples.sort()
    return {"median_ms": statistics.median(samples), "p90_ms": percentile(samples, 0.9), "runs": len(samples)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d > 0 else float(np.array_equal(a, b))


def psnr(ref: np.ndarray, got: np.ndarray, peak: float | None = None) -> float:
    """PSNR in dB; the peak is the reference's range unless given (images in [0, 1] use 1)."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    peak = peak if peak is not None else (float(ref.max() - ref.min()) or 1.0)
    mse = float(((ref - got) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------------------------------------- runtimes


class OnnxRuntime:
    """ONNX Runtime with the profile's session options; providers the build lacks are said, not silently dropped."""

    name = "onnxruntime"

    def __init__(self, bundle: Path, manifest: dict, args: argparse.Namespace) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BenchError(f"onnxruntime is not installed ({INSTALL['onnxruntime']})") from None
        self.ort, self.bundle, self.notes = ort, bundle, []
        options = manifest.get("session_options") or {}
        wanted = args.providers or options.get("execution_providers") or ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            self.notes.append(f"{', '.join(missing)} not in this onnxruntime build ({ort.__version__}); "
                              f"using {', '.join(p for p in wanted if p in available) or 'CPUExecutionProvider'}")
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.threads = args.threads if args.threads is not None else options.get("intra_op_num_threads")
        self.xnnpack_threads = args.threads or options.get("xnnpack_intra_op_num_threads")
        if "XnnpackExecutionProvider" in missing and args.threads is None and self.xnnpack_threads:
            # the profile gives ORT's own pool one thread because XNNPACK owns the threads; without XNNPACK, ORT does
            self.threads = self.xnnpack_threads
            self.notes.append(f"without XNNPACK, ONNX Runtime's pool takes its {self.threads} threads")
        self.optimization = options.get("graph_optimization_level")
        self.version = ort.__version__

    def load(self, name: str, component: dict):
        opts = self.ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
        if self.optimization:
            opts.graph_optimization_level = getattr(self.ort.GraphOptimizationLevel, self.optimization)
        provider_options = [{"intra_op_num_threads": str(self.xnnpack_threads)}
                            if p == "XnnpackExecutionProvider" and self.xnnpack_threads else {} for p in self.providers]
        session = self.ort.InferenceSession(str(self.bundle / component["file"]), opts, providers=self.providers,
                                            provider_options=provider_options)
        outputs = [o.name for o in session.get_outputs()]
        inputs = {i.name: i.type for i in session.get_inputs()}
        dtypes = {n: np.float16 if t == "tensor(float16)" else None for n, t in inputs.items()}

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            feeds = {k: v.astype(dtypes[k]) if dtypes.get(k) else v for k, v in feeds.items() if k in inputs}
            return dict(zip(outputs, session.run(outputs, feeds)))

        run.providers = session.get_providers()
        return run


class TensorRTRuntime:
    """TensorRT engines (``build_engines.sh``) through polygraphy's runner."""

    name = "tensorrt"

    def __init__(self, bundle: Path, manifest: dict, args: argparse.Namespace) -> None:
        try:
            import tensorrt
            from polygraphy.backend.trt import EngineFromBytes  # noqa: F401
        except ImportError:
            raise BenchError(f"tensorrt or polygraphy is not installed ({INSTALL['tensorrt']}); "
                             "or pass --runtime onnxruntime") from None
        device = bundle / "device.json"
        self.engines = json.loads(device.read_text())["components"] if device.is_file() else {}
        self.bundle, self.notes, self.version, self.threads = bundle, [], tensorrt.__version__, None

    def load(self, name: str, component: dict):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        engine = self.bundle / self.engines.get(name, {}).get("engine", f"engines/{name}.plan")
        if not engine.is_file():
            raise BenchError(f"{engine} is missing: run build_engines.sh first (or pass --runtime onnxruntime)")
        runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine))))
        runner.activate()

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: np.asarray(v) for k, v in runner.infer(feeds, copy_outputs_to_host=True).items()}

        run.providers = ["TensorRT"]
        return run


class CoreMLRuntime:
    """Core ML through coremltools: prediction needs macOS; each op's compute unit from ``MLComputePlan``."""

    name = "coreml"

    def __init__(self, bundle: Path, manifest: dict, args: argparse.Namespace) -> None:
        if platform.system() != "Darwin":
            raise BenchError(f"Core ML prediction needs macOS; this is {platform.system()}: run benchmark.py on a Mac")
        try:
            import coremltools
        except ImportError:
            raise BenchError(f"coremltools is not installed ({INSTALL['coreml']})") from None
        self.ct, self.bundle, self.notes, self.threads = coremltools, bundle, [], None
        self.version = coremltools.__version__
        self.units = getattr(coremltools.ComputeUnit, args.compute_units)

    def load(self, name: str, component: dict):
        model = self.ct.models.MLModel(str(self.bundle / component["file"]), compute_units=self.units)

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: np.asarray(v) for k, v in model.predict(feeds).items()}

        run.providers = [f"coreml:{self.units.name}", *self._op_units(model)]
        return run

    def _op_units(self, model) -> list[str]:
        """Counts of ops per compute unit, from MLComputePlan (macOS 14.4+, coremltools 8+); said when unavailable."""
        try:
            from coremltools.models.compute_plan import MLComputePlan

            plan = MLComputePlan.load_from_path(path=model.get_compiled_model_path(), compute_units=self.units)
            counts: dict[str, int] = {}
            for function in plan.model_structure.program.functions.values():
                for op in function.block.operations:
                    usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
                    unit = type(usage.preferred_compute_device).__name__ if usage else "none"
                    counts[unit] = counts.get(unit, 0) + 1
            return [f"ops on {unit}: {n}" for unit, n in sorted(counts.items())]
        except Exception as exc:  # older macOS or coremltools: the plan is optional
            return [f"MLComputePlan unavailable ({type(exc).__name__})"]


RUNTIME_CLASSES = {"onnxruntime": OnnxRuntime, "tensorrt": TensorRTRuntime, "coreml": CoreMLRuntime}


# ------------------------------------------------------------------------------------------------------ components


def bench_component(runtime, bundle: Path, name: str, component: dict, args: argparse.Namespace) -> dict:
    feeds = reference_inputs(bundle, name, component)
    t0 = time.perf_counter()
    run = runtime.load(name, component)
    cold_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    run = runtime.load(name, component)  # the file is in the page cache now: the warm load
    warm_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    run(feeds)
    first_ms = (time.perf_counter() - t0) * 1000
    runs, seconds = args.runs, args.seconds
    min_runs = MLPERF_MIN_RUNS if args.mlperf else 1
    if args.mlperf:
        runs, seconds = max(runs or 0, MLPERF_MIN_RUNS), max(seconds or 0.0, MLPERF_MIN_SECONDS)
    samples = sample(lambda: run(feeds), args.warmup, runs, seconds, min_runs)
    path = bundle / component["file"]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return {"name": name, "file": component["file"], "bytes": size, "providers": list(run.providers),
            "load_cold_ms": cold_ms, "load_warm_ms": warm_ms, "first_inference_ms": first_ms,
            "warmup_runs": args.warmup, "samples_ms": samples, "stats": summarize(samples)}


# ------------------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ClipTokenizer:
    """CLIP's byte-level BPE from the bundle's ``vocab.json`` and ``merges.txt`` (lower case, whitespace collapsed,
    ``</w>`` ends a word), padded to the model length. Checked against the export's own token ids for the reference
    prompt."""

    _WORD = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                       re.IGNORECASE)

    def __init__(self, folder: Path) -> None:
        self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m.strip())}
        config = json.loads((folder / "tokenizer_config.json").read_text()) if (
            folder / "tokenizer_config.json").is_file() else {}
        self.length = int(config.get("model_max_length", 77))
        self.bos, self.eos = self.vocab["<|startoftext|>"], self.vocab["<|endoftext|>"]
        pad = config.get("pad_token", "<|endoftext|>")
        self.pad = self.vocab.get(pad if isinstance(pad, str) else pad.get("content"), self.eos)
        self.byte_chars = _bytes_to_unicode()

    def _bpe(self, word: str) -> list[str]:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            merged, j = [], 0
            first, second = parts[i], parts[i + 1]
            while j < len(parts):
                if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return parts

    def __call__(self, text: str) -> np.ndarray:
        text = " ".join(text.split()).lower()
        ids = [self.bos]
        for word in self._WORD.findall(text):
            chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
            ids += [self.vocab.get(piece, self.eos) for piece in self._bpe(chars)]
        ids = ids[: self.length - 1] + [self.eos]
        return np.array([ids + [self.pad] * (self.length - len(ids))], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------ schedulers


def train_alphas_cumprod(config: dict) -> np.ndarray:
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config.get("trained_betas"):
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif config.get("beta_schedule", "linear") == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif config["beta_schedule"] == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    else:
        raise BenchError(f"beta_schedule {config['beta_schedule']!r} is not implemented in the numpy pipeline")
    return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)  # diffusers computes these in float32


def spaced_timesteps(config: dict, steps: int, default: str, dtype=np.int64) -> np.ndarray:
    """diffusers' spacings; DDIM rounds "linspace" to whole steps, Euler keeps it fractional (``dtype`` float)."""
    n, spacing, offset = config["num_train_timesteps"], config.get("timestep_spacing", default), config.get(
        "steps_offset", 0)
    if spacing == "leading":
        return (np.arange(0, steps) * (n // steps)).round()[::-1].astype(dtype) + offset
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)).astype(dtype) - 1
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, steps)[::-1]
        return (ts.round() if np.issubdtype(dtype, np.integer) else ts).astype(dtype)
    raise BenchError(f"timestep_spacing {spacing!r} is not implemented in the numpy pipeline")


class DDIM:
    """diffusers' DDIMScheduler at eta 0 (the default model's and obsdiff's SD scale models')."""

    def __init__(self, config: dict, steps: int) -> None:
        for flag in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            if config.get(flag):
                raise BenchError(f"DDIM with {flag} is not implemented in the numpy pipeline")
        self.config, self.steps = config, steps
        self.alphas = train_alphas_cumprod(config)
        self.final = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.alphas[0]
        self.timesteps = spaced_timesteps(config, steps, "leading")
        self.init_sigma = 1.0

    def scale(self, x: np.ndarray, t) -> np.ndarray:
        return x

    def step(self, out: np.ndarray, t, x: np.ndarray) -> np.ndarray:
        prev = t - self.config["num_train_timesteps"] // self.steps
        a = self.alphas[t]
        a_prev = self.alphas[prev] if prev >= 0 else self.final
        b = 1 - a
        if self.config.get("prediction_type", "epsilon") == "epsilon":
            x0, eps = (x - b**0.5 * out) / a**0.5, out
        elif self.config["prediction_type"] == "v_prediction":
            x0, eps = a**0.5 * x - b**0.5 * out, a**0.5 * out + b**0.5 * x
        else:
            raise BenchError(f"prediction_type {self.config['prediction_type']!r} is not implemented in numpy")
        return (a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps).astype(np.float32)


class EulerDiscrete:
    """diffusers' EulerDiscreteScheduler (SDXL's default) without Karras or other sigma schedules."""

    def __init__(self, config: dict, steps: int) -> None:
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"):
            if config.get(flag):
                raise BenchError(f"EulerDiscrete with {flag} is not implemented in the numpy pipeline")
        alphas = train_alphas_cumprod(config)
        train_sigmas = ((1 - alphas) / alphas) ** 0.5
        self.config = config
        self.timesteps = spaced_timesteps(config, steps, "linspace", np.float32)
        sigmas = np.interp(self.timesteps, np.arange(len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        top = float(self.sigmas.max())
        spacing = config.get("timestep_spacing", "linspace")
        self.init_sigma = top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        self.index = {float(t): i for i, t in enumerate(self.timesteps)}

    def scale(self, x: np.ndarray, t) -> np.ndarray:
        sigma = self.sigmas[self.index[float(t)]]
        return (x / (sigma**2 + 1) ** 0.5).astype(np.float32)

    def step(self, out: np.ndarray, t, x: np.ndarray) -> np.ndarray:
        i = self.index[float(t)]
        sigma, following = self.sigmas[i], self.sigmas[i + 1]
        if self.config.get("prediction_type", "epsilon") == "epsilon":
            x0 = x - sigma * out
        elif self.config["prediction_type"] == "v_prediction":
            x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            raise BenchError(f"prediction_type {self.config['prediction_type']!r} is not implemented in numpy")
        return (x + (x - x0) / sigma * (following - sigma)).astype(np.float32)


SCHEDULERS = {"DDIMScheduler": DDIM, "EulerDiscreteScheduler": EulerDiscrete}


# ---------------------------------------------------------------------------------------------------- end to end


class NumpyPipeline:
    """Stable Diffusion (1.x/2.x layout: one CLIP text encoder, a UNet, a VAE decoder) in numpy around the runtime."""

    def __init__(self, bundle: Path, manifest: dict, runtime, reference: dict, meta: dict) -> None:
        names = manifest["components"]
        if not {"text_encoder", "unet", "vae_decoder"} <= set(names) or "text_encoder_2" in names:
            raise BenchError("the numpy pipeline runs SD 1.x/2.x layouts (text_encoder, unet, vae_decoder)")
        config = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
        kind = SCHEDULERS.get(config.get("_class_name"))
        if kind is None:
            raise BenchError(f"scheduler {config.get('_class_name')} is not implemented in the numpy pipeline "
                             f"({', '.join(SCHEDULERS)})")
        self.steps, self.guidance = int(meta["steps"]), float(meta["guidance"])
        self.scheduler = kind(config, self.steps)
        self.scheduler_name = config["_class_name"]
        self.tokenizer = ClipTokenizer(bundle / "tokenizer")
        vae = json.loads((bundle / "vae_decoder" / "config.json").read_text())
        self.vae_scale = float(vae.get("scaling_factor", 0.18215))
        self.runs = {n: runtime.load(n, names[n]) for n in ("text_encoder", "unet", "vae_decoder")}
        self.unet_inputs = {t["name"]: t for t in names["unet"]["inputs"]}
        self.reference, self.meta = reference, meta

    def _timestep(self, t, batch: int) -> np.ndarray:
        spec = self.unet_inputs["timestep"]
        dtype = _NUMPY.get(spec["dtype"], np.float32)
        return np.array(t, dtype=dtype) if spec["shape"] == [] else np.full(spec["shape"] or [batch], t, dtype=dtype)

    def __call__(self, prompt: str, latents: np.ndarray) -> np.ndarray:
        ids = np.concatenate([self.tokenizer(self.meta.get("negative_prompt", "")), self.tokenizer(prompt)])
        hidden = np.concatenate([self.runs["text_encoder"]({"input_ids": ids[i : i + 1]})["last_hidden_state"]
                                 for i in range(2)])
        x = (latents * self.scheduler.init_sigma).astype(np.float32)
        for t in self.scheduler.timesteps:
            both = np.concatenate([x, x])
            out = self.runs["unet"]({"sample": self.scheduler.scale(both, t), "timestep": self._timestep(t, 2),
                                     "encoder_hidden_states": hidden})
            noise = next(iter(out.values())).astype(np.float32)
            uncond, cond = noise[:1], noise[1:]
            x = self.scheduler.step(uncond + self.guidance * (cond - uncond), t, x)
        image = self.runs["vae_decoder"]({"latent_sample": (x / self.vae_scale).astype(np.float32)})
        image = next(iter(image.values())).astype(np.float32)
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def bench_end_to_end(bundle: Path, manifest: dict, runtime, args: argparse.Namespace) -> dict:
    """The whole pipeline on the export's reference prompt and starting noise; its image against the export's."""
    path = bundle / PIPELINE_REFERENCE
    if not path.is_file():
        return {"ran": False, "reason": f"{PIPELINE_REFERENCE} is missing (bundle exported before obsdiff saved it)"}
    reference, meta = read_safetensors(path, with_metadata=True)
    try:
        pipe = NumpyPipeline(bundle, manifest, runtime, reference, meta)
    except BenchError as exc:
        return {"ran": False, "reason": str(exc)}
    prompt = meta["prompt"]
    tokens_match = bool(np.array_equal(pipe.tokenizer(prompt), reference["input_ids"]))
    image = pipe(prompt, reference["latents"])
    samples = sample(lambda: pipe(prompt, reference["latents"]), 0, args.e2e_runs, None)
    return {"ran": True, "prompt": prompt, "steps": pipe.steps, "guidance": pipe.guidance,
            "scheduler": pipe.scheduler_name, "height": int(image.shape[1]), "width": int(image.shape[2]),
            "tokens_match_reference": tokens_match, "psnr_db_vs_reference": _finite(psnr(reference["image"], image,
                                                                                        peak=1.0)),
            "samples_ms": samples, "stats": summarize(samples)}


def _finite(value: float) -> float:
    return 999.0 if math.isinf(value) else value  # identical images: JSON has no infinity


# ---------------------------------------------------------------------------------------------------------- report


def device_info(runtime) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        if sys.platform.startswith("linux"):
            names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith(("model name", "Hardware", "Model"))]
            cpu = names[0] if names else cpu
        elif sys.platform == "darwin":
            import subprocess

            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True).stdout.strip() or cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "machine": platform.machine(), "os": platform.platform(),
            "python": platform.python_version(), "runtime": runtime.name, "runtime_version": str(runtime.version),
            "hostname": platform.node()}


def bundle_info(bundle: Path, manifest: dict) -> dict:
    validation = manifest.get("validation") or {}
    e2e = validation.get("end_to_end") or {}
    pruning = manifest.get("pruning") or {}
    files = manifest.get("files", {})
    size = sum((bundle / f).stat().st_size for f in files if (bundle / f).is_file())
    return {"path": str(bundle.resolve()), "target": manifest.get("target"), "format": manifest.get("format"),
            "precision": manifest.get("precision"),
            "manifest_sha256": hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest(),
            "model_fingerprint": manifest.get("model_fingerprint"), "source_model": manifest.get("source_model"),
            "bytes": size, "shapes": manifest.get("shapes", {}),
            "pruning": pruning_summary(pruning.get("settings")),
            "quality": {"export_psnr_db": e2e.get("psnr_db"), "dense_vs_pruned_psnr_db": e2e.get(
                "psnr_dense_vs_pruned_db"), "gates_passed": all(g.get("passed") for g in validation.get("gates", []))}}


def pruning_summary(settings: dict | None) -> str:
    """What the prune did, in a few words: "structured flops 0.7 (global)", "2:4 + int8 (gptq)", "not pruned"."""
    if not settings:
        return "not pruned"
    parts = [] if settings.get("method", "obs-diff") == "obs-diff" else [str(settings["method"])]
    pattern = settings.get("pattern", "dense")
    if pattern != "dense" or not settings.get("quantization"):
        parts.append(str(pattern))
    if settings.get("sparsity") is not None and pattern == "unstructured":
        parts.append(f"{settings['sparsity']:g}")
    budget = settings.get("budget") or {}
    parts += [f"{k} {v:g}" for k, v in budget.items() if isinstance(v, (int, float))]
    if budget.get("allocation"):
        parts.append(f"({budget['allocation']})")
    quant = settings.get("quantization")
    if quant:
        group = f" g{quant['group_size']}" if quant.get("group_size") else ""
        parts.append(f"{'+ ' if len(parts) else ''}int{quant['bits']}{group} ({quant.get('method', 'gptq')})")
    return " ".join(parts)


def print_table(result: dict) -> None:
    rows = [(c["name"], c["load_cold_ms"], c["load_warm_ms"], c["first_inference_ms"], c["stats"])
            for c in result["components"]]
    e2e = result["end_to_end"]
    if e2e.get("ran"):
        rows.append(("end to end", None, None, None, e2e["stats"]))
    width = max(12, *(len(r[0]) + 2 for r in rows))
    print(f"{'component':<{width}}{'load cold':>10}{'warm':>8}{'first':>8}{'runs':>6}{'min':>9}{'p50':>9}{'p90':>9}"
          f"{'p99':>9}{'mean±std':>16}   (ms)")
    for name, cold, warm, first, s in rows:
        load = "".join(f"{v:>{w}.1f}" if v is not None else " " * w for v, w in ((cold, 10), (warm, 8), (first, 8)))
        print(f"{name:<{width}}{load}{s['runs']:>6}{s['min_ms']:>9.2f}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}"
              f"{s['p99_ms']:>9.2f}{s['mean_ms']:>9.2f}±{s['std_ms']:<6.2f}")
    if e2e.get("ran"):
        print(f"end to end: {e2e['steps']} steps of {e2e['scheduler']}, image vs the export's reference "
              f"{e2e['psnr_db_vs_reference']:.1f} dB PSNR, tokens {'match' if e2e['tokens_match_reference'] else 'DIFFER'}")
    else:
        print(f"end to end: not run ({e2e['reason']})")
    d = result["device"]
    print(f"{d['cpu']} ({d['cores']} cores), {d['os']}; {d['runtime']} {d['runtime_version']}, providers "
          f"{', '.join(result['settings']['providers_used'])}; peak RSS {result['peak_rss_mb'] or 0:.0f} MB")
    for note in result["notes"]:
        print(f"note: {note}")


# ---------------------------------------------------------------------------------------------------------- schema

_STATS = {"type": "object", "required": ["runs", "min_ms", "max_ms", "mean_ms", "std_ms", "p50_ms", "p90_ms", "p95_ms",
                                         "p99_ms"],
          "properties": {k: {"type": "number", "minimum": 0} for k in ("min_ms", "max_ms", "mean_ms", "std_ms",
                                                                      "p50_ms", "p90_ms", "p95_ms", "p99_ms")}
          | {"runs": {"type": "integer", "minimum": 1}}}
_SAMPLES = {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 1}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, "title": "obsdiff benchmark result",
    "type": "object",
    "required": ["schema", "created", "bundle", "device", "settings", "components", "end_to_end", "peak_rss_mb",
                 "notes"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created": {"type": "string"},
        "bundle": {"type": "object", "required": ["target", "format", "precision", "manifest_sha256",
                                                  "model_fingerprint", "bytes", "quality"],
                   "properties": {"target": {"type": "string"}, "format": {"enum": list(RUNTIMES)},
                                  "manifest_sha256": {"type": "string", "minLength": 64, "maxLength": 64},
                                  "model_fingerprint": {"type": ["string", "null"]},
                                  "bytes": {"type": "integer", "minimum": 0}, "quality": {"type": "object"}}},
        "device": {"type": "object", "required": ["cpu", "cores", "os", "runtime", "runtime_version"],
                   "properties": {"cores": {"type": "integer", "minimum": 0}, "runtime": {"enum": list(
                       RUNTIME_CLASSES)}}},
        "settings": {"type": "object", "required": ["warmup", "threads", "mlperf", "percentile_method",
                                                    "providers_used"],
                     "properties": {"warmup": {"type": "integer", "minimum": 0}, "mlperf": {"type": "boolean"},
                                    "providers_used": {"type": "array", "items": {"type": "string"}}}},
        "components": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "file", "bytes", "providers", "load_cold_ms", "load_warm_ms",
                                           "first_inference_ms", "warmup_runs", "samples_ms", "stats"],
            "properties": {"name": {"type": "string"}, "samples_ms": _SAMPLES, "stats": _STATS,
                           "load_cold_ms": {"type": "number", "minimum": 0},
                           "load_warm_ms": {"type": "number", "minimum": 0},
                           "first_inference_ms": {"type": "number", "minimum": 0}}}},
        "end_to_end": {"type": "object", "required": ["ran"], "properties": {
            "ran": {"type": "boolean"}, "samples_ms": _SAMPLES, "stats": _STATS,
            "psnr_db_vs_reference": {"type": "number"}}},
        "peak_rss_mb": {"type": ["number", "null"]},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_errors(value, schema: dict, where: str = "$") -> list[str]:
    """The subset of JSON Schema that SCHEMA uses (type, const, enum, required, properties, items, minItems,
    minimum, minLength, maxLength): a list of "where: what" lines, empty when ``value`` conforms."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is_type(value, k) for k in kinds):
            return [f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}"]
    errors = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: expected {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < schema.get("minimum", -math.inf):
        errors.append(f"{where}: {value} is below {schema['minimum']}")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
        errors.append(f"{where}: length {len(value)} is out of range")
    if isinstance(value, dict):
        errors += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{where}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: needs at least {schema['minItems']} items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{where}[{i}]")
    return errors


def _is_type(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[kind])


# ------------------------------------------------------------------------------------------------------------- main


def _whole(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        value = int(text) if text.strip().lstrip("-").isdigit() else None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"benchmark: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--runtime", choices=list(RUNTIME_CLASSES), help="default: the bundle's own")
    parser.add_argument("--runs", type=_whole(1), help="timed runs per component (default 20 unless --seconds)")
    parser.add_argument("--seconds", type=_seconds, help="time each component for this long instead")
    parser.add_argument("--mlperf", action="store_true", help=f"at least {MLPERF_MIN_RUNS} runs and "
                        f"{MLPERF_MIN_SECONDS:g} s per component (MLPerf single-stream); p90 is the metric")
    parser.add_argument("--warmup", type=_whole(0), default=3, help="untimed runs before timing (default 3)")
    parser.add_argument("--threads", type=_whole(1), help="intra-op threads (default: the profile's, else the runtime's)")
    parser.add_argument("--providers", nargs="+", help="ONNX Runtime execution providers (default: the profile's)")
    parser.add_argument("--compute-units", default="ALL", choices=["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"])
    parser.add_argument("--components", nargs="+", help="only these components (default: all)")
    parser.add_argument("--e2e-runs", type=_whole(0), default=3, help="timed end-to-end runs (0: skip it)")
    parser.add_argument("--json", type=Path, help="write the result here (schema: benchmark.schema.json)")
    args = parser.parse_args(argv)
    if args.runs is None and args.seconds is None:
        args.runs = 20
    return args


def run_benchmark(args: argparse.Namespace) -> dict:
    bundle = args.bundle.resolve()
    manifest = read_manifest(bundle)
    runtime = RUNTIME_CLASSES[args.runtime or RUNTIMES[manifest["format"]]](bundle, manifest, args)
    names = list(manifest["components"])
    unknown = sorted(set(args.components or []) - set(names))
    if unknown:
        raise BenchError(f"no component {', '.join(unknown)} in this bundle (it has {', '.join(names)})")
    chosen = [n for n in names if not args.components or n in args.components]
    components = [bench_component(runtime, bundle, n, manifest["components"][n], args) for n in chosen]
    e2e = (bench_end_to_end(bundle, manifest, runtime, args) if args.e2e_runs else
           {"ran": False, "reason": "--e2e-runs 0"})
    used = sorted({p for c in components for p in c["providers"]})
    return {"schema": SCHEMA_ID, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bundle": bundle_info(bundle, manifest), "device": device_info(runtime),
            "settings": {"runs": args.runs, "seconds": args.seconds, "warmup": args.warmup, "mlperf": args.mlperf,
                         "threads": runtime.threads, "components": chosen, "percentile_method": PERCENTILE_METHOD,
                         "providers_used": used, "metric": "p90_ms" if args.mlperf else "p50_ms"},
            "components": components, "end_to_end": e2e, "peak_rss_mb": peak_rss_mb(), "notes": runtime.notes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_benchmark(args)
    except BenchError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    errors = schema_errors(result, SCHEMA)
    if errors:  # the runner's own output must follow the schema it ships
        print(f"benchmark: error: result does not follow the schema: {errors[0]}", file=sys.stderr)
        return 1
    print_table(result)
    if args.json:
        partial = args.json.with_name(f".{args.json.name}.partial")
        partial.write_text(json.dumps(result, indent=2))
        partial.replace(args.json)  # never a half-written result
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

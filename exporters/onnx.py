"""ONNX bundles (cpu, android, and the ONNX half of tensorrt): export, check, and re-validate.

optimum-onnx's exporter where it works, ``torch.onnx.export`` from the component description otherwise;
both write optimum's diffusers layout (``unet/model.onnx``, ``model_index.json``, …).

fp16 converts the fp32 graphs' float tensors to float16 with ONNX Runtime's own converter and keeps
fp32 inputs and outputs, so callers feed the same arrays. Pruned zeros are kept exactly: an fp32
export copies weights bit for bit, and fp16 rounds only non-zero values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from obsdiff.api import IntegerWeight, PrunedFolder, integer_weight
from obsdiff.errors import BundleError, ExportError, GateError
from obsdiff.exporters.artifacts import (
    REFERENCE_DIR,
    WeightProbe,
    load_reference,
    save_pipeline_reference,
    save_reference,
    weight_probes,
)
from obsdiff.exporters.builder import BuildResult, BundleBuilder, ComponentResult, SparsityReport, TorchPipelines
from obsdiff.exporters.compare import (
    TIMING_BUDGET_S,
    compare_outputs,
    initial_latents,
    interleaved_ms,
    psnr,
    reference_io,
    run_pipeline_images,
    save_image_grid,
    timings_ms,
)
from obsdiff.exporters.components import (
    DENOISER,
    ComponentSpec,
    exported_components,
    pipeline_dims,
    recorded_calls,
    specs_for,
)
from obsdiff.exporters.export_plan import ExportPlan, Int8Mode
from obsdiff.exporters.onnx_int8 import (
    Placement,
    check_codes,
    int8_kernels,
    minify,
    needs_external_data,
    place,
    quantize_graph,
)
from obsdiff.exporters.profiles import Precision, Shapes, TargetProfile, available_targets, load_profile

log = logging.getLogger(__name__)

OPSET = 17
GATE_LATENT_PIXELS = 4096  # latent pixels × prompts per end-to-end call (64×64 at SD 1.5's 512: one prompt)


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
    """ONNX Runtime's converter, given the path (not a loaded proto), so that it runs shape inference with
    ``infer_shapes_path``, which works on files above 2 GB."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(str(path), keep_io_types=True)
    for stale in path.parent.glob(path.name + "*data"):
        stale.unlink()  # the fp32 external data, if any: the fp16 model is saved whole below
    save_onnx(converted, path)


def save_onnx(model, path: Path) -> None:
    """Single file below 2 GB; external data beside it above."""
    import onnx

    large = needs_external_data(model)
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)


def export_onnx(pipe, out_dir: Path, specs: tuple[ComponentSpec, ...], dims: dict[str, int], *,
                exporter: str) -> dict[str, Path]:
    """Write every component in fp32 to ``out_dir/<name>/model.onnx``; returns name → path."""
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
        paths[spec.name] = path
    return paths


def convert_precision(paths: dict[str, Path], precision: Precision) -> None:
    """fp16 graphs from the exported fp32 files, one component at a time (nothing to do for fp32)."""
    if precision is Precision.FP16:
        for name, path in paths.items():
            log.info("fp16 conversion of %s", name)
            to_fp16(path)


class OnnxWeights(Mapping[str, np.ndarray]):
    """A graph's initializers by name, each read from the file (or its external data) only when asked for.

    At SD size the initializers are gigabytes; the checks look at one tensor at a time.
    """

    def __init__(self, path: Path) -> None:
        import onnx

        self.path = path
        self.graph = onnx.load(str(path), load_external_data=False).graph
        self._protos = {init.name: init for init in self.graph.initializer}

    def __getitem__(self, name: str) -> np.ndarray:
        from onnx import TensorProto, numpy_helper

        proto = TensorProto()
        proto.CopyFrom(self._protos[name])  # loading external data fills the proto: keep the graph's copy empty
        return numpy_helper.to_array(proto, base_dir=str(self.path.parent))

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)

    def numel(self, name: str) -> int:
        return int(np.prod(self._protos[name].dims))


def match_weights(initializers: OnnxWeights, probes: dict[str, WeightProbe]) -> dict[str, str | None]:
    """Find each pruned PyTorch weight among the ONNX initializers (as is, or transposed for MatMul).

    Every initializer of a wanted size is read once and tried against the weights of that size not yet found.
    """
    wanted: dict[int, list[str]] = {}
    for name, probe in probes.items():
        wanted.setdefault(probe.numel, []).append(name)
    found: dict[str, str | None] = dict.fromkeys(probes)
    for init in initializers:
        left = [n for n in wanted.get(initializers.numel(init), []) if found[n] is None]
        if not left:
            continue
        arr = initializers[init]
        hit = next((n for n in left if probes[n].matches(arr)), None)
        if hit is not None:
            found[hit] = init
    return found


# ---- ONNX Runtime ----------------------------------------------------------------------------------


def host_session_options(precision: Precision = Precision.FP32):
    """Options for the host's checking sessions.

    No CPU memory arena: at SD size it holds gigabytes of activation memory after a run and grows in doubling steps.
    fp16 graphs run without graph optimizations: x86 ONNX Runtime has no fp16 kernels for most ops and casts them to
    fp32; constant folding would store those fp32 weights in the session beside the fp16 ones (SD 1.5's fp16 UNet:
    5.74 GiB after loading, 1.73 GiB unfolded; 6.07 vs 5.81 GiB at the end of a 512-px run).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    if precision is Precision.FP16:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def ort_session(path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                precision: Precision = Precision.FP32):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), host_session_options(precision), providers=list(providers))
    except Exception as exc:
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None


def run_session(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run on the sample inputs (already in the description's dtypes); outputs as float32, by name."""
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, {i.name: inputs[i.name] for i in session.get_inputs()})
    return {n: o.astype(np.float32) for n, o in zip(names, outs)}


def component_model_file(bundle: Path, spec: ComponentSpec, profile: TargetProfile) -> Path:
    """The file the device runs: ``model.ort`` for ORT-format targets, else ``model.onnx``."""
    folder = bundle / spec.name
    return folder / "model.ort" if profile.ort_format else folder / "model.onnx"


def weight_names(paths: dict[str, Path], specs: tuple[ComponentSpec, ...],
                 probes: dict[str, dict[str, WeightProbe]]) -> dict[str, dict[str, Placement]]:
    """The name map, made once right after export: for each graph, which initializer holds each pruned (or
    quantized) PyTorch weight, and whether the graph stores it transposed (read from the node that consumes it).

    Exporters rename weights (``onnx::MatMul_1234``) and MatMul stores them ``[in, out]``, so each weight is found by
    its probe (zeros in one of its layouts, and value sums); a VAE's layers are split between its decoder and encoder
    graphs. Every later check and the int8 writers read this map, never the values again. fp16 conversion and the
    int8 rewrite keep the initializer names.
    """
    names: dict[str, dict[str, Placement]] = {}
    for spec in specs:
        wanted = probes.get(spec.name, {})
        if not wanted:
            names[spec.name] = {}
            continue
        initializers = OnnxWeights(paths[spec.name])
        found = {k: v for k, v in match_weights(initializers, wanted).items() if v is not None}
        names[spec.name] = place(initializers.graph, found) if found else {}
    return names


def sparsity_report(probes: dict[str, WeightProbe], names: dict[str, Placement], onnx_path: Path,
                    exact: bool) -> SparsityReport:
    """Per pruned layer: zero fraction in PyTorch and in the exported graph, read by name; zeros must survive (in
    fp16, rounding may add zeros but never remove one)."""
    if not probes:
        return SparsityReport(0)
    initializers = OnnxWeights(onnx_path)
    layers, lost, export_zeros = {}, [], 0
    for name, probe in probes.items():
        placement = names.get(name)
        arr = initializers[placement.initializer] if placement is not None else None
        kept = arr is not None and probe.zeros_kept(arr, exact, placement.transposed)
        zeros = int((arr == 0).sum()) if arr is not None else 0
        export_zeros += zeros
        layers[name] = {"torch": probe.zeros / probe.numel, "export": zeros / probe.numel if arr is not None else None}
        if not kept:
            lost.append(name)
    total = sum(p.numel for p in probes.values())
    return SparsityReport(len(probes), sum(p is not None for p in (names.get(n) for n in probes)),
                          sum(p.zeros for p in probes.values()) / total, export_zeros / total, not lost, tuple(lost),
                          layers)


def int8_sparsity(probes: dict[str, WeightProbe], placed: dict[str, Placement], codes: dict) -> SparsityReport:
    """The zero report of an int8 graph: a zero weight is code 0 (every scale is positive), so codes equal to ours
    carry the zeros exactly."""
    mine = [probes[k] for k in placed]
    total = sum(p.numel for p in mine)
    zeros = sum(p.zeros for p in mine) / total
    kept = codes["equal"] == codes["layers"]
    return SparsityReport(len(mine), codes["equal"], zeros, zeros if kept else 0.0, kept, tuple(codes["different"]))


@dataclass
class TorchSide:
    """Everything the gates compare an export with, computed from the PyTorch pipelines before they are let go."""

    specs: tuple[ComponentSpec, ...]
    dims: dict[str, int]
    references: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]  # name → (inputs, PyTorch outputs)
    probes: dict[str, dict[str, WeightProbe]]  # name → pruned layer → probe
    latents: torch.Tensor  # the end-to-end gate's starting noise
    prompts_per_call: int
    images: dict[str, np.ndarray]  # "pruned PyTorch" and, with a dense model, "dense PyTorch"
    latency_ms: dict[str, float]  # one prompt through the pruned PyTorch pipeline
    scheduler: str
    int8: dict[str, dict[str, IntegerWeight]]  # component source → quantized layer → its codes and scales
    calibration: list[dict[str, np.ndarray]] | None  # the denoiser's inputs at every gate step (int8 activations)


def write_pipeline_reference(staging: Path, ort_pipe, prompt: str, side: TorchSide, image: np.ndarray,
                             shapes: Shapes) -> None:
    """The first gate prompt's token ids, starting noise and exported image: what ``benchmark.py``'s numpy pipeline
    must reproduce."""
    tokenizer = getattr(ort_pipe, "tokenizer", None)
    ids = None if tokenizer is None else tokenizer(prompt, padding="max_length", truncation=True,
                                                   max_length=tokenizer.model_max_length, return_tensors="np").input_ids
    save_pipeline_reference(staging / REFERENCE_DIR, prompt, ids, side.latents[:1].numpy(), image,
                            {"steps": shapes.steps, "guidance": shapes.guidance, "height": shapes.height,
                             "width": shapes.width, "scheduler": side.scheduler})


@dataclass
class OnnxBuild:
    """An ONNX build: its result, the PyTorch side it was checked against, and the name map of its weights."""

    result: BuildResult
    side: TorchSide
    names: dict[str, dict[str, Placement]]  # graph → layer → initializer (before any int8 rewrite)
    placements: dict[str, dict[str, Placement]]  # graph → quantized layer → initializer of its int8 codes


class OnnxBundleBuilder(BundleBuilder):
    """Export + validation for the ONNX-based formats (cpu, android; the ONNX half of tensorrt).

    Three phases, so that at most one copy of the big weights is in memory at a time: the PyTorch side of every
    gate, the export, then (PyTorch let go) the fp16 conversion and the ONNX Runtime side.
    """

    def build(self, models: TorchPipelines, staging: Path) -> BuildResult:
        return self.build_onnx(models, staging).result

    def build_onnx(self, models: TorchPipelines, staging: Path) -> OnnxBuild:
        """The bundle's ONNX files and results, the PyTorch side they were checked against, and the name map."""
        plan = self.plan
        side = self.torch_side(models)
        t0 = time.time()
        log.info("exporting %d components to ONNX (%s exporter)", len(side.specs), plan.profile.exporter)
        paths = export_onnx(models.pipe, staging, side.specs, side.dims, exporter=plan.profile.exporter)
        names = weight_names(paths, side.specs, side.probes)
        placements = self._place_int8(side, names)
        with contextlib.ExitStack() as cleanup:
            dense_graph = float_graph = None
            if models.dense is not None and models.folder.reshaped_or_quantized:
                folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(dir=staging.parent,
                                                                                prefix=".obsdiff-dense-")))
                dense_graph = self._export_dense_denoiser(models.dense, folder, side)
                float_graph = keep_float_denoiser(side, paths, placements, models.folder, folder)
            models.release()  # from here on only the exported files are in memory
            extra = {"dense " + dense_graph[0]: dense_graph[1]} if dense_graph else {}
            if float_graph is not None:
                extra["float " + dense_graph[0]] = float_graph
            convert_precision({**paths, **extra}, plan.precision)
            written = {s.name: self._write_int8(side, s, paths[s.name], placements[s.name]) for s in side.specs
                       if s.name in placements}
            export_s = time.time() - t0
            result = self._runtime_checks(side, staging, names, placements, written)
            if dense_graph is not None:
                result.details["against_dense"] = against_dense(self.plan, dense_graph, staging, models.folder,
                                                                float_graph)
        result.details["export_s"] = export_s
        return OnnxBuild(result, side, names, placements)

    def _export_dense_denoiser(self, dense_pipe, folder: Path, side: TorchSide) -> tuple[str, Path]:
        """The dense model's denoiser, exported like the bundle's, for the latency comparison (not shipped)."""
        spec = next(s for s in side.specs if s.role == DENOISER)
        log.info("exporting the dense %s for the latency comparison", spec.name)
        return spec.name, export_onnx(dense_pipe, folder, (spec,), side.dims, exporter=self.profile.exporter)[spec.name]

    def _place_int8(self, side: TorchSide, names: dict[str, dict[str, Placement]]) -> dict[str, dict[str, Placement]]:
        """Each graph's quantized layers, from the name map; every quantized layer must be in some graph (a VAE's
        layers split between its decoder and encoder graphs)."""
        placements: dict[str, dict[str, Placement]] = {}
        for spec in side.specs:
            layers = side.int8.get(spec.source, {})
            placed = {k: v for k, v in names[spec.name].items() if k in layers}
            if placed:
                placements[spec.name] = placed
        for source, layers in side.int8.items():
            placed = {k for spec in side.specs if spec.source == source for k in placements.get(spec.name, {})}
            missing = sorted(set(layers) - placed)
            if missing:
                raise ExportError(f"{source}: {len(missing)} quantized layer(s) not found in the exported graphs "
                                  f"(e.g. {missing[0]}): their int8 codes would be lost")
        return placements

    def _write_int8(self, side: TorchSide, spec: ComponentSpec, path: Path, placed: dict[str, Placement]) -> dict:
        """The component's graph rewritten with our int8 codes (and int8 activations for the denoiser)."""
        calls = side.calibration if spec.role == DENOISER else None
        model, info = quantize_graph(path, placed, side.int8[spec.source], calls, float_compute=spec.float_compute,
                                     symmetric_activations=self.plan.int8 is Int8Mode.SYMMETRIC)
        minify(model, placed)
        for stale in path.parent.glob(path.name + "*data"):
            stale.unlink()
        save_onnx(model, path)
        return info

    def _runtime_checks(self, side: TorchSide, staging: Path, names: dict[str, dict[str, Placement]],
                        placements: dict[str, dict[str, Placement]], written: dict[str, dict]) -> BuildResult:
        """Every component through ONNX Runtime against PyTorch's outputs, then the end-to-end gate."""
        plan, profile = self.plan, self.profile
        result = BuildResult()
        if profile.ort_format:
            convert_to_ort(staging)
        for spec in side.specs:
            result.components[spec.name] = comp = self._component_check(side, staging, spec)
            onnx_path = staging / spec.name / "model.onnx"
            if spec.name in placements:
                comp.details["int8"] = {**written[spec.name], **self._int8_checks(
                    side, spec, onnx_path, staging / comp.file, placements[spec.name], result)}
                comp.sparsity = int8_sparsity(side.probes[spec.name], placements[spec.name], comp.details["int8"]["codes"])
            else:
                comp.sparsity = sparsity_report(side.probes[spec.name], names[spec.name], onnx_path,
                                                exact=plan.precision is Precision.FP32)
            result.gate(f"{spec.name} cosine", min(o["cosine"] for o in comp.details["outputs"].values()), ">=",
                        plan.gates.min_cosine)
            if comp.sparsity.pruned_layers:
                result.gate(f"{spec.name} pruned zeros survive export", float(comp.sparsity.zeros_preserved), ">=", 1.0)
            budget = plan.gates.max_latency_ms.get(spec.name)
            if budget:
                result.gate(f"{spec.name} median latency ms", comp.details["latency"]["median_ms"], "<=", budget)
        result.details["end_to_end"] = e2e = self._end_to_end(side, staging)
        result.gate("image PSNR dB", e2e["psnr_db"], ">=", plan.min_psnr())
        budget = plan.gates.max_latency_ms.get("pipeline")
        if budget:
            result.gate("pipeline median latency ms", e2e["latency_onnx"]["median_ms"], "<=", budget)
        return result

    def _component_check(self, side: TorchSide, staging: Path, spec: ComponentSpec) -> ComponentResult:
        """One component's file through ONNX Runtime on the sample inputs, against PyTorch; its reference saved."""
        log.info("%s: ONNX Runtime vs PyTorch on the sample inputs", spec.name)
        inputs, ref_out = side.references[spec.name]
        model_file = component_model_file(staging, spec, self.profile)
        session = ort_session(model_file, self.profile.providers, self.plan.precision)
        got = run_session(session, inputs)
        save_reference(staging / REFERENCE_DIR, spec.name, inputs, ref_out, got)
        details = {"outputs": compare_outputs(ref_out, got),
                   "latency": timings_ms(lambda s=session, i=inputs: run_session(s, i))}
        return ComponentResult(str(model_file.relative_to(staging)), SparsityReport(0), details)

    def _int8_checks(self, side: TorchSide, spec: ComponentSpec, onnx_path: Path, model_file: Path,
                     placed: dict[str, Placement], result: BuildResult) -> dict:
        """Our codes and scales are what the graph stores; the graph ONNX Runtime runs has int8 kernels."""
        codes = check_codes(OnnxWeights(onnx_path), placed, side.int8[spec.source])
        result.gate(f"{spec.name} int8 weights equal obsdiff's codes and scales", codes["equal"] / codes["layers"],
                    ">=", 1.0)
        kernels = int8_kernels(model_file, self.profile.providers)
        if side.calibration is not None and spec.role == DENOISER:
            result.gate(f"{spec.name} int8 kernels in ONNX Runtime's optimized graph", kernels["int8"], ">=", 1)
        return {"codes": codes, "kernels": kernels}

    def torch_side(self, models: TorchPipelines) -> TorchSide:
        pipe, shapes = models.pipe, self.plan.shapes
        specs = specs_for(pipe)
        dims = pipeline_dims(pipe, shapes)
        log.info("PyTorch references: %d components, then %d prompts × %d steps end to end",
                 len(specs), len(self.prompts), shapes.steps)
        references = {spec.name: reference_io(pipe, spec, dims) for spec in specs}
        probes = {spec.name: weight_probes(pipe, models.folder, spec.source) for spec in specs}
        latents = initial_latents(pipe, len(self.prompts), shapes.height, shapes.width, seed=0)
        # Prompts go through in batches that fit: one at a time at SD size, all at once for small models.
        per_call = max(1, GATE_LATENT_PIXELS // (shapes.height * shapes.width // pipe.vae_scale_factor**2))
        calibration = None
        with contextlib.ExitStack() as recording:
            if self.plan.int8 in (Int8Mode.ACTIVATIONS, Int8Mode.SYMMETRIC):
                denoiser_spec = next(s for s in specs if s.role == DENOISER)
                calibration = recording.enter_context(recorded_calls(getattr(pipe, denoiser_spec.source), denoiser_spec))
            images = {"pruned PyTorch": self._images(pipe, latents, per_call)}
        if models.dense is not None:
            images = {"dense PyTorch": self._images(models.dense, latents, per_call), **images}
        latency = timings_ms(lambda: self._images(pipe, latents[:1], 1, self.prompts[:1]), warmup=1, runs=5)
        return TorchSide(specs, dims, references, probes, latents, per_call, images, latency,
                         type(pipe.scheduler).__name__, integer_weights(pipe, models.folder), calibration)

    def _images(self, pipe, latents: torch.Tensor, per_call: int, prompts: list[str] | None = None) -> np.ndarray:
        shapes, prompts = self.plan.shapes, prompts or self.prompts
        return np.concatenate([run_pipeline_images(pipe, prompts[i : i + per_call], latents[i : i + per_call],
                                                   shapes.steps, shapes.guidance, shapes.height, shapes.width)
                               for i in range(0, len(prompts), per_call)])

    def _end_to_end(self, side: TorchSide, staging: Path) -> dict:
        from optimum.onnxruntime import ORTDiffusionPipeline  # picks the ORT pipeline named in model_index.json

        shapes = self.plan.shapes
        log.info("end to end through ONNX Runtime: %d prompts × %d steps", len(self.prompts), shapes.steps)
        ort_pipe = ORTDiffusionPipeline.from_pretrained(staging, provider=self.profile.providers[0],
                                                        session_options=host_session_options(self.plan.precision))
        ort_pipe.set_progress_bar_config(disable=True)
        onnx_images = self._images(ort_pipe, side.latents, side.prompts_per_call)
        torch_images = side.images["pruned PyTorch"]
        save_image_grid({**side.images, "exported": onnx_images}, staging / "images.png")
        image = self._images(ort_pipe, side.latents[:1], 1, self.prompts[:1])  # the first prompt alone
        write_pipeline_reference(staging, ort_pipe, self.prompts[0], side, image, self.plan.shapes)
        dense = side.images.get("dense PyTorch")
        return {
            "prompts": self.prompts, "steps": shapes.steps, "guidance": shapes.guidance, "seed": 0,
            "prompts_per_call": side.prompts_per_call, "height": shapes.height, "width": shapes.width,
            "scheduler": side.scheduler,
            "psnr_db": psnr(torch_images, onnx_images, peak=1.0),
            "psnr_dense_vs_pruned_db": None if dense is None else psnr(dense, torch_images, peak=1.0),
            "latency_onnx": timings_ms(lambda: self._images(ort_pipe, side.latents[:1], 1, self.prompts[:1]),
                                       warmup=1, runs=5),
            "latency_pytorch": side.latency_ms,
        }

    @classmethod
    def revalidate(cls, bundle: Path, manifest: dict) -> dict:
        return revalidate_onnx(bundle, manifest)

    @classmethod
    def required_files(cls, bundle: Path, manifest: dict) -> list[str]:
        return onnx_required_files(bundle, manifest)

    def report_sections(self, result: BuildResult) -> list[str]:
        """Components vs PyTorch, integer weights, the dense comparison and the end-to-end comparison."""
        data = result.to_json()
        return [*_components_section(data), *_int8_section(data), *_dense_section(data), *_end_to_end_section(data)]


def keep_float_denoiser(side: TorchSide, paths: dict[str, Path], placements: dict, pruned: PrunedFolder,
                        folder: Path) -> Path | None:
    """A shrunk and quantized denoiser's graph before its int8 rewrite (not shipped): timed beside the dense and the
    int8 graphs, it splits the speed-up into its structured and its int8 factors."""
    spec = next(s for s in side.specs if s.role == DENOISER)
    if spec.name not in placements or not pruned.shapes(spec.source):
        return None
    target = folder / "float" / spec.name
    target.mkdir(parents=True)
    for f in paths[spec.name].parent.glob("model.onnx*"):
        shutil.copy2(f, target / f.name)
    return target / "model.onnx"


def against_dense(plan: ExportPlan, dense_graph: tuple[str, Path], staging: Path, folder: PrunedFolder,
                  float_graph: Path | None = None) -> dict:
    """Dense and pruned denoiser timed alternately on the same inputs; FLOPs from the prune record. With the shrunk
    graph before its int8 rewrite (``float_graph``), the three are timed together and the ratio splits into its
    structured and int8 factors."""
    name, dense_path = dense_graph
    inputs, _ = load_reference(staging / REFERENCE_DIR, name)
    precision = plan.precision
    sessions = {"dense": ort_session(dense_path, plan.profile.providers, precision),
                "pruned": ort_session(staging / name / "model.onnx", plan.profile.providers, precision)}
    if float_graph is not None:
        sessions["shrunk_float"] = ort_session(float_graph, plan.profile.providers, precision)
    calls = {k: (lambda s=s: run_session(s, inputs)) for k, s in sessions.items()}
    t0 = time.perf_counter()
    for call in calls.values():
        call()
    runs = max(5, min(30, int(TIMING_BUDGET_S / max(time.perf_counter() - t0, 1e-6))))
    log.info("%s: dense and pruned timed alternately, %d runs each", name, runs)
    timed = interleaved_ms(calls, runs)
    shrink = next((c.shrink for c in folder.record.components.values() if c.shrink is not None), None)
    size = {"dense": sum(f.stat().st_size for f in dense_path.parent.glob("model.onnx*")),
            "pruned": sum(f.stat().st_size for f in (staging / name).glob("model.onnx*"))}
    ms = timed["median_ms"]
    factors = ({"structured_speedup": ms["dense"] / ms["shrunk_float"], "int8_speedup": ms["shrunk_float"] / ms["pruned"]}
               if float_graph is not None else {})
    return {"component": name, "runs": runs, **timed, "bytes": size, **factors,
            "latency_ratio": timed["median_ms"]["pruned"] / timed["median_ms"]["dense"],
            "flops_ratio": shrink.flops_after / shrink.flops_before if shrink and shrink.flops_before else None,
            "params_ratio": shrink.params_after / shrink.params_before if shrink and shrink.flops_before else None}


def _components_section(data: dict) -> list[str]:
    lines = ["", "## Components vs PyTorch (sample inputs)", "",
             "| component | output | cosine | rel. L2 | max abs | median ms | p90 ms | runs | pruned zeros (torch → export) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, comp in data["components"].items():
        sp = comp["sparsity"]
        zeros = (f"{sp['zero_fraction_torch']:.4f} → {sp['zero_fraction_export']:.4f}" if sp.get("pruned_layers")
                 else "dense")
        for out, c in comp["outputs"].items():
            lat = comp["latency"]
            lines.append(f"| {name} | {out} | {c['cosine']:.7f} | {c['relative_l2']:.2e} | {c['max_abs']:.2e} | "
                         f"{lat['median_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['runs']} | {zeros} |")
    return lines


def _int8_section(data: dict) -> list[str]:
    int8 = {name: comp["int8"] for name, comp in data["components"].items() if "int8" in comp}
    if not int8:
        return []
    lines = ["", "## Integer weights", "",
             "obsdiff's int8 codes and per-output-channel scales, written into the graph (not re-quantized); "
             "kernels counted in the graph ONNX Runtime runs after its optimizations.", "",
             "| component | layers with our codes | activations | int8 kernels | weights-only layers |",
             "|---|---|---|---|---|"]
    for name, info in int8.items():
        kernels = ", ".join(f"{k} {v}" for k, v in info["kernels"].items() if k.startswith("Q") and v) or "none"
        weights_only = "all" if info["activations"] == "float" else len(info["weights_only_layers"])
        lines.append(f"| {name} | {info['codes']['equal']} / {info['codes']['layers']} | {info['activations']} | "
                     f"{kernels} | {weights_only} |")
    return lines


def _dense_section(data: dict) -> list[str]:
    dense = data.get("against_dense")
    if not dense:
        return []
    ms = dense["median_ms"]
    lines = ["", "## Against the dense export", "",
             f"{dense['component']}, dense and pruned graphs timed alternately ({dense['runs']} runs each, "
             "ONNX Runtime, the profile's providers):", "",
             "| | dense | pruned | pruned / dense |", "|---|---|---|---|",
             f"| median ms | {ms['dense']:.2f} | {ms['pruned']:.2f} | **{dense['latency_ratio']:.3f}** |",
             f"| model file bytes | {dense['bytes']['dense']} | {dense['bytes']['pruned']} | "
             f"{dense['bytes']['pruned'] / dense['bytes']['dense']:.3f} |"]
    if dense.get("flops_ratio") is not None:
        lines += [f"| FLOPs per call | | | {dense['flops_ratio']:.3f} |",
                  f"| parameters | | | {dense['params_ratio']:.3f} |"]
    if "int8_speedup" in dense:
        total, shrink, int8 = 1 / dense["latency_ratio"], dense["structured_speedup"], dense["int8_speedup"]
        lines += ["", f"Stacked: **{total:.2f}× faster** than dense = structured {shrink:.2f}× (dense {ms['dense']:.2f} ms → "
                  f"shrunk fp32 {ms['shrunk_float']:.2f} ms) × int8 {int8:.2f}× (→ {ms['pruned']:.2f} ms), timed "
                  "together."]
        if int8 < 1.0:
            lines.append(f"int8 does not pay on this model: its int8 kernels are {1 / int8:.2f}× slower than fp32 at "
                         "these widths (too few channels for the quantize/dequantize around each kernel to be repaid).")
    return lines


def _end_to_end_section(data: dict) -> list[str]:
    e2e = data["end_to_end"]
    lines = ["", "## End to end", "",
             f"{len(e2e['prompts'])} prompts, {e2e['steps']} steps, guidance {e2e['guidance']}, seed {e2e['seed']}, "
             f"{e2e['scheduler']}; same initial latents for every row.", "",
             f"- exported vs pruned PyTorch: **{e2e['psnr_db']:.2f} dB** PSNR"]
    if e2e.get("psnr_dense_vs_pruned_db") is not None:
        lines.append(f"- pruned vs dense PyTorch: {e2e['psnr_dense_vs_pruned_db']:.2f} dB PSNR (what pruning changed)")
    onnx_ms, torch_ms = e2e["latency_onnx"], e2e["latency_pytorch"]
    return lines + ["", "| pipeline (1 prompt) | median ms | p90 ms | runs |", "|---|---|---|---|",
                    f"| exported | {onnx_ms['median_ms']:.1f} | {onnx_ms['p90_ms']:.1f} | {onnx_ms['runs']} |",
                    f"| PyTorch | {torch_ms['median_ms']:.1f} | {torch_ms['p90_ms']:.1f} | {torch_ms['runs']} |",
                    "", "![dense PyTorch, pruned PyTorch, exported](images.png)"]


def integer_weights(pipe, folder: PrunedFolder) -> dict[str, dict[str, IntegerWeight]]:
    """Component → quantized layer → its codes and scales, from the folder's scales and the loaded weights."""
    out = {}
    for source, quantized in folder.quantization.items():
        modules = dict(getattr(pipe, source).named_modules())
        try:
            out[source] = {layer: integer_weight(modules[layer].weight, scale, quantized.quant)
                           for layer, scale in quantized.scales.items()}
        except (KeyError, ValueError) as exc:
            raise ExportError(f"{source}: its quantization file does not fit its weights ({exc})") from None
    return out


def convert_to_ort(folder: Path) -> None:
    """ONNX Runtime's own converter: ``model.ort`` beside each ``model.onnx`` and the operator config."""
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(folder),
           "--optimization_style", "Fixed"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError(f"ORT format conversion failed: {proc.stderr.strip().splitlines()[-1:]}")
    configs = list(folder.glob("*.config"))
    if not configs:
        raise BundleError("ORT format conversion wrote no required-operators config")
    configs[0].rename(folder / "required_operators.config")


def onnx_required_files(bundle: Path, manifest: dict) -> list[str]:
    """optimum's layout for the bundle's pipeline family (read from its own ``model_index.json``): every component's
    graph and reference, in ORT format too for an ORT-format target; the manifest must describe exactly those."""
    index_path = bundle / "model_index.json"
    try:
        names = exported_components(json.loads(index_path.read_text()))
    except (OSError, ValueError, AttributeError, ExportError) as exc:
        raise BundleError(f"{bundle}: model_index.json is missing or unreadable, so which models it needs is unknown "
                          f"({str(exc).splitlines()[0][:120]})") from None
    described = set(manifest["components"])
    if described != set(names):
        raise BundleError(f"{bundle}: its manifest describes {sorted(described)}, its pipeline needs {list(names)}")
    ort = manifest_is_ort_format(manifest)
    files = ["model_index.json", "report.md", "validation.json"]
    for name in names:
        files += [f"{name}/model.onnx", f"{REFERENCE_DIR}/{name}.safetensors"] + ([f"{name}/model.ort"] if ort else [])
    return files + (["required_operators.config"] if ort else [])


def manifest_is_ort_format(manifest: dict) -> bool:
    """A shipped target says so in its profile; another one by its files (``model.ort``)."""
    if manifest.get("shipped_profile") is True and manifest["target"] in available_targets():
        return load_profile(manifest["target"]).ort_format
    return any(str(c["file"]).endswith(".ort") for c in manifest["components"].values())


def revalidate_onnx(bundle: Path, manifest: dict) -> dict:
    """Run every component's model file on its saved reference inputs; compare with PyTorch's outputs."""
    min_cos = manifest["gates"]["min_cosine"]
    results = {}
    for name, comp in manifest["components"].items():
        inputs, reference = load_reference(bundle / REFERENCE_DIR, name)
        got = run_session(ort_session(bundle / comp["file"], precision=Precision(manifest["precision"])), inputs)
        results[name] = compare_outputs(reference, got)
        worst = min(c["cosine"] for c in results[name].values())
        log.info("%s: cosine %.7f (gate %.4g)", name, worst, min_cos)
        if worst < min_cos:
            raise GateError(f"{bundle}: {name} cosine {worst:.6f} below the gate {min_cos:g}")
    return results

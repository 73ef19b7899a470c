"""Core ML exporter: traced PyTorch → mlprogram (fp16) → pruned weights stored sparsely, for app bundles.

Two layouts. ``apple`` (the ios/macos default; ``exporters/apple.py``): what Apple's Swift ``StableDiffusion``
package loads: ``Packages/TextEncoder.mlpackage`` (SDXL adds ``TextEncoder2``), ``Unet`` or ``UnetChunk1`` +
``UnetChunk2``, ``VAEDecoder``, with Apple's IO names and layouts; ``Resources/vocab.json`` and ``merges.txt``;
``compile_models.sh`` compiles the packages into ``Resources/*.mlmodelc`` on a Mac; ``README_DEVICE.md`` has the
Swift call. ``ours``: ``Resources/TextEncoder.mlpackage`` (SDXL and SD3 add ``TextEncoder2``; a T5 encoder is
``TextEncoderT5``), ``Unet.mlpackage`` or, for SD3, ``MultiModalDiffusionTransformer.mlpackage`` (Flux:
``FluxTransformer.mlpackage``, our name), ``VAEDecoder.mlpackage``, the tokenizer files and
``scheduler_config.json``, with the inputs and outputs of the component descriptions (the same as the ONNX bundles;
``.`` becomes ``_``). Both have fixed shapes from the target profile and the shared ``manifest.json``.

Sparse storage uses coremltools' own threshold pruner at |w| ≤ 1e-12, so exactly the OBS zeros become
the sparse mask (iOS 16+). ``compress`` adds palettization or int8 on top, which needs iOS 18.
Conversion and saving work on Linux; prediction needs macOS and is skipped elsewhere with the reason.
"""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from obsdiff.api import IntegerWeight, PrunedFolder, integer_weight
from obsdiff.errors import BundleError, ExportError
from obsdiff.exporters.apple import (
    COMPILE_SCRIPT,
    AttentionImplementation,
    Layout,
    apple_specs,
    attention_implementation,
    auto_chunk,
    check_family,
    chunk_of,
    chunk_split,
    contract_files,
    device_readme,
    layout_check,
)
from obsdiff.exporters.artifacts import pruned_weights
from obsdiff.exporters.builder import BuildResult, BundleBuilder, ComponentResult, SparsityReport, TorchPipelines
from obsdiff.exporters.compare import psnr, reference_io, timings_ms
from obsdiff.exporters.components import (
    DENOISER,
    TEXT_ENCODER,
    VAE_DECODER,
    VAE_ENCODER,
    WRAPPED_ATTR,
    ComponentSpec,
    pipeline_dims,
    specs_for,
)
from obsdiff.exporters.export_plan import ExportPlan
from obsdiff.exporters.profiles import Precision

log = logging.getLogger(__name__)

RESOURCES = "Resources"
PACKAGES = "Packages"  # Apple layout: the .mlpackage sources that compile_models.sh compiles into Resources/
LAYOUT_MIN_COSINE = 0.9999
PACKAGE_NAMES = {"text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2", "text_encoder_3": "TextEncoderT5",
                 "unet": "Unet", "transformer": "MultiModalDiffusionTransformer", "vae_decoder": "VAEDecoder",
                 "vae_encoder": "VAEEncoder"}
T5_PACKAGE = "TextEncoderT5"
FLUX_PACKAGE = "FluxTransformer"  # Apple's package has no Flux pipeline, so this name is ours
ROLES = (TEXT_ENCODER, DENOISER, VAE_DECODER, VAE_ENCODER)
ZERO_THRESHOLD = 1e-12
SIZE_SLACK = 0.05  # of the dense package


def feature_name(name: str) -> str:
    """Core ML feature names are identifiers: optimum's ``hidden_states.0`` becomes ``hidden_states_0``."""
    return name.replace(".", "_")


def _ct_target(name: str):
    import coremltools as ct

    return getattr(ct.target, name)


def convert_component(pipe, spec: ComponentSpec, dims: dict[str, int], deployment_target: str, precision: Precision):
    """Trace the description's wrapper with its sample inputs and convert to an mlprogram."""
    import coremltools as ct

    wrapper = spec.wrapper(getattr(pipe, spec.source)).eval()
    sample = spec.sample_inputs(dims)
    sample = {k: (v.reshape(1) if v.dim() == 0 else v) for k, v in sample.items()}  # Core ML has no rank-0 inputs
    # Core ML takes int32, not int64: token ids and (Flux) rotary position ids.
    sample = {k: (v.to(torch.int32) if v.dtype == torch.int64 else v) for k, v in sample.items()}
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, tuple(sample.values()), strict=False)
    inputs = [ct.TensorType(name=k, shape=tuple(v.shape), dtype=np.int32 if v.dtype == torch.int32 else np.float32)
              for k, v in sample.items()]
    outputs = [ct.TensorType(name=feature_name(t.name)) for t in spec.outputs]
    model = ct.convert(traced, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                       minimum_deployment_target=_ct_target(deployment_target),
                       compute_precision=ct.precision.FLOAT16 if precision is Precision.FP16 else ct.precision.FLOAT32,
                       skip_model_load=True)
    model.short_description = f"obsdiff {spec.name}"
    for t in spec.inputs:
        model.input_description[t.name] = f"{t.name} {tuple(spec.resolve(dims, t)) or (1,)}"
    for t in spec.outputs:
        model.output_description[feature_name(t.name)] = f"{t.name} {tuple(spec.resolve(dims, t))}"
    return model


def sparse_passes(min_sparsity: float, compress: str | None) -> list:
    """coremltools' threshold pruner at ~0 (the OBS zeros become the sparse mask), then the optional compression."""
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.optimize.coreml import (
        OpLinearQuantizerConfig,
        OpPalettizerConfig,
        OpThresholdPrunerConfig,
        OptimizationConfig,
    )

    def registered(name: str, config, joint: bool):
        graph_pass = PASS_REGISTRY[f"compression::{name}"]
        graph_pass.set_options([PassOption("config", config), PassOption("joint_compression", joint)])
        return graph_pass

    passes = [registered("prune_weights", OptimizationConfig(global_config=OpThresholdPrunerConfig(
        threshold=ZERO_THRESHOLD, minimum_sparsity_percentile=min_sparsity, weight_threshold=64)), False)]
    if compress == "palettize-4bit":
        passes.append(registered("palettize_weights", OptimizationConfig(global_config=OpPalettizerConfig(
            mode="kmeans", nbits=4, weight_threshold=64)), True))
    elif compress == "int8":
        passes.append(registered("linear_quantize_weights", OptimizationConfig(global_config=OpLinearQuantizerConfig(
            mode="linear_symmetric", weight_threshold=64)), True))
    return passes


def apply_passes(model, passes: list):
    """All the compression passes on one MIL program, converted back once (each separate conversion re-runs the
    whole MIL pipeline: about 10 s on the default model's UNet, far more at SD size)."""
    from coremltools.models.utils import _apply_graph_pass

    if not passes:
        return model
    ct_log = logging.getLogger("coremltools")
    level = ct_log.level
    ct_log.setLevel(logging.ERROR)  # the quantizer warns "cannot quantize" for every const that is not ours
    try:
        return _apply_graph_pass(model, passes)
    finally:
        ct_log.setLevel(level)


def codes_pass(weights: dict[str, IntegerWeight], names: dict[str, str], joint: bool):
    """A pass that writes our integer codes and scales as Core ML's quantized constexpr ops (iOS 18
    ``constexpr_blockwise_shift_scale``, or its sparse form on top of the sparse mask when ``joint``), instead of a
    re-quantization by coremltools; and the set it fills with the layers it wrote.

    It is coremltools' own linear quantizer pass with only its one step that computes codes and scales from a weight
    replaced, by the codes of the layer the const belongs to, found through the name map (``names``: layer → its
    const in the converted program). Consts that are not ours (conv_in, norms) are left as they are.
    """
    from coremltools.optimize import _utils as optimize_utils
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as LinearQuantizePass

    quant = next(iter(weights.values())).quant
    layer_of = {names[layer]: layer for layer in weights if layer in names}
    written: set[str] = set()

    class OurCodes(LinearQuantizePass):
        def transform_op(self, op):
            self.layer = named_layer(op.name, layer_of)
            return super().transform_op(op)

        def blockwise_compress_by_dtype(self, original: np.ndarray, dtype, mode, block_sizes):
            if self.layer is None:
                return None  # not a quantized layer: the pass leaves the const as it is
            w = weights[self.layer]
            written.add(self.layer)
            return optimize_utils.QuantParams(data=w.codes.numpy(), scale=w.scale.numpy().astype(original.dtype),
                                              offset=None, nbits=np.uint8(quant.bits))

    granularity = {"granularity": "per_channel"} if quant.group_size is None else \
        {"granularity": "per_block", "block_size": quant.group_size}
    config = OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{quant.bits}",
                                     weight_threshold=min(w.codes.numel() for w in weights.values()) - 1, **granularity)
    graph_pass = OurCodes(OptimizationConfig(global_config=config))
    graph_pass.joint_compression = joint
    return graph_pass, written


def stored_codes(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Name → (int codes, scales) of every quantized constexpr in a saved package (sparse ones made dense)."""
    _, prog = load_program(path)
    out = {}
    for op in prog.functions["main"].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            out[op.outputs[0].name] = (np.asarray(op.data.val), np.asarray(op.scale.val, dtype=np.float32))
        elif op.op_type == "constexpr_sparse_blockwise_shift_scale":
            mask = np.asarray(op.data_mask.val).astype(bool)
            codes = np.zeros(mask.shape, dtype=np.int8)
            codes[mask] = np.asarray(op.nonzero_data.val)
            out[op.outputs[0].name] = (codes, np.asarray(op.scale.val, dtype=np.float32))
    return out


def _traced_name(layer: str) -> str:
    """The name tracing gives a wrapped layer's weight (conversion passes then add suffixes: ``…_to_fp16``)."""
    return f"{WRAPPED_ATTR}_{layer.replace('.', '_')}_weight"


def const_names(path: Path) -> set[str]:
    """The names of every op output in a saved package's program, read from its spec (no weights loaded)."""
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    return {out.name for fn in spec.mlProgram.functions.values() for block in fn.block_specializations.values()
            for op in block.operations for out in op.outputs}


def weight_names(path: Path, layers) -> dict[str, str]:
    """The name map, made once from the converted (not yet sparsified) package: layer → its weight's const.
    Later passes derive their ops' names from it (``…_sparsified``, ``…_quantized``); layers not in this package
    (a VAE's encoder layers in its decoder package) are absent."""
    present = const_names(path)
    names = {}
    for layer in layers:
        key = _traced_name(layer)
        candidates = [n for n in present if n == key or n.startswith(key + "_")]
        if candidates:
            names[layer] = min(candidates, key=len)
    return names


def named_layer(op_name: str, layer_of: dict[str, str]) -> str | None:
    """The layer whose const ``op_name`` is, or was made from (the longest recorded name it starts with)."""
    hits = [name for name in layer_of if op_name == name or op_name.startswith(name + "_")]
    return layer_of[max(hits, key=len)] if hits else None


def _stored(values: dict[str, np.ndarray], name: str):
    """The stored tensor made from the const recorded as ``name`` (the shortest name derived from it)."""
    hits = [k for k in values if k == name or k.startswith(name + "_")]
    return values[min(hits, key=len)] if hits else None


def check_codes(path: Path, weights: dict[str, IntegerWeight], names: dict[str, str]) -> dict:
    """Every quantized layer's codes in the package equal ours, and its scales ours within fp16 rounding."""
    stored = stored_codes(path)
    equal, wrong = 0, []
    for layer, w in weights.items():
        got = _stored(stored, names[layer]) if layer in names else None
        if (got is not None and np.array_equal(got[0].astype(np.int64), w.codes.numpy().astype(np.int64))
                and np.allclose(got[1], w.scale.numpy(), rtol=1e-3)):
            equal += 1
        else:
            wrong.append(layer)
    return {"layers": len(weights), "equal": equal, "different": wrong[:10]}


def package_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_blob_size(path: Path) -> int:
    """Bytes of the weight blob: the part of a package that scales with the model (the program text does not)."""
    return sum(p.stat().st_size for p in path.rglob("weights/*") if p.is_file())


def load_program(path: Path):
    """The MIL program of a saved mlpackage (works on Linux: no Core ML framework needed).

    Why not ``coremltools.optimize.coreml.get_weights_metadata``: it lists only plain ``const`` weights, and the
    pruned weights are stored as ``constexpr_sparse_to_dense`` (or palettized/quantized constexpr) ops, which it
    skips (coremltools 9.0, ``_post_training_quantization.get_weights_metadata``); so the program is loaded with
    the same milproto loader that function uses, and coremltools itself materializes the constexpr values.
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        return spec, milproto_to_pymil(spec, spec.specificationVersion, model.weights_dir)
    except Exception as exc:
        raise BundleError(f"{path}: cannot read the mlpackage ({str(exc).splitlines()[0][:200]})") from None


def stored_weights(path: Path) -> dict[str, np.ndarray]:
    """Every const weight of the program, sparse ones decompressed to dense (by coremltools itself)."""
    _, prog = load_program(path)
    out: dict[str, np.ndarray] = {}
    for op in prog.functions["main"].operations:
        name = op.outputs[0].name
        if op.op_type.startswith("constexpr_"):
            value = op.materialized_val_inference()
            if isinstance(value, tuple):  # an intermediate of joint compression (e.g. LUT → mask, data)
                continue
            out[name] = np.asarray(value, dtype=np.float32)
        elif op.op_type == "const" and op.outputs[0].val is not None and np.ndim(op.outputs[0].val) >= 2:
            out[name] = np.asarray(op.outputs[0].val, dtype=np.float32)
    return out


class StoredWeights:
    """A saved program's weights, each materialized (sparse ones decompressed by coremltools) only when asked for and
    not kept: reading a UNet back holds one layer in float32 at a time, not the whole model."""

    def __init__(self, path: Path) -> None:
        _, prog = load_program(path)
        self.ops = {op.outputs[0].name: op for op in prog.functions["main"].operations
                    if op.op_type.startswith("constexpr_") or op.op_type == "const"}

    def get(self, name: str) -> np.ndarray | None:
        """The stored tensor made from the const recorded as ``name`` (the shortest name derived from it that holds
        a weight; an intermediate of joint compression, e.g. LUT → mask, is skipped)."""
        for key in sorted((k for k in self.ops if k == name or k.startswith(name + "_")), key=len):
            op = self.ops[key]
            if op.op_type.startswith("constexpr_"):
                value = op.materialized_val_inference()
                if isinstance(value, tuple):
                    continue
                return np.asarray(value, dtype=np.float32)
            if op.outputs[0].val is not None and np.ndim(op.outputs[0].val) >= 2:
                return np.asarray(op.outputs[0].val, dtype=np.float32)
        return None


def check_weights(path: Path, weights: Mapping[str, torch.Tensor], names: dict[str, str],
                  exact_values: bool = True) -> SparsityReport:
    """(a) every pruned weight read back through the name map: zero positions identical, values within fp16
    rounding. With palettization or int8 on top, values are quantized by design: only the zero positions must
    match."""
    stored = StoredWeights(path)
    layers, bad, torch_zeros, export_zeros, matched, total = {}, [], 0, 0, 0, 0
    for name, w in weights.items():  # one layer at a time: ``weights`` may read each from disk
        found = stored.get(names[name]) if name in names else None
        ref = w.detach().float().numpy()
        torch_zeros += int((ref == 0).sum())
        total += ref.size
        if found is None or found.shape != ref.shape:
            layers[name] = {"torch": float((ref == 0).mean()), "export": None}
            bad.append(name)
            continue
        matched += 1
        export_zeros += int((found == 0).sum())
        zeros_equal = bool(np.array_equal(found == 0, ref == 0))
        close = bool(np.allclose(found, ref.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-6))
        layers[name] = {"torch": float((ref == 0).mean()), "export": float((found == 0).mean()),
                        "zeros_equal": zeros_equal, "values_close": close}
        if not zeros_equal or (exact_values and not close):
            bad.append(name)
    total = total or 1
    return SparsityReport(len(weights), matched, torch_zeros / total, export_zeros / total, not bad, tuple(bad), layers)


def check_io(path: Path, spec: ComponentSpec, dims: dict[str, int]) -> dict:
    """(c) input names, shapes and dtypes, and output names in order, match the component description (for the
    Apple layout: the Swift contract, e.g. float32 token ids and (B, C, 1, S) text states; the noise first)."""
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    mlspec, _ = load_program(path)
    names = {ArrayFeatureType.FLOAT32: "float32", ArrayFeatureType.FLOAT16: "float16", ArrayFeatureType.INT32: "int32"}
    got_in = {i.name: [list(i.type.multiArrayType.shape), names.get(i.type.multiArrayType.dataType, "other")]
              for i in mlspec.description.input}
    got_out = [o.name for o in mlspec.description.output]
    want_in = {t.name: [list(spec.resolve(dims, t)) or [1], "float32" if t.dtype.is_floating_point else "int32"]
               for t in spec.inputs}
    want_out = [feature_name(t.name) for t in spec.outputs]
    return {"inputs": got_in, "outputs": got_out, "passed": got_in == want_in and got_out == want_out}


class CoreMLBundleBuilder(BundleBuilder):
    """Core ML packages from the plan: layout, chunking, attention, deployment target and compression all decided
    there. Per package: convert, record the name map, store the pruned weights sparsely (and our integer codes),
    then check what was saved."""

    def __init__(self, plan: ExportPlan, prompts: list[str]) -> None:
        super().__init__(plan, prompts)
        self._specs: tuple[ComponentSpec, ...] | None = None

    def component_specs(self, pipe, dims: dict[str, int]) -> tuple[ComponentSpec, ...]:
        """The packages to convert, for the profile's component roles: Apple's contract (chunked or not), or our own
        descriptions. Made once per export (the chunk interface comes from running chunk 1)."""
        if self._specs is not None:
            return self._specs
        wanted = self.profile.coreml.components
        if self.plan.layout is Layout.OURS:
            specs = specs_for(pipe)
        else:
            check_family(pipe)
            chunk = self.plan.chunk_unet
            if chunk is None:  # "auto": as Apple does for iPhones, above 1 GB of UNet weights
                chunk = auto_chunk(pipe.unet, 2 if self.plan.precision is Precision.FP16 else 4)
            specs = apple_specs(pipe, dims, chunk)
        self._specs = tuple(s for s in specs if s.role in wanted)
        return self._specs

    @classmethod
    def revalidate(cls, bundle: Path, manifest: dict) -> dict:
        return revalidate_coreml(bundle, manifest)

    @classmethod
    def required_files(cls, bundle: Path, manifest: dict) -> list[str]:
        return coreml_required_files(manifest)

    def build(self, models: TorchPipelines, staging: Path) -> BuildResult:
        plan, pipe = self.plan, models.pipe
        dims = pipeline_dims(pipe, plan.shapes)
        specs = self.component_specs(pipe, dims)
        apple = plan.layout is Layout.APPLE
        resources = staging / RESOURCES
        resources.mkdir(parents=True)
        packages = staging / PACKAGES if apple else resources  # Apple: Resources/ gets the compiled models
        packages.mkdir(exist_ok=True)
        result = BuildResult(details={"deployment_target": plan.deployment_target, "compress": plan.compress,
                                      "layout": str(plan.layout), "attention_implementation": str(plan.attention)})
        with tempfile.TemporaryDirectory() as tmp:
            # Phase 1, PyTorch loaded: convert each component and keep what the checks need (its pruned weights on
            # disk). Phase 2, PyTorch let go: sparse storage and the checks, one layer in memory at a time.
            converted = [self._convert(models, spec, dims, packages, Path(tmp)) for spec in specs]
            _copy_tokenizer_files(pipe, staging, resources)
            if apple:
                self._device_files(pipe, specs, staging)
                result.details["contract_files"] = contract_files(specs)
            del pipe
            models.release()
            for c in converted:
                result.components[c.spec.name] = self._finish(c, dims, staging, result)
        result.notes.append(
            "Size gate on the weight blob: Core ML stores one mask bit per pruned weight (1/16 of its fp16 size), so "
            "the gate allows that on top of (1 − s) × dense + 5%, where s is the share of the dense weight blob that "
            "the pruned zeros free (layers kept dense count in full). The program text (model.mlmodel) is fixed-size "
            "and does not shrink with sparsity; package totals are shown beside it.")
        return result

    def _convert(self, models: TorchPipelines, spec: ComponentSpec, dims: dict[str, int], packages: Path,
                 tmp: Path) -> ConvertedPackage:
        """Phase 1: the component converted and saved dense, its name map, codes and pruned weights (saved to disk)."""
        plan, pipe = self.plan, models.pipe
        t0 = time.time()
        weights = pruned_weights(pipe, models.folder, spec.source)
        if spec.name.startswith("UnetChunk"):  # each chunk holds its own stages' weights
            split = chunk_split(pipe.unet)
            weights = {k: v for k, v in weights.items() if chunk_of(k, pipe.unet, split) == spec.name}
        apple = plan.layout is Layout.APPLE
        layout = layout_check(pipe, spec, dims, plan.attention) if apple else {}
        # Apple's split-einsum formulation is for the UNet's attention (MMDiT joint attention keeps its own)
        impl = plan.attention if spec.source == "unet" else AttentionImplementation.ORIGINAL
        with attention_implementation(getattr(pipe, spec.source), impl):
            model = convert_component(pipe, spec, dims, plan.deployment_target, plan.precision)
        dense_path = tmp / f"{spec.name}.mlpackage"
        model.save(str(dense_path))
        del model  # it keeps its MIL program, every constant included; the pruner reloads them from disk
        names = weight_names(dense_path, weights) if weights else {}
        weights = {k: v for k, v in weights.items() if k in names}  # a VAE's layers split between two packages
        reference = reference_io(pipe, spec, dims) if platform.system() == "Darwin" else None  # for prediction
        return ConvertedPackage(
            spec, dense_path, packages / f"{spec.name if apple else package_name(pipe, spec)}.mlpackage", names,
            SavedWeights.save(weights, tmp / f"{spec.name}.weights.safetensors"),
            self._integer_weights(pipe, spec, models.folder, weights), layout, reference, time.time() - t0)

    def _finish(self, c: ConvertedPackage, dims: dict[str, int], staging: Path, result: BuildResult) -> ComponentResult:
        """Phase 2: the pruned zeros stored sparse (with our codes), then every check on the saved package."""
        t0 = time.time()
        store_sparse(c, self.plan.compress)
        rel = str(c.final.relative_to(staging))
        comp = ComponentResult(rel, SparsityReport(0), {
            "package": rel, "convert_s": c.convert_s + time.time() - t0, "dense_bytes": package_size(c.dense_path),
            "bytes": package_size(c.final), "dense_weight_bytes": weight_blob_size(c.dense_path),
            "weight_bytes": weight_blob_size(c.final), "pruned_sparsity": c.weights.zero_fraction,
            "io": check_io(c.final, c.spec, dims)})
        self._check(comp, c.spec, c.final, c.layout, c.weights, c.names, c.codes, result)
        comp.details["prediction"] = predict_on_macos(c.final, c.reference, self.profile.coreml.compute_units)
        if comp.details["prediction"]["status"] == "ran":  # macOS: outputs vs PyTorch, the worst output counts
            result.gate(f"{c.spec.name} Core ML vs PyTorch PSNR dB",
                        min(comp.details["prediction"]["psnr_db"].values()), ">=", self.plan.min_psnr())
        return comp

    def _check(self, comp: ComponentResult, spec: ComponentSpec, final: Path, layout: dict,
               weights: SavedWeights, names: dict[str, str], codes: dict[str, IntegerWeight],
               result: BuildResult) -> None:
        """The gates on the saved package: IO, the Apple wrappers, our codes, the weights read back, the size."""
        details = comp.details
        result.gate(f"{spec.name} IO matches the description", float(details["io"]["passed"]), ">=", 1.0)
        if layout:
            details["layout_cosine"] = layout
            result.gate(f"{spec.name} Apple layout vs the original module cosine", min(layout.values()), ">=",
                        LAYOUT_MIN_COSINE)
        if codes:
            details["codes"] = {"bits": next(iter(codes.values())).quant.bits, **check_codes(final, codes, names)}
            result.gate(f"{spec.name} integer weights equal obsdiff's codes and scales",
                        details["codes"]["equal"] / details["codes"]["layers"], ">=", 1.0)
        if not weights:
            return
        comp.sparsity = check_weights(final, weights, names, exact_values=not self.plan.compress)
        details["weights"] = {"checked": comp.sparsity.pruned_layers, "failed": list(comp.sparsity.lost)}
        result.gate(f"{spec.name} pruned weights read back exactly", float(comp.sparsity.zeros_preserved), ">=", 1.0)
        if not self.plan.compress and not codes:
            details.update(size_limit(weights.zeros, weights.numel, details["dense_weight_bytes"], self.plan.precision))
            result.gate(f"{spec.name} weight bytes ≤ (1−s)·dense + 5% + mask", details["weight_bytes"], "<=",
                        details["size_limit_bytes"])

    @staticmethod
    def _integer_weights(pipe, spec: ComponentSpec, folder: PrunedFolder, weights: dict) -> dict[str, IntegerWeight]:
        """The codes and scales of this package's quantized layers (a UNet chunk: its own layers only)."""
        quantized = folder.quantization.get(spec.source)
        if quantized is None:
            return {}
        modules = dict(getattr(pipe, spec.source).named_modules())
        try:
            return {name: integer_weight(modules[name].weight, quantized.scales[name], quantized.quant)
                    for name in weights if name in quantized.scales}
        except (KeyError, ValueError) as exc:
            raise ExportError(f"{spec.source}: its quantization file does not fit its weights ({exc})") from None

    def _device_files(self, pipe, specs: tuple[ComponentSpec, ...], staging: Path) -> None:
        """``compile_models.sh`` (Packages/ → Resources/*.mlmodelc on a Mac) and ``README_DEVICE.md``; the scheduler
        config moves beside them, so that Resources/ holds exactly what the Swift pipeline reads."""
        (staging / RESOURCES / "scheduler_config.json").rename(staging / "scheduler_config.json")
        pipeline = "XL" if type(pipe).__name__ == "StableDiffusionXLPipeline" else ""
        script = staging / "compile_models.sh"
        script.write_text(COMPILE_SCRIPT.replace("{pipeline}", pipeline + "Pipeline"))
        script.chmod(0o755)
        (staging / "README_DEVICE.md").write_text(device_readme(
            pipe, specs, self.plan.attention, self.profile.coreml.compute_units))
        if platform.system() == "Darwin" and shutil.which("xcrun"):  # pragma: no cover - macOS with Xcode only
            log.info("compiling the packages into %s/ (xcrun coremlcompiler)", RESOURCES)
            proc = subprocess.run([str(script)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise BundleError(f"compile_models.sh failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")

    def report_sections(self, result: BuildResult) -> list[str]:
        """Sizes dense vs sparse, the weight read-back, IO, and prediction (macOS only)."""
        results = result.to_json()
        lines: list[str] = []
        if results.get("layout") == str(Layout.APPLE):
            lines += ["", f"Layout: Apple's Swift StableDiffusion contract; attention "
                      f"`{results['attention_implementation']}`. `./compile_models.sh` on a Mac fills `Resources/` "
                      f"with: {', '.join(results['contract_files'])} (see README_DEVICE.md)."]
        lines += ["", f"## Core ML packages (deployment target {results['deployment_target']}, "
                  f"compression {results['compress'] or 'sparse only'})", "",
                  "| component | package | package KB dense → sparse | weights KB dense → sparse (limit) | sparsity "
                  "(pruned layers / whole blob) | weights read back | IO | prediction |", "|---|---|---|---|---|---|---|---|"]
        for name, comp in results["components"].items():
            w, codes = comp.get("weights"), comp.get("codes")
            wtxt = f"{w['checked'] - len(w['failed'])}/{w['checked']} exact" if w else "dense"
            if codes:
                wtxt += f"; int{codes['bits']} codes {codes['equal']}/{codes['layers']} ours"
            limit = f"{comp['size_limit_bytes'] / 1024:.0f}" if "size_limit_bytes" in comp else "-"
            pred = comp["prediction"]
            lines.append(f"| {name} | `{comp['package']}` | {comp['dense_bytes'] / 1024:.0f} → {comp['bytes'] / 1024:.0f} | "
                         f"{comp['dense_weight_bytes'] / 1024:.0f} → {comp['weight_bytes'] / 1024:.0f} ({limit}) | "
                         f"{comp['pruned_sparsity']:.3f} / {comp.get('component_sparsity', 0.0):.3f} | {wtxt} | "
                         f"{'match' if comp['io']['passed'] else 'MISMATCH'} | "
                         f"{pred['status']}{': ' + pred['reason'] if pred.get('reason') else ''} |")
        return lines

def store_sparse(c: ConvertedPackage, compress: str | None) -> None:
    """The pruned zeros as Core ML's sparse storage, our codes on top; a package with none is copied."""
    import coremltools as ct

    if not c.weights:
        shutil.copytree(c.dense_path, c.final)
        return
    dense = ct.models.MLModel(str(c.dense_path), skip_model_load=True)
    passes = sparse_passes(min_sparsity=min(0.3, 0.9 * c.weights.zero_fraction), compress=compress)
    written: set[str] = set()
    if c.codes:
        graph_pass, written = codes_pass(c.codes, c.names, joint=True)
        passes.append(graph_pass)
    packed = apply_passes(dense, passes)
    del dense
    if len(written) != len(c.codes):
        raise ExportError(f"{c.final.stem}: {len(c.codes) - len(written)} of {len(c.codes)} quantized layers were "
                          "not found in the converted program")
    packed.save(str(c.final))


def predict_on_macos(path: Path, reference: tuple[dict, dict] | None, compute_units: str) -> dict:
    """Core ML's prediction against PyTorch's outputs on the sample inputs (``reference``, taken while PyTorch was
    loaded; macOS only, elsewhere skipped with the reason)."""
    if platform.system() != "Darwin" or reference is None:
        return {"status": "skipped", "reason": "Core ML prediction needs macOS; conversion and weight checks ran here"}
    import coremltools as ct  # pragma: no cover - macOS only

    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units])
    inputs, ref = reference
    feeds = {k: (v.reshape(1) if v.ndim == 0 else v).astype(np.int32 if v.dtype.kind == "i" else np.float32)
             for k, v in inputs.items()}
    got = model.predict(feeds)
    scores = {k: psnr(ref[k], np.asarray(got[feature_name(k)]))  # peak: the reference range
              for k in ref}
    return {"status": "ran", "psnr_db": scores, "latency": timings_ms(lambda: model.predict(feeds))}


def size_limit(zeros: int, numel: int, dense_weight_bytes: int, precision: Precision) -> dict:
    """(b) on the weight blob: (1 − s)·dense + 5% + one mask bit per sparse-stored weight (``numel`` pruned weights,
    ``zeros`` of them zero).

    s is the share of the dense blob that the OBS zeros free, so layers kept dense (embeddings, AdaLN
    modulation, first and last layers) count at full size, as they are stored.
    """
    element = 2 if precision is Precision.FP16 else 4
    share = min(1.0, zeros * element / dense_weight_bytes)
    mask_bytes = numel / 8
    return {"component_sparsity": share,
            "size_limit_bytes": ((1 - share) + SIZE_SLACK) * dense_weight_bytes + mask_bytes}


def _is_t5(module) -> bool:
    return getattr(getattr(module, "config", None), "model_type", None) == "t5"


def package_name(pipe, spec: ComponentSpec) -> str:
    """Apple's resource name; a T5 encoder is ``TextEncoderT5`` whichever slot it fills (SD3's third, Flux's second)."""
    module = getattr(pipe, spec.source)
    if spec.role == TEXT_ENCODER and _is_t5(module):
        return T5_PACKAGE
    if spec.role == DENOISER and type(module).__name__ == "FluxTransformer2DModel":
        return FLUX_PACKAGE
    return PACKAGE_NAMES[spec.name]


def _copy_tokenizer_files(pipe, staging: Path, resources: Path) -> None:
    """CLIP's BPE files (shared by SDXL's and SD3's two CLIP encoders), T5's tokenizer files, the scheduler config."""
    wanted = [(pipe.tokenizer, ("vocab.json", "merges.txt"))]
    for suffix in ("_2", "_3"):
        if _is_t5(getattr(pipe, "text_encoder" + suffix, None)):
            wanted.append((getattr(pipe, "tokenizer" + suffix), ("tokenizer.json", "tokenizer_config.json")))
    scratch = staging / "_files"
    for tokenizer, names in wanted:
        tokenizer.save_pretrained(scratch)
        for name in names:
            if not (scratch / name).is_file():
                raise BundleError(f"{type(tokenizer).__name__} wrote no {name}, which the app bundle needs")
            shutil.move(str(scratch / name), resources / name)
        shutil.rmtree(scratch)
    pipe.scheduler.save_config(scratch)
    shutil.move(str(scratch / "scheduler_config.json"), resources / "scheduler_config.json")
    shutil.rmtree(scratch)


class SavedWeights(Mapping):
    """A package's pruned PyTorch weights, saved before PyTorch is let go and read back one layer at a time (a
    mapping, as the checks take it); their zero and element counts are kept."""

    def __init__(self, path: Path | None, keys: list[str], zeros: int, numel: int) -> None:
        self.path, self._keys, self.zeros, self.numel = path, keys, zeros, numel

    @classmethod
    def save(cls, weights: dict[str, torch.Tensor], path: Path) -> SavedWeights:
        from safetensors.torch import save_file

        if not weights:
            return cls(None, [], 0, 0)
        save_file({k: w.detach().contiguous() for k, w in weights.items()}, str(path))
        return cls(path, list(weights), sum(int((w == 0).sum()) for w in weights.values()),
                   sum(w.numel() for w in weights.values()))

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as fh:
            return fh.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class ConvertedPackage:
    """One component after phase 1 (PyTorch loaded): what phase 2 (sparse storage, checks) needs without it."""

    spec: ComponentSpec
    dense_path: Path
    final: Path
    names: dict[str, str]  # layer → const name in the program
    weights: SavedWeights
    codes: dict[str, IntegerWeight]
    layout: dict  # Apple layout: wrapper vs module cosines
    reference: tuple[dict, dict] | None  # macOS: PyTorch's inputs and outputs for the prediction check
    convert_s: float


# What each role's packages are called, in either layout (a component's name is its package's, or our description's).
ROLE_NAMES = {TEXT_ENCODER: ("TextEncoder", "text_encoder"),
              DENOISER: ("Unet", "UnetChunk", "MultiModalDiffusionTransformer", "FluxTransformer", "unet", "transformer"),
              VAE_DECODER: ("VAEDecoder", "vae_decoder"), VAE_ENCODER: ("VAEEncoder", "vae_encoder")}
PACKAGE_FILES = ("Manifest.json", "Data/com.apple.CoreML/model.mlmodel")


def coreml_required_files(manifest: dict) -> list[str]:
    """The tokenizer files, the Apple layout's scripts, a package for every role the target converts (a shipped
    target's profile says which; any other needs at least the denoiser), and each package's spec."""
    from obsdiff.exporters.profiles import available_targets, load_profile

    apple = (manifest.get("validation") or {}).get("layout") == str(Layout.APPLE)
    files = [f"{RESOURCES}/vocab.json", f"{RESOURCES}/merges.txt", "report.md", "validation.json"]
    files += ["compile_models.sh", "README_DEVICE.md", "scheduler_config.json"] if apple else \
        [f"{RESOURCES}/scheduler_config.json"]
    target = manifest["target"]
    shipped = manifest.get("shipped_profile") is True and target in available_targets()
    roles = load_profile(target).coreml.components if shipped else [DENOISER]
    for role in roles:
        if not any(name.startswith(ROLE_NAMES[role]) for name in manifest["components"]):
            raise BundleError(f"target {target} converts its {role}, and the manifest describes no package for it")
    return files + [f"{c['file'].rstrip('/')}/{f}" for c in manifest["components"].values() for f in PACKAGE_FILES]


def revalidate_coreml(bundle: Path, manifest: dict) -> dict:
    """On disk: every mlpackage parses and its IO matches the manifest's descriptions."""
    results = {}
    for name, comp in manifest["components"].items():
        mlspec, _ = load_program(bundle / comp["file"])
        got = {i.name: list(i.type.multiArrayType.shape) for i in mlspec.description.input}
        want = {i["name"]: i["shape"] or [1] for i in comp["inputs"]}
        if got != want:
            raise BundleError(f"{bundle}: {name} inputs {got} do not match the manifest {want}")
        results[name] = {"inputs": got}
    return results

"""Bundles: one folder per target, written to a staging dir and renamed only when every gate passes.

Layout (ONNX formats): optimum's diffusers layout (``text_encoder/model.onnx`` …, tokenizer,
scheduler, ``model_index.json``) plus ``manifest.json`` (target, tool version, files with sha256,
IO descriptions, sparsity per component, a copy of ``pruning.json``, validation results),
``reference/<component>.safetensors`` (sample inputs and PyTorch outputs), ``validation.json``,
``report.md`` and ``images.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from exporters.components import ComponentSpec, pipeline_dims, specs_for
from exporters.profiles import Precision, TargetProfile, load_profile
from exporters.validate import (
    compare_outputs,
    digit_prompts,
    gate,
    initial_latents,
    psnr,
    reference_io,
    run_pipeline_images,
    save_image_grid,
    timings_ms,
)
from obsdiff import __version__
from obsdiff.errors import BundleError, GateError, UsageError
from obsdiff.model_io import load_pipeline, read_pruning_record

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REFERENCE_DIR = "reference"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists (pass --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} is not a folder")
    if not parent.is_dir():
        raise UsageError(f"{parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{parent} is not writable")


def ort_session(path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=list(providers))
    except Exception as exc:
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None


def run_session(session, inputs: dict[str, np.ndarray], spec: ComponentSpec) -> dict[str, np.ndarray]:
    feeds = {t.name: inputs[t.name].astype(np.int64 if t.dtype == torch.int64 else np.float32) for t in spec.inputs}
    outs = session.run([t.name for t in spec.outputs], feeds)
    return {t.name: o.astype(np.float32) for t, o in zip(spec.outputs, outs)}


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


def load_reference(folder: Path, name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = folder / f"{name}.safetensors"
    with safe_open(str(path), framework="np") as fh:
        shapes = json.loads((fh.metadata() or {}).get("shapes", "{}"))
    data = {k: v.reshape(shapes[k]) if k in shapes else v for k, v in load_file(path).items()}
    return ({k[6:]: v for k, v in data.items() if k.startswith("input.")},
            {k[7:]: v for k, v in data.items() if k.startswith("output.")})


def component_model_file(bundle: Path, spec: ComponentSpec, profile: TargetProfile) -> Path:
    """The file the device runs: ``model.ort`` for ORT-format targets, else ``model.onnx``."""
    folder = bundle / spec.name
    return folder / "model.ort" if profile.ort_format else folder / "model.onnx"


def pruned_weights(pipe, record: dict | None, source: str) -> dict[str, torch.Tensor]:
    if not record:
        return {}
    module = getattr(pipe, source)
    # Structured records describe removed heads/neurons, not zeros: nothing sparse to carry through export.
    names = [layer["name"].split(".", 1)[1] for layer in record.get("layers", [])
             if "name" in layer and layer["name"].startswith(source + ".")]
    modules = dict(module.named_modules())
    return {n: modules[n].weight for n in names if n in modules}


def sparsity_report(pipe, record: dict | None, spec: ComponentSpec, onnx_path: Path, precision: Precision) -> dict:
    """Per pruned layer: zero fraction in PyTorch and in the exported graph; zeros must survive."""
    from exporters.onnx import match_weights, onnx_initializers

    weights = pruned_weights(pipe, record, spec.source)
    if not weights:
        return {"pruned_layers": 0}
    inits = onnx_initializers(onnx_path)
    matched = match_weights(inits, weights)
    layers, lost = {}, []
    for name, w in weights.items():
        torch_zero = int((w == 0).sum()) / w.numel()  # exact counts: float32 means differ in the last bit
        onnx_name = matched[name]
        onnx_zero = int((inits[onnx_name] == 0).sum()) / w.numel() if onnx_name else None
        layers[name] = {"torch": torch_zero, "onnx": onnx_zero}
        exact = onnx_zero is not None and (onnx_zero == torch_zero if precision is Precision.FP32 else onnx_zero >= torch_zero)
        if not exact:
            lost.append(name)
    total = sum(w.numel() for w in weights.values())
    return {
        "pruned_layers": len(weights), "matched_in_onnx": sum(v is not None for v in matched.values()),
        "zero_fraction_torch": sum(float((w == 0).sum()) for w in weights.values()) / total,
        "zero_fraction_onnx": sum(layers[n]["onnx"] * weights[n].numel() for n in weights if layers[n]["onnx"] is not None) / total,
        "zeros_preserved": not lost, "lost": lost, "layers": layers,
    }


class OnnxBundleBuilder:
    """Export + validation for the ONNX-based formats (cpu, android; the ONNX half of tensorrt)."""

    def __init__(self, profile: TargetProfile, precision: Precision) -> None:
        self.profile, self.precision = profile, precision

    def build(self, pipe, staging: Path, dense_pipe=None, record: dict | None = None) -> dict:
        from exporters.onnx import export_onnx

        profile = self.profile
        specs = specs_for(pipe)
        dims = pipeline_dims(pipe, profile.shapes)
        t0 = time.time()
        export_onnx(pipe, staging, specs, dims, exporter=profile.exporter, precision=self.precision)
        export_s = time.time() - t0
        if profile.ort_format:
            convert_to_ort(staging)
        results: dict = {"export_s": export_s, "components": {}, "gates": []}
        for spec in specs:
            inputs, ref_out = reference_io(pipe, spec, dims)
            session = ort_session(component_model_file(staging, spec, profile), profile.providers)
            got = run_session(session, inputs, spec)
            save_reference(staging / REFERENCE_DIR, spec.name, inputs, ref_out, got)
            comp = {"outputs": compare_outputs(ref_out, got),
                    "latency": timings_ms(lambda s=session, i=inputs, c=spec: run_session(s, i, c)),
                    "sparsity": sparsity_report(pipe, record, spec, staging / spec.name / "model.onnx", self.precision)}
            results["components"][spec.name] = comp
            worst = min(o["cosine"] for o in comp["outputs"].values())
            results["gates"].append(gate(f"{spec.name} cosine", worst, ">=", profile.gates.min_cosine))
            if comp["sparsity"].get("pruned_layers"):
                results["gates"].append(gate(f"{spec.name} pruned zeros survive export",
                                              float(comp["sparsity"]["zeros_preserved"]), ">=", 1.0))
            budget = profile.gates.max_latency_ms.get(spec.name)
            if budget:
                results["gates"].append(gate(f"{spec.name} median latency ms", comp["latency"]["median_ms"], "<=", budget))
        results["end_to_end"] = self._end_to_end(pipe, dense_pipe, staging)
        results["gates"].append(gate("image PSNR dB", results["end_to_end"]["psnr_db"], ">=",
                                      profile.gates.min_psnr(self.precision)))
        budget = profile.gates.max_latency_ms.get("pipeline")
        if budget:
            results["gates"].append(gate("pipeline median latency ms", results["end_to_end"]["latency_onnx"]["median_ms"],
                                          "<=", budget))
        return results

    def _end_to_end(self, pipe, dense_pipe, staging: Path) -> dict:
        from optimum.onnxruntime import ORTDiffusionPipeline  # picks the ORT pipeline named in model_index.json

        shapes = self.profile.shapes
        ort_pipe = ORTDiffusionPipeline.from_pretrained(staging, provider=self.profile.providers[0])
        ort_pipe.set_progress_bar_config(disable=True)
        prompts = digit_prompts(10)
        latents = initial_latents(pipe, len(prompts), shapes.height, shapes.width, seed=0)
        run = lambda p: run_pipeline_images(p, prompts, latents, shapes.steps, shapes.guidance,  # noqa: E731
                                            shapes.height, shapes.width)
        torch_images, onnx_images = run(pipe), run(ort_pipe)
        rows = {"pruned PyTorch": torch_images, "exported": onnx_images}
        if dense_pipe is not None:
            rows = {"dense PyTorch": run(dense_pipe), **rows}
        save_image_grid(rows, staging / "images.png")
        one = lambda p: run_pipeline_images(p, prompts[:1], latents[:1], shapes.steps, shapes.guidance,  # noqa: E731
                                            shapes.height, shapes.width)
        return {
            "prompts": prompts, "steps": shapes.steps, "guidance": shapes.guidance, "seed": 0,
            "scheduler": type(pipe.scheduler).__name__,
            "psnr_db": psnr(torch_images, onnx_images),
            "psnr_dense_vs_pruned_db": psnr(rows["dense PyTorch"], torch_images) if dense_pipe is not None else None,
            "latency_onnx": timings_ms(lambda: one(ort_pipe), warmup=1, runs=5),
            "latency_pytorch": timings_ms(lambda: one(pipe), warmup=1, runs=5),
        }

    def report_sections(self, results: dict) -> list[str]:
        """Components vs PyTorch and the end-to-end comparison."""
        lines = ["", "## Components vs PyTorch (sample inputs)", "",
                 "| component | output | cosine | rel. L2 | max abs | median ms | p90 ms | pruned zeros (torch → export) |",
                 "|---|---|---|---|---|---|---|---|"]
        for name, comp in results["components"].items():
            sp = comp["sparsity"]
            zeros = (f"{sp['zero_fraction_torch']:.4f} → {sp['zero_fraction_onnx']:.4f}" if sp.get("pruned_layers") else "dense")
            for out, c in comp["outputs"].items():
                lat = comp["latency"]
                lines.append(f"| {name} | {out} | {c['cosine']:.7f} | {c['relative_l2']:.2e} | {c['max_abs']:.2e} | "
                             f"{lat['median_ms']:.2f} | {lat['p90_ms']:.2f} | {zeros} |")
        e2e = results["end_to_end"]
        lines += ["", "## End to end", "",
                  f"{len(e2e['prompts'])} prompts, {e2e['steps']} steps, guidance {e2e['guidance']}, seed {e2e['seed']}, "
                  f"{e2e['scheduler']}; same initial latents for every row.", "",
                  f"- exported vs pruned PyTorch: **{e2e['psnr_db']:.2f} dB** PSNR"]
        if e2e.get("psnr_dense_vs_pruned_db") is not None:
            lines.append(f"- pruned vs dense PyTorch: {e2e['psnr_dense_vs_pruned_db']:.2f} dB PSNR (what pruning changed)")
        lines += ["", "| pipeline (1 prompt) | median ms | p90 ms |", "|---|---|---|",
                  f"| exported | {e2e['latency_onnx']['median_ms']:.1f} | {e2e['latency_onnx']['p90_ms']:.1f} |",
                  f"| PyTorch | {e2e['latency_pytorch']['median_ms']:.1f} | {e2e['latency_pytorch']['p90_ms']:.1f} |",
                  "", "![dense PyTorch, pruned PyTorch, exported](images.png)"]
        return lines


def convert_to_ort(folder: Path) -> None:
    """ONNX Runtime's own converter: ``model.ort`` beside each ``model.onnx`` and the operator config."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(folder),
           "--optimization_style", "Fixed"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError(f"ORT format conversion failed: {proc.stderr.strip().splitlines()[-1:]}")
    configs = list(folder.glob("*.config"))
    if not configs:
        raise BundleError("ORT format conversion wrote no required-operators config")
    configs[0].rename(folder / "required_operators.config")


def write_manifest(staging: Path, profile: TargetProfile, precision: Precision, model_dir: Path, specs,
                   dims: dict[str, int], record: dict | None, results: dict) -> dict:
    files = {str(p.relative_to(staging)): sha256(p) for p in sorted(staging.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = {
        "target": profile.name, "format": profile.format.value, "precision": precision.value,
        "tool": "obsdiff", "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": str(model_dir), "shapes": asdict(profile.shapes),
        "components": {s.name: {
            "file": results["components"][s.name].get("package")
            or str(component_model_file(staging, s, profile).relative_to(staging)),
            "inputs": [{"name": t.name, "dtype": str(t.dtype).replace("torch.", ""), "dims": list(t.dims),
                        "shape": list(s.resolve(dims, t))} for t in s.inputs],
            "outputs": [{"name": t.name, "dtype": str(t.dtype).replace("torch.", ""), "dims": list(t.dims),
                         "shape": list(s.resolve(dims, t))} for t in s.outputs],
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in s.dynamic_axes().items()},
            "sparsity": {k: v for k, v in results["components"][s.name].get("sparsity", {}).items() if k != "layers"},
        } for s in specs if s.name in results["components"]},
        "session_options": profile.session_options, "gates": asdict(profile.gates),
        "files": files, "pruning": record, "validation": results,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def write_report(staging: Path, profile: TargetProfile, results: dict, sections: list[str]) -> None:
    """report.md: the gates, then the builder's own sections, then notes; validation.json beside it."""
    lines = [f"# obsdiff bundle: target `{profile.name}`", "", profile.description, "", "## Gates", "",
             "| gate | value | limit | result |", "|---|---|---|---|"]
    for g in results["gates"]:
        lines.append(f"| {g['name']} | {g['value']:.6g} | {g['op']} {g['limit']:g} | {'pass' if g['passed'] else 'FAIL'} |")
    lines += sections
    for note in results.get("notes", []):
        lines += ["", f"> {note}"]
    (staging / "report.md").write_text("\n".join(lines) + "\n")
    (staging / "validation.json").write_text(json.dumps(results, indent=2))


def export_bundle(model_dir: Path, target: str, out: Path, *, precision: str | None = None, overwrite: bool = False,
                  zip_bundle: bool = False, force: bool = False, dense_model: Path | None = None,
                  compress: str | None = None, deployment_target: str | None = None) -> dict:
    profile = load_profile(target)
    prec = Precision(precision) if precision else profile.precision
    out = Path(out)
    _check_out_dir(out, overwrite)
    pipe = load_pipeline(model_dir)
    dense_pipe = load_pipeline(dense_model) if dense_model else None
    record = read_pruning_record(Path(model_dir))
    from exporters.registry import make_builder

    builder = make_builder(profile, prec, compress, deployment_target)
    if hasattr(builder, "preflight"):
        builder.preflight(record, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        results = builder.build(pipe, staging, dense_pipe=dense_pipe, record=record)
        specs = specs_for(pipe)
        dims = pipeline_dims(pipe, profile.shapes)
        if record:
            (staging / "pruning.json").write_text(json.dumps(record, indent=2))
        write_report(staging, profile, results, builder.report_sections(results))
        manifest = write_manifest(staging, profile, prec, Path(model_dir), specs, dims, record, results)
        failed = [g for g in results["gates"] if not g["passed"]]
        if failed:
            desc = "; ".join(f"{g['name']} = {g['value']:.6g} (needs {g['op']} {g['limit']:g})" for g in failed)
            raise GateError(f"target {profile.name}: gate failed, bundle not published: {desc}")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if zip_bundle:
        archive = shutil.make_archive(str(out), "zip", root_dir=out)
        log.info("wrote %s", archive)
    for g in results["gates"]:
        log.info("gate %-40s %12.6g %s %g  %s", g["name"], g["value"], g["op"], g["limit"], "pass" if g["passed"] else "FAIL")
    log.info("bundle %s published (report: %s)", out, out / "report.md")
    return manifest


def validate_bundle_on_disk(bundle: Path) -> dict:
    """Files match the manifest's sha256, every model loads, and reference outputs are reproduced."""
    bundle = Path(bundle)
    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST} (not an obsdiff bundle)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: invalid JSON ({exc.msg})") from None
    for rel, digest in manifest["files"].items():
        path = bundle / rel
        if not path.is_file():
            raise BundleError(f"{bundle}: missing file {rel}")
        if sha256(path) != digest:
            raise BundleError(f"{bundle}: sha256 of {rel} does not match the manifest")
    from exporters import registry

    return registry.revalidate(bundle, manifest)

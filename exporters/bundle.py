"""Bundles: one folder per target, written to a staging dir and renamed only when every gate passes.

Layout (ONNX formats): optimum's diffusers layout (``text_encoder/model.onnx`` …, tokenizer,
scheduler, ``model_index.json``) plus ``manifest.json`` (target, tool version, files with sha256,
IO descriptions, sparsity per component, a copy of ``pruning.json``, validation results),
``reference/<component>.safetensors`` (sample inputs and PyTorch outputs), ``validation.json``,
``report.md`` and ``images.png``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from obsdiff.api import (
    __version__,
    check_image_size,
    check_model_folder,
    load_pipeline,
    read_pruning_record,
    read_quantization,
)
from obsdiff.atomic import check_disjoint, discard_staging, fault_point, replace_dir, staging_path
from obsdiff.errors import BundleError, GateError, UsageError
from obsdiff.exporters.apple import AppleOptions
from obsdiff.exporters.artifacts import record_sparsity, sha256
from obsdiff.exporters.builder import TorchPipelines
from obsdiff.exporters.components import SizeRule, pipeline_dims
from obsdiff.exporters.profiles import Activations, Precision, Shapes, TargetProfile, load_profile
from obsdiff.exporters.registry import builder_class, make_builder
from obsdiff.resources import model_prompts

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


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


def bundle_files(bundle: Path) -> list[str]:
    """Every entry under the bundle except the manifest, as relative paths (links included, to be refused)."""
    return sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p != bundle / MANIFEST)


def write_manifest(staging: Path, profile: TargetProfile, precision: Precision, model_dir: Path, specs,
                   dims: dict[str, int], record: dict | None, results: dict) -> dict:
    files = {rel: sha256(staging / rel) for rel in bundle_files(staging)}
    manifest = {
        "target": profile.name, "format": profile.format.value, "precision": precision.value,
        "tool": "obsdiff", "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": str(model_dir), "shapes": asdict(profile.shapes),
        "components": {s.name: {
            "file": results["components"][s.name]["file"],
            "inputs": [{"name": t.name, "dtype": str(t.dtype).replace("torch.", ""), "dims": list(t.dims),
                        "shape": list(s.resolve(dims, t))} for t in s.inputs],
            "outputs": [{"name": t.name, "dtype": str(t.dtype).replace("torch.", ""), "dims": list(t.dims),
                         "shape": list(s.resolve(dims, t))} for t in s.outputs],
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in s.dynamic_axes().items()},
            "sparsity": {k: v for k, v in results["components"][s.name].get("sparsity", {}).items() if k != "layers"},
        } for s in specs if s.name in results["components"]},
        "session_options": profile.session_options, "gates": asdict(profile.gates),
        # pruning.json beside it holds the per-layer records; the manifest keeps the settings and per-component summary
        "files": files, "pruning": {k: v for k, v in record.items() if k != "layers"} if record else None,
        "validation": results,
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


@dataclass(frozen=True)
class ShapeOverrides:
    """``--height/--width/--batch/--gate-prompts/--gate-steps`` over the profile's ``[shapes]``; None keeps it."""

    height: int | None = None
    width: int | None = None
    batch: int | None = None
    gate_prompts: int | None = None
    gate_steps: int | None = None

    def apply(self, shapes: Shapes) -> Shapes:
        """The profile's shapes with these options over them, each option checked under its own name."""
        for option, value in (("--batch", self.batch), ("--gate-prompts", self.gate_prompts),
                              ("--gate-steps", self.gate_steps)):
            if value is not None and value < 1:
                raise UsageError(f"{option} must be a whole number ≥ 1, got {value}")
        check_image_size("--height", self.height)
        check_image_size("--width", self.width)
        changes = {k: v for k, v in (("height", self.height), ("width", self.width), ("batch", self.batch),
                                     ("gate_prompts", self.gate_prompts), ("steps", self.gate_steps)) if v is not None}
        return replace(shapes, **changes)


NO_OVERRIDES = ShapeOverrides()


def export_bundle(model_dir: Path, target: str, out: Path, *, precision: str | None = None, overwrite: bool = False,
                  zip_bundle: bool = False, force: bool = False, dense_model: Path | None = None,
                  compress: str | None = None, deployment_target: str | None = None,
                  source_name: str | None = None, shapes: ShapeOverrides = NO_OVERRIDES,
                  apple: AppleOptions | None = None, activations: Activations | None = None) -> dict:
    """Export, validate, publish: the bundle appears at ``out`` whole, and only when every gate passed.

    Shapes default to the model's native size (``SizeRule``) and are checked against it before anything is
    loaded. ``source_name`` is what the manifest calls the model (``ship`` exports from a staging folder).
    """
    model_dir, out = Path(model_dir), Path(out)
    profile = load_profile(target)
    prec = Precision(precision) if precision else profile.precision
    _check_out_dir(out, overwrite)
    model_index = check_model_folder(model_dir)
    check_disjoint(out, {"model": model_dir, "dense model": dense_model})
    profile = replace(profile, shapes=SizeRule.from_folder(model_dir).resolve(shapes.apply(profile.shapes)))
    record = read_pruning_record(model_dir)
    spec = record_sparsity(record, model_dir)
    if spec is not None:
        profile.check_pattern(spec, force)
    prompts = model_prompts(model_dir, profile.shapes.gate_prompts)
    builder = make_builder(profile, prec, prompts, compress, deployment_target, apple, activations)
    quantization = read_quantization(model_dir)
    builder.check_quantization(quantization)
    # No local name holds the pipelines: the builder lets them go before it loads the exported runtime.
    models = TorchPipelines(load_pipeline(model_dir, model_index), load_pipeline(dense_model) if dense_model else None,
                            quantization)
    dims = pipeline_dims(models.pipe, profile.shapes)
    specs = builder.component_specs(models.pipe, dims)
    staging = staging_path(out)
    staging.mkdir()
    zip_staging = out.with_name(f".{out.name}.zip.obsdiff-staging")
    try:
        results = builder.build(models, staging, record=record)
        models.release()
        fault_point("export-after-build")
        if record:
            (staging / "pruning.json").write_text(json.dumps(record, indent=2))
        write_report(staging, profile, results, builder.report_sections(results))
        manifest = write_manifest(staging, profile, prec, Path(source_name or model_dir), specs, dims, record, results)
        failed = [g for g in results["gates"] if not g["passed"]]
        if failed:
            desc = "; ".join(f"{g['name']} = {g['value']:.6g} (needs {g['op']} {g['limit']:g})" for g in failed)
            raise GateError(f"target {profile.name}: gate failed, bundle not published: {desc}")
        if zip_bundle:
            shutil.make_archive(str(zip_staging), "zip", root_dir=staging)
        fault_point("export-before-publish")
        replace_dir(staging, out)
        if zip_bundle:
            Path(f"{zip_staging}.zip").replace(out.with_name(out.name + ".zip"))
            log.info("wrote %s.zip", out)
    except BaseException:
        discard_staging(out)
        Path(f"{zip_staging}.zip").unlink(missing_ok=True)
        raise
    for g in results["gates"]:
        log.info("gate %-40s %12.6g %s %g  %s", g["name"], g["value"], g["op"], g["limit"], "pass" if g["passed"] else "FAIL")
    log.info("bundle %s published (report: %s)", out, out / "report.md")
    return manifest


def _inside(bundle: Path, rel: str) -> bool:
    path = (bundle / rel).resolve()
    return not Path(rel).is_absolute() and bundle.resolve() in path.parents


def validate_bundle_on_disk(bundle: Path) -> dict:
    """Every file on disk is listed with a matching sha256 (nothing missing, extra, linked or outside the bundle),
    then every model loads and reproduces its reference outputs."""
    bundle = Path(bundle)
    manifest_path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such folder")
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise BundleError(f"{bundle}: no {MANIFEST} (not an obsdiff bundle)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: invalid JSON ({getattr(exc, 'msg', exc)})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{manifest_path}: no 'files' table listing the bundle's files and their sha256")
    for key in ("format", "components", "gates"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: missing '{key}'")
    for rel in files:
        if not isinstance(rel, str) or not _inside(bundle, rel):
            raise BundleError(f"{manifest_path}: entry {rel!r} points outside the bundle")
    on_disk = bundle_files(bundle)
    for rel in on_disk:
        if (bundle / rel).is_symlink():
            raise BundleError(f"{bundle}: {rel} is a symbolic link (a bundle holds only regular files)")
        if rel not in files:
            raise BundleError(f"{bundle}: {rel} is not listed in the manifest")
    for rel, digest in files.items():
        if rel not in on_disk:
            raise BundleError(f"{bundle}: missing file {rel}")
        if sha256(bundle / rel) != digest:
            raise BundleError(f"{bundle}: sha256 of {rel} does not match the manifest")
    try:
        results = builder_class(manifest["format"]).revalidate(bundle, manifest)
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{manifest_path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    log.info("%s: %d files match the manifest; all components pass", bundle, len(files))
    print(json.dumps({"bundle": str(bundle), "target": manifest.get("target"), "ok": True}, indent=None))
    return results

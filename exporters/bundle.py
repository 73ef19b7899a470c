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
from dataclasses import asdict
from pathlib import Path

from obsdiff.api import PrunedFolder, PruningRecord, __version__, copy_record, load_pipeline
from obsdiff.atomic import check_disjoint, discard_staging, fault_point, replace_dir, staging_path
from obsdiff.errors import BundleError, GateError, UsageError
from obsdiff.exporters.artifacts import sha256
from obsdiff.exporters.builder import BuildResult, TorchPipelines
from obsdiff.exporters.components import SizeRule, pipeline_dims
from obsdiff.exporters.export_plan import ExportOptions, ExportPlan, FolderFacts, resolve_export_plan
from obsdiff.exporters.profiles import TargetProfile, load_profile
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


def write_manifest(staging: Path, plan: ExportPlan, source: Path, specs, dims: dict[str, int],
                   record: PruningRecord | None, result: BuildResult) -> dict:
    files = {rel: sha256(staging / rel) for rel in bundle_files(staging)}
    profile = plan.profile

    def tensors(spec, items) -> list[dict]:
        return [{"name": t.name, "dtype": str(t.dtype).replace("torch.", ""), "dims": list(t.dims),
                 "shape": list(spec.resolve(dims, t))} for t in items]

    components = {s.name: {"file": result.components[s.name].file, "inputs": tensors(s, s.inputs),
                           "outputs": tensors(s, s.outputs),
                           "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in s.dynamic_axes().items()},
                           "sparsity": result.components[s.name].sparsity.to_json(with_layers=False)}
                  for s in specs if s.name in result.components}
    manifest = {
        "target": profile.name, "format": profile.format.value, "precision": plan.precision.value,
        "tool": "obsdiff", "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": str(source), "shapes": asdict(plan.shapes), "components": components,
        "session_options": profile.session_options, "gates": asdict(plan.gates),
        # pruning.json beside it holds the per-layer records; the manifest keeps the settings and per-component summary
        "files": files, "pruning": record.summary_json() if record else None, "validation": result.to_json(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def write_report(staging: Path, profile: TargetProfile, result: BuildResult, sections: list[str]) -> None:
    """report.md: the gates, then the builder's own sections, then notes; validation.json beside it."""
    lines = [f"# obsdiff bundle: target `{profile.name}`", "", profile.description, "", "## Gates", "",
             "| gate | value | limit | result |", "|---|---|---|---|"]
    for g in result.gates:
        lines.append(f"| {g.name} | {g.value:.6g} | {g.op} {g.limit:g} | {'pass' if g.passed else 'FAIL'} |")
    lines += sections
    for note in result.notes:
        lines += ["", f"> {note}"]
    (staging / "report.md").write_text("\n".join(lines) + "\n")
    (staging / "validation.json").write_text(json.dumps(result.to_json(), indent=2))


def folder_facts(folder: PrunedFolder) -> FolderFacts:
    """What an export plan needs of a folder: its size rule, pattern and quantization."""
    return FolderFacts(SizeRule.from_folder(folder.path), folder.sparsity,
                       {name: q.quant for name, q in folder.quantization.items()})


def export(model_dir: Path, target: str, out: Path, options: ExportOptions | None = None, *,
           overwrite: bool = False, dense_model: Path | None = None) -> dict:
    """``obsdiff export``: every input and option checked (the plan resolved) before anything heavy is loaded."""
    model_dir, out = Path(model_dir), Path(out)
    profile = load_profile(target)
    _check_out_dir(out, overwrite)
    folder = PrunedFolder.open(model_dir)
    check_disjoint(out, {"model": model_dir, "dense model": dense_model})
    plan = resolve_export_plan(profile, options or ExportOptions(), folder_facts(folder))
    return export_bundle(folder, plan, out, dense_model=dense_model)


def export_bundle(folder: PrunedFolder, plan: ExportPlan, out: Path, *, dense_model: Path | None = None,
                  source_name: str | None = None) -> dict:
    """Export, validate, publish: the bundle appears at ``out`` whole, and only when every gate passed.

    ``source_name`` is what the manifest calls the model (``ship`` exports from a staging folder).
    """
    out = Path(out)
    builder = make_builder(plan, model_prompts(folder.path, plan.shapes.gate_prompts))
    # No local name holds the pipelines: the builder lets them go before it loads the exported runtime.
    models = TorchPipelines(folder, folder.load_pipeline(), load_pipeline(dense_model) if dense_model else None)
    dims = pipeline_dims(models.pipe, plan.shapes)
    specs = builder.component_specs(models.pipe, dims)
    staging = staging_path(out)
    staging.mkdir()
    zip_staging = out.with_name(f".{out.name}.zip.obsdiff-staging")
    try:
        result = builder.build(models, staging)
        models.release()
        fault_point("export-after-build")
        copy_record(folder, staging)
        write_report(staging, plan.profile, result, builder.report_sections(result))
        manifest = write_manifest(staging, plan, Path(source_name or folder.path), specs, dims, folder.record, result)
        if result.failed:
            desc = "; ".join(f"{g.name} = {g.value:.6g} (needs {g.op} {g.limit:g})" for g in result.failed)
            raise GateError(f"target {plan.profile.name}: gate failed, bundle not published: {desc}")
        if plan.zip:
            shutil.make_archive(str(zip_staging), "zip", root_dir=staging)
        fault_point("export-before-publish")
        replace_dir(staging, out)
        if plan.zip:
            Path(f"{zip_staging}.zip").replace(out.with_name(out.name + ".zip"))
            log.info("wrote %s.zip", out)
    except BaseException:
        discard_staging(out)
        Path(f"{zip_staging}.zip").unlink(missing_ok=True)
        raise
    for g in result.gates:
        log.info("gate %-40s %12.6g %s %g  %s", g.name, g.value, g.op, g.limit, "pass" if g.passed else "FAIL")
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

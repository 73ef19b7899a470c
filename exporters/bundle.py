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

from obsdiff.api import (
    PrunedFolder,
    PruningRecord,
    __version__,
    available_memory,
    check_size_fits,
    copy_record,
    load_pipeline,
)
from obsdiff.atomic import OutputLock, check_disjoint, discard_staging, fault_point, replace_dir, staging_path
from obsdiff.errors import GateError, UsageError
from obsdiff.exporters.artifacts import sha256
from obsdiff.exporters.builder import BuildResult, TorchPipelines
from obsdiff.exporters.components import SizeRule, pipeline_dims
from obsdiff.exporters.device import benchmark
from obsdiff.exporters.export_plan import ExportOptions, ExportPlan, FolderFacts, resolve_export_plan
from obsdiff.exporters.profiles import TargetProfile, load_profile
from obsdiff.exporters.registry import make_builder
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
                   record: PruningRecord | None, result: BuildResult, fingerprint: str) -> dict:
    """``fingerprint``: the dense model's (``PrunedFolder.model_fingerprint``), what ``obsdiff compare`` matches."""
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
        "target": profile.name, "shipped_profile": profile.shipped, "format": profile.format.value,
        "precision": plan.precision.value,
        "tool": "obsdiff", "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_model": str(source), "model_fingerprint": fingerprint, "shapes": asdict(plan.shapes),
        "components": components,
        "session_options": profile.session_options.to_json(), "gates": asdict(plan.gates),
        # pruning.json beside it holds the per-layer records; the manifest keeps the settings and per-component summary
        "files": files, "pruning": record.summary_json() if record else None, "validation": result.to_json(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def write_runner(staging: Path) -> None:
    """Every bundle carries its benchmark runner and the schema of what it writes (listed in the manifest)."""
    shutil.copy(Path(benchmark.__file__), staging / "benchmark.py")
    (staging / "benchmark.schema.json").write_text(json.dumps(benchmark.SCHEMA, indent=2))


def write_report(staging: Path, profile: TargetProfile, result: BuildResult, sections: list[str]) -> None:
    """report.md: the gates, then the builder's own sections, then notes; validation.json beside it."""
    lines = [f"# obsdiff bundle: target `{profile.name}`", "", profile.description, "", "## Gates", "",
             "| gate | value | limit | result |", "|---|---|---|---|"]
    for g in result.gates:
        lines.append(f"| {g.name} | {g.value:.6g} | {g.op} {g.limit:g} | {'pass' if g.passed else 'FAIL'} |")
    checked = result.details.get("scales_checked")
    if checked:
        lines += ["", "Quantization scales checked when the folder was opened (present for every quantized layer, the "
                  "weight's shape, finite and positive, every weight on its grid): " +
                  ", ".join(f"{name} {n} layers" for name, n in checked.items()) + "."]
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
    check_export_size(folder.path, plan)
    return export_bundle(folder, plan, out, dense_model=dense_model)


def check_export_size(model_dir: Path, plan: ExportPlan) -> None:
    """The export runs the PyTorch pipeline at the plan's size: refused before loading when that cannot fit."""
    import torch

    check_size_fits(model_dir, plan.shapes.height, plan.shapes.width, plan.shapes.batch,
                    available_memory(torch.device("cpu")), "available memory")


def export_bundle(folder: PrunedFolder, plan: ExportPlan, out: Path, *, dense_model: Path | None = None,
                  source_name: str | None = None) -> dict:
    """Export, validate, publish: the bundle appears at ``out`` whole, and only when every gate passed.

    The run holds ``out``'s lock throughout (a second export into it is refused); ``source_name`` is what the manifest
    calls the model (``ship`` exports from a staging folder).
    """
    out = Path(out)
    with OutputLock(out):
        builder = make_builder(plan, model_prompts(folder.path, plan.shapes.gate_prompts))
        # No local name holds the pipelines: the builder lets them go before it loads the exported runtime.
        models = TorchPipelines(folder, folder.load_pipeline(), load_pipeline(dense_model) if dense_model else None)
        dims = pipeline_dims(models.pipe, plan.shapes)
        specs = builder.component_specs(models.pipe, dims)
        staging = staging_path(out)
        staging.mkdir()
        try:
            result = builder.build(models, staging)
            if folder.scales_checked:
                result.details["scales_checked"] = dict(folder.scales_checked)
            models.release()
            fault_point("export-after-build")
            copy_record(folder, staging)
            write_report(staging, plan.profile, result, builder.report_sections(result))
            write_runner(staging)
            manifest = write_manifest(staging, plan, Path(source_name or folder.path), specs, dims, folder.record,
                                      result, folder.model_fingerprint)
            if result.failed:
                desc = "; ".join(f"{g.name} = {g.value:.6g} (needs {g.op} {g.limit:g})" for g in result.failed)
                raise GateError(f"target {plan.profile.name}: gate failed, bundle not published: {desc}")
            _publish(staging, out, plan.zip)
        except BaseException:
            discard_staging(out)
            raise
    for g in result.gates:
        log.info("gate %-40s %12.6g %s %g  %s", g.name, g.value, g.op, g.limit, "pass" if g.passed else "FAIL")
    log.info("bundle %s published (report: %s)", out, out / "report.md")
    return manifest


def _publish(staging: Path, out: Path, zip_bundle: bool) -> None:
    """The bundle into place, with its zip beside it when asked for; a zip left by an earlier export of another
    bundle into the same ``out`` goes, so that no stale archive sits beside the new bundle."""
    zip_path = out.with_name(out.name + ".zip")
    zip_staging = out.with_name(f".{out.name}.zip.obsdiff-staging")
    try:
        if zip_bundle:
            shutil.make_archive(str(zip_staging), "zip", root_dir=staging)
        fault_point("export-before-publish")
        replace_dir(staging, out)
        if zip_bundle:
            Path(f"{zip_staging}.zip").replace(zip_path)
            log.info("wrote %s", zip_path)
        elif zip_path.is_file():
            log.info("removing %s, an archive of the bundle this one replaces", zip_path)
            zip_path.unlink()
    finally:
        Path(f"{zip_staging}.zip").unlink(missing_ok=True)

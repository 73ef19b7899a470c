"""``make export``: prune with the target's defaults → export → validate → bundle, in one command.

Every option, the model folder and the input/output relation are checked, and the export plan resolved, before
anything is written. The pruned model and the bundle are built in hidden staging folders inside OUT and replace
``OUT/model`` and ``OUT/bundle`` only at the end, so a failed or refused ship leaves OUT as it was (and no OUT it
created).
"""

from __future__ import annotations

import logging
from pathlib import Path

from obsdiff.api import (
    DENOISER,
    Dense,
    PruneConfig,
    PrunedFolder,
    SparsitySpec,
    denoiser_name,
    parse_sparsity,
    prune,
)
from obsdiff.atomic import OutputLock, check_disjoint, remove, replace_dir, staging_path
from obsdiff.errors import ExportError, UsageError
from obsdiff.exporters.bundle import check_export_size, export_bundle
from obsdiff.exporters.components import SizeRule
from obsdiff.exporters.export_plan import ExportOptions, FolderFacts, resolve_export_plan
from obsdiff.exporters.profiles import TargetProfile, load_profile

log = logging.getLogger(__name__)


def resolve_pattern(profile: TargetProfile, pattern: str | None, sparsity: float | None) -> SparsitySpec:
    """The user's pattern and sparsity, or the profile's default pattern with the user's sparsity."""
    if pattern is None and sparsity is None:
        return profile.prune.sparsity
    return parse_sparsity(pattern or str(profile.prune.sparsity), sparsity)


def prune_config(profile: TargetProfile, spec: SparsitySpec) -> PruneConfig | None:
    """What ``ship`` prunes with (None: nothing to prune, the model is exported as it is)."""
    defaults = profile.prune
    if isinstance(spec, Dense) and defaults.quantization is None:
        return None
    config = PruneConfig(sparsity=spec, components=defaults.components, num_prompts=defaults.num_prompts,
                         steps=defaults.steps, quantization=defaults.quantization)
    config.validate()
    return config


def expected_facts(source: PrunedFolder, config: PruneConfig | None) -> FolderFacts:
    """The folder the prune will write, as the export plan sees it (or the source itself, when nothing is pruned)."""
    size = SizeRule.from_folder(source.path)
    if config is None:
        return FolderFacts(size, source.sparsity, {name: q.quant for name, q in source.quantization.items()})
    denoiser = denoiser_name(source.model_index) or DENOISER
    components = [denoiser if c == DENOISER else c for c in config.components]
    quantized = {c: config.quantization for c in components} if config.quantization else {}
    return FolderFacts(size, config.sparsity, quantized)


def ship(target: str, model: Path, out: Path, *, pattern: str | None = None, sparsity: float | None = None,
         options: ExportOptions | None = None) -> dict:
    """Writes ``OUT/model`` (the pruned diffusers folder) and ``OUT/bundle`` (the validated bundle)."""
    model, out = Path(model), Path(out)
    options = options or ExportOptions()
    profile = load_profile(target)
    spec = resolve_pattern(profile, pattern, sparsity)
    profile.check_pattern(spec, options.force)
    config = prune_config(profile, spec)
    source = PrunedFolder.open(model)
    check_disjoint(out, {"model": model}, output_name="--out")
    plan = resolve_export_plan(profile, options, expected_facts(source, config))  # a size the model cannot take fails
    check_export_size(source.path, plan)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} does not exist")

    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        with OutputLock(out):
            return _ship_locked(source, config, plan, model, out, spec)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _ship_locked(source: PrunedFolder, config: PruneConfig | None, plan, model: Path, out: Path,
                 spec: SparsitySpec) -> dict:
    """Prune into a hidden folder, export, then put the pruned model in place; a ship that prunes nothing removes an
    ``OUT/model`` an earlier ship left (it would not be the model of this bundle)."""
    pruned_dir, bundle_dir = out / "model", out / "bundle"
    new_model = staging_path(pruned_dir, ".obsdiff-ship")
    try:
        folder = source
        if config is not None:
            log.info("pruning %s (%s) for target %s", model, spec, plan.profile.name)
            prune(model, new_model, config)
            folder = PrunedFolder.open(new_model)
            if set(folder.quantization) != set(plan.quantized):
                raise ExportError(f"the prune quantized {sorted(folder.quantization)}, the export plan expected "
                                  f"{list(plan.quantized)}")
        manifest = export_bundle(folder, plan, bundle_dir, dense_model=model if config is not None else None,
                                 source_name=str(pruned_dir if config is not None else model))
        if config is not None:
            replace_dir(new_model, pruned_dir)
        elif pruned_dir.exists():
            log.info("removing %s: this bundle was exported from %s as it is", pruned_dir, model)
            remove(pruned_dir)
    except BaseException:
        remove(new_model)
        raise
    return manifest

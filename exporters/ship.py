"""``make export``: prune with the target's defaults → export → validate → bundle, in one command.

Every option, the model folder and the input/output relation are checked before anything is written. The
pruned model and the bundle are built in hidden staging folders inside OUT and replace ``OUT/model`` and
``OUT/bundle`` only at the end, so a failed or refused ship leaves OUT as it was (and no OUT it created).
"""

from __future__ import annotations

import logging
from pathlib import Path

from obsdiff.api import Dense, PruneConfig, SparsitySpec, check_model_folder, parse_sparsity, prune
from obsdiff.atomic import check_disjoint, remove, replace_dir, staging_path
from obsdiff.errors import UsageError
from obsdiff.exporters.apple import AppleOptions
from obsdiff.exporters.bundle import NO_OVERRIDES, ShapeOverrides, export_bundle
from obsdiff.exporters.components import SizeRule
from obsdiff.exporters.profiles import Activations, Precision, TargetProfile, load_profile
from obsdiff.exporters.registry import make_builder

log = logging.getLogger(__name__)


def resolve_pattern(profile: TargetProfile, pattern: str | None, sparsity: float | None) -> SparsitySpec:
    """The user's pattern and sparsity, or the profile's default pattern with the user's sparsity."""
    if pattern is None and sparsity is None:
        return profile.prune.sparsity
    return parse_sparsity(pattern or str(profile.prune.sparsity), sparsity)


def ship(target: str, model: Path, out: Path, *, pattern: str | None = None, sparsity: float | None = None,
         precision: str | None = None, force: bool = False, zip_bundle: bool = False,
         shapes: ShapeOverrides = NO_OVERRIDES, apple: AppleOptions | None = None,
         activations: Activations | None = None) -> dict:
    """Writes ``OUT/model`` (the pruned diffusers folder) and ``OUT/bundle`` (the validated bundle)."""
    model, out = Path(model), Path(out)
    profile = load_profile(target)
    if precision is not None:
        Precision(precision)
    spec = resolve_pattern(profile, pattern, sparsity)
    profile.check_pattern(spec, force)
    make_builder(profile, Precision(precision) if precision else profile.precision, [], apple=apple,
                 activations=activations)  # options checked
    defaults = profile.prune
    config = None
    if not isinstance(spec, Dense) or defaults.quantization is not None:
        config = PruneConfig(sparsity=spec, components=defaults.components, num_prompts=defaults.num_prompts,
                             steps=defaults.steps, quantization=defaults.quantization)
        config.validate()
    check_model_folder(model)
    check_disjoint(out, {"model": model}, output_name="--out")
    SizeRule.from_folder(model).resolve(shapes.apply(profile.shapes))  # a size the model cannot take fails here
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} does not exist")

    created = not out.exists()
    out.mkdir(exist_ok=True)
    pruned_dir, bundle_dir = out / "model", out / "bundle"
    new_model = staging_path(pruned_dir, ".obsdiff-ship")
    try:
        source = model
        if config is not None:
            log.info("pruning %s (%s) for target %s", model, spec, profile.name)
            prune(model, new_model, config)
            source = new_model
        manifest = export_bundle(source, target, bundle_dir, precision=precision, overwrite=True, zip_bundle=zip_bundle,
                                 force=force, dense_model=model if config is not None else None,
                                 source_name=str(pruned_dir if config is not None else model), shapes=shapes,
                                 apple=apple, activations=activations)
        if config is not None:
            replace_dir(new_model, pruned_dir)
    except BaseException:
        remove(new_model)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return manifest

"""``make export``: prune with the target's defaults → export → validate → bundle, in one command."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from exporters.bundle import export_bundle
from exporters.profiles import Format, load_profile
from obsdiff.errors import UsageError
from obsdiff.prune import PruneConfig, prune

log = logging.getLogger(__name__)


def ship(target: str, model: Path, out: Path, *, pattern: str | None = None, sparsity: float | None = None,
         precision: str | None = None, force: bool = False, zip_bundle: bool = False) -> dict:
    """Writes ``OUT/model`` (the pruned diffusers folder) and ``OUT/bundle`` (the validated bundle)."""
    profile = load_profile(target)
    out = Path(out)
    pruned_dir, bundle_dir = out / "model", out / "bundle"
    out.mkdir(parents=True, exist_ok=True)
    defaults = profile.prune
    pattern = pattern or defaults.pattern
    if pattern == "dense":
        source = Path(model)
    else:
        if sparsity is None and pattern == defaults.pattern:
            sparsity = defaults.sparsity
        config = PruneConfig(pattern=pattern, sparsity=sparsity, components=defaults.components,
                             num_prompts=defaults.num_prompts, steps=defaults.steps)
        if profile.format is Format.TENSORRT:
            from exporters.tensorrt import check_pattern_for_tensorrt

            check_pattern_for_tensorrt(pattern, force)
        log.info("pruning %s → %s (%s, %s)", model, pruned_dir, pattern, sparsity if sparsity else "default sparsity")
        if pruned_dir.exists():
            shutil.rmtree(pruned_dir)
        prune(Path(model), pruned_dir, config)
        source = pruned_dir
    if not Path(source).exists():
        raise UsageError(f"{source} does not exist")
    return export_bundle(source, target, bundle_dir, precision=precision, overwrite=True, zip_bundle=zip_bundle,
                         force=force, dense_model=Path(model) if source != Path(model) else None)

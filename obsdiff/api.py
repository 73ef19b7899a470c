"""The pruning library's public API: what the exporters (and scripts built on obsdiff) import.

Everything else under ``obsdiff`` is internal; the import contracts in ``pyproject.toml`` (``make lint``) keep
``obsdiff.exporters`` from reaching past this module into the solver, the driver or the adapters. A pruned folder
is read through ``PrunedFolder`` only.
"""

from obsdiff import __version__
from obsdiff.checks import check_number, check_whole
from obsdiff.config import (
    DEFAULT_NUM_PROMPTS,
    DEFAULT_STEPS,
    DENOISER,
    DENOISERS,
    LATENT_SCALE,
    Method,
    PruneConfig,
    check_image_size,
    denoiser_name,
)
from obsdiff.model_io import check_model_folder
from obsdiff.plan import available_memory, check_size_fits
from obsdiff.prune import prune
from obsdiff.pruned_folder import (
    ComponentShapes,
    LayerRecord,
    PrunedFolder,
    PruningRecord,
    QuantizedComponent,
    copy_record,
    load_pipeline,
)
from obsdiff.quantize import IntegerWeight, Quantization, integer_weight, parse_quantization
from obsdiff.sparsity import (
    NM,
    Dense,
    PatternError,
    SparsitySpec,
    Structured,
    Unstructured,
    parse_kind,
    parse_sparsity,
)
from obsdiff.sparsity import from_json as sparsity_from_json
from obsdiff.sparsity import to_json as sparsity_to_json

__all__ = [
    "DEFAULT_NUM_PROMPTS",
    "DEFAULT_STEPS",
    "__version__", "available_memory", "check_image_size", "check_model_folder", "check_number", "check_size_fits",
    "check_whole", "ComponentShapes", "copy_record", "DENOISER", "denoiser_name", "DENOISERS", "Dense",
    "integer_weight", "IntegerWeight", "LATENT_SCALE", "LayerRecord", "load_pipeline", "Method", "NM", "parse_kind",
    "parse_quantization", "parse_sparsity", "PatternError", "prune", "PruneConfig", "PrunedFolder", "PruningRecord",
    "Quantization", "QuantizedComponent", "sparsity_from_json", "sparsity_to_json", "SparsitySpec", "Structured",
    "Unstructured",
]

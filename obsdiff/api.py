"""The pruning library's public API: what the exporters (and scripts built on obsdiff) import.

Everything else under ``obsdiff`` is internal; the import contracts in ``pyproject.toml`` (``make lint``) keep
``obsdiff.exporters`` from reaching past this module into the solver, the driver or the adapters.
"""

from obsdiff import __version__
from obsdiff.config import DENOISER, LATENT_SCALE, Method, PruneConfig, check_image_size
from obsdiff.model_io import check_model_folder, load_pipeline, read_pruning_record, read_quantization
from obsdiff.prune import prune
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
    "DENOISER", "LATENT_SCALE", "NM", "Dense", "Method", "PatternError", "PruneConfig", "SparsitySpec", "Structured",
    "Unstructured", "__version__", "check_image_size", "check_model_folder", "load_pipeline", "parse_kind",
    "parse_sparsity", "prune", "read_pruning_record", "sparsity_from_json", "sparsity_to_json",
    "IntegerWeight", "Quantization", "integer_weight", "parse_quantization", "read_quantization",
]

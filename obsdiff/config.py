"""What one prune is asked to do: ``PruneConfig`` and ``Method``, checked in full before any work starts.

Its own module so that the driver (``prune``), the structured pruner and the exporters' ``ship`` can all import it
without importing each other.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from obsdiff.checks import check_number, check_whole
from obsdiff.errors import UsageError
from obsdiff.hessian import Weighting
from obsdiff.quantize import Quantization, QuantMethod
from obsdiff.sparsity import NM, Allocation, Dense, SparsitySpec, Structured, Unstructured, to_json
from obsdiff.sparsity import from_json as sparsity_from_json

DENOISER = "denoiser"  # alias: the pipeline's UNet or transformer
DENOISERS = ("unet", "transformer")  # the attribute names a pipeline's denoiser has


def denoiser_name(components) -> str | None:
    """Which of ``components`` (names, or a name → module mapping) is the denoiser; None when there is none."""
    return next((n for n in DENOISERS if n in components), None)

LATENT_SCALE = 8  # the smallest VAE downscale of the supported families: image sizes are multiples of it


class Calibration(enum.StrEnum):
    """How a denoiser package is fed: its recorded trajectory replayed and stopped after the package's last layer, or
    the whole pipeline rerun for every prompt and step."""

    REPLAY = "replay"
    FULL = "full"


# The calibration defaults, chosen on benchmarks/results/calibration_cost.md (mean of 3 seeds on the default model, within
# 0.02 of the old 64 prompts × 25 steps × every row at 2:4 and 50%) and priced on SD 1.5 at 512 px by `prune --plan`:
# the denoiser's calls (prompts × steps) are what a real model pays for, rows per column what its widest layers pay.
DEFAULT_NUM_PROMPTS = 64
DEFAULT_STEPS = 6
DEFAULT_ROWS_PER_COLUMN = 2  # SD 1.5's 23,040-column layers: 2× their columns from 64 × 6 calls of 8×8 latents
DEFAULT_MIN_ROWS = 32768  # the floor for narrow layers, met with more calls (their updates cost rows × c²: little)
# --refine's default, chosen on benchmarks/results/refine.md: 5 iterations reach 95% of the layer-error drop of 20 (2:4
# on the default model: mean relative error 0.0284 → 0.0147 at 5, 0.0133 at 20); SD 1.5 pays about 10 × 2·Σ r·c² FLOPs
DEFAULT_REFINE = 10


class EncoderDtype(enum.StrEnum):
    """The precision the text encoders are loaded in when they are not pruned: they run once per prompt batch
    (``lean.encode_prompts``) and are let go, so half precision only bounds the load's peak (SD3's T5-XXL: 19 GB in
    fp32). Their embeddings reach the denoiser in its own dtype."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.value)


class Method(enum.StrEnum):
    OBS_DIFF = "obs-diff"
    WANDA = "wanda"
    MAGNITUDE = "magnitude"
    L1 = "l1"  # structured baseline only

    @property
    def needs_calibration(self) -> bool:
        return self not in (Method.MAGNITUDE, Method.L1)


def check_image_size(name: str, value: int | None) -> None:
    """A height or width: unset, or a positive multiple of the VAE's scale (8)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < LATENT_SCALE or value % LATENT_SCALE:
        raise UsageError(f"{name} must be a positive multiple of {LATENT_SCALE} (the VAE's scale), got {value!r}")


@dataclass
class PruneConfig:
    method: Method = Method.OBS_DIFF
    sparsity: SparsitySpec = field(default_factory=Unstructured)
    components: tuple[str, ...] = (DENOISER,)
    prompts_file: Path | None = None
    num_prompts: int = DEFAULT_NUM_PROMPTS
    steps: int = DEFAULT_STEPS
    guidance: float = 7.0
    height: int | None = None
    width: int | None = None
    weighting: Weighting = Weighting.LOG_DECREASE
    alpha_min: float = 0.8
    alpha_max: float = 1.2
    packages: int = 4
    damp: float = 0.01
    blocks: str | None = None
    seed: int = 0
    batch_size: int = 16
    hessian_dtype: str = "float32"  # "float64": the sum no longer depends on batching or sharding
    compensate: bool = True  # structured only: OBS update of the remaining columns
    max_memory_gib: float | None = None  # packages are split to fit; None: the device's available memory
    quantization: Quantization | None = None  # weights rounded in the same pass (GPTQ) or after it (RTN)
    rows_per_column: int | None = DEFAULT_ROWS_PER_COLUMN  # each Hessian's row budget; None: every row
    min_rows: int = DEFAULT_MIN_ROWS  # the row budget's floor per Hessian: max(rows_per_column × columns, min_rows)
    calibration: Calibration = Calibration.REPLAY
    refresh_every: int = 0  # replay: re-record the trajectory on the partly pruned model every N packages (0: never)
    # obs-diff masks without --quantize: conjugate-gradient iterations re-solving the kept weights for the chosen zeros
    # (0: the sweep's own compensation, the paper's method); None: DEFAULT_REFINE where it applies, else 0
    refine: int | None = None
    text_encoder_dtype: EncoderDtype = EncoderDtype.FLOAT32
    drop_text_encoder_3: bool = False  # SD3 without T5 (diffusers' text_encoder_3=None), calibrated and shipped so

    def validate(self) -> None:
        """Every option, with a one-line error naming it; called before the model is loaded."""
        try:
            self.method = Method(self.method)
            self.weighting = Weighting(self.weighting)
            self.text_encoder_dtype = EncoderDtype(self.text_encoder_dtype)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        spec = self.sparsity
        if not isinstance(spec, (Dense, Unstructured, NM, Structured)):
            raise UsageError(f"sparsity must be a parsed pattern, got {spec!r}")
        if isinstance(spec, Dense) and self.quantization is None:
            raise UsageError("the dense pattern prunes nothing: export the model as it is (or quantize it: --quantize)")
        if self.quantization is not None:
            if not isinstance(self.quantization, Quantization):
                raise UsageError(f"quantization must be a parsed value, got {self.quantization!r}")
            if (self.quantization.method is QuantMethod.GPTQ and self.method is not Method.OBS_DIFF
                    and not isinstance(spec, Structured)):  # stacked: the quantize stage is OBS whatever shrank
                raise UsageError(f"GPTQ rounds inside the OBS sweep and needs the full Hessian: use --method obs-diff, "
                                 f"or --quantize-method rtn with --method {self.method}")
        if self.stacked and spec.budget is not None and not self.stages()[0].components:
            raise UsageError(f"--{spec.budget.measure} shrinks the denoiser: add it to --components (or quantize "
                             "the other components alone)")
        if isinstance(spec, Structured):
            if self.method not in (Method.OBS_DIFF, Method.L1):
                raise UsageError("--pattern structured takes --method obs-diff or l1")
            if self.method is Method.L1 and not self.compensate:
                raise UsageError("--no-compensate is implied by --method l1")
            if self.method is Method.L1 and spec.budget is not None and spec.budget.allocation is Allocation.GLOBAL:
                raise UsageError("--allocation global ranks groups by OBS error; --method l1 takes --allocation uniform")
        else:
            if self.method is Method.L1:
                raise UsageError("--method l1 is the structured baseline: use it with --pattern structured")
            if not self.compensate:
                raise UsageError("--no-compensate applies to --pattern structured only")
        if not self.components or not all(isinstance(c, str) and c for c in self.components):
            raise UsageError(f"--components must name at least one component, got {self.components!r}")
        for name, value, minimum in (("--packages", self.packages, 1), ("--steps", self.steps, 1),
                                     ("--num-prompts", self.num_prompts, 1), ("--batch-size", self.batch_size, 1),
                                     ("--seed", self.seed, 0)):
            check_whole(name, value, minimum)
        check_number("--damp", self.damp, 0.0, 1.0, open_high=True)
        check_number("--guidance", self.guidance, 0.0)
        check_number("--alpha-min", self.alpha_min, 0.0, open_low=True)
        check_number("--alpha-max", self.alpha_max, 0.0, open_low=True)
        check_image_size("--height", self.height)
        check_image_size("--width", self.width)
        if self.max_memory_gib is not None:
            check_number("--max-memory", self.max_memory_gib, 0.0, open_low=True)
        if self.rows_per_column is not None:
            check_whole("--rows-per-column", self.rows_per_column, 1)
        check_whole("--min-rows", self.min_rows, 0)
        try:
            self.calibration = Calibration(self.calibration)
        except ValueError:
            raise UsageError(f"--calibration must be replay or full, got {self.calibration!r}") from None
        check_whole("--refresh-every", self.refresh_every, 0)
        applies = (self.method is Method.OBS_DIFF and isinstance(spec, (Unstructured, NM))
                   and self.quantization is None)
        if self.refine is None:
            self.refine = DEFAULT_REFINE if applies else 0
        check_whole("--refine", self.refine, 0)
        if self.refine and not applies:
            raise UsageError("--refine re-solves the kept weights of an obs-diff mask (unstructured or N:M) without "
                             "--quantize (rounded weights would leave their grid)")
        if self.hessian_dtype not in ("float32", "float64"):
            raise UsageError("--hessian-dtype must be float32 or float64")

    @property
    def needs_calibration(self) -> bool:
        return self.method.needs_calibration

    @property
    def stacked(self) -> bool:
        """A structured shrink and a weight quantization in one prune: two stages, the second on the shrunk model."""
        return isinstance(self.sparsity, Structured) and self.quantization is not None

    def stages(self) -> tuple[PruneConfig, PruneConfig]:
        """A stacked prune's stages: the shrink alone, then the quantization of every layer of the shrunk model
        (GPTQ on Hessians calibrated anew, since shrinking changed the layers' inputs; RTN needs none)."""
        assert self.quantization is not None and isinstance(self.sparsity, Structured)
        gptq = self.quantization.method is QuantMethod.GPTQ
        shrunk = self.components
        if self.sparsity.budget is not None:  # a FLOP or parameter budget shrinks the denoiser; the rest is quantized
            shrunk = tuple(c for c in self.components if c == DENOISER or c in DENOISERS)
        return (replace(self, quantization=None, components=shrunk),
                replace(self, sparsity=Dense(), method=Method.OBS_DIFF if gptq else Method.MAGNITUDE, compensate=True))

    def to_json(self) -> dict:
        """The settings as ``pruning.json`` records them (the pattern in its canonical form)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("sparsity", "quantization")}
        data["quantization"] = self.quantization.to_json() if self.quantization else None
        data = {k: (str(v) if isinstance(v, (Path, enum.Enum)) else v) for k, v in data.items()}
        return {**data, **to_json(self.sparsity), "components": list(self.components)}

    @classmethod
    def from_json(cls, data: dict) -> PruneConfig:
        """The inverse of ``to_json`` (a record's ``settings``); fields it lacks (older records) take the defaults."""
        own = {f.name for f in fields(cls)} - {"sparsity", "quantization"}
        values = {k: v for k, v in data.items() if k in own}
        values["method"] = Method(values.get("method", Method.OBS_DIFF))
        values["weighting"] = Weighting(values.get("weighting", Weighting.LOG_DECREASE))
        values["text_encoder_dtype"] = EncoderDtype(values.get("text_encoder_dtype", EncoderDtype.FLOAT32))
        # records made before row budgets and replay calibrated every row of a full rerun
        values.setdefault("rows_per_column", None)
        values.setdefault("min_rows", 0)
        values.setdefault("refine", 0)  # records made before --refine: the sweep's weights
        values["calibration"] = Calibration(values.get("calibration", Calibration.FULL))
        values["components"] = tuple(values.get("components", (DENOISER,)))
        if values.get("prompts_file") is not None:
            values["prompts_file"] = Path(values["prompts_file"])
        quant = data.get("quantization")
        if quant is not None:
            quant = Quantization(int(quant["bits"]), quant.get("group_size"), QuantMethod(quant["method"]))
        return cls(sparsity=sparsity_from_json(data), quantization=quant, **values)

    def fingerprint(self, prompts_sha: str) -> str:
        return hashlib.sha256(json.dumps({**self.to_json(), "prompts": prompts_sha}, sort_keys=True).encode()).hexdigest()

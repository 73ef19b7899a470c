"""One adapter per model family: architecture knowledge as data.

An adapter names the blocks (regexes over ``named_modules`` names, matched in module order), the
layers inside them that are not pruned, and whether the component is the denoiser (whose
activations get timestep weights). Which layers share an input (q/k/v) is not declared here: the
calibration hooks see it, so it cannot go stale when a block type changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from obsdiff.errors import UsageError
from obsdiff.layers import PRUNABLE, unsupported_reason

# AdaLN modulation layers take one time embedding per sample: rank ≤ batch, and every token of the
# block depends on them. They stay dense.
_ADALN = r".*norm1(_context)?\.linear|.*norm\.linear"
# A UNet's time (and SDXL's added text-time) conditioning is the same kind of layer: one input row per sample and call,
# the same row for every prompt at a step, so its Hessian has rank ≤ the number of distinct timesteps whatever the
# calibration; SD 1.5's 1280-column time_emb_proj would need 2,560 calls' worth of rows to be estimated at all.
_TIME_CONDITIONING = r"time_embedding\..*|add_embedding\..*|.*\.time_emb_proj"


@dataclass(frozen=True)
class Adapter:
    family: str
    classes: tuple[str, ...]
    blocks: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    denoiser: bool = False
    # Top-level containers in forward order, where registration order differs (mid before up).
    order: tuple[str, ...] = ()
    # Structured pruning layout (see obsdiff.structured); None means "no structured support".
    structured: "StructuredLayout | None" = None

    def block_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Blocks in forward order (diffusers registers a level's attentions before its resnets)."""
        patterns = [re.compile(p) for p in self.blocks]
        found = [(name, mod) for name, mod in model.named_modules() if any(p.fullmatch(name) for p in patterns)]
        names = [n for n, _ in found]

        def key(item: tuple[str, nn.Module]) -> tuple:
            rank = next((i for i, prefix in enumerate(self.order) if item[0].startswith(prefix)), len(self.order))
            return (rank, *_forward_order_key(item[0], names))

        return sorted(found, key=key)

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignore)


# Inside one diffusers level (``down_blocks.1``), layer i runs resnets.i then attentions.i; the
# sampler runs after all of them.
_MEMBER = re.compile(r"(?P<parent>.*)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<idx>\d+)")
_KIND_RANK = {"resnets": 0, "attentions": 1}


def _forward_order_key(name: str, names: list[str]) -> tuple:
    m = _MEMBER.fullmatch(name)
    if not m:
        return (names.index(name), 0, 0, 0)
    first = min(i for i, n in enumerate(names) if n.startswith(m["parent"] + "."))
    kind = m["kind"]
    is_sampler = kind not in _KIND_RANK
    return (first, int(is_sampler), int(m["idx"]), _KIND_RANK.get(kind, 2))


@dataclass(frozen=True)
class StructuredLayout:
    """Where heads and FFN neurons live inside a block (names relative to the block).

    ``attentions``: regex for Attention modules whose heads may be removed. Their q/k/v (and
    add_q/k/v for joint attention) lose rows; ``to_out.0`` (and ``to_add_out``) lose columns.
    ``ffns``: pairs (up, down) regexes: the up projection loses rows (both halves when gated),
    the down projection columns.
    ``resnets``: regex over block names: blocks that are ResnetBlock2Ds lose conv1/norm2/conv2 channels in whole
    GroupNorm groups.
    """

    attentions: str = r"(.*\.)?attn\d?"
    resnets: str | None = None
    ffns: tuple[tuple[str, str, bool], ...] = field(default_factory=tuple)  # (up, down, gated)
    skip_attr: str | None = None  # a block whose attribute of this name is true is left whole ...
    skip_reason: str = ""  # ... for this reason


UNET = Adapter(
    family="unet2d-condition",
    classes=("UNet2DConditionModel",),
    blocks=(
        r"time_embedding",
        r"add_embedding",
        r"(down_blocks|up_blocks)\.\d+\.(resnets|attentions|downsamplers|upsamplers)\.\d+",
        r"mid_block\.(resnets|attentions)\.\d+",
    ),
    order=("time_embedding", "add_embedding", "down_blocks", "mid_block", "up_blocks"),
    ignore=(_TIME_CONDITIONING,),
    denoiser=True,
    structured=StructuredLayout(
        attentions=r"transformer_blocks\.\d+\.attn[12]",
        ffns=((r"transformer_blocks\.\d+\.ff\.net\.0\.proj", r"transformer_blocks\.\d+\.ff\.net\.2", True),),
        resnets=r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+",
    ),
)

SD3 = Adapter(
    family="sd3-mmdit",
    classes=("SD3Transformer2DModel",),
    blocks=(r"transformer_blocks\.\d+",),
    ignore=(_ADALN,),
    denoiser=True,
    structured=StructuredLayout(
        attentions=r"attn2?",
        ffns=((r"ff\.net\.0\.proj", r"ff\.net\.2", False), (r"ff_context\.net\.0\.proj", r"ff_context\.net\.2", False)),
        skip_attr="context_pre_only",
        skip_reason="context_pre_only block: its text stream ends there, removing heads would break its to_add_out",
    ),
)

FLUX = Adapter(
    family="flux",
    classes=("FluxTransformer2DModel",),
    blocks=(r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"),
    ignore=(_ADALN,),
    denoiser=True,
    structured=StructuredLayout(
        attentions=r"attn",
        ffns=((r"ff\.net\.0\.proj", r"ff\.net\.2", False), (r"ff_context\.net\.0\.proj", r"ff_context\.net\.2", False)),
    ),
)

VAE = Adapter(
    family="autoencoder-kl",
    classes=("AutoencoderKL",),
    blocks=(
        r"(encoder|decoder)\.(down_blocks|up_blocks)\.\d+\.(resnets|downsamplers|upsamplers)\.\d+",
        r"(encoder|decoder)\.mid_block\.(attentions|resnets)\.\d+",
    ),
    order=("encoder.down_blocks", "encoder.mid_block", "decoder.mid_block", "decoder.up_blocks"),
    # The decoder's resnets only: text-to-image never runs the encoder, so its shape is not worth a calibration.
    structured=StructuredLayout(attentions=r"(?!)", resnets=r"decoder\.(up_blocks\.\d+|mid_block)\.resnets\.\d+"),
)

CLIP_TEXT = Adapter(
    family="clip-text",
    classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    blocks=(r"text_model\.encoder\.layers\.\d+",),
)

T5_ENCODER = Adapter(
    family="t5-encoder",
    classes=("T5EncoderModel",),
    blocks=(r"encoder\.block\.\d+",),
)

ADAPTERS: dict[str, Adapter] = {cls: a for a in (UNET, SD3, FLUX, VAE, CLIP_TEXT, T5_ENCODER) for cls in a.classes}


def adapter_for(model: nn.Module) -> Adapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise UsageError(f"no adapter for {name}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]


@dataclass
class TargetLayer:
    name: str  # relative to the component
    module: nn.Module
    block: str


@dataclass
class Skipped:
    name: str
    reason: str


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def find_targets(model: nn.Module, adapter: Adapter, block_filter=None) -> tuple[list[TargetLayer], list[Skipped]]:
    """Target layers in block order, and every other Linear/Conv with the reason it stays dense."""
    targets: list[TargetLayer] = []
    claimed: dict[str, str] = {}
    for block_name, block in adapter.block_modules(model):
        if block_filter is not None and not block_filter(block_name):
            for sub, mod in block.named_modules():
                if isinstance(mod, PRUNABLE):
                    claimed[f"{block_name}.{sub}"] = "block not selected by --blocks"
            continue
        for sub, mod in block.named_modules():
            if not isinstance(mod, PRUNABLE):
                continue
            full = f"{block_name}.{sub}"
            if adapter.is_ignored(full):
                claimed[full] = "kept dense by the adapter (time conditioning: one row per sample and step)"
            elif reason := unsupported_reason(mod):
                claimed[full] = reason
            else:
                targets.append(TargetLayer(full, mod, block_name))
                claimed[full] = ""
    skipped = [Skipped(n, claimed.get(n) or "outside the adapter's blocks (first/last layers stay dense)")
               for n, _ in prunable_layers(model) if claimed.get(n, None) != ""]
    return targets, skipped

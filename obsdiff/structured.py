"""Structured OBS-Diff: remove attention heads and FFN neurons, compensate, physically shrink.

Units come from the adapter's ``StructuredLayout``:
- FFN: hidden neuron q is column q of the down projection; scored by Σ_rows W[:, q]²/[H⁻¹]_qq, removed
  in batches with OBS compensation, then the matching rows of the up projection go (both GEGLU halves).
- Heads: a head is its block of ``head_dim`` columns of the output projection (``to_out.0``), scored by the
  exact group OBS error Σ_rows w_S [H⁻¹_SS]⁻¹ w_Sᵀ, removed one at a time with compensation; its rows go
  from q/k/v and the attention's head count drops. MMDiT joint attention ranks heads on ``to_out.0`` (image)
  and ``to_add_out`` (text) separately and fuses the two rankings by reciprocal rank (k = 60), then removes
  the chosen heads from both with compensation, and shrinks ``add_q/k/v_proj`` too.
Head size is read from the layer shapes (to_q rows / heads), never assumed.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from obsdiff.config import Method, PruneConfig
from obsdiff.errors import UsageError
from obsdiff.shrink import shrink_attention, shrink_ffn
from obsdiff.solver import damped_inverse, finite_or_none, group_obs_scores, remove_column_groups
from obsdiff.sparsity import Structured

log = logging.getLogger(__name__)

RRF_K = 60
FFN_BATCHES = 8  # FFN neurons are removed in this many re-scored batches


@dataclass
class AttentionUnit:
    block: str
    path: str  # the Attention module, relative to the component
    module: nn.Module
    joint: bool  # MMDiT: has add_q/k/v_proj and to_add_out

    @property
    def heads(self) -> int:
        return self.module.heads

    @property
    def head_dim(self) -> int:
        return self.module.to_q.out_features // self.module.heads

    def down_layers(self) -> dict[str, nn.Module]:
        out = {f"{self.path}.to_out.0": self.module.to_out[0]}
        if self.joint and getattr(self.module, "to_add_out", None) is not None:
            out[f"{self.path}.to_add_out"] = self.module.to_add_out
        return out


@dataclass
class FFNUnit:
    block: str
    up_path: str
    down_path: str
    up: nn.Linear
    down: nn.Linear
    gated: bool

    @property
    def inner(self) -> int:
        return self.down.in_features

    def down_layers(self) -> dict[str, nn.Module]:
        return {self.down_path: self.down}


@dataclass
class StructuredPlan:
    units: list = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_units(model: nn.Module, adapter) -> StructuredPlan:
    layout = adapter.structured
    if layout is None:
        raise UsageError(f"structured pruning has no layout for {type(model).__name__} ({adapter.family}); "
                         "it supports the UNet, SD3 and Flux denoisers")
    plan = StructuredPlan()
    for block_name, block in adapter.block_modules(model):
        if layout.skip_attr and getattr(block, layout.skip_attr, False):
            plan.skipped.append((block_name, layout.skip_reason))
            continue
        modules = dict(block.named_modules())
        found = 0
        for sub, mod in modules.items():
            if (sub and re.fullmatch(layout.attentions, sub) and hasattr(mod, "to_q") and hasattr(mod, "heads")
                    and getattr(mod, "to_out", None) is not None):
                joint = getattr(mod, "add_q_proj", None) is not None
                plan.units.append(AttentionUnit(block_name, f"{block_name}.{sub}", mod, joint))
                found += 1
        for up_re, down_re, gated in layout.ffns:
            for up in (u for u in modules if re.fullmatch(up_re, u)):
                down = next((d for d in modules if re.fullmatch(down_re, d) and _same_parent(up, d)), None)
                if down is not None and isinstance(modules[up], nn.Linear) and isinstance(modules[down], nn.Linear):
                    plan.units.append(FFNUnit(block_name, f"{block_name}.{up}", f"{block_name}.{down}", modules[up],
                                              modules[down], gated))
                    found += 1
        if not found and any(isinstance(m, nn.Linear) for m in modules.values()):
            plan.skipped.append((block_name, "no heads or FFN neurons in a layout that can shrink (e.g. Flux single "
                                             "blocks fuse attention and MLP into one proj_out): left whole"))
    return plan


def _same_parent(up: str, down: str) -> bool:
    """ff.net.0.proj and ff.net.2 share the ``ff`` prefix; match by everything before ``.net.``."""
    return up.split(".net.")[0] == down.split(".net.")[0]


# ---- solving one package ---------------------------------------------------------------------------


def _count(total: int, fraction: float, keep_min: int, what: str, where: str) -> int:
    n = int(round(total * fraction))
    if n > total - keep_min:
        log.warning("%s: removing %d of %d %s would leave fewer than %d; clamped", where, n, total, what, keep_min)
        n = total - keep_min
    return max(n, 0)


def _head_scores(layer: nn.Linear, hessian: torch.Tensor | None, groups: list[list[int]], by_l1_norm: bool,
                 damp: float) -> torch.Tensor:
    """Cost of removing each head from one output projection: OBS error, or L1 norm for the baseline."""
    w = layer.weight.detach().float()
    if by_l1_norm:
        return torch.stack([w[:, g].abs().sum() for g in groups])
    return group_obs_scores(w, damped_inverse(hessian.float(), damp), [torch.tensor(g) for g in groups])


def _spec(config: PruneConfig) -> Structured:
    if not isinstance(config.sparsity, Structured):
        raise UsageError(f"structured pruning needs the structured pattern, got {config.sparsity}")
    return config.sparsity


def prune_attention(unit: AttentionUnit, hessians: dict[str, torch.Tensor | None], config: PruneConfig) -> dict:
    heads, d = unit.heads, unit.head_dim
    n = _count(heads, _spec(config).heads, 1, "heads", unit.path)
    groups = [list(range(h * d, (h + 1) * d)) for h in range(heads)]
    by_l1 = config.method is Method.L1
    compensate = config.compensate and not by_l1
    downs = unit.down_layers()
    forced = None
    if n and len(downs) > 1:  # MMDiT: one head set for both streams, from the fused image and text rankings
        ranks = [_head_scores(layer, hessians.get(name), groups, by_l1, config.damp).argsort().argsort()
                 for name, layer in downs.items()]
        fused = sum(1.0 / (RRF_K + r.float()) for r in ranks)
        forced = fused.argsort(descending=True)[:n].tolist()
    results = {name: remove_column_groups(layer.weight.detach(), hessians.get(name), groups, n, by_l1_norm=by_l1,
                                          compensate=compensate, damp=config.damp, batch=1, forced=forced)
               for name, layer in downs.items()}
    removed = set(next(iter(results.values())).removed if results else [])
    for name, layer in downs.items():
        layer.weight.data.copy_(results[name].weight.to(layer.weight.dtype))
    keep = [h for h in range(heads) if h not in removed]
    shrink_attention(unit.module, keep)
    return {"unit": unit.path, "kind": "heads", "before": heads, "after": len(keep), "head_dim": d,
            "removed": sorted(removed),
            "layers": {k: {"error": finite_or_none(v.error), "relative_error": finite_or_none(v.relative_error)}
                       for k, v in results.items()}}


def prune_ffn(unit: FFNUnit, hessian: torch.Tensor | None, config: PruneConfig, component: nn.Module) -> dict:
    inner = unit.inner
    n = _count(inner, _spec(config).ffn, 1, "neurons", unit.down_path)
    by_l1 = config.method is Method.L1
    res = remove_column_groups(unit.down.weight.detach(), hessian, [[q] for q in range(inner)], n, by_l1_norm=by_l1,
                               compensate=config.compensate and not by_l1, damp=config.damp,
                               batch=max(1, math.ceil(n / FFN_BATCHES)))
    unit.down.weight.data.copy_(res.weight.to(unit.down.weight.dtype))
    removed = set(res.removed)
    keep = [q for q in range(inner) if q not in removed]
    unit.up, unit.down = shrink_ffn(component, unit.up_path, unit.down_path, unit.gated, keep)
    return {"unit": unit.down_path, "up": unit.up_path, "kind": "ffn", "before": inner, "after": len(keep),
            "gated": unit.gated, "layers": {unit.down_path: {"error": finite_or_none(res.error),
                                                             "relative_error": finite_or_none(res.relative_error)}}}


def shapes_from_records(records: list[dict]) -> dict:
    """The structured shapes of one component, from its unit records (what the loader needs)."""
    shapes: dict = {"attention_heads": {}, "ffn": []}
    for r in records:
        if r["kind"] == "heads":
            shapes["attention_heads"][r["unit"]] = r["after"]
        else:
            shapes["ffn"].append({"up": r["up"], "down": r["unit"], "inner": r["after"], "gated": r["gated"]})
    return shapes


# ---- size and cost ---------------------------------------------------------------------------------


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def forward_flops(run) -> int:
    """FLOPs of ``run()`` (one denoiser call), counted by torch's own ``FlopCounterMode`` (matmuls, convs, attention).

    torch 2.13's registry has no formula for the CPU flash-attention kernel that ``scaled_dot_product_attention``
    dispatches to here, so the same SDPA formula torch uses for the GPU kernels is added for it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})
    with counter:
        run()
    return int(counter.get_total_flops())

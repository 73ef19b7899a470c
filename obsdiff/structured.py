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
from pathlib import Path

import torch
from torch import nn

from obsdiff.errors import UsageError
from obsdiff.solver import finite_or_none

log = logging.getLogger(__name__)

RRF_K = 60
FFN_BATCHES = 8  # FFN neurons are removed in this many re-scored batches


def validate_structured(config) -> None:
    from obsdiff.prune import Method

    if config.method not in (Method.OBS_DIFF, Method.L1):
        raise UsageError("--pattern structured takes --method obs-diff or l1")
    base = 0.3 if config.sparsity is None else config.sparsity
    config.sparsity = base
    config.head_sparsity = base if config.head_sparsity is None else config.head_sparsity
    config.ffn_sparsity = base if config.ffn_sparsity is None else config.ffn_sparsity
    for name, value in (("--sparsity", base), ("--head-sparsity", config.head_sparsity),
                        ("--ffn-sparsity", config.ffn_sparsity)):
        if not 0 <= value < 1:
            raise UsageError(f"{name} must be in [0, 1) for structured pruning, got {value:g}")
    if config.method is Method.L1 and not config.compensate:
        raise UsageError("--no-compensate is implied by --method l1")
    config._validate_common()


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


# ---- physical shrinking (also used by the loader, with the first n kept) -----------------------------


def _slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = layer.weight.data
    b = layer.bias.data if layer.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def shrink_attention(attn: nn.Module, keep_heads: list[int]) -> None:
    d = attn.to_q.out_features // attn.heads
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in sorted(keep_heads)])
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        layer = getattr(attn, name, None)
        if isinstance(layer, nn.Linear):
            setattr(attn, name, _slice_linear(layer, rows=rows))
    attn.to_out[0] = _slice_linear(attn.to_out[0], cols=rows)
    if isinstance(getattr(attn, "to_add_out", None), nn.Linear):
        attn.to_add_out = _slice_linear(attn.to_add_out, cols=rows)
    attn.heads = len(keep_heads)
    attn.inner_dim = len(keep_heads) * d
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = attn.inner_dim


def shrink_ffn(unit: FFNUnit, keep: list[int], parent: nn.Module) -> None:
    keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
    rows = torch.cat([keep_t, keep_t + unit.inner]) if unit.gated else keep_t
    new_up, new_down = _slice_linear(unit.up, rows=rows), _slice_linear(unit.down, cols=keep_t)
    _set_module(parent, unit.up_path, new_up)
    _set_module(parent, unit.down_path, new_down)
    unit.up, unit.down = new_up, new_down


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


# ---- solving one package ---------------------------------------------------------------------------


def _count(total: int, fraction: float, keep_min: int, what: str, where: str) -> int:
    n = int(round(total * fraction))
    if n > total - keep_min:
        log.warning("%s: removing %d of %d %s would leave fewer than %d; clamped", where, n, total, what, keep_min)
        n = total - keep_min
    return max(n, 0)


def _head_scores(layer: nn.Linear, hessian: torch.Tensor | None, groups: list[list[int]], method: str,
                 damp: float) -> torch.Tensor:
    """Cost of removing each head from one output projection: OBS error, or L1 norm for the baseline."""
    from obsdiff.solver import damped_inverse, group_obs_scores

    w = layer.weight.detach().float()
    if method == "l1":
        return torch.stack([w[:, g].abs().sum() for g in groups])
    return group_obs_scores(w, damped_inverse(hessian.float(), damp), [torch.tensor(g) for g in groups])


def prune_attention(unit: AttentionUnit, hessians: dict[str, torch.Tensor | None], config) -> dict:
    from obsdiff.solver import remove_column_groups

    heads, d = unit.heads, unit.head_dim
    n = _count(heads, config.head_sparsity, 1, "heads", unit.path)
    groups = [list(range(h * d, (h + 1) * d)) for h in range(heads)]
    method = "l1" if config.method.value == "l1" else "obs"
    compensate = config.compensate and method == "obs"
    downs = unit.down_layers()
    forced = None
    if n and len(downs) > 1:  # MMDiT: one head set for both streams, from the fused image and text rankings
        ranks = [_head_scores(layer, hessians.get(name), groups, method, config.damp).argsort().argsort()
                 for name, layer in downs.items()]
        fused = sum(1.0 / (RRF_K + r.float()) for r in ranks)
        forced = fused.argsort(descending=True)[:n].tolist()
    results = {name: remove_column_groups(layer.weight.detach(), hessians.get(name), groups, n, method=method,
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


def prune_ffn(unit: FFNUnit, hessian: torch.Tensor | None, config, component: nn.Module) -> dict:
    from obsdiff.solver import remove_column_groups

    inner = unit.inner
    n = _count(inner, config.ffn_sparsity, 1, "neurons", unit.down_path)
    method = "l1" if config.method.value == "l1" else "obs"
    res = remove_column_groups(unit.down.weight.detach(), hessian, [[q] for q in range(inner)], n, method=method,
                               compensate=config.compensate and method == "obs", damp=config.damp,
                               batch=max(1, math.ceil(n / FFN_BATCHES)))
    unit.down.weight.data.copy_(res.weight.to(unit.down.weight.dtype))
    removed = set(res.removed)
    keep = [q for q in range(inner) if q not in removed]
    shrink_ffn(unit, keep, component)
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


# ---- shapes on disk --------------------------------------------------------------------------------


def apply_shapes(component: nn.Module, shapes: dict) -> None:
    """Resize a freshly built component to the recorded structured shapes (weights loaded afterwards)."""
    for path, heads in shapes.get("attention_heads", {}).items():
        shrink_attention(component.get_submodule(path), list(range(heads)))
    for entry in shapes.get("ffn", []):
        up, down = component.get_submodule(entry["up"]), component.get_submodule(entry["down"])
        unit = FFNUnit("", entry["up"], entry["down"], up, down, entry["gated"])
        shrink_ffn(unit, list(range(entry["inner"])), component)


def load_shrunk_components(path: Path, components: dict) -> dict:
    """Rebuild each shrunk component from its config, resize it, then load its safetensors (no pickle)."""
    import json

    import diffusers
    from safetensors.torch import load_file

    out = {}
    for name, shapes in components.items():
        folder = path / name
        config = json.loads((folder / "config.json").read_text())
        cls = getattr(diffusers, config["_class_name"])
        model = cls.from_config(config)
        apply_shapes(model, shapes)
        files = sorted(folder.glob("*.safetensors"))
        state = {}
        for f in files:
            state.update(load_file(f))
        model.load_state_dict(state, strict=True)
        out[name] = model.eval()
    return out


# ---- size and cost ---------------------------------------------------------------------------------


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def forward_flops(module: nn.Module, run) -> int:
    """Multiply-adds ×2 of Linear, Conv2d and attention matmuls during ``run()`` (one denoiser call)."""
    total = [0]
    handles = []

    def linear_hook(mod, args, out):
        total[0] += 2 * out.numel() * mod.in_features

    def conv_hook(mod, args, out):
        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        total[0] += 2 * out.numel() * k

    def attn_hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states")
        ctx = kwargs.get("encoder_hidden_states")
        if x is None:
            return
        lq = x.shape[1] if x.dim() == 3 else x.shape[-1] * x.shape[-2]
        lk = ctx.shape[1] if ctx is not None and ctx.dim() == 3 and not getattr(mod, "add_q_proj", None) else lq
        if getattr(mod, "add_q_proj", None) is not None and ctx is not None:
            lq = lk = lq + ctx.shape[1]
        total[0] += 4 * x.shape[0] * lq * lk * mod.to_q.out_features

    for m in module.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif hasattr(m, "to_q") and hasattr(m, "heads"):
            handles.append(m.register_forward_hook(attn_hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total[0]

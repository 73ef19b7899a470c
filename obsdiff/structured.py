"""Structured OBS-Diff: remove attention heads, FFN neurons and resnet channel groups, compensate, physically shrink.

Units come from the adapter's ``StructuredLayout``:
- FFN: hidden neuron q is column q of the down projection; scored by Σ_rows W[:, q]²/[H⁻¹]_qq, removed
  in batches with OBS compensation, then the matching rows of the up projection go (both GEGLU halves).
- Heads: a head is its block of ``head_dim`` columns of the output projection (``to_out.0``), scored by the
  exact group OBS error Σ_rows w_S [H⁻¹_SS]⁻¹ w_Sᵀ, removed one at a time with compensation; its rows go
  from q/k/v and the attention's head count drops. MMDiT joint attention ranks heads on ``to_out.0`` (image)
  and ``to_add_out`` (text) separately and fuses the two rankings by reciprocal rank (k = 60), then removes
  the chosen heads from both with compensation, and shrinks ``add_q/k/v_proj`` too.
- Resnet channels: ``conv1``'s output channels go in whole GroupNorm groups of ``norm2`` (the other groups'
  statistics stay exactly what they were). A group is its channels × R × S columns of ``conv2`` (im2col order),
  scored by the exact group OBS error on conv2's Hessian and compensated like FFN neurons; conv1 (out), norm2,
  time_emb_proj (out) and conv2 (in) shrink.
Head size is read from the layer shapes (to_q rows / heads), never assumed.

A budget (``--flops 0.7``) gives each unit its count of groups to remove (``obsdiff.budget``); ``UnitSolver`` then
shrinks one calibrated package at a time and returns its unit records.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from obsdiff.calibration import PackageHooks
from obsdiff.config import Method, PruneConfig
from obsdiff.distributed import World
from obsdiff.errors import UsageError
from obsdiff.packages import PackageResult, block_filter, split_units
from obsdiff.plan import LayerCost, layer_cost, unit_cost
from obsdiff.pruned_folder import ComponentSummary, LayerError, ShrinkSummary, Skip, UnitRecord
from obsdiff.shrink import shrink_attention, shrink_ffn, shrink_resnet
from obsdiff.solver import damped_inverse, finite_or_none, group_obs_scores, remove_column_groups
from obsdiff.sparsity import Structured

log = logging.getLogger(__name__)

RRF_K = 60
FFN_BATCHES = 8  # FFN neurons (and resnet channel groups) are removed in this many re-scored batches


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

    kind = "heads"

    @property
    def key(self) -> str:
        return self.path

    @property
    def total(self) -> int:
        return self.heads

    def down_layers(self) -> dict[str, nn.Module]:
        out = {f"{self.path}.to_out.0": self.module.to_out[0]}
        if self.joint and getattr(self.module, "to_add_out", None) is not None:
            out[f"{self.path}.to_add_out"] = self.module.to_add_out
        return out

    def column_groups(self) -> list[list[int]]:
        d = self.head_dim
        return [list(range(h * d, (h + 1) * d)) for h in range(self.heads)]

    def flop_paths(self) -> list[str]:
        """Modules whose FLOPs are proportional to the head count: the whole attention (q/k/v, SDPA, out)."""
        return [self.path]

    def params_per_group(self) -> int:
        m, d = self.module, self.head_dim
        rows = sum(_row_params(getattr(m, n, None)) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                               "add_v_proj"))
        cols = sum(layer.out_features for layer in self.down_layers().values())
        return d * (rows + cols)


@dataclass
class FFNUnit:
    block: str
    up_path: str
    down_path: str
    up: nn.Linear
    down: nn.Linear
    gated: bool

    kind = "ffn"

    @property
    def inner(self) -> int:
        return self.down.in_features

    @property
    def key(self) -> str:
        return self.down_path

    @property
    def total(self) -> int:
        return self.inner

    def down_layers(self) -> dict[str, nn.Module]:
        return {self.down_path: self.down}

    def column_groups(self) -> list[list[int]]:
        return [[q] for q in range(self.inner)]

    def flop_paths(self) -> list[str]:
        return [self.up_path, self.down_path]

    def params_per_group(self) -> int:
        return _row_params(self.up) * (2 if self.gated else 1) + self.down.out_features


@dataclass
class ResnetUnit:
    """A ResnetBlock2D whose conv1 output channels go in whole GroupNorm groups of norm2."""

    block: str
    path: str  # the ResnetBlock2D, relative to the component
    module: nn.Module
    kind = "channels"

    @property
    def key(self) -> str:
        return self.path

    @property
    def total(self) -> int:
        return self.module.norm2.num_groups

    @property
    def group_size(self) -> int:
        return self.module.norm2.num_channels // self.module.norm2.num_groups

    def down_layers(self) -> dict[str, nn.Module]:
        return {f"{self.path}.conv2": self.module.conv2}

    def column_groups(self) -> list[list[int]]:
        """conv2's im2col columns (C, R, S order, C slowest) of each group's channels."""
        taps = self.module.conv2.kernel_size[0] * self.module.conv2.kernel_size[1]
        per = self.group_size * taps
        return [list(range(g * per, (g + 1) * per)) for g in range(self.total)]

    def flop_paths(self) -> list[str]:
        names = ["conv1", "conv2"] + (["time_emb_proj"] if self.module.time_emb_proj is not None else [])
        return [f"{self.path}.{n}" for n in names]

    def params_per_group(self) -> int:
        m = self.module
        conv1 = m.conv1.in_channels * m.conv1.kernel_size[0] * m.conv1.kernel_size[1] + (m.conv1.bias is not None)
        conv2 = m.conv2.out_channels * m.conv2.kernel_size[0] * m.conv2.kernel_size[1]
        temb = 0
        if m.time_emb_proj is not None:
            temb = _row_params(m.time_emb_proj) * (2 if m.time_embedding_norm == "scale_shift" else 1)
        return self.group_size * (conv1 + 2 + temb + conv2)  # 2: norm2's weight and bias


def _row_params(layer) -> int:
    """Parameters of one output row of a Linear (its weights and bias); 0 for an absent layer."""
    if not isinstance(layer, nn.Linear):
        return 0
    return layer.in_features + (layer.bias is not None)


Unit = AttentionUnit | FFNUnit | ResnetUnit


@dataclass
class FoundUnits:
    """A component's removable units in block order, and the blocks left whole with the reason."""

    units: list = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_units(model: nn.Module, adapter, selected=None) -> FoundUnits:
    """Removable units of the blocks ``selected`` keeps (``--blocks``, as ``packages.block_filter`` reads it; None:
    every block)."""
    layout = adapter.structured
    if layout is None:
        raise UsageError(f"structured pruning has no layout for {type(model).__name__} ({adapter.family}); "
                         "it supports the UNet, SD3 and Flux denoisers and the VAE decoder")
    found_units = FoundUnits()
    for block_name, block in adapter.block_modules(model):
        if selected is not None and not selected(block_name):
            continue
        if layout.skip_attr and getattr(block, layout.skip_attr, False):
            found_units.skipped.append((block_name, layout.skip_reason))
            continue
        if layout.resnets and re.fullmatch(layout.resnets, block_name):
            reason = _resnet_reason(block)
            if reason:
                found_units.skipped.append((block_name, reason))
            else:
                found_units.units.append(ResnetUnit(block_name, block_name, block))
            continue
        modules = dict(block.named_modules())
        found = 0
        for sub, mod in modules.items():
            if (sub and re.fullmatch(layout.attentions, sub) and hasattr(mod, "to_q") and hasattr(mod, "heads")
                    and getattr(mod, "to_out", None) is not None):
                joint = getattr(mod, "add_q_proj", None) is not None
                found_units.units.append(AttentionUnit(block_name, f"{block_name}.{sub}", mod, joint))
                found += 1
        for up_re, down_re, gated in layout.ffns:
            for up in (u for u in modules if re.fullmatch(up_re, u)):
                down = next((d for d in modules if re.fullmatch(down_re, d) and _same_parent(up, d)), None)
                if down is not None and isinstance(modules[up], nn.Linear) and isinstance(modules[down], nn.Linear):
                    found_units.units.append(FFNUnit(block_name, f"{block_name}.{up}", f"{block_name}.{down}", modules[up],
                                              modules[down], gated))
                    found += 1
        if not found and any(isinstance(m, nn.Linear) for m in modules.values()):
            found_units.skipped.append((block_name, "no heads, FFN neurons or resnet channels in a layout that can shrink "
                                             "(e.g. Flux single blocks fuse attention and MLP into one proj_out): "
                                             "left whole"))
    return found_units


def _resnet_reason(block: nn.Module) -> str | None:
    """Why a resnet block's channels cannot be removed exactly (None: they can)."""
    needed = ("conv1", "norm2", "conv2")
    if not all(hasattr(block, n) for n in needed):
        return f"{type(block).__name__} has no conv1/norm2/conv2 (e.g. a spatially conditioned norm): left whole"
    if not isinstance(block.norm2, nn.GroupNorm):
        return f"norm2 is {type(block.norm2).__name__}, not GroupNorm: channels cannot go in whole groups; left whole"
    if block.conv1.groups != 1 or block.conv2.groups != 1:
        return "grouped convolution: left whole"
    if block.conv1.out_channels != block.norm2.num_channels or block.conv2.in_channels != block.norm2.num_channels:
        return "conv1, norm2 and conv2 do not share one channel axis: left whole"
    if block.norm2.num_groups < 2:
        return "norm2 has a single group: removing it would empty the block; left whole"
    return None


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


def fraction_count(unit: Unit, spec: Structured) -> int:
    """Groups to remove from ``unit`` under the spec's per-kind fractions (no budget)."""
    fraction = {"heads": spec.heads, "ffn": spec.ffn, "channels": spec.channels}[unit.kind]
    return _count(unit.total, fraction, 1, unit.kind, unit.key)


def _head_scores(layer: nn.Linear, hessian: torch.Tensor | None, groups: list[list[int]], by_l1_norm: bool,
                 damp: float) -> torch.Tensor:
    """Cost of removing each head from one output projection: OBS error, or L1 norm for the baseline."""
    w = layer.weight.detach().float()
    if hessian is not None:
        w = w.to(hessian.device)  # --hessian-device cpu with a GPU model: score where H is
    if by_l1_norm:
        return torch.stack([w[:, g].abs().sum() for g in groups])
    return group_obs_scores(w, damped_inverse(hessian.float(), damp), [torch.tensor(g) for g in groups])


def _spec(config: PruneConfig) -> Structured:
    if not isinstance(config.sparsity, Structured):
        raise UsageError(f"structured pruning needs the structured pattern, got {config.sparsity}")
    return config.sparsity


def down_matrix(layer: nn.Module) -> torch.Tensor:
    """The down layer's weight with columns in its Hessian's order (a conv flattened as im2col: C, R, S)."""
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1)


def _layer_errors(results: dict) -> dict[str, LayerError]:
    return {k: LayerError(finite_or_none(v.error), finite_or_none(v.relative_error)) for k, v in results.items()}


def prune_attention(unit: AttentionUnit, hessians: dict[str, torch.Tensor | None], config: PruneConfig,
                    n: int | None = None) -> UnitRecord:
    """Remove ``n`` heads (default: the spec's head fraction), compensating the output projection(s)."""
    heads, d = unit.heads, unit.head_dim
    n = fraction_count(unit, _spec(config)) if n is None else n
    groups = unit.column_groups()
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
    return UnitRecord("", unit.path, "heads", heads, len(keep), 0, _layer_errors(results), tuple(sorted(removed)),
                      head_dim=d)


def prune_ffn(unit: FFNUnit, hessian: torch.Tensor | None, config: PruneConfig, component: nn.Module,
              n: int | None = None) -> UnitRecord:
    """Remove ``n`` hidden neurons (default: the spec's FFN fraction), compensating the down projection."""
    inner = unit.inner
    n = fraction_count(unit, _spec(config)) if n is None else n
    by_l1 = config.method is Method.L1
    res = remove_column_groups(unit.down.weight.detach(), hessian, unit.column_groups(), n, by_l1_norm=by_l1,
                               compensate=config.compensate and not by_l1, damp=config.damp,
                               batch=max(1, math.ceil(n / FFN_BATCHES)))
    unit.down.weight.data.copy_(res.weight.to(unit.down.weight.dtype))
    removed = set(res.removed)
    keep = [q for q in range(inner) if q not in removed]
    unit.up, unit.down = shrink_ffn(component, unit.up_path, unit.down_path, unit.gated, keep)
    return UnitRecord("", unit.down_path, "ffn", inner, len(keep), 0, _layer_errors({unit.down_path: res}),
                      up=unit.up_path, gated=unit.gated)


def prune_resnet(unit: ResnetUnit, hessian: torch.Tensor | None, config: PruneConfig,
                 n: int | None = None) -> UnitRecord:
    """Remove ``n`` GroupNorm groups of channels (default: the spec's channel fraction), compensating conv2."""
    groups = unit.total
    n = fraction_count(unit, _spec(config)) if n is None else n
    by_l1 = config.method is Method.L1
    conv2 = unit.module.conv2
    res = remove_column_groups(down_matrix(conv2), hessian, unit.column_groups(), n, by_l1_norm=by_l1,
                               compensate=config.compensate and not by_l1, damp=config.damp,
                               batch=max(1, math.ceil(n / FFN_BATCHES)))
    conv2.weight.data.copy_(res.weight.reshape(conv2.weight.shape).to(conv2.weight.dtype))
    removed = set(res.removed)
    keep = [g for g in range(groups) if g not in removed]
    shrink_resnet(unit.module, keep)
    return UnitRecord("", unit.path, "channels", groups, len(keep), 0, _layer_errors({f"{unit.path}.conv2": res}),
                      tuple(sorted(removed)), group_size=unit.group_size)


def prune_unit(unit: Unit, hessians: dict[str, torch.Tensor | None], config: PruneConfig, component: nn.Module,
               n: int | None = None) -> UnitRecord:
    """One unit of any kind: its groups scored on its down layers' Hessians, removed, compensated, shrunk."""
    if isinstance(unit, AttentionUnit):
        return prune_attention(unit, hessians, config, n)
    hessian = next(iter(hessians.values()))
    if isinstance(unit, FFNUnit):
        return prune_ffn(unit, hessian, config, component, n)
    return prune_resnet(unit, hessian, config, n)


class UnitSolver:
    """Heads, FFN neurons and resnet channel groups: scored, compensated and physically removed; shapes recorded.

    Without a budget each unit loses its kind's fraction; with one, the counts (``obsdiff.budget``) come in to
    ``solve``.
    """

    reshapes = True

    def __init__(self, config: PruneConfig, spec: Structured) -> None:
        self.config, self.spec = config, spec

    def packages(self, name: str, module: nn.Module, adapter) -> tuple[list[list[Unit]], list[Skip]]:
        if self.spec.budget is not None and not adapter.denoiser:
            raise UsageError(f"--{self.spec.budget.measure} budgets the denoiser; prune {name} with --head-sparsity, "
                             "--ffn-sparsity or --channel-sparsity")
        found = find_units(module, adapter, block_filter(self.config.blocks, [b for b, _ in adapter.block_modules(module)]))
        units = found.units
        if self.spec.budget is None:  # a kind whose fraction is 0 is not calibrated at all
            units = [u for u in units if fraction_count(u, self.spec) > 0]
        if not units:
            where = f" in --blocks {self.config.blocks}" if self.config.blocks else ""
            raise UsageError(f"component {name} has no attention heads, FFN neurons or resnet channels to remove "
                             f"at these fractions{where}")
        return split_units(units, self.config.packages), [Skip(b, r) for b, r in found.skipped]

    def hooked_layers(self, package: list[Unit]) -> dict[str, nn.Module]:
        return {n: m for unit in package for n, m in unit.down_layers().items()}

    def layer_costs(self, model: nn.Module, package: list[Unit], statistic: str, dtype_bytes: int,
                    input_shapes: dict) -> list[LayerCost]:
        """One cost per unit (its down layers' Hessians and the group solve), so ``--max-memory`` splits packages at
        whole units."""
        return [unit_cost(u.key, u.block, [layer_cost(model, n, m, u.block, statistic, dtype_bytes, input_shapes.get(n))
                                            for n, m in u.down_layers().items()]) for u in package]

    def solve(self, component: str, module: nn.Module, package: list[Unit], index: int, hooks: PackageHooks | None,
              world: World, counts: dict[str, int] | None = None) -> PackageResult:
        result = PackageResult()
        for unit in tqdm(package, desc=f"shrink {component} {index + 1}", leave=False, mininterval=2):
            hessians = {n: hooks.hessian(n).hessian if hooks else None for n in unit.down_layers()}
            n = counts[unit.key] if counts is not None else None
            record = prune_unit(unit, hessians, self.config, module, n)
            result.units.append(replace(record, component=component, package=index))
            if hooks is not None:
                for layer in unit.down_layers():
                    hooks.release(layer)
        return result

    def summary(self, name: str, adapter, packages: list, skipped: list[Skip], layers: list, units: list[UnitRecord],
                costs: tuple[dict, dict] | None) -> ComponentSummary:
        before, after = costs
        return ComponentSummary(adapter.family, [[u.key for u in p] for p in packages],
                                [Skip(f"{name}.{s.name}", s.reason) for s in skipped],
                                shrink=ShrinkSummary.of(units, str(self.spec.budget) if self.spec.budget else None,
                                                        before, after))


# ---- size and cost ---------------------------------------------------------------------------------


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def flops_by_module(run, prefix: str = "") -> tuple[int, dict[str, int]]:
    """Total FLOPs of ``run()`` and each submodule's, keyed by its path (``prefix`` + path in the called module)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})
    with counter:
        run()
    by_module = {}
    for name, ops in counter.get_flop_counts().items():
        _, _, path = name.partition(".")  # "UNet2DConditionModel.down_blocks.0…": the root class comes first
        if path:
            by_module[prefix + path] = int(sum(ops.values()))
    return int(counter.get_total_flops()), by_module


def forward_flops(run) -> int:
    """FLOPs of ``run()`` (one denoiser call), counted by torch's own ``FlopCounterMode`` (matmuls, convs, attention).

    torch 2.13's registry has no formula for the CPU flash-attention kernel that ``scaled_dot_product_attention``
    dispatches to here, so the same SDPA formula torch uses for the GPU kernels is added for it.
    """
    return flops_by_module(run)[0]

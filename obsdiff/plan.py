"""Memory plan of a prune, made from shapes alone (nothing is calibrated).

A package holds the Hessians of all its layers while it calibrates (cols² × 4 or 8 bytes each; layers fed the
very same input share one; Wanda keeps only the diagonal, magnitude nothing). Then its layers are solved,
narrowest first: each solve adds one float32 Hessian-sized buffer plus a few weight-sized ones, and each Hessian is freed
once its last layer is solved. Calibration also holds the denoiser's activations, measured by running it once on
the ``meta`` device (no memory, no compute) with every created tensor counted while it is alive.

``plan_packages`` sizes the packages (whole blocks in forward order, split at layers only when a block alone is
over budget) so that every package fits ``budget`` bytes of Hessians, workspace and activations.
"""

from __future__ import annotations

import json
import math
import os
import resource
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from obsdiff.errors import UsageError
from obsdiff.hessian import UNFOLD_BYTES
from obsdiff.solver import CHUNK_BYTES

GIB = 1024**3
CPU = torch.device("cpu")
# What a running prune allocates beyond the model, Hessians and activations (allocator arenas, kernel scratch,
# the pipeline's own small tensors, records): measured at ~60 MiB on the shipped model, rounded up.
RUNTIME_SLACK = 128 << 20
_QKV = ("to_q", "to_k", "to_v")
_ADDED = ("add_q_proj", "add_k_proj", "add_v_proj")

# A calibration call's activations are held to this share of the memory budget by running the call in slices of its
# batch (``lean.SplitCalls``, which leaves the Hessians as they are): the rest of the budget goes to Hessians.
ACTIVATION_SHARE = 0.125
# A real calibration call holds more than the live tensors ``activation_bytes`` counts on ``meta`` (oneDNN and attention
# scratch, the allocator): the plan counts activations × this. Measured by ``python -m benchmarks.activation_transient``
# (benchmarks/results/activation_transient.md): SD 1.5 at 512 px 1.34×, SDXL at 1024 px 1.63× (the shipped model's
# 2.9× is 0.7 MiB, which RUNTIME_SLACK covers). The largest, rounded up.
ACTIVATION_TRANSIENT = 1.65

def shared_input_key(model: nn.Module, name: str) -> str:
    """Which Hessian a layer accumulates into: what the calibration hooks find by tensor identity, from shapes.

    A self-attention's q/k/v read one tensor; a cross-attention's k/v read the text states (q reads the image);
    joint attention's add_q/k/v read the context. Every other layer has its own.
    """
    parent, _, leaf = name.rpartition(".")
    if leaf in _ADDED:
        return f"{parent}.add_qkv"
    if leaf in _QKV:
        attn = model.get_submodule(parent) if parent else model
        if leaf == "to_q" and getattr(attn, "is_cross_attention", False):
            return name
        return f"{parent}.{'kv' if getattr(attn, 'is_cross_attention', False) else 'qkv'}"
    return name


@dataclass
class LayerCost:
    name: str
    block: str
    hessian: str  # key of the Hessian it reads
    columns: int
    hessian_bytes: int
    workspace_bytes: int
    calibration_bytes: int  # transient of one hook call (a conv's im2col chunk and its reshaped copy)


def unit_cost(key: str, block: str, layers: list[LayerCost]) -> LayerCost:
    """A structured unit as one item: its down layers' Hessians (each its own) held together, and the group solve's
    workspace: a dead-filled copy of H, H + λI, its factor, the inverse and its product, and the downdates (8 float32
    H-sized buffers of its widest layer) on top of the weights."""
    widest = max(layers, key=lambda c: c.columns)
    workspace = 8 * widest.columns * widest.columns * 4 + widest.workspace_bytes
    return LayerCost(key, block, key, widest.columns, sum(c.hessian_bytes for c in layers), workspace,
                     max(c.calibration_bytes for c in layers))


def layer_cost(model: nn.Module, name: str, module: nn.Module, block: str, statistic: str, dtype_bytes: int,
               input_shape: tuple[int, ...] | None = None) -> LayerCost:
    """``statistic``: "full" (OBS), "diagonal" (Wanda) or "none" (magnitude); ``input_shape`` at calibration size."""
    rows = module.weight.shape[0]
    cols = module.weight[0].numel()
    weight_bytes = rows * cols * 4
    hessian = {"full": cols * cols, "diagonal": cols, "none": 0}[statistic] * dtype_bytes
    # copies of W, its mask, error rows and the chunked products of the error; the workspace and its fill chunks
    workspace = 6 * weight_bytes + 3 * min(CHUNK_BYTES, weight_bytes)
    if statistic == "full":
        workspace += cols * cols * 4 + 2 * min(CHUNK_BYTES, cols * cols * 4)
    calibration = 0
    if isinstance(module, nn.Conv2d) and statistic != "none":
        if input_shape is None:
            calibration = 5 * UNFOLD_BYTES // 2
        else:  # the im2col matrix of one hook call (chunked above UNFOLD_BYTES) and its reshaped copy
            b, _, h, w = input_shape
            calibration = 5 * min(UNFOLD_BYTES, b * cols * (h + 2) * (w + 2) * 4) // 2  # + isfinite's mask
    return LayerCost(name, block, shared_input_key(model, name), cols, hessian, workspace, calibration)


@dataclass
class PackagePlan:
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def hessian_bytes(self) -> int:
        return sum({c.hessian: c.hessian_bytes for c in self.layers}.values())

    def need(self, activation_bytes: int) -> int:
        """Peak bytes on top of the loaded model: calibration (all Hessians, activations) or the worst solve."""
        alive = self.hessian_bytes
        calibration = alive + activation_bytes + max((c.calibration_bytes for c in self.layers), default=0)
        order = sorted(self.layers, key=lambda c: c.columns)  # the driver's solve order: narrowest first
        last = {c.hessian: i for i, c in enumerate(order)}
        peak = calibration
        for i, c in enumerate(order):
            peak = max(peak, alive + c.workspace_bytes)
            if last[c.hessian] == i:
                alive -= c.hessian_bytes
        return peak + RUNTIME_SLACK

    @property
    def largest(self) -> LayerCost:
        return max(self.layers, key=lambda c: c.hessian_bytes + c.workspace_bytes)


def _groups_of(costs: list[LayerCost], by_block: bool) -> list[list[LayerCost]]:
    """Consecutive runs that must stay together: whole blocks, or layers sharing one Hessian."""
    out: list[list[LayerCost]] = []
    for c in costs:
        key = c.block if by_block else c.hessian
        if out and (out[-1][-1].block if by_block else out[-1][-1].hessian) == key:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def fit_to_budget(packages: list[list[LayerCost]], budget: int, activation_bytes: int) -> list[list[LayerCost]]:
    """Split every package over ``budget``: whole blocks first; a block alone over budget at its layers."""
    fitted: list[list[LayerCost]] = []
    for package in packages:
        if PackagePlan(package).need(activation_bytes) <= budget:
            fitted.append(package)
            continue
        current: list[LayerCost] = []
        for block in _groups_of(package, by_block=True):
            units = [block] if PackagePlan(block).need(activation_bytes) <= budget else _groups_of(block, by_block=False)
            for unit in units:
                need = PackagePlan(unit).need(activation_bytes)
                if need > budget:
                    raise UsageError(f"--max-memory {budget / GIB:.2f} GiB is too small for layer {unit[0].name}: "
                                     f"its Hessian and solve need {need / GIB:.2f} GiB")
                if current and PackagePlan(current + unit).need(activation_bytes) > budget:
                    fitted.append(current)
                    current = []
                current = current + unit
        if current:
            fitted.append(current)
    return fitted


def memory_plan(packages: dict[str, list[list]], costs_of: Callable[[str, list], list[LayerCost]],
                activations: int, budget: int, budget_from: str, passes: int,
                device: torch.device = CPU) -> tuple[dict, dict[str, list[list]]]:
    """Each component's packages re-split (layers kept whole, order kept) so that each fits ``budget`` bytes on top
    of the process as it is now; the plan (for ``--plan`` and ``pruning.json``) and the packages to run.

    ``costs_of(component, package)`` gives one cost per item of the package (a layer, or a structured unit with its
    down layers); an item that cannot fit is a one-line error naming it.
    """
    base = device_base(device)  # after one real pipeline call: the runtime's own caches and arenas are part of it
    summary: dict = {"device": str(device), "budget_gib": budget / GIB, "budget_from": budget_from,
                     "base_rss_gib": base / GIB,
                     "activation_gib": activations / GIB, "calibration_passes_per_package": passes, "components": {}}
    fitted_packages: dict[str, list[list]] = {}
    worst = 0
    for name, component_packages in packages.items():
        costs = [costs_of(name, p) for p in component_packages]  # one cost per package item, in order
        try:
            fitted = fit_to_budget(costs, budget, activations)
        except UsageError as exc:
            raise UsageError(f"{name}: {exc} (budget from {budget_from})") from None
        item_of = {c.name: item for p, pc in zip(component_packages, costs) for item, c in zip(p, pc)}
        fitted_packages[name] = [[item_of[c.name] for c in p] for p in fitted]
        rows = []
        for p in fitted:
            plan = PackagePlan(p)
            need = plan.need(activations)
            worst = max(worst, need)
            rows.append({"layers": len(p), "first": p[0].name, "last": p[-1].name,
                         "hessians": len({c.hessian for c in p}), "hessian_gib": plan.hessian_bytes / GIB,
                         "largest_layer": plan.largest.name, "workspace_gib": plan.largest.workspace_bytes / GIB,
                         "need_gib": need / GIB, "expected_peak_gib": (base + need) / GIB})
        summary["components"][name] = rows
    summary["expected_peak_gib"] = (base + worst) / GIB
    return summary, fitted_packages


def batched_like(args: tuple, kwargs: dict, batch: int, new_batch: int, latent: tuple[int, int] | None = None,
                 new_latent: tuple[int, int] | None = None) -> tuple[tuple, dict]:
    """The same call with every batch-sized tensor resized to ``new_batch``, and every 4-D tensor whose last two dims
    are the ``latent`` size resized to ``new_latent`` (shapes only, on ``meta``: for the activation estimate)."""
    def resize(x):
        if not isinstance(x, torch.Tensor) or not x.dim():
            return x
        shape = list(x.shape)
        if shape[0] == batch:
            shape[0] = new_batch
        if latent and new_latent and x.dim() == 4 and tuple(shape[-2:]) == tuple(latent):
            shape[-2:] = new_latent
        return x.new_empty(shape, device="meta") if shape != list(x.shape) else x

    return torch.utils._pytree.tree_map(resize, args), torch.utils._pytree.tree_map(resize, kwargs)


class _LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every tensor an op creates (views and in-place results excluded) while it lives."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


class _FlashAttention(torch.overrides.TorchFunctionMode):
    """On ``meta``, scaled_dot_product_attention falls back to the math kernel, which builds the L×L weights; the
    CPU and GPU kernels are fused (flash), so here it only creates its output, as they do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            value = args[2] if len(args) > 2 else kwargs["value"]
            return torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
        return func(*args, **kwargs)


def activation_bytes(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Peak bytes of the tensors one forward creates, measured on the ``meta`` device (no memory, no compute),
    and the input shape of every conv and Linear (what a calibration call feeds each layer). The module runs with
    meta stand-ins for its parameters, buffers and inputs (``torch.func.functional_call``)."""

    def to_meta(x):
        return torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x

    state = {k: to_meta(v) for k, v in [*module.named_parameters(), *module.named_buffers()]}
    margs = torch.utils._pytree.tree_map(to_meta, args)
    mkwargs = torch.utils._pytree.tree_map(to_meta, kwargs)
    shapes: dict[str, tuple[int, ...]] = {}
    def record(name: str):
        def hook(mod, inputs) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in module.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    counter = _LiveTensors()
    try:
        with torch.no_grad(), _FlashAttention(), counter:
            torch.func.functional_call(module, state, margs, mkwargs)
    finally:
        for h in hooks:
            h.remove()
    return counter.peak, shapes


class _FlashAttentionWithGrad(torch.overrides.TorchFunctionMode):
    """``_FlashAttention`` for a training step: the output stays connected to the query, so the backward pass runs
    and counts what it holds (a fused kernel saves its inputs and output, never the L×L weights)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, key, value = (list(args) + [kwargs.get(k) for k in ("query", "key", "value")][len(args):])[:3]
            tied = key.sum() * 0 + value.sum() * 0  # gradients reach the key and value projections too
            return query.narrow(-1, 0, 1).expand(*query.shape[:-1], value.shape[-1]) * 1.0 + tied
        return func(*args, **kwargs)


def training_activation_bytes(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """Peak bytes of the tensors one training step's forward creates and keeps for the backward (its saved
    activations), measured on ``meta`` like ``activation_bytes``, with the module's gradient checkpointing if enabled.
    The backward itself runs outside the dispatch mode (the autograd engine), so its tensors and the parameters'
    gradients are not in this count: the caller adds them."""

    def to_meta(x, grad: bool = False):
        if not isinstance(x, torch.Tensor):
            return x
        out = torch.empty(x.shape, dtype=x.dtype, device="meta")
        return out.requires_grad_() if grad and x.is_floating_point() else out

    state = {k: to_meta(v, grad=True) for k, v in module.named_parameters()}
    state.update({k: to_meta(v) for k, v in module.named_buffers()})
    margs = torch.utils._pytree.tree_map(to_meta, args)
    mkwargs = torch.utils._pytree.tree_map(to_meta, kwargs)
    counter = _LiveTensors()
    was_training = module.training
    module.train()
    try:
        with torch.enable_grad(), _FlashAttentionWithGrad(), counter:
            outputs = torch.func.functional_call(module, state, margs, mkwargs)  # its graph holds what is saved
        del outputs
    finally:
        module.train(was_training)
    return counter.peak


def activation_floor(model_dir: Path, height: int, width: int, batch: int) -> int:
    """A lower bound of one denoiser call's activations at this size, from the folder's configs alone (nothing loaded):
    the first level's feature map, at the full latent resolution and the classifier-free-guidance batch, held about
    four times at once (input, norm, conv output, skip). A real call needs more, so refusing a size above the budget
    never refuses one that fits."""
    def config(name: str) -> dict:
        path = model_dir / name / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    denoiser = config("unet") or config("transformer")
    vae_scale = 2 ** (len(config("vae").get("block_out_channels", (0,) * 4)) - 1)
    h, w = height // vae_scale, width // vae_scale
    if "block_out_channels" in denoiser:  # a UNet
        channels, positions = denoiser["block_out_channels"][0], h * w
    else:  # a transformer: tokens of patch × patch latents, its hidden width
        patch = denoiser.get("patch_size") or 1
        channels = denoiser.get("num_attention_heads", 1) * denoiser.get("attention_head_dim", 1)
        positions = (h // patch) * (w // patch)
    return 4 * 2 * batch * channels * positions * 4


def rows_per_call(module: nn.Module, input_shape: tuple[int, ...] | None) -> int | None:
    """How many Hessian rows one call gives a layer: a Linear's tokens, a conv's output positions (im2col rows)."""
    if input_shape is None:
        return None
    if isinstance(module, nn.Linear):
        return int(math.prod(input_shape[:-1]))
    if isinstance(module, nn.Conv2d) and len(input_shape) == 4:
        n, _, h, w = input_shape
        size = []
        for dim, k, s, p, d in zip((h, w), module.kernel_size, module.stride, module.padding, module.dilation):
            p = p if isinstance(p, int) else 0  # "same"/"valid" strings: unpadded is the lower bound
            size.append((dim + 2 * p - d * (k - 1) - 1) // s + 1)
        return n * size[0] * size[1]
    return None


def check_size_fits(model_dir: Path, height: int | None, width: int | None, batch: int, budget: int,
                    budget_from: str) -> None:
    """Refuse, before any work, a size whose denoiser activations alone cannot fit the budget (unset: native)."""
    if not height and not width:
        return
    configs = {n: json.loads((model_dir / n / "config.json").read_text()) for n in ("unet", "transformer", "vae")
               if (model_dir / n / "config.json").is_file()}
    native = (configs.get("unet") or configs.get("transformer") or {}).get("sample_size") or 64
    scale = 2 ** (len(configs.get("vae", {}).get("block_out_channels", (0,) * 4)) - 1)
    height, width = height or native * scale, width or native * scale
    need = activation_floor(model_dir, height, width, batch)
    if need > budget:
        raise UsageError(f"{height}×{width} px needs at least {need / GIB:.1f} GiB of denoiser activations per call, "
                         f"over the {budget / GIB:.1f} GiB budget ({budget_from}): choose a smaller size")


def device_base(device: torch.device) -> int:
    """What the device already holds before the plan's buffers: the process's resident memory on a CPU, the bytes
    PyTorch has allocated on a GPU (host RSS is another memory)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return current_rss()


def device_peak(device: torch.device) -> int:
    """The run's peak on its device: VmHWM on a CPU, ``max_memory_allocated`` on a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss()


def current_rss() -> int:
    """This process's resident memory now (Linux /proc; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """This process's peak resident memory, in bytes (Linux: the memory map's high-water mark, VmHWM).

    Not ``getrusage().ru_maxrss``: Linux carries the parent's high-water mark into a process started with
    fork/vfork + exec, so a prune launched from a 2 GiB test runner reported a 2 GiB peak of its own.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory(device: torch.device) -> int:
    """The default budget: free memory of the GPU (after the caching allocator hands back what it holds), or RAM that
    is still available."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return math.inf  # type: ignore[return-value]

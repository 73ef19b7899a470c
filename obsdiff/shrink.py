"""Physical shrinking of a component, and the loader of shrunk folders.

Structured pruning decides which heads and FFN neurons go (``obsdiff.structured``); this module only slices
the layers; ``apply_shapes`` resizes a freshly built component to the shapes recorded in ``pruning.json``
(keeping the first n), so that ``model_io`` loads a shrunk folder without importing the pruning code.
"""

from __future__ import annotations

import torch
from torch import nn


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
    """Keep only ``keep_heads``: rows of q/k/v (and MMDiT's add_q/k/v), columns of the output projection(s)."""
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


def shrink_ffn(root: nn.Module, up_path: str, down_path: str, gated: bool, keep: list[int]) -> tuple[nn.Linear, nn.Linear]:
    """Keep hidden neurons ``keep``: rows of the up projection (both halves when gated), columns of the down one."""
    up, down = root.get_submodule(up_path), root.get_submodule(down_path)
    keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
    rows = torch.cat([keep_t, keep_t + down.in_features]) if gated else keep_t
    new_up, new_down = _slice_linear(up, rows=rows), _slice_linear(down, cols=keep_t)
    root.set_submodule(up_path, new_up)
    root.set_submodule(down_path, new_down)
    return new_up, new_down


def apply_shapes(component: nn.Module, shapes: dict) -> None:
    """Resize a freshly built component to the recorded structured shapes (weights loaded afterwards)."""
    for path, heads in shapes.get("attention_heads", {}).items():
        shrink_attention(component.get_submodule(path), list(range(heads)))
    for entry in shapes.get("ffn", []):
        shrink_ffn(component, entry["up"], entry["down"], entry["gated"], list(range(entry["inner"])))

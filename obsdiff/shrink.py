"""Physical shrinking of a component, and the loader of shrunk folders.

Structured pruning decides which heads, FFN neurons and resnet channel groups go (``obsdiff.structured``); this module only slices
the layers. ``obsdiff.pruned_folder.ComponentShapes.apply`` uses the same slicers to resize a freshly built component
to recorded shapes (keeping the first n), so a shrunk folder loads without importing the pruning code.
"""

from __future__ import annotations

import torch
from torch import nn


def _sliced(layer: nn.Linear | nn.Conv2d, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    """A copy of a Linear or Conv2d keeping output ``rows`` and input ``cols`` (input channels for a conv)."""
    w = layer.weight.data
    b = layer.bias.data if layer.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    kwargs = dict(bias=b is not None, dtype=w.dtype, device=w.device)
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation, padding_mode=layer.padding_mode, **kwargs)
    else:
        new = nn.Linear(w.shape[1], w.shape[0], **kwargs)
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
            setattr(attn, name, _sliced(layer, rows=rows))
    attn.to_out[0] = _sliced(attn.to_out[0], cols=rows)
    if isinstance(getattr(attn, "to_add_out", None), nn.Linear):
        attn.to_add_out = _sliced(attn.to_add_out, cols=rows)
    attn.heads = len(keep_heads)
    attn.inner_dim = len(keep_heads) * d
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = attn.inner_dim


def shrink_ffn(root: nn.Module, up_path: str, down_path: str, gated: bool, keep: list[int]) -> tuple[nn.Linear, nn.Linear]:
    """Keep hidden neurons ``keep``: rows of the up projection (both halves when gated), columns of the down one."""
    up, down = root.get_submodule(up_path), root.get_submodule(down_path)
    keep_t = torch.as_tensor(sorted(keep), dtype=torch.long)
    rows = torch.cat([keep_t, keep_t + down.in_features]) if gated else keep_t
    new_up, new_down = _sliced(up, rows=rows), _sliced(down, cols=keep_t)
    root.set_submodule(up_path, new_up)
    root.set_submodule(down_path, new_down)
    return new_up, new_down


def shrink_resnet(block: nn.Module, keep_groups: list[int]) -> None:
    """Keep GroupNorm groups ``keep_groups`` of a ResnetBlock2D's inner channels: conv1 (out), norm2, time_emb_proj
    (out; both halves for scale_shift) and conv2 (in). Whole groups go, so the kept groups normalise exactly as before.
    """
    norm = block.norm2
    size = norm.num_channels // norm.num_groups
    channels = torch.cat([torch.arange(g * size, (g + 1) * size) for g in sorted(keep_groups)])
    block.conv1 = _sliced(block.conv1, rows=channels)
    new_norm = nn.GroupNorm(len(keep_groups), len(channels), eps=norm.eps, affine=norm.affine,
                            dtype=norm.weight.dtype if norm.affine else None,
                            device=norm.weight.device if norm.affine else None)
    if norm.affine:
        new_norm.weight.data.copy_(norm.weight.data[channels])
        new_norm.bias.data.copy_(norm.bias.data[channels])
    block.norm2 = new_norm
    if isinstance(getattr(block, "time_emb_proj", None), nn.Linear):
        rows = channels
        if getattr(block, "time_embedding_norm", "default") == "scale_shift":
            rows = torch.cat([channels, channels + norm.num_channels])
        block.time_emb_proj = _sliced(block.time_emb_proj, rows=rows)
    block.conv2 = _sliced(block.conv2, cols=channels)

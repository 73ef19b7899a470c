"""How a prunable layer's weight becomes the solver's 2-D matrix, and back.

The solver's N:M groups are consecutive columns. TensorRT's sparse kernels need the groups along
the reduction axis: a Linear's in_features, and a Conv's input channels C at every kernel tap
(r, s). The conv weight (K, C, R, S) is therefore laid out as (K, R·S·C) — C fastest — and the
im2col Hessian, whose columns come out of ``unfold`` in (C, R, S) order, is permuted to match.
Flattening to C·R·S instead would put groups across kernel taps, which TensorRT ignores.
"""

from __future__ import annotations

import torch
from torch import nn

PRUNABLE = (nn.Linear, nn.Conv2d)


def reduction_size(module: nn.Module) -> int:
    """Length of the axis N:M groups run along (in_features or input channels)."""
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped conv (groups={module.groups}) is not supported"
    return None


def column_permutation(module: nn.Module) -> torch.Tensor | None:
    """Index p with matrix column j = unfold column p[j]; None when the orders already agree."""
    if isinstance(module, nn.Linear):
        return None
    c, (r, s) = module.in_channels, module.kernel_size
    if r * s == 1:
        return None
    # unfold column of (c, r, s) is c·R·S + r·S + s; the matrix wants (r, s, c) order.
    return torch.arange(c * r * s).reshape(c, r * s).T.reshape(-1)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight as it is; a Conv weight (K, C, R, S) as (K, R·S·C), C fastest (a view where possible)."""
    if weight.ndim != 4:
        return weight
    k, c, r, s = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(k, r * s * c)


def from_matrix(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``as_matrix`` for a weight of ``shape``."""
    if len(shape) != 4:
        return matrix
    k, c, r, s = shape
    return matrix.reshape(k, r, s, c).permute(0, 3, 1, 2)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    return as_matrix(module.weight.detach().float()).clone()


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(from_matrix(matrix, module.weight.shape).to(module.weight.dtype))


def permute_hessian(hessian: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return hessian if perm is None else hessian[perm][:, perm]

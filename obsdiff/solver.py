"""The OBS solver: pure math, tensors in and tensors out.

``obs_prune`` is SparseGPT's column-block OBS solve (Cholesky factor of H⁻¹, error compensation of
the not-yet-visited columns) for unstructured and N:M sparsity; ``magnitude_prune`` and
``wanda_prune`` are the baselines in the same form. All take a 2-D weight (rows = outputs,
columns = the reduction axis, already permuted so that N:M groups are consecutive columns) and
return a ``SolveResult``. Nothing here knows about modules, diffusers or logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from obsdiff import quantize
from obsdiff.errors import SolverError
from obsdiff.quantize import Quantization
from obsdiff.sparsity import NM, MaskPattern


@dataclass
class SolveResult:
    weight: torch.Tensor  # pruned (and, for OBS, compensated) weight, float32
    mask: torch.Tensor  # True where the weight was removed
    error: float  # ‖(W − Ŵ)X‖² per calibration row, from H (NaN when no H was given)
    relative_error: float  # error / ‖WX‖²
    damp: float  # damping actually used (after retries)
    scales: torch.Tensor | None = None  # quantization scales (per row, or per row and column group)


def finite_or_none(x: float) -> float | None:
    """Errors go to JSON: NaN (no Hessian) and ±inf become null."""
    return None if math.isnan(x) or math.isinf(x) else x


CHUNK_BYTES = 64 << 20  # temporaries of the chunked Hessian products stay below this


def _row_chunks(rows: int, cols: int) -> list[slice]:
    """Row slices of a rows × cols float32 matrix whose chunks stay below CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (4 * max(cols, 1)))
    return [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _quadratic(m: torch.Tensor, hessian: torch.Tensor, perm: torch.Tensor | None) -> float:
    """½·Σ_rows m H mᵀ, with m's column j meeting H's column perm[j]; chunked, so no Hessian-sized temporary."""
    if perm is not None:
        unpermuted = torch.empty_like(m)
        unpermuted[:, perm] = m
        m = unpermuted
    total = 0.0
    for rows in _row_chunks(*m.shape):
        part = m[rows].to(hessian.dtype)
        total += ((part @ hessian) * part).sum(dtype=torch.float64).item()
    return 0.5 * total


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor,
                         perm: torch.Tensor | None = None) -> tuple[float, float]:
    """‖(W − Ŵ)X‖² and its ratio to ‖WX‖², both per calibration row, from H = 2·E[XXᵀ]."""
    err = _quadratic(weight.float() - pruned.float(), hessian, perm)
    ref = _quadratic(weight.float(), hessian, perm)
    return err, err / ref if ref > 0 else math.nan


def hessian_diagonal(hessian: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """diag(H) in the weight's column order; ``hessian`` may already be just the diagonal (a vector)."""
    diag = (hessian if hessian.dim() == 1 else hessian.diagonal()).float()
    return diag if perm is None else diag[perm]


def _check(weight: torch.Tensor, pattern: MaskPattern) -> None:
    if weight.dim() != 2:
        raise ValueError(f"solver takes a 2-D weight, got shape {tuple(weight.shape)}")
    if isinstance(pattern, NM) and weight.shape[1] % pattern.m:
        raise ValueError(f"{weight.shape[1]} columns do not split into groups of {pattern.m}")


def _mask_from_scores(scores: torch.Tensor, pattern: MaskPattern, per_row: bool) -> torch.Tensor:
    """Lowest scores removed: per N:M group, per row, or over the whole matrix."""
    rows, cols = scores.shape
    if isinstance(pattern, NM):
        grouped = scores.reshape(rows, cols // pattern.m, pattern.m)
        idx = grouped.topk(pattern.n, dim=-1, largest=False).indices
        return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    sparsity = pattern.sparsity
    if per_row:
        k = int(round(cols * sparsity))
        idx = scores.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    k = int(round(scores.numel() * sparsity))
    idx = scores.flatten().topk(k, largest=False).indices
    return torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).scatter_(0, idx, True).reshape(rows, cols)


def _finish(weight: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor | None,
            damp: float = 0.0, perm: torch.Tensor | None = None) -> SolveResult:
    err, rel = reconstruction_error(weight, pruned, hessian, perm) if hessian is not None else (math.nan, math.nan)
    return SolveResult(pruned, mask, err, rel, damp)


def magnitude_prune(weight: torch.Tensor, pattern: MaskPattern, hessian: torch.Tensor | None = None,
                    perm: torch.Tensor | None = None) -> SolveResult:
    """Remove the smallest |w| over the whole layer (or per N:M group); H only measures the error."""
    _check(weight, pattern)
    w = weight.float()
    mask = _mask_from_scores(w.abs(), pattern, per_row=False)
    return _finish(w, w.masked_fill(mask, 0), mask, hessian, perm=perm)


def wanda_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: MaskPattern,
                perm: torch.Tensor | None = None) -> SolveResult:
    """Wanda: score |W_ij|·‖X_j‖, compared within each output row (or N:M group).

    ‖X_j‖² is proportional to H_jj: ``hessian`` is the full H (then the error is reported too) or only its
    diagonal, a vector (what calibration keeps for Wanda: O(columns) memory; the error is then NaN).
    """
    _check(weight, pattern)
    w = weight.float()
    scores = w.abs() * hessian_diagonal(hessian, perm).clamp_min(0).sqrt().unsqueeze(0)
    mask = _mask_from_scores(scores, pattern, per_row=True)
    return _finish(w, w.masked_fill(mask, 0), mask, hessian if hessian.dim() == 2 else None, perm=perm)


def _inverse_cholesky(h: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ tenfold on failure; never falls back silently."""
    mean_diag = h.diagonal().mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(max_retries + 1):
        lam = damp * (10**attempt) * mean_diag
        try:
            lower = torch.linalg.cholesky(h + lam * eye)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True), damp * 10**attempt
        except torch.linalg.LinAlgError:
            continue
    raise SolverError(f"Hessian is not positive definite even with damping {damp * 10**max_retries:g}")


def _fill_workspace(work: torch.Tensor, hessian: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """work ← H[perm][:, perm] in float32, row chunk by row chunk; dead inputs get H_ii = 1. Returns the dead mask."""
    for rows in _row_chunks(*work.shape):
        if perm is None:
            work[rows] = hessian[rows]
        else:
            work[rows] = hessian[perm[rows]][:, perm]
    dead = work.diagonal() == 0
    work.diagonal()[dead] = 1
    return dead


def _inverse_cholesky_in_place(work: torch.Tensor, hessian: torch.Tensor, perm: torch.Tensor | None, damp: float,
                               max_retries: int) -> tuple[torch.Tensor, float]:
    """``work`` (column-major) becomes the upper Cholesky factor of (H + λI)⁻¹ in its own storage: SparseGPT's
    one-buffer chain. A failed factorization has overwritten ``work``, so it is refilled from H before λ is raised.
    """
    info = torch.empty((), dtype=torch.int32, device=work.device)
    for attempt in range(max_retries + 1):
        if attempt:
            _fill_workspace(work, hessian, perm)
        lam = damp * (10**attempt) * work.diagonal().mean().item()
        work.diagonal().add_(lam)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info.item() == 0:
            torch.cholesky_inverse(work, out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info.item() == 0:
                return work, damp * 10**attempt
    raise SolverError(f"Hessian is not positive definite even with damping {damp * 10**max_retries:g}")


@dataclass
class InverseFactor:
    """The upper Cholesky factor of (H + λI)⁻¹ in one column-major buffer, and what the sweep needs besides."""

    upper: torch.Tensor
    dead: torch.Tensor  # inputs that never fired (H_ii = 0): their weight columns are zeroed
    damp: float  # relative damping used, after retries
    lam: float  # λ = damp · mean diag(H)


def inverse_factor(hessian: torch.Tensor, perm: torch.Tensor | None = None, damp: float = 0.01,
                   max_retries: int = 3) -> InverseFactor:
    """H⁻¹'s factor in one float32 Hessian-sized buffer; ``hessian`` is only read, and not needed afterwards.

    The buffer is column-major (a transposed view of a row-major one), LAPACK's layout, so cholesky and
    cholesky_inverse run in place on it (with a row-major ``out`` torch factors a hidden copy and copies it back).
    ``perm`` reorders H's columns to the weight's: weight column j is H's column ``perm[j]`` (a conv's (r, s, c)
    layout over im2col's (c, r, s)).
    """
    cols = hessian.shape[0]
    work = torch.empty(cols, cols, dtype=torch.float32, device=hessian.device).mT
    dead = _fill_workspace(work, hessian, perm)
    mean_diag = work.diagonal().mean().item()
    upper, damp_used = _inverse_cholesky_in_place(work, hessian, perm, damp, max_retries)
    return InverseFactor(upper, dead, damp_used, damp_used * mean_diag)


def _sweep_block(block_size: int, pattern: MaskPattern | None, quant: Quantization | None) -> int:
    """The column block: a multiple of N:M's M and of the quantization group, so neither straddles two blocks."""
    step = math.lcm(pattern.m if isinstance(pattern, NM) else 1, quant.group_size if quant and quant.group_size else 1)
    return max(step, block_size // step * step)


def obs_sweep(weight: torch.Tensor, factor: InverseFactor, pattern: MaskPattern | None, block_size: int = 128,
              mask_block: int = 32, quant: Quantization | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """SparseGPT's column sweep: per column block choose the mask by w²/[H⁻¹]_qq², prune, compensate.

    With ``quant`` (GPTQ) every kept weight of the visited column is also rounded onto its grid before the error is
    taken, so rounding is compensated like pruning; ``pattern`` None only quantizes. Scales: per row from the weights
    as a prune-only sweep leaves them (before the sweep when nothing is pruned), or per group of columns from the
    compensated weights when the sweep enters the group.

    Returns the pruned (and rounded) weight, the mask, ½·ΣE² over the sweep's scaled errors E = (W − Ŵ)·U⁻¹, which is
    exactly ½·(W − Ŵ)(H + λI)(W − Ŵ)ᵀ: the loss, known without H, and the scales (None without ``quant``).
    """
    if pattern is not None:
        _check(weight, pattern)
    if quant is not None and quant.group_size and weight.shape[1] % quant.group_size:
        raise ValueError(f"{weight.shape[1]} columns do not split into quantization groups of {quant.group_size}")
    nm = pattern if isinstance(pattern, NM) else None
    block_size = _sweep_block(block_size, pattern, quant)
    w = weight.float().clone()
    rows, cols = w.shape
    w[:, factor.dead] = 0
    hinv = factor.upper
    mask = torch.zeros_like(w, dtype=torch.bool)
    scale = None
    if quant is not None and quant.group_size is None:
        # Per-row scales from the weights as pruning leaves them: compensation grows the kept weights, and scales
        # taken from the dense rows would clamp them at ±levels (worse than pruning, then rounding to nearest).
        reach = w if pattern is None else obs_sweep(weight, factor, pattern, block_size, mask_block)[0]
        scale = quantize.scales(reach, quant)
    elif quant is not None:
        scale = torch.ones(rows, cols // quant.group_size, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)  # summed on the device: one sync, at the end
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if pattern is not None and nm is None and i % mask_block == 0:
                j = min(i + mask_block, i2 - i1)
                scores = w1[:, i:j] ** 2 / d[i:j].unsqueeze(0) ** 2
                mask[:, i1 + i : i1 + j] = _mask_from_scores(scores, pattern, per_row=False)
            if nm is not None and i % nm.m == 0:
                scores = w1[:, i : i + nm.m] ** 2 / d[i : i + nm.m].unsqueeze(0) ** 2
                mask[:, i1 + i : i1 + i + nm.m] = _mask_from_scores(scores, pattern, per_row=True)
            col = w1[:, i]
            q = col.masked_fill(mask[:, i1 + i], 0)
            if quant is not None:
                g = quant.group_size
                if g and (i1 + i) % g == 0:  # entering a group: its scale from the weights as compensated so far
                    group = w1[:, i : i + g].masked_fill(mask[:, i1 + i : i1 + i + g], 0)
                    scale[:, (i1 + i) // g] = quantize.scales(group, replace(quant, group_size=None)).squeeze(1)
                q = quantize.round_to_grid(q, scale[:, (i1 + i) // g if g else 0], quant)
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        loss += 0.5 * err1.double().pow(2).sum()
    w[mask] = 0
    return w, mask, float(loss.item()), scale


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: MaskPattern | None, damp: float = 0.01,
              block_size: int = 128, mask_block: int = 32, max_retries: int = 3,
              perm: torch.Tensor | None = None, quant: Quantization | None = None) -> SolveResult:
    """SparseGPT-style OBS: ``inverse_factor`` then ``obs_sweep``, the error measured on H itself.

    Dead inputs (H_ii = 0) get H_ii = 1 and their weight column zeroed. Damping is ``damp`` times
    the mean of diag(H). Unstructured masks are chosen adaptively every ``mask_block`` columns, on
    weights already updated by the compensation so far (SparseGPT's adaptive mask selection; our
    layers are narrow, so a finer step than its 128 pays off). Each mask block keeps exactly its
    share, so the layer ends within one weight per block of the target. For N:M the column block is
    rounded down to a multiple of M (at least M), so no group straddles two blocks. ``quant``: GPTQ in the same sweep.

    Memory: ``hessian`` is only read (it may be float64 and shared by q/k/v); beyond it the solve holds one
    float32 Hessian-sized buffer, and the reconstruction error is computed from H in row chunks.
    """
    if pattern is not None:
        _check(weight, pattern)
    factor = inverse_factor(hessian, perm, damp, max_retries)
    w, mask, _, scale = obs_sweep(weight, factor, pattern, block_size, mask_block, quant)
    damp_used = factor.damp
    del factor  # the workspace goes before the error is measured on H
    result = _finish(weight.float(), w, mask, hessian, damp_used, perm)
    result.scales = scale
    return result


def obs_prune_factored(weight: torch.Tensor, factor: InverseFactor, pattern: MaskPattern | None, output_energy: float,
                       block_size: int = 128, mask_block: int = 32, quant: Quantization | None = None) -> SolveResult:
    """OBS once H itself is gone (freed to make room for the sweep): the error comes from the sweep,
    ½(W − Ŵ)H(W − Ŵ)ᵀ = loss − ½λ‖W − Ŵ‖², relative to ``output_energy`` = ½·tr(W H Wᵀ) taken before."""
    w, mask, loss, scale = obs_sweep(weight, factor, pattern, block_size, mask_block, quant)
    original = weight.float().clone()
    original[:, factor.dead] = 0
    err = max(0.0, loss - 0.5 * factor.lam * (original - w).double().pow(2).sum().item())
    return SolveResult(w, mask, err, err / output_energy if output_energy > 0 else math.nan, factor.damp, scale)


def refine_kept_weights(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor,
                        perm: torch.Tensor | None = None, damp: float = 0.01, iterations: int = 20) -> torch.Tensor:
    """The kept weights re-solved jointly for the mask the sweep chose: min ½(W − Ŵ)(H + λI)(W − Ŵ)ᵀ over Ŵ's non-zero
    entries, every row at once, by Jacobi-preconditioned conjugate gradients started from the sweep's Ŵ (so the error
    only falls). The sweep compensates each pruned column once, in column order; this is the least-squares optimum
    for the same zeros (exact after as many iterations as kept columns; a few tens come close). Zeros stay exactly
    zero. Each iteration costs one rows × c × c product."""
    keep = pruned != 0
    h_dtype = hessian.dtype
    diag = hessian_diagonal(hessian, perm)
    lam = damp * diag.mean().item()
    precondition = 1.0 / torch.where(diag > 0, diag, torch.ones_like(diag)).add(lam)

    def times_h(m: torch.Tensor) -> torch.Tensor:  # m (H + λI), m's column j meeting H's column perm[j]
        if perm is None:
            return (m.to(h_dtype) @ hessian).float() + lam * m
        unpermuted = torch.zeros_like(m)
        unpermuted[:, perm] = m
        return (unpermuted.to(h_dtype) @ hessian).float()[:, perm] + lam * m

    error = (pruned.float() - weight.float()) * 1.0  # Ŵ − W: its pruned entries are fixed at −W
    residual = -times_h(error) * keep
    z = residual * precondition
    direction = z.clone()
    rz = (residual * z).sum(1)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        q = times_h(direction) * keep
        alpha = rz / (direction * q).sum(1).clamp_min(tiny)
        error += alpha[:, None] * direction
        residual -= alpha[:, None] * q
        z = residual * precondition
        rz_next = (residual * z).sum(1)
        direction = z + (rz_next / rz.clamp_min(tiny))[:, None] * direction
        rz = rz_next
    return torch.where(keep, weight.float() + error, torch.zeros((), dtype=torch.float32, device=weight.device))


def output_energy(weight: torch.Tensor, hessian: torch.Tensor, perm: torch.Tensor | None = None) -> float:
    """½·tr(W H Wᵀ) = ‖WX‖² per calibration row, chunked (what relative errors are relative to)."""
    return _quadratic(weight.float(), hessian, perm)


# ---- structured: remove whole column groups (heads, FFN neurons) ------------------------------------


@dataclass
class GroupResult:
    weight: torch.Tensor  # removed columns are zero (the caller slices them away)
    removed: list[int]  # group indices, in removal order
    error: float
    relative_error: float


def fill_dead(hessian: torch.Tensor) -> torch.Tensor:
    """A float32 copy of H with dead inputs (H_ii = 0) given H_ii = 1, so that it can be inverted."""
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    return h


def damped_inverse(h: torch.Tensor, damp: float, max_retries: int = 3) -> torch.Tensor:
    """(H + λI)⁻¹ with the solver's damping rule (λ = damp · mean diag H, raised on failure)."""
    upper, _ = _inverse_cholesky(h, damp, max_retries)
    return upper.T @ upper


def group_obs_scores(weight: torch.Tensor, hinv: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """OBS error of removing each column group S with optimal compensation: Σ_rows w_S [H⁻¹_SS]⁻¹ w_Sᵀ.

    For single columns this is Σ_rows W[:, q]² / [H⁻¹]_qq.
    """
    if len({len(s) for s in groups}) == 1:  # equal groups (heads, neurons, channel groups): one batched solve
        index = torch.stack([torch.as_tensor(s, device=hinv.device) for s in groups])  # [G, s]
        blocks = hinv[index[:, :, None], index[:, None, :]]  # [G, s, s]
        ws = weight[:, index].permute(1, 2, 0)  # [G, s, rows]
        return (torch.linalg.solve(blocks, ws) * ws).sum(dim=(1, 2))
    scores = []
    for s in groups:
        ws = weight[:, s]
        block = hinv[s][:, s]
        scores.append((torch.linalg.solve(block, ws.T).T * ws).sum())
    return torch.stack(scores)


def remove_column_groups(weight: torch.Tensor, hessian: torch.Tensor | None, groups: list[list[int]], n_remove: int, *,
                         by_l1_norm: bool = False, compensate: bool = True, damp: float = 0.01, batch: int = 1,
                         forced: list[int] | None = None) -> GroupResult:
    """Remove ``n_remove`` column groups: lowest OBS error first, in batches, with OBS compensation.

    After each batch the remaining columns absorb the removed ones' contribution (δW = −W_S [H⁻¹_SS]⁻¹ H⁻¹_S,:)
    and H⁻¹ is downdated to the remaining columns, then the rest are re-scored (SlimGPT-style).
    ``by_l1_norm`` ranks by the groups' L1 norm once (the baseline); ``compensate=False`` only zeroes. ``forced`` removes
    exactly those groups (a ranking made elsewhere, e.g. fused over two projections).
    """
    w = weight.float().clone().to(hessian.device if hessian is not None else weight.device)
    idx = [torch.as_tensor(g, dtype=torch.long, device=w.device) for g in groups]
    hinv = None
    if hessian is not None and (not by_l1_norm or compensate):
        hinv = damped_inverse(fill_dead(hessian), damp)
    alive = list(range(len(groups)))
    removed: list[int] = []
    if by_l1_norm and forced is None:
        norms = torch.stack([w[:, s].abs().sum() for s in idx])
        forced = norms.argsort()[:n_remove].tolist()
    while len(removed) < n_remove:
        if forced is not None:  # a ranking made elsewhere: all of it in one compensated step
            pick = forced[:n_remove]
        else:
            scores = group_obs_scores(w, hinv, [idx[g] for g in alive])
            pick = [alive[i] for i in scores.argsort()[: min(batch, n_remove - len(removed))].tolist()]
        s = torch.cat([idx[g] for g in pick])
        if compensate and hinv is not None:
            block = hinv[s][:, s]
            w -= torch.linalg.solve(block, w[:, s].T).T @ hinv[s, :]
            hinv = hinv - hinv[:, s] @ torch.linalg.solve(block, hinv[s, :])
        w[:, s] = 0
        removed += pick
        alive = [g for g in alive if g not in pick]
    err, rel = reconstruction_error(weight.float().to(w.device), w, hessian.float()) if hessian is not None \
        else (math.nan, math.nan)
    return GroupResult(w, removed, err, rel)

"""The pure solver and the Hessian statistic, checked against brute force and direct computation."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from obsdiff.errors import SolverError
from obsdiff.hessian import HessianAccumulator, Weighting, layer_rows, timestep_weights
from obsdiff.layers import column_permutation, permute_hessian, set_weight_matrix, weight_matrix
from obsdiff.solver import magnitude_prune, obs_prune, reconstruction_error, refine_kept_weights, wanda_prune
from obsdiff.sparsity import NM, Unstructured, parse_sparsity


def _problem(rows=6, cols=16, samples=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven scales: the case where OBS differs from magnitude.
    mix = torch.randn(cols, cols, generator=g) * 0.5 + torch.eye(cols) * torch.linspace(0.2, 3, cols)
    x = torch.randn(samples, cols, generator=g) @ mix
    w = torch.randn(rows, cols, generator=g)
    return w, x, 2 * x.T @ x / samples


def _optimal_error_for_mask(w_row, h, pruned_cols):
    """Exact OBS: min over the kept weights of ‖(w − ŵ)X‖² with ŵ_S = 0 is ½ w_S [H⁻¹_SS]⁻¹ w_Sᵀ."""
    if not pruned_cols:
        return 0.0
    hinv = torch.linalg.inv(h.double())
    s = list(pruned_cols)
    ws = w_row.double()[s]
    return 0.5 * (ws @ torch.linalg.solve(hinv[s][:, s], ws)).item()


def test_reconstruction_error_matches_direct_computation():
    w, x, h = _problem()
    pruned = w.clone()
    pruned[:, ::3] = 0
    err, rel = reconstruction_error(w, pruned, h)
    direct = ((x @ (w - pruned).T) ** 2).sum(1).mean().item()
    assert err == pytest.approx(direct, rel=1e-5)
    assert rel == pytest.approx(direct / ((x @ w.T) ** 2).sum(1).mean().item(), rel=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_obs_meets_pattern_and_beats_baselines(pattern):
    w, x, h = _problem(rows=32, cols=64)
    pat = parse_sparsity(pattern)
    obs = obs_prune(w, h, pat, damp=0.0)
    wanda = wanda_prune(w, h, pat)
    mag = magnitude_prune(w, pat, h)
    for r in (obs, wanda, mag):
        assert (r.weight[r.mask] == 0).all()
        if isinstance(pat, NM):
            groups = (r.weight == 0).reshape(32, -1, pat.m).sum(-1)
            assert (groups >= pat.n).all()
        else:
            assert (r.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert obs.error < wanda.error <= mag.error * 1.05


def test_obs_compensation_beats_masking_with_its_own_mask():
    w, x, h = _problem(rows=8, cols=32)
    obs = obs_prune(w, h, Unstructured(0.5), damp=0.0)
    masked_only, _ = reconstruction_error(w, w.masked_fill(obs.mask, 0), h)
    assert obs.error < 0.7 * masked_only


def test_obs_compensation_is_exact_when_pruned_columns_lead():
    """Sequential OBS removal with full compensation reaches the exact optimum for its mask when every
    pruned column is visited before every kept one (nothing frozen can miss an update)."""
    w, x, h = _problem(rows=3, cols=8, seed=1)
    w[:, :4] *= 1e-3  # the first half is clearly the cheapest to remove
    obs = obs_prune(w, h, Unstructured(0.5), damp=0.0)
    for r in range(3):
        pruned = [i for i in range(8) if obs.mask[r, i]]
        assert pruned == [0, 1, 2, 3]
        got, _ = reconstruction_error(w[r : r + 1], obs.weight[r : r + 1], h)
        assert got == pytest.approx(_optimal_error_for_mask(w[r], h, pruned), rel=1e-4)


def test_obs_2of4_against_brute_force_over_all_masks():
    """Exhaustive search over every 2:4 mask of each row with exact compensation bounds OBS from below;
    OBS stays ahead of both baselines."""
    w, x, h = _problem(rows=6, cols=8, seed=3)
    pat = NM(2, 4)
    obs = obs_prune(w, h, pat, damp=0.0)
    choices = list(itertools.combinations(range(4), 2))
    best_total = 0.0
    for r in range(w.shape[0]):
        best = min(_optimal_error_for_mask(w[r], h, [*a, *(4 + i for i in b)]) for a in choices for b in choices)
        got, _ = reconstruction_error(w[r : r + 1], obs.weight[r : r + 1], h)
        assert best <= got + 1e-6
        best_total += best
    assert best_total <= obs.error < min(wanda_prune(w, h, pat).error, magnitude_prune(w, pat, h).error)


@pytest.mark.parametrize("pattern", [NM(2, 4), Unstructured(0.7)])
def test_refine_reaches_each_row_s_least_squares_optimum_for_the_sweep_s_zeros(pattern):
    """``--refine``: the same zeros; the kept weights of every row become the damped least-squares solution (solved
    here directly, row by row), which the sweep's one-pass compensation only approaches."""
    w, _, h = _problem(rows=8, cols=32)
    swept = obs_prune(w, h, pattern).weight
    refined = refine_kept_weights(w, swept, h, damp=0.01, iterations=40)
    assert torch.equal(refined == 0, swept == 0)
    damped = h.double() + 0.01 * h.diagonal().mean().item() * torch.eye(32, dtype=torch.float64)
    for row in range(8):
        kept, cut = swept[row] != 0, swept[row] == 0
        exact = w[row, kept].double() + torch.linalg.solve(damped[kept][:, kept], damped[kept][:, cut] @ w[row, cut].double())
        assert torch.allclose(refined[row, kept].double(), exact, atol=1e-4), row
    assert reconstruction_error(w, refined, h)[0] < reconstruction_error(w, swept, h)[0]
    # a conv's permuted columns: the same optimum whichever order H's columns are stored in
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    h_stored = torch.empty_like(h)
    h_stored[perm[:, None], perm[None, :]] = h  # stored so that weight column j meets H's column perm[j]
    assert torch.allclose(refine_kept_weights(w, swept, h_stored, perm, 0.01, 40), refined, atol=1e-4)


def test_dead_inputs_are_zeroed_and_damping_retries():
    w, x, h = _problem(rows=4, cols=8)
    h[2, :] = 0
    h[:, 2] = 0
    res = obs_prune(w, h, Unstructured(0.5))
    assert (res.weight[:, 2] == 0).all()
    with pytest.raises(SolverError):
        obs_prune(w, -torch.eye(8), Unstructured(0.5))


def test_bad_solver_arguments():
    w, _, h = _problem(rows=4, cols=6)
    with pytest.raises(ValueError):
        obs_prune(w, h, NM(2, 4))  # 6 columns do not split into groups of 4
    with pytest.raises(ValueError):
        Unstructured(1.0)
    with pytest.raises(ValueError):
        parse_sparsity("4:2")


def test_timestep_weights_follow_the_formula():
    a = timestep_weights("log-decrease", 25, 0.8, 1.2)
    assert a[0] == pytest.approx(1.2) and a[-1] == pytest.approx(0.8)
    for t in (1, 7, 13, 25):
        assert a[t - 1] == pytest.approx(0.8 + 0.4 / math.log(25) * math.log(25 - t + 1))
    assert all(x > y for x, y in zip(a, a[1:]))
    inc = timestep_weights(Weighting.LOG_INCREASE, 25)
    assert inc[0] == pytest.approx(0.8) and inc[-1] == pytest.approx(1.2)
    assert timestep_weights("linear-decrease", 5) == pytest.approx([1.2, 1.1, 1.0, 0.9, 0.8])
    assert timestep_weights("uniform", 10) == [1.0] * 10


def test_accumulator_is_weighted_mean_of_2xxT():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 4, generator=g), torch.randn(30, 4, generator=g)
    acc = HessianAccumulator(4)
    acc.add(a, 1.2, 0)
    acc.add(b, 0.8, 1)
    expected = 2 * (1.2 * a.T @ a + 0.8 * b.T @ b) / (1.2 * 10 + 0.8 * 30)
    assert torch.allclose(acc.finalize(), expected, atol=1e-5)
    assert acc.steps_seen == {0: 1, 1: 1}


def test_conv_groups_run_along_input_channels_at_every_tap():
    """A 3×3 conv pruned 2:4: groups along C at each (r, s), which flattening C·R·S would not give,
    and the permuted im2col Hessian measures exactly the conv's output error."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    x = torch.randn(4, 8, 6, 6)
    acc = HessianAccumulator(8 * 9)
    acc.add(layer_rows(conv, x), 1.0)
    h = permute_hessian(acc.finalize(), column_permutation(conv))
    dense = conv.weight.detach().clone()
    res = obs_prune(weight_matrix(conv), h, NM(2, 4))
    set_weight_matrix(conv, res.weight)
    assert NM(2, 4).holds(conv.weight.detach().numpy(), axis=1)
    flattened = (conv.weight.detach().reshape(6, -1) == 0).reshape(6, -1, 4).sum(-1)
    assert (flattened < 2).any(), "groups along C·R·S would differ from the TensorRT axis"
    out_dense = F.conv2d(x, dense, None, padding=1)
    out_pruned = F.conv2d(x, conv.weight.detach(), None, padding=1)
    direct = ((out_dense - out_pruned) ** 2).sum(1).mean().item()
    assert res.error == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_the_sweep_knows_the_error_without_h(pattern):
    """½(W − Ŵ)H(W − Ŵ)ᵀ = the sweep's ½ΣE² − ½λ‖W − Ŵ‖²: what the driver reports once H was freed for the sweep."""
    from obsdiff.solver import inverse_factor, obs_prune_factored, output_energy

    w, x, h = _problem(rows=24, cols=64, seed=5)
    h[3, :] = 0
    h[:, 3] = 0  # a dead input
    exact = obs_prune(w, h, pattern)
    factored = obs_prune_factored(w, inverse_factor(h), pattern, output_energy(w, h))
    assert torch.equal(exact.weight, factored.weight) and torch.equal(exact.mask, factored.mask)
    assert factored.error == pytest.approx(exact.error, rel=1e-4)
    assert factored.relative_error == pytest.approx(exact.relative_error, rel=1e-4)

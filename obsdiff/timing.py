"""How long a prune will take, from short timed probes on this machine, before any calibration runs.

Three probes, each a few seconds at most: one denoiser call at the run's size (its time per image), one Hessian
update ``H += XᵀX`` per layer width (its FLOP rate), and one solve (``inverse_factor`` and the OBS sweep) per width,
up to ``PROBE_COLUMNS``; wider layers are extrapolated from the widest probe by the solve's c³ (factor) and r·c²
(sweep). The estimate per package is then:

- calibration: the calls it is fed × images per call × time per image × the share of the denoiser's FLOPs up to its
  last block (a replay stops there; a full rerun runs the whole pipeline), plus its Hessians' updates (rows kept ×
  columns² × 2 FLOPs at the probed rate);
- solves: one per layer (structured units: one per down layer);
- and, once, the recording of the trajectory that replays read.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

PROBE_ROWS = 1024
PROBE_COLUMNS = 4096  # the widest probed solve; a 23,040-column one would itself take minutes


def _timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up: allocator, kernels, caches
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


@functools.cache
def update_rate(columns: int) -> float:
    """Equivalent FLOP/s (2·rows·c² per update) of the Hessian update ``add_lower_gram`` at this width (probed at
    ``min(columns, 2 · PROBE_COLUMNS)``)."""
    from obsdiff.hessian import add_lower_gram

    cols = min(columns, 2 * PROBE_COLUMNS)
    h, x = torch.zeros(cols, cols), torch.randn(PROBE_ROWS, cols)
    return 2 * PROBE_ROWS * cols * cols / _timed(lambda: add_lower_gram(h, x, 1.0))


@functools.cache
def _solve_probe(columns: int) -> tuple[float, float]:
    """Seconds of the factorization and of the sweep (at ``PROBE_ROWS`` rows) at one probed width."""
    from obsdiff.solver import inverse_factor, obs_sweep
    from obsdiff.sparsity import Unstructured

    x = torch.randn(2 * columns, columns)
    h = x.T @ x / (2 * columns)
    w = torch.randn(min(PROBE_ROWS, columns), columns)
    factor_s = _timed(lambda: inverse_factor(h, None, 0.01), repeats=1)
    factor = inverse_factor(h, None, 0.01)
    sweep_s = _timed(lambda: obs_sweep(w, factor, Unstructured(0.5)), repeats=1)
    return factor_s, sweep_s


def solve_seconds(rows: int, columns: int) -> float:
    """One OBS solve of a ``rows`` × ``columns`` layer: the factor scales as c³, the sweep as r·c²."""
    probe = min(columns, PROBE_COLUMNS)
    factor_s, sweep_s = _solve_probe(probe)
    probe_rows = min(PROBE_ROWS, probe)
    return factor_s * (columns / probe) ** 3 + sweep_s * (rows / probe_rows) * (columns / probe) ** 2


def image_seconds(call) -> float:
    """Seconds per image of one denoiser call (``ComponentCall``) at the run's size."""
    with torch.no_grad():
        return _timed(call, repeats=1) / max(call.batch, 1)


@dataclass(frozen=True)
class PackageTime:
    calibration_s: float
    update_s: float
    solve_s: float

    @property
    def total_s(self) -> float:
        return self.calibration_s + self.update_s + self.solve_s


def flop_shares(block_order: list[str], flops: dict[str, int], total: int) -> dict[str, float]:
    """Each block's share of a forward's FLOPs up to and including it (blocks in forward order)."""
    done, shares = 0, {}
    for block in block_order:
        done += flops.get(block, 0)
        shares[block] = min(1.0, done / max(total, 1))
    return shares

"""FALKON with K_nm recomputed tile by tile at every CG iteration (in this process or on a
Dask LocalCluster) equals FALKON with K_nm cached; the ``"auto"`` rule for the number of
centres."""

from __future__ import annotations

import math

import pytest
import torch

import ntkit as nk
from ntkit import solvers
from ntkit.solvers.falkon import auto_centers

F64 = torch.float64
N, M = 500, 80


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=gen, dtype=F64)
    y = torch.sin(x[:, :2]) + 0.1 * torch.randn(N, 2, generator=gen, dtype=F64)
    net = nk.Sequential(nk.Linear(64, w_std=1.5, b_std=0.1), nk.ReLU(), nk.Linear(1, w_std=1.5))
    return x, y, solvers.kernel_function(net, "ntk")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _fit(problem, **kw):
    x, y, kfn = problem
    opts = {"n_centers": M, "diag_reg": 1e-3, "tol": 1e-10,
            "generator": torch.Generator().manual_seed(1)}
    return solvers.nystrom_krr(kfn, x, y, **{**opts, **kw})


def test_recomputed_equals_cached_float64(problem):
    """Same centres, K_nm kept vs recomputed in 7 tiles at every iteration: 1e-8."""
    x, y, kfn = problem
    calls = []

    def counting(a, b):
        calls.append(a.shape[0])
        return kfn(a, b)

    cached = _fit(problem, cache=True)
    tile_budget = 8 * 8 * M * 75                           # tiles of 75 rows (tile_rows)
    recomputed = _fit((x, y, counting), cache=False, memory_budget=tile_budget)
    assert torch.equal(cached.centers, recomputed.centers)
    assert _rel(recomputed.alpha, cached.alpha) < 1e-8
    # every CG iteration recomputed all N rows (plus the rhs pass and the diagonal blocks)
    knm_rows = sum(c for c in calls if c not in (M,)) - N  # minus the diagonal's blocks
    assert knm_rows == N * (recomputed.info.iterations + 1)
    assert recomputed.info.iterations > 3
    xt = torch.randn(50, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert _rel(recomputed.predict(xt), cached.predict(xt)) < 1e-8


def test_float32_tiles_float64_accumulation(problem):
    """float32 inputs (float32 kernel tiles), float64 algebra: the coefficients come out
    float64 and within float32 rounding of the float64 fit."""
    x, y, kfn = problem
    ref = _fit(problem, cache=False)
    f32 = solvers.nystrom_krr(kfn, x.float(), y.float(), n_centers=M, diag_reg=1e-3,
                              tol=1e-8, dtype=F64, cache=False,
                              generator=torch.Generator().manual_seed(1))
    assert f32.alpha.dtype == F64
    xt = torch.randn(50, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert _rel(f32.predict(xt.float()).double(), ref.predict(xt)) < 1e-3


def test_auto_centers_rule():
    assert auto_centers(10_000) == math.ceil(100 * math.log(10_000))      # 922
    assert auto_centers(10) == math.ceil(math.sqrt(10) * math.log(10))  # 8
    assert auto_centers(10**6, memory_budget=24 * 500**2) == 500         # by the budget
    assert auto_centers(10**6) == math.isqrt(2**30 // 24)                # 1 GiB: 6,689


def test_auto_centers_in_a_fit(problem):
    fit = _fit(problem, n_centers="auto", cache=False)
    assert fit.centers.shape[0] == min(N, math.ceil(math.sqrt(N) * math.log(N)))


@pytest.mark.slow
def test_local_cluster_equals_in_process(problem):
    """The iteration's tiles as tasks on a 2-worker LocalCluster: the same 8 iterations
    give the same fit (the workers' single-threaded kernels may round differently from
    this process's, in the last float64 digits only)."""
    pytest.importorskip("distributed")
    fixed = {"max_iter": 8, "tol": 1e-30, "on_failure": "warn", "memory_budget": 8 * 8 * M * 100}
    with pytest.warns(solvers.ConvergenceWarning):
        here = _fit(problem, cache=False, **fixed)
    with pytest.warns(solvers.ConvergenceWarning):
        dask = _fit(problem, n_workers=2, **fixed)
    assert dask.info.iterations == here.info.iterations == 8
    xt = torch.randn(50, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert _rel(dask.predict(xt), here.predict(xt)) < 1e-9
    # alpha = T^-1 A^-1 beta amplifies those last digits by the conditioning of K_mm
    assert _rel(dask.alpha, here.alpha) < 1e-7


def test_client_and_n_workers_are_exclusive(problem):
    with pytest.raises(ValueError, match="at most one of client"):
        _fit(problem, client=object(), n_workers=2)

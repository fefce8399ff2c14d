"""The ``large_n`` workload of benchmarks/run.py: kernel regression on N = 1,000,000 points
past memory, by FALKON with K_nm recomputed every iteration (many centres) and by NTK
random features, against the exact solve on the first 20,000 points.

Environment (all optional):

- ``NTKIT_LARGE_N`` (1,000,000): training points; ``NTKIT_LARGE_M`` (4000): centres of
  the main fit (0: no FALKON fit, e.g. for the random-features route alone); ``NTKIT_LARGE_CACHE`` (0): 1 keeps ``K_nm`` in memory (the old route,
  M ~ 1500 within 6.5 GB); ``NTKIT_LARGE_WORKERS``: fit on a LocalCluster of that many
  single-threaded workers;
- ``NTKIT_LARGE_MS`` (e.g. ``"1000,2000"``): more fits on all N points, for error vs M;
- ``NTKIT_LARGE_RF`` (e.g. ``"1024,2048"``): the random-features route, ridge regression
  on ``D`` features streamed by `ntkit.features.fit_ridge` (never the ``(N, D)``
  features), error, time and peak memory vs D (`benchmarks/large_n_rf.py` runs the same
  sweep and writes each row as it finishes); ``NTKIT_LARGE_NYSTROM`` (e.g. ``"3000"``):
  ridge on ``M`` Nystrom features (`ntkit.features.NystromFeatureMap`), Nystrom KRR in
  one streamed pass;
- ``NTKIT_LARGE_DASK`` (0): 1 times the same FALKON iterations (first
  ``NTKIT_LARGE_DASK_N`` = 50,000 points, 1000 centres, 4 iterations) on a LocalCluster
  of 1 and of 2 single-threaded workers (clusters started before timing), with
  ``NTKIT_LARGE_DASK_BUDGET`` (64MB) per tile;
- ``NTKIT_LARGE_EXACT`` (1): 0 skips the exact 20,000-point solve;
- ``NTKIT_LARGE_TOL``: CG's relative residual (default the solver's, 1e-6 in float64);
- ``NTKIT_BENCH_THREADS``: torch's threads in this process.
"""

from __future__ import annotations

import math
import os
import sys
import time

D_IN, DIAG_REG = 20, 0.1


def task(n: int, n_test: int = 10_000):
    """The synthetic task: ``x`` ``(n, 20)`` standard normal, ``y = sin(z_1) + z_1 z_2 / 2
    + 0.1 noise`` for two random projections ``z``; test inputs ``xt`` and the true
    function there ``ft`` (float64); the network whose NTK regresses it. The same draws
    (generator seed 0) for every caller, so ``x[:k]`` is the same at every ``n``.

    Returns:
        ``(x, y, xt, ft, net)``.
    """
    import torch

    import ntkit as nk

    d = D_IN
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, d, generator=gen)

    def target(v):
        z = v @ w.T / math.sqrt(d)
        return torch.sin(z[:, :1]) + 0.5 * z[:, :1] * z[:, 1:2]

    x = torch.randn(n, d, generator=gen)
    y = target(x) + 0.1 * torch.randn(n, 1, generator=gen)
    xt = torch.randn(n_test, d, generator=gen)
    ft = target(xt).double()
    net = nk.Sequential(nk.Linear(512, w_std=1.5, b_std=0.1), nk.ReLU(),
                        nk.Linear(512, w_std=1.5, b_std=0.1), nk.ReLU(),
                        nk.Linear(1, w_std=1.5, b_std=0.1))
    return x, y, xt, ft, net


def rel(a, b) -> float:
    """Relative RMS error of ``a`` against ``b``."""
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _ints(name: str, default: str = "") -> list[int]:
    text = os.environ.get(name, default).strip()
    return [int(v) for v in text.split(",") if v.strip()]


def run(baseline: float, peak_rss_mb) -> dict:
    """Runs the workload once; returns run.py's case record (notes hold the findings)."""
    import numpy as np
    import scipy.linalg
    import torch

    from ntkit import solvers
    from ntkit.features import NystromFeatureMap, fit_ridge

    if os.environ.get("NTKIT_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["NTKIT_BENCH_THREADS"]))
    n = int(os.environ.get("NTKIT_LARGE_N", "1000000"))
    m = int(os.environ.get("NTKIT_LARGE_M", "4000"))
    cache = os.environ.get("NTKIT_LARGE_CACHE", "0") == "1"
    workers = int(os.environ["NTKIT_LARGE_WORKERS"]) if os.environ.get(
        "NTKIT_LARGE_WORKERS") else None
    subset, n_test, diag_reg = min(n, 20_000), 10_000, DIAG_REG
    x, y, xt, ft, net = task(n, n_test)
    kfn = solvers.kernel_function(net, "ntk")

    def falkon(xs, ys, centres, **kw):
        opts = {"dtype": torch.float64, "memory_budget": "6.5GB", **kw}
        if os.environ.get("NTKIT_LARGE_TOL") and "tol" not in kw:
            opts["tol"] = float(os.environ["NTKIT_LARGE_TOL"])
        return solvers.nystrom_krr(kfn, xs, ys, n_centers=centres, diag_reg=diag_reg,
                                   generator=torch.Generator().manual_seed(1), **opts)

    notes, pred = [], None
    t0 = time.perf_counter()
    total_s = 0.0
    if m > 0:                           # NTKIT_LARGE_M=0: the random-features route only
        model = falkon(x, y, m, cache=cache, n_workers=workers)
        fit_s = time.perf_counter() - t0
        pred = model.predict(xt).double()
        total_s = time.perf_counter() - t0
        peak_fit = peak_rss_mb()
        err_big = rel(pred, ft)
        notes.append(f"N={n}, M={m} ({'K_nm cached' if cache else 'K_nm recomputed'}"
                     f"{f', {workers} workers' if workers else ''}), "
                     f"{torch.get_num_threads()} thread(s): fit {fit_s:.0f} s "
                     f"({model.info.iterations} CG iterations, residual "
                     f"{model.info.residual:.1e}), fit + predict {total_s:.0f} s, peak "
                     f"{peak_fit:.0f} MB after the fit; test relative RMS error vs the true "
                     f"function {err_big:.4f}")
        del model
    for mm in _ints("NTKIT_LARGE_MS"):
        t1 = time.perf_counter()
        fit = falkon(x, y, mm, cache=False)
        notes.append(f"M={mm}: error {rel(fit.predict(xt).double(), ft):.4f} "
                     f"({time.perf_counter() - t1:.0f} s, {fit.info.iterations} its)")
    for dd in _ints("NTKIT_LARGE_RF"):
        # streaming ridge (ntkit.features.fit_ridge): float32 features of 8192 rows at a
        # time, Phi^T Phi and Phi^T y summed in float64, one Cholesky solve; the ridge
        # is diag_reg times the mean diagonal of the random-feature kernel
        t1 = time.perf_counter()
        rf = fit_ridge(net, x, y, n_features=dd, diag_reg=diag_reg,
                       generator=torch.Generator().manual_seed(2))
        rf_fit = time.perf_counter() - t1
        rf_pred = rf.predict(xt)
        rf_s = time.perf_counter() - t1
        total_s = total_s or rf_s
        notes.append(f"random features N={n}, D={dd}: error {rel(rf_pred, ft):.4f} (fit "
                     f"{rf_fit:.0f} s, fit + predict {rf_s:.0f} s, peak so far "
                     f"{peak_rss_mb():.0f} MB)")
        pred = rf_pred if pred is None else pred
    for mm in _ints("NTKIT_LARGE_NYSTROM"):
        # Nystrom KRR in one streamed pass: ridge on phi(x) = k(x, C) T^-1 (the centres
        # drawn as nystrom_krr draws them), no CG iterations, K_nm never held
        t1 = time.perf_counter()
        fmap = NystromFeatureMap.from_data(net, x, n_centers=mm,
                                           generator=torch.Generator().manual_seed(1))
        ny = fit_ridge(fmap, x, y, diag_reg=diag_reg)
        ny_pred = ny.predict(xt)
        ny_s = time.perf_counter() - t1
        total_s = total_s or ny_s
        notes.append(f"Nystrom features N={n}, M={mm}: error {rel(ny_pred, ft):.4f} "
                     f"({ny_s:.0f} s, peak so far {peak_rss_mb():.0f} MB)")
        pred = ny_pred if pred is None else pred
    if os.environ.get("NTKIT_LARGE_DASK", "0") == "1":
        notes.append(_dask_speedup(falkon, x, y))
    if os.environ.get("NTKIT_LARGE_EXACT", "1") == "1":
        xs, ys = x[:subset], y[:subset]
        t1 = time.perf_counter()
        k = np.empty((subset, subset))             # float64, filled by row blocks, in place
        for i in range(0, subset, 2000):
            k[i:i + 2000] = kfn(xs[i:i + 2000], xs).double().numpy()
        s = diag_reg * float(k.diagonal().mean())
        k[np.diag_indices(subset)] += s
        # k is symmetric, so k.T (Fortran-ordered, no copy) is the same matrix, which
        # LAPACK factorises in place
        factor = scipy.linalg.cho_factor(k.T, lower=True, overwrite_a=True, check_finite=False)
        alpha = torch.from_numpy(scipy.linalg.cho_solve(factor, ys.double().numpy()))
        del k, factor
        exact = torch.cat([kfn(xt[i:i + 1000], xs).double() @ alpha
                           for i in range(0, n_test, 1000)])
        notes.append(f"first {subset} points: exact (dense float64 Cholesky, "
                     f"{time.perf_counter() - t1:.0f} s) vs truth {rel(exact, ft):.4f}"
                     + (f"; the N-point model vs the {subset}-point exact "
                        f"{rel(pred, exact):.3f}" if pred is not None else ""))
    text = "; ".join(notes)
    print(text, file=sys.stderr)
    return {"seconds": total_s, "baseline_mb": baseline, "entries": n * m, "notes": text}


def _dask_speedup(falkon, x, y) -> str:
    """The same 4 FALKON iterations on 1 and on 2 single-threaded LocalCluster workers."""
    import logging

    import torch
    from distributed import Client, LocalCluster

    n = min(int(os.environ.get("NTKIT_LARGE_DASK_N", "50000")), x.shape[0])
    times = {}
    for k in (1, 2):
        with LocalCluster(n_workers=k, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            client.run(lambda: torch.set_num_threads(1))
            t1 = time.perf_counter()
            fit = falkon(x[:n], y[:n], 1000, client=client, max_iter=4, tol=1e-30,
                         on_failure="warn",
                         memory_budget=os.environ.get("NTKIT_LARGE_DASK_BUDGET", "64MB"))
            times[k] = time.perf_counter() - t1
            assert fit.info.iterations == 4
    return (f"LocalCluster, N={n}, M=1000, 4 iterations: 1 worker {times[1]:.1f} s, 2 workers "
            f"{times[2]:.1f} s ({times[1] / times[2]:.2f}x)")

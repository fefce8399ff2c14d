"""Nystrom kernel ridge regression by FALKON: ``M`` centres, kernel blocks recomputed
on the fly in row tiles (in this process or on Dask), never the ``N x N`` matrix; a fit
checkpointed to disk resumes after a kill (`.checkpoint`)."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .._budget import parse_memory
from ..errors import not_positive_definite
from ._common import (
    KernelFn,
    OnFailure,
    check_diag_reg,
    check_inputs,
    check_targets,
    default_tol,
    diag_reg_absolute,
    kernel_diagonal,
    tile_rows,
)
from ._falkon_tiles import DaskTiles, RowTiles
from .cg import conjugate_gradient
from .checkpoint import Checkpoint, CheckpointStore, as_checkpoint, describe_tensor, resumable_cg
from .predictor import KernelRidgePredictor

__all__ = ["auto_centers", "nystrom_krr"]

#: Bytes per entry of the ``M x M`` float64 matrices FALKON holds at once (``K_mm`` or
#: ``T``, ``A`` and a temporary): the memory side of `auto_centers`.
_MM_BYTES = 3 * 8


def auto_centers(n: int, memory_budget: int | str | None = None) -> int:
    """The number of centres ``n_centers="auto"`` takes: ``min(N, ceil(sqrt(N) log N),
    sqrt(budget / 24))``.

    ``sqrt(N) log N`` centres give FALKON the optimal statistical rate of kernel ridge
    regression under the usual source and capacity conditions (Rudi, Carratino &
    Rosasco 2017, Thm. 3 with uniform sampling); more centres only bring the solution
    closer to the exact ``N``-point one. The preconditioner holds about three ``M x M``
    float64 matrices, which ``memory_budget`` (default 1 GiB) bounds. Each CG iteration
    computes ``N M`` kernel entries: time, not memory, limits ``M`` when ``K_nm`` is
    recomputed (``cache=False``).
    """
    budget = parse_memory(memory_budget)
    rule = math.ceil(math.sqrt(n) * math.log(max(n, 2)))
    return max(1, min(n, rule, math.isqrt(max(budget // _MM_BYTES, 1))))


def nystrom_krr(kernel_fn: KernelFn, x_train: Tensor, y_train: Tensor, *,
                n_centers: int | Literal["auto"], diag_reg: float,
                generator: torch.Generator | None = None,
                diag_reg_absolute_scale: bool = False,
                kernel_diag_fn: Callable[[Tensor], Tensor] | None = None,
                tol: float | None = None, max_iter: int | None = None,
                memory_budget: int | str | None = None, cache: bool | None = None,
                dtype: torch.dtype | None = None, on_failure: OnFailure = "raise",
                progress: bool | None = None, client=None, n_workers: int | None = None,
                checkpoint: str | Checkpoint | None = None) -> KernelRidgePredictor:
    """Nystrom kernel ridge regression by FALKON: ``M`` centres, preconditioned CG.

    Rudi, Carratino & Rosasco, "FALKON: An optimal large scale kernel method" (NeurIPS
    2017), Alg. 1; Meanti et al., "Kernel methods through the roof" (NeurIPS 2020).
    With ``M`` centres ``C`` drawn uniformly without replacement, it solves

        min_a (1/N) ||K_nm a - y||^2 + lam a^T K_mm a,
        i.e. H a = K_nm^T y / N,  H = K_nm^T K_nm / N + lam K_mm,

    by CG on ``B^T H B b = B^T K_nm^T y / N``, ``a = B b``, with ``B = T^-1 A^-1``,
    ``T = chol(K_mm)`` (upper, ``K_mm = T^T T``), ``A = chol(T T^T / M + lam I)``
    (upper). The preconditioned system is close to the identity, so a few tens of
    iterations suffice; at ``M = N`` it is the identity. Each iteration streams
    ``K_nm`` once in row tiles, ``K_nm^T (K_nm v)``.

    Regularisation, ntkit's convention: the exact ``t = inf`` predictor is
    ``k(x, X) (K + s I)^-1 y`` with ``s = diag_reg * trace(K) / N`` (relative; ``s =
    diag_reg`` with ``diag_reg_absolute_scale``). FALKON's ``lam`` is ``s / N``: at
    ``M = N`` the normal equations read ``K (K + N lam I) a = K y``, so ``a = (K +
    s I)^-1 y`` and the two predictors coincide; for ``M < N`` this is the Nystrom
    approximation of the same ridge regression. ``trace(K) / N`` comes from the
    kernel's diagonal (``kernel_diag_fn``, ``kernel_fn.diagonal`` as on
    `kernel_function`, or small diagonal blocks of ``kernel_fn``).

    Args:
        kernel_fn: ``(a, b) -> (Na, Nb)`` kernel, e.g. ``kernel_function(net, "ntk")``.
        x_train: ``(N, ...)``.
        y_train: ``(N, O)`` or ``(N,)``.
        n_centers: ``M``, at most ``N``, or ``"auto"``: `auto_centers` (``sqrt(N) log N``,
            FALKON's rule for optimal statistical rates, within ``memory_budget``); more
            centres, closer to the exact solution, at ``N M`` kernel entries per
            iteration.
        diag_reg: ``> 0``, relative to the mean diagonal (see above).
        generator: draws the centres; required when ``M < N`` (at ``M = N`` the centres
            are all training points, in order).
        diag_reg_absolute_scale: ``diag_reg`` is ``s`` itself.
        kernel_diag_fn: ``x -> k(x_i, x_i)``, ``(N,)``.
        tol: relative residual of CG; default 1e-6 (float64), 1e-5 (float32).
        max_iter: CG iterations; default 500.
        memory_budget: bytes (or ``"2GiB"``) for ``K_nm``: row tiles of about an eighth
            of it (in the algebra's dtype) or, with ``cache``, ``K_nm`` itself (``N M``
            entries in the kernel's dtype) and tiles of about an eighth of what it
            leaves (at least 1/16 of the budget). Default 1 GiB. The kernel function's
            own working memory is its own (``kernel_function``'s ``memory_budget``).
        cache: keep ``K_nm`` between iterations (computed once instead of once per
            iteration). None: keep it when ``N M`` entries fit in ``memory_budget``;
            True: keep it regardless; False: never.
        dtype: of the linear algebra (e.g. ``torch.float64`` with float32 kernels);
            default the kernel's. A cache stays in the kernel's dtype.
        on_failure: ``"raise"`` `ConvergenceError` or ``"warn"`` when CG stalls.
        progress: CG progress bar (relative residual as postfix).
        client: a `distributed.Client`: each iteration's row tiles of ``K_nm`` become
            tasks on its cluster (the engine of `ntkit.kernel_matrix`); each returns
            ``t^T (t u)``, summed here in tile order. Implies ``cache=False``.
        n_workers: start a `distributed.LocalCluster` of this many single-threaded
            workers for the fit (closed after). At most one of ``client``/``n_workers``.
        checkpoint: a directory (or `ntkit.solvers.Checkpoint` with ``every`` and
            ``key``): the preconditioner and CG's state are saved there every few
            iterations; called again with the same arguments after a kill, the fit
            resumes and returns exactly the uninterrupted result (see
            `ntkit.solvers.checkpoint`). A checkpoint of other data or settings is
            refused (`CheckpointError`).

    Returns:
        A `KernelRidgePredictor`: ``.predict(x_test)``, ``.centers`` ``(M, ...)``,
        ``.alpha`` ``(M, O)``, ``.info`` (`CGInfo`).
    """
    x = check_inputs(x_train)
    n = x.shape[0]
    y, vector = check_targets(y_train, n)
    diag_reg = check_diag_reg(diag_reg)
    if isinstance(n_centers, str) and n_centers == "auto":
        n_centers = auto_centers(n, memory_budget)
    if isinstance(n_centers, bool) or not isinstance(n_centers, numbers.Integral) or \
            not 1 <= n_centers <= n:
        raise ValueError(f"n_centers must be an int between 1 and N = {n} (or 'auto', "
                         f"sqrt(N) log N within the memory budget), got {n_centers!r}.")
    n_centers = int(n_centers)
    if diag_reg == 0:
        raise ValueError("nystrom_krr needs diag_reg > 0 (its preconditioner and the Nystrom "
                         "system are singular without it); e.g. diag_reg=1e-4, relative to "
                         "the mean diagonal, or solver='exact' for the unregularised solve.")
    m = n_centers
    if m < n:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"n_centers={m} < N={n} draws centres at random: pass "
                            f"generator=torch.Generator().manual_seed(0), got "
                            f"{type(generator).__name__}.")
        idx = torch.randperm(n, generator=generator, device=generator.device)[:m].sort().values
        centers = x[idx.to(x.device)]
    else:
        centers = x
    budget = parse_memory(memory_budget)
    kdtype = x.dtype
    wdtype = dtype or kdtype
    tol = default_tol(wdtype) if tol is None else tol
    max_iter = 500 if max_iter is None else max_iter
    spec = as_checkpoint(checkpoint)
    distributed = client is not None or n_workers is not None
    knm_bytes = n * m * x.element_size()
    keep = False if distributed else (knm_bytes <= budget) if cache is None else bool(cache)
    # tiles share the budget with a kept K_nm: what it leaves, at least a sixteenth
    tile_budget = max(budget - knm_bytes, budget // 16) if keep else budget
    rows = tile_rows(m, max(x.element_size(), torch.finfo(wdtype).bits // 8), tile_budget)
    y = y.to(device=x.device, dtype=wdtype)

    with contextlib.ExitStack() as stack:
        store = None
        if spec is not None:
            store = CheckpointStore(spec, _identity(kernel_fn, x, y, centers, spec.key, {
                "n_centers": m, "diag_reg": diag_reg, "absolute": diag_reg_absolute_scale,
                "tol": tol, "max_iter": max_iter, "dtype": str(wdtype), "tile_rows": rows}))
            stack.callback(store.close)
        setup = store.load("setup") if store is not None else None
        if setup is None:
            s = diag_reg if diag_reg_absolute_scale else diag_reg_absolute(
                kernel_diagonal(kernel_fn, x, kernel_diag_fn), diag_reg)
            if not (s > 0 and math.isfinite(s)):
                raise ValueError(f"the regulariser diag_reg * trace(K)/N = {s!r} is not "
                                 f"positive; check the kernel's diagonal, or pass "
                                 f"diag_reg_absolute_scale=True.")
            t_up, a_up = _preconditioner(kernel_fn, centers, wdtype, s / n)
        else:
            s, t_up, a_up = setup["s"], setup["t_up"].to(x.device), setup["a_up"].to(x.device)
        lam = s / n
        tiles = _tiles(stack, kernel_fn, x, centers, rows, wdtype, keep, client, n_workers)
        if setup is None:
            rhs = _b_t(t_up, a_up, tiles.knm_t(y) / n)                 # B^T K_nm^T y / N
            if store is not None:
                store.save("setup", {"t_up": t_up, "a_up": a_up, "rhs": rhs}, {"s": float(s)},
                           tag="0")
        else:
            rhs = setup["rhs"].to(x.device)

        def matvec(u: Tensor) -> Tensor:                               # B^T H B u
            au = _solve_upper(a_up, u)                                 # A^-1 u
            w = tiles.knm_t_knm(_solve_upper(t_up, au)) / n            # K^T K T^-1 A^-1 u / N
            return _solve_upper(a_up, _solve_upper(t_up, w, left_t=True) + lam * au,
                                left_t=True)

        what = f"FALKON (N={n}, M={m})"
        if store is None:
            beta, info = conjugate_gradient(matvec, rhs, tol=tol, max_iter=max_iter,
                                            on_failure=on_failure, progress=progress, what=what)
        else:
            beta, info = resumable_cg(matvec, rhs, store=store, tol=tol, max_iter=max_iter,
                                      on_failure=on_failure, progress=progress, what=what)
    alpha = _solve_upper(t_up, _solve_upper(a_up, beta))
    return KernelRidgePredictor(kernel_fn, centers, alpha, info=info, solver="nystrom",
                                diag_reg_absolute=s, memory_budget=memory_budget,
                                vector=vector)


def _preconditioner(kernel_fn: KernelFn, centers: Tensor, wdtype: torch.dtype,
                    lam: float) -> tuple[Tensor, Tensor]:
    """FALKON's factors (Alg. 1): ``K_mm = T^T T``, ``T T^T / M + lam I = A^T A``."""
    m = centers.shape[0]
    kmm = kernel_fn(centers, centers).to(wdtype)
    kmm = 0.5 * (kmm + kmm.T)
    t_up = _cholesky_upper(kmm, "K_mm (the kernel between the centres)")
    del kmm
    eye = torch.eye(m, dtype=wdtype, device=t_up.device)
    a_up = _cholesky_upper(t_up @ t_up.T / m + lam * eye, "T T^T / M + lam I")
    return t_up, a_up


def _tiles(stack: contextlib.ExitStack, kernel_fn, x, centers, rows, wdtype, keep, client,
           n_workers):
    """The passes over ``K_nm``: in this process, or on the Dask cluster of ``client`` or
    one of ``n_workers`` started for the fit (closed with ``stack``)."""
    if client is None and n_workers is None:
        return RowTiles(kernel_fn, x, centers, rows, wdtype, keep)
    from ..kernel_matrix._cluster import _cluster

    dask_client = stack.enter_context(_cluster(client, n_workers, None))
    tiles = DaskTiles(dask_client, kernel_fn, x, centers, rows, wdtype)
    stack.callback(tiles.close)
    return tiles


def _identity(kernel_fn, x: Tensor, y: Tensor, centers: Tensor, key: str | None,
              settings: dict) -> dict:
    """What a checkpoint must agree on: data, centres, kernel and settings."""
    from ..kernel_matrix._identity import fingerprint

    found = fingerprint((getattr(kernel_fn, "source", kernel_fn), getattr(kernel_fn, "get",
                                                                          None)))
    return {"x_train": describe_tensor(x), "y_train": describe_tensor(y),
            "centers": describe_tensor(centers),
            "kernel": found.sha256,
            "callables": list(found.callables), "key": key, **settings}


def _cholesky_upper(k: Tensor, name: str) -> Tensor:
    """Upper ``T`` with ``T^T T = k``; a jitter of ``eps * M * mean(diag)`` as in FALKON's
    code, grown tenfold up to six times if the factorisation still fails."""
    m = k.shape[0]
    scale = float(torch.diagonal(k).mean())
    jitter = torch.finfo(k.dtype).eps * m * max(scale, torch.finfo(k.dtype).tiny)
    eye = torch.eye(m, dtype=k.dtype, device=k.device)
    for _ in range(7):
        chol, info = torch.linalg.cholesky_ex(k + jitter * eye)
        if int(info) == 0:
            return chol.T.contiguous()
        jitter *= 10
    raise not_positive_definite(name, f"{m} x {m}, {k.dtype}, even with a jitter of "
                                      f"{jitter / 10:.2g} on its diagonal",
                                fix="use fewer centres")


def _solve_upper(t: Tensor, v: Tensor, *, left_t: bool = False) -> Tensor:
    """``T^-1 v`` (or ``T^-T v`` with ``left_t``) for upper-triangular ``T``."""
    if left_t:
        return torch.linalg.solve_triangular(t.T, v, upper=False)
    return torch.linalg.solve_triangular(t, v, upper=True)


def _b_t(t_up: Tensor, a_up: Tensor, v: Tensor) -> Tensor:
    """``B^T v = A^-T T^-T v``."""
    return _solve_upper(a_up, _solve_upper(t_up, v, left_t=True), left_t=True)



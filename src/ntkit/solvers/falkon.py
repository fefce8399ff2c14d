"""Nystrom kernel ridge regression by FALKON: ``M`` centres, kernel blocks recomputed
on the fly in row tiles, never the ``N x N`` matrix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

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
    row_ranges,
    tile_rows,
)
from .cg import conjugate_gradient
from .predictor import KernelRidgePredictor

__all__ = ["nystrom_krr"]


def nystrom_krr(kernel_fn: KernelFn, x_train: Tensor, y_train: Tensor, *, n_centers: int,
                diag_reg: float, generator: torch.Generator | None = None,
                diag_reg_absolute_scale: bool = False,
                kernel_diag_fn: Callable[[Tensor], Tensor] | None = None,
                tol: float | None = None, max_iter: int | None = None,
                memory_budget: int | str | None = None, cache: bool | None = None,
                dtype: torch.dtype | None = None, on_failure: OnFailure = "raise",
                progress: bool | None = None) -> KernelRidgePredictor:
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
        n_centers: ``M``, at most ``N``; FALKON's theory asks ``M ~ sqrt(N) log N`` for
            optimal statistical rates; more centres, closer to the exact solution.
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

    Returns:
        A `KernelRidgePredictor`: ``.predict(x_test)``, ``.centers`` ``(M, ...)``,
        ``.alpha`` ``(M, O)``, ``.info`` (`CGInfo`).
    """
    x = check_inputs(x_train)
    n = x.shape[0]
    y, vector = check_targets(y_train, n)
    diag_reg = check_diag_reg(diag_reg)
    if isinstance(n_centers, bool) or not isinstance(n_centers, numbers.Integral) or \
            not 1 <= n_centers <= n:
        raise ValueError(f"n_centers must be an int between 1 and N = {n}, got {n_centers!r}.")
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
    s = diag_reg if diag_reg_absolute_scale else diag_reg_absolute(
        kernel_diagonal(kernel_fn, x, kernel_diag_fn), diag_reg)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"the regulariser diag_reg * trace(K)/N = {s!r} is not positive; "
                         f"check the kernel's diagonal, or pass diag_reg_absolute_scale=True.")
    lam = s / n
    y = y.to(device=x.device, dtype=wdtype)

    # preconditioner factors (Alg. 1): K_mm = T^T T, T T^T / M + lam I = A^T A
    kmm = kernel_fn(centers, centers).to(wdtype)
    kmm = 0.5 * (kmm + kmm.T)
    t_up = _cholesky_upper(kmm, "K_mm (the kernel between the centres)")
    eye = torch.eye(m, dtype=wdtype, device=kmm.device)
    a_up = _cholesky_upper(t_up @ t_up.T / m + lam * eye, "T T^T / M + lam I")
    del kmm

    knm_bytes = n * m * x.element_size()
    keep = (knm_bytes <= budget) if cache is None else bool(cache)
    # tiles share the budget with a kept K_nm: what it leaves, at least a sixteenth
    tile_budget = max(budget - knm_bytes, budget // 16) if keep else budget
    rows = tile_rows(m, max(x.element_size(), torch.finfo(wdtype).bits // 8), tile_budget)
    tiles = _RowTiles(kernel_fn, x, centers, rows, wdtype, keep)
    rhs = _b_t(t_up, a_up, tiles.knm_t(y) / n)                         # B^T K_nm^T y / N

    def matvec(u: Tensor) -> Tensor:                                   # B^T H B u
        au = _solve_upper(a_up, u)                                     # A^-1 u
        w = tiles.knm_t_knm(_solve_upper(t_up, au)) / n                # K^T K T^-1 A^-1 u / N
        return _solve_upper(a_up, _solve_upper(t_up, w, left_t=True) + lam * au, left_t=True)

    beta, info = conjugate_gradient(matvec, rhs, tol=tol, max_iter=500 if max_iter is None
                                    else max_iter, on_failure=on_failure, progress=progress,
                                    what=f"FALKON (N={n}, M={m})")
    alpha = _solve_upper(t_up, _solve_upper(a_up, beta))
    return KernelRidgePredictor(kernel_fn, centers, alpha, info=info, solver="nystrom",
                                diag_reg_absolute=s, memory_budget=memory_budget,
                                vector=vector)


class _RowTiles:
    """``K_nm = k(x, centers)`` by row tiles: recomputed on each pass, or kept in one
    preallocated ``(N, M)`` tensor (one block: no heap fragmentation by many tiles)."""

    def __init__(self, kernel_fn: KernelFn, x: Tensor, centers: Tensor, rows: int,
                 dtype: torch.dtype, keep: bool):
        self.kernel_fn, self.x, self.centers = kernel_fn, x, centers
        self.ranges = row_ranges(x.shape[0], rows)
        self.dtype = dtype
        self.keep = keep
        self.kept: Tensor | None = None       # K_nm, once every tile is in it
        self.passes = 0

    def _tiles(self):
        self.passes += 1
        if self.kept is not None:
            for i0, i1 in self.ranges:
                yield i0, i1, self.kept[i0:i1].to(self.dtype)
            return
        store = None
        for i0, i1 in self.ranges:
            t = self.kernel_fn(self.x[i0:i1], self.centers)
            if t.shape != (i1 - i0, self.centers.shape[0]):
                raise ValueError(f"kernel_fn(a, b) must return (Na, Nb) = ({i1 - i0}, "
                                 f"{self.centers.shape[0]}), got {tuple(t.shape)}.")
            if not bool(torch.isfinite(t).all()):
                raise ValueError("kernel_fn returned NaN or infinite entries.")
            if self.keep:
                if store is None:
                    store = t.new_empty((self.x.shape[0], self.centers.shape[0]))
                store[i0:i1] = t
            yield i0, i1, t.to(self.dtype)
        self.kept = store

    def knm_t(self, v: Tensor) -> Tensor:
        """``K_nm^T v`` for ``v`` ``(N, O)``."""
        out = v.new_zeros((self.centers.shape[0], v.shape[1]))
        for i0, i1, t in self._tiles():
            out += t.T @ v[i0:i1]
        return out

    def knm_t_knm(self, u: Tensor) -> Tensor:
        """``K_nm^T K_nm u`` for ``u`` ``(M, O)``."""
        out = torch.zeros_like(u)
        for _, _, t in self._tiles():
            out += t.T @ (t @ u)
        return out


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



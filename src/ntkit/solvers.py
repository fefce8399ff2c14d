"""Kernel regression past memory: conjugate gradients, FALKON and solvers by name.

The converged predictor of an infinite ensemble, the GP posterior mean and kernel
ridge regression all need ``(K + s I)^-1 y`` for the train-train kernel ``K``. A
Cholesky factor holds ``N x N`` numbers (80 GB in float64 at N = 100,000); these
solvers hold at most ``N x M``, and by default not even that:

- `conjugate_gradient`: preconditioned CG for symmetric positive definite systems
  with several right-hand sides, from a matrix-vector product alone.
- `cg_krr`: the dual coefficients ``(K + s I)^-1 y`` of a kernel given as a tensor or
  an on-disk array (``np.memmap``, ``np.load(..., mmap_mode="r")``, zarr), read in row
  blocks, with a Nystrom or Jacobi preconditioner.
- `nystrom_krr`: Nystrom kernel ridge regression by FALKON (Rudi, Carratino & Rosasco
  2017): ``M`` centres, kernel blocks recomputed on the fly, never the ``N x N`` matrix.
- `solve_krr`: one entry point by name (``"exact"`` = `exact_krr`, ``"cg"``,
  ``"nystrom"``, ``"auto"``) for estimators and `ntkit.predict`; returns a
  `KernelRidgePredictor` (factor once, ``.predict(x)`` many times).
- `kernel_function`: an ntkit network's NTK or NNGP as ``(a, b) -> (Na, Nb)``.

Regularisation follows `ntkit.predict` (neural-tangents'): ``diag_reg`` is relative,
``s = diag_reg * trace(K) / N`` is added to the diagonal (``diag_reg`` itself with
``diag_reg_absolute_scale=True``), so every solver here approaches the exact
``t = inf`` predictor ``k(x, X) (K + s I)^-1 y``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .compute import parse_memory, progress_bar
from .errors import ConvergenceError, ConvergenceWarning
from .kernel_function import KernelFunction as NetworkKernel
from .kernel_function import kernel_function

__all__ = [
    "CGInfo", "ConvergenceError", "ConvergenceWarning", "KernelRidgePredictor", "NetworkKernel",
    "cg_krr", "conjugate_gradient", "exact_krr", "kernel_function", "nystrom_krr", "solve_krr",
]

KernelFn = Callable[[Tensor, Tensor], Tensor]
Solver = Literal["auto", "exact", "cg", "nystrom"]
OnFailure = Literal["raise", "warn"]

_ADVICE = ("raise diag_reg (e.g. 1e-4 or 1e-3, relative to the mean diagonal), compute in "
           "float64 (dtype=torch.float64), use more centres (n_centers) or a better "
           "preconditioner ('nystrom' with more centres), or loosen tol")


# ------------------------------------------------------------------ conjugate gradients
@dataclass(frozen=True)
class CGInfo:
    """How a conjugate-gradient solve went.

    Attributes:
        iterations: matrix-vector products after the initial residual.
        residuals: relative residual ``max_j ||b_j - A x_j|| / ||b_j||`` over the
            right-hand sides, before the first iteration (1.0 from ``x0 = 0``) and after
            each one (CG's recursively updated residual).
        converged: whether the last residual is at most ``tol``.
        tol: the tolerance asked for.
    """

    iterations: int
    residuals: tuple[float, ...]
    converged: bool
    tol: float

    @property
    def residual(self) -> float:
        """The relative residual of the returned iterate: the smallest reached (the last
        one when converged; a failed solve returns its best iterate)."""
        return min(self.residuals)


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, *,
                       preconditioner: Callable[[Tensor], Tensor] | None = None,
                       x0: Tensor | None = None, tol: float = 1e-6,
                       max_iter: int | None = None, stall_window: int = 100,
                       on_failure: OnFailure = "raise", progress: bool | None = None,
                       what: str = "the linear system") -> tuple[Tensor, CGInfo]:
    """Solves ``A x = b`` for symmetric positive definite ``A`` by preconditioned CG.

    Hestenes & Stiefel (1952); preconditioned form as in Saad, *Iterative Methods for
    Sparse Linear Systems* (2003), Alg. 9.1. Each column of ``b`` runs its own
    recursion, all in one batched product per iteration::

        r = b - A x,  z = P^-1 r,  p = z
        repeat:  a = r.z / p.Ap;  x += a p;  r -= a Ap;  z' = P^-1 r;
                 p = z' + (r.z' / r.z) p

    It stops when every column's relative residual ``||r_j|| / ||b_j||`` is at most
    ``tol``. It fails (``on_failure``: raise `ConvergenceError`, or warn with
    `ConvergenceWarning` and return the best iterate) when ``max_iter`` is reached
    above ``tol`` or the residual stops decreasing: no new best by 0.1% over
    ``stall_window`` iterations, which is what rounding does to an ill-conditioned
    system. A NaN or infinite residual always raises `FloatingPointError`.

    Args:
        matvec: ``v -> A v`` for ``v`` of shape ``(N, O)``.
        b: right-hand sides, ``(N, O)`` or ``(N,)``.
        preconditioner: ``r -> P^-1 r`` with ``P`` symmetric positive definite and
            ``P ~ A`` (``(N, O) -> (N, O)``); None for plain CG.
        x0: starting point, shaped like ``b`` (default zeros).
        tol: relative residual to reach, e.g. 1e-6 (float64) or 1e-5 (float32).
        max_iter: default ``max(100, min(2 N, 10000))``.
        stall_window: iterations without a new best residual that count as a stall.
        on_failure: ``"raise"`` or ``"warn"``.
        progress: a tqdm bar with the relative residual as postfix; by default one
            appears when the solve takes more than 2 s.
        what: the system's name in messages.

    Returns:
        ``(x, info)``: ``x`` shaped like ``b``, and a `CGInfo`.
    """
    if not isinstance(b, Tensor) or not b.is_floating_point() or b.ndim not in (1, 2):
        raise TypeError(f"b must be a floating-point tensor of shape (N,) or (N, O), got "
                        f"{type(b).__name__} {getattr(b, 'shape', '')}.")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b has NaN or infinite entries.")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol!r}.")
    if on_failure not in ("raise", "warn"):
        raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}.")
    vector = b.ndim == 1
    b2 = b[:, None] if vector else b
    n = b2.shape[0]
    if max_iter is None:
        max_iter = max(100, min(2 * n, 10_000))
    if max_iter < 1 or stall_window < 1:
        raise ValueError(f"max_iter and stall_window must be >= 1, got {max_iter} and "
                         f"{stall_window}.")
    precond = preconditioner if preconditioner is not None else (lambda r: r)
    b_norm = torch.linalg.vector_norm(b2, dim=0)
    live = b_norm > 0
    b_norm = torch.where(live, b_norm, torch.ones_like(b_norm))
    if x0 is None:
        x = torch.zeros_like(b2)
        r = b2.clone()
    else:
        x = (x0[:, None] if vector else x0).to(b2).clone()
        if x.shape != b2.shape:
            raise ValueError(f"x0 must be shaped like b {tuple(b.shape)}, got {tuple(x0.shape)}.")
        r = b2 - _checked(matvec(x), b2, "matvec")
    rel = _relative(r, b_norm, live)
    residuals = [rel]
    best_x, best = x.clone(), rel
    bests = [rel]
    z = _checked(precond(r), b2, "preconditioner")
    p = z.clone()
    rz = (r * z).sum(0)
    bar = progress_bar(range(max_iter), desc=f"CG: {what}", unit="it", progress=progress)
    bar.set_postfix(rel_residual=f"{rel:.2e}")
    reason = None
    it = 0
    try:
        while rel > tol:
            if it >= max_iter:
                reason = f"max_iter={max_iter} was reached"
                break
            if it >= stall_window and bests[-1] > (1 - 1e-3) * bests[-1 - stall_window]:
                reason = (f"the residual stopped decreasing (no new best over the last "
                          f"{stall_window} iterations)")
                break
            ap = _checked(matvec(p), b2, "matvec")
            pap = (p * ap).sum(0)
            active = (_column_rel(r, b_norm, live) > tol) & (pap > 0)
            a = torch.where(active, rz / torch.where(active, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
            x = x + a * p
            r = r - a * ap
            z = _checked(precond(r), b2, "preconditioner")
            rz_new = (r * z).sum(0)
            beta = torch.where(active & (rz != 0), rz_new / torch.where(rz != 0, rz,
                               torch.ones_like(rz)), torch.zeros_like(rz))
            p = z + beta * p
            rz = rz_new
            it += 1
            rel = _relative(r, b_norm, live)
            if not math.isfinite(rel):
                raise FloatingPointError(
                    f"conjugate gradients on {what} produced a non-finite residual at "
                    f"iteration {it} ({b.dtype}): the system is not positive definite to "
                    f"working precision; {_ADVICE}.")
            residuals.append(rel)
            if rel < best:
                best, best_x = rel, x
            bests.append(best)
            bar.update(1)
            bar.set_postfix(rel_residual=f"{rel:.2e}")
            if not bool(active.any()):
                if rel > tol:
                    reason = "the search directions lost positive curvature (rounding)"
                break
    finally:
        bar.close()
    converged = rel <= tol
    if not converged:
        x = best_x
        msg = (f"conjugate gradients on {what} stopped at relative residual {best:.3g} "
               f"after {it} iterations, above tol={tol:g}: {reason or 'no progress'}. The "
               f"system is too ill-conditioned for {b.dtype}; {_ADVICE}.")
        if on_failure == "raise":
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"conjugate gradients on {what} produced NaN or infinite "
                                 f"values; {_ADVICE}.")
    info = CGInfo(iterations=it, residuals=tuple(residuals), converged=converged, tol=tol)
    return (x[:, 0] if vector else x), info


def _column_rel(r: Tensor, b_norm: Tensor, live: Tensor) -> Tensor:
    return torch.where(live, torch.linalg.vector_norm(r, dim=0) / b_norm,
                       torch.zeros_like(b_norm))


def _relative(r: Tensor, b_norm: Tensor, live: Tensor) -> float:
    return float(_column_rel(r, b_norm, live).max()) if r.shape[1] else 0.0


def _checked(v: Tensor, like: Tensor, name: str) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != like.shape:
        raise ValueError(f"{name} must return a tensor of shape {tuple(like.shape)}, got "
                         f"{type(v).__name__} {tuple(getattr(v, 'shape', ()))}.")
    return v.to(like.dtype)


# ------------------------------------------------------------------ kernel functions
def _diagonal(kernel_fn: KernelFn, x: Tensor, kernel_diag_fn, block: int = 256) -> Tensor:
    """``k(x_i, x_i)``: from ``kernel_diag_fn``, ``kernel_fn.diagonal``, or the diagonals
    of ``block x block`` blocks of ``kernel_fn``."""
    fn = kernel_diag_fn or getattr(kernel_fn, "diagonal", None)
    if fn is not None:
        d = fn(x)
    else:
        d = torch.cat([torch.diagonal(kernel_fn(x[i:i + block], x[i:i + block]))
                       for i in range(0, x.shape[0], block)])
    if d.shape != (x.shape[0],):
        raise ValueError(f"the kernel's diagonal must have shape ({x.shape[0]},), got "
                         f"{tuple(d.shape)}.")
    return d


# ------------------------------------------------------------------ the fitted predictor
class KernelRidgePredictor:
    """``f(x) = k(x, centers) alpha``: a fitted kernel regression, evaluated in tiles.

    Returned by `solve_krr`, `nystrom_krr` (``centers`` = the Nystrom centres) and
    `exact_krr` (``centers`` = all training inputs).

    Attributes:
        centers: ``(M, ...)`` inputs the predictor expands on.
        alpha: ``(M, O)`` coefficients.
        info: the `CGInfo` of the solve (None for the exact Cholesky solve).
        solver: ``"exact"``, ``"cg"`` or ``"nystrom"``.
        diag_reg_absolute: the absolute regulariser ``s`` on the kernel's diagonal.
    """

    def __init__(self, kernel_fn: KernelFn, centers: Tensor, alpha: Tensor, *,
                 info: CGInfo | None, solver: str, diag_reg_absolute: float,
                 memory_budget: int | str | None = None, vector: bool = False):
        self.kernel_fn = kernel_fn
        self.centers = centers
        self.alpha = alpha
        self.info = info
        self.solver = solver
        self.diag_reg_absolute = diag_reg_absolute
        self._budget = parse_memory(memory_budget)
        self._vector = vector

    def predict(self, x: Tensor) -> Tensor:
        """Predictions ``(N_test, O)`` (``(N_test,)`` for 1-D training targets), computed
        in row tiles of ``k(x, centers)`` within the memory budget."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
        if tuple(x.shape[1:]) != tuple(self.centers.shape[1:]):
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.centers.shape[1:]))})"
                             f" like the training inputs, got {tuple(x.shape)}.")
        rows = _tile_rows(self.centers.shape[0], x.element_size(), self._budget)
        out = torch.cat([self.kernel_fn(x[i:i + rows], self.centers).to(self.alpha)
                         @ self.alpha for i in range(0, x.shape[0], rows)]) if x.shape[0] else \
            self.alpha.new_zeros((0, self.alpha.shape[1]))
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("the kernel regression's prediction is not finite; "
                                     "check the inputs and the kernel for NaN.")
        return out[:, 0] if self._vector else out

    __call__ = predict

    def __repr__(self) -> str:
        return (f"KernelRidgePredictor(solver={self.solver!r}, centers={self.centers.shape[0]}, "
                f"outputs={self.alpha.shape[1]})")


def _tile_rows(m: int, element_size: int, budget: int) -> int:
    """Rows of an ``(rows, m)`` kernel tile: about an eighth of the budget, with room
    for the kernel function's copies (NNGP and NTK, a cast)."""
    return max(1, budget // (8 * max(m, 1) * element_size))


def _targets(y: Tensor, n: int) -> tuple[Tensor, bool]:
    if not isinstance(y, Tensor):
        raise TypeError(f"y_train must be a torch.Tensor, got {type(y).__name__}.")
    vector = y.ndim == 1
    y2 = y[:, None] if vector else y
    if y2.ndim != 2 or y2.shape[0] != n:
        raise ValueError(f"y_train must have shape (N, outputs) or (N,) with N = {n}, got "
                         f"{tuple(y.shape)}.")
    if not bool(torch.isfinite(y2).all()):
        raise ValueError("y_train has NaN or infinite entries.")
    return y2, vector


def _reg(diag_reg: float) -> float:
    if isinstance(diag_reg, bool) or not isinstance(diag_reg, (int, float)) or not (
            math.isfinite(diag_reg) and diag_reg >= 0):
        raise ValueError(f"diag_reg must be a finite number >= 0, got {diag_reg!r}.")
    return float(diag_reg)


def _inputs(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
        raise TypeError(f"x_train must be a floating-point tensor of shape (N, features...), "
                        f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x_train has NaN or infinite entries.")
    return x


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else 1e-5


# ------------------------------------------------------------------ FALKON
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
    x = _inputs(x_train)
    n = x.shape[0]
    y, vector = _targets(y_train, n)
    diag_reg = _reg(diag_reg)
    if isinstance(n_centers, bool) or not isinstance(n_centers, int) or not 1 <= n_centers <= n:
        raise ValueError(f"n_centers must be an int between 1 and N = {n}, got {n_centers!r}.")
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
    tol = _default_tol(wdtype) if tol is None else tol
    if diag_reg_absolute_scale:
        s = diag_reg
    else:
        s = diag_reg * float(_diagonal(kernel_fn, x, kernel_diag_fn).to(torch.float64).mean())
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
    rows = _tile_rows(m, max(x.element_size(), torch.finfo(wdtype).bits // 8), tile_budget)
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
        self.ranges = [(i, min(i + rows, x.shape[0])) for i in range(0, x.shape[0], rows)]
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
    raise ValueError(f"{name} ({m} x {m}, {k.dtype}) is not positive definite even with a "
                     f"jitter of {jitter / 10:.2g} on its diagonal: the kernel is degenerate "
                     f"on these inputs (duplicate points?); use fewer centres, float64, or "
                     f"deduplicate the inputs.")


def _solve_upper(t: Tensor, v: Tensor, *, left_t: bool = False) -> Tensor:
    """``T^-1 v`` (or ``T^-T v`` with ``left_t``) for upper-triangular ``T``."""
    if left_t:
        return torch.linalg.solve_triangular(t.T, v, upper=False)
    return torch.linalg.solve_triangular(t, v, upper=True)


def _b_t(t_up: Tensor, a_up: Tensor, v: Tensor) -> Tensor:
    """``B^T v = A^-T T^-T v``."""
    return _solve_upper(a_up, _solve_upper(t_up, v, left_t=True), left_t=True)


# ------------------------------------------------------------------ CG on a stored kernel
def cg_krr(k_train_train, y_train: Tensor, *, diag_reg: float,
           diag_reg_absolute_scale: bool = False,
           preconditioner: Literal["nystrom", "jacobi"] | None = "nystrom",
           n_centers: int | None = None, generator: torch.Generator | None = None,
           tol: float | None = None, max_iter: int | None = None,
           memory_budget: int | str | None = None, dtype: torch.dtype | None = None,
           on_failure: OnFailure = "raise", progress: bool | None = None
           ) -> tuple[Tensor, CGInfo]:
    """Dual coefficients ``(K + s I)^-1 y`` by preconditioned CG on a stored kernel.

    The kernel is read in row blocks ``K[i:j]`` (and diagonal blocks ``K[i:j, i:j]``),
    so it may live on disk: a tensor, a NumPy array, ``np.memmap``,
    ``np.load(path, mmap_mode="r")`` or a zarr array. Each CG iteration streams it
    once; blocks hold at most about an eighth of ``memory_budget``.

    ``s = diag_reg * trace(K) / N`` (``diag_reg`` with ``diag_reg_absolute_scale``), as
    in `ntkit.predict`. Preconditioners, ``P ~ K + s I``:

    - ``"nystrom"``: randomized Nystrom preconditioning (Frangella, Tropp & Udell,
      SIAM J. Matrix Anal. Appl. 2023, Alg. 2.1 and eq. 5.3) with ``M`` uniformly
      sampled columns as the sketch: ``K ~ U diag(l) U^T`` (rank ``M``) and
      ``P^-1 = (l_M + s) U (diag(l) + s I)^-1 U^T + (I - U U^T)``. Holds ``N x M``.
    - ``"jacobi"``: ``P = diag(K) + s I``.
    - None: plain CG.

    Args:
        k_train_train: ``(N, N)`` symmetric positive semi-definite kernel.
        y_train: ``(N, O)`` or ``(N,)``.
        diag_reg: relative regulariser (see above); ``s`` must come out > 0 unless the
            kernel is well conditioned.
        n_centers: columns of the Nystrom preconditioner, default ``min(N, 500)``.
        generator: draws those columns; None takes evenly spaced ones (the solution
            does not depend on them, only the number of iterations).
        tol: relative residual; default 1e-6 (float64), 1e-5 (float32).
        max_iter: default ``max(100, min(2 N, 10000))``.
        memory_budget: bytes (or ``"2GiB"``) for row blocks; default 1 GiB.
        dtype: of the solve; default the kernel's (float32 for float16 storage).
        on_failure, progress: as in `conjugate_gradient`.

    Returns:
        ``(alpha, info)``: ``alpha`` ``(N, O)`` (``(N,)`` for 1-D ``y``) with
        ``k(x, X) alpha`` the predictor, and a `CGInfo`.
    """
    shape = tuple(getattr(k_train_train, "shape", ()))
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
        raise ValueError(f"k_train_train must be a square (N, N) array supporting K[i:j], "
                         f"got {type(k_train_train).__name__} of shape {shape}.")
    n = shape[0]
    y, vector = _targets(y_train, n)
    diag_reg = _reg(diag_reg)
    if preconditioner not in ("nystrom", "jacobi", None):
        raise ValueError(f"preconditioner must be 'nystrom', 'jacobi' or None, got "
                         f"{preconditioner!r}.")
    store = _dtype_of(k_train_train)
    wdtype = dtype or (store if store in (torch.float32, torch.float64) else torch.float32)
    device = k_train_train.device if isinstance(k_train_train, Tensor) else y.device
    y = y.to(dtype=wdtype, device=device)
    budget = parse_memory(memory_budget)
    rows = _tile_rows(n, torch.finfo(wdtype).bits // 8, budget)
    ranges = [(i, min(i + rows, n)) for i in range(0, n, rows)]

    def block(i0: int, i1: int, cols=None) -> Tensor:
        b = k_train_train[i0:i1] if cols is None else k_train_train[i0:i1, cols[0]:cols[1]]
        return _as_tensor(b, wdtype, device)

    diag = torch.cat([torch.diagonal(block(i0, i1, (i0, i1))) for i0, i1 in ranges])
    if not bool(torch.isfinite(diag).all()):
        raise ValueError("k_train_train has NaN or infinite entries on its diagonal.")
    s = diag_reg if diag_reg_absolute_scale else diag_reg * float(diag.mean())

    def matvec(v: Tensor) -> Tensor:
        out = torch.empty_like(v)
        for i0, i1 in ranges:
            out[i0:i1] = block(i0, i1) @ v
        return out + s * v

    precond = None
    if preconditioner == "jacobi":
        inv = 1.0 / (diag + s)
        if not bool((diag + s > 0).all()):
            raise ValueError("the Jacobi preconditioner needs a positive diagonal of K + s I; "
                             "raise diag_reg or use preconditioner=None.")

        def precond(r: Tensor) -> Tensor:
            return inv[:, None] * r
    elif preconditioner == "nystrom":
        m = min(n, 500) if n_centers is None else n_centers
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
            raise ValueError(f"n_centers must be an int between 1 and N = {n}, got {m!r}.")
        if generator is not None:
            cols = torch.randperm(n, generator=generator, device=generator.device)[:m]
        else:
            cols = torch.linspace(0, n - 1, m).round().long()
        cols = cols.sort().values.cpu()
        y_sketch = torch.cat([block(i0, i1)[:, cols.to(device)] for i0, i1 in ranges])
        precond = _nystrom_preconditioner(y_sketch, y_sketch[cols.to(device)], s)
    tol = _default_tol(wdtype) if tol is None else tol
    alpha, info = conjugate_gradient(matvec, y, preconditioner=precond, tol=tol,
                                     max_iter=max_iter, on_failure=on_failure,
                                     progress=progress, what=f"(K + s I) alpha = y, N={n}")
    return (alpha[:, 0] if vector else alpha), info


def _dtype_of(k) -> torch.dtype:
    if isinstance(k, Tensor):
        return k.dtype
    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}.get(
        np.dtype(getattr(k, "dtype", np.float64)), torch.float32)


def _as_tensor(b, dtype: torch.dtype, device) -> Tensor:
    if isinstance(b, Tensor):
        return b.to(dtype=dtype, device=device)
    return torch.from_numpy(np.array(b)).to(dtype=dtype, device=device)  # a copy: memmaps are read-only


def _nystrom_preconditioner(y_sketch: Tensor, core: Tensor, s: float):
    """``r -> P^-1 r`` from ``K[:, S]`` ``(N, M)`` and ``K[S, S]`` (Frangella et al. 2023,
    Alg. 2.1 with a shift ``nu`` for stability, eq. 5.3 for ``P^-1``)."""
    core = 0.5 * (core + core.T)
    m = core.shape[0]
    nu = torch.finfo(core.dtype).eps * m * float(torch.diagonal(core).abs().mean()) + 1e-300
    eye = torch.eye(m, dtype=core.dtype, device=core.device)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(core + nu * eye)
        if int(info) == 0:
            break
        nu *= 10
    else:
        raise ValueError("the Nystrom preconditioner's core K[S, S] is not positive definite; "
                         "use preconditioner='jacobi' or fewer centres.")
    b = torch.linalg.solve_triangular(chol, y_sketch.T, upper=False).T     # Y C^-T
    u, sig, _ = torch.linalg.svd(b, full_matrices=False)
    lam = (sig**2 - nu).clamp_min(0.0)
    shift = float(lam[-1]) + s
    if shift <= 0:
        raise ValueError("the Nystrom preconditioner is singular (s = 0 and a rank-deficient "
                         "sketch); add diag_reg or use preconditioner='jacobi'.")
    coef = (shift / (lam + s))[:, None]

    def apply(r: Tensor) -> Tensor:
        ur = u.T @ r
        return u @ (coef * ur) + (r - u @ ur)
    return apply


# ------------------------------------------------------------------ by name
def exact_krr(kernel_fn: KernelFn, x_train: Tensor, y_train: Tensor, *, diag_reg: float,
              diag_reg_absolute_scale: bool = False, dtype: torch.dtype | None = None,
              memory_budget: int | str | None = None) -> KernelRidgePredictor:
    """``alpha = (K + s I)^-1 y`` by Cholesky on the dense ``N x N`` kernel; see
    `solve_krr`."""
    x = _inputs(x_train)
    y, vector = _targets(y_train, x.shape[0])
    diag_reg = _reg(diag_reg)
    k = kernel_fn(x, x).to(dtype or x.dtype)
    n = k.shape[0]
    s = diag_reg if diag_reg_absolute_scale else diag_reg * float(torch.diagonal(k).mean())
    k.diagonal().add_(s)
    chol, info = torch.linalg.cholesky_ex(k)
    if int(info) != 0:
        raise ValueError(f"the train-train kernel + s I ({n} x {n}, {k.dtype}) is not positive "
                         f"definite to working precision; add diag_reg (e.g. 1e-4, relative to "
                         f"the mean diagonal) or use float64.")
    del k
    alpha = torch.cholesky_solve(y.to(chol), chol)
    return KernelRidgePredictor(kernel_fn, x, alpha, info=None, solver="exact",
                                diag_reg_absolute=s, memory_budget=memory_budget,
                                vector=vector)


def solve_krr(kernel_fn: KernelFn, x_train: Tensor, y_train: Tensor, *,
              solver: Solver = "auto", diag_reg: float, diag_reg_absolute_scale: bool = False,
              n_centers: int | None = None, generator: torch.Generator | None = None,
              kernel_diag_fn: Callable[[Tensor], Tensor] | None = None,
              tol: float | None = None, max_iter: int | None = None,
              memory_budget: int | str | None = None, dtype: torch.dtype | None = None,
              on_failure: OnFailure = "raise", progress: bool | None = None
              ) -> KernelRidgePredictor:
    """Kernel ridge regression / the ``t = inf`` predictor ``k(x, X) (K + s I)^-1 y``,
    by the solver named: the plain function behind estimators' ``solver=`` option.

    ``s = diag_reg * trace(K) / N`` (relative, `ntkit.predict`'s convention) or
    ``diag_reg`` with ``diag_reg_absolute_scale``. Solvers:

    - ``"exact"``: Cholesky of the dense ``N x N`` kernel (`exact_krr`); memory
      ``N^2``, time ``N^3 / 3``.
    - ``"cg"``: the dense kernel, solved by CG with a Nystrom preconditioner of
      ``n_centers`` columns (`cg_krr`); memory ``N^2``, time ``N^2`` per iteration.
      For kernels too large for memory, store them on disk and call `cg_krr`.
    - ``"nystrom"``: FALKON (`nystrom_krr`) with ``n_centers`` centres (default
      ``min(N, max(500, round(2 sqrt(N))))``); memory ``N M`` or less, never ``N^2``;
      approximate for ``M < N``, exact at ``M = N``.
    - ``"auto"``: ``"exact"`` when two ``N x N`` kernels fit in ``memory_budget``,
      else ``"nystrom"``.

    Args:
        kernel_fn: ``(a, b) -> (Na, Nb)``, e.g. ``kernel_function(net, "ntk")``.
        x_train, y_train: ``(N, ...)`` and ``(N, O)`` or ``(N,)``.
        n_centers, generator: for ``"nystrom"`` (generator required when
            ``n_centers < N``) and the ``"cg"`` preconditioner.
        kernel_diag_fn, tol, max_iter, on_failure, progress: see `nystrom_krr` and
            `conjugate_gradient` (``"nystrom"`` keeps ``K_nm`` when it fits the budget).
        memory_budget: bytes for kernel tiles (and the ``"auto"`` choice); default 1 GiB.
        dtype: of the linear algebra; default the inputs'.

    Returns:
        A `KernelRidgePredictor`: ``.predict(x_test)`` ``(N_test, O)``, ``.centers``,
        ``.alpha``, ``.info`` (None for ``"exact"``), ``.solver`` (the one used).

    Example::

        kfn = ntkit.solvers.kernel_function(net, "ntk")
        model = ntkit.solvers.solve_krr(kfn, x, y, solver="nystrom", diag_reg=1e-3,
                                        n_centers=2000, generator=torch.Generator().manual_seed(0))
        y_hat = model.predict(x_test)
    """
    if solver not in ("auto", "exact", "cg", "nystrom"):
        raise ValueError(f"solver must be 'auto', 'exact', 'cg' or 'nystrom', got {solver!r}.")
    x = _inputs(x_train)
    n = x.shape[0]
    if solver == "auto":
        bytes_ = torch.finfo(dtype or x.dtype).bits // 8
        solver = "exact" if 2 * n * n * bytes_ <= parse_memory(memory_budget) else "nystrom"
    if solver == "exact":
        return exact_krr(kernel_fn, x, y_train, diag_reg=diag_reg,
                         diag_reg_absolute_scale=diag_reg_absolute_scale, dtype=dtype,
                         memory_budget=memory_budget)
    if solver == "cg":
        k = kernel_fn(x, x)
        alpha, info = cg_krr(k, y_train, diag_reg=diag_reg,
                             diag_reg_absolute_scale=diag_reg_absolute_scale,
                             n_centers=None if n_centers is None else min(n_centers, n),
                             generator=generator, tol=tol, max_iter=max_iter,
                             memory_budget=memory_budget, dtype=dtype or x.dtype,
                             on_failure=on_failure, progress=progress)
        _, vector = _targets(y_train, n)
        s = diag_reg if diag_reg_absolute_scale else diag_reg * float(
            torch.diagonal(k).double().mean())
        del k
        return KernelRidgePredictor(kernel_fn, x, alpha if not vector else alpha[:, None],
                                    info=info, solver="cg", diag_reg_absolute=s,
                                    memory_budget=memory_budget, vector=vector)
    m = min(n, max(500, round(2 * math.sqrt(n)))) if n_centers is None else n_centers
    return nystrom_krr(kernel_fn, x, y_train, n_centers=m, diag_reg=diag_reg,
                       generator=generator, diag_reg_absolute_scale=diag_reg_absolute_scale,
                       kernel_diag_fn=kernel_diag_fn, tol=tol, max_iter=max_iter,
                       memory_budget=memory_budget, dtype=dtype, on_failure=on_failure,
                       progress=progress)

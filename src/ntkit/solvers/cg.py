"""Preconditioned conjugate gradients, and CG kernel regression on a stored kernel.

- `conjugate_gradient`: preconditioned CG for symmetric positive definite systems
  with several right-hand sides, from a matrix-vector product alone.
- `cg_krr`: the dual coefficients ``(K + s I)^-1 y`` of a kernel given as a tensor or
  an on-disk array (``np.memmap``, ``np.load(..., mmap_mode="r")``, zarr), read in row
  blocks, with a Nystrom or Jacobi preconditioner.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .._budget import parse_memory, progress_bar
from ..errors import ConvergenceWarning, did_not_converge, message, not_positive_definite
from ._common import (
    OnFailure,
    check_diag_reg,
    check_symmetric,
    check_targets,
    default_tol,
    diag_reg_absolute,
    row_ranges,
    tile_rows,
)

__all__ = ["CGInfo", "cg_krr", "conjugate_gradient"]

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
    if x0 is not None:
        x0 = (x0[:, None] if vector else x0).to(b2)
        if x0.shape != b2.shape:
            raise ValueError(f"x0 must be shaped like b {tuple(b.shape)}, got {tuple(x0.shape)}.")
    state = cg_start(matvec, b2, precond, x0)
    reason = cg_iterate(state, matvec, precond, b2, tol=tol, max_iter=max_iter,
                        stall_window=stall_window, progress=progress, what=what)
    x, info = cg_finish(state, b2, reason, tol=tol, on_failure=on_failure, what=what)
    return (x[:, 0] if vector else x), info


@dataclass
class CGState:
    """The recursion's state between two iterations of `conjugate_gradient` (what a
    checkpoint of the solve saves; `ntkit.solvers.checkpoint`)."""

    x: Tensor
    r: Tensor
    z: Tensor
    p: Tensor
    rz: Tensor
    best_x: Tensor
    b_norm: Tensor
    live: Tensor
    it: int
    residuals: list[float]
    bests: list[float]
    best: float

    @property
    def rel(self) -> float:
        """The current relative residual."""
        return self.residuals[-1]


def cg_start(matvec: Callable[[Tensor], Tensor], b2: Tensor, precond: Callable[[Tensor], Tensor],
             x0: Tensor | None = None) -> CGState:
    """The state before the first iteration, from ``x0`` (default zeros); ``b2`` is ``(N, O)``."""
    b_norm = torch.linalg.vector_norm(b2, dim=0)
    live = b_norm > 0
    b_norm = torch.where(live, b_norm, torch.ones_like(b_norm))
    if x0 is None:
        x = torch.zeros_like(b2)
        r = b2.clone()
    else:
        x = x0.clone()
        r = b2 - _checked(matvec(x), b2, "matvec")
    rel = _relative(r, b_norm, live)
    z = _checked(precond(r), b2, "preconditioner")
    return CGState(x=x, r=r, z=z, p=z.clone(), rz=(r * z).sum(0), best_x=x.clone(),
                   b_norm=b_norm, live=live, it=0, residuals=[rel], bests=[rel], best=rel)


def cg_iterate(s: CGState, matvec, precond, b2: Tensor, *, tol: float, max_iter: int,
               stall_window: int, progress: bool | None, what: str,
               after_step: Callable[[CGState, bool], None] | None = None) -> str | None:
    """Runs the recursion of `conjugate_gradient` on ``s`` (in place) until ``tol``,
    ``max_iter``, a stall or lost curvature; returns why it stopped short, or None.
    ``after_step(s, last)`` runs after every iteration (``last``: the final one)."""
    bar = progress_bar(range(max_iter), desc=f"CG: {what}", unit="it", progress=progress,
                       initial=s.it)
    bar.set_postfix(rel_residual=f"{s.rel:.2e}")
    reason = None
    try:
        while s.rel > tol:
            if s.it >= max_iter:
                reason = f"max_iter={max_iter} was reached"
                break
            if s.it >= stall_window and s.bests[-1] > (1 - 1e-3) * s.bests[-1 - stall_window]:
                reason = (f"the residual stopped decreasing (no new best over the last "
                          f"{stall_window} iterations)")
                break
            ap = _checked(matvec(s.p), b2, "matvec")
            pap = (s.p * ap).sum(0)
            active = (_column_rel(s.r, s.b_norm, s.live) > tol) & (pap > 0)
            a = torch.where(active, s.rz / torch.where(active, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
            s.x = s.x + a * s.p
            s.r = s.r - a * ap
            s.z = _checked(precond(s.r), b2, "preconditioner")
            rz_new = (s.r * s.z).sum(0)
            beta = torch.where(active & (s.rz != 0), rz_new / torch.where(
                s.rz != 0, s.rz, torch.ones_like(s.rz)), torch.zeros_like(s.rz))
            s.p = s.z + beta * s.p
            s.rz = rz_new
            s.it += 1
            rel = _relative(s.r, s.b_norm, s.live)
            if not math.isfinite(rel):
                raise FloatingPointError(
                    f"conjugate gradients on {what} produced a non-finite residual at "
                    f"iteration {s.it}: " + message("not_positive_definite", "the system",
                                                     str(b2.dtype)))
            s.residuals.append(rel)
            if rel < s.best:
                s.best, s.best_x = rel, s.x
            s.bests.append(s.best)
            bar.update(1)
            bar.set_postfix(rel_residual=f"{rel:.2e}")
            stop = not bool(active.any())
            if after_step is not None:
                after_step(s, stop or rel <= tol)
            if stop:
                if rel > tol:
                    reason = "the search directions lost positive curvature (rounding)"
                break
    finally:
        bar.close()
    return reason


def cg_finish(s: CGState, b2: Tensor, reason: str | None, *, tol: float,
              on_failure: OnFailure, what: str) -> tuple[Tensor, CGInfo]:
    """The solution ``(N, O)`` and its `CGInfo`: the last iterate when converged, else
    the best one (``on_failure``: raise `ConvergenceError` or warn)."""
    converged = s.rel <= tol
    x = s.x
    if not converged:
        x = s.best_x
        error = did_not_converge(
            f"conjugate gradients on {what}",
            f"stopped at relative residual {s.best:.3g} after {s.it} iterations, above "
            f"tol={tol:g}: {reason or 'no progress'}; {b2.dtype}")
        if on_failure == "raise":
            raise error
        warnings.warn(str(error), ConvergenceWarning, stacklevel=3)
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"conjugate gradients on {what} produced NaN or infinite "
                                 f"values: " + message("did_not_converge", "the solve"))
    return x, CGInfo(iterations=s.it, residuals=tuple(s.residuals), converged=converged,
                     tol=tol)


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
    y, vector = check_targets(y_train, n)
    diag_reg = check_diag_reg(diag_reg)
    if isinstance(k_train_train, Tensor):     # in memory: checked whole (arrays on disk are
        if not k_train_train.is_floating_point():     # streamed, their diagonal checked)
            raise TypeError(f"k_train_train must be floating-point, got "
                            f"{k_train_train.dtype}.")
        if not bool(torch.isfinite(k_train_train).all()):
            raise ValueError("k_train_train has NaN or infinite entries; a kernel matrix "
                             "must be finite (compute it in float64, or rescale the inputs).")
        check_symmetric(k_train_train, "k_train_train")
    if preconditioner not in ("nystrom", "jacobi", None):
        raise ValueError(f"preconditioner must be 'nystrom', 'jacobi' or None, got "
                         f"{preconditioner!r}.")
    store = _dtype_of(k_train_train)
    wdtype = dtype or (store if store in (torch.float32, torch.float64) else torch.float32)
    device = k_train_train.device if isinstance(k_train_train, Tensor) else y.device
    y = y.to(dtype=wdtype, device=device)
    budget = parse_memory(memory_budget)
    ranges = row_ranges(n, tile_rows(n, torch.finfo(wdtype).bits // 8, budget))

    def block(i0: int, i1: int, cols=None) -> Tensor:
        b = k_train_train[i0:i1] if cols is None else k_train_train[i0:i1, cols[0]:cols[1]]
        return _as_tensor(b, wdtype, device)

    diag = torch.cat([torch.diagonal(block(i0, i1, (i0, i1))) for i0, i1 in ranges])
    if not bool(torch.isfinite(diag).all()):
        raise ValueError("k_train_train has NaN or infinite entries on its diagonal.")
    s = diag_reg_absolute(diag, diag_reg, diag_reg_absolute_scale)

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
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 1 <= m <= n:
            raise ValueError(f"n_centers must be an int between 1 and N = {n}, got {m!r}.")
        m = int(m)
        if generator is not None:
            cols = torch.randperm(n, generator=generator, device=generator.device)[:m]
        else:
            cols = torch.linspace(0, n - 1, m).round().long()
        cols = cols.sort().values.cpu()
        y_sketch = torch.cat([block(i0, i1)[:, cols.to(device)] for i0, i1 in ranges])
        precond = _nystrom_preconditioner(y_sketch, y_sketch[cols.to(device)], s)
    tol = default_tol(wdtype) if tol is None else tol
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
    # a copy: memmaps are read-only
    return torch.from_numpy(np.array(b)).to(dtype=dtype, device=device)


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
        raise not_positive_definite("the Nystrom preconditioner's core K[S, S]",
                                    f"{m} x {m}, {core.dtype}",
                                    fix="use preconditioner='jacobi' or fewer centres")
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



"""What every solver and `ntkit.predict` share: the checks of training data, the one
relative regulariser, the one ``"auto"`` solver rule and the one row-batching rule.

Imports nothing of ntkit but the memory budget parser (a leaf module).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._budget import parse_memory
from ..errors import MemoryBudgetError, out_of_memory

__all__ = [
    "SOLVERS",
    "KernelFn",
    "OnFailure",
    "Solver",
    "check_diag_reg",
    "check_inputs",
    "check_symmetric",
    "check_targets",
    "default_tol",
    "diag_reg_absolute",
    "kernel_diagonal",
    "resolve_solver",
    "row_ranges",
    "rows_within",
    "symmetry_tolerance",
]

KernelFn = Callable[[Tensor, Tensor], Tensor]
Solver = Literal["auto", "exact", "cg", "nystrom"]
SOLVERS: tuple[str, ...] = ("auto", "exact", "cg", "nystrom")
OnFailure = Literal["raise", "warn"]


# ------------------------------------------------------------------ the regulariser
def diag_reg_absolute(diagonal: Tensor, diag_reg: Any, absolute: bool = False):
    """The number ``s`` added to a kernel's diagonal: ``diag_reg * mean(diag K)``.

    neural-tangents' convention (``predict.gradient_descent_mse``): ``diag_reg`` is
    relative to the mean diagonal, ``s = diag_reg * trace(K) / N``, unless
    ``absolute`` (its ``diag_reg_absolute_scale``), where ``s = diag_reg``. The mean is
    accumulated in float64, where a float32 sum of a large diagonal loses digits.

    Args:
        diagonal: ``diag K``, ``(N,)``.
        diag_reg: a number >= 0, or a 0-dim tensor (differentiable).
        absolute: ``diag_reg`` is ``s`` itself.

    Raises:
        ValueError: ``diag_reg`` is negative, NaN or infinite.

    Returns:
        ``s`` as a Python float; a 0-dim tensor in ``diagonal``'s dtype when ``diag_reg``
        is a tensor or ``diagonal`` requires grad (so ``s`` stays differentiable).
    """
    value = float(diag_reg.detach()) if isinstance(diag_reg, Tensor) else diag_reg
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"diag_reg must be a finite number >= 0 (a noise variance, or its "
                         f"ratio to the mean diagonal), got {value!r}; use 0 or e.g. 1e-4.")
    if absolute:
        return diag_reg
    mean = diagonal.to(torch.float64).mean()
    if isinstance(diag_reg, Tensor) or diagonal.requires_grad:
        return diag_reg * mean.to(diagonal.dtype)
    return diag_reg * float(mean)


def check_diag_reg(diag_reg: Any) -> float:
    """``diag_reg`` as a float, checked finite and >= 0 (numpy scalars accepted)."""
    ok = isinstance(diag_reg, (int, float, np.integer, np.floating)) and not isinstance(
        diag_reg, bool)
    if not ok or not (math.isfinite(diag_reg) and diag_reg >= 0):
        raise ValueError(f"diag_reg must be a finite number >= 0, got {diag_reg!r}.")
    return float(diag_reg)


def kernel_diagonal(kernel_fn: KernelFn, x: Tensor,
                    kernel_diag_fn: Callable[[Tensor], Tensor] | None = None,
                    block: int = 256) -> Tensor:
    """``k(x_i, x_i)`` ``(N,)``: from ``kernel_diag_fn``, ``kernel_fn.diagonal`` (as on
    `ntkit.kernel_function.KernelFunction`), or the diagonals of ``block x block``
    blocks of ``kernel_fn``."""
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


# ------------------------------------------------------------------ the "auto" rule
def resolve_solver(solver: str, n: int, dtype: torch.dtype,
                   memory_budget: int | str | None, *, finite_time: bool = False,
                   allowed: tuple[str, ...] = SOLVERS) -> str:
    """The solver a call uses: ``solver`` itself, or for ``"auto"``: ``"exact"`` when two
    ``N x N`` kernels in ``dtype`` fit in ``memory_budget`` (default 1 GiB) or finite
    training times are asked for (only the eigendecomposition gives them), else
    ``"nystrom"``, with a `UserWarning` saying so (and how to pin the solver).

    Raises:
        ValueError: ``solver`` is not among ``allowed``, or an iterative solver is asked
            for at finite times.
    """
    if solver not in allowed:
        raise ValueError(f"solver must be one of {', '.join(map(repr, allowed))}, got "
                         f"{solver!r}: 'exact' (Cholesky / eigendecomposition of the N x N "
                         f"kernel), 'cg' (conjugate gradients on it), 'nystrom' (FALKON, "
                         f"never N x N), 'auto'.")
    if solver == "auto":
        bytes_ = torch.finfo(dtype).bits // 8
        budget = parse_memory(memory_budget)
        fits = 2 * n * n * bytes_ <= budget
        solver = "exact" if fits or finite_time else "nystrom"
        if solver == "nystrom":
            warnings.warn(
                f"solver='auto' chose 'nystrom' (FALKON, an approximation with n_centers "
                f"centres) instead of 'exact': two {n} x {n} kernels in {dtype} take "
                f"{2 * n * n * bytes_ / 2**20:.3g} MiB, more than memory_budget = "
                f"{budget / 2**20:.3g} MiB. Pin the solver to silence this: "
                f"solver='nystrom' to keep the approximation, or solver='exact' with a "
                f"larger memory_budget for the exact solve.", UserWarning, stacklevel=3)
    if solver != "exact" and finite_time:
        raise ValueError(f"solver={solver!r} solves the converged (t = inf) regression only; "
                         f"use solver='exact' (one eigendecomposition) for finite times.")
    return solver


# ------------------------------------------------------------------ batching
def rows_within(budget: int, bytes_per_row: int) -> int:
    """Rows of a batch whose rows take ``bytes_per_row`` each: as many as fit in
    ``budget``, at least one."""
    return max(1, budget // max(1, bytes_per_row))


def row_ranges(n: int, rows: int) -> list[tuple[int, int]]:
    """``[(0, rows), (rows, 2 rows), ...]`` covering ``range(n)``; the last may be short
    (a batch size never has to divide ``n``)."""
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


def tile_rows(m: int, element_size: int, budget: int) -> int:
    """Rows of an ``(rows, m)`` kernel tile: about an eighth of the budget, with room
    for the kernel function's copies (NNGP and NTK, a cast)."""
    return rows_within(budget, 8 * max(m, 1) * element_size)


# ------------------------------------------------------------------ out of memory
@contextmanager
def memory_guard(what: str, detail: str = "") -> Iterator[None]:
    """Re-raises running out of memory inside the block (``MemoryError``, torch's
    ``OutOfMemoryError``) as `ntkit.errors.MemoryBudgetError` with the message of the
    errors table (what did not fit, why, what to do), chained to the original."""
    oom = getattr(torch, "OutOfMemoryError", MemoryError)
    try:
        yield
    except MemoryBudgetError:
        raise
    except (MemoryError, oom) as e:
        raise out_of_memory(what, detail) from e


# ------------------------------------------------------------------ checks
def check_targets(y: Any, n: int) -> tuple[Tensor, bool]:
    """Training targets as ``(N, O)``, and whether they were given as ``(N,)``.

    Raises:
        TypeError: ``y`` is not a tensor.
        ValueError: its shape does not fit ``n`` or it has NaN or infinite entries.
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"y_train must be a torch.Tensor, got {type(y).__name__}.")
    vector = y.ndim == 1
    y2 = y[:, None] if vector else y
    if y2.ndim != 2 or y2.shape[0] != n:
        raise ValueError(f"y_train must have shape (N, outputs) or (N,) with N = {n} "
                         f"training points (the kernel's size), got {tuple(y.shape)}.")
    if not bool(torch.isfinite(y2).all()):
        raise ValueError("y_train has NaN or infinite entries.")
    return y2, vector


def symmetry_tolerance(dtype: torch.dtype) -> float:
    """How far, relative to ``max |K|``, a train-train kernel may be from symmetric and
    still count as symmetric to rounding: ``max(100 eps, 1e-12)`` (1.2e-5 in float32,
    1e-12 in float64)."""
    return max(100 * torch.finfo(dtype).eps, 1e-12)


def check_symmetric(k: Tensor, name: str) -> None:
    """Refuses a square ``k`` with ``max |K - K^T| > symmetry_tolerance * max |K|``.

    The factorisations (Cholesky, ``eigh``) read one triangle only, so a non-symmetric
    train-train kernel would be used as its lower triangle, silently.
    """
    kd = k.detach()
    scale = float(kd.abs().max())
    if scale == 0.0:
        return
    gap = float((kd - kd.T).abs().max())
    tol = symmetry_tolerance(k.dtype)
    if gap > tol * scale:
        raise ValueError(
            f"{name} is not symmetric: max |K - K^T| = {gap:.3g}, {gap / scale:.2g} of "
            f"max |K| = {scale:.3g}, above the rounding tolerance {tol:.1g} for {k.dtype}. "
            f"A train-train kernel k(x_train, x_train) is symmetric, and only its lower "
            f"triangle would be read. Pass the kernel of the training inputs with "
            f"themselves (e.g. net.kernel(x_train).ntk), not a test-train kernel; or "
            f"symmetrise it, (k + k.T) / 2, if it is only a little off.")


def check_inputs(x: Any) -> Tensor:
    """Training inputs ``(N, features...)``, checked floating-point and finite."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
        raise TypeError(f"x_train must be a floating-point tensor of shape (N, features...), "
                        f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x_train has NaN or infinite entries.")
    return x


def default_tol(dtype: torch.dtype) -> float:
    """CG's default relative residual: 1e-6 in float64, 1e-5 otherwise."""
    return 1e-6 if dtype == torch.float64 else 1e-5

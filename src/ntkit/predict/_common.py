"""What the closed-form predictors share: one train-train kernel factorised once, the
checks of kernels, targets and times, and the spectral functions of gradient flow.

Imports no layer: `ntkit.predict` knows a network only through
`ntkit.kernel_function`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import IllConditionedWarning, not_positive_definite
from ..solvers._common import check_targets, diag_reg_absolute, memory_guard

__all__ = ["Factor", "check_finite", "check_positive", "check_square", "decay", "grown",
           "regularised_cholesky", "targets", "times_of"]


class Factor:
    """One train-train kernel, regularised, factorised once on demand: its
    eigendecomposition for finite times, its Cholesky factor for ``t = inf``.

    The regulariser is `ntkit.solvers.diag_reg_absolute`: ``diag_reg * trace(K) / N``
    (or ``diag_reg`` itself when ``absolute``).
    """

    def __init__(self, k: Tensor, diag_reg: float, absolute: bool, name: str):
        k = check_square(k, name)
        if not (math.isfinite(diag_reg) and diag_reg >= 0):
            raise ValueError(f"diag_reg must be a finite number >= 0, got {diag_reg!r}.")
        n = k.shape[0]
        # s is a constant of the factorisation (a number, as neural-tangents adds it)
        s = diag_reg_absolute(torch.diagonal(k).detach(), diag_reg, absolute)
        self.k = k + s * torch.eye(n, dtype=k.dtype, device=k.device)
        self.name = name
        self._eig: tuple[Tensor, Tensor] | None = None
        self._chol: Tensor | None = None
        self.factorisations = 0

    @property
    def eig(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (negative rounding clamped to 0) and eigenvectors."""
        if self._eig is None:
            self.factorisations += 1
            n = self.k.shape[0]
            with memory_guard(f"the eigendecomposition of {self.name}", f"{n} x {n}"):
                evals, evecs = torch.linalg.eigh(self.k)
            top = float(evals.abs().max()) if evals.numel() else 0.0
            low = float(evals.min()) if evals.numel() else 0.0
            if low < -1e3 * torch.finfo(self.k.dtype).eps * max(top, 1e-300) * self.k.shape[0]:
                warnings.warn(
                    f"{self.name} has a negative eigenvalue {low:.3g} (largest {top:.3g}); it is "
                    f"not a valid kernel matrix beyond rounding. Negative eigenvalues are "
                    f"clamped to 0; check the kernel, or add diag_reg.",
                    RuntimeWarning, stacklevel=4)
            self._eig = (evals.clamp_min(0.0), evecs)
        return self._eig

    def solve(self, b: Tensor) -> Tensor:
        """``K^-1 b`` by Cholesky, with a clear error when K is not positive definite."""
        if self._chol is None:
            self.factorisations += 1
            n = self.k.shape[0]
            with memory_guard(f"the Cholesky factor of {self.name}", f"{n} x {n}"):
                chol, info = torch.linalg.cholesky_ex(self.k)
            if int(info) != 0:
                raise not_positive_definite(
                    self.name, f"{n} x {n}, {self.k.dtype}; the t = inf solution does not "
                               f"exist")
            self._chol = chol
            warn_if_ill_conditioned(chol, self.name)
        out = torch.cholesky_solve(b.reshape(b.shape[0], -1), self._chol).reshape(b.shape)
        check_finite(out, self.name)
        return out

    def spectral(self, fn, b: Tensor) -> Tensor:
        """``V diag(fn(lambda)) V^T b`` for ``b`` of shape ``(N, ...)`` or with a
        leading time axis of ``fn``'s values ``(T, N)``."""
        evals, evecs = self.eig
        coef = fn(evals)                                        # (N,) or (T, N)
        proj = evecs.T @ b.reshape(b.shape[0], -1)              # (N, M)
        scaled = coef.unsqueeze(-1) * proj                      # (N, M) or (T, N, M)
        if scaled.ndim == 2:
            return (evecs @ scaled).reshape(b.shape)
        # every time in one product: (N, N) @ (N, T * M)
        t, n, m = scaled.shape
        out = evecs @ scaled.permute(1, 0, 2).reshape(n, t * m)
        return out.reshape(n, t, m).permute(1, 0, 2).reshape((t,) + b.shape)


def regularised_cholesky(k: Tensor, diag_reg, absolute: bool, name: str) -> Tensor:
    """The lower Cholesky factor of ``k + s I`` (``s`` differentiable in ``k`` and a
    tensor ``diag_reg``), warning when it is ill-conditioned."""
    n = k.shape[0]
    s = diag_reg_absolute(torch.diagonal(k), diag_reg, absolute)
    chol, info = torch.linalg.cholesky_ex(k + s * torch.eye(n, dtype=k.dtype, device=k.device))
    if int(info) != 0:
        raise not_positive_definite(name, f"{n} x {n}, {k.dtype}",
                                    fix="raise diag_reg (the noise variance, relative to the "
                                        "mean diagonal)")
    warn_if_ill_conditioned(chol, name)
    return chol


def warn_if_ill_conditioned(chol: Tensor, name: str) -> None:
    """Warns when the Cholesky factor shows a condition number near 1 / eps (its
    squared diagonal ratio is a lower bound of the condition number)."""
    d = torch.diagonal(chol).detach().abs()
    cond = float((d.max() / d.min().clamp_min(torch.finfo(d.dtype).tiny)) ** 2)
    eps = torch.finfo(chol.dtype).eps
    if cond * eps > 1e-3:
        warnings.warn(
            f"{name} is ill-conditioned (condition number at least {cond:.2g} in "
            f"{chol.dtype}): solutions may have lost most of their digits; add diag_reg or "
            f"use float64.", IllConditionedWarning, stacklevel=4)


def check_square(k: Tensor, name: str) -> Tensor:
    """``k`` checked: a finite floating-point ``(N, N)`` tensor."""
    if not isinstance(k, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(k).__name__}.")
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(f"{name} must be a square (N, N) matrix, got shape {tuple(k.shape)}.")
    if not k.is_floating_point():
        raise TypeError(f"{name} must be floating-point, got {k.dtype}.")
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"{name} has NaN or infinite entries.")
    return k


def check_finite(x: Tensor, what: str) -> None:
    """Raises `FloatingPointError` naming ``what`` when a prediction is not finite."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            f"the prediction from {what} is not finite: the kernel is too ill-conditioned in "
            f"{x.dtype}; add diag_reg or use float64."
        )


def check_positive(x: Any, name: str) -> float:
    """``x`` as a positive finite float (numpy scalars accepted)."""
    ok = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
    if not ok or not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a positive finite number, got {x!r}.")
    return float(x)


def targets(y: Any, n: int, like: Tensor) -> Tensor:
    """Training targets as ``(N, O)`` in ``like``'s dtype and device
    (`ntkit.solvers`' one check of targets)."""
    return check_targets(y, n)[0].to(dtype=like.dtype, device=like.device)


def times_of(t, like: Tensor) -> tuple[Tensor, bool]:
    """Times as a 1-D tensor, and whether a scalar was given."""
    scalar = t is None or (not isinstance(t, Tensor) and not hasattr(t, "__len__")) or (
        isinstance(t, Tensor) and t.ndim == 0)
    t = torch.as_tensor(math.inf if t is None else t, dtype=like.dtype, device=like.device)
    t = t.reshape(-1)
    if bool(torch.isnan(t).any()) or bool((t < 0).any()):
        raise ValueError(f"times must be >= 0 (inf allowed), got {t.tolist()}.")
    return t, scalar


def decay(rate: float, times: Tensor, squared: bool = False):
    """``lambda -> exp(-c lambda t)`` for each time (``c = rate``, doubled if squared)."""
    c = rate * (2.0 if squared else 1.0)
    return lambda lam: torch.exp(-c * times[:, None] * lam[None, :])


def grown(rate: float, times: Tensor, squared: bool = False):
    """``lambda -> (1 - exp(-c lambda t)) / lambda``, ``c t`` at ``lambda = 0``."""
    c = rate * (2.0 if squared else 1.0)

    def fn(lam: Tensor) -> Tensor:
        ct = c * times[:, None]
        lam = lam[None, :]
        safe = torch.where(lam > 0, lam, torch.ones_like(lam))
        return torch.where(lam > 0, -torch.expm1(-ct * safe) / safe, ct.expand(-1, lam.shape[1]))
    return fn

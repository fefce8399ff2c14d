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

from ..errors import IllConditionedWarning, check_finite_output, not_positive_definite
from ..solvers._common import (
    check_symmetric,
    check_targets,
    diag_reg_absolute,
    memory_guard,
    symmetry_tolerance,
)

__all__ = ["Factor", "check_diag_reg_value", "check_finite", "check_kernel", "check_positive",
           "check_square", "check_symmetric", "decay", "grown", "initial_outputs",
           "regularised_cholesky", "symmetry_tolerance", "targets", "times_of"]


class Factor:
    """One train-train kernel, regularised, factorised once on demand: its
    eigendecomposition for finite times, its Cholesky factor for ``t = inf``.

    The regulariser is `ntkit.solvers.diag_reg_absolute`: ``diag_reg * trace(K) / N``
    (or ``diag_reg`` itself when ``absolute``).
    """

    def __init__(self, k: Tensor, diag_reg: float, absolute: bool, name: str):
        k = check_square(k, name)
        check_diag_reg_value(diag_reg)
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


def check_diag_reg_value(diag_reg: Any) -> None:
    """Refuses a ``diag_reg`` (number or 0-dim tensor) that is negative, NaN or infinite:
    it is a noise variance (or its ratio to the mean diagonal), never below 0."""
    if isinstance(diag_reg, Tensor):
        if diag_reg.numel() != 1 or diag_reg.is_complex():
            raise ValueError(f"diag_reg must be a number or a one-element tensor, got a tensor "
                             f"of shape {tuple(diag_reg.shape)} and dtype {diag_reg.dtype}.")
        value = float(diag_reg.detach())
    elif isinstance(diag_reg, (int, float, np.integer, np.floating)) and not isinstance(
            diag_reg, bool):
        value = float(diag_reg)
    else:
        raise TypeError(f"diag_reg must be a number >= 0 (or a 0-dim tensor), got "
                        f"{type(diag_reg).__name__}.")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"diag_reg must be a finite number >= 0, got {value!r}: it is added to the "
            f"diagonal of the train-train kernel (the noise variance of a GP), so a negative "
            f"value would make a posterior with negative noise. Use 0 or a small positive "
            f"value such as 1e-4 (relative to the mean diagonal).")


def regularised_cholesky(k: Tensor, diag_reg, absolute: bool, name: str) -> Tensor:
    """The lower Cholesky factor of ``k + s I`` (``s`` differentiable in ``k`` and a
    tensor ``diag_reg``), warning when it is ill-conditioned.

    Raises:
        ValueError: ``diag_reg`` is negative or not finite.
    """
    check_diag_reg_value(diag_reg)
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


def check_square(k: Tensor, name: str, *, symmetric: bool = True) -> Tensor:
    """``k`` checked: a finite floating-point ``(N, N)`` tensor, symmetric to rounding
    (`check_symmetric`) unless ``symmetric=False``."""
    if not isinstance(k, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(k).__name__}.")
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(f"{name} must be a square (N, N) matrix, got shape {tuple(k.shape)}.")
    if not k.is_floating_point():
        raise TypeError(f"{name} must be floating-point (float32 or float64), got {k.dtype}; "
                        f"convert it with .float() or .double().")
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"{name} has NaN or infinite entries; a kernel matrix must be "
                         f"finite (compute it in float64, or rescale the inputs).")
    if symmetric:
        check_symmetric(k, name)
    return k


def check_kernel(k: Any, name: str, shape: tuple, like: Tensor) -> Tensor:
    """A kernel argument other than the train-train one, checked and cast.

    Args:
        k: the kernel matrix given.
        name: its argument name (``"k_test_train"``), used in messages.
        shape: the expected shape; ``None`` entries take any size (``N_test``).
        like: the train-train kernel, whose dtype and device ``k`` is cast to.

    Raises:
        TypeError: ``k`` is not a floating-point tensor.
        ValueError: its shape does not match, or it has NaN or infinite entries.
    """
    want = "(" + ", ".join("N_test" if d is None else str(d) for d in shape) + ")"
    if not isinstance(k, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {want}, got "
                        f"{type(k).__name__}.")
    if not k.is_floating_point():
        raise TypeError(f"{name} must be floating-point, got {k.dtype}; it is cast to the "
                        f"train-train kernel's dtype ({like.dtype}): pass .to({like.dtype}).")
    if k.ndim != len(shape) or any(d is not None and d != g for d, g in zip(shape, k.shape)):
        raise ValueError(f"{name} must have shape {want} (N = {like.shape[0]} training "
                         f"points), got {tuple(k.shape)}.")
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"{name} has NaN or infinite entries; kernels must be finite "
                         f"(compute them in float64, or rescale the inputs).")
    return k.to(dtype=like.dtype, device=like.device)


def initial_outputs(value: Any, shape: tuple[int, ...], name: str, like: Tensor) -> Tensor:
    """Outputs at ``t = 0``: a number or a tensor broadcastable to ``shape``
    (``(N, O)``), finite, as a tensor of that shape in ``like``'s dtype and device.

    Raises:
        TypeError: ``value`` is neither a number nor a tensor.
        ValueError: its shape does not broadcast to ``shape``, or it is not finite.
    """
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        t = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    elif isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got dtype {value.dtype}.")
        t = value.to(dtype=like.dtype, device=like.device)
    else:
        raise TypeError(f"{name} must be a number or a tensor of shape {tuple(shape)}, got "
                        f"{type(value).__name__}.")
    try:
        out = t.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} must be a number or a tensor of shape {tuple(shape)} "
                         f"(training or test points x outputs, the shape of y_train's "
                         f"outputs), got shape {tuple(t.shape)}.") from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} has NaN or infinite entries.")
    return out


def check_finite(x: Any, what: str) -> None:
    """Raises `ntkit.errors.NonFiniteError` (a `ValueError` and a `FloatingPointError`)
    naming ``what`` when a prediction (a tensor or a result object) is not finite."""
    check_finite_output(x, f"the prediction of {what}", causes="prediction")


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

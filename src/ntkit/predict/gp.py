"""Exact Gaussian-process posteriors of infinitely wide networks: `gp_inference`."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from ..solvers.cg import cg_krr
from ._common import (
    check_diag_reg_value,
    check_finite,
    check_kernel,
    check_square,
    regularised_cholesky,
    targets,
)
from .results import GPPosterior

__all__ = ["gp_inference"]


#: What `gp_inference` computes from `Kernel` objects (see its docstring).
Posterior = Literal["nngp", "ntk", "ntkgp"]
POSTERIORS: tuple[str, ...] = ("nngp", "ntk", "ntkgp")


def _posterior_kind(get: object) -> str:
    if not isinstance(get, str) or get not in POSTERIORS:
        raise ValueError(f"get must be among 'nngp', 'ntk', 'ntkgp', got {get!r}.")
    return get


def _is_kernel(k: object) -> bool:
    return hasattr(k, "nngp") and hasattr(k, "ntk")


def gp_inference(k_train_train, y_train: Tensor, k_test_train, k_test_test=None, *,
                 get: Posterior | tuple[Posterior, ...] | None = None,
                 diag_reg: float | Tensor = 0.0, diag_reg_absolute_scale: bool = False,
                 solver: Literal["exact", "cg"] = "exact") -> GPPosterior:
    """Exact Gaussian-process posteriors of infinitely wide networks.

    With kernel matrices (tensors), the posterior of a GP with that kernel and noise
    variance ``s = diag_reg * trace(K)/N`` (or ``diag_reg`` with
    ``diag_reg_absolute_scale``): ``mean = k_td (K + s I)^-1 y``,
    ``cov = k_tt - k_td (K + s I)^-1 k_dt``, and the log marginal likelihood
    ``sum_outputs log N(y | 0, K + s I)`` (Rasmussen & Williams 2006, eqs. 2.23, 2.24,
    2.30), differentiable by autograd in the kernels and ``diag_reg`` when they
    require grad (so hyperparameters can be fitted). ``get`` must then be None.

    With `Kernel` objects (``net.kernel(...)``), ``get`` picks one posterior:
    ``"nngp"`` (the posterior of the infinitely wide Bayesian network), ``"ntkgp"``
    (the GP with the NTK as covariance, He et al. 2020) or ``"ntk"`` (the infinite
    ensemble trained to convergence: ``mean = Theta_td Theta^-1 y``,
    ``cov = K_tt + Theta_td Theta^-1 K_dd Theta^-1 Theta_dt - 2 sym(K_td Theta^-1 Theta_dt)``,
    Lee et al. 2019). Deprecated: with Kernels, a tuple ``get`` (or None) returns
    ``{get: GPPosterior}``, all three for None.

    ``solver="cg"`` computes the means by preconditioned conjugate gradients
    (`ntkit.solvers.cg_krr`, Nystrom preconditioner) instead of a Cholesky factor:
    the train-train kernel matrix may then also be an on-disk array read in row
    blocks (``np.memmap``, ``np.load(path, mmap_mode="r")``, zarr). Covariances and the
    log marginal likelihood need the factor: with ``"cg"``, ``k_test_test`` is refused
    and ``log_marginal_likelihood`` is None; ``diag_reg`` must be a number.

    Returns:
        One `GPPosterior`.

    Raises:
        ValueError: a negative or non-finite ``diag_reg``; a train-train kernel that is
            not symmetric (to rounding, `ntkit.predict._common.symmetry_tolerance`);
            NaN or infinite entries in a kernel or the targets; kernels of the wrong
            shape (each named).
        TypeError: a kernel that is not a floating-point tensor.
        ntkit.errors.NonFiniteError: the posterior came out NaN or infinite.
    """
    if solver not in ("exact", "cg"):
        raise ValueError(f"solver must be 'exact' or 'cg', got {solver!r}.")
    check_diag_reg_value(diag_reg)
    if _is_kernel(k_train_train):
        if get is None or not isinstance(get, str):
            gets = POSTERIORS if get is None else tuple(_posterior_kind(g) for g in get)
            warnings.warn(
                "gp_inference returns one GPPosterior per call: pass get='nngp', 'ntk' or "
                "'ntkgp' with Kernel objects; a tuple get (or none) returning a dict is "
                "deprecated and will be removed in the next release.",
                DeprecationWarning, stacklevel=2)
            return {g: gp_inference(k_train_train, y_train, k_test_train, k_test_test, get=g,
                                    diag_reg=diag_reg,
                                    diag_reg_absolute_scale=diag_reg_absolute_scale,
                                    solver=solver) for g in gets}
        get = _posterior_kind(get)
        if solver == "cg":     # "ntkgp" and "ntk" share the mean
            which = "nngp" if get == "nngp" else "ntk"
            return _cg_posterior(getattr(k_train_train, which), y_train,
                                 getattr(k_test_train, which), k_test_test, diag_reg,
                                 diag_reg_absolute_scale)
        if get == "ntk":
            return _trained_posterior(k_train_train, y_train, k_test_train, k_test_test,
                                      diag_reg, diag_reg_absolute_scale)
        which = "nngp" if get == "nngp" else "ntk"
        return _gp_posterior(getattr(k_train_train, which), y_train,
                             getattr(k_test_train, which),
                             None if k_test_test is None else getattr(k_test_test, which),
                             diag_reg, diag_reg_absolute_scale)
    if get is not None:
        raise ValueError("get= needs Kernel objects (with nngp and ntk); with kernel matrices "
                         "the posterior is that of the matrix given.")
    if solver == "cg":
        return _cg_posterior(k_train_train, y_train, k_test_train, k_test_test, diag_reg,
                             diag_reg_absolute_scale)
    return _gp_posterior(k_train_train, y_train, k_test_train, k_test_test, diag_reg,
                         diag_reg_absolute_scale)


def _gp_posterior(k_train_train, y_train, k_test_train, k_test_test, diag_reg, absolute):
    k = check_square(k_train_train, "k_train_train")
    y = targets(y_train, k.shape[0], k)
    chol = regularised_cholesky(k, diag_reg, absolute, "k_train_train + noise")
    kt = check_kernel(k_test_train, "k_test_train", (None, k.shape[0]), k)
    ktt = None if k_test_test is None else check_kernel(
        k_test_test, "k_test_test", (kt.shape[0], kt.shape[0]), k)
    alpha = torch.cholesky_solve(y, chol)
    mean = kt @ alpha
    cov = None
    if ktt is not None:
        v = torch.linalg.solve_triangular(chol, kt.T, upper=False)
        cov = ktt - v.T @ v
    lml = (-0.5 * (y * alpha).sum() - y.shape[1] * torch.log(torch.diagonal(chol)).sum()
           - 0.5 * y.numel() * math.log(2 * math.pi))
    out = GPPosterior(mean, cov, lml)
    check_finite(out, "gp_inference")
    return out


def _trained_posterior(k_dd, y_train, k_td, k_tt, diag_reg, absolute):
    theta = check_square(k_dd.ntk, "k_train_train.ntk")
    n = theta.shape[0]
    y = targets(y_train, n, theta)
    theta_td = check_kernel(k_td.ntk, "k_test_train.ntk", (None, n), theta)
    chol = regularised_cholesky(theta, diag_reg, absolute, "k_train_train + noise")
    mean = theta_td @ torch.cholesky_solve(y, chol)
    cov = None
    if k_tt is not None:
        n_test = theta_td.shape[0]
        k_dd_nngp = check_kernel(check_square(k_dd.nngp, "k_train_train.nngp"),
                                 "k_train_train.nngp", (n, n), theta)
        k_td_nngp = check_kernel(k_td.nngp, "k_test_train.nngp", (n_test, n), theta)
        k_tt_nngp = check_kernel(k_tt.nngp, "k_test_test.nngp", (n_test, n_test), theta)
        a_dt = torch.cholesky_solve(theta_td.T.contiguous(), chol)          # Theta^-1 Theta_dt
        cross = k_td_nngp @ a_dt
        cov = k_tt_nngp + a_dt.T @ k_dd_nngp @ a_dt - cross - cross.T
        cov = 0.5 * (cov + cov.T)
    out = GPPosterior(mean, cov, None)
    check_finite(out, "gp_inference")
    return out


def _cg_posterior(k_dd, y_train, k_td, k_tt, diag_reg, absolute) -> GPPosterior:
    """The posterior mean by `ntkit.solvers.cg_krr`, for ``gp_inference(solver="cg")``."""
    if k_tt is not None:
        raise ValueError("solver='cg' gives posterior means only; covariances need the "
                         "Cholesky factor: pass k_test_test=None, or use solver='exact'.")
    if isinstance(diag_reg, Tensor):
        if diag_reg.requires_grad:
            raise TypeError("solver='cg' is not differentiable in diag_reg; use "
                            "solver='exact' to fit hyperparameters.")
        diag_reg = float(diag_reg)
    alpha, _ = cg_krr(k_dd, y_train, diag_reg=diag_reg, diag_reg_absolute_scale=absolute)
    kt = torch.as_tensor(k_td) if not isinstance(k_td, Tensor) else k_td
    kt = check_kernel(kt, "k_test_train", (None, alpha.shape[0]), alpha)
    out = GPPosterior(kt @ alpha, None, None)
    check_finite(out, "gp_inference")
    return out

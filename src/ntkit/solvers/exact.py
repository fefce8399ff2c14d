"""Kernel ridge regression by name: `exact_krr` (Cholesky) and `solve_krr`, the one
entry point (``"exact"``, ``"cg"``, ``"nystrom"``, ``"auto"``) for the estimators
and `ntkit.predict`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import not_positive_definite
from ._common import (
    KernelFn,
    OnFailure,
    Solver,
    check_diag_reg,
    check_inputs,
    check_targets,
    diag_reg_absolute,
    memory_guard,
    resolve_solver,
)
from .cg import cg_krr
from .falkon import nystrom_krr
from .predictor import KernelRidgePredictor

__all__ = ["exact_krr", "solve_krr"]


def exact_krr(kernel_fn: KernelFn, x_train: Tensor, y_train: Tensor, *, diag_reg: float,
              diag_reg_absolute_scale: bool = False, dtype: torch.dtype | None = None,
              memory_budget: int | str | None = None) -> KernelRidgePredictor:
    """``alpha = (K + s I)^-1 y`` by Cholesky on the dense ``N x N`` kernel; see
    `solve_krr`."""
    x = check_inputs(x_train)
    y, vector = check_targets(y_train, x.shape[0])
    diag_reg = check_diag_reg(diag_reg)
    n = x.shape[0]
    with memory_guard("the exact solve", f"the {n} x {n} kernel and its Cholesky factor"):
        k = kernel_fn(x, x).to(dtype or x.dtype)
        s = diag_reg_absolute(torch.diagonal(k), diag_reg, diag_reg_absolute_scale)
        k.diagonal().add_(s)
        chol, info = torch.linalg.cholesky_ex(k)
    if int(info) != 0:
        raise not_positive_definite("the train-train kernel + s I", f"{n} x {n}, {k.dtype}")
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
    x = check_inputs(x_train)
    n = x.shape[0]
    solver = resolve_solver(solver, n, dtype or x.dtype, memory_budget)
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
        _, vector = check_targets(y_train, n)
        s = diag_reg_absolute(torch.diagonal(k), diag_reg, diag_reg_absolute_scale)
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

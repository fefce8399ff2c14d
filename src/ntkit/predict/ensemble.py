"""The infinite ensemble of infinitely wide networks trained by gradient flow on MSE:
`gradient_descent_mse_ensemble` and its `EnsemblePredictor`."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from .._budget import parse_memory
from ..kernel_function import GETS, Get, KernelFunction, check_get
from ..solvers import solve_krr
from ..solvers._common import memory_guard, resolve_solver, row_ranges, rows_within
from ._common import Factor, check_finite, check_positive, grown, targets, times_of
from .results import EnsemblePrediction

__all__ = ["EnsemblePredictor", "gradient_descent_mse_ensemble"]


class EnsemblePredictor:
    """Predictions of the infinite ensemble; see `gradient_descent_mse_ensemble`."""

    def __init__(self, kernel_fn, x_train: Tensor, y_train: Tensor, learning_rate: float,
                 diag_reg: float, absolute: bool, memory_budget, dtype: torch.dtype | None,
                 solver: str = "exact", solver_options: dict | None = None):
        self._dtype = dtype
        #: the adapter: the whole Kernel (nngp and ntk), cast to dtype
        self._kernel_fn = kernel_fn.select(None, dtype=dtype)
        self._last_test = None
        self.x_train = x_train
        self._budget = parse_memory(memory_budget)
        #: how the t = inf means are solved: "exact" (factorisations), "cg" or "nystrom"
        self.solver = solver
        if solver != "exact":
            # no train-train kernel here: the solver computes (or streams) what it needs
            like = torch.empty(0, dtype=dtype or x_train.dtype, device=x_train.device)
            self.y_train = targets(y_train, x_train.shape[0], like)
            self._rate = check_positive(learning_rate, "learning_rate") / self.y_train.numel()
            self._solver_args = dict(solver_options or {}, diag_reg=diag_reg,
                                     diag_reg_absolute_scale=absolute,
                                     memory_budget=memory_budget, dtype=dtype)
            self._solved: dict[str, object] = {}
            return
        n = x_train.shape[0]
        with memory_guard("the train-train kernels", f"two {n} x {n} matrices; "
                                                     f"solver='nystrom' never forms them"):
            k = self._kernels(x_train, None)
        self._k_dd = {"nngp": k.nngp, "ntk": k.ntk}
        self._factors = {g: Factor(self._k_dd[g], diag_reg, absolute, f"the train-train {g}")
                         for g in ("nngp", "ntk")}
        self.y_train = targets(y_train, k.nngp.shape[0], k.nngp)
        self._rate = check_positive(learning_rate, "learning_rate") / self.y_train.numel()

    def __call__(self, x_test: Tensor, t=None, *, get: Get | tuple[Get, ...] | None = None,
                 compute_cov: bool = False) -> EnsemblePrediction:
        """Mean (and covariance) on ``x_test`` at time(s) ``t`` (``None``/``inf``: converged).

        Args:
            x_test: ``(N_test, ...)``, like the training inputs.
            t: a time, a sequence or 1-D tensor of times, or ``None``/``inf``.
            get: ``"ntk"`` (all layers trained) or ``"nngp"`` (readout only trained).
                Both kernels come from one kernel evaluation: asking for the other
                ``get`` on the same ``x_test`` tensor reuses it. Deprecated: a tuple of
                them (or None) returns ``{get: EnsemblePrediction}``.
            compute_cov: also compute the covariance over ``x_test``.

        Returns:
            An `EnsemblePrediction`; with several times, mean and covariance get a
            leading time axis.
        """
        if get is None or not isinstance(get, str):
            gets = GETS if get is None else tuple(check_get(g) for g in get)
            warnings.warn(
                "EnsemblePredictor(...) returns one EnsemblePrediction per call: pass "
                "get='ntk' or get='nngp' (once each for both); a tuple get (or none) "
                "returning a dict is deprecated and will be removed in the next release.",
                DeprecationWarning, stacklevel=2)
            return {g: self(x_test, t, get=g, compute_cov=compute_cov) for g in gets}
        get = check_get(get)
        y = self.y_train
        times, scalar = times_of(t, y)
        if self.solver != "exact":
            return self._solver_means(x_test, times, scalar, get, compute_cov)
        n_test = x_test.shape[0]
        if compute_cov:        # the covariance needs every test pair: one block
            chunks = [(0, n_test)]
        else:                  # means only: test inputs in chunks of rows
            per_row = 8 * self.x_train.shape[0] * y.element_size() * max(1, times.shape[0])
            chunks = row_ranges(n_test, rows_within(self._budget, per_row))
        parts = []
        for i0, i1 in chunks:
            k_td, k_tt = self._test_kernels(x_test, i0, i1, compute_cov, len(chunks) == 1)
            parts.append(self._predict(get, times, k_td, k_tt, compute_cov))
        mean = torch.cat([m for m, _ in parts], dim=1)
        cov = parts[0][1]
        if scalar:
            mean, cov = mean[0], None if cov is None else cov[0]
        return EnsemblePrediction(mean, cov)

    def _test_kernels(self, x_test: Tensor, i0: int, i1: int, compute_cov: bool, keep: bool):
        """The test-train (and test-test) `Kernel`\\ s of rows ``i0:i1``; when they are all
        of ``x_test`` (``keep``), remembered for the next call on the same tensor."""
        key = (x_test._version, compute_cov)
        last = self._last_test
        if keep and last is not None and last[0] is x_test and last[1] == key:
            return last[2]
        k_td = self._kernels(x_test[i0:i1], self.x_train)
        k_tt = self._kernels(x_test, None) if compute_cov else None
        self._last_test = (x_test, key, (k_td, k_tt)) if keep else None
        return k_td, k_tt

    def _solver_means(self, x_test: Tensor, times: Tensor, scalar: bool, get: str,
                      compute_cov: bool) -> EnsemblePrediction:
        """``t = inf`` means by `ntkit.solvers.solve_krr`, one fit per kernel kind, kept."""
        if compute_cov:
            raise ValueError(
                f"compute_cov=True needs the factorised train-train kernels, which "
                f"solver={self.solver!r} never forms; use solver='exact' for covariances "
                f"(memory N^2), or compute_cov=False for means.")
        if bool(torch.isfinite(times).any()):
            raise ValueError(
                f"solver={self.solver!r} gives the converged (t = inf) predictor only, got "
                f"times {times.tolist()}; finite times need the eigendecomposition of "
                f"solver='exact'.")
        if get not in self._solved:
            kfn = self._kernel_fn.select(get, dtype=self._dtype)
            self._solved[get] = solve_krr(kfn, self.x_train, self.y_train,
                                          solver=self.solver, **self._solver_args)
        mean = self._solved[get].predict(x_test).to(self.y_train)
        mean = mean.expand((times.shape[0],) + mean.shape).clone()
        check_finite(mean, f"the {get} ensemble")
        return EnsemblePrediction(mean[0] if scalar else mean, None)

    def _kernels(self, a: Tensor, b: Tensor | None):
        return self._kernel_fn(a, b)

    def _operator(self, g: str, times: Tensor, b: Tensor, squared: bool = False) -> Tensor:
        """``A(t) b`` with ``A(t) = K^-1 (I - exp(-c K t))`` for kernel ``g`` (``K^-1`` at
        ``t = inf``); ``(T, N, ...)``."""
        f = self._factors[g]
        finite = torch.isfinite(times)
        out = b.new_empty((times.shape[0],) + b.shape)
        if bool(finite.any()):
            out[finite] = f.spectral(grown(self._rate, times[finite], squared), b)
        if bool((~finite).any()):
            out[~finite] = f.solve(b)
        return out

    def _predict(self, g: str, times: Tensor, k_td, k_tt, compute_cov: bool):
        y = self.y_train
        theta_td = getattr(k_td, g)                                   # (Nt, N)
        mean = theta_td @ self._operator(g, times, y)                 # (T, Nt, O)
        check_finite(mean, f"the {g} ensemble")
        if not compute_cov:
            return mean, None
        nngp_td, nngp_tt = k_td.nngp, k_tt.nngp
        if g == "nngp":
            # readout-only training: f_t = f_0 + K_td A (y - f_0(train)), f_0 ~ GP(0, K)
            cov = nngp_tt - nngp_td @ self._operator("nngp", times, nngp_td.T, squared=True)
        else:
            # all layers trained: the NTK moves the mean, the NNGP is the prior of f_0
            a_dt = self._operator("ntk", times, theta_td.T)           # (T, N, Nt)
            k_dd = self._k_dd["nngp"]
            cross = nngp_td @ a_dt                                    # (T, Nt, Nt)
            cov = nngp_tt + a_dt.transpose(-1, -2) @ k_dd @ a_dt - cross - cross.transpose(-1, -2)
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        check_finite(cov, f"the {g} ensemble")
        return mean, cov


def gradient_descent_mse_ensemble(net, x_train: Tensor, y_train: Tensor, *,
                                  learning_rate: float = 1.0, diag_reg: float = 0.0,
                                  diag_reg_absolute_scale: bool = False,
                                  memory_budget: int | str | None = None,
                                  dtype: torch.dtype | None = None,
                                  solver: Literal["exact", "auto", "cg", "nystrom"] = "exact",
                                  n_centers: int | None = None,
                                  generator: torch.Generator | None = None
                                  ) -> EnsemblePredictor:
    """The infinite ensemble of infinitely wide networks trained by gradient flow on MSE.

    Networks at initialisation are a Gaussian process with the NNGP kernel ``K``.
    Trained with all layers (``get="ntk"``), each evolves linearly with the NTK
    ``Theta``; trained in the readout only (``get="nngp"``), with ``K``. With
    ``A(t) = Theta^-1 (I - exp(-lr t Theta / |y|))`` (``Theta^-1`` at ``t = inf``):

        mean(t) = Theta_td A(t) y
        cov(t)  = K_tt + Theta_td A K_dd A Theta_dt - Theta_td A K_dt - K_td A Theta_dt   (NTK)
        cov(t)  = K_tt - K_td K^-1 (I - exp(-2 lr t K / |y|)) K_dt                       (NNGP)

    (Lee et al. 2019; neural-tangents' conventions: loss ``0.5/|y| ||f - y||^2``,
    relative ``diag_reg`` on the train-train kernels).

    Args:
        net: an ntkit network (anything with ``.kernel(x1, x2)`` returning a `Kernel`
            with ``nngp`` and ``ntk``), or a function ``(x1, x2) -> Kernel``.
        x_train, y_train: ``(N, ...)`` and ``(N, outputs)``.
        learning_rate, diag_reg, diag_reg_absolute_scale: as in `gradient_descent_mse`.
        memory_budget: passed to ``net.kernel`` for the kernel tiles; means on large
            test sets are computed in chunks of test inputs of about this size.
        dtype: compute the linear algebra in this dtype (e.g. ``torch.float64`` for
            ill-conditioned float32 kernels); default the kernels' dtype.
        solver: how the ``t = inf`` means are solved. ``"exact"`` (default): the
            train-train kernels are factorised (eigendecomposition / Cholesky; every
            time, means and covariances). ``"cg"``: the dense kernel, preconditioned
            CG. ``"nystrom"``: FALKON with ``n_centers`` centres (`ntkit.solvers.
            nystrom_krr`), never an ``N x N`` matrix; exact at ``n_centers = N``.
            ``"auto"``: ``"exact"`` when both ``N x N`` kernels fit in
            ``memory_budget``, else ``"nystrom"``. The non-exact solvers give means
            at ``t = inf`` only (no covariance, no finite times) and need
            ``diag_reg > 0`` for ``"nystrom"``.
        n_centers: Nystrom centres (``"nystrom"``, default ``min(N, max(500,
            round(2 sqrt(N))))``) or Nystrom-preconditioner columns (``"cg"``, default
            ``min(N, 500)``); see `ntkit.solvers.solve_krr`.
        generator: draws the Nystrom centres (required when ``n_centers < N``).

    Returns:
        An `EnsemblePredictor`: ``predictor(x_test, t, get="ntk", compute_cov=...)`` gives
        an `EnsemblePrediction` (``.mean``, ``.cov``).
        The train-train kernels are computed and factorised once (with a non-exact
        solver, each kind's regression is solved once, at its first use).
    """
    if not (hasattr(net, "kernel") or callable(net)):
        raise TypeError(f"net must be an ntkit network or a function (x1, x2) -> Kernel, got "
                        f"{type(net).__name__}.")
    kernel_fn = KernelFunction(net, memory_budget=memory_budget, progress=None)
    solver = resolve_solver(solver, x_train.shape[0], dtype or x_train.dtype, memory_budget)
    options = {} if solver == "exact" else {"n_centers": n_centers, "generator": generator}
    return EnsemblePredictor(kernel_fn, x_train, y_train, learning_rate, diag_reg,
                             diag_reg_absolute_scale, memory_budget, dtype, solver, options)



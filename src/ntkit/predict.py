"""Training dynamics and Bayesian inference of infinitely wide networks, in closed form.

A network trained by gradient flow on the mean squared error evolves, in the
infinite-width limit, as ``df/dt = -lr * Theta (f - y) / |y|`` with ``Theta``
the NTK on the training set. Everything here follows from that linear ODE.

Conventions (neural-tangents', so that numbers agree):

- Loss: ``0.5 / |y| * ||f(x_train) - y_train||^2`` with ``|y|`` the number of
  entries of ``y_train`` (examples x outputs), so on the training set
  ``f_t = y + exp(-lr * t * K / |y|) (f_0 - y)``.
- ``diag_reg`` is relative: ``diag_reg * trace(K) / N`` is added to the
  diagonal of the train-train kernel (``diag_reg_absolute_scale=True`` adds
  ``diag_reg`` itself).
- Kernels are per output: ``(N, N)`` shared by the outputs (columns of ``y``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .compute import parse_memory

__all__ = [
    "EnsemblePrediction", "GPPosterior", "gp_inference", "gradient_descent",
    "gradient_descent_mse", "gradient_descent_mse_ensemble", "max_learning_rate",
]

Get = Literal["nngp", "ntk"]


# ------------------------------------------------------------------ factorisation
class _Factor:
    """One train-train kernel, regularised, factorised once on demand: its
    eigendecomposition for finite times, its Cholesky factor for ``t = inf``."""

    def __init__(self, k: Tensor, diag_reg: float, absolute: bool, name: str):
        k = _square(k, name)
        if not (math.isfinite(diag_reg) and diag_reg >= 0):
            raise ValueError(f"diag_reg must be a finite number >= 0, got {diag_reg!r}.")
        n = k.shape[0]
        scale = 1.0 if absolute else float(torch.diagonal(k).sum()) / n
        self.k = k + (diag_reg * scale) * torch.eye(n, dtype=k.dtype, device=k.device)
        self.name = name
        self._eig: tuple[Tensor, Tensor] | None = None
        self._chol: Tensor | None = None
        self.factorisations = 0

    @property
    def eig(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (negative rounding clamped to 0) and eigenvectors."""
        if self._eig is None:
            self.factorisations += 1
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
            chol, info = torch.linalg.cholesky_ex(self.k)
            if int(info) != 0:
                raise ValueError(
                    f"{self.name} ({self.k.shape[0]} x {self.k.shape[0]}, {self.k.dtype}) is "
                    f"not positive definite to working precision, so the t = inf solution "
                    f"does not exist; add diag_reg (e.g. diag_reg=1e-4, relative to the mean "
                    f"diagonal) or use float64 inputs."
                )
            self._chol = chol
            _warn_if_ill_conditioned(chol, self.name)
        out = torch.cholesky_solve(b.reshape(b.shape[0], -1), self._chol).reshape(b.shape)
        _finite(out, self.name)
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


def _warn_if_ill_conditioned(chol: Tensor, name: str) -> None:
    """Warns when the Cholesky factor shows a condition number near 1 / eps (its
    squared diagonal ratio is a lower bound of the condition number)."""
    d = torch.diagonal(chol).detach().abs()
    cond = float((d.max() / d.min().clamp_min(torch.finfo(d.dtype).tiny)) ** 2)
    eps = torch.finfo(chol.dtype).eps
    if cond * eps > 1e-3:
        warnings.warn(
            f"{name} is ill-conditioned (condition number at least {cond:.2g} in "
            f"{chol.dtype}): solutions may have lost most of their digits; add diag_reg or "
            f"use float64.", RuntimeWarning, stacklevel=4)


def _square(k: Tensor, name: str) -> Tensor:
    if not isinstance(k, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(k).__name__}.")
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(f"{name} must be a square (N, N) matrix, got shape {tuple(k.shape)}.")
    if not k.is_floating_point():
        raise TypeError(f"{name} must be floating-point, got {k.dtype}.")
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"{name} has NaN or infinite entries.")
    return k


def _finite(x: Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            f"the prediction from {what} is not finite: the kernel is too ill-conditioned in "
            f"{x.dtype}; add diag_reg or use float64."
        )


def _targets(y: Tensor, n: int, like: Tensor) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"y_train must be a torch.Tensor, got {type(y).__name__}.")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"y_train must have shape (N, outputs) with N = {n} training points "
                         f"(the kernel's size), got {tuple(y.shape)}.")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y_train has NaN or infinite entries.")
    return y.to(dtype=like.dtype, device=like.device)


def _times(t, like: Tensor) -> tuple[Tensor, bool]:
    """Times as a 1-D tensor, and whether a scalar was given."""
    scalar = t is None or (not isinstance(t, Tensor) and not hasattr(t, "__len__")) or (
        isinstance(t, Tensor) and t.ndim == 0)
    t = torch.as_tensor(math.inf if t is None else t, dtype=like.dtype, device=like.device)
    t = t.reshape(-1)
    if bool(torch.isnan(t).any()) or bool((t < 0).any()):
        raise ValueError(f"times must be >= 0 (inf allowed), got {t.tolist()}.")
    return t, scalar


def _decay(rate: float, times: Tensor, squared: bool = False):
    """``lambda -> exp(-c lambda t)`` for each time (``c = rate``, doubled if squared)."""
    c = rate * (2.0 if squared else 1.0)
    return lambda lam: torch.exp(-c * times[:, None] * lam[None, :])


def _grown(rate: float, times: Tensor, squared: bool = False):
    """``lambda -> (1 - exp(-c lambda t)) / lambda``, ``c t`` at ``lambda = 0``."""
    c = rate * (2.0 if squared else 1.0)

    def fn(lam: Tensor) -> Tensor:
        ct = c * times[:, None]
        lam = lam[None, :]
        safe = torch.where(lam > 0, lam, torch.ones_like(lam))
        return torch.where(lam > 0, -torch.expm1(-ct * safe) / safe, ct.expand(-1, lam.shape[1]))
    return fn


# ------------------------------------------------------------------ gradient descent, MSE
class MSEPredictor:
    """Outputs of gradient flow on MSE at any times; see `gradient_descent_mse`."""

    def __init__(self, factor: _Factor, y: Tensor, learning_rate: float):
        self._factor = factor
        self.y_train = y
        self.learning_rate = learning_rate
        self._rate = learning_rate / y.numel()

    @property
    def factorisations(self) -> int:
        """How many times the kernel was factorised (at most one per kind)."""
        return self._factor.factorisations

    def __call__(self, t=None, fx_train_0: Tensor | float = 0.0, fx_test_0: Tensor | float
                 | None = None, k_test_train: Tensor | None = None):
        """Train (and test) outputs at time(s) ``t``.

        Args:
            t: a time, a sequence or 1-D tensor of times, or ``None``/``inf`` for the
                converged solution. With several times the outputs get a leading
                time axis.
            fx_train_0: outputs on the training set at ``t = 0``, ``(N, O)`` or a scalar.
            fx_test_0: outputs on the test set at ``t = 0`` (default zeros).
            k_test_train: the test-train kernel ``(N_test, N)``; without it only the
                training outputs are returned.

        Returns:
            ``fx_train_t``, or ``(fx_train_t, fx_test_t)`` when ``k_test_train`` is given.
        """
        f = self._factor
        y = self.y_train
        times, scalar = _times(t, f.k)
        f0 = torch.as_tensor(fx_train_0, dtype=y.dtype, device=y.device).expand_as(y)
        resid = y - f0
        finite = torch.isfinite(times)
        train = y.expand((times.shape[0],) + y.shape).clone()
        if bool(finite.any()):
            tf = times[finite]
            train[finite] = y - f.spectral(_decay(self._rate, tf), resid)
        test = None
        if k_test_train is not None:
            kt = k_test_train.to(dtype=y.dtype, device=y.device)
            if kt.ndim != 2 or kt.shape[1] != y.shape[0]:
                raise ValueError(f"k_test_train must be (N_test, {y.shape[0]}), got "
                                 f"{tuple(kt.shape)}.")
            t0 = torch.zeros(kt.shape[0], y.shape[1], dtype=y.dtype, device=y.device) \
                if fx_test_0 is None else torch.as_tensor(fx_test_0, dtype=y.dtype,
                                                          device=y.device).expand(
                    kt.shape[0], y.shape[1])
            test = t0.expand((times.shape[0],) + t0.shape).clone()
            if bool(finite.any()):
                grown = f.spectral(_grown(self._rate, times[finite]), resid)  # (T, N, O)
                test[finite] = t0 + kt @ grown
            if bool((~finite).any()):
                test[~finite] = t0 + kt @ f.solve(resid)
        for out in (train, test):
            if out is not None:
                _finite(out, "gradient_descent_mse")
        if scalar:
            train = train[0]
            test = None if test is None else test[0]
        return train if test is None else (train, test)


def gradient_descent_mse(k_train_train: Tensor, y_train: Tensor, *, learning_rate: float = 1.0,
                         diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                         momentum: float | None = None) -> MSEPredictor:
    """Gradient flow on the mean squared error with a fixed kernel, in closed form.

    With ``K = k_train_train + diag_reg * trace(K)/N * I`` (relative
    ``diag_reg``, neural-tangents' convention) and ``|y|`` the number of entries
    of ``y_train``:

        f_train(t) = y + exp(-lr t K / |y|) (f_train(0) - y)
        f_test(t)  = f_test(0) + k_test_train K^-1 (I - exp(-lr t K / |y|)) (y - f_train(0))

    The kernel is factorised once (eigendecomposition for finite times, Cholesky
    for ``t = inf``) and the predictor evaluates any number of times from it.

    Args:
        k_train_train: ``(N, N)``, e.g. ``net.kernel(x_train).ntk``.
        y_train: ``(N, outputs)`` or ``(N,)``.
        learning_rate: the gradient-flow rate ``lr``.
        diag_reg: diagonal regularisation, relative to the mean diagonal unless
            ``diag_reg_absolute_scale``.
        momentum: heavy-ball momentum ``m`` in ``[0, 1)``: finite times then follow
            the ODE of `gradient_descent` (time = steps x ``sqrt(lr)``); ``t = inf`` is
            the same fixed point as without momentum.

    Returns:
        An `MSEPredictor`: ``predictor(t, fx_train_0, fx_test_0, k_test_train)``.
    """
    factor = _Factor(k_train_train, diag_reg, diag_reg_absolute_scale, "k_train_train")
    _positive(learning_rate, "learning_rate")
    y = _targets(y_train, factor.k.shape[0], factor.k)
    if momentum is None:
        return MSEPredictor(factor, y, learning_rate)
    ode = gradient_descent(lambda f, t: 0.5 * ((f - t) ** 2).mean(), factor.k, y,
                           learning_rate=learning_rate, momentum=momentum)
    return _MomentumMSEPredictor(factor, y, learning_rate, ode)


class _MomentumMSEPredictor(MSEPredictor):
    """`MSEPredictor` with heavy-ball momentum: finite times by the ODE, ``inf`` closed."""

    def __init__(self, factor: _Factor, y: Tensor, learning_rate: float, ode):
        super().__init__(factor, y, learning_rate)
        self._ode = ode

    def __call__(self, t=None, fx_train_0=0.0, fx_test_0=None, k_test_train=None):
        y = self.y_train
        times, scalar = _times(t, y)
        if not bool(torch.isfinite(times).any()):
            return super().__call__(t, fx_train_0, fx_test_0, k_test_train)
        f0 = torch.as_tensor(fx_train_0, dtype=y.dtype, device=y.device).expand_as(y)
        finite = torch.isfinite(times)
        got = self._ode(times[finite], f0.clone(), fx_test_0, k_test_train)
        train, test = (got, None) if k_test_train is None else got
        if not bool(finite.all()):
            done = super().__call__(math.inf, fx_train_0, fx_test_0, k_test_train)
            d_train, d_test = (done, None) if k_test_train is None else done
            full = train.new_empty((times.shape[0],) + train.shape[1:])
            full[finite], full[~finite] = train, d_train
            train = full
            if test is not None:
                full = test.new_empty((times.shape[0],) + test.shape[1:])
                full[finite], full[~finite] = test, d_test
                test = full
        if scalar:
            train, test = train[0], None if test is None else test[0]
        return train if test is None else (train, test)


def _positive(x: float, name: str) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a positive finite number, got {x!r}.")


def max_learning_rate(k_train_train: Tensor, *, y_size: int | None = None,
                      momentum: float = 0.0) -> float:
    """The largest stable step of discrete gradient descent on MSE with this kernel.

    Steps of ``f <- f - lr * K (f - y) / |y|`` converge iff ``lr < 2 |y| / lambda_max``
    (with heavy-ball momentum ``m``: ``lr < 2 (1 + m) |y| / lambda_max``).

    Args:
        k_train_train: ``(N, N)``.
        y_size: ``|y|``, the number of entries of ``y_train`` (default ``N``: one output).
        momentum: heavy-ball momentum in ``[0, 1)``.
    """
    k = _square(k_train_train, "k_train_train")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    top = float(torch.linalg.eigvalsh(k).max())
    if top <= 0:
        raise ValueError("k_train_train has no positive eigenvalue; any step is stable.")
    return 2.0 * (1.0 + momentum) * (y_size or k.shape[0]) / top


# ------------------------------------------------------------------ any loss, by ODE
class ODEPredictor:
    """Outputs of function-space gradient descent on any loss; see `gradient_descent`."""

    def __init__(self, loss, k: Tensor, targets, learning_rate: float,
                 momentum: float | None, rtol: float, atol: float):
        self.loss, self.k, self.y_train = loss, k, targets
        self.learning_rate, self.momentum = learning_rate, momentum
        self.rtol, self.atol = rtol, atol

    def _grad(self, f: Tensor) -> Tensor:
        f = f.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.loss(f, self.y_train)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise TypeError("loss(fx_train, y_train) must return a scalar tensor.")
            (g,) = torch.autograd.grad(value, f)
        return g

    def __call__(self, t, fx_train_0: Tensor, fx_test_0: Tensor | float | None = None,
                 k_test_train: Tensor | None = None):
        """Train (and test) outputs at time(s) ``t`` (finite).

        Args:
            t: a time or a sequence / 1-D tensor of times (any order).
            fx_train_0: the outputs on the training set at ``t = 0``, ``(N, outputs)``
                (e.g. ``torch.zeros(N, classes)``); it fixes the outputs' shape.
            fx_test_0: test outputs at ``t = 0`` (default zeros).
            k_test_train: ``(N_test, N)``; without it only train outputs are returned.
        """
        from scipy.integrate import solve_ivp

        k = self.k
        if not isinstance(fx_train_0, Tensor) or fx_train_0.ndim != 2 or \
                fx_train_0.shape[0] != k.shape[0]:
            raise ValueError(f"fx_train_0 must be the outputs at t = 0 as an (N, outputs) "
                             f"tensor with N = {k.shape[0]} (e.g. torch.zeros(N, classes)).")
        f0 = fx_train_0.to(dtype=k.dtype, device=k.device)
        times, scalar = _times(t, k)
        if not bool(torch.isfinite(times).all()):
            raise ValueError("gradient_descent integrates an ODE: give finite times (for the "
                             "MSE loss at t = inf use gradient_descent_mse).")
        kt, g0 = None, None
        if k_test_train is not None:
            kt = k_test_train.to(dtype=k.dtype, device=k.device)
            if kt.ndim != 2 or kt.shape[1] != k.shape[0]:
                raise ValueError(f"k_test_train must be (N_test, {k.shape[0]}), got "
                                 f"{tuple(kt.shape)}.")
            shape = (kt.shape[0], f0.shape[1])
            g0 = torch.zeros(shape, dtype=k.dtype, device=k.device) if fx_test_0 is None \
                else torch.as_tensor(fx_test_0, dtype=k.dtype, device=k.device).expand(shape)
        lr, m = self.learning_rate, self.momentum
        sizes = [f0.numel()] + ([] if kt is None else [g0.numel()])
        n_pos = sum(sizes)

        def rhs(_, state):
            s = torch.as_tensor(state, dtype=k.dtype, device=k.device)
            grad = self._grad(s[:sizes[0]].reshape(f0.shape))
            scale = lr if m is None else 1.0
            acc = [-scale * (k @ grad).reshape(-1)]
            if kt is not None:
                acc.append(-scale * (kt @ grad).reshape(-1))
            acc = torch.cat(acc)
            if m is None:
                return acc.cpu().numpy()
            # heavy ball: x'' + (1 - m)/sqrt(lr) x' = -K grad, for train and test outputs
            v = s[n_pos:]
            return torch.cat([v, acc - (1.0 - m) / math.sqrt(lr) * v]).cpu().numpy()

        state0 = torch.cat([f0.reshape(-1)] + ([] if kt is None else [g0.reshape(-1)]))
        if m is not None:
            state0 = torch.cat([state0, torch.zeros_like(state0)])
        order = torch.argsort(times)
        t_sorted = times[order].cpu().numpy()
        sol = solve_ivp(rhs, (0.0, float(t_sorted[-1])), state0.cpu().numpy(),
                        t_eval=t_sorted, rtol=self.rtol, atol=self.atol, method="DOP853")
        if not sol.success:
            raise RuntimeError(f"the ODE solver stopped: {sol.message}; try smaller times or "
                               f"looser rtol/atol.")
        out = torch.as_tensor(sol.y.T, dtype=k.dtype, device=k.device)[torch.argsort(order)]
        train = out[:, :sizes[0]].reshape((-1,) + f0.shape)
        test = None if kt is None else out[:, sizes[0]:n_pos].reshape((-1,) + g0.shape)
        for o in (train, test):
            if o is not None:
                _finite(o, "gradient_descent")
        if scalar:
            train = train[0]
            test = None if test is None else test[0]
        return train if test is None else (train, test)


def gradient_descent(loss, k_train_train: Tensor, y_train, *, learning_rate: float = 1.0,
                     momentum: float | None = None, rtol: float = 1e-8,
                     atol: float = 1e-10) -> ODEPredictor:
    """Function-space gradient descent on any differentiable loss, by ODE integration.

    Without momentum the outputs follow ``df_train/dt = -lr K dL/df_train`` and
    ``df_test/dt = -lr k_test_train dL/df_train`` (``t`` = steps x learning rate, as in
    `gradient_descent_mse`; with ``loss = 0.5 * mean((f - y)^2)`` the two agree).
    With heavy-ball momentum ``m`` (neural-tangents' continuous limit) time counts
    steps x ``sqrt(lr)`` and ``f'' + (1 - m)/sqrt(lr) f' = -K dL/df``, from rest.

    Args:
        loss: ``loss(fx_train, y_train) -> scalar tensor``, differentiable by autograd
            (e.g. ``torch.nn.functional.cross_entropy`` with class indices).
        k_train_train: ``(N, N)``.
        y_train: the targets, passed to ``loss`` as given.
        learning_rate: the rate ``lr``; momentum: ``m`` in ``[0, 1)`` or None.
        rtol, atol: tolerances of the integrator (scipy's DOP853).

    Returns:
        An `ODEPredictor`: ``predictor(t, fx_train_0, fx_test_0, k_test_train)``.
    """
    k = _square(k_train_train, "k_train_train")
    _positive(learning_rate, "learning_rate")
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1) or None, got {momentum!r}.")
    if not callable(loss):
        raise TypeError("loss must be a function (fx_train, y_train) -> scalar tensor.")
    if isinstance(y_train, Tensor):
        if y_train.shape[0] != k.shape[0]:
            raise ValueError(f"y_train must have N = {k.shape[0]} rows (the kernel's size), "
                             f"got shape {tuple(y_train.shape)}.")
        y_train = y_train.to(device=k.device)
        if y_train.is_floating_point():
            y_train = y_train.to(k.dtype)
    return ODEPredictor(loss, k, y_train, learning_rate, momentum, rtol, atol)


# ------------------------------------------------------------------ infinite ensembles
@dataclass(frozen=True)
class EnsemblePrediction:
    """Mean ``(..., N_test, O)`` and covariance ``(..., N_test, N_test)`` (shared by the
    outputs) of the infinite ensemble's test outputs; ``cov`` is None unless asked for."""

    mean: Tensor
    cov: Tensor | None


class EnsemblePredictor:
    """Predictions of the infinite ensemble; see `gradient_descent_mse_ensemble`."""

    def __init__(self, kernel_fn, x_train: Tensor, y_train: Tensor, learning_rate: float,
                 diag_reg: float, absolute: bool, memory_budget, dtype: torch.dtype | None,
                 solver: str = "exact", solver_options: dict | None = None):
        self._dtype = dtype
        self._kernel_fn = kernel_fn
        self.x_train = x_train
        self._budget = parse_memory(memory_budget)
        #: how the t = inf means are solved: "exact" (factorisations), "cg" or "nystrom"
        self.solver = solver
        if solver != "exact":
            # no train-train kernel here: the solver computes (or streams) what it needs
            like = torch.empty(0, dtype=dtype or x_train.dtype, device=x_train.device)
            self.y_train = _targets(y_train, x_train.shape[0], like)
            _positive(learning_rate, "learning_rate")
            self._rate = learning_rate / self.y_train.numel()
            self._solver_args = dict(solver_options or {}, diag_reg=diag_reg,
                                     diag_reg_absolute_scale=absolute,
                                     memory_budget=memory_budget, dtype=dtype)
            self._solved: dict[str, object] = {}
            return
        k = self._kernels(x_train, None)
        self._k_dd = {"nngp": k.nngp, "ntk": k.ntk}
        self._factors = {g: _Factor(self._k_dd[g], diag_reg, absolute, f"the train-train {g}")
                         for g in ("nngp", "ntk")}
        self.y_train = _targets(y_train, k.nngp.shape[0], k.nngp)
        _positive(learning_rate, "learning_rate")
        self._rate = learning_rate / self.y_train.numel()

    def __call__(self, x_test: Tensor, t=None, *, get: Get | tuple[Get, ...] = ("nngp", "ntk"),
                 compute_cov: bool = False):
        """Mean (and covariance) on ``x_test`` at time(s) ``t`` (``None``/``inf``: converged).

        Returns:
            An `EnsemblePrediction` for one ``get``, or ``{get: EnsemblePrediction}``
            for a tuple. With several times, results get a leading time axis.
        """
        gets = (get,) if isinstance(get, str) else tuple(get)
        for g in gets:
            if g not in ("nngp", "ntk"):
                raise ValueError(f"get must be 'nngp', 'ntk' or a tuple of them, got {g!r}.")
        y = self.y_train
        times, scalar = _times(t, y)
        if self.solver != "exact":
            return self._solver_means(x_test, times, scalar, gets, get, compute_cov)
        n_test = x_test.shape[0]
        if compute_cov:        # the covariance needs every test pair: one block
            chunks = [(0, n_test)]
        else:                  # means only: test inputs in chunks of rows
            per_row = 8 * self.x_train.shape[0] * y.element_size() * max(1, times.shape[0])
            rows = max(1, self._budget // per_row)
            chunks = [(i, min(i + rows, n_test)) for i in range(0, n_test, rows)]
        parts: dict[str, list] = {g: [] for g in gets}
        for i0, i1 in chunks:
            k_td = self._kernels(x_test[i0:i1], self.x_train)
            k_tt = self._kernels(x_test, None) if compute_cov else None
            for g in gets:
                parts[g].append(self._predict(g, times, k_td, k_tt, compute_cov))
        out = {}
        for g in gets:
            mean = torch.cat([m for m, _ in parts[g]], dim=1)
            cov = parts[g][0][1]
            if scalar:
                mean, cov = mean[0], None if cov is None else cov[0]
            out[g] = EnsemblePrediction(mean, cov)
        return out[gets[0]] if isinstance(get, str) else out

    def _solver_means(self, x_test: Tensor, times: Tensor, scalar: bool, gets, get,
                      compute_cov: bool):
        """``t = inf`` means by `ntkit.solvers.solve_krr`, one fit per kernel kind, kept."""
        from . import solvers

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
        out = {}
        for g in gets:
            if g not in self._solved:
                kfn = _KindKernel(self._kernel_fn, g, self._dtype)
                self._solved[g] = solvers.solve_krr(kfn, self.x_train, self.y_train,
                                                    solver=self.solver, **self._solver_args)
            mean = self._solved[g].predict(x_test).to(self.y_train)
            mean = mean.expand((times.shape[0],) + mean.shape).clone()
            _finite(mean, f"the {g} ensemble")
            out[g] = EnsemblePrediction(mean[0] if scalar else mean, None)
        return out[gets[0]] if isinstance(get, str) else out

    def _kernels(self, a: Tensor, b: Tensor | None):
        k = self._kernel_fn(a, b)
        if self._dtype is not None:
            k = k.to(self._dtype)
        return k

    def _operator(self, g: str, times: Tensor, b: Tensor, squared: bool = False) -> Tensor:
        """``A(t) b`` with ``A(t) = K^-1 (I - exp(-c K t))`` for kernel ``g`` (``K^-1`` at
        ``t = inf``); ``(T, N, ...)``."""
        f = self._factors[g]
        finite = torch.isfinite(times)
        out = b.new_empty((times.shape[0],) + b.shape)
        if bool(finite.any()):
            out[finite] = f.spectral(_grown(self._rate, times[finite], squared), b)
        if bool((~finite).any()):
            out[~finite] = f.solve(b)
        return out

    def _predict(self, g: str, times: Tensor, k_td, k_tt, compute_cov: bool):
        y = self.y_train
        theta_td = getattr(k_td, g)                                   # (Nt, N)
        mean = theta_td @ self._operator(g, times, y)                 # (T, Nt, O)
        _finite(mean, f"the {g} ensemble")
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
        _finite(cov, f"the {g} ensemble")
        return mean, cov


class _KindKernel:
    """``(a, b) -> kernel_fn(a, b).<get>`` (cast to ``dtype``), with the diagonal from
    ``kernel_fn.diagonal`` when the ensemble's kernel function has one."""

    def __init__(self, kernel_fn, get: str, dtype: torch.dtype | None):
        self.kernel_fn, self.get, self.dtype = kernel_fn, get, dtype
        if hasattr(kernel_fn, "diagonal"):
            self.diagonal = self._diagonal

    def _cast(self, t: Tensor) -> Tensor:
        return t if self.dtype is None else t.to(self.dtype)

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        return self._cast(getattr(self.kernel_fn(a, b), self.get))

    def _diagonal(self, a: Tensor) -> Tensor:
        return self._cast(getattr(self.kernel_fn.diagonal(a), self.get))


class _NetKernel:
    """``(a, b) -> net.kernel(a, b)`` with the budget, and its diagonal."""

    def __init__(self, net, memory_budget):
        self.net, self.memory_budget = net, memory_budget

    def __call__(self, a: Tensor, b: Tensor | None):
        return self.net.kernel(a, b, memory_budget=self.memory_budget)

    def diagonal(self, a: Tensor):
        return self.net.kernel(a, diagonal=True, memory_budget=self.memory_budget,
                               progress=False)


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
        An `EnsemblePredictor`: ``predictor(x_test, t, get=..., compute_cov=...)``.
        The train-train kernels are computed and factorised once (with a non-exact
        solver, each kind's regression is solved once, at its first use).
    """
    if hasattr(net, "kernel"):
        kernel_fn = _NetKernel(net, memory_budget)
    elif callable(net):
        kernel_fn = net
    else:
        raise TypeError(f"net must be an ntkit network or a function (x1, x2) -> Kernel, got "
                        f"{type(net).__name__}.")
    if solver not in ("exact", "auto", "cg", "nystrom"):
        raise ValueError(f"solver must be 'exact', 'auto', 'cg' or 'nystrom', got {solver!r}.")
    if solver == "auto":
        n = x_train.shape[0]
        bytes_ = torch.finfo(dtype or x_train.dtype).bits // 8
        solver = "exact" if 2 * n * n * bytes_ <= parse_memory(memory_budget) else "nystrom"
    options = {} if solver == "exact" else dict(n_centers=n_centers, generator=generator)
    return EnsemblePredictor(kernel_fn, x_train, y_train, learning_rate, diag_reg,
                             diag_reg_absolute_scale, memory_budget, dtype, solver, options)


# ------------------------------------------------------------------ exact inference
@dataclass(frozen=True)
class GPPosterior:
    """Posterior mean ``(N_test, O)``, covariance ``(N_test, N_test)`` (None unless the
    test-test kernel was given) and the log marginal likelihood of the training
    targets, summed over outputs (None for the trained-ensemble "ntk" mode, which is
    not a Bayesian posterior)."""

    mean: Tensor
    cov: Tensor | None
    log_marginal_likelihood: Tensor | None


def _posterior_kinds(get) -> tuple[str, ...]:
    """``get`` of `gp_inference` as a checked tuple (all three kinds when None)."""
    gets = ("nngp", "ntk", "ntkgp") if get is None else (
        (get,) if isinstance(get, str) else tuple(get))
    for g in gets:
        if g not in ("nngp", "ntk", "ntkgp"):
            raise ValueError(f"get must be among 'nngp', 'ntk', 'ntkgp', got {g!r}.")
    return gets


def gp_inference(k_train_train, y_train: Tensor, k_test_train, k_test_test=None, *,
                 get: str | tuple[str, ...] | None = None, diag_reg: float | Tensor = 0.0,
                 diag_reg_absolute_scale: bool = False,
                 solver: Literal["exact", "cg"] = "exact"):
    """Exact Gaussian-process posteriors of infinitely wide networks.

    With kernel matrices (tensors), the posterior of a GP with that kernel and noise
    variance ``s = diag_reg * trace(K)/N`` (or ``diag_reg`` with
    ``diag_reg_absolute_scale``): ``mean = k_td (K + s I)^-1 y``,
    ``cov = k_tt - k_td (K + s I)^-1 k_dt``, and the log marginal likelihood
    ``sum_outputs log N(y | 0, K + s I)``, differentiable by autograd in the kernels
    and ``diag_reg`` when they require grad (so hyperparameters can be fitted).

    With `Kernel` objects (``net.kernel(...)``), ``get`` picks among
    ``"nngp"`` (the posterior of the infinitely wide Bayesian network), ``"ntkgp"``
    (the GP with the NTK as covariance, He et al. 2020) and ``"ntk"`` (the infinite
    ensemble trained to convergence: ``mean = Theta_td Theta^-1 y``,
    ``cov = K_tt + Theta_td Theta^-1 K_dd Theta^-1 Theta_dt - 2 sym(K_td Theta^-1 Theta_dt)``);
    the default is all three, returned as a dict.

    ``solver="cg"`` computes the means by preconditioned conjugate gradients
    (`ntkit.solvers.cg_krr`, Nystrom preconditioner) instead of a Cholesky factor:
    the train-train kernel matrix may then also be an on-disk array read in row
    blocks (``np.memmap``, ``np.load(path, mmap_mode="r")``, zarr). Covariances and the
    log marginal likelihood need the factor: with ``"cg"``, ``k_test_test`` is refused
    and ``log_marginal_likelihood`` is None; ``diag_reg`` must be a number.
    """
    if solver not in ("exact", "cg"):
        raise ValueError(f"solver must be 'exact' or 'cg', got {solver!r}.")
    if solver == "cg":
        return _cg_posterior(k_train_train, y_train, k_test_train, k_test_test, get,
                             diag_reg, diag_reg_absolute_scale)
    if hasattr(k_train_train, "nngp") and hasattr(k_train_train, "ntk"):
        gets = _posterior_kinds(get)
        out = {}
        for g in gets:
            if g == "ntk":
                out[g] = _trained_posterior(k_train_train, y_train, k_test_train, k_test_test,
                                            diag_reg, diag_reg_absolute_scale)
            else:
                field = "nngp" if g == "nngp" else "ntk"
                out[g] = _gp_posterior(
                    getattr(k_train_train, field), y_train, getattr(k_test_train, field),
                    None if k_test_test is None else getattr(k_test_test, field),
                    diag_reg, diag_reg_absolute_scale)
        return out[gets[0]] if isinstance(get, str) else out
    if get is not None:
        raise ValueError("get= needs Kernel objects (with nngp and ntk); with kernel matrices "
                         "the posterior is that of the matrix given.")
    return _gp_posterior(k_train_train, y_train, k_test_train, k_test_test, diag_reg,
                         diag_reg_absolute_scale)


def _regularised_cholesky(k: Tensor, diag_reg, absolute: bool) -> Tensor:
    n = k.shape[0]
    scale = 1.0 if absolute else torch.diagonal(k).sum() / n
    reg = k + diag_reg * scale * torch.eye(n, dtype=k.dtype, device=k.device)
    chol, info = torch.linalg.cholesky_ex(reg)
    if int(info) != 0:
        raise ValueError(
            f"k_train_train + noise is not positive definite in {k.dtype}; add diag_reg "
            f"(the noise variance, relative to the mean diagonal) or use float64."
        )
    _warn_if_ill_conditioned(chol, "k_train_train + noise")
    return chol


def _gp_posterior(k_train_train, y_train, k_test_train, k_test_test, diag_reg, absolute):
    k = _square(k_train_train, "k_train_train")
    y = _targets(y_train, k.shape[0], k)
    chol = _regularised_cholesky(k, diag_reg, absolute)
    alpha = torch.cholesky_solve(y, chol)
    kt = k_test_train.to(dtype=k.dtype)
    mean = kt @ alpha
    cov = None
    if k_test_test is not None:
        v = torch.linalg.solve_triangular(chol, kt.T, upper=False)
        cov = k_test_test.to(dtype=k.dtype) - v.T @ v
    lml = (-0.5 * (y * alpha).sum() - y.shape[1] * torch.log(torch.diagonal(chol)).sum()
           - 0.5 * y.numel() * math.log(2 * math.pi))
    _finite(mean, "gp_inference")
    return GPPosterior(mean, cov, lml)


def _trained_posterior(k_dd, y_train, k_td, k_tt, diag_reg, absolute):
    theta = _square(k_dd.ntk, "the train-train NTK")
    y = _targets(y_train, theta.shape[0], theta)
    chol = _regularised_cholesky(theta, diag_reg, absolute)
    mean = k_td.ntk @ torch.cholesky_solve(y, chol)
    cov = None
    if k_tt is not None:
        a_dt = torch.cholesky_solve(k_td.ntk.T.contiguous(), chol)          # Theta^-1 Theta_dt
        cross = k_td.nngp @ a_dt
        cov = k_tt.nngp + a_dt.T @ k_dd.nngp @ a_dt - cross - cross.T
        cov = 0.5 * (cov + cov.T)
    _finite(mean, "gp_inference")
    return GPPosterior(mean, cov, None)


def _cg_posterior(k_dd, y_train, k_td, k_tt, get, diag_reg, absolute):
    """Posterior means by `ntkit.solvers.cg_krr`, for ``gp_inference(solver="cg")``."""
    from .solvers import cg_krr

    if k_tt is not None:
        raise ValueError("solver='cg' gives posterior means only; covariances need the "
                         "Cholesky factor: pass k_test_test=None, or use solver='exact'.")
    if isinstance(diag_reg, Tensor):
        if diag_reg.requires_grad:
            raise TypeError("solver='cg' is not differentiable in diag_reg; use "
                            "solver='exact' to fit hyperparameters.")
        diag_reg = float(diag_reg)

    def mean(k_train, k_test):
        alpha, _ = cg_krr(k_train, y_train, diag_reg=diag_reg, diag_reg_absolute_scale=absolute)
        kt = k_test.to(alpha) if isinstance(k_test, Tensor) else torch.as_tensor(k_test).to(alpha)
        out = kt @ alpha
        _finite(out, "gp_inference")
        return GPPosterior(out, None, None)

    if hasattr(k_dd, "nngp") and hasattr(k_dd, "ntk"):
        gets = _posterior_kinds(get)
        out = {}
        for g in gets:
            field = "nngp" if g == "nngp" else "ntk"     # ntkgp and ntk share the mean
            out[g] = mean(getattr(k_dd, field), getattr(k_td, field))
        return out[gets[0]] if isinstance(get, str) else out
    if get is not None:
        raise ValueError("get= needs Kernel objects (with nngp and ntk); with kernel matrices "
                         "the posterior is that of the matrix given.")
    return mean(k_dd, k_td)

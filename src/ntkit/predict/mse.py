"""Gradient flow on the mean squared error with a fixed kernel, in closed form:
`gradient_descent_mse` (one factorisation, any number of times) and
`max_learning_rate`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import (
    Factor,
    check_finite,
    check_kernel,
    check_positive,
    check_square,
    decay,
    grown,
    initial_outputs,
    targets,
    times_of,
)
from .ode import gradient_descent
from .results import Trajectory

__all__ = ["MSEPredictor", "gradient_descent_mse", "max_learning_rate"]


class MSEPredictor:
    """Outputs of gradient flow on MSE at any times; see `gradient_descent_mse`."""

    def __init__(self, factor: Factor, y: Tensor, learning_rate: float):
        self._factor = factor
        self.y_train = y
        self.learning_rate = learning_rate
        self._rate = learning_rate / y.numel()

    @property
    def factorisations(self) -> int:
        """How many times the kernel was factorised (at most one per kind)."""
        return self._factor.factorisations

    def __call__(self, t=None, fx_train_0: Tensor | float = 0.0, fx_test_0: Tensor | float
                 | None = None, k_test_train: Tensor | None = None) -> Trajectory:
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
            A `Trajectory`: ``.train`` the training outputs, ``.test`` the test outputs
            (None without ``k_test_train``).
        """
        f = self._factor
        y = self.y_train
        times, scalar = times_of(t, f.k)
        f0 = initial_outputs(fx_train_0, tuple(y.shape), "fx_train_0", y)
        resid = y - f0
        finite = torch.isfinite(times)
        train = y.expand((times.shape[0],) + y.shape).clone()
        if bool(finite.any()):
            tf = times[finite]
            train[finite] = y - f.spectral(decay(self._rate, tf), resid)
        test = None
        if k_test_train is not None:
            kt = check_kernel(k_test_train, "k_test_train", (None, y.shape[0]), f.k)
            t0 = initial_outputs(0.0 if fx_test_0 is None else fx_test_0,
                                 (kt.shape[0], y.shape[1]), "fx_test_0", y)
            test = t0.expand((times.shape[0],) + t0.shape).clone()
            if bool(finite.any()):
                a_y = f.spectral(grown(self._rate, times[finite]), resid)  # (T, N, O)
                test[finite] = t0 + kt @ a_y
            if bool((~finite).any()):
                test[~finite] = t0 + kt @ f.solve(resid)
        for out in (train, test):
            if out is not None:
                check_finite(out, "gradient_descent_mse")
        if scalar:
            train = train[0]
            test = None if test is None else test[0]
        return Trajectory(train, test)


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
        An `MSEPredictor`: ``predictor(t, fx_train_0, fx_test_0, k_test_train)`` gives a
        `Trajectory` (``.train``, and ``.test`` when ``k_test_train`` is given).

    Example::

        flow = gradient_descent_mse(net.kernel(x_train).ntk, y_train)
        out = flow([1.0, 10.0], k_test_train=net.kernel(x_test, x_train).ntk)
        out.train.shape, out.test.shape        # (2, N, O), (2, N_test, O)
    """
    factor = Factor(k_train_train, diag_reg, diag_reg_absolute_scale, "k_train_train")
    learning_rate = check_positive(learning_rate, "learning_rate")
    y = targets(y_train, factor.k.shape[0], factor.k)
    if momentum is None:
        return MSEPredictor(factor, y, learning_rate)
    ode = gradient_descent(lambda f, t: 0.5 * ((f - t) ** 2).mean(), factor.k, y,
                           learning_rate=learning_rate, momentum=momentum)
    return _MomentumMSEPredictor(factor, y, learning_rate, ode)


class _MomentumMSEPredictor(MSEPredictor):
    """`MSEPredictor` with heavy-ball momentum: finite times by the ODE, ``inf`` closed."""

    def __init__(self, factor: Factor, y: Tensor, learning_rate: float, ode):
        super().__init__(factor, y, learning_rate)
        self._ode = ode

    def __call__(self, t=None, fx_train_0=0.0, fx_test_0=None,
                 k_test_train=None) -> Trajectory:
        y = self.y_train
        times, scalar = times_of(t, y)
        if not bool(torch.isfinite(times).any()):
            return super().__call__(t, fx_train_0, fx_test_0, k_test_train)
        f0 = initial_outputs(fx_train_0, tuple(y.shape), "fx_train_0", y)
        finite = torch.isfinite(times)
        got = self._ode(times[finite], f0.clone(), fx_test_0, k_test_train)
        train, test = got.train, got.test
        if not bool(finite.all()):
            done = super().__call__(math.inf, fx_train_0, fx_test_0, k_test_train)
            d_train, d_test = done.train, done.test
            full = train.new_empty((times.shape[0],) + train.shape[1:])
            full[finite], full[~finite] = train, d_train
            train = full
            if test is not None:
                full = test.new_empty((times.shape[0],) + test.shape[1:])
                full[finite], full[~finite] = test, d_test
                test = full
        if scalar:
            train, test = train[0], None if test is None else test[0]
        return Trajectory(train, test)


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
    k = check_square(k_train_train, "k_train_train")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    top = float(torch.linalg.eigvalsh(k).max())
    if top <= 0:
        raise ValueError("k_train_train has no positive eigenvalue; any step is stable.")
    return 2.0 * (1.0 + momentum) * (y_size or k.shape[0]) / top



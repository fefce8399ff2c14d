"""Function-space gradient descent on any differentiable loss, by ODE integration:
`gradient_descent`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import (
    check_finite,
    check_kernel,
    check_positive,
    check_square,
    initial_outputs,
    times_of,
)
from .results import Trajectory

__all__ = ["ODEPredictor", "gradient_descent"]


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
                 k_test_train: Tensor | None = None) -> Trajectory:
        """Train (and test) outputs at time(s) ``t`` (finite).

        Args:
            t: a time or a sequence / 1-D tensor of times (any order).
            fx_train_0: the outputs on the training set at ``t = 0``, ``(N, outputs)``
                (e.g. ``torch.zeros(N, classes)``); it fixes the outputs' shape.
            fx_test_0: test outputs at ``t = 0`` (default zeros).
            k_test_train: ``(N_test, N)``; without it only train outputs are computed.

        Returns:
            A `Trajectory`: ``.train`` ``(N, O)`` (``(T, N, O)`` for several times) and
            ``.test`` (None without ``k_test_train``).
        """
        from scipy.integrate import solve_ivp

        k = self.k
        if not isinstance(fx_train_0, Tensor) or fx_train_0.ndim != 2 or \
                fx_train_0.shape[0] != k.shape[0]:
            raise ValueError(f"fx_train_0 must be the outputs at t = 0 as an (N, outputs) "
                             f"tensor with N = {k.shape[0]} (e.g. torch.zeros(N, classes)), "
                             f"got " + (f"shape {tuple(fx_train_0.shape)}."
                                        if isinstance(fx_train_0, Tensor)
                                        else f"{type(fx_train_0).__name__}."))
        f0 = initial_outputs(fx_train_0, tuple(fx_train_0.shape), "fx_train_0", k)
        times, scalar = times_of(t, k)
        if not bool(torch.isfinite(times).all()):
            raise ValueError("gradient_descent integrates an ODE: give finite times (for the "
                             "MSE loss at t = inf use gradient_descent_mse).")
        kt, g0 = None, None
        if k_test_train is not None:
            kt = check_kernel(k_test_train, "k_test_train", (None, k.shape[0]), k)
            g0 = initial_outputs(0.0 if fx_test_0 is None else fx_test_0,
                                 (kt.shape[0], f0.shape[1]), "fx_test_0", k)
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
                check_finite(o, "gradient_descent")
        if scalar:
            train = train[0]
            test = None if test is None else test[0]
        return Trajectory(train, test)


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
        An `ODEPredictor`: ``predictor(t, fx_train_0, fx_test_0, k_test_train)`` gives a
        `Trajectory`.
    """
    k = check_square(k_train_train, "k_train_train")
    learning_rate = check_positive(learning_rate, "learning_rate")
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
            if not bool(torch.isfinite(y_train).all()):
                raise ValueError("y_train has NaN or infinite entries.")
            y_train = y_train.to(k.dtype)
    return ODEPredictor(loss, k, y_train, learning_rate, momentum, rtol, atol)



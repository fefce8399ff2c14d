"""How fast training on MSE converges with a fixed kernel: the train NTK's extreme
eigenvalues and condition number, the train loss over time under gradient flow and
gradient descent, and the time to reach a loss.

Conventions are `ntkit.predict.gradient_descent_mse`'s: the loss is
``0.5 * mean((f - y)^2) = |r|^2 / (2 |y|)`` over the ``|y| = N O`` target entries, and
training follows ``df/dt = -lr K (f - y) / |y|`` (Jacot et al. 2018, Theorem 2; Lee et
al. 2019, eq. (8)). In the eigenbasis ``K = sum_i lambda_i u_i u_i^T`` with
``c_i = |u_i^T (f_0 - y)|^2`` (summed over outputs):

    gradient flow:           loss(t) = sum_i c_i exp(-2 lr lambda_i t / |y|) / (2 |y|)
    gradient descent, step:  loss(k) = sum_i c_i (1 - step lambda_i / |y|)^(2k) / (2 |y|)

Descent converges iff ``step < 2 |y| / lambda_max`` (`ntkit.predict.max_learning_rate`,
the one place that bound lives). If the kernel is positive definite the loss goes to 0,
at the rate of its smallest eigenvalue (Jacot et al. 2018, Section 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..predict import max_learning_rate
from ..predict._common import check_square, targets

__all__ = ["Convergence", "convergence"]


@dataclass(frozen=True)
class Convergence:
    """Training-loss dynamics of MSE with a fixed train kernel (see `convergence`).

    Attributes:
        eigenvalues: ``(N,)`` of the train kernel, ascending, negatives clamped to 0.
        weights: ``(N,)`` ``c_i = |u_i^T (f_0 - y)|^2`` summed over outputs.
        y_size: ``|y|``, the number of target entries.
        learning_rate: the gradient-flow rate ``lr``.
        max_learning_rate: the largest stable step of gradient descent
            (`ntkit.predict.max_learning_rate`).
    """

    eigenvalues: Tensor
    weights: Tensor
    y_size: int
    learning_rate: float
    max_learning_rate: float

    @property
    def smallest_eigenvalue(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def largest_eigenvalue(self) -> float:
        return float(self.eigenvalues[-1])

    @property
    def condition_number(self) -> float:
        """``lambda_max / lambda_min`` (inf when the kernel is singular)."""
        low = self.smallest_eigenvalue
        return math.inf if low <= 0 else self.largest_eigenvalue / low

    @property
    def loss_floor(self) -> float:
        """The loss that never decays: the residual in the kernel's null space."""
        return float(self.weights[self.eigenvalues <= 0].sum()) / (2 * self.y_size)

    def loss(self, t) -> Tensor:
        """Train loss under gradient flow at times ``t`` (a number or ``(T,)``)."""
        tt = _times(t, "t")
        rate = 2 * self.learning_rate * self.eigenvalues / self.y_size       # (N,)
        decay = torch.exp(-tt.reshape(-1, 1) * rate)                         # (T, N)
        out = (decay * self.weights).sum(1) / (2 * self.y_size)
        return out.reshape(tt.shape)

    def loss_after(self, steps, step: float) -> Tensor:
        """Train loss after ``steps`` steps of gradient descent with step ``step``.

        Raises:
            ValueError: ``step`` at or past the stability bound (the loss diverges).
        """
        step = _step(step, self.max_learning_rate)
        k = _times(steps, "steps")
        if bool((k != k.round()).any()):
            raise ValueError("steps must be whole numbers of steps.")
        factor = (1 - step * self.eigenvalues / self.y_size) ** 2              # (N,)
        out = (factor ** k.reshape(-1, 1) * self.weights).sum(1) / (2 * self.y_size)
        return out.reshape(k.shape)

    def time_to_loss(self, target: float) -> float:
        """The gradient-flow time at which the loss first reaches ``target`` (0 when it
        starts there, inf when it never does: ``target <= loss_floor``)."""
        return _first(lambda t: self.loss(t), float(target), self.loss_floor, 1.0)

    def steps_to_loss(self, target: float, step: float) -> float:
        """The number of descent steps after which the loss is at most ``target``."""
        step = _step(step, self.max_learning_rate)
        t = _first(lambda k: self.loss_after(k.round(), step), float(target), self.loss_floor,
                   1.0, integer=True)
        return t


def _times(t, name: str) -> Tensor:
    tt = torch.as_tensor(t, dtype=torch.float64)
    if not bool(torch.isfinite(tt).all()) or bool((tt < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {tt.reshape(-1).tolist()[:5]}.")
    return tt


def _step(step, bound: float) -> float:
    step = float(step)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a finite number > 0, got {step!r}.")
    if step >= bound:
        raise ValueError(f"step {step:g} is at or past the stability bound {bound:g} "
                         f"(2 |y| / lambda_max): gradient descent diverges. Use a smaller "
                         f"step.")
    return step


def _first(loss, target: float, floor: float, scale: float, integer: bool = False) -> float:
    if not math.isfinite(target) or target < 0:
        raise ValueError(f"target must be a finite loss >= 0, got {target!r}.")
    if float(loss(torch.tensor(0.0))) <= target:
        return 0.0
    if target <= floor * (1 + 1e-12):
        return math.inf
    hi = scale
    while float(loss(torch.tensor(hi))) > target:
        hi *= 2.0
        if hi > 1e300:
            return math.inf
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if integer:
            mid = math.floor(mid)
            if hi - lo <= 1:
                break
        if float(loss(torch.tensor(float(mid)))) > target:
            lo = mid
        else:
            hi = mid
        if not integer and hi - lo <= 1e-12 * hi:
            break
    return float(hi)


def convergence(k_train_train: Tensor, y_train: Tensor, *, learning_rate: float = 1.0,
                fx_train_0: Tensor | float = 0.0) -> Convergence:
    """Convergence facts of MSE training with the train kernel ``k_train_train``.

    One eigendecomposition; the result evaluates the loss at any time or step count.

    Args:
        k_train_train: ``(N, N)`` train kernel, e.g. ``net.kernel(x_train).ntk``.
        y_train: ``(N,)`` or ``(N, O)`` targets.
        learning_rate: the gradient-flow rate (as in `ntkit.predict.gradient_descent_mse`).
        fx_train_0: outputs at ``t = 0``, a number or ``(N, O)`` (a finite network's
            initial outputs).

    Returns:
        A `Convergence`: ``smallest_eigenvalue``, ``condition_number``,
        ``max_learning_rate``, ``loss(t)``, ``loss_after(steps, step)``,
        ``time_to_loss(target)``, ``steps_to_loss(target, step)``.

    Example::

        c = convergence(net.kernel(x).ntk, y)
        c.loss([0.0, 10.0]), c.time_to_loss(1e-3), c.condition_number
    """
    k = check_square(k_train_train, "k_train_train").detach().to(torch.float64)
    if not bool(torch.isfinite(k).all()):
        raise ValueError("k_train_train holds NaN or infinite values; recompute it in float64.")
    y = targets(y_train, k.shape[0], k).to(torch.float64)
    lr = float(learning_rate)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.")
    f0 = torch.as_tensor(fx_train_0, dtype=torch.float64)
    if f0.ndim > 0:
        try:
            f0 = f0.reshape(y.shape)
        except RuntimeError:
            raise ValueError(f"fx_train_0 must be a number or of shape {tuple(y.shape)} like "
                             f"y_train, got {tuple(f0.shape)}.") from None
    if not bool(torch.isfinite(f0).all()):
        raise ValueError("fx_train_0 holds NaN or infinite values.")
    k = 0.5 * (k + k.T)
    evals, evecs = torch.linalg.eigh(k)
    weights = ((evecs.T @ (f0 - y)) ** 2).sum(1)
    return Convergence(eigenvalues=evals.clamp_min(0.0), weights=weights, y_size=y.numel(),
                       learning_rate=lr,
                       max_learning_rate=max_learning_rate(k, y_size=y.numel()))

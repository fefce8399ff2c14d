"""scikit-ntk's ``NeuralTangentKernel(depth, bias)``, value for value, as a fast
closed-form `sklearn.gaussian_process.kernels.Kernel`.

It is the NTK of a fully-connected ReLU network whose input kernel is the raw dot
product and whose biases start at zero but are trained with scale ``bias`` (in
ntkit: ``Linear(..., b_std=bias, b_init="zero")``), normalised by
``(depth + 1)(1 + bias^2)``. The recursion is Jacot et al. 2018 (Theorem 1) with the
ReLU arc-cosine expectations of Cho & Saul 2009 (eq. 6, ``n = 0, 1``), written as in
Arora et al. 2019 (eqs. 3-5) and in scikit-ntk 1.2.1 (Lencevicius 2022)::

    Sigma^0 = x . z,                 K^0 = Sigma^0 + bias^2
    lambda^l = clip(Sigma^{l-1}(x, z) / max(sqrt(Sigma^{l-1}(x, x) Sigma^{l-1}(z, z)), 1e-10), -1, 1)
    Sigma^l = (c / 2 pi) (lambda (pi - arccos lambda) + sqrt(1 - lambda^2)) sqrt(...)
    Sigma_dot^l = (c / 2 pi) (pi - arccos lambda),   c = 2
    K^l = K^{l-1} Sigma_dot^l + Sigma^l + bias^2,     l = 1..depth
    k(x, z) = K^depth / ((depth + 1)(1 + bias^2))

The elementwise arithmetic follows scikit-ntk's operation for operation (one
``arccos`` per layer instead of two, in place), so that inputs whose angle is
exactly 0 or pi (every pair in one dimension), where ``arccos`` has an infinite
slope and one rounding step changes the kernel in its 9th digit, give scikit-ntk's
values as well.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.gaussian_process.kernels import Hyperparameter, Kernel

__all__ = ["NeuralTangentKernel", "relu_ntk_gram"]

_C = 2.0                      # the ReLU's weight variance (He): Sigma^l(x, x) = |x|^2
_KC = _C / (2 * np.pi)        # the factor of scikit-ntk's expressions, rounded as there
_FLOOR = 1e-10                # scikit-ntk's floor on sqrt(Sigma(x, x) Sigma(z, z))


def _arc_cosine_step(sigma: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One ReLU layer (Cho & Saul 2009, eq. 6, n = 1 and n = 0) on ``sigma`` ``(N1, N2)``
    with ``den = max(sqrt(Sigma(x, x) Sigma(z, z)), 1e-10)`` ``(N1, N2)``.

    Returns ``(Sigma', Sigma_dot)``, both ``(N1, N2)``; ``sigma`` and ``den`` are
    overwritten (``Sigma'`` is ``sigma``'s buffer)."""
    lam = np.divide(sigma, den, out=sigma)
    np.clip(lam, -1.0, 1.0, out=lam)
    angle = np.arccos(lam)
    np.subtract(np.pi, angle, out=angle)                  # pi - arccos(lambda)
    sigma_dot = np.multiply(_KC, angle)
    root = np.multiply(lam, lam)
    np.subtract(1.0, root, out=root)
    np.sqrt(root, out=root)                               # sqrt(1 - lambda^2)
    np.multiply(lam, angle, out=lam)
    np.add(lam, root, out=lam)
    np.multiply(_KC, lam, out=lam)
    np.multiply(lam, den, out=lam)
    return lam, sigma_dot


def _norms(sigma_x: np.ndarray, sigma_z: np.ndarray) -> np.ndarray:
    """``max(sqrt(outer(sigma_x, sigma_z)), 1e-10)`` ``(N1, N2)``."""
    den = np.multiply.outer(sigma_x, sigma_z)
    np.sqrt(den, out=den)
    return np.maximum(den, _FLOOR, out=den)


def _diagonal_step(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_arc_cosine_step` on self-pairs ``(N,)`` (the same arithmetic as on a diagonal)."""
    return _arc_cosine_step(d.copy(), np.maximum(np.sqrt(d * d), _FLOOR))


def relu_ntk_gram(x: np.ndarray, z: np.ndarray | None, depth: int, bias: float,
                  gradient: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """scikit-ntk's normalised ReLU NTK (module docstring) and ``d k / d log(bias)``.

    Args:
        x: ``(N1, d)`` float64.
        z: ``(N2, d)`` float64, or None for ``k(x, x)``.
        depth: hidden ReLU layers, ``>= 0``.
        bias: the bias scale (any real; only ``bias^2`` enters).
        gradient: also return ``d k / d log(bias)`` ``(N1, N2)`` (only with ``z`` None).

    Returns:
        ``(k, dk)``: ``k`` ``(N1, N2)``, ``dk`` ``(N1, N2)`` or None. The derivative
        is ``bias dK^L/dbias = 2 bias^2 G^L`` with ``G^0 = 1``,
        ``G^l = G^{l-1} Sigma_dot^l + 1`` (differentiating the recursion), then the
        product rule with the normalisation:
        ``dk = s (2 bias^2 G^L - 2 bias^2 / (1 + bias^2) K^L)``,
        ``s = 1 / ((depth + 1)(1 + bias^2))``.
    """
    b2 = bias ** 2
    if z is None:
        sigma = x @ x.T                       # symmetric product, as scikit-ntk's x @ x.T
        dx = dz = None
    else:
        sigma = x @ z.T
        dx = np.einsum("ij,ij->i", x, x)
        dz = np.einsum("ij,ij->i", z, z)
    k = sigma + b2
    g = np.ones_like(k) if gradient else None
    for _ in range(depth):
        if z is None:
            d = sigma.diagonal().copy()
            den = _norms(d, d)
        else:
            den = _norms(dx, dz)
            dx, _ = _diagonal_step(dx)
            dz, _ = _diagonal_step(dz)
        sigma, sigma_dot = _arc_cosine_step(sigma, den)
        np.multiply(k, sigma_dot, out=k)
        np.add(k, sigma, out=k)
        np.add(k, b2, out=k)
        if g is not None:
            np.multiply(g, sigma_dot, out=g)
            np.add(g, 1.0, out=g)
    scale = 1 / ((depth + 1) * (b2 + 1))
    dk = None
    if g is not None:
        np.multiply(g, 2 * b2, out=g)
        g -= (2 * b2 / (b2 + 1)) * k
        dk = np.multiply(scale, g, out=g)
    return np.multiply(scale, k, out=k), dk


def _relu_ntk_diag(x: np.ndarray, depth: int, bias: float) -> np.ndarray:
    """``k(x_i, x_i)`` ``(N,)`` by the recursion on self-pairs only (O(N d))."""
    b2 = bias ** 2
    d = np.einsum("ij,ij->i", x, x)
    k = d + b2
    for _ in range(depth):
        d, d_dot = _diagonal_step(d)
        k = k * d_dot + d + b2
    return (1 / ((depth + 1) * (b2 + 1))) * k


def _check_inputs(X: Any, name: str, features: int | None = None) -> np.ndarray:
    try:
        x = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array (n_samples, n_features); "
                         f"could not convert it: {err}") from None
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {x.shape}; "
                         f"reshape a single feature with X.reshape(-1, 1).")
    if features is not None and x.shape[1] != features:
        raise ValueError(f"{name} has {x.shape[1]} features but X has {features}; both must "
                         f"have the same number of columns.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; remove or impute them.")
    return x


def _finite(k: np.ndarray) -> np.ndarray:
    """``k``, or an error when it overflowed (squared norms past ~1e308)."""
    if not np.isfinite(k).all():
        raise ValueError("the kernel overflowed to inf or NaN: the inputs' squared norms "
                         "exceed float64's range; rescale the inputs (e.g. StandardScaler).")
    return k


class NeuralTangentKernel(Kernel):
    """scikit-ntk's ``NeuralTangentKernel`` (same constructor, values and gradient).

    The NTK of a ReLU network with ``depth`` hidden layers, raw dot-product input
    kernel and zero-initialised biases trained with scale ``bias`` (module
    docstring for the recursion; Jacot et al. 2018, Arora et al. 2019 eqs. 3-5),
    normalised by ``(depth + 1)(1 + bias^2)``. It equals
    ``ntkit.Sequential(Linear(w_std=sqrt(d), b_std=bias, b_init="zero"), [ReLU(),
    Linear(w_std=sqrt(2), b_std=bias, b_init="zero")] * depth)``'s NTK divided by that
    normalisation. ``bias`` is a hyperparameter (``theta = log(bias)``) that
    `GaussianProcessRegressor` fits; its gradient is analytic.

    Differences from scikit-ntk 1.2.1: ``k(X, Z)`` is computed on the ``X``-``Z`` block
    only (scikit-ntk computes the kernel of the concatenation); ``eval_gradient`` with
    ``Z`` raises (as scikit-learn's kernels do; scikit-ntk returns the concatenation's
    kernel); the gradient is finite at pairs with ``Sigma_dot = 0`` (opposite
    inputs, where scikit-ntk's ``1 / products`` gives NaN); `diag` costs O(N d).

    Args:
        depth: hidden ReLU layers, an int ``>= 0`` (scikit-ntk documents ``>= 1``).
        bias: the bias scale, ``>= 0``; ``> 0`` to be fitted (``theta = log(bias)``).
        bias_bounds: ``(low, high)`` for the optimizer, or ``"fixed"``.
    """

    def __init__(self, depth: int = 1, bias: float = 0.1,
                 bias_bounds: tuple[float, float] | str = (1e-5, 1e5)) -> None:
        self.depth = depth
        self.bias = bias
        self.bias_bounds = bias_bounds

    @property
    def hyperparameter_bias(self) -> Hyperparameter:
        return Hyperparameter("bias", "numeric", self.bias_bounds)

    def _checked(self) -> tuple[int, float]:
        depth, bias = self.depth, self.bias
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
            raise ValueError(f"depth must be an int >= 0 (hidden ReLU layers), got {depth!r}.")
        if isinstance(bias, bool) or not isinstance(bias, (int, float, np.number)) \
                or not math.isfinite(float(bias)) or float(bias) < 0:
            raise ValueError(f"bias must be a finite number >= 0 (the scale of the trained "
                             f"biases), got {bias!r}.")
        return int(depth), float(bias)

    def __call__(self, X: Any, Z: Any = None, eval_gradient: bool = False):
        """The kernel ``k(X, Z)`` and, optionally, its gradient in ``log(bias)``.

        Args:
            X: ``(n_X, n_features)``.
            Z: ``(n_Z, n_features)``, or None for ``k(X, X)``.
            eval_gradient: also return ``d k / d log(bias)``; only with ``Z`` None.

        Returns:
            ``K`` ``(n_X, n_Z)``; with ``eval_gradient`` also ``K_gradient``
            ``(n_X, n_X, 1)``, or ``(n_X, n_X, 0)`` when ``bias_bounds="fixed"``.
        """
        depth, bias = self._checked()
        x = _check_inputs(X, "X")
        with np.errstate(over="ignore", invalid="ignore"):   # overflow: `_finite` says so
            return self._evaluate(x, Z, eval_gradient, depth, bias)

    def _evaluate(self, x: np.ndarray, Z: Any, eval_gradient: bool, depth: int, bias: float):
        if Z is not None:
            if eval_gradient:
                raise ValueError("Gradient can only be evaluated when Z is None.")
            z = _check_inputs(Z, "Z", x.shape[1])
            return _finite(relu_ntk_gram(x, z, depth, bias)[0])
        if not eval_gradient:
            return _finite(relu_ntk_gram(x, None, depth, bias)[0])
        if self.hyperparameter_bias.fixed:
            k = _finite(relu_ntk_gram(x, None, depth, bias)[0])
            return k, np.empty((len(x), len(x), 0))
        if bias <= 0:
            raise ValueError("bias=0 has no logarithm, so it cannot be a free hyperparameter "
                             "(theta is log bias); give bias > 0 or bias_bounds='fixed'.")
        k, dk = relu_ntk_gram(x, None, depth, bias, gradient=True)
        return _finite(k), _finite(dk)[:, :, None]

    def diag(self, X: Any) -> np.ndarray:
        """``k(x_i, x_i)`` for each row of ``X`` ``(n_samples, n_features)``: ``(n_samples,)``."""
        depth, bias = self._checked()
        x = _check_inputs(X, "X")
        with np.errstate(over="ignore", invalid="ignore"):
            return _finite(_relu_ntk_diag(x, depth, bias))

    def is_stationary(self) -> bool:
        """False: the kernel depends on the inputs' norms and angle, not their difference."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(depth={self.depth!r}, bias={self.bias!r})"

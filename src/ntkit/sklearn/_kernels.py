"""The NNGP and NTK of an MLP as `sklearn.gaussian_process.kernels.Kernel`\\ s, with the
weight and bias standard deviations as hyperparameters whose gradients come from
autograd through ``network.kernel``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.gaussian_process.kernels import Hyperparameter, Kernel
from torch import Tensor

from ..kernel_function import KernelFunction
from ..layers import Layer
from ._architecture import check_depth, check_std, mlp

__all__ = ["NNGPKernel", "NTKKernel"]

_DTYPE = torch.float64


def _inputs(X: Any, name: str) -> Tensor:
    x = np.asarray(X, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {x.shape}.")
    return torch.tensor(x, dtype=_DTYPE)


def _kernel_columns(k: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    """``dk / d leaf`` for each 0-dim leaf, each the shape of ``k``.

    Reverse mode gives ``v -> sum(v * dk/dleaf)``, linear in ``v``; differentiating it
    in ``v`` gives the whole matrix ``dk/dleaf`` (the double-backward Jacobian-vector
    product), one backward pass per hyperparameter instead of one per entry.
    """
    v = torch.zeros_like(k, requires_grad=True)
    vjp = torch.autograd.grad(k, leaves, grad_outputs=v, create_graph=True, allow_unused=True)
    cols = []
    for g in vjp:
        col = None if g is None or not g.requires_grad else torch.autograd.grad(
            g, v, retain_graph=True, allow_unused=True)[0]
        cols.append(torch.zeros_like(k) if col is None else col)
    return cols


class _MLPKernel(Kernel):
    """A scikit-learn Kernel of an ntkit MLP (not public); ``_get`` picks ``nngp`` or
    ``ntk``. The network is evaluated through the one adapter, `ntkit.kernel_function`."""

    _get = "nngp"

    def __init__(self, w_std: float = 1.5, b_std: float = 0.1, depth: int = 2,
                 activation: str = "relu", w_std_bounds: tuple[float, float] | str = (1e-2, 1e2),
                 b_std_bounds: tuple[float, float] | str = (1e-4, 1e2)) -> None:
        self.w_std = w_std
        self.b_std = b_std
        self.depth = depth
        self.activation = activation
        self.w_std_bounds = w_std_bounds
        self.b_std_bounds = b_std_bounds

    @property
    def hyperparameter_w_std(self) -> Hyperparameter:
        return Hyperparameter("w_std", "numeric", self.w_std_bounds)

    @property
    def hyperparameter_b_std(self) -> Hyperparameter:
        return Hyperparameter("b_std", "numeric", self.b_std_bounds)

    def network(self, w_std: float | Tensor | None = None,
                b_std: float | Tensor | None = None) -> Layer:
        """The ntkit MLP with these (default: the kernel's) hyperparameters."""
        w = check_std(self.w_std, "w_std", positive=True) if w_std is None else w_std
        b = check_std(self.b_std, "b_std", positive=False) if b_std is None else b_std
        return mlp(check_depth(self.depth), self.activation, w, b)

    def _function(self, network: Layer) -> KernelFunction:
        """``network``'s NNGP or NTK (``_get``) through the one adapter."""
        return KernelFunction(network, self._get, progress=None)

    def __repr__(self) -> str:
        """The hyperparameters by name, e.g. ``NTKKernel(w_std=2.0, b_std=0.5, depth=2)``
        (scikit-learn's default shows only the logarithms in ``theta``)."""
        def number(v: Any) -> str:
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                return repr(float(f"{float(v):.12g}"))    # 3.0, not 3.0000000000000004
            return repr(v)

        depth = int(self.depth) if isinstance(self.depth, (int, np.integer)) else self.depth
        extra = "" if self.activation == "relu" else f", activation={self.activation!r}"
        return (f"{type(self).__name__}(w_std={number(self.w_std)}, "
                f"b_std={number(self.b_std)}, depth={depth!r}{extra})")

    def __call__(self, X: Any, Y: Any = None, eval_gradient: bool = False):
        """The kernel matrix ``k(X, Y)`` and, optionally, its gradient.

        Args:
            X: ``(n_X, n_features)``.
            Y: ``(n_Y, n_features)``, or None for ``k(X, X)``.
            eval_gradient: also return the gradient with respect to the log of the
                free hyperparameters (``theta``); only with ``Y`` None.

        Returns:
            ``K`` ``(n_X, n_Y)``, and with ``eval_gradient`` ``K_gradient``
            ``(n_X, n_X, n_free)`` in the order of ``theta`` (``b_std``, ``w_std``).
        """
        x = _inputs(X, "X")
        if not eval_gradient:
            y = None if Y is None else _inputs(Y, "Y")
            with torch.no_grad():
                return self._function(self.network())(x, y).numpy()
        if Y is not None:
            raise ValueError("Gradient can only be evaluated when Y is None.")
        free = [h.name for h in self.hyperparameters if not h.fixed]
        values = {name: check_std(getattr(self, name), name, positive=name == "w_std")
                  for name in ("w_std", "b_std")}
        for name in free:
            if values[name] <= 0:
                raise ValueError(
                    f"{name}={values[name]!r} has no logarithm, so it cannot be a free "
                    f"hyperparameter (theta is log {name}); give {name} > 0 or fix it with "
                    f"{name}_bounds='fixed'.")
        params = {name: torch.tensor(v, dtype=_DTYPE, requires_grad=name in free)
                  for name, v in values.items()}
        with torch.enable_grad():
            k = self._function(self.network(params["w_std"], params["b_std"]))(x)
            leaves = [params[name] for name in free]
            cols = _kernel_columns(k, leaves) if free else []
        # d k / d log(theta) = theta * d k / d theta
        grad = [c.detach() * float(leaf.detach()) for c, leaf in zip(cols, leaves)]
        n = x.shape[0]
        k_grad = torch.stack(grad, -1) if grad else torch.empty(n, n, 0, dtype=_DTYPE)
        return k.detach().numpy(), k_grad.numpy()

    def diag(self, X: Any) -> np.ndarray:
        """``k(x_i, x_i)`` for each row of ``X`` ``(n_samples, n_features)``: ``(n_samples,)``."""
        with torch.no_grad():
            return self._function(self.network()).diagonal(_inputs(X, "X")).numpy()

    def is_stationary(self) -> bool:
        """False: the kernels depend on the inputs' norms and angles, not on differences."""
        return False


class NNGPKernel(_MLPKernel):
    """The NNGP kernel of an MLP (Lee et al. 2018, Matthews et al. 2018) as a
    scikit-learn kernel: ``depth`` hidden ``Linear -> activation`` layers and a linear
    readout, every affine layer in NTK parameterization with ``w_std`` and ``b_std``
    (neural-tangents' convention; the input kernel is ``x . y / n_features``).

    ``w_std`` and ``b_std`` are hyperparameters (``theta`` holds their logarithms, as
    scikit-learn's kernels do); their gradients come from autograd through
    ``network.kernel``. ``depth`` and ``activation`` are fixed. Works in
    `GaussianProcessRegressor` (which fits ``w_std``/``b_std`` by the log marginal
    likelihood), `GaussianProcessClassifier`, and as ``SVC(kernel=NNGPKernel())``.

    Args:
        w_std, b_std: weight and bias standard deviations (> 0 to be fitted).
        depth: hidden layers.
        activation: a name from ``ntkit.sklearn._architecture.ACTIVATIONS``, e.g.
            ``"relu"``, ``"erf"``, ``"gelu"``, ``"tanh"`` (quadrature, slower).
        w_std_bounds, b_std_bounds: ``(low, high)`` for the optimizer, or ``"fixed"``.
    """

    _get = "nngp"


class NTKKernel(_MLPKernel):
    """The neural tangent kernel of an MLP (Jacot et al. 2018) as a scikit-learn
    kernel; options and hyperparameters as in `NNGPKernel`. As a GP covariance it is
    the "NTK-GP" of He et al. 2020; kernel regression with it is the converged mean of
    gradient-trained infinitely wide networks (`NTKRegressor` at ``t = inf``)."""

    _get = "ntk"

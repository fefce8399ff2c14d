"""The networks behind the estimators and kernels: a named-activation MLP, a spec
string or an ntkit `Layer`, and the checks of the options that choose them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..layers import (
    GELU,
    Abs,
    Elementwise,
    Erf,
    Identity,
    Layer,
    LeakyReLU,
    Linear,
    ReLU,
    Sequential,
    Sign,
)

__all__ = [
    "ACTIVATIONS",
    "HIDDEN_WIDTH",
    "check_depth",
    "check_std",
    "mlp",
    "resolve_network",
    "torch_device",
    "torch_dtype",
]

#: Activation names accepted by ``activation=`` -> a constructor of the ntkit layer.
#: Closed forms where ntkit has one; tanh, softplus and sigmoid by `Elementwise`
#: (Gauss-Hermite quadrature: ~64^2 evaluations per kernel entry, so slower).
ACTIVATIONS: dict[str, Callable[[], Layer]] = {
    "relu": ReLU,
    "erf": Erf,
    "gelu": GELU,
    "abs": Abs,
    "sign": Sign,
    "leaky_relu": LeakyReLU,
    "identity": Identity,
    "tanh": lambda: Elementwise(torch.tanh, name="tanh"),
    "sigmoid": lambda: Elementwise(torch.sigmoid, name="sigmoid"),
    "softplus": lambda: Elementwise(torch.nn.functional.softplus, name="softplus"),
}

#: Width of the hidden layers of the default MLP. Infinite-width kernels do not depend
#: on it; it only matters for ``network_.build(...)`` and for the spec string.
HIDDEN_WIDTH = 512


def mlp(depth: int, activation: str, w_std: float | torch.Tensor,
        b_std: float | torch.Tensor) -> Layer:
    """``depth`` hidden ``Linear(HIDDEN_WIDTH) -> activation`` blocks and a ``Linear(1)``
    readout, every affine layer with the same ``w_std`` and ``b_std`` (numbers, or
    0-dim tensors that require grad for differentiable kernels)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} is not a known activation name; use one of "
            f"{sorted(ACTIVATIONS)}, or pass architecture= an ntkit network (e.g. "
            f"nk.Sequential(nk.Linear(512), nk.Elementwise(fn), nk.Linear(1))).")
    layers: list[Layer] = []
    for _ in range(depth):
        layers += [Linear(HIDDEN_WIDTH, w_std=w_std, b_std=b_std), ACTIVATIONS[activation]()]
    layers.append(Linear(1, w_std=w_std, b_std=b_std))
    return Sequential(*layers)


def check_std(value: Any, name: str, *, positive: bool) -> float:
    """A weight/bias standard deviation as a float, or a clear error."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def check_depth(depth: Any) -> int:
    """The number of hidden layers as an int >= 0, or a clear error."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0 (the number of hidden layers), got "
                         f"{depth!r}.")
    return int(depth)


def resolve_network(architecture: Any, *, depth: Any, activation: Any, w_std: Any,
                    b_std: Any) -> Layer:
    """The ntkit network an estimator uses.

    Args:
        architecture: None (an MLP from the other options, see `mlp`), an ntkit
            `Layer` (used as it is; the other options are then ignored) or a spec
            string for `ntkit.spec.parse_architecture`.
        depth, activation, w_std, b_std: the MLP's options when ``architecture`` is None.
    """
    if architecture is None:
        if not isinstance(activation, str):
            raise TypeError(f"activation must be a name such as 'relu', got "
                            f"{type(activation).__name__}; for other functions pass "
                            f"architecture= an ntkit network with nk.Elementwise(fn).")
        return mlp(check_depth(depth), activation, check_std(w_std, "w_std", positive=True),
                   check_std(b_std, "b_std", positive=False))
    if isinstance(architecture, Layer):
        return architecture
    if isinstance(architecture, str):
        from ..spec import parse_architecture  # lazily: the spec grammar is not needed otherwise

        return parse_architecture(architecture)
    raise TypeError(
        f"architecture must be None (an MLP from depth, activation, w_std and b_std), an "
        f"ntkit network (nk.Sequential(...)) or a spec string such as "
        f"'linear(512)-relu-linear(1)'; got {type(architecture).__name__}.")


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(dtype: Any) -> torch.dtype:
    """``"float32"``/``"float64"`` (or those torch dtypes) as a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be 'float64' (recommended for kernel solves) or 'float32', "
                     f"got {dtype!r}.")


def torch_device(device: Any) -> torch.device:
    """A device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``) or `torch.device` as a device."""
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"device must be a torch device name such as 'cpu' or 'cuda', got "
                         f"{device!r} ({e}).") from None

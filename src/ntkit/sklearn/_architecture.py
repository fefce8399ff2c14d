"""The networks behind the estimators and kernels: a named-activation MLP, a spec
string or an ntkit `Layer`, and the checks of the options that choose them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._checks import is_int, is_real
from ..layers import Activation, Identity, Layer, Linear, Sequential
from ..layers.registry import normal_name, spec_constructors

__all__ = [
    "ACTIVATIONS",
    "HIDDEN_WIDTH",
    "activation_layer",
    "check_depth",
    "check_std",
    "mlp",
    "resolve_network",
    "torch_device",
    "torch_dtype",
]

def _activation_names() -> dict[str, Callable[[], Layer]]:
    """Every spec name (`ntkit.layers.registry`) whose layer is an activation (or the
    identity) that takes no required argument, with its constructor."""
    names: dict[str, Callable[[], Layer]] = {}
    for name, ctor in spec_constructors().items():
        try:
            layer = ctor()
        except TypeError:  # needs arguments: written as name(args), see `activation_layer`
            continue
        if isinstance(layer, (Activation, Identity)):
            names[name] = ctor
    return names


#: Activation names accepted by ``activation=`` -> a constructor of the ntkit layer,
#: read from the layer registry, so every name is also a layer of the spec grammar
#: (``"linear(512)-tanh-linear(1)"``). Closed forms where ntkit has one; tanh,
#: softplus and sigmoid by quadrature (`Elementwise`: ~64^2 evaluations per kernel
#: entry, so slower). Activations with arguments are written as in a spec string,
#: ``activation="leaky_relu(negative_slope=0.2)"`` or ``"monomial(3)"``.
ACTIVATIONS: dict[str, Callable[[], Layer]] = _activation_names()
_BY_NORMAL_NAME = {normal_name(name): ctor for name, ctor in ACTIVATIONS.items()}


def activation_layer(activation: str) -> Layer:
    """The activation layer that ``activation`` names: a name of `ACTIVATIONS`
    (case and underscores ignored, as in spec strings) or one activation with
    arguments in the spec grammar, such as ``"leaky_relu(negative_slope=0.2)"``.

    Raises:
        ValueError: neither a known name nor one activation in spec syntax.
    """
    text = activation if isinstance(activation, str) else ""
    ctor = _BY_NORMAL_NAME.get(normal_name(text.strip()))
    if ctor is not None and text:
        return ctor()
    layer = None
    if "(" in text:
        from ..spec import parse_architecture  # lazily: the grammar is not needed otherwise

        try:
            layer = parse_architecture(activation)
        except ValueError:
            layer = None
    if not isinstance(layer, Activation):
        raise ValueError(
            f"activation={activation!r} is not a known activation name; use one of "
            f"{sorted(ACTIVATIONS)}, one with arguments as in a spec string (e.g. "
            f"'leaky_relu(negative_slope=0.2)', 'monomial(3)'), or pass architecture= an ntkit "
            f"network (e.g. nk.Sequential(nk.Linear(512), nk.Elementwise(fn), nk.Linear(1))).")
    return layer


#: Width of the hidden layers of the default MLP. Infinite-width kernels do not depend
#: on it; it only matters for ``network_.build(...)`` and for the spec string.
HIDDEN_WIDTH = 512


def mlp(depth: int, activation: str, w_std: float | torch.Tensor,
        b_std: float | torch.Tensor) -> Layer:
    """``depth`` hidden ``Linear(HIDDEN_WIDTH) -> activation`` blocks and a ``Linear(1)``
    readout, every affine layer with the same ``w_std`` and ``b_std`` (numbers, or
    0-dim tensors that require grad for differentiable kernels)."""
    activation_layer(activation)  # checked before any layer is built
    layers: list[Layer] = []
    for _ in range(depth):
        layers += [Linear(HIDDEN_WIDTH, w_std=w_std, b_std=b_std), activation_layer(activation)]
    layers.append(Linear(1, w_std=w_std, b_std=b_std))
    return Sequential(*layers)


def check_std(value: Any, name: str, *, positive: bool) -> float:
    """A weight/bias standard deviation (a number or a NumPy scalar such as
    ``np.float32(1.5)``) as a float, or a clear error."""
    ok = is_real(value) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def check_depth(depth: Any) -> int:
    """The number of hidden layers (an int or a NumPy integer such as ``np.int64(2)``,
    as ``GridSearchCV`` over ``np.arange`` gives) as an int >= 0, or a clear error."""
    if not is_int(depth) or depth < 0:
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

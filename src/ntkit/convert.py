"""`from_torch`: the infinite-width twin of an existing `torch.nn.Sequential`."""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from .layers import (
    GELU, Dropout, Elementwise, Flatten, Identity, Layer, LayerNorm, LeakyReLU, Linear, ReLU,
    Sequential,
)

__all__ = ["from_torch"]

#: Elementwise activations without parameters, taken by quadrature.
_NUMERICAL = (
    nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Hardtanh,
    nn.ReLU6, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardswish, nn.Hardsigmoid,
    nn.Softshrink, nn.Hardshrink, nn.GELU,
)
_SUPPORTED = (
    "nn.Sequential, nn.Linear, nn.ReLU, nn.LeakyReLU, nn.GELU, parameter-free elementwise "
    "activations (" + ", ".join(f"nn.{m.__name__}" for m in _NUMERICAL if m is not nn.GELU)
    + "), nn.LayerNorm (elementwise_affine=False), nn.Dropout, nn.Identity, nn.Flatten"
)
_NO_KERNEL = {
    "BatchNorm": "mixes the examples of a batch, so it has no per-pair kernel",
    "MaxPool": "has no closed-form infinite-width kernel",
    "PReLU": "has a learnable slope, which the kernel does not model",
}


def from_torch(
    module: nn.Module,
    *,
    parameterization: Literal["ntk", "standard"] = "standard",
    w_std: float | None = None,
    b_std: float | None = None,
    degree: int = 64,
) -> Sequential:
    """The infinite-width twin of a `torch.nn.Sequential`.

    Each ``nn.Linear`` becomes a `Linear` of the same widths (``in_features``
    is kept and checked). By default weights and biases have the variances of
    PyTorch's default initialisation of ``nn.Linear`` (uniform on
    ``+-1/sqrt(fan_in)``, variance ``1 / (3 fan_in)``), that is
    ``w_std = 1/sqrt(3)`` and ``b_std = 1/sqrt(3 fan_in)``, in standard
    parameterization: the kernel of the model as PyTorch initialises and
    trains it. Activations with a closed form use it; other parameter-free
    elementwise ones (tanh, SiLU, ...) use the quadrature path, `Elementwise`.

    Args:
        module: an ``nn.Sequential`` (nested ones are flattened).
        parameterization: ``"standard"`` (PyTorch's) or ``"ntk"``.
        w_std: weight standard deviation times ``sqrt(fan_in)`` for every
            Linear, instead of PyTorch's default.
        b_std: bias standard deviation for every Linear with a bias, instead of
            PyTorch's default.
        degree: quadrature nodes per axis for activations without closed form.

    Raises:
        TypeError: for a module that is not an ``nn.Sequential`` or contains a
            module with no kernel rule; the message names it and lists what
            is supported.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch takes a torch.nn.Module, got {type(module).__name__}.")
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"from_torch takes a torch.nn.Sequential, got {type(module).__name__}. Write the "
            f"model as nn.Sequential of supported modules ({_SUPPORTED}), or build it "
            f"with ntkit layers."
        )
    return Sequential(*_convert_children(module, "", parameterization, w_std, b_std, degree))


def _convert_children(seq, prefix, parameterization, w_std, b_std, degree) -> list[Layer]:
    layers: list[Layer] = []
    for name, child in seq.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            layers += _convert_children(child, path + ".", parameterization, w_std, b_std, degree)
        else:
            layers.append(_convert(child, path, parameterization, w_std, b_std, degree))
    return layers


def _convert(m: nn.Module, path: str, parameterization, w_std, b_std, degree) -> Layer:
    if isinstance(m, nn.Linear):
        if getattr(m, "has_uninitialized_params", lambda: False)():
            raise TypeError(
                f"module {path} ({m!r}) has not been initialised, so its in_features is "
                f"unknown; run one forward pass on example inputs before from_torch."
            )
        fan_in = m.in_features
        bias = None
        if m.bias is not None:
            bias = b_std if b_std is not None else 1 / math.sqrt(3 * fan_in)
        return Linear(m.out_features, w_std=w_std if w_std is not None else 1 / math.sqrt(3),
                      b_std=bias, parameterization=parameterization, in_features=fan_in)
    if type(m) is nn.ReLU:
        return ReLU()
    if type(m) is nn.LeakyReLU:
        return LeakyReLU(m.negative_slope)
    if type(m) is nn.GELU and m.approximate == "none":
        return GELU()
    if type(m) in _NUMERICAL:
        return Elementwise(m, degree=degree, name=repr(m))
    if isinstance(m, nn.Identity):
        return Identity()
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise TypeError(
                f"module {path} ({m!r}): only nn.Flatten(start_dim=1, end_dim=-1) is supported."
            )
        return Flatten()
    if isinstance(m, nn.Dropout):
        return Dropout(m.p, mode="train" if m.training else "eval")
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            raise TypeError(
                f"module {path} ({m!r}): only LayerNorm over the last (feature) axis is supported."
            )
        if m.elementwise_affine:
            raise TypeError(
                f"module {path} ({m!r}) has a learnable per-feature scale and shift; their NTK "
                f"through a following nonlinearity has no layer-wise rule. Use "
                f"nn.LayerNorm(..., elementwise_affine=False), whose twin is nk.LayerNorm."
            )
        return LayerNorm(eps=m.eps)
    name = type(m).__name__
    reason = next((r for key, r in _NO_KERNEL.items() if key in name), None)
    why = f"{name} {reason}" if reason else f"{name} has no infinite-width kernel rule in ntkit"
    raise TypeError(f"module {path} ({m!r}): {why}. Supported: {_SUPPORTED}.")

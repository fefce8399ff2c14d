"""The parameters of a finite twin with a weight and a bias, drawn as its
parameterization says (shared by Linear, the convolutions and their variants)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import BuildContext

__all__ = ["B_INITS", "ScaledAffine", "affine_repr_parts", "check_b_init",
           "check_parameterization", "split_bias_variance"]

#: How an affine layer's bias starts: drawn (``"normal"``) or at zero (``"zero"``).
B_INITS = ("normal", "zero")


def check_parameterization(parameterization: str, name: str) -> str:
    """``parameterization`` if it is ``"ntk"`` or ``"standard"``."""
    if parameterization not in ("ntk", "standard"):
        raise ValueError(f"{name}: parameterization must be 'ntk' or 'standard', got "
                         f"{parameterization!r}.")
    return parameterization


def check_b_init(b_init: str, b_std: object, name: str) -> str:
    """``b_init`` if it is one of `B_INITS` (and there is a bias to start at zero)."""
    if b_init not in B_INITS:
        raise ValueError(f"{name}: b_init must be 'normal' (a random bias of scale b_std) or "
                         f"'zero' (a bias that starts at zero and is trained with scale "
                         f"b_std), got {b_init!r}.")
    if b_init == "zero" and b_std is None:
        raise ValueError(f"{name}: b_init='zero' needs a bias, but b_std=None removes it; "
                         f"give b_std (its training scale) or drop b_init.")
    return b_init


def split_bias_variance(b2: Tensor | None, b_init: str) -> tuple[Tensor | None, Tensor | None]:
    """``(nngp_b2, ntk_b2)``: the bias variance ``b_std^2`` a layer adds to its NNGP,
    and the one its NTK gains on top of the NNGP it passes on.

    A drawn bias (``"normal"``) adds ``b_std^2`` to the NNGP, which the NTK inherits
    (``Theta' = K' + w^2 Theta``, Jacot et al. 2018 eq. 6). A bias that starts at zero
    and is trained with scale ``b_std`` (``"zero"``; the convention of Arora et al.
    2019 and scikit-ntk) adds nothing to the NNGP and its gradient adds ``b_std^2``
    to the NTK."""
    return (b2, None) if b_init == "normal" else (None, b2)


def affine_repr_parts(layer) -> list[str]:
    """The repr arguments every affine layer shares: ``w_std``, ``b_std``, and the
    parameterization and ``b_init`` when not at their defaults."""
    parts = [f"w_std={layer.w_std}", f"b_std={layer.b_std}"]
    if layer.parameterization != "ntk":
        parts.append("parameterization='standard'")
    if layer.b_init != "normal":
        parts.append(f"b_init={layer.b_init!r}")
    return parts


class ScaledAffine(nn.Module):
    """Base of finite twins with ``weight`` and ``bias`` (None without a bias).

    NTK parameterization: both are stored standard normal and the forward pass
    scales them by ``w_scale = w_std / sqrt(fan_in)`` and ``b_scale = b_std``;
    standard parameterization: they carry their variance (``W ~ N(0, w_std^2 /
    fan_in)``, ``b ~ N(0, b_std^2)``) and the scales are 1. The weight is drawn
    before the bias, from the context's generator.

    With ``b_init="zero"`` the bias starts at zero (nothing is drawn for it) and
    keeps its scale: the forward pass still multiplies it by ``b_std`` in NTK
    parameterization, so its gradient adds ``b_std^2`` to the NTK while the
    network at initialisation (the NNGP) has no bias.
    """

    def init_affine(self, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...],
                    fan_in: int, w_std: float, b_std: float | None, parameterization: str,
                    ctx: BuildContext, b_init: str = "normal") -> None:
        """Draws ``weight`` ``weight_shape`` and ``bias`` ``bias_shape`` (none when
        ``b_std`` is None; zeros, not drawn, when ``b_init="zero"``) and sets
        ``w_scale``, ``b_scale``, ``parameterization``."""
        ntk = parameterization == "ntk"
        self.parameterization = parameterization
        self.w_scale = w_std / math.sqrt(fan_in) if ntk else 1.0
        self.b_scale = (b_std or 0.0) if ntk else 1.0
        w = ctx.randn(*weight_shape)
        self.weight = nn.Parameter(w if ntk else w * (w_std / math.sqrt(fan_in)))
        if b_std is None:
            self.register_parameter("bias", None)
        elif b_init == "zero":
            self.bias = nn.Parameter(torch.zeros(bias_shape, dtype=ctx.dtype, device=ctx.device))
        else:
            b = ctx.randn(*bias_shape)
            self.bias = nn.Parameter(b if ntk else b * b_std)

    def scaled_weight(self) -> Tensor:
        """The weight as the forward pass uses it."""
        return self.weight * self.w_scale if self.w_scale != 1.0 else self.weight

    def scaled_bias(self) -> Tensor | None:
        """The bias as the forward pass uses it (None without one)."""
        if self.bias is None or self.b_scale == 1.0:
            return self.bias
        return self.bias * self.b_scale

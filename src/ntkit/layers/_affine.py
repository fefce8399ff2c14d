"""The parameters of a finite twin with a weight and a bias, drawn as its
parameterization says (shared by Linear, the convolutions and their variants)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from .base import BuildContext

__all__ = ["ScaledAffine"]


class ScaledAffine(nn.Module):
    """Base of finite twins with ``weight`` and ``bias`` (None without a bias).

    NTK parameterization: both are stored standard normal and the forward pass
    scales them by ``w_scale = w_std / sqrt(fan_in)`` and ``b_scale = b_std``;
    standard parameterization: they carry their variance (``W ~ N(0, w_std^2 /
    fan_in)``, ``b ~ N(0, b_std^2)``) and the scales are 1. The weight is drawn
    before the bias, from the context's generator.
    """

    def init_affine(self, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...],
                    fan_in: int, w_std: float, b_std: float | None, parameterization: str,
                    ctx: BuildContext) -> None:
        """Draws ``weight`` ``weight_shape`` and ``bias`` ``bias_shape`` (none when
        ``b_std`` is None) and sets ``w_scale``, ``b_scale``, ``parameterization``."""
        ntk = parameterization == "ntk"
        self.parameterization = parameterization
        self.w_scale = w_std / math.sqrt(fan_in) if ntk else 1.0
        self.b_scale = (b_std or 0.0) if ntk else 1.0
        w = ctx.randn(*weight_shape)
        self.weight = nn.Parameter(w if ntk else w * (w_std / math.sqrt(fan_in)))
        if b_std is None:
            self.register_parameter("bias", None)
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

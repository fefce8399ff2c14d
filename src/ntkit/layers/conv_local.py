"""Unshared (locally connected) convolutions: neural-tangents' ``ConvLocal``.

A locally connected layer has the windows of a convolution but a separate
weight (and bias) for every output position: the "CNN without weight sharing"
of Novak et al. 2019, *Bayesian Deep Convolutional Networks with Many Channels
are Gaussian Processes* (ICLR 2019), section 3 / eq. (4) with the sum restricted
to the position diagonal. With independent weights per position, outputs at
different positions are uncorrelated, so only matching positions survive:

    K'(x, x')[p, p]  = w_std^2 / taps * sum_d K(x, x')[s p + δ d, s p + δ d] + b_std^2
    K'(x, x')[p, p'] = 0                                   (p != p')
    Θ'[p, p]         = K'[p, p] + w_std^2 / taps * sum_d Θ[s p + δ d, s p + δ d]

(NTK parameterization; ``taps = prod(kernel_size)``). The rule reads only the
position diagonal of its input kernel, so it never needs position pairs; given
a position-pair kernel it uses that kernel's diagonal and returns a position-pair
kernel that is zero off the diagonal (for the layers after it that mix positions).

The public names follow issue 15's interface (``LocallyConnected1d/2d/3d``);
the spec grammar also accepts neural-tangents' spelling ``convlocal{1,2,3}d``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kernel import Kernel
from ._affine import ScaledAffine
from .base import BuildContext, Kernels, Shapes, number, single
from .conv import _Conv, _patches

__all__ = ["LocallyConnected1d", "LocallyConnected2d", "LocallyConnected3d",
           "NTKLocallyConnected"]


def _embed_diagonal(t: Tensor, batch: int, spatial: tuple[int, ...]) -> Tensor:
    """``(*B, *S)`` -> ``(*B, *S, *S)``, zero off the position diagonal."""
    lead = t.shape[:batch]
    return torch.diag_embed(t.reshape(*lead, -1)).reshape(*lead, *spatial, *spatial)


class _LocallyConnected(_Conv):
    """A locally connected layer over ``ndim`` spatial axes (see `LocallyConnected2d`)."""

    def needs_position_pairs(self) -> bool:
        return False

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if not k.position_pairs:
            return super().propagate(k)
        out = super().propagate(k.to_position_diagonal())
        spatial = out.spatial_shape
        b = 1 if out.diagonal else 2
        nngp = _embed_diagonal(out.nngp, b, spatial)
        ntk = _embed_diagonal(out.ntk, b, spatial)
        if out.diagonal:
            cov1 = cov2 = nngp if k.cov_pairs else out.nngp
        elif k.cov_pairs:
            cov1 = _embed_diagonal(out.cov1, 1, spatial)
            cov2 = cov1 if out.cov2 is out.cov1 else _embed_diagonal(out.cov2, 1, spatial)
        else:
            cov1, cov2 = out.cov1, out.cov2
        return out.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, position_pairs=True,
                           cov_pairs=k.cov_pairs)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        spatial = self._spatial(shape)
        self._check_channels(shape[0])
        axes = self._axes(spatial)
        module = NTKLocallyConnected(shape[0], self.out_channels, axes, number(self.w_std),
                                     number(self.b_std), self.parameterization, ctx,
                                     b_init=self.b_init)
        return module, (self.out_channels,) + tuple(ax.m for ax in axes)


class LocallyConnected1d(_LocallyConnected):
    """Locally connected (unshared) 1-d convolution over ``(N, C, L)``; see
    `LocallyConnected2d`."""

    ndim = 1
    spec_names = ("locallyconnected1d", "convlocal1d")


class LocallyConnected2d(_LocallyConnected):
    """A locally connected 2-d layer over ``(N, C, H, W)``: `Conv2d` without weight sharing.

    neural-tangents' ``ConvLocal`` (Novak et al. 2019): every output position has
    its own weights ``(out_channels, in_channels, *kernel_size)`` and its own bias.
    The arguments and the parameterization are `Conv2d`'s (``fan_in = in_channels *
    prod(kernel_size)``, padding ``"valid"``/``"same"``/``"circular"``/ints,
    ``padding_mode``). The kernel keeps only matching positions: at ``(p, p)`` it
    is ``w_std^2`` times the mean over taps ``d`` of the input kernel at
    ``(s p + δ d, s p + δ d)``, plus ``b_std^2``; between different positions it
    is zero. Hence, followed by `Flatten` (which reads only the position
    diagonal) it gives the same kernel as `Conv2d`, while followed by
    `GlobalAvgPool` it does not.
    """

    ndim = 2
    spec_names = ("locallyconnected2d", "convlocal2d")


class LocallyConnected3d(_LocallyConnected):
    """Locally connected (unshared) 3-d convolution over ``(N, C, D, H, W)``; see
    `LocallyConnected2d`."""

    ndim = 3
    spec_names = ("locallyconnected3d", "convlocal3d")


class NTKLocallyConnected(ScaledAffine):
    """The finite twin of a locally connected layer: the padded windows of the input
    (``(N, C * taps, P)``) contracted with a separate weight per output position."""

    def __init__(self, in_channels, out_channels, axes, w_std, b_std, parameterization,
                 ctx: BuildContext, b_init: str = "normal") -> None:
        super().__init__()
        self.axes = list(axes)
        self.out_spatial = tuple(ax.m for ax in self.axes)
        positions = math.prod(self.out_spatial)
        fan_in = in_channels * math.prod(ax.size for ax in self.axes)
        self.init_affine((positions, out_channels, fan_in), (out_channels, positions), fan_in,
                         w_std, b_std, parameterization, ctx, b_init)

    def forward(self, x: Tensor) -> Tensor:
        u = _patches(x, self.axes)  # (N, C * taps, P), channel-major like the weight
        y = torch.einsum("nkp,pok->nop", u, self.scaled_weight())
        if self.bias is not None:
            y = y + self.scaled_bias()
        return y.reshape(x.shape[0], -1, *self.out_spatial)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[2]} inputs per window, {self.weight.shape[1]} channels, "
                f"{self.weight.shape[0]} positions, parameterization={self.parameterization!r}")

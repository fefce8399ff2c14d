"""Convolutions over 1, 2 or 3 spatial axes, channels first (pooling: `pool`).

A convolution's kernel at output positions ``(p, p')`` averages the incoming
kernel over the pairs of input positions that share a tap (see `_spatial`).

Masks (``kernel(..., mask=)``, neural-tangents' semantics, see `_masks`): absent
positions are zeros; an output position is present where the centre of its
window is (neural-tangents' ``Conv`` ``mask_fn``), and covariances at absent
output positions are zero. Zero padding only: a padding mode that copies input
values (circular, reflect, replicate) would bring absent positions back.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._side import SideModule, mask_input
from ..kernel import Kernel
from ._affine import ScaledAffine, affine_repr_parts, check_b_init, split_bias_variance
from ._masks import window_mask
from ._spatial import Axis, Spatial, int_tuple, padding_spec, same_ints, shifted_sum
from .base import BuildContext, Kernels, Shapes, affine_variances, number, single
from .linear import BInit, Parameterization, affine_spec, uninitialised

__all__ = ["Conv1d", "Conv2d", "Conv3d", "NTKConv"]

Padding = Union[Literal["valid", "same", "circular"], int, Sequence[int]]
PaddingMode = Literal["zeros", "circular", "reflect", "replicate"]
_MODES = ("zeros", "circular", "reflect", "replicate")


def _patches(x: Tensor, axes: list[Axis]) -> Tensor:
    """The windows of ``x`` ``(N, C, *S)``: ``(N, C * taps, P_out)``."""
    for i, ax in enumerate(axes):
        x = ax.pad(x, 2 + i)
    parts = [x[(slice(None), slice(None)) + tuple(ax.taps(d) for ax, d in zip(axes, ds))]
             for ds in itertools.product(*(range(ax.size) for ax in axes))]
    return torch.stack(parts, 2).reshape(x.shape[0], -1, math.prod(ax.m for ax in axes))


def _input_conv_sum(k: Kernel, axes: list[Axis]) -> Tensor:
    """The input kernel summed over a convolution's taps, straight from the inputs'
    windows: one product of patch matrices instead of shifted sums over the
    input's position-pair kernel."""
    x1, x2 = k.inputs
    u1 = _patches(x1, axes)
    u2 = u1 if x2 is None else _patches(x2, axes)
    spatial = tuple(ax.m for ax in axes)
    n1, n2 = u1.shape[0], u2.shape[0]
    if k.position_pairs:
        out = torch.einsum("iap,jaq->ijpq", u1, u2).reshape(n1, n2, *spatial, *spatial)
    else:
        out = torch.einsum("iap,jap->ijp", u1, u2).reshape(n1, n2, *spatial)
    return out.div_(x1.shape[1])


class _Conv(Spatial):
    """A convolution of any width over ``ndim`` spatial axes (see `Conv2d`)."""

    def __init__(
        self,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: Padding = 0,
        dilation: int | Sequence[int] = 1,
        w_std: float | Tensor = 1.0,
        b_std: float | Tensor | None = 0.0,
        *,
        padding_mode: PaddingMode = "zeros",
        parameterization: Parameterization = "ntk",
        in_channels: int | None = None,
        b_init: BInit = "normal",
    ) -> None:
        from .linear import Linear

        name = type(self).__name__
        # Linear validates the widths, standard deviations and parameterization.
        checked = Linear(out_channels, w_std, b_std, parameterization=parameterization,
                         in_features=in_channels)
        self.b_init = check_b_init(b_init, b_std, name)
        self.out_channels = int(out_channels)
        self.kernel_size = int_tuple(kernel_size, self.ndim, "kernel_size", name)
        self.stride = int_tuple(stride, self.ndim, "stride", name)
        self.dilation = int_tuple(dilation, self.ndim, "dilation", name)
        if padding_mode not in _MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_MODES}, got "
                             f"{padding_mode!r}.")
        if isinstance(padding, str):
            if padding not in ("valid", "same", "circular"):
                raise ValueError(f"{name}: padding must be 'valid', 'same', 'circular' or ints, "
                                 f"got {padding!r}.")
            self.padding = padding
        else:
            self.padding = int_tuple(padding, self.ndim, "padding", name, minimum=0)
        self.mode = "circular" if padding == "circular" else padding_mode
        self.w_std, self.b_std = checked.w_std, checked.b_std
        self.parameterization = parameterization
        self.in_channels = None if in_channels is None else int(in_channels)

    @classmethod
    def from_torch_module(cls, module, ctx):
        if getattr(module, "has_uninitialized_params", lambda: False)():
            raise uninitialised(ctx)
        if module.groups != 1:
            raise ctx.fail(
                f"a grouped convolution (groups={module.groups}) connects each output channel "
                f"to in_channels/groups inputs; ntkit's Conv has no grouped or depthwise "
                f"rule. Use groups=1")
        fan_in = module.in_channels * math.prod(module.kernel_size)
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return cls(module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                   padding, tuple(module.dilation), ctx.weight_std(),
                   ctx.bias_std(module.bias is not None, fan_in),
                   padding_mode=module.padding_mode, parameterization=ctx.parameterization,
                   in_channels=module.in_channels)

    def spec_call(self):
        kw: dict = {}
        if any(s != 1 for s in self.stride):
            kw["stride"] = same_ints(self.stride)
        padding_spec(self.padding, kw)
        if any(d != 1 for d in self.dilation):
            kw["dilation"] = same_ints(self.dilation)
        kw.update(affine_spec(self))
        if self.mode != "zeros" and self.padding != "circular":
            kw["padding_mode"] = self.mode
        if self.in_channels is not None:
            kw["in_channels"] = self.in_channels
        return type(self).spec_names[0], [self.out_channels, same_ints(self.kernel_size)], kw

    def _check_channels(self, channels: int) -> None:
        if self.in_channels is not None and channels != self.in_channels:
            raise ValueError(
                f"{self!r} expects {self.in_channels} input channels but receives {channels}; "
                f"check the channel axis (inputs are channels first, (N, C, ...)) or change "
                f"in_channels."
            )

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"}) if self.honours_masks else frozenset()

    def _mask_after(self, k: Kernel, out: Kernel, axes: list[Axis]) -> Kernel:
        """``out`` carrying the mask of the output positions (window centres present)."""
        pair = k.side_pair("mask")
        if pair is None:
            return out
        if self.mode != "zeros" and any(ax.before or ax.after for ax in axes):
            raise ValueError(
                f"{self!r} pads with {self.mode!r} copies of the input, which would bring "
                f"absent positions of masked inputs back; use padding_mode='zeros' (and "
                f"padding 'same' rather than 'circular') with mask=.")
        m1 = window_mask(pair[0], axes)
        m2 = m1 if pair[1] is pair[0] else window_mask(pair[1], axes)
        return out.with_side("mask", (m1, m2))

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        spatial = self._spatial(k.shape)
        self._check_channels(k.shape[0])
        axes = self._axes(spatial)
        taps = math.prod(self.kernel_size)
        fan_in = k.shape[0] * taps
        b = 1 if k.diagonal else 2

        # A 1-tap, unpadded window (a channel mixing Conv1d(c, 1)) sums nothing: its
        # tiles pass through uncopied and are never written to.
        one_tap = all(ax.size == ax.stride == 1 and not (ax.before or ax.after) for ax in axes)

        def conv_sum(t: Tensor, batch: int, pairs: bool = k.position_pairs) -> Tensor:
            """The sum (not yet the mean) over taps (``t`` itself for `one_tap`)."""
            for i, ax in enumerate(() if one_tap else axes):
                dims = (batch + i, batch + len(axes) + i) if pairs else (batch + i,)
                t = shifted_sum(t, ax, dims)
            return t

        # Each rule below is one fused pass over the summed tile:
        # nngp = w^2 mean_d(K) + b^2 = b^2 + (w^2 / taps) sum_d(K).
        # The hyperparameters are 0-dim tensors, so that the kernel is differentiable
        # in those given as tensors.
        w2, b2 = affine_variances(self.w_std, self.b_std, k.nngp)
        b2, trained_b2 = split_bias_variance(b2, self.b_init)
        scale = w2 / taps

        def affine(t: Tensor) -> Tensor:
            if b2 is not None:
                return torch.addcmul(b2, t, scale)
            return t * scale if scale.requires_grad or one_tap else t.mul_(scale)

        if k.is_input and k.inputs is not None and not k.diagonal:
            nngp_sum = _input_conv_sum(k, axes)
        else:
            nngp_sum = conv_sum(k.nngp, b)
        cov_pairs = k.position_pairs and k.cov_pairs
        cov1 = None if k.diagonal else affine(conv_sum(k.cov1, 1, cov_pairs))
        cov2 = cov1 if k.cov2 is k.cov1 else affine(conv_sum(k.cov2, 1, cov_pairs))
        bias_grad = 0.0 if self.b_std is None else 1.0
        if self.parameterization == "standard":  # w^2 mean(Theta) + fan_in mean(K) + 1
            ntk = torch.mul(nngp_sum, fan_in / taps)
            if not k.is_input:
                ntk.addcmul_(conv_sum(k.ntk, b), scale)
            if bias_grad:
                ntk.add_(bias_grad)
        nngp = affine(nngp_sum)
        if self.parameterization == "ntk":  # nngp' + w^2 mean(Theta)
            ntk = nngp.clone() if k.is_input else torch.addcmul(nngp, conv_sum(k.ntk, b), scale)
            if trained_b2 is not None:  # + b^2: the gradient of a bias that starts at zero
                ntk = ntk + trained_b2
        if k.diagonal:
            cov1 = cov2 = nngp
        return self._mask_after(k, k.replace(
            nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2,
            shape=(self.out_channels,) + tuple(ax.m for ax in axes),
            is_gaussian=True, is_input=False, inputs=None,
        ), axes)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        spatial = self._spatial(shape)
        self._check_channels(shape[0])
        axes = self._axes(spatial)
        module = NTKConv(shape[0], self.out_channels, self.kernel_size, self.stride,
                         self.dilation, [(ax.before, ax.after) for ax in axes], self.mode,
                         number(self.w_std), number(self.b_std), self.parameterization, ctx,
                         b_init=self.b_init)
        module.axes = axes
        return module, (self.out_channels,) + tuple(ax.m for ax in axes)

    def __repr__(self) -> str:
        k = self.kernel_size if len(set(self.kernel_size)) > 1 else self.kernel_size[0]
        parts = [f"{self.out_channels}", f"kernel_size={k}"]
        if set(self.stride) != {1}:
            parts.append(f"stride={self.stride}")
        if self.padding not in (0, (0,) * self.ndim):
            parts.append(f"padding={self.padding!r}")
        if set(self.dilation) != {1}:
            parts.append(f"dilation={self.dilation}")
        if self.mode != "zeros" and self.padding != "circular":
            parts.append(f"padding_mode={self.mode!r}")
        parts += affine_repr_parts(self)
        return f"{type(self).__name__}({', '.join(parts)})"


class Conv1d(_Conv):
    """1-d convolution over ``(N, C, L)``; see `Conv2d`."""

    ndim = 1
    spec_names = ("conv1d",)
    torch_modules = (nn.Conv1d,)
    honours_masks = True


class Conv2d(_Conv):
    """A 2-d convolution of any width over ``(N, C, H, W)``, as `torch.nn.Conv2d`.

    Parameterization as `Linear` with ``fan_in = in_channels * prod(kernel_size)``:
    in NTK parameterization ``y = (w_std / sqrt(fan_in)) W * x + b_std b`` with
    standard normal ``W`` and ``b``. The kernel at output positions ``(p, p')``
    is ``w_std^2`` times the mean over taps ``d`` of the input kernel at
    ``(s p + δ d, s p' + δ d)``, plus ``b_std^2`` (the bias is shared across
    positions); padded positions contribute zero to the mean, which is always
    over ``prod(kernel_size)`` taps.

    Masks (``kernel(..., mask=)``): absent positions are zeros like padding; an
    output position is present where its window's centre is (neural-tangents'
    ``Conv``); zero padding only (see the module docstring).

    Args:
        out_channels: the width.
        kernel_size, stride, dilation: ints or one per spatial axis.
        padding: ``"valid"`` (none), ``"same"`` (output size ``ceil(n / stride)``,
            ``total // 2`` before and the rest after, as neural-tangents and
            TensorFlow), ``"circular"`` (``"same"`` with wrap-around), or ints
            (symmetric, per axis).
        w_std, b_std: as `Linear`, numbers or 0-dim tensors (the kernel is then
            differentiable in them; the finite twin of `build` is not);
            ``b_std=None`` for no bias.
        b_init: as `Linear`: ``"zero"`` starts the bias at zero and trains it
            with scale ``b_std`` (``b_std^2`` leaves the NNGP and is added to the
            NTK at every position pair).
        padding_mode: ``"zeros"``, ``"circular"``, ``"reflect"`` or
            ``"replicate"`` (`torch.nn.Conv2d`'s), for int or ``"same"`` padding.
        parameterization: ``"ntk"`` or ``"standard"``.
        in_channels: checked against the inputs when given.
    """

    ndim = 2
    spec_names = ("conv2d",)
    torch_modules = (nn.Conv2d,)
    honours_masks = True


class Conv3d(_Conv):
    """3-d convolution over ``(N, C, D, H, W)``; see `Conv2d`."""

    ndim = 3
    spec_names = ("conv3d",)
    torch_modules = (nn.Conv3d,)
    honours_masks = True


class NTKConv(SideModule, ScaledAffine):
    """The finite twin of a convolution: pads explicitly, then ``F.conv{1,2,3}d``.

    With a mask (``model(x, mask=m)``, or the network's side dict) it writes the
    mask of its output (window centres present) and zeroes the absent outputs.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, dilation, pads, mode,
                 w_std, b_std, parameterization, ctx: BuildContext,
                 b_init: BInit = "normal") -> None:
        super().__init__()
        self.stride, self.dilation, self.mode = tuple(stride), tuple(dilation), mode
        # F.pad lists the last axis first.
        self.pads = tuple(p for pair in reversed(pads) for p in pair)
        self.init_affine((out_channels, in_channels, *kernel_size), (out_channels,),
                         in_channels * math.prod(kernel_size), w_std, b_std,
                         parameterization, ctx, b_init)
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel_size) - 1]
        self.axes = None  # the `Axis` of each spatial axis, for the output mask

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        out = self._convolve(x)
        if "mask" not in side:
            return out
        if (self.mode != "zeros" and any(self.pads)) or self.axes is None:
            raise ValueError(f"{type(self).__name__} with padding mode {self.mode!r} (or made "
                             f"outside Conv.build) takes no mask; use padding_mode='zeros'.")
        side["mask"] = window_mask(side["mask"], self.axes)
        return mask_input(out, side["mask"])

    def _convolve(self, x: Tensor) -> Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, mode="constant" if self.mode == "zeros" else self.mode)
        return self._conv(x, self.scaled_weight(), self.scaled_bias(), self.stride, 0,
                          self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
                f"parameterization={self.parameterization!r}")

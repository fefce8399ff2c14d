"""Convolutions and pooling over 1, 2 or 3 spatial axes, channels first.

With weights drawn independently per tap, a convolution's kernel between
position ``p`` of ``x1`` and ``p'`` of ``x2`` averages the incoming kernel over
the pairs ``(p + d, p' + d)`` that share a tap ``d``; pooling averages over all
pairs of its windows. Both act on each spatial axis separately, so a layer is
a sequence of cheap shifted sums along one axis (pooling) or one pair of axes
(convolution), never a dense operator.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..kernel import Kernel, position_diagonal
from .base import BuildContext, Kernels, Layer, Shapes, affine_variances, number, single
from .linear import Parameterization

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "SumPool1d",
    "SumPool2d", "SumPool3d", "GlobalAvgPool", "GlobalSumPool", "NTKConv", "PoolModule",
]

Padding = Union[Literal["valid", "same", "circular"], int, Sequence[int]]
PaddingMode = Literal["zeros", "circular", "reflect", "replicate"]
_MODES = ("zeros", "circular", "reflect", "replicate")


def _tuple(value, n: int, name: str, owner: str, minimum: int = 1) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if (values is None or len(values) != n
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            or any(v < minimum for v in values)):
        raise ValueError(
            f"{owner}: {name} must be an int >= {minimum} or a tuple of {n} of them, "
            f"got {value!r}."
        )
    return values


@dataclass(frozen=True)
class _Axis:
    """How one spatial axis maps ``n`` input positions to ``m`` output positions."""

    n: int
    before: int
    after: int
    size: int
    stride: int
    dilation: int
    mode: str

    @property
    def m(self) -> int:
        return (self.n + self.before + self.after - self.dilation * (self.size - 1) - 1
                ) // self.stride + 1

    def pad(self, t: Tensor, dim: int) -> Tensor:
        if not (self.before or self.after):
            return t
        if self.mode == "zeros":
            shape = list(t.shape)
            shape[dim] = self.n + self.before + self.after
            out = t.new_zeros(shape)
            out.narrow(dim, self.before, self.n).copy_(t)
            return out
        j = torch.arange(-self.before, self.n + self.after, device=t.device)
        if self.mode == "circular":
            j = j % self.n
        elif self.mode == "replicate":
            j = j.clamp(0, self.n - 1)
        else:  # reflect, without repeating the edge
            j = j.abs()
            j = torch.where(j >= self.n, 2 * (self.n - 1) - j, j)
        return t.index_select(dim, j)

    def taps(self, d: int) -> slice:
        start = d * self.dilation
        return slice(start, start + self.stride * (self.m - 1) + 1, self.stride)

    def counts(self) -> Tensor:
        """How many real (not padded) positions each output window covers."""
        real = torch.zeros(self.n + self.before + self.after)
        real[self.before:self.before + self.n] = 1
        return sum(real[self.taps(d)] for d in range(self.size))


def _index(ndim: int, where: dict[int, slice]) -> tuple:
    return tuple(where.get(i, slice(None)) for i in range(ndim))


def _shifted_sum(t: Tensor, ax: _Axis, dims: tuple[int, ...]) -> Tensor:
    """``sum_d t[.., s o + δ d, .., s o' + δ d, ..]`` over the axes ``dims`` (padded)."""
    if ax.mode != "zeros":
        for dim in dims:
            t = ax.pad(t, dim)
        ax = _Axis(t.shape[dims[0]], 0, 0, ax.size, ax.stride, ax.dilation, "zeros")
    # Zero padding without materialising it: each tap adds to the outputs whose
    # input position is real.
    parts = []
    for d in range(ax.size):
        first = d * ax.dilation - ax.before  # input position of output 0
        lo = max(0, -(first // ax.stride))  # first output with input >= 0
        hi = min(ax.m, (ax.n - 1 - first) // ax.stride + 1) if ax.n - 1 >= first else 0
        if hi > lo:
            src = slice(first + lo * ax.stride, first + (hi - 1) * ax.stride + 1, ax.stride)
            parts.append((lo, hi, src))
    full = [p for p in parts if p[0] == 0 and p[1] == ax.m]
    if full:
        parts.remove(full[0])
        out = t[_index(t.ndim, {dim: full[0][2] for dim in dims})].clone()
    else:
        shape = list(t.shape)
        for dim in dims:
            shape[dim] = ax.m
        out = t.new_zeros(shape)
    for lo, hi, src in parts:
        out[_index(t.ndim, {dim: slice(lo, hi) for dim in dims})] += t[
            _index(t.ndim, {dim: src for dim in dims})]
    return out


def _patches(x: Tensor, axes: list[_Axis]) -> Tensor:
    """The windows of ``x`` ``(N, C, *S)``: ``(N, C * taps, P_out)``."""
    for i, ax in enumerate(axes):
        x = ax.pad(x, 2 + i)
    parts = [x[(slice(None), slice(None)) + tuple(ax.taps(d) for ax, d in zip(axes, ds))]
             for ds in itertools.product(*(range(ax.size) for ax in axes))]
    return torch.stack(parts, 2).reshape(x.shape[0], -1, math.prod(ax.m for ax in axes))


def _input_conv_sum(k: Kernel, axes: list[_Axis]) -> Tensor:
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


class _Spatial(Layer):
    """Shared checks of layers that take ``(N, C, *S)`` with ``ndim`` spatial axes."""

    ndim: int = 0

    def _spatial(self, shape: Shapes) -> tuple[int, ...]:
        if not shape or isinstance(shape[0], tuple):
            raise ValueError(f"{self!r} takes one input but receives branches {shape}.")
        if len(shape) != self.ndim + 1:
            letters = ("L",), ("H", "W"), ("D", "H", "W")
            want = ", ".join(("N", "C") + letters[self.ndim - 1])
            raise ValueError(
                f"{self!r} takes inputs of shape ({want}) ({self.ndim} spatial "
                f"axis{'es' if self.ndim > 1 else ''}) but receives per-example shape "
                f"{tuple(shape)}; pass x of shape (N, C, {want[6:]}), or use the "
                f"{len(shape) - 1}-d layer."
                if len(shape) > 1 else
                f"{self!r} takes inputs of shape ({want}) but receives dense features "
                f"{tuple(shape)}; reshape x to (N, C, {want[6:]}) or use Linear."
            )
        return tuple(shape[1:])

    def _axes(self, spatial: tuple[int, ...]) -> list[_Axis]:
        axes = []
        for i, n in enumerate(spatial):
            size, stride, dil = self.kernel_size[i], self.stride[i], self.dilation[i]
            extent = dil * (size - 1) + 1
            if self.padding in ("same", "circular"):
                total = max((math.ceil(n / stride) - 1) * stride + extent - n, 0)
                before, after = total // 2, total - total // 2
            elif self.padding == "valid":
                before = after = 0
            else:
                before = after = self.padding[i]
            ax = _Axis(n, before, after, size, stride, dil, self.mode)
            if ax.mode == "reflect" and max(before, after) >= n:
                raise ValueError(f"{self!r}: reflect padding {max(before, after)} needs more "
                                 f"than {n} positions along spatial axis {i}.")
            if ax.m < 1:
                raise ValueError(
                    f"{self!r}: the window spans {extent} positions along spatial axis {i} but "
                    f"the input has {n} (with padding {before}+{after}); use padding='same', a "
                    f"smaller kernel_size or dilation, or larger inputs."
                )
            axes.append(ax)
        return axes


class _Conv(_Spatial):
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
    ) -> None:
        from .linear import Linear

        name = type(self).__name__
        # Linear validates the widths, standard deviations and parameterization.
        checked = Linear(out_channels, w_std, b_std, parameterization=parameterization,
                         in_features=in_channels)
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, self.ndim, "kernel_size", name)
        self.stride = _tuple(stride, self.ndim, "stride", name)
        self.dilation = _tuple(dilation, self.ndim, "dilation", name)
        if padding_mode not in _MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_MODES}, got "
                             f"{padding_mode!r}.")
        if isinstance(padding, str):
            if padding not in ("valid", "same", "circular"):
                raise ValueError(f"{name}: padding must be 'valid', 'same', 'circular' or ints, "
                                 f"got {padding!r}.")
            self.padding = padding
        else:
            self.padding = _tuple(padding, self.ndim, "padding", name, minimum=0)
        self.mode = "circular" if padding == "circular" else padding_mode
        self.w_std, self.b_std = checked.w_std, checked.b_std
        self.parameterization = parameterization
        self.in_channels = in_channels

    def _check_channels(self, channels: int) -> None:
        if self.in_channels is not None and channels != self.in_channels:
            raise ValueError(
                f"{self!r} expects {self.in_channels} input channels but receives {channels}; "
                f"check the channel axis (inputs are channels first, (N, C, ...)) or change "
                f"in_channels."
            )

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        spatial = self._spatial(k.shape)
        self._check_channels(k.shape[0])
        axes = self._axes(spatial)
        taps = math.prod(self.kernel_size)
        fan_in = k.shape[0] * taps
        b = 1 if k.diagonal else 2

        def conv_sum(t: Tensor, batch: int, pairs: bool = k.position_pairs) -> Tensor:
            """The sum (not yet the mean) over taps."""
            for i, ax in enumerate(axes):
                dims = (batch + i, batch + len(axes) + i) if pairs else (batch + i,)
                t = _shifted_sum(t, ax, dims)
            return t

        # Each rule below is one fused pass over the summed tile:
        # nngp = w^2 mean_d(K) + b^2 = b^2 + (w^2 / taps) sum_d(K).
        # The hyperparameters are 0-dim tensors, so that the kernel is differentiable
        # in those given as tensors.
        w2, b2 = affine_variances(self.w_std, self.b_std, k.nngp)
        scale = w2 / taps

        def affine(t: Tensor) -> Tensor:
            if b2 is not None:
                return torch.addcmul(b2, t, scale)
            return t * scale if scale.requires_grad else t.mul_(scale)

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
        if k.diagonal:
            cov1 = cov2 = nngp
        return k.replace(
            nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2,
            shape=(self.out_channels,) + tuple(ax.m for ax in axes),
            is_gaussian=True, is_input=False, inputs=None,
        )

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        spatial = self._spatial(shape)
        self._check_channels(shape[0])
        axes = self._axes(spatial)
        module = NTKConv(shape[0], self.out_channels, self.kernel_size, self.stride,
                         self.dilation, [(ax.before, ax.after) for ax in axes], self.mode,
                         number(self.w_std), number(self.b_std), self.parameterization, ctx)
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
        parts += [f"w_std={self.w_std}", f"b_std={self.b_std}"]
        if self.parameterization != "ntk":
            parts.append("parameterization='standard'")
        return f"{type(self).__name__}({', '.join(parts)})"


class Conv1d(_Conv):
    """1-d convolution over ``(N, C, L)``; see `Conv2d`."""

    ndim = 1


class Conv2d(_Conv):
    """A 2-d convolution of any width over ``(N, C, H, W)``, as `torch.nn.Conv2d`.

    Parameterization as `Linear` with ``fan_in = in_channels * prod(kernel_size)``:
    in NTK parameterization ``y = (w_std / sqrt(fan_in)) W * x + b_std b`` with
    standard normal ``W`` and ``b``. The kernel at output positions ``(p, p')``
    is ``w_std^2`` times the mean over taps ``d`` of the input kernel at
    ``(s p + δ d, s p' + δ d)``, plus ``b_std^2`` (the bias is shared across
    positions); padded positions contribute zero to the mean, which is always
    over ``prod(kernel_size)`` taps.

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
        padding_mode: ``"zeros"``, ``"circular"``, ``"reflect"`` or
            ``"replicate"`` (`torch.nn.Conv2d`'s), for int or ``"same"`` padding.
        parameterization: ``"ntk"`` or ``"standard"``.
        in_channels: checked against the inputs when given.
    """

    ndim = 2


class Conv3d(_Conv):
    """3-d convolution over ``(N, C, D, H, W)``; see `Conv2d`."""

    ndim = 3


class NTKConv(nn.Module):
    """The finite twin of a convolution: pads explicitly, then ``F.conv{1,2,3}d``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, dilation, pads, mode,
                 w_std, b_std, parameterization, ctx: BuildContext) -> None:
        super().__init__()
        ntk = parameterization == "ntk"
        fan_in = in_channels * math.prod(kernel_size)
        self.stride, self.dilation, self.mode = tuple(stride), tuple(dilation), mode
        self.parameterization = parameterization
        # F.pad lists the last axis first.
        self.pads = tuple(p for pair in reversed(pads) for p in pair)
        self.w_scale = w_std / math.sqrt(fan_in) if ntk else 1.0
        self.b_scale = (b_std or 0.0) if ntk else 1.0
        w = ctx.randn(out_channels, in_channels, *kernel_size)
        self.weight = nn.Parameter(w if ntk else w * (w_std / math.sqrt(fan_in)))
        if b_std is None:
            self.register_parameter("bias", None)
        else:
            b = ctx.randn(out_channels)
            self.bias = nn.Parameter(b if ntk else b * b_std)
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel_size) - 1]

    def forward(self, x: Tensor) -> Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, mode="constant" if self.mode == "zeros" else self.mode)
        weight = self.weight * self.w_scale if self.w_scale != 1.0 else self.weight
        bias = self.bias
        if bias is not None and self.b_scale != 1.0:
            bias = bias * self.b_scale
        return self._conv(x, weight, bias, self.stride, 0, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
                f"parameterization={self.parameterization!r}")


# ----------------------------------------------------------------------- pooling
class _Pool(_Spatial):
    """Average or sum pooling over ``ndim`` spatial axes (see `AvgPool2d`)."""

    normalize = True

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: Literal["valid", "same"] | int | Sequence[int] = 0,
        *,
        count_include_pad: bool = True,
    ) -> None:
        name = type(self).__name__
        self.kernel_size = _tuple(kernel_size, self.ndim, "kernel_size", name)
        self.stride = self.kernel_size if stride is None else _tuple(stride, self.ndim,
                                                                     "stride", name)
        self.dilation = (1,) * self.ndim
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"{name}: padding must be 'valid', 'same' or ints, got "
                                 f"{padding!r}.")
            self.padding = padding
        else:
            self.padding = _tuple(padding, self.ndim, "padding", name, minimum=0)
            if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
                raise ValueError(
                    f"{name}: padding {self.padding} is more than half of kernel_size "
                    f"{self.kernel_size}, so some windows would hold only padding (torch's "
                    f"pooling refuses this too); use padding <= kernel_size // 2."
                )
        self.mode = "zeros"
        self.count_include_pad = bool(count_include_pad)

    def needs_position_pairs(self) -> bool:
        return True

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        spatial = self._spatial(k.shape)
        _require_pairs(k, self)
        axes = self._axes(spatial)

        def pool(t: Tensor, batch: int) -> Tensor:
            for i, ax in enumerate(axes):
                for dim in (batch + i, batch + len(axes) + i):
                    t = _shifted_sum(t, ax, (dim,))
                    if self.normalize:
                        t = t.div_(self._norm(ax, t, dim))
            return t

        b = 1 if k.diagonal else 2
        nngp = pool(k.nngp, b)
        cov1, cov2 = k.self_covariances(lambda c: pool(c, 1), lambda c: position_diagonal(c, 1),
                                        diagonal_result=nngp)
        ntk = (torch.zeros((), dtype=nngp.dtype, device=nngp.device).expand(nngp.shape)
               if k.is_input else pool(k.ntk, b))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2,
                         shape=(k.shape[0],) + tuple(ax.m for ax in axes))

    def _norm(self, ax: _Axis, t: Tensor, dim: int):
        if self.count_include_pad:
            return float(ax.size)
        shape = [1] * t.ndim
        shape[dim] = ax.m
        return ax.counts().to(dtype=t.dtype, device=t.device).reshape(shape)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        axes = self._axes(self._spatial(shape))
        module = PoolModule(self.kernel_size, self.stride, [(ax.before, ax.after) for ax in axes],
                            self.normalize, self.count_include_pad)
        return module, (shape[0],) + tuple(ax.m for ax in axes)

    def __repr__(self) -> str:
        k = self.kernel_size if len(set(self.kernel_size)) > 1 else self.kernel_size[0]
        extra = "" if self.stride == self.kernel_size else f", stride={self.stride}"
        if self.padding not in (0, (0,) * self.ndim):
            extra += f", padding={self.padding!r}"
        return f"{type(self).__name__}({k}{extra})"


def _require_pairs(k: Kernel, layer: Layer) -> None:
    if not k.position_pairs:
        raise ValueError(
            f"{layer!r} mixes positions and needs the kernel between every pair of positions, "
            f"but receives only matching positions. Compute kernels with net.kernel(...), which "
            f"works out which form each layer needs, or build the input kernel with "
            f"input_kernel(..., position_pairs=True)."
        )


class AvgPool1d(_Pool):
    """Average pooling over ``(N, C, L)``; see `AvgPool2d`."""

    ndim = 1


class AvgPool2d(_Pool):
    """Average pooling over windows of ``(N, C, H, W)``, as `torch.nn.AvgPool2d`.

    The kernel at output positions ``(o, o')`` is the mean of the input kernel
    over all pairs of positions of the two windows, so it needs every pair of
    positions (see `Kernel.position_pairs`).

    Args:
        kernel_size: the window, an int or one per axis.
        stride: default the window (non-overlapping).
        padding: ints (zeros, symmetric), ``"valid"`` or ``"same"``.
        count_include_pad: divide by the whole window (True, as torch's default
            and neural-tangents' ``AvgPool``) or by its unpadded positions.
    """

    ndim = 2


class AvgPool3d(_Pool):
    """Average pooling over ``(N, C, D, H, W)``; see `AvgPool2d`."""

    ndim = 3


class SumPool1d(_Pool):
    """Sum pooling over ``(N, C, L)``: `AvgPool1d` without the division."""

    ndim, normalize = 1, False


class SumPool2d(_Pool):
    """Sum pooling over ``(N, C, H, W)``: `AvgPool2d` without the division."""

    ndim, normalize = 2, False


class SumPool3d(_Pool):
    """Sum pooling over ``(N, C, D, H, W)``: `AvgPool3d` without the division."""

    ndim, normalize = 3, False


class PoolModule(nn.Module):
    """The finite twin of average and sum pooling (explicit, possibly uneven, padding)."""

    def __init__(self, kernel_size, stride, pads, normalize: bool,
                 count_include_pad: bool) -> None:
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.pads = tuple(p for pair in reversed(pads) for p in pair)
        self.normalize, self.count_include_pad = normalize, count_include_pad
        self._pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel_size) - 1]

    def _sum(self, x: Tensor) -> Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads)
        return self._pool(x, self.kernel_size, self.stride) * math.prod(self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        total = self._sum(x)
        if not self.normalize:
            return total
        if self.count_include_pad:
            return total / math.prod(self.kernel_size)
        return total / self._sum(torch.ones_like(x[:1, :1]))

    def extra_repr(self) -> str:
        kind = "avg" if self.normalize else "sum"
        return f"{kind}, kernel_size={self.kernel_size}, stride={self.stride}"


class GlobalAvgPool(Layer):
    """The mean over all spatial positions: ``(N, C, *S)`` to ``(N, C)``.

    Its kernel is the mean of the incoming kernel over all pairs of positions.
    """

    normalize = True

    def needs_position_pairs(self) -> bool:
        return True

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        ns = len(k.spatial_shape)
        if ns == 0:
            raise ValueError(f"{self!r} pools over spatial axes but receives dense features "
                             f"{k.shape}; inputs are (N, C, *spatial).")
        _require_pairs(k, self)
        reduce = torch.mean if self.normalize else torch.sum

        def pool(t: Tensor, batch: int) -> Tensor:
            return reduce(t, dim=tuple(range(batch, t.ndim)))

        b = 1 if k.diagonal else 2
        nngp = pool(k.nngp, b)
        cov1, cov2 = k.self_covariances(lambda c: pool(c, 1), diagonal_result=nngp)
        ntk = (torch.zeros((), dtype=nngp.dtype, device=nngp.device).expand(nngp.shape)
               if k.is_input else pool(k.ntk, b))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape=(k.shape[0],),
                         position_pairs=False)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        if not shape or isinstance(shape[0], tuple) or len(shape) < 2:
            raise ValueError(f"{self!r} takes (N, C, *spatial) inputs, got per-example shape "
                             f"{shape}.")
        return _GlobalPoolModule(self.normalize), (shape[0],)


class GlobalSumPool(GlobalAvgPool):
    """The sum over all spatial positions: ``(N, C, *S)`` to ``(N, C)``."""

    normalize = False


class _GlobalPoolModule(nn.Module):
    def __init__(self, normalize: bool) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(2, x.ndim))
        return x.mean(dims) if self.normalize else x.sum(dims)

    def extra_repr(self) -> str:
        return "mean" if self.normalize else "sum"

"""Pooling over 1, 2 or 3 spatial axes, channels first: average and sum pooling
over windows, and global pooling over all positions.

Pooling's kernel at output positions ``(o, o')`` is the mean (or sum) of the
incoming kernel over all pairs of positions of the two windows, so it needs
the kernel between every pair of positions (`Kernel.position_pairs`).

Masks (``kernel(..., mask=)``, neural-tangents' semantics; see `_masks`): window
pooling treats absent positions as zeros and divides by the window as without
masks (neural-tangents' ``AvgPool``); an output position is present where its
window's centre is. Global pooling averages over present positions only (the
mean over present pairs of positions, neural-tangents' ``GlobalAvgPool``), or
sums (absent positions are zeros).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._side import SideModule
from ..kernel import Kernel, position_diagonal
from ._masks import present_counts, window_mask
from ._spatial import (
    Axis,
    Spatial,
    int_tuple,
    padding_spec,
    require_pairs,
    same_ints,
    shifted_sum,
)
from .base import BuildContext, Kernels, Layer, Shapes, single
from .normalization import ShapeChecked

__all__ = [
    "AvgPool1d", "AvgPool2d", "AvgPool3d", "SumPool1d", "SumPool2d", "SumPool3d",
    "GlobalAvgPool", "GlobalSumPool", "PoolModule",
]


class _Pool(Spatial):
    """Average or sum pooling over ``ndim`` spatial axes (see `AvgPool2d`)."""

    normalize = True
    honours_masks = True

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: Literal["valid", "same"] | int | Sequence[int] = 0,
        *,
        count_include_pad: bool = True,
    ) -> None:
        name = type(self).__name__
        self.kernel_size = int_tuple(kernel_size, self.ndim, "kernel_size", name)
        self.stride = self.kernel_size if stride is None else int_tuple(stride, self.ndim,
                                                                     "stride", name)
        self.dilation = (1,) * self.ndim
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"{name}: padding must be 'valid', 'same' or ints, got "
                                 f"{padding!r}.")
            self.padding = padding
        else:
            self.padding = int_tuple(padding, self.ndim, "padding", name, minimum=0)
            if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
                raise ValueError(
                    f"{name}: padding {self.padding} is more than half of kernel_size "
                    f"{self.kernel_size}, so some windows would hold only padding (torch's "
                    f"pooling refuses this too); use padding <= kernel_size // 2."
                )
        self.mode = "zeros"
        self.count_include_pad = bool(count_include_pad)

    @classmethod
    def from_torch_module(cls, module, ctx):
        if module.ceil_mode:
            raise ctx.fail(
                "ceil_mode=True keeps partial windows at the edge, which nk.AvgPool does "
                "not model; use ceil_mode=False (with padding if needed)")
        if getattr(module, "divisor_override", None):
            raise ctx.fail(
                f"divisor_override={module.divisor_override} divides by a constant other than "
                f"the window; drop it (or use nk.SumPool and scale the weights)")
        stride = module.stride if module.stride not in (None, (), []) else None
        return cls(module.kernel_size, stride, module.padding,
                   count_include_pad=module.count_include_pad)

    def spec_call(self):
        kw: dict = {}
        if tuple(self.stride) != tuple(self.kernel_size):
            kw["stride"] = same_ints(self.stride)
        padding_spec(self.padding, kw)
        if not self.count_include_pad:
            kw["count_include_pad"] = False
        return type(self).spec_names[0], [same_ints(self.kernel_size)], kw

    def needs_position_pairs(self) -> bool:
        return True

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"})

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        spatial = self._spatial(k.shape)
        require_pairs(k, self)
        axes = self._axes(spatial)

        def pool(t: Tensor, batch: int) -> Tensor:
            for i, ax in enumerate(axes):
                for dim in (batch + i, batch + len(axes) + i):
                    t = shifted_sum(t, ax, (dim,))
                    if self.normalize:
                        t = t.div_(self._norm(ax, t, dim))
            return t

        b = 1 if k.diagonal else 2
        nngp = pool(k.nngp, b)
        cov1, cov2 = k.self_covariances(lambda c: pool(c, 1), lambda c: position_diagonal(c, 1),
                                        diagonal_result=nngp)
        ntk = (torch.zeros((), dtype=nngp.dtype, device=nngp.device).expand(nngp.shape)
               if k.is_input else pool(k.ntk, b))
        out = k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2,
                        shape=(k.shape[0],) + tuple(ax.m for ax in axes))
        pair = k.side_pair("mask")
        if pair is not None:  # present where the window's centre is
            m1 = window_mask(pair[0], axes)
            m2 = m1 if pair[1] is pair[0] else window_mask(pair[1], axes)
            out = out.with_side("mask", (m1, m2))
        return out

    def _norm(self, ax: Axis, t: Tensor, dim: int):
        if self.count_include_pad:
            return float(ax.size)
        shape = [1] * t.ndim
        shape[dim] = ax.m
        return ax.counts().to(dtype=t.dtype, device=t.device).reshape(shape)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        axes = self._axes(self._spatial(shape))
        module = PoolModule(self.kernel_size, self.stride, [(ax.before, ax.after) for ax in axes],
                            self.normalize, self.count_include_pad)
        module.axes = axes
        return module, (shape[0],) + tuple(ax.m for ax in axes)

    def __repr__(self) -> str:
        k = self.kernel_size if len(set(self.kernel_size)) > 1 else self.kernel_size[0]
        extra = "" if self.stride == self.kernel_size else f", stride={self.stride}"
        if self.padding not in (0, (0,) * self.ndim):
            extra += f", padding={self.padding!r}"
        if not self.count_include_pad:
            extra += ", count_include_pad=False"
        return f"{type(self).__name__}({k}{extra})"


class AvgPool1d(_Pool):
    """Average pooling over ``(N, C, L)``; see `AvgPool2d`."""

    ndim = 1
    spec_names = ("avgpool1d",)
    torch_modules = (nn.AvgPool1d,)


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

    Masks (``kernel(..., mask=)``): absent positions count as zeros in the
    window's mean (the divisor is unchanged, as neural-tangents' ``AvgPool``);
    an output position is present where its window's centre is.
    """

    ndim = 2
    spec_names = ("avgpool2d",)
    torch_modules = (nn.AvgPool2d,)


class AvgPool3d(_Pool):
    """Average pooling over ``(N, C, D, H, W)``; see `AvgPool2d`."""

    ndim = 3
    spec_names = ("avgpool3d",)
    torch_modules = (nn.AvgPool3d,)


class SumPool1d(_Pool):
    """Sum pooling over ``(N, C, L)``: `AvgPool1d` without the division."""

    ndim, normalize = 1, False
    spec_names = ("sumpool1d",)


class SumPool2d(_Pool):
    """Sum pooling over ``(N, C, H, W)``: `AvgPool2d` without the division."""

    ndim, normalize = 2, False
    spec_names = ("sumpool2d",)


class SumPool3d(_Pool):
    """Sum pooling over ``(N, C, D, H, W)``: `AvgPool3d` without the division."""

    ndim, normalize = 3, False
    spec_names = ("sumpool3d",)


class PoolModule(SideModule):
    """The finite twin of average and sum pooling (explicit, possibly uneven, padding).

    With a mask (``model(x, mask=m)``, or the network's side dict) it writes the
    mask of its output, present where a window's centre is (see `_masks`).
    """

    def __init__(self, kernel_size, stride, pads, normalize: bool,
                 count_include_pad: bool) -> None:
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.pads = tuple(p for pair in reversed(pads) for p in pair)
        self.normalize, self.count_include_pad = normalize, count_include_pad
        self._pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel_size) - 1]
        self.axes = None  # the `Axis` of each spatial axis, for the output mask

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        out = self._forward(x)
        if "mask" in side:
            side["mask"] = window_mask(side["mask"], self.axes)
        return out

    def _sum(self, x: Tensor) -> Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads)
        return self._pool(x, self.kernel_size, self.stride) * math.prod(self.kernel_size)

    def _forward(self, x: Tensor) -> Tensor:
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

    Masks (``kernel(..., mask=)``): the mean over present positions only, so the
    kernel is the sum over present pairs divided by ``n1 n2``, the numbers of
    present positions of the two inputs (neural-tangents' ``GlobalAvgPool``,
    ``mean_and_var`` with the mask). The mask ends here (the output is dense).
    """

    normalize = True
    honours_masks = True
    spec_names = ("globalavgpool",)
    torch_modules = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)

    @classmethod
    def from_torch_module(cls, module, ctx):
        ndim = 1 + next(i for i, c in enumerate(cls.torch_modules) if isinstance(module, c))
        return torch_global_pool(module.output_size, ctx, ndim=ndim)

    def needs_position_pairs(self) -> bool:
        return True

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"})

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        ns = len(k.spatial_shape)
        if ns == 0:
            raise ValueError(f"{self!r} pools over spatial axes but receives dense features "
                             f"{k.shape}; inputs are (N, C, *spatial).")
        require_pairs(k, self)
        pair = k.side_pair("mask")
        # With a mask: sums over present pairs, divided by the pairs' counts below.
        reduce = torch.mean if self.normalize and pair is None else torch.sum

        def pool(t: Tensor, batch: int) -> Tensor:
            return reduce(t, dim=tuple(range(batch, t.ndim)))

        b = 1 if k.diagonal else 2
        nngp = pool(k.nngp, b)
        cov1, cov2 = k.self_covariances(lambda c: pool(c, 1), diagonal_result=nngp)
        ntk = (torch.zeros((), dtype=nngp.dtype, device=nngp.device).expand(nngp.shape)
               if k.is_input else pool(k.ntk, b))
        if pair is not None and self.normalize:
            n1 = present_counts(pair[0]).to(nngp.dtype)
            n2 = n1 if pair[1] is pair[0] else present_counts(pair[1]).to(nngp.dtype)
            same = cov2 is cov1
            cov1 = cov1 / (n1 * n1)
            cov2 = cov1 if same else cov2 / (n2 * n2)
            pairs = n1 * n1 if k.diagonal else n1[:, None] * n2[None, :]
            nngp, ntk = (cov1, ntk / pairs) if k.diagonal else (nngp / pairs, ntk / pairs)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape=(k.shape[0],),
                         position_pairs=False).with_side("mask", None)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        if not shape or isinstance(shape[0], tuple) or len(shape) < 2:
            raise ValueError(f"{self!r} takes (N, C, *spatial) inputs, got per-example shape "
                             f"{shape}.")
        return _GlobalPoolModule(self.normalize), (shape[0],)


class GlobalSumPool(GlobalAvgPool):
    """The sum over all spatial positions: ``(N, C, *S)`` to ``(N, C)``."""

    normalize = False
    spec_names = ("globalsumpool",)


class _GlobalPoolModule(SideModule):
    """Global average (over present positions, with a mask) or sum pooling."""

    def __init__(self, normalize: bool) -> None:
        super().__init__()
        self.normalize = normalize

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        dims = tuple(range(2, x.ndim))
        mask = side.pop("mask", None)
        if mask is None:
            return x.mean(dims) if self.normalize else x.sum(dims)
        total = (x * mask.unsqueeze(1).to(x.dtype)).sum(dims)
        if not self.normalize:
            return total
        return total / present_counts(mask).to(x.dtype).unsqueeze(1)

    def extra_repr(self) -> str:
        return "mean" if self.normalize else "sum"


def torch_global_pool(output_size, ctx, ndim: int | None = None) -> GlobalAvgPool:
    """The twin of torch's adaptive average pooling to ``output_size``: global average
    pooling when that size is 1 (an error through ``ctx.fail`` otherwise)."""
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
    if ndim is not None and len(sizes) == 1:
        sizes = tuple(sizes) * ndim
    if not sizes or any(s != 1 for s in sizes):
        raise ctx.fail(
            f"adaptive average pooling to output size {output_size!r}: only output size 1 "
            f"(global average pooling, nk.GlobalAvgPool) is converted; for other sizes use "
            f"nn.AvgPool with an explicit kernel_size and stride", supported=False)
    return TorchGlobalAvgPool(ctx.where, ndim=ndim)


class TorchGlobalAvgPool(ShapeChecked, GlobalAvgPool):
    """`GlobalAvgPool` that checks it pools exactly the spatial axes the torch model did
    (``ndim`` of them, or the dims of a ``mean``); made by `from_torch`."""

    def __init__(self, where: str, *, ndim: int | None = None, dims: tuple | None = None):
        self.where, self.ndim, self.dims = where, ndim, dims

    def _check(self, shape) -> None:
        if not shape or isinstance(shape[0], tuple):
            return  # the parent's message
        rank = len(shape) + 1  # with the batch axis
        spatial = set(range(2, rank))
        if self.ndim is not None and len(shape) - 1 != self.ndim:
            raise ValueError(
                f"{self.where} pools {self.ndim} spatial axes, but receives per-example shape "
                f"{tuple(shape)} with {len(shape) - 1}."
            )
        if self.dims is not None:
            dims = {d % rank if -rank <= d < rank else None for d in self.dims}
            if dims != spatial or not spatial:
                raise ValueError(
                    f"{self.where} averages over dims {self.dims} of inputs with per-example "
                    f"shape {tuple(shape)}; only the mean over all spatial axes "
                    f"{tuple(sorted(spatial))} (global average pooling) has a twin."
                )

    def __repr__(self) -> str:
        return "GlobalAvgPool()"

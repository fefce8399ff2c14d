"""What convolutions and pooling share: the map of one spatial axis through a
window (`Axis`), shifted sums over taps, and the checks of ``(N, C, *S)`` inputs.

With weights drawn independently per tap, a convolution's kernel between
position ``p`` of ``x1`` and ``p'`` of ``x2`` averages the incoming kernel over
the pairs ``(p + d, p' + d)`` that share a tap ``d``; pooling averages over all
pairs of its windows. Both act on each spatial axis separately, so a layer is
a sequence of cheap shifted sums along one axis (pooling) or one pair of axes
(convolution), never a dense operator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import is_int
from ..kernel import Kernel
from .base import Layer, Shapes

__all__ = ["Axis", "Spatial", "int_tuple", "padding_spec", "require_pairs", "same_ints",
           "shifted_sum"]


def int_tuple(value, n: int, name: str, owner: str, minimum: int = 1) -> tuple[int, ...]:
    values = (value,) * n if is_int(value) else value
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if (values is None or len(values) != n or not all(is_int(v) for v in values)
            or any(v < minimum for v in values)):
        raise ValueError(
            f"{owner}: {name} must be an int >= {minimum} or a tuple of {n} of them, "
            f"got {value!r}."
        )
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class Axis:
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


def shifted_sum(t: Tensor, ax: Axis, dims: tuple[int, ...]) -> Tensor:
    """``sum_d t[.., s o + δ d, .., s o' + δ d, ..]`` over the axes ``dims`` (padded)."""
    if ax.mode != "zeros":
        for dim in dims:
            t = ax.pad(t, dim)
        ax = Axis(t.shape[dims[0]], 0, 0, ax.size, ax.stride, ax.dilation, "zeros")
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


class Spatial(Layer):
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

    def _axes(self, spatial: tuple[int, ...]) -> list[Axis]:
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
            ax = Axis(n, before, after, size, stride, dil, self.mode)
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


def require_pairs(k: Kernel, layer: Layer) -> None:
    if not k.position_pairs:
        raise ValueError(
            f"{layer!r} mixes positions and needs the kernel between every pair of positions, "
            f"but receives only matching positions. Compute kernels with net.kernel(...), which "
            f"works out which form each layer needs, or build the input kernel with "
            f"input_kernel(..., position_pairs=True)."
        )


def same_ints(v: tuple) -> Any:
    """An int for a tuple of equal ints (``(3, 3)`` -> ``3``), for spec strings."""
    return v[0] if len(set(v)) == 1 else tuple(v)


def padding_spec(pad, kw: dict) -> None:
    """Adds ``padding=`` to spec keywords unless it is the default (``"valid"`` or zeros)."""
    if isinstance(pad, str):
        if pad != "valid":
            kw["padding"] = pad
    elif any(p != 0 for p in pad):
        kw["padding"] = same_ints(pad)

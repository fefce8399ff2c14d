"""Transposed convolutions over 1, 2 or 3 spatial axes, channels first.

A transposed convolution (`torch.nn.ConvTranspose2d`) is a linear map of the
input's positions: input position ``i`` reaches output position
``o = s i - p + δ d`` through tap ``d``, with one i.i.d. weight per tap. Its
kernel at output positions ``(o, o')`` is therefore (neural-tangents'
``stax.ConvTranspose``, Novak et al. 2019, "Bayesian Deep Convolutional
Networks with Many Channels are Gaussian Processes", eq. of the Conv kernel
with the transposed position map)::

    K'(o, o') = w_std^2 / prod(kernel_size) * sum_d K(i_d(o), i_d(o')) + b_std^2

summing over taps ``d`` for which both ``o`` and ``o'`` are fed by an input
position ``i_d`` (``s i_d = o + p - δ d``); the NTK adds ``K'`` to the same
map of the incoming NTK, as for `Conv2d`. The map acts on each spatial axis
separately (taps are a product over axes), so it is applied axis by axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..kernel import Kernel
from ._affine import ScaledAffine, affine_repr_parts, check_b_init, split_bias_variance
from ._spatial import Spatial, int_tuple, same_ints
from .base import BuildContext, Kernels, Shapes, affine_variances, number, single
from .linear import BInit, Parameterization, affine_spec, uninitialised

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "NTKConvTranspose"]


def _scatter_taps(t: Tensor, dims: tuple[int, ...], tap: tuple[int, ...]) -> Tensor:
    """``out[.., o, .., o', ..] = sum_d t[.., i, .., i', ..]`` over the taps ``d`` that
    take input ``i`` to output ``o = s i - lo + δ d`` and ``i'`` to ``o'`` on every
    axis of ``dims`` (one tap for all of them: the same weight).

    Each tap adds one strided block of ``t`` into a zero output, so the cost is a few
    passes over the output instead of a matrix product with the (sparse) tap maps.

    Args:
        t: any tensor whose axes ``dims`` hold ``n`` input positions each.
        dims: the axes mapped together (one, or a pair of position axes).
        tap: ``(n, m, size, stride, lo, dilation)`` of the spatial axis.
    """
    n, m, size, stride, lo, dilation = tap
    shape = list(t.shape)
    for dim in dims:
        shape[dim] = m
    out = t.new_zeros(shape)
    for d in range(size):
        first = dilation * d - lo  # the output of input 0
        i0 = max(0, -(first // stride))
        i1 = min(n, (m - 1 - first) // stride + 1) if m - 1 >= first else 0
        if i1 <= i0:
            continue
        o0 = first + stride * i0
        dst = slice(o0, o0 + stride * (i1 - i0 - 1) + 1, stride)
        out[tuple(dst if a in dims else slice(None) for a in range(t.ndim))] += t[
            tuple(slice(i0, i1) if a in dims else slice(None) for a in range(t.ndim))]
    return out


def _map_pairs(t: Tensor, taps: list[tuple[int, ...]], batch: int) -> Tensor:
    """``sum_d A_d t A_d^T`` on each spatial axis's pair of dims of ``t``
    (laid out ``(*batch, *S, *S)``), with ``A_d[o, i] = 1`` where tap ``d`` takes
    input ``i`` to output ``o``."""
    nd = len(taps)
    for ax, tap in enumerate(taps):
        t = _scatter_taps(t, (batch + ax, batch + nd + ax), tap)
    return t


def _map_positions(t: Tensor, taps: list[tuple[int, ...]], batch: int) -> Tensor:
    """The same map at matching positions: ``t`` laid out ``(*batch, *S)``.

    Both sides of ``K(i_d(o), i_d(o'))`` use the same tap ``d``, so at ``o = o'`` only
    the input's matching positions enter: ``K'(o, o) = sum_d K(i_d(o), i_d(o))``, on
    each axis ``(sum_d A_d) diag(K)``."""
    for ax, tap in enumerate(taps):
        t = _scatter_taps(t, (batch + ax,), tap)
    return t


class _ConvTranspose(Spatial):
    """A transposed convolution of any width over ``ndim`` spatial axes (see
    `ConvTranspose2d`)."""

    def __init__(
        self,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: Literal["valid", "same"] | int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        w_std: float | Tensor = 1.0,
        b_std: float | Tensor | None = 0.0,
        *,
        parameterization: Parameterization = "ntk",
        in_channels: int | None = None,
        b_init: BInit = "normal",
    ) -> None:
        from .linear import Linear

        name = type(self).__name__
        checked = Linear(out_channels, w_std, b_std, parameterization=parameterization,
                         in_features=in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int_tuple(kernel_size, self.ndim, "kernel_size", name)
        self.stride = int_tuple(stride, self.ndim, "stride", name)
        self.dilation = int_tuple(dilation, self.ndim, "dilation", name)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"{name}: padding must be 'valid', 'same' or ints, got "
                                 f"{padding!r}.")
            self.padding = padding
        else:
            self.padding = int_tuple(padding, self.ndim, "padding", name, minimum=0)
        self.output_padding = int_tuple(output_padding, self.ndim, "output_padding", name,
                                        minimum=0)
        if isinstance(padding, str) and any(self.output_padding):
            raise ValueError(f"{name}: output_padding applies to int padding only; "
                             f"padding={padding!r} sets the output size itself.")
        for op, s, dil in zip(self.output_padding, self.stride, self.dilation):
            if op >= max(s, dil):
                raise ValueError(f"{name}: output_padding must be smaller than stride or "
                                 f"dilation (as torch.nn.ConvTranspose), got "
                                 f"{self.output_padding}.")
        self.w_std, self.b_std = checked.w_std, checked.b_std
        self.b_init = check_b_init(b_init, b_std, name)
        self.parameterization = parameterization
        self.in_channels = None if in_channels is None else int(in_channels)

    @classmethod
    def from_torch_module(cls, module, ctx):
        if getattr(module, "has_uninitialized_params", lambda: False)():
            raise uninitialised(ctx)
        if module.groups != 1:
            raise ctx.fail(f"a grouped transposed convolution (groups={module.groups}) has no "
                           f"kernel rule in ntkit. Use groups=1")
        if module.padding_mode != "zeros":
            raise ctx.fail(f"padding_mode={module.padding_mode!r}: transposed convolutions "
                           f"take zero padding only")
        taps = math.prod(module.kernel_size)
        # torch draws the weight (in, out, *k) with fan_in = out_channels * taps; ntkit's
        # fan_in is in_channels * taps, so the default w_std is sqrt(in / (3 out)).
        w_std = (ctx.w_std if ctx.w_std is not None
                 else math.sqrt(module.in_channels / (3 * module.out_channels)))
        return cls(module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                   tuple(module.padding), tuple(module.output_padding), tuple(module.dilation),
                   w_std, ctx.bias_std(module.bias is not None, module.out_channels * taps),
                   parameterization=ctx.parameterization, in_channels=module.in_channels)

    def spec_call(self):
        kw: dict = {}
        if any(s != 1 for s in self.stride):
            kw["stride"] = same_ints(self.stride)
        if isinstance(self.padding, str):
            kw["padding"] = self.padding
        elif any(p != 0 for p in self.padding):
            kw["padding"] = same_ints(self.padding)
        if any(p != 0 for p in self.output_padding):
            kw["output_padding"] = same_ints(self.output_padding)
        if any(d != 1 for d in self.dilation):
            kw["dilation"] = same_ints(self.dilation)
        kw.update(affine_spec(self))
        if self.in_channels is not None:
            kw["in_channels"] = self.in_channels
        return type(self).spec_names[0], [self.out_channels, same_ints(self.kernel_size)], kw

    def needs_position_pairs(self) -> bool:
        return False  # matching positions map from matching positions (`_map_positions`)

    def _geometry(self, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
        """Per axis ``(m, lo)``: output size and the crop before (output ``o`` is
        position ``o + lo`` of the uncropped transposed convolution).

        Int padding ``p``: torch's (``lo = p``). ``"valid"`` / ``"same"``: JAX's
        ``lax.conv_transpose`` as neural-tangents uses it (``_conv_transpose_padding``),
        sizes ``n s + max(k_eff - s, 0)`` and ``n s``."""
        out = []
        for i, n in enumerate(spatial):
            s = self.stride[i]
            ke = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            if self.padding == "valid":
                m, lo = n * s + max(ke - s, 0), 0
            elif self.padding == "same":
                pad_a = ke - 1 if s > ke - 1 else math.ceil((ke + s - 2) / 2)
                m, lo = n * s, ke - 1 - pad_a
            else:
                lo = self.padding[i]
                m = (n - 1) * s - 2 * lo + ke + self.output_padding[i]
            if m < 1:
                raise ValueError(f"{self!r}: padding {self.padding[i]} leaves no output "
                                 f"positions along spatial axis {i} (input size {n}); use "
                                 f"smaller padding.")
            out.append((m, lo))
        return out

    def _out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(m for m, _ in self._geometry(spatial))

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
        geometry = self._geometry(spatial)
        out = tuple(m for m, _ in geometry)
        maps = [(n, m, self.kernel_size[i], self.stride[i], lo, self.dilation[i])
                for i, (n, (m, lo)) in enumerate(zip(spatial, geometry))]
        taps = math.prod(self.kernel_size)
        fan_in = k.shape[0] * taps
        b = 1 if k.diagonal else 2
        w2, b2 = affine_variances(self.w_std, self.b_std, k.nngp)
        b2, trained_b2 = split_bias_variance(b2, self.b_init)
        scale = w2 / taps

        def affine(t: Tensor) -> Tensor:  # one pass: b^2 + (w^2 / taps) t
            return torch.addcmul(b2, t, scale) if b2 is not None else t * scale

        pairs = k.position_pairs
        spread = _map_pairs if pairs else _map_positions
        nngp_sum = spread(k.nngp, maps, b)
        nngp = affine(nngp_sum)
        if self.parameterization == "standard":  # fan_in mean(K) + w^2 mean(Theta) + 1
            ntk = nngp_sum * (fan_in / taps)
            if not k.is_input:
                ntk = ntk + spread(k.ntk, maps, b) * scale
            if self.b_std is not None:
                ntk = ntk + 1.0
        elif k.is_input:
            ntk = nngp.clone()
        else:
            ntk = nngp + spread(k.ntk, maps, b) * scale
        if trained_b2 is not None and self.parameterization == "ntk":
            ntk = ntk + trained_b2  # the gradient of a bias that starts at zero
        if k.diagonal:
            cov1 = cov2 = nngp
        else:  # per-example covariances (N, *S, *S), or per-position variances (N, *S)
            own = _map_pairs if pairs and k.cov_pairs else _map_positions
            cov1 = affine(own(k.cov1, maps, 1))
            cov2 = cov1 if k.cov2 is k.cov1 else affine(own(k.cov2, maps, 1))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2,
                         shape=(self.out_channels,) + out,
                         is_gaussian=True, is_input=False, inputs=None)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        spatial = self._spatial(shape)
        self._check_channels(shape[0])
        geometry = self._geometry(spatial)
        out = tuple(m for m, _ in geometry)
        # Uncropped transposed convolution, then per axis crop lo before and pad or crop
        # after to m (zeros: those outputs get the bias only).
        crops = [(-lo, m - ((n - 1) * st + dl * (ks - 1) + 1 - lo))
                 for n, (m, lo), st, dl, ks in zip(spatial, geometry, self.stride,
                                                   self.dilation, self.kernel_size)]
        module = NTKConvTranspose(shape[0], self.out_channels, self.kernel_size, self.stride,
                                  crops, self.dilation,
                                  number(self.w_std), number(self.b_std),
                                  self.parameterization, ctx, b_init=self.b_init)
        return module, (self.out_channels,) + out

    def __repr__(self) -> str:
        k = self.kernel_size if len(set(self.kernel_size)) > 1 else self.kernel_size[0]
        parts = [f"{self.out_channels}", f"kernel_size={k}"]
        if set(self.stride) != {1}:
            parts.append(f"stride={self.stride}")
        if isinstance(self.padding, str) or set(self.padding) != {0}:
            parts.append(f"padding={self.padding!r}")
        if set(self.output_padding) != {0}:
            parts.append(f"output_padding={self.output_padding}")
        if set(self.dilation) != {1}:
            parts.append(f"dilation={self.dilation}")
        parts += affine_repr_parts(self)
        if self.in_channels is not None:
            parts.append(f"in_channels={self.in_channels}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ConvTranspose1d(_ConvTranspose):
    """1-d transposed convolution over ``(N, C, L)``; see `ConvTranspose2d`."""

    ndim = 1
    spec_names = ("convtranspose1d",)
    torch_modules = (nn.ConvTranspose1d,)


class ConvTranspose2d(_ConvTranspose):
    """A 2-d transposed convolution of any width over ``(N, C, H, W)``, as
    `torch.nn.ConvTranspose2d` (output size ``(n - 1) s - 2 p + δ (k - 1) +
    output_padding + 1`` per axis).

    Parameterization as `Conv2d` with ``fan_in = in_channels * prod(kernel_size)``
    (neural-tangents' ``stax.ConvTranspose`` convention): in NTK
    parameterization the weight is ``w_std / sqrt(fan_in)`` times a standard
    normal. Kernel: ``w_std^2 / prod(kernel_size)`` times the sum over taps of
    the input kernel at the input positions that feed ``(o, o')`` through that
    tap, plus ``b_std^2`` (module docstring). Both sides use the same tap, so
    matching output positions need only matching input positions: the layer
    works on either form, and needs pairs only when a later layer does (pooling).

    Args:
        out_channels: the width.
        kernel_size, stride, padding, output_padding, dilation: ints or one per
            spatial axis, as `torch.nn.ConvTranspose2d`; or padding ``"valid"``
            (output ``n s + max(k_eff - s, 0)``) or ``"same"`` (output ``n s``) with
            neural-tangents' (JAX ``lax.conv_transpose``'s) meaning.
        w_std, b_std: as `Linear`; ``b_std=None`` for no bias.
        parameterization: ``"ntk"`` or ``"standard"``.
        in_channels: checked against the inputs when given.
        b_init: as `Linear` (``"zero"``: a bias that starts at zero, trained with
            scale ``b_std``).
    """

    ndim = 2
    spec_names = ("convtranspose2d",)
    torch_modules = (nn.ConvTranspose2d,)


class ConvTranspose3d(_ConvTranspose):
    """3-d transposed convolution over ``(N, C, D, H, W)``; see `ConvTranspose2d`."""

    ndim = 3
    spec_names = ("convtranspose3d",)
    torch_modules = (nn.ConvTranspose3d,)


class NTKConvTranspose(ScaledAffine):
    """The finite twin of a transposed convolution: ``F.conv_transpose{1,2,3}d``
    with the weights scaled as the parameterization says."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, crops, dilation,
                 w_std, b_std, parameterization, ctx: BuildContext,
                 b_init: str = "normal") -> None:
        super().__init__()
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        # F.pad lists the last axis first; negative entries crop.
        self.pads = tuple(p for pair in reversed(crops) for p in pair)
        self.init_affine((in_channels, out_channels, *kernel_size), (out_channels,),
                         in_channels * math.prod(kernel_size), w_std, b_std,
                         parameterization, ctx, b_init)
        self._conv = (F.conv_transpose1d, F.conv_transpose2d,
                      F.conv_transpose3d)[len(kernel_size) - 1]

    def forward(self, x: Tensor) -> Tensor:
        bias = self.scaled_bias()
        y = self._conv(x, self.scaled_weight(), None, self.stride, 0, 0, 1, self.dilation)
        if any(self.pads):
            y = F.pad(y, self.pads)
        if bias is not None:
            y = y + bias.reshape(-1, *(1,) * (y.ndim - 2))
        return y

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, {self.weight.shape[1]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
                f"pads={self.pads}, parameterization={self.parameterization!r}")

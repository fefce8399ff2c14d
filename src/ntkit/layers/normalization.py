"""`LayerNorm` over features and `Dropout`."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .._side import SideModule
from ..kernel import Kernel
from ._masks import present_counts
from .base import BuildContext, Kernels, Layer, Shapes, single

__all__ = ["LayerNorm", "Dropout", "DropoutModule", "ChannelLayerNorm", "MaskedGroupNorm"]


class LayerNorm(Layer):
    """Normalises each example's features to zero mean and unit variance.

    In the infinite-width limit the feature mean of zero-mean Gaussian
    features vanishes and their mean square is the variance, so (as in
    neural-tangents' ``stax.LayerNorm``)::

        nngp' = nngp / sqrt((v1 + eps)(v2 + eps)),   ntk' = ntk / sqrt((v1 + eps)(v2 + eps))

    For features with spatial axes ``(C, *S)``, ``axis="channels"`` normalises
    over the channels at each position (``v`` is the per-position variance, as
    a transformer's LayerNorm over a sequence ``(N, C, L)``), and ``axis="all"``
    over channels and positions together (``v`` is the mean over positions;
    ``torch.nn.GroupNorm(1, C)`` without affine). Dense features have only
    channels, so both agree.

    ``affine=True`` adds torch's learnable per-feature scale ``g`` (starting at
    1) and shift ``b`` (starting at 0), ``y = g * z + b`` (``torch.nn.LayerNorm``'s
    ``elementwise_affine``; ``bias=False`` drops the shift). At initialisation
    ``y = z``, so the NNGP is unchanged; each parameter's gradient adds to the
    NTK (their entries are O(1) parameters trained like all others)::

        ntk' = ntk_z + nngp_z + 1        # d y_c / d g_c = z_c,  d y_c / d b_c = 1

    over channels (shared by all positions). With ``axis="all"`` (torch's
    ``normalized_shape`` covering ``(C, *S)``) every position has its own ``g``
    and ``b``, so the two terms appear only between matching positions. The
    scale's term ``z_c(x) z_c(x')`` differs between channels and is correlated
    with the feature: its average over channels is ``nngp_z`` only when the next
    layer that is not linear in each channel sums over channels with fresh
    weights (a Linear, convolution or attention, as in every transformer). A
    nonlinearity reached first would need ``E[z z' f'(z) f'(z')]``, which the
    layer-by-layer recursion cannot express; it refuses (`Kernel.ntk_per_channel`).

    Masks (``kernel(..., mask=)``, neural-tangents' ``LayerNorm``): over channels it
    acts at each position and keeps the mask; with ``axis="all"`` ``v`` is the mean
    over present positions only, and the finite twin's statistics are over them.

    Args:
        axis: ``"channels"`` (default) or ``"all"``.
        eps: added to the variance, as in `torch.nn.LayerNorm` (default 1e-5;
            neural-tangents uses 1e-12).
        affine: a learnable scale and shift, as ``elementwise_affine=True``.
        bias: with ``affine``, whether there is a shift (torch's ``bias``).
    """

    spec_names = ("layernorm",)
    torch_modules = (nn.LayerNorm,)
    honours_masks = True

    def __init__(self, axis: Literal["channels", "all"] = "channels", eps: float = 1e-5, *,
                 affine: bool = False, bias: bool = True) -> None:
        if axis not in ("channels", "all"):
            raise ValueError(f"axis must be 'channels' or 'all', got {axis!r}.")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        for name, value in (("affine", affine), ("bias", bias)):
            if not isinstance(value, bool):
                raise TypeError(f"LayerNorm: {name} must be a bool, got {value!r}.")
        self.axis = axis
        self.eps = float(eps)
        self.affine, self.bias = affine, bias

    @classmethod
    def from_torch_module(cls, module, ctx):
        affine = bool(module.elementwise_affine)  # (at torch's initial 1 and 0)
        return TorchLayerNorm(tuple(module.normalized_shape), module.eps, ctx.where,
                              affine=affine, bias=affine and module.bias is not None)

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"}) if self.axis == "all" else frozenset()

    def spec_call(self):
        kw = {k: v for k, v, d in (("axis", self.axis, "channels"), ("eps", self.eps, 1e-5),
                                   ("affine", self.affine, False), ("bias", self.bias, True))
              if v != d}
        return "layernorm", [], kw

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if not k.is_gaussian:
            where = "the raw inputs" if k.is_input else "the output of a nonlinear layer"
            raise ValueError(
                f"{self!r} receives {where}, whose features do not have zero mean; its kernel "
                f"rule needs zero-mean Gaussian features. Put a Linear before LayerNorm (or a Conv, for images)."
            )
        u1, u2 = k.position_variances()
        if self.axis == "all" and u1.ndim > 1:
            keep = (u1.shape[0],) + (1,) * (u1.ndim - 1)
            mask = k.side_pair("mask")
            if mask is None:
                u1 = u1.reshape(u1.shape[0], -1).mean(1)
                u2 = u2.reshape(u2.shape[0], -1).mean(1)
            else:  # the mean over present positions (absent ones hold zeros)
                u1 = u1.reshape(u1.shape[0], -1).sum(1) / present_counts(mask[0]).to(u1.dtype)
                u2 = u2.reshape(u2.shape[0], -1).sum(1) / present_counts(mask[1]).to(u2.dtype)
            u1 = u1.reshape(keep)
            u2 = u2.reshape((u2.shape[0],) + keep[1:])
        r1 = torch.rsqrt(u1 + self.eps)
        r2 = r1 if k.cov2 is k.cov1 else torch.rsqrt(u2 + self.eps)
        s1, s2 = k.broadcast_pair(r1, r2)
        scale = s1 * s2
        a, b = k.broadcast_self(r1)
        cov1 = k.cov1 * (a * b)
        if k.cov2 is k.cov1:
            cov2 = cov1
        else:
            a, b = k.broadcast_self(r2)
            cov2 = k.cov2 * (a * b)
        if k.diagonal:
            out = k.replace(nngp=cov1, ntk=k.ntk * scale, cov1=cov1, cov2=cov1)
        else:
            out = k.replace(nngp=k.nngp * scale, ntk=k.ntk * scale, cov1=cov1, cov2=cov2)
        return self._affine_terms(out) if self.affine else out

    def _affine_terms(self, k: Kernel) -> Kernel:
        """The scale's and shift's gradients: ``ntk + nngp + 1``, between matching
        positions only when each position has its own (``axis="all"``)."""
        term = k.nngp + 1.0 if self.bias else k.nngp
        if self.axis == "all" and k.position_pairs and k.spatial_shape:
            n_pos = math.prod(k.spatial_shape)
            lead = term.shape[:term.ndim - 2 * len(k.spatial_shape)]
            eye = torch.eye(n_pos, dtype=term.dtype, device=term.device)
            term = (term.reshape(*lead, n_pos, n_pos) * eye).reshape(term.shape)
        return k.replace(ntk=k.ntk + term, ntk_per_channel=True)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        if not shape or isinstance(shape[0], tuple):
            raise ValueError(f"{self!r} takes one input but receives branches {shape}.")
        if len(shape) == 1:
            return nn.LayerNorm(shape[0], eps=self.eps, elementwise_affine=self.affine,
                                bias=self.bias, dtype=ctx.dtype, device=ctx.device), shape
        norm = (MaskedGroupNorm(shape[0], eps=self.eps) if self.axis == "all"
                else ChannelLayerNorm(shape[0], eps=self.eps))
        if not self.affine:
            return norm, shape
        per = tuple(shape) if self.axis == "all" else (shape[0],) + (1,) * (len(shape) - 1)
        return _AffineAfter(norm, per, self.bias, ctx), shape

    def __repr__(self) -> str:
        axis = "" if self.axis == "channels" else "axis='all', "
        extra = "" if not self.affine else (", affine=True" + ("" if self.bias else
                                                                ", bias=False"))
        return f"LayerNorm({axis}eps={self.eps}{extra})"


class _AffineAfter(SideModule):
    """A normalisation followed by a learnable scale (ones) and shift (zeros) of shape
    ``per`` (broadcast over the batch), torch's ``elementwise_affine``."""

    def __init__(self, norm: nn.Module, per: tuple[int, ...], bias: bool,
                 ctx: BuildContext) -> None:
        super().__init__()
        self.norm = norm
        like = {"dtype": ctx.dtype, "device": ctx.device}
        self.weight = nn.Parameter(torch.ones(per, **like))
        self.bias = nn.Parameter(torch.zeros(per, **like)) if bias else None

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        y = self.norm(x, side) if isinstance(self.norm, SideModule) else self.norm(x)
        y = y * self.weight
        return y if self.bias is None else y + self.bias


class ChannelLayerNorm(nn.Module):
    """`torch.nn.LayerNorm` over the channel axis of ``(N, C, *S)`` at each position."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x.movedim(1, -1), (self.channels,),
                                        eps=self.eps).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"


class MaskedGroupNorm(SideModule, nn.GroupNorm):
    """`torch.nn.GroupNorm` with one group and no affine (LayerNorm over ``(C, *S)``),
    whose mean and variance are over the present positions under a mask
    (``model(x, mask=m)``)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__(1, channels, eps=eps, affine=False)

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        mask = side.get("mask")
        if mask is None:
            return nn.GroupNorm.forward(self, x)
        m = mask.unsqueeze(1).to(x.dtype)
        dims = tuple(range(1, x.ndim))
        count = m.sum(dims, keepdim=True) * x.shape[1]
        mean = (x * m).sum(dims, keepdim=True) / count
        var = (((x - mean) * m) ** 2).sum(dims, keepdim=True) / count
        return (x - mean) / torch.sqrt(var + self.eps) * m


class Dropout(Layer):
    """Zeroes each feature with probability ``p`` and scales the rest by ``1/(1-p)``.

    In ``"train"`` mode (the network as trained), masks are independent across
    examples, so the kernel between different examples is unchanged while an
    example paired with itself in the same forward pass gets ``1/(1-p)``
    (neural-tangents' ``stax.Dropout``). That pairing exists only in
    ``net.kernel(x1)`` (``x2=None``): ``cov`` and the diagonal of ``nngp`` and
    ``ntk`` are scaled. In ``"eval"`` mode the layer is the identity.

    Masks (``kernel(..., mask=)``): applied at each position, it keeps the mask.

    Args:
        p: probability of zeroing a feature, in [0, 1).
        mode: ``"train"`` or ``"eval"``, like `torch.nn.Module.train` / ``eval``.
    """

    spec_names = ("dropout",)
    torch_modules = (nn.Dropout,)
    honours_masks = True  # position-wise: keeps the mask

    def __init__(self, p: float = 0.5, mode: Literal["train", "eval"] = "train") -> None:
        if not 0 <= p < 1:
            raise ValueError(f"p must be in [0, 1), got {p}.")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}.")
        self.p = float(p)
        self.mode = mode

    @classmethod
    def from_torch_module(cls, module, ctx):
        return cls(module.p, mode="train" if module.training else "eval")

    def spec_call(self):
        kw = {k: v for k, v, d in (("p", self.p, 0.5), ("mode", self.mode, "train")) if v != d}
        return "dropout", [], kw

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if self.mode == "eval" or self.p == 0:
            return k
        if k.is_input:
            raise ValueError(
                "Dropout on the raw inputs has no infinite-width kernel (the input has "
                "finitely many features); put it after a Linear or an activation."
            )
        factor = 1.0 / (1.0 - self.p)
        cov1 = _scale_self(k, k.cov1, factor)
        cov2 = cov1 if k.cov2 is k.cov1 else _scale_self(k, k.cov2, factor)
        nngp, ntk = k.nngp, k.ntk
        if k.diagonal:
            nngp, ntk = cov1, _scale_pairs(k, ntk, factor)
        elif k.x1_is_x2:
            nngp, ntk = _scale_pairs(k, nngp, factor), _scale_pairs(k, ntk, factor)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        module = DropoutModule(self.p, generator=ctx.generator)
        module.train(self.mode == "train")
        return module, shape

    def __repr__(self) -> str:
        return f"Dropout(p={self.p}, mode={self.mode!r})"


def _scale_self(k: Kernel, cov: Tensor, factor: float) -> Tensor:
    """Per-example covariances with each position's variance scaled."""
    if not (k.position_pairs and k.cov_pairs):
        return cov * factor
    out = cov.clone()
    n, p = cov.shape[0], math.prod(k.spatial_shape)
    out.view(n, p, p).diagonal(0, 1, 2).mul_(factor)
    return out


def _scale_pairs(k: Kernel, t: Tensor, factor: float) -> Tensor:
    """``t`` with the entries pairing an input with itself at one position scaled."""
    out = t.clone()
    k.self_pairs(out).mul_(factor)
    return out


class DropoutModule(nn.Dropout):
    """`torch.nn.Dropout` whose masks come from an explicit generator.

    With ``generator=None`` it is exactly `torch.nn.Dropout`.
    """

    def __init__(self, p: float, generator: torch.Generator | None = None) -> None:
        super().__init__(p)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        keep = torch.rand(x.shape, generator=self.generator, device=self.generator.device,
                          dtype=x.dtype).to(x.device) >= self.p
        return x * keep / (1 - self.p)


class ShapeChecked:
    """Mixin of converted layers: runs ``self._check(shape)`` on the per-example shape
    before the layer's kernel rule and its finite twin (torch's axes are checked)."""

    def propagate(self, k):
        if not isinstance(k, tuple):
            self._check(k.shape)
        return super().propagate(k)

    def _build(self, shape, ctx):
        self._check(shape)
        return super()._build(shape, ctx)


class TorchLayerNorm(ShapeChecked, LayerNorm):
    """`LayerNorm` over the axes `torch.nn.LayerNorm` normalises: the features of dense
    inputs, or all of ``(C, *S)`` (``axis="all"``) when ``normalized_shape`` is all of them."""

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, where: str, *,
                 affine: bool = False, bias: bool = True) -> None:
        super().__init__(axis="channels" if len(normalized_shape) == 1 else "all", eps=eps,
                         affine=affine, bias=bias)
        self.normalized_shape, self.where = normalized_shape, where

    def _check(self, shape) -> None:
        if not shape or isinstance(shape[0], tuple):
            return
        if tuple(shape) != self.normalized_shape:
            raise ValueError(
                f"{self.where} normalises the last {len(self.normalized_shape)} axes, of shape "
                f"{self.normalized_shape}, but receives per-example shape {tuple(shape)}; only "
                f"normalising all of them (normalized_shape = x.shape[1:]) has a kernel rule."
            )

"""Affine layers and reshaping: `Linear`, `Flatten`."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import as_std, is_int
from .._side import SideModule
from ..kernel import Kernel
from ._affine import (
    ScaledAffine,
    affine_repr_parts,
    check_b_init,
    check_parameterization,
    split_bias_variance,
)
from .base import (
    BuildContext,
    Kernels,
    Layer,
    Shapes,
    affine_variances,
    flat_width,
    number,
    single,
)

__all__ = ["Linear", "Flatten", "NTKLinear"]

Parameterization = Literal["ntk", "standard"]
BInit = Literal["normal", "zero"]


class Linear(Layer):
    """A fully-connected layer of any width, in NTK or standard parameterization.

    NTK parameterization (Jacot et al. 2018, eq. 1)::

        y = (w_std / sqrt(fan_in)) W x + b_std b,    W, b ~ N(0, 1)

    standard parameterization (Sohl-Dickstein et al. 2020)::

        y = W x + b,    W ~ N(0, w_std^2 / fan_in),  b ~ N(0, b_std^2)

    Both give the same NNGP, ``w_std^2 K + b_std^2``. The NTK is
    ``nngp' + w_std^2 Theta`` in NTK parameterization and
    ``fan_in K + 1 + w_std^2 Theta`` in standard parameterization, whose NTK
    grows with the widths (the ``1`` is the bias's gradient; ``b_std=None``
    drops the bias). These are neural-tangents' ``stax.Dense`` conventions.

    ``b_init="zero"`` starts the bias at zero and trains it with scale ``b_std``
    (Jacot et al. 2018 and Arora et al. 2019 write the NTK this way; scikit-ntk's
    ``bias``): the bias is absent from the NNGP, ``w_std^2 K``, and its gradient
    adds ``b_std^2`` to the NTK, ``nngp' + w_std^2 Theta + b_std^2`` (NTK
    parameterization; in standard parameterization the bias's gradient adds
    ``1`` as before, and ``b_std`` only says that there is a bias).

    ``w_std`` and ``b_std`` may be real 0-dim tensors: the kernel is then
    differentiable in them (autograd), e.g. to fit them by maximising a
    marginal likelihood. `build` uses their current values as numbers, so the
    finite twin is not differentiable in them.

    Args:
        out_features: the width; used by `build` and by the standard
            parameterization's NTK (the next layer's fan-in).
        w_std: weight standard deviation (times ``sqrt(fan_in)``): a number or
            a 0-dim floating tensor.
        b_std: bias standard deviation, a number or a 0-dim floating tensor;
            ``None`` for no bias parameter.
        parameterization: ``"ntk"`` or ``"standard"``.
        b_init: ``"normal"`` (the bias is drawn, scaled by ``b_std``) or
            ``"zero"`` (it starts at zero and is trained with scale ``b_std``).
        in_features: the expected fan-in, checked against the inputs when given;
            like `torch.nn.LazyLinear`, it is otherwise taken from them.
    """

    spec_names = ("linear", "dense")
    torch_modules = (nn.Linear,)

    def __init__(
        self,
        out_features: int,
        w_std: float | Tensor = 1.0,
        b_std: float | Tensor | None = 0.0,
        *,
        parameterization: Parameterization = "ntk",
        in_features: int | None = None,
        b_init: BInit = "normal",
    ) -> None:
        if not is_int(out_features) or out_features < 1:
            raise ValueError(f"out_features must be a positive int, got {out_features!r}.")
        check_parameterization(parameterization, "Linear")
        w_std = as_std(w_std, "w_std")
        b_std = None if b_std is None else as_std(b_std, "b_std")
        if in_features is not None and (not is_int(in_features) or in_features < 1):
            raise ValueError(
                f"in_features must be a positive int or None (taken from the inputs), got "
                f"{in_features!r}."
            )
        self.out_features = int(out_features)
        self.w_std = w_std
        self.b_std = b_std
        self.parameterization = parameterization
        self.in_features = None if in_features is None else int(in_features)
        self.b_init = check_b_init(b_init, b_std, "Linear")

    @classmethod
    def from_torch_module(cls, module, ctx):
        if getattr(module, "has_uninitialized_params", lambda: False)():
            raise uninitialised(ctx)
        fan_in = module.in_features
        return cls(module.out_features, w_std=ctx.weight_std(),
                   b_std=ctx.bias_std(module.bias is not None, fan_in),
                   parameterization=ctx.parameterization, in_features=fan_in)

    def spec_call(self):
        kw = affine_spec(self)
        if self.in_features is not None:
            kw["in_features"] = self.in_features
        return "linear", [self.out_features], kw

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        fan_in = flat_width(k.shape, self)
        if self.in_features is not None and fan_in != self.in_features:
            raise ValueError(
                f"{self!r} expects {self.in_features} input features but receives {fan_in}; "
                f"pass inputs of shape (N, {self.in_features}) or change in_features."
            )
        w2, b2 = affine_variances(self.w_std, self.b_std, k.nngp)
        b2, trained_b2 = split_bias_variance(b2, self.b_init)
        nngp = _affine(k.nngp, w2, b2)
        if self.parameterization == "ntk":
            ntk = torch.addcmul(nngp, k.ntk, w2)
            if trained_b2 is not None:
                ntk = ntk + trained_b2
        else:
            bias_grad = 0.0 if self.b_std is None else 1.0
            ntk = torch.add(k.ntk * w2, k.nngp, alpha=fan_in) + bias_grad
        return k.replace(
            nngp=nngp, ntk=ntk, cov1=_affine(k.cov1, w2, b2), cov2=_affine(k.cov2, w2, b2),
            shape=(self.out_features,), is_gaussian=True, is_input=False,
        )

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        fan_in = flat_width(shape, self)
        if self.in_features is not None and fan_in != self.in_features:
            raise ValueError(
                f"{self!r} expects {self.in_features} input features but input_shape gives "
                f"{fan_in}."
            )
        module = NTKLinear(fan_in, self.out_features, number(self.w_std), number(self.b_std),
                           self.parameterization, ctx, b_init=self.b_init)
        return module, (self.out_features,)

    def __repr__(self) -> str:
        return f"Linear({', '.join([str(self.out_features), *affine_repr_parts(self)])})"


def affine_spec(layer) -> dict:
    """The spec keywords of an affine layer's ``w_std``, ``b_std``,
    ``parameterization`` and ``b_init`` that differ from their defaults."""
    kw: dict = {}
    if isinstance(layer.w_std, Tensor) or layer.w_std != 1.0:
        kw["w_std"] = layer.w_std
    if layer.b_std is None or isinstance(layer.b_std, Tensor) or layer.b_std != 0.0:
        kw["b_std"] = layer.b_std
    if layer.parameterization != "ntk":
        kw["parameterization"] = layer.parameterization
    if getattr(layer, "b_init", "normal") != "normal":
        kw["b_init"] = layer.b_init
    return kw


def uninitialised(ctx) -> Exception:
    """The conversion error of a lazy torch module that has not seen an input yet."""
    return ctx.fail(
        "it has not been initialised, so its in_features/in_channels is unknown; "
        "run one forward pass on example inputs before from_torch", supported=False)


def _affine(x: Tensor, w2: Tensor, b2: Tensor | None) -> Tensor:
    return x * w2 if b2 is None else x * w2 + b2


class NTKLinear(ScaledAffine):
    """The finite twin of `Linear`: ``weight`` is ``(out, in)`` like `nn.Linear`.

    In NTK parameterization the stored parameters are standard normal and the
    forward pass scales them; in standard parameterization they carry their
    variance and the forward pass is plain ``x W^T + b``.
    """

    def __init__(self, in_features: int, out_features: int, w_std: float,
                 b_std: float | None, parameterization: Parameterization,
                 ctx: BuildContext, b_init: BInit = "normal") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.init_affine((out_features, in_features), (out_features,), in_features, w_std,
                         b_std, parameterization, ctx, b_init)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.scaled_weight(), self.scaled_bias())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"parameterization={self.parameterization!r}")


class Flatten(Layer):
    """Flattens per-example features to ``(N, C * prod(spatial))``.

    Kernel rule: the average of the per-position kernel over positions (for
    inputs with spatial axes, whose kernel keeps the spatial diagonal).

    Masks (``kernel(..., mask=)``): absent positions are zeros, so they add
    zeros to that average, which still divides by all positions (neural-tangents'
    ``Flatten``); the mask ends here (the output is dense).
    """

    spec_names = ("flatten",)
    torch_modules = (nn.Flatten,)
    honours_masks = True

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"})

    @classmethod
    def from_torch_module(cls, module, ctx):
        if module.start_dim != 1 or module.end_dim != -1:
            raise ctx.fail("only nn.Flatten(start_dim=1, end_dim=-1) is supported",
                           supported=False)
        return cls()

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if len(k.shape) == 1:
            return k
        k = k.to_position_diagonal().with_side("mask", None)
        axes_n = tuple(range(1 if k.diagonal else 2, k.nngp.ndim))
        axes_c = tuple(range(1, k.cov1.ndim))
        return k.replace(
            nngp=k.nngp.mean(axes_n), ntk=k.ntk.mean(axes_n),
            cov1=k.cov1.mean(axes_c), cov2=k.cov2.mean(axes_c),
            shape=(math.prod(k.shape),),
        )

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        if shape and isinstance(shape[0], tuple):
            raise ValueError(f"Flatten takes one input but receives branches {shape}.")
        return FlattenModule(), (math.prod(shape),)


class FlattenModule(SideModule, nn.Flatten):
    """`torch.nn.Flatten` that takes masks: ``model(x, mask=m)`` zeroes the absent
    positions of ``x`` first (see `ntkit._side.SideModule`); the mask ends here."""

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        side.pop("mask", None)
        return nn.Flatten.forward(self, x)

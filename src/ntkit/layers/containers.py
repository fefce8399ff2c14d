"""Combinators: `Sequential`, `Parallel`, branching, `Repeat`, `Identity`.

Between a `FanOut` and a fan-in, kernels travel as a tuple, one per branch;
the finite twins pass tuples of tensors the same way.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor, nn

from .._checks import is_int
from .._side import SideModule, call_with_side, mask_input
from ..kernel import Kernel
from .base import (
    BuildContext,
    Kernels,
    Layer,
    Shapes,
    drop_position_pairs,
    propagate_layer,
    single,
)

__all__ = ["Sequential", "Parallel", "FanOut", "FanInSum", "FanInConcat", "FanInProd",
           "Repeat", "Identity"]


def _check_layers(layers: tuple, owner: str) -> tuple[Layer, ...]:
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            hint = " (use nk.from_torch to convert torch modules)" if isinstance(
                layer, nn.Module) else ""
            raise TypeError(
                f"{owner} takes ntkit layers; argument {i} is {type(layer).__name__}{hint}."
            )
    return tuple(layers)


class Sequential(Layer):
    """Layers applied one after another, like `torch.nn.Sequential`."""

    honours_masks = True  # each layer is checked (`propagate_layer`)

    def __init__(self, *layers: Layer) -> None:
        self.layers = _check_layers(layers, "Sequential")

    def propagate(self, k: Kernels) -> Kernels:
        for layer in self.layers:
            k = propagate_layer(layer, k)
        return k

    def needs_position_pairs(self) -> bool:
        return any(layer.needs_position_pairs() for layer in self.layers)

    def side_inputs(self) -> frozenset[str]:
        return frozenset().union(*(layer.side_inputs() for layer in self.layers))

    def _forward(self, k: Kernels) -> Kernels:
        last = max((i for i, layer in enumerate(self.layers) if layer.needs_position_pairs()),
                   default=-1)
        for i, layer in enumerate(self.layers):
            k = propagate_layer(layer, k)
            if i == last:  # no later layer mixes positions: keep matching positions only
                k = drop_position_pairs(k)
        return drop_position_pairs(k)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        modules = []
        for layer in self.layers:
            module, shape = layer._build(shape, ctx)
            if not layer.honours_masks and "mask" not in layer.side_inputs():
                module.refuses_masks = repr(layer)  # SideSequential refuses a mask here
            modules.append(module)
        if any(getattr(m, "takes_side", False) for m in modules):
            return SideSequential(*modules), shape
        return nn.Sequential(*modules), shape

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(*self.layers[i])
        return self.layers[i]

    def __repr__(self) -> str:
        inner = ",\n".join("  " + repr(layer).replace("\n", "\n  ") for layer in self.layers)
        return f"Sequential(\n{inner}\n)"


class Repeat(Sequential):
    """``layer`` applied ``n`` times; `build` draws independent parameters for each."""

    def __init__(self, layer: Layer, n: int) -> None:
        if not is_int(n) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}.")
        n = int(n)
        super().__init__(*([layer] * n))
        self.layer, self.n = layer, n

    def __repr__(self) -> str:
        return f"Repeat({self.layer!r}, {self.n})"


class Identity(Layer):
    """Passes its input through unchanged."""

    spec_names = ("identity",)
    torch_modules = (nn.Identity,)
    honours_masks = True

    @classmethod
    def from_torch_module(cls, module, ctx):
        return cls()

    def propagate(self, k: Kernels) -> Kernels:
        return k

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        return nn.Identity(), shape


class FanOut(Layer):
    """Copies its input into ``n`` branches."""

    honours_masks = True

    def __init__(self, n: int) -> None:
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}.")
        self.n = int(n)

    def propagate(self, k: Kernels) -> tuple[Kernel, ...]:
        return (single(k, self),) * self.n

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        return _FanOutModule(self.n), (shape,) * self.n

    def __repr__(self) -> str:
        return f"FanOut({self.n})"


class Parallel(Layer):
    """Applies the i-th layer to the i-th branch."""

    honours_masks = True  # each layer is checked (`propagate_layer`)

    def __init__(self, *layers: Layer) -> None:
        self.layers = _check_layers(layers, "Parallel")

    def _branches(self, k: Kernels) -> tuple:
        if not isinstance(k, tuple) or len(k) != len(self.layers):
            got = f"{len(k)} branches" if isinstance(k, tuple) else "one input"
            raise ValueError(
                f"Parallel with {len(self.layers)} layers needs {len(self.layers)} branches "
                f"but receives {got}; put FanOut({len(self.layers)}) before it."
            )
        return k

    def propagate(self, k: Kernels) -> tuple[Kernel, ...]:
        return tuple(propagate_layer(layer, b)
                     for layer, b in zip(self.layers, self._branches(k)))

    def needs_position_pairs(self) -> bool:
        return any(layer.needs_position_pairs() for layer in self.layers)

    def side_inputs(self) -> frozenset[str]:
        return frozenset().union(*(layer.side_inputs() for layer in self.layers))

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        built = [layer._build(s, ctx) for layer, s in zip(self.layers, self._branches(shape))]
        modules = [m for m, _ in built]
        cls = (_SideParallelModule if any(getattr(m, "takes_side", False) for m in modules)
               else _ParallelModule)
        return cls(modules), tuple(s for _, s in built)

    def __repr__(self) -> str:
        inner = ",\n".join("  " + repr(layer).replace("\n", "\n  ") for layer in self.layers)
        return f"Parallel(\n{inner}\n)"


def _branches_of(k: Kernels) -> tuple[Kernel, ...]:
    return k if isinstance(k, tuple) else (k,)


def _branch_shapes(shape: Shapes) -> tuple[tuple[int, ...], ...]:
    return shape if shape and isinstance(shape[0], tuple) else (shape,)


class FanInSum(Layer):
    """Sums its branches. Branches are independent given the input, so the
    kernels add: ``nngp = sum_i nngp_i``, ``ntk = sum_i ntk_i``."""

    honours_masks = True

    def propagate(self, k: Kernels) -> Kernel:
        ks = _branches_of(k)
        _same_shapes([b.shape for b in ks], self)
        return ks[0].replace(
            nngp=_sum(b.nngp for b in ks), ntk=_sum(b.ntk for b in ks),
            cov1=_sum(b.cov1 for b in ks), cov2=_sum(b.cov2 for b in ks),
            is_gaussian=all(b.is_gaussian for b in ks), is_input=False,
            ntk_per_channel=any(b.ntk_per_channel for b in ks),
        )

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        shapes = _branch_shapes(shape)
        _same_shapes(shapes, self)
        return _FanInModule("sum"), shapes[0]


class FanInProd(Layer):
    """Multiplies its branches elementwise. For independent branches
    ``nngp = prod_i nngp_i`` and, by the product rule,
    ``ntk = sum_i ntk_i prod_(j != i) nngp_j``."""

    honours_masks = True

    def propagate(self, k: Kernels) -> Kernel:
        ks = _branches_of(k)
        _same_shapes([b.shape for b in ks], self)
        if len(ks) == 1:
            return ks[0]
        ntk = _sum(
            _prod(b.ntk if j == i else b.nngp for j, b in enumerate(ks)) for i in range(len(ks))
        )
        return ks[0].replace(
            nngp=_prod(b.nngp for b in ks), ntk=ntk, cov1=_prod(b.cov1 for b in ks),
            cov2=_prod(b.cov2 for b in ks), is_gaussian=False, is_input=False,
            ntk_per_channel=any(b.ntk_per_channel for b in ks),
        )

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        shapes = _branch_shapes(shape)
        _same_shapes(shapes, self)
        return _FanInModule("prod"), shapes[0]


class FanInConcat(Layer):
    """Concatenates its branches along the feature (channel) axis.

    A later layer sees each branch in proportion to its width, so the kernel is
    the width-weighted mean ``sum_i n_i k_i / sum_i n_i``.
    """

    honours_masks = True

    def propagate(self, k: Kernels) -> Kernel:
        ks = _branches_of(k)
        _same_shapes([b.shape[1:] for b in ks], self, what="spatial shapes")
        widths = [b.shape[0] for b in ks]
        total = sum(widths)

        def mix(field: str) -> Tensor:
            return _sum(getattr(b, field) * (w / total) for b, w in zip(ks, widths))

        return ks[0].replace(
            nngp=mix("nngp"), ntk=mix("ntk"), cov1=mix("cov1"), cov2=mix("cov2"),
            shape=(total,) + tuple(ks[0].shape[1:]),
            is_gaussian=all(b.is_gaussian for b in ks), is_input=False,
            ntk_per_channel=any(b.ntk_per_channel for b in ks),
        )

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        shapes = _branch_shapes(shape)
        _same_shapes([s[1:] for s in shapes], self, what="spatial shapes")
        return _FanInModule("concat"), (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])


def _sum(items) -> Tensor:
    return functools.reduce(operator.add, items)


def _prod(items) -> Tensor:
    return functools.reduce(operator.mul, items)


def _same_shapes(shapes, layer: Layer, what: str = "shapes") -> None:
    shapes = [tuple(s) for s in shapes]
    if len(set(shapes)) > 1:
        raise ValueError(
            f"{type(layer).__name__} needs branches of equal {what}, got {shapes}; give the "
            f"branches' last Linear layers the same out_features."
        )


class _FanOutModule(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,) * self.n


class _ParallelModule(nn.ModuleList):
    def forward(self, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(m(x) for m, x in zip(self, xs))


class _SideParallelModule(SideModule):
    """`_ParallelModule` for branches that read side inputs: each branch works on
    its own copy of the side dict; the first branch's copy continues (as the
    kernel's first branch does through FanIn)."""

    def __init__(self, modules) -> None:
        super().__init__()
        self.branches = nn.ModuleList(modules)

    def forward_side(self, xs, side: dict):
        outs, sides = [], []
        for m, x in zip(self.branches, xs):
            s = dict(side)
            outs.append(call_with_side(m, x, s))
            sides.append(s)
        side.update(sides[0])
        return tuple(outs)


class SideSequential(nn.Sequential, SideModule):
    """`torch.nn.Sequential` that hands its side inputs (masks, adjacency patterns)
    to the modules that read them: ``model(x, mask=m)`` or ``model(x, pattern=p)``
    (see `ntkit._side.SideModule`)."""

    takes_side = True

    def forward(self, x, side: dict | None = None, **side_inputs):
        return SideModule.forward(self, x, side, **side_inputs)

    def forward_side(self, x, side: dict):
        for module in self:
            if "mask" in side and getattr(module, "refuses_masks", None):
                raise ValueError(
                    f"{module.refuses_masks} does not honour masks (model(x, mask=m) marks the "
                    f"present positions of variable-length inputs); drop mask= or replace "
                    f"that layer (see ntkit.layers._masks).")
            x = call_with_side(module, x, side)
            if "mask" in side:  # absent positions are zeros after every layer, as in the kernel
                x = _zero_absent_outputs(x, side["mask"])
        return x


def _zero_absent_outputs(x, mask: Tensor):
    """``x`` (or each branch of it) with the positions absent under ``mask`` zeroed, when its
    spatial shape is the mask's (dense features and other shapes pass unchanged)."""
    if isinstance(x, tuple):
        return tuple(_zero_absent_outputs(b, mask) for b in x)
    if isinstance(x, Tensor) and x.ndim > 2 and x.shape[2:] == mask.shape[1:]:
        return mask_input(x, mask)
    return x


class _FanInModule(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, xs) -> Tensor:
        if isinstance(xs, Tensor):
            return xs
        if self.how == "sum":
            return _sum(xs)
        if self.how == "prod":
            return _prod(xs)
        return torch.cat(list(xs), dim=1)

    def extra_repr(self) -> str:
        return self.how

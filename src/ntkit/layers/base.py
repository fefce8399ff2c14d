"""The layer protocol: a kernel rule and a finite-width twin in one object."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
from torch import Tensor, nn

from .._checks import as_input_pair
from .._side import check_side_inputs
from ..kernel import Kernel, input_kernel  # input_kernel: re-exported from its home
from ..tiling import tiled_kernel
from ._masks import has_mask, refuse_mask, zero_absent
from .registry import TorchContext, register

__all__ = [
    "BuildContext",
    "Kernels",
    "Layer",
    "Shapes",
    "affine_variances",
    "input_kernel",
    "number",
    "propagate_layer",
    "scalar",
]

#: What flows between layers: one kernel, or a tuple of them between FanOut and FanIn.
Kernels = Union[Kernel, tuple[Kernel, ...]]
#: Per-example shapes, one or a tuple of them, as `Kernels`.
Shapes = Union[tuple[int, ...], tuple[tuple[int, ...], ...]]


@dataclass(frozen=True)
class BuildContext:
    """Where and how finite-width parameters are drawn."""

    generator: torch.Generator | None
    dtype: torch.dtype
    device: torch.device

    def randn(self, *shape: int) -> Tensor:
        """Standard normal draws from the context's generator, on its device."""
        if self.device.type == "meta":
            return torch.empty(shape, dtype=self.dtype, device="meta")
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        out = torch.randn(shape, generator=self.generator, dtype=self.dtype, device=gen_device)
        return out.to(self.device)


class Layer:
    """Base class of ntkit layers.

    A layer knows two things: how a `Kernel` passes through it in the
    infinite-width limit (:meth:`propagate`), and how to build the same layer
    at finite width as a `torch.nn.Module` (:meth:`build`). Containers compose
    both at once.

    A layer class joins the registry (`ntkit.layers.registry`) by declaring
    ``spec_names`` (its names in the spec grammar, the first one written by
    `ntkit.spec.to_spec`) and ``torch_modules`` (the `torch.nn` classes
    `ntkit.from_torch` converts into it with :meth:`from_torch_module`);
    :meth:`spec_call` gives the arguments `to_spec` writes.
    """

    #: Names in the compact spec grammar; the first is the one `to_spec` writes.
    spec_names: ClassVar[tuple[str, ...]] = ()
    #: `torch.nn` module classes that `from_torch` converts into this layer.
    torch_modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Whether subclasses of ``torch_modules`` convert too (False: exactly those classes).
    torch_subclasses: ClassVar[bool] = True
    #: Whether the kernel rule is right for masked inputs (``kernel(..., mask=)``; the
    #: contract is in `ntkit.layers._masks`): False refuses a masked kernel by name.
    honours_masks: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        register(cls)

    # ------------------------------------------------------------ the registry
    @classmethod
    def spec_constructors(cls) -> dict[str, Callable[..., Layer]]:
        """The spec names this class declares, each with the constructor it calls
        (the class itself, unless a subclass says otherwise)."""
        return {name: cls for name in cls.__dict__.get("spec_names", ())}

    def spec_call(self) -> tuple[str, list, dict] | None:
        """``(name, args, kwargs)`` of this layer in the spec grammar, or None when it
        has none; arguments at their defaults are left out. Parameter-free layers
        need not override it."""
        names = type(self).__dict__.get("spec_names", ())
        return (names[0], [], {}) if names else None

    @classmethod
    def from_torch_module(cls, module: nn.Module, ctx: TorchContext) -> Layer:
        """The layer that a module of one of ``torch_modules`` converts into.

        Args:
            module: the `torch.nn` module.
            ctx: the conversion's options and its way to report errors.

        Raises:
            ConversionError: through ``ctx.fail``, for settings without a kernel rule.
        """
        raise NotImplementedError(f"{cls.__name__} converts no torch module.")

    # ---------------------------------------------------------------- the rule
    def propagate(self, k: Kernels) -> Kernels:
        """The kernel after this layer, given the kernel before it."""
        raise NotImplementedError

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        """The finite-width module and its per-example output shape."""
        raise NotImplementedError

    def needs_position_pairs(self) -> bool:
        """Whether this layer (or one inside it) mixes positions, so that its input
        kernel must hold every pair of positions (pooling, attention)."""
        return False

    def token_input_layer(self) -> Layer | None:
        """The layer that reads integer token ids as this network's inputs (its first
        layer when that is an `ntkit.layers.embedding.Embedding`), or None."""
        layers = getattr(self, "layers", None)
        if type(self).__name__ in ("Sequential", "Repeat") and layers:
            return layers[0].token_input_layer()
        return None

    def side_inputs(self) -> frozenset[str]:
        """The per-example side inputs this layer (or one inside it) reads, among
        "mask" and "pattern" (see `ntkit._side`); `kernel` refuses others."""
        return frozenset()

    def _forward(self, k: Kernels) -> Kernels:
        """`propagate` as the whole network, returning matching positions only
        (`Sequential` drops the position pairs as soon as no later layer needs them)."""
        return drop_position_pairs(propagate_layer(self, k))

    # --------------------------------------------------------- public surface
    def kernel(
        self,
        x1: Tensor,
        x2: Tensor | None = None,
        *,
        diagonal: bool = False,
        memory_budget: int | str | None = None,
        progress: bool | None = None,
        mask=None,
        pattern=None,
    ) -> Kernel:
        """The infinite-width NNGP and NTK of this network between two batches.

        Args:
            x1: inputs, shape ``(N1, *features)``, float32 or float64; the kernel
                is computed in that dtype on that device.
            x2: inputs, shape ``(N2, *features)``, or None for ``k(x1, x1)``
                (computed once per symmetric pair of tiles).
            diagonal: return only ``k(x1_i, x1_i)`` (``nngp`` and ``ntk`` of
                shape ``(N1,)``); requires ``x2=None``.
            memory_budget: bytes (or a string such as ``"2GiB"``) of working
                memory for the tiles beyond the output itself; default 1 GiB.
                Any N works: tiles need not divide it.
            progress: show a progress bar over tiles; by default one appears
                when the computation takes more than a few seconds.
            mask: for inputs of different lengths or sizes, booleans
                ``(N, *spatial)``, True where a position is present: a pair
                ``(m1, m2)`` for ``x1`` and ``x2``, or one ``m1`` when ``x2`` is
                None. Absent positions are zeros; the layers of the network
                must honour masks (`side_inputs` lists "mask").
            pattern: per-example graph adjacency ``(N, V, V)`` for `Aggregate`
                layers, as a pair ``(p1, p2)`` or one ``p1`` when ``x2`` is None.

        Returns:
            A `Kernel` with ``nngp`` and ``ntk`` of shape ``(N1, N2)`` (or
            ``(N1,)`` when ``diagonal``) for a network with a dense readout. A
            network that ends with spatial features ``(C, *S)`` gives
            ``(N1, N2, *S)``, the kernel at matching positions.

        Hyperparameters given as tensors that require grad (``w_std`` and
        ``b_std`` of `Linear` and the convolutions) make the kernel
        differentiable in them: the result keeps the autograd graph, under any
        ``memory_budget`` (tiles are then recomputed in the backward pass, see
        `ntkit.tiling.tiled_kernel`). Inputs ``x1``/``x2`` that require grad
        make it differentiable in them the same way (for kernel inducing
        points, adversarial examples, attributions), with neural-tangents'
        gradients at self-pairs and kinks (finite at ``x1 == x2``). ``x2``
        that is ``x1`` (the same tensor, or without gradients a view of its
        memory) is computed as ``x2=None``, the gradient flowing through both
        slots.
        """
        tokens = self.token_input_layer()
        if tokens is not None:  # integer token ids, valid only before an Embedding
            x1, x2 = tokens.token_inputs(x1, x2)
        x1, x2 = as_input_pair(x1, x2)
        side = check_side_inputs(x1, x2, {"mask": mask, "pattern": pattern},
                                 self.side_inputs(), type(self).__name__)
        if diagonal and x2 is not None:
            raise ValueError(
                "diagonal=True computes k(x1_i, x1_i) and takes no x2; call "
                "net.kernel(x1, diagonal=True), or net.kernel(x1, x2) for the full matrix."
            )
        return tiled_kernel(
            self._forward, x1, x2, diagonal=diagonal, memory_budget=memory_budget,
            progress=progress, position_pairs=x1.ndim > 2 and self.needs_position_pairs(),
            network=self, side=side,
        )

    def build(
        self,
        input_shape: Sequence[int] | int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        parameterization: str | dict | None = None,
        optimizer: str = "sgd",
        base_width: int | None = None,
    ) -> nn.Module:
        """The same network at finite width, as a `torch.nn.Module`.

        Widths are the ``out_features`` given to the layers; parameters are drawn
        with exactly the distribution the kernel assumes (see `Linear`).

        With ``parameterization`` an MLP is built instead in one of the width
        scalings of Yang & Hu 2021 (an `ntkit.finite.AbcMLP`): ``"standard"``,
        ``"ntk"``, ``"mup"``, or a dict ``{"a", "b", "c", "c_bias"}`` of per-layer
        exponents (the general abc-parameterization), all relative to
        ``base_width``. Train it with plain `torch.optim` on
        ``model.param_groups(lr)``, which holds each layer's learning rate (see
        `ntkit.finite.abc_mlp`).

        Args:
            input_shape: per-example input shape, e.g. ``(784,)`` or ``x.shape[1:]``.
            generator: the source of randomness (a `torch.Generator`); parameters
                are drawn on its device and moved to ``device``.
            dtype: parameter dtype, default `torch.get_default_dtype()`.
            device: parameter device, default CPU.
            parameterization: None (the layers' own parameterizations), a preset
                name or abc exponents; MLPs only.
            optimizer: ``"sgd"`` or ``"adam"``: whose learning-rate scaling muP uses.
            base_width: the width at which every parameterization is the standard
                one (default: the network's width).
        """
        if parameterization is not None:
            return self._build_abc(input_shape, parameterization, optimizer, base_width,
                                   generator, dtype, device)
        if optimizer != "sgd" or base_width is not None:
            raise ValueError("optimizer= and base_width= belong to parameterization=; pass "
                             "parameterization='mup' (or 'standard', 'ntk', abc exponents).")
        if isinstance(input_shape, int):
            input_shape = (input_shape,)
        shape = tuple(int(s) for s in input_shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(
                f"input_shape must be the per-example shape with positive sizes, e.g. (784,) "
                f"or x.shape[1:]; got {tuple(input_shape)}."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator, got {type(generator).__name__}; "
                f"use torch.Generator().manual_seed(seed)."
            )
        ctx = BuildContext(
            generator=generator,
            dtype=dtype or torch.get_default_dtype(),
            device=torch.device(device) if device is not None else torch.device("cpu"),
        )
        module, _ = self._build(shape, ctx)
        return module

    def _build_abc(self, input_shape, parameterization, optimizer, base_width, generator,
                   dtype, device) -> nn.Module:
        from ..finite.params import abc_mlp

        if isinstance(parameterization, dict):
            preset, abc = None, parameterization
        elif isinstance(parameterization, str):
            preset, abc = parameterization, None
        else:
            raise TypeError(f"parameterization must be 'standard', 'ntk', 'mup' or a dict of "
                            f"abc exponents, got {type(parameterization).__name__}.")
        module = abc_mlp(self, input_shape, parameterization=preset, optimizer=optimizer,
                         base_width=base_width, abc=abc, generator=generator,
                         dtype=dtype or torch.get_default_dtype())
        return module.to(device) if device is not None else module

    def hyperparameters(self) -> list[Tensor]:
        """The hyperparameters of this layer, and of the layers inside it, that
        were given as tensors (e.g. ``Linear(512, w_std=torch.tensor(1.5,
        requires_grad=True))``), each once. Kernels are differentiable in them;
        `kernel` keeps the autograd graph when one of them requires grad."""
        found: dict[int, Tensor] = {}
        inner: dict[int, Layer] = {}  # each inner layer once (Repeat holds it n + 1 times)
        for value in vars(self).values():
            items = value if isinstance(value, (tuple, list)) else (value,)
            for item in items:
                if isinstance(item, Tensor):
                    found.setdefault(id(item), item)
                elif isinstance(item, Layer):
                    inner.setdefault(id(item), item)
        for layer in inner.values():
            for t in layer.hyperparameters():
                found.setdefault(id(t), t)
        return list(found.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def propagate_layer(layer: Layer, k: Kernels) -> Kernels:
    """``layer.propagate(k)`` under the mask contract (`ntkit.layers._masks`): after a
    layer that honours masks (``honours_masks``) covariances at absent positions are
    zeroed; a layer that reads the mask itself (``"mask"`` in `Layer.side_inputs`)
    without declaring it is left to handle it; any other layer refuses a masked
    kernel by name. Containers call their layers through this."""
    if not has_mask(k):
        return layer.propagate(k)
    if not layer.honours_masks:
        if "mask" in layer.side_inputs():
            return layer.propagate(k)
        raise refuse_mask(layer)
    out = layer.propagate(k)
    if isinstance(out, tuple):
        return tuple(zero_absent(b) for b in out)
    return zero_absent(out)


def scalar(value: float | Tensor, like: Tensor) -> Tensor:
    """A hyperparameter as a 0-dim tensor in the dtype and on the device of
    ``like``; a tensor keeps its autograd graph (it is cast with ``.to``)."""
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return torch.full((), value, dtype=like.dtype, device=like.device)


def affine_variances(w_std: float | Tensor, b_std: float | Tensor | None, like: Tensor
                     ) -> tuple[Tensor, Tensor | None]:
    """``w_std^2`` and ``b_std^2`` of an affine layer as 0-dim tensors in the dtype and
    on the device of ``like`` (tensors keep their graph); ``b_std^2`` is None when
    there is nothing to add (no bias, or the number 0)."""
    w = scalar(w_std, like)
    if b_std is None or (not isinstance(b_std, Tensor) and b_std == 0):
        return w * w, None
    b = scalar(b_std, like)
    return w * w, b * b


def number(value: float | Tensor | None) -> float | None:
    """A hyperparameter as a Python float (None stays None), for finite twins
    and messages; detached, so not differentiable."""
    return float(value.detach()) if isinstance(value, Tensor) else value


def drop_position_pairs(k: Kernels) -> Kernels:
    """The kernel(s) at matching positions only (see `Kernel.to_position_diagonal`)."""
    if isinstance(k, tuple):
        return tuple(b.to_position_diagonal() for b in k)
    return k.to_position_diagonal()


def single(k: Kernels, layer: Layer) -> Kernel:
    """`k` if it is one kernel; an error naming `layer` if it is several branches."""
    if isinstance(k, tuple):
        raise ValueError(
            f"{layer!r} takes one input but receives {len(k)} branches; merge them first "
            f"with FanInSum(), FanInConcat() or FanInProd(), or apply per-branch layers "
            f"with Parallel(...)."
        )
    return k


def flat_width(shape: Shapes, layer: Layer) -> int:
    """The feature count of a dense per-example shape ``(width,)``, or an error."""
    if not shape or isinstance(shape[0], tuple):
        raise ValueError(f"{layer!r} takes one input but receives branches of shapes {shape}.")
    if len(shape) != 1:
        raise ValueError(
            f"{layer!r} takes dense features (N, features) but receives per-example shape "
            f"{tuple(shape)}; put nk.Flatten() before it."
        )
    return int(shape[0])

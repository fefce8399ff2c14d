"""Random features of an ntkit network's NNGP and NTK: `RandomFeatureMap` (draw once,
map many batches) and `random_features` (one call).

The construction is the layer-by-layer recursion of Zandieh et al., "Scaling neural
tangent kernels via sketching and random features" (NeurIPS 2021), Alg. 1 (NTKRF), with
Monte Carlo arc-cosine-style features for any elementwise activation and an independent
Gaussian product for the NTK's sum-of-products structure instead of a tensor sketch.
Each input ``x`` carries two feature tensors of the same spatial shape as the network's
activations, ``a`` (``C`` channels) and ``psi`` (``C_psi`` channels), whose channel
averages estimate the two kernels between every pair of positions::

    a(x)_p . a(x')_q / C ~ K(x, x')_pq,      psi(x)_p . psi(x')_q / C_psi ~ Theta(x, x')_pq

- input: ``a = x`` (ntkit's input kernel ``x . x' / C``), no ``psi`` (``Theta = 0``);
- ``Linear``/``Conv`` of width ``m``: ``a <- A(a)`` and ``psi <- A'(a) + A''(psi)``, with
  ``A``, ``A'``, ``A''`` three independent draws of the layer's finite twin (`build`;
  ``A''`` without bias): given the features below, ``A(a)`` has covariance ``w^2 K + b^2``
  (the NNGP recursion, Jacot et al. 2018 eq. 6) and ``A'(a) + A''(psi)`` has ``w^2 (K +
  Theta) + b^2``, the NTK of the pre-activations (eq. 7), independently of ``A(a)``;
- activation ``f``: ``a <- f(u)`` and ``psi <- f'(u) * v`` for the pre-activations ``u =
  a`` and ``v = psi`` just before it: ``E[f(u) f(u')] = K'`` and, ``u`` and ``v`` being
  independent, ``E[f'(u) f'(u') v v'] = K_dot * Theta`` (eq. 7's product);
- ``Flatten``, pooling, ``GlobalAvgPool``, ``Identity``: applied to both (linear);
- the readout ``Linear``: exact, ``phi = [w a / sqrt(F), b]`` for the NNGP and ``[w a /
  sqrt(F), b, w psi / sqrt(F_psi)]`` for the NTK (``F``, ``F_psi`` their feature counts),
  so ``phi(x) . phi(x') = w^2 (K + Theta) + b^2`` of the estimates;
- then exactly ``n_features`` columns: zero columns appended when there are fewer, a
  Gaussian sketch ``S phi`` (``S`` ``(D, P)`` with ``N(0, 1/D)`` entries, unbiased for
  inner products) when there are more.

Bias and variance. Given the features of the layer below, every step is exactly unbiased.
With one nonlinear layer (``Linear/Conv -> activation -> ... -> readout``, pooling and
flattening anywhere) the pre-activations are exactly Gaussian with the exact kernel, so
``E[phi(x) . phi(x')]`` *equals* the NNGP or NTK. With ``L >= 2`` nonlinear layers the
second activation sees the kernel estimated at width ``m``, and through a nonlinearity:
the estimator is biased by ``O(1/m)`` relative (the ``1/width`` mean shift of a finite
network's kernel, Yaida 2020; exactly that of the finite network for the NNGP), small
next to its standard deviation, which falls like ``m^-1/2`` (``D^-1/2`` at the default
width): relative error of a kernel entry ``O(sqrt(L / m))``.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .._budget import parse_memory
from ..errors import check_finite_output
from ..kernel_function import check_get
from ..layers import (
    Activation,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    Conv1d,
    Conv2d,
    Conv3d,
    Flatten,
    GlobalAvgPool,
    Identity,
    Linear,
    Sequential,
)
from ..layers.base import BuildContext, number

__all__ = ["RandomFeatureMap", "random_features"]

_AFFINE = (Linear, Conv1d, Conv2d, Conv3d)
_LINEAR_OPS = (Flatten, GlobalAvgPool, Identity, AvgPool1d, AvgPool2d, AvgPool3d)
_SUPPORTED = ("Sequential/Repeat, Linear, Conv1d/2d/3d (NTK parameterization), elementwise "
              "activations (ReLU, Erf, GELU, ...), Flatten, AvgPool1d/2d/3d, GlobalAvgPool, "
              "Identity, ending with a Linear readout")


class RandomFeatureMap:
    """A random feature map ``phi``: ``E[phi(x) . phi(x')]`` is the network's NNGP or NTK.

    Factor once, map many: the random layers are drawn here, so the training and the
    test inputs go through the same map (call it on both). See the module's docstring
    for the construction (Zandieh et al. 2021, Alg. 1) and its bias and variance:
    exactly unbiased with one nonlinear layer, ``O(1/width)`` relative bias beyond.

    Args:
        net: an ntkit network of the supported layers (a fully connected or
            convolutional network ending with a ``Linear`` readout).
        input_shape: per-example input shape, e.g. ``(20,)`` or ``(3, 32, 32)``.
        n_features: ``D``, the number of features (columns) ``phi`` returns.
        get: ``"ntk"`` or ``"nngp"``.
        generator: the source of randomness (required).
        width: channels of every hidden random layer; default ``(D - 1) // 2`` for the
            NTK (features ``[a, bias, psi]`` fill ``D`` for a dense network) and
            ``D - 1`` for the NNGP. Larger widths lower the bias of deep networks.
        dtype: of the map's parameters and outputs; default float32.
        memory_budget: bytes (or ``"2GiB"``) of working memory per batch of inputs;
            default 1 GiB. Inputs are mapped in row batches that fit.

    Raises:
        TypeError: an unsupported layer, or ``generator`` is not a `torch.Generator`.
        ValueError: ``n_features`` or ``width`` is not a positive int, or a layer's
            settings (standard parameterization, ``b_init="zero"``) are not supported.
    """

    def __init__(self, net, input_shape: Sequence[int], *, n_features: int,
                 get: Literal["ntk", "nngp"] = "ntk", generator: torch.Generator,
                 width: int | None = None, dtype: torch.dtype | None = None,
                 memory_budget: int | str | None = None):
        self.get = check_get(get)
        self.n_features = _positive_int(n_features, "n_features")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (the features are random), "
                            f"got {type(generator).__name__}; pass "
                            f"generator=torch.Generator().manual_seed(0).")
        ntk = self.get == "ntk"
        default = max(1, (self.n_features - 1) // 2 if ntk else self.n_features - 1)
        self.width = default if width is None else _positive_int(width, "width")
        self.dtype = dtype or torch.get_default_dtype()
        self.input_shape = tuple(int(s) for s in input_shape)
        self._budget = parse_memory(memory_budget)
        layers = _layers(net)
        if not layers or not isinstance(layers[-1], Linear):
            raise TypeError(f"random features need a network ending with a Linear readout "
                            f"(e.g. ..., nk.Flatten(), nk.Linear(1)); got {net!r}.")
        ctx = BuildContext(generator=generator, dtype=self.dtype, device=torch.device("cpu"))
        self._steps: list[tuple] = []
        shape, psi_shape = self.input_shape, None
        gaussian = False            # whether the current features are Gaussian pre-activations
        for layer in layers[:-1]:
            if isinstance(layer, _AFFINE):
                _check_affine(layer)
                hidden = _with_width(layer, self.width)
                mod_u, out_shape = hidden._build(shape, ctx)
                mod_a = mod_psi = None
                if ntk:
                    mod_a, _ = hidden._build(shape, ctx)
                    if psi_shape is not None:
                        no_bias = copy.copy(hidden)
                        no_bias.b_std = None
                        mod_psi, _ = no_bias._build(psi_shape, ctx)
                    psi_shape = out_shape
                self._steps.append(("affine", mod_u, mod_a, mod_psi))
                shape, gaussian = out_shape, True
            elif isinstance(layer, Activation):
                if not gaussian:
                    raise ValueError(f"{layer!r} needs Gaussian pre-activations (the output of a "
                                     f"Linear or Conv) as in the network's kernel; put a Linear "
                                     f"or Conv before it.")
                self._steps.append(("activation", layer.fn))
                gaussian = False
            elif isinstance(layer, _LINEAR_OPS):
                module, new_shape = layer._build(shape, ctx)
                if psi_shape is not None:
                    psi_module, psi_shape = layer._build(psi_shape, ctx)
                else:
                    psi_module = None
                self._steps.append(("linear", module, psi_module))
                shape = new_shape
            else:
                raise TypeError(f"random features support {_SUPPORTED}; got {layer!r}. Use "
                                f"ntkit.solvers.nystrom_krr (exact kernel entries) for this "
                                f"network.")
        readout = layers[-1]
        _check_affine(readout)
        if len(shape) != 1 or (psi_shape is not None and len(psi_shape) != 1):
            raise ValueError(f"the readout {readout!r} receives per-example shape {shape}; put "
                             f"nk.Flatten() or nk.GlobalAvgPool() before it.")
        self._w = float(number(readout.w_std))
        self._b = number(readout.b_std)
        self._f = shape[0]
        self._f_psi = psi_shape[0] if (ntk and psi_shape is not None) else 0
        size = self._f + (self._b is not None) + self._f_psi
        self._sketch = None
        if size > self.n_features:  # Gaussian sketch, unbiased for inner products
            self._sketch = torch.randn(size, self.n_features, generator=generator,
                                       dtype=self.dtype) / math.sqrt(self.n_features)
        self._size = size
        self._row_bytes = 4 * max(self.width, 1) * math.prod(self.input_shape[1:] or (1,)) * \
            (torch.finfo(self.dtype).bits // 8) * (3 if ntk else 1) + 8 * size

    def __call__(self, x: Tensor) -> Tensor:
        """``phi(x)``: ``(N, n_features)`` for inputs ``x`` ``(N, *input_shape)``.

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: its per-example shape is not ``input_shape``, or it has NaN or
                infinite entries.
        """
        check_feature_input(x, self.input_shape, "as the map was drawn for", "random")
        rows = max(1, self._budget // self._row_bytes)
        out = [self._map(x[i:i + rows].to(self.dtype)) for i in range(0, x.shape[0], rows)]
        if not out:
            return x.new_zeros((0, self.n_features), dtype=self.dtype)
        return check_finite_output(torch.cat(out), "random features", causes="kernel")

    map = __call__

    @torch.no_grad()
    def _map(self, x: Tensor) -> Tensor:
        a, psi = x, None
        for step in self._steps:
            if step[0] == "affine":
                _, mod_u, mod_a, mod_psi = step
                u = mod_u(a)
                if mod_a is not None:
                    psi = mod_a(a) if psi is None else mod_a(a) + mod_psi(psi)
                a = u
            elif step[0] == "activation":
                a, slope = _value_and_slope(step[1], a)
                if psi is not None:
                    psi = slope * psi
            else:
                a = step[1](a)
                if psi is not None:
                    psi = step[2](psi)
        parts = [a * (self._w / math.sqrt(self._f))]
        if self._b is not None:
            parts.append(a.new_full((a.shape[0], 1), self._b))
        if self.get == "ntk" and psi is not None:
            parts.append(psi * (self._w / math.sqrt(self._f_psi)))
        phi = torch.cat(parts, dim=1)
        if self._sketch is not None:
            return phi @ self._sketch
        if phi.shape[1] < self.n_features:
            phi = torch.cat([phi, phi.new_zeros(phi.shape[0], self.n_features - phi.shape[1])],
                            dim=1)
        return phi

    def __repr__(self) -> str:
        return (f"RandomFeatureMap(get={self.get!r}, n_features={self.n_features}, "
                f"width={self.width}, input_shape={self.input_shape})")


def random_features(net, x: Tensor, *, n_features: int, get: Literal["ntk", "nngp"] = "ntk",
                    generator: torch.Generator, width: int | None = None,
                    memory_budget: int | str | None = None) -> Tensor:
    """Random features ``phi(x)`` ``(N, n_features)`` whose Gram matrix estimates the
    network's NTK (or NNGP): ``E[phi(x) phi(x')^T] = k(x, x')``.

    One call of `RandomFeatureMap` (``RandomFeatureMap(net, x.shape[1:], ...)(x)``);
    build the map once to give training and test inputs the same features. Exactly
    unbiased for networks with one nonlinear layer, ``O(1/width)`` relative bias beyond,
    relative standard deviation ``O(D^-1/2)`` (see `ntkit.features`).

    Args:
        net: a fully connected or convolutional ntkit network ending with a ``Linear``.
        x: inputs ``(N, *input_shape)``; the features take its dtype.
        n_features: ``D``.
        get: ``"ntk"`` or ``"nngp"``.
        generator: a `torch.Generator` (required).
        width: hidden random width (see `RandomFeatureMap`).
        memory_budget: bytes per batch of inputs; default 1 GiB.

    Returns:
        ``(N, n_features)`` tensor in ``x``'s dtype.

    Example:
        >>> net = nk.Sequential(nk.Linear(512), nk.ReLU(), nk.Linear(1))
        >>> phi = nk.features.random_features(net, x, n_features=4096,
        ...                                   generator=torch.Generator().manual_seed(0))
        >>> phi @ phi.T    # ~ net.kernel(x).ntk
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError(f"x must be a floating-point tensor (N, features...), got "
                        f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}.")
    fmap = RandomFeatureMap(net, x.shape[1:], n_features=n_features, get=get,
                            generator=generator, width=width, dtype=x.dtype,
                            memory_budget=memory_budget)
    return fmap(x)


def check_feature_input(x, input_shape: tuple[int, ...], like: str, kind: str) -> None:
    """Raises unless ``x`` is a finite floating-point tensor ``(N, *input_shape)``
    (``like`` says where the shape comes from; ``kind`` names the features)."""
    shape = ", ".join(map(str, input_shape))
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor (N, {shape}), got "
                        f"{type(x).__name__} {getattr(x, 'dtype', '')}.")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"x must have shape (N, {shape}) {like}, got {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x has NaN or infinite entries; {kind} features need finite inputs.")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _layers(net) -> list:
    """The network's layers in order, Sequential (and Repeat) flattened."""
    if isinstance(net, Sequential):
        return [leaf for layer in net.layers for leaf in _layers(layer)]
    if not hasattr(net, "kernel"):
        raise TypeError(f"net must be an ntkit network (e.g. nk.Sequential(nk.Linear(512), "
                        f"nk.ReLU(), nk.Linear(1))), got {type(net).__name__}.")
    return [net]


def _check_affine(layer) -> None:
    if layer.parameterization != "ntk":
        raise ValueError(f"random features support the NTK parameterization only; {layer!r} "
                         f"has parameterization={layer.parameterization!r}.")
    if getattr(layer, "b_init", "normal") != "normal":
        raise ValueError(f"random features support drawn biases (b_init='normal') only; got "
                         f"{layer!r}.")


def _with_width(layer, width: int):
    hidden = copy.copy(layer)
    if isinstance(layer, Linear):
        hidden.out_features = width
    else:
        hidden.out_channels = width
    return hidden


def _value_and_slope(fn, u: Tensor) -> tuple[Tensor, Tensor]:
    """``f(u)`` and ``f'(u)`` elementwise (autograd through the activation's function)."""
    with torch.enable_grad():
        leaf = u.detach().requires_grad_(True)
        value = fn(leaf)
        (slope,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), slope

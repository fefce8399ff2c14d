"""Parameterizations of an MLP: standard, NTK, muP and the general abc-parameterization.

The abc-parameterization (Yang & Hu 2021, "Tensor Programs IV", eq. 1), written
relative to a base width ``n0`` with width multiplier ``m = n / n0`` so that all
parameterizations agree at the base width. For layer ``l`` with base fan-in
``f_l`` (the input size for the first layer, ``n0`` otherwise)::

    W_l = m^{-a_l} w_l,    w_l ~ N(0, w_std^2 / f_l * m^{-2 b_l}),    lr_l = lr * m^{-c_l}

Presets (the input layer, hidden layers, the output layer):

- ``"standard"``: ``a = 0``; ``b = (0, 1/2, 1/2)``; ``c = 0``.
- ``"ntk"``: ``a = (0, 1/2, 1/2)``; ``b = 0``; ``c = 0`` (the same initial
  function as standard; the multipliers change the gradients).
- ``"mup"`` (maximal update parameterization, Yang & Hu 2021 Table 3, in the form
  of the `mup` package: standard initialisation, a ``1/m`` output multiplier):
  ``a = (0, 0, 1)``, ``b = (0, 1/2, 0)``; SGD ``c = (-1, 0, -1)`` (biases of the
  input and hidden layers ``-1``, of the output ``0``); Adam ``c = (0, 1, 0)``
  (all biases ``0``).

`AbcMLP` is the network; `param_groups` gives the per-layer learning rates as
torch optimizer parameter groups (plain `torch.optim.SGD` / `Adam`);
`coord_check` runs Yang's coordinate check (size of every layer's activation
change over the first steps, across widths) and `plot_coord_check` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["AbcMLP", "abc_exponents", "abc_mlp", "coord_check", "param_groups",
           "plot_coord_check"]

Parameterization = Literal["standard", "ntk", "mup"]
Optimizer = Literal["sgd", "adam"]


def abc_exponents(parameterization: Parameterization, optimizer: Optimizer, depth: int
                  ) -> dict[str, list[float]]:
    """The exponents ``a, b, c`` (weights) and ``c_bias`` of each of ``depth + 1`` layers.

    Args:
        parameterization: ``"standard"``, ``"ntk"`` or ``"mup"``.
        optimizer: ``"sgd"`` or ``"adam"`` (muP's learning rates depend on it).
        depth: the number of hidden layers.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
    layers = depth + 1
    three = lambda i, h, o: [i] + [h] * (depth - 1) + [o]
    if parameterization == "standard":
        return {"a": [0.0] * layers, "b": three(0.0, 0.5, 0.5), "c": [0.0] * layers,
                "c_bias": [0.0] * layers}
    if parameterization == "ntk":
        return {"a": three(0.0, 0.5, 0.5), "b": [0.0] * layers, "c": [0.0] * layers,
                "c_bias": [0.0] * layers}
    if parameterization == "mup":
        if optimizer == "sgd":
            c, cb = three(-1.0, 0.0, -1.0), [-1.0] * depth + [0.0]
        else:
            c, cb = three(0.0, 1.0, 0.0), [0.0] * layers
        return {"a": three(0.0, 0.0, 1.0), "b": three(0.0, 0.5, 0.0), "c": c, "c_bias": cb}
    raise ValueError(f"parameterization must be 'standard', 'ntk' or 'mup', got "
                     f"{parameterization!r}; for others pass abc= to AbcMLP.")


class AbcMLP(nn.Module):
    """An MLP ``Linear, act, ..., Linear`` in an abc-parameterization.

    Args:
        in_features, width, out_features: sizes; ``depth`` hidden layers of ``width``.
        depth: number of hidden layers (at least 1).
        parameterization: a preset (module docstring), or None with ``abc``.
        optimizer: which optimizer the learning-rate exponents are for.
        base_width: ``n0`` (default: ``width``, i.e. ``m = 1``).
        abc: expert use: ``{"a": [...], "b": [...], "c": [...], "c_bias": [...]}``,
            ``depth + 1`` numbers each.
        activation: elementwise function (default ReLU).
        w_std: weight scale, one for all layers or one per layer (``depth + 1``).
        generator, dtype: for the initial draw (biases start at zero).
    """

    def __init__(self, in_features: int, width: int, out_features: int, depth: int = 2, *,
                 parameterization: Parameterization | None = "mup", optimizer: Optimizer = "sgd",
                 base_width: int | None = None, abc: dict | None = None,
                 activation: Callable[[Tensor], Tensor] = torch.relu,
                 w_std: float | Sequence[float] = 1.0,
                 generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("width", width),
                        ("out_features", out_features), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        base = width if base_width is None else base_width
        if not isinstance(base, int) or base < 1:
            raise ValueError(f"base_width must be a positive int, got {base_width!r}.")
        if abc is None:
            abc = abc_exponents(parameterization, optimizer, depth)
        for key in ("a", "b", "c", "c_bias"):
            if key not in abc or len(abc[key]) != depth + 1:
                raise ValueError(f"abc[{key!r}] must list {depth + 1} exponents (one per "
                                 f"layer), got {abc.get(key)!r}.")
        self.abc = {k: [float(x) for x in abc[k]] for k in ("a", "b", "c", "c_bias")}
        stds = [w_std] * (depth + 1) if isinstance(w_std, (int, float)) else list(w_std)
        if len(stds) != depth + 1 or any(not isinstance(v, (int, float)) or v <= 0
                                         for v in stds):
            raise ValueError(f"w_std must be a positive number or {depth + 1} of them (one "
                             f"per layer), got {w_std!r}.")
        self.width_mult = width / base
        self.activation = activation
        dims = [in_features] + [width] * depth + [out_features]
        base_fan_in = [in_features] + [base] * depth
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.multipliers: list[float] = []
        m = self.width_mult
        for layer in range(depth + 1):
            std = stds[layer] / math.sqrt(base_fan_in[layer]) * m ** (-self.abc["b"][layer])
            w = torch.randn(dims[layer + 1], dims[layer], generator=generator, dtype=dtype)
            self.weights.append(nn.Parameter(w * std))
            self.biases.append(nn.Parameter(torch.zeros(dims[layer + 1], dtype=dtype)))
            self.multipliers.append(m ** (-self.abc["a"][layer]))

    def forward(self, x: Tensor, *, record: list | None = None) -> Tensor:
        """``x (N, in_features) -> (N, out_features)``; ``record`` (a list) receives every
        layer's output (pre-activations of the hidden layers, then the output)."""
        h = x
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = nn.functional.linear(h, w * self.multipliers[layer], b)
            if record is not None:
                record.append(z)
            h = self.activation(z) if layer < last else z
        return h

    def param_groups(self, lr: float) -> list[dict]:
        """`param_groups` of this model: ``torch.optim.SGD(model.param_groups(lr))``."""
        return param_groups(self, lr=lr)

    def lr_multipliers(self) -> list[tuple[float, float]]:
        """``(weight, bias)`` learning-rate multipliers ``m^{-c}`` of each layer."""
        m = self.width_mult
        return [(m ** (-c), m ** (-cb)) for c, cb in zip(self.abc["c"], self.abc["c_bias"])]


def abc_mlp(net, input_shape: int | Sequence[int], *,
            parameterization: Parameterization | None = "mup", optimizer: Optimizer = "sgd",
            base_width: int | None = None, abc: dict | None = None,
            generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float32) -> AbcMLP:
    """An ntkit MLP description built at finite width in an abc-parameterization (muP by
    default): the `AbcMLP` with the network's widths, activation and per-layer ``w_std``.

    ``net.build(input_shape, parameterization=...)`` calls this. It is not a ``parameterization=`` of `Linear`
    because muP's exponents depend on where a layer sits (input, hidden or readout) and
    on a base width, which a layer's own build does not see, and because muP has no
    kernel limit for a layer to propagate (its readout's NNGP vanishes with width).
    At ``base_width`` equal to the width every preset is the standard initialisation,
    so with biases that start at zero the module computes what ``net.build`` with
    ``parameterization="standard"`` and ``b_init="zero"`` does, draw for draw.

    Args:
        net: ``nk.Sequential(Linear(n), act, ..., Linear(n), act, Linear(k))``, all hidden
            widths equal; biases must start at zero (``b_std=0``, ``b_std=None`` or
            ``b_init="zero"``), as muP's do.
        input_shape: the number of input features (or ``(features,)``).
        parameterization, optimizer, base_width, abc, generator, dtype: as in `AbcMLP`.

    Returns:
        An `AbcMLP`; train it with ``torch.optim.SGD(param_groups(model, lr=...))``.
    """
    from ..layers.base import number
    from .corrections import _parse

    linears, acts = _parse(net, "abc_mlp")
    if not acts:
        raise ValueError("abc_mlp needs at least one hidden layer: nk.Sequential(Linear(n), "
                         "act, Linear(k)).")
    widths = {lin.out_features for lin in linears[:-1]}
    if len(widths) != 1:
        raise ValueError(f"abc_mlp needs equal hidden widths (one width multiplier), got "
                         f"{[lin.out_features for lin in linears[:-1]]}.")
    if len({type(a).__name__ + repr(a) for a in acts}) != 1:
        raise ValueError(f"abc_mlp needs one activation for all hidden layers, got {acts!r}.")
    for lin in linears:
        b_std = number(lin.b_std)
        if b_std not in (None, 0.0) and lin.b_init != "zero":
            raise ValueError(f"{lin!r}: muP's biases start at zero; use b_std=0 or "
                             f"b_init='zero'.")
    features = input_shape if isinstance(input_shape, int) else math.prod(input_shape)
    return AbcMLP(int(features), widths.pop(), linears[-1].out_features, len(acts),
                  parameterization=parameterization, optimizer=optimizer,
                  base_width=base_width, abc=abc, activation=acts[0].fn,
                  w_std=[float(number(lin.w_std)) for lin in linears], generator=generator,
                  dtype=dtype)


def param_groups(model: AbcMLP, *, lr: float) -> list[dict]:
    """Parameter groups for `torch.optim` with each layer's learning rate.

    Args:
        model: an `AbcMLP` (its exponents say which optimizer they are for).
        lr: the base learning rate (the one at the base width).

    Returns:
        ``[{"params": [w], "lr": ...}, {"params": [b], "lr": ...}, ...]``, one group per
        parameter, for ``torch.optim.SGD(groups, lr=lr)`` or ``Adam``.
    """
    if not isinstance(model, AbcMLP):
        raise TypeError(f"model must be an AbcMLP, got {type(model).__name__}.")
    groups = []
    for (wm, bm), w, b in zip(model.lr_multipliers(), model.weights, model.biases):
        groups += [{"params": [w], "lr": lr * wm}, {"params": [b], "lr": lr * bm}]
    return groups


def coord_check(widths: Sequence[int], x: Tensor, y: Tensor, *,
                parameterization: Parameterization | None = "mup", optimizer: Optimizer = "sgd",
                abc: dict | None = None, lr: float = 0.1, steps: int = 4, depth: int = 2,
                base_width: int = 64, seed: int = 0) -> dict[int, Tensor]:
    """The coordinate check (Yang et al. 2021, "Tensor Programs V", fig. 5).

    Trains `AbcMLP` at each width for ``steps`` steps of the mean squared error on
    ``(x, y)`` and records, per step and layer, the mean absolute change of the layer's
    output on ``x`` since initialisation: ``mean |h_t - h_0|``. Under muP every curve is
    flat in width; under a wrong parameterization some grow or vanish with width.

    Args:
        widths: the widths to compare.
        x, y: ``(N, d)`` inputs and ``(N, k)`` targets.
        parameterization, optimizer, abc, depth, base_width: as in `AbcMLP`.
        lr: base learning rate.
        steps: optimizer steps.
        seed: generator seed of every width's initialisation.

    Returns:
        ``{width: (steps + 1, depth + 1)}`` tensors (row 0 is zero).
    """
    out = {}
    for width in widths:
        gen = torch.Generator().manual_seed(seed)
        model = AbcMLP(x.shape[1], width, y.shape[1], depth, parameterization=parameterization,
                       optimizer=optimizer, base_width=base_width, abc=abc, generator=gen,
                       dtype=x.dtype)
        groups = param_groups(model, lr=lr)
        opt = (torch.optim.SGD(groups, lr=lr) if optimizer == "sgd"
               else torch.optim.Adam(groups, lr=lr))
        with torch.no_grad():
            start: list = []
            model(x, record=start)
        rows = [torch.zeros(depth + 1, dtype=x.dtype)]
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            with torch.no_grad():
                now: list = []
                model(x, record=now)
                rows.append(torch.stack([(a - b).abs().mean() for a, b in zip(now, start)]))
        out[width] = torch.stack(rows)
    return out


def plot_coord_check(result: dict[int, Tensor], *, title: str = "coordinate check", ax=None):
    """Draws `coord_check`'s result: per layer, the activation change after the last step
    against width (log-log). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig = ax.figure if ax is not None else plt.figure(figsize=(4.5, 3.5))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    widths = sorted(result)
    layers = result[widths[0]].shape[1]
    for layer in range(layers):
        ax.plot(widths, [float(result[w][-1, layer]) for w in widths], "o-",
                label="output" if layer == layers - 1 else f"hidden {layer + 1}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("mean |h_t - h_0|")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig

"""`to_spec`: a network back to its compact spec string."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .. import layers as L
from ..layers.base import Layer
from ._grammar import CONSTANTS, LAYERS, NAME

__all__ = ["to_spec"]


def _num(v: Any) -> str:
    """A value in compact-spec syntax; floats as their shortest exact repr."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"a hyperparameter tensor of shape {tuple(v.shape)} has no spec "
                             f"form; only scalars do.")
        v = float(v.detach())
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return v if NAME.fullmatch(v) and v.lower() not in CONSTANTS else repr(v)
    if isinstance(v, (tuple, list)):
        inner = ",".join(_num(u) for u in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    raise ValueError(f"the value {v!r} has no spec form.")


def _call(name: str, args: list, kwargs: dict) -> str:
    parts = [_num(a) for a in args] + [f"{k}={_num(v)}" for k, v in kwargs.items()]
    return f"{name}({','.join(parts)})" if parts else name


def to_spec(layer: Layer) -> str:
    """The compact spec string of a network, the inverse of `parse_architecture`.

    ``parse_architecture(to_spec(net))`` computes the same kernel as ``net``
    (and builds the same finite network). Nested `Sequential` containers are
    flattened; `Repeat` becomes ``N*(...)``; hyperparameters given as tensors
    are written as their current values.

    Args:
        layer: an ntkit network.

    Returns:
        A string such as ``"linear(512,w_std=1.5)-relu-linear(10)"``.

    Raises:
        ValueError: the network holds a layer the grammar does not cover
            (branching containers such as `FanOut`/`Parallel`/`FanIn*`,
            `Elementwise` with an arbitrary function, attention with a
            ``pos_emb_decay`` function); the
            message names it.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"to_spec takes an ntkit Layer, got {type(layer).__name__}.")
    return _write(layer)


def _write(layer: Layer) -> str:
    if isinstance(layer, L.Repeat) and type(layer) is L.Repeat:
        return f"{layer.n}*({_write(layer.layer)})"
    if type(layer) is L.Sequential:
        if not layer.layers:
            return "identity"
        return "-".join(_write(m) for m in layer.layers)
    # Only a class that declares its own spec names has a spec form: a subclass (such
    # as from_torch's shape-checked layers) may mean more than its parent's name says.
    call = layer.spec_call() if "spec_names" in type(layer).__dict__ else None
    if call is None:
        raise ValueError(
            f"{layer!r} has no compact spec form: the grammar covers sequential networks of "
            f"{', '.join(sorted(LAYERS))} and N*(...) repeats, not branching containers "
            f"(FanOut, Parallel, FanIn*) or custom elementwise functions."
        )
    name, args, kwargs = call
    return _call(name, args, kwargs)

"""Per-example side inputs: boolean masks of variable-length inputs and graph
adjacency patterns, given next to the inputs as keywords of ``net.kernel`` and of
the finite twins.

Two halves, one convention:

- **Kernels.** ``net.kernel(x1, x2, mask=(m1, m2), pattern=(p1, p2))`` (one
  value, not a pair, when ``x2`` is None). `check_side_inputs` validates them
  here, at the public boundary; `ntkit.tiling` gives each tile its rows and
  columns in `ntkit.kernel.Kernel.side`, where layers read them with
  ``k.side_pair("mask")`` and replace them with ``k.with_side(...)``.
- **Finite twins.** A module that reads side inputs subclasses `SideModule`:
  ``model(x, mask=m, pattern=p)`` at the top, and inside a network the
  containers hand every `SideModule` the same mutable ``side`` dict, so a layer
  that changes the spatial shape (a strided convolution, pooling) writes the
  mask of its output there for the layers after it.

Masks are booleans ``(N, *spatial)``, True where a position is present; absent
positions of the inputs are zeros. Patterns are ``(N, V, V)`` (output node ``i``
sums ``pattern[n, i, j]`` times input node ``j``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SIDE_INPUTS", "SideModule", "check_side_inputs", "mask_input"]

#: The side inputs ntkit knows, with what each one is.
SIDE_INPUTS = {
    "mask": "boolean masks (N, *spatial), True where a position is present",
    "pattern": "graph adjacency patterns (N, V, V)",
}


def check_side_inputs(x1: Tensor, x2: Tensor | None, given: dict[str, Any],
                      accepted: frozenset[str] | set[str], network: str
                      ) -> dict[str, tuple[Any, Any]]:
    """The side inputs of a kernel call as ``{name: (for x1, for x2)}``, checked.

    Args:
        x1: the first batch ``(N1, *features)`` (already checked).
        x2: the second batch, or None for ``k(x1, x1)``.
        given: the keywords as the user wrote them (None values are dropped).
        accepted: the side inputs the network reads (`Layer.side_inputs`).
        network: the network's name, for messages.

    Returns:
        ``(value for x1, value for x2)`` per given name; ``value for x2`` is
        None when ``x2`` is None.

    Raises:
        ValueError, TypeError: a side input the network does not read, a pair
            where one value is due (or the reverse), or values of the wrong
            type, shape or device.
    """
    out: dict[str, tuple[Any, Any]] = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in accepted:
            readers = {"mask": "layers that honour masks (convolutions, pooling, attention, "
                               "RNN)", "pattern": "an Aggregate layer"}[name]
            raise ValueError(
                f"{name}= was given, but {network} has no layer that reads it ({SIDE_INPUTS[name]} "
                f"are read by {readers}); drop {name}= or add such a layer.")
        if x2 is None:
            if isinstance(value, (tuple, list)) and len(value) == 2 and all(
                    _is_array(v) for v in value):
                raise ValueError(
                    f"{name}= holds a pair, but x2 is None: give one {name} for x1 "
                    f"({name}=m1), or pass x2 with {name}=(m1, m2).")
            out[name] = (_check_one(name, value, x1, "x1"), None)
        else:
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(
                    f"{name}= must be a pair ({name}1, {name}2) for x1 and x2 when x2 is given, "
                    f"got {type(value).__name__}; write {name}=({name}1, {name}2).")
            out[name] = (_check_one(name, value[0], x1, "x1"),
                         _check_one(name, value[1], x2, "x2"))
    return out


def _is_array(v: Any) -> bool:
    return isinstance(v, (Tensor, np.ndarray))


def _check_one(name: str, value: Any, x: Tensor, which: str) -> Tensor:
    if name == "mask":
        return _check_mask(value, x, which)
    return _check_pattern(value, x, which)


def _as_tensor(value: Any, name: str, which: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} for {which} could not be converted to a tensor "
                            f"({e}); pass a torch.Tensor.") from None
    raise TypeError(f"{name} for {which} must be a tensor ({SIDE_INPUTS[name]}), got "
                    f"{type(value).__name__}.")


def _check_mask(value: Any, x: Tensor, which: str) -> Tensor:
    m = _as_tensor(value, "mask", which)
    spatial = tuple(x.shape[2:])
    if not spatial:
        raise ValueError(
            f"mask= was given for dense inputs {which} of shape {tuple(x.shape)}; masks mark "
            f"present positions of inputs with spatial axes (N, C, *spatial), e.g. sequences "
            f"(N, C, L) with a mask (N, L).")
    if m.dtype != torch.bool:
        raise TypeError(f"the mask for {which} must hold booleans (True where a position is "
                        f"present), got dtype {m.dtype}; convert with mask.bool() after "
                        f"checking it holds only 0 and 1.")
    if tuple(m.shape) != (x.shape[0], *spatial):
        raise ValueError(
            f"the mask for {which} has shape {tuple(m.shape)}, but {which} of shape "
            f"{tuple(x.shape)} needs (N, *spatial) = {(x.shape[0], *spatial)}: one boolean "
            f"per example and position, shared by the channels.")
    if m.device != x.device:
        raise ValueError(f"the mask for {which} is on {m.device}, {which} on {x.device}; "
                         f"move it with mask.to({which}.device).")
    empty = ~m.flatten(1).any(1)
    if bool(empty.any()):
        raise ValueError(
            f"the mask for {which} marks no present position in example(s) "
            f"{empty.nonzero().flatten().tolist()[:5]}; every example needs at least one "
            f"(averages over present positions and attention over present keys are "
            f"undefined otherwise): drop those examples.")
    return m


def _check_pattern(value: Any, x: Tensor, which: str) -> Tensor:
    from .layers.graph import EdgeList  # sparse patterns; here, not at the top: layers import us

    if isinstance(value, EdgeList):
        return value.checked_for(x, which)
    p = _as_tensor(value, "pattern", which)
    if p.layout != torch.strided:  # torch sparse (N, V, V): its edge list
        return EdgeList.from_dense(p).checked_for(x, which)
    if p.ndim != 3 or p.shape[0] != x.shape[0] or p.shape[1] != p.shape[2]:
        raise ValueError(
            f"the pattern for {which} has shape {tuple(p.shape)}; it must be (N, V, V) with "
            f"N = {x.shape[0]} examples ({which} has shape {tuple(x.shape)}): row i of "
            f"pattern[n] weights the input nodes summed into output node i.")
    if p.dtype.is_complex:
        raise TypeError(f"the pattern for {which} must be real, got dtype {p.dtype}.")
    if p.device != x.device:
        raise ValueError(f"the pattern for {which} is on {p.device}, {which} on {x.device}; "
                         f"move it with pattern.to({which}.device).")
    p = p.to(x.dtype)
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"the pattern for {which} holds NaN or inf.")
    return p


def mask_input(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` ``(N, C, *S)`` with the positions absent under ``mask`` ``(N, *S)`` set to 0."""
    if mask is None:
        return x
    if x.ndim == mask.ndim:  # token ids (N, L) before an Embedding: no channel axis
        return x * mask.to(x.dtype)
    return x * mask.unsqueeze(1).to(x.dtype)


class SideModule(nn.Module):
    """A finite twin that reads per-example side inputs (masks, patterns).

    Call it at the top as ``module(x, mask=m, pattern=p)``; containers call it
    as ``module(x, side)`` with the network's shared ``side`` dict, which a
    module may update (a layer that changes the spatial shape stores the mask
    of its output under ``"mask"``). Subclasses implement :meth:`forward_side`.
    At the top, a ``mask`` zeroes the absent positions of ``x`` first, as the
    kernel does.
    """

    takes_side = True

    def forward(self, x, side: dict | None = None, **side_inputs: Any):
        if side is None:
            side = {k: v for k, v in side_inputs.items() if v is not None}
            unknown = set(side) - set(SIDE_INPUTS)
            if unknown:
                raise TypeError(f"{type(self).__name__} takes the side inputs "
                                f"{sorted(SIDE_INPUTS)}, got {sorted(unknown)}.")
            if "mask" in side and isinstance(x, Tensor):
                x = mask_input(x, side["mask"])
        elif side_inputs:
            raise TypeError("give side inputs either as keywords (at the top) or as the "
                            "shared side dict (inside a network), not both.")
        return self.forward_side(x, side)

    def forward_side(self, x, side: dict):
        raise NotImplementedError


def call_with_side(module: nn.Module, x, side: dict):
    """``module(x, side)`` for a `SideModule`, ``module(x)`` for any other module."""
    if getattr(module, "takes_side", False):
        return module(x, side)
    return module(x)

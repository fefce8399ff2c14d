"""The one adapter from a network to a kernel function ``(a, b) -> (Na, Nb)``.

`ntkit.predict`, `ntkit.solvers`, `ntkit.kernel_matrix` and the scikit-learn
estimators know a network only through this module: it calls
``net.kernel(x1, x2, diagonal=..., memory_budget=..., progress=...)`` by duck typing
and imports no layer, so those modules load none either.

A `KernelFunction` wraps either

- an ntkit network (anything with a ``.kernel`` method returning a `Kernel`), or
- a plain function ``(a, b) -> Kernel`` (or ``-> Tensor``), optionally with a
  ``.diagonal(a)`` method,

and returns the whole `Kernel` (``get=None``) or one of its matrices (``get="nngp"``
or ``get="ntk"``), cast to ``dtype`` when one is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

__all__ = ["GETS", "Get", "KernelFunction", "check_get", "kernel_function"]

#: The selector between the two kernels of a network, named ``get`` everywhere.
Get = Literal["nngp", "ntk"]
GETS: tuple[str, ...] = ("nngp", "ntk")

#: Diagonal of a kernel without a cheap one: from blocks of this many rows.
_DIAGONAL_BLOCK = 256


def check_get(get: Any, *, name: str = "get") -> str:
    """``get`` checked: ``"nngp"`` or ``"ntk"``.

    Raises:
        ValueError: naming what was received and the two choices.
    """
    if not isinstance(get, str) or get not in GETS:
        raise ValueError(f"{name} must be 'ntk' (the neural tangent kernel: all layers "
                         f"trained) or 'nngp' (the NNGP kernel: Bayesian / readout only "
                         f"trained), got {get!r}.")
    return get


class KernelFunction:
    """A network (or a function returning `Kernel`\\ s) as a kernel function.

    ``f(a, b)`` is ``net.kernel(a, b)`` (``b=None``: ``k(a, a)``), the whole `Kernel`
    when ``get`` is None, else its ``nngp`` or ``ntk`` matrix ``(Na, Nb)``;
    ``f.diagonal(a)`` is ``k(a_i, a_i)`` ``(Na,)`` (a `Kernel` of diagonals when
    ``get`` is None), from ``net.kernel(a, diagonal=True)``, the wrapped function's own
    ``.diagonal``, or the diagonals of ``256 x 256`` blocks of ``f``.

    Args:
        source: an ntkit network (with ``.kernel``) or a function ``(a, b) -> Kernel``.
        get: ``"nngp"``, ``"ntk"`` or None (the whole `Kernel`).
        memory_budget: passed to ``net.kernel`` for its tiles (networks only).
        dtype: cast every result to this dtype; None keeps the kernel's.
        progress: passed to ``net.kernel`` (None: its default, a bar for long runs).
    """

    def __init__(self, source: Any, get: Get | None = None, *,
                 memory_budget: int | str | None = None, dtype=None,
                 progress: bool | None = False) -> None:
        if isinstance(source, KernelFunction):
            source = source.source
        if not (hasattr(source, "kernel") or callable(source)):
            raise TypeError(f"expected an ntkit network (with .kernel) or a function "
                            f"(x1, x2) -> Kernel, got {type(source).__name__}.")
        self.source = source
        self.get = None if get is None else check_get(get)
        self.memory_budget = memory_budget
        self.dtype = dtype
        self.progress = progress

    @property
    def is_network(self) -> bool:
        """Whether the source is a network (``.kernel``) rather than a plain function."""
        return hasattr(self.source, "kernel")

    def select(self, get: Get | None, *, dtype=None) -> KernelFunction:
        """The same source with another ``get`` (and ``dtype``, default this one's)."""
        return KernelFunction(self.source, get, memory_budget=self.memory_budget,
                              dtype=self.dtype if dtype is None else dtype,
                              progress=self.progress)

    def _finish(self, k):
        if self.get is not None and not isinstance(k, Tensor):
            k = getattr(k, self.get)
        return k if self.dtype is None else k.to(self.dtype)

    def __call__(self, a: Tensor, b: Tensor | None = None):
        """``k(a_i, b_j)``: ``(Na, Nb)`` (a `Kernel` when ``get`` is None)."""
        if self.is_network:
            k = self.source.kernel(a, b, memory_budget=self.memory_budget,
                                   progress=self.progress)
        else:
            k = self.source(a, b)
        return self._finish(k)

    def diagonal(self, a: Tensor):
        """``k(a_i, a_i)``: ``(Na,)`` (a `Kernel` of diagonals when ``get`` is None)."""
        if self.is_network:
            return self._finish(self.source.kernel(a, diagonal=True,
                                                   memory_budget=self.memory_budget,
                                                   progress=False))
        own: Callable | None = getattr(self.source, "diagonal", None)
        if own is not None:
            return self._finish(own(a))
        if self.get is None:
            raise TypeError("the diagonal of a function returning Kernels needs a get "
                            "('nngp' or 'ntk') or the function's own .diagonal.")
        import torch

        return torch.cat([torch.diagonal(self(a[i:i + _DIAGONAL_BLOCK],
                                              a[i:i + _DIAGONAL_BLOCK]))
                          for i in range(0, a.shape[0], _DIAGONAL_BLOCK)])

    def __repr__(self) -> str:
        return f"KernelFunction({self.source!r}, get={self.get!r})"


def kernel_function(net: Any, get: Get = "ntk", *,
                    memory_budget: int | str | None = None) -> KernelFunction:
    """The kernel function ``(a, b) -> (Na, Nb)`` of an ntkit network: its NTK
    (``get="ntk"``, gradient-descent training) or NNGP. Its ``.diagonal(a)`` gives
    ``k(a_i, a_i)`` cheaply (used for the relative ``diag_reg``).

    Args:
        net: an ntkit network (anything with ``.kernel(x1, x2, diagonal=...,
            memory_budget=..., progress=...)`` returning a `Kernel`).
        get: ``"ntk"`` or ``"nngp"``.
        memory_budget: passed to ``net.kernel`` for its tiles.

    Raises:
        TypeError: ``net`` has no ``.kernel``.
        ValueError: ``get`` is neither ``"ntk"`` nor ``"nngp"``.
    """
    if not hasattr(net, "kernel"):
        raise TypeError(f"net must be an ntkit network (with .kernel), got "
                        f"{type(net).__name__}.")
    return KernelFunction(net, check_get(get), memory_budget=memory_budget)

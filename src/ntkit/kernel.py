"""The `Kernel` value that flows through an infinite-width network."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Kernel"]


@dataclass(frozen=True, eq=False)
class Kernel:
    """The NNGP and NTK of a batch pair at one point of an infinite-width network.

    A `Kernel` is an immutable value: layers return new kernels with
    :meth:`replace` and never modify the tensors they receive.

    Attributes:
        nngp: the NNGP covariance, shape ``(N1, N2, *spatial)``; ``(N, *spatial)``
            when ``diagonal`` is true (only ``k(x_i, x_i)`` is kept).
        ntk: the neural tangent kernel, same shape as ``nngp``.
        cov1: per-input variances ``k(x1_i, x1_i)``, shape ``(N1, *spatial)``.
        cov2: per-input variances ``k(x2_j, x2_j)``, shape ``(N2, *spatial)``.
        shape: per-example feature shape at this point of the network, channels
            first: ``(width,)`` for dense features. Widths matter only where the
            kernel depends on them (standard parameterization, concatenation).
        is_gaussian: whether the features are zero-mean Gaussian processes (the
            output of a `Linear` or a sum of them); nonlinear layers need it.
        is_input: whether no layer has been applied yet.
        x1_is_x2: whether both sides are the same forward pass over the same
            batch, so that ``nngp[i, i]`` pairs an input with itself (matters for
            Dropout).
        diagonal: whether only the diagonal ``k(x_i, x_i)`` is held.
    """

    nngp: Tensor
    ntk: Tensor
    cov1: Tensor
    cov2: Tensor
    shape: tuple[int, ...]
    is_gaussian: bool = False
    is_input: bool = False
    x1_is_x2: bool = False
    diagonal: bool = False

    # ------------------------------------------------------------------ values
    def replace(self, **changes: Any) -> "Kernel":
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    def variances(self) -> tuple[Tensor, Tensor]:
        """``cov1`` and ``cov2`` shaped to broadcast against ``nngp``.

        Returns ``(cov1[:, None], cov2[None, :])`` for a full kernel and
        ``(cov1, cov2)`` for a diagonal one.
        """
        if self.diagonal:
            return self.cov1, self.cov2
        return self.cov1.unsqueeze(1), self.cov2.unsqueeze(0)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """``(N1, N2)`` for a full kernel, ``(N,)`` for a diagonal one."""
        return tuple(self.nngp.shape[: 1 if self.diagonal else 2])

    @property
    def dtype(self) -> torch.dtype:
        return self.nngp.dtype

    @property
    def device(self) -> torch.device:
        return self.nngp.device

    # ------------------------------------------------------------ conversions
    def to(self, *args: Any, **kwargs: Any) -> "Kernel":
        """Moves or casts every tensor, with the arguments of `torch.Tensor.to`."""
        return self.replace(**{f: getattr(self, f).to(*args, **kwargs) for f in _TENSORS})

    def __getitem__(self, index: Any) -> "Kernel":
        """Selects rows (x1) and columns (x2): ``k[rows, cols]`` or ``k[rows]``.

        Integer indices keep their axis, so the result is always a `Kernel` of
        the same layout. A diagonal kernel takes one index, over its inputs.
        """
        if not isinstance(index, tuple):
            index = (index,)
        n_axes = 1 if self.diagonal else 2
        if len(index) > n_axes:
            raise IndexError(
                f"a {'diagonal' if self.diagonal else 'full'} Kernel takes at most "
                f"{n_axes} indices (over inputs), got {len(index)}"
            )
        sizes = (self.nngp.shape[0],) if self.diagonal else tuple(self.nngp.shape[:2])
        index = tuple(_keep_axis(i, n) for i, n in zip(index, sizes)) + (slice(None),) * (
            n_axes - len(index))
        if self.diagonal:
            (rows,) = index
            sel = self.cov1[rows]
            return self.replace(nngp=self.nngp[rows], ntk=self.ntk[rows], cov1=sel, cov2=sel)
        rows, cols = index
        same = self.x1_is_x2 and _same_index(rows, cols)
        return self.replace(
            nngp=self.nngp[rows][:, cols],
            ntk=self.ntk[rows][:, cols],
            cov1=self.cov1[rows],
            cov2=self.cov2[cols],
            x1_is_x2=same,
        )

    def __repr__(self) -> str:
        kind = "diagonal " if self.diagonal else ""
        return (
            f"Kernel({kind}nngp={tuple(self.nngp.shape)}, ntk={tuple(self.ntk.shape)}, "
            f"shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


_TENSORS = ("nngp", "ntk", "cov1", "cov2")


def _keep_axis(index: Any, size: int) -> Any:
    """An integer-like index as a one-element slice (the axis is kept)."""
    if isinstance(index, (slice, list)) or (isinstance(index, Tensor) and index.ndim > 0):
        return index
    try:
        i = operator.index(index)
    except TypeError:
        return index
    try:
        i = range(size)[i]
    except IndexError:
        raise IndexError(f"index {i} is out of range for {size} inputs") from None
    return slice(i, i + 1)


def _same_index(rows: Any, cols: Any) -> bool:
    if isinstance(rows, slice) and isinstance(cols, slice):
        return rows == cols
    return False

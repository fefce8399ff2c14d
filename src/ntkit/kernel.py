"""The `Kernel` value that flows through an infinite-width network, and the first
conversion of inputs into one (`input_kernel`).

This module sits at the bottom of the layer algebra: it imports nothing of
ntkit, tiling builds on it, and layers on tiling.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Kernel", "SelfTrace", "input_kernel", "same_inputs"]


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
        position_pairs: for features with spatial axes ``S`` (``shape[1:]``),
            whether the covariance between every pair of positions is held:
            ``nngp`` is then ``(N1, N2, *S, *S)`` (position ``p`` of ``x1`` against
            ``p'`` of ``x2``) and ``cov1`` the per-example ``(N1, *S, *S)``.
            Without it only matching positions are held: ``(N1, N2, *S)`` and
            ``(N1, *S)``. Pooling and attention need the pairs; a network
            computes them only when a layer needs them.
        cov_pairs: with ``position_pairs``, whether ``cov1``/``cov2`` hold each
            example's covariance between all its positions ``(N, *S, *S)``
            (True) or only its per-position variances ``(N, *S)`` (False). Tiles
            use the cheaper form and take what the layers that mix positions need
            from ``self_trace``, a pass over each example alone made beforehand.
        self_trace: that pass (see `SelfTrace`), or None.
        ntk_per_channel: whether the NTK holds a term that differs from channel to
            channel and is correlated with the features: the gradient of a trained
            per-channel scale (`LayerNorm` with ``affine=True``) is the feature
            itself. The recursion averages it correctly through layers that are
            linear in each channel (pooling, sums, LayerNorm, readouts) and the next
            layer that sums over channels with fresh weights (`Linear`, convolutions,
            attention) averages it away; a nonlinearity before that refuses it
            (`require_gaussian`). A layer that returns ``is_gaussian=True`` made
            fresh features from weights, so `replace` clears the flag then, unless
            the layer passes it.
        inputs: while ``is_input``, the inputs ``(x1, x2)`` themselves (``x2`` None
            when ``x1_is_x2``), so that a first convolution can work from patches.
        side: per-example side inputs of this tile, by name, each a pair
            ``(for x1, for x2)`` with the batch axis first: ``"mask"`` (booleans
            ``(N, *S)`` at the current spatial shape, True where a position is
            present) and ``"pattern"`` (graph adjacency). For a diagonal kernel,
            or when ``x1_is_x2``, both entries are the same tensor. Layers that
            change the spatial shape replace the mask (see :meth:`with_side`);
            the values are data, never differentiated.
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
    position_pairs: bool = False
    cov_pairs: bool = True
    self_trace: SelfTrace | None = None
    ntk_per_channel: bool = False
    inputs: tuple[Tensor, Tensor | None] | None = None
    side: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ values
    def replace(self, **changes: Any) -> Kernel:
        """A copy with the given fields changed. A new ``nngp`` drops ``inputs``
        (they describe the input kernel only)."""
        if "nngp" in changes:
            changes.setdefault("inputs", None)
        if changes.get("is_gaussian") is True:
            changes.setdefault("ntk_per_channel", False)
        return dataclasses.replace(self, **changes)

    def side_pair(self, name: str) -> tuple[Any, Any] | None:
        """The side input ``name`` of this tile as ``(for x1, for x2)``, or None
        when the call gave none (see ``side``)."""
        return self.side.get(name)

    def with_side(self, name: str, pair: tuple[Any, Any] | None) -> Kernel:
        """A copy whose side input ``name`` is ``pair`` (None removes it)."""
        side = {k: v for k, v in self.side.items() if k != name}
        if pair is not None:
            side[name] = pair
        return dataclasses.replace(self, side=side)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The spatial axes of the features (``shape[1:]``); ``()`` for dense ones."""
        return tuple(self.shape[1:])

    def position_variances(self) -> tuple[Tensor, Tensor]:
        """Per-position variances of x1 and x2: ``(N1, *S)`` and ``(N2, *S)``."""
        if not (self.position_pairs and self.cov_pairs):
            return self.cov1, self.cov2
        u1 = position_diagonal(self.cov1, 1)
        u2 = u1 if self.cov2 is self.cov1 else position_diagonal(self.cov2, 1)
        return u1, u2

    def variances(self) -> tuple[Tensor, Tensor]:
        """Per-position variances of x1 and x2 shaped to broadcast against ``nngp``.

        For a full kernel without position pairs these are ``cov1[:, None]`` and
        ``cov2[None, :]``; for a diagonal one ``cov1`` and ``cov2``.
        """
        return self.broadcast_pair(*self.position_variances())

    def broadcast_pair(self, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example (and per-position) quantities of x1 and x2, shapes
        ``(N1, *S)`` and ``(N2, *S)`` (``S`` may be all ones), shaped to
        broadcast against ``nngp``."""
        ns = len(self.spatial_shape) if self.position_pairs else 0
        ones = (1,) * ns
        if self.diagonal:
            if not ns:
                return a1, a2
            return (a1.reshape(*a1.shape, *ones),
                    a2.reshape(a2.shape[0], *ones, *a2.shape[1:]))
        return (a1.reshape(a1.shape[0], 1, *a1.shape[1:], *ones),
                a2.reshape(1, a2.shape[0], *ones, *a2.shape[1:]))

    def broadcast_self(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """A per-example, per-position quantity ``(N, *S)`` shaped to broadcast
        against ``cov1`` on its two position sides."""
        if not (self.position_pairs and self.cov_pairs):
            return a, a
        ones = (1,) * len(self.spatial_shape)
        return a.reshape(*a.shape, *ones), a.reshape(a.shape[0], *ones, *a.shape[1:])

    def self_pairs(self, t: Tensor) -> Tensor:
        """A writable view of the entries of ``t`` (laid out like ``nngp``) that
        pair an input with itself at the same position: shape ``(N, *S)``.

        Only meaningful when ``x1_is_x2`` or ``diagonal``.
        """
        s = self.spatial_shape
        n = t.shape[0]
        if self.diagonal and not self.position_pairs:
            return t
        if not self.position_pairs:
            return torch.diagonal(t, 0, 0, 1).movedim(-1, 0)
        p = math.prod(s)
        if self.diagonal:
            d = t.view(n, p, p).diagonal(0, 1, 2)
        else:
            d = t.view(n, n, p, p).diagonal(0, 0, 1).diagonal(0, 0, 1)
        return d.unflatten(1, s) if s else d[:, 0]

    def to_position_diagonal(self) -> Kernel:
        """The same kernel holding only matching positions (drops position pairs)."""
        if not self.position_pairs:
            return self
        b = 1 if self.diagonal else 2
        cov1, cov2 = self.position_variances()
        return self.replace(
            nngp=position_diagonal(self.nngp, b), ntk=position_diagonal(self.ntk, b),
            cov1=cov1, cov2=cov2, position_pairs=False, cov_pairs=True,
        )

    def self_covariances(self, compute, record=None, *, diagonal_result=None
                         ) -> tuple[Tensor, Tensor]:
        """``cov1`` and ``cov2`` after a layer that mixes positions.

        ``compute(cov)`` maps a full per-example covariance ``(N, *S, *S)`` to
        the layer's output; with ``cov_pairs`` it is applied here, otherwise the
        values come from ``self_trace`` (recorded by the same call in a pass
        over each example alone). ``record(value)`` gives what is stored and
        replayed (default: the value itself). For a diagonal kernel, whose
        covariances are its nngp, ``diagonal_result`` is the layer's output
        nngp, used instead of computing it again.
        """
        if not (self.position_pairs and self.cov_pairs):
            return self.self_trace.replay()
        if self.diagonal and diagonal_result is not None:
            cov1 = cov2 = diagonal_result
        else:
            cov1 = compute(self.cov1)
            cov2 = cov1 if self.cov2 is self.cov1 else compute(self.cov2)
        if self.self_trace is not None:
            self.self_trace.record(cov1 if record is None else record(cov1))
        return cov1, cov2


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
    def to(self, *args: Any, **kwargs: Any) -> Kernel:
        """Moves or casts every tensor, with the arguments of `torch.Tensor.to`."""
        return self.replace(**{f: getattr(self, f).to(*args, **kwargs) for f in _TENSORS})

    def __getitem__(self, index: Any) -> Kernel:
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
            side = {n: (a[rows],) * 2 for n, (a, _) in self.side.items()}
            return self.replace(nngp=self.nngp[rows], ntk=self.ntk[rows], cov1=sel, cov2=sel,
                                side=side)
        rows, cols = index
        same = self.x1_is_x2 and _same_index(rows, cols)
        return self.replace(
            nngp=self.nngp[rows][:, cols],
            ntk=self.ntk[rows][:, cols],
            cov1=self.cov1[rows],
            cov2=self.cov2[cols],
            x1_is_x2=same,
            side={n: (a[rows], b[cols]) for n, (a, b) in self.side.items()},
        )

    def __repr__(self) -> str:
        kind = ("diagonal " if self.diagonal else "") + (
            "position-pair " if self.position_pairs else "")
        return (
            f"Kernel({kind}nngp={tuple(self.nngp.shape)}, ntk={tuple(self.ntk.shape)}, "
            f"shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


_TENSORS = ("nngp", "ntk", "cov1", "cov2")


class SelfTrace:
    """What the layers that mix positions need of each example's own covariance.

    A kernel between position pairs needs, at each pooling or attention layer,
    every example's covariance between its own positions: ``(N, *S, *S)`` per
    example, as costly as one more pair of inputs. Tiles of ``r x c`` pairs
    would recompute it ``r + c`` times. Instead one pass over each example alone
    (``diagonal=True``) *records* at each such layer what the tiles need there,
    in call order, and every tile *replays* its rows and columns from it; in
    between, tiles carry only per-position variances (``cov_pairs=False``).
    """

    def __init__(self, x1: list | None = None, x2: list | None = None,
                 rows: slice | None = None, cols: slice | None = None) -> None:
        self.values: list[Tensor] = [] if x1 is None else x1
        self.x2 = x2
        self.rows, self.cols = rows, cols
        self.cursor = 0

    @property
    def recording(self) -> bool:
        return self.rows is None

    def record(self, value: Tensor) -> None:
        if self.recording:
            self.values.append(value)

    def replay(self) -> tuple[Tensor, Tensor]:
        if self.recording:
            raise RuntimeError("SelfTrace.replay called while recording")
        i = self.cursor
        self.cursor += 1
        a = self.values[i][self.rows]
        if self.x2 is None and self.rows == self.cols:
            return a, a
        return a, (self.values if self.x2 is None else self.x2)[i][self.cols]

    def for_tile(self, x2: SelfTrace | None, rows: slice, cols: slice) -> SelfTrace:
        """A replaying trace for the tile ``rows x cols`` (``x2=None``: k(x1, x1))."""
        return SelfTrace(self.values, None if x2 is None else x2.values, rows, cols)

    @staticmethod
    def joined(blocks: list[SelfTrace]) -> SelfTrace:
        """One recording from the recordings of consecutive blocks of examples."""
        return SelfTrace([torch.cat(parts) for parts in zip(*(b.values for b in blocks))])


def position_diagonal(t: Tensor, batch_dims: int) -> Tensor:
    """``t[..., p, p]`` of a tensor ``(*batch, *S, *S)``: shape ``(*batch, *S)``."""
    batch = t.shape[:batch_dims]
    rest = t.shape[batch_dims:]
    s = rest[: len(rest) // 2]
    p = math.prod(s)
    return t.reshape(*batch, p, p).diagonal(0, -2, -1).reshape(*batch, *s)


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


def input_kernel(x1: Tensor, x2: Tensor | None, *, diagonal: bool = False,
                 position_pairs: bool = False, cov_pairs: bool = True) -> Kernel:
    """The kernel of the inputs themselves: ``x1 . x2 / channels``.

    Dense inputs ``(N, features)`` give ``(N1, N2)``; inputs with spatial axes
    ``(N, C, *S)`` give the per-position channel average ``(N1, N2, *S)``, or
    with ``position_pairs`` every pair of positions, ``(N1, N2, *S, *S)``
    (``cov_pairs=False`` keeps only per-position variances in ``cov1``/``cov2``;
    see `Kernel.cov_pairs`).
    """
    x1_is_x2 = x2 is None
    if x2 is None:
        x2 = x1
    channels = x1.shape[1]
    spatial = tuple(x1.shape[2:])
    position_pairs = position_pairs and bool(spatial)
    cov_pairs = cov_pairs or diagonal
    if position_pairs:
        f1 = x1.reshape(x1.shape[0], channels, -1)
        f2 = x2.reshape(x2.shape[0], channels, -1)
        if cov_pairs:
            cov1 = torch.einsum("icp,icq->ipq", f1, f1).div_(channels).reshape(
                x1.shape[0], *spatial, *spatial)
            cov2 = cov1 if x1_is_x2 else torch.einsum("icp,icq->ipq", f2, f2).div_(
                channels).reshape(x2.shape[0], *spatial, *spatial)
        else:
            cov1 = (x1 * x1).sum(1) / channels
            cov2 = cov1 if x1_is_x2 else (x2 * x2).sum(1) / channels
        if diagonal:
            nngp = cov1
        else:
            nngp = torch.einsum("icp,jcq->ijpq", f1, f2).div_(channels).reshape(
                x1.shape[0], x2.shape[0], *spatial, *spatial)
    else:
        cov1 = (x1 * x1).sum(1) / channels
        cov2 = cov1 if x1_is_x2 else (x2 * x2).sum(1) / channels
        if diagonal:
            nngp = cov1
        elif x1.ndim == 2:
            nngp = (x1 @ x2.T) / channels
        else:
            # channels last and contiguous: torch's einsum over (N, C, *S) as laid out
            # takes a strided batched-matmul path ~40x slower (1.5 s for 256 x 8 x 32).
            c1 = x1.movedim(1, -1).contiguous()
            c2 = c1 if x2 is x1 else x2.movedim(1, -1).contiguous()
            nngp = torch.einsum("i...c,j...c->ij...", c1, c2) / channels
    if x1_is_x2 and not diagonal:
        # BLAS need not round (i, j) and (j, i) alike; k(x, x) must be exactly symmetric
        # (a + b rounds as b + a), or every layer after it inherits the asymmetry.
        swapped = nngp.transpose(0, 1)
        if position_pairs:
            ns = len(spatial)
            swapped = swapped.permute(0, 1, *range(2 + ns, 2 + 2 * ns), *range(2, 2 + ns))
        nngp = (nngp + swapped).mul_(0.5)
    return Kernel(
        nngp=nngp,
        ntk=torch.zeros((), dtype=nngp.dtype, device=nngp.device).expand(nngp.shape),
        cov1=cov1,
        cov2=cov2,
        shape=tuple(x1.shape[1:]),
        is_gaussian=False,
        is_input=True,
        x1_is_x2=x1_is_x2,
        diagonal=diagonal,
        position_pairs=position_pairs,
        cov_pairs=cov_pairs,
        inputs=(x1, None if x1_is_x2 else x2),
    )


def same_inputs(x1: Tensor, x2: Tensor | None) -> bool:
    """Whether ``x2`` is ``x1`` itself or a view of the same memory read the same way.

    ``k(x, x)`` written with one tensor twice then takes the symmetric path of
    ``k(x)`` (one triangle of tiles, mirrored; self-pairs exact). Equal values in
    distinct memory are deliberately not merged: ``k(x, x.clone())`` stays a cross
    kernel, so that a result never depends on whether a test batch happens to equal
    the training batch (a shuffled copy would take the other path and differ by
    rounding), and a copy stays a second batch where that matters (Dropout in
    training mode draws new masks for it).

    Args:
        x1: inputs ``(N1, *features)``.
        x2: inputs ``(N2, *features)``, or None.

    Returns:
        False for ``x2=None`` (nothing to merge) and for tensors of another
        shape, dtype, device or memory; True for the same tensor or the same
        memory read alike.
    """
    if x2 is None or not isinstance(x1, Tensor) or not isinstance(x2, Tensor):
        return False
    if x1 is x2:
        return True
    if x1.shape != x2.shape or x1.dtype != x2.dtype or x1.device != x2.device:
        return False
    if x1.device.type == "meta":
        return False  # no data to compare (and every meta tensor has the same address)
    return (x1.data_ptr() == x2.data_ptr() and x1.stride() == x2.stride()
            and x1.storage_offset() == x2.storage_offset())

"""Time recursions over pairs of steps: the pure kernel math of recurrent layers.

A recurrent layer's kernel between step ``t`` of one sequence and step ``t'`` of
another depends on the kernel at ``(t - 1, t' - 1)`` (the previous hidden
states) and on the input kernel at ``(t, t')``: values propagate along the
diagonals ``t - t' = const`` of the step-pair grid. `scan_step_pairs` runs any
such recursion row by row (all ``t'`` of one ``t`` at once), given a per-step
update; `elman_pairs` is the Elman network's update (Alemohammad et al. 2021).
Gated cells (GRU, LSTM) can reuse `scan_step_pairs` with their own update.

Layouts. A *pair batch* ``B`` is ``(N1, N2)`` for a full kernel or ``(N,)`` for a
diagonal one (each example with itself). Step-pair tensors are ``(*B, L, P)``:
``P = L'`` columns ``t' = 0 .. L'-1`` (the full grid), or ``P = 1`` column
``t' = t`` (the *chain* of matching steps, all a readout needs when every
sequence has the same length and only matching steps are read).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ElmanCoefficients", "PairGrid", "elman_pairs", "reverse_steps", "scan_step_pairs",
           "stack_directions"]


@dataclass(frozen=True)
class PairGrid:
    """Which step pairs a recursion computes, for which pair batch.

    Attributes:
        diagonal: the pair batch is ``(N,)`` (each example with itself), not ``(N1, N2)``.
        chain: only matching steps ``t' = t`` (one column), not the full grid.
        self_pairs: whether entry ``(i, i)`` of a full batch (every entry of a
            diagonal one) pairs a sequence with itself in the same forward pass,
            so that at ``t = t'`` both sides are one random variable.
    """

    diagonal: bool
    chain: bool
    self_pairs: bool

    def columns(self, t: int, steps2: int, device) -> Tensor:
        """The ``t'`` of the columns of row ``t``."""
        if self.chain:
            return torch.tensor([t], device=device)
        return torch.arange(steps2, device=device)

    def row_variance(self, q1: Tensor, t: int) -> Tensor:
        """Per-example quantity ``(N1, L)`` of x1 at step ``t``, broadcast against a row
        ``(*B, P)``."""
        v = q1[:, t]
        return v[:, None] if self.diagonal else v[:, None, None]

    def column_variance(self, q2: Tensor, cols: Tensor) -> Tensor:
        """Per-example quantity ``(N2, L')`` of x2 at the columns, broadcast against a
        row ``(*B, P)``."""
        v = q2[:, cols]
        return v if self.diagonal else v[None]

    def self_pair_mask(self, n: int, t: int, cols: Tensor, like: Tensor) -> Tensor | None:
        """Booleans ``(*B, P)`` (broadcastable) true at the entries that pair a
        sequence with itself at the same step, or None when there are none."""
        if not self.self_pairs:
            return None
        same_step = cols == t
        if not bool(same_step.any()):
            return None
        if self.diagonal:
            return same_step[None, :]
        eye = torch.eye(n, dtype=torch.bool, device=like.device)
        return eye[:, :, None] & same_step[None, None, :]


def scan_step_pairs(
    steps1: int,
    steps2: int,
    grid: PairGrid,
    update: Callable[[int, Tensor, tuple[Tensor, ...] | None, Tensor], tuple[Tensor, ...]],
    device,
) -> tuple[Tensor, ...]:
    """Runs a recursion in which the value at ``(t, t')`` depends on ``(t - 1, t' - 1)``.

    Rows ``t = 0 .. steps1 - 1`` are computed one after another, every column
    of a row at once. ``update(t, cols, prev, first)`` returns the state of row
    ``t`` as a tuple of tensors ``(*B, P)``; ``prev`` is the state at
    ``(t - 1, cols - 1)`` (same layout; None for ``t = 0``), whose entries
    where ``first`` (booleans ``(P,)``: ``t = 0`` or ``t' = 0``, the chains'
    starts) are zero and must be replaced by the initial condition.

    Args:
        steps1: ``L``, steps of the x1 sequences.
        steps2: ``L'``, steps of the x2 sequences (``L`` for a chain).
        grid: the layout (see `PairGrid`).
        update: the per-step rule.
        device: where the column indices live.

    Returns:
        The states of all rows, each ``(*B, L, P)``.
    """
    rows: list[tuple[Tensor, ...]] = []
    prev: tuple[Tensor, ...] | None = None
    for t in range(steps1):
        cols = grid.columns(t, steps2, device)
        first = (cols == 0) | (t == 0)
        if prev is not None and not grid.chain:
            # (t - 1, t' - 1): shift the previous row one column to the right.
            prev = tuple(torch.nn.functional.pad(p[..., :-1], (1, 0)) for p in prev)
        state = update(t, cols, prev, first)
        rows.append(state)
        prev = state
    return tuple(torch.stack(parts, dim=-2) for parts in zip(*rows))


def reverse_steps(t: Tensor, lengths: Tensor | None, axis: int, batch_axis: int) -> Tensor:
    """``t`` with each sequence's present steps reversed along ``axis``.

    Step ``s`` of example ``n`` (along ``batch_axis``) takes step
    ``lengths[n] - 1 - s`` (mod L: the steps past a sequence's end receive
    values that the caller masks). Applying it twice gives back the present steps.

    Args:
        t: any tensor with a batch axis and a step axis.
        lengths: ``(N,)`` present steps per example, or None (all present: a flip).
        axis: the step axis.
        batch_axis: the axis of the examples the lengths belong to.
    """
    if lengths is None:
        return t.flip(axis)
    steps = t.shape[axis]
    ar = torch.arange(steps, device=t.device)
    idx = (lengths.to(t.device)[:, None] - 1 - ar[None, :]) % steps  # (N, L)
    shape = [1] * t.ndim
    shape[batch_axis] = idx.shape[0]
    shape[axis] = steps
    idx = idx.reshape(shape).expand(*[s if i != axis else steps for i, s in enumerate(t.shape)])
    return torch.gather(t, axis, idx)


@dataclass(frozen=True)
class ElmanCoefficients:
    """The scalars of one Elman layer's recursion (0-dim tensors or floats)."""

    w2: Tensor  # recurrent weight variance w_std^2
    u2: Tensor  # input weight variance u_std^2
    b2: Tensor | float  # bias variance b_std^2 (0 without a bias)
    h0: Tensor | float  # initial-state variance h0_std^2
    standard: bool  # standard parameterization
    width: int  # n, the hidden width (standard parameterization's recurrent fan-in)
    fan_in: int  # m, the input width
    bias_grads: float  # standard parameterization: NTK of the bias parameters (0, 1 or 2)

    def h0_applies(self, grid: PairGrid) -> bool:
        """Whether a random initial state adds to some entry of the grid."""
        return grid.self_pairs and not (isinstance(self.h0, float) and self.h0 == 0.0)


def elman_pairs(
    activation,
    coef: ElmanCoefficients,
    grid: PairGrid,
    kin: Tensor,
    tin: Tensor,
    qin1: Tensor,
    qin2: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NNGP and NTK of the hidden states ``h_t = phi(g_t)`` of one Elman layer (one
    direction) at every step pair of the grid.

    With ``g_t = (w/sqrt(n)) W h_{t-1} + (u/sqrt(m)) U x_t + b beta`` (NTK
    parameterization), the recursion of Alemohammad et al. 2021 (*The recurrent
    neural tangent kernel*, ICLR; Theorem 1, the RNTK recursion, with an input kernel
    from earlier layers and a random initial state) is, at step pair ``(t, t')``::

        Sigma_{t,t'}  = w^2 E[phi(g_{t-1}) phi(g'_{t'-1})] + u^2 K^in_{t,t'} + b^2
        Theta_{t,t'}  = Sigma_{t,t'} + u^2 Theta^in_{t,t'}
                        + w^2 E[phi'(g_{t-1}) phi'(g'_{t'-1})] Theta_{t-1,t'-1}
        nngp(h)_{t,t'} = E[phi(g_t) phi(g'_{t'})],  ntk(h)_{t,t'} = E[phi' phi'] Theta_{t,t'}

    the expectations over ``(g_t, g'_{t'}) ~ N(0, [[q_t, Sigma], [Sigma, q'_{t'}]])``
    with the per-sequence variances ``q_t = w^2 E[phi(g_{t-1})^2] + u^2
    K^in_{t,t} + b^2``. At a chain's start (``t = 0`` or ``t' = 0``) the previous
    "hidden state" is the initial state ``h_{-1}``: drawn independently per
    sequence with variance ``h0_std^2``, it adds ``w^2 h0_std^2`` at ``(0, 0)``
    for a sequence paired with itself and nothing otherwise, and contributes no
    NTK (it is not trained). Standard parameterization: the same NNGP, and the
    NTK's direct terms become ``n E[phi phi'] + m K^in + (bias gradients)`` in
    place of ``Sigma`` (neural-tangents' ``Dense`` convention).

    Args:
        activation: an `ntkit.layers.Activation` (its ``_nngp_and_dot``,
            ``_variance`` and ``_self_dot``).
        coef: the layer's scalars.
        grid: the step-pair layout.
        kin: input NNGP at the step pairs ``(*B, L, P)``.
        tin: input NTK at the step pairs ``(*B, L, P)``.
        qin1: per-step input variances of x1 ``(N1, L)``.
        qin2: per-step input variances of x2 ``(N2, L')``.

    Returns:
        ``(nngp, ntk, e1, e2)``: the hidden states' NNGP and NTK ``(*B, L, P)``
        and their per-step variances ``E[phi(g_t)^2]`` for x1 ``(N1, L)`` and x2
        ``(N2, L')``.
    """
    w2, u2, b2, h0 = coef.w2, coef.u2, coef.b2, coef.h0
    q1, e1, d1 = _self_recursion(activation, w2, u2, b2, h0, qin1)
    if qin2 is qin1:
        q2, e2 = q1, e1
    else:
        q2, e2, _ = _self_recursion(activation, w2, u2, b2, h0, qin2)
    n = kin.shape[0]

    def update(t, cols, prev, first):
        if prev is None:
            prev_e = torch.zeros_like(kin[..., t, :])
            prev_theta = prev_e
        else:
            keep = ~first
            prev_e = prev[0] * keep
            prev_theta = prev[1] * keep
        if t == 0 and coef.h0_applies(grid):
            at_start = grid.self_pair_mask(n, 0, cols, kin)
            if at_start is not None:
                prev_e = prev_e + at_start.to(kin.dtype) * h0
        k_in, t_in = kin[..., t, :], tin[..., t, :]
        sigma = w2 * prev_e + u2 * k_in + b2
        if coef.standard:
            direct = coef.width * prev_e + coef.fan_in * k_in + coef.bias_grads
        else:
            direct = sigma
        theta = direct + u2 * t_in + w2 * prev_theta
        v1 = grid.row_variance(q1, t)
        v2 = grid.column_variance(q2, cols)
        nngp, dot = activation._nngp_and_dot(sigma, v1, v2)
        same = grid.self_pair_mask(n, t, cols, kin)
        if same is not None:  # a sequence with itself: correlation exactly 1
            nngp = torch.where(same, grid.row_variance(e1, t), nngp)
            dot = torch.where(same, grid.row_variance(d1, t), dot)
        return nngp, dot * theta

    nngp, ntk = scan_step_pairs(kin.shape[-2], qin2.shape[1], grid, update, kin.device)
    return nngp, ntk, e1, e2


def _self_recursion(activation, w2, u2, b2, h0, qin: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence variances along the steps: ``q_t`` (pre-activation),
    ``E[phi(g_t)^2]`` and ``E[phi'(g_t)^2]``, each ``(N, L)``."""
    qs, es, ds = [], [], []
    prev = torch.zeros_like(qin[:, 0]) + h0
    for t in range(qin.shape[1]):
        q = w2 * prev + u2 * qin[:, t] + b2
        e = activation._variance(q)
        qs.append(q)
        es.append(e)
        ds.append(activation._self_dot(q))
        prev = e
    return torch.stack(qs, 1), torch.stack(es, 1), torch.stack(ds, 1)


def stack_directions(parts: Sequence[Tensor]) -> Tensor:
    """The kernel of features concatenated over directions: the mean of theirs."""
    return parts[0] if len(parts) == 1 else sum(parts) / len(parts)

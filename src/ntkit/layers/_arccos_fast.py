"""The arc-cosine map of the ReLU family on a whole tile in few passes.

`ABReLU` (``f(x) = a x`` for ``x < 0``, ``b x`` for ``x >= 0``) maps a kernel with
covariance ``[[v1, k], [k, v2]]`` to (Cho & Saul 2009, Eq. (6) with ``n = 0, 1``;
``phi = pi - theta = arccos(-k / sqrt(v1 v2))``, so ``sin(phi) = sin(theta)``)::

    E[f f]   = a b k + (b - a)^2 (k phi + sqrt(v1 v2) sin(phi)) / (2 pi)
    E[f' f'] = a b + (b - a)^2 phi / (2 pi)

`arc_cosine` evaluates both (and the NTK product ``ntk * E[f' f']`` when given the
incoming NTK) by one sequence of operations. Without autograd it makes two fresh
tiles and runs every other pass in place: fresh tiles of a few MiB each cost a
round of page faults, which on CPU took longer than the arithmetic. With autograd
the same operations run out of place, so that both modes give the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["arc_cosine"]


def arc_cosine(k: Tensor, v1: Tensor, v2: Tensor, a: float, b: float,
               ntk: Tensor | None = None, *, arccos: Callable[[Tensor], Tensor] = torch.arccos,
               sqrt: Callable[[Tensor], Tensor] = torch.sqrt) -> tuple[Tensor, Tensor]:
    """``(E[f f], E[f' f'])`` of `ABReLU(a, b)`, or ``(E[f f], ntk * E[f' f'])``.

    Args:
        k: the covariance tile ``(N1, N2, ...)``; not modified.
        v1, v2: the variances of the two sides, broadcasting to ``k``.
        a, b: the slopes below and above zero.
        ntk: the incoming NTK (broadcasting to ``k``), or None for ``E[f' f']`` itself.
        arccos, sqrt: the functions used under autograd (`ntkit.layers.activations`'
            ``_arccos`` / ``_safe_sqrt``, whose gradients stay finite at ``|c| = 1``
            and at zero variance); their values must be torch's.

    Returns:
        Two new tensors of ``k``'s broadcast shape. A zero variance gives
        correlation 0 there instead of NaN.
    """
    tensors = (k, v1, v2) if ntk is None else (k, v1, v2, ntk)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # In place only on fresh tiles of k's shape and dtype; otherwise the same ops out of place.
    own = not grad and all(t.dtype == k.dtype for t in tensors) and \
        torch.broadcast_shapes(k.shape, v1.shape, v2.shape) == k.shape
    r1, r2 = sqrt(v1), sqrt(v2)
    if bool((v1 == 0).any()) or bool((v2 == 0).any()):  # checks vectors, not the tile
        scale = r1.neg() * r2
        nonzero = scale != 0
        cos = torch.where(nonzero, k / torch.where(nonzero, scale, 1.0), 0.0)
    else:  # the negation rides on the small vector, not on the tile
        cos = torch.div(k, r1.neg())
        cos = cos.div_(r2) if own else cos / r2
    if own:
        phi = cos.clamp_(-1.0, 1.0).arccos_()
    else:
        phi = arccos(cos.clamp(-1.0, 1.0))
    c = (b - a) ** 2 / (2 * math.pi)
    ab = a * b
    s = torch.sin(phi)
    if own:
        nngp = s.mul_(r1 * c).mul_(r2).addcmul_(phi, k, value=c)
        if ab != 0:
            nngp.add_(k, alpha=ab)
        dot = phi.mul_(c)
        if ab != 0:
            dot.add_(ab)
        if ntk is not None:
            dot = dot.mul_(ntk) if ntk.shape == dot.shape else dot * ntk
        return nngp, dot
    nngp = torch.addcmul(s * (r1 * c) * r2, phi, k, value=c)
    if ab != 0:
        nngp = torch.add(nngp, k, alpha=ab)
    dot = phi * c
    if ab != 0:
        dot = dot + ab
    return nngp, (dot if ntk is None else dot * ntk)

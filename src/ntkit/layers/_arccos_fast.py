"""The arc-cosine map of the ReLU family on a whole tile in few passes.

`ABReLU` (``f(x) = a x`` for ``x < 0``, ``b x`` for ``x >= 0``) maps a kernel with
covariance ``[[v1, k], [k, v2]]`` to (Cho & Saul 2009, Eq. (6) with ``n = 0, 1``;
``phi = pi - theta = arccos(-k / sqrt(v1 v2))``)::

    E[f f]   = a b k + (b - a)^2 (k phi + sqrt(v1 v2) sin(phi)) / (2 pi)
    E[f' f'] = a b + (b - a)^2 phi / (2 pi)

`arc_cosine_tile` evaluates both, and the NTK product ``ntk * E[f' f']``, with two
fresh tiles and every other pass in place: fresh tiles of a few MiB each cost a
round of page faults, which on CPU took longer than the arithmetic. It serves the
common case only (no autograd, no zero variance) and returns None otherwise, so
that the caller falls back to the general rule (`ABReLU._nngp_and_dot`), which
keeps the gradients and the zero-variance handling.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["arc_cosine_tile"]


def arc_cosine_tile(k: Tensor, v1: Tensor, v2: Tensor, ntk: Tensor, a: float, b: float
                    ) -> tuple[Tensor, Tensor] | None:
    """``(E[f f], ntk * E[f' f'])`` of `ABReLU(a, b)`, or None where it does not apply.

    Args:
        k: the covariance tile ``(N1, N2, ...)``; not modified.
        v1, v2: the variances of the two sides, broadcasting to ``k`` (the
            per-example, per-position variances, not full tiles).
        ntk: the incoming NTK, of ``k``'s shape and dtype; not modified.
        a, b: the slopes below and above zero.

    Returns:
        The two new tiles, or None when a tensor requires grad (with grad mode
        on), a variance is zero, or the shapes or dtypes differ from ``k``'s.
    """
    tensors = (k, v1, v2, ntk)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if any(t.dtype != k.dtype or t.device != k.device for t in tensors):
        return None
    if ntk.shape != k.shape or torch.broadcast_shapes(k.shape, v1.shape, v2.shape) != k.shape:
        return None
    if bool((v1 == 0).any()) or bool((v2 == 0).any()):
        return None
    r1, r2 = torch.sqrt(v1), torch.sqrt(v2)
    # phi = arccos(-cos): the negation rides on the small vector, not on the tile.
    phi = torch.div(k, r1.neg()).div_(r2).clamp_(-1.0, 1.0).arccos_()
    half_pi = 1 / (2 * math.pi)
    d2, ab = (b - a) ** 2, a * b
    # nngp = (b - a)^2 / (2 pi) (sqrt(v1 v2) sin(phi) + k phi) + a b k
    nngp = torch.sin(phi).mul_(r1 * (d2 * half_pi)).mul_(r2).addcmul_(phi, k,
                                                                        value=d2 * half_pi)
    if ab != 0:
        nngp.add_(k, alpha=ab)
    dot = phi.mul_(d2 * half_pi)
    if ab != 0:
        dot.add_(ab)
    return nngp, dot.mul_(ntk)

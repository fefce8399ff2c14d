"""Exact Gaussian product moments of piecewise-linear activations for 3-4 inputs.

For `ABReLU` ``s(z) = a z + (b - a) relu(z)`` (ReLU, LeakyReLU, Abs) and a Gaussian
``Z ~ N(0, G)`` with ``D <= 4`` coordinates, computes
``E[prod_i s(Z_i)^{p_i}]`` to quadrature precision (~1e-13 relative) by sequential
conditioning (the Genz 1992 reduction of a multivariate normal integral to nested
one-dimensional ones, "Numerical computation of multivariate normal probabilities",
J. Comput. Graph. Stat. 1, sec. 2, with the integrand a product of activations):

- with the Cholesky factor ``G = L L^T`` and ``Z = L u``, ``u ~ N(0, I)``, integrate
  ``u_1, ..., u_{D-1}`` one after another; ``Z_j = sum_{i<j} L_ji u_i + L_jj u_j``;
- the last coordinate in closed form: given ``u_1..u_{D-1}``, ``Z_D ~ N(mu, L_DD^2)``
  with ``mu = sum_{i<D} L_Di u_i``, and for ``Y ~ N(mu, sigma^2)``, ``h = mu / sigma``::

      E[relu(Y)]   = mu Phi(h) + sigma phi(h)
      E[relu(Y)^2] = (mu^2 + sigma^2) Phi(h) + mu sigma phi(h)

  (the moments of a truncated normal; ``s = a y + (b - a) relu(y)``,
  ``s^2 = a^2 y^2 + (b^2 - a^2) relu(y)^2``), which is the arc-cosine kernel's
  computation (Cho & Saul 2009) with a mean;
- each one-dimensional integral over ``u_j`` is cut where a later coordinate's part so
  far, ``sum_{i<=j} L_ki u_i``, changes sign (``k >= j``; for ``k = j`` the kink of
  ``s(Z_j)`` itself) and at 0, and truncated to ``|u_j| <= 9``; Gauss-Legendre on each
  piece. The integrand is smooth on every piece (the inner integrals are smooth in the
  outer variables: their kinks are cut out and move smoothly), so the rule converges
  spectrally; the extra cuts for ``k > j`` keep it accurate when ``G`` is nearly
  singular (a later coordinate almost a function of the earlier ones puts a near-kink
  into the outer variables, which they cut out), and exact when it is singular. The
  closed form's near-kink (a boundary layer of width ``L_DD / |L_Dj|`` in the last
  numerical variable) gets graded cuts at 1 and 8 widths on either side.

Accuracy (tests/test_finite_four_point.py, 24 against 48 nodes per piece): ~1e-14
relative, for well-conditioned covariances and for nearly singular ones (a coordinate's
conditional variance 1e-2 .. 1e-8 of its variance, or 0).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from ._moments import pair_index

__all__ = ["abrelu_f4", "product_moment"]

#: Gauss-Legendre nodes per piece (pieces are at most 9 long: ~1e-15 for the Gaussian).
PIECE_NODES = 24
#: Truncation of each standard normal coordinate.
TAIL = 9.0


@functools.lru_cache(maxsize=4)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _closed(a: float, b: float, mu: Tensor, sigma: Tensor, power: int) -> Tensor:
    """``E[s(Y)^power]`` for ``Y ~ N(mu, sigma^2)``, ``power`` 1 or 2."""
    sigma = torch.clamp(sigma, min=1e-300)
    h = mu / sigma
    cdf = 0.5 * torch.special.erfc(-h / math.sqrt(2))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    if power == 1:
        return a * mu + (b - a) * (mu * cdf + sigma * pdf)
    second = mu * mu + sigma * sigma
    return a * a * second + (b * b - a * a) * (second * cdf + mu * sigma * pdf)


def _semidefinite_cholesky(cov: Tensor, rtol: float = 1e-13) -> list[list[Tensor]]:
    """Lower Cholesky factor ``(B,)`` entries of positive semi-definite ``(B, D, D)``: a
    pivot below ``rtol`` times its diagonal entry is a coordinate that the earlier ones
    determine; its column is set to 0 (not rounding noise divided by a tiny pivot)."""
    dim = cov.shape[1]
    zero = cov[:, 0, 0] * 0
    low = [[zero] * dim for _ in range(dim)]
    for i in range(dim):
        for j in range(i + 1):
            s = cov[:, i, j] - sum((low[i][k] * low[j][k] for k in range(j)), zero)
            if i == j:
                keep = s > rtol * cov[:, i, i].abs()
                low[i][i] = torch.where(keep, torch.sqrt(torch.clamp(s, min=0.0)), zero)
            else:
                pivot = low[j][j]
                low[i][j] = torch.where(pivot > 0, s / torch.where(pivot > 0, pivot, 1.0),
                                        zero)
    return low


def product_moment(a: float, b: float, cov: Tensor, powers: list[int], *,
                   nodes: int = PIECE_NODES) -> Tensor:
    """``E[prod_i s(Z_i)^{powers_i}]`` for ``Z ~ N(0, cov)``, ``s(z) = a z + (b - a) relu(z)``.

    Args:
        a, b: the slopes of ``s`` left and right of 0.
        cov: ``(B, D, D)`` float64 covariances (positive semi-definite), ``D <= 4``.
        powers: ``D`` positive ints; the last coordinate is done in closed form when its
            power is 1 or 2 (put such a coordinate last).
        nodes: Gauss-Legendre nodes per piece.

    Returns:
        ``(B,)``.
    """
    bsz, dim = cov.shape[0], cov.shape[1]
    if len(powers) != dim:
        raise ValueError(f"powers {powers} must give one power per coordinate ({dim}).")
    low = _semidefinite_cholesky(cov)
    closed = powers[-1] <= 2
    numeric = dim - 1 if closed else dim
    x, wl = (torch.as_tensor(v, dtype=cov.dtype) for v in _legendre(nodes))
    weight = cov.new_ones(bsz, 1)
    prod = cov.new_ones(bsz, 1)
    forms = [cov.new_zeros(bsz, 1) for _ in range(dim)]  # sum_{i<j} L_ki u_i, per k
    for j in range(numeric):
        col = [low[k][j][:, None] for k in range(dim)]
        if j == 0:
            cuts = [cov.new_zeros(bsz, 1)]
        else:
            cuts = [torch.zeros_like(forms[j])] + [-forms[k] / col[k] for k in range(j, dim)]
            if closed and j == numeric - 1:  # graded cuts around the closed form's near-kink
                layer = low[-1][-1][:, None] / col[-1].abs()
                cuts += [cuts[-1] + f * layer for f in (-8.0, -1.0, 1.0, 8.0)]
        cut = torch.clamp(torch.nan_to_num(torch.stack(cuts, -1), nan=0.0, posinf=TAIL,
                                           neginf=-TAIL), -TAIL, TAIL)
        edges = torch.cat([torch.full_like(cut[..., :1], -TAIL), cut.sort(-1).values,
                           torch.full_like(cut[..., :1], TAIL)], -1)
        lo, hi = edges[..., :-1, None], edges[..., 1:, None]  # (B, Q, S, 1)
        u = (lo + hi) / 2 + (hi - lo) / 2 * x  # (B, Q, S, N)
        w = (hi - lo) / 2 * wl * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
        u, w = u.flatten(2), w.flatten(2)  # (B, Q, S N)
        z = forms[j][..., None] + col[j][..., None] * u
        s = a * z + (b - a) * torch.relu(z)
        weight = (weight[..., None] * w).flatten(1)
        prod = (prod[..., None] * s ** powers[j]).flatten(1)
        forms = [(forms[k][..., None] + col[k][..., None] * u).flatten(1) if k > j
                 else forms[k] for k in range(dim)]
    if closed:
        prod = prod * _closed(a, b, forms[-1], low[-1][-1][:, None], powers[-1])
    return (weight * prod).sum(1)


def abrelu_f4(a: float, b: float, cov: Tensor, m: int, *, chunk: int = 8) -> Tensor:
    """``f4[p, q] = E[s_a s_b s_c s_d]`` over the pairs ``p = (a, b)``, ``q = (c, d)`` of
    `pair_index` for a batch of ``m x m`` covariances given by their pair entries.

    Args:
        a, b: the slopes of the `ABReLU`.
        cov: ``(B, P)`` pair entries (order of `pair_index`).
        m: the number of inputs.
        chunk: covariances per call of `product_moment` (bounds memory: ~0.5M nodes
            each for four distinct inputs).

    Returns:
        ``(B, P, P)``.
    """
    ia, ib = pair_index(m)
    p = len(ia)
    full = cov.new_zeros(cov.shape[0], m, m)
    for k, (i, j) in enumerate(zip(ia, ib)):
        full[:, i, j] = full[:, j, i] = cov[:, k]
    out = cov.new_zeros(cov.shape[0], p, p)
    for q1 in range(p):
        for q2 in range(q1, p):
            idx = [ia[q1], ib[q1], ia[q2], ib[q2]]
            counts = {v: idx.count(v) for v in sorted(set(idx))}
            order = sorted(counts, key=lambda v: -counts[v])  # lowest power last
            powers = [counts[v] for v in order]
            sub = full[:, order][:, :, order]
            val = torch.cat([product_moment(a, b, sub[s:s + chunk], powers)
                             for s in range(0, sub.shape[0], chunk)])
            out[:, q1, q2] = out[:, q2, q1] = val
    return out

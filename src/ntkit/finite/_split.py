"""The split rule: Gaussian expectations of saturating activations, whose change is
concentrated around zero, by Gauss-Legendre panels that meet where each pre-activation
crosses zero (`split_nodes`), and which activations it and `ntkit.finite._price` serve.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layers.activations import Activation

#: Gauss-Legendre nodes per panel of the split rule (`split_nodes`) for ``m`` inputs.
SPLIT_NODES = {1: 16, 2: 10, 3: 4, 4: 4}
#: The split rule integrates each standard normal coordinate over ``[-T, T]``.
SPLIT_TAIL = 9.0
#: Fixed panel ends of the split rule, for the Gaussian weight itself.
SPLIT_FIXED = (-4.5, -2.5, -1.0, 1.0, 2.5, 4.5)


#: Activations with classical derivatives of every order (`ntkit.finite._price`).
SMOOTH = ("Erf", "Tanh", "Sigmoid", "Softplus", "GELU", "Gabor", "Exp", "ExpNormalized",
           "Sin", "Gaussian", "Monomial", "Polynomial", "Hermite")


def smooth(act: Activation) -> bool:
    names = {c.__name__ for c in type(act).__mro__}
    return bool(names & set(SMOOTH))


def hermite_suits(act: Activation) -> bool:
    """Whether the Gauss-Hermite product rule is the right one for ``act``: polynomials
    (exact), and entire functions of exponential type (``exp``, ``sin``), whose Gaussian
    tails reach beyond the split rule's truncation at ``SPLIT_TAIL``."""
    from ..layers.activations import Exp, Gaussian, Sin
    from ..layers.polynomial import Monomial
    from ..layers.special import ExpNormalized, Hermite, Polynomial

    if isinstance(act, Gaussian):
        return float(act.b) > 0  # exp(b x^2) with b > 0: heavy tails
    return isinstance(act, (Exp, ExpNormalized, Sin, Monomial, Polynomial, Hermite))


def hermite_e(t: Tensor, degree: int) -> list[Tensor]:
    """The probabilists' Hermite polynomials ``He_0(t) .. He_degree(t)``
    (``He_{j+1} = t He_j - j He_{j-1}``)."""
    he = [torch.ones_like(t), t][:degree + 1]
    for j in range(1, degree):
        he.append(t * he[j] - j * he[j - 1])
    return he


def _match_moments(t: Tensor, w: Tensor, *, degree: int = 5, sweeps: int = 2) -> Tensor:
    """Weights ``w (Q, K)`` on nodes ``t (Q, K)`` corrected so that each row integrates
    the Hermite polynomials ``He_0 .. He_degree`` (so ``1, t, .., t^degree``) exactly
    against ``N(0, 1)``: ``w <- w (1 + sum_j c_j He_j(t))`` with ``c_j = (E[He_j] -
    sum w He_j) / j!`` (the Hermite polynomials are orthogonal with norms ``j!``, so a
    sweep removes the error but a part the size of the rule's own error, ~1e-8).

    Why: the split rule's panels are not symmetric about 0, so its ``sum w t`` is not
    exactly 0. Near a singular covariance (nearly collinear inputs) a coordinate's
    conditional deviation ``L_kk`` is small and the integrand is nearly a low-degree
    polynomial in ``t_k``, which the matched rule then integrates exactly, as
    Gauss-Hermite does (before Price's theorem took the derivatives, the derivatives
    through ``L_kk`` multiplied the unmatched error by ``1 / L_kk^2``).
    """
    he = hermite_e(t, degree)
    for _ in range(sweeps):
        factor = torch.ones_like(t)
        for j, h in enumerate(he):
            miss = float(j == 0) - (w * h).sum(1, keepdim=True)
            factor = factor + miss / math.factorial(j) * h
        w = w * factor
    return w


def split_nodes(low: list[list[Tensor]], x: Tensor, wl: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """The split rule: ``Z = L t`` with ``t ~ N(0, I_m)`` integrated one coordinate at a
    time (``t_k`` given ``t_1 .. t_{k-1}``) by Gauss-Legendre on six panels of ``[-T, T]``
    that meet at ``t*_k``, the value at which ``Z_k`` crosses zero, and at the points
    where ``Z_k = +-1/2`` and ``+-2`` (clamped to ``[-T, T]``; empty panels weigh 0).

    Saturating activations (erf, tanh, sigmoid, GELU's Gaussian cdf) change fastest
    around zero, at a scale ``1 / sqrt(variance)`` that Gauss-Hermite nodes (spaced
    ``~ 3 / sqrt(nodes)``) do not resolve once the variance is a few units: the
    product rule's error in ``E[s'_a s'_b s'_c s'_d]`` and in the second derivatives
    reaches 1e-2 at variance 3 and 1e1 at variance 10 (48 nodes per axis). Here every
    zero crossing sits at a panel end, where Gauss-Legendre nodes crowd, and a kink or
    jump at zero (user functions, `Sign`) is integrated exactly. Returns nodes
    ``(Q, m)`` and weights ``(Q,)`` with ``Q = (6 n)^m``, differentiable in ``low``.
    """
    m = len(low)
    tail = SPLIT_TAIL
    ts: list[Tensor] = []
    w = torch.ones(1, dtype=x.dtype) + 0 * low[0][0]
    for k in range(m):
        shift = sum((low[k][j] * ts[j] for j in range(k)), torch.zeros_like(w))
        lkk = low[k][k]
        star = -shift / lkk
        # panel ends: the zero crossing, then graded at 1/2 and 2 units of Z_k (the scale
        # of an activation's transition) on each side, all inside [-T, T]
        moving = [torch.clamp(star + o / lkk, -tail, tail) for o in (-2.0, -0.5, 0.0, 0.5, 2.0)]
        fixed = [torch.full_like(star, t) for t in (-tail, *SPLIT_FIXED, tail)]
        ends = torch.sort(torch.stack(fixed + moving, 1), 1).values  # (Q, panels + 1)
        lo, half = ends[:, :-1, None], (ends[:, 1:, None] - ends[:, :-1, None]) / 2
        tk = (lo + half * (x + 1)).flatten(1)
        wk = _match_moments(tk, (half * wl).flatten(1) * torch.exp(-tk * tk / 2)
                            / math.sqrt(2 * math.pi))
        q = tk.shape[1]
        ts = [t[:, None].expand(-1, q).reshape(-1) for t in ts] + [tk.reshape(-1)]
        w = (w[:, None] * wk).reshape(-1)
    z = [sum(low[k][j] * ts[j] for j in range(k + 1)) for k in range(m)]
    return torch.stack(z, 1), w

"""Gaussian expectations of activation products and their covariance derivatives.

For ``m`` inputs whose pre-activations are jointly ``Z ~ N(0, G)`` (``G`` an
``m x m`` covariance, parametrised by its ``P = m (m + 1) / 2`` entries on and
above the diagonal, each symmetric entry one parameter), the 1/width
corrections need, over the pairs ``p = (a, b)``, ``a <= b``:

- ``g_p = E[s(Z_a) s(Z_b)]`` and ``d_p = E[s'(Z_a) s'(Z_b)]`` with their first
  and second derivatives in the entries of ``G``;
- the fourth moments ``E[s_a s_b s_c s_d]``, ``E[s_a s_b s'_c s'_d]`` and
  ``E[s'_a s'_b s'_c s'_d]`` (``p = (a, b)``, ``q = (c, d)``).

Three rules:

- positively homogeneous activations (`ABReLU` and its subclasses ReLU,
  LeakyReLU, Abs; `Sign`) with ``m <= 2``: exact polar integration. With
  ``Z = r L e(t)`` (``L`` the Cholesky factor, ``e(t) = (cos t, sin t)``), a
  product of homogeneous degree ``h`` is ``E[r^h]`` times an angular average;
  the angle is split where a pre-activation changes sign, so each arc's
  integrand is a trigonometric polynomial and Gauss-Legendre is exact to
  rounding. ``g, d`` and their derivatives come from closed forms, finite also at
  collinear inputs (`_ArcComplement`).
- `ABReLU` with ``m = 3, 4``: ``g, d`` and their derivatives in closed form (each
  involves one pair), ``E[s_a s_b s_c s_d]`` exactly by sequential conditioning
  (`ntkit.finite._fourth`); the moments with ``s'`` (``x4, d4, y3``, which the NNGP's
  four-point vertex does not use) by the Gauss-Hermite rule below (approximate).
- smooth activations (`_SMOOTH`: erf, tanh, sigmoid, softplus, GELU, Gabor, exp, sin,
  polynomials): the derivatives in the covariance by Price's theorem
  (`_price_moments`), the expectations by the split rule (`_split_nodes`: Gauss-Legendre
  panels that meet where each pre-activation crosses zero) for saturating ones, and by
  Gauss-Hermite for polynomials, exp and sin. With ``m > 2`` each two-point quantity
  comes from its own pair and each fourth moment from the inputs it involves.
- otherwise (user functions, `RectifiedMonomial`, `Sign` with ``m > 2``): the
  Gauss-Hermite product rule on ``Z = L u`` differentiated by forward-mode autodiff
  through the nodes (approximate for kinks).

The last rule's derivatives are taken by forward-mode autodiff (`torch.func.jacfwd`)
through the rule, vectorised over a batch of input sets (`torch.func.vmap`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..layers.activations import ABReLU, Activation, Erf, Sign

__all__ = ["Moments", "moments", "pair_index"]

#: Gauss-Legendre nodes per arc of the polar rule (trigonometric degree <= 4; 12 nodes
#: reach ~1e-14 relative, 8 only ~1e-9).
ARC_NODES = 12
#: Gauss-Hermite nodes per axis for ``m`` = 1, 2, 3, 4 inputs (polynomials, exp, sin).
HERMITE_NODES = {1: 96, 2: 48, 3: 20, 4: 12}
#: Gauss-Legendre nodes per panel of the split rule (`_split_nodes`) for ``m`` inputs.
SPLIT_NODES = {1: 16, 2: 10, 3: 4, 4: 3}
#: The split rule integrates each standard normal coordinate over ``[-T, T]``.
SPLIT_TAIL = 9.0
#: Fixed panel ends of the split rule, for the Gaussian weight itself.
SPLIT_FIXED = (-4.5, -2.5, -1.0, 1.0, 2.5, 4.5)


def pair_index(m: int) -> tuple[list[int], list[int]]:
    """The pairs ``(a, b)``, ``a <= b``, of ``m`` inputs, as two index lists."""
    ia, ib = [], []
    for a in range(m):
        for b in range(a, m):
            ia.append(a)
            ib.append(b)
    return ia, ib


@dataclass(frozen=True)
class Moments:
    """Expectations for a batch of ``B`` covariances over ``P`` pairs.

    Attributes:
        g, d: ``(B, P)``: ``E[s_a s_b]`` and ``E[s'_a s'_b]``.
        jac_g, jac_d: ``(B, P, P)``: derivatives in the covariance entries.
        hess_g, hess_d: ``(B, P, P, P)``: second derivatives.
        f4: ``(B, P, P)``: ``E[s_a s_b s_c s_d]``.
        x4: ``(B, P, P)``: ``E[s_a s_b s'_c s'_d]``.
        d4: ``(B, P, P)``: ``E[s'_a s'_b s'_c s'_d]``.
        y3: ``(B, m, m, m)``: ``E[Z_i s'(Z_a) s(Z_c)]`` at ``[i, a, c]`` (Stein's
            lemma turns it into ``E[d/dZ_j (s'_a s_c)]``).
    """

    g: Tensor
    d: Tensor
    jac_g: Tensor
    jac_d: Tensor
    hess_g: Tensor
    hess_d: Tensor
    f4: Tensor
    x4: Tensor
    d4: Tensor
    y3: Tensor


def _homogeneity(act: Activation) -> int | None:
    """The degree of positive homogeneity of ``act`` (None if it is not one we know)."""
    if isinstance(act, ABReLU):
        return 1
    if isinstance(act, Sign):
        return 0
    return None


def _derivative(act: Activation):
    """``s'`` as an elementwise function that forward-mode autodiff can see through."""
    if isinstance(act, ABReLU):
        a, b = float(act.a), float(act.b)
        return lambda z: torch.where(z < 0, torch.full_like(z, a), torch.full_like(z, b))
    if isinstance(act, Sign):
        return torch.zeros_like
    if isinstance(act, Erf):  # written out: nested forward-mode AD of erf is slow
        scale = float(act.a) * float(act.b) * 2 / math.sqrt(math.pi)
        return lambda z: scale * torch.exp(-(float(act.b) * z) ** 2)
    own = getattr(act, "derivative", None)
    if callable(own):
        return own
    return lambda z: torch.func.jvp(act.fn, (z,), (torch.ones_like(z),))[1]


def _matrix(params: Tensor, m: int) -> list[list[Tensor]]:
    """The symmetric ``m x m`` covariance (nested lists) of its pair entries."""
    ia, ib = pair_index(m)
    g = [[None] * m for _ in range(m)]
    for p, (a, b) in enumerate(zip(ia, ib)):
        g[a][b] = g[b][a] = params[p]
    return g


def _cholesky(g: list[list[Tensor]]) -> list[list[Tensor]]:
    """The lower Cholesky factor, written out so that forward-mode AD and vmap see it;
    residual variances are floored at a tiny number (coincident inputs)."""
    m = len(g)
    zero = g[0][0] * 0
    low = [[zero] * m for _ in range(m)]
    for i in range(m):
        for j in range(i + 1):
            s = g[i][j] - sum((low[i][k] * low[j][k] for k in range(j)), zero)
            if i == j:
                low[i][i] = torch.sqrt(torch.clamp(s, min=1e-300))
            else:
                low[i][j] = s / low[j][j]
    return low


@functools.lru_cache(maxsize=16)
def _hermite_grid(m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Product Gauss-Hermite nodes ``(n^m, m)`` and weights for ``N(0, I_m)``."""
    import scipy.special

    u, w = scipy.special.roots_hermitenorm(n)  # stable at high degree
    w = w / w.sum()
    grids = np.meshgrid(*([u] * m), indexing="ij")
    wgrid = np.ones([n] * m)
    for axis in range(m):
        shape = [1] * m
        shape[axis] = n
        wgrid = wgrid * w.reshape(shape)
    return np.stack([gr.ravel() for gr in grids], 1), wgrid.ravel()


@functools.lru_cache(maxsize=4)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _radial_moment(dim: int, degree: int) -> float:
    """``E[r^degree]`` for ``r = |u|``, ``u ~ N(0, I_dim)`` (0 for negative degrees:
    those products carry a factor ``s' = 0``)."""
    if degree < 0:
        return 0.0
    return 2 ** (degree / 2) * math.gamma((dim + degree) / 2) / math.gamma(dim / 2)


def _hermite_suits(act: Activation) -> bool:
    """Whether the Gauss-Hermite product rule is the right one for ``act``: polynomials
    (exact), and entire functions of exponential type (``exp``, ``sin``), whose Gaussian
    tails reach beyond the split rule's truncation at ``SPLIT_TAIL``."""
    from ..layers.activations import Exp, Gaussian, Sin
    from ..layers.polynomial import Monomial
    from ..layers.special import ExpNormalized, Hermite, Polynomial

    if isinstance(act, Gaussian):
        return float(act.b) > 0  # exp(b x^2) with b > 0: heavy tails
    return isinstance(act, (Exp, ExpNormalized, Sin, Monomial, Polynomial, Hermite))


def _match_moments(t: Tensor, w: Tensor, *, degree: int = 5, sweeps: int = 2) -> Tensor:
    """Weights ``w (Q, K)`` on nodes ``t (Q, K)`` corrected so that each row integrates
    the Hermite polynomials ``He_0 .. He_degree`` (so ``1, t, .., t^degree``) exactly
    against ``N(0, 1)``: ``w <- w (1 + sum_j c_j He_j(t))`` with ``c_j = (E[He_j] -
    sum w He_j) / j!`` (the Hermite polynomials are orthogonal with norms ``j!``, so a
    sweep removes the error but a part the size of the rule's own error, ~1e-8).

    Why: the split rule's panels are not symmetric about 0, so its ``sum w t`` is not
    exactly 0. Near a singular covariance (nearly collinear inputs) the derivatives in
    the covariance divide by the small conditional deviation ``L_kk`` once per order,
    and the moment errors came out multiplied by ``1 / L_kk^2`` in the second
    derivatives; with the low moments exact, the Taylor terms that the division cancels
    cancel exactly, as they do for Gauss-Hermite.
    """
    he = [torch.ones_like(t), t]
    for j in range(1, degree):
        he.append(t * he[j] - j * he[j - 1])  # He_{j+1} = t He_j - j He_{j-1}
    for _ in range(sweeps):
        factor = torch.ones_like(t)
        for j, h in enumerate(he):
            miss = float(j == 0) - (w * h).sum(1, keepdim=True)
            factor = factor + miss / math.factorial(j) * h
        w = w * factor
    return w


def _split_nodes(low: list[list[Tensor]], x: Tensor, wl: Tensor
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


class _Rule:
    """Quadrature nodes ``Z (Q, m)``, weights ``(Q,)`` and the radial factor of each
    product degree, as a function of one covariance's pair entries."""

    def __init__(self, act: Activation, m: int, dtype: torch.dtype,
                 hermite_nodes: int | None = None) -> None:
        self.m, self.dtype = m, dtype
        self.h = _homogeneity(act) if m <= 2 else None
        self.split = self.h is None and _smooth(act) and not _hermite_suits(act)
        if self.split:
            x, w = _legendre(SPLIT_NODES[m])
            self.x = torch.as_tensor(x, dtype=dtype)
            self.wl = torch.as_tensor(w, dtype=dtype)
        elif self.h is None:
            u, w = _hermite_grid(m, hermite_nodes or HERMITE_NODES.get(m, 8))
            self.u = torch.as_tensor(u, dtype=dtype)
            self.w = torch.as_tensor(w, dtype=dtype)
        else:
            x, w = _legendre(ARC_NODES)
            self.x = torch.as_tensor(x, dtype=dtype)
            self.wl = torch.as_tensor(w, dtype=dtype)

    def radial(self, degree: int) -> float:
        """Factor of a product of (activation degree) ``degree`` terms."""
        if self.h is None:
            return 1.0
        return _radial_moment(self.m, degree)

    def nodes(self, params: Tensor) -> tuple[Tensor, Tensor]:
        low = _cholesky(_matrix(params, self.m))
        if self.split:
            return _split_nodes(low, self.x, self.wl)
        if self.h is None:
            lmat = torch.stack([torch.stack(row) for row in low])
            return self.u @ lmat.T, self.w
        if self.m == 1:
            s = low[0][0]
            z = torch.stack([s, -s])[:, None]
            return z, torch.full((2,), 0.5, dtype=self.dtype)
        # Angles where Z_1 = L11 cos t = 0 (t = -pi/2, pi/2) and Z_2 = 0 (t0, t0 + pi).
        t0 = torch.atan2(-low[1][0], low[1][1])
        half = torch.as_tensor(math.pi / 2, dtype=self.dtype)
        ends = torch.stack([-half, t0, half, t0 + math.pi, 3 * half])
        lo, hi = ends[:-1], ends[1:]
        t = ((lo + hi) / 2)[:, None] + ((hi - lo) / 2)[:, None] * self.x[None, :]
        w = ((hi - lo) / 2)[:, None] * self.wl[None, :] / (2 * math.pi)
        t, w = t.reshape(-1), w.reshape(-1)
        c, s = torch.cos(t), torch.sin(t)
        z = torch.stack([low[0][0] * c, low[1][0] * c + low[1][1] * s], 1)
        return z, w


#: `_inv_sin` counts inputs with ``1 - rho^2`` below this as collinear.
COLLINEAR = 1e-8


def _inv_sin(rho: Tensor) -> Tensor:
    """``1 / sqrt(1 - rho^2)`` (the derivative of ``pi - arccos rho``), set to 0 where
    ``1 - rho^2 < COLLINEAR``: written with differentiable ops (double backward).

    Between exactly collinear inputs and ``1 - rho^2 = COLLINEAR`` the terms this drops
    are of relative size ``sqrt(1 - rho^2) <= 1e-4`` (they vanish at collinearity); kept,
    their ``(1 - rho^2)^(-3/2)`` multiplied the covariance's rounding error (1e-16) into
    errors of order one for inputs within ~1e-7 of each other."""
    inside = 1 - rho * rho > COLLINEAR
    return torch.where(inside, torch.rsqrt(torch.clamp(1 - rho * rho, min=1e-300)), 0.0)


class _ArcComplement(torch.autograd.Function):
    """``A(rho) = pi - arccos rho`` with ``A' = 1 / sqrt(1 - rho^2)`` taken as 0 at
    ``|rho| = 1`` (instead of infinity), and within `COLLINEAR` of it (`_inv_sin`).

    At exactly collinear inputs (``|rho| = 1``, e.g. ``x`` and ``2 x`` through a ReLU
    network without biases) ``E[s' s']`` has a square-root singularity in ``rho``, so
    its derivative across the set ``|rho| = 1`` is infinite. The covariance of the
    empirical kernel never leaves that set there (``G(x, 2x) = 2 G(x, x)`` at every
    width), so the 1/width corrections only take derivatives along it, where this term
    has no part: taking it as 0 gives that limit, where autograd's ``inf * 0`` gave NaN.
    """

    @staticmethod
    def forward(ctx, rho: Tensor) -> Tensor:
        ctx.save_for_backward(rho)
        return math.pi - torch.arccos(torch.clamp(rho, -1.0, 1.0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (rho,) = ctx.saved_tensors
        return grad * _inv_sin(rho)


class _ArcCosineOne(torch.autograd.Function):
    """``F(rho) = sqrt(1 - rho^2) + (pi - arccos rho) rho`` (the degree-1 arc-cosine
    kernel's angular part) with ``F' = pi - arccos rho`` (`_ArcComplement`): autograd
    through the two terms gives ``-inf + inf`` at ``|rho| = 1``."""

    @staticmethod
    def forward(ctx, rho: Tensor) -> Tensor:
        ctx.save_for_backward(rho)
        r = torch.clamp(rho, -1.0, 1.0)
        return torch.sqrt(torch.clamp(1 - r * r, min=0.0)) + (math.pi - torch.arccos(r)) * r

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (rho,) = ctx.saved_tensors
        return grad * _ArcComplement.apply(rho)


def _abrelu_two(act: ABReLU, m: int, ia: list[int], ib: list[int]):
    """``(g, d)`` of `ABReLU` in closed form (Cho & Saul 2009, the arc-cosine kernel of
    degree 1 and 0; ``f = a x + (b - a) relu(x)``), cheap to differentiate twice::

        g = a b k + (b - a)^2 sqrt(v1 v2) (sin t + (pi - t) cos t) / (2 pi)
        d = a b + (b - a)^2 (pi - t) / (2 pi),      t = arccos(k / sqrt(v1 v2))

    (``sin t + (pi - t) cos t = F(rho)``, ``pi - t = A(rho)``, ``rho = cos t``: the
    functions of `_ArcCosineOne` and `_ArcComplement`, finite at collinear inputs.)
    """
    a, b = float(act.a), float(act.b)
    ab, d2, sq = a * b, (b - a) ** 2, (a * a + b * b) / 2

    def two(params):
        g_mat = _matrix(params, m)
        gs, ds = [], []
        for i, j in zip(ia, ib):
            if i == j:
                gs.append(sq * g_mat[i][i])
                ds.append(sq + 0 * g_mat[i][i])
                continue
            v1, v2, k = g_mat[i][i], g_mat[j][j], g_mat[i][j]
            root = torch.sqrt(v1 * v2)
            rho = k / root
            gs.append(ab * k + d2 * root * _ArcCosineOne.apply(rho) / (2 * math.pi))
            ds.append(ab + d2 * _ArcComplement.apply(rho) / (2 * math.pi))
        return torch.stack(gs + ds)

    return two


def moments(act: Activation, cov: Tensor, *, chunk: int = 16384) -> Moments:
    """The expectations of `Moments` for a batch of covariances.

    Args:
        act: an ntkit activation layer.
        cov: ``(B, P)`` float64: each row the pair entries (order of `pair_index`)
            of an ``m x m`` covariance of pre-activations.
        chunk: covariances per vectorised call (bounds memory).

    Returns:
        `Moments` for the batch.
    """
    b, p = cov.shape
    m = round((math.sqrt(8 * p + 1) - 1) / 2)
    ia, ib = pair_index(m)
    rule = _Rule(act, m, cov.dtype)
    fn, dfn = act.fn, _derivative(act)
    h = rule.h if rule.h is not None else 1

    def products(params):
        z, w = rule.nodes(params)
        s, sd = fn(z), dfn(z)
        return s[:, ia] * s[:, ib], sd[:, ia] * sd[:, ib], w

    def two(params):
        a, bb, w = products(params)
        return torch.cat([rule.radial(2 * h) * (w @ a), rule.radial(2 * h - 2) * (w @ bb)])

    def fourth(params):
        z, w = rule.nodes(params)
        s, sd = fn(z), dfn(z)
        a, bb = s[:, ia] * s[:, ib], sd[:, ia] * sd[:, ib]
        aw = a * w[:, None]
        prod = z[:, :, None, None] * sd[:, None, :, None] * s[:, None, None, :]
        return (rule.radial(4 * h) * aw.T @ a, rule.radial(4 * h - 2) * aw.T @ bb,
                rule.radial(4 * h - 4) * (bb * w[:, None]).T @ bb,
                rule.radial(2 * h) * torch.einsum("q,qiac->iac", w, prod))

    if isinstance(act, ABReLU) and m <= 2:
        return _abrelu_moments(act, cov, m, ia, ib)
    if _smooth(act):
        return _price_moments(act, rule, cov, m, ia, ib)

    exact = isinstance(act, ABReLU)  # m > 2: exact two-point and f4 (module docstring)
    jac = torch.func.jacfwd(two)
    hess = torch.func.jacfwd(jac)
    outs = {k: [] for k in ("v", "j", "h", "f4", "x4", "d4", "y3")}
    for start in range(0, b, chunk):
        c = cov[start:start + chunk]
        if not exact:
            outs["v"].append(torch.func.vmap(two)(c))
            outs["j"].append(torch.func.vmap(jac)(c))
            outs["h"].append(torch.func.vmap(hess)(c))
        for key, val in zip(("f4", "x4", "d4", "y3"), torch.func.vmap(fourth)(c)):
            outs[key].append(val)
    if exact:
        from ._fourth import abrelu_f4

        v, j, hh = _abrelu_two_moments(act, cov, m, ia, ib)
        f4 = abrelu_f4(float(act.a), float(act.b), cov, m)
    else:
        v, j, hh = (torch.cat(outs[k]) for k in ("v", "j", "h"))
        f4 = torch.cat(outs["f4"])
    return Moments(g=v[:, :p], d=v[:, p:], jac_g=j[:, :p], jac_d=j[:, p:], hess_g=hh[:, :p],
                   hess_d=hh[:, p:], f4=f4, x4=torch.cat(outs["x4"]),
                   d4=torch.cat(outs["d4"]), y3=torch.cat(outs["y3"]))


#: Activations with classical derivatives of every order (`_price_moments`).
_SMOOTH = ("Erf", "Tanh", "Sigmoid", "Softplus", "GELU", "Gabor", "Exp", "ExpNormalized",
           "Sin", "Gaussian", "Monomial", "Polynomial", "Hermite")
#: Derivatives of the activation that `_price_moments` needs (``hess_d``: ``s'`` four
#: more times).
_ORDER = 5
#: Bytes of work per quadrature node and input in `_price_moments` (derivatives, their
#: autograd graph, products), which sets its chunk of covariances.
_NODE_BYTES = 8 * 64
#: `_price_moments` holds about this much per chunk of covariances.
_CHUNK_BYTES = 2**28


def _smooth(act: Activation) -> bool:
    names = {c.__name__ for c in type(act).__mro__}
    return bool(names & set(_SMOOTH))


def _activation_derivatives(act: Activation, z: Tensor, order: int) -> Tensor:
    """``s^(k)(z)`` for ``k = 0 .. order`` by nested autograd of the elementwise ``fn``
    (the gradient of the sum is the elementwise derivative), or in closed form where
    `_closed_derivatives` has one: ``(..., order + 1, m)``."""
    closed = _closed_derivatives(act, z, order)
    if closed is not None:
        return torch.stack(closed, -2)
    fn = act.fn
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        out = [fn(zz)]
        for _ in range(order):
            last = out[-1]
            if not last.requires_grad:  # a polynomial ran out of derivatives
                out.append(torch.zeros_like(zz))
                continue
            (grad,) = torch.autograd.grad(last.sum(), zz, create_graph=True, allow_unused=True)
            out.append(torch.zeros_like(zz) if grad is None else grad)
    return torch.stack([o.detach() for o in out], -2)


def _poly_chain(t: Tensor, order: int, dt: list[float]) -> list[Tensor]:
    """``P_0(t) = t``, ``P_{k+1} = P_k'(t) q(t)`` with ``q`` the polynomial of
    coefficients ``dt`` (``dt/dz = q(t)``: tanh ``1 - t^2``, sigmoid ``t - t^2``):
    the derivatives of ``t(z)`` as polynomials in ``t``, evaluated by Horner."""
    poly, out = [0.0, 1.0], []
    for _ in range(order + 1):
        value = torch.zeros_like(t)
        for c in reversed(poly):
            value = value * t + c
        out.append(value)
        deriv = [i * c for i, c in enumerate(poly)][1:] or [0.0]
        nxt = [0.0] * (len(deriv) + len(dt) - 1)
        for i, c in enumerate(deriv):
            for j, e in enumerate(dt):
                nxt[i + j] += c * e
        poly = nxt
    return out


def _closed_derivatives(act: Activation, z: Tensor, order: int) -> list[Tensor] | None:
    """``s^(k)(z)``, ``k = 0 .. order``, in closed form for the common smooth activations
    (nested autograd costs ~5x more), or None."""
    from ..layers.activations import GELU

    name = type(act).__name__
    if isinstance(act, Erf):  # a erf(b z) + c: d^k e^{-u^2}/du^k = (-1)^k H_k(u) e^{-u^2}
        a, bb, c = float(act.a), float(act.b), float(act.c)
        u = bb * z
        gauss = a * 2 / math.sqrt(math.pi) * torch.exp(-u * u)
        out, herm = [a * torch.erf(u) + c], [torch.ones_like(u), 2 * u]
        for k in range(order):
            if k + 1 >= len(herm):
                herm.append(2 * u * herm[k] - 2 * k * herm[k - 1])
            out.append((-1) ** k * bb ** (k + 1) * herm[k] * gauss)
        return out
    if name == "Tanh":
        return _poly_chain(torch.tanh(z), order, [1.0, 0.0, -1.0])
    if name == "Sigmoid":
        return _poly_chain(torch.sigmoid(z), order, [0.0, 1.0, -1.0])
    if name == "Softplus":
        return [torch.nn.functional.softplus(z)] + _poly_chain(torch.sigmoid(z), order - 1,
                                                               [0.0, 1.0, -1.0])
    if isinstance(act, GELU) and act.approximate == "none":  # z Phi(z)
        pdf = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        herm = [torch.ones_like(z), z]  # probabilists' He_j
        for j in range(1, order):
            herm.append(z * herm[j] - j * herm[j - 1])
        cdf = [0.5 * torch.special.erfc(-z / math.sqrt(2))] + [
            (-1) ** (j - 1) * herm[j - 1] * pdf for j in range(1, order + 1)]  # Phi^(j)
        return [z * cdf[0]] + [z * cdf[k] + k * cdf[k - 1] for k in range(1, order + 1)]
    return None


def _assignments(a: int, b: int, idx: tuple[int, ...]) -> list[tuple[int, int]]:
    """The derivative ``d/dz_idx`` of ``f1(z_a) f2(z_b)`` as a list of ``(n1, n2)``:
    the term ``f1^(n1)(z_a) f2^(n2)(z_b)`` once per entry (the product rule; an index
    that is neither ``a`` nor ``b`` gives no term)."""
    import itertools

    choices = [[f for f, i in ((0, a), (1, b)) if i == j] for j in idx]
    return [(sum(1 for c in pick if c == 0), sum(1 for c in pick if c == 1))
            for pick in itertools.product(*choices)]


def _price_moments(act: Activation, rule: _Rule, cov: Tensor, m: int, ia: list[int],
                   ib: list[int]) -> Moments:
    """`moments` of a smooth activation with the derivatives in the covariance by Price's
    theorem instead of autodiff through the quadrature nodes.

    For ``Z ~ N(0, G)`` and the pair entries ``G_q``, ``q = (c, d)``, ``c <= d`` (one
    parameter per symmetric pair), Price's theorem (Price 1958; Stein's lemma twice)::

        d E[F(Z)] / d G_q = k_q E[d^2 F / dZ_c dZ_d],   k_q = 1/2 if c = d else 1,

    and again for second derivatives. With ``F = s_a s_b`` (``g``) or ``s'_a s'_b``
    (``d``) the product rule turns every derivative into ``E[s^(k)(Z_a) s^(l)(Z_b)]``,
    ``k, l <= 5``: one weighted sum per ``(k, a, l, b)`` over the same nodes. The old
    route, forward-mode autodiff twice through the nodes' dependence on ``G``, took
    ~0.1 s and ~30 MB per covariance (a 256-input MLP ran out of memory); this one is
    about a hundred times cheaper, and more accurate (no division by the conditional
    deviation near singular covariances).
    """
    if m > 2:
        return _price_many(act, rule, cov, m, ia, ib)
    b, p = cov.shape
    price_map = _price_map(m).to(cov.dtype)
    shapes = {"g": (p,), "d": (p,), "jac_g": (p, p), "jac_d": (p, p), "hess_g": (p, p, p),
              "hess_d": (p, p, p)}
    sizes = [math.prod(shapes[k]) for k in ("g", "d", "jac_g", "jac_d", "hess_g", "hess_d")]
    nodes_per_cov = _node_count(rule)
    chunk = max(1, _CHUNK_BYTES // (nodes_per_cov * m * _NODE_BYTES))
    outs: dict[str, list[Tensor]] = {k: [] for k in Moments.__dataclass_fields__}
    for start in range(0, b, chunk):
        z, w = torch.func.vmap(rule.nodes)(cov[start:start + chunk])  # (B, Q, m), (B, Q)
        dz = _activation_derivatives(act, z, _ORDER)  # (B, Q, K, m)
        flat = dz.flatten(2)  # (B, Q, K m)
        m2 = torch.bmm((flat * w[..., None]).transpose(1, 2), flat).view(
            -1, *dz.shape[2:], *dz.shape[2:])  # (B, K, m, K, m)

        two = m2.reshape(m2.shape[0], -1) @ price_map.T  # (B, 2 (P + P^2 + P^3))
        for key, part in zip(("g", "d", "jac_g", "jac_d", "hess_g", "hess_d"),
                             torch.split(two, sizes, 1)):
            outs[key].append(part.reshape(-1, *shapes[key]))
        s0, s1 = dz[:, :, 0], dz[:, :, 1]
        prod0, prod1 = s0[..., ia] * s0[..., ib], s1[..., ia] * s1[..., ib]
        weighted0 = (prod0 * w[..., None]).transpose(1, 2)
        outs["f4"].append(torch.bmm(weighted0, prod0))
        outs["x4"].append(torch.bmm(weighted0, prod1))
        outs["d4"].append(torch.bmm((prod1 * w[..., None]).transpose(1, 2), prod1))
        zs1 = (z[..., :, None] * s1[..., None, :] * w[..., None, None]).flatten(2)
        outs["y3"].append(torch.bmm(zs1.transpose(1, 2), s0).view(-1, m, m, m))
        del z, w, dz, m2, s0, s1, prod0, prod1
        if (start // chunk) % 16 == 15:
            _release_freed_memory()
    return Moments(**{k: torch.cat(v) for k, v in outs.items()})


@functools.lru_cache(maxsize=4)
def _price_map(m: int) -> Tensor:
    """The linear map from ``E[s^(k)(Z_a) s^(l)(Z_c)]`` (flattened ``(K, m, K, m)``) to
    ``g, d, jac_g, jac_d, hess_g, hess_d`` (flattened and concatenated) by Price's
    theorem and the product rule (`_price_moments`)."""
    ia, ib = pair_index(m)
    pairs = list(zip(ia, ib))
    p, k = len(pairs), _ORDER + 1
    k_q = [0.5 if c == d else 1.0 for c, d in pairs]
    rows: list[dict[int, float]] = []

    def row(base: int, a: int, b: int, idx: tuple[int, ...], scale: float) -> None:
        entry: dict[int, float] = {}
        for n1, n2 in _assignments(a, b, idx):
            col = (((base + n1) * m + a) * k + base + n2) * m + b
            entry[col] = entry.get(col, 0.0) + scale
        rows.append(entry)

    for base in (0, 1):  # g, d
        for a, b in pairs:
            row(base, a, b, (), 1.0)
    for base in (0, 1):  # jac_g, jac_d
        for a, b in pairs:
            for q in range(p):
                row(base, a, b, pairs[q], k_q[q])
    for base in (0, 1):  # hess_g, hess_d
        for a, b in pairs:
            for q in range(p):
                for r in range(p):
                    row(base, a, b, pairs[q] + pairs[r], k_q[q] * k_q[r])
    out = torch.zeros(len(rows), (k * m) ** 2, dtype=torch.float64)
    for i, entry in enumerate(rows):
        for col, value in entry.items():
            out[i, col] = value
    return out


def _price_many(act: Activation, rule: _Rule, cov: Tensor, m: int, ia: list[int],
                ib: list[int]) -> Moments:
    """`_price_moments` for ``m > 2`` inputs. ``g_p``, ``d_p`` and their derivatives
    involve only the pair ``p = (a, b)``: each comes from the one- or two-input problem
    of that pair (accurate and cheap) and is scattered into the ``P`` entries; the
    fourth moments by `_fourth_by_subsets`. (The Gauss-Hermite product rule used before,
    12^4 nodes for four inputs, was 3% off in ``E[s_a s_b s_c s_d]`` at variance 1 and
    19% at 10 for erf, and its first derivatives 4% and more.)"""
    b, p = cov.shape
    index = {pair: q for q, pair in enumerate(zip(ia, ib))}
    out = {k: cov.new_zeros(b, p) for k in ("g", "d")}
    out.update({k: cov.new_zeros(b, p, p) for k in ("jac_g", "jac_d")})
    out.update({k: cov.new_zeros(b, p, p, p) for k in ("hess_g", "hess_d")})
    for q, (a, bb) in enumerate(zip(ia, ib)):
        sub = [index[(a, a)]] if a == bb else [index[(a, a)], index[(a, bb)], index[(bb, bb)]]
        own = 0 if a == bb else 1  # the pair's own entry among the sub-problem's
        two = moments(act, cov[:, sub])
        sel = torch.tensor(sub)
        for key in ("g", "d"):
            out[key][:, q] = getattr(two, key)[:, own]
            out["jac_" + key][:, q, sel] = getattr(two, "jac_" + key)[:, own]
            out["hess_" + key][:, q, sel[:, None], sel[None, :]] = getattr(
                two, "hess_" + key)[:, own]
    fourth = _fourth_by_subsets(act, cov, m, ia, ib)
    return Moments(**out, **fourth)


def _fourth_by_subsets(act: Activation, cov: Tensor, m: int, ia: list[int], ib: list[int]
                       ) -> dict[str, Tensor]:
    """``f4, x4, d4, y3`` for ``m > 2`` inputs, each entry integrated over only the inputs
    it involves (a set ``S`` of 1 to 4 of them) by the split rule in ``|S|`` dimensions
    (`SPLIT_NODES`): most entries repeat an input, so only ``E[s_0 s_1 s_2 s_3]`` (and
    its ``s'`` variants) needs four dimensions."""
    import itertools

    b, p = cov.shape
    index = {pair: q for q, pair in enumerate(zip(ia, ib))}
    pairs = list(zip(ia, ib))
    out = {k: cov.new_zeros(b, p, p) for k in ("f4", "x4", "d4")}
    out["y3"] = cov.new_zeros(b, m, m, m)
    for size in range(1, min(m, 4) + 1):
        for subset in itertools.combinations(range(m), size):
            entries = [(q, r) for q, (a, bb) in enumerate(pairs)
                       for r, (c, d) in enumerate(pairs) if {a, bb, c, d} == set(subset)]
            triples = [t for t in itertools.product(range(m), repeat=3) if set(t) == set(subset)]
            if not entries and not triples:
                continue
            pos = {v: i for i, v in enumerate(subset)}
            sub = [index[(min(u, v), max(u, v))] for u, v in zip(*pair_index(size))
                   for u, v in [(subset[u], subset[v])]]
            rule = _Rule(act, size, cov.dtype)
            chunk = _chunk_of(rule, size)
            for start in range(0, b, chunk):
                rows = slice(start, start + chunk)
                z, w = torch.func.vmap(rule.nodes)(cov[rows][:, sub])  # (B, Q, size)
                dz = _activation_derivatives(act, z, 1)
                s0, s1 = dz[:, :, 0], dz[:, :, 1]
                for q, r in entries:
                    (a, bb), (c, d) = pairs[q], pairs[r]
                    i, j, k, l = pos[a], pos[bb], pos[c], pos[d]
                    for key, left, right in (("f4", s0, s0), ("x4", s0, s1), ("d4", s1, s1)):
                        prod = left[..., i] * left[..., j] * right[..., k] * right[..., l]
                        out[key][rows, q, r] = (w * prod).sum(1)
                for t in triples:
                    i, a, c = (pos[v] for v in t)
                    out["y3"][rows, t[0], t[1], t[2]] = (w * z[..., i] * s1[..., a]
                                                         * s0[..., c]).sum(1)
                del z, w, dz, s0, s1
            _release_freed_memory()
    return out


def _chunk_of(rule: _Rule, m: int) -> int:
    return max(1, _CHUNK_BYTES // (_node_count(rule) * m * _NODE_BYTES))


def _release_freed_memory() -> None:
    """Returns freed heap memory to the system (glibc's ``malloc_trim``; a no-op
    elsewhere). The chunks' tensors (~25 MB) fall under glibc's adaptive mmap threshold,
    so freed ones stay in the heap, fragmented: without this the resident size grew by
    ~10 MB per chunk (8 GB for a 256-input depth-4 erf MLP). Called every 16 chunks (a
    trim costs about as much as a chunk)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _node_count(rule: _Rule) -> int:
    if rule.split:
        return (rule.x.numel() * (len(SPLIT_FIXED) + 6)) ** rule.m
    if rule.h is None:
        return rule.w.numel()
    return 4 * rule.x.numel()


def _polar_nodes(cov: Tensor, m: int) -> tuple[list[Tensor], Tensor]:
    """The exact polar rule of `_Rule.nodes` for a whole batch at once (no vmap): the
    nodes of each of the ``m <= 2`` inputs, ``(B, Q)`` each, and the weights ``(B, Q)``."""
    dtype = cov.dtype
    if m == 1:
        s = torch.sqrt(torch.clamp(cov[:, :1], min=1e-300))
        return [torch.cat([s, -s], 1)], torch.full((cov.shape[0], 2), 0.5, dtype=dtype)
    low = _cholesky(_matrix(cov.T, 2))
    x, wl = (torch.as_tensor(v, dtype=dtype) for v in _legendre(ARC_NODES))
    t0 = torch.atan2(-low[1][0], low[1][1])
    half = torch.full_like(t0, math.pi / 2)
    ends = torch.stack([-half, t0, half, t0 + math.pi, 3 * half], 1)
    lo, hi = ends[:, :-1, None], ends[:, 1:, None]
    t = ((lo + hi) / 2 + (hi - lo) / 2 * x).flatten(1)
    w = ((hi - lo) / 2 * wl / (2 * math.pi)).flatten(1)
    c, s = torch.cos(t), torch.sin(t)
    l11, l21, l22 = (v[:, None] for v in (low[0][0], low[1][0], low[1][1]))
    return [l11 * c, l21 * c + l22 * s], w


def _abrelu_moments(act: ABReLU, cov: Tensor, m: int, ia: list[int], ib: list[int]
                    ) -> Moments:
    """`moments` of `ABReLU` with ``m <= 2`` inputs, batched without torch.func: ``g, d``
    from the closed forms of `_abrelu_two` with derivatives by reverse-mode autograd
    (each batch row depends on its own entries only, so the gradient of a sum is the
    per-row gradient), the fourth moments by the polar rule (`_polar_nodes`), one
    weighted sum over the nodes per entry."""
    p = cov.shape[1]
    v, jac, hh = _abrelu_two_moments(act, cov, m, ia, ib)
    z, w = _polar_nodes(cov, m)
    dfn = _derivative(act)
    s, sd = [act.fn(zi) for zi in z], [dfn(zi) for zi in z]
    a = [s[i] * s[j] for i, j in zip(ia, ib)]
    bb = [sd[i] * sd[j] for i, j in zip(ia, ib)]
    aw, bw = [x * w for x in a], [x * w for x in bb]

    def gram(left: list[Tensor], right: list[Tensor], degree: int) -> Tensor:
        rows = [torch.stack([(x * y).sum(1) for y in right], 1) for x in left]
        return _radial_moment(m, degree) * torch.stack(rows, 1)

    zsd = [[(zi * w) * sa for sa in sd] for zi in z]
    y3 = torch.stack([torch.stack([torch.stack([(x * sc).sum(1) for sc in s], 1)
                                   for x in row], 1) for row in zsd], 1)
    return Moments(g=v[:, :p], d=v[:, p:], jac_g=jac[:, :p], jac_d=jac[:, p:],
                   hess_g=hh[:, :p], hess_d=hh[:, p:], f4=gram(aw, a, 4), x4=gram(aw, bb, 2),
                   d4=gram(bw, bb, 0), y3=_radial_moment(m, 2) * y3)


def _abrelu_two_moments(act: ABReLU, cov: Tensor, m: int, ia: list[int], ib: list[int]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """``(g, d)`` of `ABReLU` (`_abrelu_two`, any ``m``) with their first and second
    derivatives by reverse-mode autograd (each batch row depends on its own entries only,
    so the gradient of a sum is the per-row gradient): ``(B, 2P)``, ``(B, 2P, P)``,
    ``(B, 2P, P, P)``."""
    p = cov.shape[1]
    two = _abrelu_two(act, m, ia, ib)
    with torch.enable_grad():
        params = cov.T.detach().clone().requires_grad_()
        out = two(params)  # (2P, B)
        jac_rows = [torch.autograd.grad(out[r].sum(), params, create_graph=True)[0]
                    for r in range(2 * p)]  # each (P, B)
        hess = cov.new_zeros(2 * p, p, p, cov.shape[0])
        for r, row in enumerate(jac_rows):
            for q in range(p):
                if row[q].requires_grad:
                    hess[r, q] = torch.autograd.grad(row[q].sum(), params,
                                                     retain_graph=True)[0]
    v = out.detach().T
    jac = torch.stack([row.detach() for row in jac_rows]).permute(2, 0, 1)
    hh = hess.permute(3, 0, 1, 2)
    return v, jac, hh

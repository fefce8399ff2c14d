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
- smooth activations (`ntkit.finite._split.SMOOTH`: erf, tanh, sigmoid, softplus, GELU, Gabor, exp, sin,
  polynomials): the derivatives in the covariance by Price's theorem
  (`ntkit.finite._price.price_moments`), the expectations by the split rule (`ntkit.finite._split.split_nodes`: Gauss-Legendre
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
from ._split import SPLIT_FIXED, SPLIT_NODES, hermite_suits, smooth, split_nodes

__all__ = ["Moments", "moments", "pair_index"]

#: Gauss-Legendre nodes per arc of the polar rule (trigonometric degree <= 4; 12 nodes
#: reach ~1e-14 relative, 8 only ~1e-9).
ARC_NODES = 12
#: Gauss-Hermite nodes per axis for ``m`` = 1, 2, 3, 4 inputs (polynomials, exp, sin).
HERMITE_NODES = {1: 96, 2: 48, 3: 20, 4: 12}
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


#: Bytes that `moments`' autodiff route (user and kinked activations) holds per chunk.
JACFWD_CHUNK_BYTES = 2**28
def chunk_slices(total: int, chunk: int):
    """``slice``s of ``chunk`` rows covering ``range(total)``, returning freed heap memory
    to the system every 16 chunks (`release_freed_memory`)."""
    for i, start in enumerate(range(0, total, chunk)):
        if i and i % 16 == 0:
            release_freed_memory()
        yield slice(start, start + chunk)


def release_freed_memory() -> None:
    """Returns freed heap memory to the system (glibc's ``malloc_trim``; a no-op
    elsewhere). Chunks' tensors of ~25 MB fall under glibc's adaptive mmap threshold, so
    freed ones stay in the heap, fragmented: without this the resident size grew by ~10
    MB per chunk (8 GB for a 256-input depth-4 erf MLP). A trim costs about as much as a
    chunk, hence every 16."""
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

#: `_cholesky` treats an input with a residual variance below this fraction of its own as
#: a linear combination of the inputs before it.
DEGENERATE = 1e-12


def _cholesky(g: list[list[Tensor]]) -> list[list[Tensor]]:
    """The lower Cholesky factor, written out so that forward-mode AD and vmap see it.

    Residual variances are floored at a tiny number, and an input whose residual
    variance is below `DEGENERATE` of its variance (a linear combination of the ones
    before it: coincident or collinear inputs) gets no weight in the later columns. Its
    column's entries are rounding error divided by the floor, ~1e134 for three
    collinear inputs (GELU's fourth moments came out ~1e269)."""
    m = len(g)
    zero = g[0][0] * 0
    low = [[zero] * m for _ in range(m)]
    degenerate = [None] * m
    for i in range(m):
        for j in range(i + 1):
            s = g[i][j] - sum((low[i][k] * low[j][k] for k in range(j)), zero)
            if i == j:
                degenerate[i] = s <= DEGENERATE * g[i][i]
                low[i][i] = torch.sqrt(torch.clamp(s, min=1e-300))
            else:
                low[i][j] = torch.where(degenerate[j], zero, s / low[j][j])
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


class _Rule:
    """Quadrature nodes ``Z (Q, m)``, weights ``(Q,)`` and the radial factor of each
    product degree, as a function of one covariance's pair entries."""

    def __init__(self, act: Activation, m: int, dtype: torch.dtype,
                 hermite_nodes: int | None = None) -> None:
        self.m, self.dtype = m, dtype
        self.h = _homogeneity(act) if m <= 2 else None
        self.split = self.h is None and smooth(act) and not hermite_suits(act)
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

    @property
    def node_count(self) -> int:
        """Nodes per covariance."""
        if self.split:
            return (self.x.numel() * (len(SPLIT_FIXED) + 6)) ** self.m
        if self.h is None:
            return self.w.numel()
        return 4 * self.x.numel()

    def chunk(self, bytes_per_node: int, budget: int, most: int) -> int:
        """Covariances per chunk that hold about ``budget`` bytes (at most ``most``)."""
        return min(most, max(1, budget // (self.node_count * bytes_per_node)))

    def radial(self, degree: int) -> float:
        """Factor of a product of (activation degree) ``degree`` terms."""
        if self.h is None:
            return 1.0
        return _radial_moment(self.m, degree)

    def nodes(self, params: Tensor) -> tuple[Tensor, Tensor]:
        low = _cholesky(_matrix(params, self.m))
        if self.split:
            return split_nodes(low, self.x, self.wl)
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
    if smooth(act):
        from ._price import price_moments

        return price_moments(act, rule, cov, m, ia, ib, chunk=chunk)

    exact = isinstance(act, ABReLU)  # m > 2: exact two-point and f4 (module docstring)
    jac = torch.func.jacfwd(two)
    hess = torch.func.jacfwd(jac)
    outs = {k: [] for k in ("v", "j", "h", "f4", "x4", "d4", "y3")}
    # forward-mode twice through the nodes holds ~40 doubles per node and (pair + 1)^2:
    # ~7 MB per covariance of two inputs; 16,384 at once needed 115 GB
    for rows in chunk_slices(b, rule.chunk(8 * 40 * (p + 1) ** 2, JACFWD_CHUNK_BYTES, chunk)):
        c = cov[rows]
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

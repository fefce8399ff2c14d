"""The Gaussian expectations under `nk.finite_width` (`ntkit.finite._moments`) at the
pre-activation variances real networks reach, against closed forms.

Witnesses: the activations' own closed-form kernels (``act._nngp``, ``act._dot``: Williams
1997 for erf, Tsuchida et al. 2021 for GELU, neural-tangents' for Gabor and sin),
differentiated once and twice by autograd in the covariance entries; the Gaussian
integral ``E[exp(-z^T D z)] = det(I + 2 D G)^(-1/2)`` for erf's fourth moments of ``s'``;
and exact identities of the corrections themselves (continuity at coincident inputs,
positive homogeneity of ReLU networks without biases).

The Gauss-Hermite rule used before for erf, GELU, tanh and sigmoid resolves
activations only at variances near 1: at variance 3 its error in the second derivatives
was 1e-2 and at 10 it exceeded 1, and the NTK's off-diagonal mean shift came out 15%
off at variance ~2. These tests would fail with it.
"""

from __future__ import annotations

import math

import pytest
import torch

import ntkit as nk
from ntkit.finite import finite_width
from ntkit.finite._moments import moments

F64 = torch.float64


def _covariances(m_rho=(0.0, 0.6, 0.95, 0.999)):
    rows = []
    for v in (0.3, 1.0, 3.0, 10.0):
        for rho in m_rho:
            rows.append([v, rho * v * 0.8, 0.64 * v])  # v2 = 0.64 v, correlation rho
            rows.append([v, -rho * v * 0.8, 0.64 * v])
    return torch.tensor(rows, dtype=F64)


def _closed(act, which):
    fn = act._nngp if which == "g" else act._dot
    return lambda p: fn(p[1], p[0], p[2])  # params (v1, k, v2) -> value


@pytest.mark.parametrize("act", [nk.Erf(), nk.Erf(1.5, 0.6, 0.2), nk.GELU(), nk.Gabor(),
                                 nk.Sin(1.0, 0.7, 0.3)], ids=repr)
def test_two_point_moments_and_their_derivatives(act):
    """``g = E[s s]`` and ``d = E[s' s']`` at the pair, with first and second derivatives
    in ``(v1, k, v2)``, against autograd of the closed forms: within 1e-5 of each
    quantity's scale at variances up to 10 and correlations up to 0.999 (observed: below
    1e-8 up to variance 3; at 10, 6e-7 for erf and 3e-6 for Gabor's second derivatives)."""
    cov = _covariances()
    mo = moments(act, cov)
    for which, value, jac, hess in (("g", mo.g, mo.jac_g, mo.hess_g),
                                    ("d", mo.d, mo.jac_d, mo.hess_d)):
        f = _closed(act, which)
        for i, p in enumerate(cov):
            want = (f(p), torch.func.jacrev(f)(p), torch.func.hessian(f)(p))
            got = (value[i, 1], jac[i, 1], hess[i, 1])
            for name, w, g in zip(("value", "jacobian", "hessian"), want, got):
                scale = w.abs().max().clamp(min=1e-3)
                err = ((g - w).abs().max() / scale).item()
                assert err < 1e-5, (which, name, p.tolist(), err)


def test_erf_fourth_moments_of_the_derivative():
    """``E[s'_a s'_b s'_c s'_d]`` for erf in closed form: ``(4 / pi)^2 det(I + 2 D G)^-1/2``
    with ``D = diag(how often each input occurs)``."""
    cov = _covariances()
    mo = moments(nk.Erf(), cov)
    pairs = [(0, 0), (0, 1), (1, 1)]
    for i, p in enumerate(cov):
        g = torch.stack([torch.stack([p[0], p[1]]), torch.stack([p[1], p[2]])])
        for q, (a, b) in enumerate(pairs):
            for r, (c, d) in enumerate(pairs):
                counts = torch.zeros(2, dtype=F64)
                for j in (a, b, c, d):
                    counts[j] += 1
                want = (16 / math.pi**2) / torch.linalg.det(
                    torch.eye(2, dtype=F64) + 2 * torch.diag(counts) @ g).sqrt()
                assert abs(mo.d4[i, q, r] - want) < 1e-9 * want, (p.tolist(), q, r)


@pytest.mark.parametrize("act", [nk.Erf(), nk.Tanh(), nk.GELU(), nk.ReLU()], ids=repr)
def test_coincident_inputs_are_the_limit_of_nearby_ones(act):
    """An entry ``(x, x')`` with ``x'`` within 1e-7 of ``x`` is computed as a two-input
    problem; ``(x, x)`` as one input. The empirical kernels are continuous in the inputs,
    so their variances and means must agree, to 1e-4 of each 1/width term (before: 3%
    for erf's NTK variance and 4x for its mean shift; near-duplicates gave 1e4)."""
    gen = torch.Generator().manual_seed(0)
    x = 1.6 * torch.randn(2, 5, generator=gen, dtype=F64)  # pre-activation variances ~2-6
    near = torch.cat([x, x[:1] + 1e-7 * torch.randn(1, 5, generator=gen, dtype=F64)])
    net = nk.Sequential(nk.Linear(8, 1.4, 0.1), act, nk.Linear(8, 1.4, 0.1), act,
                        nk.Linear(1, 1.0, 0.1))
    r = finite_width(net, near, width=64)
    for name in ("nngp_var", "ntk_var", "ntk_mean", "nngp_mean"):
        k = getattr(r, name)
        shift = k - (r.ntk if name == "ntk_mean" else r.nngp if name == "nngp_mean" else 0)
        scale = shift[0, 0].abs().clamp(min=1e-4 * k[0, 0].abs())
        assert (shift[0, 2] - shift[0, 0]).abs() < 1e-4 * scale, (name, shift[0])


def test_collinear_inputs_of_a_relu_network_without_biases():
    """Without biases a ReLU network is positively homogeneous: ``f(2x) = 2 f(x)``, so
    every statistic of ``(x, 2x)`` follows from ``x`` alone at any width (variances x4 and
    x16, means x2 and x4). The covariance of ``(x, 2x)`` is singular (correlation 1)
    and the derivative of ``E[s' s']`` is infinite there; before, this gave NaN."""
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    xs = torch.cat([x, 2 * x[:1], -x[:1]])
    for act in (nk.ReLU(), nk.LeakyReLU(0.2), nk.Abs()):
        net = nk.Sequential(nk.Linear(8, 1.4, 0.0), act, nk.Linear(8, 1.4, 0.0), act,
                            nk.Linear(1, 1.0, 0.0))
        r = finite_width(net, xs, width=64)
        for name, ratios in (("nngp_var", (4, 16)), ("ntk_var", (4, 16)),
                             ("ntk_mean", (2, 4)), ("nngp_mean", (2, 4))):
            k = getattr(r, name)
            torch.testing.assert_close(k[0, 2], ratios[0] * k[0, 0], rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(k[2, 2], ratios[1] * k[0, 0], rtol=1e-8, atol=1e-12)
            assert torch.isfinite(k).all()


def _erf_product(g, idx):
    """``E[prod_i erf(Z_idx_i)]`` by orthant probabilities: ``erf(x) = 2 Phi(sqrt(2) x) -
    1`` and ``E[prod_A Phi(sqrt(2) Z_i)] = P(W_A <= sqrt(2) Z_A) = Phi_|A|(0; I + 2 G_A)``
    (``W`` independent standard normals); scipy's Genz integration for ``|A| >= 2``."""
    import itertools

    import numpy as np
    from scipy.stats import multivariate_normal

    total, k = 0.0, len(idx)
    for r in range(k + 1):
        for subset in itertools.combinations(range(k), r):
            if r == 0:
                p = 1.0
            elif r == 1:
                p = 0.5
            else:
                cov = np.eye(r) + 2 * np.array([[g[idx[i], idx[j]] for j in subset]
                                                for i in subset])
                p = multivariate_normal(np.zeros(r), cov, abseps=1e-9, releps=1e-9,
                                        maxpts=2_000_000).cdf(np.zeros(r))
            total += (-1) ** (k - r) * 2**r * p
    return total


@pytest.mark.parametrize("variance", [1.0, 3.0])
def test_erf_fourth_moments_of_four_inputs(variance):
    """``E[s_a s_b s_c s_d]`` over four distinct inputs (the four-point vertex's fourth
    moments, `nngp_four_point`) against orthant probabilities: within 1e-4 (observed
    2.5e-5 at variance 1). The 12^4-node Gauss-Hermite rule used before was 1e-2 off."""
    from ntkit.finite._moments import pair_index

    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = a @ a.T + torch.eye(4, dtype=F64)
    g = g / torch.outer(g.diagonal().sqrt(), g.diagonal().sqrt()) * variance
    ia, ib = pair_index(4)
    mo = moments(nk.Erf(), g[ia, ib][None])
    pairs = list(zip(ia, ib))
    for q, r in [(1, 8), (1, 5), (0, 9), (2, 7), (4, 4), (0, 0)]:  # 4, 3, 2, 1 distinct inputs
        want = _erf_product(g.numpy(), [*pairs[q], *pairs[r]])
        assert abs(mo.f4[0, q, r].item() - want) < 1e-4, (pairs[q], pairs[r], want)


def test_four_point_vertex_at_collinear_inputs_of_a_smooth_network():
    """Without biases, ``x``, ``2x`` and ``-x`` are collinear: their pre-activation
    covariance has rank one. The four-point vertex there (three distinct inputs) must be
    the limit of nearby input sets with four distinct inputs. Before, the rank-deficient
    Cholesky factor put rounding error divided by 1e-150 into the nodes (GELU: 1e269),
    and four dimensions at 3 nodes per panel were 0.7% off in this geometry."""
    from ntkit.finite import nngp_four_point

    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    d = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    exact = torch.cat([x, 2 * x[:1], -x[:1], x[:1]])
    near = exact.clone()
    near[2:5] += 1e-6 * d
    index = torch.tensor([[0, 2, 3, 4], [1, 2, 3, 0]])
    for act in (nk.Erf(), nk.GELU()):
        net = nk.Sequential(nk.Linear(8, 1.4, 0.0), act, nk.Linear(8, 1.4, 0.0), act,
                            nk.Linear(1, 1.0, 0.0))
        a = nngp_four_point(net, exact, index, width=64)
        b = nngp_four_point(net, near, index, width=64)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=3e-4, atol=1e-9)  # observed 1.1e-4


@pytest.mark.parametrize("act", [nk.RectifiedMonomial(2), nk.Erf()], ids=repr)
def test_chunking_changes_nothing(act):
    """Covariances are integrated in chunks sized by memory (autodiff route: ~7 MB each,
    a 256-input MLP needed 115 GB in one chunk); chunk boundaries must not show."""
    cov = _covariances()[:7]
    whole, parts = moments(act, cov), moments(act, cov, chunk=2)
    for key in ("g", "d", "jac_g", "hess_d", "f4", "y3"):
        torch.testing.assert_close(getattr(parts, key), getattr(whole, key), rtol=1e-12,
                                   atol=1e-12)

"""The four-point vertex with 3-4 distinct inputs and kinked activations: the exact
product moments of `ntkit.finite._fourth` (sequential conditioning).

Witnesses: brute-force Monte Carlo in float64 (10^7 draws; tolerance from the standard
error); the exact polar rule of the 1-2 input case (duplicated inputs make a singular
3-4 input covariance whose moments are 2-input ones); a finer quadrature.
"""

from __future__ import annotations

import math

import pytest
import torch

import ntkit as nk
from ntkit.finite import nngp_four_point
from ntkit.finite._fourth import abrelu_f4, product_moment
from ntkit.finite._moments import moments

F64 = torch.float64


def _random_cov(dim, seed, ridge=0.1):
    a = torch.randn(dim, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / dim + ridge * torch.eye(dim, dtype=F64)


def _nearly_singular(eps):
    """``Z_4 = Z_1 + Z_2 - Z_3`` plus independent noise of variance ``eps``."""
    s3 = _random_cov(3, 5, ridge=0.2)
    m = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, -1]], dtype=F64)
    return m @ s3 @ m.T + eps * torch.diag(torch.tensor([0, 0, 0, 1.0], dtype=F64))


def _monte_carlo(cov, powers, a, b, draws=10**7, chunk=10**6, seed=0):
    """Mean and standard error of ``prod s(Z_i)^p_i`` over ``draws`` float64 samples."""
    gen = torch.Generator().manual_seed(seed)
    low = _psd_root(cov)  # any square root: singular covariances too
    total = total2 = 0.0
    for _ in range(draws // chunk):
        z = torch.randn(chunk, len(cov), dtype=F64, generator=gen) @ low.T
        s = a * z + (b - a) * torch.relu(z)
        f = torch.prod(s ** torch.tensor(powers, dtype=F64), 1)
        total += float(f.sum())
        total2 += float((f * f).sum())
    mean = total / draws
    return mean, math.sqrt((total2 / draws - mean * mean) / draws)


def _psd_root(cov):
    vals, vecs = torch.linalg.eigh(cov)
    return vecs * torch.clamp(vals, min=0).sqrt()


CASES = {
    "relu-4-distinct": (_random_cov(4, 1), [1, 1, 1, 1], 0.0, 1.0),
    "relu-3-distinct": (_random_cov(3, 2), [2, 1, 1], 0.0, 1.0),
    "relu-4-strongly-correlated": (_random_cov(4, 3, ridge=0.01), [1, 1, 1, 1], 0.0, 1.0),
    "relu-nearly-singular-1e-4": (_nearly_singular(1e-4), [1, 1, 1, 1], 0.0, 1.0),
    "relu-singular": (_nearly_singular(0.0), [1, 1, 1, 1], 0.0, 1.0),
    "leaky-4-distinct": (_random_cov(4, 4), [1, 1, 1, 1], 0.2, 1.0),
    "abs-4-distinct": (_random_cov(4, 6), [1, 1, 1, 1], -1.0, 1.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_product_moments_against_monte_carlo(name):
    """10^7 float64 draws per case (~2 s each): within 4.5 standard errors."""
    cov, powers, a, b = CASES[name]
    exact = float(product_moment(a, b, cov[None], powers)[0])
    mean, se = _monte_carlo(cov, powers, a, b)
    assert abs(exact - mean) < 4.5 * se, (name, exact, mean, se)
    assert se < 4e-3 * abs(mean)  # the check can tell a 2% error


@pytest.mark.parametrize("name", ["relu-4-distinct", "leaky-4-distinct", "relu-3-distinct"])
def test_product_moments_against_monte_carlo_quick(name):
    """10^6 draws: within 4.5 standard errors (the slow test uses 10^7)."""
    cov, powers, a, b = CASES[name]
    exact = float(product_moment(a, b, cov[None], powers)[0])
    mean, se = _monte_carlo(cov, powers, a, b, draws=10**6, seed=1)
    assert abs(exact - mean) < 4.5 * se, (name, exact, mean, se)


@pytest.mark.parametrize("name,tol", [("relu-4-distinct", 1e-13), ("abs-4-distinct", 1e-13),
                                      ("relu-4-strongly-correlated", 1e-10),
                                      ("relu-nearly-singular-1e-4", 1e-12),
                                      ("relu-singular", 1e-12)])
def test_quadrature_has_converged(name, tol):
    cov, powers, a, b = CASES[name]
    coarse = product_moment(a, b, cov[None], powers)
    fine = product_moment(a, b, cov[None], powers, nodes=48)
    torch.testing.assert_close(coarse, fine, rtol=tol, atol=0)


@pytest.mark.parametrize("a,b", [(0.0, 1.0), (0.1, 1.0), (-1.0, 1.0)])
def test_duplicated_inputs_equal_the_exact_two_input_rule(a, b):
    """A 4 x 4 covariance of (Z_1, Z_2, Z_1, Z_2) (singular): every fourth moment equals
    the 2-input polar rule's (exact) to 1e-12."""
    s2 = torch.tensor([[1.3, 0.7], [0.7, 0.9]], dtype=F64)
    lift = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=F64)
    c4 = lift @ s2 @ lift.T
    act = nk.LeakyReLU(a) if a not in (0.0, -1.0) else (nk.ReLU() if a == 0 else nk.Abs())
    two = moments(act, torch.tensor([[1.3, 0.7, 0.9]], dtype=F64)).f4[0]  # pairs 00 01 11
    pairs4 = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]
    f4 = abrelu_f4(a, b, c4[[i for i, _ in pairs4], [j for _, j in pairs4]][None], 4)[0]
    to2 = {0: 0, 1: 1, 2: 0, 3: 1}
    index2 = {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 2}
    for p, (i, j) in enumerate(pairs4):
        for q, (k, l) in enumerate(pairs4):
            want = two[index2[to2[i], to2[j]], index2[to2[k], to2[l]]]
            assert float(f4[p, q]) == pytest.approx(float(want), rel=1e-12, abs=1e-14)


def _relu_net():
    return nk.Sequential(nk.Linear(8, w_std=1.4, b_std=0.3), nk.ReLU(),
                         nk.Linear(8, w_std=1.4, b_std=0.3), nk.ReLU(),
                         nk.Linear(1, w_std=1.4, b_std=0.3))


X2 = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8]], dtype=F64)
SHIFT = torch.tensor([[0.3, -0.2, 0.5], [-0.4, 0.1, 0.2]], dtype=F64)


def test_four_point_vertex_with_duplicated_inputs_is_exact():
    """``Cov[G(x0, x1), G(x2, x3)]`` with ``x2 = x0``, ``x3 = x1`` equals ``Var[G(x0,
    x1)]`` of the exact 2-input rule (depth-2 ReLU network); three indices likewise."""
    x = torch.cat([X2, X2])
    idx = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 0, 3], [0, 0, 1, 1], [0, 0, 1, 3]])
    v = nngp_four_point(_relu_net(), x, idx, width=64)
    torch.testing.assert_close(v[1], v[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(v[2], v[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(v[4], v[3], rtol=1e-12, atol=0)


def test_four_point_vertex_is_continuous_at_duplicated_inputs():
    """Four distinct, nearly duplicated inputs ``x2 = x0 + d u``, ``x3 = x1 + d v``
    (nearly singular 4-input covariances, the 3-4 input rule): the vertex moves linearly
    in ``d``, and Richardson's extrapolation from ``d = 1e-3, 1e-4`` to ``d = 0`` gives the
    exact 2-input value to 1e-7 (an approximate rule, e.g. Gauss-Hermite with its ~1e-3
    error, would not)."""
    net = _relu_net()
    exact = nngp_four_point(net, X2, torch.tensor([[0, 1, 0, 1]]), width=64)[0]
    vals = [nngp_four_point(net, torch.cat([X2, X2 + d * SHIFT]),
                            torch.tensor([[0, 1, 2, 3]]), width=64)[0] for d in (1e-3, 1e-4)]
    assert abs(vals[0] - exact) > 3 * abs(vals[1] - exact)  # it does move with d
    extrapolated = (10 * vals[1] - vals[0]) / 9
    assert float(abs(extrapolated - exact) / exact) < 1e-7, (vals, exact)


def test_four_point_vertex_one_hidden_layer_against_monte_carlo():
    """One hidden layer: ``Cov[G_ij, G_kl] = sw^4 / n (E[s_i s_j s_k s_l] - E[s_i s_j]
    E[s_k s_l])`` with ``Z ~ N(0, sw^2 x.x'/d + sb^2)``; the expectations by 2 10^6
    float64 draws (tolerance from their standard error)."""
    x = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8], [-0.7, 0.1, 0.9],
                      [0.4, 0.9, 0.6]], dtype=F64)
    sw, sb, n = 1.4, 0.3, 32
    net = nk.Sequential(nk.Linear(8, w_std=sw, b_std=sb), nk.ReLU(),
                        nk.Linear(1, w_std=sw, b_std=sb))
    v = float(nngp_four_point(net, x, torch.tensor([[0, 1, 2, 3]]), width=n)[0])
    cov = sw**2 * x @ x.T / 3 + sb**2
    gen = torch.Generator().manual_seed(3)
    z = torch.relu(torch.randn(2 * 10**6, 4, dtype=F64, generator=gen)
                   @ torch.linalg.cholesky(cov).T)
    a, b = z[:, 0] * z[:, 1], z[:, 2] * z[:, 3]
    sample = sw**4 / n * (a - a.mean()) * (b - b.mean())
    se = float(sample.std()) / math.sqrt(len(sample))
    assert abs(float(sample.mean()) - v) < 4.5 * se, (float(sample.mean()), v, se)
    assert se < 0.02 * abs(v)  # tells an 8% error


def test_product_moment_rejects_mismatched_powers():
    with pytest.raises(ValueError, match="one power per coordinate"):
        product_moment(0.0, 1.0, _random_cov(3, 0)[None], [1, 1])

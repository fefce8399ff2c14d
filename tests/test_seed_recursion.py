"""ntkit against the NTK recursion of Jacot et al. (2018), written out here in NumPy.

The recursion (beta = 1 in the first layer, as the issue states it)::

    Sigma^1(x, y)    = x.y / n_in + 1,               Theta^1 = Sigma^1
    Sigma^(l+1)      = E[s(X) s(Y)] + b2,            dSigma^(l+1) = E[s'(X) s'(Y)]
    Theta^(l+1)      = Theta^l * dSigma^(l+1) + Sigma^(l+1)
    (X, Y) ~ N(0, [[Sigma^l(x, x), Sigma^l(x, y)], [Sigma^l(x, y), Sigma^l(y, y)]])

with ``b2 = 0`` (the issue) or ``b2 = 1`` (Jacot's beta = 1 in every layer, the
reference case fc_relu_seed_recursion).

Correspondence with ntkit's layering ``Linear -> act -> Linear -> ... -> act -> Linear(1)``:
Sigma^1 / Theta^1 are the NNGP / NTK *after* the first ``Linear(w_std=1, b_std=1)``, and one
step ``l -> l+1`` is one ``act`` followed by one ``Linear(w_std=1, b_std=sqrt(b2))``: the
activation maps (nngp, ntk) to (E[s s], ntk * E[s' s']) and the NTK-parameterized Linear with
w_std = 1 adds its own NNGP (``E[s s] + b2``) to the NTK. A net with L activations therefore
has L + 1 Linear layers and its output kernel is (Sigma^(L+1), Theta^(L+1)).

The expectations are computed independently of ntkit: the arc-cosine closed form for ReLU
(Cho & Saul 2009) and a 2-D Gauss-Hermite quadrature for erf, both in NumPy/SciPy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import erf

import ntkit as nk
import reference
from conftest import TOL, rel_err

WIDTH = 512  # the kernel does not depend on it (NTK parameterization)
#: Gauss-Hermite nodes per axis for erf. The hard integrand is erf'(X)^2 ~ exp(-2 v u^2),
#: narrow for large variances v: at v = 3.9 (the largest pre-activation variance here) the
#: 1-D error is 1e-5 with 100 nodes, 7e-9 with 160, 5e-13 with 240 (observed). 240 nodes keep
#: the witness >= 1e4 times more accurate than the 1e-6 tolerance for v <= 4.5 (checked
#: against Williams' closed form in test_quadrature_witness_is_exact).
GH_DEGREE = 240


# --------------------------------------------------------------------- the expectations
def relu_expectations(k: np.ndarray, v1: np.ndarray, v2: np.ndarray, same: np.ndarray):
    """E[relu X relu Y] and E[step X step Y] by the arc-cosine kernel of degree 1 and 0.

    ``same`` marks pairs of an input with itself, whose angle is exactly 0.
    """
    scale = np.sqrt(v1 * v2)
    cos = np.clip(k / scale, -1.0, 1.0)
    theta = np.where(same, 0.0, np.arccos(cos))
    cos = np.where(same, 1.0, cos)
    nngp = scale * (np.sin(theta) + (np.pi - theta) * cos) / (2 * np.pi)
    dot = (np.pi - theta) / (2 * np.pi)
    return nngp, dot


_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(GH_DEGREE)
_U = _NODES * np.sqrt(2.0)  # standard normal nodes
_W = _WEIGHTS / np.sqrt(np.pi)


def gaussian_expectation(f, g, k, v1, v2, same=False):
    """E[f(X) g(Y)] for (X, Y) ~ N(0, [[v1, k], [k, v2]]), by 2-D Gauss-Hermite quadrature.

    X = sqrt(v1) U, Y = (k / sqrt(v1)) U + sqrt(v2 - k^2 / v1) V with U, V independent
    standard normal; for ``same`` pairs (an input with itself) Y = X exactly.
    """
    k, v1, v2, same = np.broadcast_arrays(k, v1, v2, same)
    sx = np.sqrt(v1)[..., None]
    slope = np.where(same, np.sqrt(v1), k / np.sqrt(v1))[..., None, None]
    resid = np.where(same, 0.0, np.sqrt(np.clip(v2 - k * k / v1, 0.0, None)))[..., None, None]
    x = sx * _U                                                    # (..., i)
    y = slope * _U[:, None] + resid * _U[None, :]                  # (..., i, j)
    return np.einsum("...i,...ij,i,j->...", f(x), g(y), _W, _W)


def _erf_prime(x):
    return 2.0 / np.sqrt(np.pi) * np.exp(-x * x)


def erf_expectations(k, v1, v2, same=False):
    return (gaussian_expectation(erf, erf, k, v1, v2, same),
            gaussian_expectation(_erf_prime, _erf_prime, k, v1, v2, same))


EXPECTATIONS = {"relu": relu_expectations, "erf": erf_expectations}
NTKIT = {"relu": nk.ReLU, "erf": nk.Erf}


# ------------------------------------------------------------------------ the recursion
def jacot_recursion(x: np.ndarray, depth: int, act: str, b2_hidden: float = 0.0):
    """(Sigma^(depth+1), Theta^(depth+1)) over all pairs of the rows of ``x``."""
    n = len(x)
    same = np.eye(n, dtype=bool)
    sigma = x @ x.T / x.shape[1] + 1.0
    theta = sigma.copy()
    for _ in range(depth):
        var = np.diag(sigma).copy()
        e_ss, e_dd = EXPECTATIONS[act](sigma, var[:, None], var[None, :], same)
        sigma = e_ss + b2_hidden
        theta = theta * e_dd + sigma
    return sigma, theta


def ntkit_net(depth: int, act: str, b_hidden: float = 0.0) -> nk.Sequential:
    layers: list[nk.Layer] = [nk.Linear(WIDTH, w_std=1.0, b_std=1.0)]
    for i in range(depth):
        last = i == depth - 1
        layers += [NTKIT[act](), nk.Linear(1 if last else WIDTH, w_std=1.0, b_std=b_hidden)]
    return nk.Sequential(*layers)


@pytest.fixture(scope="module")
def inputs():
    """x1 (6 inputs) and x2 (4 inputs) in 5 dimensions, the first x2 a copy of x1[0]."""
    rng = np.random.default_rng(1234)
    x1 = rng.standard_normal((6, 5))
    x2 = np.concatenate([x1[:1], rng.standard_normal((3, 5))])
    return x1, x2


# ------------------------------------------------------------------------------- tests
def test_quadrature_witness_is_exact():
    """The erf quadrature of this file reproduces Williams' (1997) closed forms to 1e-10.

    Witness: E[erf X erf Y] = (2/pi) arcsin(2k / sqrt((1+2v1)(1+2v2))) and
    E[erf' X erf' Y] = (4/pi) / sqrt((1+2v1)(1+2v2) - 4k^2), at variances up to 4.5, for
    distinct pairs and for pairs of an input with itself (k = v1 = v2).
    """
    rng = np.random.default_rng(0)
    v1, v2 = rng.uniform(0.2, 4.5, 40), rng.uniform(0.2, 4.5, 40)
    k = rng.uniform(-1, 1, 40) * np.sqrt(v1 * v2)
    same = np.arange(40) < 10
    v2[same] = k[same] = v1[same]
    nngp, dot = erf_expectations(k, v1, v2, same)
    prod = (1 + 2 * v1) * (1 + 2 * v2)
    assert np.abs(nngp - 2 / np.pi * np.arcsin(2 * k / np.sqrt(prod))).max() < 1e-10
    assert np.abs(dot - 4 / np.pi / np.sqrt(prod - 4 * k * k)).max() < 1e-10


@pytest.mark.parametrize("act", ["relu", "erf"])
@pytest.mark.parametrize("depth", [1, 2, 3], ids=lambda d: f"depth{d}")
def test_ntkit_matches_jacot_recursion(inputs, depth, act):
    """NNGP and NTK of Linear(b=1) -> [act -> Linear(b=0)] x depth, float64, rel. err <= 1e-6.

    Witness: the recursion above on the joint Gram matrix of [x1; x2], with the arc-cosine
    closed form (relu) or 2-D Gauss-Hermite quadrature (erf).
    """
    x1, x2 = inputs
    n1 = len(x1)
    sigma, theta = jacot_recursion(np.concatenate([x1, x2]), depth, act)
    net = ntkit_net(depth, act)
    t1, t2 = torch.from_numpy(x1), torch.from_numpy(x2)
    k12 = net.kernel(t1, t2)
    k11 = net.kernel(t1)
    tol = TOL[torch.float64]["rtol"]
    checks = {
        "nngp(x1,x2)": (k12.nngp, sigma[:n1, n1:]),
        "ntk(x1,x2)": (k12.ntk, theta[:n1, n1:]),
        "nngp(x1,x1)": (k11.nngp, sigma[:n1, :n1]),
        "ntk(x1,x1)": (k11.ntk, theta[:n1, :n1]),
        "cov2": (k12.cov2, np.diag(sigma)[n1:]),
    }
    errors = {name: rel_err(got, want) for name, (got, want) in checks.items()}
    bad = {name: f"{e:.2e}" for name, e in errors.items() if not e <= tol}
    assert not bad, f"depth {depth} {act}: relative errors above {tol:.0e}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("act", ["relu", "erf"])
def test_self_pairs_have_correlation_one(inputs, act, dtype):
    """The diagonal k(x_i, x_i) of net.kernel(x1) and of net.kernel(x1, diagonal=True).

    Witness: the recursion with the angle of a pair of an input with itself set to exactly 0
    (for relu: E[relu X^2] = v/2, E[step^2] = 1/2), compared within the dtype's tolerance.
    A kernel that recovers the angle as arccos(k / sqrt(v v)) loses ~sqrt(eps) (3e-4 in
    float32) here, which this test is meant to catch.
    """
    x1, _ = inputs
    sigma, theta = jacot_recursion(x1, 3, act)
    net = ntkit_net(3, act)
    x = torch.from_numpy(x1).to(dtype)
    full = net.kernel(x)
    diag = net.kernel(x, diagonal=True)
    tol = TOL[dtype]["rtol"]
    errors = {
        "nngp diag of kernel(x1)": rel_err(full.nngp.diagonal(), np.diag(sigma)),
        "ntk diag of kernel(x1)": rel_err(full.ntk.diagonal(), np.diag(theta)),
        "nngp of kernel(x1, diagonal=True)": rel_err(diag.nngp, np.diag(sigma)),
        "ntk of kernel(x1, diagonal=True)": rel_err(diag.ntk, np.diag(theta)),
    }
    bad = {name: f"{e:.2e}" for name, e in errors.items() if not e <= tol}
    assert not bad, f"{act} {dtype}: relative errors above {tol:.0e}: {bad}"


def test_reference_case_is_jacot_with_beta_one():
    """fc_relu_seed_recursion (neural-tangents, b_std = 1 in every Dense) is the recursion
    with b2 = 1 after every hidden layer too; checked to 1e-6 on all four stored kernels.

    Witness: the stored neural-tangents arrays (ntkit's own parity on this case is in
    test_reference.py).
    """
    (case,) = [c for c in reference.cases("kernel", "fc_relu_seed_recursion")]
    dense = [kw for name, kw in case["layers"] if name == "Dense"]
    assert all(kw["W_std"] == 1.0 and kw["b_std"] == 1.0 for kw in dense)
    depth = len(dense) - 1
    a = {k: v.numpy() for k, v in reference.arrays(case["name"]).items()}
    n1 = len(a["x1"])
    sigma, theta = jacot_recursion(np.concatenate([a["x1"], a["x2"]]), depth, "relu", 1.0)
    tol = TOL[torch.float64]["rtol"]
    assert rel_err(sigma[:n1, n1:], a["nngp"]) <= tol
    assert rel_err(theta[:n1, n1:], a["ntk"]) <= tol
    assert rel_err(sigma[:n1, :n1], a["nngp_11"]) <= tol
    assert rel_err(theta[:n1, :n1], a["ntk_11"]) <= tol
    # and ntkit with the same architecture
    net = ntkit_net(depth, "relu", b_hidden=1.0)
    k = net.kernel(torch.from_numpy(a["x1"]), torch.from_numpy(a["x2"]))
    assert rel_err(k.nngp, sigma[:n1, n1:]) <= tol
    assert rel_err(k.ntk, theta[:n1, n1:]) <= tol


def test_recursion_discriminates_bias_convention(inputs):
    """Sanity of the witness: b2 = 0 and b2 = 1 after hidden layers give kernels that differ
    by far more than the tolerance, so the two conventions cannot be confused."""
    x1, _ = inputs
    s0, t0 = jacot_recursion(x1, 2, "relu", 0.0)
    s1, t1 = jacot_recursion(x1, 2, "relu", 1.0)
    assert rel_err(s0, s1) > 0.1
    assert rel_err(t0, t1) > 0.1

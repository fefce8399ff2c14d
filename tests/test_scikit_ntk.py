"""scikit-ntk's NeuralTangentKernel reproduced (`ntkit.sklearn.NeuralTangentKernel`)
and the zero-initialised trained bias of the layers (``b_init="zero"``).

Witnesses: scikit-ntk 1.2.1 itself (live when importable, and its values stored in
tests/data/scikit_ntk_reference.npz by tests/data/gen_scikit_ntk.py); central finite
differences of the gradient in log(bias); the recursion written out plainly here;
ntkit's layer algebra (``Linear(b_init="zero")`` + ``ReLU``); Monte Carlo of the
finite twins' empirical NTK.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel

import ntkit as nk
from ntkit.sklearn import NeuralTangentKernel

REFERENCE = pathlib.Path(__file__).parent / "data" / "scikit_ntk_reference.npz"
#: Parity: max abs error <= 1e-12 times the kernel matrix's largest entry.
PARITY_RTOL = 1e-12
#: Central differences with step 1e-5 in log(bias): truncation ~1e-10, rounding ~1e-11.
FD_STEP, FD_RTOL = 1e-5, 1e-7


def _assert_parity(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= PARITY_RTOL * scale, f"{what}: max abs error {err:.3g}, scale {scale:.3g}"


def _inputs(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` points in R^d with norms log-uniform in [0.01, 100]."""
    u = rng.standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u * np.exp(rng.uniform(math.log(0.01), math.log(100.0), (n, 1)))


def _plain(x: np.ndarray, z: np.ndarray, depth: int, bias: float) -> np.ndarray:
    """The recursion written out entry by entry (Arora et al. 2019, eqs. 3-5)."""
    out = np.empty((len(x), len(z)))
    for i, a in enumerate(x):
        for j, c in enumerate(z):
            s, sa, sc = a @ c, a @ a, c @ c
            k = s + bias ** 2
            for _ in range(depth):
                lam = min(1.0, max(-1.0, s / math.sqrt(sa * sc)))
                theta = math.acos(lam)
                s = math.sqrt(sa * sc) * (math.sin(theta) + (math.pi - theta) * lam) / math.pi
                k = k * (math.pi - theta) / math.pi + s + bias ** 2
            out[i, j] = k / ((depth + 1) * (1 + bias ** 2))
    return out


# ---- values ---------------------------------------------------------------------------

def _reference_cases():
    ref = np.load(REFERENCE)
    return [pytest.param(i, id=f"depth{ref['depth'][i]}-bias{ref['bias'][i]}-d{ref['dim'][i]}")
            for i in range(len(ref["depth"]))]


@pytest.mark.parametrize("case", _reference_cases())
def test_equals_stored_scikit_ntk_values(case):
    ref = np.load(REFERENCE)
    depth, bias, d = int(ref["depth"][case]), float(ref["bias"][case]), int(ref["dim"][case])
    x, z = ref[f"x_d{d}"], ref[f"z_d{d}"]
    kern = NeuralTangentKernel(depth, bias=bias)
    _assert_parity(kern(x), ref["k"][case], "k(X, X)")
    _assert_parity(kern(x, z), ref["kxz"][case], "k(X, Z)")
    _assert_parity(kern.diag(x), ref["diag"][case], "diag")
    if bias > 0:
        k, grad = kern(x, eval_gradient=True)
        want = ref["grad"][case]
        finite = np.isfinite(want)
        assert finite.any()
        _assert_parity(k, ref["k"][case], "k with gradient")
        assert np.isfinite(grad).all()
        err = np.abs(grad[:, :, 0] - want)[finite].max()
        assert err <= PARITY_RTOL * np.abs(ref["k"][case]).max(), err


def test_equals_live_scikit_ntk_over_the_grid():
    skntk = pytest.importorskip("skntk")
    rng = np.random.default_rng(7)
    for d in (1, 2, 5, 20, 50):
        x, z = _inputs(rng, 9, d), _inputs(rng, 4, d)
        for depth in range(1, 6):
            for bias in (0.0, 0.01, 0.5, 1.0, 2.0):
                ours, theirs = NeuralTangentKernel(depth, bias), skntk.NeuralTangentKernel(
                    depth, bias)
                what = f"depth={depth} bias={bias} d={d}"
                _assert_parity(ours(x), theirs(x), what)
                _assert_parity(ours(x, z), theirs(x, z), what + " k(X, Z)")
                _assert_parity(ours.diag(x), theirs.diag(x), what + " diag")
                if bias > 0:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        want = theirs(x, eval_gradient=True)[1]
                    got = ours(x, eval_gradient=True)[1]
                    finite = np.isfinite(want)
                    assert np.abs(got - want)[finite].max() <= PARITY_RTOL * np.abs(
                        theirs(x)).max(), what


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("bias", [0.0, 0.4, 2.0])
def test_equals_the_recursion_written_out(depth, bias):
    rng = np.random.default_rng(depth)
    x, z = _inputs(rng, 5, 4), _inputs(rng, 3, 4)
    kern = NeuralTangentKernel(depth, bias)
    np.testing.assert_allclose(kern(x, z), _plain(x, z, depth, bias), rtol=1e-12, atol=0)
    np.testing.assert_allclose(kern(x), _plain(x, x, depth, bias), rtol=1e-12, atol=0)
    np.testing.assert_allclose(kern.diag(x), np.diag(_plain(x, x, depth, bias)), rtol=1e-12)


# ---- gradient -------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 6])
@pytest.mark.parametrize("depth", [1, 4])
def test_gradient_in_log_bias_matches_finite_differences(d, depth):
    """Also at opposite inputs (d = 1), where scikit-ntk's gradient is NaN."""
    x = _inputs(np.random.default_rng(d + depth), 7, d)
    bias = 0.7
    k, grad = NeuralTangentKernel(depth, bias)(x, eval_gradient=True)
    assert grad.shape == (7, 7, 1) and np.isfinite(grad).all()
    hi = NeuralTangentKernel(depth, bias * math.exp(FD_STEP))(x)
    lo = NeuralTangentKernel(depth, bias * math.exp(-FD_STEP))(x)
    fd = (hi - lo) / (2 * FD_STEP)
    assert np.abs(grad[:, :, 0] - fd).max() <= FD_RTOL * np.abs(fd).max()
    assert np.abs(fd).max() > 1e-3 * np.abs(k).max()       # the gradient is not trivially 0


def test_fixed_bias_has_no_gradient_columns():
    x = _inputs(np.random.default_rng(0), 5, 3)
    kern = NeuralTangentKernel(2, 0.5, bias_bounds="fixed")
    k, grad = kern(x, eval_gradient=True)
    assert grad.shape == (5, 5, 0)
    np.testing.assert_array_equal(k, kern(x))
    assert kern.n_dims == 0


# ---- scikit-learn API -----------------------------------------------------------------

def test_sklearn_kernel_api():
    kern = NeuralTangentKernel(depth=3, bias=0.2, bias_bounds=(1e-3, 10.0))
    assert kern.get_params() == {"depth": 3, "bias": 0.2, "bias_bounds": (1e-3, 10.0)}
    twin = clone(kern)
    assert twin is not kern and twin.get_params() == kern.get_params() and twin == kern
    assert [h.name for h in kern.hyperparameters] == ["bias"]
    np.testing.assert_allclose(kern.theta, [math.log(0.2)])
    np.testing.assert_allclose(kern.bounds, [[math.log(1e-3), math.log(10.0)]])
    moved = kern.clone_with_theta(np.array([math.log(1.5)]))
    assert moved.bias == pytest.approx(1.5) and moved.depth == 3
    assert not kern.is_stationary()
    assert repr(kern) == "NeuralTangentKernel(depth=3, bias=0.2)"
    default = NeuralTangentKernel()
    assert (default.depth, default.bias, default.bias_bounds) == (1, 0.1, (1e-5, 1e5))
    x = _inputs(np.random.default_rng(1), 6, 3)
    np.testing.assert_allclose(kern.diag(x), np.diag(kern(x)), rtol=1e-13)
    combined = 2.0 * kern + WhiteKernel(0.1)            # composes with sklearn's kernels
    np.testing.assert_allclose(combined(x), 2 * kern(x) + 0.1 * np.eye(6), rtol=1e-13)


def test_bias_is_fitted_by_gaussian_process_regressor():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 3))
    y = np.maximum(x @ [1.0, -0.5, 0.3], 0) + 0.8 + 0.2 * rng.standard_normal(40)
    kern = ConstantKernel(1.0) * NeuralTangentKernel(depth=2, bias=0.05) + WhiteKernel(1e-2)
    gp = GaussianProcessRegressor(kern, random_state=0).fit(x, y)
    fitted = gp.kernel_.k1.k2
    assert isinstance(fitted, NeuralTangentKernel) and fitted.bias != pytest.approx(0.05)
    assert gp.log_marginal_likelihood_value_ > gp.log_marginal_likelihood(gp.kernel.theta)
    # The likelihood's gradient, which the optimizer follows, against finite differences.
    theta = gp.kernel_.theta
    _, grad = gp.log_marginal_likelihood(theta, eval_gradient=True)
    i = [h.name for h in gp.kernel_.hyperparameters].index("k1__k2__bias")
    step = np.zeros_like(theta)
    step[i] = FD_STEP
    fd = (gp.log_marginal_likelihood(theta + step)
          - gp.log_marginal_likelihood(theta - step)) / (2 * FD_STEP)
    assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kwargs, call, match", [
    ({"depth": -1}, "k", "depth must be an int >= 0"),
    ({"depth": 1.5}, "k", "depth must be an int >= 0"),
    ({"bias": -0.1}, "k", "bias must be a finite number >= 0"),
    ({"bias": float("nan")}, "k", "bias must be a finite number >= 0"),
    ({"bias": 0.0}, "grad", "bias=0 has no logarithm"),
    ({}, "grad_z", "Gradient can only be evaluated when Z is None"),
    ({}, "nan", "NaN or infinite"),
    ({}, "overflow", "overflowed"),
    ({}, "overflow_diag", "overflowed"),
    ({}, "1d", "must be 2-D"),
    ({}, "features", "has 2 features but X has 3"),
])
def test_bad_input_is_refused_with_a_clear_error(kwargs, call, match):
    kern = NeuralTangentKernel(**{"depth": 2, **kwargs})
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match=match):
        if call == "k":
            kern(x)
        elif call == "grad":
            kern(x, eval_gradient=True)
        elif call == "grad_z":
            kern(x, x, eval_gradient=True)
        elif call == "nan":
            kern(np.where(np.eye(4, 3) > 0, np.nan, x))
        elif call == "overflow":
            kern(x * 1e160)
        elif call == "overflow_diag":
            kern.diag(x * 1e160)
        elif call == "1d":
            kern(np.ones(4))
        else:
            kern(x, np.ones((2, 2)))

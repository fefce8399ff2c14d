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
    kern = ConstantKernel(1.0) * NeuralTangentKernel(depth=2, bias=0.05) + WhiteKernel(
        0.04, noise_level_bounds="fixed")
    gp = GaussianProcessRegressor(kern, random_state=0).fit(x, y)
    fitted = gp.kernel_.k1.k2
    assert isinstance(fitted, NeuralTangentKernel) and fitted.bias != pytest.approx(0.05)
    assert gp.log_marginal_likelihood_value_ > gp.log_marginal_likelihood(gp.kernel.theta)
    # The likelihood's gradient, which the optimizer follows, against finite differences.
    theta = gp.kernel_.theta
    _, grad = gp.log_marginal_likelihood(theta, eval_gradient=True)
    i = [h.name for h in gp.kernel_.hyperparameters if not h.fixed].index("k1__k2__bias")
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


# ---- the zero-initialised trained bias of the layers --------------------------------

def _sk_network(d: int, depth: int, bias: float, width: int = 64) -> nk.Sequential:
    """scikit-ntk's network in ntkit's layers: w_std = sqrt(d) turns the input kernel
    x . z / d into the raw dot product, w_std = sqrt(2) is scikit-ntk's c = 2."""
    layers = [nk.Linear(width, w_std=math.sqrt(d), b_std=bias, b_init="zero")]
    for i in range(depth):
        out = width if i < depth - 1 else 1
        layers += [nk.ReLU(), nk.Linear(out, w_std=math.sqrt(2), b_std=bias, b_init="zero")]
    return nk.Sequential(*layers)


@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("bias", [0.0, 0.3, 2.0])
def test_estimator_kernel_equals_the_layers_ntk(depth, bias):
    """The closed form and the layer algebra (Linear(b_init='zero') + ReLU) agree."""
    rng = np.random.default_rng(depth)
    x, z = _inputs(rng, 6, 5), _inputs(rng, 4, 5)
    k = _sk_network(5, depth, bias).kernel(torch.tensor(x), torch.tensor(z))
    norm = (depth + 1) * (1 + bias ** 2)
    want = NeuralTangentKernel(depth, bias)(x, z)
    np.testing.assert_allclose(k.ntk.numpy() / norm, want, rtol=1e-12,
                               atol=1e-13 * np.abs(want).max())
    # The bias never enters the NNGP: the same network without biases.
    no_bias = nk.Sequential(*[nk.Linear(lay.out_features, w_std=lay.w_std, b_std=None)
                              if isinstance(lay, nk.Linear) else lay
                              for lay in _sk_network(5, depth, bias).layers])
    torch.testing.assert_close(k.nngp, no_bias.kernel(torch.tensor(x), torch.tensor(z)).nngp,
                               rtol=0, atol=0)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_zero_bias_rule_written_out(parameterization):
    """Linear(b_init='zero'): nngp = w^2 K; ntk = nngp + w^2 Theta + b^2 (NTK
    parameterization) or fan_in K + w^2 Theta + 1 (standard)."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = nk.Linear(4, w_std=1.2, b_std=0.3, parameterization=parameterization)
    inner = nk.Sequential(first, nk.ReLU()).kernel(x)
    layer = nk.Linear(2, w_std=1.4, b_std=0.7, b_init="zero",
                      parameterization=parameterization)
    got = nk.Sequential(first, nk.ReLU(), layer).kernel(x)
    torch.testing.assert_close(got.nngp, 1.4 ** 2 * inner.nngp, rtol=1e-14, atol=0)
    if parameterization == "ntk":
        want = 1.4 ** 2 * inner.nngp + 1.4 ** 2 * inner.ntk + 0.7 ** 2
    else:
        want = 4 * inner.nngp + 1.4 ** 2 * inner.ntk + 1
    torch.testing.assert_close(got.ntk, want, rtol=1e-14, atol=0)


def test_zero_bias_hyperparameter_tensor_is_differentiable():
    b = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = nk.Sequential(nk.Linear(8, b_std=b, b_init="zero"), nk.ReLU(),
                        nk.Linear(1, b_std=b, b_init="zero"))
    k = net.kernel(x)
    (grad,) = torch.autograd.grad(k.ntk.sum(), b)
    eps = 1e-6
    hi = nk.Sequential(nk.Linear(8, b_std=0.4 + eps, b_init="zero"), nk.ReLU(),
                       nk.Linear(1, b_std=0.4 + eps, b_init="zero")).kernel(x).ntk.sum()
    lo = nk.Sequential(nk.Linear(8, b_std=0.4 - eps, b_init="zero"), nk.ReLU(),
                       nk.Linear(1, b_std=0.4 - eps, b_init="zero")).kernel(x).ntk.sum()
    assert float(grad) == pytest.approx(float(hi - lo) / (2 * eps), rel=1e-7)
    assert not k.nngp.requires_grad or float(torch.autograd.grad(
        k.nngp.sum(), b, allow_unused=True)[0] or 0.0) == 0.0


def _twin_ntk_difference(make, x, samples: int, seed: int):
    """Per sample: (empirical NTK with the zero-started bias) - (without bias), for
    twins built from the same seed (the zero bias draws nothing, so the weights are
    the same), and whether their outputs agree exactly."""
    diffs, same_outputs = [], True
    for s in range(samples):
        with_bias = make("zero").build(x.shape[1:], generator=torch.Generator().manual_seed(
            seed + s), dtype=x.dtype)
        without = make(None).build(x.shape[1:], generator=torch.Generator().manual_seed(
            seed + s), dtype=x.dtype)
        same_outputs &= torch.equal(with_bias(x), without(x))
        n_out = with_bias(x[:1]).numel()
        diffs.append((nk.empirical_ntk(with_bias, x) - nk.empirical_ntk(without, x)) / n_out)
    return torch.stack(diffs), same_outputs


def _mlp(b_init):
    b = None if b_init is None else 0.8
    kw = {} if b_init is None else {"b_init": b_init}
    return nk.Sequential(nk.Linear(96, w_std=1.3, b_std=b, **kw), nk.ReLU(),
                         nk.Linear(96, w_std=1.3, b_std=b, **kw), nk.ReLU(),
                         nk.Linear(4, w_std=1.3, b_std=b, **kw))


def _cnn(b_init):
    b = None if b_init is None else 0.8
    kw = {} if b_init is None else {"b_init": b_init}
    return nk.Sequential(nk.Conv1d(24, 3, padding="same", b_std=b, **kw), nk.ReLU(),
                         nk.ConvTranspose1d(24, 2, stride=2, b_std=b, **kw), nk.ReLU(),
                         nk.LocallyConnected1d(12, 2, b_std=b, **kw), nk.ReLU(),
                         nk.Flatten(), nk.Linear(2, b_std=b, **kw))


@pytest.mark.parametrize("make, shape", [
    (_mlp, (3,)), pytest.param(_cnn, (2, 5), marks=pytest.mark.slow)], ids=["mlp", "cnn"])
def test_finite_twin_ntk_of_the_zero_bias_approaches_the_kernel(make, shape):
    """Monte Carlo: the twins' outputs (so their NNGP) are those of the bias-free
    twins; the bias's share of their empirical NTK averages to the analytic
    difference, within 5 standard errors of the sample mean (plus the O(1/width)
    bias of a finite twin, 5% of the difference)."""
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    diffs, same_outputs = _twin_ntk_difference(make, x, samples=16, seed=100)
    assert same_outputs
    want = make("zero").kernel(x).ntk - make(None).kernel(x).ntk
    assert float(want.abs().min()) > 0.1                  # the bias matters here
    mean, se = diffs.mean(0), diffs.std(0) / math.sqrt(len(diffs))
    assert torch.all((mean - want).abs() <= 5 * se + 0.05 * want.abs()), (mean, want, se)
    torch.testing.assert_close(make("zero").kernel(x).nngp, make(None).kernel(x).nngp,
                               rtol=0, atol=0)


def test_b_init_spec_and_repr_round_trip():
    from ntkit.spec import parse_architecture, to_spec

    for layer in (nk.Linear(3, b_std=0.5, b_init="zero"),
                  nk.Conv2d(3, 2, b_std=0.5, b_init="zero"),
                  nk.ConvTranspose1d(3, 2, stride=2, b_std=0.5, b_init="zero"),
                  nk.LocallyConnected1d(3, 2, b_std=0.5, b_init="zero")):
        spec = to_spec(layer)
        assert "b_init=zero" in spec, spec
        again = parse_architecture(spec)
        assert again.b_init == "zero" and to_spec(again) == spec
        assert eval(repr(layer), vars(nk)).b_init == "zero"
    assert "b_init" not in to_spec(nk.Linear(3, b_std=0.5))


@pytest.mark.parametrize("make", [
    lambda **kw: nk.Linear(3, **kw), lambda **kw: nk.Conv1d(3, 2, **kw),
    lambda **kw: nk.ConvTranspose2d(3, 2, **kw), lambda **kw: nk.LocallyConnected3d(3, 2, **kw),
], ids=["Linear", "Conv1d", "ConvTranspose2d", "LocallyConnected3d"])
def test_b_init_bad_values_are_refused(make):
    with pytest.raises(ValueError, match="b_init must be 'normal'.*or 'zero'"):
        make(b_std=0.1, b_init="zeros")
    with pytest.raises(ValueError, match="b_std=None removes it"):
        make(b_std=None, b_init="zero")

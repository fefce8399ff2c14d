"""Hermite, Polynomial, Gabor, SigmoidLike, ExpNormalized and GELU(approximate="tanh"):
parity with neural-tangents 0.6.5 (float64 references in tests/data, made by
tests/data/gen_activations_nt.py), Monte Carlo of the finite twins with tolerances
from their sampling error, Gauss-Hermite quadrature of the twins' own functions,
conversion and spec round trips, and the errors for bad arguments (the contract
battery adds the generic checks)."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from torch import nn

import ntkit as nk
from ntkit.layers.elementwise import QUADRATURE_TARGET, Elementwise
from ntkit.spec import parse_architecture, to_spec

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "activations_nt.json").read_text())
PARITY_RTOL = 1e-6  # max error over max value, float64


def _t(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def _layer(name: str, kw: dict):
    """ntkit's layer for one row of the generator's layer lists."""
    if name == "Dense":
        return nk.Linear(kw["out"], w_std=kw["w_std"], b_std=kw["b_std"])
    if name == "Conv":
        return nk.Conv2d(kw["out"], tuple(kw["kernel"]), padding=kw["padding"],
                         w_std=kw["w_std"], b_std=kw["b_std"])
    if name in ("GeluTanhNumerical", "GeluTanh"):
        return nk.GELU(approximate="tanh")
    return {"Flatten": nk.Flatten, "GlobalAvgPool": nk.GlobalAvgPool, "Hermite": nk.Hermite,
            "Polynomial": nk.Polynomial, "Gabor": nk.Gabor, "SigmoidLike": nk.SigmoidLike,
            "ExpNormalized": nk.ExpNormalized}[name](**kw)


def _case(name: str):
    case = DATA["cases"][name]
    net = nk.Sequential(*[_layer(n, kw) for n, kw in case["layers"]])
    x1, x2 = (_t(x) for x in DATA["inputs"][case["inputs"]])
    return net, x1, x2, case


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


PARITY = [n for n in DATA["cases"] if n not in ("hermite3_nonunit", "gelu_tanh_nt_closed")]


# ------------------------------------------------------- neural-tangents parity
@pytest.mark.parametrize("name", PARITY)
def test_parity_with_neural_tangents(name):
    """k(x1, x2) and k(x1, x1) equal neural-tangents 0.6.5's in float64."""
    net, x1, x2, case = _case(name)
    for got, suffix in ((net.kernel(x1, x2), ""), (net.kernel(x1), "_same")):
        for field in ("nngp", "ntk"):
            want = _t(case[field + suffix])
            err = _rel(getattr(got, field).reshape(want.shape), want)
            assert err <= PARITY_RTOL, f"{field}{suffix}: {err:.2e}"


def test_gelu_tanh_converges_to_neural_tangents_numerical_kernel():
    """With degree "auto" (target 1e-6) GELU tanh passes the parity test; at a fixed
    degree of 128 it agrees with neural-tangents' 101-node quadrature to 1e-9."""
    net, x1, x2, case = _case("gelu_tanh_numerical")
    fine = nk.Sequential(*[nk.GELU(approximate="tanh", degree=128)
                           if isinstance(layer, nk.GELU) else layer for layer in net.layers])
    got = fine.kernel(x1, x2)
    assert _rel(got.nngp, _t(case["nngp"])) < 1e-9 and _rel(got.ntk, _t(case["ntk"])) < 1e-9


def test_hermite_is_exact_where_neural_tangents_assumes_unit_variance():
    """Off unit variance neural-tangents' k^n is not the kernel of its own function;
    ntkit's is (equal to quadrature of He_3 / sqrt(6)), so the two differ there."""
    net, x1, x2, case = _case("hermite3_nonunit")
    got = net.kernel(x1, x2)
    assert _rel(got.nngp, _t(case["nngp"])) > 0.05
    hidden = [nk.Elementwise(nk.Hermite(3).fn, degree=64) if isinstance(layer, nk.Hermite)
              else layer for layer in net.layers]
    quad = nk.Sequential(*hidden).kernel(x1, x2)
    assert _rel(got.nngp, quad.nngp) < 1e-9 and _rel(got.ntk, quad.ntk) < 1e-9


def test_gelu_tanh_is_not_the_exact_gelu_kernel():
    """neural-tangents' Gelu(approximate=True) kernel is the exact GELU's (ntkit's GELU()
    reproduces it); the tanh function's own kernel (neural-tangents' numerical one, matched
    by the parity test) differs from it by more than the parity tolerance."""
    net, x1, x2, case = _case("gelu_tanh_nt_closed")
    exact = nk.Sequential(*[nk.GELU() if isinstance(layer, nk.GELU) else layer
                            for layer in net.layers]).kernel(x1, x2)
    assert _rel(exact.nngp, _t(case["nngp"])) <= PARITY_RTOL
    assert _rel(exact.ntk, _t(case["ntk"])) <= PARITY_RTOL
    tanh = net.kernel(x1, x2)
    assert _rel(tanh.nngp, _t(case["nngp"])) > 10 * PARITY_RTOL


# ------------------------------------------------------------ closed forms
LAYERS = {
    "hermite0": lambda: nk.Hermite(0), "hermite1": lambda: nk.Hermite(1),
    "hermite4": lambda: nk.Hermite(4), "hermite5": lambda: nk.Hermite(5),
    "polynomial": lambda: nk.Polynomial([0.3, -1.0, 0.5, 0.2]),
    "polynomial_even": lambda: nk.Polynomial([1.0, 0.0, -0.5, 0.0, 0.25]),
    "gabor": nk.Gabor, "sigmoid_like": nk.SigmoidLike,
    "gelu_tanh": lambda: nk.GELU(approximate="tanh"),
}
K = _t([0.3, -0.5, 1.2, 0.0, 0.9, -2.0])
V1 = _t([1.0, 0.7, 2.0, 1.5, 0.9, 3.0])
V2 = _t([0.5, 1.3, 1.1, 0.8, 0.9, 1.5])


@pytest.mark.parametrize("name", list(LAYERS))
def test_rules_equal_quadrature_of_the_twin_function(name):
    """Both expectations, and the self moments, against 2-D Gauss-Hermite quadrature
    of the function the twin applies (exact for polynomials at this degree)."""
    layer = LAYERS[name]()
    quad = Elementwise(layer.fn, degree=160)
    # GELU tanh is itself quadrature with degree "auto": its target is 1e-6 (relative).
    rtol = QUADRATURE_TARGET if name == "gelu_tanh" else 1e-7
    for got, want in zip(layer._nngp_and_dot(K, V1, V2), quad._nngp_and_dot(K, V1, V2)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-10)
    torch.testing.assert_close(layer._variance(V1), quad._variance(V1), rtol=rtol, atol=1e-10)
    torch.testing.assert_close(layer._self_dot(V1), quad._self_dot(V1), rtol=rtol, atol=1e-10)


def test_hermite_functions_are_orthonormal_he_n():
    """fn is He_n / sqrt(n!): He_3 = x^3 - 3x, and E[f_m f_n] = delta_mn under N(0, 1)."""
    x = _t([-1.5, 0.0, 0.7, 2.0])
    torch.testing.assert_close(nk.Hermite(3).fn(x), (x**3 - 3 * x) / math.sqrt(6))
    import numpy as np

    nodes, weights = np.polynomial.hermite_e.hermegauss(20)  # exact to degree 39
    u, w = _t(nodes), _t(weights / weights.sum())
    for m in range(5):
        for n in range(5):
            got = float((nk.Hermite(m).fn(u) * nk.Hermite(n).fn(u) * w).sum())
            assert got == pytest.approx(float(m == n), abs=1e-12)


def test_exp_normalized_formula_written_out():
    layer = nk.ExpNormalized(gamma=0.7, shift=-0.4)
    nngp, dot = layer._nngp_and_dot(K, V1, V2)
    r = torch.sqrt(V1 * V2)
    torch.testing.assert_close(nngp, r * torch.exp(0.7 * (K / r - 0.4)))
    torch.testing.assert_close(dot, 0.7 * torch.exp(0.7 * (K / r - 0.4)))
    clipped = nk.ExpNormalized(gamma=0.7, shift=-0.4, do_clip=True)._nngp_and_dot(
        _t([5.0]), _t([1.0]), _t([4.0]))[0]  # correlation 2.5 clipped to 1
    torch.testing.assert_close(clipped, 2 * torch.exp(_t([0.7 * 0.6])))


# --------------------------------------------------------------- Monte Carlo
def _sample_pairs(k: float, v1: float, v2: float, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    u, w = torch.randn(2, n, generator=g, dtype=torch.float64)
    a = math.sqrt(v1)
    return a * u, k / a * u + math.sqrt(v2 - k * k / v1) * w


@pytest.mark.parametrize("name", list(LAYERS))
def test_twin_monte_carlo_of_both_expectations(name):
    """f(X) f(Y) and f'(X) f'(Y) of the built twin (f' by autograd through the module),
    averaged over 200k Gaussian pairs, within 5 standard errors of the rule."""
    layer = LAYERS[name]()
    twin = layer.build((1,), dtype=torch.float64)
    for k, v1, v2 in ((0.4, 1.0, 0.8), (-0.6, 1.5, 0.5), (0.9, 0.9, 1.0)):
        x, y = _sample_pairs(k, v1, v2, 200_000, seed=int(100 * (k + v1)))
        xy = torch.stack([x, y]).requires_grad_(True)
        f = twin(xy[..., None])[..., 0]
        # a constant (Hermite(0)) has no graph: its derivative is 0
        df = torch.autograd.grad(f.sum(), xy)[0] if f.requires_grad else torch.zeros_like(xy)
        want = layer._nngp_and_dot(_t([k]), _t([v1]), _t([v2]))
        for samples, w in ((f[0] * f[1], want[0]), (df[0] * df[1], want[1])):
            samples = samples.detach()
            se = float(samples.std() / math.sqrt(samples.numel()))
            assert abs(float(samples.mean()) - float(w)) <= 5 * se + 1e-12, (k, v1, v2)


@pytest.fixture
def one_thread():
    """Many small products: one intra-op thread is ~100x faster than several on a
    loaded 2-core machine (measured: 0.4 s against 40 s); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _exp_normalized_twin_samples(layer, k, v1, v2, channels, twins, pairs, seed):
    """Per sampled twin (fresh ``w``), the means over ``pairs`` sampled ``(z, z')``
    (C channels, i.i.d. pairs of covariance ``[[v1, k], [k, v2]]``) of
    ``mean_i phi_i(z) phi_i(z')`` and ``mean_i grad phi_i(z) . grad phi_i(z')`` (the
    twin's NTK factor): one i.i.d. sample per twin."""
    g = torch.Generator().manual_seed(seed)
    nngp, dot = [], []
    for _ in range(twins):
        twin = layer.build((channels,), generator=g, dtype=torch.float64)
        x, y = _sample_pairs(k, v1, v2, pairs * channels,
                             seed=int(torch.randint(1 << 30, (1,), generator=g)))
        x = x.reshape(pairs, channels).requires_grad_(True)
        y = y.reshape(pairs, channels).requires_grad_(True)
        fx, fy = twin(x), twin(y)
        # sum_i grad phi_i(z) . grad phi_i(z') = E_u[(J(z)^T u) . (J(z')^T u)], u ~ N(0, I):
        # one probe u per pair, by one backward pass each (Hutchinson's estimator).
        u = torch.randn(pairs, channels, generator=g, dtype=torch.float64)
        (gx,) = torch.autograd.grad((fx * u).sum(), x)
        (gy,) = torch.autograd.grad((fy * u).sum(), y)
        nngp.append(float((fx * fy).mean().detach()))
        dot.append(float((gx * gy).sum(-1).mean() / channels))
    return torch.tensor(nngp, dtype=torch.float64), torch.tensor(dot, dtype=torch.float64)


@pytest.mark.parametrize("gamma, shift, k, v1, v2", [
    (1.0, -1.0, 0.4, 1.0, 0.8), (0.6, -0.3, -0.5, 1.5, 0.6), (1.5, -1.0, 0.85, 0.9, 1.0)])
def test_exp_normalized_twin_monte_carlo(gamma, shift, k, v1, v2, one_thread):
    """ExpNormalized's random-feature twin: its NNGP and NTK factors, averaged over 100
    sampled twins (w) x 200 sampled (z, z') at C = 256 channels, within 5 standard
    errors (over twins) of the rule plus the finite-width bias, allowed as 2/C of the
    value (the correlation of z and z' is estimated from C channels; the gradient's
    radial part is O(1/C)); and a 10% error would not pass."""
    channels = 256
    layer = nk.ExpNormalized(gamma=gamma, shift=shift)
    nngp, dot = _exp_normalized_twin_samples(layer, k, v1, v2, channels, 100, 200, seed=3)
    want = layer._nngp_and_dot(_t([k]), _t([v1]), _t([v2]))
    for samples, w in ((nngp, float(want[0])), (dot, float(want[1]))):
        se = float(samples.std() / math.sqrt(samples.numel()))
        allowed = 5 * se + 2 / channels * abs(w)
        assert abs(float(samples.mean()) - w) <= allowed, (float(samples.mean()), w, allowed)
        assert abs(float(samples.mean()) - 1.1 * w) > allowed


def test_exp_normalized_twin_acts_per_position():
    """On images the twin mixes channels at each position alone (channels on axis 1)."""
    twin = nk.ExpNormalized(gamma=0.7).build((5, 3, 2), generator=torch.Generator()
                                              .manual_seed(0), dtype=torch.float64)
    x = torch.randn(2, 5, 3, 2, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    out = twin(x)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(out[:, :, i, j], twin(x[:, :, i, j]))


# ----------------------------------------------------- conversion and the grammar
def test_from_torch_gelu_tanh():
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 1))
    net = nk.from_torch(model)
    assert isinstance(net.layers[1], nk.GELU) and net.layers[1].approximate == "tanh"
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    twin = nk.Sequential(net.layers[0], Elementwise(
        lambda t: nn.functional.gelu(t, approximate="tanh")), net.layers[2])
    torch.testing.assert_close(net.kernel(x).ntk, twin.kernel(x).ntk, rtol=1e-12, atol=0)
    built = net.build((3,), generator=torch.Generator().manual_seed(0))
    assert isinstance(built[1], nn.GELU) and built[1].approximate == "tanh"


@pytest.mark.parametrize("layer", [
    nk.GELU(approximate="tanh"), nk.GELU(approximate="tanh", degree=48), nk.Hermite(4),
    nk.Polynomial([0.5]), nk.Polynomial([0.1, -1.0, 0.25]), nk.Gabor(), nk.SigmoidLike(),
    nk.ExpNormalized(), nk.ExpNormalized(gamma=2.0, shift=0.5, do_clip=True),
], ids=repr)
def test_spec_and_repr_round_trip(layer):
    spec = to_spec(layer)
    again = parse_architecture(spec)
    assert to_spec(again) == spec and repr(again) == repr(layer)
    assert repr(eval(repr(layer), vars(nk))) == repr(layer)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, error, match", [
    (lambda: nk.Hermite(-1), ValueError, "non-negative int"),
    (lambda: nk.Hermite(2.5), ValueError, "non-negative int"),
    (lambda: nk.Hermite("3"), ValueError, "non-negative int"),
    (lambda: nk.Polynomial([]), ValueError, "coef is empty"),
    (lambda: nk.Polynomial("123"), TypeError, "1-D sequence"),
    (lambda: nk.Polynomial(3.0), TypeError, "1-D sequence"),
    (lambda: nk.Polynomial([[1.0, 2.0]]), TypeError, "real number"),
    (lambda: nk.Polynomial([1.0, float("nan")]), ValueError, "finite"),
    (lambda: nk.Polynomial(torch.ones(2, 2)), TypeError, "1-D sequence"),
    (lambda: nk.ExpNormalized(gamma=-1.0), ValueError, "gamma must be a finite number >= 0"),
    (lambda: nk.ExpNormalized(shift=float("inf")), ValueError, "shift must be finite"),
    (lambda: nk.ExpNormalized(do_clip="yes"), TypeError, "do_clip"),
    (lambda: nk.GELU(approximate="exact"), ValueError, "'none' .* or 'tanh'"),
    (lambda: nk.GELU(degree=32), ValueError, "approximate='tanh' only"),
    (lambda: nk.GELU(approximate="tanh", degree=0), ValueError, "positive int"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_are_refused_clearly(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_exp_normalized_has_no_elementwise_function():
    with pytest.raises(TypeError, match="not an elementwise function"):
        nk.ExpNormalized().fn(torch.zeros(2))


def test_polynomial_accepts_tuples_arrays_and_tensors():
    import numpy as np

    want = nk.Polynomial([0.1, 1.0])
    for coef in ((0.1, 1.0), np.array([0.1, 1.0]), torch.tensor([0.1, 1.0], dtype=torch.float64)):
        assert nk.Polynomial(coef).coef == want.coef

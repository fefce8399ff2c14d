"""Adversarial suite, area F: finite outputs and predictions (issue 14).

Every public computation ends with one finite-output check (`ntkit.errors.
check_finite_output`): a kernel, empirical kernel, Monte Carlo estimate, prediction
or solver result that came out NaN or infinite raises `NonFiniteError` naming the
likely cause instead of being returned. Predictions refuse what they cannot use
(non-symmetric train kernels, negative ``diag_reg``, NaN or infinite kernels and
targets, wrong shapes and dtypes), each with the argument named.

Witnesses: the 2-homogeneity of a bias-free ReLU network's kernel (a large but
finite input scale passes and scales the kernel exactly), a plain float64 solve
for mixed-dtype posteriors, and the symmetrised kernel for kernels symmetric to
rounding.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import ntkit as nk
from ntkit import predict, solvers
from ntkit.errors import NonFiniteError

F64 = torch.float64


def _relu_net(depth=2, w_std=1.0, b_std=0.0):
    layers = []
    for _ in range(depth):
        layers += [nk.Linear(8, w_std=w_std, b_std=b_std), nk.ReLU()]
    return nk.Sequential(*layers, nk.Linear(1, w_std=w_std, b_std=b_std))


def _x(n=5, d=3, dtype=torch.float32, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _spd(n=6, seed=0):
    """A well-conditioned symmetric positive definite float64 kernel and targets."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64)
    k = a @ a.T / n + torch.eye(n, dtype=F64)
    return k, torch.randn(n, 2, generator=g, dtype=F64), torch.randn(3, n, generator=g,
                                                                     dtype=F64)


# ------------------------------------------------------------------ analytic kernels
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (F64, 1e160)],
                         ids=["float32-1e20", "float64-1e160"])
def test_overflowing_inputs_raise_naming_rescale_and_float64(dtype, scale):
    with pytest.raises(NonFiniteError, match="rescale the inputs") as e:
        _relu_net().kernel(_x(dtype=dtype) * scale)
    assert "float64" in str(e.value) and "nngp" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_large_finite_inputs_pass_and_scale_exactly():
    """A bias-free ReLU network's kernel is 2-homogeneous: k(c x) = c^2 k(x); at
    c = 1e100 in float64 it is finite, so the check must not fire."""
    net, x = _relu_net(), _x(dtype=F64)
    big, small = net.kernel(x * 1e100), net.kernel(x)
    assert torch.allclose(big.nngp, small.nngp * 1e200, rtol=1e-10, atol=0)
    assert torch.allclose(big.ntk, small.ntk * 1e200, rtol=1e-10, atol=0)


def test_variance_blowing_up_with_depth_names_the_depth_cause():
    """200 ReLU layers with w_std = 2: the variance doubles per layer (w_std^2 / 2),
    2^200 overflows float32."""
    net = _relu_net(depth=200, w_std=2.0)
    with pytest.raises(NonFiniteError, match="depth") as e:
        net.kernel(_x())
    assert "w_std > sqrt(2) for ReLU" in str(e.value)


def test_stacked_exp_names_exp():
    net = nk.Sequential(nk.Linear(8), nk.Exp(), nk.Linear(8), nk.Exp(), nk.Linear(8),
                        nk.Exp(), nk.Linear(1))
    with pytest.raises(NonFiniteError, match="stacked Exp"):
        net.kernel(_x() * 3)


# ------------------------------------------------------------------ empirical kernels
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _with(bad, x, row=1, col=0):
    x = x.clone()
    x[row, col] = bad
    return x


@pytest.mark.parametrize("fn", [nk.empirical_ntk, nk.empirical_ntk_by_layer,
                                nk.empirical_nngp],
                         ids=["empirical_ntk", "empirical_ntk_by_layer", "empirical_nngp"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_empirical_refuses_non_finite_x2_alone_and_one_example_batches(fn, bad):
    model, x = _model(), _x()
    with pytest.raises(ValueError, match=r"x2 has .* entries \(in examples \[1\]\)"):
        fn(model, x, _with(bad, x))
    with pytest.raises(ValueError, match=r"x1 has .* entries \(in examples \[0\]\)"):
        fn(model, _with(bad, x)[1:2])
    with pytest.raises(ValueError, match="x2 has"):
        fn(model, x[:1], _with(bad, x)[1:2])
    fn(model, x, x.clone())                       # finite: no error


def test_empirical_overflow_is_a_non_finite_error():
    torch.manual_seed(0)       # unbounded (ReLU): outputs of 1e30 inputs square past float32
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with pytest.raises(NonFiniteError, match=r"empirical_ntk\(\.\.\.\) is not finite"):
        nk.empirical_ntk(model, _x() * 1e30)
    with pytest.raises(NonFiniteError, match=r"empirical_nngp\(\.\.\.\) is not finite"):
        nk.empirical_nngp(model, _x() * 1e30)
    with pytest.raises(NonFiniteError, match="empirical_ntk_by_layer"):
        nk.empirical_ntk_by_layer(model, _x() * 1e30)


def test_monte_carlo_refuses_non_finite_inputs_and_outputs():
    net, g = _relu_net(), torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="x2"):
        nk.monte_carlo_kernel(net, _x(), _with(math.nan, _x()), n_samples=1, generator=g)
    with pytest.raises(ValueError, match="x1"):
        next(nk.empirical_kernels(net, _with(math.inf, _x()), n_samples=1, generator=g))
    with pytest.raises(NonFiniteError):
        nk.monte_carlo_kernel(net, _x() * 1e20, n_samples=1, generator=g)


# ------------------------------------------------------------------ predictions
def _asymmetric(k):
    k = k.clone()
    k[0, 3] += 0.1 * float(k.abs().max())
    return k


@pytest.mark.parametrize("call", ["gradient_descent_mse", "gradient_descent", "gp_inference",
                                  "max_learning_rate", "cg_krr"])
def test_non_symmetric_train_kernel_is_refused(call):
    k, y, kt = _spd()
    bad = _asymmetric(k)
    calls = {
        "gradient_descent_mse": lambda m: predict.gradient_descent_mse(m, y),
        "gradient_descent": lambda m: predict.gradient_descent(
            lambda f, t: ((f - t) ** 2).mean(), m, y),
        "gp_inference": lambda m: predict.gp_inference(m, y, kt),
        "max_learning_rate": lambda m: predict.max_learning_rate(m),
        "cg_krr": lambda m: solvers.cg_krr(m, y, diag_reg=1e-3),
    }
    with pytest.raises(ValueError, match="k_train_train is not symmetric"):
        calls[call](bad)
    calls[call](k)


@pytest.mark.parametrize("dtype,rel", [(F64, 1e-14), (torch.float32, 1e-6)],
                         ids=["float64", "float32"])
def test_kernel_symmetric_to_rounding_passes_and_equals_the_symmetrised(dtype, rel):
    k, y, kt = (t.to(dtype) for t in _spd())
    off = k.clone()
    off[0, 3] = off[0, 3] * (1 + rel)            # one entry a rounding error off
    got = predict.gp_inference(off, y, kt, diag_reg=1e-3).mean
    want = predict.gp_inference(0.5 * (off + off.T), y, kt, diag_reg=1e-3).mean
    assert torch.allclose(got, want, rtol=100 * rel, atol=100 * rel)


@pytest.mark.parametrize("diag_reg", [-1e-3, -1.0, math.nan, math.inf, torch.tensor(-0.5)],
                         ids=["-1e-3", "-1", "nan", "inf", "tensor"])
def test_negative_or_non_finite_diag_reg_is_refused_everywhere(diag_reg):
    k, y, kt = _spd()
    net, x = _relu_net(), _x(dtype=F64, n=6)
    kernel = nk.solvers.kernel_function(net, "ntk")
    calls = [
        lambda: predict.gp_inference(k, y, kt, diag_reg=diag_reg),
        lambda: predict.gp_inference(net.kernel(x), y, net.kernel(x[:3], x), get="ntk",
                                     diag_reg=diag_reg),
        lambda: predict.gp_inference(net.kernel(x), y, net.kernel(x[:3], x), get="nngp",
                                     diag_reg=diag_reg),
        lambda: predict.gradient_descent_mse(k, y, diag_reg=diag_reg),
        lambda: predict.gradient_descent_mse_ensemble(net, x, y, diag_reg=diag_reg),
        lambda: solvers.diag_reg_absolute(torch.diagonal(k), diag_reg),
        lambda: solvers.exact_krr(kernel, x, y, diag_reg=diag_reg),
        lambda: solvers.solve_krr(kernel, x, y, solver="cg", diag_reg=diag_reg),
        lambda: solvers.nystrom_krr(kernel, x, y, n_centers=6, diag_reg=diag_reg),
    ]
    for i, call in enumerate(calls):
        with pytest.raises((ValueError, TypeError), match="diag_reg"):
            call()
            pytest.fail(f"call {i} accepted diag_reg={diag_reg!r}")


@pytest.mark.parametrize("argument", ["k_test_train", "k_test_test", "y_train"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_kernels_and_targets_are_refused_by_name(argument, bad):
    k, y, kt = _spd()
    args = {"k_test_train": kt, "k_test_test": torch.eye(3, dtype=F64), "y_train": y}
    args[argument] = _with(bad, args[argument], row=1, col=1)
    with pytest.raises(ValueError, match=argument):
        predict.gp_inference(k, args["y_train"], args["k_test_train"], args["k_test_test"])
    if argument == "y_train":
        with pytest.raises(ValueError, match=argument):
            predict.gradient_descent(lambda f, t: ((f - t) ** 2).mean(), k, args[argument])
        with pytest.raises(ValueError, match=argument):
            predict.gradient_descent_mse(k, args[argument])
    if argument == "k_test_train":
        with pytest.raises(ValueError, match=argument):
            predict.gradient_descent_mse(k, y)(1.0, k_test_train=args[argument])
        with pytest.raises(ValueError, match=argument):
            predict.gp_inference(k, y, args[argument], solver="cg")


def test_non_finite_initial_outputs_are_refused_by_name():
    k, y, kt = _spd()
    flow = predict.gradient_descent_mse(k, y)
    with pytest.raises(ValueError, match="fx_train_0"):
        flow(1.0, fx_train_0=_with(math.nan, torch.zeros_like(y)))
    with pytest.raises(ValueError, match="fx_test_0"):
        flow(1.0, fx_test_0=math.inf, k_test_train=kt)
    ode = predict.gradient_descent(lambda f, t: ((f - t) ** 2).mean(), k, y)
    with pytest.raises(ValueError, match="fx_train_0"):
        ode(1.0, _with(math.nan, torch.zeros_like(y)))


def test_wrong_shapes_and_dtypes_name_the_argument_and_the_expected_shape():
    k, y, kt = _spd()
    flow = predict.gradient_descent_mse(k, y)
    with pytest.raises(ValueError, match=r"fx_train_0 must be a number or a tensor of "
                                         r"shape \(6, 2\).*got shape \(7, 2\)"):
        flow(1.0, fx_train_0=torch.zeros(7, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"k_test_train must have shape \(N_test, 6\)"):
        flow(1.0, k_test_train=torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"fx_test_0 must be .* shape \(3, 2\)"):
        flow(1.0, fx_test_0=torch.zeros(4, 2), k_test_train=kt)
    with pytest.raises(ValueError, match=r"k_test_test must have shape \(3, 3\)"):
        predict.gp_inference(k, y, kt, torch.eye(4, dtype=F64))
    with pytest.raises(TypeError, match="k_test_train must be floating-point"):
        predict.gp_inference(k, y, kt.long())
    with pytest.raises(TypeError, match="k_test_train must be a torch.Tensor"):
        predict.gp_inference(k, y, kt.numpy())
    ode = predict.gradient_descent(lambda f, t: ((f - t) ** 2).mean(), k, y)
    with pytest.raises(ValueError, match=r"k_test_train must have shape \(N_test, 6\)"):
        ode(1.0, torch.zeros_like(y), k_test_train=torch.zeros(3, 2, dtype=F64))


def test_mixed_dtypes_are_cast_to_the_train_kernel_dtype():
    """Kernel objects in float32 for the test points and float64 for training give
    the float64 posterior of the float32-rounded test kernels (a plain solve)."""
    net, x = _relu_net(), _x(n=6, dtype=F64)
    y = torch.randn(6, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    k_dd, k_td = net.kernel(x), net.kernel(x[:3].float(), x.float())
    got = predict.gp_inference(k_dd, y, k_td, get="ntk", diag_reg=1e-3)
    theta = k_dd.ntk + 1e-3 * k_dd.ntk.diagonal().mean() * torch.eye(6, dtype=F64)
    want = k_td.ntk.double() @ torch.linalg.solve(theta, y)
    assert got.mean.dtype == F64
    assert torch.allclose(got.mean, want, rtol=1e-9, atol=1e-12)


def test_overflowing_prediction_is_a_non_finite_error():
    k = torch.eye(4)
    y = torch.full((4, 1), 3e38)
    kt = torch.full((2, 4), 10.0)
    with pytest.raises(NonFiniteError, match="gp_inference"):
        predict.gp_inference(k, y, kt)
    with pytest.raises(FloatingPointError):          # still what callers caught before
        predict.gradient_descent_mse(k, y)(math.inf, k_test_train=kt)


# ------------------------------------------------------------------ solvers
def test_solver_results_are_checked():
    net, x = _relu_net(), _x(n=6, dtype=F64)
    y = torch.randn(6, 1, dtype=F64, generator=torch.Generator().manual_seed(0))

    def nan_kernel(a, b):
        return torch.full((a.shape[0], b.shape[0]), math.nan, dtype=F64)

    with pytest.raises(ValueError):
        solvers.exact_krr(nan_kernel, x, y, diag_reg=1e-3)
    with pytest.raises(ValueError, match="b has NaN"):
        solvers.conjugate_gradient(lambda v: v, _with(math.nan, y, row=0))
    with pytest.raises(ValueError, match=r"x \(|x1|NaN"):
        solvers.kernel_function(net, "ntk")(_with(math.nan, x), x)
    fitted = solvers.exact_krr(solvers.kernel_function(net, "ntk"), x, y, diag_reg=1e-3)
    with pytest.raises(ValueError):
        fitted.predict(_with(math.nan, x))


def test_auto_solver_warns_when_it_switches_to_nystrom():
    net, x = _relu_net(), _x(n=40, dtype=F64)
    y = torch.randn(40, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"solver='auto' chose 'nystrom'.*solver='exact'"):
        assert solvers.resolve_solver("auto", 40, F64, 1000) == "nystrom"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert solvers.resolve_solver("auto", 40, F64, 2**20) == "exact"
    with pytest.warns(UserWarning, match="chose 'nystrom'"):
        predict.gradient_descent_mse_ensemble(net, x, y, diag_reg=1e-3, solver="auto",
                                              memory_budget=1000, n_centers=40)


# ------------------------------------------------------------------ estimators
def _xy(n=60):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4))
    return x, np.sin(x[:, 0]) + 0.1 * x[:, 1]


@pytest.mark.parametrize("cls", ["NTKRegressor", "NNGPRegressor", "NTKClassifier"])
def test_estimators_auto_nystrom_warns_and_identical_fits_are_identical(cls):
    x, y = _xy()
    if cls == "NTKClassifier":
        y = (y > 0).astype(int)
    make = getattr(nk.sklearn, cls)
    kw = {"diag_reg": 1e-3, "memory_budget": 60 * 60 * 8, "n_centers": 20}
    with pytest.warns(UserWarning, match="pin|Pin"):
        a = make(**kw).fit(x, y)
    assert a.solver_ == "nystrom"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        b = make(**kw).fit(x, y)
        other = make(**kw, random_state=5).fit(x, y)
    assert np.array_equal(a.X_fit_, b.X_fit_)
    assert np.array_equal(a.predict(x), b.predict(x))
    assert not np.array_equal(a.X_fit_, other.X_fit_)       # the seed does choose the draw


@pytest.mark.parametrize("cls", ["NTKRegressor", "NNGPRegressor", "NTKClassifier"])
def test_estimators_refuse_nan_fitted_coefficients(cls):
    x, y = _xy(20)
    if cls == "NTKClassifier":
        y = (y > 0).astype(int)
    model = getattr(nk.sklearn, cls)(diag_reg=1e-3).fit(x, y)
    model.dual_coef_ = model.dual_coef_.copy()
    model.dual_coef_.flat[3] = np.nan
    with pytest.raises(ValueError, match="dual_coef_ has 1 NaN"):
        model.predict(x)


@pytest.mark.parametrize("cls", ["NNGPKernel", "NTKKernel"])
def test_sklearn_kernels_refuse_nan_and_overflow(cls):
    kernel = getattr(nk.sklearn, cls)()
    x, _ = _xy(5)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError):
        kernel(bad)
    with pytest.raises(ValueError):
        kernel(x * 1e200)
    assert np.isfinite(kernel(x)).all()


@pytest.mark.parametrize("fn", ["empirical_ntk", "empirical_nngp"])
def test_empirical_mixed_dtypes_are_named(fn):
    """x1 float32 with x2 float64, or float64 inputs to a float32 model, raise a
    TypeError naming both dtypes (not torch's matrix-product message)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x32, x64 = torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64)
    f = getattr(nk, fn)
    with pytest.raises(TypeError, match="x1 has dtype torch.float32 but x2 has dtype"):
        f(model, x32, x64)
    with pytest.raises(TypeError, match="parameters are torch.float32 but the inputs"):
        f(model, x64)
    assert f(model.double(), x64).dtype == torch.float64   # the fix it names works


def test_finite_check_agrees_with_isfinite_where_the_sum_overflows():
    """The finite-output check sums first (one pass): finite entries whose sum
    overflows still pass, and one NaN or inf among them still fails (witness:
    torch.isfinite elementwise)."""
    from ntkit.errors import NonFiniteError, check_finite_output

    big = torch.full((1000,), 3e38)                       # finite, the float32 sum is inf
    assert not torch.isfinite(big.sum()) and bool(big.isfinite().all())
    assert check_finite_output(big, "big") is big
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(50, 50, dtype=torch.float64)
        t[7, 3] = bad
        with pytest.raises(NonFiniteError):
            check_finite_output(t, "t")
    mixed = torch.tensor([float("inf"), -float("inf")])   # the sum is NaN, not inf
    with pytest.raises(NonFiniteError, match="2 infinite"):
        check_finite_output(mixed, "mixed")

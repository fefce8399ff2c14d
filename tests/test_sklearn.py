"""ntkit.sklearn: estimators, scikit-learn kernels, persistence.

Witnesses: the estimators against direct linear algebra on ``net.kernel`` of a
network built here by hand (a solve at ``t = inf``, a matrix exponential at finite
``t``), against `ntkit.predict.gradient_descent_mse_ensemble` (another code path for
the same dynamics) and against scikit-learn's own `GaussianProcessRegressor`; kernel
gradients against central finite differences; scikit-learn's estimator checks.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.gaussian_process import GaussianProcessClassifier, GaussianProcessRegressor
from sklearn.gaussian_process.kernels import WhiteKernel
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

import ntkit as nk
from ntkit import predict
from ntkit.sklearn import (
    NNGPKernel,
    NNGPRegressor,
    NTKClassifier,
    NTKKernel,
    NTKRegressor,
    load,
    save,
)

D = torch.float64
#: Relative tolerances (max abs error / max abs value), float64. Solves and
#: exponentials of these O(10^3)-conditioned kernels lose ~3 digits of 1e-16.
RTOL = 1e-9
#: Central differences with step 1e-6 in log theta: truncation ~1e-12, rounding ~1e-10.
FD_STEP, FD_RTOL = 1e-6, 1e-6

ACTS = {"relu": nk.ReLU, "erf": nk.Erf}
W_STD, B_STD, DEPTH, DIAG_REG = 1.3, 0.2, 2, 1e-3


def _data(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


X_TRAIN, X_TEST = _data(0, 30, 5), _data(1, 12, 5)
Y_TRAIN = np.c_[np.sin(X_TRAIN.sum(1)), np.cos(X_TRAIN[:, 0])]


def _net(act: str) -> nk.Layer:
    """The MLP the estimators' defaults describe, written out by hand."""
    layers = []
    for _ in range(DEPTH):
        layers += [nk.Linear(7, w_std=W_STD, b_std=B_STD), ACTS[act]()]
    return nk.Sequential(*layers, nk.Linear(3, w_std=W_STD, b_std=B_STD))


def _kernels(act: str, get: str):
    """Train-train (regularised), test-train and test-test kernels as float64 tensors."""
    net = _net(act)
    x, xt = torch.tensor(X_TRAIN), torch.tensor(X_TEST)
    k = getattr(net.kernel(x), get)
    k_reg = k + DIAG_REG * torch.trace(k) / len(k) * torch.eye(len(k), dtype=D)
    return k_reg, getattr(net.kernel(xt, x), get), getattr(net.kernel(xt), get)


def _rel(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _options(act: str, **extra):
    return dict(depth=DEPTH, activation=act, w_std=W_STD, b_std=B_STD, diag_reg=DIAG_REG,
                **extra)


# ------------------------------------------------------------------ regressors
@pytest.mark.parametrize("get", ["ntk", "nngp"])
@pytest.mark.parametrize("act", list(ACTS))
def test_converged_regressor_is_kernel_regression(act, get):
    k_reg, k_td, _ = _kernels(act, get)
    want = k_td @ torch.linalg.solve(k_reg, torch.tensor(Y_TRAIN))
    est = NTKRegressor(**_options(act, get=get)).fit(X_TRAIN, Y_TRAIN)
    assert _rel(est.predict(X_TEST), want) < RTOL
    one = NTKRegressor(**_options(act, get=get)).fit(X_TRAIN, Y_TRAIN[:, 0])
    assert one.predict(X_TEST).shape == (12,)
    assert _rel(one.predict(X_TEST), want[:, 0]) < RTOL


@pytest.mark.parametrize("get", ["ntk", "nngp"])
@pytest.mark.parametrize("t", [0.5, 40.0])
def test_finite_time_regressor_matches_matrix_exponential_and_ensemble(get, t):
    lr = 0.7
    k_reg, k_td, _ = _kernels("relu", get)
    y = torch.tensor(Y_TRAIN)
    decay = torch.linalg.matrix_exp(-lr * t * k_reg / y.numel())
    want = k_td @ torch.linalg.solve(k_reg, (torch.eye(len(k_reg), dtype=D) - decay) @ y)
    est = NTKRegressor(**_options("relu", get=get, t=t, learning_rate=lr))
    got = est.fit(X_TRAIN, Y_TRAIN).predict(X_TEST)
    assert _rel(got, want) < RTOL
    ensemble = predict.gradient_descent_mse_ensemble(
        _net("relu"), torch.tensor(X_TRAIN), y, learning_rate=lr, diag_reg=DIAG_REG)
    assert _rel(got, ensemble(torch.tensor(X_TEST), t, get=get).mean) < RTOL


def test_predict_does_not_factorise(monkeypatch):
    est = NNGPRegressor(t=3.0).fit(X_TRAIN, Y_TRAIN)

    def refuse(*args, **kwargs):
        raise AssertionError("predict factorised a matrix")

    for name in ("eigh", "cholesky", "cholesky_ex", "solve", "inv"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    est.predict(X_TEST, return_std=True)
    est.predict(X_TEST, return_cov=True)


@pytest.mark.parametrize("act", list(ACTS))
def test_nngp_regressor_is_sklearn_gp_posterior(act):
    k = _net(act).kernel(torch.tensor(X_TRAIN)).nngp
    alpha = DIAG_REG * float(torch.trace(k)) / len(k)
    gp = GaussianProcessRegressor(NNGPKernel(W_STD, B_STD, DEPTH, act), alpha=alpha,
                                  optimizer=None).fit(X_TRAIN, Y_TRAIN)
    est = NNGPRegressor(**_options(act)).fit(X_TRAIN, Y_TRAIN)
    for flag in ("return_std", "return_cov"):
        (mean, spread), (gp_mean, gp_spread) = (
            e.predict(X_TEST, **{flag: True}) for e in (est, gp))
        assert spread.shape == gp_spread.shape
        assert _rel(mean, gp_mean) < RTOL and _rel(spread, gp_spread) < 1e-7
    assert _rel(est.predict(X_TEST), gp.predict(X_TEST)) < RTOL


@pytest.mark.parametrize("t", [0.3, 25.0])
def test_nngp_regressor_at_finite_time_is_the_readout_trained_ensemble(t):
    y = torch.tensor(Y_TRAIN[:, :1])
    ensemble = predict.gradient_descent_mse_ensemble(
        _net("erf"), torch.tensor(X_TRAIN), y, learning_rate=2.0, diag_reg=DIAG_REG)
    want = ensemble(torch.tensor(X_TEST), t, get="nngp", compute_cov=True)
    est = NNGPRegressor(**_options("erf", t=t, learning_rate=2.0)).fit(X_TRAIN, Y_TRAIN[:, 0])
    mean, cov = est.predict(X_TEST, return_cov=True)
    assert _rel(mean, want.mean[:, 0]) < RTOL and _rel(cov, want.cov) < 1e-8
    assert np.allclose(est.predict(X_TEST, return_std=True)[1] ** 2, np.diag(cov), rtol=1e-8,
                       atol=1e-12)


# ------------------------------------------------------------------ classifier
def test_classifier_is_regression_on_one_hot_targets():
    labels = np.array(["cat", "dog", "emu"])[np.argmax(_data(2, 30, 3), 1)]
    clf = NTKClassifier(**_options("relu")).fit(X_TRAIN, labels)
    assert list(clf.classes_) == ["cat", "dog", "emu"]
    codes = np.searchsorted(clf.classes_, labels)
    onehot = torch.tensor(np.eye(3)[codes])
    k_reg, k_td, _ = _kernels("relu", "ntk")
    out = (k_td @ torch.linalg.solve(k_reg, onehot)).numpy()
    # centred targets shift every class's output by the same amount
    assert _rel(clf.decision_function(X_TEST), out - out.mean(1, keepdims=True)) < RTOL
    assert list(clf.predict(X_TEST)) == list(clf.classes_[out.argmax(1)])
    assert clf.score(X_TRAIN, labels) == 1.0          # interpolates with tiny diag_reg
    binary = NTKClassifier().fit(X_TRAIN, labels == "cat")
    assert binary.decision_function(X_TEST).shape == (12,)
    assert np.array_equal(binary.predict(X_TEST), binary.decision_function(X_TEST) > 0)


# ------------------------------------------------------------------ scikit-learn integration
@parametrize_with_checks([NTKRegressor(), NNGPRegressor(), NTKClassifier()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_pipeline_and_grid_search():
    x, y = _data(3, 60, 4) * [1, 10, 100, 0.1] + 5, np.sin(_data(3, 60, 4).sum(1))
    pipe = make_pipeline(StandardScaler(), NTKRegressor(depth=1)).fit(x[:40], y[:40])
    manual = NTKRegressor(depth=1).fit(StandardScaler().fit(x[:40]).transform(x[:40]), y[:40])
    assert _rel(pipe.predict(x[40:]), manual.predict(
        StandardScaler().fit(x[:40]).transform(x[40:]))) < RTOL
    grid = {"ntkregressor__diag_reg": [1e-4, 1e-1], "ntkregressor__depth": [1, 3]}
    search = GridSearchCV(make_pipeline(StandardScaler(), NTKRegressor()), grid, cv=3)
    search.fit(x, y)
    assert len(search.cv_results_["params"]) == 4
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert search.best_estimator_.predict(x).shape == (60,)


def test_architecture_forms_agree():
    spec = "-".join([f"linear(512, w_std={W_STD}, b_std={B_STD})-erf"] * DEPTH
                    + [f"linear(1, w_std={W_STD}, b_std={B_STD})"])
    preds = [NTKRegressor(a, **_options("erf")).fit(X_TRAIN, Y_TRAIN).predict(X_TEST)
             for a in (None, _net("erf"), spec)]
    assert _rel(preds[1], preds[0]) < 1e-12 and _rel(preds[2], preds[0]) < 1e-12
    f32 = NTKRegressor(**_options("erf", dtype="float32")).fit(X_TRAIN, Y_TRAIN)
    assert _rel(f32.predict(X_TEST), preds[0]) < 1e-3


# ------------------------------------------------------------------ kernels
@pytest.mark.parametrize("kernel_cls, get", [(NTKKernel, "ntk"), (NNGPKernel, "nngp")])
@pytest.mark.parametrize("act", ["relu", "erf", "tanh"])
def test_kernel_values_and_log_theta_gradients(kernel_cls, get, act):
    x = X_TRAIN[:6]
    kern = kernel_cls(W_STD, B_STD, DEPTH, act)
    value, grad = kern(x, eval_gradient=True)
    net = nk.Sequential(*[lay for _ in range(DEPTH) for lay in (
        nk.Linear(4, w_std=W_STD, b_std=B_STD),
        ACTS[act]() if act in ACTS else nk.Elementwise(torch.tanh))],
        nk.Linear(1, w_std=W_STD, b_std=B_STD))
    assert _rel(value, getattr(net.kernel(torch.tensor(x)), get)) < 1e-12
    assert _rel(kern(x, X_TEST), getattr(net.kernel(torch.tensor(x), torch.tensor(X_TEST)),
                                          get)) < 1e-12
    assert _rel(kern.diag(x), np.diag(value)) < 1e-12
    assert grad.shape == (6, 6, 2)
    for i in range(2):                                  # theta = (log b_std, log w_std)
        up, down = kern.theta.copy(), kern.theta.copy()
        up[i] += FD_STEP
        down[i] -= FD_STEP
        fd = (kern.clone_with_theta(up)(x) - kern.clone_with_theta(down)(x)) / (2 * FD_STEP)
        assert _rel(grad[..., i], fd) < FD_RTOL
    fixed = kernel_cls(W_STD, B_STD, DEPTH, act, b_std_bounds="fixed")
    assert np.array_equal(fixed(x, eval_gradient=True)[1], grad[..., 1:])


def test_gp_regressor_fits_kernel_hyperparameters():
    x, y = X_TRAIN, Y_TRAIN[:, 0]
    gp = GaussianProcessRegressor(NNGPKernel(w_std=0.5, b_std=1.0) + WhiteKernel(0.1),
                                  random_state=0).fit(x, y)
    start = gp.log_marginal_likelihood(gp.kernel.theta)
    assert gp.log_marginal_likelihood_value_ > start + 1.0
    assert not np.allclose(gp.kernel_.theta, gp.kernel.theta)


def test_gp_classifier_and_svc_on_digits():
    x, y = load_digits(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    xa, xb, ya, yb = train_test_split(x, y, train_size=300, test_size=300, stratify=y,
                                      random_state=0)
    svc = SVC(kernel=NTKKernel(depth=1)).fit(xa, ya)
    assert svc.score(xb, yb) > 0.85                     # chance: 0.1
    gram = NTKKernel(depth=1)(xa)
    pre = SVC(kernel="precomputed").fit(gram, ya)
    assert np.array_equal(pre.predict(NTKKernel(depth=1)(xb, xa)), svc.predict(xb))
    two = np.isin(ya, [3, 8])
    gpc = GaussianProcessClassifier(NNGPKernel(depth=1), random_state=0).fit(xa[two], ya[two])
    test = np.isin(yb, [3, 8])
    assert gpc.score(xb[test], yb[test]) > 0.85
    proba = gpc.predict_proba(xb[test])
    assert np.allclose(proba.sum(1), 1.0)


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("make, target", [
    (lambda: NTKRegressor(t=7.0, get="nngp"), Y_TRAIN),
    (lambda: NTKRegressor(_net("erf")), Y_TRAIN[:, 0]),
    (lambda: NNGPRegressor("linear(8)-relu-linear(1)", t=2.0), Y_TRAIN),
    (lambda: NTKClassifier(activation="gelu"),
     np.array(["a", "bb", "c"])[np.argmax(_data(2, 30, 3), 1)]),
    (lambda: NTKClassifier(depth=1), np.argmax(_data(2, 30, 3), 1) * 10),
], ids=["ntk-finite-t", "ntk-layer", "nngp-spec", "classifier-str", "classifier-int"])
def test_save_load_predicts_identically(tmp_path, make, target):
    est = make().fit(X_TRAIN, target)
    path = tmp_path / "model.npz"
    save(est, path)
    with np.load(path, allow_pickle=False) as data:    # plain arrays only
        assert "X_fit_" in data.files and "dual_coef_" in data.files
    back = load(path)
    assert type(back) is type(est)
    assert np.array_equal(back.predict(X_TEST), est.predict(X_TEST))
    if isinstance(est, NNGPRegressor):
        for got, want in zip(back.predict(X_TEST, return_std=True),
                             est.predict(X_TEST, return_std=True)):
            assert np.array_equal(got, want)
    if isinstance(est, NTKClassifier):
        assert np.array_equal(back.decision_function(X_TEST), est.decision_function(X_TEST))
        assert list(back.classes_) == list(est.classes_)


def test_save_load_errors(tmp_path):
    with pytest.raises(NotFittedError):
        save(NTKRegressor(), tmp_path / "a.npz")
    tanh = nk.Sequential(nk.Linear(4), nk.Elementwise(torch.tanh), nk.Linear(1))
    with pytest.raises(ValueError, match=r"no spec string.*activation='tanh'"):
        save(NTKRegressor(tanh).fit(X_TRAIN, Y_TRAIN), tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a file written by ntkit.sklearn.save"):
        load(tmp_path / "c.npz")


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("est, x, y, error, message", [
    (NTKRegressor(), np.where(X_TRAIN > 1.5, np.nan, X_TRAIN), Y_TRAIN, ValueError,
     "Input X contains NaN"),
    (NTKRegressor(activation="swish"), X_TRAIN, Y_TRAIN, ValueError,
     r"activation='swish' is not a known activation name; use one of \[.*'relu'"),
    (NTKRegressor(kernel="rbf"), X_TRAIN, Y_TRAIN, ValueError,
     r"kernel must be 'ntk' .* or 'nngp' .*, got 'rbf'"),
    (NTKRegressor(get="rbf"), X_TRAIN, Y_TRAIN, ValueError,
     r"get must be 'ntk' .* or 'nngp' .*, got 'rbf'"),
    (NTKClassifier(t=-1.0), X_TRAIN, Y_TRAIN[:, 0] > 0, ValueError,
     r"t must be a number >= 0 \(inf for the converged solution\), got -1.0"),
    (NNGPRegressor(dtype="float16"), X_TRAIN, Y_TRAIN, ValueError,
     "dtype must be 'float64' .* or 'float32', got 'float16'"),
    (NTKRegressor(architecture=3), X_TRAIN, Y_TRAIN, TypeError,
     "architecture must be None .*; got int"),
    (NTKRegressor(depth=-1), X_TRAIN, Y_TRAIN, ValueError, "depth must be an int >= 0"),
    (NTKRegressor(w_std=0.0), X_TRAIN, Y_TRAIN, ValueError, "w_std must be a finite number > 0"),
], ids=["nan", "activation", "kernel", "get", "time", "dtype", "architecture", "depth",
        "w_std"])
def test_bad_fit_input(est, x, y, error, message):
    with pytest.raises(error, match=message):
        est.fit(x, y)


def test_bad_predict_input():
    est = NNGPRegressor().fit(X_TRAIN, Y_TRAIN)
    with pytest.raises(ValueError, match="X has 3 features, but NNGPRegressor is expecting 5"):
        est.predict(X_TEST[:, :3])
    with pytest.raises(ValueError, match="return_std and return_cov are exclusive"):
        est.predict(X_TEST, return_std=True, return_cov=True)
    with pytest.raises(ValueError, match="Input X contains infinity"):
        est.predict(np.where(X_TEST > 1, np.inf, X_TEST))
    with pytest.raises(NotFittedError):
        NTKRegressor().predict(X_TEST)


def test_bad_kernel_use():
    with pytest.raises(ValueError, match="Gradient can only be evaluated when Y is None"):
        NTKKernel()(X_TRAIN, X_TEST, eval_gradient=True)
    with pytest.raises(ValueError, match=r"b_std=0.0 has no logarithm.*b_std_bounds='fixed'"):
        NNGPKernel(b_std=0.0)(X_TRAIN, eval_gradient=True)
    assert NNGPKernel(b_std=0.0, b_std_bounds="fixed")(X_TRAIN, eval_gradient=True)[1].shape \
        == (30, 30, 1)
    with pytest.raises(ValueError, match="activation='softmax' is not a known activation"):
        NNGPKernel(activation="softmax")(X_TRAIN)
    with pytest.raises(ValueError, match=re.escape("X must be 2-D (n_samples, n_features)")):
        NNGPKernel()(X_TRAIN[0])
    assert not NNGPKernel().is_stationary()
    assert math.isfinite(NTKKernel().diag(X_TRAIN).sum())


# ------------------------------------------------------------------ solvers (large N)
def _big(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = _data(seed, n, 4)
    return x, np.sin(x @ np.array([1.0, -0.5, 0.3, 0.8])) + 0.1 * _data(seed + 1, n)


def test_iterative_solvers_approach_the_exact_estimator():
    """``solver="cg"`` equals the exact fit; ``"nystrom"`` with every point as a centre
    equals it too, and with fewer centres its test error against the exact predictions
    shrinks as centres are added."""
    x, y = _big(10, 400)
    xt = _data(12, 50, 4)
    exact = NTKRegressor(diag_reg=1e-3, solver="exact").fit(x, y).predict(xt)
    cg = NTKRegressor(diag_reg=1e-3, solver="cg", n_centers=100).fit(x, y)
    assert cg.solver_ == "cg" and cg.n_iter_ > 0
    assert np.abs(cg.predict(xt) - exact).max() <= 1e-5 * np.abs(exact).max()
    full = NTKRegressor(diag_reg=1e-3, solver="nystrom", n_centers=400, random_state=0)
    assert np.abs(full.fit(x, y).predict(xt) - exact).max() <= 1e-5 * np.abs(exact).max()
    errors = [np.abs(NTKRegressor(diag_reg=1e-3, solver="nystrom", n_centers=m, random_state=0)
                     .fit(x, y).predict(xt) - exact).max() for m in (10, 40, 160)]
    assert errors[0] > errors[1] > errors[2], errors
    assert full.X_fit_.shape == (400, 4)


def test_auto_solver_switches_to_nystrom_past_the_memory_budget():
    """With a budget too small for two N x N kernels, "auto" fits by FALKON (centres,
    not all points, in ``X_fit_``) and still classifies well; within it, "auto" is exact."""
    x, y = _big(20, 300)
    labels = (y > 0).astype(int)
    small = NTKClassifier(diag_reg=1e-3, memory_budget=300 * 300 * 8, n_centers=60,
                          random_state=0).fit(x, labels)
    assert small.solver_ == "nystrom" and small.X_fit_.shape == (60, 4)
    assert small.score(x, labels) > 0.85
    assert NTKClassifier().fit(x, labels).solver_ == "exact"


def test_solver_errors_and_persistence(tmp_path):
    """Finite t with an iterative solver, a bad solver name and std from a Nystrom fit
    are refused with what to do; a Nystrom fit saves and loads to the same predictions."""
    x, y = _big(30, 120)
    with pytest.raises(ValueError, match=r"t = inf.*solver='exact'"):
        NTKRegressor(solver="nystrom", t=5.0).fit(x, y)
    with pytest.raises(ValueError, match=r"solver must be one of"):
        NTKRegressor(solver="lsqr").fit(x, y)
    with pytest.raises(ValueError, match=r"n_centers must be a positive integer"):
        NTKRegressor(solver="nystrom", n_centers=0).fit(x, y)
    gp = NNGPRegressor(solver="nystrom", n_centers=30, random_state=1).fit(x, y)
    with pytest.raises(ValueError, match=r"posterior mean only.*solver='exact'"):
        gp.predict(x[:3], return_std=True)
    save(gp, tmp_path / "m.npz")
    back = load(tmp_path / "m.npz")
    assert back.solver_ == "nystrom"
    np.testing.assert_array_equal(back.predict(x[:5]), gp.predict(x[:5]))


def test_input_shape_lets_convolutional_networks_fit_flattened_rows(tmp_path):
    """Rows of X reshaped to images by ``input_shape``: the fit equals kernel regression with
    the CNN's kernel on the images (witness: a direct solve), in a Pipeline, and survives
    save/load; a shape that does not match the features is refused."""
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(40, 2, 5, 5, generator=gen, dtype=D)
    y = images.mean((1, 2, 3)).numpy() * 3
    arch = "conv2d(8,3,padding=same)-relu-avgpool2d(2)-conv2d(8,2)-relu-globalavgpool-linear(1)"
    X = images.reshape(40, -1).numpy()
    reg = NTKRegressor(arch, input_shape=(2, 5, 5), diag_reg=1e-3).fit(X[:30], y[:30])
    net = nk.Sequential(nk.Conv2d(8, 3, padding="same"), nk.ReLU(), nk.AvgPool2d(2),
                        nk.Conv2d(8, 2), nk.ReLU(), nk.GlobalAvgPool(), nk.Linear(1))
    k = net.kernel(images[:30]).ntk
    k = k + 1e-3 * k.diagonal().mean() * torch.eye(30, dtype=D)
    want = net.kernel(images[30:], images[:30]).ntk @ torch.linalg.solve(
        k, torch.as_tensor(y[:30]).unsqueeze(1))
    got = reg.predict(X[30:])
    assert np.abs(got - want[:, 0].numpy()).max() <= RTOL * np.abs(want.numpy()).max() * 1e3
    save(reg, tmp_path / "cnn.npz")
    np.testing.assert_array_equal(load(tmp_path / "cnn.npz").predict(X[30:]), got)
    with pytest.raises(ValueError, match=r"input_shape=\(3, 5, 5\) holds 75 numbers per "
                                         r"example but X has 50 features"):
        NTKRegressor(arch, input_shape=(3, 5, 5)).fit(X, y)
    with pytest.raises(ValueError, match=r"input_shape must be None or a tuple of positive"):
        NTKRegressor(arch, input_shape=(2, 0, 25)).fit(X, y)


# ------------------------------------------------------------------ one name: get
def test_deprecated_kernel_keyword_warns_and_selects_like_get(tmp_path):
    """``kernel=`` (the old name of ``get``) warns at fit and gives the predictions of
    ``get=`` with the same value, not those of the default; get_params and clone keep
    it; a file written with ``kernel`` in its parameters (an older version) loads as
    ``get``."""
    from sklearn.base import clone

    new = NTKRegressor(get="nngp").fit(X_TRAIN, Y_TRAIN)
    old = NTKRegressor(kernel="nngp")
    assert old.get_params()["kernel"] == "nngp" and clone(old).kernel == "nngp"
    with pytest.warns(DeprecationWarning, match=r"kernel=.*deprecated.*get='nngp'"):
        old.fit(X_TRAIN, Y_TRAIN)
    assert np.array_equal(old.predict(X_TEST), new.predict(X_TEST))
    default = NTKRegressor().fit(X_TRAIN, Y_TRAIN)          # get="ntk": a different kernel
    assert np.abs(default.predict(X_TEST) - new.predict(X_TEST)).max() > 1e-3
    clf = NTKClassifier(kernel="nngp")
    with pytest.warns(DeprecationWarning):
        clf.fit(X_TRAIN, Y_TRAIN[:, 0] > 0)
    assert np.array_equal(clf.decision_function(X_TEST),
                          NTKClassifier(get="nngp").fit(X_TRAIN, Y_TRAIN[:, 0] > 0)
                          .decision_function(X_TEST))
    # a file of the previous version: params hold "kernel", not "get"
    path = tmp_path / "new.npz"
    save(new, path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    import json
    meta = json.loads(str(arrays.pop("meta")))
    meta["params"]["kernel"] = meta["params"].pop("get")
    with open(tmp_path / "old.npz", "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    back = load(tmp_path / "old.npz")
    assert back.get == "nngp" and back.kernel is None
    assert np.array_equal(back.predict(X_TEST), new.predict(X_TEST))


def test_numpy_scalars_are_accepted_like_python_numbers():
    """``depth=np.int64(2)`` (GridSearchCV over np.arange), ``w_std=np.float32(1.5)``,
    ``memory_budget`` and ``n_centers`` as NumPy integers: the same predictions as with
    Python numbers (witness: the same estimator with int/float)."""
    x, y = _big(40, 200)
    plain = NTKRegressor(depth=2, w_std=1.5, memory_budget=2**20, n_centers=50,
                         solver="nystrom", diag_reg=1e-3, random_state=0).fit(x, y)
    numpy = NTKRegressor(depth=np.int64(2), w_std=np.float32(1.5),
                         memory_budget=np.int64(2**20), n_centers=np.int64(50),
                         solver="nystrom", diag_reg=np.float64(1e-3),
                         random_state=0).fit(x, y)
    assert numpy.solver_ == "nystrom"
    np.testing.assert_allclose(numpy.predict(x[:20]), plain.predict(x[:20]), rtol=1e-6)
    search = GridSearchCV(NTKRegressor(diag_reg=1e-3), {"depth": np.arange(1, 3)}, cv=2)
    assert search.fit(X_TRAIN, Y_TRAIN).best_params_["depth"] in (1, 2)


def test_kernel_repr_names_its_hyperparameters():
    """The scikit-learn kernels' repr shows w_std, b_std and depth by name (not the
    logarithms in theta), also after a fit moved them."""
    assert repr(NTKKernel(w_std=2.0, b_std=0.5, depth=2)) == \
        "NTKKernel(w_std=2.0, b_std=0.5, depth=2)"
    assert repr(NNGPKernel(w_std=np.float32(1.5), depth=np.int64(3), activation="erf")) == \
        "NNGPKernel(w_std=1.5, b_std=0.1, depth=3, activation='erf')"
    k = NTKKernel(w_std=2.0, b_std=0.5, depth=1).clone_with_theta(np.log([0.25, 3.0]))
    assert repr(k) == "NTKKernel(w_std=3.0, b_std=0.25, depth=1)"

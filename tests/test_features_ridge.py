"""Streaming ridge regression on random features (`ntkit.features.fit_ridge`,
`RidgeAccumulator`): equal to the in-memory ridge on the same features (primal and dual
forms written plainly here), independent of the chunking, approaching exact kernel
regression with the network's kernel, and refusing bad input with a clear message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ntkit as nk
from ntkit.errors import NotPositiveDefiniteError
from ntkit.features import (
    NystromFeatureMap,
    RandomFeatureMap,
    RandomFeatureRidge,
    RidgeAccumulator,
    fit_ridge,
)

F64 = torch.float64


def _net():
    return nk.Sequential(nk.Linear(64, w_std=1.5, b_std=0.2), nk.ReLU(),
                         nk.Linear(64, w_std=1.5, b_std=0.2), nk.ReLU(),
                         nk.Linear(1, w_std=1.2, b_std=0.1))


def _data(n=300, d=6, outputs=2, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.cat([torch.sin(x[:, :1]), x[:, 1:2] * x[:, 2:3]], 1)[:, :outputs]
    y = y + 0.1 * torch.randn(n, outputs, generator=g, dtype=dtype)
    xt = torch.randn(50, d, generator=g, dtype=dtype)
    return x, y, xt


def _map(d=6, n_features=120, dtype=F64, seed=1):
    return RandomFeatureMap(_net(), (d,), n_features=n_features, dtype=dtype,
                            generator=torch.Generator().manual_seed(seed))


def _in_memory(phi, y, s):
    """Ridge on the whole feature matrix: w = (Phi^T Phi + s I)^-1 Phi^T y."""
    eye = torch.eye(phi.shape[1], dtype=F64)
    return torch.linalg.solve(phi.T @ phi + s * eye, phi.T @ y)


@pytest.mark.parametrize("diag_reg", [1e-3, 0.1], ids=["ridge1e-3", "ridge0.1"])
def test_streaming_equals_in_memory_ridge(diag_reg):
    x, y, xt = _data()
    fmap = _map()
    model = fit_ridge(fmap, x, y, diag_reg=diag_reg, chunk=64)
    phi = fmap(x)
    s = diag_reg * float(phi.pow(2).sum(1).mean())        # relative to the mean diagonal
    w = _in_memory(phi, y, s)
    assert model.diag_reg_absolute == pytest.approx(s, rel=1e-12)
    torch.testing.assert_close(model.coef, w, rtol=1e-8, atol=1e-8 * float(w.abs().max()))
    # the dual form, kernel ridge with K = Phi Phi^T: phi(x*) Phi^T (K + s I)^-1 y
    k = phi @ phi.T
    dual = fmap(xt) @ phi.T @ torch.linalg.solve(k + s * torch.eye(x.shape[0], dtype=F64), y)
    pred = model.predict(xt)
    assert pred.shape == (50, 2) and pred.dtype == F64
    torch.testing.assert_close(pred, dual, rtol=1e-8, atol=1e-8 * float(dual.abs().max()))


def test_absolute_ridge_is_added_as_given():
    x, y, _ = _data(outputs=1)
    fmap = _map()
    model = fit_ridge(fmap, x, y, diag_reg=2.5, diag_reg_absolute_scale=True)
    w = _in_memory(fmap(x), y, 2.5)
    assert model.diag_reg_absolute == 2.5
    torch.testing.assert_close(model.coef, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 128, 300, 10_000], ids=lambda c: f"chunk{c}")
def test_chunking_does_not_change_the_result(chunk):
    x, y, xt = _data()
    fmap = _map()
    ref = fit_ridge(fmap, x, y, diag_reg=0.01, chunk=300)
    got = fit_ridge(fmap, x, y, diag_reg=0.01, chunk=chunk)
    torch.testing.assert_close(got.coef, ref.coef, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.predict(xt, chunk=chunk), ref.predict(xt),
                               rtol=1e-10, atol=1e-12)


def test_accumulator_over_uneven_batches_equals_one_call():
    x, y, xt = _data()
    fmap = _map()
    acc = RidgeAccumulator(fmap)
    for a, b in [(0, 13), (13, 13), (13, 200), (200, 300)]:      # an empty batch too
        acc.update(x[a:b], y[a:b])
    assert acc.n_samples == 300
    phi = fmap(x)
    torch.testing.assert_close(acc.gram, phi.T @ phi, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(acc.rhs, phi.T @ y, rtol=1e-12, atol=1e-10)
    one = fit_ridge(fmap, x, y, diag_reg=0.05)
    torch.testing.assert_close(acc.solve(diag_reg=0.05).predict(xt), one.predict(xt),
                               rtol=1e-10, atol=1e-12)
    # solving leaves the sums: a second ridge from the same accumulator
    torch.testing.assert_close(acc.solve(diag_reg=0.5).coef,
                               _in_memory(phi, y, 0.5 * float(phi.pow(2).sum(1).mean())),
                               rtol=1e-8, atol=1e-10)


def test_float32_features_are_accumulated_in_float64():
    """float32 features of 1e5-scale inputs: the float64 sums match a float64 product of
    the same float32 features exactly enough (1e-12), which float32 sums would not."""
    x, y, xt = _data(n=2000, dtype=torch.float32)
    fmap = _map(dtype=torch.float32)
    acc = RidgeAccumulator(fmap)
    for i in range(0, 2000, 100):
        acc.update(x[i:i + 100], y[i:i + 100])
    phi = fmap(x).double()
    torch.testing.assert_close(acc.gram, phi.T @ phi, rtol=1e-12, atol=1e-9)
    model = acc.solve(diag_reg=0.1)
    assert model.coef.dtype == F64 and model.predict(xt).dtype == F64


def test_vector_targets_give_vector_predictions_and_numpy_inputs_work():
    x, y, xt = _data(outputs=1)
    fmap = _map()
    a = fit_ridge(fmap, x, y[:, 0], diag_reg=0.1, chunk=50)
    b = fit_ridge(fmap, x.numpy(), y.numpy(), diag_reg=0.1, chunk=50)
    assert a.predict(xt).shape == (50,)
    torch.testing.assert_close(a.predict(xt), b.predict(xt.numpy())[:, 0], rtol=1e-12,
                               atol=1e-12)


def test_from_a_network_draws_the_map_from_the_generator():
    x, y, xt = _data()
    kw = {"n_features": 120, "diag_reg": 0.1, "dtype": F64}
    a = fit_ridge(_net(), x, y, generator=torch.Generator().manual_seed(1), **kw)
    b = fit_ridge(_map(), x, y, diag_reg=0.1)
    assert isinstance(a, RandomFeatureRidge) and a.feature_map.n_features == 120
    torch.testing.assert_close(a.predict(xt), b.predict(xt), rtol=1e-12, atol=1e-12)


def test_approaches_exact_kernel_regression_as_d_grows():
    """One nonlinear layer (unbiased features): the streamed ridge's predictions approach
    the exact kernel ridge's, ``k(x*, X) (K + s I)^-1 y``, as D grows (D^-1/2)."""
    net = nk.Sequential(nk.Linear(64, w_std=1.5, b_std=0.2), nk.ReLU(),
                        nk.Linear(1, w_std=1.2, b_std=0.1))
    x, y, xt = _data(n=150, d=5, outputs=1, seed=3)
    k = net.kernel(x).ntk
    s = 0.1 * float(k.diagonal().mean())
    exact = net.kernel(xt, x).ntk @ torch.linalg.solve(k + s * torch.eye(150, dtype=F64), y)

    def err(d):
        errs = []
        for seed in range(3):
            m = fit_ridge(net, x, y, n_features=d, diag_reg=s, diag_reg_absolute_scale=True,
                          dtype=F64, generator=torch.Generator().manual_seed(seed), chunk=40)
            errs.append(float((m.predict(xt) - exact).norm() / exact.norm()))
        return float(np.mean(errs))

    small, large = err(32), err(2048)
    assert large < 0.2 and large < small / 3, (small, large)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,error,match", [
    pytest.param(lambda f, x, y: fit_ridge(f, x[:, :3], y, diag_reg=0.1), ValueError,
                 r"shape \(n, 6\)", id="x-wrong-features"),
    pytest.param(lambda f, x, y: fit_ridge(f, x, y[:-1], diag_reg=0.1), ValueError,
                 "same number of rows", id="y-rows-mismatch"),
    pytest.param(lambda f, x, y: fit_ridge(f, x, y.masked_fill(y > 1, float("nan")),
                                           diag_reg=0.1), ValueError, "NaN or infinite",
                 id="y-nan"),
    pytest.param(lambda f, x, y: fit_ridge(f, x.masked_fill(x > 2, float("inf")), y,
                                           diag_reg=0.1), ValueError, "NaN or infinite",
                 id="x-inf"),
    pytest.param(lambda f, x, y: fit_ridge(f, x, y, diag_reg=0.1, chunk=0), ValueError,
                 "chunk must be a positive int", id="chunk-zero"),
    pytest.param(lambda f, x, y: fit_ridge(f, x, y, diag_reg=-1.0), ValueError,
                 "diag_reg must be a finite number >= 0", id="ridge-negative"),
    pytest.param(lambda f, x, y: fit_ridge(f, x, y, diag_reg=float("nan")), ValueError,
                 "diag_reg must be a finite number >= 0", id="ridge-nan"),
    pytest.param(lambda f, x, y: fit_ridge(f, x[:0], y[:0], diag_reg=0.1), ValueError,
                 "no rows", id="no-rows"),
    pytest.param(lambda f, x, y: fit_ridge(f, x, y, diag_reg=0.1, n_features=10), TypeError,
                 "do not also pass n_features", id="map-and-n_features"),
    pytest.param(lambda f, x, y: fit_ridge(_net(), x, y, diag_reg=0.1, n_features=10),
                 TypeError, "needs n_features=D and generator", id="net-without-generator"),
    pytest.param(lambda f, x, y: fit_ridge(f, x.long(), y, diag_reg=0.1), TypeError,
                 "floating-point", id="x-integer"),
    pytest.param(lambda f, x, y: fit_ridge(f, x.tolist(), y, diag_reg=0.1), TypeError,
                 "floating-point torch.Tensor or NumPy array", id="x-list"),
    pytest.param(lambda f, x, y: fit_ridge(f, x[:5], y[:5], diag_reg=0.0), NotPositiveDefiniteError,
                 "normal equations", id="singular-without-ridge"),
    pytest.param(lambda f, x, y: RidgeAccumulator(f).solve(diag_reg=0.1), ValueError,
                 "no training rows", id="solve-before-update"),
    pytest.param(lambda f, x, y: RidgeAccumulator(f).update(x[:5], y[:5]).update(x[:5],
                                                                                 y[:5, 0]),
                 ValueError, "same number of outputs", id="outputs-change"),
    pytest.param(lambda f, x, y: RidgeAccumulator(_net()), TypeError,
                 "must be an ntkit.features.RandomFeatureMap", id="accumulator-of-a-net"),
])
def test_bad_input_is_refused_clearly(call, error, match):
    x, y, _ = _data()
    with pytest.raises(error, match=match):
        call(_map(), x, y)


def test_predict_refuses_inputs_of_another_shape():
    x, y, _ = _data()
    model = fit_ridge(_map(), x, y, diag_reg=0.1)
    with pytest.raises(ValueError, match=r"shape \(N, 6\)"):
        model.predict(torch.randn(4, 5, dtype=F64))
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        model.predict(x, chunk=-1)


# ------------------------------------------------------------------ Nystrom features
def test_nystrom_features_give_the_nystrom_kernel():
    """phi(x) . phi(x') = k(x, C) K_CC^-1 k(C, x') (Williams & Seeger 2001, eq. 8)."""
    net = _net()
    x, _, xt = _data(n=120)
    fmap = NystromFeatureMap(net, x[:40], jitter=0.0)
    kfn = nk.solvers.kernel_function(net, "ntk")
    expected = kfn(xt, x[:40]) @ torch.linalg.solve(kfn(x[:40], x[:40]), kfn(x[:40], xt))
    torch.testing.assert_close(fmap(xt) @ fmap(xt).T, expected, rtol=1e-8, atol=1e-10)


def test_nystrom_ridge_equals_falkon_with_the_same_centres():
    """Ridge on Nystrom features, streamed, is Nystrom KRR: FALKON's estimator
    (`nystrom_krr`, CG to 1e-12) on the same centres and the same relative ridge."""
    net = _net()
    x, y, xt = _data(n=400)
    kfn = nk.solvers.kernel_function(net, "ntk")
    falkon = nk.solvers.nystrom_krr(kfn, x, y, n_centers=60, diag_reg=0.05, tol=1e-12,
                                    dtype=F64, generator=torch.Generator().manual_seed(4))
    fmap = NystromFeatureMap(net, falkon.centers, jitter=0.0)
    ours = fit_ridge(fmap, x, y, diag_reg=0.05, chunk=33)
    assert ours.diag_reg_absolute == pytest.approx(falkon.diag_reg_absolute, rel=1e-12)
    want = falkon.predict(xt)
    torch.testing.assert_close(ours.predict(xt), want, rtol=1e-8,
                               atol=1e-8 * float(want.abs().max()))


def test_nystrom_ridge_on_all_points_is_exact_kernel_ridge():
    net = _net()
    x, y, xt = _data(n=150)
    k = net.kernel(x).ntk
    s = 0.1 * float(k.diagonal().mean())
    exact = net.kernel(xt, x).ntk @ torch.linalg.solve(k + s * torch.eye(150, dtype=F64), y)
    model = fit_ridge(NystromFeatureMap(net, x, jitter=0.0), x, y, diag_reg=0.1, chunk=64)
    torch.testing.assert_close(model.predict(xt), exact, rtol=1e-7,
                               atol=1e-7 * float(exact.abs().max()))


def test_nystrom_from_data_draws_distinct_rows():
    x, _, _ = _data(n=100)
    fmap = NystromFeatureMap.from_data(_net(), x, n_centers=30,
                                       generator=torch.Generator().manual_seed(0))
    assert fmap.n_features == 30 and fmap.centers.shape == (30, 6)
    assert torch.unique(fmap.centers, dim=0).shape[0] == 30


@pytest.mark.parametrize("call,error,match", [
    pytest.param(lambda x: NystromFeatureMap.from_data(_net(), x, n_centers=500,
                                                       generator=torch.Generator()),
                 ValueError, "n_centers must be an int between 1 and N = 300", id="too-many"),
    pytest.param(lambda x: NystromFeatureMap.from_data(_net(), x, n_centers=5, generator=0),
                 TypeError, "generator must be a torch.Generator", id="no-generator"),
    pytest.param(lambda x: NystromFeatureMap(_net(), x.numpy()), TypeError,
                 "centers must be a floating-point tensor", id="centers-numpy"),
    pytest.param(lambda x: NystromFeatureMap("ntk", x[:5]), TypeError,
                 "ntkit network or a kernel function", id="not-a-network"),
    pytest.param(lambda x: NystromFeatureMap(_net(), x[:5])(x[:, :4]), ValueError,
                 r"shape \(N, 6\) like the centres", id="x-wrong-shape"),
])
def test_nystrom_bad_input_is_refused_clearly(call, error, match):
    x, _, _ = _data()
    with pytest.raises(error, match=match):
        call(x)

"""GRU and LSTM: the Monte Carlo NNGP (Tensor Programs) against independent witnesses.

Witnesses: (1) Monte Carlo of the finite twins (torch's own nn.GRU / nn.LSTM, width
1024, 16 networks; their O(1/width) bias is well below the standard errors), within the combined standard errors; (2) for one step without recurrence, the
expectation written plainly and integrated by Gauss-Hermite quadrature.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ntkit as nk
from ntkit.layers.gated import gated_nngp

F64 = torch.float64
Z_MAX = 4.5           # |estimate - witness| / combined standard error, for every entry


def _x(n=3, c=2, steps=4, seed=0):
    return torch.randn(n, c, steps, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _twin_mc(layer, x, nets=16, seed=1):
    """Mean and standard error of the twins' ``f f^T / n`` (matching steps for "all")."""
    gen = torch.Generator().manual_seed(seed)
    ks = []
    for _ in range(nets):
        model = layer.build(x.shape[1:], generator=gen, dtype=F64)
        with torch.no_grad():
            f = model(x)
        ks.append(torch.einsum("ic...,jc...->ij...", f, f) / f.shape[1])
    ks = torch.stack(ks)
    return ks.mean(0), ks.std(0) / math.sqrt(nets)


def _z(estimate, witness, witness_se):
    return ((estimate.mean - witness).abs()
            / (estimate.stderr ** 2 + witness_se ** 2).sqrt()).max().item()


CASES = [("GRU", "last"), ("GRU", "mean"), ("GRU", "all"), ("LSTM", "last"),
         ("LSTM", "mean"), ("LSTM", "all")]


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "readout"), CASES, ids=[f"{c}-{r}" for c, r in CASES])
def test_nngp_matches_monte_carlo_of_wide_finite_twins(cls, readout):
    layer = getattr(nk, cls)(1024, w_std=1.5, u_std=1.2, b_std=0.3, readout=readout,
                             samples=4096)
    x = _x()
    est = layer.nngp(x)
    mc, se = _twin_mc(layer, x)
    assert est.mean.shape == mc.shape == ((3, 3, 4) if readout == "all" else (3, 3))
    assert _z(est, mc, se) < Z_MAX


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["GRU", "LSTM"])
def test_the_check_rejects_a_wrong_recurrent_variance(cls):
    x = _x()
    twin = getattr(nk, cls)(1024, w_std=1.5, u_std=1.2, b_std=0.3, samples=4096)
    mc, se = _twin_mc(twin, x)
    assert _z(twin.nngp(x), mc, se) < Z_MAX
    wrong = getattr(nk, cls)(1024, w_std=1.5 * 2, u_std=1.2, b_std=0.3, samples=4096)
    assert _z(wrong.nngp(x), mc, se) > 1.2 * Z_MAX


def _gauss_hermite_2d(cov: np.ndarray, fn_a, fn_b, degree=48):
    """``E[fn_a(u) fn_b(v)]`` for ``(u, v) ~ N(0, cov)``."""
    t, w = np.polynomial.hermite_e.hermegauss(degree)
    w = w / w.sum()
    z1, z2 = np.meshgrid(t, t, indexing="ij")
    s1 = np.sqrt(cov[0, 0])
    u = s1 * z1        # a Cholesky factor written out (valid for singular cov, u == v)
    v = cov[1, 0] / s1 * z1 + np.sqrt(max(cov[1, 1] - cov[1, 0] ** 2 / cov[0, 0], 0.0)) * z2
    return float((w[:, None] * w[None, :] * fn_a(u) * fn_b(v)).sum())


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def test_one_step_gru_without_bias_is_a_product_of_two_gaussian_integrals():
    """L = 1, zero state, no bias: ``h = (1 - sigma(a_z)) tanh(a_n)`` with the gate
    pre-activations independent pairs of covariance ``u^2 x.x'/C``, so
    ``K = E[(1 - sigma(a))(1 - sigma(a'))] E[tanh(b) tanh(b')]``."""
    u = 1.7
    x = _x(n=3, c=3, steps=1, seed=4)
    est = gated_nngp("gru", x, w_std=1.3, u_std=u, b_std=None, samples=16384, seed=3)
    x_np = x[..., 0].numpy()
    want = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            cov = u ** 2 * np.array([[x_np[i] @ x_np[i], x_np[i] @ x_np[j]],
                                     [x_np[j] @ x_np[i], x_np[j] @ x_np[j]]]) / 3
            gate = _gauss_hermite_2d(cov, lambda a: 1 - _sigmoid(a), lambda a: 1 - _sigmoid(a))
            cand = _gauss_hermite_2d(cov, np.tanh, np.tanh)
            want[i, j] = gate * cand
    z = (est.mean.numpy() - want) / est.stderr.numpy()
    assert np.abs(z).max() < Z_MAX
    # and the witness would see a wrong input scale
    wrong = gated_nngp("gru", x, w_std=1.3, u_std=u * 1.3, b_std=None, samples=16384, seed=3)
    assert np.abs((wrong.mean.numpy() - want) / wrong.stderr.numpy()).max() > 2 * Z_MAX


def test_standard_error_falls_as_one_over_root_samples_and_covers_the_spread():
    x = _x(n=2)
    small = [gated_nngp("lstm", x, w_std=1.2, b_std=0.2, samples=512, seed=s).mean
             for s in range(24)]
    spread = torch.stack(small).std(0)
    est_small = gated_nngp("lstm", x, w_std=1.2, b_std=0.2, samples=512, seed=99)
    est_big = gated_nngp("lstm", x, w_std=1.2, b_std=0.2, samples=2048, seed=99)
    ratio = (est_small.stderr / est_big.stderr).mean().item()
    assert 1.7 < ratio < 2.3
    # the reported error is the seed-to-seed spread (within the spread's own error)
    assert torch.allclose(est_small.stderr, spread, rtol=0.45)


def test_symmetric_deterministic_and_seeded_by_the_generator():
    x = _x()
    a = nk.GRU(8, w_std=1.4, samples=1024, generator=torch.Generator().manual_seed(5))
    b = nk.GRU(8, w_std=1.4, samples=1024, generator=torch.Generator().manual_seed(5))
    c = nk.GRU(8, w_std=1.4, samples=1024, generator=torch.Generator().manual_seed(6))
    k = a.nngp(x).mean
    assert torch.equal(k, k.T)
    assert torch.equal(k, b.nngp(x).mean)
    assert torch.equal(k, a.nngp(x).mean)
    assert not torch.equal(k, c.nngp(x).mean)
    # x2 given: the same pairs in the other order agree within the error
    est = a.nngp(x[:2], x)
    assert est.mean.shape == (2, 3)
    assert ((est.mean - k[:2]).abs() <= 5 * est.stderr + 1e-12).all()
    # chunks of pairs (a small budget) give the same values
    assert torch.allclose(a.nngp(x, memory_budget=1).mean, k, rtol=0, atol=1e-9)
    # float32 inputs: the same values in float32
    assert torch.allclose(a.nngp(x.float()).mean, k.float(), atol=1e-6)


def test_networks_refuse_the_kernel_and_point_to_nngp_and_the_empirical_ntk():
    x = _x()
    for cls in (nk.GRU, nk.LSTM):
        net = nk.Sequential(cls(16), nk.Linear(1))
        with pytest.raises(ValueError, match=r"\.nngp\(x1, x2\).*empirical_ntk"):
            net.kernel(x)


@pytest.mark.parametrize("cls", ["GRU", "LSTM"])
def test_the_twin_is_torchs_module_and_has_an_empirical_ntk(cls):
    layer = getattr(nk, cls)(6, readout="last", b_std=0.1)
    model = nk.Sequential(layer, nk.Linear(2)).build((2, 4), generator=torch.Generator()
                                                     .manual_seed(0), dtype=F64)
    inner = model[0].rnn if hasattr(model, "__getitem__") else None
    assert isinstance(inner, getattr(torch.nn, cls))
    x = _x()
    ks = [nk.empirical_ntk(model, x, method=m) for m in ("jacobian", "vector_products")]
    assert torch.allclose(ks[0], ks[1], rtol=1e-10)
    assert ks[0].shape == (3, 3)


def test_bad_arguments_say_what_was_wrong():
    with pytest.raises(ValueError, match="out_channels"):
        nk.GRU(0)
    with pytest.raises(ValueError, match="readout"):
        nk.LSTM(4, readout="first")
    with pytest.raises(ValueError, match="w_std"):
        nk.GRU(4, w_std=float("nan"))
    with pytest.raises(ValueError, match="samples"):
        nk.GRU(4, samples=1)
    with pytest.raises(TypeError, match="generator"):
        nk.GRU(4, generator=0)
    layer = nk.GRU(4, samples=64)
    with pytest.raises(ValueError, match=r"\(N, C, L\)"):
        layer.nngp(torch.randn(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        layer.nngp(torch.full((2, 1, 3), float("nan")))
    with pytest.raises(ValueError, match="same channels and length"):
        layer.nngp(torch.randn(2, 1, 3), torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="sequences of per-example shape"):
        layer.build((5,))


@pytest.mark.parametrize("module", [torch.nn.GRU(3, 4), torch.nn.LSTM(3, 4)],
                         ids=["GRU", "LSTM"])
def test_from_torch_refuses_gated_modules_and_names_what_works(module):
    with pytest.raises(nk.ConversionError, match=r"gates multiply.*\.nngp\(x1, x2\).*"
                                                 r"empirical_ntk"):
        nk.from_torch(torch.nn.Sequential(module))

"""Embedding: token ids (N, L) as inputs; kernels against the formula written out,
Monte Carlo of the finite twin, masks, and the errors for bad token inputs."""

from __future__ import annotations

import math

import pytest
import torch

import ntkit as nk
from ntkit.layers.embedding import sinusoidal_embeddings
from ntkit.monte_carlo import monte_carlo_kernel

V, L_, C = 7, 5, 64


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n, L_), generator=torch.Generator().manual_seed(seed))


def _formula(t1, t2, w_std, pos, pos_std):
    """The rule written plainly: position pair (p, q), x-pair (i, j)."""
    n1, n2 = t1.shape[0], t2.shape[0]
    nngp = torch.zeros(n1, n2, L_, L_, dtype=torch.float64)
    ntk = torch.zeros_like(nngp)
    s = sinusoidal_embeddings(C, L_)
    for i in range(n1):
        for j in range(n2):
            for p in range(L_):
                for q in range(L_):
                    tok = w_std**2 * float(t1[i, p] == t2[j, q])
                    if pos == "learned":
                        extra, extra_ntk = pos_std**2 * (p == q), pos_std**2 * (p == q)
                    elif pos == "sinusoidal":
                        extra, extra_ntk = pos_std**2 * float(s[:, p] @ s[:, q]) / C, 0.0
                    else:
                        extra = extra_ntk = 0.0
                    nngp[i, j, p, q] = tok + extra
                    ntk[i, j, p, q] = tok + extra_ntk
    return nngp, ntk


@pytest.mark.parametrize("pos", ["none", "learned", "sinusoidal"])
def test_kernel_is_the_token_equality_formula(pos):
    t1, t2 = _ids(3, 0), _ids(4, 1)
    layer = nk.Embedding(C, V, w_std=1.3, pos_emb=pos, pos_std=0.6, dtype=torch.float64)
    # GlobalSumPool over positions: the sum of the position-pair kernel (times 1).
    net = nk.Sequential(layer, nk.GlobalSumPool())
    k = net.kernel(t1, t2)
    nngp, ntk = _formula(t1, t2, 1.3, pos, 0.6)
    torch.testing.assert_close(k.nngp, nngp.sum((-2, -1)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, ntk.sum((-2, -1)), rtol=1e-12, atol=1e-12)
    # per-position (no position mixing): the diagonal of the pairs
    k2 = layer.kernel(t1, t2)
    torch.testing.assert_close(k2.nngp, torch.diagonal(nngp, 0, -2, -1), rtol=1e-12,
                               atol=1e-12)


def test_float_ids_keep_their_dtype_and_int_ids_take_the_layers():
    t = _ids(3, 2)
    net = nk.Sequential(nk.Embedding(C, V), nk.GlobalAvgPool())
    assert net.kernel(t.double()).nngp.dtype == torch.float64
    assert net.kernel(t.float()).nngp.dtype == torch.float32
    assert net.kernel(t).nngp.dtype == torch.get_default_dtype()
    net64 = nk.Sequential(nk.Embedding(C, V, dtype=torch.float64), nk.GlobalAvgPool())
    assert net64.kernel(t).nngp.dtype == torch.float64
    torch.testing.assert_close(net64.kernel(t).nngp, net.kernel(t.double()).nngp)


@pytest.mark.slow
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_monte_carlo_of_the_twin(pos):
    t1 = _ids(4, 3)
    net = nk.Sequential(nk.Embedding(C, V, pos_emb=pos, pos_std=0.8),
                        nk.Conv1d(C, 1, w_std=1.2), nk.ReLU(), nk.GlobalAvgPool(),
                        nk.Linear(16))
    k = net.kernel(t1.double())
    mc = monte_carlo_kernel(net, t1.double(), n_samples=64,
                            generator=torch.Generator().manual_seed(0))
    for name in ("nngp", "ntk"):
        got, want = getattr(mc, name), getattr(k, name)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 0.15, (name, err)


def test_twin_takes_ids_and_their_float_coding_alike():
    layer = nk.Embedding(8, V, pos_emb="learned")
    model = layer.build((L_,), generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    t = _ids(3, 4)
    out = model(t)
    assert out.shape == (3, 8, L_)
    torch.testing.assert_close(out, model(t.double()))
    torch.testing.assert_close(out, model(t.double().unsqueeze(1)))
    want = model.weight[t].transpose(1, 2) + model.pos_weight
    torch.testing.assert_close(out, want)


def test_mask_zeroes_absent_positions_and_matches_truncation():
    t = _ids(3, 5)
    m = torch.ones(3, L_, dtype=torch.bool)
    m[1, 3:] = False
    net = nk.Sequential(nk.Embedding(C, V, pos_emb="learned"), nk.GlobalAvgPool())
    k = net.kernel(t.double(), mask=m)
    short = net.kernel(t[1:2, :3].double())
    torch.testing.assert_close(k.nngp[1, 1], short.nngp[0, 0], rtol=1e-12, atol=1e-12)


def test_token_id_errors_say_what_to_do():
    net = nk.Sequential(nk.Embedding(C, V), nk.GlobalAvgPool())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        net.kernel(torch.full((2, 3), V))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        net.kernel(torch.full((2, 3), -1))
    with pytest.raises(ValueError, match="whole numbers"):
        net.kernel(torch.full((2, 3), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"must be \(N, L\)"):
        net.kernel(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="token ids"):
        net.kernel(torch.zeros(2, 3, dtype=torch.bool))
    plain = nk.Sequential(nk.Conv1d(4, 1), nk.GlobalAvgPool())
    with pytest.raises(TypeError, match="only by a network whose first layer is nk.Embedding"):
        plain.kernel(torch.zeros(2, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="first layer"):
        nk.Sequential(nk.Conv1d(4, 1), nk.Embedding(C, V)).kernel(torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="pos_emb"):
        nk.Embedding(C, V, pos_emb="rotary")
    with pytest.raises(ValueError, match="num_embeddings"):
        nk.Embedding(C, 0)
    assert math.isfinite(net.kernel(torch.zeros(1, 3, dtype=torch.long)).nngp.item())


def test_from_torch_embedding_against_monte_carlo_over_torchs_init():
    """nn.Embedding converts to Embedding(w_std=1) (torch draws N(0, 1) rows): the
    empirical per-position covariance over 400 of torch's own initialisations and 32
    channels matches the converted kernel within 5 standard errors."""
    t1 = _ids(3, 8)
    net = nk.from_torch(torch.nn.Sequential(torch.nn.Embedding(V, 32)))
    k = net.kernel(t1.double())
    torch.manual_seed(0)
    draws = []
    for _ in range(400):
        f = torch.nn.Embedding(V, 32).double()(t1).detach()  # (N, L, C)
        draws.append(torch.einsum("ipc,jpc->ijp", f, f) / 32)
    draws = torch.stack(draws)
    se = draws.std(0) / 20
    assert bool(((draws.mean(0) - k.nngp).abs() <= 5 * se + 1e-12).all())
    assert torch.equal(k.ntk, k.nngp)  # the rows are trained: their NTK is their NNGP
    with pytest.raises(nk.ConversionError, match="padding_idx"):
        nk.from_torch(torch.nn.Sequential(torch.nn.Embedding(V, 8, padding_idx=0)))
    with pytest.raises(nk.ConversionError, match="max_norm"):
        nk.from_torch(torch.nn.Sequential(torch.nn.Embedding(V, 8, max_norm=1.0)))

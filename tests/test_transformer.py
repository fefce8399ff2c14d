"""Transformers: MultiheadAttention at the 1/sqrt(d_head) scaling (sampled Gaussian
logits, Hron et al. 2020), encoder blocks, readouts, masks, error estimates.

Witnesses: SelfAttention's closed form for the identity mechanism (the same
formulas), exact values where attention is deterministic (a causal first query),
masked == truncated sequences within the reported numerical error, a
high-accuracy reference for the error's n_samples^-1/2 law, and Monte Carlo of
the finite twins (slow).
"""

from __future__ import annotations

import pytest
import torch

import ntkit as nk
from ntkit.layers import mha as mha_module
from ntkit.layers.mha import MultiheadAttention, numerical_error
from ntkit.layers.transformer import TokenReadout, encoder, encoder_block, readout


def _x(n: int, c: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, length, generator=g, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_identity_mechanism_converges_to_selfattentions_closed_form():
    """The same expectation formulas (value, query/key weight and input terms) with
    A = G have SelfAttention(linear_scaling=False, 'identity')'s closed form; the
    deviation is within a few reported standard errors."""
    x1, x2 = _x(3, 4, 4, 0), _x(2, 4, 4, 1)
    opts = {"w_query_std": 0.7, "w_key_std": 0.9, "b_std": 0.1}
    sampled = nk.Sequential(nk.Conv1d(16, 1, w_std=1.2), nk.ReLU(), MultiheadAttention(
        16, 2, mechanism="identity", n_samples=2048, **opts), nk.GlobalAvgPool())
    closed = nk.Sequential(nk.Conv1d(16, 1, w_std=1.2), nk.ReLU(), nk.SelfAttention(
        16, 2, mechanism="identity", linear_scaling=False, **opts), nk.GlobalAvgPool())
    want = closed.kernel(x1, x2)
    est = numerical_error(sampled, x1, x2, replicates=4)
    for name, err in (("nngp", est.nngp_error), ("ntk", est.ntk_error)):
        dev = (getattr(est.kernel, name) - getattr(want, name)).abs()
        # the replicate mean has error err / 2; 5 of its standard errors plus rounding
        assert bool((dev <= 5 * err / 2 + 1e-9).all()), (name, dev, err)


def test_dropping_the_query_key_terms_is_caught(monkeypatch):
    x1 = _x(3, 4, 4, 2)
    opts = {"w_query_std": 0.9, "w_key_std": 0.9, "b_std": 0.1, "mechanism": "identity"}
    closed = nk.Sequential(nk.Conv1d(16, 1), nk.ReLU(), nk.SelfAttention(
        16, 2, linear_scaling=False, **opts), nk.GlobalAvgPool()).kernel(x1)
    net = nk.Sequential(nk.Conv1d(16, 1), nk.ReLU(), MultiheadAttention(16, 2, n_samples=2048,
                                                                         **opts),
                        nk.GlobalAvgPool())
    good = numerical_error(net, x1, replicates=4)
    monkeypatch.setattr(mha_module, "_bracket_identity", lambda kv, bm: 0 * kv)
    bad = numerical_error(net, x1, replicates=4)
    ok = (good.kernel.ntk - closed.ntk).abs() <= 5 * good.ntk_error + 1e-9
    caught = (bad.kernel.ntk - closed.ntk).abs() > 5 * bad.ntk_error + 1e-9
    assert bool(ok.all()) and bool(caught.any())


def test_causal_first_query_is_exact():
    """Causal attention: query 0 sees only key 0, so its output kernel is exact:
    K'[0, 0] = ov^2 K[0, 0] + b^2 and T'[0, 0] = ov^2 (T + 2K)[0, 0] + b^2
    (the softmax Jacobian vanishes, so no query/key term)."""
    x1, x2 = _x(3, 4, 5, 3), _x(2, 4, 5, 4)
    before = nk.Sequential(nk.Conv1d(16, 1, w_std=1.3, b_std=0.2), nk.ReLU())
    att = MultiheadAttention(16, 2, w_value_std=1.1, w_out_std=0.9, b_std=0.3, causal=True,
                             n_samples=16)
    k_in = before.kernel(x1, x2)
    net = nk.Sequential(before, att, TokenReadout("first"))
    k = net.kernel(x1, x2)
    ov2, b2 = (1.1 * 0.9) ** 2, 0.3**2
    torch.testing.assert_close(k.nngp, ov2 * k_in.nngp[:, :, 0] + b2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k.ntk, ov2 * (k_in.ntk[:, :, 0] + 2 * k_in.nngp[:, :, 0]) + b2,
                               rtol=1e-12, atol=1e-12)


def test_error_estimate_is_honest_and_falls_as_inverse_sqrt_samples():
    """Sixteen times the samples (a quarter of the requested error) cut the RMS
    deviation from a high-accuracy reference (16384 draws) to about a quarter (0.4
    allows for the noise of 8 seeds); the reported error (spread of 6 replicates)
    matches the measured deviation within a factor 2."""
    x1 = _x(2, 4, 3, 5)

    def net(n_samples, seed=0):
        return nk.Sequential(nk.Conv1d(8, 1), MultiheadAttention(
            8, 2, n_samples=n_samples, seed=seed), nk.GlobalAvgPool())

    ref = net(16384, seed=99).kernel(x1)

    def deviation(n):  # RMS deviation from the reference, averaged over 8 seeds
        return sum(float(((net(n, s + 1).kernel(x1).ntk - ref.ntk) ** 2).mean().sqrt())
                   for s in range(8)) / 8

    d64, d1024 = deviation(64), deviation(1024)
    assert d1024 < 0.4 * d64, (d64, d1024)
    for n, d in ((64, d64), (1024, d1024)):
        reported = float((numerical_error(net(n), x1, replicates=6).ntk_error ** 2).mean()
                         .sqrt())
        assert 0.5 * d < reported < 2 * d, (n, d, reported)


def test_padding_mask_equals_truncated_sequences_within_the_reported_error():
    ids = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    net = nk.Sequential(nk.Embedding(32, 9, pos_emb="learned", dtype=torch.float64),
                        encoder_block(32, 4, 64, n_samples=1024), readout("mean"))
    full = numerical_error(net, ids, replicates=3, mask=mask)
    short = numerical_error(net, ids[1:2, :4], replicates=3)
    for name in ("nngp", "ntk"):
        dev = abs(float(getattr(full.kernel, name)[1, 1] - getattr(short.kernel, name)[0, 0]))
        err = float(getattr(full, name + "_error")[1, 1] + getattr(short, name + "_error")[0, 0])
        assert dev < 4 * err + 1e-9, (name, dev, err)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("kind", ["mean", "first", "last"])
def test_encoder_kernels_are_consistent(norm_first, kind):
    """diagonal == diagonal of full, tiles == untiled (the draws are shared by all
    tiles), exactly symmetric: through two blocks, causal and padding masks, readouts."""
    ids = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2, 3:] = False
    net = nk.Sequential(nk.Embedding(32, 7, pos_emb="learned", dtype=torch.float64),
                        encoder(2, 32, 4, 64, norm_first=norm_first, causal=True,
                                n_samples=32, activation="gelu"), readout(kind))
    k = net.kernel(ids, mask=mask)
    torch.testing.assert_close(net.kernel(ids, diagonal=True, mask=mask).nngp,
                               k.nngp.diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net.kernel(ids, memory_budget=30_000, mask=mask).ntk, k.ntk,
                               rtol=1e-8, atol=1e-10)
    assert torch.equal(k.nngp, k.nngp.T)


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="not divisible"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        MultiheadAttention(8, 2, n_samples=10)
    with pytest.raises(ValueError, match="n_samples"):
        MultiheadAttention(8, 2, n_samples=0)
    with pytest.raises(ValueError, match="w_query_std"):
        MultiheadAttention(8, 2, w_query_std=-1.0)
    with pytest.raises(TypeError, match="generator"):
        MultiheadAttention(8, 2, generator=3)
    with pytest.raises(ValueError, match="mechanism"):
        MultiheadAttention(8, 2, mechanism="relu")
    with pytest.raises(ValueError, match="dense features"):
        nk.Sequential(nk.Linear(8), MultiheadAttention(8, 2)).kernel(torch.randn(2, 3))
    with pytest.raises(ValueError, match="activation"):
        encoder_block(8, 2, 16, activation="tanh")
    with pytest.raises(ValueError, match="which"):
        TokenReadout("middle")
    with pytest.raises(ValueError, match="replicates"):
        numerical_error(nk.Sequential(nk.Conv1d(8, 1), MultiheadAttention(8, 2)),
                        _x(2, 3, 4, 0), replicates=1)
    with pytest.raises(ValueError, match="no MultiheadAttention"):
        numerical_error(nk.Sequential(nk.Conv1d(8, 1), nk.GlobalAvgPool()), _x(2, 3, 4, 0))
    a = MultiheadAttention(8, 2, generator=torch.Generator().manual_seed(1))
    b = MultiheadAttention(8, 2, generator=torch.Generator().manual_seed(1))
    assert a.seed == b.seed


def _mc_kernels(net, ids, mask, samples: int, seed: int):
    """Empirical NNGP and NTK (``f f^T / out``, ``J J^T / out``) of ``samples`` finite
    twins, ``(samples, N, N)`` each, with the mask given to the twins."""
    gen = torch.Generator().manual_seed(seed)
    nngps, ntks = [], []
    for _ in range(samples):
        model = net.build(tuple(ids.shape[1:]), generator=gen, dtype=torch.float64)
        params = [p for p in model.parameters() if p.requires_grad]
        f = model(ids) if mask is None else model(ids, mask=mask)
        n, out = f.shape
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            f[i, o], params, retain_graph=True, allow_unused=False)])
            for i in range(n) for o in range(out)]
        jac = torch.stack(rows).reshape(n, out, -1)
        nngps.append((f @ f.T / out).detach())
        ntks.append(torch.einsum("iop,jop->ij", jac, jac) / out)
    return torch.stack(nngps), torch.stack(ntks)


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "causal_padded"])
def test_monte_carlo_of_a_two_block_encoder(masked):
    """The finite twins (width 512, 16 heads of 32) of a 2-block post-LN encoder on
    token ids against the sampled kernel: within 4 Monte Carlo standard errors + the
    reported numerical error + a finite-width bias allowance (8% of the scale);
    attention with the logits' scale wrong (the 1/d_head limit: uniform attention,
    w_query_std=0) misses the same bound (checked without masks: causal attention's
    wrong-scale NTK lies within this bound at 12 samples)."""
    ids = torch.randint(0, 6, (3, 4), generator=torch.Generator().manual_seed(8))
    mask = None
    if masked:
        mask = torch.ones(3, 4, dtype=torch.bool)
        mask[1, 3:] = False

    def net(w_query_std=2.0):
        return nk.Sequential(nk.Embedding(512, 6, pos_emb="learned"),
                             encoder(2, 512, 16, 512, causal=masked, n_samples=512,
                                     w_query_std=w_query_std, w_key_std=1.5),
                             readout("mean"), nk.Linear(2))

    kw = {} if mask is None else {"mask": mask}
    err = numerical_error(net(), ids.double(), replicates=3, **kw)
    wrong = net(0.0).kernel(ids.double(), **kw)
    nngps, ntks = _mc_kernels(net(), ids, mask, samples=12, seed=0)
    for name, vals in (("nngp", nngps), ("ntk", ntks)):
        se = vals.std(0) / vals.shape[0] ** 0.5
        want = getattr(err.kernel, name)
        bound = 4 * se + getattr(err, name + "_error") + 0.08 * want.abs().max()
        assert bool(((vals.mean(0) - want).abs() <= bound).all()), (name, vals.mean(0), want)
        if name == "ntk" and not masked:  # (with causal masks 12 samples are too few)
            assert bool(((vals.mean(0) - getattr(wrong, name)).abs() > bound).any())


class _TorchEncoderHead(torch.nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                                 norm_first=norm_first)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.enc(x).mean(1))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_vector_products_run_through_torchs_attention(norm_first):
    """method='vector_products' (forward mode) through nn.TransformerEncoder (fused fast
    path, scaled_dot_product_attention) and through the ntkit twin: equal to the
    explicit Jacobian product; torch's fast-path switch is restored."""
    torch.manual_seed(0)
    model = _TorchEncoderHead(norm_first).double().eval()
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    want = nk.empirical_ntk(model, x, method="jacobian")
    got = nk.empirical_ntk(model, x, method="vector_products")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()
    twin = nk.Sequential(nk.Conv1d(16, 1), encoder_block(16, 2, 32, n_samples=4),
                         readout("last"), nk.Linear(2)).build(
        (3, 5), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xs = _x(3, 3, 5, 9)
    torch.testing.assert_close(nk.empirical_ntk(twin, xs, method="vector_products"),
                               nk.empirical_ntk(twin, xs, method="jacobian"),
                               rtol=1e-10, atol=1e-12)


NT_REFERENCE = __import__("pathlib").Path(__file__).parent / "data" / "transformer_nt.npz"


def _nt_block(norm_first: bool) -> nk.Sequential:
    """tests/data/gen_transformer_nt.py's block: SelfAttention (1/n scaling, tied keys,
    neural-tangents' convention) with residuals, LayerNorm and a position-wise MLP."""
    attn = nk.SelfAttention(16, 2, w_key_std=1.3, w_value_std=1.1, w_query_std=0.9,
                            b_std=0.1)
    mlp = nk.Sequential(nk.Conv1d(32, 1, w_std=1.4, b_std=0.2), nk.ReLU(),
                        nk.Conv1d(16, 1, w_std=1.2, b_std=0.1))

    def res(inner):
        return [nk.FanOut(2), nk.Parallel(nk.Identity(), inner), nk.FanInSum()]

    ln = nk.LayerNorm(eps=1e-12)
    if norm_first:
        return nk.Sequential(*res(nk.Sequential(ln, attn)), *res(nk.Sequential(ln, mlp)))
    return nk.Sequential(*res(attn), ln, *res(mlp), ln)


@pytest.mark.parametrize("name", ["post_ln", "pre_ln", "post_ln_masked"])
def test_neural_tangents_parity_of_full_blocks(name):
    """Where the conventions coincide (1/n_key scaling, tied keys), two full encoder
    blocks equal neural-tangents 0.6.5's (float64; k(x1, x2) and k(x1, x1))."""
    import numpy as np

    ref = np.load(NT_REFERENCE)
    t = {k.split("/", 1)[1]: torch.from_numpy(ref[k]) for k in ref.files
         if k.startswith(name + "/")}
    norm_first = name.startswith("pre")
    net = nk.Sequential(nk.Conv1d(16, 1, w_std=1.5, b_std=0.3), _nt_block(norm_first),
                        _nt_block(norm_first), nk.GlobalAvgPool(), nk.Linear(1))
    masked = name.endswith("masked")
    k12 = net.kernel(t["x1"], t["x2"], **({"mask": (t["m1"], t["m2"])} if masked else {}))
    k11 = net.kernel(t["x1"], **({"mask": t["m1"]} if masked else {}))
    for got, key in ((k12.nngp, "nngp"), (k12.ntk, "ntk"), (k11.nngp, "nngp_11"),
                     (k11.ntk, "ntk_11")):
        torch.testing.assert_close(got, t[key], rtol=1e-6, atol=1e-9)


def test_estimator_fits_token_sequences():
    """NTKRegressor on token ids (integers or whole floats) through an encoder: the same
    predictions, and the kernel regression learns a counting task."""
    from ntkit.sklearn import NTKRegressor

    ids = torch.randint(0, 9, (40, 6), generator=torch.Generator().manual_seed(10))
    y = (ids == 3).sum(1).double().numpy()
    net = nk.Sequential(nk.Embedding(32, 9, pos_emb="learned"),
                        encoder_block(32, 4, 64, n_samples=16), readout("mean"), nk.Linear(1))
    a = NTKRegressor(net).fit(ids[:30].numpy(), y[:30])
    b = NTKRegressor(net).fit(ids[:30].double().numpy(), y[:30])
    pa, pb = a.predict(ids[30:].numpy()), b.predict(ids[30:].double().numpy())
    assert abs(pa - pb).max() < 1e-5
    assert a.score(ids[30:].numpy(), y[30:]) > 0.5

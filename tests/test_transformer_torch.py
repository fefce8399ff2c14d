"""`from_torch` of PyTorch transformer code, and the pieces it needs: LayerNorm with
torch's learnable scale and shift, and `MultiheadAttention` in standard
parameterization with torch's query/key/value biases.

Witnesses: the NTK restricted to a group of parameters (autograd over a torch
model at its own initialisation, or over the ntkit twin) against the part of the
kernel that group adds; Monte Carlo of whole torch models against the converted
kernel; refusals by name.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkit as nk
from ntkit.layers.embedding import sinusoidal_embeddings
from ntkit.layers.mha import MultiheadAttention
from ntkit.layers.transformer import TokenReadout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _group_ntk(model, x, keep, outputs=1):
    """The empirical NTK of ``model`` at ``x`` over the parameters whose names pass
    ``keep``, averaged over the outputs, ``(N, N)``."""
    named = [(n, p) for n, p in model.named_parameters() if keep(n)]
    params = [p for _, p in named]
    f = model(x).reshape(x.shape[0], -1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        f[i, o], params, retain_graph=True)]) for i in range(f.shape[0]) for o in range(outputs)]
    jac = torch.stack(rows).reshape(f.shape[0], outputs, -1)
    return torch.einsum("iop,jop->ij", jac, jac) / outputs


def _bound(vals, want, sigmas=4.0, slack=0.0):
    mean, se = vals.mean(0), vals.std(0) / vals.shape[0] ** 0.5
    return bool(((mean - want).abs() <= sigmas * se + slack * want.abs().max()).all())


def test_layernorm_affine_terms_against_torch_init():
    """The NTK of torch's LayerNorm scale and shift alone (autograd over torch's own
    init of an MLP, width 512) equals what LayerNorm(affine=True) adds to the kernel,
    ``(nngp_z + 1)`` passed through the readout, within 4 standard errors; without
    the shift (bias=False) only ``nngp_z``. A dropped ``+1`` fails the same check."""
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for bias in (True, False):
        def model(bias=bias):
            return nn.Sequential(nn.Linear(5, 512), nn.LayerNorm(512, bias=bias),
                                 nn.Linear(512, 1)).double()
        net = nk.from_torch(model())
        assert net.layers[1].affine and net.layers[1].bias is bias
        plain = nk.from_torch(nn.Sequential(nn.Linear(5, 512), nn.LayerNorm(
            512, elementwise_affine=False), nn.Linear(512, 1)).double())
        want = net.kernel(x).ntk - plain.kernel(x).ntk
        vals = []
        for s in range(24):
            torch.manual_seed(s)
            vals.append(_group_ntk(model(), x, lambda n: n.startswith("1.")).detach())
        vals = torch.stack(vals)
        assert _bound(vals, want), (bias, vals.mean(0), want)
        if bias:  # the shift's 1 (times w_out^2 = 1/3) is far outside the error
            assert not _bound(vals, want - 1 / 3)


def test_affine_layernorm_reaches_a_nonlinearity_only_through_weights():
    """Linear between the affine LayerNorm and ReLU: fine; sums, dropout and pooling in
    between keep the refusal (they are linear in each channel)."""
    x = torch.randn(3, 4)
    ok = nk.Sequential(nk.Linear(8), nk.LayerNorm(affine=True), nk.Linear(8), nk.ReLU())
    ok.kernel(x)
    bad = nk.Sequential(nk.Linear(8), nk.LayerNorm(affine=True), nk.FanOut(2),
                        nk.Parallel(nk.Identity(), nk.Linear(8)), nk.FanInSum(),
                        nk.Dropout(0.1, mode="eval"), nk.Erf())
    with pytest.raises(ValueError, match=r"affine=True"):
        bad.kernel(x)


@pytest.mark.parametrize("parameterization", ["standard", "ntk"])
def test_attention_projection_biases_against_the_twin(parameterization):
    """The NTK of the query, key and value biases alone (Monte Carlo over the finite
    twin, width 256, 16 heads) equals ``kernel(proj_bias=True) - kernel(proj_bias=False)``
    (same logit draws): ``w_out^2 E[(A1 1)(A2 1)^T] + ov^2 w_key^2 E<M, K>``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)

    def net(pb):
        return nk.Sequential(
            nk.Conv1d(256, 1, parameterization=parameterization, w_std=0.8, b_std=0.1),
            MultiheadAttention(256, 16, parameterization=parameterization, proj_bias=pb,
                               b_init="zero", w_query_std=1.3, w_key_std=0.9,
                               w_value_std=0.7, w_out_std=0.6, b_std=0.2, n_samples=1024),
            nk.GlobalAvgPool(), nk.Linear(1, parameterization=parameterization, w_std=0.9))

    full, without = net(True).kernel(x), net(False).kernel(x)
    want = full.ntk - without.ntk
    g = torch.Generator().manual_seed(1)
    parts, totals = [], []
    for _ in range(16):
        m = net(True).build((6, 4), generator=g, dtype=torch.float64)
        parts.append(_group_ntk(m, x, lambda n: n.endswith(("query_bias", "key_bias",
                                                             "value_bias"))).detach())
        totals.append(_group_ntk(m, x, lambda n: True).detach())
    parts, totals = torch.stack(parts), torch.stack(totals)
    assert _bound(parts, want), (parts.mean(0), want)
    assert _bound(totals, full.ntk, slack=0.05), (totals.mean(0), full.ntk)
    assert not _bound(parts, 0.8 * want)  # a value bias term 20% off is caught


def test_attention_standard_parameterization_grows_with_width():
    """In standard parameterization the attention's weight terms grow with the fan-ins
    (as Linear's): the NTK at width 512 minus width 256 is the terms times 256."""
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def ntk(width):
        net = nk.Sequential(nk.Conv1d(width, 1, parameterization="standard"),
                            MultiheadAttention(width, 4, parameterization="standard"),
                            nk.GlobalAvgPool())
        return net.kernel(x).ntk

    a, b, c = ntk(64), ntk(128), ntk(256)
    assert torch.allclose(c - b, 2 * (b - a), rtol=1e-9, atol=1e-9)
    assert bool(((b - a) > 0).all())


# ------------------------------------------------------------ from_torch of models
class _Bert(nn.Module):
    """Token ids -> embedding + learned positions -> encoder -> readout -> Linear."""

    def __init__(self, width=32, heads=4, blocks=2, norm_first=False, activation="relu",
                 readout="mean", causal=False, batch_first=True, vocab=12, length=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        shape = (1, length, width) if batch_first else (length, 1, width)
        self.pos = nn.Parameter(0.7 * torch.randn(shape))

        def layer():
            return nn.TransformerEncoderLayer(width, heads, width, dropout=0.0,
                                              batch_first=batch_first,
                                              norm_first=norm_first, activation=activation)

        self.enc = nn.TransformerEncoder(layer(), blocks, enable_nested_tensor=False)
        for i in range(blocks):  # independent initialisation (see the cloning refusal)
            self.enc.layers[i] = layer()
        self.out = nn.Linear(width, 2)
        self.readout, self.causal, self.batch_first = readout, causal, batch_first

    def forward(self, ids):
        x = self.emb(ids) + self.pos
        length = ids.shape[1] if self.batch_first else ids.shape[0]
        mask = nn.Transformer.generate_square_subsequent_mask(length) if self.causal else None
        x = self.enc(x, mask=mask, is_causal=self.causal)
        seq = 1 if self.batch_first else 0
        if self.readout == "mean":
            x = x.mean(seq)
        else:
            x = x[:, {"first": 0, "last": -1}[self.readout]] if self.batch_first else (
                x[{"first": 0, "last": -1}[self.readout]])
        return self.out(x)


def _layers(net, cls):
    found, todo = [], [net]
    while todo:
        layer = todo.pop(0)
        if isinstance(layer, cls):
            found.append(layer)
        todo += list(getattr(layer, "layers", ()))
    return found


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_converts_with_torchs_variances(batch_first):
    """The converted attention layers carry torch's initial variances (Xavier on
    in_proj: w^2 = 1/2; out_proj: 1/3; zero-start biases), consecutive seeds, the
    causal flag; the readout and the positional table become the right layers."""
    torch.manual_seed(0)
    model = _Bert(readout="last", causal=True, batch_first=batch_first)
    net = nk.from_torch(model, n_samples=64, seed=5)
    attn = _layers(net, MultiheadAttention)
    assert [a.seed for a in attn] == [5, 6]
    for a in attn:
        assert a.w_query_std ** 2 == pytest.approx(0.5) and a.w_out_std ** 2 == pytest.approx(1 / 3)
        assert a.causal and a.proj_bias and a.b_init == "zero"
        assert a.parameterization == "standard" and a.n_samples == 64
    emb = net.layers[0]
    assert isinstance(emb, nk.Embedding) and emb.pos_emb == "learned"
    assert emb.pos_std == pytest.approx(float(model.pos.detach().pow(2).mean().sqrt()))
    assert _layers(net, TokenReadout)[0].which == "last"
    assert all(n.affine for n in _layers(net, nk.LayerNorm))
    ids = torch.randint(0, 12, (3, 5))
    k = net.kernel(ids.double())
    assert k.ntk.shape == (3, 3) and bool(torch.isfinite(k.ntk).all())


def test_multihead_attention_module_in_a_hand_written_block():
    """nn.MultiheadAttention called as self-attention (out, _ = attn(x, x, x)) inside a
    residual block with a sinusoidal positional buffer converts; its kernel equals the
    same block built from ntkit layers (same seed)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.register_buffer("sin", sinusoidal_embeddings(16, 4).T.unsqueeze(0))
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.norm = nn.LayerNorm(16)
            self.out = nn.Linear(16, 1)

        def forward(self, ids):
            x = self.emb(ids) + self.sin
            a, _ = self.attn(x, x, x, need_weights=False)
            return self.out((x + a)[:, 0])

    net = nk.from_torch(Block(), n_samples=64)
    twin = nk.Sequential(
        nk.Embedding(16, 10, pos_emb="sinusoidal", parameterization="standard"),
        nk.FanOut(2),
        nk.Parallel(nk.Identity(), MultiheadAttention(
            16, 2, w_query_std=0.5 ** 0.5, w_key_std=0.5 ** 0.5, w_value_std=0.5 ** 0.5,
            w_out_std=3 ** -0.5, b_std=1.0, b_init="zero", proj_bias=True,
            parameterization="standard", n_samples=64, seed=0, in_channels=16)),
        nk.FanInSum(), TokenReadout("first"),
        nk.Linear(1, w_std=3 ** -0.5, b_std=48 ** -0.5, parameterization="standard"))
    ids = torch.randint(0, 10, (3, 4), generator=torch.Generator().manual_seed(1)).double()
    a, b = net.kernel(ids), twin.kernel(ids)
    assert torch.allclose(a.nngp, b.nngp, rtol=1e-12) and torch.allclose(a.ntk, b.ntk,
                                                                          rtol=1e-12)


def _cross(x, attn):
    return attn(x, x + 0, x)[0]


def test_from_torch_checks_the_sampling_options():
    """n_samples and seed are checked even for a model without attention."""
    model = nn.Sequential(nn.Linear(3, 4))
    for kw, match in (({"n_samples": 6}, "multiple of 4"), ({"n_samples": 0}, "n_samples"),
                      ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")):
        with pytest.raises(ValueError, match=match):
            nk.from_torch(model, **kw)


@pytest.mark.parametrize("case, match", [
    ("cloned", r"identical weights.*deep-copies"),
    ("cross", r"cross-attention"),
    ("bias_kv", r"add_bias_kv"),
    ("mask", r"attention mask without is_causal"),
    ("weights", r"attention weights"),
    ("conv", r"acts on a sequence"),
    ("buffer", r"not the sinusoidal table"),
    ("train", r"training mode with dropout=0.1.*model.eval\(\)"),
])
def test_what_does_not_convert_is_refused_by_name(case, match):
    width = 8

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, width)
            self.attn = nn.MultiheadAttention(width, 2, batch_first=True,
                                              add_bias_kv=case == "bias_kv")
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(
                width, 2, 16, batch_first=True), 2, enable_nested_tensor=False)
            self.conv = nn.Conv1d(width, width, 1)
            self.layer = nn.TransformerEncoderLayer(width, 2, 16, batch_first=True)
            self.register_buffer("table", torch.randn(1, 4, width))

        def forward(self, ids):
            x = self.emb(ids)
            if case == "cloned":
                return self.enc(x).mean(1)
            if case == "cross":
                return self.attn(x, x.relu(), x)[0].mean(1)
            if case in ("bias_kv", "mask"):
                mask = torch.ones(4, 4, dtype=torch.bool) if case == "mask" else None
                return self.attn(x, x, x, attn_mask=mask)[0].mean(1)
            if case == "weights":
                return self.attn(x, x, x)[1].mean(1)
            if case == "train":  # a module's default mode, dropout 0.1
                return self.layer(x).mean(1)
            if case == "conv":
                return self.conv(x).mean(1)
            return (x + self.table).mean(1)

    with pytest.raises(nk.ConversionError, match=match):
        nk.from_torch(M())


@pytest.mark.slow
@pytest.mark.parametrize("norm_first, readout, causal", [
    (False, "mean", False), (True, "last", True)], ids=["post_ln_mean", "pre_ln_causal_last"])
def test_monte_carlo_over_torchs_own_initialisation(norm_first, readout, causal):
    """nn.TransformerEncoder models (width 256, 8 heads, GELU, 2 blocks, learned
    positions) at torch's own initialisation, 16 seeds: the mean empirical NNGP and
    NTK (standard parameterization) agree with the converted kernel within 4
    standard errors + the reported numerical error + 8% of the scale (finite width)."""
    ids = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(3))

    def model():
        return _Bert(256, 8, norm_first=norm_first, activation="gelu", readout=readout,
                     causal=causal).double()

    torch.manual_seed(0)
    err = nk.numerical_error(nk.from_torch(model(), n_samples=512), ids.double(),
                             replicates=3)
    nngps, ntks = [], []
    for s in range(16):
        torch.manual_seed(100 + s)
        m = model().eval()
        nngps.append((m(ids) @ m(ids).T / 2).detach())
        ntks.append(_group_ntk(m, ids, lambda n: True, outputs=2).detach())
    for name, vals in (("nngp", torch.stack(nngps)), ("ntk", torch.stack(ntks))):
        want = getattr(err.kernel, name)
        se = vals.std(0) / vals.shape[0] ** 0.5
        bound = 4 * se + getattr(err, name + "_error") + 0.08 * want.abs().max()
        assert bool(((vals.mean(0) - want).abs() <= bound).all()), (name, vals.mean(0), want)


@pytest.mark.parametrize("parameterization", [
    "ntk", pytest.param("standard", marks=pytest.mark.slow)])
def test_masked_attention_catches_wrong_scaling_and_dropped_query_key_terms(
        parameterization, monkeypatch):
    """With causal and padding masks, one attention layer's twins (width 256, 16 heads,
    24 samples) agree with the kernel within 4 standard errors + 3x the reported
    numerical error, and (NTK parameterization) the same bound rejects the 1/d_head
    scaling (uniform attention, w_query_std=0). The same check on the query and key
    weights' own NTK (their parameter group on the twins) against the kernel's query/key-weight term
    (the kernel minus a kernel without it: ``2 ov^2 s^2 K12 E<M, K12>``, or
    ``ov^2 C (w_q^2 + w_k^2) K12 E<M, K12>`` in standard parameterization) passes,
    and fails for the kernel without it."""
    from ntkit.layers import mha

    ids = torch.randint(0, 6, (3, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 4:] = False

    def net(w_query_std=2.0):
        return nk.Sequential(
            nk.Embedding(256, 6, pos_emb="learned", parameterization=parameterization),
            MultiheadAttention(256, 16, causal=True, w_query_std=w_query_std, w_key_std=1.5,
                               n_samples=512, parameterization=parameterization),
            nk.GlobalAvgPool(), nk.Linear(1, parameterization=parameterization))

    err = nk.numerical_error(net(), ids.double(), replicates=3, mask=mask)
    wrong = net(0.0).kernel(ids.double(), mask=mask).ntk
    original = mha._ntk_terms

    def without_query_key(layer, m, k12, t12, c_in):
        wq2, wk2 = layer.w_query_std ** 2, layer.w_key_std ** 2
        ov2 = (layer.w_out_std * layer.w_value_std) ** 2
        c = 2 * ov2 * wq2 * wk2 if layer.parameterization == "ntk" else ov2 * c_in * (wq2 + wk2)
        return original(layer, m, k12, t12, c_in) - c * k12 * m["fk"]

    full = net().kernel(ids.double(), mask=mask).ntk
    monkeypatch.setattr(mha, "_ntk_terms", without_query_key)
    dropped = net().kernel(ids.double(), mask=mask).ntk
    monkeypatch.undo()
    g = torch.Generator().manual_seed(5)
    totals, qk = [], []
    for _ in range(24):
        m = net().build((5,), generator=g, dtype=torch.float64)

        def f(x, m=m):
            return m(x, mask=mask)

        f.named_parameters = m.named_parameters
        totals.append(_group_ntk(f, ids, lambda n: True).detach())
        qk.append(_group_ntk(f, ids, lambda n: n.endswith(("query_weight", "key_weight"))
                             ).detach())
    totals, qk = torch.stack(totals), torch.stack(qk)

    def within(vals, want):
        bound = 4 * vals.std(0) / vals.shape[0] ** 0.5 + 3 * err.ntk_error
        return bool(((vals.mean(0) - want).abs() <= bound).all())

    assert within(totals, err.kernel.ntk), (totals.mean(0), err.kernel.ntk)
    if parameterization == "ntk":  # (standard: the fan-in terms' spread hides it at 24)
        assert not within(totals, wrong)
    assert within(qk, full - dropped), (qk.mean(0), full - dropped)
    assert not within(qk, torch.zeros_like(full))

"""The Elman recurrent layer `RNN`: its kernel against an independent NumPy
implementation of the recurrent NTK (Alemohammad et al. 2021, Theorem 1),
Monte Carlo of its finite twin within the sampling error, masks (sequences of
different lengths aligned as torch's packed sequences), and `from_torch` of
``nn.RNN`` against Monte Carlo over torch's own initialisation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ntkit as nk

# ----------------------------------------------------------------------------------
# The recurrent NTK written plainly, one pair of sequences at a time, loops over the
# step pairs (as in the paper): Sigma_{t,t'} = w^2 E[phi phi']_{t-1,t'-1} + u^2 K^in +
# b^2; Theta_{t,t'} = Sigma + u^2 Theta^in + w^2 E[phi' phi']_{t-1,t'-1} Theta_{t-1,t'-1}.


def _relu(k, v1, v2):
    c = np.clip(k / math.sqrt(v1 * v2), -1.0, 1.0)
    th = math.acos(c)
    return (math.sqrt(v1 * v2) / (2 * math.pi) * (math.sin(th) + (math.pi - th) * c),
            (math.pi - th) / (2 * math.pi))


def _erf(k, v1, v2):  # erf(x): Williams 1997
    d = (1 + 2 * v1) * (1 + 2 * v2)
    return (2 / math.pi * math.asin(2 * k / math.sqrt(d)),
            4 / math.pi / math.sqrt(d - 4 * k * k))


ACTS = {"relu": (_relu, nk.ReLU), "erf": (_erf, nk.Erf)}


def _direction(f, kin, tin, qx, qy, same, p):
    """One layer, one direction, for one pair of sequences: returns E, Theta_h (T1, T2)
    and the per-step variances E[phi^2] of x and y."""
    w2, u2, b2, h02 = p["w"] ** 2, p["u"] ** 2, p["b"] ** 2, p["h0"] ** 2

    def variances(qin):
        q, e, prev = [], [], h02
        for t in range(len(qin)):
            q.append(w2 * prev + u2 * qin[t] + b2)
            prev = f(q[-1], q[-1], q[-1])[0]
            e.append(prev)
        return q, e

    q1, e1 = variances(qx)
    q2, e2 = variances(qy)
    t1, t2 = kin.shape
    E, Th = np.zeros((t1, t2)), np.zeros((t1, t2))
    for t in range(t1):
        for s in range(t2):
            if t == 0 and s == 0:
                pe, pth = (h02 if same else 0.0), 0.0
            elif t == 0 or s == 0:
                pe, pth = 0.0, 0.0
            else:
                pe, pth = E[t - 1, s - 1], Th[t - 1, s - 1]
            sig = w2 * pe + u2 * kin[t, s] + b2
            if p["standard"]:
                direct = p["n"] * pe + p["m"] * kin[t, s] + p["bias_grads"]
            else:
                direct = sig
            theta = direct + u2 * tin[t, s] + w2 * pth
            if same and t == s:
                E[t, s], dot = f(q1[t], q1[t], q1[t])
            else:
                E[t, s], dot = f(sig, q1[t], q2[s])
            Th[t, s] = dot * theta
    return E, Th, np.array(e1), np.array(e2)


def reference_pair(x, y, same, act, *, w, u, b, h0=0.0, layers=1, bidirectional=False,
                   readout="all", standard=False, n=1, bias_grads=1.0):
    """The RNN's NNGP and NTK between sequences x (C, T1) and y (C, T2), in NumPy."""
    f = ACTS[act][0]
    m = x.shape[0]
    kin, tin = x.T @ y / m, np.zeros((x.shape[1], y.shape[1]))
    qx, qy = (x * x).sum(0) / m, (y * y).sum(0) / m
    for layer in range(layers):
        p = {"w": w, "u": u, "b": b, "h0": h0, "standard": standard, "n": n,
             "m": m if layer == 0 else n * (2 if bidirectional else 1), "bias_grads": bias_grads}
        E, Th, ex, ey = _direction(f, kin, tin, qx, qy, same, p)
        if bidirectional:  # each sequence reversed over its own steps
            Er, Thr, exr, eyr = _direction(f, kin[::-1, ::-1], tin[::-1, ::-1], qx[::-1],
                                           qy[::-1], same, p)
            E, Th = (E + Er[::-1, ::-1]) / 2, (Th + Thr[::-1, ::-1]) / 2
            ex, ey = (ex + exr[::-1]) / 2, (ey + eyr[::-1]) / 2
        kin, tin, qx, qy = E, Th, ex, ey
    if readout == "last":
        return kin[-1, -1], tin[-1, -1]
    if readout == "mean":
        return kin.mean(), tin.mean()
    return kin, tin


def _seqs(n, c, length, seed, lengths=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g, dtype=torch.float64)
    if lengths is None:
        return x, None
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return x * mask[:, None], mask


PARITY = [
    # act, layers, bidirectional, readout, lengths, extra
    ("relu", 1, False, "last", None, {}),
    ("erf", 1, False, "last", None, {}),
    ("relu", 2, False, "all", None, {}),
    ("erf", 2, False, "mean", None, {}),
    ("relu", 2, True, "last", None, {}),
    ("erf", 1, True, "all", None, {}),
    ("relu", 1, False, "last", ([5, 3, 1], [2, 5]), {}),
    ("erf", 2, False, "mean", ([4, 5, 2], [5, 3]), {}),
    ("relu", 2, True, "last", ([5, 2, 3], [4, 1]), {}),
    ("erf", 2, True, "all", ([3, 5, 4], [5, 2]), {}),
    ("relu", 2, False, "last", None, {"h0": 0.7}),
    ("erf", 1, True, "mean", ([2, 5, 4], [3, 5]), {"h0": 0.5}),
    ("relu", 2, False, "last", None, {"standard": True}),
    ("erf", 2, True, "mean", ([5, 3, 4], [2, 5]), {"standard": True, "h0": 0.3}),
]


def _ids(case):
    act, layers, bi, readout, lengths, extra = case
    return (f"{act}-{layers}l{'-bi' if bi else ''}-{readout}{'-masked' if lengths else ''}"
            + "".join(f"-{k}" for k in extra))


@pytest.mark.parametrize("case", PARITY, ids=[_ids(c) for c in PARITY])
@pytest.mark.parametrize("same", [False, True], ids=["x1-x2", "x1-x1"])
def test_kernel_matches_plain_numpy_recursion(case, same):
    act, layers, bi, readout, lengths, extra = case
    hp = {"w": 1.3, "u": 0.9, "b": 0.4, "h0": extra.get("h0", 0.0)}
    standard = extra.get("standard", False)
    n = 64
    x1, m1 = _seqs(3, 2, 5, 0, lengths and lengths[0])
    x2, m2 = _seqs(2, 2, 5, 1, lengths and lengths[1])
    if same:
        x2, m2 = x1, m1
    net = nk.RNN(n, ACTS[act][1](), w_std=hp["w"], u_std=hp["u"], b_std=hp["b"], h0_std=hp["h0"],
                 num_layers=layers, bidirectional=bi, readout=readout,
                 parameterization="standard" if standard else "ntk")
    if same:
        k = net.kernel(x1, mask=m1)
    else:
        k = net.kernel(x1, x2, mask=None if m1 is None else (m1, m2))
    l1 = [5] * 3 if m1 is None else m1.sum(1).tolist()
    l2 = [5] * x2.shape[0] if m2 is None else m2.sum(1).tolist()
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            a = x1[i, :, :l1[i]].numpy()
            b = x2[j, :, :l2[j]].numpy()
            nngp, ntk = reference_pair(a, b, same and i == j, act, w=hp["w"], u=hp["u"],
                                       b=hp["b"], h0=hp["h0"], layers=layers, bidirectional=bi,
                                       readout=readout, standard=standard, n=n)
            got_nngp, got_ntk = k.nngp[i, j].numpy(), k.ntk[i, j].numpy()
            if readout == "all":  # matching steps; zero past each sequence's end
                t = min(l1[i], l2[j])
                nngp, ntk = np.diag(nngp)[:t], np.diag(ntk)[:t]
                assert np.all(got_nngp[t:] == 0) and np.all(got_ntk[t:] == 0)
                got_nngp, got_ntk = got_nngp[:t], got_ntk[:t]
            np.testing.assert_allclose(got_nngp, nngp, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got_ntk, ntk, rtol=1e-10, atol=1e-12)


def test_all_steps_position_pairs_match_numpy_through_pooling():
    """readout="all" followed by a global average pool reads every step pair (t, t')."""
    x1, m1 = _seqs(3, 2, 5, 0, [5, 3, 4])
    net = nk.Sequential(nk.RNN(64, nk.Erf(), w_std=1.2, u_std=1.0, b_std=0.2, num_layers=2),
                        nk.GlobalAvgPool())
    rnn_mean = nk.RNN(64, nk.Erf(), w_std=1.2, u_std=1.0, b_std=0.2, num_layers=2,
                      readout="mean")
    k_mean = rnn_mean.kernel(x1, mask=m1)
    l1 = m1.sum(1).tolist()
    for i in range(3):
        for j in range(3):
            ref = reference_pair(x1[i, :, :l1[i]].numpy(), x1[j, :, :l1[j]].numpy(), i == j,
                                 "erf", w=1.2, u=1.0, b=0.2, layers=2, readout="mean")
            np.testing.assert_allclose(k_mean.nngp[i, j].item(), ref[0], rtol=1e-10)
            np.testing.assert_allclose(k_mean.ntk[i, j].item(), ref[1], rtol=1e-10)
    x, _ = _seqs(4, 2, 5, 3)
    k_pool = net.kernel(x)
    ref = rnn_mean.kernel(x)
    torch.testing.assert_close(k_pool.nngp, ref.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k_pool.ntk, ref.ntk, rtol=1e-12, atol=1e-12)


def test_chain_and_grid_agree_and_tiles():
    """"last" without masks takes only matching steps; it equals the full grid's
    corner (a mask with every step present forces nothing) and tiled kernels."""
    x, _ = _seqs(7, 3, 6, 4)
    net = nk.RNN(32, nk.ReLU(), w_std=1.4, u_std=0.8, b_std=0.3, num_layers=2,
                 bidirectional=True, readout="last")
    k = net.kernel(x)
    kt = net.kernel(x, memory_budget=30_000)
    kd = net.kernel(x, diagonal=True)
    torch.testing.assert_close(kt.ntk, k.ntk, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kd.nngp, k.nngp.diagonal(), rtol=1e-12, atol=1e-12)
    mean = nk.RNN(32, nk.ReLU(), w_std=1.4, u_std=0.8, b_std=0.3, readout="mean")
    km, kmt = mean.kernel(x), mean.kernel(x, memory_budget=30_000)
    torch.testing.assert_close(kmt.nngp, km.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean.kernel(x, diagonal=True).ntk, km.ntk.diagonal(),
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------
# Monte Carlo of the finite twin: per-sample empirical kernels, error bars from their
# spread; gradients by autograd, one output at a time (the twin reads masks).

WIDTH = 1024
OUTS = 1  # the empirical NTK concentrates at large width: one output suffices


def _features_and_ntk(model, x, mask, params_from=None):
    """One network's empirical NNGP of its features before the readout ``(N, N)``
    (averaged over the WIDTH hidden units: it concentrates) and its empirical NTK
    ``(N, N)`` (averaged over the readout's outputs; the NTK concentrates too)."""
    side = {} if mask is None else {"mask": mask}
    feats = model[:-1](x, **side).flatten(1)
    out = model[-1](feats)
    nngp = (feats @ feats.T / feats.shape[1]).detach()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(out.shape[0]):
        for o in range(out.shape[1]):
            gr = torch.autograd.grad(out[i, o], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in gr]))
    j = torch.stack(rows)
    ntk = (j @ j.T).reshape(out.shape[0], out.shape[1], out.shape[0], out.shape[1])
    return nngp, ntk.diagonal(0, 1, 3).mean(-1)


def _mc(net, x, mask, n_samples, seed):
    """Per-sample values ``(S, N, N)`` of `_features_and_ntk` over twins of ``net``."""
    g = torch.Generator().manual_seed(seed)
    pairs = [_features_and_ntk(net.build(x.shape[1:], generator=g, dtype=x.dtype), x, mask)
             for _ in range(n_samples)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _within(samples, analytic, z=4.5, rel=0.01):
    """Whether the Monte Carlo mean is within z standard errors (plus a relative
    allowance for the O(1/width) bias) of ``analytic``; and the normalised gap."""
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    gap = ((mean - analytic).abs() / (z * se + rel * analytic.abs().max())).max()
    return bool(gap <= 1), float(gap)


def _net(readout="last", **kw):
    rnn = nk.RNN(WIDTH, kw.pop("act", nk.ReLU()), readout=readout, **kw)
    tail = [nk.Flatten()] if readout == "all" else []
    return nk.Sequential(rnn, *tail, nk.Linear(OUTS, w_std=1.0, b_std=0.1))


def _expected(net, x, mask):
    """The analytic NNGP of the features before the readout, and the network's NTK."""
    side = {} if mask is None else {"mask": mask}
    return net[:-1].kernel(x, **side).nngp, net.kernel(x, **side).ntk


MC_CASES = {
    "last": ({"readout": "last"}, None, False),
    "all": ({"readout": "all"}, None, True),
    "mean-erf": ({"readout": "mean", "act": nk.Erf()}, None, False),
    "stacked": ({"readout": "last", "num_layers": 2}, None, True),
    "bidirectional": ({"readout": "last", "bidirectional": True}, None, True),
    "masked-last": ({"readout": "last"}, [4, 2, 3], False),
    "masked-bi-mean": ({"readout": "mean", "bidirectional": True}, [4, 1, 3], True),
    "standard": ({"readout": "last", "parameterization": "standard"}, None, False),
    "h0": ({"readout": "last", "h0_std": 0.8}, None, True),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if c[2] else n
                                  for n, c in MC_CASES.items()])
def test_monte_carlo_of_the_twin(name, request):
    kw, lengths, slow = MC_CASES[name]
    _skip_unless_slow_requested(slow, request)
    hp = {"w_std": 1.2, "u_std": 1.0, "b_std": 0.3}
    x, mask = _seqs(3, 3, 4, 7, lengths)
    net = _net(**hp, **kw)
    nngp, ntk = _mc(net, x, mask, 10, seed=11)
    want_nngp, want_ntk = _expected(net, x, mask)
    ok, gap = _within(nngp, want_nngp)
    assert ok, f"NNGP off by {gap:.2f} of its band"
    ok, gap = _within(ntk, want_ntk)
    assert ok, f"NTK off by {gap:.2f} of its band"


def _skip_unless_slow_requested(slow: bool, request) -> None:
    """Slow cases run only under a marker expression (``-m slow``), as pyproject says."""
    if slow and not request.config.getoption("markexpr", ""):
        pytest.skip("slow Monte Carlo case: run with -m slow")


def test_monte_carlo_rejects_a_wrong_recurrent_variance():
    """The check that passes for w_std = 1.2 fails for the kernel of w_std = 1.4."""
    x, _ = _seqs(3, 3, 6, 7)
    net = _net("last", w_std=1.2, u_std=1.0, b_std=0.3)
    wrong = _net("last", w_std=1.4, u_std=1.0, b_std=0.3)
    nngp, ntk = _mc(net, x, None, 10, seed=5)
    right_nngp, right_ntk = _expected(net, x, None)
    wrong_nngp, wrong_ntk = _expected(wrong, x, None)
    assert _within(nngp, right_nngp)[0] and _within(ntk, right_ntk)[0]
    assert not _within(nngp, wrong_nngp)[0]
    assert not _within(ntk, wrong_ntk)[0]


# ----------------------------------------------------------------------------------
# from_torch


def _torch_rnn(nonlinearity="relu", **kw):
    torch.manual_seed(0)  # not used by the test's draws below; keeps construction quiet
    return nn.RNN(3, WIDTH, nonlinearity=nonlinearity, batch_first=True, dtype=torch.float64,
                  **kw)


@pytest.mark.parametrize("readout", ["last", pytest.param("mean", marks=pytest.mark.slow)])
def test_from_torch_rnn_against_torch_initialisation(readout, request):
    """nk.from_torch(TorchRNN(nn.RNN)) against Monte Carlo over torch's own init."""
    _skip_unless_slow_requested(readout == "mean", request)
    x, _ = _seqs(3, 3, 4, 9)
    model = nn.Sequential(nk.TorchRNN(_torch_rnn(), readout=readout),
                          nn.Linear(WIDTH, OUTS, dtype=torch.float64))
    with pytest.warns(UserWarning, match="vanishes as the hidden size grows"):
        net = nk.from_torch(model)
    want_nngp, want_ntk = _expected(net, x, None)
    gen = torch.Generator().manual_seed(3)
    nngps, ntks = [], []
    for _ in range(10):
        for p in model.parameters():  # torch's default init, from an explicit generator
            bound = 1 / math.sqrt(WIDTH)  # nn.RNN: 1/sqrt(hidden); nn.Linear: 1/sqrt(fan_in)
            with torch.no_grad():
                p.uniform_(-bound, bound, generator=gen)
        nngp, ntk = _features_and_ntk(model, x, None)
        nngps.append(nngp)
        ntks.append(ntk)
    ok, gap = _within(torch.stack(nngps), want_nngp)
    assert ok, gap
    ok, gap = _within(torch.stack(ntks), want_ntk)
    assert ok, gap


def test_from_torch_structure_and_bare_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stacked = nk.from_torch(nn.Sequential(nk.TorchRNN(
            nn.RNN(3, 16, num_layers=2, bidirectional=True, nonlinearity="tanh"),
            readout="last")))
        bare = nk.from_torch(nn.Sequential(nn.RNN(3, 16)))
    layers = [layer for layer in stacked.layers]
    inner = layers[0].layers if isinstance(layers[0], nk.Sequential) else layers
    assert [r.readout for r in inner] == ["all", "last"]
    assert inner[0].u_std == pytest.approx(math.sqrt(3 / 48))
    assert inner[1].u_std == pytest.approx(math.sqrt(32 / 48))
    assert isinstance(inner[0].activation, nk.Tanh)
    assert bare.layers[0].readout == "all"


def test_torch_rnn_wrapper_masks_as_packed_sequences():
    """TorchRNN(mask=) runs each sequence over its own steps (a sequence alone gives
    the same output), as NTKRNN does."""
    rnn = nn.RNN(3, 8, bidirectional=True, batch_first=False, dtype=torch.float64)
    wrap = nk.TorchRNN(rnn, readout="last")
    x, mask = _seqs(3, 3, 5, 2, [5, 2, 3])
    out = wrap(x, mask=mask)
    for i, n in enumerate([5, 2, 3]):
        alone = wrap(x[i:i + 1, :, :n])
        torch.testing.assert_close(out[i:i + 1], alone)


def test_twin_masks_match_each_sequence_alone():
    net = nk.RNN(16, nk.Erf(), w_std=1.1, u_std=1.0, b_std=0.2, num_layers=2,
                 bidirectional=True, readout="mean")
    model = net.build((3, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, mask = _seqs(3, 3, 5, 2, [5, 2, 3])
    out = model(x, mask=mask)
    for i, n in enumerate([5, 2, 3]):
        torch.testing.assert_close(out[i:i + 1], model(x[i:i + 1, :, :n]))


# ----------------------------------------------------------------------------------
# Interface


def test_shapes_spec_and_errors():
    x, _ = _seqs(4, 3, 5, 0)
    net = nk.RNN(8, "relu", bidirectional=True)
    k = net.kernel(x)
    assert k.nngp.shape == (4, 4, 5) and k.shape == (16, 5)
    spec = nk.spec.to_spec(nk.Sequential(nk.RNN(8, nk.Erf(), w_std=1.5, readout="last"),
                                         nk.Linear(1)))
    assert spec.startswith("rnn(8,erf,w_std=1.5,readout=last)")
    again = nk.spec.parse_architecture(spec)
    torch.testing.assert_close(again.kernel(x).ntk, nk.Sequential(
        nk.RNN(8, nk.Erf(), w_std=1.5, readout="last"), nk.Linear(1)).kernel(x).ntk)
    with pytest.raises(ValueError, match="sequences"):
        nk.RNN(8).kernel(torch.randn(3, 4))
    with pytest.raises(ValueError, match="readout"):
        nk.RNN(8, readout="first")
    with pytest.raises(TypeError, match="activation"):
        nk.RNN(8, torch.tanh)
    with pytest.raises(ValueError, match="prefix"):
        bad = torch.tensor([[True, False, True, True, True]] * 4)
        nk.RNN(8, readout="last").kernel(x, mask=bad)


def test_torch_rnn_wrapper_refuses_bad_input():
    with pytest.raises(TypeError, match="wraps an nn.RNN"):
        nk.TorchRNN(nn.GRU(3, 4))
    with pytest.raises(ValueError, match="readout"):
        nk.TorchRNN(nn.RNN(3, 4), readout="first")
    with pytest.raises(ValueError, match=r"\(N, C, L\)"):
        nk.TorchRNN(nn.RNN(3, 4))(torch.randn(2, 3))
    with pytest.raises(ValueError, match="dropout"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nk.from_torch(nn.Sequential(nn.RNN(3, 4, num_layers=2, dropout=0.5)))


def test_estimator_on_sequences_from_a_spec_string():
    """NTKRegressor(architecture="rnn(...)-linear(1)", input_shape=(C, L)) reshapes rows
    to sequences and predicts with the RNN's NTK: equal to kernel regression by hand."""
    from ntkit.sklearn import NTKRegressor

    x, _ = _seqs(12, 2, 4, 5)
    y = torch.sin(x.sum((1, 2))).numpy()
    spec = "rnn(16, erf, w_std=1.3, u_std=0.9, b_std=0.2, readout=last)-linear(1)"
    est = NTKRegressor(spec, input_shape=(2, 4), diag_reg=1e-3).fit(x[:9].reshape(9, -1), y[:9])
    got = est.predict(x[9:].reshape(3, -1))
    net = nk.spec.parse_architecture(spec)
    k_tr = net.kernel(x[:9]).ntk
    k_te = net.kernel(x[9:], x[:9]).ntk
    reg = 1e-3 * k_tr.diagonal().mean()
    want = k_te @ torch.linalg.solve(k_tr + reg * torch.eye(9, dtype=k_tr.dtype),
                                     torch.from_numpy(y[:9]))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-8)


def test_different_lengths_after_other_layers():
    """After a Conv1d, readout='mean' gets the step pairs from the network; 'last' with
    different lengths cannot, and says what to do."""
    x, mask = _seqs(3, 2, 5, 1, [5, 3, 4])
    conv = nk.Conv1d(8, 1, w_std=1.2)
    rnn = {"w_std": 1.1, "u_std": 1.0, "b_std": 0.1}
    k = nk.Sequential(conv, nk.RNN(8, nk.Erf(), readout="mean", **rnn)).kernel(x, mask=mask)
    assert torch.isfinite(k.ntk).all()
    with pytest.raises(ValueError, match="Make the RNN the first layer"):
        nk.Sequential(conv, nk.RNN(8, nk.Erf(), readout="last", **rnn)).kernel(x, mask=mask)

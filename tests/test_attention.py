"""SelfAttention: the infinite-width kernel against its witnesses.

1. neural-tangents' ``stax.GlobalSelfAttention`` (tests/data/attention_*.npz, written by
   tests/data/make_attention_reference.py, float64): the same numbers to 1e-6.
2. Monte Carlo over finite twins built by ``net.build``, for the softmax (1/n_key
   scaling) and identity (1/sqrt(n_key) scaling) mechanisms, with and without positional
   embeddings, NNGP and NTK. Criterion, elementwise::

       |mc_mean - analytic| <= Z * stderr + BIAS_TOL * sqrt(k(x_i, x_i) k(x'_j, x'_j))

   (normalised per pair of inputs: the identity mechanism's kernel is cubic in the input
   kernel, so inputs of different norms have kernels of very different sizes).
   BIAS_TOL covers the O(1/width) bias of the mean of finite networks, measured (with
   1000-2000 networks) at the widths used here: <= 2% for softmax (the logits fluctuate
   by O(key_channels^-1/2) around their limit) and <= 2.5% for the identity mechanism
   (its cubic kernel amplifies the O(1/256) variance of the convolution's empirical
   kernel; the bias falls below 0.7% at width 1024). 0.04 leaves a margin and is still
   well below what a wrong kernel misses by (see the discrimination test).
3. A closed form: with ``w_key_std = 0`` softmax attends uniformly, so the layer is a
   global average followed by two linear maps.
Plus the shared consistency checks: diagonal vs full, tiles, float32, batches, devices.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit as nk
from conftest import TOL, one_thread, rel_err
from ntkit.layers import input_kernel

DATA = Path(__file__).parent / "data"

WIDTH = 256
Z = 5.0
BIAS_TOL = 0.04
NNGP_SAMPLES = 400  # forward passes only: ~5 ms each
NTK_SAMPLES = 192  # one readout output: the NTK noise comes from the network, not the readout


def _x(seed: int, n: int, *shape: int) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


X1 = _x(1, 3, 4, 5)  # (N, C, L)
X2 = _x(2, 2, 4, 5)


# ------------------------------------------------------------------- neural-tangents
#: The decay functions of tests/data/make_attention_reference.py, by name.
DECAYS = {"exp(-d/3)": lambda d: torch.exp(-d / 3), "exp(-d/2)": lambda d: torch.exp(-d / 2)}
REFERENCE_CASES = sorted(p.stem for p in DATA.glob("attention_*.npz"))


def reference_layer(name: str, kw: dict, ndim: int) -> nk.Layer:
    """The ntkit counterpart of a stax layer of the attention reference cases."""
    if name == "GlobalSelfAttention":
        return nk.SelfAttention(
            kw["n_chan_out"], kw["n_heads"], key_channels=kw["n_chan_key"],
            value_channels=kw["n_chan_val"], w_key_std=kw.get("W_key_std", 1.0),
            w_query_std=kw.get("W_query_std", 1.0), w_value_std=kw.get("W_value_std", 1.0),
            w_out_std=kw.get("W_out_std", 1.0), b_std=kw.get("b_std"),
            mechanism=kw["attention_mechanism"].lower(), linear_scaling=kw["linear_scaling"],
            pos_emb=kw.get("pos_emb_type", "NONE").lower(),
            pos_emb_std=kw.get("W_pos_emb_std", 1.0),
            pos_emb_decay=DECAYS.get(kw.get("pos_emb_decay_fn")),
            pos_emb_p_norm=kw.get("pos_emb_p_norm", 2), pos_emb_in_values=kw.get("val_pos_emb",
                                                                                 False))
    if name == "Conv":
        conv = (nk.Conv1d, nk.Conv2d)[ndim - 1]
        return conv(kw["out_chan"], tuple(kw["filter_shape"]),
                    padding=kw.get("padding", "VALID").lower(), w_std=kw["W_std"],
                    b_std=kw["b_std"])
    if name == "Dense":
        return nk.Linear(kw["out_dim"], w_std=kw["W_std"], b_std=kw["b_std"])
    return {"Relu": nk.ReLU, "Erf": nk.Erf, "GlobalAvgPool": nk.GlobalAvgPool}[name]()


def reference_case(name: str):
    with np.load(DATA / f"{name}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    spec = json.loads(str(arrays.pop("spec")))
    arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}
    ndim = arrays["x1"].ndim - 2
    return [reference_layer(n, kw, ndim) for n, kw in spec], spec, arrays


def test_reference_cases_present():
    assert len(REFERENCE_CASES) == 4, REFERENCE_CASES


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_matches_neural_tangents(name):
    """k(x1, x2) and k(x1, x1) of whole networks (float64), and for sequences the
    position-pair kernel right after the first attention layer."""
    layers, spec, a = reference_case(name)
    net = nk.Sequential(*layers)
    k12, k11 = net.kernel(a["x1"], a["x2"]), net.kernel(a["x1"])
    rtol = TOL[torch.float64]["rtol"]
    for got, key in ((k12.nngp, "nngp"), (k12.ntk, "ntk"), (k11.nngp, "nngp_11"),
                     (k11.ntk, "ntk_11")):
        assert rel_err(got, a[key]) < rtol, (key, rel_err(got, a[key]))
    if "nngp_attn" in a:
        first = [n for n, _ in spec].index("GlobalSelfAttention")
        k = nk.Sequential(*layers[:first + 1]).propagate(
            input_kernel(a["x1"], a["x2"], position_pairs=True))
        assert rel_err(k.nngp, a["nngp_attn"]) < rtol
        assert rel_err(k.ntk, a["ntk_attn"]) < rtol


# ------------------------------------------------------------------------ Monte Carlo
MC_CASES = {
    "softmax": dict(n_heads=2, key_channels=128, value_channels=128, w_key_std=1.5),
    "softmax-posemb": dict(n_heads=2, key_channels=128, value_channels=128, w_key_std=1.5,
                           pos_emb="sum", pos_emb_std=1.5, pos_emb_p_norm=1,
                           pos_emb_decay=lambda d: torch.exp(-d / 2)),
    # Gaussian logits: the output is Gaussian only as the number of heads grows.
    "identity": dict(n_heads=64, key_channels=4, value_channels=4, w_key_std=0.8,
                     mechanism="identity", linear_scaling=False),
    "identity-posemb": dict(n_heads=64, key_channels=4, value_channels=4, w_key_std=0.8,
                            mechanism="identity", linear_scaling=False, pos_emb="sum"),
}
#: Cases with positional embeddings are checked on k(x1, x2): the embeddings are shared
#: by both batches (two forward passes of one network).
CROSS = {"softmax-posemb", "identity-posemb"}


def mc_net(case: str, readout: bool, **changes) -> nk.Sequential:
    """Conv1d(256, 1) -> SelfAttention(256) -> ReLU -> GlobalAvgPool [-> Linear(1)]."""
    kw = {**MC_CASES[case], **changes}
    layers = [nk.Conv1d(WIDTH, 1, b_std=0.2), nk.SelfAttention(WIDTH, b_std=0.1, **kw),
              nk.ReLU(), nk.GlobalAvgPool()]
    return nk.Sequential(*layers, *([nk.Linear(1, b_std=0.1)] if readout else []))


@functools.cache
def mc_samples(case: str, field: str) -> torch.Tensor:
    """Per-network empirical kernels, stacked: the NNGP of the pooled features
    ``f1 f2^T / width`` (forward passes only), or the NTK of the readout."""
    x2 = X2 if case in CROSS else None
    gen = torch.Generator().manual_seed(7)
    with one_thread():
        if field == "ntk":
            rows = nk.empirical_kernels(mc_net(case, True), X1, x2, n_samples=NTK_SAMPLES,
                                        generator=gen)
            return torch.stack([r[1] for r in rows])
        return torch.stack(list(_feature_kernels(mc_net(case, False), x2, gen)))


def _feature_kernels(net: nk.Layer, x2, gen: torch.Generator):
    with torch.no_grad():
        for _ in range(NNGP_SAMPLES):
            model = net.build(tuple(X1.shape[1:]), generator=gen, dtype=X1.dtype)
            f1 = model(X1)
            f2 = f1 if x2 is None else model(x2)
            yield f1 @ f2.T / f1.shape[1]


def mc_excess(samples: torch.Tensor, net: nk.Layer, field: str, x2) -> float:
    """The largest ``|mean - analytic| / bound`` (> 1 fails the criterion)."""
    want = getattr(net.kernel(X1, x2), field)
    d1 = getattr(net.kernel(X1, diagonal=True), field)
    d2 = d1 if x2 is None else getattr(net.kernel(x2, diagonal=True), field)
    scale = (d1[:, None] * d2[None, :]).abs().sqrt()
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    bound = Z * stderr + BIAS_TOL * scale
    return float(((samples.mean(0) - want).abs() / bound).max())


@pytest.mark.parametrize("field", ["nngp", "ntk"])
@pytest.mark.parametrize("case", MC_CASES)
def test_monte_carlo(case, field):
    x2 = X2 if case in CROSS else None
    net = mc_net(case, field == "ntk")
    excess = mc_excess(mc_samples(case, field), net, field, x2)
    assert excess <= 1, f"{case} {field}: Monte Carlo misses the kernel, |err|/bound = {excess:.2f}"


@pytest.mark.parametrize("field", ["nngp", "ntk"])
def test_monte_carlo_rejects_wrong_kernels(field):
    """The criterion can fail: networks with positional embeddings do not match the kernel
    without them (nor the softmax ones the identity mechanism's)."""
    case = "softmax-posemb"
    samples = mc_samples(case, field)
    readout = field == "ntk"
    assert mc_excess(samples, mc_net(case, readout), field, X2) <= 1
    assert mc_excess(samples, mc_net(case, readout, pos_emb="none"), field, X2) > 2
    assert mc_excess(samples, mc_net(case, readout, mechanism="identity"), field, X2) > 2


# ---------------------------------------------------------------------- closed forms
def test_uniform_attention_is_global_average():
    """w_key_std = 0: softmax of zero logits attends uniformly, so every output position
    is ``w_out w_value`` times the mean over positions: the NNGP of GlobalAvgPool ->
    Linear(w_std = w_out w_value) at every pair of positions, and the NTK that plus
    ``w_std^2 mean(K)`` (two weight matrices, value and output, where Linear has one)."""
    conv = nk.Conv1d(8, 3, padding="same", w_std=1.3, b_std=0.2)
    att = nk.SelfAttention(8, 2, w_key_std=0.0, w_value_std=1.3, w_out_std=0.9, b_std=0.2)
    k = nk.Sequential(conv, nk.ReLU(), att).propagate(input_kernel(X1, X2, position_pairs=True))
    w = 1.3 * 0.9
    pooled = nk.Sequential(conv, nk.ReLU(), nk.GlobalAvgPool())
    lin = nk.Sequential(pooled, nk.Linear(8, w_std=w, b_std=0.2)).kernel(X1, X2)
    mean_k = pooled.kernel(X1, X2).nngp
    torch.testing.assert_close(k.nngp, lin.nngp[:, :, None, None].expand_as(k.nngp))
    torch.testing.assert_close(k.ntk, (lin.ntk + w**2 * mean_k)[:, :, None, None].expand_as(
        k.ntk))


# ------------------------------------------------------------------------ consistency
VARIANTS = {
    "softmax": dict(),
    "softmax-posemb-values": dict(pos_emb="sum", pos_emb_in_values=True, pos_emb_std=0.7),
    "relu-decay": dict(mechanism="relu", pos_emb="sum", pos_emb_decay=lambda d: 1 / (1 + d)),
    "abs": dict(mechanism="abs", w_key_std=0.5),
    "identity-sqrt-posemb": dict(mechanism="identity", linear_scaling=False, pos_emb="sum"),
}


def small_net(ndim: int = 1, **kw) -> nk.Sequential:
    conv = (nk.Conv1d, nk.Conv2d)[ndim - 1]
    return nk.Sequential(conv(6, 2, padding="same", b_std=0.1), nk.Erf(),
                         nk.SelfAttention(6, 2, b_std=0.2, **kw), nk.ReLU(), nk.GlobalAvgPool(),
                         nk.Linear(1))


@pytest.mark.filterwarnings("ignore:one pair of inputs needs")  # memory_budget=1: one per tile
@pytest.mark.parametrize("ndim", [1, 2], ids=["sequence", "image"])
@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_diagonal_tiles_batches(kw, ndim):
    """diagonal=True is the diagonal of the full kernel; tiny tiles (x1 == x2 mirrored)
    give the same kernel; k(x1, x2) is the off-diagonal block of k([x1; x2])."""
    x1, x2 = (X1, X2) if ndim == 1 else (_x(3, 3, 2, 3, 2), _x(4, 2, 2, 3, 2))
    net = small_net(ndim, **kw)
    full = net.kernel(torch.cat([x1, x2]))
    diag = net.kernel(torch.cat([x1, x2]), diagonal=True)
    for f in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(diag, f), getattr(full, f).diagonal(), **TOL[
            torch.float64])
    tiled = net.kernel(torch.cat([x1, x2]), memory_budget=1)
    cross = net.kernel(x1, x2)
    n1 = len(x1)
    for f in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(tiled, f), getattr(full, f), **TOL[torch.float64])
        torch.testing.assert_close(getattr(cross, f), getattr(full, f)[:n1, n1:],
                                   **TOL[torch.float64])


def test_position_pair_kernel_is_symmetric_and_psd():
    """Right after attention, k(x, x) between all (example, position) pairs is a covariance."""
    for kw in VARIANTS.values():
        k = nk.Sequential(nk.Conv1d(6, 2, padding="same"), nk.SelfAttention(6, **kw)).propagate(
            input_kernel(X1, None, position_pairs=True))
        m = k.nngp.permute(0, 2, 1, 3).reshape(15, 15)
        torch.testing.assert_close(m, m.T)
        assert float(torch.linalg.eigvalsh(m).min()) > -1e-10 * float(m.abs().max())
        torch.testing.assert_close(k.cov1, torch.stack([k.nngp[i, i] for i in range(3)]))


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_float32(kw):
    net = small_net(**kw)
    k64, k32 = net.kernel(X1, X2), net.kernel(X1.float(), X2.float())
    assert k32.nngp.dtype == torch.float32
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(k32, f), getattr(k64, f)) < TOL[torch.float32]["rtol"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_cuda(kw):
    """Kernel and finite twin run on the inputs' device and agree with the CPU."""
    net = small_net(**kw)
    k_cpu, k_gpu = net.kernel(X1, X2), net.kernel(X1.cuda(), X2.cuda())
    assert k_gpu.nngp.device.type == "cuda"
    for f in ("nngp", "ntk"):
        assert rel_err(getattr(k_gpu, f), getattr(k_cpu, f)) < TOL[torch.float64]["rtol"]
    model = net.build(X1.shape[1:], generator=torch.Generator("cuda").manual_seed(0),
                      dtype=torch.float64, device="cuda")
    assert model(X1.cuda()).shape == (3, 1)


def test_finite_twin():
    """The twin's shapes and parameters: standard normal weights, tied keys and queries
    under linear scaling, embeddings as parameters; it also runs on the meta device."""
    att = nk.SelfAttention(12, 3, key_channels=5, value_channels=7, pos_emb="sum",
                           pos_emb_decay=lambda d: torch.exp(-d))
    model = att.build((4, 3, 2), generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    params = dict(model.named_parameters())
    assert params["key_weight"].shape == (3, 4, 5)
    assert "query_weight" not in params
    assert params["value_weight"].shape == (3, 4, 7)
    assert params["out_weight"].shape == (12, 21)
    assert params["pos_emb"].shape == (4, 6)
    factor = model.pos_emb_factor
    torch.testing.assert_close(factor @ factor.T, torch.exp(-torch.cdist(
        *(torch.cartesian_prod(torch.arange(3.0), torch.arange(2.0)).double(),) * 2, p=2) ** 2))
    assert model(_x(0, 5, 4, 3, 2)).shape == (5, 12, 3, 2)
    sqrt = nk.SelfAttention(8, 2, mechanism="identity", linear_scaling=False).build((4, 5))
    assert dict(sqrt.named_parameters())["query_weight"].shape == (2, 4, 4)
    meta = small_net(pos_emb="sum", pos_emb_decay=lambda d: torch.exp(-d)).build(
        (4, 5), device="meta")
    assert meta(torch.empty(2, 4, 5, device="meta")).shape == (2, 1)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(out_channels=10, n_heads=3), ValueError, "not divisible by n_heads=3"),
    (dict(out_channels=0), ValueError, "out_channels must be a positive int"),
    (dict(out_channels=8, n_heads=2.0), ValueError, "n_heads must be a positive int"),
    (dict(out_channels=8, mechanism="sigmoid"), ValueError, "mechanism must be one of"),
    (dict(out_channels=8, linear_scaling=False), ValueError, "no closed-form"),
    (dict(out_channels=8, linear_scaling=1), TypeError, "linear_scaling must be a bool"),
    (dict(out_channels=8, pos_emb="concat"), ValueError, "pos_emb must be 'none' or 'sum'"),
    (dict(out_channels=8, w_key_std=-1.0), ValueError, "w_key_std must be finite and >= 0"),
    (dict(out_channels=8, b_std="0.1"), TypeError, "b_std must be a real number"),
    (dict(out_channels=8, pos_emb="sum", pos_emb_decay=0.5), TypeError, "pos_emb_decay"),
    (dict(out_channels=8, pos_emb_p_norm=0), ValueError, "pos_emb_p_norm"),
], ids=["heads-divide", "width", "heads-type", "mechanism", "sqrt-softmax", "scaling-type",
        "pos-emb", "negative-std", "std-type", "decay-type", "p-norm"])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        nk.SelfAttention(**kwargs)


def test_explicit_head_channels_need_no_divisibility():
    att = nk.SelfAttention(10, 3, key_channels=4, value_channels=5)
    assert att.build((2, 6))(_x(0, 1, 2, 6).float()).shape == (1, 10, 6)


def test_input_errors():
    att = nk.SelfAttention(8)
    with pytest.raises(ValueError, match=r"dense features .*reshape x to \(N, C, L\)"):
        att.kernel(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"dense features"):
        att.build((4,))
    with pytest.raises(ValueError, match="expects 3 input channels but receives 4"):
        nk.SelfAttention(8, in_channels=3).kernel(X1)
    with pytest.raises(ValueError, match="every pair of positions"):
        att.propagate(input_kernel(X1, None, position_pairs=False))
    with pytest.raises(ValueError, match="receives 2 branches"):
        nk.Sequential(nk.FanOut(2), att).kernel(X1)


def test_decay_errors():
    wrong_shape = nk.SelfAttention(8, pos_emb="sum", pos_emb_decay=lambda d: d.sum())
    with pytest.raises(ValueError, match="same shape"):
        wrong_shape.kernel(X1)
    # Ones on the first off-diagonals: symmetric but with a negative eigenvalue.
    not_psd = nk.SelfAttention(8, pos_emb="sum", pos_emb_decay=lambda d: (d <= 1).double())
    with pytest.raises(ValueError, match="not positive semi-definite"):
        not_psd.build((4, 5))


def test_repr():
    att = nk.SelfAttention(8, 2, mechanism="identity", linear_scaling=False, pos_emb="sum")
    assert repr(att) == ("SelfAttention(8, n_heads=2, b_std=0.0, mechanism='identity', "
                         "linear_scaling=False, pos_emb='sum', pos_emb_std=1.0)")


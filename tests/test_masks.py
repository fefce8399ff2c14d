"""Masked, variable-length inputs (issue 15): ``net.kernel(x1, x2, mask=(m1, m2))`` and the
finite twins' ``model(x, mask=m)``.

Witnesses:

- neural-tangents 0.6.5 in float64 (tests/data/masks_nt.npz, written by
  tests/data/gen_masks_nt.py, which passes the masks as ``mask_constant``): conv + global
  pooling, strided and VALID convolutions with average pooling, Flatten, images, and
  attention (softmax, relu, identity; positional embeddings);
- truncation: a stride-1 'same' convolution, attention and global average pooling see
  the absent tail of a masked sequence exactly as zero padding of the shorter sequence,
  so the masked kernel equals the kernel of the truncated inputs, computed without masks
  (and so do the finite twins, with the same weights);
- Monte Carlo of the finite twins with masks, with a tolerance from the sampling error;
- formulas written out (the output mask of strided windows, global pooling of inputs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit as nk
from conftest import TOL, one_thread, rel_err

DATA = Path(__file__).parent / "data"
RTOL = TOL[torch.float64]["rtol"]


# ------------------------------------------------------------------- neural-tangents
def _nt_layer(name: str, kw: dict, ndim: int) -> nk.Layer:
    """The ntkit twin of a stax layer of tests/data/gen_masks_nt.py."""
    if name == "Conv":
        conv = (nk.Conv1d, nk.Conv2d)[ndim - 1]
        return conv(kw["out_chan"], tuple(kw["filter_shape"]),
                    stride=tuple(kw.get("strides", (1,) * ndim)),
                    padding=kw.get("padding", "VALID").lower(), w_std=kw["W_std"],
                    b_std=kw["b_std"])
    if name == "Dense":
        return nk.Linear(kw["out_dim"], w_std=kw["W_std"], b_std=kw["b_std"])
    if name == "AvgPool":
        return nk.AvgPool1d(tuple(kw["window_shape"]), tuple(kw["strides"]),
                            kw["padding"].lower())
    if name == "GlobalSelfAttention":
        decay = {"exp(-d/3)": lambda d: torch.exp(-d / 3)}.get(kw.get("pos_emb_decay_fn"))
        return nk.SelfAttention(
            kw["n_chan_out"], kw["n_heads"], key_channels=kw["n_chan_key"],
            value_channels=kw["n_chan_val"], w_key_std=kw.get("W_key_std", 1.0),
            w_query_std=kw.get("W_query_std", 1.0), w_value_std=kw.get("W_value_std", 1.0),
            w_out_std=kw.get("W_out_std", 1.0), b_std=kw.get("b_std"),
            mechanism=kw["attention_mechanism"].lower(), linear_scaling=kw["linear_scaling"],
            pos_emb=kw.get("pos_emb_type", "NONE").lower(),
            pos_emb_std=kw.get("W_pos_emb_std", 1.0), pos_emb_decay=decay,
            pos_emb_p_norm=kw.get("pos_emb_p_norm", 2),
            pos_emb_in_values=kw.get("val_pos_emb", False))
    return {"Relu": nk.ReLU, "Erf": nk.Erf, "GlobalAvgPool": nk.GlobalAvgPool,
            "GlobalSumPool": nk.GlobalSumPool, "Flatten": nk.Flatten}[name]()


def _nt_cases() -> dict:
    with np.load(DATA / "masks_nt.npz") as f:
        arrays = {k: f[k] for k in f.files}
    cases: dict = {}
    for key, value in arrays.items():
        name, field = key.split("/")
        cases.setdefault(name, {})[field] = value
    return cases


NT_CASES = _nt_cases()


def _nt_case(name: str):
    a = NT_CASES[name]
    spec = json.loads(str(a["spec"]))
    t = {k: torch.from_numpy(v) for k, v in a.items() if k != "spec"}
    net = nk.Sequential(*[_nt_layer(n, kw, t["x1"].ndim - 2) for n, kw in spec])
    return net, t


def test_reference_cases_present():
    assert sorted(NT_CASES) == sorted([
        "attention_identity_posemb", "attention_relu", "attention_softmax",
        "attention_softmax_posemb", "conv2d_gap", "conv_flatten", "conv_gap",
        "conv_strided_pool_gsp"])


@pytest.mark.filterwarnings("ignore:one pair of inputs needs")
@pytest.mark.parametrize("name", sorted(NT_CASES))
def test_matches_neural_tangents(name):
    """k(x1, x2) and k(x1, x1) with masks of different lengths, float64, <= 1e-6 relative
    (measured ~3e-16), in one tile and in many (each with its rows of the masks)."""
    net, t = _nt_case(name)
    k12 = net.kernel(t["x1"], t["x2"], mask=(t["m1"], t["m2"]))
    k11 = net.kernel(t["x1"], mask=t["m1"])
    tiled = net.kernel(t["x1"], t["x2"], mask=(t["m1"], t["m2"]), memory_budget=2000)
    diag = net.kernel(t["x1"], mask=t["m1"], diagonal=True)
    for got, key in ((k12.nngp, "nngp"), (k12.ntk, "ntk"), (k11.nngp, "nngp_11"),
                     (k11.ntk, "ntk_11"), (tiled.nngp, "nngp"), (tiled.ntk, "ntk"),
                     (diag.nngp, "nngp_11"), (diag.ntk, "ntk_11")):
        want = t[key] if got.ndim == 2 else torch.diagonal(t[key])
        assert rel_err(got, want) < RTOL, (key, rel_err(got, want))


def test_masks_change_the_kernel():
    """The references are not those of the unmasked inputs (which hold zeros at absent
    positions): the masks matter through global averages and attention."""
    for name in ("conv_gap", "attention_softmax"):
        net, t = _nt_case(name)
        plain = net.kernel(t["x1"], t["x2"])
        assert rel_err(plain.nngp, t["nngp"]) > 1e-2


# --------------------------------------------------------------------------- truncation
def _sequences(n: int, channels: int, length: int, lengths: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, length, generator=g, dtype=torch.float64)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return x * mask[:, None], mask


TRUNCATION_NETS = {
    "conv-gap": lambda: nk.Sequential(
        nk.Conv1d(8, 3, padding="same", b_std=0.3), nk.ReLU(),
        nk.Conv1d(8, 5, padding="same", w_std=1.2, b_std=0.1), nk.Erf(), nk.GlobalAvgPool(),
        nk.Linear(1, b_std=0.1)),
    "attention": lambda: nk.Sequential(
        nk.Conv1d(8, 3, padding="same", b_std=0.2),
        nk.SelfAttention(8, 2, w_key_std=1.5, b_std=0.2), nk.ReLU(),
        nk.SelfAttention(8, 2, mechanism="relu", pos_emb="sum", pos_emb_p_norm=1,
                         pos_emb_decay=lambda d: torch.exp(-d / 2), pos_emb_in_values=True),
        nk.LayerNorm(), nk.GlobalAvgPool(), nk.Linear(1)),
    "identity-attention": lambda: nk.Sequential(
        nk.Conv1d(8, 1, b_std=0.2),
        nk.SelfAttention(8, 2, mechanism="identity", linear_scaling=False, pos_emb="sum"),
        nk.GELU(), nk.GlobalSumPool(), nk.Linear(1)),
    "layernorm-all": lambda: nk.Sequential(
        nk.Conv1d(8, 3, padding="same", b_std=0.2), nk.LayerNorm(axis="all"), nk.ReLU(),
        nk.GlobalAvgPool()),
}


@pytest.mark.parametrize("name", TRUNCATION_NETS)
def test_masked_equals_truncated(name):
    """Each example's kernel with a mask of length l equals the kernel of its first l
    positions, unmasked (the absent tail acts as the zero padding of 'same')."""
    net = TRUNCATION_NETS[name]()
    lengths1, lengths2 = [7, 3, 5], [2, 6]
    x1, m1 = _sequences(3, 2, 7, lengths1, seed=1)
    x2, m2 = _sequences(2, 2, 7, lengths2, seed=2)
    k = net.kernel(x1, x2, mask=(m1, m2))
    ks = net.kernel(x1, mask=m1)
    for i, li in enumerate(lengths1):
        for j, lj in enumerate(lengths2):
            if li != lj:  # attention needs one length per batch: pairs of equal length only
                continue
            want = net.kernel(x1[i:i + 1, :, :li], x2[j:j + 1, :, :lj])
            assert rel_err(k[i, j].nngp, want.nngp) < RTOL
            assert rel_err(k[i, j].ntk, want.ntk) < RTOL
        want = net.kernel(x1[i:i + 1, :, :li])
        assert rel_err(ks[i, i].nngp, want.nngp) < RTOL
        assert rel_err(ks[i, i].ntk, want.ntk) < RTOL


def test_masked_kernel_does_not_depend_on_the_padded_length():
    """Sequences of different lengths: the kernel between a pair is the same whatever
    length the batch is padded to (absent tails act as zero padding)."""
    net = TRUNCATION_NETS["conv-gap"]()
    x1, m1 = _sequences(2, 2, 6, [6, 2], seed=3)
    x2, m2 = _sequences(2, 2, 6, [4, 3], seed=4)
    k = net.kernel(x1, x2, mask=(m1, m2))
    for i, li in enumerate([6, 2]):
        for j, lj in enumerate([4, 3]):
            a, b = x1[i:i + 1, :, :li], x2[j:j + 1, :, :lj]
            n = max(li, lj) + 4  # room for the 'same' windows at both ends
            pa = torch.nn.functional.pad(a, (0, n - li))
            pb = torch.nn.functional.pad(b, (0, n - lj))
            ma = torch.arange(n)[None] < li
            mb = torch.arange(n)[None] < lj
            want = net.kernel(pa, pb, mask=(ma, mb))
            assert rel_err(k[i, j].nngp, want.nngp) < RTOL


def test_twin_masked_equals_truncated():
    """The finite twin (same weights at every length) on a masked batch gives, for each
    example, its output on its first l positions alone."""
    for name in ("conv-gap", "identity-attention", "layernorm-all"):
        net = TRUNCATION_NETS[name]()
        lengths = [7, 3, 5]
        x, m = _sequences(3, 2, 7, lengths, seed=5)
        model = net.build((2, 7), generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        out = model(x, mask=m)
        for i, li in enumerate(lengths):
            short = net.build((2, li), generator=torch.Generator().manual_seed(0),
                              dtype=x.dtype)
            if name == "identity-attention":  # the embeddings of the first li positions
                short.load_state_dict(_truncated_state(model.state_dict(), li))
            torch.testing.assert_close(out[i:i + 1], short(x[i:i + 1, :, :li]), rtol=1e-10,
                                       atol=1e-12)


def _truncated_state(state: dict, length: int) -> dict:
    out = {}
    for key, value in state.items():
        if key.endswith("pos_emb"):
            value = value[:, :length]
        elif key.endswith("pos_emb_factor"):
            continue
        out[key] = value
    return out


# ------------------------------------------------------------------------- formulas
def test_window_mask_is_the_centre_of_each_window():
    """Output position o of a window (size s, stride t, padding before b) is present where
    input position o t - b + (s - 1) // 2 is (neural-tangents' _pool_mask); a centre in
    padding takes the nearest input position's mask."""
    from ntkit.layers._masks import window_mask
    from ntkit.layers._spatial import Axis

    m = torch.tensor([[True, True, True, True, True, False, False, False, False]])
    for size, stride, before, after in [(3, 2, 1, 1), (2, 1, 0, 0), (3, 1, 0, 0),
                                        (4, 3, 1, 2), (3, 2, 0, 0), (2, 1, 1, 1),
                                        (2, 1, 3, 3)]:
        ax = Axis(9, before, after, size, stride, 1, "zeros")
        got = window_mask(m, [ax])[0].tolist()
        want = []
        for o in range(ax.m):
            p = o * stride - before + (size - 1) // 2
            want.append(bool(m[0, min(max(p, 0), 8)]))
        assert got == want, (size, stride, before, after)


def test_global_pooling_of_inputs():
    """GlobalAvgPool of masked inputs: (mean of present x1) . (mean of present x2) / C;
    GlobalSumPool: the sums."""
    x1, m1 = _sequences(3, 4, 6, [6, 2, 4], seed=6)
    x2, m2 = _sequences(2, 4, 6, [1, 5], seed=7)
    mean1 = x1.sum(2) / m1.sum(1, keepdim=True)
    mean2 = x2.sum(2) / m2.sum(1, keepdim=True)
    k = nk.GlobalAvgPool().kernel(x1, x2, mask=(m1, m2))
    torch.testing.assert_close(k.nngp, mean1 @ mean2.T / 4, rtol=1e-12, atol=0)
    k = nk.GlobalSumPool().kernel(x1, x2, mask=(m1, m2))
    torch.testing.assert_close(k.nngp, x1.sum(2) @ x2.sum(2).T / 4, rtol=1e-12, atol=0)


def test_spatial_outputs_are_zero_at_absent_positions():
    """A network that ends with spatial features: its kernel at matching positions is
    zero wherever either position is absent (biases included), and equals the unmasked
    kernel where both are present and no window reaches an absent position."""
    x1, m1 = _sequences(3, 2, 6, [6, 2, 4], seed=8)
    x2, m2 = _sequences(2, 2, 6, [3, 5], seed=9)
    net = nk.Sequential(nk.Conv1d(8, 1, b_std=0.5), nk.ReLU(), nk.Conv1d(8, 1, b_std=0.5))
    k = net.kernel(x1, x2, mask=(m1, m2))
    plain = net.kernel(x1, x2)
    both = m1[:, None, :] & m2[None, :, :]
    assert bool((k.nngp[~both] == 0).all()) and bool((k.ntk[~both] == 0).all())
    torch.testing.assert_close(k.nngp[both], plain.nngp[both], rtol=1e-12, atol=0)
    assert bool((plain.nngp[~both] > 0).all())  # the biases: zeroing is not a no-op


def test_polynomial_constant_term_is_zeroed_at_absent_positions():
    """After every layer absent positions hold zeros, as in neural-tangents' finite
    networks (each layer's input is zeroed at masked positions): a constant term of a
    Polynomial does not leak into a following convolution's present outputs."""
    x, m = _sequences(2, 2, 5, [5, 2], seed=10)
    net = nk.Sequential(nk.Conv1d(8, 1, b_std=0.0), nk.Polynomial([1.0, 0.5]),
                        nk.Conv1d(8, 3, padding="same"), nk.GlobalSumPool())
    k = net.kernel(x, mask=m)
    short = net.kernel(x[1:, :, :2])
    assert rel_err(k[1, 1].nngp, short.nngp) < RTOL


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("layer", [
    nk.LocallyConnected1d(4, 3), nk.ConvTranspose1d(4, 3),
], ids=lambda layer: type(layer).__name__)
def test_layers_without_a_masked_rule_refuse_by_name(layer):
    x, m = _sequences(2, 2, 6, [6, 3], seed=11)
    net = nk.Sequential(nk.Conv1d(4, 3, padding="same"), layer, nk.GlobalAvgPool())
    with pytest.raises(ValueError, match=f"{type(layer).__name__}.*does not honour masks"):
        net.kernel(x, mask=m)


def test_padding_modes_that_copy_values_refuse_masks():
    x, m = _sequences(2, 2, 6, [6, 3], seed=12)
    net = nk.Sequential(nk.Conv1d(4, 3, padding="circular"), nk.GlobalAvgPool())
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        net.kernel(x, mask=m)
    model = net.build((2, 6))
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        model(x.float(), mask=m)


def test_empty_examples_and_dense_networks_refused():
    x, m = _sequences(2, 2, 6, [6, 3], seed=13)
    m[1] = False
    with pytest.raises(ValueError, match=r"no present position in example\(s\) \[1\]"):
        nk.GlobalAvgPool().kernel(x, mask=m)
    with pytest.raises(ValueError, match="no layer that reads it"):
        nk.Sequential(nk.ReLU()).kernel(x, mask=m)


def test_side_inputs_report_masks():
    assert "mask" in nk.Sequential(nk.Conv1d(4, 3), nk.ReLU(), nk.GlobalAvgPool(),
                                   nk.Linear(1)).side_inputs()
    assert "mask" in nk.SelfAttention(4).side_inputs()
    assert "mask" in nk.Flatten().side_inputs()
    assert "mask" not in nk.LocallyConnected1d(4, 3).side_inputs()
    assert nk.ReLU().honours_masks and nk.Conv2d(3, 2).honours_masks
    assert not nk.ConvTranspose2d(3, 2).honours_masks


# ------------------------------------------------------------------------ Monte Carlo
WIDTH = 192
SAMPLES = 300
Z = 5.0
BIAS_TOL = 0.05  # the O(1/width) bias of finite networks' mean, relative to sqrt(k11 k22)

MC_NETS = {
    "conv-strided-pool": lambda: nk.Sequential(
        nk.Conv1d(WIDTH, 3, stride=2, padding="same", b_std=0.3), nk.ReLU(),
        nk.AvgPool1d(2, 1), nk.Conv1d(WIDTH, 2, b_std=0.2), nk.Erf(), nk.GlobalAvgPool()),
    "attention": lambda: nk.Sequential(
        nk.Conv1d(WIDTH, 1, b_std=0.2),
        nk.SelfAttention(WIDTH, 2, key_channels=128, value_channels=128, w_key_std=1.5,
                         b_std=0.1, pos_emb="sum", pos_emb_std=1.2),
        nk.ReLU(), nk.Flatten()),
}


def _mc_nngp(net: nk.Layer, x1, m1, x2, m2, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad(), one_thread():
        for _ in range(SAMPLES):
            model = net.build(tuple(x1.shape[1:]), generator=gen, dtype=x1.dtype)
            f1, f2 = model(x1, mask=m1), model(x2, mask=m2)
            out.append(f1 @ f2.T / f1.shape[1])
    return torch.stack(out)


@pytest.mark.parametrize("name", MC_NETS)
def test_monte_carlo_of_masked_twins(name):
    """The finite twins' mean NNGP with masks (two forward passes of one network, so
    shared embeddings) matches the masked kernel within Z standard errors plus the
    finite-width bias, and misses the kernel computed without the masks."""
    net = MC_NETS[name]()
    x1, m1 = _sequences(3, 3, 7, [7, 3, 5], seed=14)
    x2, m2 = _sequences(2, 3, 7, [2, 6], seed=15)
    samples = _mc_nngp(net, x1, m1, x2, m2, seed=16)
    d1 = net.kernel(x1, mask=m1, diagonal=True).nngp
    d2 = net.kernel(x2, mask=m2, diagonal=True).nngp
    bound = Z * samples.std(0) / math.sqrt(SAMPLES) + BIAS_TOL * (d1[:, None] * d2).sqrt()
    want = net.kernel(x1, x2, mask=(m1, m2)).nngp
    excess = float(((samples.mean(0) - want).abs() / bound).max())
    assert excess <= 1, f"{name}: |mean - kernel| / bound = {excess:.2f}"
    unmasked = net.kernel(x1, x2).nngp
    assert float(((samples.mean(0) - unmasked).abs() / bound).max()) > 1.5


# ------------------------------------------------------------ the contract, per layer
def _battery():
    """The spatial examples of the contract battery (tests/layers/test_contract.py)."""
    from layers.test_contract import EXAMPLES, _x

    return {cls: (case, _x) for cls, case in EXAMPLES.items()
            if case.kind in ("seq", "image", "volume")}


BATTERY = _battery()
#: Examples (by class name) that honour masks in general but whose settings or place
#: refuse them, with the message: padding that copies values; a bidirectional RNN after
#: other layers (it needs every pair of steps of masked sequences).
REFUSED_BY_SETTINGS = {"Conv2d": "padding_mode='zeros'", "RNN": "reads every pair of steps"}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("cls", [pytest.param(c, id=c.__name__) for c in BATTERY])
def test_contract_every_spatial_layer_honours_or_refuses_masks(cls):
    """Every spatial example of the battery, in its network (``before + [layer] +
    [Flatten(), Linear]``): a layer with ``honours_masks`` gives, with a mask that marks
    every position present, exactly the kernel without one, and its twin the same
    outputs; with masks of different lengths its kernel is finite, its diagonal the
    full kernel's, ``k(x, x)`` symmetric, and tiles agree. Any other layer refuses a
    masked kernel with an error naming it."""
    case, make_x = BATTERY[cls]
    net = case.network()
    x1, x2 = make_x(case, 0), make_x(case, 1, n=5)
    full1 = torch.ones((x1.shape[0], *x1.shape[2:]), dtype=torch.bool)
    full2 = torch.ones((x2.shape[0], *x2.shape[2:]), dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    part1, part2 = (full1.clone(), full2.clone())
    for m in (part1, part2):  # drop a trailing block of positions from some examples
        for i in range(0, m.shape[0], 2):
            cut = int(torch.randint(1, m.shape[-1], (1,), generator=g))
            m[i, ..., cut:] = False
    if not case.make().honours_masks:
        with pytest.raises(ValueError, match=rf"{cls.__name__}.*does not honour masks"):
            net.kernel(x1, x2, mask=(part1, part2))
        return
    if cls.__name__ in REFUSED_BY_SETTINGS:
        with pytest.raises(ValueError, match=REFUSED_BY_SETTINGS[cls.__name__]):
            net.kernel(x1, x2, mask=(part1, part2))
        return
    for args, mask in (((x1, x2), (full1, full2)), ((x1,), full1)):
        got, want = net.kernel(*args, mask=mask), net.kernel(*args)
        assert rel_err(got.nngp, want.nngp) < 1e-12 and rel_err(got.ntk, want.ntk) < 1e-12
    model = net.build(tuple(x1.shape[1:]), generator=torch.Generator().manual_seed(1),
                      dtype=x1.dtype)
    model.train(False)
    torch.testing.assert_close(model(x1, mask=full1), model(x1), rtol=1e-12, atol=1e-12)
    k = net.kernel(x1, x2, mask=(part1, part2))
    ks = net.kernel(x1, mask=part1)
    kd = net.kernel(x1, mask=part1, diagonal=True)
    tiled = net.kernel(x1, x2, mask=(part1, part2), memory_budget=3000)
    assert bool(torch.isfinite(k.ntk).all())
    assert torch.equal(ks.nngp, ks.nngp.T)
    torch.testing.assert_close(kd.ntk, torch.diagonal(ks.ntk), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tiled.ntk, k.ntk, rtol=1e-10, atol=1e-12)
    assert rel_err(k.nngp, net.kernel(x1, x2).nngp) > 1e-6  # the masks matter


def test_twins_of_layers_without_a_masked_rule_refuse_masks():
    x, m = _sequences(2, 2, 6, [6, 3], seed=17)
    net = nk.Sequential(nk.Conv1d(4, 3, padding="same"), nk.LocallyConnected1d(4, 3),
                        nk.GlobalAvgPool(), nk.Linear(1))
    model = net.build((2, 6), dtype=x.dtype)
    with pytest.raises(ValueError, match="LocallyConnected1d.*does not honour masks"):
        model(x, mask=m)
    assert model(x).shape == (2, 1)  # without a mask the twin runs as before


NTK_SAMPLES = 96


def _mc_ntk(net: nk.Layer, x1, m1, x2, m2, seed: int) -> torch.Tensor:
    """Empirical NTKs of the masked twins, ``J(x1) J(x2)^T`` over all parameters."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with one_thread():
        for _ in range(NTK_SAMPLES):
            model = net.build(tuple(x1.shape[1:]), generator=gen, dtype=x1.dtype)
            params = list(model.parameters())

            def jac(x, m, model=model, params=params):
                rows = []
                for y in model(x, mask=m)[:, 0]:
                    grads = torch.autograd.grad(y, params, retain_graph=True)
                    rows.append(torch.cat([g.flatten() for g in grads]))
                return torch.stack(rows)

            out.append(jac(x1, m1) @ jac(x2, m2).T)
    return torch.stack(out)


def test_monte_carlo_ntk_of_masked_twins():
    """The masked twins' mean empirical NTK (conv with stride, average pooling, softmax
    attention with embeddings, global average over present positions) matches the
    masked analytic NTK, and misses the NTK computed without the masks."""
    net = nk.Sequential(
        nk.Conv1d(128, 3, stride=2, padding="same", b_std=0.3), nk.ReLU(),
        nk.SelfAttention(128, 2, key_channels=96, value_channels=64, w_key_std=1.5,
                         b_std=0.1, pos_emb="sum"),
        nk.AvgPool1d(2, 1), nk.Erf(), nk.GlobalAvgPool(), nk.Linear(1, b_std=0.1))
    x1, m1 = _sequences(3, 3, 9, [9, 3, 6], seed=18)
    x2, m2 = _sequences(2, 3, 9, [2, 8], seed=19)
    samples = _mc_ntk(net, x1, m1, x2, m2, seed=20)
    d1 = net.kernel(x1, mask=m1, diagonal=True).ntk
    d2 = net.kernel(x2, mask=m2, diagonal=True).ntk
    bound = (Z * samples.std(0) / math.sqrt(NTK_SAMPLES)
             + BIAS_TOL * (d1[:, None] * d2).sqrt())
    want = net.kernel(x1, x2, mask=(m1, m2)).ntk
    excess = float(((samples.mean(0) - want).abs() / bound).max())
    assert excess <= 1, f"|mean - ntk| / bound = {excess:.2f}"
    unmasked = net.kernel(x1, x2).ntk
    assert float(((samples.mean(0) - unmasked).abs() / bound).max()) > 1.5

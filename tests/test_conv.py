"""Convolutions and pooling: infinite-width kernels against their finite twins, position
pairs against matching positions, diagonals, tiling, twin shapes and errors.

Exact witnesses (deterministic, to rounding): one convolution on the inputs against the
windows that torch's F.pad and Tensor.unfold cut out; pooling on the inputs against the
input kernel of the twin's pooled inputs; the twins against torch.nn.Conv1d/2d/3d and
torch.nn.AvgPool2d; 1-d layers against 2-d / 3-d layers on singleton axes.

Monte Carlo witness (the ``test_mc_*`` tests), for networks with hidden layers. Networks are
drawn by ``net.build`` (fixed seeds, float64, 128 channels per layer) and run on ``x1`` and
``x2`` together. For each network and each output position ``p``:

* empirical NNGP: ``f(x_i)_p . f(x_j)_p / C`` over the ``C`` output channels;
* empirical NTK: ``t(x_i)_p . t(x_j)_p / C`` with ``t = J u`` the derivative of the output
  along a Rademacher direction ``u`` of the stored parameters (central differences, step
  1e-6). ``E_u[(J u)(J u)^T] = J J^T``, so its mean is the empirical NTK over the stored
  parameters that the kernel describes (what ``nk.empirical_kernels`` computes, but per
  output position and with one forward-mode direction instead of a Jacobian row per output:
  ~8 ms per network instead of ~150 ms). ``test_witness_*`` check this estimator against
  ``torch.func.jvp`` and ``nk.empirical_kernels`` on the same sampled networks.

The witness is compared with ``net.kernel(x1)`` (nngp, ntk, cov1) and ``net.kernel(x1, x2)``
(nngp, ntk, cov1, cov2), per position. Criterion, elementwise, as in test_monte_carlo.py::

    |mc_mean - analytic| <= Z * stderr + bias_tol * max|analytic|

``stderr`` is the sample standard deviation over networks / sqrt(n). One network's
per-position estimates scatter by ~15% of the largest entry (``sqrt(2/C)`` from the output
channels, plus ``~sqrt(2/W)`` from the hidden layer), so 120 networks give stderr ~1.4% and
``Z * stderr`` ~7% (observed: every correct kernel within 0.85 of the bound). Other padding
conventions, pooling normalisations or LayerNorm axes change entries by 25-70% and miss by
4-100x the bound, a 10% factor by 2x (``test_mc_criterion_rejects_wrong_kernel``).

``bias_tol``: one hidden layer (conv -> activation -> conv / pooling / linear readout) has
an exact mean at any width: hidden channels are i.i.d. given the input, and the readout is
independent of them and enters linearly. Only LayerNorm (empirical statistics over 128
channels) and a nonlinearity after two convolutions (the residual block) carry an O(1/W)
bias, c / W with c of order 1-4: ``BIAS_DEEP = 0.03``. Elsewhere ``BIAS_EXACT = 0.002``
only absorbs rounding and the finite-difference error (~1e-10).
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call, jvp

import ntkit as nk
from conftest import one_thread
from ntkit.tiling import tiled_kernel
from ntkit.layers import input_kernel
from ntkit.layers.conv import NTKConv

F64 = torch.float64
WIDTH = 128
N_SAMPLES = 120
Z = 5.0
BIAS_EXACT = 0.002
BIAS_DEEP = 0.03
EPS = 1e-6
FIELDS = ("nngp", "ntk", "cov1", "cov2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this module: its tensors are tiny, and with two threads the
    Monte Carlo loop runs 5-10x slower whenever another process shares the two cores."""
    with one_thread():
        yield


def _x(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


#: 3 + 2 tiny inputs per dimensionality, channels first.
INPUTS = {
    1: (_x(3, 2, 9, seed=1), _x(2, 2, 9, seed=2)),
    2: (_x(3, 2, 5, 6, seed=3), _x(2, 2, 5, 6, seed=4)),
    3: (_x(3, 2, 3, 3, 4, seed=5), _x(2, 2, 3, 3, 4, seed=6)),
}


# --------------------------------------------------------------------------- witness
def _directions(params: dict[str, torch.Tensor], gen: torch.Generator) -> dict:
    """Rademacher (+-1) entries, one per stored parameter: E[u u^T] = I."""
    return {n: torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype).mul_(2).sub_(1)
            for n, p in params.items()}


def tangent(model: nn.Module, x: torch.Tensor, u: dict[str, torch.Tensor]) -> torch.Tensor:
    """``J u``: the derivative of ``model(x)`` along ``u`` (central differences)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        plus = functional_call(model, {n: p + EPS * u[n] for n, p in params.items()}, (x,))
        minus = functional_call(model, {n: p - EPS * u[n] for n, p in params.items()}, (x,))
    return (plus - minus) / (2 * EPS)


def channel_kernel(f: torch.Tensor) -> torch.Tensor:
    """``f_i . f_j / C`` over channels at each position: (N, C, *S) -> (N, N, *S)."""
    return torch.einsum("ic...,jc...->ij...", f, f) / f.shape[1]


def mc_samples(net: nk.Layer, x: torch.Tensor, n_samples: int, seed: int) -> dict:
    """Per-network empirical NNGP and NTK (tangent estimate) of ``x`` with itself, per
    output position, stacked along a leading sample axis."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.Generator().manual_seed(seed + 7919)
    nngp, ntk = [], []
    for _ in range(n_samples):
        model = net.build(tuple(x.shape[1:]), generator=gen, dtype=x.dtype)
        with torch.no_grad():
            out = model(x)
        u = _directions(dict(model.named_parameters()), dirs)
        nngp.append(channel_kernel(out))
        ntk.append(channel_kernel(tangent(model, x, u)))
    return {"nngp": torch.stack(nngp), "ntk": torch.stack(ntk)}


def _batch_diagonal(s: torch.Tensor) -> torch.Tensor:
    """(samples, N, N, *S) -> (samples, N, *S): each input paired with itself."""
    return torch.diagonal(s, 0, 1, 2).movedim(-1, 1)


def mc_targets(samples: dict, n1: int) -> dict[str, torch.Tensor]:
    """The per-sample blocks of the joint (x1; x2) estimates that each kernel field claims."""
    g, t = samples["nngp"], samples["ntk"]
    return {
        "k(x1).nngp": g[:, :n1, :n1], "k(x1).ntk": t[:, :n1, :n1],
        "k(x1).cov1": _batch_diagonal(g[:, :n1, :n1]),
        "k(x1,x2).nngp": g[:, :n1, n1:], "k(x1,x2).ntk": t[:, :n1, n1:],
        "k(x1,x2).cov1": _batch_diagonal(g[:, :n1, :n1]),
        "k(x1,x2).cov2": _batch_diagonal(g[:, n1:, n1:]),
    }


def analytic_targets(net: nk.Layer, x1: torch.Tensor, x2: torch.Tensor) -> dict:
    k11, k12 = net.kernel(x1), net.kernel(x1, x2)
    assert not k11.position_pairs and not k12.position_pairs
    return {
        "k(x1).nngp": k11.nngp, "k(x1).ntk": k11.ntk, "k(x1).cov1": k11.cov1,
        "k(x1,x2).nngp": k12.nngp, "k(x1,x2).ntk": k12.ntk, "k(x1,x2).cov1": k12.cov1,
        "k(x1,x2).cov2": k12.cov2,
    }


def mc_violations(samples: dict, n1: int, want: dict, bias_tol: float) -> dict[str, str]:
    """Fields whose Monte Carlo mean misses the analytic kernel by more than the criterion."""
    bad = {}
    for name, s in mc_targets(samples, n1).items():
        w = want[name]
        assert s.shape[1:] == w.shape, (name, tuple(s.shape), tuple(w.shape))
        mean, stderr = s.mean(0), s.std(0) / s.shape[0] ** 0.5
        bound = Z * stderr + bias_tol * w.abs().max()
        excess = (mean - w).abs() / bound
        if not bool((excess <= 1).all()):
            z = float(((mean - w).abs() / stderr.clamp_min(1e-300)).max())
            bad[name] = f"max |err|/bound = {float(excess.max()):.2f} (max |z| = {z:.1f})"
    return bad


# ------------------------------------------------------------------- MC networks
def _conv2(first: dict, second: dict, act: nk.Layer | None = None, ndim: int = 2,
           c_out: int = WIDTH) -> nk.Sequential:
    """conv(W, **first) -> act -> conv(c_out, **second): one hidden layer."""
    conv = {1: nk.Conv1d, 2: nk.Conv2d, 3: nk.Conv3d}[ndim]
    return nk.Sequential(conv(WIDTH, **{"w_std": 1.3, "b_std": 0.2, **first}),
                         act if act is not None else nk.ReLU(),
                         conv(c_out, **{"w_std": 1.1, "b_std": 0.3, **second}))


def _pooled(pool: nk.Layer, readout: nk.Layer | None = None) -> nk.Sequential:
    """conv(W, 'same') -> ReLU -> pool [-> readout]."""
    layers = [nk.Conv2d(WIDTH, 3, padding="same", w_std=1.3, b_std=0.2), nk.ReLU(), pool]
    if readout is not None:
        layers.append(readout)
    return nk.Sequential(*layers)


def _layernorm(axis: str) -> nk.Sequential:
    return nk.Sequential(nk.Conv2d(WIDTH, 3, padding="same", w_std=1.2, b_std=0.5),
                         nk.LayerNorm(axis=axis), nk.ReLU(),
                         nk.Conv2d(WIDTH, 3, padding=1, w_std=1.1, b_std=0.2))


def _residual() -> nk.Sequential:
    branch = nk.Sequential(nk.Conv2d(WIDTH, 3, padding="same", w_std=1.2, b_std=0.1), nk.ReLU(),
                           nk.Conv2d(WIDTH, 3, padding="same", w_std=0.9, b_std=0.1))
    return nk.Sequential(nk.Conv2d(WIDTH, 3, padding="same", w_std=1.1, b_std=0.1),
                         nk.FanOut(2), nk.Parallel(branch, nk.Identity()), nk.FanInSum(),
                         nk.GlobalAvgPool())


def _concat() -> nk.Sequential:
    return nk.Sequential(
        nk.Conv2d(WIDTH, 3, padding="same", w_std=1.3, b_std=0.2), nk.ReLU(), nk.FanOut(2),
        nk.Parallel(nk.Conv2d(64, 3, padding="same", w_std=1.2, b_std=0.2),
                    nk.Conv2d(WIDTH, 1, w_std=0.8, b_std=0.5)),
        nk.FanInConcat())


def _pool_in_branch() -> nk.Sequential:
    """Pooling inside a Parallel branch: the other branch's conv and FanInSum receive position
    pairs, which are dropped only after the Parallel."""
    return nk.Sequential(
        nk.Conv2d(WIDTH, 3, padding="same", w_std=1.3, b_std=0.2), nk.ReLU(), nk.FanOut(2),
        nk.Parallel(nk.AvgPool2d(3, stride=1, padding=1),
                    nk.Conv2d(WIDTH, 1, w_std=0.9, b_std=0.2)),
        nk.FanInSum(), nk.Conv2d(WIDTH, 2, w_std=1.1, b_std=0.1))


#: name -> (network factory, spatial dims of the inputs, bias_tol, n_samples)
MC_NETS = {
    "valid": (lambda: _conv2(dict(kernel_size=3, padding="valid"), dict(kernel_size=2)),
              2, BIAS_EXACT, N_SAMPLES),
    "same": (lambda: _conv2(dict(kernel_size=3, padding="same"),
                            dict(kernel_size=3, padding="same")), 2, BIAS_EXACT, N_SAMPLES),
    "circular": (lambda: _conv2(dict(kernel_size=3, padding="circular"),
                                dict(kernel_size=(2, 3), padding="circular")),
                 2, BIAS_EXACT, N_SAMPLES),
    "int-padding": (lambda: _conv2(dict(kernel_size=3, padding=2),
                                   dict(kernel_size=3, padding=(0, 1))),
                    2, BIAS_EXACT, N_SAMPLES),
    "reflect": (lambda: _conv2(dict(kernel_size=3, padding=1, padding_mode="reflect"),
                               dict(kernel_size=3, padding=(1, 2), padding_mode="reflect")),
                2, BIAS_EXACT, N_SAMPLES),
    "replicate": (lambda: _conv2(dict(kernel_size=3, padding="same", padding_mode="replicate"),
                                 dict(kernel_size=3, padding=2, padding_mode="replicate")),
                  2, BIAS_EXACT, N_SAMPLES),
    "stride-2": (lambda: _conv2(dict(kernel_size=3, stride=2, padding="same"),
                                dict(kernel_size=2, stride=(1, 2), padding=1)),
                 2, BIAS_EXACT, N_SAMPLES),
    "dilation-2": (lambda: _conv2(dict(kernel_size=3, dilation=2, padding="same"),
                                  dict(kernel_size=2, dilation=(2, 1))),
                   2, BIAS_EXACT, N_SAMPLES),
    "even-kernel-same": (lambda: _conv2(dict(kernel_size=2, padding="same"),
                                        dict(kernel_size=(4, 2), padding="same")),
                         2, BIAS_EXACT, N_SAMPLES),
    "conv1d": (lambda: _conv2(dict(kernel_size=3, stride=2, padding="same",
                                   padding_mode="reflect"),
                              dict(kernel_size=2, dilation=2, padding="circular"), ndim=1),
               1, BIAS_EXACT, N_SAMPLES),
    "conv3d": (lambda: _conv2(dict(kernel_size=3, padding="same"),
                              dict(kernel_size=2, padding=(0, 1, 0),
                                   padding_mode="replicate"), ndim=3),
               3, BIAS_EXACT, 80),
    "standard": (lambda: _conv2(dict(kernel_size=3, padding="same",
                                     parameterization="standard"),
                                dict(kernel_size=3, padding=1, parameterization="standard")),
                 2, BIAS_EXACT, N_SAMPLES),
    "no-bias": (lambda: _conv2(dict(kernel_size=3, padding="same", b_std=None,
                                    parameterization="standard"),
                               dict(kernel_size=3, padding="same", b_std=None),
                               act=nk.Erf()),
                2, BIAS_EXACT, N_SAMPLES),
    "avgpool-stride-padding": (
        lambda: _pooled(nk.AvgPool2d(3, stride=2, padding=1),
                        nk.Conv2d(WIDTH, 2, padding=(0, 1), w_std=1.1, b_std=0.3)),
        2, BIAS_EXACT, N_SAMPLES),
    "avgpool-exclude-pad": (
        lambda: _pooled(nk.AvgPool2d((2, 3), stride=1, padding=1, count_include_pad=False),
                        nk.Conv2d(WIDTH, 2, stride=2, w_std=1.1, b_std=0.3)),
        2, BIAS_EXACT, N_SAMPLES),
    "avgpool-same-stride": (
        lambda: _pooled(nk.AvgPool2d(2, stride=2, padding="same", count_include_pad=False),
                        nk.Conv2d(WIDTH, 2, padding="same", w_std=1.1, b_std=0.3)),
        2, BIAS_EXACT, N_SAMPLES),
    "sumpool": (lambda: _pooled(nk.Conv2d(WIDTH, 2, w_std=1.1, b_std=0.3),
                                nk.SumPool2d((2, 3), stride=(2, 1))),
                2, BIAS_EXACT, N_SAMPLES),
    "global-avgpool": (lambda: _pooled(nk.GlobalAvgPool(), nk.Linear(WIDTH, w_std=1.2,
                                                                      b_std=0.1)),
                       2, BIAS_EXACT, N_SAMPLES),
    "global-sumpool": (lambda: _pooled(nk.Conv2d(WIDTH, 2, w_std=1.1, b_std=0.3),
                                       nk.GlobalSumPool()),
                       2, BIAS_EXACT, N_SAMPLES),
    "layernorm-channels": (lambda: _layernorm("channels"), 2, BIAS_DEEP, N_SAMPLES),
    "layernorm-all": (lambda: _layernorm("all"), 2, BIAS_DEEP, N_SAMPLES),
    "residual-gap": (_residual, 2, BIAS_DEEP, 80),
    "concat": (_concat, 2, BIAS_EXACT, N_SAMPLES),
    "pool-in-branch": (_pool_in_branch, 2, BIAS_EXACT, N_SAMPLES),
}


@functools.cache
def _mc(name: str) -> dict:
    """Samples of MC_NETS[name] (cached: the discrimination tests reuse them)."""
    factory, ndim, _, n = MC_NETS[name]
    x1, x2 = INPUTS[ndim]
    return mc_samples(factory(), torch.cat([x1, x2]), n, seed=sorted(MC_NETS).index(name))


def _assert_mc(name: str) -> None:
    factory, ndim, bias_tol, _ = MC_NETS[name]
    x1, x2 = INPUTS[ndim]
    want = analytic_targets(factory(), x1, x2)
    bad = mc_violations(_mc(name), len(x1), want, bias_tol)
    assert not bad, f"Monte Carlo disagrees with net.kernel: {bad}"


@pytest.mark.parametrize("name", list(MC_NETS))
def test_mc_agrees(name):
    """Witness: the finite twins' per-position empirical NNGP and NTK (see module docstring),
    for k(x1) and k(x1, x2), against net.kernel of the same network."""
    _assert_mc(name)


# --------------------------------------------------------- the criterion can fail
def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(tuple(range(2, x.ndim)))


def _flipped_targets(net, x1, x2) -> dict:
    """The kernel of the mirror-image network (even kernels padded 1 before, 0 after):
    ``flip(k(flip x1, flip x2))`` over positions."""
    want = analytic_targets(net, _flip(x1), _flip(x2))
    return {name: t.flip(tuple(range(t.ndim - 2, t.ndim))) for name, t in want.items()}


def _targets_of(name: str, net: nk.Layer) -> dict:
    x1, x2 = INPUTS[MC_NETS[name][1]]
    return analytic_targets(net, x1, x2)


WRONG = {
    "reflect-as-replicate": ("reflect", lambda: _targets_of("reflect", _conv2(
        dict(kernel_size=3, padding=1, padding_mode="replicate"),
        dict(kernel_size=3, padding=(1, 2), padding_mode="replicate")))),
    "replicate-as-zeros": ("replicate", lambda: _targets_of("replicate", _conv2(
        dict(kernel_size=3, padding="same"), dict(kernel_size=3, padding=2)))),
    "circular-as-zeros": ("circular", lambda: _targets_of("circular", _conv2(
        dict(kernel_size=3, padding="same"), dict(kernel_size=(2, 3), padding="same")))),
    "even-same-padded-before": ("even-kernel-same", lambda: _flipped_targets(
        MC_NETS["even-kernel-same"][0](), *INPUTS[2])),
    "exclude-pad-as-include-pad": ("avgpool-exclude-pad", lambda: _targets_of(
        "avgpool-exclude-pad", _pooled(nk.AvgPool2d((2, 3), stride=1, padding=1),
                                       nk.Conv2d(WIDTH, 2, stride=2, w_std=1.1, b_std=0.3)))),
    "layernorm-channels-as-all": ("layernorm-channels", lambda: _targets_of(
        "layernorm-channels", _layernorm("all"))),
    "layernorm-all-as-channels": ("layernorm-all", lambda: _targets_of(
        "layernorm-all", _layernorm("channels"))),
    "same-times-1.1": ("same", lambda: {
        k: v * 1.1 for k, v in _targets_of("same", MC_NETS["same"][0]()).items()}),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_mc_criterion_rejects_wrong_kernel(case):
    """Discrimination: the samples of one network violate the criterion against the kernel
    of a nearby wrong rule (another padding mode, the mirror-image split of an even kernel's
    'same' padding, the other count_include_pad, the other LayerNorm axis, a 10% factor)."""
    name, wrong = WRONG[case]
    x1, _ = INPUTS[MC_NETS[name][1]]
    assert mc_violations(_mc(name), len(x1), wrong(), MC_NETS[name][2])


# ------------------------------------------------------------- the witness itself
def _witness_net() -> nk.Sequential:
    return nk.Sequential(
        nk.Conv2d(3, 2, padding="same", b_std=0.3), nk.GELU(),
        nk.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        nk.Conv2d(3, 2, stride=(1, 2), padding=1, padding_mode="reflect", b_std=0.2),
        nk.LayerNorm(axis="all"), nk.Erf(), nk.Conv2d(2, (1, 2), b_std=0.1,
                                                      parameterization="standard"))


def test_witness_tangent_is_the_jvp():
    """The central-difference tangent equals torch.func.jvp of the twin (forward-mode AD)."""
    x = _x(3, 2, 3, 4, seed=20)
    model = _witness_net().build(x.shape[1:], generator=torch.Generator().manual_seed(0),
                                 dtype=F64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    u = _directions(params, torch.Generator().manual_seed(1))
    _, want = jvp(lambda p: functional_call(model, p, (x,)), (params,), (u,))
    torch.testing.assert_close(tangent(model, x, u), want, rtol=1e-6, atol=1e-8)


def test_witness_matches_empirical_kernels():
    """Over a basis of directions the tangent estimate sums to J J^T exactly: averaged over
    positions it equals nk.empirical_kernels' NTK of the same twin (same seed), and the
    forward-pass NNGP equals its NNGP. (Rademacher directions have E[u u^T] = I, so their
    mean is the same J J^T.)"""
    net = _witness_net()
    x = _x(3, 2, 3, 4, seed=21)
    model = net.build(x.shape[1:], generator=torch.Generator().manual_seed(5), dtype=F64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    ntk = 0
    for name, p in params.items():
        for i in range(p.numel()):
            u = {n: torch.zeros_like(q) for n, q in params.items()}
            u[name].view(-1)[i] = 1.0
            ntk = ntk + channel_kernel(tangent(model, x, u))
    with torch.no_grad():
        nngp = channel_kernel(model(x))
    ((e_nngp, e_ntk, *_),) = list(nk.empirical_kernels(
        nk.Sequential(net, nk.Flatten()), x, n_samples=1,
        generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(nngp.mean((2, 3)), e_nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ntk.mean((2, 3)), e_ntk, rtol=1e-6, atol=1e-9)


# ------------------------------------------------ position pairs vs matching positions
FLAT_NETS = {
    "conv-stack-flatten": lambda: nk.Sequential(
        nk.Conv2d(6, 3, padding="same", b_std=0.2), nk.ReLU(),
        nk.Conv2d(5, 2, stride=2, padding=1, padding_mode="reflect", w_std=1.3, b_std=0.1),
        nk.LayerNorm(), nk.GELU(),
        nk.Conv2d(4, (1, 2), dilation=(1, 2), padding="circular", b_std=0.3,
                  parameterization="standard"),
        nk.LayerNorm(axis="all"), nk.Elementwise(torch.tanh, degree=9),
        nk.Flatten(), nk.Linear(3, b_std=0.1)),
    "residual-concat-flatten": lambda: nk.Sequential(
        nk.Conv2d(6, 3, padding=1, padding_mode="replicate", b_std=0.1), nk.FanOut(3),
        nk.Parallel(nk.Sequential(nk.Erf(), nk.Conv2d(6, 3, padding="same")), nk.Identity(),
                    nk.Sequential(nk.ReLU(), nk.Conv2d(6, 1, b_std=0.4))),
        nk.FanInSum(), nk.Sin(), nk.FanOut(2),
        nk.Parallel(nk.Conv2d(3, 2, padding="same"), nk.Conv2d(5, 2, padding="same")),
        nk.FanInConcat(), nk.Flatten(), nk.Linear(2)),
}


def _assert_kernels_equal(got: nk.Kernel, want: nk.Kernel, rtol: float = 1e-11) -> None:
    for f in FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.shape == b.shape, (f, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()),
                                   msg=lambda m, f=f: f"field {f}: {m}")


@pytest.mark.parametrize("name", list(FLAT_NETS))
@pytest.mark.parametrize("pair", ["x1-x2", "x1-x1", "diagonal"])
def test_position_pairs_give_the_matching_position_kernel(name, pair):
    """Witness: net.kernel, which propagates matching positions only, against the same
    network propagated from input_kernel(..., position_pairs=True) (every pair of positions
    held until Flatten takes the position diagonal): equal to rounding in float64."""
    net = FLAT_NETS[name]()
    x1, x2 = INPUTS[2]
    x2 = x2 if pair == "x1-x2" else None
    diagonal = pair == "diagonal"
    pairs = net.propagate(input_kernel(x1, x2, diagonal=diagonal, position_pairs=True))
    want = net.kernel(x1, x2, diagonal=diagonal)
    assert pairs.shape == want.shape and not pairs.position_pairs
    if pair == "x1-x1":  # net.kernel averages k(x, x) with its transpose (exact symmetry)
        pairs = pairs.replace(nngp=(pairs.nngp + pairs.nngp.T) / 2,
                              ntk=(pairs.ntk + pairs.ntk.T) / 2)
    _assert_kernels_equal(pairs, want)


@pytest.mark.parametrize("pair", ["x1-x2", "x1-x1", "diagonal"])
def test_to_position_diagonal_after_conv_relu(pair):
    """Kernel.to_position_diagonal() of a position-pair kernel after conv -> ReLU -> strided
    replicate-padded conv -> ReLU equals the matching-position kernel of the same layers;
    the pairs kernel itself is (N1, N2, *S, *S) and, for k(x1, x1), symmetric under
    exchanging the inputs together with their positions."""
    body = nk.Sequential(nk.Conv2d(6, 3, padding="same", w_std=1.2, b_std=0.3), nk.ReLU(),
                         nk.Conv2d(5, (2, 3), stride=(2, 1), padding=1,
                                   padding_mode="replicate", b_std=0.1), nk.ReLU())
    x1, x2 = INPUTS[2]
    x2 = x2 if pair == "x1-x2" else None
    diagonal = pair == "diagonal"
    kp = body.propagate(input_kernel(x1, x2, diagonal=diagonal, position_pairs=True))
    km = body.propagate(input_kernel(x1, x2, diagonal=diagonal))
    s = km.spatial_shape
    assert s == (3, 6) and kp.position_pairs and not km.position_pairs
    batch = (3,) if diagonal else (3, 3 if x2 is None else 2)
    assert kp.nngp.shape == batch + s + s and kp.cov1.shape == (3,) + s + s
    _assert_kernels_equal(kp.to_position_diagonal(), km)
    if pair == "x1-x1":
        swapped = kp.nngp.permute(1, 0, 4, 5, 2, 3)
        torch.testing.assert_close(kp.nngp, swapped, rtol=1e-12, atol=1e-14)
        # Off-diagonal position pairs are not a copy of the diagonal (they carry information).
        assert not torch.allclose(kp.nngp[0, 0, 0, 0], kp.nngp[0, 0, 1, 1])


# ------------------------------------------------------------------------- diagonal
DIAG_NETS = {
    "pooling-dense": lambda: nk.Sequential(
        nk.Conv2d(6, 3, padding="same", b_std=0.2), nk.ReLU(), nk.AvgPool2d(2, stride=1),
        nk.Conv2d(5, 2, padding=1, padding_mode="circular", b_std=0.1), nk.LayerNorm("all"),
        nk.GELU(), nk.SumPool2d(2), nk.GlobalAvgPool(), nk.Linear(2, b_std=0.1)),
    "pooling-spatial-out": lambda: nk.Sequential(
        nk.Conv2d(6, 3, padding="same", b_std=0.2), nk.Erf(),
        nk.AvgPool2d(2, stride=1, padding=1, count_include_pad=False), nk.Conv2d(4, 2)),
    "flatten": FLAT_NETS["conv-stack-flatten"],
}


@pytest.mark.parametrize("name", list(DIAG_NETS))
def test_diagonal_is_the_full_kernels_diagonal(name):
    """Witness: the batch diagonal of net.kernel(x1) (every pair computed): net.kernel(x1,
    diagonal=True) holds the same nngp, ntk and cov1, per output position where the
    network keeps positions."""
    net = DIAG_NETS[name]()
    x1 = INPUTS[2][0]
    full, diag = net.kernel(x1), net.kernel(x1, diagonal=True)
    assert diag.diagonal and diag.nngp.shape == (3,) + full.nngp.shape[2:]
    for f in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(diag, f), _batch_diagonal(getattr(full, f)[None])[0],
                                   rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(diag.cov1, full.cov1, rtol=1e-11, atol=1e-14)


# ---------------------------------------------------------------------------- tiling
def _tiles_drawn(capsys) -> int:
    """The number of tiles from the progress bar's last ``done/total``."""
    err = capsys.readouterr().err
    counts = re.findall(r"kernel tiles.*?(\d+)/(\d+)", err)
    assert counts, err
    return int(counts[-1][1])


def _budget(positions: int, entries: int) -> int:
    """A memory budget for about ``entries`` kernel entries per tile of float64 kernels
    over ``positions`` numbers per input pair (24 temporaries per entry: compute.py)."""
    return 8 * positions * 24 * entries


TILE_X1 = _x(7, 2, 5, 6, seed=30)
TILE_X2 = _x(5, 2, 5, 6, seed=31)
TILE_NETS = {
    # (factory, numbers per input pair in the widest layer: positions, squared with pairs)
    "pooling-dense": (DIAG_NETS["pooling-dense"], 30 * 30),
    "pooling-spatial-out": (DIAG_NETS["pooling-spatial-out"], 42 * 42),
    # (not conv-stack-flatten: Elementwise's quadrature is not symmetric in the two inputs,
    # so mirrored tiles differ from directly computed ones by its error, ~1e-8 at degree 9)
    "flatten": (FLAT_NETS["residual-concat-flatten"], 30),
}


@pytest.mark.parametrize("name", list(TILE_NETS))
def test_small_memory_budget_tiles_give_the_same_kernel(name, capsys):
    """Witness: the default budget (one tile for these sizes). A budget of ~6 entries per
    tile splits N = 7 into ragged tiles of 2-3 inputs; k(x1) (tiles above the diagonal,
    mirrored), k(x1, x2) and the diagonal agree with the single tile to rounding."""
    factory, numbers = TILE_NETS[name]
    net = factory()
    budget = _budget(numbers, 6)
    for x2 in (None, TILE_X2):
        ref = net.kernel(TILE_X1, x2, progress=True)
        assert _tiles_drawn(capsys) == 1
        tiled = net.kernel(TILE_X1, x2, memory_budget=budget, progress=True)
        n_tiles = _tiles_drawn(capsys)
        # 7 is prime: 6 or 10 symmetric tiles mean sides of 3 or 2, so some tile is ragged.
        assert n_tiles in ((6, 10) if x2 is None else range(6, 35)), n_tiles
        _assert_kernels_equal(tiled, ref, rtol=1e-12)
    ref = net.kernel(TILE_X1, diagonal=True)
    _assert_kernels_equal(net.kernel(TILE_X1, diagonal=True, memory_budget=_budget(numbers, 4)),
                          ref, rtol=1e-12)


def _swap_positions(t: torch.Tensor) -> torch.Tensor:
    """(N1, N2, *S, *S) -> (N2, N1, *S, *S) with the two position groups exchanged."""
    ns = (t.ndim - 2) // 2
    return t.permute(1, 0, *range(2 + ns, 2 + 2 * ns), *range(2, 2 + ns))


@pytest.mark.parametrize("kind", ["conv-avgpool-conv", "bare-avgpool"])
def test_tiled_position_pair_output_is_mirrored_correctly(kind, capsys):
    """A kernel that keeps every pair of positions to the output, (N1, N2, *S, *S), tiled by
    compute.tiled_kernel with the network's propagate (which drops no pairs), for
    conv -> ReLU -> AvgPool2d -> conv and a bare AvgPool2d. Witness: the single tile; and
    k(x1)[i, j] equals k(x1)[j, i] with positions exchanged, in particular across mirrored
    tiles; k(x2, x1) is k(x1, x2) exchanged the same way. net.kernel itself returns the
    position diagonal of it."""
    if kind == "conv-avgpool-conv":
        net = nk.Sequential(nk.Conv2d(4, 3, padding="same", b_std=0.2), nk.ReLU(),
                            nk.AvgPool2d(2, stride=1), nk.Conv2d(3, 2, padding=(1, 0),
                                                                 b_std=0.1))
    else:
        net = nk.AvgPool2d((2, 3), stride=(1, 2), padding=(0, 1))
    numbers = 30 * 30  # the widest layer has the input's 5 x 6 positions, squared

    def kernel(x1, x2=None, **kw):
        return tiled_kernel(net.propagate, x1, x2, diagonal=False, position_pairs=True,
                            network=net, **kw)

    ref = kernel(TILE_X1, memory_budget=None, progress=True)
    assert _tiles_drawn(capsys) == 1
    tiled = kernel(TILE_X1, memory_budget=_budget(numbers, 6), progress=True)
    assert _tiles_drawn(capsys) in (6, 10)
    s = ref.spatial_shape
    assert ref.position_pairs and ref.nngp.shape == (7, 7) + s + s
    _assert_kernels_equal(tiled, ref, rtol=1e-12)
    for f in ("nngp", "ntk"):
        t = getattr(tiled, f)
        torch.testing.assert_close(t, _swap_positions(t), rtol=1e-12, atol=1e-14)
    if kind == "conv-avgpool-conv":
        assert float(tiled.ntk.abs().max()) > 0
    _assert_kernels_equal(net.kernel(TILE_X1, memory_budget=_budget(30, 6)),
                          tiled.to_position_diagonal(), rtol=1e-12)
    cross = kernel(TILE_X1, TILE_X2, memory_budget=_budget(numbers, 6), progress=False)
    _assert_kernels_equal(cross, kernel(TILE_X1, TILE_X2, memory_budget=None, progress=False),
                          rtol=1e-12)
    back = kernel(TILE_X2, TILE_X1, memory_budget=_budget(numbers, 6), progress=False)
    torch.testing.assert_close(back.nngp, _swap_positions(cross.nngp), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(back.cov1, cross.cov2, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ twins vs torch
def _effective(module: NTKConv) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = module.weight.detach() * module.w_scale
    b = None if module.bias is None else module.bias.detach() * module.b_scale
    return w, b


CONV_CASES = [
    # (ndim, kernel_size, stride, padding, dilation, padding_mode, torch padding)
    (2, 3, 1, 0, 1, "zeros", 0),
    (2, 3, 1, "valid", 1, "zeros", "valid"),
    (2, (3, 2), (2, 1), (1, 2), (1, 2), "zeros", (1, 2)),
    (2, 3, 2, 2, 2, "zeros", 2),
    (2, (2, 4), 1, "same", 1, "zeros", "same"),
    (2, 3, 1, "same", (2, 1), "zeros", "same"),
    (2, 3, 1, "same", 1, "reflect", "same"),
    (2, 3, (1, 2), 1, 1, "reflect", 1),
    (2, 2, 1, (2, 1), 1, "replicate", (2, 1)),
    (2, 3, 2, 1, 1, "circular", 1),
    (2, 3, 1, "circular", 1, "zeros", "same-circular"),
    (1, 4, 3, 2, 1, "zeros", 2),
    (1, 2, 1, "same", 3, "replicate", "same"),
    (3, (2, 3, 2), (1, 2, 1), (1, 0, 1), 1, "zeros", (1, 0, 1)),
    (3, 2, 1, "same", 1, "circular", "same"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_conv_twin_matches_torch_conv(case):
    """Witness: torch.nn.Conv1d/2d/3d with the same settings (padding ints, 'valid',
    torch's 'same' for stride 1, padding_mode) and the twin's effective weight and bias:
    same output, whose shape is also the Kernel's shape and spatial shape."""
    ndim, ks, stride, padding, dilation, mode, torch_padding = case
    conv = {1: nk.Conv1d, 2: nk.Conv2d, 3: nk.Conv3d}[ndim]
    layer = conv(4, ks, stride=stride, padding=padding, dilation=dilation, b_std=0.5,
                 padding_mode=mode, w_std=1.3)
    x = _x(2, 3, *(7, 9, 6)[:ndim], seed=40)
    twin = layer.build(x.shape[1:], generator=torch.Generator().manual_seed(0), dtype=F64)
    if torch_padding == "same-circular":
        torch_padding, mode = "same", "circular"
    ref = getattr(nn, f"Conv{ndim}d")(3, 4, ks, stride=stride, padding=torch_padding,
                                      dilation=dilation, padding_mode=mode, dtype=F64)
    w, b = _effective(twin)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
        out, want = twin(x), ref(x)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    k = layer.kernel(x)
    assert k.shape == tuple(out.shape[1:])
    assert tuple(k.nngp.shape) == (2, 2) + tuple(out.shape[2:])


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("n", [5, 6, 7])
@pytest.mark.parametrize("stride,ks,dilation", [(2, 3, 1), (2, 2, 1), (3, 3, 2), (2, 4, 1)])
def test_strided_same_padding(n, stride, ks, dilation, mode):
    """'same' with stride: output ceil(n / stride) positions (torch has no strided 'same');
    the twin's output shape equals the Kernel's, and the twin equals F.pad (the mode) then
    torch's conv, with the total padding split total // 2 before, the rest after
    (TensorFlow / neural-tangents)."""
    layer = nk.Conv1d(3, ks, stride=stride, padding="same", dilation=dilation, b_std=0.1,
                      padding_mode=mode)
    x = _x(2, 2, n, seed=41)
    twin = layer.build(x.shape[1:], generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        out = twin(x)
    assert out.shape == (2, 3, math.ceil(n / stride))
    assert layer.kernel(x).shape == (3, math.ceil(n / stride))
    extent = dilation * (ks - 1) + 1
    total = max((math.ceil(n / stride) - 1) * stride + extent - n, 0)
    w, b = _effective(twin)
    padded = nn.functional.pad(x, (total // 2, total - total // 2),
                               mode="constant" if mode == "zeros" else mode)
    want = nn.functional.conv1d(padded, w, b, stride=stride, dilation=dilation)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def _same_pads(n: int, ks: int, stride: int, dilation: int) -> tuple[int, int]:
    """'same' per Conv2d's docstring: ceil(n / stride) outputs, total // 2 before."""
    total = max((math.ceil(n / stride) - 1) * stride + dilation * (ks - 1) + 1 - n, 0)
    return total // 2, total - total // 2


def _patches(x: torch.Tensor, ks, stride, dilation, pads, mode) -> torch.Tensor:
    """(N, C, *S) -> (N, M, C * taps): each output position's (padded) input window, by
    F.pad and Tensor.unfold (torch's own padding and windowing, not ntkit's)."""
    nd = x.ndim - 2
    flat = [p for pair in reversed(pads) for p in pair]
    x = nn.functional.pad(x, flat, mode="constant" if mode == "zeros" else mode)
    for d in range(nd):
        x = x.unfold(2 + d, dilation[d] * (ks[d] - 1) + 1, stride[d])[..., ::dilation[d]]
    # (N, C, *M, *K) -> (N, prod M, C * prod K)
    n, c, m = x.shape[0], x.shape[1], x.shape[2:2 + nd]
    x = x.reshape(n, c, math.prod(m), -1).permute(0, 2, 1, 3).reshape(n, math.prod(m), -1)
    return x, tuple(m)


def _patch_kernel(f1, f2, m, pairs: bool) -> torch.Tensor:
    if pairs:
        return torch.einsum("ipk,jqk->ijpq", f1, f2).div(f1.shape[2]).reshape(
            f1.shape[0], f2.shape[0], *m, *m)
    return torch.einsum("ipk,jpk->ijp", f1, f2).div(f1.shape[2]).reshape(
        f1.shape[0], f2.shape[0], *m)


@pytest.mark.parametrize("param", ["ntk", "standard", "standard-no-bias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_conv_on_inputs_is_the_patch_kernel(case, param):
    """Exact witness for one convolution on the inputs: with i.i.d. weights per tap the
    NNGP is w_std^2 * (window . window') / (C * taps) + b_std^2, the windows cut out by
    F.pad (the padding mode) and Tensor.unfold (stride, dilation); the NTK equals it (NTK
    parameterization) or is fan_in times the window kernel, plus 1 for the bias (standard).
    Checked for matching positions (net.kernel) and every pair of positions (propagate from
    input_kernel(..., position_pairs=True)), k(x1, x2) and k(x1)."""
    ndim, ks, stride, padding, dilation, mode, _ = case
    conv = {1: nk.Conv1d, 2: nk.Conv2d, 3: nk.Conv3d}[ndim]
    b_std = None if param == "standard-no-bias" else 0.5
    layer = conv(4, ks, stride=stride, padding=padding, dilation=dilation, w_std=1.3,
                 b_std=b_std, padding_mode=mode,
                 parameterization="ntk" if param == "ntk" else "standard")
    x1, x2 = _x(3, 2, *(7, 9, 6)[:ndim], seed=44), _x(2, 2, *(7, 9, 6)[:ndim], seed=45)
    ks, stride, dilation = (tuple(v) if isinstance(v, tuple) else (v,) * ndim
                            for v in (ks, stride, dilation))
    spatial = x1.shape[2:]
    if padding == "circular":
        mode = "circular"
    if padding in ("same", "circular"):
        pads = [_same_pads(n, k, s, d) for n, k, s, d in zip(spatial, ks, stride, dilation)]
    elif padding == "valid":
        pads = [(0, 0)] * ndim
    else:
        pads = [(p, p) for p in (padding if isinstance(padding, tuple) else (padding,) * ndim)]
    (f1, m), (f2, _) = (_patches(x, ks, stride, dilation, pads, mode) for x in (x1, x2))
    b2 = 0.0 if b_std is None else b_std**2
    fan_in = f1.shape[2]
    for pairs in (False, True):
        for a, b in ((f1, f2), (f1, f1)):
            window = _patch_kernel(a, b, m, pairs)
            nngp = 1.3**2 * window + b2
            ntk = nngp if param == "ntk" else fan_in * window + (b_std is not None)
            cov = _patch_kernel(a, a, m, pairs)
            cov = 1.3**2 * torch.stack([cov[i, i] for i in range(len(a))]) + b2
            x_2 = None if b is a else x2
            k = (layer.propagate(input_kernel(x1, x_2, position_pairs=True)) if pairs
                 else layer.kernel(x1, x_2))
            assert k.position_pairs == pairs and k.shape == (4,) + m
            torch.testing.assert_close(k.nngp, nngp, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(k.ntk, ntk, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(k.cov1, cov, rtol=1e-12, atol=1e-12)


POOL_LAYERS = {
    "avg2d-3-s2-p1": lambda: nk.AvgPool2d(3, stride=2, padding=1),
    "avg2d-exclude-pad": lambda: nk.AvgPool2d((2, 3), stride=(1, 2), padding=1,
                                              count_include_pad=False),
    "avg2d-same-exclude-pad": lambda: nk.AvgPool2d(2, stride=2, padding="same",
                                                   count_include_pad=False),
    "avg2d-gaps": lambda: nk.AvgPool2d(2, stride=3),
    "sum2d-same": lambda: nk.SumPool2d((3, 2), stride=(2, 1), padding="same"),
    "avg1d": lambda: nk.AvgPool1d(3, stride=2, padding=1, count_include_pad=False),
    "sum1d": lambda: nk.SumPool1d(2, stride=1, padding="same"),
    "avg3d": lambda: nk.AvgPool3d((2, 1, 3), stride=(1, 1, 2), padding=(1, 0, 1),
                                  count_include_pad=False),
    "sum3d": lambda: nk.SumPool3d(2, stride=1),
    "global-avg": nk.GlobalAvgPool,
    "global-sum": nk.GlobalSumPool,
}


@pytest.mark.parametrize("name,ndim", [
    (name, ndim) for name, make in POOL_LAYERS.items() for ndim in (1, 2, 3)
    if getattr(make(), "ndim", ndim) == ndim])
def test_pool_on_inputs_is_the_kernel_of_the_pooled_inputs(name, ndim):
    """Exact witness: pooling is linear and deterministic, so its kernel on the inputs is
    the input kernel of the twin's pooled inputs, computed by input_kernel from the twin's
    outputs: every pair of positions (propagate from input_kernel(..., position_pairs=True))
    and matching positions (net.kernel), for k(x1, x2), k(x1) and the diagonal."""
    layer = POOL_LAYERS[name]()
    x1, x2 = _x(3, 2, *(7, 6, 5)[:ndim], seed=46), _x(2, 2, *(7, 6, 5)[:ndim], seed=47)
    twin = layer.build(x1.shape[1:], dtype=F64)
    y1, y2 = twin(x1), twin(x2)
    for x_2, y_2, diagonal in ((x2, y2, False), (None, None, False), (None, None, True)):
        pairs = layer.propagate(input_kernel(x1, x_2, diagonal=diagonal, position_pairs=True))
        matching = layer.kernel(x1, x_2, diagonal=diagonal)
        for got, pp in ((pairs, True), (matching, False)):
            want = input_kernel(y1, y_2, diagonal=diagonal, position_pairs=pp)
            assert got.shape == want.shape == tuple(y1.shape[1:])
            assert got.position_pairs == want.position_pairs
            for f in ("nngp", "cov1", "cov2"):
                torch.testing.assert_close(getattr(got, f), getattr(want, f), rtol=1e-12,
                                           atol=1e-13, msg=lambda m, f=f: f"{f}: {m}")
            assert not bool(got.ntk.any())


def test_avgpool_window_entirely_in_padding_is_refused():
    """AvgPool1d(2, stride=1, padding=2, count_include_pad=False) would have windows holding
    only padding (0/0): refused with a message naming the padding, as torch.nn.AvgPool1d does
    (witness: torch refuses the same settings)."""
    with pytest.raises(RuntimeError):
        torch.nn.AvgPool1d(2, stride=1, padding=2, count_include_pad=False)(_x(2, 2, 5, seed=48))
    with pytest.raises(ValueError, match=r"padding .* more than half of kernel_size"):
        nk.AvgPool1d(2, stride=1, padding=2, count_include_pad=False)


POOL_CASES = [
    # (kernel_size, stride, padding, count_include_pad)
    (2, None, 0, True),
    (3, 2, 1, True),
    (3, 2, 1, False),
    ((2, 3), (1, 2), (1, 1), False),
    ((3, 2), 1, (1, 0), True),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_pool_twins_match_torch_avgpool(case):
    """Witness: torch.nn.AvgPool2d with the same window, stride, padding and
    count_include_pad: AvgPool2d's twin gives its output, SumPool2d's that times the window
    size (with padding counted); shapes equal the Kernel's."""
    ks, stride, padding, include = case
    x = _x(2, 3, 7, 6, seed=42)
    ref = nn.AvgPool2d(ks, stride=stride, padding=padding, count_include_pad=include)(x)
    avg = nk.AvgPool2d(ks, stride=stride, padding=padding, count_include_pad=include)
    out = avg.build(x.shape[1:])(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert avg.kernel(x).shape == tuple(ref.shape[1:])
    size = math.prod(ks) if isinstance(ks, tuple) else ks * ks
    if include:
        summed = nk.SumPool2d(ks, stride=stride, padding=padding)
        torch.testing.assert_close(summed.build(x.shape[1:])(x), ref * size, rtol=1e-12,
                                   atol=1e-12)
        assert summed.kernel(x).shape == tuple(ref.shape[1:])


def test_pool_same_padding_and_global_pool_shapes():
    """AvgPool2d 'same' keeps ceil(n / stride) positions; GlobalAvgPool / GlobalSumPool and
    Flatten give dense (N, C) / (N, C * prod(S)) outputs in twin and Kernel alike."""
    x = _x(2, 3, 7, 6, seed=43)
    for layer, shape in ((nk.AvgPool2d(3, stride=2, padding="same"), (3, 4, 3)),
                         (nk.SumPool2d(2, stride=1, padding="same"), (3, 7, 6)),
                         (nk.GlobalAvgPool(), (3,)), (nk.GlobalSumPool(), (3,)),
                         (nk.Flatten(), (3 * 7 * 6,))):
        assert tuple(layer.build(x.shape[1:])(x).shape[1:]) == shape, layer
        assert layer.kernel(x).shape == shape, layer
    torch.testing.assert_close(nk.GlobalSumPool().build(x.shape[1:])(x), x.sum((2, 3)))
    torch.testing.assert_close(nk.GlobalAvgPool().build(x.shape[1:])(x), x.mean((2, 3)))


def _lifted(ndim: int, spatial_out: bool) -> nk.Sequential:
    """One 1-d network written with ``ndim``-d layers whose extra leading axes have size 1
    (windows, strides and padding of 1, 1 and 0 there)."""
    conv = {1: nk.Conv1d, 2: nk.Conv2d, 3: nk.Conv3d}[ndim]
    avg = {1: nk.AvgPool1d, 2: nk.AvgPool2d, 3: nk.AvgPool3d}[ndim]
    summed = {1: nk.SumPool1d, 2: nk.SumPool2d, 3: nk.SumPool3d}[ndim]

    def t(v, fill=1):
        return (fill,) * (ndim - 1) + (v,)

    layers = [conv(4, t(3), stride=t(2), padding=t(1, 0), dilation=t(1), b_std=0.2), nk.ReLU(),
              avg(t(2), stride=t(1), padding=t(1, 0), count_include_pad=False),
              conv(3, t(2), padding="same", padding_mode="reflect", w_std=1.2, b_std=0.1),
              nk.LayerNorm(axis="all"), nk.GELU(), summed(t(2), stride=t(1)),
              conv(3, t(2), padding="circular", parameterization="standard")]
    if not spatial_out:
        layers += [nk.Erf(), nk.GlobalAvgPool(), nk.Linear(2, b_std=0.1)]
    return nk.Sequential(*layers)


@pytest.mark.parametrize("spatial_out", [False, True], ids=["dense-out", "spatial-out"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_1d_layers_equal_2d_and_3d_layers_on_singleton_axes(ndim, spatial_out):
    """Witness: the 1-d network (Conv1d, AvgPool1d, SumPool1d) on (N, C, L). The same network
    written with 2-d / 3-d layers on (N, C, 1, L) / (N, C, 1, 1, L) has the same kernel
    (k(x1), k(x1, x2), diagonal), and its twin, drawn from the same seed, the same outputs."""
    x1, x2 = INPUTS[1]
    lift = (slice(None), slice(None)) + (None,) * (ndim - 1)
    net1, net = _lifted(1, spatial_out), _lifted(ndim, spatial_out)
    for a, b in ((net.kernel(x1[lift]), net1.kernel(x1)),
                 (net.kernel(x1[lift], x2[lift]), net1.kernel(x1, x2)),
                 (net.kernel(x1[lift], diagonal=True), net1.kernel(x1, diagonal=True))):
        for f in FIELDS:
            got, want = getattr(a, f), getattr(b, f)
            torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-12, atol=1e-14)
        assert a.shape[0] == b.shape[0] and math.prod(a.shape) == math.prod(b.shape)
    y1 = net1.build(x1.shape[1:], generator=torch.Generator().manual_seed(3), dtype=F64)(x1)
    y = net.build(x1[lift].shape[1:], generator=torch.Generator().manual_seed(3),
                  dtype=F64)(x1[lift])
    torch.testing.assert_close(y.reshape(y1.shape), y1, rtol=1e-12, atol=1e-12)


def test_float32_kernel_matches_float64():
    """Witness: the float64 kernel of a conv / pooling / LayerNorm network (with
    count_include_pad=False counts). float32 inputs give float32 kernels within the float32
    tolerance of conftest.TOL."""
    from conftest import TOL, rel_err

    net = DIAG_NETS["pooling-dense"]()
    spatial = nk.Sequential(nk.Conv2d(4, 3, padding="same", b_std=0.2), nk.Erf(),
                            nk.AvgPool2d(2, padding=1, count_include_pad=False),
                            nk.Conv2d(3, 2, padding="circular"))
    x1, x2 = INPUTS[2]
    for n in (net, spatial):
        k64, k32 = n.kernel(x1, x2), n.kernel(x1.float(), x2.float())
        assert k32.dtype == torch.float32
        for f in FIELDS:
            assert rel_err(getattr(k32, f), getattr(k64, f)) < TOL[torch.float32]["rtol"], f


# ---------------------------------------------------------------------------- errors
def test_wrong_channel_count():
    """in_channels is checked against the inputs, by the kernel and by build."""
    net = nk.Sequential(nk.Conv2d(4, 3, in_channels=3), nk.ReLU())
    x = _x(2, 2, 5, 6, seed=50)
    with pytest.raises(ValueError, match=r"expects 3 input channels but receives 2"):
        net.kernel(x)
    with pytest.raises(ValueError, match=r"expects 3 input channels but receives 2"):
        net.build(x.shape[1:])


def test_image_smaller_than_the_window():
    """'valid' (and too little padding) with a window wider than the image."""
    x = _x(2, 2, 5, 2, seed=51)
    for layer in (nk.Conv2d(4, 3), nk.Conv2d(4, 3, padding="valid"),
                  nk.Conv2d(4, (1, 2), dilation=2), nk.AvgPool2d(3)):
        with pytest.raises(ValueError, match=r"the window spans \d+ positions along spatial "
                                             r"axis 1 but the input has 2"):
            layer.kernel(x)
        with pytest.raises(ValueError, match=r"the window spans"):
            layer.build(x.shape[1:])
    # with padding it fits
    assert nk.Conv2d(4, 3, padding="same").kernel(x).shape == (4, 5, 2)
    with pytest.raises(ValueError, match=r"reflect padding 2 needs more than 2 positions"):
        nk.Conv2d(4, 3, padding=2, padding_mode="reflect").kernel(x)


def test_conv_given_the_wrong_number_of_axes():
    """Conv2d on (N, C, L) names the expected (N, C, H, W) and the 1-d layer; on dense
    (N, F) it says to reshape; Conv1d on images points to the 2-d layer."""
    with pytest.raises(ValueError, match=r"takes inputs of shape \(N, C, H, W\).*receives "
                                         r"per-example shape \(2, 9\).*1-d layer"):
        nk.Conv2d(4, 3).kernel(_x(2, 2, 9, seed=52))
    with pytest.raises(ValueError, match=r"receives dense features \(6,\).*reshape x to "
                                         r"\(N, C, H, W\)"):
        nk.Conv2d(4, 3).kernel(_x(2, 6, seed=53))
    with pytest.raises(ValueError, match=r"takes inputs of shape \(N, C, L\).*2-d layer"):
        nk.Sequential(nk.Conv1d(4, 3), nk.ReLU()).kernel(_x(2, 2, 5, 6, seed=54))
    with pytest.raises(ValueError, match=r"receives dense features"):
        nk.Conv2d(4, 3).build((6,))
    with pytest.raises(ValueError, match=r"takes inputs of shape \(N, C, D, H, W\)"):
        nk.AvgPool3d(2).kernel(_x(2, 2, 5, 6, seed=55))


def test_linear_on_spatial_features_needs_flatten():
    """A Linear after a conv (no Flatten) says to put nk.Flatten() before it; with it the
    network works."""
    x = _x(2, 2, 5, 6, seed=56)
    with pytest.raises(ValueError, match=r"takes dense features.*per-example shape "
                                         r"\(4, 3, 4\).*nk\.Flatten\(\)"):
        nk.Sequential(nk.Conv2d(4, 3), nk.ReLU(), nk.Linear(2)).kernel(x)
    with pytest.raises(ValueError, match=r"nk\.Flatten\(\)"):
        nk.Linear(2).build(x.shape[1:])
    ok = nk.Sequential(nk.Conv2d(4, 3), nk.ReLU(), nk.Flatten(), nk.Linear(2))
    assert ok.kernel(x).nngp.shape == (2, 2)


def test_global_pool_on_dense_features():
    """GlobalAvgPool / GlobalSumPool after dense features: they need spatial axes."""
    x = _x(3, 6, seed=57)
    for pool in (nk.GlobalAvgPool(), nk.GlobalSumPool()):
        with pytest.raises(ValueError, match=r"pools over spatial axes but receives dense "
                                             r"features"):
            nk.Sequential(nk.Linear(4), pool).kernel(x)
        with pytest.raises(ValueError, match=r"takes \(N, C, \*spatial\) inputs"):
            pool.build((6,))


def test_pool_without_position_pairs_is_refused():
    """Propagating a matching-positions kernel into pooling by hand is refused with a
    pointer to net.kernel / input_kernel(..., position_pairs=True)."""
    x = _x(2, 2, 5, 6, seed=58)
    for pool in (nk.AvgPool2d(2), nk.GlobalAvgPool()):
        with pytest.raises(ValueError, match=r"needs the kernel between every pair of "
                                             r"positions.*position_pairs=True"):
            pool.propagate(input_kernel(x, None))


@pytest.mark.parametrize("make,match", [
    (lambda: nk.Conv2d(4, 0), r"Conv2d: kernel_size must be an int >= 1 or a tuple of 2"),
    (lambda: nk.Conv2d(4, (3, 3, 3)), r"kernel_size must be an int >= 1 or a tuple of 2"),
    (lambda: nk.Conv1d(4, 2.5), r"Conv1d: kernel_size must be an int >= 1 or a tuple of 1"),
    (lambda: nk.Conv3d(4, (2, True, 2)), r"kernel_size must be an int >= 1 or a tuple of 3"),
    (lambda: nk.Conv2d(4, 3, stride=0), r"stride must be an int >= 1"),
    (lambda: nk.Conv2d(4, 3, dilation=(1,)), r"dilation must be an int >= 1 or a tuple of 2"),
    (lambda: nk.Conv2d(4, 3, padding=-1), r"padding must be an int >= 0 or a tuple of 2"),
    (lambda: nk.Conv2d(4, 3, padding="full"),
     r"padding must be 'valid', 'same', 'circular' or ints, got 'full'"),
    (lambda: nk.Conv2d(4, 3, padding="SAME"), r"padding must be 'valid', 'same', 'circular'"),
    (lambda: nk.Conv2d(4, 3, padding_mode="mirror"), r"padding_mode must be one of"),
    (lambda: nk.AvgPool2d(2, padding="circular"),
     r"AvgPool2d: padding must be 'valid', 'same' or ints, got 'circular'"),
    (lambda: nk.AvgPool2d(0), r"AvgPool2d: kernel_size must be an int >= 1"),
    (lambda: nk.SumPool1d(2, stride=(1, 1)),
     r"SumPool1d: stride must be an int >= 1 or a tuple of 1"),
    (lambda: nk.Conv2d(0, 3), r"out_features must be a positive int"),
    (lambda: nk.Conv2d(4, 3, parameterization="mup"),
     r"parameterization must be 'ntk' or 'standard'"),
])
def test_bad_constructor_arguments(make, match):
    """Bad kernel_size / stride / dilation / padding / padding_mode / width values are
    rejected at construction with the layer and argument named."""
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("budget, replayed", [(200_000, True), (2_000, False)],
                         ids=["replayed", "too-large-to-keep"])
def test_self_trace_tiles_equal_full_covariance_path(budget, replayed, monkeypatch):
    """Tiles that replay each example's own covariance from a SelfTrace (net.kernel, small
    budget, many tiles), and tiles that carry it themselves when the trace would not fit a
    quarter of the budget, equal one pass that carries the full per-example covariances
    (witness: propagate on input_kernel(..., position_pairs=True), no trace), for a network
    with pooling, a residual branch, attention and global pooling."""
    from ntkit.kernel import SelfTrace

    calls = []
    replay = SelfTrace.replay
    monkeypatch.setattr(SelfTrace, "replay", lambda self: calls.append(1) or replay(self))
    from conftest import rel_err
    from ntkit.layers.base import input_kernel

    net = nk.Sequential(
        nk.Conv2d(4, 3, padding="same", w_std=1.3, b_std=0.2), nk.ReLU(),
        nk.AvgPool2d(2, stride=1),
        nk.FanOut(2),
        nk.Parallel(nk.Sequential(nk.Conv2d(4, 2, padding="same"), nk.Erf(),
                                  nk.Conv2d(4, 1)), nk.Conv2d(4, 1)),
        nk.FanInSum(), nk.SelfAttention(4), nk.ReLU(), nk.SumPool2d(2), nk.Conv2d(4, 1),
        nk.GELU(), nk.GlobalAvgPool(), nk.Linear(1),
    )
    x1, x2 = _x(5, 2, 5, 4, seed=71), _x(3, 2, 5, 4, seed=72)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in ((x1, x2), (x1, None)):
            tiled = net.kernel(a, b, memory_budget=budget)
            whole = net._forward(input_kernel(a, b, position_pairs=True))
            for field in ("nngp", "ntk"):
                got, want = getattr(tiled, field), getattr(whole, field)
                assert rel_err(got, want) <= 1e-12, field
    assert bool(calls) == replayed


@pytest.mark.parametrize("pairs_after", [True, False], ids=["gap-readout", "flatten-readout"])
def test_conv_after_pooling_the_raw_inputs(pairs_after):
    """A first convolution works from the inputs' patches; after a pooling of the raw inputs
    it must use the pooled kernel instead (witness: the same network on inputs pooled by
    torch beforehand)."""
    x = _x(3, 2, 6, 6, seed=81)
    readout = [nk.GlobalAvgPool()] if pairs_after else [nk.Flatten()]
    net = nk.Sequential(nk.AvgPool2d(2), nk.Conv2d(4, 3, padding="same"), nk.ReLU(),
                        *readout, nk.Linear(1))
    twin = nk.Sequential(nk.Conv2d(4, 3, padding="same"), nk.ReLU(), *readout, nk.Linear(1))
    pooled = F.avg_pool2d(x, 2)
    for a, b in ((x, None), (x, _x(2, 2, 6, 6, seed=82))):
        k = net.kernel(a, b)
        w = twin.kernel(F.avg_pool2d(a, 2) if a is not x else pooled,
                        None if b is None else F.avg_pool2d(b, 2))
        for field in ("nngp", "ntk"):
            got, want = getattr(k, field), getattr(w, field)
            assert (got - want).abs().max() <= 1e-12 * want.abs().max(), field

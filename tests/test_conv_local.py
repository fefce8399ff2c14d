"""Locally connected (unshared) convolutions: neural-tangents' ConvLocal (Novak et al. 2019).

Witnesses, besides the Monte Carlo of the finite twin in the layer contract battery
(tests/layers/test_contract.py, readout through Flatten):

* the formula, written plainly: for one layer on the inputs, at output position p,
  ``nngp[i, j, p] = w_std^2 / (C * taps) * sum_{c, d} x_i[c, s p + d] x_j[c, s p + d] + b_std^2``
  (windows cut by F.pad + Tensor.unfold), zero between different positions;
* the known identity: the diagonal of a shared convolution's kernel depends only on the
  diagonal of its input kernel, and Flatten reads only the diagonal, so for
  Conv -> ReLU -> Conv -> ReLU -> Flatten -> Linear the NNGP and NTK are the same with
  every Conv replaced by its LocallyConnected twin. With GlobalAvgPool as the readout
  (which reads position pairs) they differ: the unshared kernel is zero off the diagonal;
* Monte Carlo with GlobalAvgPool after the layer, which checks the off-diagonal zeros
  (separate weights and biases per position) against the twin.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import ntkit as nk
import ntkit.layers as L
from ntkit.layers import input_kernel
from ntkit.monte_carlo import monte_carlo_kernel
from ntkit.spec import parse_architecture, to_spec

LOCAL = {1: L.LocallyConnected1d, 2: L.LocallyConnected2d, 3: L.LocallyConnected3d}
SHARED = {1: L.Conv1d, 2: L.Conv2d, 3: L.Conv3d}
SHAPES = {1: (3, 7), 2: (2, 5, 4), 3: (2, 3, 4, 3)}


def _x(n, shape, seed):
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("position_pairs", [False, True])
@pytest.mark.parametrize("padding", [0, 1, "same", "valid"])
def test_one_layer_matches_the_formula(padding, position_pairs):
    x1, x2 = _x(3, (2, 5, 6), 0), _x(4, (2, 5, 6), 1)
    w_std, b_std, size, stride = 1.3, 0.4, (2, 3), (1, 2)
    layer = L.LocallyConnected2d(5, size, stride=stride, padding=padding, w_std=w_std,
                                 b_std=b_std)
    k = layer.propagate(input_kernel(x1, x2, position_pairs=position_pairs))
    # windows: pad as "same" (total // 2 before) or the ints, then unfold each axis
    if padding == "same":
        pads = []
        for n, kk, s in zip((5, 6), size, stride):
            total = max((-(-n // s) - 1) * s + kk - n, 0)
            pads.append((total // 2, total - total // 2))
    elif padding == "valid":
        pads = [(0, 0), (0, 0)]
    else:
        pads = [(padding, padding)] * 2

    def windows(x):
        x = F.pad(x, (*pads[1], *pads[0]))
        u = x.unfold(2, size[0], stride[0]).unfold(3, size[1], stride[1])  # N C H W kh kw
        return u.permute(0, 2, 3, 1, 4, 5).flatten(3)  # N H W (C*taps)

    u1, u2 = windows(x1), windows(x2)
    fan_in = u1.shape[-1]
    want = w_std ** 2 / fan_in * torch.einsum("ihwk,jhwk->ijhw", u1, u2) + b_std ** 2
    want_ntk = want  # on the inputs: the derivative in W and b gives the same sum
    if position_pairs:
        h, w = want.shape[2:]
        nngp = k.nngp.reshape(3, 4, h * w, h * w)
        off = nngp - torch.diag_embed(torch.diagonal(nngp, 0, 2, 3))
        assert torch.count_nonzero(off) == 0
        got = torch.diagonal(nngp, 0, 2, 3).reshape(3, 4, h, w)
        got_ntk = torch.diagonal(k.ntk.reshape(3, 4, h * w, h * w), 0, 2, 3).reshape(3, 4, h, w)
    else:
        got, got_ntk = k.nngp, k.ntk
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_ntk, want_ntk, rtol=1e-12, atol=1e-12)


def _net(layer_cls, ndim, readout, parameterization, **kw):
    conv = lambda: layer_cls(6, 2, parameterization=parameterization, w_std=1.4, b_std=0.3,
                             **kw)
    return nk.Sequential(conv(), nk.ReLU(), conv(), nk.ReLU(), readout(),
                         nk.Linear(3, w_std=1.1, b_std=0.2, parameterization=parameterization))


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("padding", ["same", "valid", 1])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_flatten_readout_equals_the_shared_convolution(ndim, padding, parameterization):
    x1, x2 = _x(3, SHAPES[ndim], 2), _x(2, SHAPES[ndim], 3)
    stride = 2 if ndim == 1 else 1
    kw = {"padding": padding, "stride": stride}
    local = _net(LOCAL[ndim], ndim, nk.Flatten, parameterization, **kw)
    shared = _net(SHARED[ndim], ndim, nk.Flatten, parameterization, **kw)
    for a, b in [(local.kernel(x1, x2), shared.kernel(x1, x2)),
                 (local.kernel(x1), shared.kernel(x1)),
                 (local.kernel(x1, diagonal=True), shared.kernel(x1, diagonal=True))]:
        torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ndim", [1, 2])
def test_global_avg_pool_readout_differs_from_the_shared_convolution(ndim):
    x1 = _x(3, SHAPES[ndim], 4)
    local = _net(LOCAL[ndim], ndim, nk.GlobalAvgPool, "ntk", padding="same")
    shared = _net(SHARED[ndim], ndim, nk.GlobalAvgPool, "ntk", padding="same")
    a, b = local.kernel(x1), shared.kernel(x1)
    assert not torch.allclose(a.nngp, b.nngp, rtol=1e-3)
    assert not torch.allclose(a.ntk, b.ntk, rtol=1e-3)
    # Without a ReLU between, GlobalAvgPool of the unshared layer's output reads only its
    # diagonal: w^2 * sum_p K[p, p] / P^2 + b^2, against Flatten's w^2 * sum_p K[p, p] / P + b^2
    conv = lambda: L.LocallyConnected1d(6, 2, padding="same", w_std=1.4, b_std=0.3)
    head = lambda: nk.Linear(3, w_std=1.1, b_std=0.2)
    gap = nk.Sequential(conv(), nk.ReLU(), conv(), nk.GlobalAvgPool(), head())
    flat = nk.Sequential(conv(), nk.ReLU(), conv(), nk.Flatten(), head())
    x = _x(3, SHAPES[1], 5)
    p = SHAPES[1][1]
    b2 = 0.2 ** 2
    torch.testing.assert_close(gap.kernel(x).nngp - b2, (flat.kernel(x).nngp - b2) / p,
                               rtol=1e-12, atol=1e-12)


def test_monte_carlo_with_global_avg_pool():
    """The twin (separate weights and biases per position) against the kernel, through a
    readout that reads position pairs, so the off-diagonal zeros are checked too."""
    x = _x(4, (2, 6), 5)
    net = nk.Sequential(nk.Conv1d(32, 3, padding="same", w_std=1.4, b_std=0.2), nk.ReLU(),
                        nk.LocallyConnected1d(32, 3, stride=2, padding=1, w_std=1.3, b_std=0.5),
                        nk.ReLU(), nk.GlobalAvgPool(), nk.Linear(16, w_std=1.2, b_std=0.1))
    k = net.kernel(x)
    mc = monte_carlo_kernel(net, x, n_samples=200, generator=torch.Generator().manual_seed(0))
    for name in ("nngp", "ntk"):
        a, m = getattr(k, name), getattr(mc, name)
        err = (m - a).abs().max() / a.abs().max()
        assert err < 0.06, (name, float(err))
    # shared weights give a clearly different kernel (the witness can tell them apart)
    shared = nk.Sequential(*[nk.Conv1d(32, 3, stride=2, padding=1, w_std=1.3, b_std=0.5)
                             if isinstance(layer, nk.LocallyConnected1d) else layer
                             for layer in net.layers])
    s = shared.kernel(x)
    assert (s.nngp - k.nngp).abs().max() / k.nngp.abs().max() > 0.15


def test_twin_shapes_and_parameters():
    net = nk.LocallyConnected2d(4, (2, 3), stride=(1, 2), padding="same", b_std=0.1)
    model = net.build((3, 5, 6), generator=torch.Generator().manual_seed(0))
    y = model(_x(2, (3, 5, 6), 0).float())
    assert y.shape == (2, 4, 5, 3)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 15 * 4 * 3 * 6 + 4 * 15  # weights and bias per output position
    assert net.kernel(_x(2, (3, 5, 6), 0)).shape == (4, 5, 3)
    assert not net.needs_position_pairs()


@pytest.mark.parametrize("text, cls", [
    ("convlocal1d(4, 3, stride=2, padding=same, w_std=1.5, b_std=0.1)", L.LocallyConnected1d),
    ("locallyconnected2d(4, 2, padding=valid)", L.LocallyConnected2d),
    ("ConvLocal3d(4, 2)", L.LocallyConnected3d),
])
def test_spec_names(text, cls):
    net = parse_architecture(text)
    layer = net.layers[0] if isinstance(net, L.Sequential) else net
    assert type(layer) is cls
    again = parse_architecture(to_spec(net))
    assert to_spec(again) == to_spec(net)

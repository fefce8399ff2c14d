"""ConvTranspose1d/2d/3d: the kernel against a formula written out here, against
Conv where the identity holds, against Monte Carlo of the finite twin, and the
torch conversion (the contract battery adds the generic checks)."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from torch import nn

import ntkit
from ntkit.layers import input_kernel
from ntkit.layers.activations import ReLU
from ntkit.layers.containers import Sequential
from ntkit.layers.conv import Conv1d, Conv2d
from ntkit.layers.conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from ntkit.layers.linear import Flatten, Linear
from ntkit.monte_carlo import monte_carlo_kernel


def _x(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("k,s,p,op,d", [(3, 1, 0, 0, 1), (3, 2, 1, 1, 1), (2, 3, 0, 2, 1),
                                        (2, 2, 1, 0, 2), (4, 2, 2, 1, 1)])
def test_kernel_equals_the_formula_written_out(k, s, p, op, d):
    # K'(o, o') = w^2 / k * sum_t K(i, i') over taps t with o = s i - p + d t, o' = s i' - p + d t,
    # plus b^2; the input kernel is x . x' / C.
    x1, x2 = _x(3, 2, 5), _x(2, 2, 5, seed=1)
    w, b = 1.3, 0.4
    layer = ConvTranspose1d(4, k, stride=s, padding=p, output_padding=op, dilation=d,
                            w_std=w, b_std=b)
    out = layer.propagate(input_kernel(x1, x2, position_pairs=True))
    n = 5
    m = (n - 1) * s - 2 * p + d * (k - 1) + op + 1
    assert out.shape == (4, m)
    kin = torch.einsum("acp,bcq->abpq", x1, x2) / 2
    want = torch.full((3, 2, m, m), b * b, dtype=torch.float64)
    for t in range(k):
        for i in range(n):
            for j in range(n):
                o, o2 = s * i - p + d * t, s * j - p + d * t
                if 0 <= o < m and 0 <= o2 < m:
                    want[:, :, o, o2] += w * w / k * kin[:, :, i, j]
    torch.testing.assert_close(out.nngp, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.ntk, want, rtol=1e-12, atol=1e-12)
    # the torch module has that output size
    y = nn.ConvTranspose1d(2, 4, k, s, p, op, dilation=d).double()(x1)
    assert y.shape[-1] == m


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("k,p,d", [(3, 0, 1), (3, 1, 1), (2, 1, 2), (3, 2, 1)])
def test_stride_one_equals_conv_with_complementary_padding(parameterization, k, p, d):
    # With stride 1 a transposed conv is a conv with the flipped kernel and padding
    # d (k - 1) - p; weights are i.i.d., so the kernels are equal.
    x = _x(4, 3, 6, 5)
    kw = {"w_std": 1.2, "b_std": 0.3, "parameterization": parameterization}

    def net(layer):
        return Sequential(Conv2d(5, 3, padding="same", **kw), ReLU(), layer, ReLU(), Flatten(),
                          Linear(2, **kw))

    a = net(ConvTranspose2d(6, k, padding=p, dilation=d, **kw)).kernel(x)
    c = net(Conv2d(6, k, padding=d * (k - 1) - p, dilation=d, **kw)).kernel(x)
    torch.testing.assert_close(a.nngp, c.nngp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.ntk, c.ntk, rtol=1e-10, atol=1e-12)


def test_matching_positions_output():
    # A network ending in the transposed conv returns its kernel at matching positions.
    x = _x(3, 2, 4)
    net = Sequential(Conv1d(3, 2, w_std=1.1), ConvTranspose1d(2, 3, stride=2, b_std=0.2))
    k = net.kernel(x)
    pairs = ConvTranspose1d(2, 3, stride=2, b_std=0.2).propagate(
        Conv1d(3, 2, w_std=1.1).propagate(input_kernel(x, None, position_pairs=True)))
    assert k.nngp.shape == (3, 3, 7)
    torch.testing.assert_close(k.nngp, torch.diagonal(pairs.nngp, 0, 2, 3), rtol=1e-12, atol=0)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_monte_carlo_of_the_finite_twin(parameterization):
    x = _x(3, 2, 4)
    net = Sequential(ConvTranspose1d(64, 3, stride=2, padding=1, output_padding=1, w_std=1.4,
                                     b_std=0.3, parameterization=parameterization),
                     ReLU(), Flatten(), Linear(16, w_std=1.1, b_std=0.1,
                                               parameterization=parameterization))
    exact = net.kernel(x)
    mc = monte_carlo_kernel(net, x, n_samples=60, generator=torch.Generator().manual_seed(0))
    for a, b in ((mc.nngp, exact.nngp), (mc.ntk, exact.ntk)):
        assert ((a - b).norm() / b.norm()).item() < 0.08


def test_3d_shapes_and_twin():
    x = _x(2, 2, 2, 3, 2)
    layer = ConvTranspose3d(3, 2, stride=(1, 2, 1), padding=(0, 1, 0), b_std=0.1)
    k = Sequential(layer, Flatten(), Linear(1)).kernel(x)
    assert k.nngp.shape == (2, 2)
    y = layer.build((2, 2, 3, 2), dtype=torch.float64)(x)
    assert y.shape == (2, 3, 3, 4, 3)  # (n - 1) s - 2 p + k


def test_from_torch():
    model = nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1),
                          nn.ReLU(), nn.ConvTranspose2d(6, 2, 2, bias=False))
    net = ntkit.from_torch(model)
    a, _, c = net.layers
    assert type(a) is ConvTranspose2d and type(c) is ConvTranspose2d
    assert (a.stride, a.padding, a.output_padding, a.in_channels) == ((2, 2), (1, 1), (1, 1), 3)
    assert c.b_std is None
    # torch's default weight variance 1 / (3 out taps) = w_std^2 / (in taps)
    assert math.isclose(a.w_std ** 2 / (3 * 9), 1 / (3 * 6 * 9))
    assert math.isclose(a.b_std, 1 / math.sqrt(3 * 6 * 9))
    x = _x(2, 3, 4, 4)
    assert net.kernel(x).nngp.shape == (2, 2, 9, 9)
    with pytest.raises(Exception, match="groups"):
        ntkit.from_torch(nn.Sequential(nn.ConvTranspose2d(2, 2, 3, groups=2)))


def test_validation():
    with pytest.raises(ValueError, match="output_padding"):
        ConvTranspose1d(2, 3, stride=2, output_padding=2)
    # matching positions need only matching positions (the same tap on both sides):
    # without position pairs the rule gives the position diagonal of the pair rule
    x = _x(3, 2, 4)
    for layer in (ConvTranspose1d(2, 3, stride=2, padding=1, b_std=0.3), ConvTranspose1d(
            2, 2, stride=3, padding="same", parameterization="standard")):
        plain = layer.propagate(input_kernel(x, None))
        pairs = layer.propagate(input_kernel(x, None, position_pairs=True))
        for name in ("nngp", "ntk", "cov1"):
            want = pairs.to_position_diagonal()
            torch.testing.assert_close(getattr(plain, name), getattr(want, name),
                                       rtol=1e-12, atol=1e-12)


_NT = json.loads((pathlib.Path(__file__).parent / "data" / "conv_transpose_nt.json").read_text())


@pytest.mark.parametrize("case", _NT["cases"], ids=lambda c: "{padding}-{kernel_size}-{stride}-"
                         "{parameterization}".format(**c))
def test_parity_with_neural_tangents(case):
    # References from neural-tangents 0.6.5 (tests/data/gen_conv_transpose_nt.py).
    x = torch.tensor(_NT["x"], dtype=torch.float64)
    kw = {"parameterization": case["parameterization"]}
    net = Sequential(Conv2d(4, 2, padding="same", w_std=1.3, b_std=0.2, **kw), ReLU(),
                     ConvTranspose2d(5, tuple(case["kernel_size"]), stride=tuple(case["stride"]),
                                     padding=case["padding"], w_std=1.4, b_std=0.3, **kw),
                     ReLU(), Flatten(), Linear(1, w_std=1.1, b_std=0.1, **kw))
    k = net.kernel(x)
    for got, want in ((k.nngp, case["nngp"]), (k.ntk, case["ntk"])):
        want = torch.tensor(want, dtype=torch.float64)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_string_padding_twin_shape_and_monte_carlo(padding):
    # torch has no "valid"/"same" for transposed convolutions: the twin crops or extends.
    x = _x(3, 2, 4)
    layer = ConvTranspose1d(64, 2, stride=3, padding=padding, w_std=1.3, b_std=0.4)
    assert layer.build((2, 4), dtype=torch.float64)(x).shape == (3, 64, 12)
    net = Sequential(layer, ReLU(), Flatten(), Linear(16))
    exact = net.kernel(x)
    mc = monte_carlo_kernel(net, x, n_samples=60, generator=torch.Generator().manual_seed(1))
    for a, b in ((mc.nngp, exact.nngp), (mc.ntk, exact.ntk)):
        assert ((a - b).norm() / b.norm()).item() < 0.08

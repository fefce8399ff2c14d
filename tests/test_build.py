"""`net.build`: the finite-width twin as a torch.nn.Module.

Shapes through every container, reproducibility from the generator, dtype and device,
the parameterizations' storage conventions, biases, Dropout masks, and a quick witness
that the built networks' output covariance is the NNGP.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ntkit as nk
from ntkit.layers.linear import NTKLinear


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(n: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=_gen(seed))


def _linears(module: nn.Module) -> list[NTKLinear]:
    return [m for m in module.modules() if isinstance(m, NTKLinear)]


ARCHS = {
    "mlp": (lambda: nk.Sequential(nk.Linear(32, b_std=0.1), nk.ReLU(), nk.Linear(3)),
            (6,), 3),
    "repeat": (lambda: nk.Sequential(
        nk.Linear(16), nk.Repeat(nk.Sequential(nk.Erf(), nk.Linear(16)), 3), nk.Linear(2)),
        (5,), 2),
    "residual-sum": (lambda: nk.Sequential(
        nk.Linear(12), nk.FanOut(2),
        nk.Parallel(nk.Sequential(nk.ReLU(), nk.Linear(12)), nk.Identity()), nk.FanInSum(),
        nk.Linear(4)), (7,), 4),
    "concat": (lambda: nk.Sequential(
        nk.Linear(10), nk.FanOut(3),
        nk.Parallel(nk.Linear(3), nk.Sequential(nk.GELU(), nk.Linear(5)), nk.Identity()),
        nk.FanInConcat()), (4,), 3 + 5 + 10),
    "prod": (lambda: nk.Sequential(
        nk.Linear(10), nk.FanOut(2), nk.Parallel(nk.Linear(6), nk.Linear(6)), nk.FanInProd(),
        nk.Sin(), nk.Linear(1)), (4,), 1),
    "dropout-layernorm": (lambda: nk.Sequential(
        nk.Linear(20), nk.LayerNorm(), nk.ReLU(), nk.Dropout(0.5), nk.Linear(2)), (3,), 2),
    "flatten": (lambda: nk.Sequential(nk.Flatten(), nk.Linear(8), nk.Abs(), nk.Linear(1)),
                (3, 4), 1),
    "elementwise": (lambda: nk.Sequential(
        nk.Linear(8), nk.Elementwise(torch.tanh, degree=5), nk.Linear(2, b_std=None)), (4,), 2),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_output_shape(name):
    """The built module maps (N, *input_shape) to (N, readout width) through every container."""
    make, in_shape, out = ARCHS[name]
    model = make().build(in_shape, generator=_gen(0))
    assert isinstance(model, nn.Module)
    y = model(_x(5, *in_shape))
    assert y.shape == (5, out)
    assert torch.isfinite(y).all()


def test_input_shape_as_int_and_tuple():
    """build(6) and build((6,)) are the same thing."""
    net = ARCHS["mlp"][0]()
    a, b = net.build(6, generator=_gen(1)), net.build((6,), generator=_gen(1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_repeat_draws_independent_parameters():
    """Repeat(layer, 3) builds three Linears with different weights (not one shared module)."""
    model = ARCHS["repeat"][0]().build((5,), generator=_gen(0))
    lins = _linears(model)
    assert len(lins) == 5
    inner = lins[1:4]
    assert len({id(m) for m in inner}) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(inner[i].weight, inner[j].weight)


def test_parallel_branches_have_own_parameters():
    """Parallel(Linear(6), Linear(6)) builds two independent Linears."""
    model = ARCHS["prod"][0]().build((4,), generator=_gen(0))
    a, b = _linears(model)[1:3]
    assert a is not b and not torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("name", list(ARCHS))
def test_same_seed_same_network(name):
    """The same generator seed gives identical parameters and identical outputs."""
    make, in_shape, _ = ARCHS[name]
    net, x = make(), _x(4, *in_shape)
    a, b = net.build(in_shape, generator=_gen(7)), net.build(in_shape, generator=_gen(7))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 0
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ARCHS))
def test_different_seeds_differ(name):
    make, in_shape, _ = ARCHS[name]
    net, x = make(), _x(4, *in_shape)
    a, b = net.build(in_shape, generator=_gen(1)), net.build(in_shape, generator=_gen(2))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.allclose(a(x), b(x))


def test_build_without_generator_uses_global_rng():
    """generator=None draws from torch's global RNG: reproducible under torch.manual_seed."""
    net = ARCHS["mlp"][0]()
    torch.manual_seed(3)
    a = net.build(6)
    torch.manual_seed(3)
    b = net.build(6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dtype_respected(dtype):
    """dtype= sets every parameter's dtype, and the module runs on inputs of that dtype."""
    model = ARCHS["residual-sum"][0]().build((7,), generator=_gen(0), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model(_x(3, 7).to(dtype)).dtype == dtype


def test_default_dtype_is_torch_default():
    model = ARCHS["mlp"][0]().build(6, generator=_gen(0))
    assert {p.dtype for p in model.parameters()} == {torch.get_default_dtype()}


def test_device_respected():
    """device= places the parameters (drawn on the generator's CPU, then moved): 'meta' here,
    since the machine has no GPU; the draws are the same as on CPU."""
    net = ARCHS["mlp"][0]()
    model = net.build(6, generator=_gen(0), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    cpu = net.build(6, generator=_gen(0), device=torch.device("cpu"))
    assert {p.device.type for p in cpu.parameters()} == {"cpu"}


# ---------------------------------------------------------------- parameterizations
FAN_IN, WIDTH = 400, 1000


def _rel_std_error(n: int) -> float:
    """Relative standard error of a sample standard deviation from n normal draws."""
    return 1 / math.sqrt(2 * (n - 1))


def test_ntk_parameterization_stores_standard_normal():
    """NTK parameterization stores W, b ~ N(0, 1) and scales them in forward:
    y = (w_std / sqrt(fan_in)) W x + b_std b."""
    w_std, b_std = 1.7, 0.6
    lin = nk.Linear(WIDTH, w_std=w_std, b_std=b_std).build(FAN_IN, generator=_gen(0),
                                                          dtype=torch.float64)
    assert lin.weight.shape == (WIDTH, FAN_IN) and lin.bias.shape == (WIDTH,)
    w_sd = float(lin.weight.std())
    assert abs(w_sd - 1) < 5 * _rel_std_error(WIDTH * FAN_IN) + 1e-3
    assert abs(float(lin.weight.mean())) < 0.01
    assert abs(float(lin.bias.std()) - 1) < 0.1  # 1000 draws: 5 standard errors
    x = _x(3, FAN_IN).double()
    expected = x @ (lin.weight * (w_std / math.sqrt(FAN_IN))).T + b_std * lin.bias
    torch.testing.assert_close(lin(x), expected)


def test_standard_parameterization_stores_variance():
    """Standard parameterization stores W ~ N(0, w_std^2 / fan_in), b ~ N(0, b_std^2) and
    applies them as they are: y = W x + b (like nn.Linear)."""
    w_std, b_std = 1.7, 0.6
    lin = nk.Linear(WIDTH, w_std=w_std, b_std=b_std, parameterization="standard").build(
        FAN_IN, generator=_gen(0), dtype=torch.float64)
    target = w_std / math.sqrt(FAN_IN)
    assert abs(float(lin.weight.std()) / target - 1) < 0.01
    assert abs(float(lin.bias.std()) / b_std - 1) < 0.1
    x = _x(3, FAN_IN).double()
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_parameterizations_draw_same_function():
    """With the same seed, NTK and standard parameterization build the same function
    (the same N(0,1) draws, scaled at a different place)."""
    x = _x(4, 6).double()
    nets = [nk.Sequential(nk.Linear(9, w_std=1.3, b_std=0.4, parameterization=p), nk.ReLU(),
                          nk.Linear(2, w_std=0.8, b_std=0.2, parameterization=p))
            for p in ("ntk", "standard")]
    a, b = (n.build(6, generator=_gen(5), dtype=torch.float64) for n in nets)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_no_bias_when_b_std_none(parameterization):
    """b_std=None builds no bias parameter; b_std=0 builds one that contributes nothing."""
    none = nk.Linear(5, b_std=None, parameterization=parameterization).build(3, generator=_gen(0))
    zero = nk.Linear(5, b_std=0.0, parameterization=parameterization).build(3, generator=_gen(0))
    assert none.bias is None and [n for n, _ in none.named_parameters()] == ["weight"]
    assert zero.bias is not None
    x = _x(2, 3)
    torch.testing.assert_close(zero(x), x @ (zero.weight * zero.w_scale).T)
    assert torch.equal(none(x), none(x))


# ---------------------------------------------------------------------- dropout
def _dropout_net(mode: str = "train") -> nk.Sequential:
    return nk.Sequential(nk.Linear(64), nk.ReLU(), nk.Dropout(0.5, mode=mode), nk.Linear(3))


def test_dropout_masks_come_from_generator():
    """The built Dropout draws its masks from the build generator: two builds from the same
    seed give the same outputs over successive forward passes, and successive passes of one
    module use fresh masks."""
    x = _x(5, 4)
    a = _dropout_net().build(4, generator=_gen(11))
    b = _dropout_net().build(4, generator=_gen(11))
    ya1, ya2 = a(x), a(x)
    yb1, yb2 = b(x), b(x)
    assert torch.equal(ya1, yb1) and torch.equal(ya2, yb2)
    assert not torch.equal(ya1, ya2)
    torch.manual_seed(0)
    yc = _dropout_net().build(4, generator=_gen(11))(x)
    torch.manual_seed(1)
    yd = _dropout_net().build(4, generator=_gen(11))(x)
    assert torch.equal(yc, yd), "masks must not depend on the global RNG"


def test_dropout_module_zeroes_and_rescales():
    """In train mode about p of the features are zeroed and the rest scaled by 1/(1-p)."""
    model = nk.Sequential(nk.Linear(4000, b_std=1.0), nk.Dropout(0.25)).build(
        2, generator=_gen(0), dtype=torch.float64)
    h = model[0](torch.ones(1, 2, dtype=torch.float64))
    y = model(torch.ones(1, 2, dtype=torch.float64))
    kept = y != 0
    assert abs(float(kept.double().mean()) - 0.75) < 0.03
    torch.testing.assert_close(y[kept], h[kept] / 0.75)


def test_dropout_eval_mode_is_identity():
    """mode='eval' builds a module in eval mode: deterministic, no masks."""
    model = _dropout_net("eval").build(4, generator=_gen(0))
    dropout = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropout) == 1 and not dropout[0].training
    x = _x(5, 4)
    assert torch.equal(model(x), model(x))
    assert torch.equal(model(x), model[3](model[1](model[0](x))))


# ----------------------------------------------------- the NNGP as a forward witness
@pytest.mark.parametrize(
    "net",
    [
        nk.Sequential(nk.Linear(256, w_std=1.5, b_std=0.3), nk.ReLU(),
                      nk.Linear(64, w_std=1.2, b_std=0.1)),
        nk.Sequential(nk.Linear(256, w_std=1.2, b_std=0.2, parameterization="standard"),
                      nk.Erf(), nk.Linear(64, w_std=1.5, parameterization="standard")),
    ],
    ids=["relu-ntk", "erf-standard"],
)
def test_forward_covariance_matches_nngp(net):
    """Over many built networks, the mean of f(x_i) f(x_j) (averaged over the readout's 64
    outputs) matches the NNGP within 4 standard errors plus a 1/width finite-width margin."""
    x = _x(3, 5).double()
    nngp = net.kernel(x).nngp
    gen = _gen(0)
    samples = []
    with torch.no_grad():
        for _ in range(150):
            y = net.build(5, generator=gen, dtype=torch.float64)(x)
            samples.append(y @ y.T / y.shape[1])
    s = torch.stack(samples)
    mean, se = s.mean(0), s.std(0) / math.sqrt(len(samples))
    err = (mean - nngp).abs()
    assert bool((err <= 4 * se + nngp.abs() * (2 / 256)).all()), (
        f"mean\n{mean}\nnngp\n{nngp}\nse\n{se}")

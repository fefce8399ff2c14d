"""`from_torch`: the infinite-width twin of a torch.nn.Sequential.

The converted network must equal a hand-written ntkit twin with the documented
defaults (w_std = 1/sqrt(3), b_std = 1/sqrt(3 fan_in), standard parameterization), use
closed forms where they exist and quadrature (Elementwise) otherwise, and -- the Monte
Carlo witness at the end -- those defaults must be PyTorch's actual initialisation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ntkit as nk

W = 1 / math.sqrt(3)


def _b(fan_in: int) -> float:
    return 1 / math.sqrt(3 * fan_in)


def _lin(fan_in: int, out: int, bias: bool = True) -> nk.Linear:
    """The documented default twin of nn.Linear(fan_in, out, bias)."""
    return nk.Linear(out, w_std=W, b_std=_b(fan_in) if bias else None,
                     parameterization="standard", in_features=fan_in)


def _x(n: int, d: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=torch.float64, generator=g) * scale


def _assert_same_kernel(a: nk.Layer, b: nk.Layer, x1, x2=None, rtol=1e-12) -> None:
    ka, kb = a.kernel(x1, x2), b.kernel(x1, x2)
    for f in ("nngp", "ntk", "cov1", "cov2"):
        torch.testing.assert_close(getattr(ka, f), getattr(kb, f), rtol=rtol, atol=rtol * 1e-3,
                                   msg=lambda m, f=f: f"field {f}: {m}")


CASES = {
    "relu-leaky": (
        lambda: nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16),
                              nn.LeakyReLU(0.1), nn.Linear(16, 1)),
        lambda: nk.Sequential(_lin(6, 32), nk.ReLU(), _lin(32, 16), nk.LeakyReLU(0.1),
                              _lin(16, 1)),
    ),
    "gelu-exact-no-bias": (
        lambda: nn.Sequential(nn.Linear(6, 20, bias=False), nn.GELU(), nn.Linear(20, 3)),
        lambda: nk.Sequential(_lin(6, 20, bias=False), nk.GELU(), _lin(20, 3)),
    ),
    "tanh-silu-gelu_tanh": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.SiLU(),
                              nn.Linear(8, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 1)),
        lambda: nk.Sequential(
            _lin(6, 8), nk.Elementwise(torch.tanh), _lin(8, 8),
            nk.Elementwise(nn.functional.silu), _lin(8, 8),
            nk.Elementwise(lambda t: nn.functional.gelu(t, approximate="tanh")), _lin(8, 1)),
    ),
    "layernorm-identity-flatten": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 10), nn.LayerNorm(10, eps=1e-3,
                              elementwise_affine=False), nn.Identity(), nn.ReLU(),
                              nn.Linear(10, 2)),
        lambda: nk.Sequential(nk.Flatten(), _lin(6, 10), nk.LayerNorm(eps=1e-3), nk.Identity(),
                              nk.ReLU(), _lin(10, 2)),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_hand_written_twin(name):
    """from_torch(model).kernel == the hand-written twin's kernel (both x2=None and x2)."""
    model, twin = CASES[name][0](), CASES[name][1]()
    net = nk.from_torch(model)
    x1, x2 = _x(5, 6), _x(3, 6, seed=1)
    _assert_same_kernel(net, twin, x1)
    _assert_same_kernel(net, twin, x1, x2)


def test_converted_linear_attributes():
    """Each nn.Linear becomes a Linear with its widths and the documented default variances."""
    net = nk.from_torch(nn.Sequential(nn.Linear(7, 30), nn.ReLU(), nn.Linear(30, 2, bias=False)))
    a, b = net.layers[0], net.layers[2]
    assert (a.in_features, a.out_features, b.in_features, b.out_features) == (7, 30, 30, 2)
    assert a.parameterization == b.parameterization == "standard"
    assert a.w_std == pytest.approx(W) and b.w_std == pytest.approx(W)
    assert a.b_std == pytest.approx(1 / math.sqrt(21)) and b.b_std is None


@pytest.mark.parametrize(
    "module, kind",
    [
        (nn.ReLU(), nk.ReLU), (nn.LeakyReLU(0.3), nk.LeakyReLU), (nn.GELU(), nk.GELU),
        (nn.GELU(approximate="tanh"), nk.Elementwise), (nn.Tanh(), nk.Elementwise),
        (nn.SiLU(), nk.Elementwise), (nn.Sigmoid(), nk.Elementwise), (nn.ELU(), nk.Elementwise),
    ],
    ids=["ReLU", "LeakyReLU", "GELU", "GELU-tanh", "Tanh", "SiLU", "Sigmoid", "ELU"],
)
def test_activation_mapping(module, kind):
    """Closed forms for ReLU, LeakyReLU and exact GELU; quadrature (Elementwise) for the rest."""
    net = nk.from_torch(nn.Sequential(nn.Linear(3, 4), module, nn.Linear(4, 1)))
    assert type(net.layers[1]) is kind
    if isinstance(module, nn.LeakyReLU):
        assert net.layers[1].negative_slope == pytest.approx(0.3)


def test_degree_reaches_elementwise():
    net = nk.from_torch(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), degree=11)
    assert net.layers[1].degree == 11


def test_elementwise_twin_is_the_torch_module():
    """The quadrature twin of nn.Tanh at a high degree equals Elementwise(torch.tanh) at
    that degree: the module itself is the integrand."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    ref = nk.Sequential(_lin(6, 8), nk.Elementwise(torch.tanh, degree=120), _lin(8, 1))
    _assert_same_kernel(nk.from_torch(model, degree=120), ref, _x(4, 6), rtol=1e-12)


def test_default_quadrature_degree_accuracy_for_tanh():
    """Elementwise documents that degree 64 (from_torch's default) gives ~1e-8 relative
    error (2e-7 for the derivative term) for tanh at unit variance; the error grows with the
    variance. Checked against degree 120 (converged to ~1e-13) on inputs whose pre-activation
    variance is ~1, at 1e-5 (the derivative term reaches 3e-6 on the largest variances here)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x = _x(4, 6, scale=1.6)  # w_std^2 q + b^2 = (1/3)(2.56) + 1/18 ~ 0.9
    ref = nk.from_torch(model, degree=120)
    _assert_same_kernel(nk.from_torch(model), ref, x, rtol=1e-5)


def test_nested_sequential_flattened():
    """Nested nn.Sequential are flattened into one ntkit Sequential, in order."""
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 1)),
    )
    net = nk.from_torch(model)
    assert [type(layer).__name__ for layer in net.layers] == [
        "Linear", "ReLU", "Linear", "Elementwise", "Linear"]
    flat = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    _assert_same_kernel(net, nk.from_torch(flat), _x(4, 6))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dropout_follows_module_mode(train):
    """nn.Dropout maps to Dropout(p, mode) following module.train()/eval(); in eval mode the
    kernel equals the network without dropout, in train mode only self-pairs change."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    model.train(train)
    net = nk.from_torch(model)
    drop = net.layers[2]
    assert isinstance(drop, nk.Dropout) and drop.p == pytest.approx(0.3)
    assert drop.mode == ("train" if train else "eval")
    plain = nk.from_torch(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1)))
    x = _x(4, 6)
    k, k0 = net.kernel(x), plain.kernel(x)
    off = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(k.nngp[off], k0.nngp[off])
    if train:
        assert bool((k.nngp.diagonal() > k0.nngp.diagonal() * 1.01).all())
    else:
        torch.testing.assert_close(k.nngp, k0.nngp)


def test_layernorm_without_affine_mapped():
    """nn.LayerNorm(elementwise_affine=False) becomes nk.LayerNorm with the same eps."""
    net = nk.from_torch(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, eps=1e-3,
                                      elementwise_affine=False), nn.ReLU(), nn.Linear(8, 1)))
    assert isinstance(net.layers[1], nk.LayerNorm) and net.layers[1].eps == pytest.approx(1e-3)


def test_layernorm_with_affine_refused():
    """A learnable per-feature scale and shift is refused with what to use instead."""
    with pytest.raises(TypeError, match=r"learnable per-feature scale.*elementwise_affine=False"):
        nk.from_torch(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1)))


def test_explicit_variances_and_parameterization_override():
    """w_std, b_std and parameterization given to from_torch apply to every Linear; a
    bias-free nn.Linear stays bias-free."""
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5, bias=False), nn.Tanh(),
                          nn.Linear(5, 1))
    net = nk.from_torch(model, w_std=1.5, b_std=0.2, parameterization="ntk")
    act = nk.Elementwise(torch.tanh)
    twin = nk.Sequential(nk.Linear(12, 1.5, 0.2), nk.ReLU(), nk.Linear(5, 1.5, None), act,
                         nk.Linear(1, 1.5, 0.2))
    _assert_same_kernel(net, twin, _x(4, 6), _x(2, 6, seed=3))
    # and the override really changes the kernel
    default = nk.from_torch(model)
    assert not torch.allclose(default.kernel(_x(4, 6)).ntk, net.kernel(_x(4, 6)).ntk)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_only_parameterization_override(parameterization):
    """Overriding only the parameterization keeps PyTorch's default variances, so the NNGP
    is unchanged (both parameterizations share it) while the NTK scale differs."""
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 1))
    net = nk.from_torch(model, parameterization=parameterization)
    ref = nk.Sequential(nk.Linear(64, W, _b(6), parameterization=parameterization), nk.ReLU(),
                        nk.Linear(1, W, _b(64), parameterization=parameterization))
    _assert_same_kernel(net, ref, _x(3, 6))
    default = nk.from_torch(model).kernel(_x(3, 6))
    torch.testing.assert_close(net.kernel(_x(3, 6)).nngp, default.nngp)
    if parameterization == "ntk":  # standard's NTK carries fan_in factors; NTK's does not
        assert float(net.kernel(_x(3, 6)).ntk.max()) < float(default.ntk.max()) / 4


def test_uninitialised_lazy_linear():
    """An uninitialised nn.LazyLinear (in_features unknown) must be refused with a clear
    message (run a forward pass first), not crash with ZeroDivisionError."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises((TypeError, ValueError), match=r"(?i)lazy|forward|in_features"):
        nk.from_torch(model)


def test_initialised_lazy_linear():
    """After a forward pass a LazyLinear is an nn.Linear with known in_features."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 1))
    model(torch.zeros(1, 6))
    net = nk.from_torch(model)
    _assert_same_kernel(net, nk.Sequential(_lin(6, 8), nk.ReLU(), _lin(8, 1)), _x(3, 6))


# ------------------------------------------------------------- Monte Carlo witness
def test_default_variances_match_pytorch_init():
    """A wide torch model re-initialised many times with PyTorch's own default init
    (reset_parameters): the mean of f(x1) f(x2)^T matches from_torch(model).kernel(...).nngp
    within 4 standard errors (plus a 1/width margin). Small inputs make the bias
    variance 1/(3 fan_in) a large part of the kernel, so both defaults are witnessed."""
    width, n_nets = 2048, 3000
    model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 1)).double()
    x1, x2 = _x(3, 6, seed=0, scale=0.5), _x(2, 6, seed=1, scale=0.5)
    x = torch.cat([x1, x2])
    nngp = nk.from_torch(model).kernel(x).nngp
    torch.manual_seed(1234)
    prods = torch.empty(n_nets, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for s in range(n_nets):
            for m in model:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
            y = model(x)
            prods[s] = y @ y.T
    mean = prods.mean(0)
    se = prods.std(0) / math.sqrt(n_nets)
    err = (mean - nngp).abs()
    ok = err <= 4 * se + 2 / width * nngp.abs()
    assert bool(ok.all()), f"MC mean\n{mean}\nkernel\n{nngp}\nstandard error\n{se}"
    # the x1-x2 block of the cross kernel is the same estimate
    cross = nk.from_torch(model).kernel(x1, x2).nngp
    torch.testing.assert_close(cross, nngp[:3, 3:], rtol=1e-12, atol=1e-15)
    # the witness has power: dropping the bias variance is > 4 standard errors off
    no_bias = nk.from_torch(model, b_std=0.0).kernel(x).nngp
    assert bool(((mean - no_bias).abs() > 4 * se).diagonal().all())

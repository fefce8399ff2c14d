"""`from_torch`: the infinite-width twin of a PyTorch model.

The converted network must equal a hand-written ntkit twin with the documented
defaults (w_std = 1/sqrt(3), b_std = 1/sqrt(3 fan_in), standard parameterization), use
closed forms where they exist and quadrature (Elementwise) otherwise, and -- the Monte
Carlo witnesses -- those defaults must be PyTorch's actual initialisation. Convolutional
and residual models (traced with torch.fx) are checked the same way, plus an exact
witness of the convolution and pooling geometry: for a model linear in its parameters
the expected kernel is a finite sum over one-hot parameter settings of torch's own
forward pass.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

import ntkit as nk
from conftest import one_thread
from ntkit.convert import ConversionError

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
        (nn.GELU(approximate="tanh"), nk.GELU), (nn.Tanh(), nk.Elementwise),
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


def test_layernorm_with_affine_before_relu_refused():
    """A learnable per-feature scale converts (LayerNorm(affine=True)), but its NTK
    through a following ReLU has no layer-wise rule: the kernel is refused, naming it."""
    net = nk.from_torch(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(),
                                      nn.Linear(8, 1)))
    assert net.layers[1].affine and net.layers[1].bias
    with pytest.raises(ValueError, match=r"learnable scale \(affine=True\).*Linear"):
        net.kernel(torch.randn(3, 4))


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


# ====================================================== convolutional and residual models
def _conv(nd: int, cin: int, cout: int, k, bias: bool = True, **kw) -> nk.Layer:
    """The documented default twin of nn.Conv{nd}d(cin, cout, k, bias=bias, **kw)."""
    fan_in = cin * math.prod(k if isinstance(k, tuple) else (k,) * nd)
    cls = (nk.Conv1d, nk.Conv2d, nk.Conv3d)[nd - 1]
    return cls(cout, k, w_std=W, b_std=_b(fan_in) if bias else None,
               parameterization="standard", in_channels=cin, **kw)


def _img(n: int, *shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, dtype=torch.float64, generator=g)


class _ResBlock(nn.Module):
    """x -> conv-relu-conv, plus the identity (or a 1x1 conv when the shape changes), then
    relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _res_twin(cin: int, cout: int, stride: int = 1) -> nk.Layer:
    main = nk.Sequential(_conv(2, cin, cout, 3, stride=stride, padding=1), nk.ReLU(),
                         _conv(2, cout, cout, 3, padding=1))
    short = nk.Identity() if stride == 1 and cin == cout else _conv(2, cin, cout, 1,
                                                                     stride=stride)
    return nk.Sequential(nk.FanOut(2), nk.Parallel(main, short), nk.FanInSum(), nk.ReLU())


class _ResNet(nn.Module):
    """A conv stem (no activation, so the first identity block adds Gaussian branches), an
    identity block, a strided block with a 1x1 projection, a spatial mean and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_ResBlock(8, 8), _ResBlock(8, 12, stride=2))
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class _Nested(nn.Module):
    """A residual block inside a residual block, then an Inception-style concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.a, self.b, self.c = (nn.Conv2d(6, 6, 3, padding=1) for _ in range(3))
        self.d = nn.Conv2d(6, 4, 1)
        self.e = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.fc = nn.Linear(9 * 16, 1)

    def forward(self, x):
        h = self.stem(x)
        inner = h + self.b(F.relu(self.a(h)))
        out = F.relu(h + self.c(F.relu(inner)))
        z = torch.cat([self.d(out), self.e(out)], dim=1)
        return self.fc(torch.flatten(F.relu(z), 1))


def _nested_twin() -> nk.Layer:
    inner = nk.Sequential(nk.FanOut(2), nk.Parallel(
        nk.Identity(), nk.Sequential(_conv(2, 6, 6, 3, padding=1), nk.ReLU(),
                                     _conv(2, 6, 6, 3, padding=1))), nk.FanInSum())
    outer = nk.Sequential(nk.FanOut(2), nk.Parallel(
        nk.Identity(), nk.Sequential(inner, nk.ReLU(), _conv(2, 6, 6, 3, padding=1))),
        nk.FanInSum(), nk.ReLU())
    cat = nk.Sequential(nk.FanOut(2), nk.Parallel(
        _conv(2, 6, 4, 1), _conv(2, 6, 5, 3, bias=False, padding=1)), nk.FanInConcat())
    return nk.Sequential(_conv(2, 2, 6, 3, padding=1), outer, cat, nk.ReLU(), nk.Flatten(),
                         _lin(9 * 16, 1))


class _Functional(nn.Module):
    """Functional forms: torch.add, torch.relu, F.leaky_relu, F.avg_pool2d, x.tanh(),
    F.adaptive_avg_pool2d + x.flatten(1), x.mean((-2, -1)), torch.cat of dense features,
    F.dropout (eval), F.gelu, x.view(x.size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv4 = nn.Conv2d(8, 6, 1)
        self.conv5 = nn.Conv2d(8, 4, 3)
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        h = self.conv1(x)
        h = torch.add(h, self.conv2(torch.relu(h)))
        h = F.avg_pool2d(F.leaky_relu(h, 0.2), 2)
        h = self.conv3(h).tanh()
        a = F.adaptive_avg_pool2d(self.conv4(h), 1).flatten(1)
        b = self.conv5(h).mean((-2, -1))
        h = F.gelu(self.fc1(F.dropout(torch.cat([a, b], dim=1), 0.1, training=False)))
        return self.fc2(h.view(h.size(0), -1))


def _functional_twin() -> nk.Layer:
    return nk.Sequential(
        _conv(2, 3, 8, 3, padding=1), nk.FanOut(2),
        nk.Parallel(nk.Identity(), nk.Sequential(nk.ReLU(), _conv(2, 8, 8, 3, padding=1))),
        nk.FanInSum(), nk.LeakyReLU(0.2), nk.AvgPool2d(2),
        _conv(2, 8, 8, 3, bias=False, padding=1), nk.Elementwise(torch.tanh), nk.FanOut(2),
        nk.Parallel(nk.Sequential(_conv(2, 8, 6, 1), nk.GlobalAvgPool(), nk.Flatten()),
                    nk.Sequential(_conv(2, 8, 4, 3), nk.GlobalAvgPool())),
        nk.FanInConcat(), nk.Dropout(0.1, mode="eval"), _lin(10, 16), nk.GELU(),
        nk.Flatten(), _lin(16, 2))


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class _BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, verbatim but for BatchNorm (norm_layer=Identity):
    in-place ReLU module used twice, out += identity, optional downsample."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.Identity()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class _TinyResNet(nn.Module):
    """torchvision-style: BasicBlocks in nn.Sequential stages, AdaptiveAvgPool2d((1, 1)),
    torch.flatten, fc. The stem has no ReLU so that every residual sum adds Gaussian
    branches (see test_post_activation_identity_blocks for the stem with a ReLU)."""

    def __init__(self, stem_relu: bool = False, blocks: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        self.layer1 = nn.Sequential(*(_BasicBlock(8, 8) for _ in range(blocks)))
        down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.Identity())
        self.layer2 = nn.Sequential(_BasicBlock(8, 16, 2, down))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _tiny_resnet_twin(stem_relu: bool = False, blocks: int = 1) -> nk.Layer:
    def block(cin, cout, stride):
        main = nk.Sequential(_conv(2, cin, cout, 3, False, stride=stride, padding=1),
                             nk.Identity(), nk.ReLU(), _conv(2, cout, cout, 3, False, padding=1),
                             nk.Identity())
        short = nk.Identity() if stride == 1 else nk.Sequential(
            _conv(2, cin, cout, 1, False, stride=stride), nk.Identity())
        return [nk.FanOut(2), nk.Parallel(main, short), nk.FanInSum(), nk.ReLU()]

    layers = [_conv(2, 3, 8, 3, False, padding=1), nk.ReLU() if stem_relu else nk.Identity()]
    for _ in range(blocks):
        layers += block(8, 8, 1)
    layers += block(8, 16, 2) + [nk.GlobalAvgPool(), nk.Flatten(), _lin(16, 3)]
    return nk.Sequential(*layers)


CNN_CASES = {
    "cnn-pool-2d": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                              nn.Conv2d(8, 6, 3, padding="same", padding_mode="circular"),
                              nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)),
        lambda: nk.Sequential(_conv(2, 3, 8, 3, padding=1), nk.ReLU(), nk.AvgPool2d(2),
                              _conv(2, 8, 6, 3, padding="same", padding_mode="circular"),
                              nk.GELU(), nk.GlobalAvgPool(), nk.Flatten(), _lin(6, 2)),
        (3, 6, 6),
    ),
    "conv1d-strided-reflect-dilated": (
        lambda: nn.Sequential(nn.Conv1d(2, 6, 5, stride=2, padding=2, padding_mode="reflect",
                                        bias=False), nn.Tanh(),
                              nn.Conv1d(6, 4, 3, dilation=2), nn.Flatten(), nn.Linear(8, 1)),
        lambda: nk.Sequential(_conv(1, 2, 6, 5, False, stride=2, padding=2,
                                    padding_mode="reflect"), nk.Elementwise(torch.tanh),
                              _conv(1, 6, 4, 3, dilation=2), nk.Flatten(), _lin(8, 1)),
        (2, 12),
    ),
    "conv3d-same-avgpool-replicate": (
        lambda: nn.Sequential(nn.Conv3d(2, 4, 2, padding="same"), nn.ReLU(),
                              nn.AvgPool3d(2, stride=1, padding=1, count_include_pad=False),
                              nn.Conv3d(4, 3, 3, padding=1, padding_mode="replicate"),
                              nn.AdaptiveAvgPool3d((1, 1, 1)), nn.Flatten(), nn.Linear(3, 1)),
        lambda: nk.Sequential(_conv(3, 2, 4, 2, padding="same"), nk.ReLU(),
                              nk.AvgPool3d(2, 1, 1, count_include_pad=False),
                              _conv(3, 4, 3, 3, padding=1, padding_mode="replicate"),
                              nk.GlobalAvgPool(), nk.Flatten(), _lin(3, 1)),
        (2, 3, 4, 3),
    ),
    "resnet-identity-and-projection": (_ResNet, lambda: nk.Sequential(
        _conv(2, 3, 8, 3, padding=1), _res_twin(8, 8), _res_twin(8, 12, stride=2),
        nk.GlobalAvgPool(), _lin(12, 2)), (3, 6, 6)),
    "nested-residual-and-concat": (_Nested, _nested_twin, (2, 4, 4)),
    "functional-forms": (_Functional, _functional_twin, (3, 6, 6)),
    "torchvision-basicblock": (_TinyResNet, _tiny_resnet_twin, (3, 6, 6)),
}


@pytest.mark.parametrize("name", list(CNN_CASES))
def test_cnn_kernel_equals_hand_written_twin(name):
    """from_torch of convolutional, pooling, residual (nested, projection, torchvision
    BasicBlock) and concatenating models == the hand-written twin, to 1e-12 in float64,
    for k(x1, x1) and k(x1, x2)."""
    model, twin, shape = CNN_CASES[name]
    net = nk.from_torch(model())
    x1, x2 = _img(3, *shape), _img(2, *shape, seed=1)
    _assert_same_kernel(net, twin(), x1)
    _assert_same_kernel(net, twin(), x1, x2)


def test_residual_structure():
    """A residual block becomes FanOut(2), Parallel(main branch, shortcut) in the order of
    the addition's arguments, FanInSum; the stem's tensor, used twice, is the fan-out."""
    net = nk.from_torch(nn.Sequential(nn.Conv2d(3, 8, 3), _ResBlock(8, 8)))
    assert [type(layer).__name__ for layer in net.layers] == [
        "Conv2d", "FanOut", "Parallel", "FanInSum", "ReLU"]
    main, short = net.layers[2].layers
    assert [type(layer).__name__ for layer in main.layers] == ["Conv2d", "ReLU", "Conv2d"]
    assert isinstance(short, nk.Identity) and net.layers[1].n == 2


def test_converted_conv_attributes():
    """Each nn.Conv becomes a Conv with its geometry, in_channels, and the documented
    default variances with fan_in = in_channels * prod(kernel_size)."""
    net = nk.from_torch(nn.Sequential(
        nn.Conv2d(3, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                  padding_mode="reflect"),
        nn.Conv1d(16, 4, 2, padding="same", bias=False)))
    a, b = net.layers
    assert type(a) is nk.Conv2d and type(b) is nk.Conv1d
    assert (a.out_channels, a.in_channels, a.kernel_size, a.stride, a.padding, a.dilation,
            a.mode) == (16, 3, (3, 5), (2, 1), (1, 2), (1, 2), "reflect")
    assert a.w_std == pytest.approx(W) and a.b_std == pytest.approx(1 / math.sqrt(3 * 45))
    assert a.parameterization == "standard"
    assert (b.padding, b.b_std, b.in_channels) == ("same", None, 16)


def test_conv_overrides():
    """w_std, b_std and parameterization given to from_torch apply to every Conv too."""
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, bias=False),
                          nn.Flatten(), nn.Linear(16, 1))
    net = nk.from_torch(model, w_std=1.5, b_std=0.2, parameterization="ntk")
    twin = nk.Sequential(nk.Conv2d(6, 3, w_std=1.5, b_std=0.2), nk.ReLU(),
                         nk.Conv2d(4, 3, w_std=1.5, b_std=None), nk.Flatten(),
                         nk.Linear(1, 1.5, 0.2))
    _assert_same_kernel(net, twin, _img(3, 2, 6, 6))


def test_post_activation_identity_blocks():
    """torchvision's ResNet (a ReLU in the stem, identity BasicBlocks) converts to the
    hand-written structure and its finite twin runs; its infinite-width kernel does not
    exist in closed form (each identity block adds a non-Gaussian ReLU output to a Gaussian
    branch before the next ReLU, as in neural-tangents), and kernel() says so."""
    net = nk.from_torch(_TinyResNet(stem_relu=True, blocks=2))
    assert repr(net) == repr(_tiny_resnet_twin(stem_relu=True, blocks=2))
    x = _img(2, 3, 6, 6)
    assert net.build(x.shape[1:], dtype=torch.float64)(x).shape == (2, 3)
    with pytest.raises(ValueError, match="Gaussian pre-activations"):
        net.kernel(x)


def test_torch_layernorm_over_all_axes():
    """nn.LayerNorm(normalized_shape=(C, H, W)) normalises all of (C, H, W): the twin is
    nk.LayerNorm(axis='all'); normalising only the last axis of spatial features is refused
    when the kernel sees the shape."""
    body = [nn.Conv2d(2, 6, 3)]
    net = nk.from_torch(nn.Sequential(*body, nn.LayerNorm((6, 3, 3), elementwise_affine=False),
                                      nn.ReLU(), nn.Flatten(), nn.Linear(54, 1)))
    twin = nk.Sequential(_conv(2, 2, 6, 3), nk.LayerNorm(axis="all"), nk.ReLU(), nk.Flatten(),
                         _lin(54, 1))
    x = _img(3, 2, 5, 5)
    _assert_same_kernel(net, twin, x)
    last = nk.from_torch(nn.Sequential(*body, nn.LayerNorm(3, elementwise_affine=False)))
    with pytest.raises(ValueError, match=r"module 1 .*normalises the last 1 axes.*\(6, 3, 3\)"):
        last.kernel(x)


def test_spatial_axes_checked_at_kernel_time():
    """A mean over (2, 3) of a 3-d feature map, and Conv2d(3, ...) on 2-channel inputs:
    the kernel refuses, naming the torch operation."""
    class Mean23(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 4, 1)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    with pytest.raises(ValueError, match=r"mean\(\(2, 3\)\).*only the mean over all spatial"):
        nk.from_torch(Mean23()).kernel(_img(2, 2, 3, 3, 3))
    with pytest.raises(ValueError, match="expects 3 input channels but receives 2"):
        nk.from_torch(nn.Sequential(nn.Conv2d(3, 4, 3))).kernel(_img(2, 2, 5, 5))


# ------------------------------------------------ exact witness of the conv geometry
def _exact_linear_kernel(model: nn.Module, x1, x2, fan_in: int):
    """For a model linear in its parameters (one conv, then parameter-free linear ops), the
    expected NNGP is exactly sum_i var_i f_{e_i}(x1) f_{e_i}(x2) over one-hot parameter
    settings e_i of torch's own forward pass (var_i = 1/(3 fan_in), PyTorch's default for
    weights and biases, witnessed by the Monte Carlo tests), and the standard-
    parameterization NTK is sum_i f_{e_i}(x1) f_{e_i}(x2). One output channel, so the
    kernel per output position is that product."""
    nngp = ntk = 0
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.zero_()
        for p in params:
            for i in range(p.numel()):
                p.view(-1)[i] = 1
                y1, y2 = model(x1), model(x2)
                prod = (y1[:, None] * y2[None, :])[:, :, 0]
                nngp, ntk = nngp + prod / (3 * fan_in), ntk + prod
                p.view(-1)[i] = 0
    return nngp, ntk


class _PoolFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1, padding_mode="circular")

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 2, 1, 1, count_include_pad=False).mean((2, 3))


LINEAR_CASES = {
    "1d-even-same": (lambda: nn.Conv1d(2, 1, 4, padding="same"), (2, 9), 8),
    "1d-reflect-dilated-strided": (
        lambda: nn.Conv1d(2, 1, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
        (2, 9), 6),
    "2d-replicate-rect": (lambda: nn.Conv2d(2, 1, (3, 2), stride=(2, 1), padding=(1, 0),
                                            padding_mode="replicate"), (2, 5, 6), 12),
    "2d-circular-no-bias": (lambda: nn.Conv2d(2, 1, 3, padding=1, padding_mode="circular",
                                              bias=False), (2, 5, 5), 18),
    "2d-same-even-dilated": (lambda: nn.Conv2d(2, 1, 2, padding="same", dilation=2),
                             (2, 5, 5), 8),
    "3d-same-even": (lambda: nn.Conv3d(2, 1, 2, padding="same"), (2, 3, 4, 3), 16),
    "avgpool-no-pad-count": (lambda: nn.Sequential(
        nn.Conv2d(2, 1, 3, padding=1), nn.AvgPool2d(3, stride=2, padding=1,
                                                    count_include_pad=False)), (2, 6, 6), 18),
    "avgpool-padded": (lambda: nn.Sequential(nn.Conv2d(2, 1, 3), nn.AvgPool2d(2, padding=1)),
                       (2, 5, 5), 18),
    "adaptive-1d": (lambda: nn.Sequential(nn.Conv1d(2, 1, 3), nn.AdaptiveAvgPool1d(1),
                                          nn.Flatten()), (2, 8), 6),
    "functional-pool-mean": (_PoolFunctional, (2, 5, 4), 18),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_conv_geometry_matches_torch_exactly(name):
    """Padding ('same' with even kernels, ints, zeros/reflect/replicate/circular), stride,
    dilation, average pooling (padding, count_include_pad) and global pooling mean what
    torch computes: the kernel equals the exact expectation over torch's own forward pass
    (see _exact_linear_kernel), to 1e-12."""
    factory, shape, fan_in = LINEAR_CASES[name]
    model = factory().double()
    model = model if isinstance(model, (nn.Sequential, _PoolFunctional)) else nn.Sequential(
        model)
    net = nk.from_torch(model)
    x1, x2 = _img(3, *shape), _img(2, *shape, seed=1)
    k = net.kernel(x1, x2)
    nngp, ntk = _exact_linear_kernel(model, x1, x2, fan_in)
    torch.testing.assert_close(k.nngp, nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(k.ntk, ntk, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------- Monte Carlo witness
class _McCNN(nn.Module):
    """Conv stem, a residual block (conv-relu-conv plus identity, then relu), average
    pooling, flatten, a wide head."""

    def __init__(self, width: int, n_out: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4 * width, n_out)

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(h + self.conv2(F.relu(self.conv1(h))))
        return self.head(torch.flatten(self.pool(h), 1))


def _torch_init_samples(model: nn.Module, x: torch.Tensor, n_nets: int):
    """Per re-initialisation of `model` with PyTorch's own reset_parameters: the empirical
    NNGP y y^T / n_out and NTK J J^T / n_out (J over all parameters, by torch.func.vjp). The
    NTK's trace over outputs is estimated without bias by one Gaussian projection v per
    network, E_v[(J^T v)(J^T v)^T] = J J^T, one backward pass per example."""
    nngps, ntks = [], []
    for _ in range(n_nets):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        params = {k: p.detach() for k, p in model.named_parameters()}
        y, pull = vjp(lambda p: functional_call(model, p, (x,)), params)
        n_out = y.shape[1]
        v = torch.randn(n_out, dtype=y.dtype)
        rows = []
        for i in range(len(x)):
            cotangent = torch.zeros_like(y)
            cotangent[i] = v
            (grads,) = pull(cotangent)
            rows.append(torch.cat([g.flatten() for g in grads.values()]))
        jv = torch.stack(rows)
        nngps.append((y @ y.T).double() / n_out)
        ntks.append((jv @ jv.T).double() / n_out)
    return torch.stack(nngps), torch.stack(ntks)


def test_cnn_with_residual_block_matches_pytorch_init():
    """A CNN with a residual block and pooling re-initialised many times with PyTorch's own
    default init: the mean empirical NNGP and NTK match from_torch(model).kernel(x) within 4
    standard errors plus a 2/width margin for finite-width corrections (O(1/width)). At
    width 128 with 128 outputs and 200 networks the standard error is ~1% of the kernel,
    and dropping the bias variances moves the NNGP by > 4 standard errors, so the default
    b_std = 1/sqrt(3 fan_in) is witnessed as well as w_std."""
    width, n_out, n_nets = 128, 128, 200
    model = _McCNN(width, n_out)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1234)
    with one_thread():
        nngps, ntks = _torch_init_samples(model, x, n_nets)
    k = nk.from_torch(model).kernel(x.double())
    for name, samples, ref in (("nngp", nngps, k.nngp), ("ntk", ntks, k.ntk)):
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(n_nets)
        ok = (mean - ref).abs() <= 4 * se + 2 / width * ref.abs()
        assert bool(ok.all()), f"{name}: MC mean\n{mean}\nkernel\n{ref}\nstandard error\n{se}"
    no_bias = nk.from_torch(model, b_std=0.0).kernel(x.double()).nngp
    mean, se = nngps.mean(0), nngps.std(0) / math.sqrt(n_nets)
    assert bool(((mean - no_bias).abs() > 4 * se).all())


# ------------------------------------------------------------------------ refusals
class _Wrap(nn.Module):
    """A model whose forward is `fn(self, x)`, with a few modules to use."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            setattr(self, name, m)

    def forward(self, x):
        return self.fn(self, x)


def _bridge(s, x):
    a, b = s.f(x), s.g(x)
    return (a + b) + s.h(a)


def _two_inputs():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y
    return Two()


def _control_flow(s, x):
    if x.sum() > 0:
        return s.f(x)
    return x


def _lin3():
    return {"f": nn.Linear(3, 3), "g": nn.Linear(3, 3), "h": nn.Linear(3, 3)}


def _conv3():
    return {"c": nn.Conv2d(3, 3, 3)}


def _relu_twice(s, x):
    y = s.f(x)
    return s.r(y) + s.g(y)


REFUSALS = {
    "BatchNorm2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
                    [r"module 1 \(BatchNorm2d", r"mixes the examples of a batch",
                     r"empirical NTK of the finite model",
                     r"nk\.empirical_ntk\(model\.eval\(\), x1, x2\)"]),
    "BatchNorm-in-block": (lambda: _Wrap(lambda s, x: s.bn(s.c(x)), bn=nn.BatchNorm2d(3),
                                         **_conv3()),
                           [r"module bn \(BatchNorm2d", r"test_from_torch\.py:\d+",
                            r"empirical NTK"]),
    "MaxPool2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2)),
                  [r"MaxPool2d has no closed-form", r"Gaussian expectation",
                   r"empirical NTK of the finite model"]),
    "F.max_pool2d": (lambda: _Wrap(lambda s, x: F.max_pool2d(s.c(x), 2), **_conv3()),
                     [r"node max_pool2d", r"F\.max_pool2d has no closed-form",
                      r"empirical NTK"]),
    "AdaptiveMaxPool2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveMaxPool2d(1)),
                          [r"AdaptiveMaxPool2d has no closed-form", r"empirical NTK"]),
    "groups": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)),
               [r"module 0", r"groups=2", r"groups=1"]),
    "not-series-parallel": (lambda: _Wrap(_bridge, **_lin3()),
                            [r"node add", r"not series-parallel", r"f is also used by h"]),
    "scalar-mul": (lambda: _Wrap(lambda s, x: s.f(x) * 2, **_lin3()),
                   [r"`f \* 2` \(node mul\)", r"constant"]),
    "scalar-add": (lambda: _Wrap(lambda s, x: s.g(torch.relu(s.f(x)) + 1), **_lin3()),
                   [r"`relu \+ 1`", r"constant", r"Sums of two tensors"]),
    "product": (lambda: _Wrap(lambda s, x: s.f(x) * s.g(x), **_lin3()),
                [r"operator\.mul of tensors", r"FanInProd"]),
    "correlated-sum": (lambda: _Wrap(lambda s, x: torch.relu(s.f(x)) + x, **_lin3()),
                       [r"correlated", r"at most one branch"]),
    "in-place-ambiguous": (lambda: _Wrap(_relu_twice, r=nn.ReLU(inplace=True), **_lin3()),
                           [r"module r", r"changes f in place", r"also used by `g\(f\)`"]),
    "shared-module": (lambda: _Wrap(lambda s, x: s.f(torch.relu(s.f(x))), **_lin3()),
                      [r"module f", r"called more than once", r"independently initialised"]),
    "control-flow": (lambda: _Wrap(_control_flow, **_lin3()),
                     [r"torch\.fx", r"symbolically traceable"]),
    "two-inputs": (_two_inputs, [r"takes 2 inputs"]),
    "cat-dim-0": (lambda: _Wrap(lambda s, x: torch.cat([s.f(x), s.g(x)], 0), **_lin3()),
                  [r"dim=0", r"dim=1"]),
    "mean-channels": (lambda: _Wrap(lambda s, x: s.c(x).mean(1), **_conv3()),
                      [r"mean over dim=\(1,\)", r"spatial axes"]),
    "adaptive-size-2": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(2)),
                        [r"output size 2", r"nn\.AvgPool"]),
    "avgpool-ceil": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.AvgPool2d(2, ceil_mode=True)),
                     [r"ceil_mode=True"]),
    "avgpool-divisor": (lambda: nn.Sequential(nn.AvgPool2d(2, divisor_override=3)),
                        [r"divisor_override=3"]),
    "functional-conv": (lambda: _Wrap(lambda s, x: F.conv2d(x, s.c.weight), **_conv3()),
                        [r"parameter or buffer 'c\.weight'", r"nn\.Conv1d/2d/3d"]),
    "softmax": (lambda: _Wrap(lambda s, x: torch.softmax(s.f(x), 1), **_lin3()),
                [r"torch\.softmax has no infinite-width kernel rule", r"Supported: "]),
    "alpha": (lambda: _Wrap(lambda s, x: torch.add(s.f(x), x, alpha=2), **_lin3()), [r"alpha=2"]),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals(name):
    """Models without an infinite-width twin are refused when converted, with a
    ConversionError (both TypeError and ValueError) naming the module path or traced node
    (and its line in forward), why, and what to do instead."""
    factory, phrases = REFUSALS[name]
    with pytest.raises(ConversionError) as info:
        nk.from_torch(factory())
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    message = str(info.value)
    for phrase in phrases:
        assert re.search(phrase, message), f"{phrase!r} not in:\n{message}"


def test_in_place_without_ambiguity_converts():
    """x.relu_() on a tensor used only there (and torchvision's `out += identity`) is the
    same as out of place, so it converts."""
    net = nk.from_torch(_Wrap(lambda s, x: s.g(s.f(x).relu_()), **_lin3()))
    _assert_same_kernel(net, nk.Sequential(_lin(3, 3), nk.ReLU(), _lin(3, 3)), _x(3, 3))


def _sums(s, x):
    y = s.f(x)
    z = torch.relu(y + (s.g(y) + s.h(y)))
    return s.o(torch.relu(y + s.norm(s.k(z))))


def test_sum_of_uncorrelated_branches():
    """A branch ending in its own Linear directly, after LayerNorm (an odd function of those
    weights), or through a nested sum of such branches is uncorrelated with an identity
    branch, so the sum converts to FanInSum (the twin, to 1e-12). y feeds both the inner
    and the outer block: nested blocks from one tensor."""
    model = _Wrap(_sums, f=nn.Linear(4, 6), g=nn.Linear(6, 6), h=nn.Linear(6, 6),
                  k=nn.Linear(6, 6), norm=nn.LayerNorm(6, elementwise_affine=False),
                  o=nn.Linear(6, 1))
    inner = nk.Sequential(nk.FanOut(2), nk.Parallel(_lin(6, 6), _lin(6, 6)), nk.FanInSum())
    block = nk.Sequential(nk.FanOut(2), nk.Parallel(nk.Identity(), inner), nk.FanInSum(),
                          nk.ReLU(), _lin(6, 6), nk.LayerNorm())
    twin = nk.Sequential(_lin(4, 6), nk.FanOut(2), nk.Parallel(nk.Identity(), block),
                         nk.FanInSum(), nk.ReLU(), _lin(6, 1))
    _assert_same_kernel(nk.from_torch(model), twin, _x(4, 4), _x(2, 4, seed=1))

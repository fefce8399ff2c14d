"""nk.linearize and nk.taylor against independent witnesses.

Witnesses: the model itself (at theta0, and f(theta0 + eps d) for the error rates);
an explicit Jacobian of the flattened outputs in the flattened parameters
(torch.autograd.functional.jacobian, reverse mode) for f0 + J d; and the derivatives
of g(t) = f(theta0 + t d) by nested reverse-mode jacobians for higher degrees (the
module uses forward mode). PyTorch's third reverse-mode derivative of its native
layer_norm is wrong (0.7 relative error against finite differences, torch 2.13), so
that witness runs layer_norm by its formula, written here (`_formula_layer_norm`).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math

import pytest
import torch
from conftest import ResidualLayerNorm, one_thread
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

import ntkit as nk

F64 = torch.float64
#: float64 comparisons of two exact methods (explicit Jacobian vs forward mode):
#: rounding ~1e-16 per operation over a few layers.
RTOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids thread start-up on a shared 2-core CPU."""
    with one_thread():
        yield


# ------------------------------------------------------------------ models
def _mlp():
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                         nn.Linear(12, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(4, 2))


def _Residual():
    return ResidualLayerNorm(nn.functional.gelu)


class _Tied(nn.Module):
    """One Parameter in two modules (b.weight is a.weight)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class _TwoHeads(nn.Module):
    """A pytree output: (tensor, {"b": tensor})."""

    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.a(h), {"b": self.b(h) ** 2}


def _input(name: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (4, 5), "cnn": (3, 2, 4, 4), "residual-layernorm": (3, 6), "tied": (3, 4),
             "two-heads": (3, 4)}[name]
    return torch.randn(*shape, generator=g, dtype=F64)


MODELS = {"mlp": _mlp, "cnn": _cnn, "residual-layernorm": _Residual}


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return {**MODELS, "tied": _Tied, "two-heads": _TwoHeads}[name]().to(F64)


# ------------------------------------------------------------------ witnesses
def _flat(out) -> torch.Tensor:
    leaves = torch.utils._pytree.tree_leaves(out)
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _f(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model's flattened outputs at ``params`` (trainable ones; the rest as they are)."""
    return _flat(functional_call(model, params, (x,)))


def _explicit_affine(model, theta0, theta, x) -> torch.Tensor:
    """f(theta0) + J(theta0) (theta - theta0), J by reverse-mode autograd, flattened."""
    names = list(theta0)

    def f(*flat):
        return _f(model, dict(zip(names, flat)), x)

    jac = torch.autograd.functional.jacobian(f, tuple(theta0[n] for n in names))
    step = sum(j.reshape(j.shape[0], -1) @ (theta[n] - theta0[n]).reshape(-1)
               for n, j in zip(names, jac))
    return f(*(theta0[n] for n in names)) + step


class _formula_layer_norm(TorchFunctionMode):
    """F.layer_norm as (x - mean) / sqrt(var + eps) * w + b."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not nn.functional.layer_norm:
            return func(*args, **kwargs)
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        x, shape, w, b, eps = (bound.arguments[k] for k in
                               ("input", "normalized_shape", "weight", "bias", "eps"))
        dims = tuple(range(-len(shape), 0))
        mean = x.mean(dims, keepdim=True)
        y = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
        return y * (1 if w is None else w) + (0 if b is None else b)


def _explicit_taylor(model, theta0, d, x, degree) -> torch.Tensor:
    """sum_m g^(m)(0) / m! with g(t) = f(theta0 + t d), derivatives by nested reverse mode."""
    def g(t):
        with _formula_layer_norm():
            return _f(model, {n: p + t * d[n] for n, p in theta0.items()}, x)

    def derivative(fn):
        return lambda t: torch.autograd.functional.jacobian(fn, t, create_graph=True)

    t0 = torch.zeros((), dtype=F64)
    total, fn = g(t0), g
    for m in range(1, degree + 1):
        fn = derivative(fn)
        total = total + fn(t0) / math.factorial(m)
    return total.detach()


def _direction(theta0: dict[str, torch.Tensor], seed: int, scale: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in theta0.items()}


def _set_theta(lin: nk.TaylorModel, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in lin.params_dict().items():
            p.copy_(values[name])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("degree", [1, 2], ids=["linear", "quadratic"])
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_the_model_at_theta0(name, degree):
    """At theta = theta0 the expansion is the model (the tangent is zero): bit for bit for
    degree 1; to rounding for degree 2, which runs layer_norm by its formula."""
    model = _model(name)
    x = _input(name, 1)
    lin = nk.taylor(model, degree)
    if degree == 1:
        assert torch.equal(lin(x), model(x))
    else:
        assert _rel(lin(x), model(x)) <= 1e-14


@pytest.mark.parametrize("degree", [1, 2], ids=["linear", "quadratic"])
@pytest.mark.parametrize("name", list(MODELS))
def test_error_shrinks_like_step_to_degree_plus_one(name, degree):
    """|f(theta0 + eps d) - f_k(theta0 + eps d)| ~ eps^(k+1): halving eps divides the
    error by 4 (k = 1) or 8 (k = 2), within 25%, over four halvings."""
    model = _model(name)
    x = _input(name, 2)
    lin = nk.taylor(model, degree)
    theta0 = _trainable(model)
    d = _direction(theta0, seed=3, scale=1.0)
    errors = []
    for eps in [0.04 / 2**i for i in range(5)]:
        point = {n: p + eps * d[n] for n, p in theta0.items()}
        _set_theta(lin, point)
        with torch.no_grad():
            errors.append(float((_flat(lin(x)) - _f(model, point, x)).abs().max()))
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    want = 2.0 ** (degree + 1)
    assert all(0.75 * want <= r <= 1.25 * want for r in ratios), (errors, ratios)


@pytest.mark.parametrize("name", [*MODELS, "tied", "two-heads"])
def test_linearized_is_f0_plus_explicit_jacobian_step(name):
    """theta = theta0 + d (d not small) gives f0 + J d exactly (1e-10), J built explicitly."""
    model = _model(name)
    x = _input(name, 4)
    lin = nk.linearize(model)
    theta0 = _trainable(model)
    d = _direction(theta0, seed=5, scale=0.5)
    theta = {n: p + d[n] for n, p in theta0.items()}
    _set_theta(lin, theta)
    want = _explicit_affine(model, theta0, theta, x)
    assert _rel(_flat(lin(x)), want) <= RTOL


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("name", ["mlp", "residual-layernorm", "two-heads"])
def test_higher_degree_matches_reverse_mode_derivatives(name, degree):
    """Degree k at theta0 + d equals sum_{m<=k} g^(m)(0)/m!, g(t) = f(theta0 + t d), with the
    derivatives taken by nested reverse mode; and differs from degree k - 1 (so the check
    has teeth)."""
    model = _model(name)
    x = _input(name, 6)
    theta0 = _trainable(model)
    d = _direction(theta0, seed=7, scale=0.5)
    lin = nk.taylor(model, degree)
    _set_theta(lin, {n: p + d[n] for n, p in theta0.items()})
    got = _flat(lin(x)).detach()
    want = _explicit_taylor(model, theta0, d, x, degree)
    lower = _explicit_taylor(model, theta0, d, x, degree - 1)
    assert _rel(got, want) <= RTOL
    assert _rel(lower, want) > 1e3 * RTOL


class _Normalised(nn.Module):
    def __init__(self, norm: nn.Module, features: int):
        super().__init__()
        self.conv, self.norm = nn.Conv1d(2, 4, 3), norm
        self.out = nn.Linear(4 * features, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(torch.tanh(self.conv(x)))).flatten(1))


NORMS = {
    "layer_norm": lambda: nn.LayerNorm(5),
    "batch_norm_batch_stats": lambda: nn.BatchNorm1d(4, track_running_stats=False),
    "instance_norm": lambda: nn.InstanceNorm1d(4, affine=True),
    "batch_norm_eval": lambda: nn.BatchNorm1d(4).eval(),
    "group_norm": lambda: nn.GroupNorm(2, 4),
}


@pytest.mark.parametrize("norm", list(NORMS))
def test_degree_two_through_normalisations(norm):
    """PyTorch's nested forward mode is wrong for layer_norm, batch_norm with batch statistics
    and instance_norm; degree 2 still matches the reverse-mode witness (1e-10)."""
    torch.manual_seed(19)
    model = _Normalised(NORMS[norm](), 5).to(F64)
    x = torch.randn(4, 2, 7, dtype=F64, generator=torch.Generator().manual_seed(20))
    theta0 = _trainable(model)
    d = _direction(theta0, seed=21, scale=0.5)
    lin = nk.taylor(model, 2)
    _set_theta(lin, {n: p + d[n] for n, p in theta0.items()})
    assert _rel(_flat(lin(x)).detach(), _explicit_taylor(model, theta0, d, x, 2)) <= RTOL


def test_functions_with_wrong_nested_derivatives_are_refused_from_degree_two():
    """det's nested forward-mode derivative is wrong in PyTorch: degree 2 refuses it; degree 1
    (first order, right) matches f0 + J d."""
    class LogDet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.eye(3, dtype=F64) * 2 + 0.1)

        def forward(self, x):
            return torch.linalg.det(self.a + x)

    model = LogDet()
    x = 0.1 * torch.randn(2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(22))
    with pytest.raises(NotImplementedError, match=r"det has wrong second- and higher-order"):
        nk.taylor(model, 2)(x)
    lin = nk.linearize(model)
    theta0 = _trainable(model)
    theta = {"a": theta0["a"] + _direction(theta0, 23, 0.3)["a"]}
    _set_theta(lin, theta)
    assert _rel(_flat(lin(x)), _explicit_affine(model, theta0, theta, x)) <= RTOL


def test_training_with_sgd():
    """SGD on an MSE loss: the gradient at theta0 is the model's; the steps move theta and
    lower the loss; afterwards the output is still f0 + J (theta - theta0); the user's model
    is untouched."""
    model = _model("mlp")
    before = copy.deepcopy(model.state_dict())
    x = _input("mlp", 8)
    y = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    lin = nk.linearize(model)
    assert len(list(lin.parameters())) == len(list(model.parameters()))

    def loss_fn(out):
        return ((out - y) ** 2).mean()

    want = torch.autograd.grad(loss_fn(model(x)), list(model.parameters()))
    loss_fn(lin(x)).backward()
    for (name, theta), g in zip(lin.params_dict().items(), want):
        assert torch.allclose(theta.grad, g, rtol=RTOL, atol=1e-14), name

    opt = torch.optim.SGD(lin.parameters(), lr=0.2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(lin(x))
        losses.append(float(loss))
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    theta0 = _trainable(model)
    theta = {n: p.detach() for n, p in lin.params_dict().items()}
    assert all((theta[n] - theta0[n]).abs().max() > 1e-4 for n in theta0)
    assert _rel(_flat(lin(x)), _explicit_affine(model, theta0, theta, x)) <= RTOL

    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("convert", ["double", "to"])
def test_tied_parameters_stay_tied_through_dtype_conversion(convert):
    """A Parameter shared by two modules is one theta and one theta0 buffer, also after
    .double() / .to(float64) (which convert buffers module by module); the gradient sums
    both uses (witness: the model's own gradient)."""
    torch.manual_seed(10)
    model = _Tied()  # float32
    lin = nk.linearize(model)
    assert lin.param_names == ("a.weight", "a.bias", "b.bias")
    assert lin.base.a.weight is lin.base.b.weight
    lin = lin.double() if convert == "double" else lin.to(F64)
    assert lin.base.a.weight is lin.base.b.weight
    assert lin.base.a.weight.dtype == F64
    assert all(p.dtype == F64 for p in lin.parameters())
    assert "a.weight" not in dict(lin.base.named_parameters())

    ref = copy.deepcopy(model).to(F64)
    x = _input("tied", 11)
    want = torch.autograd.grad(ref(x).square().sum(), [ref.a.weight])[0]
    lin(x).square().sum().backward()
    assert torch.allclose(lin.params_dict()["a.weight"].grad, want, rtol=RTOL, atol=1e-14)

    theta0 = _trainable(ref)
    theta = {n: p + d for (n, p), d in zip(theta0.items(), _direction(theta0, 12, 0.5).values())}
    _set_theta(lin, theta)
    assert _rel(_flat(lin(x)), _explicit_affine(ref, theta0, theta, x)) <= RTOL


def test_device_moves_carry_theta0_and_theta():
    """.to(device) moves the theta0 buffers and theta together, ties intact (the meta device
    stands in for an accelerator)."""
    lin = nk.linearize(_Tied()).to("meta")
    assert all(t.device.type == "meta" for t in lin.state_dict().values())
    assert lin.base.a.weight is lin.base.b.weight
    if torch.cuda.is_available():
        lin = nk.linearize(_Tied().to(F64)).to("cuda")
        x = _input("tied", 24).cuda()
        assert torch.equal(lin(x), lin.base.b(torch.tanh(lin.base.a(x))))


def test_frozen_parameters_get_no_tangent():
    """requires_grad=False parameters are fixed buffers: not in parameters(), unchanged by
    training; the output is f0 + J_trainable d (witness: explicit Jacobian in the rest)."""
    model = _model("mlp")
    model[0].requires_grad_(False)
    lin = nk.linearize(model)
    assert lin.param_names == ("2.weight", "2.bias", "4.weight", "4.bias")
    assert [n for n, _ in lin.named_parameters()] == [f"theta.{i}" for i in range(4)]
    x = _input("mlp", 13)
    theta0 = _trainable(model)
    theta = {n: p + d for (n, p), d in zip(theta0.items(), _direction(theta0, 14, 0.5).values())}
    _set_theta(lin, theta)
    assert _rel(_flat(lin(x)), _explicit_affine(model, theta0, theta, x)) <= RTOL
    assert torch.equal(lin.base[0].weight, model[0].weight.detach())


def test_state_dict_and_modes():
    """theta0 and theta are in the state_dict and load into another expansion; train/eval
    reach the copy."""
    model = _model("residual-layernorm")
    lin = nk.taylor(model, 2)
    theta0 = _trainable(model)
    _set_theta(lin, {n: p + d for (n, p), d in
                     zip(theta0.items(), _direction(theta0, 15, 0.3).values())})
    state = lin.state_dict()
    assert {"base.a.weight", "theta.0"} <= set(state)
    other = nk.taylor(_model("residual-layernorm", seed=99), 2)
    other.load_state_dict(state)
    x = _input("residual-layernorm", 16)
    assert torch.equal(other(x), lin(x))
    assert lin.eval().base.training is False and lin.base.norm.training is False
    assert lin.train().base.a.training is True


def test_refusals():
    """Not a module, nothing trainable, bad degrees, complex parameters."""
    with pytest.raises(TypeError, match=r"torch.nn.Module, got function"):
        nk.linearize(lambda x: x)
    with pytest.raises(ValueError, match=r"nothing to linearize"):
        nk.linearize(_mlp().requires_grad_(False))
    with pytest.raises(ValueError, match=r"nothing to linearize"):
        nk.linearize(nn.ReLU())
    for degree in (0, -1):
        with pytest.raises(ValueError, match=rf"degree must be >= 1.*got {degree}"):
            nk.taylor(_mlp(), degree)
    for degree in (1.5, True, "2"):
        with pytest.raises(TypeError, match=r"degree must be an int"):
            nk.taylor(_mlp(), degree)
    with pytest.raises(TypeError, match=r"'weight' has dtype torch.complex64"):
        nk.linearize(nn.Linear(2, 2, dtype=torch.complex64))


def test_operations_without_forward_mode_say_what_to_do():
    """Fused attention and BatchNorm's in-place running statistics are refused with the fix;
    the fixes named in the messages work (witness: the model at theta0)."""
    torch.manual_seed(17)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True).to(F64)
    x = torch.randn(2, 3, 8, dtype=F64)
    lin = nk.linearize(layer)
    with pytest.raises(NotImplementedError, match=r"(?s)forward-mode derivative.*SDPBackend.MATH"):
        lin(x)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.allclose(lin(x), layer(x), rtol=1e-12, atol=1e-12)
        with pytest.raises(NotImplementedError, match=r"(?s)train mode"):
            lin.eval()(x)

    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).to(F64)
    xb = _input("mlp", 18)
    with pytest.raises(RuntimeError, match=r"(?s)in place.*\.eval\(\)"):
        nk.linearize(bn)(xb)
    assert torch.equal(nk.linearize(bn.eval())(xb), bn(xb))

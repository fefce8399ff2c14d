"""Kernels are differentiable in their inputs ``x1`` and ``x2``.

Inputs that require grad give a kernel that keeps the autograd graph, under any
memory budget, with the gradients at self-pairs and kinks that neural-tangents
gives (finite at ``x1 == x2`` and for zero inputs).

Witnesses: central finite differences along random directions (the same function
evaluated without gradients: an independent path through the rules), the
single-tile gradient for tiled ones, and neural-tangents 0.6.5 in float64
(``jax.grad`` of ``kernel_fn``: tests/data/input_grad_nt.npz, written by
tests/data/gen_input_grad_nt.py).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import ntkit as nk
import ntkit.tiling

DATA = pathlib.Path(__file__).parent / "data"

D = torch.float64
#: Central differences with step ``FD_STEP`` along a unit direction: truncation
#: ~ step^2 f''' and rounding ~ eps |f| / step, both far below 1e-6 of these O(1)
#: directional derivatives; a wrong rule (a missing factor, a detached term) is off
#: by O(1).
FD_STEP = 1e-5
FD_RTOL = 1e-6
#: Tiled and single-tile gradients differ only by the order of sums.
TILE_RTOL = 1e-10
#: neural-tangents' gradients, computed by other code in the same dtype. At a
#: duplicate in another tensor (mode "copy") correlations reach 1 only up to
#: rounding, and the coefficients of the gradient there differ from the exact
#: self-pair ones by about sqrt(eps) (measured <= 2e-9).
NT_RTOL = 1e-6


def _data(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _mlp(act, b0: float = 0.1):
    return nk.Sequential(nk.Linear(8, w_std=1.5, b_std=b0), act(),
                         nk.Linear(8, w_std=1.5, b_std=0.1), act(), nk.Linear(1))


def _cnn(b0: float = 0.1):
    return nk.Sequential(
        nk.Conv2d(4, 3, padding="same", w_std=1.4, b_std=b0), nk.ReLU(), nk.AvgPool2d(2),
        nk.Conv2d(4, 2, w_std=1.3, b_std=0.2), nk.ReLU(), nk.GlobalAvgPool(),
        nk.Linear(1, w_std=1.1, b_std=0.1))


def _attention():
    return nk.Sequential(nk.Conv1d(6, 2, padding="same", w_std=1.2, b_std=0.1),
                         nk.SelfAttention(6, 2, b_std=0.2), nk.ReLU(), nk.GlobalAvgPool(),
                         nk.Linear(1))


def _layernorm():
    return nk.Sequential(nk.Linear(8, w_std=1.3, b_std=0.2), nk.LayerNorm(), nk.Erf(),
                         nk.Linear(8), nk.ReLU(), nk.Linear(1))


#: name -> (network, x1, x2, a budget that forces several tiles of k(x1, x2) and k(x1))
ARCHS = {
    "mlp-relu": (_mlp(nk.ReLU), _data(0, 5, 6), _data(1, 4, 6), 8 * 24 * 4),
    "mlp-erf": (_mlp(nk.Erf), _data(0, 5, 6), _data(1, 4, 6), 8 * 24 * 4),
    "mlp-gelu": (_mlp(nk.GELU), _data(0, 5, 6), _data(1, 4, 6), 8 * 24 * 4),
    "mlp-tanh-quadrature": (_mlp(lambda: nk.Elementwise(torch.tanh, degree=16)),
                            _data(0, 5, 6), _data(1, 4, 6), None),
    "mlp-layernorm": (_layernorm(), _data(0, 5, 6), _data(1, 4, 6), 8 * 24 * 4),
    # Pooling needs every pair of positions (36^2 numbers per input pair): ~2 pairs per
    # tile, and the tiles replay a self trace recorded beforehand.
    "cnn-avgpool": (_cnn(), _data(2, 3, 2, 6, 6), _data(3, 2, 2, 6, 6), 8 * 36**2 * 24 * 2),
    "attention": (_attention(), _data(4, 3, 2, 5), _data(5, 2, 2, 5), 8 * 25 * 24 * 2),
}
#: ARCHS whose tiled gradients must equal the single-tile ones (quadrature picks its
#: degree per tile, so its values, and gradients, depend on the tiles).
TILED = [name for name, arch in ARCHS.items() if arch[3] is not None]


def _objective(net, x1, x2, *, memory_budget=None, diagonal=False) -> torch.Tensor:
    """``sum(W1 * nngp) + sum(W2 * ntk)`` with fixed pseudo-random weights."""
    k = net.kernel(x1, x2, memory_budget=memory_budget, diagonal=diagonal)
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(k.nngp.shape, generator=g, dtype=D)
    w2 = torch.randn(k.ntk.shape, generator=g, dtype=D)
    return (w1 * k.nngp).sum() + (w2 * k.ntk).sum()


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    assert torch.isfinite(got).all(), got
    err = float((got - want).abs().max()) / float(want.abs().max())
    assert err < rtol, f"relative error {err:.2e}"


def _directional_fd(f, xs: tuple[torch.Tensor, ...], ds: tuple[torch.Tensor, ...]) -> float:
    """Central difference of ``f(*xs)`` along the direction ``ds``."""
    with torch.no_grad():
        plus = f(*(x + FD_STEP * d for x, d in zip(xs, ds)))
        minus = f(*(x - FD_STEP * d for x, d in zip(xs, ds)))
    return float(plus - minus) / (2 * FD_STEP)


def _directions(xs, seed: int) -> tuple[torch.Tensor, ...]:
    ds = [_data(seed + i, *x.shape) for i, x in enumerate(xs)]
    norm = sum(float((d * d).sum()) for d in ds) ** 0.5
    return tuple(d / norm for d in ds)


# torch.func.jvp (Elementwise's derivative) under autograd loads decompositions that
# still use torch.jit.script.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("mode", ["cross", "self", "diagonal"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_gradient_matches_finite_differences(name, mode):
    """d/dx1 (and d/dx2) of sum(W * k) by autograd, projected on random directions,
    equals central differences of the same function evaluated without gradients:
    for k(x1, x2) in both inputs, for k(x1) (both slots at once) and for the
    diagonal k(x1_i, x1_i)."""
    net, x1, x2, _ = ARCHS[name]
    if mode == "cross":
        def f(a, b):
            return _objective(net, a, b)
        xs = (x1, x2)
    else:
        def f(a):
            return _objective(net, a, None, diagonal=mode == "diagonal")
        xs = (x1,)
    leaves = tuple(x.clone().requires_grad_(True) for x in xs)
    grads = torch.autograd.grad(f(*leaves), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    if (name, mode) != ("mlp-layernorm", "diagonal"):  # k(x_i, x_i) is constant there
        assert all(float(g.abs().max()) > 1e-3 for g in grads)  # the check can fail
    for seed in (10, 20, 30):
        ds = _directions(xs, seed)
        got = sum(float((g * d).sum()) for g, d in zip(grads, ds))
        want = _directional_fd(f, xs, ds)
        assert abs(got - want) <= FD_RTOL * max(abs(want), 1e-2), (got, want)


@pytest.fixture
def tiles(monkeypatch) -> dict[str, int]:
    """Counts the tiles `net.kernel` computes (forward and recomputed), by kind."""
    counts = {"k(x)": 0, "k(x', x)": 0}
    original = ntkit.tiling._tile

    def counted(rule, x1, x2, r, c, diagonal, *args):
        counts["k(x)" if x2 is None else "k(x', x)"] += 1
        return original(rule, x1, x2, r, c, diagonal, *args)

    monkeypatch.setattr(ntkit.tiling, "_tile", counted)
    return counts


@pytest.mark.parametrize("name", TILED)
def test_gradient_through_tiles(name, tiles):
    """With a budget that forces several tiles of k(x1, x2) and of k(x1)
    (concatenated, each recomputed in the backward pass, the self trace too), the
    input gradients equal the single-tile ones to rounding."""
    net, x1, x2, budget = ARCHS[name]

    def grads(memory_budget):
        a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        value = (_objective(net, a, b, memory_budget=memory_budget)
                 + _objective(net, a, None, memory_budget=memory_budget))
        return value, (a, b)

    value, leaves = grads(budget)
    forward = dict(tiles)
    tiled = torch.autograd.grad(value, leaves)
    assert forward["k(x)"] >= 3 and forward["k(x', x)"] >= 3, forward
    assert tiles == {k: 2 * n for k, n in forward.items()}  # each recomputed once
    value, leaves = grads(None)
    single = torch.autograd.grad(value, leaves)
    for got, want in zip(tiled, single):
        _close(got, want, TILE_RTOL)


NT = np.load(DATA / "input_grad_nt.npz")
NT_NETS = {
    "mlp_relu": _mlp(nk.ReLU), "mlp_erf": _mlp(nk.Erf), "mlp_gelu": _mlp(nk.GELU),
    "mlp_abs": _mlp(nk.Abs), "mlp_leaky": _mlp(lambda: nk.LeakyReLU(0.1)),
    "mlp0_relu": _mlp(nk.ReLU, b0=0.0), "cnn": _cnn(), "cnn0": _cnn(b0=0.0),
}
NT_CASES = sorted(key for key in NT.files if key.count("-") == 3)


@pytest.mark.parametrize("case", NT_CASES)
def test_matches_neural_tangents(case):
    """d/dx1 sum(W * k(x1, x2)) of the NNGP and the NTK equals neural-tangents'
    ``jax.grad`` of ``kernel_fn`` in float64: random pairs (``cross``), k(x) through
    both slots (``self``), x2 equal to x1 in another tensor (``copy``: every
    self-pair at correlation 1, the arc-cosine kink), and zero inputs or windows
    of zeros without bias (``*_zero``: zero variances)."""
    net, inputs, mode, get = case.split("-")
    x1 = torch.tensor(NT[f"x_{inputs}_1"])
    x2 = torch.tensor(NT[f"x_{inputs}_2"])
    n2 = x2.shape[0] if mode == "cross" else x1.shape[0]
    w = torch.tensor(NT[f"w_{x1.shape[0]}x{n2}"])
    a = x1.clone().requires_grad_(True)
    second = {"cross": x2, "self": None, "copy": x1.clone()}[mode]
    (g,) = torch.autograd.grad((w * getattr(NT_NETS[net].kernel(a, second), get)).sum(), a)
    _close(g, torch.tensor(NT[case]), NT_RTOL)


SELF_PAIR_ACTS = {
    "ReLU": nk.ReLU, "LeakyReLU": lambda: nk.LeakyReLU(0.2), "Abs": nk.Abs, "Sign": nk.Sign,
    "Erf": nk.Erf, "GELU": nk.GELU, "GELU-tanh": lambda: nk.GELU("tanh"),
    "Tanh": lambda: nk.Elementwise(torch.tanh, degree=16),
    "Tanh-cholesky": lambda: nk.Elementwise(torch.tanh, degree=16, rule="cholesky"),
    "ReLU-quadrature": lambda: nk.Elementwise(torch.relu, degree=16),
}


@pytest.mark.parametrize("act", list(SELF_PAIR_ACTS))
def test_self_pairs_and_zero_inputs_give_finite_gradients(act):
    """Inputs paired with themselves (correlation 1: the kinks of arccos, arcsin and
    the quadrature's residual square root) and zero inputs without bias (zero
    variance) give finite gradients in every way of writing k(x, x); the same
    tensor twice computes k(x) (both slots), a detached copy only one slot."""
    x = _data(0, 5, 6)
    x[2] = 0.0
    net = _mlp(SELF_PAIR_ACTS[act], b0=0.0)

    def grad(second):
        a = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_objective(net, a, second(a)), a)
        assert torch.isfinite(g).all(), g
        return g

    both = grad(lambda a: None)
    _close(grad(lambda a: a), both, 1e-12)
    one = grad(lambda a: a.detach())  # the same memory, but a constant: slot 1 only
    _close(grad(lambda a: a.detach().clone()), one, 1e-6)
    assert float((one - both).abs().max()) > 1e-2 * float(both.abs().max())


def test_inputs_without_grad_or_grad_mode_are_detached():
    """Without inputs that require grad, or under torch.no_grad, the result carries
    no graph (and equals the differentiable one)."""
    net, x1, x2, _ = ARCHS["cnn-avgpool"]
    plain = net.kernel(x1, x2)
    assert not plain.ntk.requires_grad
    a = x1.clone().requires_grad_(True)
    with torch.no_grad():
        assert not net.kernel(a, x2).ntk.requires_grad
    tracked = net.kernel(a, x2)
    assert tracked.ntk.requires_grad
    _close(tracked.ntk.detach(), plain.ntk, 1e-14)
    _close(tracked.nngp.detach(), plain.nngp, 1e-14)


def test_masked_inputs_gradient():
    """With masks (absent positions are zeros), the gradient at absent positions of
    x1 is 0 and along present ones it matches central differences: side inputs
    travel with the tiles of a differentiable kernel too."""
    x1, x2 = _data(6, 3, 2, 6), _data(7, 2, 2, 6)
    m1 = torch.ones(3, 6, dtype=torch.bool)
    m1[0, 4:] = False
    m2 = torch.ones(2, 6, dtype=torch.bool)
    m2[1, 3:] = False
    net = nk.Sequential(nk.Conv1d(6, 1, w_std=1.2, b_std=0.1), nk.SelfAttention(6, 2, b_std=0.2),
                        nk.ReLU(), nk.GlobalAvgPool(), nk.Linear(1))

    def f(a):
        k = net.kernel(a, x2, mask=(m1, m2), memory_budget=8 * 36 * 24 * 2)
        return k.ntk.sum() + k.nngp.sum()

    a = x1.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(a), a)
    assert torch.isfinite(g).all()
    assert float(g[0, :, 4:].abs().max()) == 0.0
    d = _directions((x1,), 40)[0] * m1.unsqueeze(1)
    want = _directional_fd(f, (x1,), (d,))
    got = float((g * d).sum())
    assert abs(got - want) <= FD_RTOL * abs(want), (got, want)

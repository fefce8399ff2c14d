"""Property tests on random fully-connected architectures (hypothesis).

A strategy draws random ntkit networks from the closed-form layer algebra
(Linear in both parameterizations, the closed-form activations, residual and
concatenating branches, LayerNorm) and random float64 inputs; the tests check
properties every NNGP/NTK must have whatever the architecture: symmetry,
positive semi-definiteness, transposition, independence of the tiling, agreement
of the diagonal paths, and float32 ~ float64.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import ntkit as nk
from ntkit.errors import NonFiniteError
from ntkit._budget import tile_sides

#: Examples per property; NTKIT_PROPERTY_EXAMPLES=2000 for a longer hunt.
SETTINGS = settings(
    max_examples=int(os.environ.get("NTKIT_PROPERTY_EXAMPLES", 60)), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# ---------------------------------------------------------------- strategies
_unit = st.floats(0.5, 2.0)
_small = st.floats(-1.0, 1.0)

#: The closed-form activations (their parameters drawn too).
_bounded_growth = [
    st.just(nk.ReLU()),
    st.builds(nk.LeakyReLU, st.floats(0.0, 0.5)),
    st.builds(nk.ABReLU, _small, _small),
    st.just(nk.Abs()),
    st.builds(nk.Erf, _unit, _unit, st.floats(-0.5, 0.5)),
    st.just(nk.GELU()),
    st.builds(nk.Sin, _unit, _unit, st.floats(-math.pi, math.pi)),
    st.builds(nk.Cos, _unit, _unit, st.floats(-math.pi, math.pi)),
    st.builds(nk.Rbf, st.floats(0.1, 2.0)),
    st.builds(nk.RectifiedMonomial, st.integers(0, 1)),
]
#: Activations whose output variance is a power or exponential of the input variance:
#: stacked, they reach variances of 1e9 and more.
_fast_growth = [
    st.builds(nk.Exp, _unit, st.floats(-0.4, 0.4)),
    st.builds(nk.Monomial, st.integers(1, 3)),
    st.just(nk.RectifiedMonomial(2)),
]
activations = st.one_of(*_bounded_growth, *_fast_growth)
#: For float32, whose formulas cancel catastrophically at such variances (e.g. Erf's
#: (1 + 2 v1)(1 + 2 v2) - 4 k^2 at v ~ 1e9 is all rounding in float32).
moderate_activations = st.one_of(*_bounded_growth)


@st.composite
def linears(draw, width: int | None = None) -> nk.Linear:
    """A Linear of random width (or the given one), w_std, b_std and parameterization."""
    out = width if width is not None else draw(st.integers(1, 64))
    b_std = draw(st.one_of(st.none(), st.just(0.0), st.floats(0.05, 1.5)))
    return nk.Linear(
        out,
        w_std=draw(st.floats(0.5, 2.0)),
        b_std=b_std,
        parameterization=draw(st.sampled_from(["ntk", "standard"])),
    )


@st.composite
def blocks(draw, width: int, acts=activations) -> tuple[list[nk.Layer], int]:
    """Layers taking Gaussian features of `width` to Gaussian features; the new width."""
    kind = draw(st.sampled_from(["plain", "plain", "plain", "layernorm", "residual", "concat"]))
    if kind in ("plain", "layernorm"):
        lin = draw(linears())
        pre = [nk.LayerNorm()] if kind == "layernorm" else []
        return pre + [draw(acts), lin], lin.out_features
    if kind == "residual":
        # x + Linear(act(x)): the residual branch keeps the width.
        lin = draw(linears(width))
        return [
            nk.FanOut(2),
            nk.Parallel(nk.Sequential(draw(acts), lin), nk.Identity()),
            nk.FanInSum(),
        ], width
    # Two branches of different widths, concatenated.
    a = draw(linears())
    b = draw(linears().filter(lambda lin: lin.out_features != a.out_features))
    return [
        nk.FanOut(2),
        nk.Parallel(nk.Sequential(draw(acts), a), nk.Sequential(draw(acts), b)),
        nk.FanInConcat(),
    ], a.out_features + b.out_features


@st.composite
def networks(draw, acts=activations) -> nk.Sequential:
    """Linear, then 0-3 random blocks, then an activation and a Linear readout:
    1-4 nonlinear layers on any path."""
    first = draw(linears())
    layers: list[nk.Layer] = [first]
    width = first.out_features
    for _ in range(draw(st.integers(0, 3))):
        more, width = draw(blocks(width, acts))
        layers += more
    layers += [draw(acts), draw(linears(draw(st.integers(1, 3))))]
    return nk.Sequential(*layers)


@st.composite
def inputs(draw, n: int | None = None, features: int | None = None) -> torch.Tensor:
    """A float64 batch (n, features): Gaussian rows of random scale, seeded by hypothesis."""
    n = n if n is not None else draw(st.integers(1, 12))
    features = features if features is not None else draw(st.integers(3, 10))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.floats(0.3, 1.5))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen, dtype=torch.float64) * scale


@st.composite
def ragged(draw, side: int) -> int:
    """A batch size with several tiles of `side` rows, the last one partial (unless side=1)."""
    if side == 1:
        return draw(st.integers(2, 12))
    return side * draw(st.integers(1, 12 // side)) + draw(st.integers(1, side - 1))


@st.composite
def net_and_batch(draw, n_min: int = 1, acts=activations):
    net = draw(networks(acts))
    x = draw(inputs(n=draw(st.integers(n_min, 12))))
    return net, x


def _finite(k: nk.Kernel) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (k.nngp, k.ntk, k.cov1, k.cov2))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-7) -> None:
    """Equal up to rounding relative to the largest entry (kernels span decades).

    The default 1e-7 (not 1e-15) is rounding amplified by arccos near correlation 1:
    hypothesis finds parallel rows x2_i = c x1_i, whose correlation is 1 up to rounding
    of the matmul, and d/dc arccos(c) ~ (1 - c)^(-1/2) turns 1e-16 into ~1e-8.
    """
    scale = max(float(b.abs().max()), 1e-300)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def _budget_for_side(side: int, dtype: torch.dtype) -> int:
    """The memory_budget (bytes) under which CPU tiles are side x side (see compute.tile_sides:
    entries = budget // (element_size * 24), side = isqrt(entries))."""
    return side * side * torch.empty((), dtype=dtype).element_size() * 24


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("field", ["nngp", "ntk"])
@SETTINGS
@given(case=net_and_batch())
def test_self_kernel_is_symmetric_psd(field, case):
    """k(x, x) is a covariance (NNGP) / Gram matrix of gradients (NTK): symmetric and
    positive semi-definite up to rounding."""
    net, x = case
    try:
        k = net.kernel(x)
    except NonFiniteError:  # an overflow (e.g. stacked Exp) is refused, not returned
        assume(False)
    assume(_finite(k))
    m = getattr(k, field)
    assert m.shape == (x.shape[0], x.shape[0])
    torch.testing.assert_close(m, m.T, rtol=1e-12, atol=1e-12 * float(m.abs().max()))
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    assert float(eig[0]) >= -1e-8 * max(float(eig[-1]), 0.0), (
        f"{field} has eigenvalue {float(eig[0]):.3e} vs max {float(eig[-1]):.3e}\n{net!r}"
    )


@SETTINGS
@given(data=st.data())
def test_cross_kernel_is_transpose_of_swapped(data):
    """k(x1, x2) == k(x2, x1)^T for NNGP, NTK, and cov1/cov2 swap."""
    net = data.draw(networks())
    x1 = data.draw(inputs())
    x2 = data.draw(inputs(features=x1.shape[1]))
    k12, k21 = net.kernel(x1, x2), net.kernel(x2, x1)
    assume(_finite(k12))
    assert k12.nngp.shape == (x1.shape[0], x2.shape[0])
    _close(k12.nngp, k21.nngp.T)
    _close(k12.ntk, k21.ntk.T)
    _close(k12.cov1, k21.cov2)
    _close(k12.cov2, k21.cov1)


@SETTINGS
@given(data=st.data())
def test_tiled_cross_kernel_equals_whole(data):
    """Under a tiny memory_budget the x1-x2 kernel is assembled from several ragged tiles
    (N not divisible by the tile side) and equals the one-tile result."""
    side = data.draw(st.integers(1, 4), label="tile side")
    n1, n2 = data.draw(ragged(side), label="n1"), data.draw(ragged(side), label="n2")
    net = data.draw(networks())
    x1 = data.draw(inputs(n=n1))
    x2 = data.draw(inputs(n=n2, features=x1.shape[1]))
    budget = _budget_for_side(side, x1.dtype)
    assert tile_sides(n1, n2, x1.element_size(), budget, x1.device) == (side, side)
    whole = net.kernel(x1, x2)
    tiled = net.kernel(x1, x2, memory_budget=budget)
    assume(_finite(whole))
    for f in ("nngp", "ntk", "cov1", "cov2"):
        _close(getattr(tiled, f), getattr(whole, f))
    # distinct tensors stay a cross kernel, equal values or not (only x itself merges)
    assert not tiled.x1_is_x2 and not whole.x1_is_x2 and not tiled.diagonal


@SETTINGS
@given(data=st.data())
def test_tiled_self_kernel_equals_whole(data):
    """x2=None under a tiny budget: only tiles on and above the diagonal are computed and
    mirrored; the result equals the one-tile k(x, x) and is exactly symmetric."""
    side = data.draw(st.integers(1, 4), label="tile side")
    n = data.draw(ragged(side), label="n")
    net = data.draw(networks())
    x = data.draw(inputs(n=n))
    budget = _budget_for_side(side, x.dtype)
    whole = net.kernel(x)
    tiled = net.kernel(x, memory_budget=budget)
    assume(_finite(whole))
    for f in ("nngp", "ntk", "cov1", "cov2"):
        _close(getattr(tiled, f), getattr(whole, f))
    assert torch.equal(tiled.nngp, tiled.nngp.T)
    assert torch.equal(tiled.ntk, tiled.ntk.T)
    assert tiled.x1_is_x2


def test_budget_string_gives_same_kernel_as_bytes():
    """memory_budget given as a string ("3.072KB" = 3072 bytes = 4x4 float64 tiles) tiles the
    same way as the int and gives the same kernel."""
    net = nk.Sequential(nk.Linear(8, b_std=0.2), nk.Erf(), nk.Linear(1))
    x = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert nk.parse_memory("3.072KB") == _budget_for_side(4, torch.float64)
    a = net.kernel(x, memory_budget="3.072KB")
    b = net.kernel(x)
    _close(a.nngp, b.nngp, 1e-12)
    _close(a.ntk, b.ntk, 1e-12)


def _abs_step_relu_net() -> nk.Sequential:
    """Found by hypothesis: each arccos-based layer takes the square root of the previous
    layer's rounding error at correlation ~1 (1e-16 -> 1e-8 -> 1e-4)."""
    return nk.Sequential(nk.Linear(1, w_std=0.86, b_std=None), nk.Abs(),
                         nk.Linear(1, b_std=None), nk.RectifiedMonomial(0),
                         nk.Linear(1, b_std=None), nk.ReLU(), nk.Linear(1, b_std=None))


#: Row 75 of this batch hits a 1 - ulp correlation in the step layer.
_X_SEED3 = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@SETTINGS
@given(case=net_and_batch(), side=st.integers(1, 3))
@example(case=(_abs_step_relu_net(), _X_SEED3[70:80]), side=1)
def test_diagonal_equals_diagonal_of_full(case, side):
    """diagonal=True (tiled too) gives the diagonal of the full k(x, x), and cov1 (and cov2)
    of the full kernel are that same diagonal of the NNGP.

    Tolerance 1e-7 rather than 1e-15: the full path's self-pair NTK goes through arccos at
    correlation 1 - ulp (see test_self_pairs_exact_for_relu), which costs ~1e-8 per layer.
    """
    net, x = case
    full = net.kernel(x)
    assume(_finite(full))
    diag = net.kernel(x, diagonal=True)
    diag_tiled = net.kernel(x, diagonal=True, memory_budget=_budget_for_side(side, x.dtype))
    assert diag.diagonal and diag.nngp.shape == (x.shape[0],)
    for d in (diag, diag_tiled):
        _close(d.nngp, full.nngp.diagonal(), 1e-7)
        _close(d.ntk, full.ntk.diagonal(), 1e-7)
        _close(d.cov1, full.cov1, 1e-7)
    _close(full.cov1, full.nngp.diagonal(), 1e-10)
    _close(full.cov2, full.nngp.diagonal(), 1e-10)


def _relu_relu_net() -> nk.Sequential:
    return nk.Sequential(nk.Linear(4, b_std=None), nk.ReLU(), nk.Linear(4, b_std=None),
                         nk.ReLU(), nk.Linear(1))


@pytest.mark.parametrize("mode", ["full", "diagonal=True"])
def test_self_pairs_exact_for_relu(mode):
    """Self-pairs have correlation exactly 1, so for Linear-ReLU-Linear-ReLU-Linear (NTK
    parameterization, no bias) with q = |x|^2 / d the diagonal is exactly
    nngp = q/4, ntk = q/4 + q/2 = 3q/4 (E[relu'(X)^2] = 1/2): no arccos rounding
    (sqrt(eps) ~ 1e-8 relative) should reach it, in either path.
    """
    x = torch.randn(200, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = (x * x).mean(1)
    k = _relu_relu_net().kernel(x, diagonal=mode != "full")
    nngp, ntk = (k.nngp.diagonal(), k.ntk.diagonal()) if mode == "full" else (k.nngp, k.ntk)
    torch.testing.assert_close(nngp, q / 4, rtol=1e-13, atol=0)
    torch.testing.assert_close(ntk, 3 * q / 4, rtol=1e-13, atol=0)


def test_diagonal_mode_nngp_equals_its_cov1():
    """In a diagonal kernel nngp[i] and cov1[i] are the same quantity k(x_i, x_i); after a
    ReLU and a step (RectifiedMonomial(0)) they must still agree to rounding."""
    x = torch.randn(200, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    net = nk.Sequential(nk.Linear(4, b_std=None), nk.ReLU(), nk.Linear(4, b_std=None),
                        nk.RectifiedMonomial(0), nk.Linear(1))
    d = net.kernel(x, diagonal=True)
    torch.testing.assert_close(d.nngp, d.cov1, rtol=1e-13, atol=0)
    torch.testing.assert_close(d.nngp, net.kernel(x).nngp.diagonal(), rtol=1e-13, atol=0)


def test_diagonal_mode_error_does_not_compound_with_depth():
    """Through Abs -> step -> ReLU the diagonal=True NTK must stay within 1e-7 of the full
    kernel's diagonal; an error that is square-rooted at every arccos layer reaches ~1e-5."""
    x = _X_SEED3
    net = _abs_step_relu_net()
    full, d = net.kernel(x), net.kernel(x, diagonal=True)
    torch.testing.assert_close(d.ntk, full.ntk.diagonal(), rtol=1e-7, atol=0)
    torch.testing.assert_close(d.nngp, full.nngp.diagonal(), rtol=1e-7, atol=0)


@SETTINGS
@given(data=st.data())
def test_cov_of_cross_kernel_is_self_diagonal(data):
    """For k(x1, x2), cov1 is the NNGP diagonal of k(x1, x1) and cov2 that of k(x2, x2)."""
    net = data.draw(networks())
    x1 = data.draw(inputs())
    x2 = data.draw(inputs(features=x1.shape[1]))
    k = net.kernel(x1, x2)
    assume(_finite(k))
    _close(k.cov1, net.kernel(x1).nngp.diagonal(), 1e-10)
    _close(k.cov2, net.kernel(x2).nngp.diagonal(), 1e-10)


@SETTINGS
@given(case=net_and_batch(acts=moderate_activations))
def test_float32_close_to_float64(case):
    """The kernel computed in float32 agrees with float64 to float32 accuracy (loosely:
    arccos-based rules lose about half the digits near correlation 1). Activations of
    polynomial/exponential growth are left out (see `moderate_activations`)."""
    net, x = case
    k64 = net.kernel(x)
    # float32 holds 1e-38 .. 3e38: skip kernels outside its range (e.g. ABReLU(0, 1e-31)).
    for m in (k64.nngp, k64.ntk):
        assume(_finite(k64) and 1e-30 < float(m.abs().max()) < 1e30)
    k32 = net.kernel(x.float())
    assert k32.dtype == torch.float32
    for f in ("nngp", "ntk", "cov1"):
        a, b = getattr(k32, f).double(), getattr(k64, f)
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3 * scale,
                                   msg=lambda m, f=f: f"{f}: {m}\n{net!r}")

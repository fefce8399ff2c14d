"""Kernels are differentiable in the affine layers' ``w_std`` and ``b_std``.

Given as 0-dim tensors, the weight and bias standard deviations of `Linear` and
the convolutions carry autograd through the kernel rules, through tiles (also
tiles recomputed in the backward pass) and into the GP log marginal likelihood
of `ntkit.predict.gp_inference`, so that they can be fitted by gradient ascent.

Witnesses: central finite differences of the same function evaluated with Python
float hyperparameters (an independent path through the non-differentiable code),
the single-tile gradient for tiled ones, and the float kernel bit for bit.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import ntkit as nk
import ntkit.tiling
from ntkit import predict

D = torch.float64
#: Central differences with step ``FD_STEP``: truncation ~ step^2 f''' and rounding
#: ~ eps |f| / step, both far below 1e-6 of the gradient for these O(1)-conditioned
#: likelihoods; a wrong rule (a missing factor, a detached term) is off by O(1).
FD_STEP = 1e-5
FD_RTOL = 1e-6
#: Tiled and single-tile gradients differ only by the order of sums.
TILE_RTOL = 1e-10


def _data(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


X_TRAIN, X_TEST = _data(0, 9, 4), _data(1, 4, 4)
IMG_TRAIN, IMG_TEST = _data(2, 6, 2, 4, 4), _data(3, 3, 2, 4, 4)


def _mlp(act):
    def make(ws, bs):
        return nk.Sequential(
            nk.Linear(16, w_std=ws[0], b_std=bs[0]), act(),
            nk.Linear(16, w_std=ws[1], b_std=bs[1]), act(),
            nk.Linear(1, w_std=ws[2], b_std=bs[2]),
        )
    return make


def _cnn(ws, bs):
    return nk.Sequential(
        nk.Conv2d(4, 3, padding="same", w_std=ws[0], b_std=bs[0]), nk.ReLU(),
        nk.Conv2d(4, 3, w_std=ws[1], b_std=bs[1]), nk.ReLU(),
        nk.GlobalAvgPool(), nk.Linear(1, w_std=ws[2], b_std=bs[2]),
    )


#: name -> (network from per-layer w_std and b_std, train inputs, test inputs,
#: a budget that forces several tiles of k(x_train) and of k(x_test, x_train))
ARCHS = {
    "mlp-relu": (_mlp(nk.ReLU), X_TRAIN, X_TEST, 8 * 24 * 9),
    "mlp-erf": (_mlp(nk.Erf), X_TRAIN, X_TEST, 8 * 24 * 9),
    # Pooling needs every pair of positions: 16^2 numbers per input pair; ~4 pairs
    # per tile, and the tiles replay a self trace recorded beforehand.
    "cnn-globalavgpool": (_cnn, IMG_TRAIN, IMG_TEST, 8 * 16**2 * 24 * 4),
}
#: Budgets of one example per tile of the diagonal kernel.
DIAGONAL_BUDGET = {"mlp-relu": 8 * 24, "mlp-erf": 8 * 24, "cnn-globalavgpool": 8 * 16**2 * 24}
W0 = (1.3, 0.9, 1.1)
B0 = (0.4, 0.2, 0.3)
Y_TRAIN = {name: torch.sin(3 * x.flatten(1).sum(1, keepdim=True) / x[0].numel() ** 0.5)
           for name, (_, x, _, _) in ARCHS.items()}


def _objective(name: str, get: str, ws, bs, memory_budget=None) -> torch.Tensor:
    """The GP log marginal likelihood of the training targets plus the sum of the
    posterior mean at the test inputs (so that k(x_test, x_train) matters too)."""
    make, x, x_test, _ = ARCHS[name]
    net = make(ws, bs)
    k_train = getattr(net.kernel(x, memory_budget=memory_budget), get)
    k_test_train = getattr(net.kernel(x_test, x, memory_budget=memory_budget), get)
    post = predict.gp_inference(k_train, Y_TRAIN[name], k_test_train, diag_reg=1e-2)
    return post.log_marginal_likelihood + post.mean.sum()


def _autograd(name, get, memory_budget=None):
    ws = torch.tensor(W0, dtype=D, requires_grad=True)
    bs = torch.tensor(B0, dtype=D, requires_grad=True)
    value = _objective(name, get, ws.unbind(), bs.unbind(), memory_budget)
    return torch.autograd.grad(value, (ws, bs))


def _finite_differences(name, get) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of `_objective`, every hyperparameter a Python float."""
    grads = []
    for which in range(2):
        g = torch.empty(3, dtype=D)
        for i in range(3):
            values = []
            for sign in (1, -1):
                params = [list(W0), list(B0)]
                params[which][i] += sign * FD_STEP
                with torch.no_grad():
                    values.append(float(_objective(name, get, *params)))
            g[i] = (values[0] - values[1]) / (2 * FD_STEP)
        grads.append(g)
    return grads[0], grads[1]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    err = float((got - want).abs().max()) / float(want.abs().max())
    assert err < rtol, f"relative error {err:.2e}: got {got.tolist()}, want {want.tolist()}"


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_gradient_matches_finite_differences(name, get):
    """The gradient in (w_std, b_std) of every layer of the LML plus the posterior mean,
    by autograd through the kernel rules, equals central differences of the same
    function computed with float hyperparameters."""
    gw, gb = _autograd(name, get)
    fw, fb = _finite_differences(name, get)
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert float(gw.abs().min()) > 1e-3  # every layer matters: the check can fail
    _close(gw, fw, FD_RTOL)
    _close(gb, fb, FD_RTOL)


@pytest.fixture
def tiles(monkeypatch) -> dict[str, int]:
    """Counts the tiles `net.kernel` computes (forward and recomputed), by kind."""
    counts = {"k(x)": 0, "k(x', x)": 0, "diagonal": 0}
    original = ntkit.tiling._tile

    def counted(rule, x1, x2, r, c, diagonal, *args):
        counts["diagonal" if diagonal else "k(x)" if x2 is None else "k(x', x)"] += 1
        return original(rule, x1, x2, r, c, diagonal, *args)

    monkeypatch.setattr(ntkit.tiling, "_tile", counted)
    return counts


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_gradient_through_tiles(name, get, tiles):
    """With a budget that forces several tiles of both kernels (concatenated, each
    recomputed in the backward pass), the gradient equals the single-tile one to
    rounding, and so the finite differences of the test above."""
    budget = ARCHS[name][3]
    ws = torch.tensor(W0, dtype=D, requires_grad=True)
    bs = torch.tensor(B0, dtype=D, requires_grad=True)
    value = _objective(name, get, ws.unbind(), bs.unbind(), memory_budget=budget)
    forward = dict(tiles)
    gw, gb = torch.autograd.grad(value, (ws, bs))
    assert forward["k(x)"] >= 3 and forward["k(x', x)"] >= 3, forward
    assert tiles == {k: 2 * n for k, n in forward.items()}  # each recomputed once
    ref_w, ref_b = _autograd(name, get)
    _close(gw, ref_w, TILE_RTOL)
    _close(gb, ref_b, TILE_RTOL)


@pytest.mark.parametrize("name", list(ARCHS))
def test_diagonal_kernel_gradient_through_tiles(name, tiles):
    """``diagonal=True`` with one example per tile: the gradient of sum(log ntk_ii)
    matches central differences."""
    make, x = ARCHS[name][:2]
    budget = DIAGONAL_BUDGET[name]

    def f(ws, bs, memory_budget):
        return make(ws, bs).kernel(x, diagonal=True, memory_budget=memory_budget).ntk.log().sum()

    ws = torch.tensor(W0, dtype=D, requires_grad=True)
    bs = torch.tensor(B0, dtype=D, requires_grad=True)
    gw, gb = torch.autograd.grad(f(ws.unbind(), bs.unbind(), budget), (ws, bs))
    assert tiles["diagonal"] == 2 * x.shape[0]  # one example per tile, recomputed once
    fd = []
    for which, base in ((0, W0), (1, B0)):
        g = torch.empty(3, dtype=D)
        for i in range(3):
            vals = []
            for sign in (1, -1):
                params = [list(W0), list(B0)]
                params[which][i] = base[i] + sign * FD_STEP
                vals.append(float(f(*params, budget)))
            g[i] = (vals[0] - vals[1]) / (2 * FD_STEP)
        fd.append(g)
    _close(gw, fd[0], FD_RTOL)
    _close(gb, fd[1], FD_RTOL)


# torch.func.jvp (Elementwise's derivative) under autograd loads decompositions that
# still use torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("act", [nk.ReLU, nk.Erf, lambda: nk.Elementwise(torch.tanh, degree=16)],
                         ids=["ReLU", "Erf", "Elementwise-tanh"])
def test_duplicate_inputs_give_finite_gradients(act):
    """An input paired with itself or a duplicate has correlation exactly 1, where
    arccos and the quadrature's square root have infinite slopes; the correlation
    stays 1 for any hyperparameter, so the gradient is finite. Witness: central
    differences of the same function built from the kernel of the distinct inputs,
    whose pairs of an input with itself the rules set exactly (differences of the
    kernel with duplicates would see the sqrt(eps) rounding of arccos near 1)."""
    distinct = X_TRAIN[:4]
    dup = [0, 1, 2, 3, 0, 1]
    make = _mlp(act)

    def f(k_cross, k_sym):
        return k_cross.nngp.sin().sum() + k_cross.ntk.cos().sum() + k_sym.ntk.sin().sum()

    def with_duplicates(ws, bs):
        net, x = make(ws, bs), distinct[dup]
        return f(net.kernel(distinct[:3], x), net.kernel(x))

    quadrature = isinstance(make(W0, B0)[1], nk.Elementwise)

    def from_distinct(ws, bs):
        net = make(ws, bs)
        k = net.kernel(distinct)
        # k(x) averages its diagonal tiles with their transpose (exact symmetry), as
        # k(distinct[dup]) does. Closed forms round (i, j) and (j, i) alike up to ulps, so
        # k's exact self-pairs serve the cross part too; quadrature's error is not
        # symmetric (~1e-3 at degree 16), so its cross part comes from the cross kernel,
        # as with_duplicates computes it.
        k_cross = net.kernel(distinct, distinct.clone()) if quadrature else k
        return f(k_cross[:3, dup], k[dup, dup])

    ws = torch.tensor(W0, dtype=D, requires_grad=True)
    bs = torch.tensor(B0, dtype=D, requires_grad=True)
    gw, gb = torch.autograd.grad(with_duplicates(ws.unbind(), bs.unbind()), (ws, bs))
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()
    fd = []
    for which, base in ((0, W0), (1, B0)):
        g = torch.empty(3, dtype=D)
        for i in range(3):
            vals = []
            for sign in (1, -1):
                params = [list(W0), list(B0)]
                params[which][i] = base[i] + sign * FD_STEP
                vals.append(float(from_distinct(*params)))
            g[i] = (vals[0] - vals[1]) / (2 * FD_STEP)
        fd.append(g)
    _close(gw, fd[0], FD_RTOL)
    _close(gb, fd[1], FD_RTOL)


def _shared(act):
    """Dense network with one w_std and one b_std shared by its three affine layers."""
    return lambda w, b: _mlp(act)((w,) * 3, (b,) * 3)


class _TanhWithoutJvp(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule: Elementwise falls back to
    reverse mode for its derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


SEQ = _data(4, 4, 3, 5)
#: Networks through every kind of layer, each with one w_std and one b_std shared by
#: all its affine layers: name -> (network from (w, b), inputs).
LAYERS = {
    "LeakyReLU": (_shared(lambda: nk.LeakyReLU(0.1)), X_TRAIN),
    "Abs": (_shared(nk.Abs), X_TRAIN),
    "GELU": (_shared(nk.GELU), X_TRAIN),
    "Sin": (_shared(nk.Sin), X_TRAIN),
    "Rbf": (_shared(nk.Rbf), X_TRAIN),
    "Exp": (_shared(lambda: nk.Exp(b=0.3)), X_TRAIN),
    "Gaussian": (_shared(nk.Gaussian), X_TRAIN),
    "Monomial": (_shared(lambda: nk.Monomial(2)), X_TRAIN),
    "RectifiedMonomial": (_shared(lambda: nk.RectifiedMonomial(2)), X_TRAIN),
    "Sign": (_shared(nk.Sign), X_TRAIN),
    "Elementwise": (_shared(lambda: nk.Elementwise(torch.tanh, degree=12)), X_TRAIN),
    "Elementwise-reverse-mode": (
        _shared(lambda: nk.Elementwise(_TanhWithoutJvp.apply, degree=12)), X_TRAIN),
    "LayerNorm-Dropout": (lambda w, b: nk.Sequential(
        nk.Linear(8, w_std=w, b_std=b), nk.LayerNorm(), nk.ReLU(), nk.Dropout(0.2),
        nk.Linear(1, w_std=w, b_std=b)), X_TRAIN),
    "residual-concat-prod": (lambda w, b: nk.Sequential(
        nk.Linear(8, w_std=w, b_std=b), nk.FanOut(2),
        nk.Parallel(nk.Sequential(nk.ReLU(), nk.Linear(8, w_std=w, b_std=b)), nk.Identity()),
        nk.FanInSum(), nk.FanOut(2), nk.Parallel(nk.ReLU(), nk.Erf()), nk.FanInConcat(),
        nk.Linear(8, w_std=w, b_std=b), nk.FanOut(2), nk.FanInProd(),
        nk.Linear(1, w_std=w, b_std=None)), X_TRAIN),
    "standard-parameterization": (lambda w, b: nk.Sequential(
        nk.Linear(8, w_std=w, b_std=b, parameterization="standard"), nk.ReLU(),
        nk.Linear(1, w_std=w, b_std=b, parameterization="standard")), X_TRAIN),
    "conv-stride-flatten": (lambda w, b: nk.Sequential(
        nk.Conv2d(4, 2, stride=2, padding=1, w_std=w, b_std=b), nk.Erf(), nk.Flatten(),
        nk.Linear(1, w_std=w, b_std=b)), IMG_TRAIN),
    "conv-avgpool-standard": (lambda w, b: nk.Sequential(
        nk.Conv2d(4, 3, padding="circular", w_std=w, b_std=b), nk.ReLU(), nk.AvgPool2d(2),
        nk.Conv2d(4, 2, w_std=w, b_std=None, parameterization="standard"), nk.ReLU(),
        nk.Flatten(), nk.Linear(1, w_std=w, b_std=b)), IMG_TRAIN),
    "conv1d-layernorm-sumpool": (lambda w, b: nk.Sequential(
        nk.Conv1d(4, 3, padding="same", padding_mode="reflect", w_std=w, b_std=b),
        nk.LayerNorm(axis="all"), nk.ReLU(), nk.SumPool1d(2), nk.GlobalAvgPool(),
        nk.Linear(1, w_std=w, b_std=b)), SEQ),
    "conv3d": (lambda w, b: nk.Sequential(
        nk.Conv3d(3, 2, padding="same", w_std=w, b_std=b), nk.ReLU(), nk.GlobalSumPool(),
        nk.Linear(1, w_std=w, b_std=b)), IMG_TRAIN[:4, :, None]),
    "attention": (lambda w, b: nk.Sequential(
        nk.Conv1d(4, 1, w_std=w, b_std=b), nk.SelfAttention(4, n_heads=2), nk.ReLU(),
        nk.GlobalAvgPool(), nk.Linear(1, w_std=w, b_std=b)), SEQ),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:one pair of inputs needs")  # memory_budget=1
@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_passes_gradients(name):
    """Through every kind of layer: the gradient in (w_std, b_std) of a linear function
    of both kernels matches central differences with float hyperparameters, in one tile
    and with one pair of inputs per tile (tiles recomputed in the backward pass, where
    an in-place write over a tensor autograd saved would go unnoticed). Tiles are
    compared with differences of the tiled kernel: Elementwise's quadrature is not
    symmetric in the two inputs, so mirrored tiles differ from one tile by its error."""
    make, x = LAYERS[name]
    n = x.shape[0]
    weights = _data(6, 2, n, n)

    def f(w, b, memory_budget):
        k = make(w, b).kernel(x, memory_budget=memory_budget)
        return (k.nngp * weights[0]).sum() + (k.ntk * weights[1]).sum()

    for memory_budget in (None, 1):
        params = torch.tensor([1.3, 0.4], dtype=D, requires_grad=True)
        (grad,) = torch.autograd.grad(f(*params.unbind(), memory_budget), params)
        fd = torch.empty(2, dtype=D)
        for i in range(2):
            vals = []
            for sign in (1, -1):
                p = [1.3, 0.4]
                p[i] += sign * FD_STEP
                with torch.no_grad():
                    vals.append(float(f(*p, memory_budget)))
            fd[i] = (vals[0] - vals[1]) / (2 * FD_STEP)
        _close(grad, fd, FD_RTOL)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires-grad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_tensor_hyperparameters_give_the_float_kernel_exactly(name, dtype, requires_grad):
    """float64 0-dim tensors give bit for bit the kernel of the same Python floats, in
    the inputs' dtype, for k(x), k(x', x) and the diagonal, in one tile and several."""
    make, x, x_test, budget = ARCHS[name]
    x, x_test = x.to(dtype), x_test.to(dtype)
    ref_net = make(W0, B0)
    net = make(torch.tensor(W0, dtype=D, requires_grad=requires_grad).unbind(),
               torch.tensor(B0, dtype=D, requires_grad=requires_grad).unbind())
    for memory_budget in (None, budget):
        for args, kwargs in (((x,), {}), ((x_test, x), {}), ((x,), {"diagonal": True})):
            want = ref_net.kernel(*args, memory_budget=memory_budget, **kwargs)
            got = net.kernel(*args, memory_budget=memory_budget, **kwargs)
            assert got.nngp.requires_grad == requires_grad
            for field in ("nngp", "ntk", "cov1", "cov2"):
                a, b = getattr(got, field), getattr(want, field)
                assert a.dtype == dtype and torch.equal(a.detach(), b), (field, memory_budget,
                                                                         kwargs)


def test_no_graph_under_no_grad():
    """Under torch.no_grad() a tensor that requires grad gives a plain kernel (the fast
    path, written in place into preallocated outputs)."""
    w = torch.tensor(1.5, dtype=D, requires_grad=True)
    net = nk.Sequential(nk.Linear(8, w_std=w), nk.ReLU(), nk.Linear(1, w_std=w))
    with torch.no_grad():
        k = net.kernel(X_TRAIN, memory_budget=8 * 24 * 9)
    assert not k.nngp.requires_grad and not k.ntk.requires_grad
    assert net.kernel(X_TRAIN).ntk.requires_grad


def test_hyperparameters_lists_the_tensors_once():
    """`Layer.hyperparameters()` finds tensor hyperparameters in nested containers,
    each once (Repeat reuses one layer), and no Python numbers."""
    w = torch.tensor(1.5, requires_grad=True)
    b = torch.tensor(0.1)
    block = nk.Sequential(nk.Conv1d(4, 3, w_std=w, b_std=0.2), nk.ReLU())
    net = nk.Sequential(nk.Repeat(block, 3), nk.Flatten(), nk.Linear(1, w_std=1.0, b_std=b))
    found = net.hyperparameters()
    assert len(found) == 2 and found[0] is w and found[1] is b
    assert nk.Sequential(nk.Linear(3), nk.ReLU()).hyperparameters() == []


@pytest.mark.parametrize("layer", [
    lambda **kw: nk.Linear(3, **kw),
    lambda **kw: nk.Conv2d(3, 2, **kw),
], ids=["Linear", "Conv2d"])
def test_build_and_repr_with_tensor_hyperparameters(layer):
    """The finite twin takes the tensors' values (it is not differentiable in them) and
    draws the same parameters as with floats; repr shows the values."""
    shape = (5,) if isinstance(layer(), nk.Linear) else (2, 4, 4)
    w = torch.tensor(1.5, dtype=D, requires_grad=True)
    with_tensors = layer(w_std=w * 1.0, b_std=torch.tensor(0.25)).build(
        shape, generator=torch.Generator().manual_seed(0), dtype=D)
    with_floats = layer(w_std=1.5, b_std=0.25).build(
        shape, generator=torch.Generator().manual_seed(0), dtype=D)
    x = _data(5, 2, *shape)
    assert torch.equal(with_tensors(x), with_floats(x))
    text = repr(layer(w_std=w, b_std=torch.tensor(0.25)))
    assert "w_std=1.5" in text and "b_std=0.25" in text


BAD = [
    (torch.tensor(-1.0), ValueError, [r"w_std must be finite and >= 0", r"w_std=-1\.0"]),
    (torch.tensor(float("nan"), requires_grad=True), ValueError, [r"finite and >= 0", r"nan"]),
    (torch.tensor(math.inf), ValueError, [r"finite and >= 0", r"inf"]),
    (torch.tensor([1.0, 2.0]), ValueError, [r"one number", r"shape \(2,\)", r"0-dim"]),
    (torch.ones(1, 1), ValueError, [r"shape \(1, 1\)", r"reshape\(\(\)\)"]),
    (torch.tensor(1.0 + 1.0j), TypeError, [r"real number", r"complex"]),
    (torch.tensor(2), TypeError, [r"real number", r"torch\.int64", r"floating point"]),
    ("1.5", TypeError, [r"real number or a 0-dim tensor", r"str"]),
]


@pytest.mark.parametrize("value, exc, phrases", BAD,
                         ids=["negative", "nan", "inf", "vector", "matrix", "complex", "int",
                              "string"])
@pytest.mark.parametrize("layer", [
    lambda **kw: nk.Linear(3, **kw),
    lambda **kw: nk.Conv2d(3, 2, **kw),
    lambda **kw: nk.Conv1d(3, 2, **kw),
], ids=["Linear", "Conv2d", "Conv1d"])
def test_bad_tensor_hyperparameters_are_refused(layer, value, exc, phrases):
    """Bad values are refused at construction, as w_std and as b_std, naming the value."""
    for name in ("w_std", "b_std"):
        with pytest.raises(exc) as info:
            layer(**{name: value})
        message = str(info.value)
        assert name in message
        for phrase in phrases:
            assert re.search(phrase.replace("w_std", name), message), (phrase, message)


def test_fitting_hyperparameters_increases_the_likelihood():
    """30 Adam steps on -LML over (log w_std, log b_std, log noise) of a ReLU MLP (exp
    keeps them positive), from (1, 1, 1), on targets drawn from the GP of
    (1.4, 0.5, 0.01): the LML, evaluated with the fitted values as Python floats,
    rises by more than 15 nats and the noise falls below 0.2."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(30, 3, generator=gen, dtype=D)

    def mlp(w_std, b_std):
        return nk.Sequential(nk.Linear(64, w_std=w_std, b_std=b_std), nk.ReLU(),
                             nk.Linear(1, w_std=w_std, b_std=b_std))

    def lml(w_std, b_std, noise) -> torch.Tensor:
        k = mlp(w_std, b_std).kernel(x).nngp
        return predict.gp_inference(k, y, k[:2], diag_reg=noise,
                                    diag_reg_absolute_scale=True).log_marginal_likelihood

    with torch.no_grad():
        k_true = mlp(1.4, 0.5).kernel(x).nngp + 0.01 * torch.eye(30, dtype=D)
    y = torch.linalg.cholesky(k_true) @ torch.randn(30, 1, generator=gen, dtype=D)
    log_params = torch.zeros(3, dtype=D, requires_grad=True)
    opt = torch.optim.Adam([log_params], lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        loss = -lml(*log_params.exp().unbind())
        loss.backward()
        assert torch.isfinite(log_params.grad).all()
        opt.step()
    fitted = log_params.detach().exp().tolist()
    with torch.no_grad():
        before, after = float(lml(1.0, 1.0, 1.0)), float(lml(*fitted))
    assert after > before + 15, (before, after, fitted)
    assert fitted[2] < 0.2, fitted

"""nk.empirical_ntk against an explicit Jacobian product.

Witness: the Jacobian of the flattened outputs with respect to the flattened parameters,
built column by column with torch.autograd.functional.jacobian on the whole batch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ResidualLayerNorm
from torch import nn
from torch.func import functional_call

import ntkit as nk
from ntkit.empirical import _jacobian, _problem, _structured

F64 = torch.float64


def _explicit(model: nn.Module, x1, x2):
    """(N1, N2, O, O) and per-parameter parts from explicit Jacobians."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def jac(x):
        def f(*flat):
            out = functional_call(model, dict(zip(names, flat)), (x,))
            return out.reshape(x.shape[0], -1)
        js = torch.autograd.functional.jacobian(f, tuple(params[n] for n in names))
        return {n: j.reshape(j.shape[0], j.shape[1], -1) for n, j in zip(names, js)}

    j1, j2 = jac(x1), jac(x2)
    parts = {n: torch.einsum("iak,jbk->ijab", j1[n], j2[n]) for n in names}
    return sum(parts.values()), parts


def _mlp():
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def _Residual():
    return ResidualLayerNorm(torch.relu)


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                                batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, t):
        return self.out(self.layer(self.emb(t)).mean(1))


def _cases():
    g = torch.Generator().manual_seed(0)
    return [
        ("mlp", _mlp, torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g)),
        ("cnn", _cnn, torch.randn(3, 2, 6, 6, generator=g), torch.randn(2, 2, 6, 6, generator=g)),
        ("residual-layernorm", _Residual, torch.randn(3, 6, generator=g),
         torch.randn(2, 6, generator=g)),
        ("embedding-transformer", _Tokens, torch.randint(0, 11, (3, 5), generator=g),
         torch.randint(0, 11, (2, 5), generator=g)),
    ]


@pytest.mark.parametrize("method", ["jacobian", "vector_products", "structured", "auto"])
@pytest.mark.parametrize("name, make, x1, x2", _cases(), ids=[c[0] for c in _cases()])
def test_methods_match_explicit_jacobian_product(name, make, x1, x2, method):
    """Every method and output mode equals the explicit J1 J2^T (float64, <= 1e-10 relative);
    per-parameter parts sum to the whole and match the explicit per-parameter products."""
    torch.manual_seed(1)
    model = make().to(F64).eval()
    if x1.is_floating_point():
        x1, x2 = x1.to(F64), x2.to(F64)
    full, parts = _explicit(model, x1, x2)
    scale = full.abs().max()
    got = nk.empirical_ntk(model, x1, x2, output="full", method=method)
    assert (got - full).abs().max() <= 1e-10 * scale
    trace = nk.empirical_ntk(model, x1, x2, output="trace", method=method)
    assert (trace - torch.diagonal(full, 0, -2, -1).sum(-1)).abs().max() <= 1e-10 * scale
    diag = nk.empirical_ntk(model, x1, x2, output="diagonal", method=method)
    assert (diag - torch.diagonal(full, 0, -2, -1)).abs().max() <= 1e-10 * scale
    layers = nk.empirical_ntk_by_layer(model, x1, x2, by="parameter", output="full",
                                       method=method)
    assert set(layers) == set(parts)
    for n, part in parts.items():
        assert (layers[n] - part).abs().max() <= 1e-10 * scale, n


@pytest.mark.parametrize("method", ["structured", "jacobian", "vector_products"])
@pytest.mark.parametrize("make, shape", [(_mlp, (5,)), (_cnn, (2, 6, 6))], ids=["mlp", "cnn"])
def test_float32_matches_float64(make, shape, method):
    """float32 agrees with float64 to 1e-5 relative for every method (witness: the
    float64 kernel of the same model)."""
    torch.manual_seed(2)
    model = make()
    x = torch.randn(5, *shape)
    k32 = nk.empirical_ntk(model, x, output="full", method=method)
    k64 = nk.empirical_ntk(model.to(F64), x.to(F64), output="full", method=method)
    assert k32.dtype == torch.float32
    assert (k32.double() - k64).abs().max() <= 1e-5 * k64.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_cuda_matches_cpu(method):
    """On a GPU the kernel stays on the device and equals the CPU one (float64)."""
    torch.manual_seed(15)
    model = _cnn().to(F64)
    x = torch.randn(4, 2, 6, 6, dtype=F64)
    cpu = nk.empirical_ntk(model, x, output="full", method=method)
    gpu = nk.empirical_ntk(model.cuda(), x.cuda(), output="full", method=method)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() <= 1e-10 * cpu.abs().max()


def test_chunks_under_a_small_budget_give_the_same_kernel():
    """A budget that forces one-example chunks (no divisibility needed: N = 7) gives the
    same kernel as one chunk."""
    torch.manual_seed(3)
    model = _mlp().to(F64)
    x = torch.randn(7, 5, dtype=F64)
    whole = nk.empirical_ntk(model, x, output="full", method="jacobian")
    small = nk.empirical_ntk(model, x, output="full", method="jacobian", memory_budget=1000)
    assert torch.allclose(whole, small, rtol=1e-12, atol=0)


def test_refusals():
    """Batch-mixing or random models, no parameters, complex inputs, bad options."""
    torch.manual_seed(4)
    x = torch.randn(4, 5)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"BatchNorm in training mode.*model.eval\(\)"):
        nk.empirical_ntk(bn, x)
    nk.empirical_ntk(bn.eval(), x)  # running statistics: fine
    drop = nn.Sequential(nn.Linear(5, 64), nn.Dropout(0.5), nn.Linear(64, 1))
    with pytest.raises(ValueError, match=r"Dropout in training mode.*model.eval\(\)"):
        nk.empirical_ntk(drop, x)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters"):
        nk.empirical_ntk(frozen, x)
    with pytest.raises(TypeError, match=r"complex"):
        nk.empirical_ntk(_mlp(), x.to(torch.complex64))
    with pytest.raises(ValueError, match=r"per-example shape \(7,\)"):
        nk.empirical_ntk(_mlp(), torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"output must be one of"):
        nk.empirical_ntk(_mlp(), x, output="mean")
    with pytest.raises(ValueError, match=r"method must be one of"):
        nk.empirical_ntk(_mlp(), x, method="fast")


class _SinWithoutJvp(torch.autograd.Function):
    """sin with a backward but no forward-mode rule (``jvp``)."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.saved_tensors[0].cos()

    @staticmethod
    def vmap(info, in_dims, x):
        return _SinWithoutJvp.apply(x), in_dims[0]


class _NoForwardMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_SinWithoutJvp.apply(self.a(x)))


def test_vector_products_without_forward_ad_say_what_to_do():
    """An operation without forward-mode AD gets a message naming method='jacobian'
    (which works: witness, the explicit product). (torch's attention, fused or not,
    now runs: the pushes take its math path, see test_methods_match_explicit_...)"""
    torch.manual_seed(5)
    model = _NoForwardMode().to(F64).eval()
    t = torch.randn(2, 3, dtype=F64)
    with pytest.raises(NotImplementedError, match=r"method='jacobian'"):
        nk.empirical_ntk(model, t, method="vector_products")
    full, _ = _explicit(model, t, t)
    got = nk.empirical_ntk(model, t, output="full", method="jacobian")
    assert (got - full).abs().max() <= 1e-10 * full.abs().max()


# ------------------------------------------------------------------ the structured method
class _Shared(nn.Module):
    """One Linear called twice, and a Linear whose weight is also used by hand."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        return self.b(h) + 0.5 * torch.nn.functional.linear(h.flip(-1), self.b.weight)


class _Tied(nn.Module):
    """Embedding and readout sharing one Parameter (tied weights)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t):
        return self.out(torch.tanh(self.mix(self.emb(t))).mean(1))


class _UnbatchedConv(nn.Module):
    """A conv fed one example at a time without a batch axis, and a sequence Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.seq = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.stack([torch.relu(self.conv(xi)) for xi in x])       # (N, 3, L)
        return self.seq(h.transpose(1, 2)).flatten(1)                  # (N, L * 2)


class _FoldedConv(nn.Module):
    """A conv over each of an example's frames: the conv's batch holds N x T frames."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2, groups=2)
        self.out = nn.Linear(4, 2)

    def forward(self, x):                                   # (N, T, C, L)
        n, t = x.shape[:2]
        h = torch.tanh(self.conv(x.flatten(0, 1)))          # (N * T, 4, L')
        return self.out(h.reshape(n, t, 4, -1).mean(-1)).flatten(1)


def _conv_cases():
    g = torch.Generator().manual_seed(7)

    def conv_net(conv, pool):
        return lambda: nn.Sequential(conv(), nn.Tanh(), pool, nn.Flatten(),
                                     nn.LazyLinear(2))

    r = lambda *s: torch.randn(*s, generator=g)
    return [
        ("conv2d-groups-dilation-stride",
         conv_net(lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2),
                  nn.Identity()), r(3, 4, 7, 7), r(2, 4, 7, 7)),
        ("conv2d-reflect-same-even", conv_net(
            lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"),
            nn.AvgPool2d(2)), r(3, 2, 5, 6), r(2, 2, 5, 6)),
        ("conv2d-circular", conv_net(
            lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
            nn.AdaptiveAvgPool2d(2)), r(2, 2, 5, 5), r(3, 2, 5, 5)),
        ("conv1d-replicate-depthwise", conv_net(
            lambda: nn.Conv1d(3, 6, 4, padding=2, padding_mode="replicate", groups=3),
            nn.Identity()), r(3, 3, 9), r(2, 3, 9)),
        ("conv3d-valid-nobias", conv_net(
            lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), bias=False),
            nn.Identity()), r(2, 2, 4, 5, 3), r(3, 2, 4, 5, 3)),
        ("shared-and-by-hand", _Shared, r(3, 4), r(2, 4)),
        ("tied-embedding", _Tied, torch.randint(0, 7, (3, 4), generator=g),
         torch.randint(0, 7, (2, 4), generator=g)),
        ("unbatched-conv-sequence-linear", _UnbatchedConv, r(3, 2, 6), r(2, 2, 6)),
        ("conv-over-folded-frames", _FoldedConv, r(3, 3, 2, 7), r(2, 3, 2, 7)),
        ("global-pool-readout-separable", lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6)),
         r(3, 2, 5, 5), r(2, 2, 5, 5)),
    ]


@pytest.mark.parametrize("gram", [None, True, False], ids=["chosen", "gram", "jacobians"])
@pytest.mark.parametrize("name, make, x1, x2", _conv_cases(), ids=[c[0] for c in _conv_cases()])
def test_structured_matches_explicit_on_layer_geometries(name, make, x1, x2, gram, monkeypatch):
    """The structured method, with the contraction it chooses and with each one forced,
    equals the explicit J1 J2^T on convolutions of every geometry (groups, dilation,
    stride, padding modes, 1-3-D, no bias), layers called twice or without a batch axis,
    weights also used outside their layer, and tied weights (float64, 1e-10)."""
    torch.manual_seed(8)
    model = make()
    model(x1[:1])                       # materialise lazy layers
    model = model.to(F64).eval()
    if x1.is_floating_point():
        x1, x2 = x1.to(F64), x2.to(F64)
    if gram is not None:
        monkeypatch.setattr(_jacobian.Jacobians, "_gram_is_cheaper",
                            lambda self, s, n1, n2: gram and s.weight is not None)
    full, parts = _explicit(model, x1, x2)
    scale = full.abs().max()
    for output, ref in [("full", full), ("trace", torch.diagonal(full, 0, -2, -1).sum(-1)),
                        ("diagonal", torch.diagonal(full, 0, -2, -1))]:
        got = nk.empirical_ntk(model, x1, x2, output=output, method="structured")
        assert (got - ref).abs().max() <= 1e-10 * scale, output
    layers = nk.empirical_ntk_by_layer(model, x1, x2, by="parameter", output="full",
                                       method="structured")
    assert set(layers) == set(parts)
    for n, part in parts.items():
        assert (layers[n] - part).abs().max() <= 1e-10 * scale, n
    sym = nk.empirical_ntk(model, x1, output="full", method="structured", memory_budget=20_000)
    assert (sym - _explicit(model, x1, x1)[0]).abs().max() <= 1e-10 * scale


def test_structured_takes_layers_and_leaves_misused_weights_to_autodiff():
    """Which parameters go the structured way: Linear/Conv layers do (a layer called twice
    too); a weight also used by hand or tied to an embedding fails the autograd check and
    goes through per-example Jacobians."""
    def sites(model, x):
        p = _problem.Problem.make(model, x, None, None, "trace", None)
        return {s.name for s in _structured.structured_sites(p)}

    torch.manual_seed(9)
    assert sites(_mlp(), torch.randn(2, 5)) == {"0", "2", "4"}
    assert sites(_cnn(), torch.randn(2, 2, 6, 6)) == {"0", "3", "7"}
    assert sites(_Shared(), torch.randn(2, 4)) == {"a"}
    assert sites(_Tied(), torch.randint(0, 7, (2, 4))) == {"mix"}


def test_structured_full_kernel_of_wide_layers_never_forms_their_jacobians():
    """For a wide MLP the dense layers take the Gram route (the per-example weight
    Jacobians would be 16x larger than the whole kernel)."""
    model = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 4))
    x = torch.randn(16, 30)
    p = _problem.Problem.make(model, x, None, None, "full", None)
    eng = _jacobian.Jacobians(p, _structured.structured_sites(p))
    assert [s.gram for s in eng.sites] == [True, True, True]
    got = nk.empirical_ntk(model, x, output="full")
    ref = nk.empirical_ntk(model, x, output="full", method="jacobian")
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_structured_covers_ntkit_built_networks(parameterization):
    """Networks from Layer.build (NTKLinear and NTKConv, which scale their weights in the
    forward pass) go the structured way and equal the explicit product (float64)."""
    p = {"parameterization": parameterization}
    net = nk.Sequential(nk.Conv2d(3, 3, padding="same", w_std=1.3, b_std=0.2, **p), nk.ReLU(),
                        nk.Conv2d(4, 2, padding="circular", w_std=1.1, b_std=None, **p),
                        nk.Erf(), nk.AvgPool2d(2), nk.Flatten(),
                        nk.Linear(3, w_std=0.9, b_std=0.3, **p))
    model = net.build((2, 5, 5), generator=torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(3, 2, 5, 5, generator=g, dtype=F64), torch.randn(2, 2, 5, 5,
                                                                          generator=g, dtype=F64)
    prob = _problem.Problem.make(model, x1, x2, None, "full", None)
    assert len(_structured.structured_sites(prob)) == 3
    full, _ = _explicit(model, x1, x2)
    got = nk.empirical_ntk(model, x1, x2, output="full", method="structured")
    assert (got - full).abs().max() <= 1e-10 * full.abs().max()


def test_symmetric_products_by_blocks_equal_the_plain_product():
    """The half-work product used for Theta(x, x) equals u @ u.T (rows not divisible by 4)."""
    from ntkit.empirical._tiles import outer as _outer

    u = torch.randn(603, 37, dtype=F64)
    assert torch.equal(_outer(u, u), _outer(u, u).T)
    assert (_outer(u, u) - u @ u.T).abs().max() <= 1e-12
    v = torch.randn(5, 37, dtype=F64)
    assert (_outer(u, v) - u @ v.T).abs().max() <= 1e-12


# ------------------------------------------------------------------ empirical NNGP
def test_empirical_nngp_equals_feature_products():
    """Mean over channels at matching positions, full and diagonal products, of the output
    and of a named layer (witness: the features taken by hand), also in small chunks."""
    torch.manual_seed(10)
    model = _cnn().to(F64)
    x1, x2 = torch.randn(3, 2, 6, 6, dtype=F64), torch.randn(4, 2, 6, 6, dtype=F64)
    with torch.no_grad():
        h1, h2 = model[:2](x1), model[:2](x2)                     # (N, 4, 6, 6) after ReLU
        o1, o2 = model(x1), model(x2)
    got = nk.empirical_nngp(model, x1, x2, layer="1")
    assert got.shape == (3, 4, 6, 6)
    assert torch.allclose(got, torch.einsum("ichw,jchw->ijhw", h1, h2) / 4, rtol=1e-12)
    small = nk.empirical_nngp(model, x1, x2, layer="1", memory_budget=300)
    assert torch.allclose(small, got, rtol=1e-12)
    assert torch.allclose(nk.empirical_nngp(model, x1, x2), o1 @ o2.T / 3, rtol=1e-12)
    full = nk.empirical_nngp(model, x1, x2, output="full")
    assert torch.allclose(full, torch.einsum("ia,jb->ijab", o1, o2), rtol=1e-12)
    diag = nk.empirical_nngp(model, x1, output="diagonal")
    assert torch.allclose(diag, torch.einsum("ia,ja->ija", o1, o1), rtol=1e-12)
    with pytest.raises(ValueError, match=r"no submodule named 'conv9'"):
        nk.empirical_nngp(model, x1, layer="conv9")
    with pytest.raises(ValueError, match=r"output must be one of"):
        nk.empirical_nngp(model, x1, output="trace")


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
def test_empirical_nngp_of_a_wide_built_network_approaches_the_analytic_nngp(conv):
    """A hidden layer's feature covariance in one wide network (built by Layer.build) is
    the analytic NNGP of the network up to that layer, within Monte Carlo error
    (relative error of order 1/sqrt(width): 4096 units or 2048 channels give about 3% and
    5%; tolerance 8%), and a 10%
    error in w_std would be caught."""
    width = 4096
    if conv:
        head = [nk.Conv2d(width // 2, 3, padding="same", w_std=1.4, b_std=0.2), nk.Erf(),
                nk.Conv2d(width // 2, 3, padding="same", w_std=1.2, b_std=0.1)]
        x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(11), dtype=F64)
        shape = (2, 5, 5)
    else:
        head = [nk.Linear(width, w_std=1.4, b_std=0.2), nk.ReLU(),
                nk.Linear(width, w_std=1.2, b_std=0.1)]
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(11), dtype=F64)
        shape = 6
    net = nk.Sequential(*head, nk.ReLU(), nk.Flatten(), nk.Linear(1))
    model = net.build(shape, generator=torch.Generator().manual_seed(12), dtype=F64)
    got = nk.empirical_nngp(model, x, layer="2")
    want = nk.Sequential(*head).kernel(x).nngp
    assert got.shape == want.shape
    err = (got - want).norm() / want.norm()
    assert err < 0.08, err
    assert (got - 1.21 * want).norm() / (1.21 * want).norm() > 0.1


@pytest.mark.parametrize("method", ["structured", "jacobian"])
@pytest.mark.parametrize("output", ["full", "trace", "diagonal"])
def test_chunks_over_outputs_and_examples_give_the_same_kernel(output, method):
    """A budget too small for one example's outputs splits outputs as well as examples
    (7 examples, 5 outputs: no divisibility); symmetric and two-sided kernels equal one
    chunk's, per parameter too."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 5)).to(F64)
    x1, x2 = torch.randn(7, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    p = _problem.Problem.make(model, x1, None, None, output, 700)
    eng = _jacobian.Jacobians(p, [] if method == "jacobian" else _structured.structured_sites(p))
    rows, outs = eng.plan()
    assert outs < 5 and rows < 7
    for a, b in [(x1, None), (x1, x2)]:
        whole = nk.empirical_ntk_by_layer(model, a, b, by="parameter", output=output,
                                          method=method)
        small = nk.empirical_ntk_by_layer(model, a, b, by="parameter", output=output,
                                          method=method, memory_budget=700)
        for name in whole:
            assert torch.allclose(whole[name], small[name], rtol=1e-12, atol=1e-14), name


class _Loss(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 1)

    def forward(self, x):
        return self.lin(x).pow(2).mean()


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 2)

    def forward(self, x):
        return self.lin(x), x


def test_refusals_for_outputs_and_dtypes():
    """Integer inputs to a model that needs floats, outputs without a batch axis or not a
    tensor, a full kernel larger than memory, integer parameters, unknown params names."""
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"dtype torch.int64.*x.float\(\)"):
        nk.empirical_ntk(_mlp(), torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"keep the batch axis first"):
        nk.empirical_ntk(_Loss(), x)
    with pytest.raises(TypeError, match=r"one floating-point tensor.*got tuple"):
        nk.empirical_ntk(_Pair(), x)
    wide = nn.Linear(5, 200_000)
    with pytest.raises(MemoryError, match=r"output='full'.*use output='trace' or 'diagonal'"):
        nk.empirical_ntk(wide, x, output="full")
    with pytest.raises(TypeError, match=r"parameter '0.weight' has dtype torch.int64"):
        nk.empirical_ntk(_mlp(), x, params={"0.weight": torch.ones(16, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"\['nope'\] are not parameters"):
        nk.empirical_ntk(_mlp(), x, params={"nope": torch.ones(1)})
    with pytest.raises(ValueError, match=r"by_layer must be"):
        nk.empirical_ntk(_mlp(), x, by_layer="yes")
    with pytest.raises(ValueError, match=r"by must be 'parameter' or 'module', got 'layer'"):
        nk.empirical_ntk_by_layer(_mlp(), x, by="layer")



def test_separable_cotangents_are_certified_before_use():
    """The factored route for a layer before global pooling is taken only when every
    example's cotangents factor per channel: exact factors reproduce the Jacobians; one
    example that does not factor, or a perturbation of 1e-6, sends it back (None)."""
    from ntkit.empirical._jacobian import separable as _separable
    from ntkit.empirical._structured import Site as _Site

    g = torch.Generator().manual_seed(14)
    n, o, p, c, k = 3, 5, 7, 4, 6
    scale = torch.randn(n, o, 1, c, generator=g, dtype=F64)
    h = torch.randn(n, 1, p, c, generator=g, dtype=F64)
    cot = scale.unsqueeze(3) * h.unsqueeze(1)                          # (n, O, G, P, C)
    u = torch.randn(n, 1, p, k, generator=g, dtype=F64)
    got = _separable(u, cot)
    assert got is not None
    site = _Site("x", nn.Linear(k, c), "w", None)
    want = site.jacobians(u, cot)["w"]                                # (n, O, C * K)
    formed = (got[0].unsqueeze(-1) * got[1].unsqueeze(1)).flatten(2)
    assert (formed - want).abs().max() <= 1e-12 * want.abs().max()
    mixed = cot.clone()
    mixed[1] = torch.randn(o, 1, p, c, generator=g, dtype=F64)
    assert _separable(u, mixed) is None
    assert _separable(u, cot + 1e-6 * torch.randn(cot.shape, generator=g, dtype=F64)) is None


# ------------------------------------------------------------------ per-layer parts
def test_parts_by_module_sum_their_parameters_and_the_total():
    """empirical_ntk_by_layer always returns a dict: by module, each entry is the sum of
    its parameters' explicit parts (witness: explicit Jacobians), and all sum to the
    total of empirical_ntk."""
    torch.manual_seed(16)
    model = _cnn().to(F64)
    x1, x2 = torch.randn(3, 2, 6, 6, dtype=F64), torch.randn(2, 2, 6, 6, dtype=F64)
    full, parts = _explicit(model, x1, x2)
    scale = full.abs().max()
    by_module = nk.empirical_ntk_by_layer(model, x1, x2, output="full")
    assert isinstance(by_module, dict)
    assert set(by_module) == {"0", "3", "7"}
    for mod, got in by_module.items():
        want = sum(p for n, p in parts.items() if n.rpartition(".")[0] == mod)
        assert (got - want).abs().max() <= 1e-10 * scale, mod
    total = nk.empirical_ntk(model, x1, x2, output="full")
    assert (sum(by_module.values()) - total).abs().max() <= 1e-10 * scale
    one = nk.empirical_ntk_by_layer(model, x1[:1], by="parameter")
    assert isinstance(one, dict) and set(one) == set(parts)


def test_by_layer_keyword_is_a_deprecated_alias():
    """empirical_ntk(by_layer=...) warns, naming the new function, and returns what
    empirical_ntk_by_layer returns (True meaning by='parameter')."""
    torch.manual_seed(17)
    model = _mlp().to(F64)
    x = torch.randn(4, 5, dtype=F64)
    for old, by in [(True, "parameter"), ("parameter", "parameter"), ("module", "module")]:
        with pytest.warns(DeprecationWarning, match=r"empirical_ntk_by_layer"):
            got = nk.empirical_ntk(model, x, by_layer=old)
        want = nk.empirical_ntk_by_layer(model, x, by=by)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), name


# ------------------------------------------------------------------ symmetric path
def _swapped(k: torch.Tensor, output: str) -> torch.Tensor:
    """k(x2, x1) written as k(x1, x2): the transpose, with the outputs swapped for full."""
    k = k.transpose(0, 1)
    return k.transpose(2, 3) if output == "full" else k


@pytest.mark.parametrize("method", ["structured", "jacobian", "vector_products"])
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("budget", [None, 20_000], ids=["one-chunk", "chunks"])
def test_same_inputs_twice_take_the_symmetric_path(method, output, budget, monkeypatch):
    """empirical_ntk(model, x, x), with x itself or a view of it, equals
    empirical_ntk(model, x) exactly, goes through the symmetric path (x2 None), and is
    exactly symmetric; a different x2 does not (witness: the explicit product)."""
    from ntkit.empirical import _ntk

    seen = []
    real = _ntk.tiled

    def spy(problem, *args, **kwargs):
        seen.append(problem.x2 is None)
        return real(problem, *args, **kwargs)

    monkeypatch.setattr(_ntk, "tiled", spy)
    torch.manual_seed(18)
    model = _cnn().to(F64)
    x = torch.randn(7, 2, 6, 6, dtype=F64)
    kw = dict(output=output, method=method, memory_budget=budget)
    alone = nk.empirical_ntk(model, x, **kw)
    assert torch.equal(alone, _swapped(alone, output))
    for x2 in (x, x[:], x.view(7, 2, 36).view(7, 2, 6, 6)):
        got = nk.empirical_ntk(model, x, x2, **kw)
        assert torch.equal(got, alone)
    assert seen == [True] * 4
    copied = nk.empirical_ntk(model, x, x.clone(), **kw)  # another tensor: a cross pair
    assert seen[-1] is False
    assert (copied - alone).abs().max() <= 1e-10 * alone.abs().max()
    other = x.clone()
    other[-1, 0, 0, 0] += 1.0
    full = _explicit(model, x, other)[0]
    want = {"full": full, "diagonal": torch.diagonal(full, 0, -2, -1),
            "trace": torch.diagonal(full, 0, -2, -1).sum(-1)}[output]
    got = nk.empirical_ntk(model, x, other, **kw)
    assert seen[-1] is False
    assert (got - want).abs().max() <= 1e-10 * full.abs().max()


def test_same_inputs_twice_by_layer_and_nngp():
    """The per-layer parts and the empirical NNGP take the symmetric path for x, x too
    (equal to x2=None, exactly symmetric, mean over channels of a conv layer included)."""
    torch.manual_seed(19)
    model = _cnn().to(F64)
    x = torch.randn(5, 2, 6, 6, dtype=F64)
    alone = nk.empirical_ntk_by_layer(model, x, output="full")
    twice = nk.empirical_ntk_by_layer(model, x, x[:], output="full")
    assert set(alone) == set(twice)
    for name, k in alone.items():
        assert torch.equal(twice[name], k) and torch.equal(k, _swapped(k, "full")), name
    for layer, output in [("1", "mean"), (None, "mean"), (None, "full"), ("3", "diagonal")]:
        k = nk.empirical_nngp(model, x, layer=layer, output=output)
        assert torch.equal(nk.empirical_nngp(model, x, x, layer=layer, output=output), k)
        assert torch.equal(k, _swapped(k, output)), (layer, output)


def test_nngp_with_dropout_shares_masks_only_for_the_same_tensor():
    """With Dropout in training mode, K(x, x) is one pass (shared masks: exactly
    symmetric, the diagonal inflated by 1/(1-p)); K(x, x.clone()) is two passes with
    independent masks (not symmetric), so equal values alone do not merge them."""
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(5, 256), nn.ReLU(), nn.Dropout(0.5)).to(F64).train()
    x = torch.randn(4, 5, dtype=F64)
    same = nk.empirical_nngp(model, x, x)
    assert torch.equal(same, same.T)
    two = nk.empirical_nngp(model, x, x.clone())
    assert not torch.equal(two, two.T)
    # E[m^2] = 1/(1-p) = 2 on the diagonal of one pass, E[m m'] = 1 across two passes
    assert bool((same.diagonal() > 1.5 * two.diagonal()).all())

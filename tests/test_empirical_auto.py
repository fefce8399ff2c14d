"""empirical_ntk(method="auto"): the method it picks, and that the pick changes nothing.

Small attention models (a 2-layer ViT of width 64, a tiny BERT, 16 inputs) go through
"jacobian": their Linear layers cost as much formed from cotangents as through autograd,
so "structured" would pay its checks for nothing. Wide dense layers and convolutions
before a global pooling keep "structured". Witness for the values: the torch.func
tutorial's Jacobian contraction written out here (jacrev of functional_call per example,
then einsum, on torch's default attention kernels), in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import ntkit as nk
from ntkit.empirical import _tiles
from ntkit.empirical._choice import STRUCTURED_SAVING, chosen_method, structured_saving
from ntkit.empirical._problem import Problem
from ntkit.empirical._structured import structured_sites

F64 = torch.float64
N = 16


def _encoder(width: int, ff: int, activation: str) -> nn.Sequential:
    layer = lambda: nn.TransformerEncoderLayer(width, 4, ff, dropout=0.0,
                                               activation=activation, batch_first=True)
    return nn.Sequential(layer(), layer())


class ViT(nn.Module):
    """4 x 4 patches of 3 x 16 x 16 images, class token, learned positions, 2 encoder
    layers of width 64, class-token readout to 10 outputs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 64, 4, stride=4)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, 64))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, 64))
        self.blocks = _encoder(64, 128, "relu")
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


class BERT(nn.Module):
    """Token ids (vocabulary 1000) and learned positions, 2 encoder layers of width 64
    (GELU, d_ff 256), [CLS] readout to 2 outputs."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(1000, 64)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 16, 64))
        self.norm = nn.LayerNorm(64)
        self.blocks = _encoder(64, 256, "gelu")
        self.head = nn.Linear(64, 2)

    def forward(self, ids):
        return self.head(self.blocks(self.norm(self.tokens(ids) + self.pos))[:, 0])


def _attention_case(name: str, dtype=F64, seed: int = 0):
    """(model in eval mode, x1, x2) with 16 inputs each."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        model = ViT().to(dtype).eval()
        x1, x2 = torch.randn(2, N, 3, 16, 16, generator=gen, dtype=dtype)
    else:
        model = BERT().to(dtype).eval()
        x1, x2 = torch.randint(1, 1000, (2, N, 16), generator=gen)
        x1[:, 0] = x2[:, 0] = 0
    return model, x1, x2


def _tutorial_ntk(model, x1, x2, output):
    """The torch.func tutorial's contraction: per-example Jacobians (`jacrev` of
    `functional_call`, here one example at a time rather than under `vmap`, which has
    no batching rule for torch's fused attention and loops slowly in float64), then
    einsum."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    def jacobians(xs):
        per = [jacrev(f)(params, x) for x in xs]
        return [torch.stack([d[k] for d in per]).flatten(2) for k in params]

    j1, j2 = jacobians(x1), jacobians(x2)
    eq = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM"}[output]
    return sum(torch.einsum(eq, a, b) for a, b in zip(j1, j2))


@pytest.mark.parametrize("output", ["full", "trace"])
@pytest.mark.parametrize("pair", ["x_x", "x1_x2"])
@pytest.mark.parametrize("name", ["vit", "bert"])
def test_small_attention_models_take_jacobian(name, pair, output):
    model, x1, x2 = _attention_case(name, torch.float32)
    x2 = None if pair == "x_x" else x2
    assert chosen_method(model, x1, x2, output=output) == "jacobian"


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_auto_equals_every_method_and_the_tutorial(name):
    model, x1, x2 = _attention_case(name)
    x1, x2 = x1[:5], x2[:4]
    both = _tutorial_ntk(model, x1, torch.cat([x1, x2]), "full")
    for args in [(x1, x2), (x1, None)]:
        want = both[:, 5:] if args[1] is not None else both[:, :5]
        for method in ("auto", "jacobian", "structured"):
            got = nk.empirical_ntk(model, *args, output="full", method=method)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=method)
        trace = nk.empirical_ntk(model, *args, output="trace")
        torch.testing.assert_close(trace, torch.diagonal(want, 0, -2, -1).sum(-1),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_vector_products_agree_on_attention(name):
    model, x1, x2 = _attention_case(name)
    x1, x2 = x1[:3], x2[:2]
    want = _tutorial_ntk(model, x1, x2, "full")
    got = nk.empirical_ntk(model, x1, x2, output="full", method="vector_products")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_joint_x1_x2_call_equals_separate_calls(monkeypatch):
    """x1 and x2 through one batched Jacobian call (BERT: 11 x 2 rows, under
    JOINT_ROWS) give the kernel that two calls give (JOINT_ROWS = 0)."""
    model, x1, x2 = _attention_case("bert")
    x1, x2 = x1[:6], x2[:5]
    calls = []
    real = _tiles._joint_features
    monkeypatch.setattr(_tiles, "_joint_features",
                        lambda *a: calls.append(real(*a)) or calls[-1])
    joint = nk.empirical_ntk(model, x1, x2, output="full", method="jacobian")
    assert calls and calls[-1] is not None
    monkeypatch.setattr(_tiles, "JOINT_ROWS", 0)
    apart = nk.empirical_ntk(model, x1, x2, output="full", method="jacobian")
    assert calls[-1] is None
    torch.testing.assert_close(joint, apart, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(joint, _tutorial_ntk(model, x1, x2, "full"),
                               rtol=1e-10, atol=1e-12)


def test_joint_call_with_structured_sites_equals_witness():
    """Gram and Jacobian features of a joint batch split back per side."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 256), nn.ReLU(), nn.Linear(256, 3)).to(F64)
    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(7, 5, generator=gen, dtype=F64), torch.randn(4, 5, generator=gen,
                                                                        dtype=F64)
    assert chosen_method(model, x1, x2, output="full") == "structured"
    got = nk.empirical_ntk(model, x1, x2, output="full")
    torch.testing.assert_close(got, _tutorial_ntk(model, x1, x2, "full"),
                               rtol=1e-10, atol=1e-12)


def test_wide_dense_and_pooled_cnn_keep_structured():
    """The saving estimate is large where the Gram contraction or per-channel
    factoring pays (the benchmarks' entk MLP and entk_cnn shapes)."""
    gen = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Linear(100, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 10))
    x = torch.randn(32, 100, generator=gen)
    assert chosen_method(mlp, x, output="full") == "structured"
    conv = lambda i: nn.Conv2d(i, 32, 3, padding=1)
    cnn = nn.Sequential(conv(3), nn.ReLU(), conv(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(32, 10))
    assert chosen_method(cnn, torch.randn(8, 3, 8, 8, generator=gen)) == "structured"


def test_saving_estimate_by_hand():
    """Linear(4, 64) -> Linear(64, 3) on 5 + 6 inputs, output "full" (O = 3, O' = 9):
    a layer with K inputs and C outputs at one position forms 11*3*C*K Jacobian entries
    and contracts 5*6*9*C*K, against Gram matrices 5*6*(K + 9*C + 9); both layers
    save, and "jacobian" costs (11*3 + 30*9) per parameter."""
    model = nn.Sequential(nn.Linear(4, 64), nn.Linear(64, 3)).to(F64)
    x1, x2 = torch.randn(5, 4, dtype=F64), torch.randn(6, 4, dtype=F64)
    problem = Problem.make(model, x1, x2, None, "full", None)
    sites = structured_sites(problem, verify=False)
    assert [s.sizes for s in sites] == [(1, 1, 4, 64), (1, 1, 64, 3)]
    saved = 0
    for k, c in [(4, 64), (64, 3)]:
        jac = 11 * 3 * c * k + 30 * 9 * c * k
        gram = 30 * (k + 9 * c + 9)
        saved += jac - gram
    n_params = 4 * 64 + 64 + 64 * 3 + 3
    total = (11 * 3 + 30 * 9) * n_params
    assert structured_saving(problem, sites) == pytest.approx(saved / total, rel=1e-12)
    assert saved / total > STRUCTURED_SAVING
    assert chosen_method(model, x1, x2, output="full") == "structured"


def test_memory_budget_still_falls_back_to_vector_products():
    model, x1, _ = _attention_case("bert", torch.float32)
    assert chosen_method(model, x1[:2], memory_budget=10_000) == "vector_products"


@pytest.mark.parametrize("method", ["jacobian", "structured"])
def test_attention_is_batched_not_looped(method):
    """Under vmap, torch's fused CPU attention has no batching rule and runs once per
    example and output in a loop, warning "There is a performance drop"; the Jacobian
    engines take the math backend, which is batched, so no such warning is raised."""
    import warnings

    model, x1, x2 = _attention_case("bert", torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nk.empirical_ntk(model, x1[:3], x2[:2], method=method)
    assert not [w for w in caught if "performance drop" in str(w.message)]

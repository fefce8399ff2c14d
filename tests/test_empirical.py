"""nk.empirical_ntk against an explicit Jacobian product.

Witness: the Jacobian of the flattened outputs with respect to the flattened parameters,
built column by column with torch.autograd.functional.jacobian on the whole batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import ntkit as nk

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


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.norm(x + self.b(torch.relu(self.a(x)))))


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


@pytest.mark.parametrize("method", ["jacobian", "vector_products", "auto"])
@pytest.mark.parametrize("name, make, x1, x2", _cases(), ids=[c[0] for c in _cases()])
def test_methods_match_explicit_jacobian_product(name, make, x1, x2, method):
    """Every method and output mode equals the explicit J1 J2^T (float64, <= 1e-10 relative);
    per-parameter parts sum to the whole and match the explicit per-parameter products."""
    torch.manual_seed(1)
    model = make().to(F64).eval()
    if name == "embedding-transformer" and method == "vector_products":
        # PyTorch's attention kernels have no forward-mode derivative: refused clearly
        # (see test_vector_products_without_forward_ad_say_what_to_do).
        pytest.skip("no forward-mode AD through scaled_dot_product_attention")
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
    layers = nk.empirical_ntk(model, x1, x2, output="full", method=method, by_layer=True)
    assert set(layers) == set(parts)
    for n, part in parts.items():
        assert (layers[n] - part).abs().max() <= 1e-10 * scale, n


def test_float32_matches_float64():
    """float32 agrees with float64 to 1e-5 relative (witness: the float64 kernel)."""
    torch.manual_seed(2)
    model = _mlp()
    x = torch.randn(5, 5)
    k32 = nk.empirical_ntk(model, x)
    k64 = nk.empirical_ntk(model.to(F64), x.to(F64))
    assert k32.dtype == torch.float32
    assert (k32.double() - k64).abs().max() <= 1e-5 * k64.abs().max()


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


def test_vector_products_without_forward_ad_say_what_to_do():
    """A fused inference path without forward-mode AD gets a message naming
    method='jacobian' (which works: witness, the explicit product)."""
    torch.manual_seed(5)
    model = _Tokens().to(F64).eval()
    t = torch.randint(0, 11, (2, 5))
    with pytest.raises(NotImplementedError, match=r"method='jacobian'"):
        nk.empirical_ntk(model, t, method="vector_products")
    full, _ = _explicit(model, t, t)
    got = nk.empirical_ntk(model, t, output="full", method="jacobian")
    assert (got - full).abs().max() <= 1e-10 * full.abs().max()

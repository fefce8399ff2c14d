"""`Aggregate` (graph aggregation with a fixed pattern, Du et al. 2019) against
formulas written here on the inputs, and against existing layers it must equal.
Its Monte Carlo witness is the contract battery (tests/layers/test_contract.py)."""

from __future__ import annotations

import pytest
import torch

import ntkit.layers as L
from ntkit.layers.graph import Aggregate

V, C, N = 5, 3, 4


def _x(n=N, seed=0):
    return torch.randn(n, C, V, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _pattern(rows=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, V, generator=g, dtype=torch.float64) < 0.5).double() + torch.eye(
        rows, V, dtype=torch.float64)


def test_nngp_is_the_plain_formula_on_the_inputs():
    """On the input kernel (x1 . x2 / C), Aggregate's NNGP is (A X)(A X)^T / C."""
    a, x1, x2 = _pattern(), _x(), _x(3, seed=2)
    h1 = torch.einsum("vu,ncu->ncv", a, x1)
    h2 = torch.einsum("vu,ncu->ncv", a, x2)
    k = Aggregate(a).kernel(x1, x2)  # matching nodes: (N1, N2, V)
    torch.testing.assert_close(k.nngp, torch.einsum("ncv,mcv->nmv", h1, h2) / C,
                               rtol=1e-12, atol=1e-12)
    # every pair of nodes, seen through a global sum over nodes
    k = L.Sequential(Aggregate(a), L.GlobalSumPool()).kernel(x1, x2)
    want = torch.einsum("ncv,mcw->nm", h1, h2) / C
    torch.testing.assert_close(k.nngp, want, rtol=1e-12, atol=1e-12)
    kd = L.Sequential(Aggregate(a), L.GlobalSumPool()).kernel(x1, diagonal=True)
    torch.testing.assert_close(kd.nngp, torch.einsum("ncv,ncw->n", h1, h1) / C,
                               rtol=1e-12, atol=1e-12)


def _net(agg, readout):
    return L.Sequential(L.Conv1d(16, 3, padding="same", w_std=1.3, b_std=0.2), agg,
                        L.ReLU(), L.Conv1d(16, 1, b_std=0.1), readout,
                        L.Flatten(), L.Linear(1, b_std=0.1))


def test_identity_pattern_is_the_identity():
    x = _x()
    for readout in (L.GlobalSumPool(), L.Identity()):
        got = _net(Aggregate(torch.eye(V)), readout).kernel(x)
        want = _net(L.Identity(), readout).kernel(x)
        torch.testing.assert_close(got.nngp, want.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.ntk, want.ntk, rtol=1e-12, atol=1e-12)


def test_a_row_of_ones_is_global_sum_pooling():
    """Aggregate with the (1, V) all-ones pattern sums every node: GlobalSumPool."""
    x = _x()
    tail = [L.Flatten(), L.Linear(8, b_std=0.1), L.ReLU(), L.Linear(1)]
    head = [L.Conv1d(16, 2, padding="same", w_std=1.4, b_std=0.3), L.Erf()]
    got = L.Sequential(*head, Aggregate(torch.ones(1, V)), *tail).kernel(x)
    want = L.Sequential(*head, L.GlobalSumPool(), *tail).kernel(x)
    torch.testing.assert_close(got.nngp, want.nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.ntk, want.ntk, rtol=1e-12, atol=1e-12)


def test_ntk_transforms_like_the_nngp():
    """No parameters: after a Conv, the NTK at node pairs is A Theta A^T as the NNGP."""
    a, x = _pattern(), _x()
    conv = L.Sequential(L.Conv1d(8, 3, padding="same", b_std=0.2), L.ReLU(),
                        L.Conv1d(8, 3, padding="same"))
    k_in = L.input_kernel(x, None, position_pairs=True)
    before = conv.propagate(k_in)
    after = Aggregate(a).propagate(before)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(after, name), a @ getattr(before, name) @ a.T,
                                   rtol=1e-12, atol=1e-12)


def test_finite_twin_applies_the_pattern():
    a, x = _pattern(), _x()
    module = Aggregate(a).build((C, V))
    torch.testing.assert_close(module(x), torch.einsum("vu,ncu->ncv", a, x).to(x.dtype))


def test_errors_and_no_spec():
    from ntkit.spec import to_spec

    with pytest.raises(ValueError, match="per-example patterns"):
        Aggregate(torch.ones(2, V, V))
    with pytest.raises(ValueError, match="sums over"):
        Aggregate(torch.eye(V + 1)).kernel(_x())
    with pytest.raises(ValueError, match="no compact spec form"):
        to_spec(Aggregate(torch.eye(V)))
    assert Aggregate(torch.eye(2)).hyperparameters() == []
    assert repr(Aggregate([[1, 0], [0.5, 1]])) == "Aggregate([[1.0, 0.0], [0.5, 1.0]])"

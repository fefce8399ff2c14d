"""`Aggregate` (graph aggregation, Du et al. 2019) against formulas written here on
the inputs, existing layers it must equal, neural-tangents 0.6.5 references
(tests/data/gen_graph_nt.py) and Monte Carlo of its finite twin. The fixed-pattern
form is also in the contract battery (tests/layers/test_contract.py); the
per-example form (patterns given to net.kernel) has its battery checks here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit.layers as L
from ntkit.layers.graph import Aggregate, AggregateModule, EdgeList

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


# --------------------------------------------------- per-example patterns (issue 15)
DATA = Path(__file__).parent / "data" / "graph_nt.npz"


def _gcn(readout=None):
    """The net of tests/data/gen_graph_nt.py: [Conv1d(k=1) over channels, ReLU,
    Aggregate()] x 2 + GlobalSumPool + Linear."""
    return L.Sequential(L.Conv1d(16, 1, w_std=1.4, b_std=0.2), L.ReLU(), Aggregate(),
                        L.Conv1d(16, 1, w_std=1.3, b_std=0.1), L.ReLU(), Aggregate(),
                        readout or L.GlobalSumPool(), L.Linear(1, w_std=1.1, b_std=0.1))


def _patterns(n, v=V, seed=3):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, v, v, generator=g, dtype=torch.float64) < 0.4
    return keep * torch.rand(n, v, v, generator=g, dtype=torch.float64) + torch.eye(v)


def _edges(n, v=V, e=9, seed=4):
    g = torch.Generator().manual_seed(seed)
    edges = torch.randint(0, v, (n, e, 2), generator=g)
    for i in range(n):
        edges[i, e - 1 - i:] = -1  # padding: example i has e - 1 - i edges
    return EdgeList(edges, v)


def _rel(got, want):
    return float((got - want).abs().max() / want.abs().max())


def test_parity_with_neural_tangents():
    """neural-tangents 0.6.5 in float64 (tests/data/gen_graph_nt.py): per-example dense
    patterns (passed transposed there: its out = x @ A) and sparse edge lists (its
    "SPARSE" (sender, receiver) format with -1 padding), k(x1, x2) and k(x1)."""
    d = {k: torch.as_tensor(v) for k, v in np.load(DATA).items()}
    x1, x2, v = d["x1"], d["x2"], d["x1"].shape[2]
    net = _gcn()
    forms = {"dense": (d["dense_p1"], d["dense_p2"]),
             "sparse": (EdgeList(d["edges1"], v), EdgeList(d["edges2"], v))}
    for form, (p1, p2) in forms.items():
        for which, k in (("cross", net.kernel(x1, x2, pattern=(p1, p2))),
                         ("self", net.kernel(x1, pattern=p1))):
            for name in ("nngp", "ntk"):
                want = d[f"{form}_{which}_{name}"]
                assert _rel(getattr(k, name), want) < 1e-6, (form, which, name)
        kd = net.kernel(x1, pattern=p1, diagonal=True)
        assert _rel(kd.ntk, torch.diagonal(d[f"{form}_self_ntk"])) < 1e-6


def test_per_example_nngp_is_the_plain_formula():
    """On the input kernel, Aggregate() + GlobalSumPool gives sum_{v,w} (A_n X_n)_v .
    (A_m X_m)_w / C, and at matching nodes (A_n X_n)_v . (A_m X_m)_v / C."""
    x1, x2 = _x(), _x(3, seed=2)
    p1, p2 = _patterns(4), _patterns(3, seed=5)
    h1 = torch.einsum("nvu,ncu->ncv", p1, x1)
    h2 = torch.einsum("nvu,ncu->ncv", p2, x2)
    k = L.Sequential(Aggregate(), L.GlobalSumPool()).kernel(x1, x2, pattern=(p1, p2))
    torch.testing.assert_close(k.nngp, torch.einsum("ncv,mcw->nm", h1, h2) / C,
                               rtol=1e-12, atol=1e-12)
    k = Aggregate().kernel(x1, x2, pattern=(p1, p2))
    torch.testing.assert_close(k.nngp, torch.einsum("ncv,mcv->nmv", h1, h2) / C,
                               rtol=1e-12, atol=1e-12)


def test_edge_lists_equal_their_dense_patterns():
    """An EdgeList, its dense patterns and a torch sparse COO tensor give one kernel;
    EdgeList.from_dense(to_dense()) round-trips (repeated edges add up)."""
    x1, x2 = _x(), _x(3, seed=2)
    e1, e2 = _edges(4), _edges(3, seed=6)
    d1, d2 = e1.to_dense(), e2.to_dense()
    manual = torch.zeros(4, V, V, dtype=torch.float64)
    for n in range(4):
        for s, t in e1.edges[n].tolist():
            if s >= 0 and t >= 0:
                manual[n, t, s] += 1
    torch.testing.assert_close(d1, manual)
    torch.testing.assert_close(EdgeList.from_dense(d1).to_dense(), d1)
    net = _gcn()
    want = net.kernel(x1, x2, pattern=(d1, d2))
    for p in ((e1, e2), (d1.to_sparse(), d2.to_sparse())):
        got = net.kernel(x1, x2, pattern=p)
        torch.testing.assert_close(got.nngp, want.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.ntk, want.ntk, rtol=1e-12, atol=1e-12)
    weighted = EdgeList(e1.edges, V, weights=torch.rand(4, 9, dtype=torch.float64))
    torch.testing.assert_close(net.kernel(x1, pattern=weighted).ntk,
                               net.kernel(x1, pattern=weighted.to_dense()).ntk,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_tiles_diagonal_and_symmetry(form):
    """Ragged tiles equal the untiled kernel (each tile gets its patterns' rows and
    columns), diagonal=True is the diagonal, and k(x, x) is exactly symmetric."""
    n = 7
    x1, x2 = _x(n), _x(5, seed=2)
    p1, p2 = ((_patterns(n), _patterns(5, seed=5)) if form == "dense"
              else (_edges(n), _edges(5, seed=6)))
    net = _gcn()
    whole, cross = net.kernel(x1, pattern=p1), net.kernel(x1, x2, pattern=(p1, p2))
    budget = 8 * V**2 * 24 * 9  # tiles of about 3 x 3 pairs (ntkit._budget)
    rows, rule = [], net._forward
    net._forward = lambda k: rows.append(k.nngp.shape[0]) or rule(k)
    tiled = net.kernel(x1, pattern=p1, memory_budget=budget, progress=False)
    tiled_cross = net.kernel(x1, x2, pattern=(p1, p2), memory_budget=budget, progress=False)
    assert len(rows) > 4 and any(n % r for r in rows), rows  # ragged tiles
    for a, b in ((tiled, whole), (tiled_cross, cross)):
        torch.testing.assert_close(a.nngp, b.nngp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.ntk, b.ntk, rtol=1e-12, atol=1e-12)
    diag = net.kernel(x1, pattern=p1, diagonal=True)
    torch.testing.assert_close(diag.ntk, torch.diagonal(whole.ntk), rtol=1e-12, atol=1e-12)
    assert torch.equal(whole.nngp, whole.nngp.T) and torch.equal(whole.ntk, whole.ntk.T)
    # each example's own pattern matters: permuting the patterns changes the kernel
    perm = net.kernel(x1, pattern=p1[[1, 0, 2, 3, 4, 5, 6]])
    assert _rel(perm.nngp, whole.nngp) > 1e-3


def test_global_average_pool_readout():
    """GlobalAvgPool over nodes is GlobalSumPool / V^2 for NNGP and NTK (a readout
    without bias scales both by the square of the pooling weight)."""
    x, p = _x(), _patterns(4)
    net = lambda pool: L.Sequential(L.Conv1d(8, 1, b_std=0.1), L.ReLU(), Aggregate(),
                                    pool, L.Linear(1))
    s, a = net(L.GlobalSumPool()).kernel(x, pattern=p), net(L.GlobalAvgPool()).kernel(
        x, pattern=p)
    torch.testing.assert_close(a.nngp, s.nngp / V**2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.ntk, s.ntk / V**2, rtol=1e-12, atol=1e-14)


def test_twin_applies_each_examples_pattern():
    x, p, e = _x(), _patterns(4), _edges(4)
    want = torch.einsum("nvu,ncu->ncv", p, x)
    model = Aggregate().build((C, V))
    assert isinstance(model, AggregateModule)
    torch.testing.assert_close(model(x, pattern=p), want, rtol=1e-12, atol=1e-12)
    want = torch.einsum("nvu,ncu->ncv", e.to_dense(), x)
    torch.testing.assert_close(model(x, pattern=e), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x, pattern=e.to_dense().to_sparse()), want,
                               rtol=1e-12, atol=1e-12)
    net = _gcn().build((C, V), generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    assert net(x, pattern=p).shape == (4, 1)


def _empirical(model, x, pattern, readout):
    """Empirical NNGP f f^T / R and NTK J J^T / R of one finite network."""
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}
    f = lambda prm: functional_call(model, prm, (x,), {"pattern": pattern})
    out = f(params)
    jac = jacrev(f)(params)
    ntk = sum(torch.einsum("ir...,jr...->ij", j, j) for j in jac.values())
    return out @ out.T / readout, ntk / readout


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_monte_carlo_twin_approaches_the_kernel(form):
    """The mean empirical kernels of sampled finite twins, fed each example's pattern,
    approach the analytic kernel within 4 standard errors of the sampling mean plus a
    1/width allowance; the kernel of permuted patterns lies outside that band."""
    width, readout, samples = 64, 16, 16
    x = _x(3)
    p = _patterns(3) if form == "dense" else _edges(3)
    net = L.Sequential(L.Conv1d(width, 1, w_std=1.4, b_std=0.2), L.ReLU(), Aggregate(),
                       L.Conv1d(width, 1, w_std=1.3, b_std=0.1), L.ReLU(), Aggregate(),
                       L.GlobalSumPool(), L.Linear(readout, w_std=1.1, b_std=0.1))
    k = net.kernel(x, pattern=p)
    g = torch.Generator().manual_seed(11)
    draws = [_empirical(net.build((C, V), generator=g, dtype=torch.float64), x, p, readout)
             for _ in range(samples)]
    wrong = net.kernel(x, pattern=p[[1, 2, 0]])
    for i, name in enumerate(("nngp", "ntk")):
        est = torch.stack([d[i] for d in draws])
        mean, se = est.mean(0), est.std(0) / math.sqrt(samples)
        want = getattr(k, name)
        band = 4 * se + 0.1 * want.abs().max()  # sampling error + O(1/width) bias
        assert bool(((mean - want).abs() <= band).all()), (name, mean, want, band)
        assert bool(((mean - getattr(wrong, name)).abs() > band).any()), name


def test_sparse_graphs_of_many_nodes():
    """Graphs of 400 nodes and 1600 edges: the EdgeList path equals the dense one
    (the sparse rule gathers E rows instead of multiplying V x V matrices)."""
    v, e = 400, 1600
    g = torch.Generator().manual_seed(0)
    edges = torch.randint(0, v, (2, e, 2), generator=g)
    el = EdgeList(edges, v)
    x = torch.randn(2, 2, v, generator=g, dtype=torch.float64)
    net = L.Sequential(L.Conv1d(4, 1), Aggregate(), L.ReLU(), L.Conv1d(4, 1), Aggregate(),
                       L.GlobalSumPool())
    got = net.kernel(x, pattern=el)
    want = net.kernel(x, pattern=el.to_dense())
    torch.testing.assert_close(got.nngp, want.nngp, rtol=1e-10, atol=1e-10)


def test_per_example_errors_say_what_to_do():
    x, p = _x(), _patterns(4)
    with pytest.raises(ValueError, match="fixed pattern, and pattern= was given"):
        Aggregate(torch.eye(V)).kernel(x, pattern=p)
    with pytest.raises(ValueError, match="fixed pattern, and pattern= was given"):
        Aggregate(torch.eye(V)).build((C, V))(x, pattern=p)
    with pytest.raises(ValueError, match="none was given"):
        _gcn().kernel(x)
    with pytest.raises(ValueError, match=r"model\(x, pattern=p\)"):
        Aggregate().build((C, V))(x)
    with pytest.raises(ValueError, match="nodes"):
        Aggregate().kernel(x, pattern=_patterns(4, v=V + 1))
    with pytest.raises(ValueError, match=r"\(N, V, V\)"):
        Aggregate().kernel(x, pattern=p[:3])
    with pytest.raises(ValueError, match="holds 3 graphs"):
        Aggregate().kernel(x, pattern=_edges(3))
    with pytest.raises(ValueError, match="names node 9"):
        EdgeList(torch.tensor([[[0, 9]]]), 5)
    with pytest.raises(TypeError, match="integer node indices"):
        EdgeList(torch.zeros(1, 2, 2), 5)
    with pytest.raises(ValueError, match=r"\(N, n_edges, 2\)"):
        EdgeList(torch.zeros(2, 2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="weights must be"):
        EdgeList(torch.zeros(1, 2, 2, dtype=torch.long), 5, weights=torch.ones(2))
    assert repr(Aggregate()) == "Aggregate()"
    assert repr(_edges(2)) == "EdgeList(graphs=2, edges=9, num_nodes=5)"
    assert len(_edges(4)[1:3]) == 2 and _edges(4)[2].shape == (1, V, V)


def test_hyperparameter_gradients_through_sparse_patterns():
    """d kernel / d w_std is the same through an EdgeList as through its dense form,
    tiled or not (the sparse product keeps the autograd graph)."""
    x, e = _x(6), _edges(6)
    grads = []
    for p, budget in ((e.to_dense(), None), (e, None), (e, 8 * V**2 * 24 * 9)):
        w = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        net = L.Sequential(L.Conv1d(8, 1, w_std=w, b_std=0.1), L.ReLU(), Aggregate(),
                           L.GlobalSumPool(), L.Linear(1))
        net.kernel(x, pattern=p, memory_budget=budget, progress=False).ntk.sum().backward()
        grads.append(w.grad)
    assert abs(float(grads[0])) > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-10, atol=0)

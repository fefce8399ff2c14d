"""Generates graph_nt.npz: neural-tangents 0.6.5 kernels (float64) of a GCN-like net
[Dense over channels, Relu, Aggregate] x 2 + GlobalSumPool + Dense(1), for
tests/test_graph.py, with per-example dense patterns and with sparse edge lists.
Run with the peer install:
    ~/.cache/ntkit-peers/nt/bin/python tests/data/gen_graph_nt.py

Conventions: ntkit's dense pattern p[n, i, j] weights input node j summed into output
node i; neural-tangents' dense pattern is its transpose (out = x @ A), so A = p^T is
passed here. Edge lists are neural-tangents' (batch, n_edges, 2) (sender, receiver)
= ntkit's EdgeList (source, target); -1 rows are padding.
"""
import pathlib

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
from neural_tangents import stax

rng = np.random.default_rng(0)
N1, N2, C, V, E = 4, 3, 3, 7, 12
x1 = rng.standard_normal((N1, C, V))  # ntkit's (N, C, V)
x2 = rng.standard_normal((N2, C, V))


def dense_patterns(n):
    """Weighted, sparse-ish, with self loops: p[n, target, source]."""
    keep = rng.random((n, V, V)) < 0.4
    return keep * rng.uniform(0.2, 1.5, (n, V, V)) + np.eye(V)


def edge_lists(n):
    """(n, E, 2) random (source, target) edges, repeats allowed, with padding rows."""
    e = rng.integers(0, V, (n, E, 2))
    for i in range(n):
        e[i, E - 1 - i:] = -1  # example i has E - 1 - i edges
    return e


def net(implementation):
    def agg():
        return stax.Aggregate(aggregate_axis=1, batch_axis=0, channel_axis=-1,
                              implementation=implementation)
    return stax.serial(
        stax.Dense(16, W_std=1.4, b_std=0.2), stax.Relu(), agg(),
        stax.Dense(16, W_std=1.3, b_std=0.1), stax.Relu(), agg(),
        stax.GlobalSumPool(), stax.Dense(1, W_std=1.1, b_std=0.1))[2]


def nhc(x):
    return np.transpose(x, (0, 2, 1))  # neural-tangents' (N, V, C)


out = {"x1": x1, "x2": x2}
p1, p2 = dense_patterns(N1), dense_patterns(N2)
kf = net("DENSE")
t = lambda p: np.transpose(p, (0, 2, 1))
cross = kf(nhc(x1), nhc(x2), ("nngp", "ntk"), pattern=(t(p1), t(p2)))
self_ = kf(nhc(x1), None, ("nngp", "ntk"), pattern=(t(p1), t(p1)))
out.update(dense_p1=p1, dense_p2=p2, dense_cross_nngp=cross.nngp, dense_cross_ntk=cross.ntk,
           dense_self_nngp=self_.nngp, dense_self_ntk=self_.ntk)

e1, e2 = edge_lists(N1), edge_lists(N2)
kf = net("SPARSE")
cross = kf(nhc(x1), nhc(x2), ("nngp", "ntk"), pattern=(e1, e2))
self_ = kf(nhc(x1), None, ("nngp", "ntk"), pattern=(e1, e1))
out.update(edges1=e1, edges2=e2, sparse_cross_nngp=cross.nngp, sparse_cross_ntk=cross.ntk,
           sparse_self_nngp=self_.nngp, sparse_self_ntk=self_.ntk)

path = pathlib.Path(__file__).with_name("graph_nt.npz")
np.savez(path, **{k: np.asarray(v) for k, v in out.items()})
print({k: np.asarray(v).shape for k, v in out.items()})

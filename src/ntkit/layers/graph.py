"""Graph aggregation over nodes (neural-tangents' ``Aggregate``; the graph NTK of
Du et al. 2019, "Graph Neural Tangent Kernel: Fusing Graph Neural Networks with
Graph Kernels", NeurIPS 2019).

Node features are channels first, ``(N, C, V)`` (like sequences). The output
node ``v`` sums ``A[v, u]`` times the input node ``u``:
``h[n, c, v] = sum_u A_n[v, u] x[n, c, u]``, a linear map on the node axis, with
one pattern for every example (``Aggregate(pattern)``) or each example's own
(``Aggregate()`` with ``net.kernel(..., pattern=...)``), given dense
``(N, V, V)`` or as an `EdgeList` for sparse graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._side import SideModule
from ..kernel import Kernel, position_diagonal
from ._spatial import require_pairs
from .base import BuildContext, Kernels, Layer, Shapes, single

__all__ = ["Aggregate", "AggregateModule", "EdgeList"]


class EdgeList:
    """Sparse per-example adjacency: each graph as a list of directed, weighted edges.

    The sparse form of a pattern ``(N, V, V)`` for `Aggregate` (graphs with
    thousands of nodes): edge ``e`` of example ``n`` adds ``weights[n, e]`` times
    input node ``edges[n, e, 0]`` (the source) into output node ``edges[n, e, 1]``
    (the target), i.e. ``pattern[n, target, source] += weight``. This is
    neural-tangents' ``Aggregate(implementation="SPARSE")`` format (``(batch,
    n_edges, 2)``, senders then receivers, repeated edges adding up), with
    optional weights. Examples with fewer edges are padded: an edge with a
    negative entry is ignored (negative indices never count from the end).

    An `EdgeList` is an immutable value: ``el[i0:i1]`` (rows of examples), ``len``,
    ``.to(device)``, ``.to_dense()``, and `EdgeList.from_dense` for the reverse.

    Args:
        edges: integers ``(N, E, 2)``: ``[..., 0]`` the source node, ``[..., 1]``
            the target node, in ``[0, num_nodes)``, or negative for padding.
        num_nodes: ``V``, the number of nodes of every graph (pad smaller graphs
            with isolated nodes and mask them out with zero features).
        weights: ``(N, E)`` real edge weights, or None for weight 1.

    Raises:
        ValueError, TypeError: edges of the wrong shape or type, nodes out of
            range, weights of another shape or not finite.
    """

    def __init__(self, edges: Tensor | Sequence, num_nodes: int,
                 weights: Tensor | Sequence | None = None) -> None:
        e = torch.as_tensor(edges)
        if e.dtype.is_floating_point or e.dtype.is_complex or e.dtype == torch.bool:
            raise TypeError(f"EdgeList: edges must hold integer node indices, got dtype "
                            f"{e.dtype}; convert with edges.long().")
        if e.ndim != 3 or e.shape[2] != 2:
            raise ValueError(f"EdgeList: edges must be (N, n_edges, 2) (source, target) pairs, "
                             f"got shape {tuple(e.shape)}; a single graph is edges[None].")
        v = int(num_nodes)
        if v < 1 or v != num_nodes:
            raise ValueError(f"EdgeList: num_nodes must be a positive integer, got {num_nodes!r}.")
        e = e.long()
        if e.numel() and int(e.max()) >= v:
            raise ValueError(f"EdgeList: an edge names node {int(e.max())}, but num_nodes={v} "
                             f"(nodes are 0 .. {v - 1}); raise num_nodes or fix the edges.")
        if weights is not None:
            w = torch.as_tensor(weights, device=e.device)
            if not w.dtype.is_floating_point:
                w = w.double()
            if tuple(w.shape) != tuple(e.shape[:2]):
                raise ValueError(f"EdgeList: weights must be (N, n_edges) = "
                                 f"{tuple(e.shape[:2])}, one per edge, got {tuple(w.shape)}.")
            if not bool(torch.isfinite(w).all()):
                raise ValueError("EdgeList: weights hold NaN or inf.")
            weights = w
        self.edges, self.num_nodes, self.weights = e, v, weights

    # ------------------------------------------------------------------ values
    @classmethod
    def from_dense(cls, pattern: Tensor) -> EdgeList:
        """The edge list of dense patterns ``(N, V, V)`` (a strided tensor or a
        torch sparse COO tensor): one weighted edge per nonzero entry
        ``pattern[n, target, source]``, padded to the largest count."""
        p = pattern.coalesce() if pattern.layout == torch.sparse_coo else pattern
        if p.ndim != 3 or p.shape[1] != p.shape[2]:
            raise ValueError(f"EdgeList.from_dense: patterns must be (N, V, V), got shape "
                             f"{tuple(p.shape)}.")
        if p.layout == torch.sparse_coo:
            (n, dst, src), val = p.indices(), p.values()
        elif p.layout == torch.strided:
            n, dst, src = torch.nonzero(p, as_tuple=True)
            val = p[n, dst, src]
        else:
            raise TypeError(f"EdgeList.from_dense: layout {p.layout} is not supported; "
                            f"convert with pattern.to_sparse_coo() or pattern.to_dense().")
        batch = p.shape[0]
        counts = torch.bincount(n, minlength=batch)
        width = int(counts.max()) if batch else 0
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n.numel(), device=n.device) - start[n]
        edges = torch.full((batch, width, 2), -1, dtype=torch.long, device=n.device)
        weights = torch.zeros((batch, width), dtype=val.dtype if val.dtype.is_floating_point
                              else torch.float64, device=n.device)
        edges[n, slot, 0], edges[n, slot, 1], weights[n, slot] = src, dst, val.to(weights.dtype)
        return cls(edges, p.shape[1], weights)

    def to_dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense patterns ``(N, V, V)``: ``pattern[n, target, source]`` sums the
        weights of the edges ``source -> target`` of example ``n``."""
        src, dst, w = self.parts(dtype)
        n = self.edges.shape[0]
        out = torch.zeros(n, self.num_nodes * self.num_nodes, dtype=dtype, device=self.device)
        return out.scatter_add_(1, dst * self.num_nodes + src, w).view(n, self.num_nodes,
                                                                         self.num_nodes)

    def parts(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(source, target, weight)``, each ``(N, E)``, with padding edges as
        ``0 -> 0`` of weight 0 (so that they gather and add nothing)."""
        keep = (self.edges >= 0).all(-1)
        src = torch.where(keep, self.edges[..., 0], 0)
        dst = torch.where(keep, self.edges[..., 1], 0)
        w = keep.to(dtype) if self.weights is None else self.weights.to(dtype) * keep
        return src, dst, w

    def __len__(self) -> int:
        return int(self.edges.shape[0])

    def __getitem__(self, rows: Any) -> EdgeList:
        """The graphs of the examples ``rows`` (a slice, indices, or an int, kept as
        an axis of one)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1) if rows != -1 else slice(-1, None)
        return EdgeList(self.edges[rows], self.num_nodes,
                        None if self.weights is None else self.weights[rows])

    @property
    def device(self) -> torch.device:
        return self.edges.device

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of the dense patterns it stands for, ``(N, V, V)``."""
        return (len(self), self.num_nodes, self.num_nodes)

    def to(self, device: torch.device | str) -> EdgeList:
        """The same edges on ``device``."""
        return EdgeList(self.edges.to(device), self.num_nodes,
                        None if self.weights is None else self.weights.to(device))

    def checked_for(self, x: Tensor, which: str) -> EdgeList:
        """This edge list as the pattern of the inputs ``x`` (named ``which``), or an
        error: one graph per example, on ``x``'s device."""
        if len(self) != x.shape[0]:
            raise ValueError(f"the EdgeList for {which} holds {len(self)} graphs, but {which} "
                             f"has {x.shape[0]} examples (shape {tuple(x.shape)}); give one "
                             f"graph per example.")
        if self.device != x.device:
            raise ValueError(f"the EdgeList for {which} is on {self.device}, {which} on "
                             f"{x.device}; move it with edge_list.to({which}.device).")
        return self

    def __repr__(self) -> str:
        weighted = "" if self.weights is None else ", weighted"
        return (f"EdgeList(graphs={len(self)}, edges={self.edges.shape[1]}, "
                f"num_nodes={self.num_nodes}{weighted})")


# ---------------------------------------------------------------- the algebra
def aggregate_axis(t: Tensor, pattern, dim: int, batch_axis: int | None) -> Tensor:
    """``out[.., v, ..] = sum_u A_b[v, u] t[.., u, ..]`` on the axis ``dim`` of ``t``.

    Args:
        t: any tensor; its axis ``dim`` holds nodes.
        pattern: a fixed ``(V', V)`` matrix (``batch_axis`` None), per-example
            dense patterns ``(B, V, V)`` or an `EdgeList` of ``B`` graphs, whose
            example ``b`` applies along the axis ``batch_axis`` of ``t``.
        dim: the node axis of ``t`` (non-negative).
        batch_axis: the axis of ``t`` that indexes the patterns' examples.

    Returns:
        ``t`` with the axis ``dim`` aggregated. Dense: a batched matrix product,
        ``O(V^2)`` per slice; an `EdgeList`: a gather over sources and a
        scatter-add into targets, ``O(E)`` per slice (Du et al. 2019, Eq. (3),
        the sum over neighbours, with weights).
    """
    if isinstance(pattern, EdgeList):
        src, dst, w = pattern.parts(t.dtype)
        src, dst, w = src.to(t.device), dst.to(t.device), w.to(t.device)
        view = [1] * t.ndim
        view[batch_axis], view[dim] = src.shape
        size = list(t.shape)
        size[dim] = src.shape[1]
        picked = t.gather(dim, src.view(view).expand(size)) * w.view(view)
        out = torch.zeros_like(t)
        return out.scatter_add_(dim, dst.view(view).expand(size), picked)
    letters = "abcdefghijklmnopqrst"[: t.ndim]
    a = pattern.to(dtype=t.dtype, device=t.device)
    lhs = ("" if batch_axis is None else letters[batch_axis]) + "yz"
    inp = letters[:dim] + "z" + letters[dim + 1:]
    out = letters[:dim] + "y" + letters[dim + 1:]
    return torch.einsum(f"{lhs},{inp}->{out}", a, t)


def _edge_matrix(pattern: EdgeList, like: Tensor) -> Tensor:
    """The block-diagonal sparse matrix ``(B V, B V)`` of ``B`` graphs (COO)."""
    src, dst, w = (p.to(like.device) for p in pattern.parts(like.dtype))
    b, v = src.shape[0], pattern.num_nodes
    offset = (torch.arange(b, device=like.device) * v)[:, None]
    index = torch.stack([(dst + offset).reshape(-1), (src + offset).reshape(-1)])
    return torch.sparse_coo_tensor(index, w.reshape(-1), (b * v, b * v),
                                   check_invariants=False).coalesce()


def _edge_product(t: Tensor, pattern: EdgeList, dim: int, batch_axis: int) -> Tensor:
    """`aggregate_axis` for an `EdgeList` as one sparse-dense matrix product: the axes
    ``(batch_axis, dim)`` become rows ``b V + u`` of a ``(B V, rest)`` matrix, so the
    cost is ``O(E)`` per column and no ``(.., E, ..)`` temporary is made."""
    moved = t.movedim((batch_axis, dim), (0, 1))
    shape = moved.shape
    out = torch.sparse.mm(_edge_matrix(pattern, t), moved.reshape(shape[0] * shape[1], -1))
    return out.reshape(shape).movedim((0, 1), (batch_axis, dim))


def aggregate_pairs(t: Tensor, p1, p2, *, per_example: bool) -> Tensor:
    """``A1 K A2^T`` on the last two (node) axes of a kernel between node pairs.

    ``K'(n, m; v, v') = sum_{u, u'} A1_n[v, u] A2_m[v', u'] K(n, m; u, u')`` (Du et
    al. 2019, Eq. (5)-(6); neural-tangents' ``Aggregate.kernel_fn``).

    Args:
        t: ``(N1, N2, V, V)`` between two batches, or per example ``(N, V, V)``
            (``per_example``: a covariance of each example with itself, or a
            diagonal kernel).
        p1, p2: the patterns of the rows and of the columns (dense ``(N, V, V)``,
            `EdgeList` or one fixed ``(V', V)`` matrix for both).
        per_example: whether ``t`` is ``(N, V, V)``.
    """
    fixed = isinstance(p1, Tensor) and p1.ndim == 2
    nodes = t.ndim - 2
    if fixed:
        a = p1.to(dtype=t.dtype, device=t.device)
        return torch.matmul(torch.matmul(a, t), a.T)
    if per_example:
        if isinstance(p1, EdgeList):
            return _edge_product(_edge_product(t, p1, 1, 0), p2, 2, 0).contiguous()
        return aggregate_axis(aggregate_axis(t, p1, 1, 0), p2, 2, 0)
    if not isinstance(p1, EdgeList) and not isinstance(p2, EdgeList):
        # dense: A1[n] K[n, m] then (.) A2[m]^T, each one matrix product batched over
        # the examples of its side (faster than N1 N2 products of V x V matrices)
        a1 = p1.to(dtype=t.dtype, device=t.device)
        a2 = p2.to(dtype=t.dtype, device=t.device)
        left = torch.einsum("nvu,nmuw->nmvw", a1, t)
        return torch.einsum("nmvw,mxw->nmvx", left, a2).contiguous()  # later: views
    left = (_edge_product if isinstance(p1, EdgeList) else aggregate_axis)(t, p1, nodes, 0)
    right = (_edge_product if isinstance(p2, EdgeList) else aggregate_axis)(left, p2, nodes + 1, 1)
    return right.contiguous()


class Aggregate(Layer):
    """Sums node features over adjacency patterns: ``(N, C, V)`` to ``(N, C, V')``.

    ``h[n, c, v] = sum_u A_n[v, u] x[n, c, u]`` (neural-tangents' ``Aggregate``,
    the aggregation step of the graph neural tangent kernel of Du et al. 2019,
    Eq. (3)-(6)). The map is linear and has no parameters, so NNGP and NTK
    transform alike, on the kernel between every pair of nodes::

        K'(n, m; v, v') = sum_{u, u'} A_n[v, u] A_m[v', u'] K(n, m; u, u')   (A_n K A_m^T)

    The layer mixes nodes, so it needs `Kernel.position_pairs`; at matching nodes
    its output is the diagonal of ``A_n K A_m^T``. Readouts over nodes are
    `GlobalSumPool` / `GlobalAvgPool`.

    Two forms:

    - ``Aggregate()`` reads each example's own pattern, given next to the inputs:
      ``net.kernel(x1, x2, pattern=(p1, p2))`` (``pattern=p1`` when ``x2`` is
      None) and ``model(x, pattern=p)`` for the finite twin. A pattern is dense,
      ``(N, V, V)`` with row ``i`` of ``p[n]`` weighting the input nodes summed
      into output node ``i`` (the TRANSPOSE of neural-tangents' dense
      ``pattern[n, tail, head]``), or sparse: an `EdgeList` (neural-tangents'
      ``implementation="SPARSE"`` edge lists) or a torch sparse COO tensor
      ``(N, V, V)``, at ``O(E V)`` per kernel entry instead of ``O(V^3)``.
    - ``Aggregate(pattern)`` applies one fixed ``(V', V)`` matrix to every
      example (a single graph, or one topology); it then refuses a ``pattern=``.

    The layer has no spec-grammar form and no ``from_torch`` rule.

    Args:
        pattern: the fixed adjacency ``(V', V)`` (a tensor or nested lists of
            numbers), or None (default) to read each example's pattern. Stored as
            a float64 copy, not a hyperparameter (kernels are not differentiable
            in it).
    """

    def __init__(self, pattern: Tensor | Sequence | None = None) -> None:
        if pattern is None:
            self.pattern = None
            return
        p = torch.as_tensor(pattern.detach() if isinstance(pattern, Tensor) else pattern,
                            dtype=torch.float64).cpu().clone()
        if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
            raise ValueError(f"Aggregate: a fixed pattern is one (V', V) matrix shared by every "
                             f"example, got shape {tuple(p.shape)}; for per-example patterns "
                             f"(N, V, V) write Aggregate() and pass them as "
                             f"net.kernel(x, pattern=p) / model(x, pattern=p).")
        if not bool(torch.isfinite(p).all()):
            raise ValueError("Aggregate: pattern holds NaN or inf.")
        self.pattern = p

    def hyperparameters(self) -> list[Tensor]:
        return []  # the pattern is data, not a hyperparameter

    def needs_position_pairs(self) -> bool:
        return True

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"pattern"})  # the fixed form reads it only to refuse it

    def _check(self, shape) -> None:
        if not shape or isinstance(shape[0], tuple):
            raise ValueError(f"{self!r} takes one input, got per-example shapes {shape}.")
        if len(shape) != 2:
            raise ValueError(f"Aggregate takes node features (N, C, V) but receives per-example "
                             f"shape {tuple(shape)}.")
        if self.pattern is not None and shape[1] != self.pattern.shape[1]:
            raise ValueError(f"Aggregate: the pattern {tuple(self.pattern.shape)} sums over "
                             f"{self.pattern.shape[1]} nodes, but the features have "
                             f"{shape[1]} (per-example shape {tuple(shape)}).")

    def _patterns(self, given, nodes: int) -> tuple[Any, Any]:
        """The patterns to apply: the fixed one twice, or the given pair, checked."""
        if self.pattern is not None:
            if given is not None:
                raise ValueError(
                    f"{self!r} was built with a fixed pattern, and pattern= was given too; "
                    f"write Aggregate() to read per-example patterns, or drop pattern=.")
            return self.pattern, self.pattern
        if given is None:
            raise ValueError(
                "Aggregate() reads each example's adjacency pattern, but none was given: call "
                "net.kernel(x1, x2, pattern=(p1, p2)) (pattern=p1 when x2 is None) or "
                "model(x, pattern=p) with patterns (N, V, V) or EdgeLists, or give one fixed "
                "pattern as Aggregate(pattern).")
        for p in given:
            v = p.shape[-1]
            if v != nodes:
                raise ValueError(f"Aggregate: the patterns have {v} nodes (shape "
                                 f"{tuple(p.shape)}), but the features reaching it have "
                                 f"{nodes}; give patterns of the graphs' node count.")
        return given

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        self._check(k.shape)
        require_pairs(k, self)
        p1, p2 = self._patterns(k.side_pair("pattern"), k.shape[1])
        nngp = aggregate_pairs(k.nngp, p1, p2, per_example=k.diagonal)
        cov1_in = k.cov1

        def own(cov: Tensor) -> Tensor:  # each example with itself: its own pattern twice
            p = p1 if cov is cov1_in else p2
            return aggregate_pairs(cov, p, p, per_example=True)

        cov1, cov2 = k.self_covariances(own, lambda c: position_diagonal(c, 1),
                                        diagonal_result=nngp)
        ntk = (torch.zeros((), dtype=nngp.dtype, device=nngp.device).expand(nngp.shape)
               if k.is_input else aggregate_pairs(k.ntk, p1, p2, per_example=k.diagonal))
        v_out = k.shape[1] if self.pattern is None else int(self.pattern.shape[0])
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape=(k.shape[0], v_out))

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        self._check(shape)
        fixed = None if self.pattern is None else self.pattern.to(dtype=ctx.dtype,
                                                                  device=ctx.device)
        v_out = shape[1] if fixed is None else int(fixed.shape[0])
        return AggregateModule(fixed), (shape[0], v_out)

    def __repr__(self) -> str:
        return "Aggregate()" if self.pattern is None else f"Aggregate({self.pattern.tolist()!r})"


class AggregateModule(SideModule):
    """The finite twin of `Aggregate`: ``h[n, c, v] = sum_u A_n[v, u] x[n, c, u]``,
    with the fixed pattern, or each example's from ``model(x, pattern=p)`` (dense
    ``(N, V, V)``, an `EdgeList` or a torch sparse COO tensor)."""

    def __init__(self, pattern: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern)

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        given = side.get("pattern")
        if self.pattern is not None:
            if given is not None:
                raise ValueError("this Aggregate was built with a fixed pattern, and pattern= "
                                 "was given too; build Aggregate() to read per-example "
                                 "patterns, or drop pattern=.")
            return aggregate_axis(x, self.pattern, 2, None)
        if given is None and x.device.type == "meta":
            return x  # a shape-only pass (ntkit.tiling.peak_positions): nodes stay nodes
        if given is None:
            raise ValueError("Aggregate() reads each example's adjacency pattern: call "
                             "model(x, pattern=p) with p (N, V, V) or an EdgeList.")
        if isinstance(given, Tensor) and given.layout != torch.strided:
            given = EdgeList.from_dense(given)
        if tuple(given.shape) != (x.shape[0], x.shape[2], x.shape[2]):
            raise ValueError(f"Aggregate: pattern of shape {tuple(given.shape)} for node "
                             f"features {tuple(x.shape)}; it must be (N, V, V) = "
                             f"{(x.shape[0], x.shape[2], x.shape[2])}.")
        return aggregate_axis(x, given, 2, 0)

    def extra_repr(self) -> str:
        return "per-example" if self.pattern is None else f"nodes={tuple(self.pattern.shape)}"

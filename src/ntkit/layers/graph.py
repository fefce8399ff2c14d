"""Graph aggregation over nodes (neural-tangents' ``Aggregate``; the graph NTK of
Du et al. 2019, "Graph Neural Tangent Kernel: Fusing Graph Neural Networks with
Graph Kernels", NeurIPS 2019).

Node features are channels first, ``(N, C, V)`` (like sequences). The output
node ``v`` sums ``A[v, u]`` times the input node ``u``:
``h[n, c, v] = sum_u A[v, u] x[n, c, u]``, a fixed linear map on the node axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..kernel import Kernel, position_diagonal
from ._spatial import require_pairs
from .base import BuildContext, Kernels, Layer, Shapes, single

__all__ = ["Aggregate", "AggregateModule"]


class Aggregate(Layer):
    """Sums node features over a FIXED adjacency pattern: ``(N, C, V)`` to ``(N, C, V')``.

    ``h[n, c, v] = sum_u pattern[v, u] x[n, c, u]`` (neural-tangents' ``Aggregate``,
    the aggregation step of the graph neural tangent kernel of Du et al. 2019,
    Eq. (3)-(5)). The map is linear and has no parameters, so NNGP and NTK
    transform alike, on the kernel between every pair of nodes::

        K'(v, v') = sum_{u, u'} A[v, u] A[v', u'] K(u, u')    (A K A^T on the node axes)

    The layer mixes nodes, so it needs `Kernel.position_pairs`; at matching nodes
    its output is the diagonal of ``A K A^T``.

    Limitation: the pattern is one ``(V', V)`` matrix shared by every example (a
    single graph, or a fixed topology). Per-example patterns ``(N, V, V)``
    (issue 15's ``net.kernel(x1, x2, pattern=(p1, p2))``) and sparse edge lists are
    not supported yet. The layer has no spec-grammar form (the grammar carries no
    tensors) and no ``from_torch`` rule.

    Args:
        pattern: the adjacency pattern, ``(V', V)`` (usually square, ``V' = V``; a
            tensor or nested lists of numbers); row ``v`` weights the input nodes
            summed into output node ``v``. Stored as a float64 copy, not a
            hyperparameter (kernels are not differentiable in it).
    """

    def __init__(self, pattern: Tensor | Sequence) -> None:
        p = torch.as_tensor(pattern.detach() if isinstance(pattern, Tensor) else pattern,
                            dtype=torch.float64).cpu().clone()
        if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
            raise ValueError(f"Aggregate: pattern must be a (V', V) matrix shared by every "
                             f"example, got shape {tuple(p.shape)}; per-example patterns "
                             f"(N, V, V) are not supported yet.")
        if not bool(torch.isfinite(p).all()):
            raise ValueError("Aggregate: pattern holds NaN or inf.")
        self.pattern = p

    def hyperparameters(self) -> list[Tensor]:
        return []  # the pattern is data, not a hyperparameter

    def needs_position_pairs(self) -> bool:
        return True

    def _check(self, shape) -> None:
        if not shape or isinstance(shape[0], tuple):
            raise ValueError(f"{self!r} takes one input, got per-example shapes {shape}.")
        if len(shape) != 2:
            raise ValueError(f"Aggregate takes node features (N, C, V) but receives per-example "
                             f"shape {tuple(shape)}.")
        if shape[1] != self.pattern.shape[1]:
            raise ValueError(f"Aggregate: the pattern {tuple(self.pattern.shape)} sums over "
                             f"{self.pattern.shape[1]} nodes, but the features have "
                             f"{shape[1]} (per-example shape {tuple(shape)}).")

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        self._check(k.shape)
        require_pairs(k, self)
        a = self.pattern.to(dtype=k.dtype, device=k.device)
        at = a.T

        def aggregate(t: Tensor) -> Tensor:  # (*batch, V, V) -> (*batch, V', V')
            return torch.matmul(torch.matmul(a, t), at)

        nngp = aggregate(k.nngp)
        cov1, cov2 = k.self_covariances(aggregate, lambda c: position_diagonal(c, 1),
                                        diagonal_result=nngp)
        ntk = (torch.zeros((), dtype=nngp.dtype, device=nngp.device).expand(nngp.shape)
               if k.is_input else aggregate(k.ntk))
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2,
                         shape=(k.shape[0], a.shape[0]))

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        self._check(shape)
        module = AggregateModule(self.pattern.to(dtype=ctx.dtype, device=ctx.device))
        return module, (shape[0], int(self.pattern.shape[0]))

    def __repr__(self) -> str:
        return f"Aggregate({self.pattern.tolist()!r})"


class AggregateModule(nn.Module):
    """The finite twin of `Aggregate`: ``x (N, C, V) -> einsum('vu,ncu->ncv', A, x)``."""

    def __init__(self, pattern: Tensor) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("vu,ncu->ncv", self.pattern.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"nodes={tuple(self.pattern.shape)}"

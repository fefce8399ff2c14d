"""Nystrom features of an ntkit network's kernel: `NystromFeatureMap`.

For ``M`` centres ``C`` (training points drawn at random) and the Cholesky factor
``K_CC + j I = T^T T`` (upper ``T``), the map ``phi(x) = k(x, C) T^-1`` ``(M,)`` has

    phi(x) . phi(x') = k(x, C) K_CC^-1 k(C, x'),

the Nystrom approximation of the kernel (Williams & Seeger, "Using the Nystrom method
to speed up kernel machines", NeurIPS 2001, eq. 8). Ridge regression on these features
(`ntkit.features.fit_ridge`, which streams over the data) *is* Nystrom kernel ridge
regression, ``alpha = (K_nm^T K_nm + s K_mm)^-1 K_nm^T y`` (Rudi, Camoriano & Rosasco,
"Less is more: Nystrom computational regularization", NeurIPS 2015, eq. 5): the
estimator FALKON (`ntkit.solvers.nystrom_krr`) reaches by conjugate gradients, here in
one pass over the data (each ``k(x, C)`` row block computed once) and one ``M x M``
Cholesky solve, at the price of a ``T^-1`` product per row (``O(N M^2)``).

Unlike the data-independent `RandomFeatureMap`, the error of this map is not a sampling
variance of the kernel: it is exact on the span of the centres and falls with ``M`` as
the kernel's spectrum decays (Rudi et al. 2015, Thm. 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..errors import check_finite_output, not_positive_definite
from ..kernel_function import check_get, kernel_function
from ..solvers._common import kernel_diagonal
from ._random import check_feature_input

__all__ = ["NystromFeatureMap"]


class NystromFeatureMap:
    """``phi(x) = k(x, C) T^-1`` with ``T^T T = K_CC + j I``: Nystrom features.

    Factor once, map many: ``K_CC`` is computed and factored here; each call computes
    ``k(x, C)`` and one triangular solve. ``phi(x) . phi(x')`` is the Nystrom
    approximation ``k(x, C) K_CC^-1 k(C, x')`` of the network's kernel (module
    docstring; Williams & Seeger 2001, eq. 8).

    Args:
        net: an ntkit network (its kernel is taken with ``get``), or a kernel function
            ``(a, b) -> (Na, Nb)`` (e.g. `ntkit.solvers.kernel_function`).
        centers: ``C`` ``(M, *input_shape)``, e.g. ``M`` training points drawn at random
            (`from_data`).
        get: ``"ntk"`` or ``"nngp"`` (ignored for a kernel function).
        jitter: ``j`` added to ``K_CC``'s diagonal, absolute; default ``eps * M *
            mean(diag K_CC)`` with ``eps`` that of the centres' dtype (FALKON's rule),
            grown tenfold up to six times if the factorisation fails.

    Attributes:
        n_features: ``M``.
        input_shape: per-example input shape.
        centers: ``C``.

    Raises:
        TypeError: ``net`` is neither a network nor a callable; ``centers`` is not a
            floating-point tensor of at least 2 dimensions.
        NotPositiveDefiniteError: ``K_CC`` has no Cholesky factor even with the jitter.
    """

    def __init__(self, net, centers: Tensor, *, get: Literal["ntk", "nngp"] = "ntk",
                 jitter: float | None = None):
        if not isinstance(centers, Tensor) or not centers.is_floating_point() or \
                centers.ndim < 2 or centers.shape[0] < 1:
            raise TypeError(f"centers must be a floating-point tensor (M, *input_shape) with "
                            f"M >= 1, got {type(centers).__name__} "
                            f"{tuple(getattr(centers, 'shape', ()))}.")
        if hasattr(net, "kernel"):
            self.kernel_fn: Callable[[Tensor, Tensor], Tensor] = kernel_function(
                net, check_get(get))
        elif callable(net):
            self.kernel_fn = net
        else:
            raise TypeError(f"net must be an ntkit network or a kernel function (a, b) -> "
                            f"(Na, Nb), got {type(net).__name__}.")
        self.centers = centers
        self.input_shape = tuple(int(s) for s in centers.shape[1:])
        self.n_features = int(centers.shape[0])
        self.get = get
        k = self.kernel_fn(centers, centers).to(torch.float64)
        self._t = _cholesky_upper((k + k.T) / 2, torch.finfo(centers.dtype).eps, jitter)

    @classmethod
    def from_data(cls, net, x: Tensor, *, n_centers: int, generator: torch.Generator,
                  get: Literal["ntk", "nngp"] = "ntk", jitter: float | None = None
                  ) -> NystromFeatureMap:
        """The map on ``n_centers`` rows of ``x`` drawn uniformly without replacement.

        Raises:
            ValueError: ``n_centers`` is not an int in ``[1, N]``.
            TypeError: ``generator`` is not a `torch.Generator`.
        """
        n = x.shape[0]
        if isinstance(n_centers, bool) or not isinstance(n_centers, int) or \
                not 1 <= n_centers <= n:
            raise ValueError(f"n_centers must be an int between 1 and N = {n}, got "
                             f"{n_centers!r}.")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (the centres are drawn at "
                            f"random), got {type(generator).__name__}.")
        idx = torch.randperm(n, generator=generator)[:n_centers].sort().values
        return cls(net, x[idx], get=get, jitter=jitter)

    def __call__(self, x: Tensor) -> Tensor:
        """``phi(x)`` ``(N, M)`` float64 for inputs ``x`` ``(N, *input_shape)``.

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: its per-example shape is not the centres', or it is not finite.
        """
        check_feature_input(x, self.input_shape, "like the centres", "Nystrom")
        if x.shape[0] == 0:
            return torch.zeros(0, self.n_features, dtype=torch.float64)
        k = self.kernel_fn(x.to(self.centers.dtype), self.centers).to(torch.float64)
        phi = torch.linalg.solve_triangular(self._t, k, upper=True, left=False)
        return check_finite_output(phi, "Nystrom features", causes="kernel")

    map = __call__

    def diagonal(self, x: Tensor) -> Tensor:
        """The network's own kernel ``k(x_i, x_i)`` ``(N,)`` (not the Nystrom one): the
        relative ridge of `fit_ridge` is taken from it, as `ntkit.solvers.nystrom_krr`
        takes it, so the same ``diag_reg`` gives the same estimator."""
        return kernel_diagonal(self.kernel_fn, x.to(self.centers.dtype)).to(torch.float64)

    def __repr__(self) -> str:
        return (f"NystromFeatureMap(n_features={self.n_features}, "
                f"input_shape={self.input_shape})")


def _cholesky_upper(k: Tensor, eps: float, jitter: float | None) -> Tensor:
    """Upper ``T`` with ``T^T T = k + j I``; ``j`` grown tenfold up to six times."""
    m = k.shape[0]
    scale = max(float(torch.diagonal(k).mean()), torch.finfo(k.dtype).tiny)
    j = eps * m * scale if jitter is None else float(jitter)
    eye = torch.eye(m, dtype=k.dtype)
    for _ in range(7):
        chol, info = torch.linalg.cholesky_ex(k + j * eye)
        if int(info) == 0:
            return chol.T.contiguous()
        j = max(j * 10, eps * scale)
    raise not_positive_definite("the centres' kernel K_CC", f"{m} x {m}, even with a jitter "
                                f"of {j / 10:.2g} on its diagonal", fix="use fewer centres")

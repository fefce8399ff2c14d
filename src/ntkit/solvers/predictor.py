"""`KernelRidgePredictor`: a fitted kernel regression ``f(x) = k(x, centers) alpha``,
evaluated in row tiles within a memory budget (factor once, predict many times)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._budget import parse_memory
from ..errors import check_finite_output
from ._common import KernelFn, row_ranges, tile_rows
from .cg import CGInfo

__all__ = ["KernelRidgePredictor"]


class KernelRidgePredictor:
    """``f(x) = k(x, centers) alpha``: a fitted kernel regression, evaluated in tiles.

    Returned by `solve_krr`, `nystrom_krr` (``centers`` = the Nystrom centres) and
    `exact_krr` (``centers`` = all training inputs).

    Attributes:
        centers: ``(M, ...)`` inputs the predictor expands on.
        alpha: ``(M, O)`` coefficients.
        info: the `CGInfo` of the solve (None for the exact Cholesky solve).
        solver: ``"exact"``, ``"cg"`` or ``"nystrom"``.
        diag_reg_absolute: the absolute regulariser ``s`` on the kernel's diagonal.
    """

    def __init__(self, kernel_fn: KernelFn, centers: Tensor, alpha: Tensor, *,
                 info: CGInfo | None, solver: str, diag_reg_absolute: float,
                 memory_budget: int | str | None = None, vector: bool = False):
        self.kernel_fn = kernel_fn
        self.centers = centers
        self.alpha = check_finite_output(alpha, f"the {solver} kernel regression's "
                                                f"coefficients (alpha)", causes="prediction")
        self.info = info
        self.solver = solver
        self.diag_reg_absolute = diag_reg_absolute
        self._budget = parse_memory(memory_budget)
        self._vector = vector

    def predict(self, x: Tensor) -> Tensor:
        """Predictions ``(N_test, O)`` (``(N_test,)`` for 1-D training targets), computed
        in row tiles of ``k(x, centers)`` within the memory budget."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
        if tuple(x.shape[1:]) != tuple(self.centers.shape[1:]):
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.centers.shape[1:]))})"
                             f" like the training inputs, got {tuple(x.shape)}.")
        rows = tile_rows(self.centers.shape[0], x.element_size(), self._budget)
        out = torch.cat([self.kernel_fn(x[i0:i1], self.centers).to(self.alpha) @ self.alpha
                         for i0, i1 in row_ranges(x.shape[0], rows)]) if x.shape[0] else \
            self.alpha.new_zeros((0, self.alpha.shape[1]))
        check_finite_output(out, "the kernel regression's prediction", causes="prediction")
        return out[:, 0] if self._vector else out

    __call__ = predict

    def __repr__(self) -> str:
        return (f"KernelRidgePredictor(solver={self.solver!r}, centers={self.centers.shape[0]}, "
                f"outputs={self.alpha.shape[1]})")


"""Kernel regression past memory: conjugate gradients, FALKON and solvers by name.

The converged predictor of an infinite ensemble, the GP posterior mean and kernel
ridge regression all need ``(K + s I)^-1 y`` for the train-train kernel ``K``. A
Cholesky factor holds ``N x N`` numbers (80 GB in float64 at N = 100,000); these
solvers hold at most ``N x M``, and by default not even that:

- `conjugate_gradient`: preconditioned CG for symmetric positive definite systems
  with several right-hand sides, from a matrix-vector product alone (`.cg`).
- `cg_krr`: the dual coefficients ``(K + s I)^-1 y`` of a kernel given as a tensor or
  an on-disk array (``np.memmap``, ``np.load(..., mmap_mode="r")``, zarr), read in row
  blocks, with a Nystrom or Jacobi preconditioner (`.cg`).
- `nystrom_krr`: Nystrom kernel ridge regression by FALKON (Rudi, Carratino & Rosasco
  2017): ``M`` centres, kernel blocks recomputed on the fly, never the ``N x N`` matrix
  (`.falkon`).
- `Checkpoint`: ``nystrom_krr(..., checkpoint=Checkpoint(path, every=5))`` saves CG's
  state to disk; a killed fit resumes exactly (`.checkpoint`). `auto_centers`: the
  ``n_centers="auto"`` rule.
- `solve_krr`: one entry point by name (``"exact"`` = `exact_krr`, ``"cg"``,
  ``"nystrom"``, ``"auto"``) for estimators and `ntkit.predict`; returns a
  `KernelRidgePredictor` (factor once, ``.predict(x)`` many times) (`.exact`).
- `kernel_function`: an ntkit network's NTK or NNGP as ``(a, b) -> (Na, Nb)``, from
  the one adapter `ntkit.kernel_function`.

Regularisation follows `ntkit.predict` (neural-tangents'): ``diag_reg`` is relative,
``s = diag_reg * trace(K) / N`` is added to the diagonal (``diag_reg`` itself with
``diag_reg_absolute_scale=True``), computed once by `diag_reg_absolute`, so every
solver here approaches the exact ``t = inf`` predictor ``k(x, X) (K + s I)^-1 y``.
The ``"auto"`` choice is `resolve_solver`, the one rule shared with `ntkit.predict`
and the estimators. This package imports no layer: it knows a network only through
`ntkit.kernel_function`.
"""

from ..errors import ConvergenceError, ConvergenceWarning, NotPositiveDefiniteError
from ..kernel_function import KernelFunction, kernel_function
from ._common import diag_reg_absolute, resolve_solver
from .cg import CGInfo, cg_krr, conjugate_gradient
from .checkpoint import Checkpoint, CheckpointError
from .exact import exact_krr, solve_krr
from .falkon import auto_centers, nystrom_krr
from .predictor import KernelRidgePredictor

#: The adapter's former name, kept importable.
NetworkKernel = KernelFunction

__all__ = [
    "CGInfo", "Checkpoint", "CheckpointError", "ConvergenceError", "ConvergenceWarning",
    "KernelFunction", "KernelRidgePredictor", "NetworkKernel", "NotPositiveDefiniteError",
    "auto_centers", "cg_krr",
    "conjugate_gradient", "diag_reg_absolute", "exact_krr", "kernel_function", "nystrom_krr",
    "resolve_solver", "solve_krr",
]

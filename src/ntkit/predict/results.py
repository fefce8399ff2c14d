"""The result types of `ntkit.predict`: one frozen dataclass per public call.

- `Trajectory`: outputs of gradient descent (`gradient_descent_mse`,
  `gradient_descent`) on the training set and, when a test-train kernel is given,
  on the test set.
- `EnsemblePrediction`: mean and covariance of an infinite ensemble
  (`gradient_descent_mse_ensemble`), for one kernel (``get``).
- `GPPosterior`: a Gaussian-process posterior (`gp_inference`), for one kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["EnsemblePrediction", "GPPosterior", "Trajectory"]


@dataclass(frozen=True)
class Trajectory:
    """Outputs of gradient descent at the times asked for.

    Attributes:
        train: outputs on the training set ``(N, O)``, with a leading time axis
            ``(T, N, O)`` when several times were given.
        test: outputs on the test set ``(N_test, O)`` (``(T, N_test, O)``), or None
            when no ``k_test_train`` was given.
    """

    train: Tensor
    test: Tensor | None = None


@dataclass(frozen=True)
class EnsemblePrediction:
    """Mean ``(..., N_test, O)`` and covariance ``(..., N_test, N_test)`` (shared by the
    outputs) of the infinite ensemble's test outputs; ``cov`` is None unless asked for."""

    mean: Tensor
    cov: Tensor | None


@dataclass(frozen=True)
class GPPosterior:
    """Posterior mean ``(N_test, O)``, covariance ``(N_test, N_test)`` (None unless the
    test-test kernel was given) and the log marginal likelihood of the training
    targets, summed over outputs (None for the trained-ensemble "ntk" mode, which is
    not a Bayesian posterior, and for ``solver="cg"``)."""

    mean: Tensor
    cov: Tensor | None
    log_marginal_likelihood: Tensor | None

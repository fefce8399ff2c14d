"""Training dynamics and Bayesian inference of infinitely wide networks, in closed form.

A network trained by gradient flow on the mean squared error evolves, in the
infinite-width limit, as ``df/dt = -lr * Theta (f - y) / |y|`` with ``Theta``
the NTK on the training set. Everything here follows from that linear ODE:

- `gradient_descent_mse` (`.mse`): train and test outputs at any times, one
  factorisation; `max_learning_rate`.
- `gradient_descent` (`.ode`): any differentiable loss, by ODE integration.
- `gradient_descent_mse_ensemble` (`.ensemble`): mean and covariance of the infinite
  ensemble of a network, for ``get="ntk"`` or ``"nngp"``.
- `gp_inference` (`.gp`): exact GP posteriors, for one kernel.

Each public call returns one type (`.results`): a `Trajectory`, an
`EnsemblePrediction` or a `GPPosterior`.

Conventions (neural-tangents', so that numbers agree):

- Loss: ``0.5 / |y| * ||f(x_train) - y_train||^2`` with ``|y|`` the number of
  entries of ``y_train`` (examples x outputs), so on the training set
  ``f_t = y + exp(-lr * t * K / |y|) (f_0 - y)``.
- ``diag_reg`` is relative: ``diag_reg * trace(K) / N`` is added to the
  diagonal of the train-train kernel (``diag_reg_absolute_scale=True`` adds
  ``diag_reg`` itself); one helper computes it, `ntkit.solvers.diag_reg_absolute`.
- Kernels are per output: ``(N, N)`` shared by the outputs (columns of ``y``).

This package imports no layer: it knows a network only through
`ntkit.kernel_function`.
"""

from .ensemble import EnsemblePredictor, gradient_descent_mse_ensemble
from .gp import gp_inference
from .mse import MSEPredictor, gradient_descent_mse, max_learning_rate
from .ode import ODEPredictor, gradient_descent
from .results import EnsemblePrediction, GPPosterior, Trajectory

__all__ = [
    "EnsemblePrediction", "EnsemblePredictor", "GPPosterior", "MSEPredictor", "ODEPredictor",
    "Trajectory", "gp_inference", "gradient_descent", "gradient_descent_mse",
    "gradient_descent_mse_ensemble", "max_learning_rate",
]

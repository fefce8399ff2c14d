"""Beyond the kernel regime: finite-width corrections at initialisation.

`finite_width` gives the leading-order 1/width statistics of a fully connected
network's empirical NNGP and NTK (see `ntkit.finite.corrections`);
`nngp_four_point` the four-point vertex of the NNGP. `ntk_velocity` is the empirical
NTK's derivative along a parameter step (e.g. `gradient_step`), and `NTKTracker`
records how far the NTK moves along a real training run (`ntkit.finite.motion`);
`ntk_change_forecast` forecasts how far it moves at a larger width from cheap
narrow networks and the large-width law (`ntkit.finite.forecast`).
`AbcMLP` (`abc_mlp` builds one from an ntkit MLP), `param_groups` and `coord_check`
give standard, NTK, muP and general abc-parameterizations with per-layer learning
rates for plain `torch.optim` (`ntkit.finite.params`).
"""

from .corrections import FiniteWidthKernel, finite_width, nngp_four_point
from .forecast import NTKChangeForecast, asymptotic_exponent, ntk_change_forecast
from .motion import NTKTracker, gradient_step, ntk_velocity
from .params import AbcMLP, abc_exponents, abc_mlp, coord_check, param_groups, plot_coord_check

__all__ = ["AbcMLP", "FiniteWidthKernel", "NTKChangeForecast", "NTKTracker", "abc_exponents",
           "abc_mlp", "asymptotic_exponent", "coord_check", "finite_width", "gradient_step",
           "nngp_four_point", "ntk_change_forecast", "ntk_velocity", "param_groups",
           "plot_coord_check"]

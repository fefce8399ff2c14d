"""Beyond the kernel regime: finite-width corrections at initialisation.

`finite_width` gives the leading-order 1/width statistics of a fully connected
network's empirical NNGP and NTK (see `ntkit.finite.corrections`);
`nngp_four_point` the four-point vertex of the NNGP. `ntk_velocity` is the empirical
NTK's derivative along a parameter step (e.g. `gradient_step`), and `NTKTracker`
records how far the NTK moves along a real training run (`ntkit.finite.motion`).
"""

from .corrections import FiniteWidthKernel, finite_width, nngp_four_point
from .motion import NTKTracker, gradient_step, ntk_velocity

__all__ = ["FiniteWidthKernel", "NTKTracker", "finite_width", "gradient_step",
           "nngp_four_point", "ntk_velocity"]

"""Beyond the kernel regime: finite-width corrections at initialisation.

`finite_width` gives the leading-order 1/width statistics of a fully connected
network's empirical NNGP and NTK (see `ntkit.finite.corrections`);
`nngp_four_point` the four-point vertex of the NNGP.
"""

from .corrections import FiniteWidthKernel, finite_width, nngp_four_point

__all__ = ["FiniteWidthKernel", "finite_width", "nngp_four_point"]

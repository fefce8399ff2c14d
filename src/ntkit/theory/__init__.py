"""What a kernel says before training: learning curves, spectra, convergence.

- `learning_curve`, `eigenlearning`, `measure_learning_curve`: the expected test and
  train MSE of kernel ridge regression at each training size from the kernel's
  spectrum on a pool of inputs (Simon et al. 2023's eigenlearning equations, and their
  finite-pool form for training sets drawn from the pool without replacement), and the
  experiment they predict (`ntkit.theory._eigenlearning`).
- `pool_spectrum`, `nystrom_spectrum`, `Spectrum`: the spectrum of a kernel on a pool
  and a target's power per mode, exactly or by the Nystrom method for large pools
  (`ntkit.theory._spectrum`).
- `sphere_spectrum`, `harmonic_multiplicity`: exact eigenvalues by spherical-harmonic
  degree of fully connected networks' kernels (Funk-Hecke; `ntkit.theory._sphere`).
- `convergence`: the train NTK's smallest eigenvalue and condition number, the train
  loss over time under gradient flow and descent, the time to reach a loss
  (`ntkit.theory._convergence`).
- `learning_curve_figure`, `sphere_spectrum_figure`, `convergence_figure`: matplotlib
  figures (`ntkit.theory._plots`).

Imports no layer: it takes kernel matrices, or a network only to call ``net.kernel``.
"""

from __future__ import annotations

from ._convergence import Convergence, convergence
from ._eigenlearning import (
    LearningCurve,
    MeasuredCurve,
    eigenlearning,
    learning_curve,
    measure_learning_curve,
)
from ._plots import convergence_figure, learning_curve_figure, sphere_spectrum_figure
from ._spectrum import Spectrum, nystrom_spectrum, pool_spectrum
from ._sphere import SphereSpectrum, harmonic_multiplicity, sphere_spectrum

__all__ = [
    "Convergence",
    "LearningCurve",
    "MeasuredCurve",
    "Spectrum",
    "SphereSpectrum",
    "convergence",
    "convergence_figure",
    "eigenlearning",
    "harmonic_multiplicity",
    "learning_curve",
    "learning_curve_figure",
    "measure_learning_curve",
    "nystrom_spectrum",
    "pool_spectrum",
    "sphere_spectrum",
    "sphere_spectrum_figure",
]

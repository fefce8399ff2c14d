"""Exact spectra of dot-product kernels on the sphere, by spherical-harmonic degree.

A fully connected ntkit network (any depth, activation and bias) sees inputs only through
``x . x' / d``; on inputs of fixed norm ``sqrt(d)`` (each feature of unit mean square, as
`ntkit.datasets.load_digits` scales its images) its NNGP and NTK are functions
``k(t)`` of ``t = x . x' / d`` in ``[-1, 1]``. For the uniform probability measure on that
sphere in dimension ``d``, the Funk-Hecke formula gives the eigenvalue of every degree-``l``
spherical harmonic (Smola, Ovari & Williamson 2001; Bietti & Mairal 2019, eq. (8)):

    mu_l = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * int_{-1}^{1} k(t) P_l(t) (1 - t^2)^((d-3)/2) dt

with ``P_l`` the Legendre (Gegenbauer) polynomial of dimension ``d`` normalised to
``P_l(1) = 1`` (``C_l^((d-2)/2)(t) / C_l^((d-2)/2)(1)``; Chebyshev ``T_l`` for ``d = 2``),
of multiplicity ``N(d, l) = (2l + d - 2) / (l + d - 2) * binom(l + d - 2, l)``, and
``k(t) = sum_l mu_l N(d, l) P_l(t)`` (the addition theorem). The integral is a
Gauss-Jacobi rule with ``alpha = beta = (d - 3) / 2`` on the kernel's 1-D profile, which
ntkit evaluates on pairs of points with inner product ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._spectrum import Spectrum

__all__ = ["SphereSpectrum", "harmonic_multiplicity", "sphere_spectrum"]


def harmonic_multiplicity(d: int, degree: int) -> int:
    """``N(d, l)``: the dimension of the degree-``l`` spherical harmonics on the sphere in
    ``R^d`` (``1`` for ``l = 0``; ``2`` for ``d = 2``, ``l >= 1``; ``2l + 1`` for ``d = 3``)."""
    if degree == 0:
        return 1
    return (2 * degree + d - 2) * math.comb(degree + d - 3, degree - 1) // degree


def _legendre(max_degree: int, d: int, t: np.ndarray) -> np.ndarray:
    """``(L + 1, Q)``: ``P_l(t)`` of dimension ``d`` with ``P_l(1) = 1``, by the three-term
    recurrence ``(l + d - 2) P_{l+1} = (2l + d - 2) t P_l - l P_{l-1}``."""
    out = np.empty((max_degree + 1, t.size))
    out[0] = 1.0
    if max_degree >= 1:
        out[1] = t
    for ell in range(1, max_degree):
        out[ell + 1] = ((2 * ell + d - 2) * t * out[ell] - ell * out[ell - 1]) / (ell + d - 2)
    return out


@dataclass(frozen=True)
class SphereSpectrum:
    """Eigenvalues of a dot-product kernel on the sphere of radius ``sqrt(d)``, by degree.

    Attributes:
        d: the input dimension.
        eigenvalues: ``(L + 1,)`` float64 ``mu_l`` for ``l = 0..L`` (one per harmonic).
        multiplicity: ``(L + 1,)`` float64 ``N(d, l)``.
        k_one: ``k(1)``, the kernel of an input with itself (the operator's trace).
        get: ``"ntk"`` or ``"nngp"``.
    """

    d: int
    eigenvalues: Tensor
    multiplicity: Tensor
    k_one: float
    get: str

    @property
    def degrees(self) -> Tensor:
        """``(L + 1,)`` the degrees ``0..L``."""
        return torch.arange(self.eigenvalues.shape[0])

    @property
    def tail_trace(self) -> float:
        """The trace of degrees past ``L``: ``k(1) - sum_l N(d, l) mu_l``."""
        return max(self.k_one - float((self.multiplicity * self.eigenvalues).sum()), 0.0)

    def profile(self, t) -> Tensor:
        """The kernel rebuilt from the spectrum: ``sum_{l <= L} mu_l N(d, l) P_l(t)``.

        Args:
            t: inner products ``x . x' / d`` in ``[-1, 1]``, any shape.
        """
        tt = torch.as_tensor(t, dtype=torch.float64)
        if bool(((tt < -1) | (tt > 1)).any()):
            raise ValueError("t must lie in [-1, 1] (x . x' / d of inputs of norm sqrt(d)).")
        p = _legendre(self.eigenvalues.shape[0] - 1, self.d, tt.reshape(-1).numpy())
        coef = (self.eigenvalues * self.multiplicity).numpy()
        return torch.as_tensor(coef @ p).reshape(tt.shape)

    def spectrum(self, target_power) -> Spectrum:
        """A `Spectrum` for `ntkit.theory.eigenlearning`: a target with power
        ``target_power[l]`` (the mean square of its degree-``l`` component; degrees past
        the list and past ``L`` hold none) on uniform inputs of this sphere."""
        power = torch.as_tensor(target_power, dtype=torch.float64).reshape(-1)
        size = self.eigenvalues.shape[0]
        if power.shape[0] > size or not bool(torch.isfinite(power).all()) or bool(
                (power < 0).any()):
            raise ValueError(f"target_power must hold at most {size} finite values >= 0 (one "
                             f"per degree 0..{size - 1}), got {power.tolist()[:8]}.")
        full = torch.zeros(size, dtype=torch.float64)
        full[:power.shape[0]] = power
        return Spectrum(eigenvalues=self.eigenvalues.clamp_min(0.0),
                        multiplicity=self.multiplicity, target_power=full,
                        tail_trace=self.tail_trace)


def kernel_profile(net, d: int, t: np.ndarray, get: str) -> np.ndarray:
    """``k(t)`` of ``net`` for pairs of inputs of norm ``sqrt(d)`` with ``x . x' / d = t``:
    ``x = sqrt(d) e_1`` against ``sqrt(d) (t e_1 + sqrt(1 - t^2) e_2)``."""
    tt = torch.as_tensor(t, dtype=torch.float64)
    x1 = torch.zeros(1, d, dtype=torch.float64)
    x1[0, 0] = d ** 0.5
    x2 = torch.zeros(tt.numel(), d, dtype=torch.float64)
    x2[:, 0] = d ** 0.5 * tt
    x2[:, 1] = d ** 0.5 * (1 - tt ** 2).clamp_min(0.0).sqrt()
    out = getattr(net.kernel(x1, x2), get).detach().to(torch.float64).reshape(-1)
    # At t = 1 the pair is one point twice: its self kernel, exact (a cross pair reaches
    # correlation 1 only to rounding, which the arc-cosine's square root turns into 1e-8).
    ones = tt.reshape(-1) == 1
    if bool(ones.any()):
        out[ones] = getattr(net.kernel(x1, diagonal=True), get).detach().to(torch.float64)[0]
    return out.numpy()


def sphere_spectrum(net, d: int, max_degree: int, *, get: str = "ntk",
                    nodes: int | None = None) -> SphereSpectrum:
    """Eigenvalues by spherical-harmonic degree of ``net``'s kernel on the sphere of
    radius ``sqrt(d)`` (uniform measure), by the Funk-Hecke formula (module docstring).

    Args:
        net: a fully connected ntkit network taking ``(N, d)`` inputs (its kernel must be a
            function of ``x . x'`` on the sphere: no convolution, attention or masks).
        d: the input dimension, ``>= 2``.
        max_degree: ``L``, the last degree.
        get: ``"ntk"`` or ``"nngp"``.
        nodes: Gauss-Jacobi nodes (default ``max(4 L, 2000)``). The profile of a ReLU
            network is not smooth at ``t = 1``; measured for a 1-hidden-layer ReLU NTK
            in ``d = 3``: 2000 and 4000 nodes agree to 4e-7 relative through ``l = 20``.

    Returns:
        A `SphereSpectrum`.

    Example::

        s = sphere_spectrum(net, d=10, max_degree=8)
        s.eigenvalues, s.multiplicity          # mu_l and N(10, l), l = 0..8
    """
    from scipy.special import gammaln, roots_jacobi

    if isinstance(d, bool) or not isinstance(d, int) or d < 2:
        raise ValueError(f"d must be an integer >= 2 (the input dimension), got {d!r}.")
    if isinstance(max_degree, bool) or not isinstance(max_degree, int) or max_degree < 0:
        raise ValueError(f"max_degree must be an integer >= 0, got {max_degree!r}.")
    if get not in ("ntk", "nngp"):
        raise ValueError(f"get must be 'ntk' or 'nngp', got {get!r}.")
    q = max(4 * max_degree, 2000) if nodes is None else nodes
    if isinstance(q, bool) or not isinstance(q, int) or q <= max_degree:
        raise ValueError(f"nodes must be an integer above max_degree, got {nodes!r}.")
    a = (d - 3) / 2
    t, w = roots_jacobi(q, a, a)
    k = kernel_profile(net, d, np.concatenate([t, [1.0]]), get)
    if not np.isfinite(k).all():
        raise ValueError(f"the network's {get} is not finite on the sphere of radius sqrt(d); "
                         f"check its weight variances (or compute in float64).")
    k_t, k_one = k[:-1], float(k[-1])
    const = math.exp(gammaln(d / 2) - gammaln((d - 1) / 2)) / math.sqrt(math.pi)
    mu = const * (_legendre(max_degree, d, t) @ (w * k_t))
    mult = [float(harmonic_multiplicity(d, ell)) for ell in range(max_degree + 1)]
    return SphereSpectrum(d=d, eigenvalues=torch.as_tensor(mu, dtype=torch.float64),
                          multiplicity=torch.tensor(mult, dtype=torch.float64),
                          k_one=k_one, get=get)

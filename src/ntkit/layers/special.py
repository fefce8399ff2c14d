"""Closed-form nonlinearities after neural-tangents' less common ones: `Hermite`,
`Polynomial`, `Gabor`, `SigmoidLike` and the kernel map `ExpNormalized`.

All rules use the notation of `ntkit.layers.activations`: ``(X, Y) ~ N(0, [[v1, k],
[k, v2]])``, ``nngp' = E[f(X) f(Y)]`` and ``ntk' = ntk E[f'(X) f'(Y)]``. For a smooth
``f``, Price's theorem (Price 1958) gives ``E[f'(X) f'(Y)] = d E[f(X) f(Y)] / dk`` at
fixed ``v1, v2``; the derivative rules below are written that way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor, nn

from .._checks import as_real, is_int
from .activations import Activation, Erf, _changed
from .base import BuildContext, Shapes

__all__ = ["ExpNormalized", "Gabor", "Hermite", "Polynomial", "SigmoidLike"]


def _poly(coef: Sequence[float], x: Tensor) -> Tensor:
    """``sum_i coef[i] x^i`` by Horner's rule (``coef`` lowest degree first)."""
    out = torch.full_like(x, coef[-1])
    for c in reversed(coef[:-1]):
        out = out * x + c
    return out


# ------------------------------------------------------------------ Hermite
@cache
def _hermite_terms(n: int) -> tuple[tuple[float, int, int], ...]:
    """``E[He_n(X) He_n(Y)] / n! = sum_j c_j q^j k^(n - 2j)``, ``q = (v1 - 1)(v2 - 1) / 4``,
    as terms ``(c_j, j, n - 2j)`` with ``c_j = n! / (j!^2 (n - 2j)!)``.

    From the multiplication theorem ``He_n(g u) = sum_j n! / (j! (n - 2j)!) g^(n-2j)
    ((g^2 - 1) / 2)^j He_(n-2j)(u)`` (DLMF 18.18.13, probabilists' form) with
    ``g = sqrt(v)``, and ``E[He_m(U) He_m'(V)] = delta_mm' m! rho^m`` for standard
    normal ``U, V`` of correlation ``rho`` (Mehler; DLMF 18.18.28).
    """
    f = math.factorial
    return tuple((f(n) / (f(j) ** 2 * f(n - 2 * j)), j, n - 2 * j) for j in range(n // 2 + 1))


class Hermite(Activation):
    """The normalised probabilists' Hermite polynomial ``He_n(x) / sqrt(n!)``, whose
    second moment under a standard normal is 1 (neural-tangents' ``Hermite``).

    For unit pre-activation variances (``v1 = v2 = 1``, e.g. `LayerNorm` then
    ``Linear(w_std=1, b_std=0)``) Mehler's formula gives neural-tangents' rule::

        E[f f] = k^n,        E[f' f'] = n k^(n-1)

    neural-tangents applies it to every input (and warns that inputs must have unit
    variance). ntkit computes the exact expectation for any variances instead (see
    `_hermite_terms`), with ``q = (v1 - 1)(v2 - 1) / 4``::

        E[f f]   = sum_j n! / (j!^2 (n-2j)!) q^j k^(n-2j)
        E[f' f'] = sum_j n! / (j!^2 (n-2j-1)!) q^j k^(n-2j-1)

    which equals neural-tangents' wherever its assumption holds (``q = 0``: either
    variance is 1) and is the finite twin's kernel everywhere else.

    Args:
        degree: ``n``, a non-negative int.
    """

    spec_names = ("hermite",)

    def __init__(self, degree: int) -> None:
        if not is_int(degree) or degree < 0:
            raise ValueError(f"Hermite: degree must be a non-negative int (the polynomial's "
                             f"degree n of He_n), got {degree!r}.")
        self.degree = int(degree)

    def spec_call(self):
        return "hermite", [self.degree], {}

    def fn(self, x: Tensor) -> Tensor:
        # He_(m+1) = x He_m - m He_(m-1), He_0 = 1, He_1 = x.
        prev, cur = torch.ones_like(x), x
        if self.degree == 0:
            return prev
        for m in range(1, self.degree):
            prev, cur = cur, x * cur - m * prev
        return cur / math.sqrt(math.factorial(self.degree))

    def _nngp_and_dot(self, k, v1, v2):
        q = (v1 - 1) * (v2 - 1) / 4
        nngp, dot = torch.zeros_like(k), torch.zeros_like(k)
        for c, j, p in _hermite_terms(self.degree):
            qj = q**j if j else 1.0
            nngp = nngp + c * qj * k**p
            if p > 0:
                dot = dot + (c * p) * qj * k ** (p - 1)
        return nngp, dot

    def __repr__(self) -> str:
        return f"Hermite({self.degree})"


# --------------------------------------------------------------- Polynomial
class Polynomial(Activation):
    """``coef[0] + coef[1] x + ... + coef[n] x^n`` (neural-tangents' ``Polynomial``,
    coefficients lowest degree first as in `numpy.polynomial.Polynomial`).

    With ``X = sqrt(v) U`` the Hermite coefficients of ``f(sqrt(v) u)`` are
    ``sqrt(v)^l b_l(v)``, ``b_l(v) = sum_j coef[l+2j] (l+2j)! / (2^j j! sqrt(l!)) v^j``
    (from ``x^m = sum_j m! / (j! 2^j (m-2j)!) He_(m-2j)(x)``, DLMF 18.18.20), and
    Mehler's formula (DLMF 18.18.28) gives, without dividing by ``sqrt(v1 v2)``::

        E[f f]   = sum_l b_l(v1) b_l(v2) k^l
        E[f' f'] = sum_l l b_l(v1) b_l(v2) k^(l-1)

    which is neural-tangents' rule ``sum_l r_l(v1) r_l(v2) rho^l`` multiplied out.

    Args:
        coef: the coefficients, a non-empty sequence of finite real numbers.
    """

    spec_names = ("polynomial",)

    def __init__(self, coef: Sequence[float]) -> None:
        if isinstance(coef, torch.Tensor):
            coef = coef.detach().double().reshape(-1).tolist() if coef.ndim <= 1 else coef
        if isinstance(coef, (str, bytes)) or not hasattr(coef, "__len__") or (
                hasattr(coef, "ndim") and coef.ndim != 1):
            raise TypeError(f"Polynomial: coef must be a 1-D sequence of numbers (lowest "
                            f"degree first), e.g. Polynomial([0.0, 1.0, 0.5]); got {coef!r}.")
        if len(coef) == 0:
            raise ValueError("Polynomial: coef is empty; give at least one coefficient "
                             "(lowest degree first), e.g. Polynomial([0.0, 1.0]) for f(x) = x.")
        values = tuple(as_real(c, f"coef[{i}]") for i, c in enumerate(coef))
        if not all(math.isfinite(c) for c in values):
            raise ValueError(f"Polynomial: every coefficient must be finite, got {values}.")
        self.coef = values
        f = math.factorial
        n = len(values)
        # _b[l]: the coefficients of b_l(v) in v, lowest degree first.
        self._b = tuple(
            tuple(values[l + 2 * j] * f(l + 2 * j) / (2**j * f(j) * math.sqrt(f(l)))
                  for j in range((n - 1 - l) // 2 + 1))
            for l in range(n))

    def spec_call(self):
        return "polynomial", [self.coef], {}

    def fn(self, x: Tensor) -> Tensor:
        return _poly(self.coef, x)

    def _nngp_and_dot(self, k, v1, v2):
        nngp, dot = torch.zeros_like(k), torch.zeros_like(k)
        for l, b in enumerate(self._b):
            if not any(b):
                continue
            bb = _poly(b, v1) * _poly(b, v2)
            nngp = nngp + bb * k**l
            if l > 0:
                dot = dot + bb * l * k ** (l - 1)
        return nngp, dot

    def __repr__(self) -> str:
        return f"Polynomial({list(self.coef)})"


# -------------------------------------------------------------------- Gabor
class Gabor(Activation):
    """The Gabor function ``exp(-x^2) sin(x)`` (neural-tangents' ``Gabor``).

    Writing ``sin x sin y = (cos(x - y) - cos(x + y)) / 2`` and using the Gaussian
    integral ``E[exp(-|Z|^2 + i w.Z)] = D^(-1/2) exp(-w^T Sigma (I + 2 Sigma)^(-1) w / 2)``
    with ``D = det(I + 2 Sigma) = 1 + 2 s + 4 (v1 v2 - k^2)``, ``s = v1 + v2``::

        E[f f] = (exp(-a_-) - exp(-a_+)) / (2 sqrt(D)),
        a_(-/+) = (s + 4 (v1 v2 - k^2) -/+ 2 k) / (2 D)

    and ``E[f' f'] = d E[f f] / dk`` (Price's theorem), differentiated in closed form.
    """

    spec_names = ("gabor",)

    def fn(self, x: Tensor) -> Tensor:
        return torch.exp(-x * x) * torch.sin(x)

    def _nngp_and_dot(self, k, v1, v2):
        s = v1 + v2
        det4 = 4 * (v1 * v2 - k * k)
        d = 1 + 2 * s + det4
        base = s + det4
        e_minus = torch.exp(-(base - 2 * k) / (2 * d))
        e_plus = torch.exp(-(base + 2 * k) / (2 * d))
        root = torch.sqrt(d)
        nngp = (e_minus - e_plus) / (2 * root)
        # d/dk: dD/dk = d(base)/dk = -8k, so d a_-/+/dk = ((-8k -/+ 2) D + 8k (base -/+ 2k)) / (2 D^2).
        da_minus = ((-8 * k - 2) * d + 8 * k * (base - 2 * k)) / (2 * d * d)
        da_plus = ((-8 * k + 2) * d + 8 * k * (base + 2 * k)) / (2 * d * d)
        dot = (e_plus * da_plus - e_minus * da_minus) / (2 * root) + nngp * (4 * k / d)
        return nngp, dot

    def __repr__(self) -> str:
        return "Gabor()"


# -------------------------------------------------------------- SigmoidLike
#: neural-tangents' ``Sigmoid_like`` scale: minimises the squared distance to the
#: logistic sigmoid on [-5, 5].
SIGMOID_LIKE_SCALE = 2.4020563531719796


class SigmoidLike(Erf):
    """``0.5 erf(x / 2.4020563531719796) + 0.5``, an erf that fits the logistic
    sigmoid (neural-tangents' ``Sigmoid_like``): `Erf` with ``a = c = 0.5`` and
    ``b = 1 / 2.4020563531719796`` (Williams 1997 for the closed form)."""

    spec_names = ("sigmoid_like",)

    def __init__(self) -> None:
        super().__init__(a=0.5, b=1 / SIGMOID_LIKE_SCALE, c=0.5)

    def spec_call(self):
        return "sigmoid_like", [], {}

    def __repr__(self) -> str:
        return "SigmoidLike()"


# ------------------------------------------------------------ ExpNormalized
class ExpNormalized(Activation):
    """The "Gaussian normalised kernel" of Shankar et al. 2020 ("Neural kernels
    without tangents", p. 6), neural-tangents' ``ExpNormalized``. With
    ``r = sqrt(v1 v2)`` and ``rho = k / r`` (clipped to [-1, 1] if ``do_clip``)::

        nngp' = r exp(gamma (rho + shift)),      ntk' = gamma ntk exp(gamma (rho + shift))

    ``r`` is floored at 1e-15 (``sqrt(1e-30)``) as in neural-tangents. This is a kernel
    map, not the kernel of an elementwise function (a positively homogeneous ``f``
    gives arc-cosine kernels), and neural-tangents has no finite network for it.

    The finite twin (`build`) is a random-feature layer of the same width ``C`` whose
    infinite-width kernel is this one: per position, with ``z`` the ``C`` channels,
    fixed (untrained) ``w_i ~ N(0, I_C)`` and ``c = gamma (shift - 1) / 2``::

        phi_i(z) = (|z| / sqrt(C)) exp(sqrt(gamma) w_i . z / |z| + c)

    so ``E_w[phi_i(z) phi_i(z')] = r exp(gamma (rho + shift))`` exactly (``E exp(a.w) =
    exp(|a|^2 / 2)``), and its NTK contribution tends to ``gamma exp(gamma (rho + shift))``
    as ``C`` grows (the gradient's tangential part dominates; corrections are O(1/C)).

    Args:
        gamma: the exponent's scale, ``>= 0`` (negative values give a kernel that is
            not positive semi-definite).
        shift: added to the correlation before exponentiating.
        do_clip: clip the correlation to [-1, 1] first.
    """

    spec_names = ("exp_normalized",)

    def __init__(self, gamma: float = 1.0, shift: float = -1.0, do_clip: bool = False) -> None:
        self.gamma, self.shift = as_real(gamma, "gamma"), as_real(shift, "shift")
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"ExpNormalized: gamma must be a finite number >= 0, got "
                             f"{self.gamma} (a negative gamma gives a kernel that is not "
                             f"positive semi-definite).")
        if not math.isfinite(self.shift):
            raise ValueError(f"ExpNormalized: shift must be finite, got {self.shift}.")
        if not isinstance(do_clip, bool):
            raise TypeError(f"ExpNormalized: do_clip must be True or False, got {do_clip!r}.")
        self.do_clip = do_clip

    def spec_call(self):
        kw = _changed(self, gamma=1.0, shift=-1.0)
        if self.do_clip:
            kw["do_clip"] = True
        return "exp_normalized", [], kw

    def fn(self, x: Tensor) -> Tensor:
        raise TypeError("ExpNormalized is a kernel map across channels, not an elementwise "
                        "function; use build() for its random-feature twin.")

    def _nngp_and_dot(self, k, v1, v2):
        r = torch.sqrt(torch.clamp(v1 * v2, min=1e-30))
        rho = k / r
        if self.do_clip:
            rho = rho.clamp(-1.0, 1.0)
        e = torch.exp((rho + self.shift) * self.gamma)
        return r * e, e * self.gamma

    def _variance(self, c):
        r = torch.sqrt(torch.clamp(c * c, min=1e-30))
        return r * torch.exp((c / r + self.shift) * self.gamma)

    def _self_dot(self, c):
        r = torch.sqrt(torch.clamp(c * c, min=1e-30))
        return torch.exp((c / r + self.shift) * self.gamma) * self.gamma

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        channels = shape[0]
        module = ExpNormalizedFeatures(ctx.randn(channels, channels), self.gamma, self.shift)
        return module, shape

    def __repr__(self) -> str:
        return f"ExpNormalized(gamma={self.gamma}, shift={self.shift}, do_clip={self.do_clip})"


class ExpNormalizedFeatures(nn.Module):
    """The random-feature twin of `ExpNormalized` (channels on axis 1).

    Args:
        weight: ``(C, C)`` standard normal draws, kept as a buffer (not trained).
        gamma: the exponent's scale.
        shift: added to the correlation.
    """

    def __init__(self, weight: Tensor, gamma: float, shift: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.gamma, self.shift = gamma, shift

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        unit = x / norm.clamp_min(torch.finfo(x.dtype).tiny)
        proj = (unit.movedim(1, -1) @ self.weight.to(x.dtype).T).movedim(-1, 1)
        scale = norm / math.sqrt(channels)
        return scale * torch.exp(proj * math.sqrt(self.gamma)
                                 + self.gamma * (self.shift - 1) / 2)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, shift={self.shift}"

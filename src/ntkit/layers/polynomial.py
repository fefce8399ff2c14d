"""Polynomial nonlinearities: `Monomial` and `RectifiedMonomial` (the arc-cosine
kernels of any degree), with closed-form NNGP and NTK rules."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from .._checks import is_int
from .activations import _PI, Activation, _arccos, _cos_and_scale

__all__ = ["Monomial", "RectifiedMonomial"]


@lru_cache(maxsize=None)
def _monomial_terms(n: int) -> tuple[tuple[float, int, int], ...]:
    """``E[X^n Y^n] = sum c k^p (v1 v2)^q`` as terms ``(c, p, q)``.

    From ``x^n = sum_j n! / (j! 2^j (n-2j)!) He_{n-2j}(x)`` and
    ``E[He_m(U) He_m'(V)] = delta_mm' m! rho^m`` for unit-variance U, V.
    """
    terms = []
    for j in range(n // 2 + 1):
        coef = math.factorial(n) / (math.factorial(j) * 2**j * math.factorial(n - 2 * j))
        terms.append((coef**2 * math.factorial(n - 2 * j), n - 2 * j, j))
    return tuple(terms)


def _monomial_moment(n: int, k: Tensor, prod: Tensor) -> Tensor:
    if n < 0:
        return torch.zeros_like(k)
    out = torch.zeros_like(k) if n > 0 else torch.ones_like(k)
    for c, p, q in _monomial_terms(n) if n > 0 else ():
        out = out + c * k**p * prod**q
    return out


class Monomial(Activation):
    """``x^degree``: ``E[X^n Y^n]`` by the Hermite expansion of ``x^n`` (Isserlis),
    ``E[f' f'] = n^2 E[X^(n-1) Y^(n-1)]``."""

    spec_names = ("monomial",)

    def __init__(self, degree: int) -> None:
        if not is_int(degree) or degree < 0:
            raise ValueError(f"degree must be a non-negative int, got {degree!r}.")
        self.degree = int(degree)

    def spec_call(self):
        return type(self).spec_names[0], [self.degree], {}

    def fn(self, x: Tensor) -> Tensor:
        return x**self.degree

    def _nngp(self, k, v1, v2):
        return _monomial_moment(self.degree, k, v1 * v2)

    def _dot(self, k, v1, v2):
        n = self.degree
        return _monomial_moment(n - 1, k, v1 * v2) * n**2

    def __repr__(self) -> str:
        return f"Monomial({self.degree})"


@lru_cache(maxsize=None)
def _arccos_terms(n: int) -> tuple[tuple[float, int, int, int], ...]:
    """``J_n(theta)`` of the arc-cosine kernel (Cho & Saul 2009, eq. 7)::

        J_n = (-1)^n sin^(2n+1)(theta) ((1/sin theta) d/dtheta)^n ((pi - theta) / sin theta)

    as terms ``(c, e, p, q)`` of ``c (pi - theta)^e cos^p(theta) sin^q(theta)``
    (all ``q >= 0``), by applying the operator symbolically.
    """
    terms: dict[tuple[int, int, int], float] = {(1, 0, -1): 1.0}
    for _ in range(n):
        new: dict[tuple[int, int, int], float] = {}
        for (e, p, q), c in terms.items():
            # d/dtheta of (pi - theta)^e cos^p sin^q, then divided by sin.
            for key, val in (((e - 1, p, q - 1), -e * c), ((e, p - 1, q), -p * c),
                             ((e, p + 1, q - 2), q * c)):
                if val:
                    new[key] = new.get(key, 0.0) + val
        terms = new
    sign = (-1) ** n
    return tuple((sign * c, e, p, q + 2 * n + 1) for (e, p, q), c in terms.items() if c)


def _arccos_kernel(n: int, k: Tensor, v1: Tensor, v2: Tensor) -> Tensor:
    """``E[f_n(X) f_n(Y)] = (v1 v2)^(n/2) J_n(theta) / (2 pi)`` for ``f_n = x^n 1{x > 0}``."""
    cos, scale = _cos_and_scale(k, v1, v2)
    phi = _arccos(-cos)  # pi - theta
    sin = torch.sin(phi)
    j = torch.zeros_like(cos)
    for c, e, p, q in _arccos_terms(n):
        term = c * cos**p * sin**q
        j = j + (term * phi if e else term)
    return j * scale**n / (2 * _PI)


def _double_factorial(n: int) -> int:
    return math.prod(range(n, 0, -2)) if n > 0 else 1


class RectifiedMonomial(Activation):
    """``x^degree`` for ``x > 0``, else 0: the arc-cosine kernel of that degree
    (Cho & Saul 2009); ``E[f' f'] = n^2 E[f_(n-1)(X) f_(n-1)(Y)]``."""

    spec_names = ("rectifiedmonomial",)

    def __init__(self, degree: int) -> None:
        if not is_int(degree) or degree < 0:
            raise ValueError(f"degree must be a non-negative int, got {degree!r}.")
        self.degree = int(degree)

    def spec_call(self):
        return type(self).spec_names[0], [self.degree], {}

    def fn(self, x: Tensor) -> Tensor:
        return (x > 0).to(x.dtype) * x**self.degree

    def _nngp(self, k, v1, v2):
        return _arccos_kernel(self.degree, k, v1, v2)

    def _dot(self, k, v1, v2):
        n = self.degree
        if n == 0:
            return torch.zeros_like(k)
        return _arccos_kernel(n - 1, k, v1, v2) * n**2

    def _variance(self, c: Tensor) -> Tensor:
        # E[X^(2n) 1{X > 0}] = (2n - 1)!! c^n / 2, and 0 when c = 0.
        n = self.degree
        return (c > 0).to(c.dtype) * c**n * (_double_factorial(2 * n - 1) / 2)

    def _self_dot(self, c: Tensor) -> Tensor:
        n = self.degree
        if n == 0:
            return torch.zeros_like(c)
        return (c > 0).to(c.dtype) * c ** (n - 1) * (n**2 * _double_factorial(2 * n - 3) / 2)

    def __repr__(self) -> str:
        return f"RectifiedMonomial({self.degree})"

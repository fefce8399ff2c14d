"""Any elementwise nonlinearity, by Gauss-Hermite quadrature."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import scipy.special
import torch
from torch import Tensor, nn

from .._checks import is_int
from .activations import EDGE_ULPS, Activation

__all__ = [
    "AUTO_DEGREES", "MAX_DEGREE", "QUADRATURE_TARGET", "Elementwise", "QuadratureWarning",
    "Sigmoid", "Softplus", "Tanh",
]

#: Parameter-free torch activations without a closed form, converted by quadrature.
NUMERICAL_MODULES = (
    nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Hardtanh,
    nn.ReLU6, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardswish, nn.Hardsigmoid,
    nn.Softshrink, nn.Hardshrink,
)

#: Quadrature evaluates ``degree^2`` points per kernel entry; entries are chunked
#: so that one chunk holds at most this many points.
_POINTS_PER_CHUNK = 1 << 22


def _sqrt(t: Tensor, floor: Tensor | None = None) -> Tensor:
    """``sqrt(t)`` for ``t >= 0`` whose gradient is 0 at 0 instead of infinite: the
    residual variance is 0 exactly for an input paired with itself or a duplicate,
    for any hyperparameter, and ``0 * inf`` would put NaN into the gradients.

    In the inputs, the residual's square root is a kink (a cone across a
    self-pair), given derivative 0 as neural-tangents' ``_sqrt`` does
    (``stax/elementwise.py``); with ``floor`` (a tensor broadcasting against
    ``t``) the gradient is also 0 where ``t <= floor``, the rounding band of a
    duplicate in another tensor (see `ntkit.layers.activations._arccos`).
    Values are those of `torch.sqrt`."""
    if not t.requires_grad:
        return torch.sqrt(t)
    flat = t <= 0 if floor is None else t <= floor.detach()
    return torch.where(flat, torch.sqrt(t.detach()), torch.sqrt(torch.where(flat, 1.0, t)))


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` where ``b > 0``, else 0, with finite gradients (``b`` is a clamped
    square root of a variance that may be 0: an all-zero input without bias)."""
    positive = b > 0
    return torch.where(positive, a / torch.where(positive, b, 1.0), 0.0)


class QuadratureWarning(RuntimeWarning):
    """`Elementwise` with ``degree="auto"`` could not reach `QUADRATURE_TARGET` within
    `MAX_DEGREE` nodes per axis; the message gives the estimated relative error."""


#: Relative error that ``degree="auto"`` aims at for ``E[f(X)^2]`` and ``E[f'(X)^2]`` at
#: the largest pre-activation variance of a call (see `Elementwise`).
QUADRATURE_TARGET = 1e-6
#: The degrees ``degree="auto"`` tries, cheapest first; the last one is the cap.
AUTO_DEGREES = (24, 32, 48, 64, 96, 128, 192, 256)
MAX_DEGREE = AUTO_DEGREES[-1]


@functools.lru_cache(maxsize=32)
def _hermite(degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``E[g(U)] ~ sum_i w_i g(u_i)`` for standard normal ``U``,
    made exactly symmetric about 0 (so the 2-D rule is symmetric in its arguments)."""
    nodes, weights = scipy.special.roots_hermite(degree)  # stable at high degree
    nodes, weights = (nodes - nodes[::-1]) / 2, (weights + weights[::-1]) / 2
    return nodes * np.sqrt(2.0), weights / np.sqrt(np.pi)


def _reference_moments(fn, derivative, v: float) -> tuple[float, float]:
    """``E[f(X)^2]`` and ``E[f'(X)^2]`` for ``X ~ N(0, v)`` by the trapezoid rule on a
    fine grid in ``u = X / sqrt(v)`` over ``[-12, 12]`` (an independent witness for
    `Elementwise._auto_degree`: spectrally accurate while the grid resolves ``f``)."""
    u = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
    weight = torch.exp(-u * u / 2) * ((u[1] - u[0]) / np.sqrt(2 * np.pi))
    x = np.sqrt(v) * u
    return float((fn(x) ** 2 * weight).sum()), float((derivative(x) ** 2 * weight).sum())


def _points(k: Tensor, v1: Tensor, v2: Tensor, u: Tensor, rule: str):
    """Quadrature points ``X, Y`` (E, d, d) of the 2-D rule for covariances
    ``[[v1, k], [k, v2]]`` (E,), and how to fold their products into two halves whose
    sum swaps exactly with ``v1`` and ``v2`` (so the rule is symmetric bit for bit)."""
    tiny = torch.finfo(k.dtype).tiny
    ui, uj = u[None, :, None], u[None, None, :]
    col = lambda t: t[:, None, None]
    tracked = k.requires_grad or v1.requires_grad or v2.requires_grad
    div = _safe_div if tracked else torch.div
    # With gradients: zero variances (zero inputs without bias) give S = 0 with finite
    # gradients (clamped to `tiny` only without), and the square roots of the
    # residual variances are flat in the rounding band of a self-pair (see `_sqrt`).
    band = EDGE_ULPS * torch.finfo(k.dtype).eps
    if rule == "symmetric":
        # S = (Sigma + s I) / t: swapping v1, v2 swaps X with Y and i with j.
        s = _sqrt((v1 * v2 - k * k).clamp_min(0), band * v1 * v2)
        t = _sqrt(v1 + v2 + 2 * s)
        if not tracked:
            t = t.clamp_min(tiny)
        s11, s12, s22 = col(div(v1 + s, t)), col(div(k, t)), col(div(v2 + s, t))
        return s11 * ui + s12 * uj, s12 * ui + s22 * uj, lambda p: p + p.transpose(1, 2)

    def cholesky(a, b):  # X = sqrt(a) U, Y = k / sqrt(a) U + sqrt(b - k^2 / a) V
        sa = _sqrt(a)
        if not tracked:
            sa = sa.clamp_min(tiny)
        slope = div(k, sa)
        resid = _sqrt((b - slope * slope).clamp_min(0), band * b)
        return (col(sa) * ui).expand(-1, -1, u.numel()), col(slope) * ui + col(resid) * uj

    x1, y1 = cholesky(v1, v2)  # both orders: swapping v1, v2 swaps the two halves
    y2, x2 = cholesky(v2, v1)
    d = u.numel()
    return torch.cat([x1, x2], 1), torch.cat([y1, y2], 1), lambda p: p[:, :d] + p[:, d:]


class Elementwise(Activation):
    """Any elementwise torch function, its kernels by 2-D Gauss-Hermite quadrature.

    The pair ``(X, Y) ~ N(0, [[v1, k], [k, v2]])`` is written ``(X, Y) = S (U, V)``
    with independent standard normal ``U, V`` and ``S`` the symmetric square root of
    the covariance, for 2 x 2 matrices in closed form::

        S = (Sigma + s I) / t,   s = sqrt(v1 v2 - k^2),   t = sqrt(v1 + v2 + 2 s)

    and ``E[f(X) f(Y)]`` (and ``E[f'(X) f'(Y)]``) is a product Gauss-Hermite rule with
    ``degree`` nodes per axis (Han et al. 2022, "Fast neural kernel embeddings for
    general activations", factor the covariance by Cholesky instead). Swapping
    ``v1`` and ``v2`` swaps the axes of ``S``, so the rule is symmetric in its two
    arguments (its terms are summed symmetrised, so ``k(x1, x2) == k(x2, x1).T``
    exactly), and it is more accurate than the Cholesky factorisation: for erf at
    variance 9 and degree 64 the error of ``E[f'(X) f'(Y)]`` is 2e-3 instead of 8e-2.
    The derivative is taken by forward-mode autodiff of ``fn``.

    The error grows with the variance (``f(sqrt(v) u)`` varies faster), the worst case
    being the diagonal ``k = v1 = v2``. With ``degree="auto"`` (the default) each call
    takes the smallest degree of `AUTO_DEGREES` whose diagonal rule at the call's
    largest variance is within `QUADRATURE_TARGET` (1e-6, relative) of a fine-grid
    reference for both moments, and warns (`QuadratureWarning`, with the estimated
    error) when even `MAX_DEGREE` (256) is not: e.g. erf beyond variance ~16, or
    functions with kinks (ReLU6, Hardtanh, Softsign: prefer closed forms where they
    exist, or pass a degree). Measured for erf against its closed form (`Erf`) with
    ``"auto"``: relative error <= 1e-7 at variances 0.1 to 15 (degree 24 at variance
    1, 192 at 9). The degree is chosen per call (per tile), so kernels of one matrix
    agree within the target, not bit for bit, across tile sizes. An int ``degree`` is
    used as given. Cost: ``2 degree^2`` evaluations of ``fn`` per kernel entry.

    Args:
        fn: elementwise function of a tensor, e.g. ``torch.tanh``, ``torch.nn.SiLU()``.
        degree: quadrature nodes per axis, or ``"auto"`` to adapt to the variance.
        name: shown in messages and ``repr``; defaults to the function's name.
        rule: ``"symmetric"`` (the symmetric square root above) or ``"cholesky"``: the
            classic rule averaged over both orders of its arguments (symmetric too), which
            puts each kink at 0 on a grid axis: better for functions with a kink at 0
            (measured for ReLU^2 at degree 360: 2e-6 against 1.3e-5), much worse for
            smooth ones (erf at variance 9, degree 128: 7e-3 against 2e-7).
    """

    torch_modules = NUMERICAL_MODULES

    def __init__(self, fn: Callable[[Tensor], Tensor], degree: int | str = "auto", *,
                 name: str | None = None,
                 rule: Literal["symmetric", "cholesky"] = "symmetric") -> None:
        if not callable(fn):
            raise TypeError(f"fn must be a callable on tensors, got {type(fn).__name__}.")
        if degree != "auto" and (not is_int(degree) or degree < 1):
            raise ValueError(f"degree must be a positive int or 'auto', got {degree!r}.")
        if rule not in ("symmetric", "cholesky"):
            raise ValueError(f"rule must be 'symmetric' or 'cholesky', got {rule!r}.")
        self._fn = fn
        self.rule = rule
        self.degree = "auto" if degree == "auto" else int(degree)
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self._check_fn()

    @classmethod
    def from_torch_module(cls, module, ctx):
        if getattr(module, "inplace", False):  # quadrature must not overwrite its nodes
            module = copy.copy(module)
            module.inplace = False
        return Elementwise(module, degree=ctx.degree, name=repr(module))

    def _check_fn(self) -> None:
        x = torch.linspace(-2, 2, 7, dtype=torch.float64)
        try:
            y = self._fn(x)
        except Exception as e:
            raise TypeError(
                f"Elementwise: fn={self.name} could not be applied to a float64 tensor ({e})."
            ) from e
        if not isinstance(y, Tensor) or y.shape != x.shape:
            raise TypeError(
                f"Elementwise: fn={self.name} must map a tensor to a tensor of the same shape "
                f"(elementwise); on shape (7,) it returned "
                f"{getattr(y, 'shape', type(y).__name__)}."
            )

    def fn(self, x: Tensor) -> Tensor:
        return self._fn(x)

    def derivative(self, x: Tensor) -> Tensor:
        """``fn'(x)`` by forward-mode autodiff (falls back to reverse mode)."""
        try:
            return torch.func.jvp(self._fn, (x,), (torch.ones_like(x),))[1]
        except (RuntimeError, NotImplementedError):
            # When x carries a graph (differentiable hyperparameters), so does fn'(x).
            tracked = x.requires_grad
            with torch.enable_grad():
                xg = x if tracked else x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._fn(xg).sum(), xg, allow_unused=True,
                                           create_graph=tracked)
            return torch.zeros_like(x) if g is None else g

    def quadrature_degree(self, variance: float, *, want_dot: bool = True) -> int:
        """The degree a call whose largest pre-activation variance is ``variance`` uses.

        Args:
            variance: the largest of ``v1`` and ``v2`` in the call.
            want_dot: whether ``E[f'(X) f'(Y)]`` (the NTK's) must reach the target too.

        Returns:
            ``degree`` itself when it is an int; for ``"auto"`` see the class docstring.
        """
        if self.degree != "auto":
            return self.degree
        if not math.isfinite(variance) or variance <= 0:
            return AUTO_DEGREES[0]
        return self._auto_degree(float(variance), want_dot)

    def _auto_degree(self, v: float, want_dot: bool) -> int:
        want = _reference_moments(self._fn, self.derivative, v)
        scale = [max(abs(w), 1e-300) for w in want]
        c = torch.tensor([v], dtype=torch.float64)
        error = math.inf
        for degree in AUTO_DEGREES:
            got = self._integrate(c, c, c, degree, want_dot=want_dot)
            errors = [abs(float(g) - w) / s for g, w, s in zip(got, want, scale)
                      if g is not None]
            error = max(errors)
            if error <= QUADRATURE_TARGET or not math.isfinite(error):
                return degree
        warnings.warn(
            f"Elementwise({self.name}): Gauss-Hermite quadrature at the largest "
            f"pre-activation variance {v:.3g} has an estimated relative error of "
            f"{error:.1e} with {MAX_DEGREE} nodes per axis (target "
            f"{QUADRATURE_TARGET:.0e}). Rescale the inputs or weights (w_std) so the "
            "variance is smaller, use a closed-form layer where one exists (Erf, ReLU, "
            "GELU, ...), or pass an explicit degree to silence this warning.",
            QuadratureWarning, stacklevel=4)
        return MAX_DEGREE

    def _integrate(self, k: Tensor, v1: Tensor, v2: Tensor, degree: int, *, want_dot: bool
                   ) -> tuple[Tensor, Tensor | None]:
        """The product rule (class docstring) on flat ``k, v1, v2`` (E,)."""
        nodes, weights = _hermite(degree)
        u = torch.as_tensor(nodes, dtype=k.dtype, device=k.device)
        w = torch.as_tensor(weights, dtype=k.dtype, device=k.device)
        ww = (w[:, None] * w[None, :]) / 2  # halved: each rule sums two halves
        nngp = torch.empty_like(k)
        dot = torch.empty_like(k) if want_dot else None
        step = max(1, _POINTS_PER_CHUNK // (2 * degree**2))
        for i in range(0, k.numel(), step):
            x, y, halves = _points(k[i:i + step], v1[i:i + step], v2[i:i + step], u,
                                   self.rule)
            for out, g in ((nngp, self._fn), (dot, self.derivative)):
                if out is not None:
                    out[i:i + step] = torch.einsum("eij,ij->e", halves(g(x) * g(y)), ww)
        return nngp, dot

    def _rule(self, k: Tensor, v1: Tensor, v2: Tensor, *, want_dot: bool
              ) -> tuple[Tensor, Tensor | None]:
        k, v1, v2 = torch.broadcast_tensors(k, v1, v2)
        shape = k.shape
        k, v1, v2 = k.reshape(-1), v1.reshape(-1), v2.reshape(-1)
        if k.numel() == 0:
            return k.reshape(shape), k.reshape(shape) if want_dot else None
        vmax = float(torch.maximum(v1.detach().max(), v2.detach().max()))
        # Both moments set the degree even for the NNGP alone (one degree per variance).
        degree = self.quadrature_degree(vmax)
        nngp, dot = self._integrate(k, v1, v2, degree, want_dot=want_dot)
        return nngp.reshape(shape), None if dot is None else dot.reshape(shape)

    def _nngp_and_dot(self, k, v1, v2):
        return self._rule(k, v1, v2, want_dot=True)

    def _nngp(self, k, v1, v2):
        return self._rule(k, v1, v2, want_dot=False)[0]

    def _self_moments(self, c: Tensor, *, want_dot: bool) -> tuple[Tensor, Tensor | None]:
        """``E[f(X)^2]`` (and ``E[f'(X)^2]``) for ``X ~ N(0, c)``: the 2-D rule at
        correlation exactly 1, so that an input paired with itself (set from here) and
        with a duplicate of itself (a cross pair) get the same value. The Cholesky rule
        collapses there to the 1-D rule, exact for a kink at 0 (Sign, ReLU)."""
        shape = c.shape
        flat = c.reshape(-1)
        if flat.numel() == 0:
            return c.clone(), c.clone() if want_dot else None
        degree = self.quadrature_degree(float(flat.detach().max()))
        nngp, dot = self._integrate(flat, flat, flat, degree, want_dot=want_dot)
        return nngp.reshape(shape), None if dot is None else dot.reshape(shape)

    def _variance(self, c: Tensor) -> Tensor:
        return self._self_moments(c, want_dot=False)[0]

    def _self_dot(self, c: Tensor) -> Tensor:
        return self._self_moments(c, want_dot=True)[1]

    def __repr__(self) -> str:
        degree = "" if self.degree == "auto" else f", degree={self.degree}"
        rule = "" if self.rule == "symmetric" else f", rule={self.rule!r}"
        return f"Elementwise({self.name}{degree}{rule})"


class _Named(Elementwise):
    """An `Elementwise` of one named torch function, with a spec name (see `Tanh`)."""

    function: Callable[[Tensor], Tensor]

    def __init__(self, degree: int | str = "auto") -> None:
        name = type(self).spec_names[0]
        super().__init__(type(self).function, degree, name=name)

    def spec_call(self):
        return self.name, [], ({} if self.degree == "auto" else {"degree": self.degree})

    def __repr__(self) -> str:
        degree = "" if self.degree == "auto" else f"degree={self.degree}"
        return f"{type(self).__name__}({degree})"


class Tanh(_Named):
    """``tanh(x)``, its kernels by quadrature (`Elementwise`; no closed form).

    Args:
        degree: quadrature nodes per axis, or ``"auto"`` (see `Elementwise`).
    """

    spec_names = ("tanh",)
    function = staticmethod(torch.tanh)


class Sigmoid(_Named):
    """The logistic ``1 / (1 + exp(-x))``, its kernels by quadrature (`Elementwise`).

    Args:
        degree: quadrature nodes per axis, or ``"auto"`` (see `Elementwise`).
    """

    spec_names = ("sigmoid",)
    function = staticmethod(torch.sigmoid)


class Softplus(_Named):
    """``log(1 + exp(x))``, its kernels by quadrature (`Elementwise`).

    Args:
        degree: quadrature nodes per axis, or ``"auto"`` (see `Elementwise`).
    """

    spec_names = ("softplus",)
    function = staticmethod(torch.nn.functional.softplus)

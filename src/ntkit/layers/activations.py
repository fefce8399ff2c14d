"""Elementwise nonlinearities with closed-form NNGP and NTK rules.

For a nonlinearity ``f`` after zero-mean Gaussian pre-activations with
covariance ``[[v1, k], [k, v2]]`` the kernel rules are (Neal 1996; Lee et al.
2018; Jacot et al. 2018)::

    nngp' = E[f(X) f(Y)],      ntk' = ntk * E[f'(X) f'(Y)],      (X, Y) ~ N(0, [[v1, k], [k, v2]])

Each class below gives those two expectations in closed form; `Elementwise`
computes them by quadrature for any function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import as_real
from ..kernel import Kernel
from ._arccos_fast import arc_cosine
from .base import BuildContext, Kernels, Layer, Shapes, single

__all__ = [
    "Activation", "ReLU", "LeakyReLU", "ABReLU", "Abs", "Sign", "Erf", "GELU", "Sin", "Cos",
    "Rbf", "Gaussian", "Exp", "ActivationModule",
]

_PI = math.pi


class Activation(Layer):
    """An elementwise nonlinearity: subclasses give ``fn`` and the two expectations.

    Masks (``kernel(..., mask=)``): applied at each position, it keeps the mask, and
    covariances at absent positions are zero after it (see `ntkit.layers._masks`).
    """

    #: A subclass of a torch activation may change ``forward``: only the class itself converts.
    torch_subclasses = False
    honours_masks = True

    def fn(self, x: Tensor) -> Tensor:
        """The nonlinearity itself, applied elementwise (used by `build`)."""
        raise NotImplementedError

    # Subclasses override either `_nngp_and_dot` or both `_nngp` and `_dot`.
    def _nngp(self, k: Tensor, v1: Tensor, v2: Tensor) -> Tensor:
        """``E[f(X) f(Y)]`` for covariance ``[[v1, k], [k, v2]]`` (broadcasting)."""
        return self._nngp_and_dot(k, v1, v2)[0]

    def _dot(self, k: Tensor, v1: Tensor, v2: Tensor) -> Tensor:
        """``E[f'(X) f'(Y)]`` for covariance ``[[v1, k], [k, v2]]``."""
        return self._nngp_and_dot(k, v1, v2)[1]

    def _nngp_and_dot(self, k: Tensor, v1: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
        """Both expectations at once, sharing intermediate results."""
        return self._nngp(k, v1, v2), self._dot(k, v1, v2)

    def _nngp_and_ntk(self, k: Tensor, v1: Tensor, v2: Tensor, ntk: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """``E[f(X) f(Y)]`` and ``ntk * E[f'(X) f'(Y)]`` (a subclass may fuse them)."""
        nngp, dot = self._nngp_and_dot(k, v1, v2)
        return nngp, ntk * dot

    def _variance(self, c: Tensor) -> Tensor:
        """``E[f(X)^2]`` for ``X ~ N(0, c)``."""
        return self._nngp(c, c, c)

    def _self_dot(self, c: Tensor) -> Tensor:
        """``E[f'(X)^2]`` for ``X ~ N(0, c)``."""
        return self._dot(c, c, c)

    def propagate(self, k: Kernels) -> Kernel:
        # Pairs of an input with itself have correlation exactly 1: they are set from
        # `_variance` and `_self_dot`, never through arccos, whose square root
        # would turn rounding at correlation 1 into errors of about 1e-8.
        k = single(k, self)
        require_gaussian(k, self)
        u1, u2 = k.position_variances()
        var1 = self._variance(u1)
        var2 = var1 if u2 is u1 else self._variance(u2)
        if k.diagonal and not k.position_pairs:
            ntk = k.ntk * self._self_dot(u1)
            return k.replace(nngp=var1, ntk=ntk, cov1=var1, cov2=var1, is_gaussian=False)
        v1, v2 = k.variances()
        nngp, ntk = self._nngp_and_ntk(k.nngp, v1, v2, k.ntk)
        if k.x1_is_x2 or k.diagonal:
            k.self_pairs(nngp)[...] = var1
            k.self_pairs(ntk)[...] = k.self_pairs(k.ntk) * self._self_dot(u1)
        if not k.position_pairs:
            cov1, cov2 = var1, var2
        elif k.diagonal:
            cov1 = cov2 = nngp
        elif not k.cov_pairs:
            cov1, cov2 = var1, var2
        elif k.x1_is_x2:  # each example's own block is on the batch diagonal
            cov1 = cov2 = torch.diagonal(nngp, 0, 0, 1).movedim(-1, 0).contiguous()
        else:
            cov1 = self._self_kernel(k, k.cov1, u1, var1)
            cov2 = cov1 if k.cov2 is k.cov1 else self._self_kernel(k, k.cov2, u2, var2)
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=False)

    def _self_kernel(self, k: Kernel, cov: Tensor, u: Tensor, var: Tensor) -> Tensor:
        """``E[f f]`` between the positions of each example: ``(N, *S, *S)``."""
        a, b = k.broadcast_self(u)
        out = self._nngp(cov, a, b)
        n, p = out.shape[0], math.prod(k.spatial_shape)
        out.view(n, p, p).diagonal(0, 1, 2)[...] = var.reshape(n, p)
        return out

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        return ActivationModule(self.fn, repr(self)), shape


def _changed(layer: Layer, **defaults: float) -> dict:
    """The keyword arguments of ``layer`` (attributes of the same names) that differ
    from their defaults, for `Layer.spec_call`."""
    return {k: getattr(layer, k) for k, d in defaults.items() if getattr(layer, k) != d}


def require_gaussian(k: Kernel, layer: Layer) -> None:
    """Raises unless the features entering `layer` are zero-mean Gaussian."""
    if not k.is_gaussian:
        where = "the raw inputs" if k.is_input else (
            "the output of a nonlinear layer (or a sum with such a branch, e.g. a residual "
            "connection that adds an activation's output)")
        raise ValueError(
            f"{layer!r} needs Gaussian pre-activations (the output of a Linear or Conv, or a "
            f"sum of them) but receives {where}. Put a Linear or Conv before it; in residual "
            f"networks use pre-activation blocks or a projection shortcut; to compose two "
            f"nonlinearities use nk.Elementwise(lambda x: f(g(x)))."
        )
    if k.ntk_per_channel:
        raise ValueError(
            f"{layer!r} follows a LayerNorm with a learnable scale (affine=True) with no "
            f"Linear, Conv or attention in between. The scale's gradient is the feature "
            f"itself, so its NTK through {layer!r} is E[z z' f'(z) f'(z')], which the "
            f"layer-by-layer recursion cannot express. Put a Linear (or Conv) between them, "
            f"as transformers do, or use LayerNorm(affine=False)."
        )


class ActivationModule(nn.Module):
    """The finite twin of an activation layer: applies ``fn`` elementwise."""

    def __init__(self, fn, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def _cos_and_scale(k: Tensor, v1: Tensor, v2: Tensor, sign: float = 1.0
                   ) -> tuple[Tensor, Tensor]:
    """``sign * k / sqrt(v1 v2)`` clamped to [-1, 1], and ``sign * sqrt(v1 v2)``.

    Zero variances give correlation 0 instead of NaN. ``sign=-1`` gives the
    negated correlation without an extra pass over the tile.

    A zero variance (a zero input or window, no bias) has zero gradient through
    its square root and correlation (a cone ``|x|``: 0 is its symmetric
    subgradient), as neural-tangents' ``_sqrt`` and ``_arctan2`` give.
    """
    r1, r2 = _safe_sqrt(v1), _safe_sqrt(v2)
    if sign != 1.0:
        r1 = r1 * sign
    scale = r1 * r2
    if bool((v1 == 0).any()) or bool((v2 == 0).any()):  # checks vectors, not the tile
        nonzero = scale != 0
        cos = torch.where(nonzero, k / torch.where(nonzero, scale, 1.0), 0.0)
    else:
        cos = torch.div(k, scale)
    return cos.clamp_(-1.0, 1.0), scale


def _safe_sqrt(t: Tensor) -> Tensor:
    """`torch.sqrt` of ``t >= 0`` with gradient 0 at 0 instead of infinite."""
    if not t.requires_grad:
        return torch.sqrt(t)
    positive = t > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, t, 1.0)), 0.0)


def _arccos(c: Tensor) -> Tensor:
    """``arccos(c)`` whose gradient is 0 where ``|c| = 1`` instead of infinite.

    Correlations sit at 1 exactly for an input paired with itself (whose
    entries the rules then overwrite) or with a duplicate; they stay 1 for any
    hyperparameter, so 0 is the right derivative there, and it keeps
    ``0 * inf = NaN`` out of the gradients of everything else.

    In the inputs, ``theta = arccos(c)`` is a kink at a self-pair (a cone
    across ``x1``), given derivative 0 as neural-tangents' custom ``_sqrt`` and
    ``_arctan2`` (``stax/elementwise.py``) do. The flat band is ``|c| >= 1 -
    EDGE_ULPS * eps``: a duplicate in another tensor reaches 1 only up to
    rounding, which the slope ``1 / sqrt(1 - c^2)`` would amplify. Values are
    unchanged.
    """
    return _flat_at_edges(torch.arccos, c)


def _arcsin(c: Tensor) -> Tensor:
    """``arcsin(c)`` with gradient 0 where ``|c| = 1`` (see `_arccos`)."""
    return _flat_at_edges(torch.arcsin, c)


#: Correlations within this many machine epsilons of +-1 have a flat arccos / arcsin
#: in the backward pass (see `_arccos`): the rounding of a correlation computed for an
#: input and a copy of it is a few eps.
EDGE_ULPS = 32


def _flat_at_edges(fn, c: Tensor) -> Tensor:
    if not c.requires_grad:
        return fn(c)
    edge = c.detach().abs() >= 1 - EDGE_ULPS * torch.finfo(c.dtype).eps
    # One evaluation: at the edges fn sees a constant, and the (possibly infinite)
    # slope there is routed to it, never to c.
    return fn(torch.where(edge, c.detach(), c))


# ---------------------------------------------------------------- ReLU family
class ABReLU(Activation):
    """``f(x) = a x`` for ``x < 0`` and ``b x`` for ``x >= 0``.

    With ``theta = arccos(k / sqrt(v1 v2))`` (the arc-cosine kernel, Cho & Saul
    2009; ``f = a x + (b - a) relu(x)``)::

        E[f f]   = a b k + (b - a)^2 sqrt(v1 v2) (sin theta + (pi - theta) cos theta) / (2 pi)
        E[f' f'] = a b + (b - a)^2 (pi - theta) / (2 pi)
    """

    spec_names = ("abrelu",)

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = as_real(a, "a"), as_real(b, "b")

    def fn(self, x: Tensor) -> Tensor:
        return torch.where(x < 0, self.a * x, self.b * x)

    def spec_call(self):
        return "abrelu", [self.a, self.b], {}

    def _nngp_and_dot(self, k, v1, v2):
        return arc_cosine(k, v1, v2, self.a, self.b, arccos=_arccos, sqrt=_safe_sqrt)

    def _nngp_and_ntk(self, k, v1, v2, ntk):  # the NTK product fused (layers/_arccos_fast.py)
        return arc_cosine(k, v1, v2, self.a, self.b, ntk, arccos=_arccos, sqrt=_safe_sqrt)

    def _variance(self, c: Tensor) -> Tensor:
        return c * ((self.a**2 + self.b**2) / 2)

    def _self_dot(self, c: Tensor) -> Tensor:
        return torch.full_like(c, (self.a**2 + self.b**2) / 2)

    def __repr__(self) -> str:
        return f"ABReLU(a={self.a}, b={self.b})"


class ReLU(ABReLU):
    """``max(x, 0)``: the arc-cosine kernel of degree 1 (see `ABReLU`)."""

    spec_names = ("relu",)
    torch_modules = (nn.ReLU,)

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)

    @classmethod
    def from_torch_module(cls, module, ctx):
        return cls()

    def spec_call(self):
        return "relu", [], {}

    def fn(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def _build(self, shape, ctx):
        return nn.ReLU(), shape

    def __repr__(self) -> str:
        return "ReLU()"


class LeakyReLU(ABReLU):
    """``x`` for ``x >= 0``, ``negative_slope * x`` otherwise (see `ABReLU`)."""

    spec_names = ("leaky_relu",)
    torch_modules = (nn.LeakyReLU,)

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__(negative_slope, 1.0)
        self.negative_slope = as_real(negative_slope, "negative_slope")

    @classmethod
    def from_torch_module(cls, module, ctx):
        return cls(module.negative_slope)

    def spec_call(self):
        return "leaky_relu", [], _changed(self, negative_slope=0.01)

    def fn(self, x: Tensor) -> Tensor:
        return nn.functional.leaky_relu(x, self.negative_slope)

    def _build(self, shape, ctx):
        return nn.LeakyReLU(self.negative_slope), shape

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class Abs(ABReLU):
    """``|x|`` (see `ABReLU` with ``a = -1, b = 1``)."""

    spec_names = ("abs",)

    def __init__(self) -> None:
        super().__init__(-1.0, 1.0)

    def spec_call(self):
        return "abs", [], {}

    def fn(self, x: Tensor) -> Tensor:
        return torch.abs(x)

    def __repr__(self) -> str:
        return "Abs()"


class Sign(Activation):
    """``sign(x)``; its derivative is zero almost everywhere, so the NTK stops here.

    ``E[sign X sign Y] = 1 - 2 theta / pi`` with ``theta`` the angle between X and Y.
    """

    spec_names = ("sign",)

    def fn(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def _nngp(self, k, v1, v2):
        cos, _ = _cos_and_scale(k, v1, v2)
        return _arcsin(cos).mul_(2 / _PI)

    def _dot(self, k, v1, v2):
        return torch.zeros_like(k)

    def _variance(self, c):
        return (c > 0).to(c.dtype)

    def __repr__(self) -> str:
        return "Sign()"


# --------------------------------------------------------------- smooth ones
class Erf(Activation):
    """``a * erf(b x) + c`` (Williams 1997)::

        E[f f]   = a^2 (2/pi) arcsin(2 b^2 k / sqrt((1 + 2 b^2 v1)(1 + 2 b^2 v2))) + c^2
        E[f' f'] = a^2 (4 b^2 / pi) / sqrt((1 + 2 b^2 v1)(1 + 2 b^2 v2) - 4 b^4 k^2)
    """

    spec_names = ("erf",)

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        self.a, self.b, self.c = as_real(a, "a"), as_real(b, "b"), as_real(c, "c")

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.erf(self.b * x) + self.c

    def spec_call(self):
        return "erf", [], _changed(self, a=1.0, b=1.0, c=0.0)

    def _nngp_and_dot(self, k, v1, v2):
        b2 = self.b**2
        prod = (1 + 2 * b2 * v1) * (1 + 2 * b2 * v2)
        kk = k * (2 * b2)
        root = torch.sqrt((prod - kk * kk).clamp_(min=0))
        nngp = torch.atan2(kk, root).mul_(2 * self.a**2 / _PI).add_(self.c**2)
        coef = 4 * b2 * self.a**2 / _PI
        # With gradients tracked, root and its reciprocal are kept for the backward pass.
        dot = root.reciprocal().mul(coef) if root.requires_grad else root.reciprocal_().mul_(coef)
        return nngp, dot

    def __repr__(self) -> str:
        return f"Erf(a={self.a}, b={self.b}, c={self.c})"


class GELU(Activation):
    """The GELU ``x Phi(x)``, or with ``approximate="tanh"`` (torch's argument) its tanh
    approximation. The exact one has a closed form (Tsuchida et al. 2021, "Avoiding
    kernel fixed points"). With ``d^2 = (1 + v1)(1 + v2) - k^2``, ``alpha = atan2(k, d)``::

        E[f f]   = k/4 + (k alpha + (k^2 + v1 v2 d^2) / ((1 + v1)(1 + v2) d)) / (2 pi)
        E[f' f'] = 1/4 + alpha / (2 pi)
                   + k (1/d^2 + (1 - v1 v2)/((1 + v1)(1 + v2)) + 1) / (2 pi d)

    The tanh one has none: quadrature (`Elementwise` with ``degree``, its error
    control). neural-tangents' ``Gelu(approximate=True)`` keeps the exact kernel (about
    1e-4 away); ntkit's is the kernel of the function its twin applies.

    Args:
        approximate: ``"none"`` (exact) or ``"tanh"``, as in `torch.nn.GELU`.
        degree: quadrature nodes per axis or ``"auto"``, for ``"tanh"`` only.
    """

    spec_names = ("gelu",)
    torch_modules = (nn.GELU,)

    def __init__(self, approximate: str = "none", *, degree: int | str = "auto") -> None:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' (exact) or 'tanh', as in "
                             f"torch.nn.GELU; got {approximate!r}.")
        if approximate == "none" and degree != "auto":
            raise ValueError(f"GELU: degree={degree!r} applies to approximate='tanh' only "
                             f"(the exact GELU has a closed form); leave it out.")
        self.approximate, self.degree, self._quadrature = approximate, degree, None
        if approximate == "tanh":
            from .elementwise import Elementwise  # imports this module

            self._quadrature = Elementwise(_gelu_tanh, degree, name="gelu_tanh")

    @classmethod
    def from_torch_module(cls, module, ctx):
        if module.approximate != "none":  # the tanh approximation: by quadrature
            return cls(module.approximate, degree=ctx.degree)
        return cls()

    def spec_call(self):
        kw = {} if self.approximate == "none" else {"approximate": self.approximate}
        return "gelu", [], kw if self.degree == "auto" else {**kw, "degree": self.degree}

    def fn(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x, approximate=self.approximate)

    def _nngp_and_dot(self, k, v1, v2):
        if self._quadrature is not None:
            return self._quadrature._nngp_and_dot(k, v1, v2)
        prod = v1 * v2
        prod1 = (1 + v1) * (1 + v2)
        d2 = prod1 - k * k
        d = torch.sqrt(d2)
        alpha = torch.atan2(k, d)
        nngp = (k * alpha + (k * k + prod * d2) / (prod1 * d)) / (2 * _PI) + k / 4
        dot = 0.25 + alpha / (2 * _PI) + k * (1 / d2 + (1 - prod) / prod1 + 1) / (2 * _PI * d)
        return nngp, dot

    def _nngp(self, k, v1, v2):
        q = self._quadrature
        return q._nngp(k, v1, v2) if q is not None else self._nngp_and_dot(k, v1, v2)[0]

    def _variance(self, c):
        q = self._quadrature
        return q._variance(c) if q is not None else super()._variance(c)

    def _self_dot(self, c):
        q = self._quadrature
        return q._self_dot(c) if q is not None else super()._self_dot(c)

    def _build(self, shape, ctx):
        return nn.GELU(approximate=self.approximate), shape

    def __repr__(self) -> str:
        degree = "" if self.degree == "auto" else f", degree={self.degree}"
        tanh = f"approximate={self.approximate!r}" if self.approximate != "none" else ""
        return f"GELU({tanh}{degree})"


def _gelu_tanh(x: Tensor) -> Tensor:
    return nn.functional.gelu(x, approximate="tanh")


class Sin(Activation):
    """``a * sin(b x + c)``; with ``s = v1 + v2``::

        E[f f]   = a^2/2 (exp(-b^2 (s/2 - k)) - exp(-b^2 (s/2 + k)) cos 2c)
        E[f' f'] = a^2 b^2/2 (exp(-b^2 (s/2 - k)) + exp(-b^2 (s/2 + k)) cos 2c)
    """

    spec_names = ("sin",)

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        self.a, self.b, self.c = as_real(a, "a"), as_real(b, "b"), as_real(c, "c")

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.sin(self.b * x + self.c)

    def spec_call(self):
        return "sin", [], _changed(self, a=1.0, b=1.0, c=0.0)

    def _nngp_and_dot(self, k, v1, v2):
        b2, half_a2 = self.b**2, self.a**2 / 2
        half_sum = (v1 + v2) / 2
        e1 = torch.exp((k - half_sum) * b2)
        e2 = torch.exp((k + half_sum) * -b2) * math.cos(2 * self.c)
        return (e1 - e2) * half_a2, (e1 + e2) * (half_a2 * b2)

    def __repr__(self) -> str:
        return f"Sin(a={self.a}, b={self.b}, c={self.c})"


class Cos(Sin):
    """``a * cos(b x + c)``, that is ``Sin(a, b, c + pi/2)``."""

    spec_names = ("cos",)

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        super().__init__(a, b, as_real(c, "c") + _PI / 2)
        self.phase = as_real(c, "c")

    def spec_call(self):
        kw = _changed(self, a=1.0, b=1.0)
        if self.phase != 0.0:
            kw["c"] = self.phase
        return "cos", [], kw

    def __repr__(self) -> str:
        return f"Cos(a={self.a}, b={self.b}, c={self.phase})"


class Rbf(Sin):
    """``sqrt(2) sin(sqrt(2 gamma) x + pi/4)``: its NNGP is the RBF kernel of
    the pre-activations, ``exp(-gamma (v1 + v2 - 2k))`` (Rahimi & Recht 2007)."""

    spec_names = ("rbf",)

    def __init__(self, gamma: float = 1.0) -> None:
        gamma = as_real(gamma, "gamma")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}.")
        super().__init__(math.sqrt(2), math.sqrt(2 * gamma), _PI / 4)
        self.gamma = gamma

    def spec_call(self):
        return "rbf", [], _changed(self, gamma=1.0)

    def __repr__(self) -> str:
        return f"Rbf(gamma={self.gamma})"


class Gaussian(Activation):
    """``a * exp(b x^2)`` (``b < 1 / (2 v)`` for finite moments); with
    ``D = (1 - 2 b v1)(1 - 2 b v2) - 4 b^2 k^2``::

        E[f f] = a^2 / sqrt(D),      E[f' f'] = 4 a^2 b^2 k / D^(3/2)
    """

    spec_names = ("gaussian",)

    def __init__(self, a: float = 1.0, b: float = -1.0) -> None:
        self.a, self.b = as_real(a, "a"), as_real(b, "b")

    def spec_call(self):
        return "gaussian", [], _changed(self, a=1.0, b=-1.0)

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.exp(self.b * x * x)

    def _nngp_and_dot(self, k, v1, v2):
        b = self.b
        det = (1 - 2 * b * v1) * (1 - 2 * b * v2) - 4 * b * b * k * k
        if bool((det <= 0).any()):
            raise ValueError(
                f"{self!r}: E[f(X)^2] is infinite for pre-activation variances >= 1/(2b) = "
                f"{1 / (2 * b):.4g}; use a smaller b or smaller weight variances."
            )
        root = torch.sqrt(det)
        nngp = root.reciprocal() * self.a**2
        dot = k * (4 * self.a**2 * b * b) / (root * det)
        return nngp, dot

    def __repr__(self) -> str:
        return f"Gaussian(a={self.a}, b={self.b})"


class Exp(Activation):
    """``a * exp(b x)``::

        E[f f] = a^2 exp(b^2 (v1 + v2 + 2k) / 2),    E[f' f'] = b^2 E[f f]
    """

    spec_names = ("exp",)

    def __init__(self, a: float = 1.0, b: float = 1.0) -> None:
        self.a, self.b = as_real(a, "a"), as_real(b, "b")

    def spec_call(self):
        return "exp", [], _changed(self, a=1.0, b=1.0)

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.exp(self.b * x)

    def _nngp_and_dot(self, k, v1, v2):
        nngp = torch.exp((k + (v1 + v2) / 2) * self.b**2) * self.a**2
        return nngp, nngp * self.b**2

    def __repr__(self) -> str:
        return f"Exp(a={self.a}, b={self.b})"


def __getattr__(name: str):
    # Monomial and RectifiedMonomial lived here before their own module.
    if name in ("Monomial", "RectifiedMonomial"):
        from . import polynomial

        return getattr(polynomial, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

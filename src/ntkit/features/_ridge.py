"""Streaming ridge regression on random features: `RidgeAccumulator` (the normal
equations, summed chunk by chunk), `RandomFeatureRidge` (the fitted predictor) and
`fit_ridge` (one call).

Kernel ridge regression with the random-feature kernel ``k(x, x') = phi(x) . phi(x')``
has the dual form ``f(x*) = phi(x*)^T Phi^T (Phi Phi^T + s I)^-1 y`` (``N x N``) and, by
the push-through identity ``Phi^T (Phi Phi^T + s I)^-1 = (Phi^T Phi + s I)^-1 Phi^T``,
the primal form (Rahimi & Recht, "Random features for large-scale kernel machines",
NeurIPS 2007, Sec. 1; Rudi & Rosasco, "Generalization properties of learning with random
features", NeurIPS 2017, Sec. 2)::

    w = (Phi^T Phi + s I)^-1 Phi^T y,        f(x*) = phi(x*) . w

which needs only the ``D x D`` matrix ``G = Phi^T Phi = sum_i phi(x_i) phi(x_i)^T`` and
``b = Phi^T y``: sums over the training points, accumulated here one chunk of rows at
a time, so the ``(N, D)`` feature matrix is never held (memory ``O(D^2 + chunk D)``,
time ``O(N D^2)``). The features are computed in the map's dtype (float32 by default)
and each chunk's products ``Phi_c^T Phi_c``, ``Phi_c^T y_c`` in float64, added to
float64 sums; ``G + s I`` is factored once by Cholesky in float64.

Regularisation follows `ntkit.solvers`: ``s = diag_reg * trace(K) / N`` (``s = diag_reg``
with ``diag_reg_absolute_scale``). For a `RandomFeatureMap` ``K`` is the random-feature
kernel ``Phi Phi^T`` (its trace ``trace(G)``, an unbiased estimate of the network
kernel's), so the same ``diag_reg`` gives the same estimator as ``exact_krr`` on the
feature kernel; for a `NystromFeatureMap` it is the network's kernel, as
`ntkit.solvers.nystrom_krr` takes it, so the same ``diag_reg`` gives FALKON's estimator.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import check_finite_output, not_positive_definite
from ._nystrom import NystromFeatureMap
from ._random import RandomFeatureMap

__all__ = ["RandomFeatureRidge", "RidgeAccumulator", "fit_ridge"]

DEFAULT_CHUNK = 8192
_MAPS = (RandomFeatureMap, NystromFeatureMap)


class RidgeAccumulator:
    """The normal equations ``G = Phi^T Phi`` and ``b = Phi^T y`` of a feature map,
    summed over chunks of training data in float64 (`update`), solved once (`solve`).

    Use it when the training data come in batches (a ``DataLoader``, files); `fit_ridge`
    is the one-call form for data that fit in memory. Summation order is the order of
    the `update` calls; any split of the same rows gives the same ``G`` and ``b`` to
    float64 rounding.

    Args:
        feature_map: a `RandomFeatureMap` or `NystromFeatureMap` (training and test
            inputs must share it).

    Attributes:
        gram: ``G``, ``(D, D)`` float64, a symmetric copy (the sums are kept on the CPU
            as their upper triangle, which `solve` factors).
        rhs: ``b``, ``(D, O)`` float64, None before the first `update`.
        n_samples: rows seen so far.
        trace: ``sum_i k(x_i, x_i)`` in float64: ``|phi(x_i)|^2`` for a
            `RandomFeatureMap` (the feature kernel's, an unbiased estimate of the
            network's), the network's own kernel for a `NystromFeatureMap` (as
            `ntkit.solvers.nystrom_krr` regularises).
    """

    def __init__(self, feature_map: RandomFeatureMap | NystromFeatureMap):
        if not isinstance(feature_map, _MAPS):
            raise TypeError(f"feature_map must be an ntkit.features.RandomFeatureMap or "
                            f"NystromFeatureMap, got "
                            f"{type(feature_map).__name__}; build one with "
                            f"RandomFeatureMap(net, input_shape, n_features=..., "
                            f"generator=...).")
        self.feature_map = feature_map
        d = feature_map.n_features
        # Fortran order: BLAS's dsyrk updates it in place
        self._gram = np.zeros((d, d), dtype=np.float64, order="F")
        self.rhs: Tensor | None = None
        self.n_samples = 0
        self.trace = 0.0
        self._vector: bool | None = None

    @property
    def gram(self) -> Tensor:
        """``G = Phi^T Phi`` ``(D, D)`` float64 so far (a symmetric copy)."""
        upper = np.triu(self._gram)
        return torch.from_numpy(upper + np.triu(upper, 1).T)

    def update(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> RidgeAccumulator:
        """Adds the rows ``x`` ``(n, *input_shape)`` with targets ``y`` ``(n,)`` or ``(n, O)``.

        Returns:
            ``self``, updated.

        Raises:
            TypeError: ``x`` or ``y`` is not a tensor or array of floating-point numbers.
            ValueError: shapes that do not match the map or each other, targets whose
                number of outputs (or 1-D form) differs from earlier updates, or
                NaN/infinite entries.
        """
        x, y2, vector = _check_batch(x, y, self.feature_map.input_shape)
        if self._vector is not None and (vector != self._vector
                                         or y2.shape[1] != self.rhs.shape[1]):
            raise ValueError(f"y has shape {tuple(y.shape)}, but earlier updates had "
                             f"{'(n,)' if self._vector else f'(n, {self.rhs.shape[1]})'}; "
                             f"give every batch's targets the same number of outputs.")
        if self.rhs is None:
            self.rhs = torch.zeros(self.feature_map.n_features, y2.shape[1],
                                   dtype=torch.float64)
            self._vector = vector
        if x.shape[0] == 0:
            return self
        phi = self.feature_map(x).to(torch.float64).cpu()
        a = phi.numpy()
        # G += phi^T phi, upper triangle only: phi^T (Fortran order, no copy) times its
        # transpose by BLAS's symmetric rank-k update, half the flops of a full product
        self._gram = _dsyrk(a.T, self._gram)
        self.rhs += phi.T @ y2.cpu()
        diag = getattr(self.feature_map, "diagonal", None)    # Nystrom: the kernel's own
        self.trace += float(diag(x).sum()) if diag is not None else float(phi.pow(2).sum())
        self.n_samples += x.shape[0]
        return self

    def solve(self, *, diag_reg: float, diag_reg_absolute_scale: bool = False
              ) -> RandomFeatureRidge:
        """Solves ``(G + s I) w = b`` once (Cholesky, float64).

        Args:
            diag_reg: the ridge: ``s = diag_reg * trace(K) / N`` (``K = Phi Phi^T``, the
                random-feature kernel of the training points), as in `ntkit.solvers`.
            diag_reg_absolute_scale: ``s = diag_reg`` itself.

        Returns:
            The fitted `RandomFeatureRidge`.

        Raises:
            ValueError: no rows were added, or ``diag_reg`` is negative, NaN or infinite.
            NotPositiveDefiniteError: ``G + s I`` has no Cholesky factor (``diag_reg`` 0
                with fewer independent rows than features): raise ``diag_reg``.
        """
        if self.n_samples == 0:
            raise ValueError("no training rows were added; call update(x, y) with at least "
                             "one row before solve().")
        ok = isinstance(diag_reg, numbers.Real) and not isinstance(diag_reg, bool)
        if not ok or not (math.isfinite(diag_reg) and diag_reg >= 0):
            raise ValueError(f"diag_reg must be a finite number >= 0 (the ridge, relative to "
                             f"the mean diagonal of the feature kernel), got {diag_reg!r}; "
                             f"use e.g. 1e-3.")
        s = float(diag_reg) if diag_reg_absolute_scale else \
            float(diag_reg) * self.trace / self.n_samples
        import scipy.linalg

        d = self._gram.shape[0]
        a = self._gram.copy(order="F")        # the sums stay, for another diag_reg
        a[np.diag_indices(d)] += s
        try:                                  # LAPACK reads the upper triangle only
            factor = scipy.linalg.cho_factor(a, lower=False, overwrite_a=True,
                                             check_finite=False)
        except np.linalg.LinAlgError:
            raise not_positive_definite("the random-feature normal equations Phi^T Phi + s I",
                                        f"{d} x {d}, float64, s = {s:.3g}, from "
                                        f"{self.n_samples} rows; with diag_reg = 0 it needs "
                                        f"at least D = {d} independent rows") from None
        coef = torch.from_numpy(scipy.linalg.cho_solve(factor, self.rhs.numpy(),
                                                       check_finite=False))
        return RandomFeatureRidge(self.feature_map, coef, diag_reg_absolute=s,
                                  n_samples=self.n_samples, vector=bool(self._vector))

    def __repr__(self) -> str:
        return (f"RidgeAccumulator(n_features={self.feature_map.n_features}, "
                f"n_samples={self.n_samples})")


class RandomFeatureRidge:
    """A fitted ridge regression on random features: ``f(x) = phi(x) . w``.

    Returned by `fit_ridge` and `RidgeAccumulator.solve`. It approximates kernel ridge
    regression with the network's kernel (``phi``'s Gram matrix estimates it; see
    `ntkit.features` for the features' bias and variance) at ``O(D)`` per prediction.

    Attributes:
        feature_map: the feature map ``phi``.
        coef: ``w``, ``(D, O)`` float64.
        diag_reg_absolute: the absolute ridge ``s`` that was added.
        n_samples: training rows.
    """

    def __init__(self, feature_map: RandomFeatureMap | NystromFeatureMap, coef: Tensor, *,
                 diag_reg_absolute: float, n_samples: int, vector: bool = False):
        self.feature_map = feature_map
        self.coef = check_finite_output(coef, "the random-feature ridge coefficients",
                                        causes="prediction")
        self.diag_reg_absolute = diag_reg_absolute
        self.n_samples = n_samples
        self._vector = vector

    def predict(self, x: Tensor | np.ndarray, *, chunk: int = DEFAULT_CHUNK) -> Tensor:
        """Predictions ``(N, O)`` float64 (``(N,)`` for 1-D training targets) for inputs
        ``x`` ``(N, *input_shape)``, mapped ``chunk`` rows at a time.

        Raises:
            TypeError, ValueError: as `RandomFeatureMap` for bad ``x``; ``chunk`` not a
                positive int.
        """
        chunk = _positive_int(chunk, "chunk")
        x = _as_float_tensor(x, "x")
        out = [self.feature_map(_torch(x[i:i + chunk])).to(self.coef) @ self.coef
               for i in range(0, x.shape[0], chunk)]
        if not out:                             # still checks the shape of an empty x
            self.feature_map(_torch(x))
        pred = torch.cat(out) if out else self.coef.new_zeros((0, self.coef.shape[1]))
        check_finite_output(pred, "the random-feature ridge prediction", causes="prediction")
        return pred[:, 0] if self._vector else pred

    __call__ = predict

    def __repr__(self) -> str:
        return (f"RandomFeatureRidge(n_features={self.coef.shape[0]}, "
                f"outputs={self.coef.shape[1]}, n_samples={self.n_samples})")


def fit_ridge(net_or_map, x: Tensor | np.ndarray, y: Tensor | np.ndarray, *, diag_reg: float,
              diag_reg_absolute_scale: bool = False, n_features: int | None = None,
              get: Literal["ntk", "nngp"] = "ntk", generator: torch.Generator | None = None,
              width: int | None = None, dtype: torch.dtype | None = None,
              chunk: int = DEFAULT_CHUNK, progress: bool = False) -> RandomFeatureRidge:
    """Ridge regression on random features of a network's NTK (or NNGP), streamed.

    The features of ``chunk`` training rows at a time are mapped (float32 by default),
    their products accumulated in float64 (`RidgeAccumulator`) and the ``D x D`` system
    ``(Phi^T Phi + s I) w = Phi^T y`` solved once: kernel ridge regression with the
    random-feature kernel (module docstring), never holding the ``(N, D)`` features.
    Memory ``O(D^2 + chunk * D)``, time ``O(N D^2)``.

    Args:
        net_or_map: an ntkit network (then ``n_features`` and ``generator`` are needed),
            or a `RandomFeatureMap` already drawn (then give neither, nor ``get``,
            ``width``, ``dtype``), or a `NystromFeatureMap` (ridge on Nystrom features
            is Nystrom kernel ridge regression, FALKON's estimator, in one pass).
        x: training inputs ``(N, *input_shape)``, a tensor or a NumPy array (a
            ``np.memmap`` is read one chunk at a time).
        y: targets ``(N,)`` or ``(N, O)``.
        diag_reg: the ridge, relative: ``s = diag_reg * trace(K) / N`` (``K`` the
            random-feature kernel of the training points), as in `ntkit.solvers`.
        diag_reg_absolute_scale: ``s = diag_reg``.
        n_features: ``D``.
        get: ``"ntk"`` or ``"nngp"``.
        generator: a `torch.Generator` for the map.
        width: hidden random width (see `RandomFeatureMap`).
        dtype: the features' dtype; default float32 (torch's default).
        chunk: training rows mapped at a time (memory ``~ chunk * D * 12`` bytes plus the
            map's own batches; see `RandomFeatureMap`'s ``memory_budget``).
        progress: print a progress bar (tqdm) over the chunks.

    Returns:
        A `RandomFeatureRidge`: ``.predict(x_test)``.

    Raises:
        TypeError: ``net_or_map`` is neither, or map options are given with a map.
        ValueError: bad ``x``, ``y``, ``chunk`` or ``diag_reg`` (see `RidgeAccumulator`).

    Example:
        >>> net = nk.Sequential(nk.Linear(512), nk.ReLU(), nk.Linear(1))
        >>> model = nk.features.fit_ridge(net, x, y, n_features=4000, diag_reg=0.1,
        ...                               generator=torch.Generator().manual_seed(0))
        >>> model.predict(x_test)
    """
    chunk = _positive_int(chunk, "chunk")
    x = _as_float_tensor(x, "x")
    if isinstance(net_or_map, _MAPS):
        given = [name for name, value in (("n_features", n_features), ("generator", generator),
                                          ("width", width), ("dtype", dtype))
                 if value is not None]
        if given or get != "ntk":
            raise TypeError(f"fit_ridge got a {type(net_or_map).__name__}, which fixes its "
                            f"features; "
                            f"do not also pass {', '.join(given) or 'get'} (or pass the "
                            f"network instead).")
        fmap = net_or_map
    else:
        if n_features is None or generator is None:
            raise TypeError("fit_ridge(net, ...) needs n_features=D and generator="
                            "torch.Generator().manual_seed(...) to draw the feature map (or "
                            "pass a RandomFeatureMap).")
        fmap = RandomFeatureMap(net_or_map, x.shape[1:], n_features=n_features, get=get,
                                generator=generator, width=width, dtype=dtype)
    y = _as_float_tensor(y, "y", min_ndim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and "
                         f"{y.shape[0]}.")
    if x.shape[0] == 0:
        raise ValueError("x has no rows; fit_ridge needs at least one training point.")
    acc = RidgeAccumulator(fmap)
    starts: Iterable[int] = range(0, x.shape[0], chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="random-feature ridge", unit="chunk")
    for i in starts:
        acc.update(x[i:i + chunk], y[i:i + chunk])
    return acc.solve(diag_reg=diag_reg, diag_reg_absolute_scale=diag_reg_absolute_scale)


def _dsyrk(a_t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``c += a_t @ a_t.T`` (upper triangle) by BLAS's symmetric rank-k update."""
    from scipy.linalg.blas import dsyrk

    if not a_t.flags.f_contiguous:
        a_t = np.asfortranarray(a_t)
    return dsyrk(1.0, a_t, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _as_float_tensor(value, name: str, min_ndim: int = 2) -> Tensor | np.ndarray:
    """``value`` checked: a floating-point tensor, or NumPy array (kept as is, so that a
    ``np.memmap`` is read one slice at a time; `_torch` converts a slice)."""
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(f"{name} must hold floating-point numbers, got a NumPy array of "
                            f"{value.dtype}.")
    elif not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor or NumPy array, got "
                        f"{type(value).__name__} {getattr(value, 'dtype', '')}.")
    if value.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s) "
                         f"({'(N, *input_shape)' if min_ndim == 2 else '(N,) or (N, O)'}), "
                         f"got shape {tuple(value.shape)}.")
    return value


def _torch(value: Tensor | np.ndarray) -> Tensor:
    """A tensor of ``value`` (a NumPy slice is copied: it may be a read-only memmap)."""
    return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value


def _check_batch(x, y, input_shape: tuple[int, ...]) -> tuple[Tensor, Tensor, bool]:
    x = _torch(_as_float_tensor(x, "x"))
    y = _torch(_as_float_tensor(y, "y", min_ndim=1))
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"x must have shape (n, {', '.join(map(str, input_shape))}) as the "
                         f"feature map was drawn for, got {tuple(x.shape)}.")
    vector = y.ndim == 1
    y2 = y[:, None] if vector else y
    if y2.ndim != 2 or y2.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape (n,) or (n, outputs) with n = {x.shape[0]} rows "
                         f"of x, got {tuple(y.shape)}.")
    if not bool(torch.isfinite(y2).all()):
        raise ValueError("y has NaN or infinite entries; ridge regression needs finite "
                         "targets.")
    return x, y2.to(torch.float64), vector

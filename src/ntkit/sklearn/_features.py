"""`NTKRandomFeatures`: random features of an ntkit network's NTK or NNGP as a
scikit-learn transformer (``fit`` draws the map, ``transform`` applies it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from ..layers.base import Layer
from ._architecture import resolve_network

__all__ = ["NTKRandomFeatures"]


class NTKRandomFeatures(TransformerMixin, BaseEstimator):
    """Random features ``phi(X)`` ``(n_samples, n_features)`` with ``E[phi(x) . phi(x')]``
    the network's NTK (``get="ntk"``) or NNGP: any linear model on them (``Ridge``,
    ``SGDRegressor``, ``LogisticRegression``) approximates the kernel method at cost
    linear in ``n_samples``. See `ntkit.features.RandomFeatureMap` for the estimator's
    construction (Zandieh et al. 2021), bias and variance.

    Args:
        architecture: None (an MLP from ``depth``, ``activation``, ``w_std``,
            ``b_std``), an ntkit network, or a spec string.
        n_features: ``D``, the number of output columns.
        get: ``"ntk"`` or ``"nngp"``.
        width: hidden random width (default from ``n_features``).
        depth, activation, w_std, b_std: the MLP's options when ``architecture`` is None.
        input_shape: per-example shape for convolutional networks, e.g. ``(3, 32, 32)``:
            rows of ``X`` are reshaped to it (default: flat features).
        random_state: None, an int or a ``np.random.RandomState``: seeds the map.

    Attributes:
        feature_map_: the fitted `ntkit.features.RandomFeatureMap`.
        n_features_in_: as in scikit-learn.
    """

    def __init__(self, architecture: Layer | str | None = None, *, n_features: int = 1024,
                 get: str = "ntk", width: int | None = None, depth: int = 2,
                 activation: str = "relu", w_std: float = 1.5, b_std: float = 0.1,
                 input_shape: tuple[int, ...] | None = None,
                 random_state: int | np.random.RandomState | None = None) -> None:
        self.architecture = architecture
        self.n_features = n_features
        self.get = get
        self.width = width
        self.depth = depth
        self.activation = activation
        self.w_std = w_std
        self.b_std = b_std
        self.input_shape = input_shape
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None) -> NTKRandomFeatures:
        """Draws the feature map for inputs like ``X`` ``(n_samples, n_features_in)``."""
        from ..features import RandomFeatureMap

        X = validate_data(self, X, dtype=np.float64)
        net = resolve_network(self.architecture, depth=self.depth, activation=self.activation,
                              w_std=self.w_std, b_std=self.b_std)
        shape = self._shape(X.shape[1])
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        self.feature_map_ = RandomFeatureMap(
            net, shape, n_features=self.n_features, get=self.get, width=self.width,
            generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return self

    def transform(self, X: Any) -> np.ndarray:
        """``phi(X)`` ``(n_samples, n_features)`` (float64)."""
        check_is_fitted(self, "feature_map_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        x = torch.from_numpy(np.array(X, dtype=np.float64)).reshape(
            (X.shape[0], *self.feature_map_.input_shape))
        return self.feature_map_(x).numpy()

    def _shape(self, n_in: int) -> tuple[int, ...]:
        if self.input_shape is None:
            return (n_in,)
        shape = tuple(int(s) for s in self.input_shape)
        if int(np.prod(shape)) != n_in:
            raise ValueError(f"input_shape={self.input_shape!r} has {int(np.prod(shape))} "
                             f"entries but X has {n_in} features per row.")
        return shape

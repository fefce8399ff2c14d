"""Random features of ntkit networks' kernels: a second route to large N.

- `random_features`: ``phi(x)`` ``(N, n_features)`` with ``E[phi(x) . phi(x')]`` the
  network's NTK (or NNGP), for fully connected and convolutional networks (Zandieh et
  al. 2021, "Scaling neural tangent kernels via sketching and random features").
- `RandomFeatureMap`: the same map drawn once, applied to many batches (training and
  test inputs must share it).
- `fit_ridge`: ridge regression on the features, streamed: ``Phi^T Phi`` (``D x D``)
  and ``Phi^T y`` summed chunk by chunk in float64, one Cholesky solve; returns a
  `RandomFeatureRidge` (``.predict(x)``). `RidgeAccumulator` is the same for data that
  arrive in batches (``update(x, y)`` then ``solve(diag_reg=...)``). The ``(N, D)``
  features are never held: kernel regression on millions of points in ``O(D^2)``
  memory.
- `NystromFeatureMap`: ``phi(x) = k(x, C) T^-1`` for ``M`` centres ``C``; ridge on it
  is Nystrom kernel ridge regression (FALKON's estimator) in one streamed pass.

Any linear model on ``phi`` approximates kernel regression with the network's kernel at
cost ``O(N D^2)`` instead of ``O(N^2)``; ``ntkit.sklearn.NTKRandomFeatures`` is the
scikit-learn transformer. Bias and variance are stated in `RandomFeatureMap`.
"""

from ._nystrom import NystromFeatureMap
from ._random import RandomFeatureMap, random_features
from ._ridge import RandomFeatureRidge, RidgeAccumulator, fit_ridge

__all__ = ["NystromFeatureMap", "RandomFeatureMap", "RandomFeatureRidge", "RidgeAccumulator",
           "fit_ridge", "random_features"]

"""scikit-learn estimators and kernels built on ntkit's infinite-width kernels.

- `NTKRegressor`, `NNGPRegressor`, `NTKClassifier`: the infinite ensemble of
  infinitely wide networks trained by gradient flow on MSE, as estimators that work
  in `Pipeline` and `GridSearchCV`; ``get="ntk"`` or ``"nngp"`` picks the kernel
  (``kernel=`` is its deprecated alias).
- `NTKKernel`, `NNGPKernel`: `sklearn.gaussian_process.kernels.Kernel`\\ s with
  ``w_std`` and ``b_std`` as hyperparameters (gradients by autograd), for
  `GaussianProcessRegressor`, `GaussianProcessClassifier` and `SVC`.
- `NeuralTangentKernel`: scikit-ntk's ``NeuralTangentKernel(depth, bias)`` (ReLU NTK
  of zero-initialised trained biases), value for value, with ``bias`` fitted by
  `GaussianProcessRegressor` (analytic gradient).
- `save`, `load`: fitted estimators in one ``.npz`` file, without pickle.

Needs scikit-learn (``pip install 'ntkit[sklearn]'``).
"""

from ._estimators import NNGPRegressor, NTKClassifier, NTKRegressor
from ._features import NTKRandomFeatures
from ._io import load, save
from ._kernels import NNGPKernel, NTKKernel
from ._scikit_ntk import NeuralTangentKernel

__all__ = ["NNGPKernel", "NNGPRegressor", "NTKClassifier", "NTKKernel", "NTKRandomFeatures",
           "NTKRegressor", "NeuralTangentKernel", "load", "save"]

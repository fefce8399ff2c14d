"""scikit-learn estimators: the infinite ensemble of infinitely wide networks trained by
gradient flow on the mean squared error, as regressors and a classifier.

The estimators adapt and delegate: kernels come from the network through the one
adapter `ntkit.kernel_function` (``get="ntk"`` or ``"nngp"``, the selector's one name),
the ``"auto"`` solver from `ntkit.solvers.resolve_solver`, and the training dynamics
from `ntkit.predict.gradient_descent_mse`. ``fit`` factorises the
train-train kernel once and keeps the *dual coefficients* ``A(t) y`` with
``A(t) = K^-1 (I - exp(-lr t K / |y|))`` (``K^-1`` at ``t = inf``), so ``predict`` is
one kernel evaluation and a matrix product.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from .. import predict, solvers
from .._budget import parse_memory
from ..errors import check_finite_output
from ..kernel_function import KernelFunction, check_get
from ..layers import Layer
from ..solvers._common import SOLVERS, resolve_solver
from ._architecture import resolve_network, torch_device, torch_dtype

__all__ = ["NNGPRegressor", "NTKClassifier", "NTKRegressor", "dual_coefficients"]


# ------------------------------------------------------------------ the math, delegated
def dual_coefficients(k_train_train: Tensor, y_train: Tensor, *, t: float,
                      learning_rate: float, diag_reg: float,
                      covariance: bool = False) -> tuple[Tensor, Tensor | None]:
    """The coefficients that turn test-train kernels into predictions at time ``t``.

    With ``K`` the regularised train-train kernel and ``c = lr / |y|`` (see
    `ntkit.predict.gradient_descent_mse`), the infinite ensemble's mean at time ``t``
    is ``k_test_train @ A_c(t) y`` with ``A_c(t) = K^-1 (I - exp(-c t K))``; when the
    same kernel is the prior (NNGP, readout-only training) its covariance is
    ``k_tt - k_td A_c(2t) k_dt`` (Lee et al. 2019, eq. 16; at ``t = inf`` the GP
    posterior with noise ``diag_reg * trace(K)/N``).

    Both come from `gradient_descent_mse` by evaluating its test outputs with
    ``k_test_train = I``: for the covariance the targets are ``[y | I]`` (one
    factorisation for both), with the learning rate scaled so that ``c`` stays
    ``lr / |y|``, at times ``t`` and ``2t``.

    Args:
        k_train_train: ``(N, N)``.
        y_train: ``(N, O)``.
        t: training time (``inf``: converged).
        learning_rate, diag_reg: as in `gradient_descent_mse` (relative ``diag_reg``).
        covariance: also return ``A_c(2t)``.

    Returns:
        ``A_c(t) y`` of shape ``(N, O)``, and ``A_c(2t)`` ``(N, N)`` or None.
    """
    n, o = y_train.shape
    eye = torch.eye(n, dtype=k_train_train.dtype, device=k_train_train.device)
    if not covariance:
        flow = predict.gradient_descent_mse(k_train_train, y_train, learning_rate=learning_rate,
                                            diag_reg=diag_reg)
        return flow(t, k_test_train=eye).test, None
    targets = torch.cat([y_train, eye], dim=1)
    flow = predict.gradient_descent_mse(k_train_train, targets, diag_reg=diag_reg,
                                        learning_rate=learning_rate * (n + o) / o)
    out = flow([t, 2 * t], k_test_train=eye).test               # (2, N, O + N)
    return out[0, :, :o], out[1, :, o:]


# ------------------------------------------------------------------ shared machinery
@dataclass(frozen=True)
class _Settings:
    """The estimator's options, checked, in the types the computation uses."""

    network: Layer
    get: str
    t: float
    learning_rate: float
    diag_reg: float
    dtype: torch.dtype
    device: torch.device
    memory_budget: int | str | None
    solver: str
    n_centers: int | None
    input_shape: tuple[int, ...] | None


def _shape(value: Any) -> tuple[int, ...] | None:
    """``input_shape`` checked: None or a sequence of positive ints."""
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise ValueError(f"input_shape must be None or a tuple of positive ints (one example's "
                         f"shape, e.g. (3, 32, 32) for images), got {value!r}.")
    return tuple(int(v) for v in value)


def _number(value: Any, name: str, *, low: float, inclusive: bool, inf: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (math.isfinite(value) or (inf and value == math.inf)) and (
            value >= low if inclusive else value > low)
    if not ok:
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        extra = " (inf for the converged solution)" if inf else ""
        raise ValueError(f"{name} must be a number {bound}{extra}, got {value!r}.")
    return value


class _KernelModel(BaseEstimator):
    """Fit and predict shared by the estimators (not public)."""

    _with_covariance = False

    def _get(self, *, warn: bool) -> str:
        """The kernel selector: ``get``, or the deprecated ``kernel`` when it is given."""
        kernel = getattr(self, "kernel", None)
        if kernel is None:
            return check_get(getattr(self, "get", "nngp"))
        if warn:
            warnings.warn(
                f"{type(self).__name__}(kernel=...) is deprecated and will be removed in the "
                f"next release; use get={kernel!r} (the same selector as ntkit.predict).",
                DeprecationWarning, stacklevel=5)      # the caller of fit
        return check_get(kernel, name="kernel")

    def _settings(self, network: Layer | None = None, *, warn: bool = False) -> _Settings:
        """The options, checked; the network is resolved unless given."""
        get = self._get(warn=warn)
        if self.memory_budget is not None:
            parse_memory(self.memory_budget)
        if self.solver not in SOLVERS:
            resolve_solver(self.solver, 0, torch.float64, None)     # raises, naming them
        if self.n_centers is not None and not (
                isinstance(self.n_centers, (int, np.integer)) and not isinstance(
                    self.n_centers, bool) and self.n_centers >= 1):
            raise ValueError(f"n_centers must be a positive integer or None, got "
                             f"{self.n_centers!r}.")
        network = network or resolve_network(self.architecture, depth=self.depth,
                                  activation=self.activation, w_std=self.w_std,
                                  b_std=self.b_std)
        return _Settings(
            network=network, get=get, input_shape=_shape(self.input_shape),
            t=_number(self.t, "t", low=0.0, inclusive=True, inf=True),
            learning_rate=_number(self.learning_rate, "learning_rate", low=0.0,
                                  inclusive=False),
            diag_reg=_number(self.diag_reg, "diag_reg", low=0.0, inclusive=True),
            dtype=torch_dtype(self.dtype), device=torch_device(self.device),
            memory_budget=self.memory_budget, solver=self.solver,
            n_centers=None if self.n_centers is None else int(self.n_centers))

    def _tensor(self, x: np.ndarray, s: _Settings) -> Tensor:
        return torch.tensor(x, dtype=s.dtype, device=s.device)

    def _inputs(self, x: np.ndarray, s: _Settings) -> Tensor:
        """Rows of ``X`` as network inputs: ``(n, *input_shape)`` when one is given."""
        t = self._tensor(x, s)
        if s.input_shape is None:
            return t
        if math.prod(s.input_shape) != t.shape[1]:
            raise ValueError(
                f"input_shape={s.input_shape} holds {math.prod(s.input_shape)} numbers per "
                f"example but X has {t.shape[1]} features; give the shape of one example "
                f"before flattening (e.g. (channels, height, width)).")
        return t.reshape(t.shape[0], *s.input_shape)

    def _kernel(self, s: _Settings, x1: Tensor, x2: Tensor | None, *,
                diagonal: bool = False) -> Tensor:
        kfn = KernelFunction(s.network, s.get, memory_budget=s.memory_budget, progress=None)
        k = kfn.diagonal(x1) if diagonal else kfn(x1, x2)
        want = (x1.shape[0],) if diagonal else (x1.shape[0], x1.shape[0] if x2 is None
                                                 else x2.shape[0])
        if tuple(k.shape) != want:
            raise ValueError(
                f"the architecture gives kernels of shape {tuple(k.shape)} for inputs of "
                f"shape {tuple(x1.shape)}, not {want}: the estimators take inputs "
                f"(n_samples, n_features) and need a network with a dense readout (end it "
                f"with nk.Linear(1), after nk.Flatten() for convolutions).")
        return k

    def _fit_targets(self, X: np.ndarray, targets: np.ndarray) -> None:
        """Computes and stores the fitted state from checked inputs and 2-D targets."""
        s = self._settings(warn=True)
        x = self._inputs(X, s)
        y = self._tensor(targets, s)
        solver = resolve_solver(s.solver, x.shape[0], s.dtype, s.memory_budget,
                                finite_time=math.isfinite(s.t))
        self.network_ = s.network
        self.solver_ = solver
        if solver != "exact":
            # None draws with a fixed seed: identical fits give identical results
            state = 0 if self.random_state is None else self.random_state
            seed = int(check_random_state(state).randint(2**31 - 1))
            fitted = solvers.solve_krr(
                solvers.kernel_function(s.network, s.get, memory_budget=s.memory_budget),
                x, y, solver=solver, diag_reg=s.diag_reg, n_centers=s.n_centers,
                generator=torch.Generator().manual_seed(seed), memory_budget=s.memory_budget,
                dtype=s.dtype)
            self.X_fit_ = fitted.centers.detach().reshape(fitted.centers.shape[0], -1).cpu().numpy()
            self.dual_coef_ = fitted.alpha.detach().cpu().numpy()
            self.n_iter_ = 0 if fitted.info is None else int(fitted.info.iterations)
            return
        k = self._kernel(s, x, None)
        dual, operator = dual_coefficients(k, y, t=s.t, learning_rate=s.learning_rate,
                                           diag_reg=s.diag_reg,
                                           covariance=self._with_covariance)
        self.X_fit_ = np.asarray(X)
        self.dual_coef_ = dual.detach().cpu().numpy()
        if operator is not None:
            self.cov_coef_ = operator.detach().cpu().numpy()

    def _outputs(self, X: Any) -> tuple[np.ndarray, _Settings, Tensor, Tensor]:
        """Mean outputs ``(n_samples, n_outputs)``, the settings, the test inputs and the
        test-train kernel."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        s = self._settings(self.network_)
        x = self._inputs(X, s)
        self._check_fitted_state()
        k_td = self._kernel(s, x, self._inputs(self.X_fit_, s))
        mean = k_td @ torch.as_tensor(self.dual_coef_, dtype=s.dtype, device=s.device)
        check_finite_output(mean, f"{type(self).__name__}.predict", causes="prediction")
        return mean.cpu().numpy(), s, x, k_td

    def _check_fitted_state(self) -> None:
        """Refuses fitted arrays with NaN or infinite entries (a corrupt or crafted model
        file): a prediction from them would be NaN."""
        for name in ("X_fit_", "dual_coef_", "cov_coef_"):
            value = getattr(self, name, None)
            if value is None:
                continue
            a = np.asarray(value)
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                raise ValueError(
                    f"this {type(self).__name__}'s fitted {name} has "
                    f"{int(np.size(a) - np.isfinite(a).sum())} NaN or infinite entries of "
                    f"{a.size}, so its predictions would not be finite; the model (or the "
                    f"file it was loaded from) is corrupt. Fit it again.")


class _Regressor(RegressorMixin, _KernelModel):
    def fit(self, X: Any, y: Any) -> _Regressor:
        """Fits the infinite ensemble to training data.

        Args:
            X: ``(n_samples, n_features)`` array-like of finite numbers.
            y: ``(n_samples,)`` or ``(n_samples, n_outputs)`` targets.

        Returns:
            self.
        """
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self._y_1d = y.ndim == 1
        self.n_outputs_ = 1 if y.ndim == 1 else y.shape[1]
        self._fit_targets(X, y.reshape(y.shape[0], -1))
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


# ------------------------------------------------------------------ docs shared by the three
_PARAMS = """
    Args:
        architecture: None for an MLP of ``depth`` hidden ``Linear -> activation`` layers
            and a ``Linear(1)`` readout with ``w_std`` and ``b_std`` everywhere; an ntkit
            network (a `ntkit.Layer` with a dense readout; ``depth``, ``activation``,
            ``w_std`` and ``b_std`` are then ignored); or a spec string such as
            ``"linear(512, w_std=1.5)-relu-linear(1)"`` (see `ntkit.spec`). Widths do
            not change infinite-width kernels. Several readout units give the same
            kernel per output; every column of ``y`` uses it.
        depth: hidden layers of the default MLP.
        activation: its nonlinearity: ``"relu"``, ``"erf"``, ``"gelu"``, ``"abs"``,
            ``"sign"``, ``"leaky_relu"``, ``"identity"`` (closed forms), ``"tanh"``,
            ``"sigmoid"``, ``"softplus"`` (Gauss-Hermite quadrature, slower).
        w_std, b_std: weight and bias standard deviations (NTK parameterization).
        t: training time of gradient flow (``inf``: trained to convergence). Time is
            in units of the learning rate, with the loss ``0.5 / |y| ||f - y||^2``
            (neural-tangents' convention, ``|y|`` = number of target entries).
        learning_rate: the gradient-flow rate; only ``lr * t`` matters.
        diag_reg: added to the train-train kernel's diagonal, relative to its mean
            diagonal (``diag_reg * trace(K) / N``); a small value keeps the solve
            well-posed with duplicated inputs.
        dtype: ``"float64"`` (recommended for kernel solves) or ``"float32"``.
        device: torch device for the kernels and solves, e.g. ``"cpu"``, ``"cuda"``.
        memory_budget: working memory for kernel tiles (bytes or e.g. ``"2GiB"``),
            passed to ``network.kernel``; also what ``solver="auto"`` compares two
            ``N x N`` kernels with (default 1 GiB).
        solver: how ``fit`` solves the regression (`ntkit.solvers.solve_krr`):
            ``"exact"`` (the ``N x N`` kernel, factorised once; any ``t``), ``"cg"``
            (conjugate gradients on the ``N x N`` kernel, Nystrom-preconditioned),
            ``"nystrom"`` (FALKON with ``n_centers`` centres: kernel blocks recomputed
            in tiles, never ``N x N``; approximate unless ``n_centers = N``), or
            ``"auto"`` (``"exact"`` when two ``N x N`` kernels fit in
            ``memory_budget``, else ``"nystrom"``). The iterative solvers give the
            converged (``t = inf``) mean only.
        n_centers: Nystrom centres (default ``min(N, max(500, 2 sqrt(N)))``), also the
            rank of the ``"cg"`` preconditioner.
        random_state: seed (int), ``numpy.random.RandomState`` or None, for drawing the
            Nystrom centres. None draws them with the fixed seed 0, so two identical
            fits give identical results (as ``solver="auto"``, which switches to
            ``"nystrom"`` past ``memory_budget`` with a `UserWarning`, needs); pass
            another int for another draw.
        input_shape: None for dense inputs, or one example's shape, e.g. ``(3, 32, 32)``:
            rows of ``X`` (flattened examples, as scikit-learn wants them) are reshaped
            to ``(n_samples, *input_shape)`` for convolutional or attention networks.
"""


def _doc(cls):
    cls.__doc__ = cls.__doc__.replace("{params}", _PARAMS.strip())
    return cls


@_doc
class NTKRegressor(_Regressor):
    """Regression by the infinite ensemble of infinitely wide networks trained by
    gradient flow on MSE: its mean at training time ``t`` (Jacot et al. 2018, Lee et al.
    2019). With ``get="ntk"`` every layer is trained, so the mean is
    ``Theta_td Theta^-1 (I - exp(-lr t Theta / |y|)) y``; with ``get="nngp"`` only
    the readout, and the NNGP takes Theta's place. At ``t = inf`` this is kernel
    regression with the NTK (or NNGP).

    {params}
        get: ``"ntk"`` (all layers trained) or ``"nngp"`` (readout only), as in
            `ntkit.predict`.
        kernel: deprecated name of ``get`` (a DeprecationWarning at ``fit``); when given
            it is used.

    Attributes:
        network_: the ntkit network used.
        X_fit_: the inputs the predictor expands on ``(n_fit, n_features)``: the
            training inputs, or the Nystrom centres with ``solver="nystrom"``.
        dual_coef_: ``(n_fit, n_outputs)``: ``predict(X) = k(X, X_fit_) @ dual_coef_``.
        solver_: the solver used (``"auto"`` resolved).
        n_iter_: conjugate-gradient iterations (iterative solvers only).
        n_outputs_: number of target columns.
        n_features_in_, feature_names_in_: as in scikit-learn.
    """

    def __init__(self, architecture: Layer | str | None = None, *, depth: int = 2,
                 activation: str = "relu", w_std: float = 1.5, b_std: float = 0.1,
                 get: str = "ntk", t: float = math.inf, learning_rate: float = 1.0,
                 diag_reg: float = 1e-6, dtype: str = "float64", device: str = "cpu",
                 memory_budget: int | str | None = None, solver: str = "auto",
                 n_centers: int | None = None, random_state: int | None = None,
                 input_shape: tuple[int, ...] | None = None,
                 kernel: str | None = None) -> None:
        self.architecture = architecture
        self.depth = depth
        self.activation = activation
        self.w_std = w_std
        self.b_std = b_std
        self.get = get
        self.t = t
        self.learning_rate = learning_rate
        self.diag_reg = diag_reg
        self.dtype = dtype
        self.device = device
        self.memory_budget = memory_budget
        self.solver = solver
        self.n_centers = n_centers
        self.random_state = random_state
        self.input_shape = input_shape
        self.kernel = kernel

    def predict(self, X: Any) -> np.ndarray:
        """The ensemble's mean output at ``X`` ``(n_samples, n_features)``: shape
        ``(n_samples,)`` for 1-D training targets, ``(n_samples, n_outputs)`` otherwise."""
        mean = self._outputs(X)[0]
        return mean[:, 0] if self._y_1d else mean


@_doc
class NNGPRegressor(_Regressor):
    """Bayesian inference with the NNGP kernel, with predictive uncertainty.

    The infinite ensemble of infinitely wide networks at initialisation is a Gaussian
    process with the NNGP kernel ``K`` (Lee et al. 2018, Matthews et al. 2018). Trained
    by gradient flow on MSE in the readout layer only, its outputs at time ``t`` are
    Gaussian with (Lee et al. 2019)

        mean(t) = K_td K^-1 (I - exp(-lr t K / |y|)) y
        cov(t)  = K_tt - K_td K^-1 (I - exp(-2 lr t K / |y|)) K_dt

    and at ``t = inf`` (the default) this is exactly the GP posterior with noise
    variance ``diag_reg * trace(K) / N`` (what `GaussianProcessRegressor` computes with
    the same kernel and ``alpha``). In the formulas the train-train ``K`` (inverted and
    exponentiated) includes ``diag_reg``; ``K_td`` and ``K_tt`` do not.

    {params}

    Attributes:
        network_, X_fit_, dual_coef_, n_outputs_: as in `NTKRegressor`.
        cov_coef_: ``(n_samples, n_samples)``: ``cov = k(X, X) - k(X, X_fit_) @ cov_coef_
            @ k(X_fit_, X)``.
    """

    _with_covariance = True

    def __init__(self, architecture: Layer | str | None = None, *, depth: int = 2,
                 activation: str = "relu", w_std: float = 1.5, b_std: float = 0.1,
                 t: float = math.inf, learning_rate: float = 1.0, diag_reg: float = 1e-6,
                 dtype: str = "float64", device: str = "cpu",
                 memory_budget: int | str | None = None, solver: str = "auto",
                 n_centers: int | None = None, random_state: int | None = None,
                 input_shape: tuple[int, ...] | None = None) -> None:
        self.architecture = architecture
        self.depth = depth
        self.activation = activation
        self.w_std = w_std
        self.b_std = b_std
        self.t = t
        self.learning_rate = learning_rate
        self.diag_reg = diag_reg
        self.dtype = dtype
        self.device = device
        self.memory_budget = memory_budget
        self.solver = solver
        self.n_centers = n_centers
        self.random_state = random_state
        self.input_shape = input_shape

    def predict(self, X: Any, return_std: bool = False, return_cov: bool = False):
        """Predictive mean, and standard deviation or covariance, at ``X``.

        As in `sklearn.gaussian_process.GaussianProcessRegressor.predict`: the
        covariance is shared by the outputs and, for 2-D targets, repeated per output.

        Args:
            X: ``(n_samples, n_features)``.
            return_std: also return the standard deviation of each output.
            return_cov: also return the joint covariance (exclusive with ``return_std``).

        Returns:
            ``mean`` ``(n_samples,)`` or ``(n_samples, n_outputs)``; with ``return_std``
            ``(mean, std)`` of the same shape; with ``return_cov`` ``(mean, cov)``, ``cov``
            of shape ``(n_samples, n_samples)`` or ``(n_samples, n_samples, n_outputs)``.
        """
        if return_std and return_cov:
            raise ValueError("return_std and return_cov are exclusive (the standard "
                             "deviation is the square root of the covariance's diagonal); "
                             "ask for one of them.")
        mean, s, x, k_td = self._outputs(X)
        mean = mean[:, 0] if self._y_1d else mean
        if not (return_std or return_cov):
            return mean
        if not hasattr(self, "cov_coef_"):
            raise ValueError(
                f"this NNGPRegressor was fitted with solver={self.solver_!r}, which gives the "
                f"posterior mean only; fit with solver='exact' for return_std/return_cov.")
        m = torch.as_tensor(self.cov_coef_, dtype=s.dtype, device=s.device)
        if return_cov:
            cov = self._kernel(s, x, None) - k_td @ m @ k_td.T
            cov = (0.5 * (cov + cov.T)).cpu().numpy()
            return mean, cov if self._y_1d else np.repeat(cov[:, :, None], self.n_outputs_, 2)
        var = self._kernel(s, x, None, diagonal=True) - ((k_td @ m) * k_td).sum(1)
        var = var.cpu().numpy()
        if np.any(var < 0):
            warnings.warn(f"{int(np.sum(var < 0))} predicted variances are below 0 by "
                          f"rounding (smallest {var.min():.3g}); they are set to 0. Use "
                          f"dtype='float64' or a larger diag_reg if they are large.",
                          RuntimeWarning, stacklevel=2)
        std = np.sqrt(np.clip(var, 0.0, None))
        return mean, std if self._y_1d else np.repeat(std[:, None], self.n_outputs_, 1)


@_doc
class NTKClassifier(ClassifierMixin, _KernelModel):
    """Classification by kernel regression on one-hot targets (Lee et al. 2018, 2019;
    Arora et al. 2019): the infinite ensemble of infinitely wide networks trained by
    gradient flow on MSE to centred one-hot targets (``1 - 1/C`` for the true class,
    ``-1/C`` for the others, ``C`` classes); the predicted class is the largest output.
    Centring changes the outputs but not their argmax (the regression is linear in the
    targets and the shift is the same for every class).

    There is no ``predict_proba``: the outputs are regression values, not
    probabilities, and a softmax of them would not be calibrated. For probabilities use
    `sklearn.gaussian_process.GaussianProcessClassifier` with `NNGPKernel`/`NTKKernel`.

    {params}
        get: ``"ntk"`` (all layers trained) or ``"nngp"`` (readout only), as in
            `ntkit.predict`.
        kernel: deprecated name of ``get`` (a DeprecationWarning at ``fit``); when given
            it is used.

    Attributes:
        classes_: the class labels, sorted (``LabelEncoder``'s order).
        network_, X_fit_: as in `NTKRegressor`.
        dual_coef_: ``(n_samples, n_classes)``.
    """

    def __init__(self, architecture: Layer | str | None = None, *, depth: int = 2,
                 activation: str = "relu", w_std: float = 1.5, b_std: float = 0.1,
                 get: str = "ntk", t: float = math.inf, learning_rate: float = 1.0,
                 diag_reg: float = 1e-6, dtype: str = "float64", device: str = "cpu",
                 memory_budget: int | str | None = None, solver: str = "auto",
                 n_centers: int | None = None, random_state: int | None = None,
                 input_shape: tuple[int, ...] | None = None,
                 kernel: str | None = None) -> None:
        self.architecture = architecture
        self.depth = depth
        self.activation = activation
        self.w_std = w_std
        self.b_std = b_std
        self.get = get
        self.t = t
        self.learning_rate = learning_rate
        self.diag_reg = diag_reg
        self.dtype = dtype
        self.device = device
        self.memory_budget = memory_budget
        self.solver = solver
        self.n_centers = n_centers
        self.random_state = random_state
        self.input_shape = input_shape
        self.kernel = kernel

    def fit(self, X: Any, y: Any) -> NTKClassifier:
        """Fits to inputs ``(n_samples, n_features)`` and labels ``(n_samples,)`` (any
        hashable labels: ints, strings). Returns self."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        codes = encoder.transform(y)
        n_classes = len(self.classes_)
        targets = np.full((len(codes), n_classes), -1.0 / n_classes)
        targets[np.arange(len(codes)), codes] += 1.0
        self._fit_targets(X, targets)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """The regression outputs at ``X``: ``(n_samples, n_classes)``; for two classes
        ``(n_samples,)``, positive for ``classes_[1]`` (scikit-learn's convention)."""
        out = self._outputs(X)[0]
        return out[:, 1] - out[:, 0] if out.shape[1] == 2 else out

    def predict(self, X: Any) -> np.ndarray:
        """The class with the largest output, ``(n_samples,)``."""
        out = self._outputs(X)[0]
        return self.classes_[np.argmax(out, axis=1)]

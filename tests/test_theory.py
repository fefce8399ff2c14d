"""The claims of the infinite-width theory, measured on real training.

In NTK parameterization, gradient descent with O(1) steps moves the parameters by O(1) in
Euclidean norm, and over a fixed training time the empirical NTK and the network's distance
from its linearisation change by at most O(width^-1/2) (Jacot et al. 2018; Lee et al. 2019,
"Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent",
Theorem 2.1). Measured here on networks drawn by ``build``.

Setup: 8 training inputs in d = 8 with targets y ~ N(0, 1) and 16 test inputs (one seeded
draw). Networks (float64) have ``depth`` hidden layers of ``width`` units, w_std = 1.5,
b_std = 0.1 and a scalar readout. Each is trained by full-batch gradient descent
(``torch.optim.SGD``) on ``0.5 / |y| ||f(X) - Y||^2`` with steps of half the stability bound
of the analytic NTK (``predict.max_learning_rate``: lr = 0.43 relu-1, 1.0 erf-1, 0.23
relu-2) to ``t = steps * lr = 10`` at every width (the infinite-width prediction leaves 2%
of ||y||^2 with one hidden layer, 0.3% with two). ``nk.linearize(model)``, taken at
initialisation, is trained the same way. Per width, each quantity is the root-mean-square
over ``n_samples`` networks of

    ntk            ||Theta_T - Theta_0||_F / ||Theta_0||_F  (nk.empirical_ntk, training inputs)
    params         ||theta_T - theta_0|| / ||theta_0||  (all parameters)
    <name>.weight  the same for one weight matrix
    linear-train,  ||f_T - f^lin_T|| / ||f^lin_T|| on the training or test inputs
    linear-test
    outputs        ||f_T - f_0|| / ||f_0|| on both (negative control)

Criteria: the least-squares slope of ``log value`` against ``log width`` lies in its
window (``SLOPE_WINDOWS``); for the kernel and the parameters, whose theorem gives the rate,
also ``value(W_max) / value(W_min) <= DECREASE_MARGIN * sqrt(W_min / W_max)``; the distance
to the linearisation is below ``LINEAR_BOUND`` at the widest width.

Measured over 100 base seeds (``SEED`` = 0, ..., 99), slope mean +- sd [min, max]:

    case (widths, samples)      quantity      slope                            window
    relu-1 (128..16384, 4)      ntk           -0.673 +- 0.052 [-0.800, -0.554]  [-0.95, -0.45]
                                params        -0.496 +- 0.024 [-0.560, -0.437]  [-0.6, -0.4]
                                0.weight      -0.495 +- 0.024 [-0.558, -0.440]  [-0.6, -0.4]
                                2.weight      -0.500 +- 0.026 [-0.567, -0.435]  [-0.6, -0.4]
                                linear-train  -0.554 +- 0.088 [-0.734, -0.375]  [-0.95, -0.2]
                                linear-test   -0.678 +- 0.065 [-0.830, -0.538]  [-0.95, -0.45]
                                outputs       -0.002 +- 0.022 [-0.068, +0.052]  control
    erf-1 (128..16384, 4)       ntk           -0.956 +- 0.058 [-1.122, -0.845]  [-1.25, -0.75]
                                params        -0.499 +- 0.023 [-0.559, -0.458]  [-0.6, -0.4]
                                linear-train  -0.971 +- 0.079 [-1.146, -0.805]  [-1.3, -0.7]
                                linear-test   -0.966 +- 0.077 [-1.157, -0.752]  [-1.3, -0.7]
    relu-2 (64..1024, 6)        ntk           -0.704 +- 0.114 [-0.986, -0.462]  [-1.1, -0.3]
                                params        -0.993 +- 0.040 [-1.123, -0.892]  [-1.2, -0.8]
                                0.weight      -0.513 +- 0.041 [-0.618, -0.410]  [-0.75, -0.25]
                                2.weight      -1.017 +- 0.041 [-1.148, -0.911]  [-1.2, -0.8]
                                4.weight      -0.535 +- 0.056 [-0.725, -0.414]  [-0.75, -0.25]
    relu-1 mean-field           ntk           -0.001 +- 0.010 [-0.022, +0.020]  control
      (128..16384, 4)           0.weight      -0.002 +- 0.004 [-0.013, +0.006]  control
                                2.weight      -0.004 +- 0.008 [-0.023, +0.018]  control

Every window is at least 3.4 sd from the mean on either side; every test of this file
passed for all 100 seeds. ``value(W_max) / value(W_min)`` stayed at or below 0.13 (bound
0.18) for relu-1 and erf-1 and 0.32 (bound 0.5) for relu-2. The linearised distances at
width 16384 were 0.10% (train) and 0.20% (test) RMS for relu-1, at most 0.21% and 0.44%;
0.012% and 0.034% for erf-1 (bound 1%; at width 128 they are 1.5% and 5%). How to read them:

* Parameters: each weight matrix moves by O(1) (the whole ``||theta_T - theta_0||`` stayed
  within 1.2-3.5 at every width), so its relative change is ``1 / ||W_0||_F``: width^-1/2
  for the first layer (width x d) and the readout, width^-1 for the width x width layer.
  That layer dominates the whole vector with two hidden layers, so "roughly width^-1/2"
  holds for the whole vector with one hidden layer only.
* Kernel and linearisation: the theorem's O(width^-1/2) is an upper bound. With erf both
  fall like width^-1, the rate Dyer & Gur-Ari (2020, "Asymptotics of Wide Networks from
  Feynman Diagrams") derive for smooth activations. With ReLU they fall more slowly
  (width^-0.55 to -0.7 over these widths; the local slope of the training-input distance
  drifts from -0.63 to -0.43), presumably from units whose pre-activation crosses the kink
  during training. The ratio check is not applied to the linearisation: the ReLU
  training-input distance decays at about the bound's own rate, and its ratio exceeded
  2 sqrt(W_min / W_max) for 5 of 100 seeds.
* Negative controls: the outputs move by O(1) at every width (the networks learn; at least
  0.67 over all seeds and widths), and a mean-field scaling (readout times width^-1/2, steps
  times width, so the function-space dynamics at initialisation are unchanged) keeps the
  kernel (relative change about 0.96) and the weights (0.41, 1.1) moving by O(1): both fail
  the slope and the ratio checks.

Cost: about 6 s for relu-1, 3 s for erf-1, 4 s for relu-2 and 1 s for the mean-field sweep
on one thread (15 s in all; under 0.5 GB).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch
from conftest import one_thread

import ntkit as nk
from ntkit import predict
from ntkit import theory as th

F64 = torch.float64
#: Base seed of the network draws (the measurements above used 0, 1, ..., 99).
SEED = 0
W_STD, B_STD = 1.5, 0.1
#: Each step is this fraction of the stability bound of the analytic NTK.
LR_FRACTION = 0.5
#: Training time ``t = steps * lr``, the same at every width.
TIME = 10.0
#: Where the theorem gives the rate, ``value(W_max) / value(W_min)`` may exceed its
#: ``sqrt(W_min / W_max)`` by this factor.
DECREASE_MARGIN = 2.0
#: The largest relative distance between the trained network and its trained
#: linearisation allowed at the widest width (measured at most 0.44%).
LINEAR_BOUND = 0.01
#: In the mean-field control, the kernel and the weights move by at least this much at
#: every width (measured at least 0.38).
MEAN_FIELD_FLOOR = 0.2
#: Fitted log-log slopes, ``(case, quantity) -> (lowest, highest)``: the measured mean
#: +- 3.4 sd or more (see the table above).
SLOPE_WINDOWS: dict[tuple[str, str], tuple[float, float]] = {
    ("relu-1", "ntk"): (-0.95, -0.45),
    ("relu-1", "params"): (-0.6, -0.4),
    ("relu-1", "0.weight"): (-0.6, -0.4),
    ("relu-1", "2.weight"): (-0.6, -0.4),
    ("relu-1", "linear-train"): (-0.95, -0.2),
    ("relu-1", "linear-test"): (-0.95, -0.45),
    ("erf-1", "ntk"): (-1.25, -0.75),
    ("erf-1", "params"): (-0.6, -0.4),
    ("erf-1", "linear-train"): (-1.3, -0.7),
    ("erf-1", "linear-test"): (-1.3, -0.7),
    ("relu-2", "ntk"): (-1.1, -0.3),
    ("relu-2", "params"): (-1.2, -0.8),
    ("relu-2", "0.weight"): (-0.75, -0.25),
    ("relu-2", "2.weight"): (-1.2, -0.8),
    ("relu-2", "4.weight"): (-0.75, -0.25),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the networks are small, and thread start-up dominates."""
    with one_thread():
        yield


def mlp(width: int, depth: int, act: Callable[[], nk.Layer]) -> nk.Sequential:
    """``depth`` hidden layers of ``width`` units and a scalar readout."""
    layers: list[nk.Layer] = []
    for _ in range(depth):
        layers += [nk.Linear(width, w_std=W_STD, b_std=B_STD), act()]
    return nk.Sequential(*layers, nk.Linear(1, w_std=W_STD, b_std=B_STD))


class MeanField(torch.nn.Module):
    """``model(x) / sqrt(width)``: the readout of an NTK-parameterized network scaled
    down to the mean-field ``1 / width``, which makes the hidden layers learn features."""

    def __init__(self, model: torch.nn.Module, width: int) -> None:
        super().__init__()
        self.model, self.scale = model, width**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.model(x)


def _data(n: int = 8, n_test: int = 16, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64)
    return x, y, torch.randn(n_test, d, generator=g, dtype=F64)


#: Training inputs ``(8, 8)``, targets ``(8, 1)`` and test inputs ``(16, 8)``.
X, Y, X_TEST = _data()


@dataclass(frozen=True)
class Case:
    """An architecture, its width sweep and what to measure."""

    depth: int
    act: Callable[[], nk.Layer]
    widths: tuple[int, ...]
    n_samples: int
    linearize: bool
    scaling: Literal["ntk", "mean-field"] = "ntk"


CASES = {
    "relu-1": Case(1, nk.ReLU, tuple(2**k for k in range(7, 15)), 4, True),
    "erf-1": Case(1, nk.Erf, tuple(2**k for k in range(7, 15)), 4, True),
    "relu-2": Case(2, nk.ReLU, tuple(2**k for k in range(6, 11)), 6, False),
    "relu-1-mean-field": Case(1, nk.ReLU, tuple(2**k for k in range(7, 15)), 4, False,
                              "mean-field"),
}


def _gradient_descent(model: torch.nn.Module, lr: float, steps: int) -> None:
    """Full-batch gradient descent on ``0.5 / |y| ||f(X) - Y||^2``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((model(X) - Y) ** 2).sum() / Y.numel()).backward()
        opt.step()


def _relative(new: torch.Tensor, old: torch.Tensor) -> float:
    return float(torch.linalg.norm(new - old) / torch.linalg.norm(old))


def train_and_measure(case: Case, width: int, seed: int) -> dict[str, float]:
    """Train one network drawn by ``build`` (and its linearisation) to ``t = TIME``;
    the relative changes of its NTK, parameters and outputs, and its relative distance
    from the trained linearisation."""
    net = mlp(width, case.depth, case.act)
    model = net.build(X.shape[1], generator=torch.Generator().manual_seed(seed), dtype=F64)
    lr = LR_FRACTION * predict.max_learning_rate(mlp(1, case.depth, case.act).kernel(X).ntk,
                                                 y_size=Y.numel())
    steps = round(TIME / lr)
    if case.scaling == "mean-field":  # the NTK is divided by width: steps width times larger
        model, lr = MeanField(model, width), lr * width
    both = torch.cat([X, X_TEST])
    ntk0 = nk.empirical_ntk(model, X)
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        f0 = model(both)
    linear = nk.linearize(model) if case.linearize else None
    _gradient_descent(model, lr, steps)
    theta = dict(model.named_parameters())
    with torch.no_grad():
        f = model(both)
    got = {
        "ntk": _relative(nk.empirical_ntk(model, X), ntk0),
        "params": _relative(torch.cat([theta[k].detach().ravel() for k in theta0]),
                            torch.cat([v.ravel() for v in theta0.values()])),
        "outputs": _relative(f, f0),
    }
    for name, p in theta.items():
        if name.endswith("weight"):
            got[name] = _relative(p.detach(), theta0[name])
    if linear is not None:
        _gradient_descent(linear, lr, steps)
        with torch.no_grad():
            f_lin = linear(both)
        n = X.shape[0]
        got["linear-train"] = _relative(f[:n], f_lin[:n])
        got["linear-test"] = _relative(f[n:], f_lin[n:])
    return got


def sweep(case: Case, seed: int) -> dict[str, np.ndarray]:
    """Per quantity, the root-mean-square over ``n_samples`` networks per width."""
    runs = [[train_and_measure(case, width, seed * 10**7 + width * 100 + sample)
             for sample in range(case.n_samples)] for width in case.widths]
    return {key: np.array([math.sqrt(np.mean([r[key] ** 2 for r in rs])) for rs in runs])
            for key in runs[0][0]}


def fitted_slope(widths: tuple[int, ...], values: np.ndarray) -> float:
    """Least-squares slope of ``log value`` against ``log width``."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


@pytest.fixture(scope="module")
def sweeps() -> Callable[[str], dict[str, np.ndarray]]:
    """``sweeps(case name)``: each case's sweep, trained once per module."""
    cache: dict[str, dict[str, np.ndarray]] = {}

    def get(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            cache[name] = sweep(CASES[name], SEED)
        return cache[name]

    return get


def scaling_problems(widths: tuple[int, ...], values: np.ndarray,
                     window: tuple[float, float], *, ratio: bool = True) -> list[str]:
    """What contradicts a fitted slope inside ``window`` and, with ``ratio``, a decay at
    least as fast as the theorems' ``width^-1/2``: an empty list when nothing does."""
    problems = []
    table = ", ".join(f"W={w}: {v:.3g}" for w, v in zip(widths, values))
    bound = DECREASE_MARGIN * (widths[0] / widths[-1]) ** 0.5
    if ratio and not values[-1] / values[0] <= bound:
        problems.append(f"value(W_max) / value(W_min) = {values[-1] / values[0]:.3f} > "
                        f"{bound:.3f} ({table})")
    slope = fitted_slope(widths, values)
    if not window[0] <= slope <= window[1]:
        problems.append(f"slope {slope:+.3f} outside [{window[0]}, {window[1]}] ({table})")
    return problems


def _check(sweeps, name: str, quantity: str, *, ratio: bool = True) -> None:
    problems = scaling_problems(CASES[name].widths, sweeps(name)[quantity],
                                SLOPE_WINDOWS[name, quantity], ratio=ratio)
    assert not problems, problems


@pytest.mark.parametrize("name", ["relu-1", "erf-1", "relu-2"])
def test_kernel_change_shrinks_with_width(sweeps, name):
    """``||Theta_T - Theta_0||_F / ||Theta_0||_F`` of the empirical NTK falls at least like
    width^-1/2: about width^-1 with erf, width^-0.7 with ReLU."""
    _check(sweeps, name, "ntk")


PARAMETER_CASES = [
    ("relu-1", "params"), ("relu-1", "0.weight"), ("relu-1", "2.weight"),
    ("erf-1", "params"),
    ("relu-2", "params"), ("relu-2", "0.weight"), ("relu-2", "2.weight"), ("relu-2", "4.weight"),
]


@pytest.mark.parametrize(("name", "quantity"), PARAMETER_CASES,
                         ids=[f"{n}-{q}" for n, q in PARAMETER_CASES])
def test_parameter_change_shrinks_with_width(sweeps, name, quantity):
    """Each weight matrix moves by O(1) in Frobenius norm, so its relative change falls
    like ``1 / ||W_0||_F``: width^-1/2 for the first layer and the readout, width^-1 for the
    width x width layer, which dominates the whole parameter vector of the deeper net."""
    _check(sweeps, name, quantity)


@pytest.mark.parametrize("where", ["train", "test"])
@pytest.mark.parametrize("name", ["relu-1", "erf-1"])
def test_trained_network_stays_close_to_its_linearisation(sweeps, name, where):
    """``||f_T - f^lin_T|| / ||f^lin_T||`` on the training or test inputs falls with width
    (about width^-1 with erf, width^-0.55 to -0.7 with ReLU), and is below
    ``LINEAR_BOUND`` at the widest width."""
    _check(sweeps, name, f"linear-{where}", ratio=False)
    distance = sweeps(name)[f"linear-{where}"][-1]
    assert distance <= LINEAR_BOUND, f"{distance:.4f} at width {CASES[name].widths[-1]}"


def test_outputs_move_by_order_one(sweeps):
    """Negative control: the outputs ``||f_T - f_0|| / ||f_0||`` move by O(1) at every
    width (the networks learn), so the checks above fail on them."""
    name = "relu-1"
    moved = sweeps(name)["outputs"]
    assert moved.min() >= 0.4, moved  # measured at least 0.67
    assert abs(fitted_slope(CASES[name].widths, moved)) <= 0.1, moved
    for quantity in ("ntk", "params"):  # both the ratio and the slope checks fail
        assert len(scaling_problems(CASES[name].widths, moved,
                                    SLOPE_WINDOWS[name, quantity])) == 2, quantity


@pytest.mark.parametrize("quantity", ["ntk", "model.0.weight", "model.2.weight"])
def test_mean_field_scaling_keeps_learning_features(sweeps, quantity):
    """Negative control: with the readout scaled by ``1 / sqrt(width)`` (mean-field) and
    the step scaled up by ``width`` to train in the same time, the kernel and the weights
    move by O(1) at every width, and the checks above fail on them."""
    name, ntk_name = "relu-1-mean-field", "relu-1"
    moved = sweeps(name)[quantity]
    assert moved.min() >= MEAN_FIELD_FLOOR, moved
    assert abs(fitted_slope(CASES[name].widths, moved)) <= 0.1, moved
    window = SLOPE_WINDOWS[ntk_name, quantity.removeprefix("model.")]
    assert len(scaling_problems(CASES[name].widths, moved, window)) == 2  # ratio and slope



# ---------------------------------------------------------------------------------------
# ntkit.theory (issue 19): learning curves, spectra on the sphere, convergence.
#
# Witnesses: the mean test MSE of actual kernel ridge regression over many random training
# sets (`measure_learning_curve`; one case re-derived by a plain loop here), a direct
# eigendecomposition of the kernel on a quadrature grid of the sphere, ntkit.predict's
# closed-form dynamics, explicit gradient-descent iterations, and a trained wide network.
#
# Measured (pool of 800 standardized digits, one-hot centred targets, 1-hidden-layer ReLU
# NTK, 200 draws per size): ridgeless +5.0%, +4.3%, +4.6% at n = 20, 50, 100 (standard
# errors 0.9%, 0.7%, 0.4%); ridge 0.1 with noise 0.05: +0.6%, -0.3%, -1.2%. The
# experiment sits a few percent above the theory at small n (the equations are
# asymptotic); on the full digits pool (P = 1797) the ridgeless gap grows to 9% at
# n = 500 and 22% at n = 1000 (not from the finite pool: from the digits' eigenvectors,
# tests/test_theory_curves.py), so these tests keep n <= P / 8. Criterion: |relative gap|
# <= 5% + 3 standard errors. Larger n, finite-pool equations: tests/test_theory_curves.py.
# ---------------------------------------------------------------------------------------

CURVE_TOL = 0.05


def _relu_net(depth: int = 1, act=nk.ReLU) -> nk.Sequential:
    layers = []
    for _ in range(depth):
        layers += [nk.Linear(512, w_std=W_STD, b_std=B_STD), act()]
    return nk.Sequential(*layers, nk.Linear(1, w_std=W_STD, b_std=B_STD))


@pytest.fixture(scope="module")
def digits_pool():
    x, lab = nk.datasets.load_digits()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:800]
    y = torch.nn.functional.one_hot(lab[idx], 10).to(F64)
    y = y - y.mean(0)
    return _relu_net().kernel(x[idx]).ntk, y


def _sphere_points(p: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(p, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.norm(dim=1, keepdim=True) * d ** 0.5


def _harmonic_target(x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Degree-1, -2 and -3 harmonics on the sphere of radius sqrt(d), and the power of
    each degree: with u = x / sqrt(d) uniform on the unit sphere, E u_1^2 = 1/d,
    E (u_1 u_2)^2 = 1/(d (d+2)), E (u_1 u_2 u_3)^2 = 1/(d (d+2) (d+4))."""
    d = x.shape[1]
    u = x / d ** 0.5
    a1, a2, a3 = 1.0, 0.7, 0.5
    y = a1 * d ** 0.5 * u[:, 0] + a2 * (d * (d + 2)) ** 0.5 * u[:, 1] * u[:, 2] \
        + a3 * (d * (d + 2) * (d + 4)) ** 0.5 * u[:, 0] * u[:, 1] * u[:, 3]
    return y, [0.0, a1 ** 2, a2 ** 2, a3 ** 2]


@pytest.fixture(scope="module")
def sphere_pool():
    d = 5
    x = _sphere_points(1000, d, seed=1)
    y, power = _harmonic_target(x)
    net = _relu_net(depth=2)
    return net, d, net.kernel(x).ntk, y, power


def _agree(curve, measured, tol=CURVE_TOL):
    rel = measured.test_mse / curve.test_mse - 1
    allowed = tol + 3 * measured.test_mse_sem / curve.test_mse
    return bool((rel.abs() <= allowed).all()), rel


@pytest.mark.parametrize(("ridge", "noise"), [(0.0, 0.0), (0.1, 0.0), (0.1, 0.05)],
                         ids=["ridgeless", "ridge", "ridge-noise"])
def test_learning_curve_matches_kernel_regression_on_digits(digits_pool, ridge, noise):
    k, y = digits_pool
    sizes = [20, 50, 100]
    curve = th.learning_curve(k, y, sizes, ridge=ridge, noise=noise)
    measured = th.measure_learning_curve(k, y, sizes, ridge=ridge, noise=noise, trials=200,
                                         generator=torch.Generator().manual_seed(1))
    ok, rel = _agree(curve, measured)
    assert ok, f"theory vs experiment, relative gap {rel.tolist()}"


@pytest.mark.parametrize("ridge", [0.0, 0.05], ids=["ridgeless", "ridge"])
def test_learning_curve_matches_kernel_regression_on_the_sphere(sphere_pool, ridge):
    """Uniform inputs on the sphere in d = 5, a target of degree-1, -2 and -3 harmonics,
    a 2-hidden-layer ReLU NTK, pool of 1000. Measured (ridgeless, 150 draws, standard
    errors ~2%): the pool spectrum's prediction is 7%, 8%, 13% below the experiment at
    n = 20, 60, 120, the exact spectrum by degree's 2%, -1%, 1% (with a pool of 3000:
    6%, 11%, 15% and 6%, 8%, 10%). The staircase spectrum of the sphere (degenerate
    degrees) is where the asymptotic equations are least accurate at these n; the
    tolerance here is 15% + 3 standard errors, not the digits' 5%. Not the pool's
    doing: fresh i.i.d. points against the exact spectrum are 7% to 20% off in d = 5 at
    n = 20 to 1000, and within 2.5% in d = 10 (tests/test_theory_curves.py, where the
    sphere in d = 10 meets 5% up to n = 1000)."""
    net, d, k, y, power = sphere_pool
    sizes = [20, 60, 120]
    measured = th.measure_learning_curve(k, y, sizes, ridge=ridge, trials=150,
                                         generator=torch.Generator().manual_seed(2))
    ok, rel = _agree(th.learning_curve(k, y, sizes, ridge=ridge), measured, tol=0.15)
    assert ok, f"pool spectrum vs experiment, relative gap {rel.tolist()}"
    exact = th.eigenlearning(th.sphere_spectrum(net, d, 12).spectrum(power), sizes,
                             ridge=ridge)
    ok, rel = _agree(exact, measured, tol=0.15)
    assert ok, f"exact sphere spectrum vs experiment, relative gap {rel.tolist()}"


def test_a_wrong_spectrum_fails_the_check(digits_pool):
    """Eigenvalues scaled by 1/20 (with a ridge; ridgeless curves are invariant to a common
    scale) or squared (ridgeless) predict curves the experiment rejects."""
    k, y = digits_pool
    sizes = [20, 50, 100]
    spec = th.pool_spectrum(k, y)
    for ridge, lam in ((0.1, spec.eigenvalues / 20), (0.0, spec.eigenvalues ** 2)):
        wrong = th.Spectrum(lam, spec.multiplicity, spec.target_power, outputs=spec.outputs)
        curve = th.eigenlearning(wrong, sizes, ridge=ridge)
        measured = th.measure_learning_curve(k, y, sizes, ridge=ridge, trials=100,
                                             generator=torch.Generator().manual_seed(3))
        ok, rel = _agree(curve, measured)
        assert not ok, f"a wrong spectrum passed (ridge {ridge}): gaps {rel.tolist()}"


def test_ridge_is_the_absolute_ridge_of_the_train_kernel(digits_pool):
    """The mapping ``delta = ridge`` (operator on the pool's empirical measure): a large
    ridge makes the regressor nearly linear in y, where the theory is accurate; ``delta =
    ridge / P`` or ``ridge * n`` would be off by far more than the tolerance."""
    k, y = digits_pool
    sizes = [30, 100]
    measured = th.measure_learning_curve(k, y, sizes, ridge=5.0, trials=100,
                                         generator=torch.Generator().manual_seed(4))
    right = th.learning_curve(k, y, sizes, ridge=5.0)
    assert _agree(right, measured)[0]
    for wrong in (5.0 / k.shape[0], 5.0 * 30):
        assert not _agree(th.learning_curve(k, y, sizes, ridge=wrong), measured)[0]


def test_measurement_equals_a_plain_loop(digits_pool):
    k, y = digits_pool
    gen = torch.Generator().manual_seed(5)
    got = th.measure_learning_curve(k, y, [25], ridge=0.01, trials=3, generator=gen)
    gen = torch.Generator().manual_seed(5)
    errors = []
    for _ in range(3):
        idx = torch.randperm(k.shape[0], generator=gen)[:25]
        alpha = torch.linalg.solve(k[idx][:, idx] + 0.01 * torch.eye(25, dtype=F64), y[idx])
        errors.append(float(((k[:, idx] @ alpha - y) ** 2).sum(1).mean()))
    torch.testing.assert_close(got.test_mse, torch.tensor([np.mean(errors)], dtype=F64))


def test_eigenlearning_equations_hold(digits_pool):
    """The i.i.d. equations (``pool_size=None``): kappa solves its equation; learnabilities
    sum to n - ridge / kappa (the conservation law); E0 and the errors follow the formulas
    written out here. (`learning_curve` uses the finite-pool equations, checked in
    tests/test_theory_curves.py.)"""
    k, y = digits_pool
    c = th.eigenlearning(th.pool_spectrum(k, y), [10, 40, 160], ridge=0.2, noise=0.1)
    lam = torch.linalg.eigvalsh(k).clamp_min(0) / k.shape[0]
    for i, n in enumerate([10, 40, 160]):
        kappa = float(c.kappa[i])
        assert float((lam / (lam + kappa)).sum() + 0.2 / kappa) == pytest.approx(n, rel=1e-9)
        big_l = c.learnability[i]
        assert float(big_l.sum()) == pytest.approx(n - 0.2 / kappa, rel=1e-9)
        e0 = n / (n - float((big_l ** 2).sum()))
        assert float(c.e0[i]) == pytest.approx(e0, rel=1e-12)
        test = e0 * (float(((1 - big_l) ** 2 * c.spectrum.target_power).sum()) + 0.1 * 10)
        assert float(c.test_mse[i]) == pytest.approx(test, rel=1e-12)
        assert float(c.train_mse[i]) == pytest.approx((0.2 / (n * kappa)) ** 2 * test,
                                                      rel=1e-12)
    assert float(c.spectrum.target_power.sum()) == pytest.approx(
        float((y ** 2).sum(1).mean()), rel=1e-10)


def test_nystrom_spectrum_gives_the_exact_curve():
    x, lab = nk.datasets.load_digits()
    x, lab = x[:1200], lab[:1200]
    y = (lab == 3).to(F64) - (lab == 3).to(F64).mean()
    net = _relu_net()
    sizes = [20, 50, 100]
    exact = th.learning_curve(net.kernel(x).ntk, y, sizes, ridge=1e-3)
    approx = th.eigenlearning(th.nystrom_spectrum(net, x, y, landmarks=800,
                                                  generator=torch.Generator().manual_seed(0)),
                              sizes, ridge=1e-3)
    torch.testing.assert_close(approx.test_mse, exact.test_mse, rtol=0.03, atol=0)


def test_bad_input_is_refused_with_a_clear_error(digits_pool):
    k, y = digits_pool
    with pytest.raises(ValueError, match="below the pool size"):
        th.learning_curve(k, y, [900])
    with pytest.raises(ValueError, match="positive integers"):
        th.learning_curve(k, y, [10.5])
    with pytest.raises(ValueError, match="ridge"):
        th.learning_curve(k, y, [10], ridge=-1.0)
    with pytest.raises(ValueError, match=r"shape \(800,\)"):
        th.learning_curve(k, y[:10], [10])
    with pytest.raises(ValueError, match="symmetric"):
        th.learning_curve(k + torch.triu(torch.ones_like(k)), y, [10])
    low_rank = th.Spectrum(torch.tensor([1.0, 0.5, 0.0]), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="ridgeless"):
        th.eigenlearning(low_rank, [5])


# -- spectra on the sphere ---------------------------------------------------------------

def _sphere_grid(nz: int, nphi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A product quadrature of the sphere of radius sqrt(3): Gauss-Legendre in z times
    nphi equispaced longitudes; weights sum to 1 (uniform probability measure)."""
    z, wz = np.polynomial.legendre.leggauss(nz)
    phi = np.arange(nphi) * 2 * np.pi / nphi
    zz, pp = np.meshgrid(z, phi, indexing="ij")
    r = np.sqrt(1 - zz ** 2)
    x = np.stack([r * np.cos(pp), r * np.sin(pp), zz], -1).reshape(-1, 3) * 3 ** 0.5
    w = np.repeat(wz, nphi) / 2 / nphi
    return torch.tensor(x), torch.tensor(w)


@pytest.mark.parametrize(("act", "tol"), [(nk.Erf, 1e-3), (nk.ReLU, 2.5e-2)],
                         ids=["erf", "relu"])
def test_sphere_spectrum_equals_the_eigenvalues_of_the_kernel_matrix(act, tol):
    """The weighted kernel matrix on a 30 x 60 product grid of the sphere in d = 3
    (Nystrom's quadrature method): its top eigenvalues come in clusters of 2l + 1, each
    equal to mu_l. The grid limits the agreement for ReLU, whose kernel has a kink at
    t = 1 (measured 1.7% at the 8th degree)."""
    net = _relu_net(depth=2, act=act)
    s = th.sphere_spectrum(net, 3, 12)
    x, w = _sphere_grid(30, 60)
    k = net.kernel(x).ntk
    numeric = torch.linalg.eigvalsh(w.sqrt()[:, None] * k * w.sqrt()[None]).flip(0)
    start = 0
    for ell in torch.argsort(s.eigenvalues, descending=True)[:8].tolist():
        size = th.harmonic_multiplicity(3, ell)
        cluster = numeric[start:start + size]           # one degree: 2l + 1 equal values
        start += size
        torch.testing.assert_close(cluster, s.eigenvalues[ell].expand(size), rtol=tol,
                                   atol=0)
    assert s.multiplicity.tolist()[:4] == [1, 3, 5, 7]


@pytest.mark.parametrize(("act", "tol"), [(nk.Erf, 1e-8), (nk.ReLU, 2e-3)],
                         ids=["erf", "relu"])
def test_kernel_rebuilt_from_the_sphere_spectrum_equals_the_kernel(act, tol):
    """On random pairs of points of the sphere in d = 6: sum_l mu_l N(d, l) P_l(t) is
    the kernel (smooth erf: to rounding at degree 40; ReLU: its slowly decaying tail)."""
    d = 6
    net = _relu_net(depth=2, act=act)
    s = th.sphere_spectrum(net, d, 40)
    x1, x2 = _sphere_points(30, d, seed=7), _sphere_points(30, d, seed=8)
    k = net.kernel(x1, x2).ntk
    t = (x1 @ x2.T / d).clamp(-1, 1)
    torch.testing.assert_close(s.profile(t), k, rtol=0, atol=tol * float(k.abs().max()))
    assert float((s.multiplicity * s.eigenvalues).sum()) + s.tail_trace == pytest.approx(
        float(net.kernel(x1[:1]).ntk), rel=1e-9)


# -- convergence -------------------------------------------------------------------------

def _train_data(n: int = 16, d: int = 8):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    return x, torch.randn(n, 2, generator=gen, dtype=F64)


def test_train_loss_equals_predicts_closed_form_dynamics():
    x, y = _train_data()
    k = _relu_net().kernel(x).ntk
    c = th.convergence(k, y, learning_rate=0.7, fx_train_0=0.3)
    times = [0.0, 0.5, 3.0, 20.0]
    f = predict.gradient_descent_mse(k, y, learning_rate=0.7)(times, fx_train_0=0.3).train
    expected = 0.5 * ((f - y) ** 2).mean((1, 2))
    torch.testing.assert_close(c.loss(times), expected, rtol=1e-9, atol=1e-14)
    # discrete steps: the closed form against the iteration f <- f - step K (f - y) / |y|
    step = 0.8 * c.max_learning_rate
    assert c.max_learning_rate == pytest.approx(predict.max_learning_rate(k, y_size=y.numel()))
    f = torch.full_like(y, 0.3)
    for steps in range(31):
        if steps in (0, 1, 7, 30):
            assert float(c.loss_after(steps, step)) == pytest.approx(
                float(0.5 * ((f - y) ** 2).mean()), rel=1e-9)
        f = f - step * k @ (f - y) / y.numel()
    assert c.smallest_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(k)[0]))
    assert c.condition_number == pytest.approx(float(torch.linalg.cond(k)), rel=1e-6)
    t = c.time_to_loss(1e-3)
    assert float(c.loss(t)) == pytest.approx(1e-3, rel=1e-6)
    n = c.steps_to_loss(1e-3, step)
    assert float(c.loss_after(n, step)) <= 1e-3 < float(c.loss_after(n - 1, step))
    with pytest.raises(ValueError, match="stability bound"):
        c.loss_after(3, 1.01 * c.max_learning_rate)


def test_train_loss_matches_gradient_descent_of_a_wide_network():
    """A width-4096 network (NTK parameterization) trained by full-batch gradient
    descent follows the analytic NTK's predicted loss: relative gap below 10% while the
    loss falls by 100x (finite-width kernel fluctuations are O(width^-1/2) ~ 2%)."""
    x, y = _train_data()
    y = y[:, :1]
    net = nk.Sequential(nk.Linear(4096, w_std=W_STD, b_std=B_STD), nk.ReLU(),
                        nk.Linear(1, w_std=W_STD, b_std=B_STD))
    model = net.build(x.shape[1:], generator=torch.Generator().manual_seed(0)).to(F64)
    with torch.no_grad():
        f0 = model(x)
    c = th.convergence(net.kernel(x).ntk, y, fx_train_0=f0)
    step = 0.5 * c.max_learning_rate
    opt = torch.optim.SGD(model.parameters(), lr=step)
    checks = {0: None, 10: None, 40: None, 150: None}
    for i in range(151):
        out = model(x)
        loss = 0.5 * ((out - y) ** 2).mean()
        if i in checks:
            checks[i] = float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    predicted = c.loss_after(list(checks), step)
    measured = torch.tensor(list(checks.values()), dtype=F64)
    assert float(measured[-1]) < 0.01 * float(measured[0])
    torch.testing.assert_close(measured, predicted, rtol=0.1, atol=0)


def test_theory_figures_have_labelled_axes():
    pytest.importorskip("matplotlib")
    x, y = _train_data()
    nets = {f"relu depth {depth}": _relu_net(depth=depth) for depth in (1, 3)}
    fig = th.sphere_spectrum_figure({k: th.sphere_spectrum(v, 4, 6) for k, v in nets.items()})
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and len(ax.get_lines()) == 2
    fig = th.convergence_figure({k: th.convergence(v.kernel(x).ntk, y)
                                 for k, v in nets.items()}, [0.1, 1.0, 10.0])
    assert len(fig.axes[0].get_lines()) == 2 and "condition" in fig.axes[0].get_legend(
    ).get_texts()[0].get_text()

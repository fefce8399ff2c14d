"""The empirical NTK of networks drawn by ``net.build`` approaches ``net.kernel`` as width grows.

Witness: for each width ``W`` of a sweep, ``n_samples`` networks drawn by ``net.build``
(float64, one seeded generator per width and sample) give their empirical NTK by
``nk.empirical_ntk`` (one output, so ``output="trace"`` is the NTK), and the empirical NNGP
of their penultimate features ``phi`` (what the readout ``Linear(1, w_std, b_std)`` sees),
``w_std^2 phi phi^T / W + b_std^2``. Their relative deviation from the analytic kernel,

    d(W) = sqrt(mean over networks of ||K_W - K||_F^2 / ||K||_F^2),

falls like ``W^-1/2``: the empirical kernels are sums of ``W`` weakly dependent terms, so
they fluctuate by O(W^-1/2) around a mean whose bias is O(1/W) (zero with one hidden layer:
the hidden units are then i.i.d. given the input). Criteria, on ``log d`` against ``log W``:

* the deviation falls: ``d(W_max) / d(W_min) <= DECREASE_MARGIN * sqrt(W_min / W_max)``;
* the least-squares slope lies in ``SLOPE +- SLOPE_TOL`` = [-0.7, -0.3].

Measured over 100 base seeds (``SEED`` = 0, ..., 99), slope mean +- sd [min, max]:

    network    NTK                              NNGP
    mlp-relu   -0.510 +- 0.060 [-0.662, -0.356]  -0.506 +- 0.052 [-0.642, -0.374]
    mlp-erf    -0.502 +- 0.046 [-0.618, -0.384]  -0.505 +- 0.031 [-0.589, -0.437]
    cnn-gap    -0.500 +- 0.022 [-0.546, -0.444]  -0.500 +- 0.022 [-0.547, -0.444]

so the window is -1/2 +- 3.3 sd of the noisiest case (no seed failed any check).
``d(W_max) / d(W_min)`` was 0.25 +- 0.04 (at most 0.39) for the MLPs, whose bound is 0.5,
and 0.064 +- 0.009 (at most 0.088) for the CNN, bound 0.125.

A wrong kernel makes ``d`` plateau at its own error, which flattens the slope
(``test_wrong_kernel_plateaus``). Against 1.25 x the NTK the slopes were -0.17 +- 0.04
(relu), -0.13 +- 0.03 (erf), -0.04 +- 0.01 (cnn), at most -0.06; against the NTK of the
same network with ``w_std = 1.6`` instead of 1.5, -0.07, -0.12, -0.03, at most +0.01. The
check resolves kernel errors of about 20% or more over these widths: 1.1 x the NTK still
gave about -0.37 (relu) and -0.31 (erf), inside the window. Smaller errors are for the
reference values (test_reference.py) and the Monte Carlo means (test_monte_carlo.py,
test_conv.py) to catch.

Cost: ~0.13 s per network at width 1024 (two hidden layers, 1.1 M parameters, six inputs);
the MLP sweeps stop there, the single-convolution CNN (82 k parameters at width 4096) goes
to 4096 with more samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import one_thread

import ntkit as nk

F64 = torch.float64
#: Base seed of the network draws (the measurements above used 0, 1, ..., 99).
SEED = 0
W_STD, B_STD = 1.5, 0.1
SLOPE, SLOPE_TOL = -0.5, 0.2
#: ``d(W_max) / d(W_min)`` may exceed its expected ``sqrt(W_min / W_max)`` by this factor.
DECREASE_MARGIN = 2.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the networks are small, and thread start-up dominates."""
    with one_thread():
        yield


def _x(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def mlp(width: int, act: Callable[[], nk.Layer], w_std: float = W_STD) -> nk.Sequential:
    """Two hidden layers of ``width`` units and a scalar readout."""
    return nk.Sequential(
        nk.Linear(width, w_std=w_std, b_std=B_STD), act(),
        nk.Linear(width, w_std=w_std, b_std=B_STD), act(),
        nk.Linear(1, w_std=w_std, b_std=B_STD),
    )


def cnn(width: int, w_std: float = W_STD) -> nk.Sequential:
    """One 3 x 3 'same' convolution of ``width`` channels, ReLU, global average pooling and
    a scalar readout."""
    return nk.Sequential(
        nk.Conv2d(width, 3, padding="same", w_std=w_std, b_std=B_STD), nk.ReLU(),
        nk.GlobalAvgPool(), nk.Flatten(), nk.Linear(1, w_std=w_std, b_std=B_STD),
    )


@dataclass(frozen=True)
class Case:
    """An architecture (``net(width, w_std)``), its inputs and its width sweep."""

    net: Callable[[int, float], nk.Sequential]
    x: torch.Tensor
    widths: tuple[int, ...]
    n_samples: int


CASES = {
    "mlp-relu": Case(lambda w, s=W_STD: mlp(w, nk.ReLU, s), _x(6, 5, seed=1),
                     (64, 128, 256, 512, 1024), 16),
    "mlp-erf": Case(lambda w, s=W_STD: mlp(w, nk.Erf, s), _x(6, 5, seed=1),
                    (64, 128, 256, 512, 1024), 16),
    "cnn-gap": Case(cnn, _x(4, 2, 6, 6, seed=2), (16, 64, 256, 1024, 4096), 32),
}


@dataclass(frozen=True)
class Sweep:
    """Empirical kernels per width, each ``(n_samples, N, N)``."""

    widths: tuple[int, ...]
    ntk: tuple[torch.Tensor, ...]
    nngp: tuple[torch.Tensor, ...]


def sweep(case: Case, seed: int) -> Sweep:
    """Empirical NTKs and penultimate-feature NNGPs of networks drawn by ``build``."""
    ntks, nngps = [], []
    for width in case.widths:
        ntk, nngp = [], []
        for sample in range(case.n_samples):
            generator = torch.Generator().manual_seed(seed * 10**7 + width * 100 + sample)
            model = case.net(width).build(case.x.shape[1:], generator=generator, dtype=F64)
            ntk.append(nk.empirical_ntk(model, case.x))
            with torch.no_grad():
                phi = model[:-1](case.x)
            nngp.append(W_STD**2 * phi @ phi.T / phi.shape[1] + B_STD**2)
        ntks.append(torch.stack(ntk))
        nngps.append(torch.stack(nngp))
    return Sweep(case.widths, tuple(ntks), tuple(nngps))


@pytest.fixture(scope="module")
def sweeps() -> Callable[[str], Sweep]:
    """``sweeps(case name)``: each case's sweep, drawn once per module."""
    cache: dict[str, Sweep] = {}

    def get(name: str) -> Sweep:
        if name not in cache:
            cache[name] = sweep(CASES[name], SEED)
        return cache[name]

    return get


def rms_deviation(samples: tuple[torch.Tensor, ...], want: torch.Tensor) -> np.ndarray:
    """Per width, the root-mean-square over samples of ``||K_W - want||_F / ||want||_F``."""
    scale = torch.linalg.norm(want)
    return np.array([
        float(((torch.linalg.norm(s - want, dim=(1, 2)) / scale) ** 2).mean().sqrt())
        for s in samples
    ])


def fitted_slope(widths: tuple[int, ...], deviation: np.ndarray) -> float:
    """Least-squares slope of ``log deviation`` against ``log width``."""
    return float(np.polyfit(np.log(widths), np.log(deviation), 1)[0])


def scaling_problems(widths: tuple[int, ...], deviation: np.ndarray) -> list[str]:
    """What contradicts ``deviation ~ width^-1/2``: an empty list when nothing does."""
    problems = []
    table = ", ".join(f"W={w}: {d:.4f}" for w, d in zip(widths, deviation))
    bound = DECREASE_MARGIN * (widths[0] / widths[-1]) ** 0.5
    ratio = deviation[-1] / deviation[0]
    if not ratio <= bound:
        problems.append(f"d(W_max) / d(W_min) = {ratio:.3f} > {bound:.3f} ({table})")
    slope = fitted_slope(widths, deviation)
    if not abs(slope - SLOPE) <= SLOPE_TOL:
        problems.append(f"slope {slope:+.3f} outside [{SLOPE - SLOPE_TOL}, {SLOPE + SLOPE_TOL}] "
                        f"({table})")
    return problems


@pytest.mark.parametrize("name", CASES)
def test_empirical_ntk_approaches_kernel(sweeps, name):
    """``nk.empirical_ntk`` of built networks -> ``net.kernel(x).ntk`` like width^-1/2."""
    case, s = CASES[name], sweeps(name)
    want = case.net(1).kernel(case.x).ntk
    problems = scaling_problems(s.widths, rms_deviation(s.ntk, want))
    assert not problems, problems


@pytest.mark.parametrize("name", CASES)
def test_penultimate_nngp_approaches_kernel(sweeps, name):
    """The readout's input Gram ``w_std^2 phi phi^T / W + b_std^2`` of built networks ->
    ``net.kernel(x).nngp`` like width^-1/2."""
    case, s = CASES[name], sweeps(name)
    want = case.net(1).kernel(case.x).nngp
    problems = scaling_problems(s.widths, rms_deviation(s.nngp, want))
    assert not problems, problems


WRONG_KERNELS = {
    "ntk-times-1.25": lambda case: 1.25 * case.net(1).kernel(case.x).ntk,
    "w_std-1.6": lambda case: case.net(1, 1.6).kernel(case.x).ntk,
}


@pytest.mark.parametrize("wrong", WRONG_KERNELS)
@pytest.mark.parametrize("name", CASES)
def test_wrong_kernel_plateaus(sweeps, name, wrong):
    """Negative control: against a kernel off by 25-50%, the deviation stops falling at the
    kernel's own error and the slope check fails."""
    case, s = CASES[name], sweeps(name)
    right = case.net(1).kernel(case.x).ntk
    want = WRONG_KERNELS[wrong](case)
    error = float(torch.linalg.norm(want - right) / torch.linalg.norm(want))
    assert error >= 0.18, f"the control kernel is only {error:.3f} off"
    deviation = rms_deviation(s.ntk, want)
    # at the widest width it stays at about the kernel's error (measured 0.88-1.0 times it
    # over 10 seeds; the sample mean of 16 networks can lean towards the wrong kernel)
    assert deviation[-1] >= 0.5 * error, (deviation, error)
    slope = fitted_slope(s.widths, deviation)
    assert slope > SLOPE + SLOPE_TOL, f"slope {slope:+.3f} passes against a wrong kernel"
    assert scaling_problems(s.widths, deviation)

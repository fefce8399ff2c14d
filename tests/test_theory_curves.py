"""Learning curves against experiment for n up to near the pool size (issue 19).

`learning_curve` predicts kernel regression on ``n`` points drawn without replacement
from a pool of ``P``, tested on the whole pool: the finite-pool equations of
``ntkit.theory._eigenlearning`` (free-probability deterministic equivalents for a 0/1
row selection). Witnesses: the mean test MSE of actual kernel ridge regression over
many random training sets (`measure_learning_curve`, itself checked against a plain loop
in tests/test_theory.py), and, on the sphere, kernel regression on fresh i.i.d. points
tested on fresh points, against the exact spectrum by degree.

Criterion everywhere: ``|experiment / prediction - 1| <= 5% + 3 standard errors``.

What was measured, and what is asserted:

- Generic eigenvectors (the digits pool's spectrum and target coefficients, put on
  Haar-random eigenvectors): within 1.3% at every n up to 1500 of P = 1797 (700 of
  P = 800), ridgeless, ridged and noisy. The i.i.d. equations are off by up to +117%
  (ridge 0.1) and +330% (noise 0.05) at n = 700 of 800: the check rejects them.
- The digits pool itself (P = 1797): with noise 0.05 and ridge 0.1 within 0.8% at every
  n; without noise the experiment is above the prediction by 2%, 4%, 6%, 11%, 20% at
  n = 20, 100, 200, 500, 1000 (ridgeless; ridge 0.1: 1%, 4%, 6%, 9%, 14%). The gap is the
  eigenvectors' (generic ones remove it), and the tests assert it within windows around
  the measured values at n = 500 and 1000, so a change is noticed either way.
- The sphere in d = 10 (2-hidden-layer ReLU NTK, target of degree-1 to -3 harmonics):
  the pool's curve within 4% at n = 20 to 1000 of P = 2000; fresh i.i.d. points against
  the exact spectrum within 2.5%. A spectrum scaled by 1/20 (ridged) or squared
  (ridgeless) is rejected.
"""

from __future__ import annotations

import pytest
import torch
from test_theory import _harmonic_target  # tests/ is on sys.path (conftest)

import ntkit as nk
from ntkit import theory as th

F64 = torch.float64
W_STD, B_STD = 1.5, 0.1
#: The relative tolerance of the criterion, before the 3 standard errors.
TOL = 0.05


def _net(depth: int = 1) -> nk.Sequential:
    layers: list[nk.Layer] = []
    for _ in range(depth):
        layers += [nk.Linear(512, w_std=W_STD, b_std=B_STD), nk.ReLU()]
    return nk.Sequential(*layers, nk.Linear(1, w_std=W_STD, b_std=B_STD))


def _gap(predicted: torch.Tensor, measured: torch.Tensor, sem: torch.Tensor,
         tol: float = TOL) -> tuple[bool, list[float]]:
    """Whether ``|measured / predicted - 1| <= tol + 3 sem / predicted`` at every size,
    and the relative gaps."""
    rel = measured / predicted - 1
    return bool((rel.abs() <= tol + 3 * sem / predicted).all()), [round(v, 4)
                                                                   for v in rel.tolist()]


def _digits(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, P)`` 1-hidden-layer ReLU NTK of ``p`` digits (a seeded subset) and one-hot
    centred targets ``(P, 10)``."""
    x, lab = nk.datasets.load_digits()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:p]
    y = torch.nn.functional.one_hot(lab[idx], 10).to(F64)
    return _net().kernel(x[idx].to(F64)).ntk, y - y.mean(0)


def _generic(k: torch.Tensor, y: torch.Tensor, seed: int):
    """The same eigenvalues and target coefficients on Haar-random eigenvectors:
    ``O diag(eig K) O^T`` and ``O U^T y``."""
    w, u = torch.linalg.eigh(k)
    q, r = torch.linalg.qr(torch.randn(k.shape, generator=torch.Generator().manual_seed(seed),
                                       dtype=F64))
    o = q * torch.sign(torch.diagonal(r))                      # Haar (Mezzadri 2007)
    kh = (o * w) @ o.T
    return 0.5 * (kh + kh.T), o @ (u.T @ y)


@pytest.fixture(scope="module")
def digits_800():
    return _digits(800)


@pytest.fixture(scope="module")
def digits_all():
    k, y = _digits(1797)
    return {"generic": _generic(k, y, seed=3), "digits": (k, y)}


SETTINGS = [(0.0, 0.0), (0.1, 0.0), (0.1, 0.05)]
SETTING_IDS = ["ridgeless", "ridge", "ridge-noise"]


def test_finite_pool_equations_written_out(digits_800):
    """`learning_curve`'s numbers are the finite-pool equations (written out here from a
    plain eigendecomposition), and ridgeless without noise they equal the i.i.d. ones."""
    k, y = digits_800
    p = k.shape[0]
    ridge, noise, sizes = 0.2, 0.1, [10, 100, 400, 700]
    c = th.learning_curve(k, y, sizes, ridge=ridge, noise=noise)
    w, u = torch.linalg.eigh(k)
    lam = (w / p).clamp_min(0).numpy()
    v2 = ((u.T @ y) ** 2).sum(1).numpy() / p
    s2 = 10 * noise                                            # noise summed over outputs
    for i, n in enumerate(sizes):
        kappa = float(c.kappa[i])
        big_l = lam / (lam + kappa)
        d1, d2 = big_l.sum(), (big_l ** 2).sum()
        assert ridge * (1 - d1 / p) / kappa == pytest.approx(n - d1, rel=1e-8)
        q = (n - d1) * (d2 - d1 ** 2 / p) + n * (d1 - d2) * (1 - d1 / p)
        e0 = n * d1 * ((n - d1) ** 2 / (n * p) + 1 - n / p) / q
        assert float(c.e0[i]) == pytest.approx(e0, rel=1e-9)
        test = e0 * ((1 - big_l) ** 2 * v2).sum() + s2 * (1 + d1 * d2 * (1 - d1 / p) ** 2 / q)
        assert float(c.test_mse[i]) == pytest.approx(test, rel=1e-9)
        slope = (1 - d1 / p) / (n - d2 - ridge * (d1 - d2) / (p * kappa))
        train = (ridge ** 2 * slope * (v2 / (lam + kappa) ** 2).sum()
                 + s2 * (n - d1 - ridge * (d1 - d2) * slope / kappa)) / n
        assert float(c.train_mse[i]) == pytest.approx(train, rel=1e-9)
    pool = th.learning_curve(k, y, sizes)
    iid = th.eigenlearning(th.pool_spectrum(k, y), sizes)
    torch.testing.assert_close(pool.test_mse, iid.test_mse, rtol=1e-7, atol=0)
    spec = th.pool_spectrum(k, y)
    with pytest.raises(ValueError, match="pool_size = 801 needs the spectrum of a pool"):
        th.eigenlearning(spec, sizes, pool_size=p + 1)
    for bad in (True, 800.0, 1):
        with pytest.raises(ValueError, match="pool_size must be an integer"):
            th.eigenlearning(spec, sizes, pool_size=bad)
    with pytest.raises(ValueError, match="below the pool size P = 800"):
        th.eigenlearning(spec, [800], pool_size=p)


@pytest.mark.parametrize(("ridge", "noise"), SETTINGS, ids=SETTING_IDS)
def test_finite_pool_curve_matches_kernel_regression_up_to_the_pool_size(digits_800, ridge,
                                                                         noise):
    """Generic eigenvectors, P = 800, n up to 700: the finite-pool prediction is within
    5% (measured within 1.3%, train within 4%); the i.i.d. equations are rejected at
    n = 400 and 700 where a ridge or noise makes them differ (measured at n = 700: +117%
    with ridge 0.1, +6% with ridge 0.1 and noise 0.05, 7% at n = 400; standard errors
    0.1-0.5%)."""
    k, y = _generic(*digits_800, seed=1)
    sizes = [20, 100, 400, 700]
    measured = th.measure_learning_curve(k, y, sizes, ridge=ridge, noise=noise, trials=40,
                                         generator=torch.Generator().manual_seed(2))
    curve = th.learning_curve(k, y, sizes, ridge=ridge, noise=noise)
    ok, rel = _gap(curve.test_mse, measured.test_mse, measured.test_mse_sem)
    assert ok, f"finite-pool prediction vs experiment, relative gaps {rel}"
    if ridge > 0:
        torch.testing.assert_close(curve.train_mse, measured.train_mse, rtol=0.08, atol=0)
    if ridge > 0 or noise > 0:
        iid = th.eigenlearning(th.pool_spectrum(k, y), sizes, ridge=ridge, noise=noise)
        ok, rel = _gap(iid.test_mse, measured.test_mse, measured.test_mse_sem)
        assert not ok, f"the i.i.d. equations passed at n near P: gaps {rel}"


#: Digits (P = 1797), no noise: where the measured gap ``experiment / prediction - 1``
#: lies at n = 500 and 1000 (measured +11.2% and +19.9% ridgeless, +9.3% and +13.8% with
#: ridge 0.1, standard errors 0.8-0.9%).
DIGITS_GAP_WINDOWS = {0.0: [(0.05, 0.15), (0.12, 0.30)], 0.1: [(0.04, 0.15), (0.08, 0.24)]}


@pytest.mark.slow
@pytest.mark.parametrize(("ridge", "noise"), SETTINGS, ids=SETTING_IDS)
def test_learning_curve_on_all_digits_up_to_n_1000(digits_all, ridge, noise):
    """All 1797 digits, n = 20 to 1000 (about 15 s). Generic eigenvectors: within 5% at
    every n. The digits: with noise within 5% at every n; without noise within 5% for
    n <= 200 and, at n = 500 and 1000, a gap inside ``DIGITS_GAP_WINDOWS`` (the
    experiment above the prediction: the pool's eigenvectors are not generic)."""
    sizes = [20, 100, 200, 500, 1000]
    for name, (kk, yy) in digits_all.items():
        measured = th.measure_learning_curve(kk, yy, sizes, ridge=ridge, noise=noise,
                                             trials=40,
                                             generator=torch.Generator().manual_seed(4))
        curve = th.learning_curve(kk, yy, sizes, ridge=ridge, noise=noise)
        if name == "generic" or noise > 0:
            ok, rel = _gap(curve.test_mse, measured.test_mse, measured.test_mse_sem)
            assert ok, f"{name}: relative gaps {rel}"
            continue
        ok, rel = _gap(curve.test_mse[:3], measured.test_mse[:3], measured.test_mse_sem[:3])
        assert ok, f"digits, n <= 200: relative gaps {rel}"
        gaps = (measured.test_mse[3:] / curve.test_mse[3:] - 1).tolist()
        for size, gap, (low, high) in zip(sizes[3:], gaps, DIGITS_GAP_WINDOWS[ridge]):
            assert low <= gap <= high, f"digits, n = {size}: gap {gap:+.3f}, documented " \
                                       f"[{low:+.2f}, {high:+.2f}]"


# -- the sphere, d = 10 ------------------------------------------------------------------

SPHERE_D = 10
SPHERE_SIZES = [20, 60, 200, 600, 1000]


def _sphere_points(p: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(p, SPHERE_D, generator=gen, dtype=F64)
    return x / x.norm(dim=1, keepdim=True) * SPHERE_D ** 0.5


@pytest.fixture(scope="module")
def sphere_2000():
    gen = torch.Generator().manual_seed(0)
    x = _sphere_points(2000, gen)
    y, _ = _harmonic_target(x)
    return _net(depth=2).kernel(x).ntk, y


@pytest.mark.parametrize("ridge", [0.0, 0.05], ids=["ridgeless", "ridge"])
def test_learning_curve_matches_kernel_regression_on_the_sphere_up_to_n_1000(sphere_2000,
                                                                             ridge):
    """A pool of 2000 points of the sphere in d = 10, n = 20 to 1000: the pool's curve
    is within 5% (measured within 4%, standard errors about 2%); a spectrum scaled by
    1/20 (with the ridge) or squared (ridgeless) is rejected."""
    k, y = sphere_2000
    measured = th.measure_learning_curve(k, y, SPHERE_SIZES, ridge=ridge, trials=40,
                                         generator=torch.Generator().manual_seed(5))
    curve = th.learning_curve(k, y, SPHERE_SIZES, ridge=ridge)
    ok, rel = _gap(curve.test_mse, measured.test_mse, measured.test_mse_sem)
    assert ok, f"pool spectrum vs experiment, relative gaps {rel}"
    spec = curve.spectrum
    lam = spec.eigenvalues / 20 if ridge > 0 else spec.eigenvalues ** 2
    wrong = th.eigenlearning(th.Spectrum(lam, spec.multiplicity, spec.target_power),
                             SPHERE_SIZES, ridge=ridge, pool_size=k.shape[0])
    ok, rel = _gap(wrong.test_mse, measured.test_mse, measured.test_mse_sem)
    assert not ok, f"a wrong spectrum passed: gaps {rel}"


@pytest.mark.slow
@pytest.mark.parametrize("ridge", [0.0, 0.05], ids=["ridgeless", "ridge"])
def test_exact_sphere_spectrum_predicts_regression_on_fresh_points(ridge):
    """The theory's own setting: n fresh i.i.d. points of the sphere in d = 10, tested on
    2000 fresh points; the exact spectrum by degree (`sphere_spectrum`, i.i.d. equations)
    within 5% at n = 20 to 1000 (measured within 2.5%; about 15 s)."""
    net = _net(depth=2)
    gen = torch.Generator().manual_seed(6)
    x_test = _sphere_points(2000, gen)
    y_test, power = _harmonic_target(x_test)
    trials = 40
    errors = torch.empty(len(SPHERE_SIZES), trials, dtype=F64)
    for i, n in enumerate(SPHERE_SIZES):
        for t in range(trials):
            x = _sphere_points(n, gen)
            y, _ = _harmonic_target(x)
            alpha = torch.linalg.solve(net.kernel(x).ntk + ridge * torch.eye(n, dtype=F64), y)
            errors[i, t] = ((net.kernel(x_test, x).ntk @ alpha - y_test) ** 2).mean()
    exact = th.eigenlearning(th.sphere_spectrum(net, SPHERE_D, 20).spectrum(power),
                             SPHERE_SIZES, ridge=ridge)
    ok, rel = _gap(exact.test_mse, errors.mean(1), errors.std(1) / trials ** 0.5)
    assert ok, f"exact spectrum vs fresh-point regression, relative gaps {rel}"

"""Learning curves of kernel ridge regression from the kernel's spectrum: the
omniscient-risk / eigenlearning equations, and the experiment they predict.

Simon, Dickens, Karkada & DeWeese (2023), "The eigenlearning framework: a conservation
law perspective on kernel ridge regression and wide neural networks" (TMLR), eqs. (4)-(9);
the same equations as Bordelon, Canatar & Pehlevan (2020) and Canatar, Bordelon &
Pehlevan (2021, Nat. Commun.). For the kernel operator's eigenvalues ``lambda_i`` (with
respect to the data distribution) and the target's coefficients ``v_i``, ``n`` samples
and ridge ``delta``:

    kappa:          sum_i lambda_i / (lambda_i + kappa) + delta / kappa = n
    learnability:   L_i = lambda_i / (lambda_i + kappa)
    overfitting:    E0 = n / (n - sum_i L_i^2)
    test MSE:       E0 (sum_i (1 - L_i)^2 v_i^2 + noise)
    train MSE:      (delta / (n kappa))^2 test MSE

These are the equations for ``n`` independent draws from a distribution and a fresh test
point (`eigenlearning` with ``pool_size=None``; ``noise`` is the variance of Gaussian noise
on each training target, and the test MSE is against targets with fresh noise of the same
variance: subtract ``noise * O`` for the clean target's error, `LearningCurve.test_mse_clean`;
with vector targets ``(P, O)`` the squared errors are summed over outputs).

Finite pools. `learning_curve` answers another question: the pool of ``P`` points *is* the
distribution (its empirical measure, `ntkit.theory.pool_spectrum`, so ``delta`` is the
absolute ridge added to the ``(n, n)`` train kernel), training sets are ``n`` pool points
drawn without replacement, and the test MSE is the mean over the whole pool. In feature
space the pool's features are ``sqrt(P) U Lambda^1/2`` (``K_pool = P U Lambda U^T``), and a
training set selects ``n`` rows: ``Phi^T D Phi = Lambda^1/2 (P U^T D U) Lambda^1/2`` with
``D`` a random 0/1 diagonal. Where ``U`` is generic (asymptotically free of ``D``), the
resolvent has the free-probability deterministic equivalent ``delta (Lambda^1/2 A
Lambda^1/2 + delta)^-1 ~ kappa (Lambda + kappa)^-1`` with ``kappa = delta S_A(-D1 / P)``
(Voiculescu's S-transform; this is the form of LeJeune, Patil, Javadi, Baraniuk &
Tibshirani 2024, "Asymptotics of the sketched pseudoinverse", SIAM J. Math. Data Sci.,
and Patil & LeJeune 2024, "Asymptotically free sketched ridge ensembles", ICLR, Section 3).
For the Marchenko-Pastur law of i.i.d. Gaussian rows it gives the equations above; for
``A = P U^T D U``, whose law has mass ``n / P`` at ``P`` and the rest at 0, it gives
(derived here; ``D1 = sum_i L_i``, ``D2 = sum_i L_i^2``, multiplicities counted, and they
sum to ``P``)

    kappa:          delta (1 - D1 / P) / kappa = n - D1
    bias factor:    E0_P = n D1 ((n - D1)^2 / (n P) + 1 - n / P) / Q,
                    Q = (n - D1) (D2 - D1^2 / P) + n (D1 - D2) (1 - D1 / P)
    test MSE:       E0_P sum_i (1 - L_i)^2 v_i^2 + noise (1 + D1 D2 (1 - D1 / P)^2 / Q)
    train MSE:      (delta^2 kappa' sum_i v_i^2 / (lambda_i + kappa)^2
                     + noise (n - D1 - delta (D1 - D2) kappa' / kappa)) / n,
                    kappa' = d kappa / d delta = (1 - D1/P) / (n - D2 - delta (D1 - D2) / (P kappa))

(the second-order terms are ``-d/d s`` of the first-order equivalent with ``A + s``, and
``-d/d delta``). As ``P -> infinity`` they become the equations above. Ridgeless they
coincide with them (``kappa`` solves ``D1 = n`` and ``E0_P = n / (n - D2)``); with a ridge
or noise the i.i.d. equations are off by ``O(n / P)``: on 800 digits' spectrum (generic
eigenvectors) at ``n = 700`` their test MSE is +117% off with ridge 0.1 and +330% with
noise 0.05, where these are within 1.3%. Drawing with replacement (i.i.d. from the pool's
empirical measure) does not match the i.i.d. equations either: their Gaussian-like
features never repeat, a pool's points do (1797 digits, ridgeless, n = 1000: that
experiment is 81% above the prediction, against 20% without replacement).

How close it is (tests/test_theory_curves.py; relative gaps, means of 40 random training
sets):

- The spectrum and target coefficients of the digits pool put on Haar-random
  eigenvectors, ``P = 1797`` (or 800), ridgeless, ridge 0.1, ridge 0.1 with noise 0.05:
  within 1.3% at every n from 20 to 1500 (standard errors 0.1-1%). The equations are
  right where their assumption (a generic ``U``) holds, up to ``n`` near ``P``.
- The digits themselves (``P = 1797``, one-hot centred targets, 1-hidden-layer ReLU NTK):
  with noise 0.05 and ridge 0.1 within 0.8% at n = 20 to 1000 (train MSE within 12%).
  Without noise the bias term is off, the experiment above the prediction by 2%, 4%,
  6%, 11%, 20% at n = 20, 100, 200, 500, 1000 ridgeless (ridge 0.1: 1%, 4%, 6%, 9%, 14%;
  standard errors about 1%). The cause is the pool's eigenvectors, not the sampling nor
  the finite pool: the same spectrum and coefficients on generic eigenvectors agree
  within 0.6%. So issue 19's 5% holds on digits with noise at every n, and without
  noise up to about n = 200 (5% + 3 standard errors).
- Uniform inputs on the sphere with a target of degree-1 to -3 harmonics, 2-hidden-layer
  ReLU NTK, fresh i.i.d. training and test points, the exact spectrum by degree
  (`sphere_spectrum`): d = 10 within 2.5% at n = 20 to 1000 (standard errors about 2%),
  ridgeless and ridge 0.05; d = 5: -7% to -20% (the low-dimensional sphere, where
  Gaussian universality of the harmonics is poor). A pool of 2000 such points in
  d = 10 (`learning_curve`): within 4% at n = 20 to 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._spectrum import (
    Spectrum,
    _pool_spectrum,
    _square_kernel,
    _targets,
    check_nonnegative,
    check_sizes,
)

__all__ = ["LearningCurve", "MeasuredCurve", "eigenlearning", "learning_curve",
           "measure_learning_curve"]


@dataclass(frozen=True)
class LearningCurve:
    """Predicted errors of kernel ridge regression at each training size.

    Attributes:
        n: ``(S,)`` the training sizes.
        test_mse: ``(S,)`` expected test MSE (targets with noise, summed over outputs).
        train_mse: ``(S,)`` expected train MSE.
        kappa: ``(S,)`` the effective regularisation.
        e0: ``(S,)`` the overfitting factor ``n / (n - sum L_i^2)`` (finite pool: the
            bias factor ``E0_P`` of the module docstring).
        learnability: ``(S, M)`` ``L_i`` of each listed mode at each size.
        spectrum: the `Spectrum` the curve came from.
        ridge, noise: as given.
    """

    n: Tensor
    test_mse: Tensor
    train_mse: Tensor
    kappa: Tensor
    e0: Tensor
    learnability: Tensor
    spectrum: Spectrum
    ridge: float
    noise: float

    @property
    def eigenvalues(self) -> Tensor:
        """``(M,)`` the operator's eigenvalues (of ``K_pool / P``)."""
        return self.spectrum.eigenvalues

    @property
    def test_mse_clean(self) -> Tensor:
        """``(S,)`` expected MSE against the noise-free targets."""
        return self.test_mse - self.noise * self.spectrum.outputs


def _solve_kappa(lam: np.ndarray, mult: np.ndarray, n: np.ndarray, delta: float,
                 pool: int | None = None) -> np.ndarray:
    """``kappa`` of each ``n`` from the eigenlearning equation, by bisection in ``log
    kappa`` (the left side falls strictly in ``kappa``), vectorised over the sizes.

    Without a pool: ``sum_i L_i + delta / kappa = n``. With a pool of ``P`` points drawn
    without replacement: ``sum_i L_i + (delta / P) sum_i 1 / (lambda_i + kappa) = n``,
    which is ``delta (1 - D1 / P) / kappa = n - D1`` (``D1 = sum_i L_i``) when the
    multiplicities sum to ``P`` (module docstring)."""
    if pool is None:
        def excess(k):                                # k: (S,)
            return (mult * lam / (lam + k[:, None])).sum(1) + delta / k - n
    else:
        def excess(k):
            return (mult * (lam + delta / pool) / (lam + k[:, None])).sum(1) - n

    hi = np.full(n.shape, (float((mult * lam).sum()) + delta) / n.min() + 1e-300)
    hi = np.maximum(hi, (float((mult * lam).sum()) + delta) / n)
    positive = lam[lam > 0]
    lo = np.full(n.shape, (delta / n.max()) if delta > 0 else float(positive.min()) * 1e-6)
    for _ in range(60):
        bad = excess(lo) <= 0
        if not bad.any():
            break
        lo = np.where(bad, lo * 1e-3, lo)
    if (excess(lo) <= 0).any():
        modes = float(mult[lam > 0].sum())
        worst = float(n[excess(lo) <= 0].min())
        raise ValueError(
            f"no effective regularisation solves the eigenlearning equation at n = {worst:g}: "
            f"ridgeless kernel regression needs n below the number of modes with a positive "
            f"eigenvalue ({modes:g}). Give ridge > 0, or a larger pool (more landmarks).")
    llo, lhi = np.log(lo), np.log(hi)
    for _ in range(200):
        mid = 0.5 * (llo + lhi)
        pos = excess(np.exp(mid)) > 0
        llo, lhi = np.where(pos, mid, llo), np.where(pos, lhi, mid)
        if np.all(lhi - llo < 1e-15):
            break
    return np.exp(0.5 * (llo + lhi))


def eigenlearning(spectrum: Spectrum, n, *, ridge: float = 0.0, noise: float = 0.0,
                  pool_size: int | None = None) -> LearningCurve:
    """The eigenlearning prediction for a given spectrum (see the module docstring).

    Modes outside the spectrum's list (its ``tail_trace``) enter ``kappa``'s equation as
    an added ridge; their target power (``residual_power``) is never learned.

    Args:
        spectrum: eigenvalues, multiplicities and target power (`pool_spectrum`,
            `nystrom_spectrum`, `SphereSpectrum.spectrum`).
        n: training sizes, a sequence of positive integers.
        ridge: ``delta >= 0``, the absolute ridge on the ``(n, n)`` train kernel.
        noise: variance ``>= 0`` of the noise on each training target.
        pool_size: ``None`` (default): training sets are ``n`` independent draws from the
            distribution the spectrum describes, and the test error is on fresh points
            (Simon et al. 2023, eqs. (4)-(9)). ``P``: the spectrum is that of a pool of
            ``P`` points (`pool_spectrum`, whose ``P`` multiplicities sum to ``P``),
            training sets are ``n < P`` of its points drawn without replacement and the
            test error is the mean over the whole pool: the finite-pool equations of
            the module docstring, which differ from the former by ``O(n / P)`` with a
            ridge or noise and coincide ridgeless without noise.

    Returns:
        A `LearningCurve`. With ``pool_size``, ``e0`` is the factor of the bias term
        (``E0_P`` of the module docstring).
    """
    if not isinstance(spectrum, Spectrum):
        raise TypeError(f"spectrum must be a ntkit.theory.Spectrum, got "
                        f"{type(spectrum).__name__}; build one with pool_spectrum.")
    sizes = check_sizes(n)
    ridge = check_nonnegative(ridge, "ridge")
    noise = check_nonnegative(noise, "noise")
    lam = spectrum.eigenvalues.detach().to(torch.float64).cpu().numpy()
    mult = spectrum.multiplicity.detach().to(torch.float64).cpu().numpy()
    power = spectrum.target_power.detach().to(torch.float64).cpu().numpy()
    if not (lam > 0).any():
        raise ValueError("the spectrum has no positive eigenvalue; the kernel is zero on the "
                         "pool.")
    if pool_size is not None:
        _check_pool_size(pool_size, mult, sizes)
    nn = sizes.numpy()
    delta = ridge + float(spectrum.tail_trace)
    kappa = _solve_kappa(lam, mult, nn, delta, pool_size)
    learn = lam / (lam + kappa[:, None])                          # (S, M)
    d1, d2 = (mult * learn).sum(1), (mult * learn ** 2).sum(1)
    bias_raw = ((1 - learn) ** 2 * power).sum(1) + float(spectrum.residual_power)
    noise_o = noise * spectrum.outputs
    if pool_size is None:
        e0 = nn / (nn - d2)
        test = e0 * (bias_raw + noise_o)
        train = (ridge / (nn * kappa)) ** 2 * test
    else:
        e0, test, train = _finite_pool(lam, mult, power, nn, kappa, d1, d2, delta, ridge,
                                       noise_o, bias_raw, float(pool_size))
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float64)
    return LearningCurve(n=sizes, test_mse=as_t(test), train_mse=as_t(train),
                         kappa=as_t(kappa), e0=as_t(e0), learnability=as_t(learn),
                         spectrum=spectrum, ridge=ridge, noise=noise)


def _check_pool_size(pool_size, mult: np.ndarray, sizes: Tensor) -> None:
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 2:
        raise ValueError(f"pool_size must be an integer >= 2 (the number of pool points), "
                         f"got {pool_size!r}.")
    if abs(float(mult.sum()) - pool_size) > 0.5:
        raise ValueError(f"pool_size = {pool_size} needs the spectrum of a pool of that many "
                         f"points (multiplicities summing to {pool_size}), got "
                         f"{float(mult.sum()):g} modes; use pool_spectrum on the (P, P) "
                         f"kernel, or pool_size=None for a spectrum of the distribution.")
    if float(sizes.max()) >= pool_size:
        raise ValueError(f"training sizes must be below the pool size P = {pool_size}, got "
                         f"n = {float(sizes.max()):g}.")


def _finite_pool(lam, mult, power, n, kappa, d1, d2, delta, ridge, noise_o, bias_raw, p):
    """``E0_P``, the test and the train MSE of the finite-pool equations (module
    docstring), each ``(S,)``."""
    gap = n - d1                                                   # = delta (1 - D1/P) / kappa
    keep = 1 - d1 / p
    denom = gap * (d2 - d1 ** 2 / p) + n * (d1 - d2) * keep
    e0 = n * d1 * (gap ** 2 / (n * p) + 1 - n / p) / denom
    test = e0 * bias_raw + noise_o * (1 + d1 * d2 * keep ** 2 / denom)
    # d kappa / d delta, and the train error from -d/d delta of the resolvent
    slope = keep / (n - d2 - delta * (d1 - d2) / (p * kappa))
    sq = (power / (lam + kappa[:, None]) ** 2).sum(1)             # sum v_i^2 / (l_i + k)^2
    train = ((ridge ** 2) * slope * sq
             + noise_o * (gap - ridge * (d1 - d2) * slope / kappa)) / n
    return e0, test, train


def learning_curve(k_pool: Tensor, y_pool: Tensor, n, *, ridge: float = 0.0,
                   noise: float = 0.0) -> LearningCurve:
    """Predicted learning curve of kernel ridge regression on a pool of inputs.

    The pool stands for the data distribution: training sets are ``n`` pool points drawn
    at random without replacement, and the test MSE is the mean over the whole pool
    (`measure_learning_curve` runs that experiment). The spectrum is that of
    ``K_pool / P`` (`pool_spectrum`); the prediction is `eigenlearning`'s with
    ``pool_size=P``, the finite-pool equations, valid up to ``n`` near ``P`` (module
    docstring: within 1.3% to n = 1500 of 1797 where the pool's eigenvectors are generic;
    on digits without noise the experiment is 2-6% above it up to n = 200 and 20% at
    n = 1000). One partial eigendecomposition of ``(P, P)`` (eigenvalues and ``U^T y``;
    P = 5000, 20 sizes: 16 s on one thread of the loaded 2-core machine, about 6 s quiet
    on two; benchmarks/theory_bench.py): for pools too large
    for it use `nystrom_spectrum` and `eigenlearning`.

    Args:
        k_pool: ``(P, P)`` kernel on the pool, e.g. ``net.kernel(x_pool).ntk``.
        y_pool: ``(P,)`` or ``(P, O)`` targets on the pool.
        n: training sizes, each below ``P``.
        ridge: the absolute ridge added to the ``(n, n)`` train kernel.
        noise: variance of Gaussian noise on each training target.

    Returns:
        A `LearningCurve`: ``test_mse``, ``train_mse``, ``kappa``, ``e0``,
        ``learnability`` ``(S, P)`` and ``eigenvalues`` ``(P,)``.

    Example::

        k = net.kernel(x_pool).ntk
        curve = learning_curve(k, y_pool, [20, 50, 100, 200], ridge=1e-3)
        curve.test_mse                                  # (4,)
    """
    k = _square_kernel(k_pool)
    sizes = check_sizes(n)
    if float(sizes.max()) >= k.shape[0]:
        raise ValueError(f"training sizes must be below the pool size P = {k.shape[0]}, got "
                         f"n = {float(sizes.max()):g}; the pool stands for the data "
                         f"distribution and should be several times the largest n.")
    return eigenlearning(_pool_spectrum(k, y_pool), sizes, ridge=ridge, noise=noise,
                         pool_size=k.shape[0])


@dataclass(frozen=True)
class MeasuredCurve:
    """Test and train MSE of kernel ridge regression on random training sets of a pool.

    Attributes:
        n: ``(S,)`` training sizes.
        test_mse, train_mse: ``(S,)`` means over the trials.
        test_mse_sem: ``(S,)`` the standard error of ``test_mse``'s mean.
        trials: training sets per size.
    """

    n: Tensor
    test_mse: Tensor
    train_mse: Tensor
    test_mse_sem: Tensor
    trials: int


def measure_learning_curve(k_pool: Tensor, y_pool: Tensor, n, *, ridge: float = 0.0,
                           noise: float = 0.0, trials: int = 20,
                           generator: torch.Generator | None = None) -> MeasuredCurve:
    """The experiment `learning_curve` predicts: kernel ridge regression on ``n`` pool
    points drawn without replacement, ``trials`` times per size.

    Each trial solves ``(K_nn + ridge I) a = y_n + eps`` (``eps`` Gaussian of variance
    ``noise``), predicts ``K_pn a`` on the pool, and records the mean over the pool of the
    squared error summed over outputs, plus ``noise * O`` (the expected error against
    targets with fresh noise, as `learning_curve` predicts), and the train MSE against
    the noisy training targets.

    Args:
        k_pool, y_pool, n, ridge, noise: as in `learning_curve`.
        trials: training sets per size.
        generator: draws the training sets and the noise.

    Returns:
        A `MeasuredCurve`.
    """
    k = _square_kernel(k_pool)
    p = k.shape[0]
    y = _targets(y_pool, p)
    sizes = check_sizes(n)
    ridge = check_nonnegative(ridge, "ridge")
    noise = check_nonnegative(noise, "noise")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}.")
    if float(sizes.max()) >= p:
        raise ValueError(f"training sizes must be below the pool size P = {p}, got "
                         f"{float(sizes.max()):g}.")
    test = torch.empty(len(sizes), trials, dtype=torch.float64)
    train = torch.empty(len(sizes), trials, dtype=torch.float64)
    for s, size in enumerate(sizes.tolist()):
        size = int(size)
        eye = torch.eye(size, dtype=torch.float64)
        batch = max(1, min(trials, int(2e7 // (size * max(size, p)))))   # ~160 MB a batch
        for start in range(0, trials, batch):
            count = min(batch, trials - start)
            idx = torch.stack([torch.randperm(p, generator=generator)[:size]
                               for _ in range(count)])                     # (B, n)
            yn = y[idx]                                                     # (B, n, O)
            if noise > 0:
                yn = yn + noise ** 0.5 * torch.randn(yn.shape, generator=generator,
                                                     dtype=torch.float64)
            kn = k[idx[:, :, None], idx[:, None, :]] + ridge * eye          # (B, n, n)
            a, info = torch.linalg.solve_ex(kn, yn)
            for b in torch.nonzero(info).reshape(-1).tolist():              # singular: min norm
                a[b] = torch.linalg.lstsq(kn[b], yn[b], driver="gelsd").solution
            pred = torch.einsum("bpn,bno->bpo", k[idx].transpose(1, 2), a)  # (B, P, O)
            test[s, start:start + count] = ((pred - y) ** 2).sum(2).mean(1) + noise * y.shape[1]
            fit = kn @ a - ridge * a
            train[s, start:start + count] = ((fit - yn) ** 2).sum(2).mean(1)
    sem = test.std(1) / trials ** 0.5 if trials > 1 else torch.full((len(sizes),), float("nan"))
    return MeasuredCurve(n=sizes, test_mse=test.mean(1), train_mse=train.mean(1),
                         test_mse_sem=sem, trials=trials)

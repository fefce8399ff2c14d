"""Figures of `ntkit.theory`: a learning curve (theory against experiment), spectra by
spherical-harmonic degree for several architectures, and convergence of the train loss.

The conventions of `ntkit.plot`: each function returns a `matplotlib.figure.Figure`
built without pyplot; matplotlib is imported when first used (``ntkit[plot]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..plot import _array, _colors, _figure

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ._convergence import Convergence
    from ._eigenlearning import LearningCurve, MeasuredCurve
    from ._sphere import SphereSpectrum

__all__ = ["convergence_figure", "learning_curve_figure", "sphere_spectrum_figure"]


def learning_curve_figure(curve: LearningCurve, measured: MeasuredCurve | None = None, *,
                          title: str | None = None) -> Figure:
    """Predicted test (and train) MSE against the training size, log-log, with the
    measured means and their standard errors when ``measured`` is given.

    Args:
        curve: a `LearningCurve`.
        measured: a `MeasuredCurve` at the same sizes, or None.
        title: the figure title.
    """
    n = _array(curve.n, "curve.n")
    fig = _figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(2)
    ax.plot(n, _array(curve.test_mse, "test_mse"), "-", color=colors[0], lw=2,
            label="test MSE, eigenlearning")
    if curve.ridge > 0:
        ax.plot(n, _array(curve.train_mse, "train_mse"), "-", color=colors[1], lw=1.5,
                label="train MSE, eigenlearning")
    if measured is not None:
        m = _array(measured.test_mse, "measured.test_mse", len(n))
        sem = _array(measured.test_mse_sem, "measured.test_mse_sem", len(n))
        ax.errorbar(n, m, yerr=np.nan_to_num(sem), fmt="o", color=colors[0], ms=5,
                    label=f"test MSE, kernel regression ({measured.trials} draws)")
        if curve.ridge > 0:
            ax.plot(n, _array(measured.train_mse, "train_mse", len(n)), "s", color=colors[1],
                    ms=4, label="train MSE, kernel regression")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training size n")
    ax.set_ylabel("mean squared error")
    ax.set_title(title or f"learning curve (ridge {curve.ridge:g}, noise {curve.noise:g})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def sphere_spectrum_figure(spectra: Mapping[str, SphereSpectrum], *,
                           title: str | None = None) -> Figure:
    """Eigenvalue per spherical-harmonic degree, one line per architecture (log scale).

    Args:
        spectra: ``{label: SphereSpectrum}``, e.g. several depths or activations.
        title: the figure title.
    """
    if not spectra:
        raise ValueError("spectra is empty; pass {label: sphere_spectrum(net, d, L)}.")
    fig = _figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (label, s), color in zip(spectra.items(), _colors(len(spectra))):
        mu = _array(s.eigenvalues, f"spectra[{label!r}]")
        deg = np.arange(mu.size)
        keep = mu > 1e-16 * max(mu.max(), 1e-300)
        ax.plot(deg[keep], mu[keep], "o-", color=color, ms=4, lw=1.5,
                label=f"{label} (d = {s.d}, {s.get})")
    ax.set_yscale("log")
    ax.set_xlabel("spherical-harmonic degree l")
    ax.set_ylabel("eigenvalue μ_l (each of N(d, l) harmonics)")
    ax.set_title(title or "spectral bias: eigenvalue by degree")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def convergence_figure(results: Mapping[str, Convergence], times: Sequence[float], *,
                       title: str | None = None) -> Figure:
    """Predicted train loss under gradient flow against time, log-log, one line per
    result, with each one's condition number in the legend.

    Args:
        results: ``{label: Convergence}``.
        times: ``(T,)`` positive times.
        title: the figure title.
    """
    t = _array(times, "times")
    if t.ndim != 1 or t.size == 0 or not np.all(t > 0):
        raise ValueError("times must be a non-empty 1-D sequence of positive times.")
    if not results:
        raise ValueError("results is empty; pass {label: convergence(k, y)}.")
    fig = _figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (label, c), color in zip(results.items(), _colors(len(results))):
        loss = _array(c.loss(t), "loss")
        ax.plot(t, np.maximum(loss, 1e-300), color=color, lw=1.8,
                label=f"{label} (condition number {c.condition_number:.3g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training time t")
    ax.set_ylabel("train loss 0.5 mean (f - y)^2")
    ax.set_title(title or "gradient flow with the NTK")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig

"""Figures of wide-network experiments (matplotlib, imported when first used).

Each function returns a `matplotlib.figure.Figure` built without pyplot (no
global figure state, no screen needed); save it with ``fig.savefig(path)``.
Install matplotlib with ``pip install 'ntkit[plot]'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["Curve", "eigenvalue_spectrum", "kernel_distance_vs_width", "training_curves"]


def _figure(**kwargs) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "ntkit.plot draws with matplotlib, which is not installed; install it with "
            "pip install 'ntkit[plot]'"
        ) from e
    return Figure(**kwargs)


def _array(value: Any, name: str, length: int | None = None) -> np.ndarray:
    """A float array from a tensor, array or sequence, checked for length."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=float)
    if length is not None and (arr.ndim != 1 or arr.shape[0] != length):
        raise ValueError(f"{name} must have shape ({length},) like times, got "
                         f"{tuple(arr.shape)}.")
    return arr


@dataclass(frozen=True)
class Curve:
    """One model's test metrics at each training time.

    Attributes:
        loss: test loss at each time, shape ``(T,)``.
        accuracy: test accuracy at each time, ``(T,)``, or None (regression).
        loss_std, accuracy_std: the spread (one standard deviation) across an
            ensemble at each time, ``(T,)``; a curve with them is drawn with a
            shaded band (an infinite ensemble), one without as a plain line
            (a single finite network).
    """

    loss: Any
    accuracy: Any = None
    loss_std: Any = None
    accuracy_std: Any = None


def training_curves(times: Sequence[float] | Any, curves: Mapping[str, Curve], *,
                    loss_label: str = "test loss", title: str | None = None) -> Figure:
    """Test loss (and accuracy) against training time, log time axis.

    Args:
        times: training times, shape ``(T,)``, all > 0 (drawn on a log axis).
        curves: ``{label: Curve}``. Curves with a ``*_std`` are drawn as their
            mean with a band of +-1 std (e.g. infinite ensembles); the others as
            lines (e.g. finite networks of each width).
        loss_label: the loss axis label.
        title: the figure title.

    Returns:
        A figure with one panel (loss) or two (loss, accuracy) when any curve has
        an accuracy; each panel has labelled axes and a legend.
    """
    t = _array(times, "times")
    if t.ndim != 1 or t.size == 0 or not np.all(t > 0):
        raise ValueError(f"times must be a non-empty 1-D sequence of positive times (log axis), "
                         f"got shape {t.shape} with minimum {t.min() if t.size else None}.")
    if not curves:
        raise ValueError("curves is empty; pass {label: Curve(loss=...)}.")
    for label, c in curves.items():
        if not isinstance(c, Curve):
            raise TypeError(f"curves[{label!r}] must be an ntkit.plot.Curve, got "
                            f"{type(c).__name__}.")
    with_acc = any(c.accuracy is not None for c in curves.values())
    fig = _figure(figsize=(11 if with_acc else 6, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if with_acc else 1, squeeze=False)[0]
    panels = [("loss", "loss_std", loss_label)]
    if with_acc:
        panels.append(("accuracy", "accuracy_std", "test accuracy"))
    colors = _colors(len(curves))
    for ax, (field, std_field, ylabel) in zip(axes, panels):
        for (label, c), color in zip(curves.items(), colors):
            values = getattr(c, field)
            if values is None:
                continue
            y = _array(values, f"curves[{label!r}].{field}", len(t))
            std = getattr(c, std_field)
            if std is not None:
                s = _array(std, f"curves[{label!r}].{std_field}", len(t))
                ax.plot(t, y, color=color, lw=2.2, label=f"{label} (mean ± 1 std)")
                ax.fill_between(t, y - s, y + s, color=color, alpha=0.2, lw=0)
            else:
                ax.plot(t, y, color=color, lw=1.4, ls="--", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("training time t (gradient-descent steps)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    if with_acc:
        axes[0].set_yscale("log")
    axes[0].set_title("test loss")
    if with_acc:
        axes[1].set_title("test accuracy")
    if title:
        fig.suptitle(title)
    return fig


def eigenvalue_spectrum(kernels: Mapping[str, Any], *, title: str | None = None,
                        normalize: bool = False) -> Figure:
    """Sorted eigenvalues of symmetric kernel matrices against their rank, log-log.

    Args:
        kernels: ``{label: matrix}``, each ``(N, N)`` symmetric (a tensor or array).
        normalize: divide each spectrum by its largest eigenvalue.
        title: the figure title.

    Returns:
        A figure with one line per kernel (eigenvalues in decreasing order; those
        <= 0 from round-off are left out of the log axis), labelled axes and a
        legend.
    """
    if not kernels:
        raise ValueError("kernels is empty; pass {label: (N, N) matrix}.")
    fig = _figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (label, k), color in zip(kernels.items(), _colors(len(kernels))):
        m = _array(k, f"kernels[{label!r}]")
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"kernels[{label!r}] must be a square (N, N) matrix, got shape "
                             f"{m.shape}.")
        eig = np.sort(np.linalg.eigvalsh(0.5 * (m + m.T)))[::-1]
        if normalize and eig[0] > 0:
            eig = eig / eig[0]
        rank = np.arange(1, eig.size + 1)
        keep = eig > 0
        ax.plot(rank[keep], eig[keep], color=color, lw=1.8, label=f"{label} (N = {m.shape[0]})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank i")
    ax.set_ylabel("eigenvalue λ_i" + (" / λ_1" if normalize else ""))
    ax.set_title(title or "kernel eigenvalue spectrum")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def kernel_distance_vs_width(widths: Sequence[int] | Any, distances: Any, *,
                             label: str = "empirical NTK at initialisation",
                             reference: bool = True, title: str | None = None) -> Figure:
    """Relative distance between empirical and infinite-width kernels against width, log-log.

    Args:
        widths: network widths, shape ``(W,)``.
        distances: relative Frobenius distances ``||K_width - K_inf||_F / ||K_inf||_F``,
            shape ``(W,)``, or ``(W, S)`` for ``S`` sampled networks per width (drawn
            as points, with their mean as the line).
        label: the legend label of the measured line.
        reference: add a ``width^-1/2`` line through the first mean (the rate of
            the infinite-width limit's fluctuations, Jacot et al. 2018).
        title: the figure title.

    Returns:
        A figure with labelled axes and a legend.
    """
    w = _array(widths, "widths")
    d = _array(distances, "distances")
    if w.ndim != 1 or w.size == 0 or not np.all(w > 0):
        raise ValueError(f"widths must be a non-empty 1-D sequence of positive ints, got {w}.")
    if d.ndim == 1:
        d = d[:, None]
    if d.ndim != 2 or d.shape[0] != w.size:
        raise ValueError(f"distances must have shape ({w.size},) or ({w.size}, samples) for "
                         f"{w.size} widths, got {tuple(_array(distances, 'distances').shape)}.")
    mean = d.mean(1)
    fig = _figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    color = _colors(1)[0]
    if d.shape[1] > 1:
        ax.plot(np.repeat(w, d.shape[1]), d.ravel(), "o", color=color, alpha=0.35, ms=4,
                label=f"{label}: each of {d.shape[1]} networks")
    ax.plot(w, mean, "o-", color=color, lw=2, ms=6,
            label=f"{label}" + (": mean" if d.shape[1] > 1 else ""))
    if reference:
        ref = mean[0] * np.sqrt(w[0] / w)
        ax.plot(w, ref, "k:", lw=1.5, label="∝ width$^{-1/2}$ (reference)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (hidden units)")
    ax.set_ylabel("relative distance ‖K_width − K_∞‖_F / ‖K_∞‖_F")
    ax.set_title(title or "finite-width NTK approaches the infinite-width NTK")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _colors(n: int) -> list:
    """``n`` distinguishable colours (matplotlib's default cycle, then tab20)."""
    from matplotlib import colormaps

    base = list(colormaps["tab10"].colors)
    return [base[i % len(base)] for i in range(n)]

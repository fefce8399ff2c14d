"""ntkit.plot: figures have labelled axes, legends and the lines asked for; PNGs are valid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
import matplotlib.image
from matplotlib.figure import Figure

from ntkit import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path) -> np.ndarray:
    """The file starts with the PNG signature and decodes to a non-blank RGB(A) image."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 100
    assert image[..., :3].std() > 0.01          # something was drawn
    return image


def assert_labelled(ax) -> None:
    assert ax.get_xlabel().strip() and ax.get_ylabel().strip()
    legend = ax.get_legend()
    assert legend is not None and all(t.get_text().strip() for t in legend.get_texts())


def test_training_curves(tmp_path):
    times = np.logspace(0, 3, 12)
    decay = np.exp(-times / 300)
    curves = {
        "NTK ensemble": plot.Curve(loss=0.01 + 0.04 * decay, accuracy=0.97 - 0.3 * decay,
                                   loss_std=0.002 * np.ones(12), accuracy_std=0.01 * decay),
        "width 64": plot.Curve(loss=torch.tensor(0.012 + 0.04 * decay),
                               accuracy=0.95 - 0.3 * decay),
        "width 1024": plot.Curve(loss=0.011 + 0.04 * decay, accuracy=0.96 - 0.3 * decay),
    }
    fig = plot.training_curves(times, curves, title="digits")
    assert isinstance(fig, Figure)
    loss_ax, acc_ax = fig.axes
    for ax in (loss_ax, acc_ax):
        assert_labelled(ax)
        assert ax.get_xscale() == "log"
        assert len(ax.get_lines()) == 3                       # one per curve
        assert len(ax.collections) == 1                       # one band: the ensemble's
        assert len(ax.get_legend().get_texts()) == 3
    assert "accuracy" in acc_ax.get_ylabel() and "loss" in loss_ax.get_ylabel()
    band = loss_ax.collections[0].get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose([band.min(), band.max()],
                               [(0.01 + 0.04 * decay - 0.002).min(),
                                (0.01 + 0.04 * decay + 0.002).max()], rtol=1e-6)
    fig.savefig(tmp_path / "curves.png")
    assert_valid_png(tmp_path / "curves.png")


def test_training_curves_regression_has_one_panel():
    fig = plot.training_curves([1, 10, 100], {"a": plot.Curve(loss=[3, 2, 1])},
                               loss_label="test MSE")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "test MSE"
    assert len(ax.get_lines()) == 1 and not ax.collections


def test_training_curves_errors():
    with pytest.raises(ValueError, match=r"shape \(3,\) like times"):
        plot.training_curves([1, 2, 3], {"a": plot.Curve(loss=[1, 2])})
    with pytest.raises(ValueError, match="positive"):
        plot.training_curves([0, 1, 2], {"a": plot.Curve(loss=[1, 2, 3])})
    with pytest.raises(TypeError, match="Curve"):
        plot.training_curves([1, 2], {"a": [1, 2]})


def test_eigenvalue_spectrum(tmp_path):
    """Each kernel's eigenvalues, sorted decreasing, are plotted against rank 1..N."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    kernels = {"NNGP": a @ a.T, "NTK": (a @ a.T).numpy() + np.eye(30)}
    fig = plot.eigenvalue_spectrum(kernels)
    (ax,) = fig.axes
    assert_labelled(ax)
    assert ax.get_xscale() == ax.get_yscale() == "log"
    lines = ax.get_lines()
    assert len(lines) == 2
    x, y = lines[0].get_data()
    expected = np.sort(np.linalg.eigvalsh((a @ a.T).numpy()))[::-1]
    np.testing.assert_allclose(y, expected[expected > 0], rtol=1e-10)
    assert x[0] == 1 and np.all(np.diff(y) <= 0)
    fig.savefig(tmp_path / "spectrum.png")
    assert_valid_png(tmp_path / "spectrum.png")
    with pytest.raises(ValueError, match="square"):
        plot.eigenvalue_spectrum({"bad": np.ones((3, 4))})


def test_kernel_distance_vs_width(tmp_path):
    """Per-network points, their mean, and a width^-1/2 reference through the first mean."""
    widths = [64, 256, 1024, 4096]
    d = np.array([[0.4, 0.5], [0.2, 0.26], [0.1, 0.12], [0.05, 0.07]])
    fig = plot.kernel_distance_vs_width(widths, d)
    (ax,) = fig.axes
    assert_labelled(ax)
    assert ax.get_xscale() == ax.get_yscale() == "log"
    points, mean, ref = ax.get_lines()
    assert len(points.get_xdata()) == 8
    np.testing.assert_allclose(mean.get_ydata(), d.mean(1))
    np.testing.assert_allclose(ref.get_ydata(), 0.45 * np.sqrt(64 / np.array(widths)))
    assert "1/2" in ax.get_legend().get_texts()[-1].get_text()
    fig.savefig(tmp_path / "distance.png")
    assert_valid_png(tmp_path / "distance.png")
    one = plot.kernel_distance_vs_width(widths, d[:, 0], reference=False)
    assert len(one.axes[0].get_lines()) == 1
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        plot.kernel_distance_vs_width(widths, d[:3])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    """Without matplotlib the error says how to install it."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'ntkit\[plot\]'"):
        plot.eigenvalue_spectrum({"a": np.eye(2)})

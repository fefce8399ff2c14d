"""The `python -m ntkit` demo and the bundled digits data."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch

from ntkit.datasets import load_digits


@pytest.fixture(scope="module")
def demo_output() -> str:
    """Runs `python -m ntkit` once (about 10 s: a 1797 x 1797 kernel and two solves)."""
    proc = subprocess.run([sys.executable, "-m", "ntkit"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_demo_prints_kernel_summary(demo_output):
    """The demo describes data, network and both kernels of the full digits set; both
    kernels' smallest eigenvalue is positive (a kernel matrix of distinct images)."""
    out = demo_output
    assert "data: scikit-learn digits, 1797 images of 64 pixels" in out
    assert re.search(r"network: 3 x \[Linear\(512", out)
    assert re.search(r"kernel: 1797 x 1797 NNGP and NTK in [0-9.]+ s", out)
    for name in ("NNGP", "NTK"):
        m = re.search(rf"{name}: diagonal mean ([0-9.]+), off-diagonal mean ([0-9.-]+), "
                      rf"eigenvalues \[([-0-9.e+]+), ([-0-9.e+]+)\]", out)
        assert m, f"no {name} summary in:\n{out}"
        diag, off, lo, hi = map(float, m.groups())
        assert diag > off > 0
        assert 0 < lo < hi


def test_demo_prints_accuracies(demo_output):
    """NNGP and NTK kernel regression on 1000 training digits classify the other 797 well
    (the demo prints ~0.99; a broken kernel gives ~0.1)."""
    accs = dict(re.findall(r"(NNGP|NTK) kernel regression \(t = inf\), 1000 train / 797 test: "
                           r"accuracy ([0-9.]+)", demo_output))
    assert set(accs) == {"NNGP", "NTK"}, demo_output
    assert all(0.95 < float(a) <= 1.0 for a in accs.values()), accs


def test_demo_rejects_unknown_command():
    """An unknown command is an argparse usage error (exit status 2) listing the choices."""
    proc = subprocess.run([sys.executable, "-m", "ntkit", "train"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr and "demo" in proc.stderr


@pytest.mark.skipif(shutil.which("ntkit") is None, reason="console script not on PATH")
def test_console_script_help():
    """The `ntkit` console script is installed and documents --depth."""
    proc = subprocess.run(["ntkit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--depth" in proc.stdout


# -------------------------------------------------------------------- datasets
def test_load_digits_shapes_and_standardization():
    """(1797, 64) float64 images, each with zero mean and x.x / 64 = 1; (1797,) int64 labels
    covering the ten digits."""
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float64
    assert y.shape == (1797,) and y.dtype == torch.long
    assert set(y.tolist()) == set(range(10))
    torch.testing.assert_close(x.mean(1), torch.zeros(1797, dtype=torch.float64), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close((x * x).sum(1) / 64, torch.ones(1797, dtype=torch.float64))


def test_load_digits_dtype_and_raw():
    """dtype= is respected; standardize=False gives the raw 0..16 pixel counts."""
    x32, _ = load_digits(dtype=torch.float32)
    assert x32.dtype == torch.float32
    raw, y = load_digits(standardize=False)
    assert raw.shape == (1797, 64)
    assert float(raw.min()) == 0 and float(raw.max()) == 16
    assert torch.equal(raw, raw.round())
    assert torch.equal(y, load_digits()[1])

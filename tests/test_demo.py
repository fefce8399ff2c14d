"""`ntkit demo` (also `python -m ntkit` without arguments) and the bundled digits data."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ntkit import cli, demo
from ntkit.datasets import load_digits

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("training_curves.png", "eigenvalue_spectrum.png", "ntk_distance_vs_width.png")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python -m ntkit demo` with small settings, in a subprocess (about 10 s)."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("demo") / "figures"
    proc = subprocess.run(
        [sys.executable, "-m", "ntkit", "demo", "--quick", "--n-train", "120", "--n-test", "100",
         "--steps", "60", "--widths", "32,128", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, out


def test_demo_prints_the_table(demo_run):
    """One row per model with an accuracy in [0, 1], a positive loss and seconds; the
    infinite ensembles' rows and the single-network rows (mean ± std)."""
    out, _ = demo_run
    assert "120 train / 100 test" in out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(infinite (?:NTK|NNGP) ensemble, mean|MLP width \d+)\s+([0-9.]+)\s+"
                     r"([0-9.]+)\s+([0-9.]+)$", line)
        if m:
            rows[m.group(1)] = tuple(float(v) for v in m.groups()[1:])
    assert set(rows) == {"infinite NTK ensemble, mean", "infinite NNGP ensemble, mean",
                         "MLP width 32", "MLP width 128"}, out
    for acc, loss, seconds in rows.values():
        assert 0 <= acc <= 1 and loss > 0 and seconds >= 0
    # After 60 steps the ensemble mean is far better than chance (0.1) on ten classes.
    assert rows["infinite NTK ensemble, mean"][0] > 0.5, out
    single = re.search(r"infinite NTK: one network\s+([0-9.]+) ± ([0-9.]+)\s+([0-9.]+) ± "
                       r"([0-9.]+)", out)
    assert single, out
    assert float(single.group(2)) > 0                 # a spread across networks
    assert re.search(r"empirical vs infinite NTK on 50 digits: relative distance", out)


def test_demo_writes_valid_figures(demo_run):
    """The three PNGs exist, start with the PNG signature and decode to images."""
    import matplotlib.image

    _, out = demo_run
    for name in FIGURES:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200, (name, image.shape)
        assert image[..., :3].std() > 0.01, name


def test_no_command_runs_the_demo(monkeypatch):
    """`ntkit` (and so `python -m ntkit`) without a command runs the demo with its
    defaults; --quick changes them."""
    seen = []
    monkeypatch.setattr(cli, "run_demo", lambda s, out: seen.append((s, out)))
    runner = CliRunner()
    assert runner.invoke(cli.cli, []).exit_code == 0
    assert runner.invoke(cli.cli, ["demo", "--quick"]).exit_code == 0
    (full, out), (quick, _) = seen
    assert (full.widths, full.n_train, full.n_test, full.steps) == ((64, 256, 1024), 500, 500,
                                                                    2000)
    assert full.threads == 1
    assert out.name == "ntkit-demo"
    assert quick.steps < full.steps and quick.widths == (64, 256)


def test_demo_without_matplotlib(monkeypatch, tmp_path):
    """Without matplotlib the demo still prints its table and says how to get figures."""
    monkeypatch.setattr(demo, "has_matplotlib", lambda: False)
    r = CliRunner().invoke(cli.cli, ["demo", "--quick", "--n-train", "30", "--n-test", "20",
                                     "--steps", "5", "--widths", "8", "--out",
                                     str(tmp_path / "figs")])
    assert r.exit_code == 0, r.output
    assert "MLP width 8" in r.output
    assert "figures: skipped" in r.output and "pip install 'ntkit[plot]'" in r.output
    assert not (tmp_path / "figs").exists()


def test_demo_option_errors():
    runner = CliRunner()
    r = runner.invoke(cli.cli, ["demo", "--widths", "64,abc"])
    assert r.exit_code == 2 and "'abc' is not an integer width" in r.output
    r = runner.invoke(cli.cli, ["demo", "--n-train", "1500", "--n-test", "400"])
    assert r.exit_code == 2 and "exceeds the 1797 digits" in r.output


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


def test_ensemble_stats_match_sampling():
    """The demo's exact loss mean and spread of one network drawn from the ensemble agree
    with Monte Carlo samples of N(mean, cov) (a witness for the Gaussian moments)."""
    g = torch.Generator().manual_seed(0)
    t, n, o = 2, 6, 3
    mean = torch.randn(t, n, o, generator=g, dtype=torch.float64)
    a = torch.randn(t, n, n, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) / n
    y = torch.randn(n, o, generator=g, dtype=torch.float64)
    labels = y.argmax(1)
    stats = demo.ensemble_stats(mean, cov, y, labels, torch.Generator().manual_seed(1))
    z = torch.randn(200_000, n, o, generator=g, dtype=torch.float64)
    for i in range(t):
        f = mean[i] + torch.linalg.cholesky(cov[i]) @ z
        loss = 0.5 * ((f - y) ** 2).sum((1, 2)) / y.numel()
        np.testing.assert_allclose(stats.loss[i], float(loss.mean()), rtol=1e-2)
        np.testing.assert_allclose(stats.loss_std[i], float(loss.std()), rtol=2e-2)

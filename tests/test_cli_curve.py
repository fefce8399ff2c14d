"""``ntkit curve``: the predicted learning curve equals `ntkit.theory.learning_curve` on
the same pool, the measured one `measure_learning_curve`; outputs follow the command
line's rules (never an input, never replaced without --force); bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ntkit import theory
from ntkit.cli import cli
from ntkit.spec import parse_architecture

ARCH = "linear(512, w_std=1.5, b_std=0.1)-relu-linear(1, w_std=1.5, b_std=0.1)"


@pytest.fixture
def data(tmp_path):
    gen = np.random.default_rng(0)
    x = gen.standard_normal((120, 6))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


def test_curve_table_equals_the_library(data, tmp_path):
    path, x, y = data
    table = tmp_path / "curve.json"
    fig = tmp_path / "curve.png"
    got = CliRunner().invoke(cli, ["curve", str(path), "--sizes", "10,30", "--ridge", "0.01",
                                   "--trials", "5", "--table", str(table), "-o", str(fig)])
    assert got.exit_code == 0, got.output
    record = json.loads(table.read_text())
    k = parse_architecture(ARCH).kernel(torch.as_tensor(x)).ntk
    expected = theory.learning_curve(k, torch.as_tensor(y), [10, 30], ridge=0.01)
    np.testing.assert_allclose(record["predicted_test_mse"], expected.test_mse.numpy(),
                               rtol=1e-10)
    measured = theory.measure_learning_curve(k, torch.as_tensor(y), [10, 30], ridge=0.01,
                                             trials=5, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(record["measured_test_mse"], measured.test_mse.numpy(),
                               rtol=1e-10)
    assert fig.stat().st_size > 1000
    # an existing output needs --force; an output that is the data is refused
    again = CliRunner().invoke(cli, ["curve", str(path), "--sizes", "10", "--trials", "0",
                                     "--table", str(table)])
    assert again.exit_code != 0 and "--force" in again.output
    same = CliRunner().invoke(cli, ["curve", str(path), "--sizes", "10", "--table", str(path),
                                    "--force"])
    assert same.exit_code != 0 and "destroy the input" in same.output
    assert np.load(path)["x"].shape == (120, 6)


@pytest.mark.parametrize(("args", "message"), [
    (["--sizes", "200"], "not below the pool"),
    (["--sizes", "ten"], "not a list of training sizes"),
    (["--ridge", "-1"], "-1"),
])
def test_bad_input_is_one_line(data, args, message):
    path, _, _ = data
    got = CliRunner().invoke(cli, ["curve", str(path), *args])
    assert got.exit_code != 0
    assert message in got.output
    assert "Traceback" not in got.output

"""`ntkit regimes` (`ntkit.finite.regimes`): the lazy and the feature-learning regimes.

Witnesses: the closed-form weighted NTK against `ntkit.empirical_ntk_by_layer` (autodiff);
the slopes against width against the theory of each regime, written here:
- NTK parameterization: the NTK's change falls like ``1/width`` (one hidden layer:
  ``dTheta/dt = (1/n) sum_j v_j (...)`` over ``n`` terms of random sign, each
  ``O(1/sqrt(n))``; Dyer & Gur-Ari 2020, sec. 3), the features like ``width^(-1/2)``
  asymptotically;
- muP: both stay of order one (slope ~0);
- standard parameterization with muP's learning rates: the change grows with width.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ntkit.finite.params import AbcMLP, abc_exponents
from ntkit.finite.regimes import _abc, regimes, weighted_ntk


@pytest.mark.parametrize("name", ["ntk", "mup", "sp_mup_lr", "standard"])
def test_weighted_ntk_equals_autodiff(name):
    from ntkit.empirical import empirical_ntk_by_layer

    abc = _abc(name) if name != "standard" else abc_exponents("standard", "sgd", 1)
    model = AbcMLP(7, 96, 3, 1, parameterization=None, abc=abc, base_width=24,
                   w_std=[1.3, 0.4], generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    with torch.no_grad():
        for b in model.biases:
            b.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    parts = empirical_ntk_by_layer(model, x, by="parameter")
    expected = sum(wm * parts[f"weights.{i}"] + bm * parts[f"biases.{i}"]
                   for i, (wm, bm) in enumerate(model.lr_multipliers()))
    torch.testing.assert_close(weighted_ntk(model, x), expected, rtol=1e-12, atol=1e-12)


def test_weighted_ntk_refuses_other_networks():
    with pytest.raises(ValueError, match="one-hidden-layer ReLU"):
        weighted_ntk(AbcMLP(3, 8, 1, 2), torch.randn(2, 3))


def _digits(n_train):
    import ntkit as nk

    pytest.importorskip("sklearn")
    x, y = nk.datasets.load_digits(dtype=torch.float32)
    onehot = torch.nn.functional.one_hot(y, 10).float()
    return x[:n_train], onehot[:n_train], x[1500:], onehot[1500:]


def _check_slopes(record, *, ntk_feature_max=-0.4):
    """The regimes' slopes (log-log against width), each against a theory above."""
    widths = record["widths"]
    for name in ("ntk", "mup", "sp_mup_lr"):
        for key in ("ntk_change", "feature_distance"):
            fit = np.polyfit(np.log(widths), np.log(record[name][key]), 1)[0]
            assert record["slopes"][name][key] == pytest.approx(fit, abs=1e-9)
    s = record["slopes"]
    assert -1.3 < s["ntk"]["ntk_change"] < -0.7, s  # 1/width
    assert s["ntk"]["feature_distance"] < ntk_feature_max, s  # falls (-1/2 asymptotically)
    assert abs(s["mup"]["ntk_change"]) < 0.15, s  # flat
    assert abs(s["mup"]["feature_distance"]) < 0.15, s
    # standard + muP lr: grows until the hidden layer dies (the kernel's relative change
    # saturates at 1, the features' distance at 1)
    assert s["sp_mup_lr"]["ntk_change"] > 0.2, s
    assert record["sp_mup_lr"]["ntk_change"][-1] > 0.9, record["sp_mup_lr"]
    # at every width above the base, muP's NTK moves more than NTK parameterization's
    assert all(m > 1.5 * n for m, n in zip(record["mup"]["ntk_change"][1:],
                                           record["ntk"]["ntk_change"][1:])), record


@pytest.mark.slow
def test_regimes_slopes_small_widths():
    """Widths 64..512 on 300 digits, 100 steps: the slopes of the three regimes (~11 s)."""
    r = regimes(*_digits(300), widths=(64, 128, 256, 512), steps=100, probe=32)
    _check_slopes(r)
    # all three are the same network at the base width
    assert len({r[n]["ntk_change"][0] for n in ("ntk", "mup", "sp_mup_lr")}) == 1


def test_regimes_command_prints_and_records_slopes(tmp_path):
    pytest.importorskip("sklearn")
    from click.testing import CliRunner

    from ntkit.cli import cli

    table = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["regimes", "--widths", "64,256", "--steps", "100",
                                   "--train", "200", "--seeds", "1", "--table", str(table)])
    assert res.exit_code == 0, res.output
    record = json.loads(table.read_text())
    assert record["seeds"] == 1 and len(record["mup"]["ntk_change_seeds"][0]) == 1
    _check_slopes(record)
    for name in ("ntk", "mup", "sp_mup_lr"):
        line = next(ln for ln in res.output.splitlines() if f"slope against width, {name:>9}"
                    in ln)
        assert f"{record['slopes'][name]['ntk_change']:+.2f}" in line, line


@pytest.mark.slow
def test_regimes_command_defaults(tmp_path):
    """The command as documented (widths 64..4096, 1000 digits, 2 seeds): NTK
    parameterization's NTK change falls like 1/width, muP's is flat; a few minutes."""
    pytest.importorskip("sklearn")
    from click.testing import CliRunner

    from ntkit.cli import cli

    table = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["regimes", "--table", str(table)])
    assert res.exit_code == 0, res.output
    record = json.loads(table.read_text())
    assert record["widths"][-1] == 4096
    _check_slopes(record)
    assert record["mup"]["test_loss"][-1] < record["ntk"]["test_loss"][-1]


@pytest.mark.parametrize("kwargs,message", [
    ({"parameterizations": ("mean-field",)}, "unknown parameterizations"),
    ({"seeds": 0}, "seeds must be"),
    ({"readout_std": 0.0}, "readout_std must be"),
])
def test_regimes_bad_arguments(kwargs, message):
    x = torch.randn(8, 4)
    y = torch.randn(8, 2)
    with pytest.raises(ValueError, match=message):
        regimes(x, y, x, y, widths=(8,), steps=1, **kwargs)


def test_diverged_runs_are_inf():
    """A learning rate far past the edge of stability: the loss overflows, the run is
    recorded as diverged with inf measurements (not nan, not an exception)."""
    x = torch.randn(16, 4) * 10
    y = torch.randn(16, 2)
    r = regimes(x, y, x, y, widths=(8,), steps=50, lr=1e6, base_width=8,
                parameterizations=("ntk",), probe=4)
    assert r["ntk"]["diverged"] == [1] and math.isinf(r["ntk"]["ntk_change"][0])

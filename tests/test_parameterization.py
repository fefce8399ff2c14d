"""Parameterizations (`ntkit.finite.params`): muP against the `mup` package, and the
coordinate check.

Witnesses: tests/data/mup_reference.json, written by tests/data/gen_mup_reference.py with
`mup` 1.0.0 (learning-rate multipliers of MuSGD / MuAdam and initial weight scales for
the same MLP); when `mup` is importable, training the same weights with `mup`'s
optimizers and with ours gives the same trajectory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ntkit.finite.params import AbcMLP, abc_exponents, coord_check, param_groups

REF = json.loads((Path(__file__).parent / "data" / "mup_reference.json").read_text())
WIDTHS = (64, 256, 1024)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("width", WIDTHS)
def test_learning_rates_equal_mups(width, optimizer):
    model = AbcMLP(8, width, 3, 2, parameterization="mup", optimizer=optimizer, base_width=64)
    ours = [m for pair in model.lr_multipliers() for m in pair]  # w0, b0, w1, b1, w2, b2
    assert ours == pytest.approx(REF["widths"][str(width)][f"lr_{optimizer}"], rel=1e-12)
    groups = param_groups(model, lr=0.3)
    assert [g["lr"] for g in groups] == pytest.approx([0.3 * m for m in ours], rel=1e-12)


def test_initial_scales_scale_like_mups():
    """The effective weights' standard deviation (times the forward multiplier) changes
    with width by the same factors as in `mup` (input constant, hidden 1/sqrt(m), readout
    1/m), within the sampling error of the draws (a few %)."""
    ours = {}
    for width in WIDTHS:
        model = AbcMLP(8, width, 3, 2, parameterization="mup", base_width=64,
                       generator=torch.Generator().manual_seed(width))
        ours[width] = [float(w.detach().std()) * m
                       for w, m in zip(model.weights, model.multipliers)]
    for width in WIDTHS[1:]:
        for layer in range(3):
            mine = ours[width][layer] / ours[64][layer]
            theirs = (REF["widths"][str(width)]["weight_std"][layer]
                      / REF["widths"]["64"]["weight_std"][layer])
            assert mine == pytest.approx(theirs, rel=0.08), (width, layer, mine, theirs)
    assert REF["widths"]["1024"]["readout_multiplier"] == pytest.approx(1 / 16)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_same_training_as_mup(optimizer):
    """The same initial weights trained by `mup`'s optimizer and by torch.optim with our
    parameter groups follow the same trajectory."""
    mup = pytest.importorskip("mup")
    from torch import nn

    width, gen = 256, torch.Generator().manual_seed(0)
    ours = AbcMLP(8, width, 3, 2, parameterization="mup", optimizer=optimizer,
                  base_width=64, generator=gen)
    mk = lambda n: nn.Sequential(nn.Linear(8, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(),
                                 mup.MuReadout(n, 3))
    theirs = mk(width)
    mup.set_base_shapes(theirs, mk(64), delta=mk(128))
    with torch.no_grad():
        for i, layer in enumerate((0, 2, 4)):
            theirs[layer].weight.copy_(ours.weights[i])
            theirs[layer].bias.zero_()
    x = torch.randn(16, 8, generator=gen)
    y = torch.randn(16, 3, generator=gen)
    lr = 0.05 if optimizer == "sgd" else 1e-3
    opt_ours = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(
        param_groups(ours, lr=lr), lr=lr)
    opt_theirs = (mup.MuSGD if optimizer == "sgd" else mup.MuAdam)(theirs.parameters(), lr=lr)
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def _spread(result, layer):
    vals = [float(result[w][-1, layer]) for w in result]
    return max(vals) / min(vals), vals


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(32, 8, generator=gen), torch.randn(32, 2, generator=gen)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 0.01)])
def test_coordinate_check_is_flat_under_mup(data, optimizer, lr):
    x, y = data
    r = coord_check([64, 256, 1024], x, y, optimizer=optimizer, lr=lr, steps=3)
    for layer in range(3):
        spread, vals = _spread(r, layer)
        assert spread < 4, (layer, vals)  # 16x the width; SP below grows by > 100x


def test_coordinate_check_grows_without_the_output_multiplier(data):
    """Standard parameterization with muP's learning rates, or muP with its 1/m readout
    multiplier dropped, blows up with width."""
    x, y = data
    mup_sgd = abc_exponents("mup", "sgd", 2)
    sp_with_mup_lr = {**abc_exponents("standard", "sgd", 2), "c": mup_sgd["c"],
                      "c_bias": mup_sgd["c_bias"]}
    no_readout_mult = {**mup_sgd, "a": [0.0, 0.0, 0.0]}
    for abc in (sp_with_mup_lr, no_readout_mult):
        r = coord_check([64, 1024], x, y, parameterization=None, abc=abc, lr=0.05, steps=3)
        growth = float(r[1024][-1, -1] / r[64][-1, -1])
        assert growth > 20, growth


def test_figure(data, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from ntkit.finite.params import plot_coord_check

    x, y = data
    fig = plot_coord_check(coord_check([64, 128], x, y, steps=1))
    fig.savefig(tmp_path / "coord.png")
    assert (tmp_path / "coord.png").stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match="parameterization"):
        AbcMLP(4, 8, 1, parameterization="mean-field")
    with pytest.raises(ValueError, match="abc"):
        AbcMLP(4, 8, 1, 2, parameterization=None, abc={"a": [0], "b": [0], "c": [0]})
    with pytest.raises(ValueError, match="optimizer"):
        abc_exponents("mup", "rmsprop", 2)
    with pytest.raises(TypeError, match="AbcMLP"):
        param_groups(torch.nn.Linear(2, 2), lr=0.1)


@pytest.mark.slow
def test_regimes_lazy_versus_feature_learning():
    """Digits, widths 256 and 1024, 40 SGD steps: under NTK parameterization the features'
    motion falls like 1/sqrt(width) (4x the width: ~2x less; measured 2.4x) and the NTK's
    faster; under muP the features' motion falls clearly less (measured 1.5x; flat only
    at larger widths: 1024 -> 4096 gave 0.158 -> 0.159 with 100 steps)."""
    import ntkit as nk
    from ntkit.finite.regimes import regimes

    pytest.importorskip("sklearn")
    x, y = nk.datasets.load_digits(dtype=torch.float32)
    onehot = torch.nn.functional.one_hot(y, 10).float()
    r = regimes(x[:500], onehot[:500], x[1500:], onehot[1500:], widths=(256, 1024), steps=40,
                lr=0.05, probe=16)
    ntk, mup = r["ntk"], r["mup"]
    lazy = ntk["feature_distance"][0] / ntk["feature_distance"][1]
    rich = mup["feature_distance"][0] / mup["feature_distance"][1]
    assert 1.7 < lazy < 3.5, ntk
    assert rich < 0.8 * lazy, (rich, lazy)
    assert ntk["ntk_change"][0] / ntk["ntk_change"][1] > 3, ntk
    assert mup["test_loss"][1] < ntk["test_loss"][1], (mup, ntk)


def test_regimes_command(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from click.testing import CliRunner

    from ntkit.cli import cli

    out, table = tmp_path / "r.png", tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["regimes", "--widths", "16,32", "--steps", "2", "--train",
                                   "100", "-o", str(out), "--table", str(table)])
    assert res.exit_code == 0, res.output
    record = json.loads(table.read_text())
    assert record["widths"] == [16, 32] and len(record["mup"]["test_loss"]) == 2
    assert out.stat().st_size > 1000 and "feature dist" in res.output


@pytest.mark.parametrize("args,message", [
    (["--widths", "a,b"], "not a list of widths"),
    (["--train", "5000"], "leaves no test examples"),
    (["-o", "fig.txt"], "figures are written to"),
], ids=["widths", "train", "suffix"])
def test_regimes_command_bad_input(tmp_path, args, message):
    from click.testing import CliRunner

    from ntkit.cli import cli

    res = CliRunner().invoke(cli, ["regimes", *args], catch_exceptions=False)
    assert res.exit_code != 0 and message in res.output, res.output

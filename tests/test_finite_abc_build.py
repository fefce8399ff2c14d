"""`ntkit.finite.abc_mlp`: an ntkit MLP description built in muP (or any abc preset).

Witnesses: ntkit's own finite twin (``net.build`` in standard parameterization with
zero-initialised biases draws the same weights from the same generator, so at the base
width, where every preset is the standard initialisation, the two modules must agree
to the last bit), and `AbcMLP` itself (checked against the `mup` package in
tests/test_parameterization.py) at other widths.
"""

from __future__ import annotations

import pytest
import torch

import ntkit as nk
from ntkit.finite import AbcMLP, abc_mlp, param_groups


def net(width, act=None, w_stds=(1.3, 1.1, 0.7), **bias):
    act = act or nk.ReLU()
    bias = bias or {"b_std": 0.0}
    lin = lambda n, w: nk.Linear(n, w, parameterization="standard", **bias)
    return nk.Sequential(lin(width, w_stds[0]), act, lin(width, w_stds[1]), act,
                         lin(2, w_stds[2]))


@pytest.mark.parametrize("preset", ["mup", "ntk", "standard"])
@pytest.mark.parametrize("act", [nk.ReLU(), nk.Tanh()], ids=repr)
def test_equals_ntkits_build_at_the_base_width(preset, act):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    description = net(32, act, b_init="zero")
    ours = abc_mlp(description, 6, parameterization=preset, base_width=32,
                   generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    twin = description.build((6,), generator=torch.Generator().manual_seed(3),
                             dtype=torch.float64)
    torch.testing.assert_close(ours(x), twin(x), rtol=0, atol=0)


def test_mup_at_another_width_is_abcmlp():
    """At width 4 x base the module is `AbcMLP`'s muP (scales, multipliers, learning
    rates) with the description's per-layer ``w_std``: readout multiplier 1/4, hidden
    init 1/2 of the standard, SGD learning rates 4x on input and readout weights."""
    model = abc_mlp(net(256), 6, base_width=64, generator=torch.Generator().manual_seed(1))
    ref = AbcMLP(6, 256, 2, 2, base_width=64, w_std=[1.3, 1.1, 0.7],
                 generator=torch.Generator().manual_seed(1))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.multipliers == [1.0, 1.0, 0.25]
    assert [g["lr"] for g in param_groups(model, lr=0.1)] == pytest.approx(
        [0.4, 0.4, 0.1, 0.4, 0.4, 0.1])
    std = model.weights[1].std().item()
    assert abs(std - 1.1 / 64**0.5 / 2) < 0.02 * 1.1 / 64**0.5 / 2  # 65,536 draws: ~0.3%


def test_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="equal hidden widths"):
        abc_mlp(nk.Sequential(nk.Linear(8), nk.ReLU(), nk.Linear(16), nk.ReLU(),
                              nk.Linear(1)), 3)
    with pytest.raises(ValueError, match="biases start at zero"):
        abc_mlp(net(8, b_std=0.5), 3)
    with pytest.raises(ValueError, match="one activation"):
        abc_mlp(nk.Sequential(nk.Linear(8), nk.ReLU(), nk.Linear(8), nk.Tanh(),
                              nk.Linear(1)), 3)
    with pytest.raises(ValueError, match="fully connected"):
        abc_mlp(nk.Sequential(nk.Linear(8), nk.ReLU()), 3)
    with pytest.raises(ValueError, match="w_std"):
        AbcMLP(3, 8, 1, 2, w_std=[1.0, 1.0])
    assert abc_mlp(net(8, b_std=0.5, b_init="zero"), 3).weights[0].shape == (8, 3)


def test_build_takes_a_parameterization():
    """``net.build(..., parameterization=)`` is `abc_mlp`: the preset, a dict of abc
    exponents (the same numbers as the preset give the same module), learning rates as
    optimizer groups on the module, and the default build untouched."""
    description = net(128)
    gen = lambda: torch.Generator().manual_seed(5)
    built = description.build((6,), parameterization="mup", base_width=32, generator=gen(),
                              dtype=torch.float64)
    ref = abc_mlp(description, 6, base_width=32, generator=gen(), dtype=torch.float64)
    assert isinstance(built, AbcMLP) and built.multipliers == [1.0, 1.0, 0.25]
    for a, b in zip(built.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [g["lr"] for g in built.param_groups(0.1)] == pytest.approx(
        [0.4, 0.4, 0.1, 0.4, 0.4, 0.1])
    from ntkit.finite import abc_exponents
    adam = abc_exponents("mup", "adam", 2)
    expert = description.build((6,), parameterization=adam, optimizer="adam", base_width=32,
                               generator=gen(), dtype=torch.float64)
    preset = description.build((6,), parameterization="mup", optimizer="adam", base_width=32,
                               generator=gen(), dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(expert(x), preset(x), rtol=0, atol=0)
    assert [g["lr"] for g in expert.param_groups(1.0)] == pytest.approx(
        [1.0, 1.0, 0.25, 1.0, 1.0, 1.0])
    assert not isinstance(description.build((6,)), AbcMLP)


def test_build_parameterization_refusals():
    description = net(16)
    with pytest.raises(ValueError, match="belong to parameterization"):
        description.build((6,), optimizer="adam")
    with pytest.raises(ValueError, match="belong to parameterization"):
        description.build((6,), base_width=8)
    with pytest.raises(TypeError, match="parameterization must be"):
        description.build((6,), parameterization=3)
    with pytest.raises(ValueError, match="parameterization must be"):
        description.build((6,), parameterization="mean-field")
    cnn = nk.Sequential(nk.Conv2d(8, 3), nk.ReLU(), nk.Flatten(), nk.Linear(1))
    with pytest.raises(ValueError, match="fully connected"):
        cnn.build((1, 5, 5), parameterization="mup")

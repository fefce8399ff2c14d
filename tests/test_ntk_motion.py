"""The NTK's motion: `ntk_velocity` against finite differences, `NTKTracker` against
a real training run and against the velocity at the start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkit as nk
from ntkit.finite import NTKTracker, gradient_step, ntk_velocity

F64 = torch.float64


def _mlp(width: int, gen: torch.Generator) -> nn.Module:
    net = nk.Sequential(nk.Linear(width, 1.4, 0.2), nk.Tanh(), nk.Linear(width, 1.4, 0.2),
                        nk.ReLU(), nk.Linear(2, 1.4, 0.2))
    return net.build((3,), generator=gen, dtype=F64)


def _shifted(model: nn.Module, step: dict, eps: float) -> nn.Module:
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in other.named_parameters():
            p.add_(eps * step[k])
    return other


@pytest.mark.parametrize("two_batches", [False, True], ids=["x1x1", "x1x2"])
def test_velocity_matches_finite_differences(make_generator, two_batches):
    """dNTK . step by forward-mode AD == central differences of the empirical NTK (float64;
    the difference's own error is O(h^2) ~ 1e-10)."""
    gen = make_generator(0)
    model = _mlp(16, gen)
    x1 = torch.randn(5, 3, generator=gen, dtype=F64)
    x2 = torch.randn(4, 3, generator=gen, dtype=F64) if two_batches else None
    y = torch.randn(5, 2, generator=gen, dtype=F64)
    step = gradient_step(model, lambda m: ((m(x1) - y) ** 2).mean(), learning_rate=0.5)
    theta, vel = ntk_velocity(model, x1, x2, step=step)
    torch.testing.assert_close(theta, nk.empirical_ntk(model, x1, x2), rtol=1e-10, atol=1e-12)
    h = 1e-5
    plus = nk.empirical_ntk(_shifted(model, step, h), x1, x2)
    minus = nk.empirical_ntk(_shifted(model, step, -h), x1, x2)
    fd = (plus - minus) / (2 * h)
    assert vel.abs().max() > 1e-3  # the NTK does move at width 16
    torch.testing.assert_close(vel, fd, rtol=1e-6, atol=1e-6 * vel.abs().max().item())


def test_tracker_records_a_training_run(make_generator):
    """Along real SGD: distances recorded every k steps, start at 0, and the first
    recorded distance matches the first-order prediction ``t ||velocity|| / ||Theta||``
    from the velocity at the start (small steps)."""
    gen = make_generator(1)
    model = _mlp(32, gen)
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    y = torch.randn(8, 2, generator=gen, dtype=F64)
    probe = x[:4]
    loss = lambda m: ((m(x) - y) ** 2).mean()
    lr, k = 1e-3, 2
    step = gradient_step(model, loss, learning_rate=lr)
    theta, vel = ntk_velocity(model, probe, step=step)
    predicted = k * torch.linalg.norm(vel) / torch.linalg.norm(theta)
    tracker = NTKTracker(model, probe, every=k, keep_kernels=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t in range(1, 7):
        opt.zero_grad()
        loss(model).backward()
        opt.step()
        tracker.update(t)
    assert tracker.steps == [0, 2, 4, 6]
    assert tracker.distance[0] == 0.0 and all(d > 0 for d in tracker.distance[1:])
    assert len(tracker.kernels) == 4
    torch.testing.assert_close(torch.tensor(tracker.distance[1], dtype=F64), predicted,
                               rtol=0.05, atol=0)


def test_relative_motion_falls_with_width(make_generator):
    """NTK parameterization: the NTK's relative velocity under one GD step (learning
    rate fixed) falls like 1/width (the dNTK contracted with a GD step is O(1/n): PDLT
    ch. 11, eq. 11.8ff): 16x the width, ~16x slower (measured 17.6 with 3 seeds)."""
    speeds = {}
    for width in (64, 1024):
        vals = []
        for seed in range(3):
            gen = make_generator(seed)
            model = _mlp(width, gen)
            x = torch.randn(6, 3, generator=make_generator(99), dtype=F64)
            y = torch.ones(6, 2, dtype=F64)
            step = gradient_step(model, lambda m, x=x, y=y: ((m(x) - y) ** 2).mean(),
                                 learning_rate=1.0)
            theta, vel = ntk_velocity(model, x, step=step)
            vals.append((torch.linalg.norm(vel) / torch.linalg.norm(theta)).item())
        speeds[width] = sum(vals) / len(vals)
    ratio = speeds[64] / speeds[1024]
    assert 10.0 < ratio < 26.0, speeds  # 1/sqrt(width) would give 4, 1/width 16


def test_bad_arguments(make_generator):
    model = _mlp(4, make_generator(0))
    x = torch.randn(3, 3, dtype=F64)
    with pytest.raises(ValueError, match="missing"):
        ntk_velocity(model, x, step={})
    with pytest.raises(TypeError, match="dict"):
        ntk_velocity(model, x, step=[1.0])
    with pytest.raises(ValueError, match="every"):
        NTKTracker(model, x, every=0)

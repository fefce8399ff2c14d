"""How far the NTK of a width-``n`` MLP moves in ``t`` steps of gradient descent.

At finite width the empirical NTK moves during training; in NTK parameterization its
relative change ``rho(n) = ||Theta_t - Theta_0||_F / ||Theta_0||_F`` vanishes as the
width grows, like a power of the width:

- smooth activations (Erf, Tanh, GELU, ...): ``rho ~ c / n``. The NTK's rate of change
  is set by the dNTK and ddNTK, both of order ``1/n`` (Roberts, Yaida & Hanin 2022,
  PDLT sec. 11.1-11.3; Dyer & Gur-Ari 2020, sec. 3 and their conjecture 1);
- activations whose derivative jumps (ReLU, LeakyReLU, Abs): ``rho ~ c / n^(3/4)``
  at large width. Each hidden unit's pre-activation moves by ``O(n^-1/2)``, so a
  fraction ``O(n^-1/2)`` of the ``n`` units cross the kink on a given input, each
  changing the NTK by ``O(1/n)``, with signs that cancel on average:
  ``sqrt(n * n^-1/2) / n = n^-3/4``. (Our own argument; measured in
  tests/test_ntk_forecast.py: the local slope steepens from -0.62 between widths 1024
  and 4096 to -0.75 between 4096 and 16384 for ReLU, and from -0.87 to -1.04 for erf.)

The coefficient ``c`` depends on the data, the labels, the learning rate and the number
of steps, and the leading-order theory that gives it (PDLT ch. infinity, with the
dNTK, the ddNTK and the second-order corrections to the parameters' path, not only the
NTK evaluated along the linearised path, which misses terms of the same order) is not
implemented. `ntk_change_forecast` measures it instead: it trains the same network
(the description, rebuilt at each width of a ladder of small widths) with the same
data and steps over several seeds, takes ``rho = c n^-alpha`` with ``alpha`` the
large-width exponent above and ``c`` from the widest ladder width (or fits both), and
extrapolates to the width asked for, with a bootstrap interval over the seeds. `NTKTracker` then checks the forecast on a network of that width.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.containers import Sequential
from ..layers.linear import Linear
from .motion import NTKTracker

__all__ = ["NTKChangeForecast", "asymptotic_exponent", "ntk_change_forecast"]

def asymptotic_exponent(net) -> float:
    """``alpha`` of the large-width law ``rho ~ c n^-alpha`` for an ntkit MLP: 1 if every
    activation is smooth, 3/4 if one has a derivative that jumps (`ABReLU` family with
    ``a != b``, ``RectifiedMonomial(1)``); see the module docstring.

    Raises:
        ValueError: for activations whose class this cannot tell (``Sign``, steps,
            user functions); pass ``exponent=`` yourself.
    """
    from ..layers.activations import ABReLU
    from ..layers.polynomial import RectifiedMonomial
    from ._split import smooth
    from .corrections import _parse

    exponent = 1.0
    for act in _parse(net, "asymptotic_exponent")[1]:
        if isinstance(act, ABReLU):
            kink = float(act.a) != float(act.b)
        elif isinstance(act, RectifiedMonomial) and act.degree >= 1:
            kink = act.degree == 1
        elif smooth(act):
            kink = False
        else:
            raise ValueError(f"asymptotic_exponent does not know how {act!r} behaves at large "
                             f"width (not a smooth activation nor one with a kink); pass "
                             f"exponent= yourself or fit it (exponent=None).")
        exponent = min(exponent, 0.75 if kink else 1.0)
    return exponent


@dataclass(frozen=True)
class NTKChangeForecast:
    """`ntk_change_forecast`'s result.

    Attributes:
        width: the width forecast for.
        predicted: the forecast mean relative change ``E rho(width)``.
        interval: a 95% bootstrap interval for ``predicted`` (over the ladder's seeds).
        spread: the relative spread of one network's ``rho`` about the mean (seed std /
            mean, averaged over the ladder): one network lands within about
            ``predicted * (1 +- 2 spread)``.
        exponent: ``alpha`` in ``rho = c n^-alpha`` (fitted unless it was given).
        coefficient: ``c``.
        widths: the ladder's widths.
        changes: ``(seeds, len(widths))`` measured relative changes on the ladder.
    """

    width: int
    predicted: float
    interval: tuple[float, float]
    spread: float
    exponent: float
    coefficient: float
    widths: tuple[int, ...]
    changes: Tensor

    def at(self, width: int) -> float:
        """The fitted law's mean relative change at another width."""
        return self.coefficient * float(width) ** (-self.exponent)

    def __repr__(self) -> str:
        lo, hi = self.interval
        return (f"NTKChangeForecast(width={self.width}: relative NTK change "
                f"{self.predicted:.3g} [{lo:.3g}, {hi:.3g}], one network +-{self.spread:.0%}; "
                f"law {self.coefficient:.3g} n^-{self.exponent:.3f} from widths "
                f"{list(self.widths)})")


def _at_width(net, width: int) -> Sequential:
    """The MLP description with every hidden layer ``width`` wide."""
    from .corrections import _parse

    linears, acts = _parse(net, "ntk_change_forecast")
    if not acts:
        raise ValueError("ntk_change_forecast needs at least one hidden layer: "
                         "nk.Sequential(nk.Linear(n), act, nk.Linear(k)).")
    layers: list = []
    for i, lin in enumerate(linears):
        out = width if i < len(acts) else lin.out_features
        layers.append(Linear(out, lin.w_std, lin.b_std, parameterization=lin.parameterization,
                             b_init=lin.b_init))
        if i < len(acts):
            layers.append(acts[i])
    return Sequential(*layers)


def _check(x, y, probe, width, widths, seeds, lr, steps, exponent, out_features):
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, features) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}.")
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise ValueError("y must be a floating tensor of targets, (N,) or (N, outputs).")
    y = y[:, None] if y.ndim == 1 else y
    if y.ndim != 2 or y.shape != (x.shape[0], out_features):
        raise ValueError(f"y must be ({x.shape[0]}, {out_features}) (one row per input, one "
                         f"column per network output), got {tuple(y.shape)}.")
    probe = x if probe is None else probe
    if not isinstance(probe, Tensor) or probe.ndim != 2 or probe.shape[1] != x.shape[1]:
        raise ValueError(f"probe must be (P, {x.shape[1]}) like x, got "
                         f"{getattr(probe, 'shape', type(probe).__name__)}.")
    for name, t in (("x", x), ("y", y), ("probe", probe)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has NaN or infinite entries; clean the data first.")
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if not ints(width):
        raise ValueError(f"width must be a positive int, got {width!r}.")
    if (not isinstance(widths, Sequence) or not all(ints(w) for w in widths)
            or len(set(widths)) != len(widths)):
        raise ValueError(f"widths must be distinct positive ints, got {widths!r}.")
    if len(widths) < (1 if exponent is not None else 2):
        raise ValueError("fitting the exponent needs at least two widths; give more widths "
                         "or fix exponent=.")
    if not ints(seeds) or seeds < 2:
        raise ValueError(f"seeds must be an int >= 2 (the spread needs two), got {seeds!r}.")
    if not ints(steps):
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}.")
    if exponent is not None and (not isinstance(exponent, (int, float))
                                 or not math.isfinite(exponent)):
        raise ValueError(f"exponent must be a finite number or None, got {exponent!r}.")
    return y, probe


def _relative_change(net, x, y, probe, *, width, lr, steps, seed, dtype) -> float:
    model = net.build((x.shape[1],), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x, y, probe = x.to(dtype), y.to(dtype), probe.to(dtype)
    tracker = NTKTracker(model, probe, every=steps)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training diverged (loss {float(loss.detach())}) at width {width} with lr={lr}; "
                f"lower the learning rate (gradient descent on this loss is stable below "
                f"2 N / lambda_max of the NTK on x).")
        loss.backward()
        opt.step()
    change = tracker.update(steps)
    if not math.isfinite(change):
        raise FloatingPointError(f"the NTK's change is not finite ({change}); lower lr.")
    return change


def _fit(widths: Tensor, means: Tensor, exponent: float | None) -> tuple[float, float]:
    """``(c, alpha)``: least squares on log-log axes, or with ``alpha`` given, ``c``
    from the widest ladder width (the one nearest the asymptotic regime)."""
    lw, lm = widths.log(), means.log()
    if exponent is None:
        a = torch.stack([torch.ones_like(lw), -lw], 1)
        sol = torch.linalg.lstsq(a, lm[:, None]).solution[:, 0]
        return float(sol[0].exp()), float(sol[1])
    return float((lm[-1] + exponent * lw[-1]).exp()), float(exponent)


def ntk_change_forecast(net, x: Tensor, y: Tensor, *, width: int, lr: float, steps: int,
                        probe: Tensor | None = None, widths: Sequence[int] = (64, 128, 256),
                        seeds: int = 4, exponent: float | str | None = "asymptotic",
                        seed: int = 0,
                        dtype: torch.dtype = torch.float64,
                        bootstrap: int = 400) -> NTKChangeForecast:
    """Forecasts the relative change of the empirical NTK of ``net`` at ``width`` after
    ``steps`` steps of full-batch gradient descent, from cheap networks of smaller width.

    Training: ``torch.optim.SGD(lr)`` on ``0.5 * mean_i ||f(x_i) - y_i||^2`` from
    ``net.build`` (the description's own parameterization; NTK parameterization is
    the one where the change vanishes with width), every hidden layer ``n`` wide. The
    change is ``||Theta_T - Theta_0||_F / ||Theta_0||_F`` on ``probe`` (`NTKTracker`).
    See the module docstring for the law ``c n^-alpha`` and where it comes from.

    Args:
        net: an ntkit MLP, ``nk.Sequential(nk.Linear(n), act, ..., nk.Linear(k))``; the
            hidden widths given are replaced.
        x, y: ``(N, d)`` inputs and ``(N, k)`` (or ``(N,)``) targets.
        width: the width to forecast for.
        lr: the learning rate.
        steps: the number of gradient-descent steps.
        probe: ``(P, d)`` inputs on which the NTK is compared (default ``x``).
        widths: the ladder of widths that are trained.
        seeds: networks per ladder width.
        exponent: ``"asymptotic"`` (`asymptotic_exponent`: 1 for smooth activations,
            3/4 with a kink) or a number, with ``c`` taken from the widest ladder
            width; or None to fit ``alpha`` on the ladder as well. In
            benchmarks/ntk_forecast.py, at 4-32x the widest ladder width, depth 1 and 2,
            the asymptotic exponent lands at 0.79-1.12x the mean of six measured networks
            (whose standard errors are 4-10%); the fitted one at 0.87-1.10x at depth 1
            but 0.53-1.37x at depth 2, where the ladder 64-256 is not yet in the
            large-width regime.
        seed: the first generator seed (seeds ``seed .. seed + seeds - 1`` at every width).
        dtype: the training dtype (float64 by default: the change is small).
        bootstrap: resamples of the seeds for the interval.
    """
    out_features = _at_width(net, 1).layers[-1].out_features
    if isinstance(exponent, str):
        if exponent != "asymptotic":
            raise ValueError(f"exponent must be 'asymptotic', a number or None (fit it), got "
                             f"{exponent!r}.")
        exponent = asymptotic_exponent(net)
    y, probe = _check(x, y, probe, width, widths, seeds, lr, steps, exponent, out_features)
    ladder = tuple(sorted(widths))
    changes = torch.tensor([[_relative_change(_at_width(net, n), x, y, probe, width=n, lr=lr,
                                              steps=steps, seed=seed + s, dtype=dtype)
                             for n in ladder] for s in range(seeds)], dtype=torch.float64)
    if not (changes > 0).all():
        raise ValueError("the NTK did not move on some ladder network (relative change 0); "
                         "a power law cannot be fitted. Train for more steps or with a "
                         "larger lr.")
    w = torch.tensor(ladder, dtype=torch.float64)
    c, alpha = _fit(w, changes.mean(0), exponent)
    if exponent is None and alpha < 0.25:
        warnings.warn(f"the NTK's change does not fall with width on this ladder (fitted "
                      f"exponent {alpha:.2f}; the kernel regime gives 3/4 to 1): standard "
                      f"parameterization, a learning rate near divergence or dead units. "
                      f"The forecast extrapolates a law that may not hold.", stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    resampled = []
    for _ in range(bootstrap):
        idx = torch.randint(seeds, (seeds, len(ladder)), generator=gen)
        cb, ab = _fit(w, changes.gather(0, idx).mean(0), exponent)
        resampled.append(cb * width ** (-ab))
    lo, hi = torch.tensor(resampled, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975],
                                                           dtype=torch.float64)).tolist()
    spread = float((changes.std(0) / changes.mean(0)).mean())
    return NTKChangeForecast(width=width, predicted=c * width ** (-alpha), interval=(lo, hi),
                             spread=spread, exponent=alpha, coefficient=c, widths=ladder,
                             changes=changes)

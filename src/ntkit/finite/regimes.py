"""The lazy and the feature-learning regimes side by side (``ntkit regimes``).

Trains the same one-hidden-layer ReLU MLP (`AbcMLP`) on digits at several widths with
full-batch SGD on the mean squared error of one-hot labels, under

- NTK parameterization (``"ntk"``),
- muP (``"mup"``; Yang & Hu 2021),
- standard parameterization with muP's per-layer learning rates (``"sp_mup_lr"``:
  the learning rates that are right for muP but wrong for this initialisation),

all equal to standard parameterization at the base width (the same network there),
and measures after training, averaged over seeds:

- the relative change of the empirical NTK on a probe batch,
  ``||Theta_T - Theta_0||_F / ||Theta_0||_F``, where each parameter's part is weighted
  by its learning-rate multiplier (``Theta = sum_p m^{-c_p} J_p J_p^T``, traced over the
  outputs: the kernel that drives the outputs under those learning rates), computed in
  closed form for one hidden layer (`weighted_ntk`);
- the test loss;
- the learned features' distance from initialisation,
  ``||h_T - h_0||_F / ||h_0||_F`` of the hidden layer's activations on the probe;

and the slope of each against width on log-log axes.

The readout starts small (``readout_std = 0.1``, as muP is used in practice: Yang et al.
2021, "Tensor Programs V", sec. 3, initialise the readout at or near zero). With the
readout at its full standard scale the NTK's change at the base width is dominated by
a finite-width part that both parameterizations share (they coincide there) and that
falls like ``1/width``; muP's curve then only flattens from width ~512 (relative change
0.55 at 64, 0.03-0.07 from 512 on). A small readout keeps that part small, so muP's
limit shows at every width.

What to expect (measured, README): under NTK parameterization the features move like
``width^(-1/2)`` and the NTK like ``width^(-1)`` (the kernel regime: Jacot et al. 2018;
the NTK's rate of change is ``O(1/width)``, Dyer & Gur-Ari 2020, sec. 3; the
``O(width^(-1/2))`` of Lee et al. 2019, Thm. 2.1, is an upper bound); under muP both stay
of order one (feature learning survives the limit); standard parameterization with muP's
learning rates is unstable and moves the NTK more as the width grows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .params import AbcMLP, abc_exponents, param_groups

__all__ = ["regimes", "regimes_figure", "weighted_ntk"]

PARAMETERIZATIONS = ("ntk", "mup", "sp_mup_lr")
LABELS = {"ntk": "NTK param.", "mup": "muP", "sp_mup_lr": "standard + muP lr"}
KEYS = ("ntk_change", "test_loss", "feature_distance", "train_loss")


def weighted_ntk(model: AbcMLP, x: Tensor) -> Tensor:
    """The learning-rate-weighted empirical NTK of a one-hidden-layer ReLU `AbcMLP`, traced
    over the outputs, in closed form.

    With ``z = m_0 x W_0^T + b_0``, ``h = relu(z)``, ``f = m_1 h W_1^T + b_1`` and
    learning-rate multipliers ``l`` (`AbcMLP.lr_multipliers`)::

        Theta(x, x') = sum_k [ l_W1 m_1^2 h.h' + l_b1
                               + m_1^2 (l_W0 m_0^2 x.x' + l_b0) sum_j W_1[k,j]^2 relu'(z_j) relu'(z'_j) ]

    equal to ``sum_p l_p J_p J_p^T`` from `ntkit.empirical_ntk_by_layer`.

    Args:
        model: an `AbcMLP` with one hidden layer and ReLU.
        x: ``(P, in_features)`` probe inputs.

    Returns:
        ``(P, P)``.
    """
    if len(model.weights) != 2 or model.activation is not torch.relu:
        raise ValueError("weighted_ntk is written for a one-hidden-layer ReLU AbcMLP; use "
                         "ntkit.empirical_ntk_by_layer for other networks.")
    (lw0, lb0), (lw1, lb1) = model.lr_multipliers()
    m0, m1 = model.multipliers
    with torch.no_grad():
        w0, b0, w1 = (p.detach() for p in (model.weights[0], model.biases[0],
                                            model.weights[1]))
        z = x @ w0.T * m0 + b0
        h, d = torch.relu(z), (z > 0).to(z.dtype)
        readout = (w1 ** 2).sum(0)  # sum_k W_1[k, j]^2
        k = w1.shape[0]
        first = (d * readout) @ d.T * m1 ** 2 * (lw0 * m0 ** 2 * (x @ x.T) + lb0)
        return first + k * (lw1 * m1 ** 2 * (h @ h.T) + lb1)


def _abc(name: str) -> dict:
    if name == "sp_mup_lr":
        mup = abc_exponents("mup", "sgd", 1)
        return {**abc_exponents("standard", "sgd", 1), "c": mup["c"], "c_bias": mup["c_bias"]}
    return abc_exponents(name, "sgd", 1)


def _slope(widths: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of ``log value`` against ``log width`` (nan when a value is not
    a positive finite number)."""
    if len(widths) < 2 or not all(math.isfinite(v) and v > 0 for v in values):
        return math.nan
    lx = [math.log(w) for w in widths]
    ly = [math.log(v) for v in values]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return (sum((a - mx) * (b - my) for a, b in zip(lx, ly))
            / sum((a - mx) ** 2 for a in lx))


def regimes(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
            widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096), steps: int = 100,
            lr: float = 0.2, base_width: int = 64, probe: int = 64, seed: int = 0,
            seeds: int = 1, readout_std: float = 0.1,
            parameterizations: Sequence[str] = PARAMETERIZATIONS) -> dict:
    """Trains at each width and parameterization; returns the three measurements.

    Args:
        x_train, y_train: ``(N, d)`` inputs and ``(N, k)`` targets.
        x_test, y_test: held-out inputs and targets.
        widths: hidden widths.
        steps: full-batch SGD steps.
        lr: learning rate at the base width (each parameterization scales it per layer).
        base_width: the width where all parameterizations equal the standard one.
        probe: number of training inputs on which the NTK and the features are watched.
        seed: seed of the first initialisation.
        seeds: number of initialisations (``seed, seed + 1, ...``) averaged over.
        readout_std: the readout's initial weight scale at the base width (the hidden
            layer's is 1).
        parameterizations: a subset of ``("ntk", "mup", "sp_mup_lr")``.

    Returns:
        ``{"widths": [...], "ntk": {...}, "mup": {...}, "sp_mup_lr": {...}, "slopes": {...}}``
        with, per parameterization, lists over widths of the mean over seeds of
        ``"ntk_change"``, ``"test_loss"``, ``"feature_distance"``, ``"train_loss"``, their
        ``"<key>_seeds"`` (one list per width) and ``"diverged"`` (runs whose loss stopped
        being finite: their measurements are inf); ``"slopes"[name][key]`` is the
        log-log slope against width of ``ntk_change`` and ``feature_distance``.
    """
    unknown = sorted(set(parameterizations) - set(PARAMETERIZATIONS))
    if unknown:
        raise ValueError(f"unknown parameterizations {unknown}; choose from "
                         f"{list(PARAMETERIZATIONS)}.")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}.")
    if not readout_std > 0:
        raise ValueError(f"readout_std must be positive, got {readout_std!r}.")
    widths = [int(w) for w in widths]
    out: dict = {"widths": widths, "steps": steps, "lr": lr, "base_width": base_width,
                 "seeds": seeds, "readout_std": readout_std, "slopes": {}}
    xp = x_train[:probe]
    for name in parameterizations:
        rows: dict[str, list] = {f"{key}_seeds": [] for key in KEYS}
        rows["diverged"] = []
        for width in widths:
            runs = [_train(name, width, s, x_train, y_train, x_test, y_test, xp, steps=steps,
                           lr=lr, base_width=base_width, readout_std=readout_std)
                    for s in range(seed, seed + seeds)]
            for key in KEYS:
                rows[f"{key}_seeds"].append([r[key] for r in runs])
            rows["diverged"].append(sum(not math.isfinite(r["train_loss"]) for r in runs))
        for key in KEYS:
            rows[key] = [sum(v) / len(v) for v in rows[f"{key}_seeds"]]
        out[name] = rows
        out["slopes"][name] = {key: _slope(widths, rows[key])
                               for key in ("ntk_change", "feature_distance")}
    return out


def _train(name: str, width: int, seed: int, x_train: Tensor, y_train: Tensor,
           x_test: Tensor, y_test: Tensor, xp: Tensor, *, steps: int, lr: float,
           base_width: int, readout_std: float) -> dict[str, float]:
    model = AbcMLP(x_train.shape[1], width, y_train.shape[1], 1, parameterization=None,
                   abc=_abc(name), optimizer="sgd", base_width=base_width,
                   w_std=[1.0, readout_std], generator=torch.Generator().manual_seed(seed),
                   dtype=x_train.dtype)

    def features() -> Tensor:
        record: list = []
        with torch.no_grad():
            model(xp, record=record)
        return torch.relu(record[0])

    theta0, h0 = weighted_ntk(model, xp), features()
    opt = torch.optim.SGD(param_groups(model, lr=lr), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x_train) - y_train) ** 2).mean()
        if not torch.isfinite(loss):
            return dict.fromkeys(KEYS, math.inf)
        loss.backward()
        opt.step()
    with torch.no_grad():
        result = {"train_loss": float(((model(x_train) - y_train) ** 2).mean()),
                  "test_loss": float(((model(x_test) - y_test) ** 2).mean()),
                  "feature_distance": float((features() - h0).norm() / h0.norm()),
                  "ntk_change": float((weighted_ntk(model, xp) - theta0).norm()
                                      / theta0.norm())}
    return {k: (v if math.isfinite(v) else math.inf) for k, v in result.items()}


def regimes_figure(result: dict):
    """Three panels against width: relative NTK change, test loss, feature distance, with
    the fitted slopes in the legend and ``width^(-1/2)``, ``width^(-1)`` guides. Returns
    the matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    widths = result["widths"]
    names = [n for n in PARAMETERIZATIONS if n in result]
    panels = (("ntk_change", "relative NTK change"), ("test_loss", "test loss (MSE)"),
              ("feature_distance", "feature distance from init"))
    for ax, (key, label) in zip(axes, panels):
        finite = [v for n in names for v in result[n][key] if math.isfinite(v)]
        top = max(finite) * 2 if finite else 1.0
        for name, style in zip(names, ("o-", "s-", "^--")):
            values = result[name][key]
            slope = result["slopes"].get(name, {}).get(key)
            tag = f" (slope {slope:+.2f})" if slope is not None and math.isfinite(slope) else ""
            ax.plot(widths, [v if math.isfinite(v) else top for v in values], style,
                    label=LABELS[name] + tag)
            spread = [_spread(s) for s in result[name][f"{key}_seeds"]]
            if any(s > 0 for s in spread):
                ax.errorbar(widths, values, yerr=spread, fmt="none", ecolor="gray", lw=0.8)
            for w, v in zip(widths, values):
                if not math.isfinite(v):
                    ax.annotate("diverged", (w, top), fontsize=6, ha="center")
        if key != "test_loss" and "ntk" in result:
            ref = result["ntk"][key][0]
            for power, line in ((0.5, "k:"), (1.0, "k-.")):
                ax.plot(widths, [ref * (widths[0] / w) ** power for w in widths], line, lw=0.8,
                        label=f"width^-{power:g}")
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_title(label)
        ax.legend(fontsize=6)
    fig.suptitle(f"lazy (NTK param.) vs feature learning (muP): {result['steps']} SGD steps, "
                 f"lr {result['lr']} at width {result['base_width']}, "
                 f"{result.get('seeds', 1)} seed(s)", fontsize=9)
    fig.tight_layout()
    return fig


def _spread(values: Sequence[float]) -> float:
    """Standard error of the mean over seeds (0 for one seed or non-finite values)."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return 0.0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var / len(values))

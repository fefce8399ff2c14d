"""The lazy and the feature-learning regimes side by side (``ntkit regimes``).

Trains the same one-hidden-layer MLP (`AbcMLP`) on digits at several widths under
NTK parameterization and under muP (both equal to standard parameterization at the
base width, so they start from the same network there) with full-batch SGD on the
mean squared error of one-hot labels, and measures after training:

- the relative change of the empirical NTK on a probe batch,
  ``||Theta_T - Theta_0||_F / ||Theta_0||_F``, with each parameter's part weighted by
  its learning-rate multiplier (``Theta = sum_p m^{-c_p} J_p J_p^T``, the kernel that
  drives the outputs under those learning rates; `ntkit.empirical_ntk_by_layer`);
- the test loss;
- the learned features' distance from initialisation,
  ``||h_T - h_0||_F / ||h_0||_F`` of the hidden layer's activations on the probe.

Under NTK parameterization the first and last fall with width (Jacot et al. 2018;
Lee et al. 2019: the kernel regime); under muP they stay of order one (Yang & Hu
2021: feature learning survives the limit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .params import AbcMLP, param_groups

__all__ = ["regimes", "regimes_figure"]

PARAMETERIZATIONS = ("ntk", "mup")


def regimes(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
            widths: Sequence[int] = (64, 256, 1024, 4096), steps: int = 100, lr: float = 0.5,
            base_width: int = 64, probe: int = 32, seed: int = 0) -> dict:
    """Trains at each width and parameterization; returns the three measurements.

    Args:
        x_train, y_train: ``(N, d)`` inputs and ``(N, k)`` targets.
        x_test, y_test: held-out inputs and targets.
        widths: hidden widths.
        steps: full-batch SGD steps.
        lr: learning rate at the base width (muP scales it per layer).
        base_width: the width where both parameterizations equal the standard one.
        probe: number of training inputs on which the NTK and the features are watched.
        seed: seed of every initialisation.

    Returns:
        ``{"widths": [...], "ntk": {...}, "mup": {...}}`` with, per parameterization,
        lists over widths: ``"ntk_change"``, ``"test_loss"``, ``"feature_distance"``,
        ``"train_loss"``.
    """
    from ..empirical import empirical_ntk_by_layer

    def weighted_ntk(model: AbcMLP) -> Tensor:
        parts = empirical_ntk_by_layer(model, xp, by="parameter")
        total = 0
        for layer, (wm, bm) in enumerate(model.lr_multipliers()):
            total = total + wm * parts[f"weights.{layer}"] + bm * parts[f"biases.{layer}"]
        return total

    widths = [int(w) for w in widths]
    out: dict = {"widths": widths, "steps": steps, "lr": lr, "base_width": base_width}
    xp = x_train[:probe]
    for name in PARAMETERIZATIONS:
        rows: dict[str, list[float]] = {"ntk_change": [], "test_loss": [],
                                        "feature_distance": [], "train_loss": []}
        for width in widths:
            model = AbcMLP(x_train.shape[1], width, y_train.shape[1], 1,
                           parameterization=name, optimizer="sgd", base_width=base_width,
                           generator=torch.Generator().manual_seed(seed), dtype=x_train.dtype)
            features = lambda model=model: torch.relu(_first(model, xp))
            theta0 = weighted_ntk(model)
            h0 = features().detach()
            opt = torch.optim.SGD(param_groups(model, lr=lr), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                loss = ((model(x_train) - y_train) ** 2).mean()
                loss.backward()
                opt.step()
            with torch.no_grad():
                rows["train_loss"].append(float(((model(x_train) - y_train) ** 2).mean()))
                rows["test_loss"].append(float(((model(x_test) - y_test) ** 2).mean()))
                rows["feature_distance"].append(float((features() - h0).norm() / h0.norm()))
            theta = weighted_ntk(model)
            rows["ntk_change"].append(float((theta - theta0).norm() / theta0.norm()))
        out[name] = rows
    return out


def _first(model: AbcMLP, x: Tensor) -> Tensor:
    record: list = []
    model(x, record=record)
    return record[0]


def regimes_figure(result: dict):
    """Three panels against width: relative NTK change, test loss, feature distance.
    Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    widths = result["widths"]
    panels = (("ntk_change", "relative NTK change"), ("test_loss", "test loss (MSE)"),
              ("feature_distance", "feature distance from init"))
    for ax, (key, label) in zip(axes, panels):
        for name, style in zip(PARAMETERIZATIONS, ("o-", "s-")):
            ax.plot(widths, result[name][key], style,
                    label={"ntk": "NTK param.", "mup": "muP"}[name])
        if key != "test_loss":
            ref = result["ntk"][key][0]
            ax.plot(widths, [ref * (widths[0] / w) ** 0.5 for w in widths], "k:", lw=1,
                    label="1/sqrt(width)")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_title(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"lazy (NTK) vs feature learning (muP): {result['steps']} SGD steps, "
                 f"lr {result['lr']} at width {result['base_width']}", fontsize=9)
    fig.tight_layout()
    return fig

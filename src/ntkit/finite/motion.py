"""The NTK's motion during training: its derivative along a step, and a tracker.

At finite width the empirical NTK ``Theta(theta) = J(x1) J(x2)^T`` moves when the
parameters move. Along a parameter step ``delta`` (e.g. one gradient-descent
update ``delta = -lr grad L``) its first-order change is the directional
derivative::

    d/de Theta(theta + e delta) |_{e=0} = sum_mu dNTK_mu delta_mu

the dNTK of Roberts, Yaida & Hanin 2022 (PDLT ch. 11, eq. 11.8) contracted with
the step, or the first equation of the neural tangent hierarchy (Huang & Yau 2020,
eq. 2.6 with the GD step). `ntk_velocity` computes it exactly by forward-mode
autodiff (`torch.func.jvp`) through the empirical NTK written with
`torch.func.jacrev`; `gradient_step` gives the GD step of a loss; `NTKTracker`
records the empirical NTK's relative distance from its start along a real
training run, every ``every`` steps on a probe batch (with `ntkit.empirical_ntk`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["NTKTracker", "gradient_step", "ntk_velocity"]


def _params(model: nn.Module) -> dict[str, Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters, so its NTK "
                         f"is zero and does not move; give a model with parameters.")
    return params


def _check_step(step: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(step, dict):
        raise TypeError(f"step must be a dict {{parameter name: tensor}} like "
                        f"model.named_parameters(), got {type(step).__name__}.")
    missing = sorted(set(params) - set(step))
    extra = sorted(set(step) - set(params))
    if missing or extra:
        raise ValueError(f"step must have one tensor per trainable parameter; missing "
                         f"{missing}, unknown {extra}.")
    for k, v in step.items():
        if tuple(v.shape) != tuple(params[k].shape):
            raise ValueError(f"step[{k!r}] has shape {tuple(v.shape)}, but the parameter has "
                             f"{tuple(params[k].shape)}.")
    return {k: step[k].to(params[k].dtype) for k in params}


def _ntk_function(model: nn.Module, x1: Tensor, x2: Tensor | None):
    """``params -> Theta(x1, x2)`` traced over the outputs, ``(N1, N2)``."""

    def jac(p, x):
        out = lambda q: torch.func.functional_call(model, q, (x,)).reshape(x.shape[0], -1)
        j = torch.func.jacrev(out)(p)
        return torch.cat([v.reshape(x.shape[0], v.shape[1], -1) for v in j.values()], -1)

    def ntk(p):
        j1 = jac(p, x1)
        j2 = j1 if x2 is None else jac(p, x2)
        return torch.einsum("iap,jap->ij", j1, j2)

    return ntk


def ntk_velocity(model: nn.Module, x1: Tensor, x2: Tensor | None = None, *,
                 step: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The empirical NTK and its directional derivative along a parameter step.

    Args:
        model: any `torch.nn.Module` that treats examples independently.
        x1: ``(N1, ...)`` inputs.
        x2: ``(N2, ...)`` inputs, or None for ``x1``.
        step: ``{name: tensor}``, one tensor per trainable parameter (e.g. from
            `gradient_step`).

    Returns:
        ``(ntk, velocity)``, both ``(N1, N2)`` traced over the outputs:
        ``Theta`` and ``d/de Theta(theta + e step)`` at ``e = 0``.
    """
    params = _params(model)
    step = _check_step(step, params)
    return torch.func.jvp(_ntk_function(model, x1, x2), (params,), (step,))


def gradient_step(model: nn.Module, loss_fn: Callable[[Tensor], Tensor], *,
                  learning_rate: float) -> dict[str, Tensor]:
    """The plain gradient-descent step ``-learning_rate * grad loss`` of every trainable
    parameter, as ``{name: tensor}`` (the model is not changed).

    Args:
        model: the model.
        loss_fn: ``model -> scalar loss`` (e.g. ``lambda m: ((m(x) - y) ** 2).mean()``).
        learning_rate: the step size.
    """
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    if not names:
        raise ValueError(f"{type(model).__name__} has no trainable parameters.")
    loss = loss_fn(model)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn(model) must return a scalar tensor.")
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[k] for k in names])
    return {k: -learning_rate * g.detach() for k, g in zip(names, grads)}


class NTKTracker:
    """Records the empirical NTK's distance from its start along training.

    Call `update(step)` after each optimizer step (or every step: only every
    ``every``-th computes anything). Distance: ``||Theta_t - Theta_0||_F /
    ||Theta_0||_F`` on the probe batch, with ``Theta`` traced over the outputs.

    Args:
        model: the model being trained.
        probe: ``(P, ...)`` inputs on which the NTK is watched (keep it small).
        every: compute the NTK every ``every`` steps.
        keep_kernels: also keep every computed NTK in `kernels`.

    Attributes:
        steps: the steps at which the NTK was computed (0 first).
        distance: the relative distances from the NTK at step 0.
        kernels: the NTKs ``(P, P)`` when ``keep_kernels``.
    """

    def __init__(self, model: nn.Module, probe: Tensor, *, every: int = 1,
                 keep_kernels: bool = False) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}.")
        self.model, self.probe, self.every = model, probe, every
        self.keep_kernels = keep_kernels
        self.initial = self._ntk()
        norm = torch.linalg.norm(self.initial)
        if norm == 0:
            raise ValueError("the NTK on the probe batch is zero at the start, so a relative "
                             "distance is undefined; use other probe inputs.")
        self._norm = norm
        self.steps: list[int] = [0]
        self.distance: list[float] = [0.0]
        self.kernels: list[Tensor] = [self.initial] if keep_kernels else []

    def _ntk(self) -> Tensor:
        from ..empirical import empirical_ntk

        return empirical_ntk(self.model, self.probe).detach()

    def update(self, step: int) -> float | None:
        """Computes and records the distance if ``step`` is a multiple of ``every``.

        Returns:
            The distance, or None when nothing was computed.
        """
        if step % self.every:
            return None
        theta = self._ntk()
        dist = float(torch.linalg.norm(theta - self.initial) / self._norm)
        self.steps.append(int(step))
        self.distance.append(dist)
        if self.keep_kernels:
            self.kernels.append(theta)
        return dist

"""The empirical NNGP: the covariance of a finite network's outputs or features."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._budget import parse_memory
from ..errors import check_finite_output
from ..kernel import same_inputs
from ._problem import call_model, check_batch, check_dtypes, stochastic_modules
from ._tiles import mirrored


def empirical_nngp(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    layer: str | None = None,
    output: Literal["mean", "full", "diagonal"] = "mean",
    memory_budget: int | str | None = None,
) -> Tensor:
    """The covariance of a finite network's outputs, or of a named layer's features.

    With features ``z(x)`` of shape ``(C, *S)`` per example (channels first,
    ``S`` the spatial axes, if any), ``"mean"`` gives
    ``(1/C) sum_c z_c(x1) z_c(x2)`` at matching positions, shape ``(N1, N2, *S)``:
    one network's estimate of the infinite-width NNGP of that layer (compare
    with ``net.kernel(x1, x2).nngp`` of the matching ntkit network).
    ``"full"`` gives every product ``z_a(x1) z_b(x2)`` of the flattened
    features, ``(N1, N2, F, F)``; ``"diagonal"`` the products of matching
    features, ``(N1, N2, F)``.

    Args:
        model: any `torch.nn.Module`; it is run as it is (train or eval mode).
        x1, x2: input batches ``(N1, ...)``, ``(N2, ...)``; ``x2=None`` for
            ``K(x1, x1)``, which is computed from one pass over ``x1`` and is exactly
            symmetric. ``x2`` that is ``x1`` (`ntkit.kernel.same_inputs`: the same
            tensor, or a view of the same data) is taken as None,
            except that with Dropout in training mode only ``x1`` itself is (a
            copy is a second pass, with masks of its own).
        layer: the name of a submodule (as in ``model.named_modules()``) whose
            output is used; default the model's output.
        output: ``"mean"``, ``"full"`` or ``"diagonal"``.
        memory_budget: bytes or a string such as ``"2GiB"``; inputs are run in
            chunks of about this size of features.

    Returns:
        The covariance in the features' dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if output not in ("mean", "full", "diagonal"):
        raise ValueError(f"output must be one of ('mean', 'full', 'diagonal'), got {output!r}.")
    x1 = check_batch(x1, "x1")
    x2 = None if x2 is None else check_batch(x2, "x2")
    if same_inputs(x1, x2) and (x2 is x1 or not stochastic_modules(model)):
        x2 = None
    check_dtypes(dict(model.named_parameters()), x1, x2)
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        near = [n for n in modules if n and layer in n][:5]
        raise ValueError(
            f"{type(model).__name__} has no submodule named {layer!r}; names are those of "
            f"model.named_modules()" + (f", e.g. {near}." if near else
                                        f": {[n for n in modules if n][:8]}.")
        )
    budget = parse_memory(memory_budget)

    def features(x: Tensor) -> Tensor:
        got: list[Tensor] = []
        hook = None
        if layer is not None:
            hook = modules[layer].register_forward_hook(lambda m, a, o: got.append(o))
        try:
            with torch.no_grad():
                out = call_model(model, x)
        finally:
            if hook is not None:
                hook.remove()
        z = out if layer is None else (got[0] if got else None)
        if not isinstance(z, Tensor) or z.ndim < 1 or z.shape[0] != x.shape[0]:
            what = "the model" if layer is None else f"layer {layer!r}"
            raise TypeError(f"{what} must produce a tensor (N, *features) for a batch of N "
                            f"inputs, got {type(z).__name__}"
                            + (f" of shape {tuple(z.shape)}." if isinstance(z, Tensor) else "."))
        return z.reshape(z.shape[0], -1) if output != "mean" else z

    first = features(x1[:1])
    per_example = first[0].numel() * first.element_size()
    rows = max(1, budget // (2 * per_example))
    z1 = torch.cat([features(x1[i:i + rows]) for i in range(0, x1.shape[0], rows)])
    z2 = z1 if x2 is None else torch.cat([features(x2[i:i + rows])
                                          for i in range(0, x2.shape[0], rows)])
    if output == "full":
        k = torch.einsum("ia,jb->ijab", z1, z2)
    elif output == "diagonal":
        k = torch.einsum("ia,ja->ija", z1, z2)
    elif z1.ndim == 1:
        k = z1[:, None] * z2[None, :]
    else:
        c = z1.shape[1]
        a = z1.movedim(1, -1).reshape(z1.shape[0], -1, c)   # (N1, P, C)
        b = z2.movedim(1, -1).reshape(z2.shape[0], -1, c)
        k = torch.einsum("ipc,jpc->ijp", a, b) / c
        k = k.reshape(z1.shape[0], z2.shape[0], *z1.shape[2:])
    if x2 is None:  # the products need not round (i, j) and (j, i) alike
        k = k.add_(mirrored(k, full=output == "full").clone(
            memory_format=torch.contiguous_format)).mul_(0.5)
    return check_finite_output(k, "empirical_nngp(...)", causes="empirical")


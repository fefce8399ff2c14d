"""The public empirical-NTK calls: the total kernel, and its parts per layer."""

from __future__ import annotations

import warnings
from typing import Literal

from torch import Tensor, nn

from ..errors import check_finite_output
from ._choice import choose
from ._problem import Problem
from ._tiles import Group, tiled

Output = Literal["trace", "full", "diagonal"]
Method = Literal["auto", "jacobian", "vector_products", "structured"]
METHODS = ("auto", "jacobian", "vector_products", "structured")


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    output: Output = "trace",
    method: Method = "auto",
    params: dict[str, Tensor] | None = None,
    by_layer: bool | Literal["parameter", "module"] = False,
    memory_budget: int | str | None = None,
    progress: bool | None = None,
) -> Tensor | dict[str, Tensor]:
    """The finite-width NTK ``J(x1) J(x2)^T`` of ``model`` at its parameters.

    Args:
        model: any `torch.nn.Module` mapping a batch ``(N, ...)`` to outputs
            ``(N, *out)``; it must treat examples independently (call
            ``model.eval()`` for BatchNorm or Dropout).
        x1, x2: input batches ``(N1, ...)``, ``(N2, ...)`` (any dtype the model
            takes, e.g. token ids); ``x2=None`` for ``Theta(x1, x1)``, computed once
            per pair of examples and exactly symmetric. ``x2`` that is ``x1`` (the
            same tensor, or a view of the same data) is taken as None.
        output: ``"trace"``: ``sum_a Theta[i, j, a, a]`` over the flattened
            outputs ``a``, shape ``(N1, N2)`` (divide by the number of outputs
            for the per-output mean that approaches the infinite-width NTK);
            ``"full"``: ``(N1, N2, O, O)``; ``"diagonal"``: ``(N1, N2, O)``.
        method: ``"structured"``, ``"jacobian"``, ``"vector_products"`` (see
            `ntkit.empirical`) or ``"auto"``: ``"structured"`` (which chooses the
            cheaper contraction per layer) where its Linear and Conv layers promise to
            save a quarter of ``"jacobian"``'s operations (wide dense layers, many
            outputs), else ``"jacobian"`` (small models, e.g. a width-64 transformer,
            where the structured check costs more than it saves); ``"vector_products"``
            when one example's Jacobian parts exceed the memory budget.
        params: the parameters to differentiate, ``{name: tensor}``; default
            every parameter with ``requires_grad``. The others are held fixed.
        by_layer: deprecated, use `empirical_ntk_by_layer` (``True`` is
            ``by="parameter"``); returns that function's dict for one release.
        memory_budget: bytes, or a string such as ``"2GiB"``, for the working
            memory of a chunk of inputs (default 1 GiB); the result is extra.
        progress: show a progress bar over chunks (default: when long).

    Returns:
        The kernel in the parameters' dtype, on their device.

    Raises:
        ValueError: NaN or infinite entries in ``x1`` or ``x2`` (refused before any work).
        ntkit.errors.NonFiniteError: the kernel came out NaN or infinite (overflow).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 2))
        >>> empirical_ntk(model, torch.randn(5, 3), output="full").shape
        torch.Size([5, 5, 2, 2])
    """
    if by_layer is not False and by_layer is not None:
        if by_layer is True:
            by_layer = "parameter"
        if by_layer not in ("parameter", "module"):
            raise ValueError(f"by_layer must be False, True, 'parameter' or 'module', got "
                             f"{by_layer!r}.")
        warnings.warn(
            f"empirical_ntk(by_layer=...) is deprecated and will be removed in the next "
            f"release; use nk.empirical_ntk_by_layer(model, x1, x2, by={by_layer!r}), which "
            f"always returns a dict.", DeprecationWarning, stacklevel=2)
        return empirical_ntk_by_layer(model, x1, x2, by=by_layer, output=output,
                                      method=method, params=params,
                                      memory_budget=memory_budget, progress=progress)
    k = _run(model, x1, x2, None, output, method, params, memory_budget, progress)[""]
    return check_finite_output(k, "empirical_ntk(...)", causes="empirical")


def empirical_ntk_by_layer(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    by: Group = "module",
    output: Output = "trace",
    method: Method = "auto",
    params: dict[str, Tensor] | None = None,
    memory_budget: int | str | None = None,
    progress: bool | None = None,
) -> dict[str, Tensor]:
    """The parts of the empirical NTK ``J(x1) J(x2)^T`` that each layer's parameters add.

    ``Theta = sum_p J_p(x1) J_p(x2)^T`` over the parameters ``p``; this returns the
    terms grouped by module (or one per parameter), which sum to `empirical_ntk`.

    Args:
        model, x1, x2, output, method, params, memory_budget, progress: as for
            `empirical_ntk` (``x2`` that is ``x1`` takes the symmetric path there too).
        by: ``"module"``: ``{module name: its parameters' part}`` (the names of
            ``model.named_modules()``; ``""`` for the model's own parameters);
            ``"parameter"``: ``{parameter name: its part}``.

    Returns:
        A dict of kernels, each of the shape `empirical_ntk` returns for ``output``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 2))
        >>> sorted(empirical_ntk_by_layer(model, torch.randn(5, 3)))
        ['0', '2']
    """
    if by not in ("parameter", "module"):
        raise ValueError(f"by must be 'parameter' or 'module', got {by!r}.")
    parts = _run(model, x1, x2, by, output, method, params, memory_budget, progress)
    return check_finite_output(parts, "empirical_ntk_by_layer(...)", causes="empirical")


def _run(model, x1, x2, group: Group | None, output, method, params, memory_budget,
         progress) -> dict[str, Tensor]:
    """Checks the call, picks the engine, and assembles the kernel (`tiled`)."""
    problem = Problem.make(model, x1, x2, params, output, memory_budget)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    problem.check_result_fits()
    _, engine = choose(problem, method, group is not None)
    return tiled(problem, engine, group, progress)

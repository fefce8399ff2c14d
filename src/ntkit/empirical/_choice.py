"""The engine an empirical-NTK call runs on, and the rule behind ``method="auto"``.

``"structured"`` pays a fixed price before any kernel entry: a forward pass that
finds the Linear and Conv layers and their shapes, one example's forward and backward
passes that check the rule against autograd (`_structured.verified`), and hooks on
every call of those layers. It pays that back only where its contractions are
cheaper than contracting per-example Jacobians: Gram matrices for wide dense layers
(``sum_{p,q} <g_iap, g_jbq> <u_ip, u_jq>``, far fewer operations when the weight has
more entries than positions squared), or cotangents that factor per channel
(`_jacobian.separable`). For small models with few outputs (a 2-layer transformer of
width 64 on 16 inputs) neither is the case: its layers cost as much formed from
cotangents as through autograd, so ``"auto"`` takes ``"jacobian"`` there, as the
torch.func tutorial does, without the fixed price.
"""

from __future__ import annotations

from torch import nn

from ._jacobian import Jacobians, contraction_costs
from ._problem import Problem
from ._structured import Site, layer_kind, structured_sites, verified
from ._vector_products import VectorProducts

#: the share of the Jacobian contraction's operations that ``"structured"`` must be
#: expected to save for ``"auto"`` to take it
STRUCTURED_SAVING = 0.25


def structured_saving(problem: Problem, sites: list[Site]) -> float:
    """The share of ``"jacobian"``'s operations that ``"structured"`` can save.

    ``"jacobian"`` forms ``N O P`` Jacobian entries for ``P`` parameters (``N`` the
    examples formed: ``N1``, or ``N1 + N2`` unless symmetric) and contracts them in
    ``N1 N2 O' P`` multiply-adds (``O' = O^2`` for ``output="full"``, ``O`` otherwise).
    A site's weight saves ``jac - gram`` where the Gram contraction is cheaper and fits
    (`_jacobian.contraction_costs`); one that may factor per channel (``O >= 4``
    outputs, ``P >= 2`` positions: the precondition of `_jacobian.separable`, whose
    data-dependent test comes later) can save up to ``N1 N2 (O' - 1) G C K`` of its
    contraction. That is counted for convolutions only (the last one before a global
    pooling and a dense readout is the case it serves); a Linear layer over positions
    (a transformer's) rarely factors, and counting it would send small transformers
    the structured way for nothing. The bound is optimistic, so the threshold
    (`STRUCTURED_SAVING`) is not small.

    Args:
        problem: the checked call.
        sites: candidate sites with their ``sizes`` (`structured_sites(verify=False)`).

    Returns:
        saved / total operations, in ``[0, 1]``.
    """
    n1, n2 = problem.x1.shape[0], problem.xs2.shape[0]
    o = problem.n_out
    o2 = o * o if problem.output == "full" else o
    formed = n1 if problem.x2 is None else n1 + n2
    n_params = sum(p.numel() for p in problem.params.values())
    total = (formed * o + n1 * n2 * o2) * n_params
    saved = 0
    for s in sites:
        if s.weight is None or s.sizes is None:
            continue
        jac, gram, fits = contraction_costs(problem, s.sizes, n1, n2)
        groups, p, k, c = s.sizes
        if gram < jac and fits:
            saved += jac - gram
        elif o >= 4 and p >= 2 and layer_kind(s.module) == "conv":
            saved += n1 * n2 * (o2 - 1) * groups * c * k
    return min(1.0, saved / max(1, total))


def choose(problem: Problem, method: str, split: bool) -> tuple[str, object]:
    """``(method run, engine)`` for a checked call.

    Explicit methods are taken as given. ``"auto"``: ``"structured"`` when the
    candidate sites promise to save `STRUCTURED_SAVING` of the operations (their shapes
    from one forward pass; the autograd check only then), else ``"jacobian"``; either
    falls back to ``"structured"`` (whose Gram sites hold less), then to
    ``"vector_products"``, when one example's Jacobian parts exceed the memory budget.

    Args:
        problem: the checked call.
        method: ``"auto"``, ``"jacobian"``, ``"structured"`` or ``"vector_products"``.
        split: whether the kernel is wanted per parameter (`VectorProducts` then runs
            one pass per parameter).
    """
    if method == "vector_products":
        return method, VectorProducts(problem, split)
    if method == "jacobian":
        return method, Jacobians(problem, [])
    if method == "structured":
        return method, Jacobians(problem, structured_sites(problem))
    sites = structured_sites(problem, verify=False)
    if sites and structured_saving(problem, sites) >= STRUCTURED_SAVING:
        chosen, engine = "structured", Jacobians(problem, verified(problem, sites))
    else:
        chosen, engine = "jacobian", Jacobians(problem, [])
        if sites and engine.bytes_per_example(1) > problem.budget:
            # Gram sites hold less per example: structured may fit where Jacobians do not
            chosen, engine = "structured", Jacobians(problem, verified(problem, sites))
    if engine.bytes_per_example(1) > problem.budget:
        return "vector_products", VectorProducts(problem, split)
    return chosen, engine


def chosen_method(model: nn.Module, x1, x2=None, *, output: str = "trace",
                  params=None, memory_budget=None) -> str:
    """The method ``empirical_ntk(..., method="auto")`` runs for these arguments
    (``"jacobian"``, ``"structured"`` or ``"vector_products"``); for tests and
    benchmarks."""
    problem = Problem.make(model, x1, x2, params, output, memory_budget)
    return choose(problem, "auto", False)[0]

"""Monte Carlo estimates of the NNGP and NTK from sampled finite networks."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ._checks import as_input_pair
from .compute import parse_memory, progress_bar
from .kernel import Kernel
from .layers.base import Layer

__all__ = ["monte_carlo_kernel", "empirical_kernels"]


def monte_carlo_kernel(
    net: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    n_samples: int,
    generator: torch.Generator,
    memory_budget: int | str | None = None,
    progress: bool | None = None,
) -> Kernel:
    """The mean empirical NNGP and NTK over networks sampled with ``net.build``.

    Each sample is one finite network at the widths given to the layers; its
    empirical NNGP is ``f(x1) f(x2)^T / n_out`` and its empirical NTK
    ``J(x1) J(x2)^T / n_out`` over all parameters (both averaged over the
    ``n_out`` outputs). As widths grow the mean converges to ``net.kernel``;
    the sampling error falls like ``n_samples^-1/2``.

    Networks are sampled and evaluated one at a time, so memory does not grow
    with ``n_samples``; Jacobians are taken in chunks of outputs that fit the
    memory budget.

    Args:
        net: an ntkit network.
        x1: inputs ``(N1, *features)``; sets the dtype and device of the networks.
        x2: inputs ``(N2, *features)``, or None for ``k(x1, x1)`` (one forward
            pass, so Dropout masks are shared as the kernel assumes).
        n_samples: number of networks.
        generator: the only source of randomness (`torch.Generator`).
        memory_budget: bytes (or e.g. ``"2GiB"``) for one chunk of Jacobians;
            default 1 GiB.
        progress: progress bar over samples; by default shown for long runs.

    Returns:
        A `Kernel` with ``nngp`` and ``ntk`` of shape ``(N1, N2)``.
    """
    totals: list[Tensor] = []
    n_out = 1
    for *sample, n_out in empirical_kernels(
        net, x1, x2, n_samples=n_samples, generator=generator, memory_budget=memory_budget,
        progress=progress,
    ):
        totals = sample if not totals else [t + s for t, s in zip(totals, sample)]
    nngp, ntk, cov1, cov2 = (t / n_samples for t in totals)
    return Kernel(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape=(n_out,),
                  x1_is_x2=x2 is None)


def empirical_kernels(
    net: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    n_samples: int,
    generator: torch.Generator,
    memory_budget: int | str | None = None,
    progress: bool | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, int]]:
    """Yields, per sampled network, ``(nngp, ntk, cov1, cov2, n_out)``.

    The per-sample values behind `monte_carlo_kernel`, for error bars:
    their standard deviation over samples divided by ``sqrt(n_samples)`` is
    the standard error of the mean.
    """
    if not isinstance(net, Layer):
        raise TypeError(
            f"net must be an ntkit layer or network, got {type(net).__name__}; convert torch "
            f"models with nk.from_torch."
        )
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (randomness is explicit), got "
            f"{type(generator).__name__}; use torch.Generator().manual_seed(0)."
        )
    x1, x2 = as_input_pair(x1, x2)
    budget = parse_memory(memory_budget)
    net.kernel(x1[:1])  # validates the architecture against the inputs
    for _ in progress_bar(range(n_samples), desc="networks", unit="net", progress=progress):
        model = net.build(tuple(x1.shape[1:]), generator=generator, dtype=x1.dtype,
                          device=x1.device)
        yield _one_network(model, x1, x2, budget)


def _one_network(model: nn.Module, x1: Tensor, x2: Tensor | None, budget: int):
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def forward(x: Tensor):
        return lambda p: functional_call(model, (p, buffers), (x,)).flatten(1)

    out1, pull1 = vjp(forward(x1), params)
    out2, pull2 = (out1, pull1) if x2 is None else vjp(forward(x2), params)
    n_out = out1.shape[1]
    nngp = out1 @ out2.T / n_out
    n_params = sum(p.numel() for p in params.values())
    rows = max(1, budget // max(1, 2 * n_params * x1.element_size()))
    ntk = torch.zeros_like(nngp)
    for i0 in range(0, out1.numel(), rows):
        ja = _jacobian_rows(pull1, out1, i0, rows)
        for j0 in range(0, out2.numel(), rows):
            jb = ja if (x2 is None and j0 == i0) else _jacobian_rows(pull2, out2, j0, rows)
            block = ja @ jb.T  # (rows_i, rows_j) over flattened (example, output) pairs
            _accumulate(ntk, block, i0, j0, n_out)
    ntk /= n_out
    cov1 = (out1 * out1).mean(1)
    cov2 = cov1 if x2 is None else (out2 * out2).mean(1)
    return nngp, ntk, cov1, cov2, n_out


def _jacobian_rows(pull, out: Tensor, start: int, count: int) -> Tensor:
    """Rows ``start:start+count`` of the Jacobian of ``out.flatten()``, flattened over
    parameters: shape ``(count, n_params)``."""
    stop = min(start + count, out.numel())
    basis = torch.zeros(stop - start, out.numel(), dtype=out.dtype, device=out.device)
    basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
    (grads,) = vmap(pull)(basis.view(stop - start, *out.shape))
    return torch.cat([g.reshape(stop - start, -1) for g in grads.values()], dim=1)


def _accumulate(ntk: Tensor, block: Tensor, i0: int, j0: int, n_out: int) -> None:
    """Adds the output-traced part of a block over (example, output) pairs to ``ntk``."""
    dev = block.device
    ia = torch.arange(i0, i0 + block.shape[0], device=dev)
    ib = torch.arange(j0, j0 + block.shape[1], device=dev)
    same_output = (ia % n_out)[:, None] == (ib % n_out)[None, :]
    rows = (ia // n_out)[:, None].expand_as(block)[same_output]
    cols = (ib // n_out)[None, :].expand_as(block)[same_output]
    ntk.index_put_((rows, cols), block[same_output], accumulate=True)

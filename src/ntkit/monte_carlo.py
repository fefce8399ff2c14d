"""Monte Carlo estimates of the NNGP and NTK from sampled finite networks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ._budget import parse_memory, progress_bar
from ._checks import as_input_pair
from .empirical import empirical_nngp, empirical_ntk
from .empirical._problem import stochastic_modules
from .errors import check_finite_output
from .kernel import Kernel, same_inputs
from .layers.base import Layer

__all__ = ["empirical_kernels", "monte_carlo_kernel"]


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
            pass, so Dropout masks are shared as the kernel assumes). ``x2`` that is
            ``x1`` (`ntkit.kernel.same_inputs`) is taken as None, except that with
            Dropout in training mode only ``x1`` itself is: a copy is a second
            forward pass, with masks of its own.
        n_samples: number of networks.
        generator: the only source of randomness (`torch.Generator`).
        memory_budget: bytes (or e.g. ``"2GiB"``) for one chunk of Jacobians;
            default 1 GiB.
        progress: progress bar over samples; by default shown for long runs.

    Returns:
        A `Kernel` with ``nngp`` and ``ntk`` of shape ``(N1, N2)``.

    Raises:
        ntkit.errors.NonFiniteError: the mean kernel came out NaN or infinite.
    """
    totals: list[Tensor] = []
    n_out, symmetric = 1, x2 is None
    for (*sample, n_out), symmetric in _samples(net, x1, x2, n_samples, generator,
                                                memory_budget, progress):
        totals = sample if not totals else [t + s for t, s in zip(totals, sample)]
    nngp, ntk, cov1, cov2 = (t / n_samples for t in totals)
    k = Kernel(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape=(n_out,), x1_is_x2=symmetric)
    return check_finite_output(k, "monte_carlo_kernel(...)", causes="monte_carlo")


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

    The per-sample values behind `monte_carlo_kernel` (same arguments), for
    error bars: their standard deviation over samples divided by
    ``sqrt(n_samples)`` is the standard error of the mean.
    """
    for values, _ in _samples(net, x1, x2, n_samples, generator, memory_budget, progress):
        yield values


def _samples(net, x1, x2, n_samples, generator, memory_budget, progress):
    """Checks the arguments, then yields per sampled network its values and whether
    ``x2`` was taken as ``x1``."""
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
        if same_inputs(x1, x2) and (x2 is x1 or not stochastic_modules(model)):
            x2 = None       # (the same for every sample: one architecture)
        yield _one_network(model, x1, x2, budget), x2 is None


def _one_network(model: nn.Module, x1: Tensor, x2: Tensor | None, budget: int):
    """``(nngp, ntk, cov1, cov2, n_out)`` of one sampled network, from `ntkit.empirical`.

    ``nngp = f(x1) f(x2)^T / n_out`` is `empirical_nngp` and ``ntk = J(x1) J(x2)^T /
    n_out`` the traced `empirical_ntk` over all parameters, both of the network as a
    function of example indices (`_Sample`), so that random masks drawn once per batch
    stay fixed while the engine differentiates example by example.
    """
    sample = _Sample(model, x1, x2)
    n1, n = x1.shape[0], sample.x.shape[0]
    index = torch.arange(n, device=x1.device)
    gram = empirical_nngp(sample, index, memory_budget=budget)     # (N, N), x1 then x2
    cov = gram.diagonal()
    i2 = None if x2 is None else index[n1:]
    ntk = empirical_ntk(sample, index[:n1], i2, memory_budget=budget, progress=False)
    n_out = sample.n_out
    ntk = ntk / n_out
    if x2 is None:
        return gram, ntk, cov, cov, n_out
    return gram[:n1, n1:], ntk, cov[:n1], cov[n1:], n_out


class _Sample(nn.Module):
    """A sampled network as a function of example indices: ``forward(i)`` is
    ``model(x[i]).flatten(1)`` with ``x`` = ``x1`` followed by ``x2``.

    Dropout in training mode draws its masks here, once per batch as the kernel
    assumes: one forward pass over ``x1`` (shared by ``k(x1, x1)``) and, when given,
    one over ``x2``, drawing what the network's own passes would. Each mask is
    recorded as the module's output for an input of ones (``keep / (1 - p)``, what
    Dropout multiplies by) and replayed by example index afterwards, so that every
    later call is deterministic and may take the examples one by one.
    """

    def __init__(self, model: nn.Module, x1: Tensor, x2: Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.x = x1 if x2 is None else torch.cat([x1, x2])
        self._index: Tensor | None = None
        self._calls: dict[int, int] = {}
        random = stochastic_modules(model)
        recorded: list[list[list[Tensor]]] = [[] for _ in random]   # module, pass, call
        for m, passes in zip(random, recorded):
            m.forward = _recorder(m, passes)
        with torch.no_grad():
            for x in [x1] if x2 is None else [x1, x2]:
                for passes in recorded:
                    passes.append([])
                out = model(x)
                self.n_out = out[0].numel()
        for k, (m, passes) in enumerate(zip(random, recorded)):
            if len({len(calls) for calls in passes}) != 1:
                raise RuntimeError(f"{type(m).__name__} was called a different number of "
                                   f"times for x1 and x2.")
            m.forward = self._replayer(k, [torch.cat(masks) for masks in zip(*passes)])

    def forward(self, index: Tensor) -> Tensor:
        self._index, self._calls = index, {}
        try:
            return self.model(self.x[index]).flatten(1)
        finally:
            self._index = None

    def _replayer(self, k: int, masks: list[Tensor]):
        """The forward of random module ``k``: its ``c``-th call in a pass multiplies by
        the ``c``-th recorded mask of the examples at hand."""
        def replay(x: Tensor) -> Tensor:
            call = self._calls.get(k, 0)
            self._calls[k] = call + 1
            return x * masks[call][self._index]
        return replay


def _recorder(module: nn.Module, passes: list[list[Tensor]]):
    """A forward for ``module`` that draws its mask, keeps it in the current pass's list
    and applies it."""
    def record(x: Tensor) -> Tensor:
        mask = type(module).forward(module, torch.ones_like(x))
        passes[-1].append(mask)
        return x * mask
    return record

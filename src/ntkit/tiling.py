"""Tiled kernel computation: a network's kernel rule applied tile by tile under a
memory budget.

Pure machinery: `tiled_kernel` takes a rule (a function from the input `Kernel`
to the output one), the inputs and a budget, and assembles the result from
tiles of any size. It imports no layer module (layers import it); a network is
seen only through the rule, its ``build`` (for `peak_positions`) and its
``hyperparameters`` (for gradients).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._budget import TEMPORARIES_PER_ENTRY, parse_memory, progress_bar, tile_sides
from .errors import check_finite_output
from .kernel import Kernel, SelfTrace, input_kernel, same_inputs

__all__ = ["Kernels", "peak_positions", "tiled_kernel"]

#: What flows between layers: one kernel, or a tuple of them between FanOut and FanIn.
Kernels = Kernel | tuple[Kernel, ...]


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def tiled_kernel(
    rule: Callable[[Kernels], Kernels],
    x1: Tensor,
    x2: Tensor | None,
    *,
    diagonal: bool,
    memory_budget: int | str | None,
    progress: bool | None,
    position_pairs: bool = False,
    network=None,
    side: dict[str, tuple] | None = None,
) -> Kernel:
    """Applies a network's kernel rule tile by tile and assembles the result.

    For ``x2 is None`` only tiles on or above the diagonal are computed and the
    rest is mirrored; ``x2`` that is ``x1`` (itself or a view, see `ntkit.kernel.same_inputs`)
    is computed the same way, so ``k(x, x)`` costs what ``k(x)`` does and its
    self-pairs are exact. Tiles of any size are allowed: the last row or column
    of tiles is simply smaller.

    Without gradients the tiles are written into preallocated outputs. When a
    hyperparameter of ``network`` is a tensor that requires grad (and grad mode
    is on), the result keeps the autograd graph instead: tiles are concatenated,
    not written in place, and with more than one tile each is recomputed during
    the backward pass (`torch.utils.checkpoint`), so that the graph holds the
    tiles' outputs rather than every tile's intermediates (a 2000-point,
    9-layer MLP kernel in float64: 0.2 GB at peak, forward and backward,
    instead of 0.9 GB). Inputs ``x1``/``x2`` that require grad make the result
    differentiable in them the same way (the input kernel, the first
    convolution's patches and the self trace keep their graph); ``x2`` then
    merges with ``x1`` only when it is the same tensor, so that the gradient
    flows through both slots of ``k(x, x)`` and never into a detached copy.
    Otherwise the inputs are detached.

    Args:
        rule: the network's kernel rule, input `Kernel` to output `Kernel`.
        x1: inputs ``(N1, *features)``, float32 or float64.
        x2: inputs ``(N2, *features)``, or None for ``k(x1, x1)``.
        diagonal: compute only ``k(x1_i, x1_i)`` (requires ``x2=None``).
        memory_budget: working memory for the tiles (see `parse_memory`).
        progress: a progress bar over tiles (see `progress_bar`).
        position_pairs: start from the input kernel between every pair of
            positions (for networks that pool or attend).
        network: the network whose rule this is, or None: sizes tiles by its
            widest spatial layer and tells whether gradients are wanted.
        side: per-example side inputs by name, each ``(for x1, for x2)`` with
            the batch axis first (``for x2`` None when ``x2`` is None), checked
            by the caller; each tile sees its rows and columns of them in
            `Kernel.side`. A ``"mask"`` also zeroes the absent positions of the
            inputs before the input kernel.

    Returns:
        The assembled `Kernel`: ``nngp``/``ntk`` of shape ``(N1, N2, ...)``
        (``(N1, ...)`` when ``diagonal``), carrying no recording of the tiles
        (``self_trace`` is None) and no inputs.

    Raises:
        ntkit.errors.NonFiniteError: the assembled ``nngp`` or ``ntk`` has NaN or
            infinite entries (overflow in the dtype, a variance growing with depth).
    """
    if x1.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"x1 has dtype {x1.dtype}; kernels are computed in float32 or float64. "
            f"Convert with x1.float() or x1.double()."
        )
    budget = parse_memory(memory_budget)
    grad_inputs = torch.is_grad_enabled() and (
        x1.requires_grad or (x2 is not None and x2.requires_grad))
    differentiable = grad_inputs or (torch.is_grad_enabled() and network is not None and any(
        t.requires_grad for t in network.hyperparameters()))
    if not grad_inputs:
        x1 = x1.detach()
        x2 = None if x2 is None else x2.detach()
    side = dict(side or {})
    # Inputs that require grad merge only when they are one tensor: a detached view
    # of x1 as x2 is a constant, whose slot must not pass gradients to x1.
    same = x2 is x1 if grad_inputs else same_inputs(x1, x2)
    if x2 is not None and same and all(
            b is None or b is a or same_inputs(a, b) for a, b in side.values()):
        x2 = None
    side = {name: (a, a if x2 is None else b) for name, (a, b) in side.items()}
    positions = peak_positions(network, tuple(x1.shape[1:]), x1.dtype)
    if position_pairs:
        positions = positions**2
    entry_bytes = x1.element_size() * positions
    if entry_bytes * TEMPORARIES_PER_ENTRY > budget:
        warnings.warn(
            f"one pair of inputs needs about {entry_bytes * TEMPORARIES_PER_ENTRY / 2**20:.0f} "
            f"MiB of working memory ({positions} numbers per kernel entry), more than "
            f"memory_budget={budget / 2**20:.0f} MiB; computing one pair at a time anyway. "
            f"Raise memory_budget to silence this.", stacklevel=3)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]

    if diagonal:
        rows, _ = tile_sides(n1, 1, entry_bytes, budget, x1.device, positions)
        step = rows * rows
        tiles = [(r, None) for r in _ranges(n1, step)]
    else:
        rows, cols = tile_sides(n1, n2, entry_bytes, budget, x1.device, positions)
        if x2 is None:
            rows = cols = min(rows, cols)
            rr = _ranges(n1, rows)
            tiles = [(a, b) for i, a in enumerate(rr) for b in rr[i:]]
        else:
            tiles = [(a, b) for a in _ranges(n1, rows) for b in _ranges(n2, cols)]

    out: dict[str, Tensor] = {}
    facts: Kernel | None = None
    traces = None
    # With gradients and several tiles, each tile (and each block of the self trace)
    # is recomputed in the backward pass instead of keeping its intermediates.
    recompute = differentiable and len(tiles) > 1
    grad_mode = torch.enable_grad() if differentiable else torch.no_grad()
    if position_pairs and not diagonal:
        with grad_mode:
            step = tile_sides(n1, 1, entry_bytes, budget, x1.device, positions)[0] ** 2
            traces = tuple(None if x is None else _self_trace(
                rule, x, step, budget // 4, recompute=recompute,
                side={name: pair[i] for name, pair in side.items()})
                for i, x in enumerate((x1, x2)))
            if any(t is False for t in traces):
                traces = None  # too large to keep: tiles carry the covariances themselves
    bar = progress_bar(tiles, desc="kernel tiles", unit="tile", progress=progress, min_items=4)
    done: dict[tuple, Kernel] = {}
    with grad_mode:
        for r, c in bar:
            k = _run(recompute, _tile, rule, x1, x2, r, c, diagonal, position_pairs, traces,
                     side)
            if facts is None:
                facts = k
                if not differentiable:
                    out = _allocate(k, n1, n2, diagonal)
            if differentiable:
                done[r, c] = k.replace(self_trace=None)
            else:
                _store(out, k, r, c, mirror=x2 is None and not diagonal)
        if differentiable:
            out = _assemble(done, facts, diagonal=diagonal, mirror=x2 is None and not diagonal)
    bar.close()
    assert facts is not None
    # One finite-output check of the assembled result, naming the likely causes.
    what = "the kernel" if network is None else f"{type(network).__name__}.kernel(...)"
    check_finite_output(SimpleNamespace(nngp=out["nngp"], ntk=out["ntk"]), what, causes="kernel")
    # The recording of the tiles (SelfTrace) served the tiles only; the result drops it.
    return facts.replace(**out, x1_is_x2=x2 is None, diagonal=diagonal, self_trace=None,
                         side={})


def _run(recompute: bool, fn, *args):
    """``fn(*args)``; with ``recompute``, under `torch.utils.checkpoint`, which keeps
    none of its intermediates for the backward pass but recomputes them there."""
    if not recompute:
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def peak_positions(network, input_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The most spatial positions any layer of ``network`` sees, found by running
    its finite twin on the meta device (no memory, no arithmetic); the input's
    positions if that is not possible."""
    positions = math.prod(input_shape[1:])
    if network is None or len(input_shape) < 2:
        return positions
    try:
        module = network.build(input_shape, dtype=dtype, device="meta")
        seen = [positions]

        def record(_module, _args, out):
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, Tensor) and t.ndim > 2:
                    seen.append(math.prod(t.shape[2:]))

        handles = [m.register_forward_hook(record) for m in module.modules()]
        try:
            module(torch.empty((1, *input_shape), dtype=dtype, device="meta"))
        finally:
            for h in handles:
                h.remove()
        return max(seen)
    except Exception:
        return positions


def _self_trace(rule, x: Tensor, step: int, limit: int, *, recompute: bool = False,
                side: dict | None = None) -> SelfTrace | bool:
    """Runs the network on each example alone (in blocks), recording what the
    layers that mix positions need of its own covariance (see `SelfTrace`);
    False if the recording would take more than ``limit`` bytes (attention over
    long sequences keeps each example's full position covariance). With
    ``recompute``, each block is recomputed in the backward pass (see `_run`)."""
    blocks = []
    for i0, i1 in _ranges(x.shape[0], step):
        block = {name: (v[i0:i1],) * 2 for name, v in (side or {}).items()}
        values = _run(recompute, _trace_values, rule, x[i0:i1], block)
        per_example = sum(v[:1].numel() * v.element_size() for v in values)
        if per_example * x.shape[0] > limit:
            return False
        blocks.append(SelfTrace(list(values)))
    return SelfTrace.joined(blocks)


def _trace_values(rule, x: Tensor, side: dict) -> tuple[Tensor, ...]:
    """What the layers that mix positions record of the examples ``x`` alone."""
    trace = SelfTrace()
    k = input_kernel(_masked(x, side), None, diagonal=True, position_pairs=True)
    rule(k.replace(self_trace=trace, side=side))
    return tuple(trace.values)


def _masked(x: Tensor, side: dict) -> Tensor:
    """``x`` with the positions absent under ``side["mask"]`` (if any) set to zero."""
    pair = side.get("mask")
    if pair is None:
        return x
    return x * pair[0].unsqueeze(1).to(x.dtype)


def _tile(rule, x1, x2, r, c, diagonal, position_pairs=False, traces=None, side=None
          ) -> Kernel:
    side = side or {}
    if diagonal:
        tile_side = {name: (a[r[0]:r[1]],) * 2 for name, (a, _) in side.items()}
    else:
        tile_side = {name: (a[r[0]:r[1]], b[c[0]:c[1]]) for name, (a, b) in side.items()}
    a = _masked(x1[r[0]:r[1]], tile_side)
    # With a SelfTrace, tiles carry per-position variances instead of each example's
    # full position covariance, which they would otherwise recompute.
    cheap = traces is not None
    if diagonal:
        k = input_kernel(a, None, diagonal=True, position_pairs=position_pairs)
    elif x2 is None and r == c:
        k = input_kernel(a, None, position_pairs=position_pairs, cov_pairs=not cheap)
    else:
        b = (x1 if x2 is None else x2)[c[0]:c[1]]
        if tile_side:
            b = _masked(b, {name: (q, p) for name, (p, q) in tile_side.items()})
        k = input_kernel(a, b, position_pairs=position_pairs, cov_pairs=not cheap)
    if cheap:
        t1, t2 = traces
        k = k.replace(self_trace=t1.for_tile(t2, slice(*r), slice(*c)))
    if tile_side:
        k = k.replace(side=tile_side)
    k = rule(k)
    if isinstance(k, tuple):
        raise ValueError(
            f"the network ends with {len(k)} branches; end it with FanInSum(), "
            f"FanInConcat() or FanInProd() so that it has one output."
        )
    return k


def _allocate(k: Kernel, n1: int, n2: int, diagonal: bool) -> dict[str, Tensor]:
    opts = {"dtype": k.nngp.dtype, "device": k.nngp.device}
    trailing = tuple(k.nngp.shape[1 if diagonal else 2:])
    batch = (n1,) if diagonal else (n1, n2)
    return {
        "nngp": torch.empty(batch + trailing, **opts),
        "ntk": torch.empty(batch + trailing, **opts),
        "cov1": torch.empty((n1,) + tuple(k.cov1.shape[1:]), **opts),
        "cov2": torch.empty((n2,) + tuple(k.cov2.shape[1:]), **opts),
    }


def _store(out: dict[str, Tensor], k: Kernel, r, c, *, mirror: bool) -> None:
    i0, i1 = r
    out["cov1"][i0:i1] = k.cov1
    if c is None:  # diagonal
        out["cov2"][i0:i1] = k.cov2
        out["nngp"][i0:i1] = k.nngp
        out["ntk"][i0:i1] = k.ntk
        return
    j0, j1 = c
    out["cov2"][j0:j1] = k.cov2
    if mirror and r == c:  # a tile on the diagonal of k(x, x): exactly symmetric
        out["nngp"][i0:i1, j0:j1] = _symmetrised(k, k.nngp)
        out["ntk"][i0:i1, j0:j1] = _symmetrised(k, k.ntk)
        return
    out["nngp"][i0:i1, j0:j1] = k.nngp
    out["ntk"][i0:i1, j0:j1] = k.ntk
    if mirror and r != c:
        out["nngp"][j0:j1, i0:i1] = _swap(k, k.nngp)
        out["ntk"][j0:j1, i0:i1] = _swap(k, k.ntk)
        out["cov1"][j0:j1] = k.cov2


def _assemble(done: dict[tuple, Kernel], facts: Kernel, *, diagonal: bool, mirror: bool
              ) -> dict[str, Tensor]:
    """The output from all its tiles ``done[rows, cols]`` by concatenation, which
    autograd follows (where `_store` writes into preallocated tensors). Tiles
    missing below the diagonal of a symmetric kernel are mirrored from above."""
    if diagonal:
        tiles = [done[key] for key in sorted(done)]
        return {f: torch.cat([getattr(k, f) for k in tiles]) for f in _FIELDS}
    rows = sorted({r for r, _ in done})
    cols = sorted({c for _, c in done})

    def block(r, c, field: str) -> Tensor:
        if mirror and r == c:
            return _symmetrised(facts, getattr(done[r, c], field))
        if (r, c) in done:
            return getattr(done[r, c], field)
        return _swap(facts, getattr(done[c, r], field))  # mirrored: k(x_j, x_i)

    out = {f: torch.cat([torch.cat([block(r, c, f) for c in cols], 1) for r in rows])
           for f in ("nngp", "ntk")}
    # The variances as `_store` leaves them (the last tile to write wins), so that
    # both paths give the same bits.
    cov1: dict[tuple, Tensor] = {}
    cov2: dict[tuple, Tensor] = {}
    for (r, c), k in done.items():
        cov1[r], cov2[c] = k.cov1, k.cov2
        if mirror and r != c:
            cov1[c] = k.cov2
    out["cov1"] = torch.cat([cov1[r] for r in rows])
    out["cov2"] = torch.cat([cov2[c] for c in cols])
    return out


_FIELDS = ("nngp", "ntk", "cov1", "cov2")


def _symmetrised(k: Kernel, t: Tensor) -> Tensor:
    """A diagonal tile of ``k(x, x)`` made exactly symmetric: ``(t + t^T) / 2``.

    The layer rules compute ``(i, j)`` and ``(j, i)`` separately, and vectorised and
    scalar loops (or BLAS) may round them an ulp apart; the average is the same float
    both ways (addition commutes) and moves no entry by more than that rounding. The
    self-pairs ``(i, i)`` are unchanged (``(a + a) / 2 == a``)."""
    return (t + _swap(k, t)) * 0.5


def _swap(k: Kernel, t: Tensor) -> Tensor:
    """``t`` with x1 and x2 exchanged: k(x2_j, x1_i), positions exchanged too."""
    t = t.transpose(0, 1)
    if k.position_pairs:
        ns = (t.ndim - 2) // 2
        t = t.permute(0, 1, *range(2 + ns, 2 + 2 * ns), *range(2, 2 + ns))
    return t

"""Assembling an empirical kernel from tiles, and the contractions the tiles share."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .._budget import progress_bar
from ._problem import Problem

Group = Literal["parameter", "module"]

#: the most (examples x outputs) whose Jacobians `_joint_features` takes in one call
JOINT_ROWS = 128


def tiled(problem: Problem, engine, group: Group | None,
          progress: bool | None) -> dict[str, Tensor]:
    """Runs ``engine`` over chunks of examples and of outputs, and assembles the kernel.

    A tile is (chunk of x1, chunk of outputs a) against (chunk of x2, chunk of outputs
    b), with b = a unless the output is "full". For Theta(x, x) only tiles on or above
    the diagonal of example chunks are computed; the others are their mirror images,
    and the blocks on the diagonal are averaged with their transposes, so the kernel is
    exactly symmetric.

    Args:
        problem: the checked call.
        engine: `Jacobians` or `VectorProducts`: ``plan()``, ``features(x, a0, a1)``,
            ``contract(fa, fb)`` yielding ``(parameter name, part)``.
        group: None for the total (the one key ``""``), ``"parameter"`` for one entry
            per parameter, ``"module"`` for one per module (a parameter's name without
            its last component).
        progress: show a progress bar over tiles (None: when long).

    Returns:
        ``{key: kernel}``, each ``(N1, N2)``, ``(N1, N2, O)`` or ``(N1, N2, O, O)``.
    """
    n1, n2, n_out = problem.x1.shape[0], problem.xs2.shape[0], problem.n_out
    rows, outs = engine.plan()
    chunks1 = [(i, min(i + rows, n1)) for i in range(0, n1, rows)]
    chunks2 = [(j, min(j + rows, n2)) for j in range(0, n2, rows)]
    ochunks = [(a, min(a + outs, n_out)) for a in range(0, n_out, outs)]
    output = problem.output
    symmetric = problem.x2 is None
    tiles = [(i, a, j, b) for ii, i in enumerate(chunks1) for a in ochunks
             for jj, j in enumerate(chunks2) if not symmetric or jj >= ii
             for b in (ochunks if output == "full" else [a])]
    out_tail = {"trace": (), "diagonal": (n_out,), "full": (n_out, n_out)}[output]
    result: dict[str, Tensor] = {}
    p0 = next(iter(problem.params.values()))

    def target(name: str) -> Tensor:
        key = "" if group is None else (name if group == "parameter" else name.rpartition(".")[0])
        if key not in result:
            result[key] = p0.new_zeros((n1, n2) + out_tail)
        return result[key]

    bar = progress_bar(tiles, desc="empirical NTK", unit="tile", progress=progress, min_items=4)
    cached: tuple | None = None
    joint = _joint_features(problem, engine, rows, outs)
    if joint is not None:
        cached = ((0, 0), joint[0])
    for (i0, i1), (a0, a1), (j0, j1), (b0, b1) in bar:
        if cached is None or cached[0] != (i0, a0):
            cached = ((i0, a0), engine.features(problem.x1[i0:i1], a0, a1))
        fa = cached[1]
        same = symmetric and (i0, a0) == (j0, b0)
        if same:
            fb = fa
        elif joint is not None:
            fb = joint[1]
        else:
            fb = engine.features(problem.xs2[j0:j1], b0, b1)
        mirror = symmetric and i0 != j0
        for name, value in engine.contract(fa, fb):
            t = target(name)
            if output == "full":
                t[i0:i1, j0:j1, a0:a1, b0:b1] += value
                if mirror:
                    t[j0:j1, i0:i1, b0:b1, a0:a1] += value.transpose(0, 1).transpose(2, 3)
            elif output == "diagonal":
                t[i0:i1, j0:j1, a0:a1] += value
                if mirror:
                    t[j0:j1, i0:i1, a0:a1] += value.transpose(0, 1)
            else:
                t[i0:i1, j0:j1] += value
                if mirror:
                    t[j0:j1, i0:i1] += value.transpose(0, 1)
    bar.close()
    if not result:  # every structured part was empty (cannot happen with parameters)
        target("")
    if symmetric:
        for kernel in result.values():
            for i0, i1 in chunks1:
                block = kernel[i0:i1, i0:i1]     # (a copy first: a transposed read is slow)
                block.add_(mirrored(block, full=output == "full").clone(
                    memory_format=torch.contiguous_format)).mul_(0.5)
    return result


def _joint_features(problem: Problem, engine, rows: int, outs: int) -> tuple | None:
    """The features of x1 and of x2 from one call on both batches, when ``x2`` is given
    and both fit one chunk with every output (one tile), and the engine can split them
    (``split_features``); else None.

    One batched call of ``2N`` examples instead of two of ``N`` halves the fixed cost
    per operation of `torch.func` (dispatch through vmap and autograd), which is much
    of the time while the batch of backward passes (examples times outputs) is small:
    a quarter less for a width-64 BERT with 2 outputs on 16 + 16 inputs (64 rows),
    but 15% more for a width-64 ViT with 10 outputs (320 rows), where the passes'
    arithmetic dominates; hence at most `JOINT_ROWS` rows.
    """
    x1, x2 = problem.x1, problem.x2
    split = getattr(engine, "split_features", None)
    if (x2 is None or split is None or outs < problem.n_out
            or x1.shape[0] + x2.shape[0] > rows or x1.dtype != x2.dtype
            or x1.device != x2.device
            or (x1.shape[0] + x2.shape[0]) * problem.n_out > JOINT_ROWS):
        return None
    both = engine.features(torch.cat([x1, x2]), 0, problem.n_out)
    return split(both, x1.shape[0])


def mirrored(k: Tensor, *, full: bool) -> Tensor:
    """``k`` with the roles of x1 and x2 swapped: ``k[j, i, ...]``, and ``k[j, i, b, a]``
    for a "full" kernel ``(N1, N2, O, O)``."""
    k = k.transpose(0, 1)
    return k.transpose(2, 3) if full else k


def outer(u: Tensor, v: Tensor) -> Tensor:
    """``u @ v.T`` for 2-D ``u, v``; for ``u is v`` with 512 rows or more only the blocks
    on and above the diagonal are multiplied (about 40% fewer operations), the rest mirrored, so the
    result is exactly symmetric."""
    if u is not v or u.shape[0] < 512:
        return u @ v.T
    n = u.shape[0]
    edges = [n * b // 4 for b in range(5)]
    out = u.new_empty(n, n)
    for b in range(4):
        r = slice(edges[b], edges[b + 1])
        for c in range(b, 4):
            q = slice(edges[c], edges[c + 1])
            block = u[r] @ u[q].T
            if c == b:  # BLAS need not round (i, j) and (j, i) alike: mirror the upper half
                block = block.triu() + block.triu(1).T
            out[r, q] = block
            if c > b:
                out[q, r] = block.T
    return out


def contract_jacobians(u: Tensor, v: Tensor, output: str) -> Tensor:
    """``sum_k u[i, a, k] v[j, b, k]`` in the output layout (``v is u`` for one tile of a
    symmetric kernel)."""
    if output == "trace":
        flat = u.reshape(u.shape[0], -1)
        return outer(flat, flat if v is u else v.reshape(v.shape[0], -1))
    if output == "full":
        n, o = u.shape[:2]
        m, q = v.shape[:2]
        flat = u.reshape(n * o, -1)
        k = outer(flat, flat if v is u else v.reshape(m * q, -1))
        return k.reshape(n, o, m, q).permute(0, 2, 1, 3)
    return torch.bmm(u.transpose(0, 1), v.permute(1, 2, 0)).permute(1, 2, 0)


"""FALKON's kernel passes: ``K_nm^T v`` and ``K_nm^T K_nm u`` by row tiles of ``K_nm =
k(x, centers)``, recomputed at every pass (or kept), in this process or as tasks on a
Dask cluster (the engine of `ntkit.kernel_matrix`).

Each tile is computed in the kernel's dtype (float32 kernels stay float32: half the
memory and time of float64 entries) and cast to the algebra's dtype (float64) before its
products, so the sums over tiles and CG's inner products accumulate in float64. On Dask
a worker computes its tile and returns only ``t^T (t u)`` (``M x O`` numbers), never the
tile; the results are summed here in tile order, so every pass adds the same numbers in
the same order as in-process (the kernel's own float32 rounding may differ between
processes by their thread counts).
"""

from __future__ import annotations

import contextlib
import sys
import uuid

import torch
from torch import Tensor

from ._common import KernelFn, row_ranges

__all__ = ["DaskTiles", "RowTiles", "tile_product"]


def tile_product(kernel_fn: KernelFn, x: Tensor, centers: Tensor, i0: int, i1: int,
                 v: Tensor, dtype: torch.dtype, square: bool) -> Tensor:
    """``t^T (t v)`` (``square``, ``v`` ``(M, O)``) or ``t^T v`` (``v`` ``(i1 - i0, O)``)
    for the tile ``t = k(x[i0:i1], centers)`` cast to ``dtype``; runs here or as a Dask
    task (then with torch's threads set to the worker's)."""
    if "distributed" in sys.modules:
        with contextlib.suppress(ValueError):         # ValueError: not on a worker
            worker = sys.modules["distributed"].get_worker()
            if torch.get_num_threads() != worker.state.nthreads:
                torch.set_num_threads(worker.state.nthreads)
    t = _tile(kernel_fn, x, centers, i0, i1).to(dtype)
    return t.T @ (t @ v) if square else t.T @ v


def _tile(kernel_fn: KernelFn, x: Tensor, centers: Tensor, i0: int, i1: int) -> Tensor:
    with torch.no_grad():
        t = kernel_fn(x[i0:i1], centers)
    if not isinstance(t, Tensor) or t.shape != (i1 - i0, centers.shape[0]):
        raise ValueError(f"kernel_fn(a, b) must return (Na, Nb) = ({i1 - i0}, "
                         f"{centers.shape[0]}), got {tuple(getattr(t, 'shape', ()))}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"kernel_fn returned NaN or infinite entries for rows {i0}:{i1} of "
                         f"x_train against the centres: inputs with NaN or huge values, or an "
                         f"overflow in float32 (use float64 inputs).")
    return t


class RowTiles:
    """``K_nm = k(x, centers)`` by row tiles in this process: recomputed on each pass, or
    kept in one preallocated ``(N, M)`` tensor in the kernel's dtype (``keep``).

    Attributes:
        passes: passes over ``K_nm`` so far (each recomputes it unless kept).
    """

    def __init__(self, kernel_fn: KernelFn, x: Tensor, centers: Tensor, rows: int,
                 dtype: torch.dtype, keep: bool):
        self.kernel_fn, self.x, self.centers = kernel_fn, x, centers
        self.ranges = row_ranges(x.shape[0], rows)
        self.dtype = dtype
        self.keep = keep
        self.kept: Tensor | None = None       # K_nm, once every tile is in it
        self.passes = 0

    def _tiles(self):
        self.passes += 1
        if self.kept is not None:
            for i0, i1 in self.ranges:
                yield i0, i1, self.kept[i0:i1].to(self.dtype)
            return
        store = None
        for i0, i1 in self.ranges:
            t = _tile(self.kernel_fn, self.x, self.centers, i0, i1)
            if self.keep:
                if store is None:
                    store = t.new_empty((self.x.shape[0], self.centers.shape[0]))
                store[i0:i1] = t
            yield i0, i1, t.to(self.dtype)
        self.kept = store

    def knm_t(self, v: Tensor) -> Tensor:
        """``K_nm^T v`` for ``v`` ``(N, O)``."""
        out = v.new_zeros((self.centers.shape[0], v.shape[1]))
        for i0, i1, t in self._tiles():
            out += t.T @ v[i0:i1]
        return out

    def knm_t_knm(self, u: Tensor) -> Tensor:
        """``K_nm^T K_nm u`` for ``u`` ``(M, O)``."""
        out = torch.zeros_like(u)
        for _, _, t in self._tiles():
            out += t.T @ (t @ u)
        return out


class DaskTiles:
    """The passes of `RowTiles` (never kept) as one Dask task per row tile: the inputs
    and the kernel function are sent to the workers once, each pass sends ``u`` and
    gets back one ``(M, O)`` product per tile, summed here in tile order."""

    def __init__(self, client, kernel_fn: KernelFn, x: Tensor, centers: Tensor, rows: int,
                 dtype: torch.dtype):
        self.client = client
        self.ranges = row_ranges(x.shape[0], rows)
        self.m = centers.shape[0]
        self.dtype = dtype
        self.passes = 0
        self.kept = None
        self._data = client.scatter([kernel_fn, x.detach().cpu(), centers.detach().cpu()],
                                    broadcast=True, hash=False)
        self._run = uuid.uuid4().hex[:8]

    def _pass(self, v: Tensor, square: bool) -> Tensor:
        self.passes += 1
        kernel_fn, x, centers = self._data
        if square:
            [shared] = self.client.scatter([v.cpu()], broadcast=True, hash=False)
            args = [shared] * len(self.ranges)
        else:
            args = [v[i0:i1].cpu() for i0, i1 in self.ranges]
        futures = [self.client.submit(tile_product, kernel_fn, x, centers, i0, i1, a,
                                      self.dtype, square, pure=False,
                                      key=f"ntkit-falkon-{self._run}-{self.passes}-{k}")
                   for k, ((i0, i1), a) in enumerate(zip(self.ranges, args))]
        try:
            parts = self.client.gather(futures)
        finally:
            self.client.cancel(futures)
        out = v.new_zeros((self.m, v.shape[1]), dtype=self.dtype)
        for part in parts:                    # tile order: the in-process sum's order
            out += part.to(out.device)
        return out

    def knm_t(self, v: Tensor) -> Tensor:
        """``K_nm^T v`` for ``v`` ``(N, O)``."""
        return self._pass(v, square=False)

    def knm_t_knm(self, u: Tensor) -> Tensor:
        """``K_nm^T K_nm u`` for ``u`` ``(M, O)``."""
        return self._pass(u, square=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.cancel(list(self._data))

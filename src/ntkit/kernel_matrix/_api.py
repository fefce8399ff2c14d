"""The public calls: `kernel_matrix` (in memory or to disk and back) and
`write_kernel_matrix` (to disk only)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ._cluster import run_tiles
from ._job import Job, KernelFn, TileDone
from ._store import MemorySink, Sink, ZarrSink

if TYPE_CHECKING:
    import distributed
    import zarr

    from ..layers.base import Layer

__all__ = ["kernel_matrix", "write_kernel_matrix"]


def kernel_matrix(
    kernel: Layer | KernelFn,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    get: Literal["nngp", "ntk"] | None = None,
    out: str | os.PathLike | None = None,
    key: str | None = None,
    overwrite: bool = False,
    tile_size: int | tuple[int, int] | None = None,
    memory_budget: int | str | None = None,
    dtype: torch.dtype | None = None,
    client: distributed.Client | None = None,
    n_workers: int | None = None,
    devices: Sequence[str] | Literal["all"] | None = None,
    progress: bool | None = None,
    on_tile: Callable[[TileDone], None] | None = None,
) -> Tensor:
    """The kernel matrix ``k(x1, x2)``, computed tile by tile, optionally on Dask
    and resumable on disk.

    Args:
        kernel: an ntkit network (tiles are ``kernel.kernel(a, b)``) or a function
            ``kernel_fn(a, b) -> Tensor (Na, Nb)`` of two input batches. On Dask
            it is pickled to the workers (cloudpickle: lambdas and closures work).
        x1: inputs ``(N1, *features)``. For a network, float32 or float64.
        x2: inputs ``(N2, *features)``, or None for the symmetric ``k(x1, x1)``,
            of which only tiles on and above the diagonal are computed (and
            mirrored). ``x2`` equal to ``x1`` (the same tensor or a view of it) is computed as None.
        get: ``"ntk"`` (default) or ``"nngp"``, the kernel of a network; a
            ``kernel_fn`` returns one matrix and takes no ``get``.
        out: a directory for the matrix as a zarr group (see the module's
            docstring). Tiles are written as they finish; a directory from an
            earlier call with the same inputs, kernel and options is resumed.
            None keeps the matrix in memory only.
        key: a string naming what the kernel computes (e.g. a checkpoint's
            name), recorded with ``out``. Required to resume a store for a
            ``kernel_fn`` or a network holding a Python function (whose code no
            fingerprint sees); a store written with another key is refused.
        overwrite: discard the ntkit store ``out`` instead of refusing one written
            for other inputs or another kernel. Never deletes a folder ntkit did
            not write, nor anything but the store's own entries in it.
        tile_size: rows and columns per tile (an int, or ``(rows, cols)``; a
            symmetric matrix takes square tiles); need not divide N1 or N2.
            Default: from ``memory_budget`` as `ntkit.tiling.tiled_kernel`
            sizes its tiles (at least 16 for a network; at most 384 x 384 on
            CPU), or the tile size stored in ``out`` when resuming.
        memory_budget: bytes (or e.g. ``"2GiB"``) of working memory per tile, on
            each worker; default 1 GiB. A network's ``kernel`` keeps to it
            whatever the tile size.
        dtype: the matrix's dtype, float32 or float64; default ``x1``'s when it
            is one of those, else float32. Tiles are converted to it.
        client: a `distributed.Client`: tiles become tasks on its cluster.
        n_workers: start a `distributed.LocalCluster` of this many
            single-threaded worker processes for the call (closed after).
        devices: ``["cuda:0", "cuda:1", ...]`` or ``"all"``: start one worker
            per GPU, each seeing only its device, for the call. Tiles are moved
            to the worker's GPU; a ``kernel_fn`` must move its own model there
            (e.g. ``model.to(a.device)``). Give at most one of ``client``,
            ``n_workers`` and ``devices``; with none, tiles run in this process.
        progress: a progress bar over tiles (starting at the count already done
            in ``out``); by default shown when the run is long.
        on_tile: called in this process with a `TileDone` for each tile
            computed by this call, after its values (and with ``out``, its
            done flag) are stored; tiles reused from ``out`` are not reported.

    Returns:
        The matrix, shape ``(N1, N2)`` (``N2 = N1`` for ``x2=None``), on the
        CPU; with ``out``, read back from disk and checked against the tiles'
        checksums (`write_kernel_matrix` returns the zarr array without reading
        it).

    Raises:
        ntkit.errors.StoreError: ``out`` is not an ntkit store, holds another
            matrix, needs ``key=``, is locked by another writer, or has a damaged
            tile on the final read (see the module's docstring).
        ntkit.errors.NonFiniteError: a tile came out NaN or infinite (not stored).

    Each Dask worker sets torch's intra-op threads to its own thread count, so
    that a single-threaded worker process uses one core. Workers started here
    run with ``MALLOC_MMAP_THRESHOLD_=33554432`` (Dask's default environment
    makes glibc map and unmap every tensor above 128 KiB: 2.5x slower on
    convolutional kernels); set it in ``distributed.nanny.pre-spawn-environ``
    of a cluster of your own. Inputs are sent to the
    workers once (``client.scatter``); there tiles run on the CPU, or on the
    worker's GPU with ``devices=``. In this process they run where ``x1`` is.
    A symmetric ``kernel_fn`` is assumed symmetric: tiles below the diagonal are
    the transposes of those above.

    Example:
        >>> net = nk.Sequential(nk.Linear(512), nk.ReLU(), nk.Linear(1))
        >>> x = torch.randn(1000, 10)
        >>> k = nk.kernel_matrix(net, x, out="k.zarr", n_workers=4)   # resumable
    """
    job = Job.make(kernel, x1, x2, get=get, key=key, tile_size=tile_size,
                   memory_budget=memory_budget, dtype=dtype, stored=out is not None)
    if out is None:
        sink: Sink = MemorySink(job)
    else:
        sink = ZarrSink.open(Path(out), job, overwrite=overwrite)
    try:
        run_tiles(sink.job, sink, client=client, n_workers=n_workers, devices=devices,
                  progress=progress, on_tile=on_tile)
        return sink.load()
    finally:
        sink.close()


def write_kernel_matrix(
    kernel: Layer | KernelFn,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    out: str | os.PathLike,
    get: Literal["nngp", "ntk"] | None = None,
    key: str | None = None,
    overwrite: bool = False,
    tile_size: int | tuple[int, int] | None = None,
    memory_budget: int | str | None = None,
    dtype: torch.dtype | None = None,
    client: distributed.Client | None = None,
    n_workers: int | None = None,
    devices: Sequence[str] | Literal["all"] | None = None,
    progress: bool | None = None,
    on_tile: Callable[[TileDone], None] | None = None,
) -> zarr.Array:
    """`kernel_matrix` to disk only: the matrix is never held in memory.

    Takes the same arguments (``out`` is required) and returns the finished
    zarr array ``out/kernel``, shape ``(N1, N2)``; read parts of it with
    ``array[i0:i1]`` (NumPy) or all of it with ``torch.from_numpy(array[...])``.
    """
    job = Job.make(kernel, x1, x2, get=get, key=key, tile_size=tile_size,
                   memory_budget=memory_budget, dtype=dtype)
    sink = ZarrSink.open(Path(out), job, overwrite=overwrite)
    try:
        run_tiles(sink.job, sink, client=client, n_workers=n_workers, devices=devices,
                  progress=progress, on_tile=on_tile)
    finally:
        sink.close()
    return sink.kernel

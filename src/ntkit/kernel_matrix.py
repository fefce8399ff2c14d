"""A kernel matrix as a grid of independent tiles: in-process or on Dask, resumable on disk.

`kernel_matrix` splits ``k(x1, x2)`` into tiles of any size and computes them
one by one in this process, or as tasks on a Dask cluster: one you pass
(``client=``, e.g. on SLURM or Kubernetes), or a `distributed.LocalCluster` of
single-threaded CPU worker processes (``n_workers=``) or of one worker per GPU
(``devices=``) started for the call. With ``out=`` each finished tile is
written to a chunked zarr array on disk (one chunk per tile) in the order tiles
finish; a per-tile done-mask is set only after the tile's values are written, so
a run killed at any point (``kill -9`` included) resumes from that directory
and computes only the tiles not marked done. `write_kernel_matrix` does the
same and returns the zarr array without loading it, for matrices larger than
memory.

The kernel is an ntkit network (tiles are ``net.kernel(a, b)``, its ``ntk`` or
``nngp``) or any function ``kernel_fn(a, b) -> Tensor (Na, Nb)``: an empirical
NTK (``lambda a, b: nk.empirical_ntk(model, a, b)``), a Monte Carlo estimate
(``lambda a, b: nk.monte_carlo_kernel(net, a, b, n_samples=8,
generator=torch.Generator().manual_seed(0)).ntk``; seed inside the function so
that every tile sees the same networks), or any other kernel.

On disk, ``out`` is a zarr group with two arrays: ``kernel`` ``(N1, N2)``
(chunks are tiles; never-computed tiles read as NaN) and ``done``
``(tile rows, tile columns)`` (bool, one chunk per tile; for ``x2=None`` only
tiles on and above the diagonal are marked, each also filling its mirror). The ``kernel``
array's attributes record what it holds: a SHA-256 fingerprint of ``x1`` and
``x2`` (bytes, shape, dtype), the network's ``repr`` (or the function's
qualified name and the user's ``key``), ``get``, the dtype and the tile size.
A later call with the same ``out`` is a resume; one that differs in any of
these is refused (``overwrite=True`` starts over).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ._checks import as_input_pair
from ._budget import parse_memory, progress_bar, tile_sides
from .tiling import peak_positions
from .layers.base import Layer

if TYPE_CHECKING:
    import distributed
    import zarr

__all__ = ["TileDone", "kernel_matrix", "write_kernel_matrix"]

logger = logging.getLogger(__name__)

#: A kernel function: two input batches ``(Na, ...)``, ``(Nb, ...)`` -> ``(Na, Nb)``.
KernelFn = Callable[[Tensor, Tensor], Tensor]
#: Smallest default tile side for a network. Each ``net.kernel(a, b)`` call has
#: costs that grow with ``Na + Nb`` (checks, and for pooling networks the self
#: trace of each example): on the `cnn` benchmark workload, in CPU time, tiles of 8
#: took 1.4-1.8x one call over all 64 images, tiles of 16 1.1-1.4x, of 32 1.0-1.2x.
_MIN_NETWORK_TILE = 16
#: Where a GPU worker runs its tiles (set in each worker's environment by ``devices=``).
_DEVICE_ENV = "NTKIT_KERNEL_DEVICE"
#: ... which is its only visible GPU (``CUDA_VISIBLE_DEVICES`` pins it).
_GPU_WORKER_DEVICE = "cuda:0"
#: The scheduler of a cluster started here: no dashboard, and its HTTP routes on a free
#: port rather than 8787 (which another cluster may hold).
_NO_DASHBOARD = {"dashboard": False, "dashboard_address": ":0"}
#: Dask starts workers with MALLOC_TRIM_THRESHOLD_ set, which fixes glibc's mmap threshold at
#: 128 KiB: every larger tensor is then mapped, page-faulted and unmapped anew. On the `cnn`
#: benchmark a worker spent 6 s of system time per 3.7 s of compute; with this threshold (glibc's
#: own dynamic maximum) 0.6 s. Workers started here get it unless the environment sets it.
_WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": 32 << 20}
_FORMAT = 1
_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class TileDone:
    """A tile of a kernel matrix whose values are stored (passed to ``on_tile``).

    Attributes:
        index: the tile's (row, column) in the grid of tiles.
        rows: ``(start, stop)`` of its rows (examples of ``x1``).
        cols: ``(start, stop)`` of its columns (examples of ``x2``, or of ``x1``
            for a symmetric matrix, whose tile is also stored mirrored).
        seconds: compute time of the tile where it ran.
        where: ``"in-process"`` or the address of the Dask worker.
    """

    index: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    seconds: float
    where: str


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
            mirrored).
        get: ``"ntk"`` (default) or ``"nngp"``, the kernel of a network; a
            ``kernel_fn`` returns one matrix and takes no ``get``.
        out: a directory for the matrix as a zarr group (see the module's
            docstring). Tiles are written as they finish; a directory from an
            earlier call with the same inputs, kernel and options is resumed.
            None keeps the matrix in memory only.
        key: for a ``kernel_fn``, a string that tells its kernels apart (e.g. a
            checkpoint's name); recorded with ``out`` next to the function's
            qualified name, which alone cannot tell two models apart.
        overwrite: discard what ``out`` holds instead of refusing a directory
            written for other inputs or another kernel.
        tile_size: rows and columns per tile (an int, or ``(rows, cols)``; a
            symmetric matrix takes square tiles); need not divide N1 or N2.
            Default: from ``memory_budget`` as `ntkit.compute.tiled_kernel`
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
        CPU; with ``out``, read back from disk (`write_kernel_matrix` returns
        the zarr array without reading it).

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
    job = _Job.make(kernel, x1, x2, get=get, key=key, tile_size=tile_size,
                    memory_budget=memory_budget, dtype=dtype)
    if out is None:
        sink: _Sink = _MemorySink(job)
    else:
        sink = _ZarrSink.open(Path(out), job, overwrite=overwrite)
    _compute(sink.job, sink, client=client, n_workers=n_workers, devices=devices,
             progress=progress, on_tile=on_tile)
    return sink.load()


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
    job = _Job.make(kernel, x1, x2, get=get, key=key, tile_size=tile_size,
                    memory_budget=memory_budget, dtype=dtype)
    sink = _ZarrSink.open(Path(out), job, overwrite=overwrite)
    _compute(sink.job, sink, client=client, n_workers=n_workers, devices=devices,
             progress=progress, on_tile=on_tile)
    return sink.kernel


# ------------------------------------------------------------------ the job
@dataclass(frozen=True)
class _Job:
    """What to compute: the kernel, its inputs and the grid of tiles."""

    kernel: Layer | KernelFn
    x1: Tensor
    x2: Tensor | None
    get: str | None
    dtype: torch.dtype
    rows: int
    cols: int
    identity: dict[str, Any]   # everything a stored matrix must agree on, tiles aside
    tile_given: bool
    budget: int

    @staticmethod
    def make(kernel, x1, x2, *, get, key, tile_size, memory_budget, dtype) -> _Job:
        is_net = isinstance(kernel, Layer)
        if is_net:
            if get not in (None, "nngp", "ntk"):
                raise ValueError(f"get must be 'ntk' or 'nngp', got {get!r}.")
            get = get or "ntk"
            x1, x2 = as_input_pair(x1, x2)
            name = repr(kernel)
        elif callable(kernel):
            if get is not None:
                raise ValueError(
                    f"get={get!r} picks the NNGP or NTK of an ntkit network; a kernel function "
                    f"returns one matrix. Drop get=, or return the other kernel from the function."
                )
            x1 = _batch(x1, "x1")
            x2 = None if x2 is None else _batch(x2, "x2")
            name = getattr(kernel, "__qualname__", type(kernel).__qualname__)
        else:
            raise TypeError(
                f"kernel must be an ntkit network or a function kernel_fn(a, b) -> Tensor "
                f"(Na, Nb), got {type(kernel).__name__}."
            )
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a string, got {type(key).__name__}.")
        if dtype is None:
            dtype = x1.dtype if x1.dtype in _DTYPES else torch.float32
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
        budget = parse_memory(memory_budget)
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        if is_net:
            _check_network(kernel, x1, x2, get)
        rows, cols = _tile_shape(kernel, x1, n1, n2, x2 is None, budget, tile_size)
        identity = {
            "format": _FORMAT, "x1": _describe(x1), "x2": None if x2 is None else _describe(x2),
            "kernel": name, "key": key, "get": get, "dtype": str(dtype).removeprefix("torch."),
        }
        return _Job(kernel, x1, x2, get, dtype, rows, cols, identity, tile_size is not None,
                    budget)

    @property
    def shape(self) -> tuple[int, int]:
        n1 = self.x1.shape[0]
        return n1, n1 if self.x2 is None else self.x2.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return math.ceil(self.shape[0] / self.rows), math.ceil(self.shape[1] / self.cols)

    @property
    def symmetric(self) -> bool:
        return self.x2 is None

    def with_tile(self, rows: int, cols: int) -> _Job:
        return dataclasses.replace(self, rows=rows, cols=cols)

    def tasks(self) -> list[tuple[int, int]]:
        """The tiles to compute, largest first (longest tasks first balances workers):
        all of them, or those on and above the diagonal when symmetric."""
        g1, g2 = self.grid
        tiles = [(i, j) for i in range(g1) for j in range(i if self.symmetric else 0, g2)]
        return sorted(tiles, key=lambda t: -self.cost(*t))

    def cost(self, i: int, j: int) -> float:
        (r0, r1), (c0, c1) = self.bounds(i, j)
        return (r1 - r0) * (c1 - c0) / (2 if self.symmetric and i == j else 1)

    def bounds(self, i: int, j: int) -> tuple[tuple[int, int], tuple[int, int]]:
        n1, n2 = self.shape
        return ((i * self.rows, min((i + 1) * self.rows, n1)),
                (j * self.cols, min((j + 1) * self.cols, n2)))


def _batch(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, ...), got "
                        f"{type(x).__name__}.")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape "
                         f"{tuple(x.shape)}.")
    return x


def _check_network(net: Layer, x1: Tensor, x2: Tensor | None, get: str) -> None:
    """Runs the network on one pair of examples: a clear error now rather than
    from every tile, and only networks that give one number per pair."""
    with torch.no_grad():
        k = getattr(net.kernel(x1[:1], None if x2 is None else x2[:1], progress=False), get)
    if k.ndim != 2:
        raise ValueError(
            f"kernel_matrix stores one number per pair of inputs, but {type(net).__name__} "
            f"gives a kernel of shape {tuple(k.shape)} per pair of batches (it ends with spatial "
            f"features); end it with a dense readout such as nk.GlobalAvgPool(), nk.Linear(1) "
            f"or nk.Flatten(), nk.Linear(1)."
        )


def _tile_shape(kernel, x1: Tensor, n1: int, n2: int, symmetric: bool, budget: int,
                tile_size) -> tuple[int, int]:
    if tile_size is not None:
        sides = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
        if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                      for s in sides):
            raise ValueError(f"tile_size must be a positive int or (rows, cols), got "
                             f"{tile_size!r}.")
        if symmetric and sides[0] != sides[1]:
            raise ValueError(
                f"k(x1, x1) is computed in square tiles (the upper ones, mirrored); got "
                f"tile_size={tile_size!r}. Give one int, e.g. tile_size={max(sides)}."
            )
        return min(sides[0], n1), min(sides[1], n2)
    if isinstance(kernel, Layer):
        positions = peak_positions(kernel, tuple(x1.shape[1:]), x1.dtype)
        if x1.ndim > 2 and kernel.needs_position_pairs():
            positions = positions**2
        rows, cols = tile_sides(n1, n2, x1.element_size() * positions, budget, x1.device,
                                positions)
        rows, cols = max(rows, min(n1, _MIN_NETWORK_TILE)), max(cols, min(n2, _MIN_NETWORK_TILE))
    else:
        rows, cols = tile_sides(n1, n2, x1.element_size(), budget, x1.device)
    if symmetric:
        rows = cols = min(rows, cols)
    return rows, cols


def _describe(x: Tensor) -> dict[str, Any]:
    """Shape, dtype and the SHA-256 of the bytes of ``x``."""
    flat = x.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()
    return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
            "sha256": digest}


# ----------------------------------------------------------------- one tile
def _compute_tile(kernel: Layer | KernelFn, x1: Tensor, x2: Tensor | None,
                 rows: tuple[int, int], cols: tuple[int, int], get: str | None,
                 dtype: torch.dtype, budget: int) -> tuple[Tensor, float, str]:
    """One tile ``k(x1[rows], x2[cols])`` on the CPU, with its compute time and where
    it ran. Runs in this process or as a Dask task (then with torch's threads set
    to the worker's, on the worker's GPU if it has one)."""
    where = "in-process"
    device = None
    if "distributed" in sys.modules:  # a Dask worker has imported it; in-process, no import
        with contextlib.suppress(ValueError):  # ValueError: not on a worker
            worker = sys.modules["distributed"].get_worker()
            where = worker.address
            if torch.get_num_threads() != worker.state.nthreads:
                torch.set_num_threads(worker.state.nthreads)
            device = os.environ.get(_DEVICE_ENV)
    start = time.perf_counter()
    a = x1[rows[0]:rows[1]]
    b = (x1 if x2 is None else x2)[cols[0]:cols[1]]
    same = x2 is None and rows == cols
    if device is not None:
        a, b = a.to(device), b.to(device)
    with torch.no_grad():
        if isinstance(kernel, Layer):
            k = getattr(kernel.kernel(a, None if same else b, memory_budget=budget,
                                      progress=False), get)
        else:
            k = kernel(a, b)
    if not isinstance(k, Tensor) or tuple(k.shape) != (len(a), len(b)):
        got = f"shape {tuple(k.shape)}" if isinstance(k, Tensor) else type(k).__name__
        raise ValueError(
            f"the kernel function must return a Tensor of shape (Na, Nb) = ({len(a)}, {len(b)}) "
            f"for inputs of shapes {tuple(a.shape)} and {tuple(b.shape)}, got {got}. For "
            f"empirical_ntk use output='trace' (the default)."
        )
    tile = k.detach().to("cpu", dtype)
    return tile, time.perf_counter() - start, where


# --------------------------------------------------------- where tiles go
class _Sink:
    """Where finished tiles are stored."""

    def done(self) -> set[tuple[int, int]]:
        raise NotImplementedError

    def write(self, i: int, j: int, tile: Tensor) -> None:
        raise NotImplementedError

    def load(self) -> Tensor:
        raise NotImplementedError


class _MemorySink(_Sink):
    def __init__(self, job: _Job):
        self.job = job
        self.matrix = torch.full(job.shape, math.nan, dtype=job.dtype)

    def done(self) -> set[tuple[int, int]]:
        return set()

    def write(self, i: int, j: int, tile: Tensor) -> None:
        (r0, r1), (c0, c1) = self.job.bounds(i, j)
        self.matrix[r0:r1, c0:c1] = tile
        if self.job.symmetric and i != j:
            self.matrix[c0:c1, r0:r1] = tile.T

    def load(self) -> Tensor:
        return self.matrix


class _ZarrSink(_Sink):
    """A zarr group ``kernel`` + ``done``; a tile's done flag is written after its values
    (zarr's local store writes each chunk to a temporary file and renames it, so a
    killed process leaves every chunk either old or new)."""

    def __init__(self, job: _Job, group):
        self.job = job
        self.kernel = group["kernel"]
        self.mask = group["done"]

    @classmethod
    def open(cls, path: Path, job: _Job, *, overwrite: bool) -> _ZarrSink:
        zarr = _import("zarr")
        is_zarr = (path / "zarr.json").is_file()
        if path.exists() and not is_zarr and (path.is_file() or any(path.iterdir())):
            raise ValueError(
                f"out={str(path)!r} exists and is not a kernel matrix written by ntkit (no "
                f"zarr.json); ntkit does not delete what it did not write. Give a new or empty "
                f"directory."
            )
        if is_zarr and not overwrite:
            try:
                group = zarr.open_group(str(path), mode="r+")
            except Exception as e:  # noqa: BLE001 - a zarr array, or a damaged store
                raise ValueError(
                    f"out={str(path)!r} is not a kernel matrix written by ntkit ({e}); give "
                    f"another directory, or overwrite=True to replace it."
                ) from None
            if "kernel" in group:
                job = _resumable(path, job, dict(group["kernel"].attrs))
                return cls(job, group)
            # no kernel array yet: killed while creating, before any tile; start afresh
        group = zarr.open_group(str(path), mode="w")
        g1, g2 = job.grid
        # the done-mask first, the fingerprinted kernel array last: a store with a
        # fingerprint always has its mask
        group.create_array("done", shape=(g1, g2), chunks=(1, 1), dtype=bool, fill_value=False,
                           compressors=None)
        group.create_array(
            "kernel", shape=job.shape, chunks=(job.rows, job.cols),
            dtype=str(job.dtype).removeprefix("torch."), fill_value=math.nan, compressors=None,
            attributes={"ntkit_kernel_matrix": {**job.identity, "shape": list(job.shape),
                                                "tile": [job.rows, job.cols]}},
        )
        return cls(job, group)

    def done(self) -> set[tuple[int, int]]:
        return {(int(i), int(j)) for i, j in zip(*self.mask[...].nonzero())}

    def write(self, i: int, j: int, tile: Tensor) -> None:
        (r0, r1), (c0, c1) = self.job.bounds(i, j)
        values = tile.numpy()
        self.kernel[r0:r1, c0:c1] = values
        if self.job.symmetric and i != j:
            self.kernel[c0:c1, r0:r1] = values.T
        self.mask[i, j] = True

    def load(self) -> Tensor:
        return torch.from_numpy(self.kernel[...])


def _resumable(path: Path, job: _Job, attrs: dict) -> _Job:
    """``job`` with the stored tile size, or a ValueError naming what differs."""
    stored = attrs.get("ntkit_kernel_matrix")
    if not isinstance(stored, dict):
        raise ValueError(
            f"out={str(path)!r} is a zarr store but not a kernel matrix written by ntkit; give "
            f"another directory, or overwrite=True to replace it."
        )
    differ = [f"{name} (stored: {_show(stored.get(name))}; now: {_show(value)})"
              for name, value in job.identity.items() if stored.get(name) != value]
    rows, cols = stored.get("tile", (None, None))
    if job.tile_given and (rows, cols) != (job.rows, job.cols):
        differ.append(f"tile size (stored: {rows} x {cols}; now: {job.rows} x {job.cols})")
    if differ:
        raise ValueError(
            f"out={str(path)!r} holds a kernel matrix computed with a different "
            + "; ".join(differ) + ". Resuming would mix two matrices. Pass overwrite=True to "
            "discard it, or give another out=."
        )
    return job.with_tile(rows, cols)


def _show(value) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"shape {value['shape']} {value['dtype']}, sha256 {value['sha256'][:12]}..."
    return repr(value)


# ------------------------------------------------------------------ running
def _compute(job: _Job, sink: _Sink, *, client, n_workers, devices, progress,
             on_tile) -> None:
    done = sink.done()
    tasks = [t for t in job.tasks() if t not in done]
    bar = progress_bar(tasks, desc="kernel tiles", unit="tile", progress=progress, min_items=4,
                       initial=len(done))
    computed = 0
    try:
        finished = contextlib.closing(_run(job, tasks, client, n_workers, devices))
        with finished as tiles:
            for (i, j), tile, seconds, where in tiles:
                sink.write(i, j, tile)
                computed += 1
                bar.update(1)
                if on_tile is not None:
                    rows, cols = job.bounds(i, j)
                    on_tile(TileDone((i, j), rows, cols, seconds, where))
    finally:
        bar.close()
        logger.info("kernel_matrix: computed %d tiles, reused %d, %d left", computed, len(done),
                    len(tasks) - computed)


def _run(job: _Job, tasks: list[tuple[int, int]], client, n_workers, devices
         ) -> Iterator[tuple[tuple[int, int], Tensor, float, str]]:
    """Yields ``((i, j), tile, seconds, where)`` as tiles finish."""
    if not tasks:
        return
    with _cluster(client, n_workers, devices) as dask_client:
        if dask_client is None:
            for i, j in tasks:
                tile, seconds, where = _compute_tile(job.kernel, job.x1, job.x2, *job.bounds(i, j),
                                                    job.get, job.dtype, job.budget)
                yield (i, j), tile, seconds, where
            return
        from distributed import as_completed

        # inputs go to the workers once (each worker keeps a copy); tasks refer to them
        kernel, x1, x2 = dask_client.scatter(
            [job.kernel, job.x1.detach().cpu(), None if job.x2 is None else job.x2.detach().cpu()],
            broadcast=True, hash=False)
        run = uuid.uuid4().hex[:8]
        futures = {
            dask_client.submit(_compute_tile, kernel, x1, x2, *job.bounds(i, j), job.get,
                               job.dtype, job.budget, key=f"ntkit-tile-{run}-{i}-{j}"): (i, j)
            for i, j in tasks
        }
        try:
            for future in as_completed(list(futures)):
                tile, seconds, where = future.result()
                yield futures.pop(future), tile, seconds, where
                future.release()
        finally:
            if futures:
                dask_client.cancel(list(futures))
            dask_client.cancel([kernel, x1, x2])


@contextlib.contextmanager
def _cluster(client, n_workers, devices) -> Iterator[distributed.Client | None]:
    """The client to submit tiles to: the user's, one for a cluster started here
    (closed on exit), or None to run in-process."""
    given = [name for name, value in (("client", client), ("n_workers", n_workers),
                                      ("devices", devices)) if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"give at most one of client=, n_workers= and devices= (got {', '.join(given)}): "
            f"a client runs tiles on its own cluster, the others start one for the call."
        )
    if client is not None:
        yield client
        return
    if devices is not None:
        visible = _gpu_workers(devices)
        distributed = _import("distributed")
        workers = {
            f"ntkit-gpu-{v}": {"cls": distributed.Nanny, "options": {
                "nthreads": 1, "host": "127.0.0.1", "silence_logs": logging.ERROR,
                "env": {"CUDA_VISIBLE_DEVICES": v, _DEVICE_ENV: _GPU_WORKER_DEVICE}}}
            for v in visible
        }
        with _worker_environ():
            cluster = distributed.SpecCluster(
                workers=workers, scheduler={"cls": distributed.Scheduler, "options": {
                    "host": "127.0.0.1", "port": 0, **_NO_DASHBOARD}},
                silence_logs=logging.ERROR)
    elif n_workers is not None:
        if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
            raise ValueError(f"n_workers must be a positive int, got {n_workers!r}.")
        distributed = _import("distributed")
        with _worker_environ():
            cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                               processes=True, dashboard_address=None,
                                               scheduler_kwargs=_NO_DASHBOARD,
                                               silence_logs=logging.ERROR)
    else:
        yield None
        return
    with cluster, distributed.Client(cluster) as started:
        yield started


def _worker_environ():
    """Dask configuration for the workers of a cluster started here (read as they start)."""
    dask = _import("dask")
    return dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": value
                            for name, value in _WORKER_ENVIRON.items()})


def _gpu_workers(devices) -> list[str]:
    """For each requested GPU, what its worker's ``CUDA_VISIBLE_DEVICES`` should be
    (the index, or this process's own entry for it when that variable is set)."""
    if isinstance(devices, str) and devices != "all":
        raise TypeError(f"devices must be a list such as ['cuda:0', 'cuda:1'] or 'all', got "
                        f"{devices!r}.")
    indices = []
    if devices != "all":
        for d in devices:
            try:
                dev = torch.device(d)
            except (RuntimeError, TypeError):
                dev = None
            if dev is None or dev.type != "cuda" or dev.index is None:
                raise ValueError(f"devices takes CUDA devices with an index, such as 'cuda:0'; "
                                 f"got {d!r}.")
            if dev.index in indices:
                raise ValueError(f"devices lists cuda:{dev.index} twice: {list(devices)}.")
            indices.append(dev.index)
        if not indices:
            raise ValueError("devices is empty; give e.g. ['cuda:0'] or 'all'.")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"devices={devices!r} starts one worker per GPU, but torch sees no CUDA device "
            f"(torch.cuda.is_available() is False; torch {torch.__version__}). Use n_workers=N "
            f"for CPU worker processes, or a CUDA build of torch on a machine with GPUs."
        )
    count = torch.cuda.device_count()
    if devices == "all":
        indices = list(range(count))
    missing = [i for i in indices if i >= count]
    if missing:
        raise ValueError(f"devices asks for cuda:{missing[0]}, but torch sees {count} GPU(s) "
                         f"(cuda:0 to cuda:{count - 1}).")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    mine = [v.strip() for v in env.split(",")] if env else None
    return [mine[i] if mine else str(i) for i in indices]


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(
            f"kernel_matrix needs {name} for this ({e}); install it with "
            f"pip install 'ntkit[distributed]'."
        ) from None

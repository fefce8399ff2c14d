"""What a kernel matrix job computes: the kernel, its inputs, the grid of tiles, and
one tile (run in this process or as a Dask task)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._budget import parse_memory, tile_sides
from .._checks import as_input_pair
from ..kernel import same_inputs
from ..kernel_function import KernelFunction, check_get
from ..tiling import peak_positions
from ._identity import fingerprint

__all__ = ["DEVICE_ENV", "Job", "KernelFn", "TileDone", "compute_tile"]

#: A kernel function: two input batches ``(Na, ...)``, ``(Nb, ...)`` -> ``(Na, Nb)``.
KernelFn = Callable[[Tensor, Tensor], Tensor]
#: Smallest default tile side for a network. Each ``net.kernel(a, b)`` call has
#: costs that grow with ``Na + Nb`` (checks, and for pooling networks the self
#: trace of each example): on the `cnn` benchmark workload, in CPU time, tiles of 8
#: took 1.4-1.8x one call over all 64 images, tiles of 16 1.1-1.4x, of 32 1.0-1.2x.
MIN_NETWORK_TILE = 16
#: Where a GPU worker runs its tiles (set in each worker's environment by ``devices=``).
DEVICE_ENV = "NTKIT_KERNEL_DEVICE"
#: The version of the on-disk layout, recorded in a store's identity (2: content
#: fingerprints, per-tile checksums, the group's marker).
FORMAT = 2
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


@dataclass(frozen=True)
class Job:
    """What to compute: the kernel, its inputs and the grid of tiles.

    Attributes:
        kernel: the kernel as the one network-to-kernel-function adapter
            (`ntkit.kernel_function.KernelFunction`): a network's ``get``
            matrix, or the user's function as given.
        x1: inputs ``(N1, ...)``.
        x2: inputs ``(N2, ...)``, or None for the symmetric ``k(x1, x1)`` (also
            when the caller passed ``x1`` twice).
        get: ``"nngp"`` or ``"ntk"`` for a network, None for a function.
        dtype: the matrix's dtype.
        rows: rows per tile.
        cols: columns per tile.
        identity: everything a stored matrix must agree on, tiles aside (empty
            for a matrix kept in memory).
        tile_given: whether the caller chose the tile size.
        budget: bytes of working memory per tile.
    """

    kernel: KernelFunction
    x1: Tensor
    x2: Tensor | None
    get: str | None
    dtype: torch.dtype
    rows: int
    cols: int
    identity: dict[str, Any]
    tile_given: bool
    budget: int

    @staticmethod
    def make(kernel, x1, x2, *, get, key, tile_size, memory_budget, dtype,
             stored: bool = True) -> Job:
        """The job of a `ntkit.kernel_matrix` call, its arguments checked; its
        ``identity`` (a content fingerprint of the kernel) only when ``stored``."""
        if isinstance(kernel, KernelFunction):
            kernel = kernel.source
        is_net = hasattr(kernel, "kernel")
        if is_net:
            get = "ntk" if get is None else check_get(get)
            x1, x2 = as_input_pair(x1, x2)
        elif callable(kernel):
            if get is not None:
                raise ValueError(
                    f"get={get!r} picks the NNGP or NTK of an ntkit network; a kernel function "
                    f"returns one matrix. Drop get=, or return the other kernel from the function."
                )
            x1 = _batch(x1, "x1")
            x2 = None if x2 is None else _batch(x2, "x2")
        else:
            raise TypeError(
                f"kernel must be an ntkit network or a function kernel_fn(a, b) -> Tensor "
                f"(Na, Nb), got {type(kernel).__name__}."
            )
        if same_inputs(x1, x2):
            x2 = None  # k(x, x) written with x twice: the symmetric matrix, half the tiles
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
        rows, cols = _tile_shape(kernel, is_net, x1, n1, n2, x2 is None, budget, tile_size)
        identity = {} if not stored else {
            "format": FORMAT, "x1": _describe(x1), "x2": None if x2 is None else _describe(x2),
            **_describe_kernel(kernel, is_net), "key": key, "get": get,
            "dtype": str(dtype).removeprefix("torch."),
        }
        fn = KernelFunction(kernel, get, memory_budget=budget, progress=False)
        return Job(fn, x1, x2, get, dtype, rows, cols, identity, tile_size is not None, budget)

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

    def with_tile(self, rows: int, cols: int) -> Job:
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


def _check_network(net, x1: Tensor, x2: Tensor | None, get: str) -> None:
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


def _tile_shape(kernel, is_net: bool, x1: Tensor, n1: int, n2: int, symmetric: bool,
                budget: int, tile_size) -> tuple[int, int]:
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
    if is_net:
        positions = peak_positions(kernel, tuple(x1.shape[1:]), x1.dtype)
        if x1.ndim > 2 and kernel.needs_position_pairs():
            positions = positions**2
        rows, cols = tile_sides(n1, n2, x1.element_size() * positions, budget, x1.device,
                                positions)
        rows, cols = max(rows, min(n1, MIN_NETWORK_TILE)), max(cols, min(n2, MIN_NETWORK_TILE))
    else:
        rows, cols = tile_sides(n1, n2, x1.element_size(), budget, x1.device)
    if symmetric:
        rows = cols = min(rows, cols)
    return rows, cols


def _describe_kernel(kernel, is_net: bool) -> dict[str, Any]:
    """A network's repr (for the reader) and content fingerprint, or a function's
    qualified name; and the Python functions whose code the identity cannot see (a
    ``kernel_fn`` itself, or those a network holds), which make ``key=`` necessary."""
    if is_net:
        found = fingerprint(kernel)
        text = repr(kernel)
        if len(text) > 2000:
            text = text[:2000] + "..."
        return {"kernel": {"name": text, "sha256": found.sha256},
                "callables": list(found.callables)}
    name = getattr(kernel, "__qualname__", None) or type(kernel).__qualname__
    return {"kernel": {"name": name, "sha256": None}, "callables": [name]}


def _describe(x: Tensor) -> dict[str, Any]:
    """Shape, dtype and the SHA-256 of the bytes of ``x``."""
    flat = x.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()
    return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
            "sha256": digest}


def compute_tile(kernel: KernelFunction, x1: Tensor, x2: Tensor | None,
                 rows: tuple[int, int], cols: tuple[int, int],
                 dtype: torch.dtype) -> tuple[Tensor, float, str]:
    """One tile ``k(x1[rows], x2[cols])`` on the CPU, with its compute time and where
    it ran. Runs in this process or as a Dask task (then with torch's threads set
    to the worker's, on the worker's GPU if it has one).

    Args:
        kernel: the job's kernel function (see `Job.kernel`).
        x1: inputs ``(N1, ...)``.
        x2: inputs ``(N2, ...)``, or None for the symmetric matrix.
        rows: ``(start, stop)`` of the tile's rows.
        cols: ``(start, stop)`` of its columns.
        dtype: the tile's dtype on return.

    Returns:
        ``(tile, seconds, where)``: the tile ``(rows, cols)`` on the CPU, its
        compute time, and ``"in-process"`` or the Dask worker's address.
    """
    where = "in-process"
    device = None
    if "distributed" in sys.modules:  # a Dask worker has imported it; in-process, no import
        with contextlib.suppress(ValueError):  # ValueError: not on a worker
            worker = sys.modules["distributed"].get_worker()
            where = worker.address
            if torch.get_num_threads() != worker.state.nthreads:
                torch.set_num_threads(worker.state.nthreads)
            device = os.environ.get(DEVICE_ENV)
    start = time.perf_counter()
    a = x1[rows[0]:rows[1]]
    b = (x1 if x2 is None else x2)[cols[0]:cols[1]]
    same = x2 is None and rows == cols
    if device is not None:
        a, b = a.to(device), b.to(device)
    with torch.no_grad():
        # a network's diagonal tile is k(a) (one triangle, exact self-pairs); a function
        # is always called with both batches
        k = kernel(a, None if same and kernel.is_network else b)
    if not isinstance(k, Tensor) or tuple(k.shape) != (len(a), len(b)):
        got = f"shape {tuple(k.shape)}" if isinstance(k, Tensor) else type(k).__name__
        raise ValueError(
            f"the kernel function must return a Tensor of shape (Na, Nb) = ({len(a)}, {len(b)}) "
            f"for inputs of shapes {tuple(a.shape)} and {tuple(b.shape)}, got {got}. For "
            f"empirical_ntk use output='trace' (the default)."
        )
    tile = k.detach().to("cpu", dtype)
    return tile, time.perf_counter() - start, where

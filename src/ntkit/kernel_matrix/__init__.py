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
these is refused (``overwrite=True`` starts over; the refusal is an
`ntkit.errors.StoreError` naming the store, what is wrong and the fix). ``x2``
that is ``x1`` (itself or a view) is stored and resumed as ``x2=None``.

The package's parts: ``_job`` (what to compute, and one tile), ``_store``
(memory and zarr sinks), ``_cluster`` (in-process or Dask), ``_api`` (the two
public calls). Networks are called through `ntkit.kernel_function`, so no
layer module is imported here.
"""

from ._api import kernel_matrix, write_kernel_matrix
from ._job import TileDone

__all__ = ["TileDone", "kernel_matrix", "write_kernel_matrix"]

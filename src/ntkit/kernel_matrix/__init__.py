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

On disk, ``out`` is a zarr group marked as ntkit's (group attribute
``ntkit_kernel_store``) with three arrays: ``kernel`` ``(N1, N2)`` (chunks are
tiles; never-computed tiles read as NaN), ``checksum`` (the SHA-256 of each
stored tile's bytes) and ``done`` ``(tile rows, tile columns)`` (bool, one chunk
per tile; for ``x2=None`` only tiles on and above the diagonal are marked, each
also filling its mirror). The ``kernel`` array's attributes record what it holds:
a SHA-256 fingerprint of ``x1`` and ``x2`` (bytes, shape, dtype), the kernel's
content fingerprint (a network's layer types and attributes at full precision,
tensors by bytes; a function's qualified name), the user's ``key``, ``get``, the
dtype and the tile size. A later call with the same ``out`` is a resume; one that
differs in any of these is refused (``overwrite=True`` starts over; the refusal is
an `ntkit.errors.StoreError` naming the store, what is wrong and the fix). ``x2``
that is ``x1`` (itself or a view) is stored and resumed as ``x2=None``.

What a store guarantees:

- ntkit never deletes or writes into a folder it did not write: an existing file,
  a non-empty folder without a store, or a zarr group without the marker is
  refused, with or without ``overwrite=True``; ``overwrite=True`` deletes only the
  store's own entries (``zarr.json``, ``kernel``, ``checksum``, ``done``) and
  leaves anything else in the folder.
- The code of a Python function is not part of any fingerprint: a ``kernel_fn``,
  or a network holding one (``Elementwise(lambda z: ...)``), may start a new store
  without ``key=``, but a store is resumed for it only with the same explicit
  ``key=`` (a name for what it computes, e.g. a checkpoint's). Otherwise the
  resume is refused, never guessed.
- One writer at a time: the writer holds the lock file ``out/ntkit.lock`` (created
  with ``O_CREAT | O_EXCL``, holding its process id, host and start time) until the
  call returns or raises; a second writer is refused, naming the holder. A lock
  whose process no longer runs on this host (``kill -9``) is taken over; one of
  another host must be deleted by hand once its writer is gone.
- Tiles are verified when read back: on resume a tile marked done whose values do
  not match its checksum (a chunk deleted or changed on disk) is computed again;
  on the final read a damaged tile raises a StoreError naming it.
- A tile with NaN or infinite values is never stored: the call raises
  `ntkit.errors.NonFiniteError` naming the tile and the likely cause.

The package's parts: ``_job`` (what to compute, and one tile), ``_identity``
(content fingerprints), ``_lock`` (the writer's lock), ``_store`` (memory and zarr
sinks, checksums), ``_cluster`` (in-process or Dask), ``_api`` (the two
public calls). Networks are called through `ntkit.kernel_function`, so no
layer module is imported here.
"""

from ._api import kernel_matrix, write_kernel_matrix
from ._job import TileDone

__all__ = ["TileDone", "kernel_matrix", "write_kernel_matrix"]

"""Where the tiles of a kernel matrix go: a tensor in memory, or a zarr store on disk
that a later call resumes (see `ntkit.kernel_matrix` for the layout).

A store on disk is ntkit's when its group carries `MARKER` (or, from format 1, its
``kernel`` array carries ``ntkit_kernel_matrix``); nothing else is ever opened for
writing, and ``overwrite=True`` deletes only the entries ntkit writes (`ENTRIES`,
the lock aside), leaving anything else in the folder. A writer holds the store's
lock (`StoreLock`) from opening to closing. Each finished tile's bytes have a
SHA-256 in the ``checksum`` array, written after the values and before the done
flag; tiles marked done are verified when read back: on resume a damaged tile is
computed again, on the final read it raises a `StoreError` naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import StoreError
from ._job import Job
from ._lock import LOCK_NAME, StoreLock

__all__ = ["ENTRIES", "MARKER", "MemorySink", "Sink", "ZarrSink", "import_optional"]

logger = logging.getLogger("ntkit.kernel_matrix")

#: The group attribute that marks a folder as an ntkit kernel store (its value: the format).
MARKER = "ntkit_kernel_store"
#: What ntkit writes in a store, the lock file aside: all ``overwrite=True`` deletes.
ENTRIES = ("zarr.json", "done", "checksum", "kernel")
_DIGEST = 32  # bytes of a tile's SHA-256


class Sink:
    """Where finished tiles are stored."""

    def done(self) -> set[tuple[int, int]]:
        raise NotImplementedError

    def write(self, i: int, j: int, tile: Tensor) -> None:
        raise NotImplementedError

    def load(self) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Releases what the sink holds (a store's lock)."""


class MemorySink(Sink):
    def __init__(self, job: Job):
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


class ZarrSink(Sink):
    """A zarr group ``kernel`` + ``checksum`` + ``done``, written under the store's lock;
    a tile's checksum is written after its values and its done flag last (zarr's local
    store writes each chunk to a temporary file and renames it, so a killed process
    leaves every chunk either old or new)."""

    def __init__(self, path: Path, job: Job, group, lock: StoreLock):
        self.path, self.job, self.lock = path, job, lock
        self.kernel = group["kernel"]
        self.mask = group["done"]
        self.checksum = group["checksum"]

    @classmethod
    def open(cls, path: Path, job: Job, *, overwrite: bool) -> ZarrSink:
        """The store at ``path`` for ``job``: resumed, created, or (``overwrite``) an
        ntkit store started over; its lock held until `close`.

        Raises:
            StoreError: ``path`` is not ntkit's, another writer holds it, or it holds
                another kernel matrix (without ``overwrite``).
        """
        zarr = import_optional("zarr")
        _refuse_foreign(path)  # before writing anything, the lock included
        path.mkdir(parents=True, exist_ok=True)
        lock = StoreLock(path)
        lock.acquire()
        try:
            _refuse_foreign(path)  # again under the lock: another writer may have changed it
            if _is_ntkit_store(path) and not overwrite:
                group = zarr.open_group(str(path), mode="r+")
                if "kernel" in group and "checksum" in group:
                    job = resumable(path, job, dict(group["kernel"].attrs))
                    return cls(path, job, group, lock)
                if "kernel" in group:  # format 1: refused with the differing format
                    resumable(path, job, dict(group["kernel"].attrs))
                # no kernel array yet: killed while creating, before any tile; start afresh
            _remove_entries(path)
            return cls(path, job, _create(zarr, path, job), lock)
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        self.lock.release()

    def done(self) -> set[tuple[int, int]]:
        """The tiles marked done whose values match their checksums; a damaged one is
        logged, unmarked, and left to compute again."""
        marked = {(int(i), int(j)) for i, j in zip(*self.mask[...].nonzero())}
        sums = self._checksums()
        damaged = sorted(t for t in marked if self._damage(*t, sums))
        for i, j in damaged:
            logger.warning("kernel_matrix: tile %s of %s does not match its checksum (a "
                           "chunk deleted or changed); computing it again", (i, j), self.path)
            self.mask[i, j] = False
        return marked - set(damaged)

    def write(self, i: int, j: int, tile: Tensor) -> None:
        (r0, r1), (c0, c1) = self.job.bounds(i, j)
        values = tile.numpy()
        self.kernel[r0:r1, c0:c1] = values
        sums = [(i, j, values)]
        if self.job.symmetric and i != j:
            self.kernel[c0:c1, r0:r1] = values.T
            sums.append((j, i, values.T))
        for a, b, block in sums:
            self.checksum[a, b] = np.frombuffer(_sha256(block), dtype=np.uint8)
        self.mask[i, j] = True

    def load(self) -> Tensor:
        """The whole matrix, every tile checked against its checksum.

        Raises:
            StoreError: a tile is not done or does not match its checksum (fix
                ``"resume"``).
        """
        matrix = self.kernel[...]
        sums, mask = self._checksums(), self.mask[...]
        bad = []
        for i, j in self.job.tasks():
            blocks = [(i, j)] + ([(j, i)] if self.job.symmetric and i != j else [])
            if not mask[i, j] or any(
                    _sha256(matrix[self._slices(a, b)]) != sums[a, b].tobytes()
                    for a, b in blocks):
                bad.append((i, j))
        if bad:
            raise StoreError(self.path, _damaged(self.job, bad), "resume")
        return torch.from_numpy(matrix)

    def _checksums(self) -> np.ndarray:
        """The ``checksum`` array (g1 x g2 x 32 bytes: one read); a chunk zarr cannot
        decode reads as zeros (matching no tile)."""
        try:
            return self.checksum[...]
        except (ValueError, OSError, KeyError):
            sums = np.zeros(self.checksum.shape, dtype=np.uint8)
            for i, j in np.ndindex(*sums.shape[:2]):
                with contextlib.suppress(ValueError, OSError, KeyError):
                    sums[i, j] = self.checksum[i, j]
            return sums

    def _slices(self, i: int, j: int) -> tuple[slice, slice]:
        (r0, r1), (c0, c1) = self.job.bounds(i, j)
        return slice(r0, r1), slice(c0, c1)

    def _damage(self, i: int, j: int, sums: np.ndarray) -> bool:
        """Whether done tile ``(i, j)`` (and its mirror) differs from its checksum in
        ``sums`` (the ``checksum`` array)."""
        blocks = [(i, j)] + ([(j, i)] if self.job.symmetric and i != j else [])
        for a, b in blocks:
            try:
                values = self.kernel[self._slices(a, b)]
            except (ValueError, OSError, KeyError):  # a chunk zarr cannot decode: damaged
                return True
            if _sha256(values) != sums[a, b].tobytes():
                return True
        return False


def _sha256(block: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(block).tobytes()).digest()


def _damaged(job: Job, tiles: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"{t} (rows {job.bounds(*t)[0][0]}:{job.bounds(*t)[0][1]}, columns "
                      f"{job.bounds(*t)[1][0]}:{job.bounds(*t)[1][1]})" for t in tiles[:5])
    more = f" and {len(tiles) - 5} more" if len(tiles) > 5 else ""
    return (f"has tiles that are missing or do not match their checksums: {shown}{more} (a "
            f"chunk file deleted or changed on disk, or another program writing into the "
            f"store); ntkit does not return a matrix with damaged tiles")


def _create(zarr, path: Path, job: Job):
    """A new store in ``path`` (which holds none of `ENTRIES`): the marked group, the
    done-mask and checksums, and the fingerprinted kernel array last (a store with a
    fingerprint always has its mask)."""
    from ._job import FORMAT

    group = zarr.create_group(store=str(path), attributes={MARKER: FORMAT}, overwrite=False)
    g1, g2 = job.grid
    group.create_array("done", shape=(g1, g2), chunks=(1, 1), dtype=bool, fill_value=False,
                       compressors=None)
    group.create_array("checksum", shape=(g1, g2, _DIGEST), chunks=(1, 1, _DIGEST),
                       dtype="uint8", fill_value=0, compressors=None)
    group.create_array(
        "kernel", shape=job.shape, chunks=(job.rows, job.cols),
        dtype=str(job.dtype).removeprefix("torch."), fill_value=math.nan, compressors=None,
        attributes={"ntkit_kernel_matrix": {**job.identity, "shape": list(job.shape),
                                            "tile": [job.rows, job.cols]}},
    )
    return group


def _metadata(file: Path) -> dict:
    """A zarr.json's content, or ``{}`` when it is missing or not a JSON object."""
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _is_ntkit_store(path: Path) -> bool:
    """Whether ``path`` is a zarr group ntkit marked (or a format-1 kernel store)."""
    attrs = _metadata(path / "zarr.json").get("attributes")
    if isinstance(attrs, dict) and MARKER in attrs:
        return True
    kernel = _metadata(path / "kernel" / "zarr.json").get("attributes")
    return (_metadata(path / "zarr.json").get("node_type") == "group"
            and isinstance(kernel, dict) and "ntkit_kernel_matrix" in kernel)


def _refuse_foreign(path: Path) -> None:
    """Raises a StoreError unless ``path`` is absent, an empty folder (its lock aside) or
    an ntkit store."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        reason = "is a file"
    elif _is_ntkit_store(path):
        return
    else:
        names = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
        if not names:
            return
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        reason = ("is a zarr store without ntkit's marker" if "zarr.json" in names
                  else f"holds files ({shown}) and no zarr.json")
    raise StoreError(path, f"exists and is not a kernel matrix written by ntkit ({reason}); "
                     f"ntkit does not delete or write into what it did not write",
                     "new_directory")


def _remove_entries(path: Path) -> None:
    """Deletes what ntkit writes in the store ``path`` (`ENTRIES`), nothing else."""
    for name in ENTRIES:
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


def resumable(path: Path, job: Job, attrs: dict) -> Job:
    """``job`` with the stored tile size, or a StoreError naming what differs (or that
    the kernel's identity is not defined without ``key=``)."""
    stored = attrs.get("ntkit_kernel_matrix")
    if not isinstance(stored, dict):
        raise StoreError(path, "is a zarr store but not a kernel matrix written by ntkit",
                         "overwrite")
    unverifiable = job.identity.get("callables")
    if unverifiable and job.identity.get("key") is None:
        raise StoreError(
            path, f"holds a kernel matrix, but ntkit cannot tell whether it is this kernel's: "
            f"the kernel holds Python functions ({', '.join(unverifiable)}) whose code is not "
            f"part of its fingerprint. Resuming could mix two matrices", "key")
    differ = [f"{name} (stored: {_show(stored.get(name))}; now: {_show(value)})"
              for name, value in job.identity.items() if stored.get(name) != value]
    rows, cols = stored.get("tile", (None, None))
    if job.tile_given and (rows, cols) != (job.rows, job.cols):
        differ.append(f"tile size (stored: {rows} x {cols}; now: {job.rows} x {job.cols})")
    if differ:
        raise StoreError(path, "holds a kernel matrix computed with a different "
                         + "; ".join(differ) + ". Resuming would mix two matrices", "overwrite")
    return job.with_tile(rows, cols)


def _show(value) -> str:
    if isinstance(value, dict) and "sha256" in value:
        head = f"shape {value['shape']} {value['dtype']}" if "shape" in value else \
            " ".join(str(value.get("name", "")).split())[:300]
        digest = value["sha256"][:12] if isinstance(value["sha256"], str) else "none"
        return f"{head}, sha256 {digest}..."
    return repr(value)


def import_optional(name: str):
    """The optional dependency ``name`` (zarr, dask, distributed), or an ImportError
    saying how to install it."""
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(
            f"kernel_matrix needs {name} for this ({e}); install it with "
            f"pip install 'ntkit[distributed]'."
        ) from None

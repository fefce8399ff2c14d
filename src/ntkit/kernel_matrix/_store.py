"""Where the tiles of a kernel matrix go: a tensor in memory, or a zarr store on disk
that a later call resumes (see `ntkit.kernel_matrix` for the layout)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..errors import StoreError
from ._job import Job

__all__ = ["MemorySink", "Sink", "ZarrSink", "import_optional"]


class Sink:
    """Where finished tiles are stored."""

    def done(self) -> set[tuple[int, int]]:
        raise NotImplementedError

    def write(self, i: int, j: int, tile: Tensor) -> None:
        raise NotImplementedError

    def load(self) -> Tensor:
        raise NotImplementedError


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
    """A zarr group ``kernel`` + ``done``; a tile's done flag is written after its values
    (zarr's local store writes each chunk to a temporary file and renames it, so a
    killed process leaves every chunk either old or new)."""

    def __init__(self, job: Job, group):
        self.job = job
        self.kernel = group["kernel"]
        self.mask = group["done"]

    @classmethod
    def open(cls, path: Path, job: Job, *, overwrite: bool) -> ZarrSink:
        zarr = import_optional("zarr")
        is_zarr = (path / "zarr.json").is_file()
        if path.exists() and not is_zarr and (path.is_file() or any(path.iterdir())):
            raise StoreError(path, "exists and is not a kernel matrix written by ntkit (no "
                             "zarr.json); ntkit does not delete what it did not write",
                             "new_directory")
        if is_zarr and not overwrite:
            try:
                group = zarr.open_group(str(path), mode="r+")
            except Exception as e:
                raise StoreError(path, f"is not a kernel matrix written by ntkit ({e})",
                                 "overwrite") from None
            if "kernel" in group:
                job = resumable(path, job, dict(group["kernel"].attrs))
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


def resumable(path: Path, job: Job, attrs: dict) -> Job:
    """``job`` with the stored tile size, or a StoreError naming what differs."""
    stored = attrs.get("ntkit_kernel_matrix")
    if not isinstance(stored, dict):
        raise StoreError(path, "is a zarr store but not a kernel matrix written by ntkit",
                         "overwrite")
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
        return f"shape {value['shape']} {value['dtype']}, sha256 {value['sha256'][:12]}..."
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

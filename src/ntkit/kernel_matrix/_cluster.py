"""Running the tiles of a kernel matrix: in this process, or as tasks on a Dask
cluster (the caller's, or one started for the call), storing each as it finishes."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._budget import progress_bar
from ..errors import check_finite_output
from ._job import DEVICE_ENV, Job, TileDone, compute_tile
from ._store import Sink, import_optional

if TYPE_CHECKING:
    import distributed

__all__ = ["run_tiles"]

logger = logging.getLogger("ntkit.kernel_matrix")

#: The device a GPU worker computes on (given in ``DEVICE_ENV``): its only visible GPU,
#: as ``CUDA_VISIBLE_DEVICES`` pins it.
GPU_WORKER_DEVICE = "cuda:0"
#: The scheduler of a cluster started here: no dashboard, and its HTTP routes on a free
#: port rather than 8787 (which another cluster may hold).
NO_DASHBOARD = {"dashboard": False, "dashboard_address": ":0"}
#: Dask starts workers with MALLOC_TRIM_THRESHOLD_ set, which fixes glibc's mmap threshold at
#: 128 KiB: every larger tensor is then mapped, page-faulted and unmapped anew. On the `cnn`
#: benchmark a worker spent 6 s of system time per 3.7 s of compute; with this threshold (glibc's
#: own dynamic maximum) 0.6 s. Workers started here get it unless the environment sets it.
WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": 32 << 20}


def run_tiles(job: Job, sink: Sink, *, client, n_workers, devices, progress,
              on_tile) -> None:
    """Computes the tiles of ``job`` that ``sink`` does not hold yet and stores them
    there as they finish, calling ``on_tile`` with a `TileDone` after each."""
    done = sink.done()
    tasks = [t for t in job.tasks() if t not in done]
    bar = progress_bar(tasks, desc="kernel tiles", unit="tile", progress=progress, min_items=4,
                       initial=len(done))
    computed = 0
    try:
        finished = contextlib.closing(_run(job, tasks, client, n_workers, devices))
        with finished as tiles:
            for (i, j), tile, seconds, where in tiles:
                _check_finite(job, i, j, tile)
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


def _check_finite(job: Job, i: int, j: int, tile: Tensor) -> None:
    """Raises `ntkit.errors.NonFiniteError` naming tile ``(i, j)`` if it holds NaN or
    infinite values: such a tile is never stored, marked done or returned."""
    (r0, r1), (c0, c1) = job.bounds(i, j)
    what = (f"kernel_matrix's tile {(i, j)} (rows {r0}:{r1} of x1, columns {c0}:{c1} of "
            f"{'x1' if job.x2 is None else 'x2'}; not stored)")
    causes = "kernel" if job.get is not None else (
        "the kernel function returned them for these rows and columns: inputs with NaN or "
        "huge values, an overflow in float32, a division by zero; check the function on "
        "them, rescale the inputs or use float64")
    check_finite_output(tile, what, causes=causes)


def _run(job: Job, tasks: list[tuple[int, int]], client, n_workers, devices
         ) -> Iterator[tuple[tuple[int, int], Tensor, float, str]]:
    """Yields ``((i, j), tile, seconds, where)`` as tiles finish."""
    if not tasks:
        return
    with _cluster(client, n_workers, devices) as dask_client:
        if dask_client is None:
            for i, j in tasks:
                tile, seconds, where = compute_tile(job.kernel, job.x1, job.x2,
                                                    *job.bounds(i, j), job.dtype)
                yield (i, j), tile, seconds, where
            return
        from distributed import as_completed

        # inputs go to the workers once (each worker keeps a copy); tasks refer to them
        kernel, x1, x2 = dask_client.scatter(
            [job.kernel, job.x1.detach().cpu(), None if job.x2 is None else job.x2.detach().cpu()],
            broadcast=True, hash=False)
        run = uuid.uuid4().hex[:8]
        futures = {
            dask_client.submit(compute_tile, kernel, x1, x2, *job.bounds(i, j), job.dtype,
                               key=f"ntkit-tile-{run}-{i}-{j}"): (i, j)
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
        distributed = import_optional("distributed")
        workers = {
            f"ntkit-gpu-{v}": {"cls": distributed.Nanny, "options": {
                "nthreads": 1, "host": "127.0.0.1", "silence_logs": logging.ERROR,
                "env": {"CUDA_VISIBLE_DEVICES": v, DEVICE_ENV: GPU_WORKER_DEVICE}}}
            for v in visible
        }
        with _worker_environ():
            cluster = distributed.SpecCluster(
                workers=workers, scheduler={"cls": distributed.Scheduler, "options": {
                    "host": "127.0.0.1", "port": 0, **NO_DASHBOARD}},
                silence_logs=logging.ERROR)
    elif n_workers is not None:
        if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 1:
            raise ValueError(f"n_workers must be a positive int, got {n_workers!r}.")
        distributed = import_optional("distributed")
        with _worker_environ():
            cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                               processes=True, dashboard_address=None,
                                               scheduler_kwargs=NO_DASHBOARD,
                                               silence_logs=logging.ERROR)
    else:
        yield None
        return
    with cluster, distributed.Client(cluster) as started:
        yield started


def _worker_environ():
    """Dask configuration for the workers of a cluster started here (read as they start)."""
    dask = import_optional("dask")
    return dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": value
                            for name, value in WORKER_ENVIRON.items()})


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

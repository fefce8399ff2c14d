"""``ntkit kernel``: the infinite-width NNGP/NTK of an architecture on a data file.

In one piece through ``net.kernel``, or tile by tile through
`ntkit.kernel_matrix` (``--store``, ``--workers``, ``--scheduler``,
``--tile-size``): on a Dask cluster, saved to a resumable zarr store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np

from .._data_files import check_cast, load_data
from ..errors import NonFiniteError, StoreError
from ._errors import CommandError, failing
from ._options import CONTEXT, architecture_arg, force_option, get_option, shape_callback
from ._output import check_finite, check_outputs, file_or_none, write_atomically

__all__ = ["SCHEDULER_TIMEOUT_S", "kernel"]

#: Seconds to wait for a Dask scheduler given with ``ntkit kernel --scheduler``.
SCHEDULER_TIMEOUT_S = 5


@click.command(context_settings=CONTEXT)
@click.argument("architecture")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="output file: .npy (one kernel) or .npz (nngp and ntk)")
@click.option("--x2", "data2", type=click.Path(path_type=Path), default=None,
              help="second data file: the kernel k(DATA, X2) instead of k(DATA, DATA)")
@get_option(choices=("ntk", "nngp", "both"), default=None, old="--kind",
            help="which kernel  [default: ntk for .npy, both for .npz]")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="dtype of the computation and the output")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="working memory for the kernel tiles, e.g. 512MB or 2GiB  [default: 1GiB]")
@click.option("--key", default=None, help="array name of the inputs in .npz files "
                                          "[default: x]")
@click.option("--label-column", default=None, metavar="NAME|INDEX",
              help="a .csv column to drop (labels): header name or 0-based index")
@click.option("--input-shape", callback=shape_callback, default=None, metavar="C,H,W",
              help="reshape each example, e.g. 3,16,16 for flattened images")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="save each finished tile to a zarr store, DIR/ntk and "
                                  "DIR/nngp, so that a killed run can be resumed")
@click.option("--resume", is_flag=True,
              help="continue the --store of an earlier run on the same inputs and options: "
                   "only tiles not yet saved are computed")
@click.option("--overwrite", is_flag=True, help="discard what --store holds and start over")
@click.option("--workers", type=click.IntRange(1, 4096), default=None, metavar="N",
              help="compute tiles on a local Dask cluster of N single-threaded processes")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="compute tiles on a running Dask cluster, e.g. tcp://host:8786 (its "
                   "workers need ntkit installed)")
@click.option("--tile-size", type=click.IntRange(1), default=None, metavar="N",
              help="rows and columns per tile  [default: from --memory-budget, or the "
                   "store's when resuming]")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="progress bar over kernel tiles (on stderr)")
@force_option(" (--resume and --overwrite, reruns of a --store, replace it too)")
def kernel(architecture: str, data: Path, out: Path, data2: Path | None, get: str | None,
           dtype: str, memory_budget: str | None, key: str | None, label_column: str | None,
           input_shape: tuple[int, ...] | None, store: Path | None, resume: bool,
           overwrite: bool, workers: int | None, scheduler: str | None,
           tile_size: int | None, progress: bool, force: bool) -> None:
    """The infinite-width NNGP/NTK of ARCHITECTURE on the inputs in DATA.

    ARCHITECTURE is a spec string such as 'linear(512)-relu-linear(1)' or
    'conv2d(64,3,padding=same)-relu-globalavgpool-linear(10)', or a .json/.yaml file
    (see ntkit.spec). DATA is a .npy, .npz (key x) or .csv file of shape
    (N, *features), channels first for images.

    With --store, --workers, --scheduler or --tile-size the matrix is computed tile
    by tile with ntkit.kernel_matrix (with --get both, once per kernel): on a Dask
    cluster, and with --store saved as it goes; the -o file is written at the end.

    The -o file is never one of the inputs, is written whole or not at all, and
    replaces an existing file only with --force; a kernel with NaN or infinite
    entries is not written (exit status 1).

    \b
    Examples:
      ntkit kernel 'linear(512)-relu-linear(1)' x.npy -o k.npy
      ntkit kernel net.yaml x.csv --label-column label --x2 test.csv -o k.npz
      ntkit kernel net.yaml x.npy -o k.npy --workers 8 --store k-tiles   # then --resume
    """
    import torch

    suffix = out.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise click.BadParameter(f"the output must end in .npy or .npz, got {out.name!r}.",
                                 param_hint="-o/--out")
    get = get or ("ntk" if suffix == ".npy" else "both")
    if get == "both" and suffix == ".npy":
        raise click.BadParameter("a .npy file holds one kernel; use --get ntk or nngp, or "
                                 "write both to a .npz file.", param_hint="--get")
    _check_memory_budget(memory_budget)
    gets = ("nngp", "ntk") if get == "both" else (get,)
    tiled = _check_tiling(gets, store, resume, overwrite, workers, scheduler, tile_size)
    check_outputs({"-o/--out": out},
                  {"DATA": data, "--x2": data2, "ARCHITECTURE": file_or_none(architecture)},
                  force=force or resume or overwrite,
                  stores={"--store": [] if store is None else [store / g for g in gets]})
    net = architecture_arg(architecture)
    torch_dtype = getattr(torch, dtype)
    x1, _ = load_data(data, key=key, label_column=label_column, input_shape=input_shape)
    x2 = None
    if data2 is not None:
        csv2 = data2.suffix.lower() == ".csv"
        x2, _ = load_data(data2, key=None if csv2 else key,
                          label_column=label_column if csv2 else None, input_shape=input_shape)
        if x2.shape[1:] != x1.shape[1:]:
            raise CommandError(f"{data2.name} has examples of shape {x2.shape[1:]} but "
                               f"{data.name} has {x1.shape[1:]}.")
    check_cast(x1, dtype, data.name)
    if x2 is not None:
        check_cast(x2, dtype, data2.name)
    a = torch.as_tensor(x1, dtype=torch_dtype)
    b = None if x2 is None else torch.as_tensor(x2, dtype=torch_dtype)
    t0 = time.perf_counter()
    with failing(f"the architecture does not fit the data ({data.name}, examples of shape "
                 f"{tuple(x1.shape[1:])})", unless=(NonFiniteError,)):
        if tiled:         # one pair first: a mismatch is reported before any cluster starts
            net.kernel(a[:1], None if b is None else b[:1], progress=False)
        else:
            k = net.kernel(a, b, memory_budget=memory_budget, progress=progress)
    if tiled:
        arrays = _tiled_kernels(net, a, b, gets, store=store, overwrite=overwrite,
                                workers=workers, scheduler=scheduler, tile_size=tile_size,
                                memory_budget=memory_budget, progress=progress)
    else:
        arrays = {g: getattr(k, g).detach().cpu().numpy() for g in gets}
    elapsed = time.perf_counter() - t0
    check_finite(arrays, f"the kernel of {architecture} on {data.name}",
                 "Likely causes: inputs too large for the dtype, or a variance that grows "
                 "with depth (large w_std). Rescale the inputs, use --dtype float64, or a "
                 "smaller w_std.")
    if suffix == ".npy":
        write_atomically(out, lambda tmp: np.save(tmp, arrays[get]))
    else:
        write_atomically(out, lambda tmp: np.savez(tmp, **arrays))
    shape = " x ".join(map(str, arrays[gets[0]].shape))
    click.echo(f"wrote {' and '.join(gets)} ({shape}, {dtype}) to {out} in {elapsed:.2f} s")


def _check_memory_budget(memory_budget: str | None) -> None:
    if memory_budget is None:
        return
    from .._budget import parse_memory

    try:
        parse_memory(memory_budget)
    except (ValueError, TypeError) as e:
        raise click.BadParameter(str(e), param_hint="--memory-budget") from None


def _check_tiling(gets, store, resume, overwrite, workers, scheduler, tile_size) -> bool:
    """Whether the tiling options ask for `ntkit.kernel_matrix`; usage errors for options
    that do not go together, and for a store that exists without --resume/--overwrite."""
    if (resume or overwrite) and store is None:
        flag = "--resume" if resume else "--overwrite"
        raise click.UsageError(f"{flag} applies to a tile store; give it with --store DIR.")
    if resume and overwrite:
        raise click.UsageError("--resume continues the store and --overwrite discards it; "
                               "give one of them.")
    if workers is not None and scheduler is not None:
        raise click.UsageError(f"give --workers N (a local cluster started for this run) or "
                               f"--scheduler ADDRESS (a running cluster), not both (got "
                               f"--workers {workers} --scheduler {scheduler}).")
    if store is not None and not (resume or overwrite):
        for g in gets:
            path = store / g
            if path.exists() and (path.is_file() or any(path.iterdir())):
                raise CommandError(f"the store {path} already exists; pass --resume to "
                                   f"continue it (same inputs and options), or --overwrite "
                                   f"to start over.")
    return any(v is not None for v in (store, workers, scheduler, tile_size))


def _tiled_kernels(net, x1, x2, gets, *, store, overwrite, workers, scheduler, tile_size,
                   memory_budget, progress) -> dict[str, np.ndarray]:
    """Each kernel of ``gets`` by `ntkit.kernel_matrix`, in ``store/<get>`` if given;
    prints how many tiles were computed (and reused from the store)."""
    from ..kernel_matrix import kernel_matrix

    arrays = {}
    with _scheduler_client(scheduler) as client:
        for g in gets:
            path = None if store is None else store / g
            computed = []
            with failing("computing the kernel failed"):
                try:
                    k = kernel_matrix(net, x1, x2, get=g, out=path, overwrite=overwrite,
                                      tile_size=tile_size, memory_budget=memory_budget,
                                      client=client, n_workers=workers, progress=progress,
                                      on_tile=computed.append)
                except ValueError as e:
                    store_error = _store_error(e, path)
                    if store_error is None:
                        raise
                    raise store_error from None
            arrays[g] = k.numpy()
            line = f"{g}: {len(computed)} tiles computed"
            if path is not None:
                line += f", {_done_count(path) - len(computed)} reused from {path}"
            click.echo(line)
    return arrays


#: What the command line says to do about a store kernel_matrix refused, by the
#: error's ``fix`` (see `ntkit.errors.StoreError`).
STORE_FIXES = {
    "overwrite": "Pass --overwrite to discard it, or give another --store.",
    "new_directory": "Give a new or empty --store directory.",
    "key": "Pass --overwrite to start over, or give another --store.",
    "lock": "Wait for that run to finish, or give another --store.",
    "resume": ("Run the same command again with --resume to recompute the damaged tiles, "
               "or pass --overwrite to start over."),
}


def _store_error(e: BaseException, path: Path | None) -> CommandError | None:
    """The command line's message for kernel_matrix's typed error about the store
    ``path`` (its ``path``, ``reason`` and ``fix`` fields), or None for other errors
    (and for a fix the command line has no words for: the library's message stands)."""
    if path is None or not isinstance(e, StoreError) or Path(e.path) != path \
            or e.fix not in STORE_FIXES:
        return None
    return CommandError(f"the store {path} {e.reason}. {STORE_FIXES[e.fix]}")


def _done_count(path: Path) -> int:
    """Tiles marked done in the store (its ``done`` array; see ntkit.kernel_matrix)."""
    import zarr

    return int(np.count_nonzero(zarr.open_group(str(path), mode="r")["done"][...]))


@contextlib.contextmanager
def _scheduler_client(scheduler: str | None) -> Iterator[object | None]:
    """A `distributed.Client` of the running Dask ``scheduler`` (closed on exit), or None."""
    if scheduler is None:
        yield None
        return
    try:
        import distributed
    except ImportError:
        raise CommandError("--scheduler needs Dask's distributed; install it with "
                           "pip install 'ntkit[distributed]'.") from None
    try:
        client = distributed.Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CommandError(f"cannot reach the Dask scheduler at {scheduler} ({reason}); check "
                           f"the address and that a scheduler runs there (`dask scheduler`, "
                           f"with workers from `dask worker {scheduler}`), or use --workers N "
                           f"for a local cluster.") from None
    with client:
        yield client

"""The ``ntkit`` command line: demo, kernel, fit, predict, bench.

A thin shell over the public API (`ntkit.spec`, ``net.kernel``,
`ntkit.kernel_matrix`, `ntkit.predict`, `ntkit.sklearn`) and two helpers of its
own: `ntkit._data_files` (data files, datasets, labels) and `ntkit.demo` (the
demo's computation). Errors in what the user gave (files, specs, labels) print
one ``Error: ...`` line and exit with a non-zero status; ``--help`` works on
every command.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import click
import numpy as np

from ._data_files import (
    DATASETS,
    DataFileError,
    bundled_dataset,
    check_labels,
    labelled_data,
    load_data,
    task_of,
)

__all__ = ["cli", "main"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: Seconds to wait for a Dask scheduler given with ``ntkit kernel --scheduler``.
SCHEDULER_TIMEOUT_S = 5


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


class _Commands(click.Group):
    """A group whose commands print a `DataFileError` as one ``Error:`` line (exit 1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DataFileError as e:
            raise click.ClickException(str(e)) from None


def _widths(ctx, param, values: Sequence[str]) -> tuple[int, ...] | None:
    """``--widths 64,256 --widths 1024`` -> (64, 256, 1024)."""
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).replace(" ", ",").split(","):
            if not part:
                continue
            try:
                w = int(part)
            except ValueError:
                raise click.BadParameter(f"{part!r} is not an integer width; write e.g. "
                                         f"--widths 64,256,1024.") from None
            if w < 1:
                raise click.BadParameter(f"widths must be positive, got {w}.")
            out.append(w)
    return tuple(sorted(set(out)))


def _shape(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a shape; write e.g. 3,16,16.") from None
    if not shape or any(v < 1 for v in shape):
        raise click.BadParameter(f"{value!r} is not a shape of positive sizes.")
    return shape


def _architecture_arg(spec: str):
    from .spec import parse_architecture

    try:
        return parse_architecture(spec)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        raise _fail(str(e)) from None


@click.group(cls=_Commands, context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(package_name="ntkit", prog_name="ntkit")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Infinite-width NNGP and NTK kernels of neural networks, on PyTorch.

    Without a command, runs `ntkit demo`.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(demo)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ntkit`` console script and ``python -m ntkit``."""
    cli.main(args=argv, prog_name="ntkit")


# ======================================================================= kernel
@cli.command(context_settings=CONTEXT)
@click.argument("architecture")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="output file: .npy (one kernel) or .npz (nngp and ntk)")
@click.option("--x2", "data2", type=click.Path(path_type=Path), default=None,
              help="second data file: the kernel k(DATA, X2) instead of k(DATA, DATA)")
@click.option("--kind", type=click.Choice(["ntk", "nngp", "both"]), default=None,
              help="which kernel  [default: ntk for .npy, both for .npz]")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="dtype of the computation and the output")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="working memory for the kernel tiles, e.g. 512MB or 2GiB  [default: 1GiB]")
@click.option("--key", default=None, help="array name of the inputs in .npz files "
                                          "[default: x]")
@click.option("--label-column", default=None, metavar="NAME|INDEX",
              help="a .csv column to drop (labels): header name or 0-based index")
@click.option("--input-shape", callback=_shape, default=None, metavar="C,H,W",
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
def kernel(architecture: str, data: Path, out: Path, data2: Path | None, kind: str | None,
           dtype: str, memory_budget: str | None, key: str | None, label_column: str | None,
           input_shape: tuple[int, ...] | None, store: Path | None, resume: bool,
           overwrite: bool, workers: int | None, scheduler: str | None,
           tile_size: int | None, progress: bool) -> None:
    """The infinite-width NNGP/NTK of ARCHITECTURE on the inputs in DATA.

    ARCHITECTURE is a spec string such as 'linear(512)-relu-linear(1)' or
    'conv2d(64,3,padding=same)-relu-globalavgpool-linear(10)', or a .json/.yaml file
    (see ntkit.spec). DATA is a .npy, .npz (key x) or .csv file of shape
    (N, *features), channels first for images.

    With --store, --workers, --scheduler or --tile-size the matrix is computed tile
    by tile with ntkit.kernel_matrix (with --kind both, once per kernel): on a Dask
    cluster, and with --store saved as it goes; the -o file is written at the end.

    \b
    Examples:
      ntkit kernel 'linear(512)-relu-linear(1)' x.npy -o k.npy
      ntkit kernel net.yaml x.csv --label-column label --x2 test.csv -o k.npz
      ntkit kernel net.yaml x.npy -o k.npy --workers 8 --store k-tiles   # then --resume
    """
    import torch

    from .compute import parse_memory

    suffix = out.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise click.BadParameter(f"the output must end in .npy or .npz, got {out.name!r}.",
                                 param_hint="-o/--out")
    kind = kind or ("ntk" if suffix == ".npy" else "both")
    if kind == "both" and suffix == ".npy":
        raise click.BadParameter("a .npy file holds one kernel; use --kind ntk or nngp, or "
                                 "write both to a .npz file.", param_hint="--kind")
    if memory_budget is not None:
        try:
            parse_memory(memory_budget)
        except (ValueError, TypeError) as e:
            raise click.BadParameter(str(e), param_hint="--memory-budget") from None
    kinds = ("nngp", "ntk") if kind == "both" else (kind,)
    tiled = _check_tiling(kinds, store, resume, overwrite, workers, scheduler, tile_size)
    net = _architecture_arg(architecture)
    torch_dtype = getattr(torch, dtype)
    x1, _ = load_data(data, key=key, label_column=label_column, input_shape=input_shape)
    x2 = None
    if data2 is not None:
        csv2 = data2.suffix.lower() == ".csv"
        x2, _ = load_data(data2, key=None if csv2 else key,
                          label_column=label_column if csv2 else None, input_shape=input_shape)
        if x2.shape[1:] != x1.shape[1:]:
            raise _fail(f"{data2.name} has examples of shape {x2.shape[1:]} but {data.name} "
                        f"has {x1.shape[1:]}.")
    a = torch.as_tensor(x1, dtype=torch_dtype)
    b = None if x2 is None else torch.as_tensor(x2, dtype=torch_dtype)
    t0 = time.perf_counter()
    try:
        if tiled:         # one pair first: a mismatch is reported before any cluster starts
            net.kernel(a[:1], None if b is None else b[:1], progress=False)
        else:
            k = net.kernel(a, b, memory_budget=memory_budget, progress=progress)
    except (ValueError, TypeError) as e:
        raise _fail(f"the architecture does not fit the data ({data.name}, examples of shape "
                    f"{tuple(x1.shape[1:])}): {e}") from None
    if tiled:
        arrays = _tiled_kernels(net, a, b, kinds, store=store, overwrite=overwrite,
                                workers=workers, scheduler=scheduler, tile_size=tile_size,
                                memory_budget=memory_budget, progress=progress)
    else:
        arrays = {g: getattr(k, g).detach().cpu().numpy() for g in kinds}
    elapsed = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(out, arrays[kind])
    else:
        np.savez(out, **arrays)
    shape = " x ".join(map(str, arrays[kinds[0]].shape))
    click.echo(f"wrote {' and '.join(kinds)} ({shape}, {dtype}) to {out} in {elapsed:.2f} s")


def _check_tiling(kinds, store, resume, overwrite, workers, scheduler, tile_size) -> bool:
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
        for g in kinds:
            path = store / g
            if path.exists() and (path.is_file() or any(path.iterdir())):
                raise _fail(f"the store {path} already exists; pass --resume to continue it "
                            f"(same inputs and options), or --overwrite to start over.")
    return any(v is not None for v in (store, workers, scheduler, tile_size))


def _tiled_kernels(net, x1, x2, kinds, *, store, overwrite, workers, scheduler, tile_size,
                   memory_budget, progress) -> dict[str, np.ndarray]:
    """Each kernel of ``kinds`` by `ntkit.kernel_matrix`, in ``store/<kind>`` if given;
    prints how many tiles were computed (and reused from the store)."""
    from .kernel_matrix import kernel_matrix

    arrays = {}
    with _scheduler_client(scheduler) as client:
        for g in kinds:
            path = None if store is None else store / g
            computed = []
            try:
                k = kernel_matrix(net, x1, x2, get=g, out=path, overwrite=overwrite,
                                  tile_size=tile_size, memory_budget=memory_budget,
                                  client=client, n_workers=workers, progress=progress,
                                  on_tile=computed.append)
            except ValueError as e:
                raise _fail(_store_message(str(e), path)) from None
            arrays[g] = k.numpy()
            line = f"{g}: {len(computed)} tiles computed"
            if path is not None:
                line += f", {_done_count(path) - len(computed)} reused from {path}"
            click.echo(line)
    return arrays


def _store_message(message: str, path: Path | None) -> str:
    """kernel_matrix's error about ``out=`` in the command line's words."""
    if path is None or not message.startswith(f"out={str(path)!r}"):
        return f"computing the kernel failed: {message}"
    return (message.replace(f"out={str(path)!r}", f"the store {path}", 1)
            .replace("overwrite=True", "--overwrite").replace("another out=", "another --store"))


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
        raise _fail("--scheduler needs Dask's distributed; install it with "
                    "pip install 'ntkit[distributed]'.") from None
    try:
        client = distributed.Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise _fail(f"cannot reach the Dask scheduler at {scheduler} ({reason}); check the "
                    f"address and that a scheduler runs there (`dask scheduler`, with workers "
                    f"from `dask worker {scheduler}`), or use --workers N for a local "
                    f"cluster.") from None
    with client:
        yield client


# ======================================================================= fit / predict
def _metrics(task: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    if task == "classify":
        return {"accuracy": float(np.mean(y_pred == y_true))}
    from sklearn.metrics import mean_squared_error, r2_score

    return {"mse": float(mean_squared_error(y_true, y_pred)),
            "r2": float(r2_score(y_true, y_pred))}


def _format_metrics(m: dict[str, float]) -> str:
    names = {"accuracy": "accuracy", "mse": "MSE", "r2": "R2"}
    return ", ".join(f"{names[k]} {v:.4g}" if k != "accuracy" else f"{names[k]} {v:.4f}"
                     for k, v in m.items())


def _labelled_data(data: Path | None, dataset: str | None, *, key, label_column, labels_key,
                   input_shape, what: str) -> tuple[np.ndarray, np.ndarray, str, str | None]:
    """Inputs, labels, a name for messages and the dataset's own task (or None)."""
    if (data is None) == (dataset is None):
        raise click.UsageError(f"give {what} either as a DATA file or with --dataset "
                               f"({'/'.join(DATASETS)}), not both and not neither.")
    if dataset is not None:
        x, y, task = bundled_dataset(dataset)
        return x, y, dataset, task
    x, y = labelled_data(data, key=key, label_column=label_column, labels_key=labels_key,
                         input_shape=input_shape)
    return x, y, data.name, None


def _data_options(f):
    for opt in reversed([
        click.option("--key", default=None, help="array of the inputs in .npz files "
                                                 "[default: x]"),
        click.option("--labels-key", default="y", show_default=True,
                     help="array of the labels in .npz files"),
        click.option("--label-column", default=None, metavar="NAME|INDEX",
                     help="the label column of a .csv file: header name or 0-based index"),
        click.option("--input-shape", callback=_shape, default=None, metavar="C,H,W",
                     help="reshape each example, e.g. 3,16,16 (for convolutional "
                          "architectures)"),
    ]):
        f = opt(f)
    return f


@cli.command(context_settings=CONTEXT)
@click.argument("data", type=click.Path(path_type=Path), required=False)
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="a bundled dataset instead of DATA: digits (classification), diabetes "
                   "(regression)")
@_data_options
@click.option("--arch", "architecture", default=None, metavar="SPEC|FILE",
              help="architecture spec or .json/.yaml file  [default: the estimators' MLP, "
                   "2 x (linear-relu) with w_std=1.5, b_std=0.1]")
@click.option("--task", type=click.Choice(["auto", "classify", "regress"]), default="auto",
              show_default=True, help="auto: classify string labels and integer labels with "
                                      "at most 50 values, regress otherwise")
@click.option("--kernel", type=click.Choice(["ntk", "nngp"]), default="ntk", show_default=True,
              help="ntk: all layers trained; nngp: readout only (Bayesian posterior mean)")
@click.option("--t", "t", type=float, default=math.inf, show_default=True,
              help="training time (inf: trained to convergence)")
@click.option("--diag-reg", type=float, default=1e-6, show_default=True,
              help="ridge added to the train kernel, relative to its mean diagonal")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float64",
              show_default=True)
@click.option("--test", "test_data", type=click.Path(path_type=Path), default=None,
              help="held-out data file (same format as DATA); default: split DATA")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.25, show_default=True, help="held-out fraction when --test is not given")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the split")
@click.option("--save-test", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the held-out inputs and labels to this .npz (x, y), for "
                   "`ntkit predict`")
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("ntkit-model.npz"), show_default=True,
              help="the fitted model (.npz, no pickle)")
def fit(data: Path | None, dataset: str | None, key, labels_key, label_column, input_shape,
        architecture: str | None, task: str, kernel: str, t: float, diag_reg: float,
        dtype: str, test_data: Path | None, test_size: float, seed: int,
        save_test: Path | None, out: Path) -> None:
    """Fit an infinite-width network to DATA (or --dataset) and evaluate it.

    Trains the infinite ensemble of infinitely wide networks by gradient flow on MSE
    (ntkit.sklearn: NTKClassifier or NTKRegressor), prints accuracy (classification) or
    MSE and R2 (regression) on held-out data, and saves the model.

    \b
    Examples:
      ntkit fit --dataset digits -o digits.npz --save-test digits-test.npz
      ntkit fit train.csv --label-column price --test test.csv --arch 'linear(512)-erf-linear(1)'
    """
    from sklearn.model_selection import train_test_split

    from .sklearn import NTKClassifier, NTKRegressor, save

    if architecture is not None:
        _architecture_arg(architecture)            # a clear error before any work
    x, y, name, data_task = _labelled_data(data, dataset, key=key, label_column=label_column,
                                           labels_key=labels_key, input_shape=input_shape,
                                           what="the training data")
    if task == "auto":
        task = data_task or task_of(y)
        click.echo(f"task: {'classification' if task == 'classify' else 'regression'} "
                   f"(from the labels; set --task to change)")
    y = check_labels(y, task, name)
    # the estimators take flattened rows; the example shape travels as input_shape
    example_shape = tuple(int(d) for d in x.shape[1:]) if x.ndim > 2 else None
    if test_data is not None:
        csv = test_data.suffix.lower() == ".csv"
        x_te, y_te = load_data(test_data, key=None if csv else key,
                               label_column=label_column if csv else None,
                               labels_key=labels_key, input_shape=input_shape)
        if y_te is None:
            raise _fail(f"{test_data.name} has no labels.")
        if x_te.shape[1:] != x.shape[1:]:
            raise _fail(f"{test_data.name} has examples of shape {x_te.shape[1:]} but {name} "
                        f"has {x.shape[1:]}.")
        y_te = check_labels(y_te, task, test_data.name)
        x_tr, y_tr = x, y
    else:
        stratify = y if task == "classify" and np.min(np.unique(y, return_counts=True)[1]) >= 2 \
            else None
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed,
                                                  stratify=stratify)
    cls = NTKClassifier if task == "classify" else NTKRegressor
    model = cls(architecture, kernel=kernel, t=t, diag_reg=diag_reg, dtype=dtype,
                input_shape=example_shape)
    t0 = time.perf_counter()
    try:
        model.fit(x_tr.reshape(len(x_tr), -1), y_tr)
        test_m = _metrics(task, y_te, model.predict(x_te.reshape(len(x_te), -1)))
    except (ValueError, TypeError, FloatingPointError) as e:
        raise _fail(f"fitting {name} failed: {e}") from None
    elapsed = time.perf_counter() - t0
    from .spec import to_spec

    try:
        arch = to_spec(model.network_)
    except ValueError:
        arch = repr(model.network_)
    click.echo(f"model: {cls.__name__}(kernel={kernel!r}, t={t:g}, diag_reg={diag_reg:g}) on "
               f"{len(y_tr)} training examples of {name}, {elapsed:.2f} s")
    click.echo(f"architecture: {arch}")
    click.echo(f"test ({len(y_te)} examples): {_format_metrics(test_m)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save(model, out)
    click.echo(f"saved the model to {out}")
    if save_test is not None:
        save_test.parent.mkdir(parents=True, exist_ok=True)
        np.savez(save_test, x=x_te, y=y_te)
        click.echo(f"saved the held-out data to {save_test}")


@cli.command("predict", context_settings=CONTEXT)
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path), required=False)
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="a bundled dataset instead of DATA (all of it)")
@_data_options
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write the predictions to .npy or .csv")
def predict_cmd(model_path: Path, data: Path | None, dataset: str | None, key, labels_key,
                label_column, input_shape, out: Path | None) -> None:
    """Predict with a MODEL saved by `ntkit fit` on DATA; metrics when DATA has labels.

    \b
    Example:
      ntkit predict digits.npz digits-test.npz -o predictions.csv
    """
    from .sklearn import NTKClassifier, load

    if not model_path.is_file():
        raise _fail(f"model file {str(model_path)!r} does not exist.")
    try:
        model = load(model_path)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise _fail(f"cannot load the model {model_path.name}: {e}") from None
    if (data is None) == (dataset is None):
        raise click.UsageError("give the data either as a DATA file or with --dataset, not "
                               "both and not neither.")
    if dataset is not None:
        x, y, _ = bundled_dataset(dataset)
        name = dataset
    else:
        x, y = load_data(data, key=key, label_column=label_column, labels_key=labels_key,
                         input_shape=input_shape)
        name = data.name
    x = x.reshape(len(x), -1)                 # examples as rows; the model knows their shape
    if x.shape[1] != model.n_features_in_:
        raise _fail(f"{name}: the model was fitted on {model.n_features_in_} features per "
                    f"example, the data has examples of shape {x.shape[1:]}.")
    task = "classify" if isinstance(model, NTKClassifier) else "regress"
    t0 = time.perf_counter()
    try:
        pred = model.predict(x)
    except (ValueError, TypeError, FloatingPointError) as e:
        raise _fail(f"predicting on {name} failed: {e}") from None
    click.echo(f"predicted {len(pred)} examples of {name} with {type(model).__name__} in "
               f"{time.perf_counter() - t0:.2f} s")
    if y is not None:
        y = check_labels(y, task, name)
        if task == "classify" and y.dtype.kind != np.asarray(model.classes_).dtype.kind \
                and not (y.dtype.kind in "iuf" and np.asarray(model.classes_).dtype.kind
                         in "iuf"):
            raise _fail(f"{name}: labels like {y[0]!r} are not of the model's classes "
                        f"({', '.join(map(str, model.classes_[:5]))}...).")
        if task == "regress" and y.reshape(len(y), -1).shape[1] != model.n_outputs_:
            raise _fail(f"{name}: {y.reshape(len(y), -1).shape[1]} target columns, the model "
                        f"predicts {model.n_outputs_}.")
        click.echo(f"{name}: {_format_metrics(_metrics(task, y, pred))}")
    if out is not None:
        suffix = out.suffix.lower()
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npy":
            np.save(out, pred)
        elif suffix == ".csv":
            np.savetxt(out, np.asarray(pred).reshape(len(pred), -1), delimiter=",",
                       fmt="%s" if np.asarray(pred).dtype.kind in "US" else "%.10g")
        else:
            raise click.BadParameter(f"predictions are written to .npy or .csv, got "
                                     f"{out.name!r}.", param_hint="-o/--out")
        click.echo(f"wrote the predictions to {out}")


# ======================================================================= bench
@cli.command(context_settings={**CONTEXT, "ignore_unknown_options": True,
                               "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the reference benchmarks (benchmarks/run.py of a source checkout).

    ARGS go to benchmarks/run.py: case names (fc, cnn, myrtle, entk, ...) and its
    options, e.g. `ntkit bench fc cnn --reps 2 --no-peer`; `ntkit bench -- --help`
    shows them.
    """
    script = _bench_script()
    proc = subprocess.run([sys.executable, str(script), *args], check=False)
    if proc.returncode != 0:
        sys.exit(proc.returncode)


def _bench_script() -> Path:
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "benchmarks" / "run.py",
                  Path.cwd() / "benchmarks" / "run.py"]
    env = os.environ.get("NTKIT_BENCHMARKS")
    if env:
        candidates.insert(0, Path(env) / "run.py")
    for c in candidates:
        if c.is_file():
            return c
    raise _fail("ntkit bench runs benchmarks/run.py from a source checkout of ntkit, and "
                "none was found (looked in " + ", ".join(str(c.parent) for c in candidates)
                + "); run it from a clone of the repository, or set NTKIT_BENCHMARKS to the "
                  "benchmarks directory.")


# ======================================================================= demo
@cli.command(context_settings=CONTEXT)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("ntkit-demo"), show_default=True,
              help="directory for the three PNG figures")
@click.option("--widths", multiple=True, callback=_widths,
              help="widths of the finite networks trained beside the infinite ones, e.g. "
                   "64,256,1024  [default: 64,256,1024; --quick: 64,256]")
@click.option("--n-train", type=click.IntRange(10, 1500), default=None,
              help="training digits  [default: 500; --quick: 200]")
@click.option("--n-test", type=click.IntRange(10, 1500), default=None,
              help="test digits  [default: 500; --quick: 200]")
@click.option("--steps", type=click.IntRange(1, 10**6), default=None,
              help="gradient-descent steps (training time t)  [default: 2000; --quick: 300]")
@click.option("--depth", type=click.IntRange(1, 10), default=1, show_default=True,
              help="hidden layers of the MLP")
@click.option("--seed", type=int, default=0, show_default=True,
              help="seed of the split, the finite networks and the ensemble samples")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="torch CPU threads during the demo; its steps are small, and one thread "
                   "is fastest on a small or shared machine")
@click.option("--quick", is_flag=True, help="smaller settings, for a run of a few seconds")
def demo(out_dir: Path, widths: tuple[int, ...] | None, n_train: int | None,
         n_test: int | None, steps: int | None, depth: int, seed: int, threads: int,
         quick: bool) -> None:
    """Infinite vs finite width on scikit-learn's digits, with three figures.

    Fits the infinite-width NTK and NNGP ensembles of a ReLU MLP (ntkit.predict: the
    closed-form gradient-descent dynamics, mean and covariance over training time),
    trains finite MLPs of each width by full-batch gradient descent on the same loss
    (0.5/|y| ||f - y||^2) with the same learning rate, prints a table, and writes
    training_curves.png, eigenvalue_spectrum.png and ntk_distance_vs_width.png to --out
    (figures need matplotlib: pip install 'ntkit[plot]'; without it they are skipped).
    """
    from .demo import N_DIGITS, DemoSettings

    settings = DemoSettings(
        widths=widths or ((64, 256) if quick else (64, 256, 1024)),
        n_train=n_train or (200 if quick else 500),
        n_test=n_test or (200 if quick else 500),
        steps=steps or (300 if quick else 2000),
        depth=depth, seed=seed, quick=quick, threads=threads,
    )
    if settings.n_train + settings.n_test > N_DIGITS:
        raise click.BadParameter(
            f"--n-train {settings.n_train} + --n-test {settings.n_test} exceeds the "
            f"{N_DIGITS} digits.", param_hint="--n-train/--n-test")
    run_demo(settings, out_dir)


def run_demo(s, out_dir: Path) -> None:
    """The body of `ntkit demo` (see its help) for `ntkit.demo.DemoSettings` ``s``, with
    ``s.threads`` torch threads (the previous number is restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        _run_demo(s, out_dir)
    finally:
        torch.set_num_threads(before)


def _run_demo(s, out_dir: Path) -> None:
    from . import demo as d

    start = time.perf_counter()
    data = d.digits_split(s)
    click.echo(f"data: scikit-learn digits (8x8), {s.n_train} train / {s.n_test} test, "
               f"split seed {s.seed}")
    click.echo(f"network: {d.architecture(s.depth, 'W')}  (ntkit spec; W = width)")
    infinite = d.infinite_ensembles(data, s)
    click.echo(f"learning rate {infinite.learning_rate:.3g} (half the largest stable step of "
               f"the infinite NTK); t = {s.steps} steps")
    try:
        finite, entk_init = d.finite_networks(data, s, infinite.learning_rate, infinite.times)
    except FloatingPointError as e:
        raise _fail(str(e)) from None
    result = d.DemoResult(s, infinite, finite, entk_init, d.ntk_distance_vs_width(data, s))
    for line in d.report(result):
        click.echo(line)
    if d.has_matplotlib():
        paths = d.write_figures(result, out_dir)
        click.echo(f"figures: {', '.join(str(p) for p in paths)}")
    else:
        click.echo("figures: skipped, matplotlib is not installed (pip install 'ntkit[plot]')")
    click.echo(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    main()

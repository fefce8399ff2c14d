"""The ``ntkit`` command line: demo, kernel, fit, predict, bench.

A thin shell over the public API (`ntkit.spec`, ``net.kernel``,
`ntkit.predict`, `ntkit.sklearn`, `ntkit.plot`). Errors in what the user
gave (files, specs, labels) print one ``Error: ...`` line and exit with a
non-zero status; ``--help`` works on every command.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

__all__ = ["cli", "main"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DTYPES = {"float32": "float32", "float64": "float64"}


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


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


@click.group(context_settings=CONTEXT, invoke_without_command=True)
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


# ======================================================================= data files
def load_data(path: Path | str, *, key: str | None = None, label_column: str | None = None,
              labels_key: str | None = "y", input_shape: tuple[int, ...] | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs (and labels, when the file has them) from ``.npy``, ``.npz`` or ``.csv``.

    Args:
        path: the data file. ``.npy``: one array ``(N, *features)``. ``.npz``: inputs
            under ``key`` (default ``"x"``), labels under ``labels_key`` if present.
            ``.csv``: numeric columns, with or without a header row; ``label_column``
            (a header name or a 0-based index, negative from the end) is split off as
            the labels.
        input_shape: reshape each example to this shape (e.g. ``(3, 16, 16)`` for
            flattened images).

    Returns:
        ``(x, y)``: ``x`` a float array ``(N, *features)``; ``y`` an ``(N,)`` or
        ``(N, outputs)`` array or None.

    Raises:
        click.ClickException: a missing, unreadable or malformed file (the message
            names the file and what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(f"data file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    y = None
    try:
        if suffix == ".npy":
            if key is not None:
                raise _fail(f"--key applies to .npz files; {path.name} is a .npy file.")
            x = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                name = key or "x"
                if name not in data.files:
                    raise _fail(f"{path.name} has no array {name!r}; it holds "
                                f"{', '.join(data.files) or 'nothing'} (choose one with "
                                f"--key).")
                x = data[name]
                if labels_key and labels_key in data.files and labels_key != name:
                    y = data[labels_key]
        elif suffix == ".csv":
            x, y = _read_csv(path, label_column)
        else:
            raise _fail(f"data file {path.name!r} must be .npy, .npz or .csv, got "
                        f"{suffix or 'no suffix'!r}.")
    except (ValueError, OSError, EOFError) as e:
        raise _fail(f"cannot read {path.name}: {e}") from None
    if label_column is not None and suffix != ".csv":
        raise _fail("--label-column applies to .csv files; .npz files hold labels under 'y'.")
    if x.dtype.kind not in "fiub":
        raise _fail(f"{path.name}: the inputs must be numbers, got dtype {x.dtype}.")
    if x.ndim < 2 or x.shape[0] == 0:
        raise _fail(f"{path.name}: the inputs must have shape (N, features) with N >= 1, got "
                    f"{x.shape}.")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))[0]
        raise _fail(f"{path.name}: the inputs have NaN or infinite values (first at row "
                    f"{bad[0]}, column {bad[1]}).")
    if input_shape is not None:
        per = int(np.prod(x.shape[1:]))
        if int(np.prod(input_shape)) != per:
            raise _fail(f"--input-shape {','.join(map(str, input_shape))} holds "
                        f"{int(np.prod(input_shape))} values but each example in {path.name} "
                        f"has {per}.")
        x = x.reshape((x.shape[0],) + tuple(input_shape))
    if y is not None and y.shape[0] != x.shape[0]:
        raise _fail(f"{path.name}: {x.shape[0]} inputs but {y.shape[0]} labels.")
    return x, y


def _read_csv(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    import csv

    with open(path, newline="") as f:
        reader = csv.reader(f)
        numbered = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    lines = [n for n, _ in numbered]             # file line of each row, for messages
    rows = [r for _, r in numbered]
    if not rows:
        raise _fail(f"{path.name} is empty.")
    header = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows, lines = [c.strip() for c in rows[0]], rows[1:], lines[1:]
    if not rows:
        raise _fail(f"{path.name} has a header but no data rows.")
    width = len(header or rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise _fail(f"{path.name}, line {lines[i]}: {len(r)} columns, expected {width}.")
    col = None
    if label_column is not None:
        if header is not None and label_column in header:
            col = header.index(label_column)
        else:
            try:
                col = int(label_column)
            except ValueError:
                names = f"; the columns are {', '.join(header)}" if header else \
                    " (the file has no header: give a 0-based index)"
                raise _fail(f"{path.name}: no label column {label_column!r}{names}.") from None
            if not -width <= col < width:
                raise _fail(f"{path.name}: label column {col} is out of range for {width} "
                            f"columns.")
            col %= width
    labels = None
    if col is not None:
        labels = [r[col].strip() for r in rows]
        rows = [r[:col] + r[col + 1:] for r in rows]
        try:
            labels = np.array([float(v) for v in labels])
        except ValueError:
            labels = np.array(labels)          # class names
    try:
        x = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError:
        for i, r in enumerate(rows):
            for j, c in enumerate(r):
                try:
                    float(c)
                except ValueError:
                    name = ""
                    if header is not None:
                        names = [h for k, h in enumerate(header) if k != col]
                        name = f" ({names[j]!r})"
                    raise _fail(f"{path.name}, line {lines[i]}: column {j}{name} is not a "
                                f"number: {c!r}; use --label-column for a label column.") from None
        raise
    if x.shape[1] == 0:
        raise _fail(f"{path.name}: no feature columns are left.")
    return x, labels


def _architecture_arg(spec: str):
    from .spec import parse_architecture

    try:
        return parse_architecture(spec)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        raise _fail(str(e)) from None


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
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="progress bar over kernel tiles (on stderr)")
def kernel(architecture: str, data: Path, out: Path, data2: Path | None, kind: str | None,
           dtype: str, memory_budget: str | None, key: str | None, label_column: str | None,
           input_shape: tuple[int, ...] | None, progress: bool) -> None:
    """The infinite-width NNGP/NTK of ARCHITECTURE on the inputs in DATA.

    ARCHITECTURE is a spec string such as 'linear(512)-relu-linear(1)' or
    'conv2d(64,3,padding=same)-relu-globalavgpool-linear(10)', or a .json/.yaml file
    (see ntkit.spec). DATA is a .npy, .npz (key x) or .csv file of shape
    (N, *features), channels first for images.

    \b
    Examples:
      ntkit kernel 'linear(512)-relu-linear(1)' x.npy -o k.npy
      ntkit kernel net.yaml x.csv --label-column label --x2 test.csv -o k.npz
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
    t0 = time.perf_counter()
    try:
        k = net.kernel(torch.as_tensor(x1, dtype=torch_dtype),
                       None if x2 is None else torch.as_tensor(x2, dtype=torch_dtype),
                       memory_budget=memory_budget, progress=progress)
    except (ValueError, TypeError) as e:
        raise _fail(f"the architecture does not fit the data ({data.name}, examples of shape "
                    f"{tuple(x1.shape[1:])}): {e}") from None
    elapsed = time.perf_counter() - t0
    kinds = ("nngp", "ntk") if kind == "both" else (kind,)
    arrays = {g: getattr(k, g).detach().cpu().numpy() for g in kinds}
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(out, arrays[kind])
    else:
        np.savez(out, **arrays)
    shape = " x ".join(map(str, arrays[kinds[0]].shape))
    click.echo(f"wrote {' and '.join(kinds)} ({shape}, {dtype}) to {out} in {elapsed:.2f} s")


# ======================================================================= fit / predict
DATASETS = ("digits", "diabetes")


def _dataset(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """A bundled dataset: inputs, labels and its task."""
    if name == "digits":
        from .datasets import load_digits

        x, y = load_digits()
        return x.numpy(), y.numpy(), "classify"
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = (data.data - data.data.mean(0)) / data.data.std(0)     # columns to unit variance
    return x, data.target.astype(np.float64), "regress"


def _task_of(y: np.ndarray) -> str:
    """'classify' for strings, booleans, or integer labels with at most 50 values."""
    if y.dtype.kind in "USOb":
        return "classify"
    if y.ndim == 1 and np.all(np.isfinite(y)) and np.all(y == np.round(y)) \
            and len(np.unique(y)) <= 50:
        return "classify"
    return "regress"


def _check_labels(y: np.ndarray, task: str, source: str) -> np.ndarray:
    """The labels as the task needs them, or an error saying what does not fit."""
    if task == "classify":
        if y.ndim != 1:
            raise _fail(f"{source}: a classifier takes one label per example, got labels of "
                        f"shape {y.shape}; use --task regress for several targets.")
        if y.dtype.kind in "fc":
            if not np.all(np.isfinite(y)):
                raise _fail(f"{source}: the labels have NaN or infinite values.")
            if not np.all(y == np.round(y)):
                frac = y[y != np.round(y)][0]
                raise _fail(f"{source}: the labels are continuous (e.g. {frac:g}), but a "
                            f"classifier needs class labels; use --task regress.")
            y = y.astype(np.int64)
        if len(np.unique(y)) < 2:
            raise _fail(f"{source}: the labels hold one class only ({y[0]!r}); a classifier "
                        f"needs at least two.")
        return y
    if y.dtype.kind not in "fiub":
        raise _fail(f"{source}: regression needs numeric targets, got labels like "
                    f"{y.ravel()[0]!r}; use --task classify.")
    y = y.astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise _fail(f"{source}: the targets have NaN or infinite values.")
    return y


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
        x, y, task = _dataset(dataset)
        return x, y, dataset, task
    x, y = load_data(data, key=key, label_column=label_column, labels_key=labels_key,
                     input_shape=input_shape)
    if y is None:
        how = ("--label-column NAME" if data.suffix.lower() == ".csv"
               else f"an array {labels_key!r} in the .npz file")
        raise _fail(f"{data.name} has no labels; give them with {how}.")
    if y.shape[0] != x.shape[0]:
        raise _fail(f"{data.name}: {x.shape[0]} inputs but {y.shape[0]} labels.")
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
        task = data_task or _task_of(y)
        click.echo(f"task: {'classification' if task == 'classify' else 'regression'} "
                   f"(from the labels; set --task to change)")
    y = _check_labels(y, task, name)
    if x.ndim != 2:
        raise _fail(f"{name}: the estimators take inputs (N, features), got {x.shape}; "
                    f"flatten the examples.")
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
        y_te = _check_labels(y_te, task, test_data.name)
        x_tr, y_tr = x, y
    else:
        stratify = y if task == "classify" and np.min(np.unique(y, return_counts=True)[1]) >= 2 \
            else None
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed,
                                                  stratify=stratify)
    cls = NTKClassifier if task == "classify" else NTKRegressor
    model = cls(architecture, kernel=kernel, t=t, diag_reg=diag_reg, dtype=dtype)
    t0 = time.perf_counter()
    try:
        model.fit(x_tr, y_tr)
        test_m = _metrics(task, y_te, model.predict(x_te))
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
        x, y, _ = _dataset(dataset)
        name = dataset
    else:
        x, y = load_data(data, key=key, label_column=label_column, labels_key=labels_key,
                         input_shape=input_shape)
        name = data.name
    if x.ndim != 2 or x.shape[1] != model.n_features_in_:
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
        y = _check_labels(y, task, name)
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
    settings = _DemoSettings(
        widths=widths or ((64, 256) if quick else (64, 256, 1024)),
        n_train=n_train or (200 if quick else 500),
        n_test=n_test or (200 if quick else 500),
        steps=steps or (300 if quick else 2000),
        depth=depth, seed=seed, quick=quick, threads=threads,
    )
    if settings.n_train + settings.n_test > 1797:
        raise click.BadParameter(
            f"--n-train {settings.n_train} + --n-test {settings.n_test} exceeds the 1797 "
            f"digits.", param_hint="--n-train/--n-test")
    run_demo(settings, out_dir)


class _DemoSettings:
    def __init__(self, *, widths, n_train, n_test, steps, depth, seed, quick, threads=1
                 ) -> None:
        self.widths, self.n_train, self.n_test = tuple(widths), n_train, n_test
        self.steps, self.depth, self.seed, self.quick = steps, depth, seed, quick
        self.threads = threads


def _architecture(depth: int, width: int) -> str:
    return (f"{depth}*(linear({width},w_std=1.5,b_std=0.1)-relu)"
            f"-linear(10,w_std=1.5,b_std=0.1)")


def run_demo(s: _DemoSettings, out_dir: Path) -> None:
    """The body of `ntkit demo` (see its help), with ``s.threads`` torch threads (the
    previous number is restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        _run_demo(s, out_dir)
    finally:
        torch.set_num_threads(before)


def _run_demo(s: _DemoSettings, out_dir: Path) -> None:
    import torch
    from tqdm import tqdm

    import ntkit as nk

    from . import plot, predict
    from .datasets import load_digits
    from .spec import parse_architecture

    draw = _has_matplotlib()
    start = time.perf_counter()
    if draw:
        out_dir.mkdir(parents=True, exist_ok=True)
    x64, labels = load_digits(dtype=torch.float64)
    perm = torch.randperm(x64.shape[0], generator=torch.Generator().manual_seed(s.seed))
    tr, te = perm[:s.n_train], perm[s.n_train:s.n_train + s.n_test]
    y64 = torch.nn.functional.one_hot(labels, 10).to(torch.float64) - 0.1
    x_tr, y_tr, x_te, y_te = x64[tr], y64[tr], x64[te], y64[te]
    lab_te = labels[te]
    net = parse_architecture(_architecture(s.depth, 512))
    click.echo(f"data: scikit-learn digits (8x8), {s.n_train} train / {s.n_test} test, "
               f"split seed {s.seed}")
    click.echo(f"network: {_architecture(s.depth, 'W')}  (ntkit spec; W = width)")

    # ---- infinite width: kernels, learning rate, ensembles over a grid of times
    t0 = time.perf_counter()
    k_train = net.kernel(x_tr)
    lr = 0.5 * predict.max_learning_rate(k_train.ntk, y_size=y_tr.numel())
    times = np.unique(np.round(np.logspace(0, math.log10(s.steps), 25)).astype(int))
    ensemble = predict.gradient_descent_mse_ensemble(net, x_tr, y_tr, learning_rate=lr)
    out = ensemble(x_te, torch.as_tensor(times, dtype=torch.float64), get=("nngp", "ntk"),
                   compute_cov=True)
    infinite_s = time.perf_counter() - t0
    click.echo(f"learning rate {lr:.3g} (half the largest stable step of the infinite NTK); "
               f"t = {s.steps} steps")
    gen = torch.Generator().manual_seed(s.seed + 1)
    stats = {g: _ensemble_stats(out[g].mean, out[g].cov, y_te, lab_te, gen) for g in out}

    # ---- finite networks: the same loss and learning rate, full-batch gradient descent
    finite: dict[int, dict[str, Any]] = {}
    x32, y32 = x_tr.float(), y_tr.float()
    x_te32, y_te32 = x_te.float(), y_te.float()
    entk_init = None
    for width in s.widths:
        model = parse_architecture(_architecture(s.depth, width)).build(
            (64,), generator=torch.Generator().manual_seed(s.seed + width))
        if width == max(s.widths):
            entk_init = nk.empirical_ntk(model, x32) / 10
        finite[width] = _train(model, x32, y32, x_te32, y_te32, lab_te, lr, times,
                               tqdm, desc=f"width {width}")

    # ---- empirical NTK at initialisation against the infinite NTK, over widths
    dist_widths = sorted({2 ** i for i in range(6, 11 if s.quick else 13)} | set(s.widths))
    n_sub, seeds = (50, 2) if s.quick else (100, 3)
    x_sub = x_tr[:n_sub]
    k_sub = net.kernel(x_sub).ntk
    distances = np.zeros((len(dist_widths), seeds))
    t0 = time.perf_counter()
    bar = tqdm(total=len(dist_widths) * seeds, desc="empirical NTK vs width", unit="net")
    for i, width in enumerate(dist_widths):
        arch = parse_architecture(_architecture(s.depth, int(width)))
        for j in range(seeds):
            model = arch.build((64,), dtype=torch.float64,
                               generator=torch.Generator().manual_seed(10_000 * j + int(width)))
            e = nk.empirical_ntk(model, x_sub) / 10
            distances[i, j] = float(torch.linalg.norm(e - k_sub) / torch.linalg.norm(k_sub))
            bar.update()
    bar.close()
    distance_s = time.perf_counter() - t0

    # ---- the table
    rows = []
    for g, name in (("ntk", "NTK"), ("nngp", "NNGP")):
        st = stats[g]
        rows.append((f"infinite {name} ensemble, mean", f"{st['mean_acc'][-1]:.3f}",
                     f"{st['mean_loss'][-1]:.4f}", f"{infinite_s:.1f}"))
    for g, name in (("ntk", "NTK"), ("nngp", "NNGP")):
        st = stats[g]
        rows.append((f"infinite {name}: one network", (f"{st['acc'][-1]:.3f} ± "
                     f"{st['acc_std'][-1]:.3f}"), (f"{st['loss'][-1]:.4f} ± "
                     f"{st['loss_std'][-1]:.4f}"), "-"))
    for width, r in finite.items():
        rows.append((f"MLP width {width}", f"{r['acc'][-1]:.3f}", f"{r['loss'][-1]:.4f}",
                     f"{r['seconds']:.1f}"))
    click.echo("")
    click.echo(f"test metrics at t = {int(times[-1])} (loss 0.5/|y| ||f - y||^2):")
    click.echo(_table(("model", "test accuracy", "test loss", "seconds"), rows))
    click.echo("(ensemble, mean: the prediction of the infinite ensemble, its mean output; "
               "one network: a single infinitely wide network drawn from it, mean ± std "
               "over networks)")
    slope = np.polyfit(np.log(dist_widths), np.log(distances.mean(1)), 1)[0]
    click.echo(f"empirical vs infinite NTK on {n_sub} digits: relative distance "
               f"{distances.mean(1)[0]:.3f} at width {dist_widths[0]}, "
               f"{distances.mean(1)[-1]:.3f} at width {dist_widths[-1]} "
               f"(slope {slope:.2f} on log-log; theory -0.5) in {distance_s:.1f} s")

    # ---- figures
    if not draw:
        click.echo("figures: skipped, matplotlib is not installed (pip install 'ntkit[plot]')")
        click.echo(f"total {time.perf_counter() - start:.1f} s")
        return
    curves = {}
    for g, name in (("ntk", "infinite NTK ensemble"), ("nngp", "infinite NNGP ensemble")):
        st = stats[g]
        curves[name] = plot.Curve(loss=st["loss"], loss_std=st["loss_std"],
                                  accuracy=st["acc"], accuracy_std=st["acc_std"])
    for width, r in finite.items():
        curves[f"MLP width {width}"] = plot.Curve(loss=r["loss"], accuracy=r["acc"])
    kernels = {"infinite NNGP": k_train.nngp, "infinite NTK": k_train.ntk}
    if entk_init is not None:
        kernels[f"empirical NTK, width {max(s.widths)} at init"] = entk_init
    figures = {
        "training_curves.png": plot.training_curves(
            times, curves, title=f"digits, {s.n_train} train / {s.n_test} test, "
                                 f"learning rate {lr:.3g}"),
        "eigenvalue_spectrum.png": plot.eigenvalue_spectrum(
            kernels, title=f"kernel spectra on the {s.n_train} training digits"),
        "ntk_distance_vs_width.png": plot.kernel_distance_vs_width(
            dist_widths, distances, title=f"empirical vs infinite NTK, {n_sub} digits, "
                                          f"depth {s.depth}"),
    }
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110)
    click.echo(f"figures: {', '.join(str(out_dir / n) for n in figures)}")
    click.echo(f"total {time.perf_counter() - start:.1f} s")


def _ensemble_stats(mean, cov, y, labels, gen, samples: int = 32) -> dict[str, np.ndarray]:
    """Test metrics of the ensemble at each time.

    ``mean``: ``(T, Nt, O)``; ``cov``: ``(T, Nt, Nt)`` shared by the outputs. A network
    drawn from the ensemble has test outputs ``f ~ N(mean, cov)`` per output, so its loss
    ``0.5/|y| ||f - y||^2`` has mean ``0.5/|y| (||d||^2 + O tr C)`` and variance
    ``(0.5/|y|)^2 sum_o (2 tr(C^2) + 4 d_o' C d_o)`` with ``d = mean - y`` (moments of a
    Gaussian quadratic form); its accuracy's mean and spread are estimated from samples.
    """
    import torch

    d = mean - y
    scale = 0.5 / y.numel()
    n_out = y.shape[1]
    tr_c = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    loss = scale * ((d * d).sum((1, 2)) + n_out * tr_c)
    quad = torch.einsum("tio,tij,tjo->t", d, cov, d)
    var = scale ** 2 * (2 * n_out * (cov * cov).sum((1, 2)) + 4 * quad)
    lam, vec = torch.linalg.eigh(cov)
    root = vec * lam.clamp(min=0).sqrt()[:, None, :]
    z = torch.randn((samples,) + tuple(mean.shape[1:]), generator=gen, dtype=mean.dtype)
    f = mean[:, None] + torch.einsum("tij,sjo->tsio", root, z)
    acc = (f.argmax(-1) == labels).to(mean.dtype).mean(-1)          # (T, samples)
    mean_loss = scale * (d * d).sum((1, 2))
    mean_acc = (mean.argmax(-1) == labels).to(mean.dtype).mean(-1)
    return {"loss": loss.numpy(), "loss_std": var.clamp(min=0).sqrt().numpy(),
            "acc": acc.mean(1).numpy(), "acc_std": acc.std(1).numpy(),
            "mean_loss": mean_loss.numpy(), "mean_acc": mean_acc.numpy()}


def _train(model, x, y, x_test, y_test, labels, lr: float, times: np.ndarray, tqdm, desc: str
           ) -> dict[str, Any]:
    """Full-batch gradient descent on ``0.5/|y| ||f(x) - y||^2``, test metrics at ``times``
    (step counts)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    marks = {int(t) for t in times}
    loss_t, acc_t = [], []
    t0 = time.perf_counter()
    for step in tqdm(range(1, int(times[-1]) + 1), desc=desc, unit="step", leave=False):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * ((model(x) - y) ** 2).sum() / y.numel()
        loss.backward()
        opt.step()
        if step in marks:
            with torch.no_grad():
                f = model(x_test)
                loss_t.append(float(0.5 * ((f - y_test) ** 2).sum() / y_test.numel()))
                acc_t.append(float((f.argmax(1) == labels).float().mean()))
    if not math.isfinite(loss_t[-1]):
        raise _fail(f"the network of {desc} diverged at learning rate {lr:.3g}.")
    return {"loss": np.array(loss_t), "acc": np.array(acc_t),
            "seconds": time.perf_counter() - t0}


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def fmt(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    main()

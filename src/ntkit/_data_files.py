"""Data files and datasets of the ``ntkit`` command line.

`load_data` reads inputs (and labels) from ``.npy``, ``.npz`` or ``.csv``;
`bundled_dataset` gives the datasets behind ``--dataset``; `task_of` and
`check_labels` decide and check classification or regression labels. Every
problem with what the user gave raises `DataFileError` with a message that
names the file (and line) and what to do; the CLI prints it as one
``Error: ...`` line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "DataFileError", "bundled_dataset", "check_cast", "check_labels",
           "labelled_data", "load_data", "read_csv", "task_of"]


class DataFileError(ValueError):
    """A data file, dataset or label array that cannot be used as given."""


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
        DataFileError: a missing, unreadable or malformed file (the message names
            the file and what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    y = None
    try:
        if suffix == ".npy":
            if key is not None:
                raise DataFileError(f"--key applies to .npz files; {path.name} is a .npy file.")
            x = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                name = key or "x"
                if name not in data.files:
                    raise DataFileError(f"{path.name} has no array {name!r}; it holds "
                                        f"{', '.join(data.files) or 'nothing'} (choose one with "
                                        f"--key).")
                x = data[name]
                if labels_key and labels_key in data.files and labels_key != name:
                    y = data[labels_key]
        elif suffix == ".csv":
            x, y = read_csv(path, label_column)
        else:
            raise DataFileError(f"data file {path.name!r} must be .npy, .npz or .csv, got "
                                f"{suffix or 'no suffix'!r}.")
    except DataFileError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DataFileError(f"cannot read {path.name}: {e}") from None
    if label_column is not None and suffix != ".csv":
        raise DataFileError("--label-column applies to .csv files; .npz files hold labels "
                            "under 'y'.")
    if x.dtype.kind not in "fiub":
        raise DataFileError(f"{path.name}: the inputs must be numbers, got dtype {x.dtype}.")
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataFileError(f"{path.name}: the inputs must have shape (N, features) with "
                            f"N >= 1, got {x.shape}.")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))[0]
        raise DataFileError(f"{path.name}: the inputs have NaN or infinite values (first at row "
                            f"{bad[0]}, column {bad[1]}).")
    if input_shape is not None:
        per = int(np.prod(x.shape[1:]))
        if int(np.prod(input_shape)) != per:
            raise DataFileError(f"--input-shape {','.join(map(str, input_shape))} holds "
                                f"{int(np.prod(input_shape))} values but each example in "
                                f"{path.name} has {per}.")
        x = x.reshape((x.shape[0],) + tuple(input_shape))
    if y is not None and y.shape[0] != x.shape[0]:
        raise DataFileError(f"{path.name}: {x.shape[0]} inputs but {y.shape[0]} labels.")
    return x, y


def check_cast(x: np.ndarray, dtype: str, source: str, option: str = "--dtype float64"
               ) -> None:
    """Refuse inputs whose cast to ``dtype`` would make finite values infinite.

    `load_data` reads every file in float64 and refuses NaN and infinity there; a
    command that computes in float32 casts afterwards, and a value beyond float32's
    largest (about 3.4e38) becomes infinite in that cast. Without this check the
    library would report "x1 contains infinite values" for a file that holds none.

    Args:
        x: the inputs as read (float64).
        dtype: the dtype of the computation: ``"float32"``, ``"float64"`` (or a torch
            dtype, by its name).
        source: the file's name, for the message.
        option: how to ask for float64 where the check is made.

    Raises:
        DataFileError: naming the first value that overflows, its position, and the fix.
    """
    dtype = str(dtype).rsplit(".", 1)[-1]          # "float32" or torch.float32
    if dtype not in ("float16", "float32", "float64"):
        return                                     # not a float dtype of ours: no cast here
    limit = float(np.finfo(np.dtype(dtype)).max)
    x = np.asarray(x)
    if x.dtype.kind != "f" or np.finfo(x.dtype).max <= limit:
        return
    over = np.abs(x) > limit
    if not over.any():
        return
    flat = over.reshape(x.shape[0], -1)
    row, col = (int(i) for i in np.argwhere(flat)[0])
    value = x.reshape(x.shape[0], -1)[row, col]
    raise DataFileError(f"{source}: the inputs are finite, but {int(over.sum())} of them (first "
                        f"{value:.6g} at row {row}, column {col}) exceed {dtype}'s largest value "
                        f"({limit:.4g}), so the cast to {dtype} would make them infinite. Use "
                        f"{option}, or rescale the inputs.")


def read_csv(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Numeric columns of a .csv file (header row optional), with ``label_column`` split
    off as the labels (numbers, or class names as strings)."""
    import csv

    with open(path, newline="") as f:
        reader = csv.reader(f)
        numbered = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    lines = [n for n, _ in numbered]             # file line of each row, for messages
    rows = [r for _, r in numbered]
    if not rows:
        raise DataFileError(f"{path.name} is empty.")
    header = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows, lines = [c.strip() for c in rows[0]], rows[1:], lines[1:]
    if not rows:
        raise DataFileError(f"{path.name} has a header but no data rows.")
    width = len(header or rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise DataFileError(f"{path.name}, line {lines[i]}: {len(r)} columns, expected "
                                f"{width}.")
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
                raise DataFileError(f"{path.name}: no label column {label_column!r}"
                                    f"{names}.") from None
            if not -width <= col < width:
                raise DataFileError(f"{path.name}: label column {col} is out of range for {width} "
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
                    raise DataFileError(f"{path.name}, line {lines[i]}: column {j}{name} is not "
                                        f"a number: {c!r}; use --label-column for a label "
                                        f"column.") from None
        raise
    if x.shape[1] == 0:
        raise DataFileError(f"{path.name}: no feature columns are left.")
    return x, labels


DATASETS = ("digits", "diabetes")


def bundled_dataset(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """A bundled dataset: inputs, labels and its task."""
    if name == "digits":
        from .datasets import load_digits

        x, y = load_digits()
        return x.numpy(), y.numpy(), "classify"
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = (data.data - data.data.mean(0)) / data.data.std(0)     # columns to unit variance
    return x, data.target.astype(np.float64), "regress"


def task_of(y: np.ndarray) -> str:
    """'classify' for strings, booleans, or integer labels with at most 50 values."""
    if y.dtype.kind in "USOb":
        return "classify"
    if y.ndim == 1 and np.all(np.isfinite(y)) and np.all(y == np.round(y)) \
            and len(np.unique(y)) <= 50:
        return "classify"
    return "regress"


def check_labels(y: np.ndarray, task: str, source: str) -> np.ndarray:
    """The labels as the task needs them, or an error saying what does not fit."""
    if task == "classify":
        if y.ndim != 1:
            raise DataFileError(f"{source}: a classifier takes one label per example, got "
                                f"labels of shape {y.shape}; use --task regress for several "
                                f"targets.")
        if y.dtype.kind in "fc":
            if not np.all(np.isfinite(y)):
                raise DataFileError(f"{source}: the labels have NaN or infinite values.")
            if not np.all(y == np.round(y)):
                frac = y[y != np.round(y)][0]
                raise DataFileError(f"{source}: the labels are continuous (e.g. {frac:g}), but a "
                                    f"classifier needs class labels; use --task regress.")
            y = y.astype(np.int64)
        if len(np.unique(y)) < 2:
            raise DataFileError(f"{source}: the labels hold one class only ({y[0]!r}); a "
                                f"classifier needs at least two.")
        return y
    if y.dtype.kind not in "fiub":
        raise DataFileError(f"{source}: regression needs numeric targets, got labels like "
                            f"{y.ravel()[0]!r}; use --task classify.")
    y = y.astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise DataFileError(f"{source}: the targets have NaN or infinite values.")
    return y


def labelled_data(path: Path, *, key: str | None, label_column: str | None,
                  labels_key: str | None, input_shape: tuple[int, ...] | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels from a data file, or an error saying how to give the labels."""
    x, y = load_data(path, key=key, label_column=label_column, labels_key=labels_key,
                     input_shape=input_shape)
    if y is None:
        how = ("--label-column NAME" if path.suffix.lower() == ".csv"
               else f"an array {labels_key!r} in the .npz file")
        raise DataFileError(f"{path.name} has no labels; give them with {how}.")
    if y.shape[0] != x.shape[0]:
        raise DataFileError(f"{path.name}: {x.shape[0]} inputs but {y.shape[0]} labels.")
    return x, y

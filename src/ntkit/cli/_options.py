"""Options and argument checks shared by the commands of ``ntkit``.

`get_option` is the one NNGP/NTK selector of the command line, ``--get``; the
names it had before (``--kind`` on ``ntkit kernel``, ``--kernel`` on ``ntkit
fit``) still work for one release, hidden from ``--help``, with a notice on
stderr.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import click
import numpy as np

from .._data_files import DATASETS, bundled_dataset, labelled_data

__all__ = ["CONTEXT", "architecture_arg", "data_options", "force_option", "get_option",
           "int_list_callback", "labelled_data_arg", "shape_callback", "widths_callback"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def int_list_callback(what: str, example: str) -> Callable:
    """A click callback reading positive integers written ``64,256`` (or with spaces),
    from one value or from a repeated option (``--widths 64 --widths 256``): sorted,
    without repeats; None when the option is absent. ``what`` names one item in
    messages, ``example`` shows a valid value."""

    def callback(ctx, param, values) -> tuple[int, ...] | None:
        if not values:
            return None
        out = []
        for v in [values] if isinstance(values, str) else values:
            for part in str(v).replace(" ", ",").split(","):
                if not part:
                    continue
                try:
                    n = int(part)
                except ValueError:
                    raise click.BadParameter(
                        f"{str(v)!r} is not a list of {what}s ({part!r} is not an integer "
                        f"{what}); write e.g. {example}.") from None
                if n < 1:
                    raise click.BadParameter(f"{what}s must be positive, got {n}.")
                out.append(n)
        if not out:
            raise click.BadParameter(f"give at least one {what}, e.g. {example}.")
        return tuple(sorted(set(out)))

    return callback


#: ``--widths 64,256 --widths 1024`` -> (64, 256, 1024).
widths_callback = int_list_callback("width", "--widths 64,256,1024")


def shape_callback(ctx, param, value: str | None) -> tuple[int, ...] | None:
    """``--input-shape 3,16,16`` (or ``3x16x16``) -> (3, 16, 16)."""
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a shape; write e.g. 3,16,16.") from None
    if not shape or any(v < 1 for v in shape):
        raise click.BadParameter(f"{value!r} is not a shape of positive sizes.")
    return shape


def architecture_arg(spec: str):
    """The `ntkit.layers` network of a spec string or .json/.yaml file (see ntkit.spec).

    Its errors (a spec that does not parse, a missing file) go to the command line's
    table of failures (`ntkit.cli._errors`) as they are.
    """
    from ..spec import parse_architecture

    return parse_architecture(spec)


def force_option(more: str = "") -> Callable:
    """``--force``: replace output files that exist already (never an input file; see
    `ntkit.cli._output.check_outputs`). The command receives ``force``."""
    return click.option("--force", is_flag=True,
                        help="replace output files that already exist" + more)


def get_option(*, choices: Sequence[str], default: str | None, help: str,
               old: str | None = None) -> Callable:
    """The ``--get`` option (which kernel: ``ntk``, ``nngp`` or ``both``) of a command.

    The command receives ``get``. ``old`` is the option's former name (``--kind`` or
    ``--kernel``): accepted for one release, hidden, with a deprecation notice on
    stderr; giving both with different values is a usage error. Commands newer than
    the rename pass no ``old``.
    """
    old_dest = None if old is None else "deprecated_" + old.lstrip("-").replace("-", "_")

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def command(*args, get: str | None, **kwargs):
            legacy = None if old_dest is None else kwargs.pop(old_dest)
            if legacy is not None:
                click.echo(f"ntkit: {old} is deprecated and will be removed in the next "
                           f"release; use --get {legacy}.", err=True)
                if get is not None and get != legacy:
                    raise click.UsageError(f"--get {get} and {old} {legacy} disagree; give "
                                           f"--get only ({old} is its deprecated name).")
                get = legacy
            return f(*args, get=get if get is not None else default, **kwargs)

        if old is not None:
            command = click.option(old, old_dest, type=click.Choice(list(choices)),
                                   default=None, hidden=True,
                                   help="deprecated name of --get")(command)
        shown = f"  [default: {default}]" if default is not None else ""
        return click.option("--get", "get", type=click.Choice(list(choices)), default=None,
                            help=help + shown)(command)

    return decorate


def data_options(f: Callable) -> Callable:
    """``--key``, ``--labels-key``, ``--label-column`` and ``--input-shape``."""
    for opt in reversed([
        click.option("--key", default=None, help="array of the inputs in .npz files "
                                                 "[default: x]"),
        click.option("--labels-key", default="y", show_default=True,
                     help="array of the labels in .npz files"),
        click.option("--label-column", default=None, metavar="NAME|INDEX",
                     help="the label column of a .csv file: header name or 0-based index"),
        click.option("--input-shape", callback=shape_callback, default=None, metavar="C,H,W",
                     help="reshape each example, e.g. 3,16,16 (for convolutional "
                          "architectures)"),
    ]):
        f = opt(f)
    return f


def labelled_data_arg(data: Path | None, dataset: str | None, *, key, label_column,
                      labels_key, input_shape, what: str
                      ) -> tuple[np.ndarray, np.ndarray, str, str | None]:
    """Inputs, labels, a name for messages and the dataset's own task (or None), from a
    DATA file or a bundled ``--dataset`` (exactly one of them)."""
    if (data is None) == (dataset is None):
        raise click.UsageError(f"give {what} either as a DATA file or with --dataset "
                               f"({'/'.join(DATASETS)}), not both and not neither.")
    if dataset is not None:
        x, y, task = bundled_dataset(dataset)
        return x, y, dataset, task
    x, y = labelled_data(data, key=key, label_column=label_column, labels_key=labels_key,
                         input_shape=input_shape)
    return x, y, data.name, None

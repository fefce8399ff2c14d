"""``ntkit curve``: a learning curve of an architecture on a data set, predicted from the
kernel's spectrum (`ntkit.theory.learning_curve`) and measured by kernel regression on
random training sets (`ntkit.theory.measure_learning_curve`), printed as a table and
drawn as theory against experiment.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from .._data_files import DATASETS, check_cast
from ._errors import CommandError, failing
from ._options import (
    CONTEXT,
    architecture_arg,
    data_options,
    force_option,
    get_option,
    int_list_callback,
    labelled_data_arg,
)
from ._output import check_finite, check_outputs, file_or_none, write_atomically

__all__ = ["curve"]

_DEFAULT_ARCH = "linear(512, w_std=1.5, b_std=0.1)-relu-linear(1, w_std=1.5, b_std=0.1)"


_sizes = int_list_callback("training size", "--sizes 20,50,100")


@click.command("curve", context_settings=CONTEXT)
@click.argument("data", type=click.Path(path_type=Path), required=False)
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="a bundled dataset instead of DATA")
@data_options
@click.option("--arch", "architecture", default=_DEFAULT_ARCH, metavar="SPEC|FILE",
              show_default=True, help="architecture spec or .json/.yaml file")
@get_option(choices=("ntk", "nngp"), default="ntk", help="the kernel of the regression")
@click.option("--sizes", callback=_sizes, default="20,50,100,200", show_default=True,
              help="training sizes, each below the pool size")
@click.option("--ridge", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="absolute ridge added to the (n, n) train kernel")
@click.option("--noise", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="variance of Gaussian noise added to each training target")
@click.option("--trials", type=click.IntRange(min=0), default=20, show_default=True,
              help="random training sets per size in the experiment (0: theory only)")
@click.option("--pool", type=click.IntRange(min=2), default=None,
              help="use this many examples, drawn at random, as the pool [default: all]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="draw theory against experiment to this image (.png, .pdf)")
@click.option("--table", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the numbers to this .json")
@force_option()
def curve(data: Path | None, dataset: str | None, key, labels_key, label_column, input_shape,
          architecture: str, get: str, sizes: list[int], ridge: float, noise: float,
          trials: int, pool: int | None, seed: int, out: Path | None, table: Path | None,
          force: bool) -> None:
    """Predict and measure the learning curve of kernel regression with an architecture's
    infinite-width kernel on DATA (or --dataset).

    The examples form the pool that stands for the data distribution: the prediction is
    the eigenlearning equations on the pool kernel's spectrum (ntkit.theory), the
    measurement the mean test MSE over the pool of kernel ridge regression on --trials
    random training sets of each size. Class labels become centred one-hot targets.

    \b
    Examples:
      ntkit curve --dataset digits --sizes 20,50,100,200 -o digits-curve.png
      ntkit curve data.csv --label-column y --ridge 1e-3 --table curve.json
    """
    import torch

    from .. import theory

    check_outputs({"-o/--out": out, "--table": table},
                  {"DATA": data, "--arch": file_or_none(architecture)}, force=force)
    if out is not None and out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise click.BadParameter(f"figures are written to .png, .pdf or .svg, got "
                                 f"{out.name!r}.", param_hint="-o/--out")
    net = architecture_arg(architecture)
    x, y, name, task = labelled_data_arg(data, dataset, key=key, label_column=label_column,
                                         labels_key=labels_key, input_shape=input_shape,
                                         what="the data")
    check_cast(x, "float64", name)
    gen = torch.Generator().manual_seed(seed)
    if pool is not None and pool < len(x):
        idx = torch.randperm(len(x), generator=gen)[:pool].numpy()
        x, y = x[idx], y[idx]
    if y.dtype.kind in "USOb" or (task or "") == "classify" or (
            y.ndim == 1 and y.dtype.kind in "iu"):
        _, codes = np.unique(y, return_inverse=True)
        targets = np.eye(codes.max() + 1)[codes]
        targets = targets - targets.mean(0)
    else:
        targets = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    if max(sizes) >= len(x):
        raise CommandError(f"the largest training size {max(sizes)} is not below the pool "
                           f"of {len(x)} examples; give smaller --sizes.")
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
    yt = torch.as_tensor(targets)
    t0 = time.perf_counter()
    with failing(f"the learning curve of {name} failed"):
        k = getattr(net.kernel(xt), get)
        predicted = theory.learning_curve(k, yt, sizes, ridge=ridge, noise=noise)
        measured = theory.measure_learning_curve(k, yt, sizes, ridge=ridge, noise=noise,
                                                 trials=trials, generator=gen) \
            if trials > 0 else None
    arrays = {"predicted test MSE": predicted.test_mse.numpy()}
    if measured is not None:
        arrays["measured test MSE"] = measured.test_mse.numpy()
    check_finite(arrays, f"the learning curve of {name}",
                 "Give a ridge (--ridge 1e-6), or smaller --sizes.")
    click.echo(f"{name}: pool of {len(x)} examples, {get} of {architecture}, ridge {ridge:g}, "
               f"noise {noise:g}, {time.perf_counter() - t0:.2f} s")
    click.echo(f"{'n':>7} {'predicted':>12} {'measured':>12} {'+-':>10} {'kappa':>11}")
    for i, n in enumerate(sizes):
        m = "" if measured is None else f"{float(measured.test_mse[i]):12.5g} " \
                                        f"{float(measured.test_mse_sem[i]):10.3g}"
        click.echo(f"{n:7d} {float(predicted.test_mse[i]):12.5g} {m} "
                   f"{float(predicted.kappa[i]):11.4g}")
    if table is not None:
        record = {"data": name, "architecture": architecture, "get": get, "ridge": ridge,
                  "noise": noise, "pool": len(x), "sizes": sizes,
                  "predicted_test_mse": predicted.test_mse.tolist(),
                  "predicted_train_mse": predicted.train_mse.tolist(),
                  "kappa": predicted.kappa.tolist()}
        if measured is not None:
            record.update(measured_test_mse=measured.test_mse.tolist(),
                          measured_test_mse_sem=measured.test_mse_sem.tolist(),
                          measured_train_mse=measured.train_mse.tolist(), trials=trials)
        write_atomically(table, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        click.echo(f"wrote the numbers to {table}")
    if out is not None:
        fig = theory.learning_curve_figure(predicted, measured,
                                           title=f"learning curve: {name}, {get}")
        write_atomically(out, lambda tmp: fig.savefig(tmp))
        click.echo(f"drew the curve to {out}")

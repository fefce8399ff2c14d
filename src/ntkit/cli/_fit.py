"""``ntkit fit`` and ``ntkit predict``: the scikit-learn estimators on data files.

The estimators (`ntkit.sklearn`) do the work; these commands read the data,
split it, print metrics and save or load the model (.npz, no pickle).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click
import numpy as np

from .._data_files import DATASETS, bundled_dataset, check_cast, check_labels, load_data, task_of
from ._errors import CommandError, failing
from ._options import (
    CONTEXT,
    architecture_arg,
    data_options,
    force_option,
    get_option,
    labelled_data_arg,
)
from ._output import check_finite, check_outputs, file_or_none, write_atomically

__all__ = ["fit", "predict_cmd"]


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


@click.command(context_settings=CONTEXT)
@click.argument("data", type=click.Path(path_type=Path), required=False)
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="a bundled dataset instead of DATA: digits (classification), diabetes "
                   "(regression)")
@data_options
@click.option("--arch", "architecture", default=None, metavar="SPEC|FILE",
              help="architecture spec or .json/.yaml file  [default: the estimators' MLP, "
                   "2 x (linear-relu) with w_std=1.5, b_std=0.1]")
@click.option("--task", type=click.Choice(["auto", "classify", "regress"]), default="auto",
              show_default=True, help="auto: classify string labels and integer labels with "
                                      "at most 50 values, regress otherwise")
@get_option(choices=("ntk", "nngp"), default="ntk", old="--kernel",
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
@force_option()
def fit(data: Path | None, dataset: str | None, key, labels_key, label_column, input_shape,
        architecture: str | None, task: str, get: str, t: float, diag_reg: float,
        dtype: str, test_data: Path | None, test_size: float, seed: int,
        save_test: Path | None, out: Path, force: bool) -> None:
    """Fit an infinite-width network to DATA (or --dataset) and evaluate it.

    Trains the infinite ensemble of infinitely wide networks by gradient flow on MSE
    (ntkit.sklearn: NTKClassifier or NTKRegressor), prints accuracy (classification) or
    MSE and R2 (regression) on held-out data, and saves the model.

    No output file (-o, --save-test) may be an input; an existing one is replaced only
    with --force; a model with NaN or infinite coefficients is not saved.

    \b
    Examples:
      ntkit fit --dataset digits -o digits.npz --save-test digits-test.npz
      ntkit fit train.csv --label-column price --test test.csv --arch 'linear(512)-erf-linear(1)'
    """
    from sklearn.model_selection import train_test_split

    from ..sklearn import NTKClassifier, NTKRegressor, save

    check_outputs({"-o/--out": out, "--save-test": save_test},
                  {"DATA": data, "--test": test_data, "--arch": file_or_none(architecture)},
                  force=force)
    if architecture is not None:
        architecture_arg(architecture)            # a clear error before any work
    x, y, name, data_task = labelled_data_arg(data, dataset, key=key, label_column=label_column,
                                              labels_key=labels_key, input_shape=input_shape,
                                              what="the training data")
    if task == "auto":
        task = data_task or task_of(y)
        click.echo(f"task: {'classification' if task == 'classify' else 'regression'} "
                   f"(from the labels; set --task to change)")
    y = check_labels(y, task, name)
    check_cast(x, dtype, name)
    # the estimators take flattened rows; the example shape travels as input_shape
    example_shape = tuple(int(d) for d in x.shape[1:]) if x.ndim > 2 else None
    if test_data is not None:
        csv = test_data.suffix.lower() == ".csv"
        x_te, y_te = load_data(test_data, key=None if csv else key,
                               label_column=label_column if csv else None,
                               labels_key=labels_key, input_shape=input_shape)
        if y_te is None:
            raise CommandError(f"{test_data.name} has no labels.")
        if x_te.shape[1:] != x.shape[1:]:
            raise CommandError(f"{test_data.name} has examples of shape {x_te.shape[1:]} but "
                               f"{name} has {x.shape[1:]}.")
        y_te = check_labels(y_te, task, test_data.name)
        check_cast(x_te, dtype, test_data.name)
        x_tr, y_tr = x, y
    else:
        stratify = y if task == "classify" and np.min(np.unique(y, return_counts=True)[1]) >= 2 \
            else None
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed,
                                                  stratify=stratify)
    cls = NTKClassifier if task == "classify" else NTKRegressor
    model = cls(architecture, get=get, t=t, diag_reg=diag_reg, dtype=dtype,
                input_shape=example_shape)
    t0 = time.perf_counter()
    with failing(f"fitting {name} failed"):
        model.fit(x_tr.reshape(len(x_tr), -1), y_tr)
        test_pred = model.predict(x_te.reshape(len(x_te), -1))
    _check_model(model, f"fitting {name}", test_pred)
    test_m = _metrics(task, y_te, test_pred)
    elapsed = time.perf_counter() - t0
    from ..spec import to_spec

    try:
        arch = to_spec(model.network_)
    except ValueError:
        arch = repr(model.network_)
    click.echo(f"model: {cls.__name__}(get={get!r}, t={t:g}, diag_reg={diag_reg:g}) on "
               f"{len(y_tr)} training examples of {name}, {elapsed:.2f} s")
    click.echo(f"architecture: {arch}")
    click.echo(f"test ({len(y_te)} examples): {_format_metrics(test_m)}")
    write_atomically(out, lambda tmp: save(model, tmp))
    click.echo(f"saved the model to {out}")
    if save_test is not None:
        write_atomically(save_test, lambda tmp: np.savez(tmp, x=x_te, y=y_te))
        click.echo(f"saved the held-out data to {save_test}")


@click.command("predict", context_settings=CONTEXT)
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path), required=False)
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="a bundled dataset instead of DATA (all of it)")
@data_options
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write the predictions to .npy or .csv")
@force_option()
def predict_cmd(model_path: Path, data: Path | None, dataset: str | None, key, labels_key,
                label_column, input_shape, out: Path | None, force: bool) -> None:
    """Predict with a MODEL saved by `ntkit fit` on DATA; metrics when DATA has labels.

    \b
    Example:
      ntkit predict digits.npz digits-test.npz -o predictions.csv

    The -o file may not be the model or the data, replaces an existing file only with
    --force, and is not written when a prediction is NaN or infinite.
    """
    from ..sklearn import NTKClassifier, load

    if out is not None:
        _check_prediction_suffix(out)
    check_outputs({"-o/--out": out}, {"MODEL": model_path, "DATA": data}, force=force)

    if not model_path.is_file():
        raise CommandError(f"model file {str(model_path)!r} does not exist.")
    try:
        model = load(model_path)
    except (ValueError, OSError, KeyError, TypeError) as e:
        # a file that is no model: KeyError and OSError are not in the table, as they
        # would be bugs elsewhere
        raise CommandError(f"cannot load the model {model_path.name}: {e}") from None
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
    check_cast(x, str(getattr(model, "dtype", "float64")), name,
               option="a model fitted with --dtype float64")
    x = x.reshape(len(x), -1)                 # examples as rows; the model knows their shape
    if x.shape[1] != model.n_features_in_:
        raise CommandError(f"{name}: the model was fitted on {model.n_features_in_} features "
                           f"per example, the data has examples of shape {x.shape[1:]}.")
    task = "classify" if isinstance(model, NTKClassifier) else "regress"
    t0 = time.perf_counter()
    _check_model(model, f"the model {model_path.name}")
    with failing(f"predicting on {name} failed"):
        pred = model.predict(x)
    _check_model(model, f"predicting on {name}", pred)
    click.echo(f"predicted {len(pred)} examples of {name} with {type(model).__name__} in "
               f"{time.perf_counter() - t0:.2f} s")
    if y is not None:
        y = check_labels(y, task, name)
        _check_targets(model, task, y, name)
        click.echo(f"{name}: {_format_metrics(_metrics(task, y, pred))}")
    if out is not None:
        _write_predictions(out, pred)
        click.echo(f"wrote the predictions to {out}")


def _check_targets(model, task: str, y: np.ndarray, name: str) -> None:
    classes = np.asarray(getattr(model, "classes_", []))
    if task == "classify" and y.dtype.kind != classes.dtype.kind \
            and not (y.dtype.kind in "iuf" and classes.dtype.kind in "iuf"):
        raise CommandError(f"{name}: labels like {y[0]!r} are not of the model's classes "
                           f"({', '.join(map(str, classes[:5]))}...).")
    if task == "regress" and y.reshape(len(y), -1).shape[1] != model.n_outputs_:
        raise CommandError(f"{name}: {y.reshape(len(y), -1).shape[1]} target columns, the "
                           f"model predicts {model.n_outputs_}.")


_NON_FINITE_FIX = ("Likely causes: a train kernel too ill-conditioned for its dtype, or "
                   "inputs or targets of huge magnitude. Refit with a larger --diag-reg or "
                   "--dtype float64, or rescale the data.")


def _check_model(model, what: str, pred=None) -> None:
    """Refuse a model whose fitted coefficients, or predictions ``pred``, are not finite."""
    arrays = {name: np.asarray(getattr(model, name)) for name in ("dual_coef_", "cov_coef_")
              if getattr(model, name, None) is not None}
    if pred is not None:
        arrays["the predictions"] = np.asarray(pred)
    check_finite(arrays, what, _NON_FINITE_FIX)


def _check_prediction_suffix(out: Path) -> None:
    if out.suffix.lower() not in (".npy", ".csv"):
        raise click.BadParameter(f"predictions are written to .npy or .csv, got "
                                 f"{out.name!r}.", param_hint="-o/--out")


def _write_predictions(out: Path, pred) -> None:
    _check_prediction_suffix(out)
    pred = np.asarray(pred)
    if out.suffix.lower() == ".npy":
        write_atomically(out, lambda tmp: np.save(tmp, pred))
    else:
        write_atomically(out, lambda tmp: np.savetxt(
            tmp, pred.reshape(len(pred), -1), delimiter=",",
            fmt="%s" if pred.dtype.kind in "US" else "%.10g"))

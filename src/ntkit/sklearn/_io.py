"""Fitted estimators in one ``.npz`` file, without pickle.

The file holds the fitted arrays (training inputs, dual coefficients, the covariance
operator of `NNGPRegressor`, ``classes_``) and one JSON string with the estimator's
class name and parameters. Loading reads it with ``allow_pickle=False`` and rebuilds
the estimator from a fixed list of classes, so a file can hold data but never code.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ..layers import Layer
from ._estimators import NNGPRegressor, NTKClassifier, NTKRegressor

__all__ = ["load", "save"]

FORMAT = "ntkit.sklearn.v1"
_CLASSES = {cls.__name__: cls for cls in (NTKRegressor, NNGPRegressor, NTKClassifier)}
#: Fitted arrays, by attribute name; each estimator has those it computed.
_ARRAYS = ("X_fit_", "dual_coef_", "cov_coef_", "classes_", "feature_names_in_")
Estimator = NTKRegressor | NNGPRegressor | NTKClassifier


def _json_param(name: str, value: Any) -> Any:
    """A parameter as a JSON value (the architecture as a spec string)."""
    if name == "architecture" and isinstance(value, Layer):
        from ..spec import to_spec

        try:
            return to_spec(value)
        except ValueError as e:
            raise ValueError(
                f"cannot save an estimator whose architecture (a {type(value).__name__}) has "
                f"no spec string ({e}). Saved files hold no code, so only architectures that "
                f"ntkit.spec can write are saved; for tanh and other elementwise functions "
                f"use architecture=None with activation='tanh' (or another name).") from None
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if name == "input_shape" and isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    raise TypeError(f"cannot save parameter {name}={value!r} of type {type(value).__name__}; "
                    f"only numbers, strings and None can be stored without pickle.")


def _array(name: str, value: np.ndarray) -> np.ndarray:
    """A fitted array that numpy stores without pickle (labels of object dtype become
    strings when they all are strings)."""
    value = np.asarray(value)
    if value.dtype == object:
        if not all(isinstance(v, str) for v in value.ravel()):
            kinds = sorted({type(v).__name__ for v in value.ravel()})
            raise TypeError(f"cannot save {name} with values of types {kinds} without pickle; "
                            f"use numeric or string labels.")
        value = value.astype(str)
    return value


def save(estimator: Estimator, path: str | os.PathLike) -> None:
    """Writes a fitted `NTKRegressor`, `NNGPRegressor` or `NTKClassifier` to ``path``.

    One ``.npz`` file (written at ``path`` exactly, no suffix added) with the fitted
    arrays and the parameters as JSON; read it back with `load`. An ``architecture``
    given as an ntkit network is stored as its spec string (`ntkit.spec.to_spec`).

    Raises:
        TypeError: for other estimators, or labels/parameters that need pickle.
        ValueError: when the estimator is not fitted, or its architecture has no spec
            string (e.g. ``Elementwise(fn)``).
    """
    if type(estimator) not in _CLASSES.values():
        raise TypeError(f"save takes a fitted {', '.join(_CLASSES)}; got "
                        f"{type(estimator).__name__}.")
    check_is_fitted(estimator)
    params = {k: _json_param(k, v) for k, v in estimator.get_params(deep=False).items()}
    meta = {"format": FORMAT, "class": type(estimator).__name__, "params": params,
            "n_features_in": int(estimator.n_features_in_)}
    meta["solver_"] = getattr(estimator, "solver_", "exact")
    if hasattr(estimator, "n_outputs_"):
        meta["n_outputs"] = int(estimator.n_outputs_)
        meta["y_1d"] = bool(estimator._y_1d)
    arrays = {name: _array(name, getattr(estimator, name)) for name in _ARRAYS
              if hasattr(estimator, name)}
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def load(path: str | os.PathLike) -> Estimator:
    """Reads an estimator written by `save`; it predicts as the saved one did.

    The network is rebuilt from the stored parameters (a Layer architecture comes
    back as its spec string); nothing is unpickled.

    Raises:
        ValueError: when the file is not one that `save` wrote.
    """
    with np.load(path, allow_pickle=False) as data:
        if "meta" not in data.files:
            raise ValueError(f"{os.fspath(path)!r} is not a file written by "
                             f"ntkit.sklearn.save (it has no 'meta' entry).")
        meta = json.loads(str(data["meta"]))
        arrays = {name: data[name] for name in _ARRAYS if name in data.files}
    if meta.get("format") != FORMAT or meta.get("class") not in _CLASSES:
        raise ValueError(f"{os.fspath(path)!r} holds format {meta.get('format')!r} and class "
                         f"{meta.get('class')!r}; this version reads {FORMAT!r} files of "
                         f"{', '.join(_CLASSES)}.")
    params = dict(meta["params"])
    if "kernel" in params and "get" not in params:
        # files written before ``get`` replaced ``kernel`` (one release of both)
        params["get"] = params.pop("kernel")
    if params.get("input_shape") is not None:
        params["input_shape"] = tuple(params["input_shape"])
    estimator = _CLASSES[meta["class"]](**params)
    estimator.network_ = estimator._settings().network
    for name, value in arrays.items():
        setattr(estimator, name, value)
    estimator.n_features_in_ = meta["n_features_in"]
    estimator.solver_ = meta.get("solver_", "exact")
    if "n_outputs" in meta:
        estimator.n_outputs_ = meta["n_outputs"]
        estimator._y_1d = meta["y_1d"]
    return estimator

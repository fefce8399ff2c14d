"""Fitted estimators in one ``.npz`` file, without pickle.

The file holds the fitted arrays (training inputs, dual coefficients, the covariance
operator of `NNGPRegressor`, ``classes_``) and one JSON string with the estimator's
class name and parameters. Loading reads it with ``allow_pickle=False`` and rebuilds
the estimator from a fixed list of classes, so a file can hold data but never code.
"""

from __future__ import annotations

import contextlib
import json
import os
import reprlib
import tempfile
import zipfile
import zlib
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ..errors import ModelFileError, SpecError
from ..layers import Layer
from ..solvers._common import SOLVERS
from ..spec import SpecLimits, load_json, parse_architecture
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
    The file is written beside ``path`` and renamed into place when complete, so an
    interrupted save leaves any earlier file whole.

    Raises:
        TypeError: for other estimators, or labels/parameters that need pickle.
        ValueError: when the estimator is not fitted, its architecture has no spec
            string (e.g. ``Elementwise(fn)``), or its fitted arrays hold NaN or inf
            (`ntkit.errors.ModelFileError`: such a file could not be loaded).
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
    for name in _FINITE:
        if name in arrays and not np.isfinite(arrays[name]).all():
            raise ModelFileError(
                f"cannot save this {type(estimator).__name__}: its {name} holds NaN or inf, "
                f"so its predictions would be NaN. Refit it with a larger diag_reg or "
                f"dtype='float64', and check the training data for NaN or inf.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def load(path: str | os.PathLike, *, limits: SpecLimits | None = None) -> Estimator:
    """Reads an estimator written by `save`; it predicts as the saved one did.

    The network is rebuilt from the stored parameters (a Layer architecture comes
    back as its spec string, read by `ntkit.spec.parse_architecture` within
    ``limits``); nothing is unpickled. Every entry is checked before the estimator
    is built: the parameters by name and type, the arrays by dtype, shape and
    finiteness, so a truncated or crafted file is refused with what is wrong.

    Args:
        path: the file `save` wrote.
        limits: bounds on the stored architecture spec (`ntkit.spec.SpecLimits`;
            the defaults when None); a depth beyond ``limits.max_layers`` is refused
            likewise.

    Raises:
        ntkit.errors.ModelFileError: (a ValueError) the file is not one that `save`
            wrote, is truncated, holds unknown entries or parameters, NaN or inf
            coefficients or training data, inconsistent shapes, or an architecture
            that does not parse within ``limits``; the message names the entry.
        FileNotFoundError: no file at ``path``.
    """
    if limits is None:
        limits = SpecLimits()
    if not isinstance(limits, SpecLimits):
        raise TypeError(f"limits must be an ntkit.spec.SpecLimits, got {type(limits).__name__}.")
    where = repr(os.fspath(path))
    meta_text, arrays = _read_npz(path, where)
    meta = _meta(meta_text, where)
    cls = _CLASSES[meta["class"]]
    params = _params(cls, meta["params"], where)
    network = _network(params, where, limits)
    estimator = cls(**params)
    try:
        estimator.network_ = estimator._settings(network).network
    except (TypeError, ValueError) as e:
        raise _bad(where, f"its parameters are refused by {cls.__name__}: {e}") from None
    _check_arrays(cls, meta, arrays, where)
    for name, value in arrays.items():
        setattr(estimator, name, value)
    estimator.n_features_in_ = meta["n_features_in"]
    estimator.solver_ = meta.get("solver_", "exact")
    if "n_outputs" in meta:
        estimator.n_outputs_ = meta["n_outputs"]
        estimator._y_1d = meta["y_1d"]
    return estimator


# ------------------------------------------------------------------ load's checks
#: Arrays whose values must be finite (labels and feature names are not numbers).
_FINITE = ("X_fit_", "dual_coef_", "cov_coef_")
#: meta's entries: those every file has, then the optional ones.
_META_REQUIRED = {"format", "class", "params", "n_features_in"}
_META_OPTIONAL = {"solver_", "n_outputs", "y_1d"}
_FIX = ("Load a file written by ntkit.sklearn.save, or save the fitted estimator again "
        "(a truncated file comes from an interrupted copy or download).")


def short(value: Any, n: int = 200) -> str:
    """``repr(value)`` cut to about ``n`` characters (a crafted file can be large)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 3, n, n
    text = r.repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _bad(where: str, what: str) -> ModelFileError:
    return ModelFileError(f"{where} is not a model file that ntkit.sklearn.load can use: "
                          f"{what}. {_FIX}")


def _read_npz(path: str | os.PathLike, where: str) -> tuple[str, dict[str, np.ndarray]]:
    """The meta JSON text and the arrays of the file, every read error a ModelFileError."""
    unreadable = (zipfile.BadZipFile, zlib.error, ValueError, EOFError, KeyError,
                  NotImplementedError, OSError, UnicodeDecodeError)
    try:
        data = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except unreadable as e:
        raise _bad(where, f"it is not a readable .npz archive ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise _bad(where, "it holds one .npy array, not the .npz archive that save writes")
    with data:
        if "meta" not in data.files:
            raise _bad(where, "it is not a file written by ntkit.sklearn.save (it has no "
                              "'meta' entry)")
        unknown = sorted(set(data.files) - {"meta", *_ARRAYS})
        if unknown:
            raise _bad(where, f"it holds unknown entries {short(unknown)}; a model file holds "
                              f"'meta' and some of {', '.join(_ARRAYS)}")
        arrays = {}
        for name in ["meta", *(n for n in _ARRAYS if n in data.files)]:
            try:
                arrays[name] = data[name]
            except unreadable as e:
                raise _bad(where, f"its entry {name!r} cannot be read, the file is truncated "
                                  f"or corrupt ({type(e).__name__}: {str(e)[:200]})") from None
    meta = arrays.pop("meta")
    if meta.ndim != 0 or meta.dtype.kind != "U":
        raise _bad(where, f"its 'meta' entry is a {meta.dtype} array of shape {meta.shape}, "
                          f"not one JSON string")
    return str(meta), arrays


def _meta(text: str, where: str) -> dict[str, Any]:
    """The meta mapping, its keys and scalar entries checked."""
    try:
        meta = load_json(text, f"{where} (its 'meta' entry)")
    except SpecError as e:
        raise _bad(where, str(e)) from None
    if not isinstance(meta, dict):
        raise _bad(where, f"its 'meta' entry is a JSON {type(meta).__name__}, not a mapping")
    if meta.get("format") != FORMAT or meta.get("class") not in _CLASSES:
        raise _bad(where, f"it holds format {short(meta.get('format'))} and class "
                          f"{short(meta.get('class'))}; this version reads {FORMAT!r} files "
                          f"of {', '.join(_CLASSES)}")
    unknown = sorted(set(meta) - _META_REQUIRED - _META_OPTIONAL)
    missing = sorted(_META_REQUIRED - set(meta))
    if unknown or missing:
        raise _bad(where, f"its 'meta' entry has unknown keys {unknown} or lacks {missing}")
    if not isinstance(meta["params"], dict):
        raise _bad(where, "its 'params' entry is not a mapping of parameter names to values")
    checks = {"n_features_in": _positive_int, "n_outputs": _positive_int,
              "y_1d": lambda v: isinstance(v, bool),
              "solver_": lambda v: v in SOLVERS and v != "auto"}
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            raise _bad(where, f"its {key!r} is {short(meta[key])}, not a valid value")
    if ("n_outputs" in meta) != ("y_1d" in meta):
        raise _bad(where, "it has one of 'n_outputs' and 'y_1d' without the other")
    return meta


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _params(cls: type, params: dict[str, Any], where: str) -> dict[str, Any]:
    """The constructor's keyword arguments: known names, JSON scalars (``input_shape``
    a list of ints), the old name ``kernel`` read as ``get``."""
    names = set(cls._get_param_names())
    unknown = sorted(set(params) - names)
    if unknown:
        raise _bad(where, f"it stores parameters {short(unknown)} that {cls.__name__} does "
                          f"not take (it takes {', '.join(sorted(names))})")
    params = dict(params)
    for name, value in params.items():
        if name == "input_shape" and isinstance(value, list):
            ok = all(_positive_int(v) for v in value)
        else:
            ok = value is None or isinstance(value, (bool, int, float, str))
        if not ok:
            raise _bad(where, f"its parameter {name}={short(value)} is not a number, a "
                              f"string or null")
    if "kernel" in params and "get" not in params:
        # files written before ``get`` replaced ``kernel`` (one release of both)
        params["get"] = params.pop("kernel")
    if params.get("input_shape") is not None:
        params["input_shape"] = tuple(params["input_shape"])
    return params


def _network(params: dict[str, Any], where: str, limits: SpecLimits) -> Layer | None:
    """The stored architecture spec parsed within ``limits`` (None for an MLP from
    ``depth``, which is bounded by the same ``max_layers``)."""
    arch = params.get("architecture")
    if arch is None:
        depth = params.get("depth", 2)
        if isinstance(depth, int) and 2 * depth + 1 > limits.max_layers:
            raise _bad(where, f"its depth={depth} gives {2 * depth + 1} layers, above the "
                              f"limit max_layers={limits.max_layers}; pass "
                              f"limits=SpecLimits(max_layers=...) to load if it is meant")
        return None
    if not isinstance(arch, str):
        raise _bad(where, f"its architecture is {short(arch)}, not a spec string")
    if arch.strip().lower().endswith((".json", ".yaml", ".yml")):
        raise _bad(where, f"its architecture {short(arch)} names a file; a model file "
                          f"holds the compact spec string itself and never reads another file")
    try:
        return parse_architecture(arch, limits=limits)
    except SpecError as e:
        raise _bad(where, f"its architecture does not parse: {e}") from None


def _check_arrays(cls: type, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                  where: str) -> None:
    """Each fitted array: present when needed, of a numeric dtype, finite, of the shape
    the others and meta imply."""
    required = {"X_fit_", "dual_coef_"} | ({"classes_"} if cls is NTKClassifier else set())
    missing = sorted(required - set(arrays))
    if missing:
        raise _bad(where, f"it lacks the fitted arrays {missing}")
    for name in _FINITE:
        a = arrays.get(name)
        if a is None:
            continue
        if a.dtype.kind not in "fiu" or a.ndim != 2:
            raise _bad(where, f"its {name} is a {a.dtype} array of shape {a.shape}, not a "
                              f"2-D array of numbers")
        if not np.isfinite(a).all():
            bad = int(a.size - np.isfinite(a).sum())
            raise _bad(where, f"its {name} holds {bad} NaN or inf values; the estimator "
                              f"would predict NaN (refit it, with a larger diag_reg or "
                              f"dtype='float64', on finite data)")
    x, dual = arrays["X_fit_"], arrays["dual_coef_"]
    n, width = x.shape[0], dual.shape[1]
    expected = {"X_fit_": (n, meta["n_features_in"]), "dual_coef_": (n, width),
                "cov_coef_": (n, n)}
    if cls is NTKClassifier:
        expected["classes_"] = (width,)
    elif "n_outputs" in meta:
        expected["dual_coef_"] = (n, meta["n_outputs"])
    if "feature_names_in_" in arrays:
        expected["feature_names_in_"] = (meta["n_features_in"],)
    for name, shape in expected.items():
        if name in arrays and arrays[name].shape != shape:
            raise _bad(where, f"its {name} has shape {arrays[name].shape}, but the other "
                              f"entries imply {shape}")
    if meta.get("y_1d") and meta.get("n_outputs") != 1:
        raise _bad(where, f"it is marked one-dimensional (y_1d) with n_outputs="
                          f"{meta.get('n_outputs')}")

"""Validation of user inputs at the public boundary.

Every check raises `TypeError` or `ValueError` with what was received, why it is
wrong and what to do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_input_pair",
    "as_input_tensor",
    "as_real",
    "as_std",
    "check_finite",
    "check_input_pair",
    "is_int",
    "is_real",
]


def _numpy_number(value: Any) -> Any:
    """A 0-dim NumPy array as its scalar (``np.array(4)`` -> ``np.int64(4)``), else ``value``."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer number: a Python int, a NumPy integer scalar
    (``np.int64(2)``, as ``GridSearchCV`` over ``np.arange`` passes) or a 0-dim NumPy
    integer array, not a bool."""
    value = _numpy_number(value)
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy int or float scalar
    (``np.float32(1.5)``) or a 0-dim NumPy array of one, not a bool."""
    return is_int(value) or isinstance(_numpy_number(value), (float, np.floating))


def _not_a_number(value: Any, name: str, wanted: str) -> str:
    """Why ``value`` is not a number for ``name``, and what to pass instead."""
    if isinstance(value, (bool, np.bool_)):
        return (f"{name} must be {wanted}, got the bool {value!r}; booleans are not taken "
                f"as numbers here: pass 1.0 or 0.0 explicitly.")
    if isinstance(value, np.ndarray):
        return (f"{name} must be {wanted}, got a NumPy array of shape {value.shape} and dtype "
                f"{value.dtype}; pass one number, e.g. {name}=float(a.item()) for a "
                f"one-element array a.")
    return f"{name} must be {wanted}, got {type(value).__name__} {value!r}."


def as_real(value: Any, name: str) -> float:
    """``float(value)`` (numbers, NumPy scalars, one-element tensors), or a
    `TypeError` naming the argument."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} "
                        f"{value!r} ({e}).") from None

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_input_pair(x1: Any, x2: Any) -> tuple[Tensor, Tensor | None]:
    """Both input batches as tensors, checked for type, shape, pairing and values."""
    x1 = as_input_tensor(x1, "x1")
    x2 = None if x2 is None else as_input_tensor(x2, "x2")
    check_input_pair(x1, x2)
    check_finite(x1, "x1")
    if x2 is not None:
        check_finite(x2, "x2")
    return x1, x2


def as_input_tensor(x: Any, name: str) -> Tensor:
    """Returns `x` as a floating tensor of shape ``(N, *features)``, or raises.

    Checks type, dtype, device and shape only; values are checked by
    `check_finite` once the pair is known to share a device.

    Tensors are taken as they are (no copy); NumPy arrays and nested sequences
    are converted with `torch.as_tensor`, keeping float64 as float64.
    """
    if _is_scalar(x):
        shown = x.item() if isinstance(x, (np.ndarray, np.generic)) else x
        # A 0-dim array is an array of the wrong shape (ValueError, as before); a number
        # is not an array at all (TypeError).
        error = ValueError if isinstance(x, np.ndarray) else TypeError
        raise error(
            f"{name} is a single number ({type(x).__name__} {shown!r}); kernels take a batch "
            f"of examples of shape (N, features): for one example with one feature pass "
            f"[[{shown!r}]] (or torch.tensor([[{shown!r}]]))."
        )
    if not isinstance(x, Tensor):
        if isinstance(x, (np.ndarray, list, tuple)):
            try:
                x = torch.as_tensor(np.asarray(x))
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"{name} could not be converted to a tensor ({e}); pass a torch.Tensor "
                    f"of shape (N, features)."
                ) from None
        else:
            raise TypeError(
                f"{name} must be a torch.Tensor (or NumPy array) of shape (N, features); "
                f"got {type(x).__name__}."
            )
    if x.is_complex():
        raise TypeError(
            f"{name} has complex dtype {x.dtype}; kernels are defined for real inputs. "
            f"Split real and imaginary parts into features, e.g. torch.view_as_real(x).flatten(1)."
        )
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name} has dtype {x.dtype}; kernels need floating-point inputs. "
            f"Convert with {name}.float() (float32) or {name}.double() (float64); integer "
            f"token ids are taken only by a network whose first layer is nk.Embedding."
        )
    if x.ndim == 0:
        raise ValueError(
            f"{name} has shape () (a single number); expected a batch of shape (N, features): "
            f"for one example with one feature use {name}.reshape(1, 1) "
            f"({name}.unsqueeze(0).unsqueeze(0))."
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected a batch of shape (N, features). "
            f"For a single example use {name}.unsqueeze(0); for N scalars use "
            f"{name}.unsqueeze(1) (NumPy: reshape(1, -1), reshape(-1, 1))."
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"{name} is an empty batch (shape {tuple(x.shape)}); pass at least one example."
        )
    if x.numel() == 0:
        raise ValueError(
            f"{name} has no features (shape {tuple(x.shape)}); each example needs at least one "
            f"feature. Check how the inputs were sliced or loaded."
        )
    return x


def check_finite(x: Tensor, name: str) -> None:
    """Raises when `x` holds no data (meta) or NaN or infinite values."""
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is on the 'meta' device and holds no data; kernels need real values. "
            f"Materialise it on 'cpu' or 'cuda' first."
        )
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        rows = torch.nonzero(~torch.isfinite(x).flatten(1).all(1)).flatten()[:5].tolist()
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite values (first rows affected: "
            f"{rows}); kernels of non-finite inputs are undefined. Remove or impute them."
        )


def check_input_pair(x1: Tensor, x2: Tensor | None) -> None:
    """Checks that two input batches can be paired in one kernel."""
    if x2 is None:
        return
    if x1.device != x2.device:
        raise ValueError(
            f"x1 is on {x1.device} but x2 is on {x2.device}; put both on one device, "
            f"e.g. x2 = x2.to(x1.device)."
        )
    if x1.dtype != x2.dtype:
        raise TypeError(
            f"x1 has dtype {x1.dtype} but x2 has dtype {x2.dtype}; kernels are computed in "
            f"the inputs' dtype, so give both the same one, e.g. x2 = x2.to(x1.dtype) "
            f"(NumPy: x2.astype(x1.dtype))."
        )
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            f"x1 has per-example shape {tuple(x1.shape[1:])} but x2 has "
            f"{tuple(x2.shape[1:])}; both batches must have the same features."
        )


def as_std(value: Any, name: str) -> float | Tensor:
    """A standard deviation hyperparameter (``w_std``, ``b_std``), checked.

    A Python number is returned as a float. A real 0-dim floating tensor is
    returned as it is, with its autograd graph, so that kernels computed from it
    are differentiable in it; its value is checked once, here. Either must be
    finite and >= 0.
    """
    if isinstance(value, Tensor):
        if value.is_complex():
            raise TypeError(
                f"{name} must be a real number, got a complex tensor {value!r}; pass a real "
                f"0-dim tensor such as torch.tensor(1.5) or a Python number."
            )
        if not value.is_floating_point():
            raise TypeError(
                f"{name} must be a real number, got a tensor of dtype {value.dtype}; "
                f"hyperparameter tensors must be floating point, e.g. torch.tensor(1.5)."
            )
        if value.ndim != 0:
            raise ValueError(
                f"{name} must be one number, got a tensor of shape {tuple(value.shape)}; "
                f"pass a 0-dim tensor, e.g. {name}=torch.tensor(1.5) or t.reshape(()) "
                f"for a one-element t."
            )
        if value.device.type == "meta":
            raise ValueError(
                f"{name} is a tensor on the 'meta' device and holds no value; create it on "
                f"'cpu' or 'cuda'."
            )
        number = float(value.detach())
    elif not is_real(value):
        raise TypeError(_not_a_number(value, name, "a real number or a 0-dim tensor"))
    else:
        number = float(value)  # NumPy scalars and 0-dim arrays become Python floats
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {name}={number}.")
    return value if isinstance(value, Tensor) else number


def _is_scalar(x: Any) -> bool:
    """A number or 0-dim NumPy array (0-dim tensors get `as_input_tensor`'s shape message)."""
    return isinstance(x, (int, float, np.generic)) or (isinstance(x, np.ndarray) and x.ndim == 0)

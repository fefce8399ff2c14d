"""Nested forward-mode AD that PyTorch gets right, for `taylor` of degree >= 2.

PyTorch's first-order forward-mode derivatives are right, but some hand-written
JVP rules are wrong when differentiated again (nested `torch.func.jvp`): the
second-order term is dropped with no error (pytorch/pytorch#198017, #196700 for
``layer_norm``, #196699 for ``batch_norm``). Second derivatives measured against
nested reverse mode on torch 2.13 (float64; relative errors 0.2 to 3, not
rounding):

- normalisations with batch or per-example statistics: ``layer_norm``,
  ``batch_norm`` with batch statistics, ``instance_norm``;
- linear algebra: ``det``, ``slogdet``, ``logdet``, ``cholesky``, ``cholesky_ex``,
  ``cholesky_solve``, ``cholesky_inverse``, ``eigh``, ``eigvalsh``, ``solve``,
  ``solve_ex``, ``tensorsolve``, ``householder_product``.

(Right to rounding: ``group_norm``, ``rms_norm``, ``batch_norm`` with running
statistics, softmax, the usual activations, convolutions, pooling, ``inv``,
``lstsq``, ``qr``, ``svdvals``, ``lu_solve``, ``matrix_exp``.)

`exact_nested_forward_ad` is a `TorchFunctionMode` that evaluates the three
normalisations by their defining formulas, built from operations whose nested
derivatives are right (checked to fourth order against finite differences; the
native kernels' third reverse-mode derivative is wrong too), and refuses the
linear-algebra functions. It only sees
calls made through Python (``torch.*``, ``torch.nn.functional.*``, tensor
methods), which is how ``nn.LayerNorm``, ``nn.BatchNorm*d`` and
``nn.InstanceNorm*d`` call them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["WRONG_NESTED_JVP", "WrongNestedJVP", "exact_nested_forward_ad"]

#: Functions (matched by ``__name__`` in any namespace: ``torch``, ``torch.linalg``,
#: tensor methods) whose nested forward-mode derivatives are wrong in PyTorch.
WRONG_NESTED_JVP = frozenset({
    "det", "slogdet", "logdet", "cholesky", "cholesky_ex", "cholesky_solve",
    "cholesky_inverse", "eigh", "eigvalsh", "solve", "solve_ex", "tensorsolve",
    "householder_product", "orgqr",
})


class WrongNestedJVP(NotImplementedError):
    """A function whose nested forward-mode derivatives PyTorch gets wrong was called."""


class exact_nested_forward_ad(TorchFunctionMode):
    """Within it, normalisations run as composites and wrong-derivative functions raise.

    Raises:
        WrongNestedJVP: a function in `WRONG_NESTED_JVP` is called.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        composite = _COMPOSITES.get(func)
        if composite is not None:
            return composite(func, *args, **kwargs)
        name = getattr(func, "__name__", "").removeprefix("linalg_")  # torch.linalg.det: linalg_det
        if name in WRONG_NESTED_JVP:
            raise WrongNestedJVP(
                f"{name} has wrong second- and higher-order forward-mode derivatives in "
                f"PyTorch {torch.__version__} (pytorch/pytorch#198017): nested torch.func.jvp "
                f"drops a term without an error, so a Taylor expansion of degree >= 2 through "
                f"it would be wrong. Use degree=1 (first-order derivatives are right), or "
                f"remove {name} from the model."
            )
        return func(*args, **kwargs)


# ------------------------------------------------------------------ composites
def _normalize(x: Tensor, dims: list[int], weight: Tensor | None, bias: Tensor | None,
               eps: float, channel_axis: int | None) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias``, biased variance over ``dims``."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    y = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    shape = [-1] + [1] * (x.ndim - 2) if channel_axis is not None else None
    if weight is not None:
        y = y * (weight.reshape(shape) if shape else weight)
    if bias is not None:
        y = y + (bias.reshape(shape) if shape else bias)
    return y


def _layer_norm(func, input, normalized_shape, weight=None, bias=None, eps=1e-5,
                cudnn_enable=True):
    dims = list(range(-len(tuple(normalized_shape)), 0))
    return _normalize(input, dims, weight, bias, eps, None)


def _batch_norm(func, input, running_mean, running_var, weight=None, bias=None,
                training=False, momentum=0.1, eps=1e-5):
    # Running statistics (eval mode) have right derivatives; training with running
    # statistics updates them in place, which torch.func refuses: PyTorch decides both.
    if not training or running_mean is not None or running_var is not None:
        return func(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() // input.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {tuple(input.shape)}")
    return _normalize(input, [0] + list(range(2, input.ndim)), weight, bias, eps, 1)


def _instance_norm(func, input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats or running_mean is not None or running_var is not None:
        return func(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                    eps)
    return _normalize(input, list(range(2, input.ndim)), weight, bias, eps, 1)


def _torch_batch_norm(func, input, weight, bias, running_mean, running_var, training, momentum,
                      eps, cudnn_enabled):
    return _batch_norm(lambda *a: F.batch_norm(*a), input, running_mean, running_var, weight,
                       bias, training, momentum, eps)


def _torch_instance_norm(func, input, weight, bias, running_mean, running_var, use_input_stats,
                         momentum, eps, cudnn_enabled):
    return _instance_norm(lambda *a: F.instance_norm(*a), input, running_mean, running_var,
                          weight, bias, use_input_stats, momentum, eps)


_COMPOSITES: dict[Callable, Callable] = {
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    torch.batch_norm: _torch_batch_norm,
    F.instance_norm: _instance_norm,
    torch.instance_norm: _torch_instance_norm,
}

"""The empirical NTK of any PyTorch model: ``Theta(x1, x2) = J(x1) J(x2)^T``.

``J(x)`` is the Jacobian of the model's outputs with respect to its trainable
parameters at their current values. Two exact methods are offered (both with
`torch.func`, over chunks of inputs that fit a memory budget):

- ``"jacobian"``: per-example Jacobians, contracted parameter by parameter;
- ``"vector_products"``: ``J(x1) (J(x2)^T e)`` for each output basis vector
  ``e`` of ``x2`` (a vector-Jacobian then a Jacobian-vector product), which
  never holds a Jacobian.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .compute import parse_memory, progress_bar

__all__ = ["empirical_ntk"]

Output = Literal["trace", "full", "diagonal"]
Method = Literal["auto", "jacobian", "vector_products"]
_OUTPUTS = ("trace", "full", "diagonal")
_METHODS = ("auto", "jacobian", "vector_products")


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    output: Output = "trace",
    method: Method = "auto",
    params: dict[str, Tensor] | None = None,
    by_layer: bool = False,
    memory_budget: int | str | None = None,
    progress: bool | None = None,
) -> Tensor | dict[str, Tensor]:
    """The finite-width NTK ``J(x1) J(x2)^T`` of ``model`` at its parameters.

    Args:
        model: any `torch.nn.Module` mapping a batch ``(N, ...)`` to outputs
            ``(N, *out)``; it must treat examples independently (call
            ``model.eval()`` for BatchNorm or Dropout).
        x1, x2: input batches (any dtype the model takes, e.g. token ids);
            ``x2=None`` for ``Theta(x1, x1)``.
        output: ``"trace"``: ``sum_a Theta[i, j, a, a]`` over the flattened
            outputs ``a``, shape ``(N1, N2)`` (divide by the number of outputs
            for the per-output mean that approaches the infinite-width NTK);
            ``"full"``: ``(N1, N2, O, O)``; ``"diagonal"``: ``(N1, N2, O)``.
        method: ``"jacobian"``, ``"vector_products"`` or ``"auto"`` (the
            Jacobians when a chunk of them fits the budget).
        params: the parameters to differentiate, ``{name: tensor}``; default
            every parameter with ``requires_grad``. Buffers come from the model.
        by_layer: return ``{parameter name: its contribution}`` (they sum to
            the whole) instead of the total.
        memory_budget: bytes or a string such as ``"2GiB"`` for Jacobian chunks.
        progress: show a progress bar over chunks (default: when long).

    Returns:
        The kernel in the parameters' dtype, on their device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}.")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    params = _parameters(model, params)
    buffers = dict(model.named_buffers())
    x1 = _batch(x1, "x1")
    x2 = None if x2 is None else _batch(x2, "x2")
    _check_no_batch_statistics(model)
    out_shape = _output_shape(model, params, buffers, x1)
    _check_independent(model, x1)
    n_out = math.prod(out_shape)
    budget = parse_memory(memory_budget)
    n_params = sum(p.numel() for p in params.values())
    entry = next(iter(params.values())).element_size()
    if method == "auto":
        method = "jacobian" if n_out * n_params * entry * 4 <= budget else "vector_products"

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).reshape(-1)

    rows = max(1, budget // max(1, 4 * n_out * n_params * entry))
    xs2 = x1 if x2 is None else x2
    chunks1 = [(i, min(i + rows, x1.shape[0])) for i in range(0, x1.shape[0], rows)]
    chunks2 = [(j, min(j + rows, xs2.shape[0])) for j in range(0, xs2.shape[0], rows)]
    tiles = [(a, b) for a in chunks1 for b in chunks2]
    result: dict[str, Tensor] = {}
    bar = progress_bar(tiles, desc="empirical NTK", unit="tile", progress=progress, min_items=4)
    # No torch.no_grad() here: it would send modules such as nn.TransformerEncoderLayer
    # down fused inference paths that forward-mode AD cannot go through. The
    # parameters are detached, so no graph is recorded.
    for (i0, i1), (j0, j1) in bar:
        a, b = x1[i0:i1], xs2[j0:j1]
        if method == "jacobian":
            parts = _by_jacobians(f, params, a, b, output)
        else:
            try:
                parts = _by_vector_products(f, params, a, b, output, n_out)
            except NotImplementedError as e:
                raise NotImplementedError(
                    f"method='vector_products' needs forward-mode AD through every operation of "
                    f"the model, which PyTorch lacks here ({e}). Use method='jacobian' (PyTorch's "
                    f"attention kernels, for one, have no forward-mode derivative)."
                ) from e
        for name, value in parts.items():
            if name not in result:
                shape = (x1.shape[0], xs2.shape[0]) + tuple(value.shape[2:])
                result[name] = value.new_zeros(shape)
            result[name][i0:i1, j0:j1] = value
    bar.close()
    if by_layer:
        return result
    return sum(result.values())


# ------------------------------------------------------------------ methods
_EINSUM = {"trace": "iak,jak->ij", "full": "iak,jbk->ijab", "diagonal": "iak,jak->ija"}


def _by_jacobians(f, params, a: Tensor, b: Tensor, output: str) -> dict[str, Tensor]:
    jac = vmap(jacrev(f), in_dims=(None, 0))
    j1 = jac(params, a)
    j2 = j1 if b is a else jac(params, b)
    out = {}
    for name in params:
        u = j1[name].reshape(a.shape[0], j1[name].shape[1], -1)
        v = j2[name].reshape(b.shape[0], j2[name].shape[1], -1)
        out[name] = torch.einsum(_EINSUM[output], u, v)
    return out


def _by_vector_products(f, params, a: Tensor, b: Tensor, output: str, n_out: int
                        ) -> dict[str, Tensor]:
    """Per parameter: ``J1_k (J2_k^T e)`` for every output basis vector ``e`` of ``b``."""
    def pullback(x: Tensor, e: Tensor) -> dict[str, Tensor]:
        return vjp(lambda p: f(p, x), params)[1](e)[0]

    basis = torch.eye(n_out, dtype=next(iter(params.values())).dtype,
                      device=next(iter(params.values())).device)
    # (N2, O, *param): J2^T e for every example of b and output e
    cot = vmap(vmap(pullback, in_dims=(None, 0)), in_dims=(0, None))(b, basis)
    out = {}
    for name in params:
        def push(x: Tensor, t: Tensor) -> Tensor:
            tangent = {k: (t if k == name else torch.zeros_like(v)) for k, v in params.items()}
            return jvp(lambda p: f(p, x), (params,), (tangent,))[1]

        # (N1, N2, O_b, O_a): J1_k J2_k^T for this parameter alone
        pushed = vmap(vmap(vmap(push, in_dims=(None, 0)), in_dims=(None, 0)),
                      in_dims=(0, None))(a, cot[name])
        full = pushed.transpose(-1, -2)  # (N1, N2, O_a, O_b)
        if output == "full":
            out[name] = full
        else:
            d = torch.diagonal(full, 0, -2, -1)
            out[name] = d.sum(-1) if output == "trace" else d
    return out


# ------------------------------------------------------------------ checks
def _parameters(model: nn.Module, params: dict[str, Tensor] | None) -> dict[str, Tensor]:
    if params is None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    else:
        params = {n: p.detach() for n, p in params.items()}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad), so "
            f"its NTK is zero; pass params= to choose which to differentiate."
        )
    for name, p in params.items():
        if not p.is_floating_point() or p.is_complex():
            raise TypeError(
                f"parameter {name!r} has dtype {p.dtype}; the empirical NTK needs real "
                f"floating-point parameters (float32 or float64)."
            )
    return params


def _batch(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape "
                         f"{tuple(x.shape)}.")
    if x.is_complex():
        raise TypeError(f"{name} has complex dtype {x.dtype}; use real inputs.")
    return x


def _check_no_batch_statistics(model: nn.Module) -> None:
    bn = [n for n, m in model.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bn:
        raise ValueError(
            f"{type(model).__name__} has BatchNorm in training mode ({', '.join(bn)}), which "
            f"mixes the examples of a batch, so one example's output has no Jacobian of its "
            f"own; call model.eval() to use the running statistics."
        )


def _check_independent(model: nn.Module, x: Tensor) -> None:
    """Refuses models whose output for one example depends on the batch, or is random."""
    if x.shape[0] < 2:
        return
    with torch.no_grad():
        both = model(x[:2])[:1]
        alone = model(x[:1])
    if not isinstance(both, Tensor) or not isinstance(alone, Tensor):
        raise TypeError("the model must return a tensor (N, *outputs).")
    if both.shape != alone.shape or not torch.allclose(both, alone, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{type(model).__name__}'s output for an example changes with the rest of the batch "
            f"or between calls (batch statistics, or Dropout in training mode); the empirical "
            f"NTK needs examples treated independently and deterministically: call "
            f"model.eval()."
        )


def _output_shape(model, params, buffers, x: Tensor) -> tuple[int, ...]:
    try:
        with torch.no_grad():
            out = functional_call(model, (params, buffers), (x[:1],))
    except Exception as e:  # noqa: BLE001 - re-raised with what the user can change
        raise ValueError(
            f"{type(model).__name__} cannot be applied to inputs of per-example shape "
            f"{tuple(x.shape[1:])} ({type(e).__name__}: {e}); pass x of the shape the model "
            f"takes, with the batch axis first."
        ) from e
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError("the model must return a floating-point tensor (N, *outputs).")
    return tuple(out.shape[1:])

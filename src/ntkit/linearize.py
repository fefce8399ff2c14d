"""Linearized and Taylor-expanded PyTorch models: ``f(x; theta0 + dtheta)`` to order ``k``.

``taylor(model, k)`` is a trainable `torch.nn.Module` computing the degree-``k``
Taylor polynomial of ``model`` in its parameters around their current values
``theta0``:

    f_k(x; theta) = sum_{m=0}^{k} D^m f(x; theta0)[dtheta, ..., dtheta] / m!,
    dtheta = theta - theta0,

where ``D^m f(x; theta0)[dtheta]^m = d^m/dt^m f(x; theta0 + t dtheta) |_{t=0}`` is
the ``m``-th directional derivative along ``dtheta``. ``linearize(model)`` is the
``k = 1`` case, ``f(x; theta0) + J(x; theta0) (theta - theta0)``: the linearized
network whose gradient-descent training is governed by the empirical NTK
(Lee et al. 2019, "Wide Neural Networks of Any Depth Evolve as Linear Models
Under Gradient Descent", eq. 6; neural-tangents' ``nt.linearize`` and
``nt.taylor_expand``).

The derivatives are forward-mode products (`torch.func.jvp`, nested ``k`` times),
so no Jacobian is ever formed; the result is an ordinary tensor whose gradient
with respect to ``theta`` comes from ordinary autograd, so any torch optimizer
trains it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._nested_forward_ad import WrongNestedJVP, exact_nested_forward_ad

__all__ = ["TaylorModel", "linearize", "taylor"]


def linearize(model: nn.Module) -> TaylorModel:
    """The linearization ``f(x; theta0) + J(x; theta0) (theta - theta0)`` of ``model``.

    Same as ``taylor(model, 1)``; see `TaylorModel` for the conventions.

    Args:
        model: any `torch.nn.Module` with at least one real floating-point
            parameter with ``requires_grad``. It is deep-copied, never modified;
            its current parameters are ``theta0``.

    Returns:
        A `TaylorModel` of degree 1 whose ``parameters()`` are ``theta``,
        initialised to ``theta0``.

    Example:
        >>> lin = nk.linearize(net)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> loss = ((lin(x) - y) ** 2).mean(); loss.backward(); opt.step()
    """
    return taylor(model, 1)


def taylor(model: nn.Module, degree: int) -> TaylorModel:
    """The degree-``degree`` Taylor expansion of ``model`` in its parameters around ``theta0``.

    ``f_k(x; theta) = sum_{m=0}^{k} D^m f(x; theta0)[theta - theta0]^m / m!``
    (see `TaylorModel`).

    Args:
        model: any `torch.nn.Module` with at least one real floating-point
            parameter with ``requires_grad``. It is deep-copied, never modified;
            its current parameters are ``theta0``.
        degree: the order ``k >= 1`` of the expansion (1: `linearize`). A call
            costs about ``2**k`` forward passes of ``model``.

    Returns:
        A `TaylorModel` whose ``parameters()`` are ``theta``, initialised to ``theta0``.
    """
    return TaylorModel(model, degree)


class TaylorModel(nn.Module):
    """A model's Taylor polynomial in its parameters, trainable in ``theta``.

    ``forward(*args, **kwargs)`` returns

        f_k(x; theta) = sum_{m=0}^{k} D^m f(x; theta0)[theta - theta0]^m / m!

    with ``f(x; theta)`` the wrapped model called as ``model(*args, **kwargs)``
    and ``D^m f[v]^m = d^m/dt^m f(x; theta0 + t v) |_{t=0}`` computed by ``m``
    nested `torch.func.jvp` calls. At ``theta = theta0`` it equals the model; for
    ``k = 1`` it is affine in ``theta`` and its gradient at ``theta0`` is the
    model's. Outputs may be a tensor or a pytree (tuple, list, dict) of
    floating-point tensors; every leaf is expanded.

    Conventions:

    - ``base`` is a deep copy of the model in which every parameter has become
      a buffer holding ``theta0`` (tied parameters stay one tensor, also after
      ``.to()`` or ``.double()``), so ``state_dict``, ``.to(device)`` and dtype
      casts carry ``theta0`` and no optimizer sees it. Buffers of the model
      (e.g. BatchNorm running statistics) are used as they are, not expanded.
    - ``theta`` is an `torch.nn.ParameterList` with one entry per distinct
      trainable parameter of the model (``requires_grad=True``), initialised
      to a copy of ``theta0``; ``parameters()`` yields exactly these.
      ``param_names[i]`` is the model's name for ``theta[i]`` (its first name
      when tied) and `params_dict` maps names to ``theta``. Parameters with
      ``requires_grad=False`` stay at their values: they get no tangent.
    - ``train()``/``eval()`` reach ``base`` as for any submodule.

    Limits: every operation of the model needs a forward-mode derivative in
    PyTorch. The fused attention kernels have none: run
    ``torch.nn.functional.scaled_dot_product_attention`` (used by
    `torch.nn.MultiheadAttention` with ``need_weights=False`` and by
    `torch.nn.TransformerEncoderLayer`) under
    ``torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)``, and
    keep those modules in train mode (use ``dropout=0.0``): in eval mode they
    take a fused inference path. BatchNorm must be in eval mode (train mode
    updates running statistics in place, which `torch.func` refuses), or built
    with ``track_running_stats=False``.

    Degree >= 2 needs nested forward-mode derivatives, which PyTorch gets wrong
    for some operations without an error (pytorch/pytorch#198017). ``layer_norm``,
    ``batch_norm`` with batch statistics and ``instance_norm`` are then evaluated
    by their defining formulas (equal to PyTorch's kernels up to rounding), and
    the linear-algebra functions with wrong rules (``det``, ``slogdet``,
    ``cholesky``, ``eigh``, ``solve``, ...; see ``ntkit._nested_forward_ad``)
    raise `NotImplementedError`. Degree 1 uses PyTorch's kernels unchanged.

    Args:
        model: the model to expand (deep-copied, never modified).
        degree: the order ``k >= 1``.

    Raises:
        TypeError: ``model`` is not an `torch.nn.Module`, ``degree`` is not an
            int, or a trainable parameter is not real floating-point.
        ValueError: ``degree < 1``, or the model has no trainable parameter.
    """

    def __init__(self, model: nn.Module, degree: int) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a "
                f"function in an nn.Module whose forward calls it."
            )
        _check_degree(degree)
        self.degree = degree
        groups = _tied_names(model)
        trainable = [names for names, p in groups if p.requires_grad]
        if not trainable:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (none with "
                f"requires_grad=True), so there is nothing to linearize; set requires_grad "
                f"on the parameters to expand in."
            )
        for names, p in groups:
            if p.requires_grad and (not p.is_floating_point() or p.is_complex()):
                raise TypeError(
                    f"parameter {names[0]!r} has dtype {p.dtype}; Taylor expansion needs "
                    f"real floating-point parameters (float32 or float64). Convert the model "
                    f"or set requires_grad=False on it to keep it fixed."
                )
        try:
            base = copy.deepcopy(model)
        except RuntimeError as e:
            raise RuntimeError(
                f"{type(model).__name__} could not be deep-copied ({e}); linearize copies the "
                f"model so as not to modify it. Remove non-leaf tensors stored as attributes "
                f"(e.g. old-style torch.nn.utils.weight_norm; use "
                f"torch.nn.utils.parametrizations.weight_norm)."
            ) from e
        _parameters_to_buffers(base)
        self.base = base
        #: every name of each distinct parameter (tied ones have several), in model order
        self._groups: tuple[tuple[str, ...], ...] = tuple(names for names, _ in groups)
        self._trainable: tuple[tuple[str, ...], ...] = tuple(trainable)
        self.param_names: tuple[str, ...] = tuple(names[0] for names in trainable)
        self.theta = nn.ParameterList(
            [nn.Parameter(base.get_buffer(names[0]).clone()) for names in trainable]
        )

    def extra_repr(self) -> str:
        return f"degree={self.degree}"

    def params_dict(self) -> dict[str, nn.Parameter]:
        """``{model's parameter name: theta}`` for the trainable parameters (first name if tied)."""
        return dict(zip(self.param_names, self.theta))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``sum_{m<=k} D^m f(x; theta0)[theta - theta0]^m / m!`` for ``model(*args, **kwargs)``.

        Returns:
            What the model returns (a tensor or a pytree of tensors, same shapes),
            differentiable in ``theta`` (and in ``args`` where they require grad).
        """
        theta0 = tuple(self.base.get_buffer(names[0]) for names in self._trainable)
        tangent = tuple(t - t0 for t, t0 in zip(self.theta, theta0))
        groups = self._trainable

        def f(*primals: Tensor) -> Any:
            tensors = {name: p for p, names in zip(primals, groups) for name in names}
            return functional_call(self.base, tensors, args, kwargs, tie_weights=False)

        # PyTorch's nested forward-mode rules for some operations are wrong (see
        # _nested_forward_ad): from degree 2 on, normalisations run as composites.
        exact = exact_nested_forward_ad() if self.degree >= 2 else contextlib.nullcontext()
        try:
            if self.degree == 1 and _vjp_backward_applies(self.theta, args, kwargs):
                return linear_term_with_vjp_backward(f, theta0, tangent)
            with exact:
                terms = directional_derivatives(f, theta0, tangent, self.degree)
        except WrongNestedJVP:
            raise
        except NotImplementedError as e:
            raise NotImplementedError(
                f"{type(self.base).__name__} uses an operation without a forward-mode "
                f"derivative in PyTorch ({e}); Taylor expansion needs one for every operation. "
                f"For attention: run under torch.nn.attention.sdpa_kernel("
                f"torch.nn.attention.SDPBackend.MATH) and keep nn.MultiheadAttention / "
                f"nn.TransformerEncoderLayer in train mode with dropout=0.0 (their eval-mode "
                f"fast path is fused), or write attention with matmul and softmax."
            ) from e
        except RuntimeError as e:
            if "in-place" not in str(e):
                raise
            raise RuntimeError(
                f"{type(self.base).__name__} modifies a tensor in place during forward ({e}); "
                f"torch.func cannot expand through that. BatchNorm in train mode updates its "
                f"running statistics: call .eval() or use track_running_stats=False."
            ) from e
        return taylor_sum(terms)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> TaylorModel:
        # Module._apply replaces buffers module by module, which unties a buffer shared
        # by two modules; tie them again to the first name's tensor.
        super()._apply(fn, recurse)
        for names in self._groups:
            tensor = self.base.get_buffer(names[0])
            for name in names[1:]:
                owner, _, leaf = name.rpartition(".")
                self.base.get_submodule(owner)._buffers[leaf] = tensor
        return self


# ------------------------------------------------------------------ math
def directional_derivatives(f: Callable[..., Any], primals: tuple[Tensor, ...],
                            tangents: tuple[Tensor, ...], degree: int) -> tuple[Any, ...]:
    """``(f(p), D f(p)[v], ..., D^k f(p)[v]^k)`` by ``k`` nested forward-mode products.

    With ``h_0(p) = (f(p),)`` and ``h_m(p) = h_{m-1}(p) + (last tangent of
    jvp(h_{m-1}, p, v),)``: the jvp of ``D^{m-1} f(p)[v]^{m-1}`` along ``v`` is
    ``D^m f(p)[v]^m``. Cost: about ``2**k`` evaluations of ``f``.

    Args:
        f: a function of ``len(primals)`` tensors returning a tensor or pytree of tensors.
        primals: the expansion point ``p``, tensors of any shapes.
        tangents: the direction ``v``, shaped like ``primals``; may require grad
            (the results are differentiable in it).
        degree: ``k >= 0``.

    Returns:
        ``k + 1`` outputs of ``f``'s structure, the ``m``-th being ``D^m f(p)[v]^m``.
    """
    def order(m: int) -> Callable[..., tuple[Any, ...]]:
        if m == 0:
            return lambda *p: (f(*p),)
        lower = order(m - 1)

        def h(*p: Tensor) -> tuple[Any, ...]:
            values, derivatives = jvp(lower, p, tangents)
            return values + (derivatives[-1],)

        return h

    return order(degree)(*primals)


class _AffineInTheta(torch.autograd.Function):
    """``f(p0) + J(p0) v`` whose backward is the vector-Jacobian product at ``p0``.

    The output is affine in ``v``, so its gradient is ``J(p0)^T g``: one reverse pass
    of ``f`` at ``p0`` (`torch.func.vjp`), no derivative of the forward-mode product.
    Autograd through `torch.func.jvp` would differentiate the JVP itself, which needs
    second derivatives that some operations lack (``hardsigmoid_backward``, used by
    torchvision's MobileNetV3). Old-style (no ``setup_context``): used only outside
    torch.func transforms (see `_vjp_backward_applies`).
    """

    @staticmethod
    def forward(ctx, f, primals, structure, *tangents):
        values, derivatives = jvp(f, primals, tangents)
        flat_values, spec = tree_flatten(values)
        structure.append(spec)
        ctx.f, ctx.primals = f, primals
        return tuple(a + b for a, b in zip(flat_values, tree_flatten(derivatives)[0]))

    @staticmethod
    def backward(ctx, *grads):
        f, primals = ctx.f, ctx.primals
        with torch.enable_grad():
            outputs, vjp_fn = vjp(lambda *p: tuple(tree_flatten(f(*p))[0]), *primals)
            cotangents = tuple(torch.zeros_like(o) if g is None else g
                               for g, o in zip(grads, outputs))
            return (None, None, None, *vjp_fn(cotangents))


def linear_term_with_vjp_backward(f: Callable[..., Any], primals: tuple[Tensor, ...],
                                  tangents: tuple[Tensor, ...]) -> Any:
    """``f(p) + D f(p)[v]`` (Lee et al. 2019, eq. 6), equal to ``taylor_sum`` of
    ``directional_derivatives(f, p, v, 1)``, differentiable in ``v`` by
    ``v_grad = J(p)^T g`` (`_AffineInTheta`): trainable for models whose operations
    have no double backward.

    Args:
        f: a function of ``len(primals)`` tensors returning a tensor or pytree of
            floating-point tensors.
        primals: the expansion point ``p``.
        tangents: the direction ``v``, shaped like ``primals``.

    Returns:
        ``f``'s structure, each leaf ``f(p) + J(p) v``.
    """
    structure: list = []
    flat = _AffineInTheta.apply(f, primals, structure, *tangents)
    return tree_unflatten(list(flat), structure[0])


def _vjp_backward_applies(theta, args, kwargs) -> bool:
    """Whether `linear_term_with_vjp_backward` may serve degree 1: gradients are
    wanted for ``theta`` only (no input requires grad: its gradient would need the
    forward-mode product's own derivative), outside torch.func transforms (the
    old-style `_AffineInTheta` has no rules for them)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in theta):
        return False
    transforms = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    if transforms():
        return False
    leaves = tree_flatten((args, kwargs))[0]
    return not any(isinstance(a, Tensor) and a.requires_grad for a in leaves)


def taylor_sum(terms: tuple[Any, ...]) -> Any:
    """``sum_m terms[m] / m!`` leaf by leaf (``terms[m] = D^m f[v]^m``)."""
    total = terms[0]
    for m, term in enumerate(terms[1:], start=1):
        scale = 1.0 / math.factorial(m)
        total = tree_map(lambda a, b, s=scale: a + s * b, total, term)
    return total


# ------------------------------------------------------------------ helpers
def _check_degree(degree: Any) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(
            f"degree must be an int >= 1 (1: linearize), got {type(degree).__name__} "
            f"{degree!r}."
        )
    if degree < 1:
        raise ValueError(
            f"degree must be >= 1 (1: linearize, 2: quadratic, ...), got {degree}; degree 0 "
            f"would be the constant f(x; theta0), with nothing to train."
        )


def _tied_names(model: nn.Module) -> list[tuple[tuple[str, ...], nn.Parameter]]:
    """Each distinct parameter with all its names, in ``named_parameters`` order."""
    by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), ([], p))[0].append(name)
    return [(tuple(names), p) for names, p in by_id.values()]


def _parameters_to_buffers(module: nn.Module) -> None:
    """Replaces every parameter of ``module`` (in place) by a buffer holding its value;
    a parameter shared by several submodules becomes one shared buffer."""
    tensors: dict[int, Tensor] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            tensor = tensors.setdefault(id(p), p.detach().clone())
            del sub._parameters[name]
            sub.register_buffer(name, tensor)

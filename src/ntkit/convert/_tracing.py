"""`from_torch`'s vocabulary: its error type, the torch functions it knows, the
`torch.fx` tracer it uses and the descriptions of traced nodes in its messages."""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..layers import Layer
from ..layers.elementwise import NUMERICAL_MODULES
from ..layers.registry import torch_module_classes


class ConversionError(TypeError, ValueError):
    """A model (or a part of it) that `from_torch` cannot convert.

    Both a `TypeError` (an unsupported kind of module or function) and a
    `ValueError` (an unsupported argument or graph structure), so either can be
    caught.
    """


#: Elementwise activations without parameters, taken by quadrature (besides nn.GELU).
_NUMERICAL = NUMERICAL_MODULES
_SUPPORTED = (
    "nn.Sequential, nn.Linear, nn.Conv1d/2d/3d (groups=1), nn.AvgPool1d/2d/3d "
    "(ceil_mode=False), nn.AdaptiveAvgPool1d/2d/3d(1), nn.ReLU, nn.LeakyReLU, nn.GELU, "
    "parameter-free elementwise activations ("
    + ", ".join(f"nn.{m.__name__}" for m in _NUMERICAL if m is not nn.GELU)
    + "), nn.LayerNorm, nn.Dropout, nn.Identity, nn.Flatten, nn.Embedding (+ a positional "
    "table), nn.MultiheadAttention (self-attention), nn.TransformerEncoderLayer, "
    "nn.TransformerEncoder; "
    "in forward: x + y and torch.add (a residual sum), torch.cat(..., dim=1), the "
    "functional forms of these activations (F.relu, torch.tanh, x.relu(), ...), "
    "torch.flatten(x, 1), x.view(x.size(0), -1), x.mean over the spatial axes, "
    "F.adaptive_avg_pool2d(x, 1), F.avg_pool2d, F.dropout"
)
_EMPIRICAL = (
    "For a model with it, use the empirical NTK of the finite model instead, "
    "nk.empirical_ntk(model.eval(), x1, x2): J(x1) J(x2)^T over its parameters"
)
_NO_KERNEL = {
    "BatchNorm": (
        "mixes the examples of a batch (in training mode each output depends on the batch's "
        "statistics; in eval mode on running statistics and a learnable per-channel scale "
        "and shift), so it has no per-pair infinite-width kernel rule"
    ),
    "MaxPool": (
        "has no closed-form infinite-width kernel: the maximum of Gaussian pre-activations "
        "has no closed-form Gaussian expectation. nn.AvgPool (nk.AvgPool) has one"
    ),
    "PReLU": "has a learnable slope, which the kernel does not model",
    "GRU": (
        "has no layer-wise kernel rule: its gates multiply Gaussian processes, so ntkit offers "
        "its NNGP only by Monte Carlo, nk.GRU(hidden, ...).nngp(x1, x2), and no NTK. For the "
        "model's NTK use nk.empirical_ntk(model.eval(), x1, x2)"
    ),
    "LSTM": (
        "has no layer-wise kernel rule: its gates multiply Gaussian processes, so ntkit offers "
        "its NNGP only by Monte Carlo, nk.LSTM(hidden, ...).nngp(x1, x2), and no NTK. For the "
        "model's NTK use nk.empirical_ntk(model.eval(), x1, x2)"
    ),
}
_NO_KERNEL_FUNCTIONS = {
    "batch_norm": _NO_KERNEL["BatchNorm"],
    "max_pool": _NO_KERNEL["MaxPool"],
}


@dataclass(frozen=True)
class _Options:
    parameterization: str
    w_std: float | None
    b_std: float | None
    degree: int | str
    n_samples: int = 256
    seed: int = 0


# ------------------------------------------------------------------------ tracing
class _Proxy(fx.Proxy):
    """Records ``a += b`` as ``operator.iadd`` (plain fx records ``a + b``), so that
    changes in place are seen."""

    def _inplace(self, target, other):
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    def __iadd__(self, other):
        return self._inplace(operator.iadd, other)

    def __isub__(self, other):
        return self._inplace(operator.isub, other)

    def __imul__(self, other):
        return self._inplace(operator.imul, other)

    def __itruediv__(self, other):
        return self._inplace(operator.itruediv, other)


#: torch.nn classes that hold other modules: their subclasses are traced through.
_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def torch_base(cls: type) -> type | None:
    """The nearest base of a user-defined module class that is a torch.nn layer (or a
    registered module class), e.g. ``nn.GroupNorm`` for ``class MyGN(nn.GroupNorm)``;
    None for torch's own classes and for plain ``nn.Module``/container subclasses."""
    if cls in torch_module_classes() or cls.__module__.startswith("torch."):
        return None
    for base in cls.__mro__[1:]:
        if base in _CONTAINERS:
            return None
        if base in torch_module_classes() or base.__module__.startswith("torch.nn.modules"):
            return base
    return None


class _Tracer(fx.Tracer):
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A module class that a layer declares (`ntkit.layers.registry`) is one node,
        # like torch.nn's own, even when it is defined outside torch; so is a user
        # subclass of a torch layer that inherits forward (class MyGN(nn.GroupNorm)): it
        # converts as its base or is refused by its base's name. One that overrides
        # forward is traced through (it is converted only if its forward is made of
        # supported operations; using the base's parameters is refused by name).
        base = torch_base(type(m))
        return (type(m) in torch_module_classes()
                or (base is not None and type(m).forward is base.forward)
                or super().is_leaf_module(m, module_qualified_name))

    def trace(self, root, concrete_args=None):
        """`fx.Tracer.trace`, refusing a custom `torch.autograd.Function` on a traced
        tensor: fx would record only its forward (a straight-through estimator would
        convert as the plain function it wraps), but its backward is what training
        sees, and the kernel has no rule for a custom backward."""
        function = torch.autograd.Function
        original = function.__dict__["apply"]

        def apply(cls, *args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
                raise ConversionError(
                    f"{cls.__module__}.{cls.__qualname__} is a custom torch.autograd."
                    f"Function (applied in forward); from_torch converts torch functions "
                    f"and modules only, since a custom backward (e.g. a straight-through "
                    f"estimator) is not the derivative of its forward and has no kernel "
                    f"rule. Replace it by the torch function it computes, or use the "
                    f"empirical NTK of the finite model, nk.empirical_ntk(model, x1, x2).")
            return original.__func__(cls, *args, **kwargs)

        function.apply = classmethod(apply)
        try:
            return super().trace(root, concrete_args)
        finally:
            function.apply = original


def _is_leaf(module: nn.Module) -> bool:
    return _Tracer().is_leaf_module(module, "")


_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.dirname(os.path.abspath(__file__))  # frames of from_torch itself are skipped
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)')


def _location(node: fx.Node) -> str:
    """`` at file.py:42 (`out = out * 2`)`` from the node's stack trace, if it is user code."""
    trace = getattr(node, "stack_trace", None) or ""
    for match in _FRAME.finditer(trace):
        path, line, code = match.groups()
        if path.startswith(_TORCH_DIR) or os.path.dirname(os.path.abspath(path)) == _HERE:
            continue
        code = code.strip()
        return f" at {os.path.basename(path)}:{line}" + (f" (`{code}`)" if code else "")
    return ""


_SYMBOLS = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.matmul: "@",
    operator.iadd: "+=", operator.isub: "-=", operator.imul: "*=", operator.itruediv: "/=",
}


def _fn_name(target) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", repr(target))
    mod = getattr(target, "__module__", None) or ""
    if mod == "torch.nn.functional" or mod.startswith("torch._C._nn"):
        return f"F.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{mod}.{name}" if mod else name


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return str(a.target) if a.op == "call_module" else a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(b) for b in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    text = repr(a)
    return text if len(text) <= 40 else text[:37] + "..."


def _code(node: fx.Node) -> str:
    """The node as code, e.g. ``relu_1 + x`` or ``torch.cat([a, b], dim=1)``."""
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    if node.op == "call_function" and node.target in _SYMBOLS and len(node.args) == 2:
        return f"{args[0]} {_SYMBOLS[node.target]} {args[1]}"
    if node.op == "call_method":
        return f"{args[0]}.{node.target}({', '.join(args[1:])})"
    return f"{_fn_name(node.target)}({', '.join(args)})"


# ------------------------------------------------------------- the graph's nodes
@dataclass
class _Op:
    """What one traced node does: a layer on one tensor, or a merge of several."""

    kind: Literal["layer", "sum", "concat"]
    inputs: list
    layer: Layer | None = None


@dataclass
class _Slot:
    """An input of a node: the tensor it comes from and the layers applied on the way."""

    src: fx.Node
    chain: list = field(default_factory=list)


#: Functional activations: the module each is and its arguments after the input.
_ACTIVATION_FUNCTIONS: dict = {}


def _register_activations() -> None:
    table = [
        (("relu",), nn.ReLU, ("inplace",)), (("relu_",), nn.ReLU, ()),
        (("leaky_relu",), nn.LeakyReLU, ("negative_slope", "inplace")),
        (("leaky_relu_",), nn.LeakyReLU, ("negative_slope",)),
        (("gelu",), nn.GELU, ("approximate",)),
        (("silu",), nn.SiLU, ("inplace",)), (("mish",), nn.Mish, ("inplace",)),
        (("elu",), nn.ELU, ("alpha", "inplace")), (("elu_",), nn.ELU, ("alpha",)),
        (("celu",), nn.CELU, ("alpha", "inplace")), (("celu_",), nn.CELU, ("alpha",)),
        (("selu",), nn.SELU, ("inplace",)), (("selu_",), nn.SELU, ()),
        (("softplus",), nn.Softplus, ("beta", "threshold")),
        (("hardtanh",), nn.Hardtanh, ("min_val", "max_val", "inplace")),
        (("hardtanh_",), nn.Hardtanh, ("min_val", "max_val")),
        (("relu6",), nn.ReLU6, ("inplace",)),
        (("hardswish",), nn.Hardswish, ("inplace",)),
        (("hardsigmoid",), nn.Hardsigmoid, ("inplace",)),
        (("softsign",), nn.Softsign, ()), (("tanhshrink",), nn.Tanhshrink, ()),
        (("logsigmoid", "log_sigmoid"), nn.LogSigmoid, ()),
        (("softshrink",), nn.Softshrink, ("lambd",)),
        (("hardshrink",), nn.Hardshrink, ("lambd",)),
        (("tanh", "tanh_"), nn.Tanh, ()), (("sigmoid", "sigmoid_"), nn.Sigmoid, ()),
    ]
    for names, cls, params in table:
        for name in names:
            for owner in (F, torch, torch.special):
                fn = getattr(owner, name, None)
                if callable(fn) and fn not in _ACTIVATION_FUNCTIONS:
                    _ACTIVATION_FUNCTIONS[fn] = (cls, params)
    expit = getattr(torch.special, "expit", None)
    if expit is not None:
        _ACTIVATION_FUNCTIONS[expit] = (nn.Sigmoid, ())


_register_activations()
#: Tensor methods that are activations (no arguments).
_ACTIVATION_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU, "tanh": nn.Tanh, "tanh_": nn.Tanh,
                       "sigmoid": nn.Sigmoid, "sigmoid_": nn.Sigmoid}

_SUM_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add,
                  torch.sub, torch.subtract}
_SUM_METHODS = {"add", "add_", "sub", "sub_", "subtract", "subtract_"}
_ARITHMETIC_FUNCTIONS = {
    operator.mul, operator.imul, operator.truediv, operator.itruediv, operator.floordiv,
    operator.mod, operator.pow, operator.matmul, torch.mul, torch.multiply, torch.div,
    torch.divide, torch.true_divide, torch.pow, torch.matmul,
}
_ARITHMETIC_METHODS = {"mul", "mul_", "div", "div_", "pow", "pow_", "matmul", "__rtruediv__"}
_CAT_FUNCTIONS = {torch.cat, getattr(torch, "concat", torch.cat),
                  getattr(torch, "concatenate", torch.cat)}
_ALIAS_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "view_as",
                  "reshape_as", "expand", "expand_as", "transpose", "permute", "t", "narrow",
                  "select", "detach", "unflatten", "movedim", "swapaxes", "__getitem__"}
_ALIAS_FUNCTIONS = {torch.flatten, torch.reshape, operator.getitem, torch.squeeze,
                    torch.unsqueeze, torch.transpose, torch.permute, torch.narrow, torch.select,
                    torch.movedim, torch.detach, F.dropout}
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_META_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}

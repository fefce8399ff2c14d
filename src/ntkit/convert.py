"""`from_torch`: the infinite-width twin of an existing PyTorch model.

The model is traced with `torch.fx`; each node becomes an ntkit layer, and the
graph of tensors is rebuilt as nested containers: a tensor used by ``k`` later
operations becomes ``FanOut(k)`` followed by ``Parallel`` of the branches,
which rejoin at the add (``FanInSum``) or ``torch.cat`` (``FanInConcat``) that
merges them. This works for every series-parallel graph (chains, residual
blocks, nested blocks, Inception-style concatenations); others are refused.
"""

from __future__ import annotations

import copy
import math
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn
from torch.nn import functional as F

from .layers import (
    GELU, AvgPool1d, AvgPool2d, AvgPool3d, Conv1d, Conv2d, Conv3d, Dropout, Elementwise,
    FanInConcat, FanInSum, FanOut, Flatten, GlobalAvgPool, Identity, Layer, LayerNorm, LeakyReLU,
    Linear, Parallel, ReLU, Sequential, SumPool1d, SumPool2d, SumPool3d,
)

__all__ = ["ConversionError", "from_torch"]


class ConversionError(TypeError, ValueError):
    """A model (or a part of it) that `from_torch` cannot convert.

    Both a `TypeError` (an unsupported kind of module or function) and a
    `ValueError` (an unsupported argument or graph structure), so either can be
    caught.
    """


#: Elementwise activations without parameters, taken by quadrature.
_NUMERICAL = (
    nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Hardtanh,
    nn.ReLU6, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardswish, nn.Hardsigmoid,
    nn.Softshrink, nn.Hardshrink, nn.GELU,
)
_SUPPORTED = (
    "nn.Sequential, nn.Linear, nn.Conv1d/2d/3d (groups=1), nn.AvgPool1d/2d/3d "
    "(ceil_mode=False), nn.AdaptiveAvgPool1d/2d/3d(1), nn.ReLU, nn.LeakyReLU, nn.GELU, "
    "parameter-free elementwise activations ("
    + ", ".join(f"nn.{m.__name__}" for m in _NUMERICAL if m is not nn.GELU)
    + "), nn.LayerNorm (elementwise_affine=False), nn.Dropout, nn.Identity, nn.Flatten; "
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
}
_NO_KERNEL_FUNCTIONS = {
    "batch_norm": _NO_KERNEL["BatchNorm"],
    "max_pool": _NO_KERNEL["MaxPool"],
}


def from_torch(
    module: nn.Module,
    *,
    parameterization: Literal["ntk", "standard"] = "standard",
    w_std: float | None = None,
    b_std: float | None = None,
    degree: int = 64,
) -> Sequential:
    """The infinite-width twin of a PyTorch model.

    Each ``nn.Linear`` becomes a `Linear` of the same widths, each
    ``nn.Conv1d/2d/3d`` a `Conv1d`/`Conv2d`/`Conv3d` with its kernel size,
    stride, padding (ints, ``"same"`` or ``"valid"``; zeros, circular, reflect
    or replicate), dilation and ``in_channels``. By default weights and biases
    have the variances of PyTorch's default initialisation of these modules
    (uniform on ``+-1/sqrt(fan_in)``, variance ``1 / (3 fan_in)``, with
    ``fan_in = in_features`` or ``in_channels * prod(kernel_size)``), that is
    ``w_std = 1/sqrt(3)`` and ``b_std = 1/sqrt(3 fan_in)``, in standard
    parameterization: the kernel of the model as PyTorch initialises and
    trains it. Activations with a closed form use it; other parameter-free
    elementwise ones (tanh, SiLU, ...) use the quadrature path, `Elementwise`.
    ``nn.AvgPool*`` become `AvgPool1d`/`2d`/`3d`, ``nn.AdaptiveAvgPool*(1)``
    and means over the spatial axes `GlobalAvgPool` (which drops the size-1
    spatial axes that torch keeps; a following flatten is then a no-op).

    Models other than ``nn.Sequential`` are traced with `torch.fx`, so their
    ``forward`` must be symbolically traceable (no control flow on tensor
    values). A tensor used several times branches (`FanOut`, `Parallel`) and
    the branches must rejoin at one ``+`` (`FanInSum`) or ``torch.cat(...,
    dim=1)`` (`FanInConcat`), possibly nested: residual blocks with an identity
    or a projection shortcut, ResNet-style networks (without BatchNorm),
    Inception-style concatenations. In a sum, all branches but one must end in
    a layer with its own zero-mean weights (Linear or Conv, possibly followed
    by pooling, flattening, dropout or LayerNorm): then the branches are
    uncorrelated and the kernel of the sum is the sum of their kernels.

    The kernel itself exists where every activation receives Gaussian
    pre-activations (see `ReLU`): a sum is Gaussian when all its branches are,
    e.g. an identity shortcut of a Conv's output, a 1x1 projection shortcut,
    or pre-activation blocks (ReLU before each Conv, as WideResNet). A
    torchvision-style ResNet whose identity blocks add a ReLU's output before
    the next ReLU converts, and its finite twin builds, but ``kernel`` refuses
    it: that sum has no closed-form kernel (nor in neural-tangents).

    Args:
        module: the model: an ``nn.Sequential`` (nested ones are flattened) or
            an ``nn.Module`` whose ``forward`` combines supported modules and
            functions, on one input.
        parameterization: ``"standard"`` (PyTorch's) or ``"ntk"``.
        w_std: weight standard deviation times ``sqrt(fan_in)`` for every
            Linear and Conv, instead of PyTorch's default.
        b_std: bias standard deviation for every Linear and Conv with a bias,
            instead of PyTorch's default.
        degree: quadrature nodes per axis for activations without closed form.

    Raises:
        ConversionError: (a `TypeError` and a `ValueError`) for a model that
            cannot be traced, or contains a module or function with no kernel
            rule (BatchNorm, max pooling, grouped convolutions, scalar
            arithmetic such as ``x * 2``, ...), shares parameters between
            layers, changes tensors in place ambiguously, or whose graph is not
            series-parallel; the message names the module or operation (and its
            line in ``forward``) and what is supported.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch takes a torch.nn.Module, got {type(module).__name__}.")
    options = _Options(parameterization, w_std, b_std, degree)
    return _Converter(module, options).run()


@dataclass(frozen=True)
class _Options:
    parameterization: str
    w_std: float | None
    b_std: float | None
    degree: int


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


class _Tracer(fx.Tracer):
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


def _is_leaf(module: nn.Module) -> bool:
    return fx.Tracer().is_leaf_module(module, "")


_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)')


def _location(node: fx.Node) -> str:
    """`` at file.py:42 (`out = out * 2`)`` from the node's stack trace, if it is user code."""
    trace = getattr(node, "stack_trace", None) or ""
    for match in _FRAME.finditer(trace):
        path, line, code = match.groups()
        if path.startswith(_TORCH_DIR) or os.path.abspath(__file__) == os.path.abspath(path):
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


class _Converter:
    def __init__(self, root: nn.Module, options: _Options) -> None:
        self.root, self.options = root, options
        self.modules = dict(root.named_modules())
        self.meta: dict[fx.Node, str] = {}
        self.ops: dict[fx.Node, _Op] = {}

    # ------------------------------------------------------------------- driver
    def run(self) -> Sequential:
        root = self.root
        if isinstance(root, (nn.ModuleList, nn.ModuleDict)) or (
                type(root).forward is nn.Module.forward):
            raise ConversionError(
                f"from_torch converts a model, got {type(root).__name__}, which has no "
                f"forward; write the model as an nn.Sequential of supported modules "
                f"({_SUPPORTED}), or as an nn.Module whose forward combines them."
            )
        if _is_leaf(root):
            raise ConversionError(
                f"from_torch converts a model, got {type(root).__name__}, a single torch.nn "
                f"layer; wrap it as nn.Sequential({type(root).__name__}(...)), or write the "
                f"model as an nn.Sequential of supported modules ({_SUPPORTED})."
            )
        graph = self._trace()
        nodes = list(graph.nodes)
        output = next(n for n in nodes if n.op == "output")
        live = {output}
        for n in reversed(nodes):
            if n in live:
                live.update(n.all_input_nodes)
        inputs = [n for n in nodes if n.op == "placeholder" and n in live]
        if len(inputs) != 1:
            what = "does not depend on its input" if not inputs else (
                f"takes {len(inputs)} inputs ({', '.join(n.name for n in inputs)})")
            raise ConversionError(
                f"{type(root).__name__}.forward {what}; from_torch converts models of one "
                f"input tensor x of shape (N, features) or (N, C, *spatial)."
            )
        (source,) = inputs
        result = output.args[0]
        if not isinstance(result, fx.Node) or result.op == "get_attr" or self._is_meta(result):
            raise ConversionError(
                f"{type(root).__name__}.forward returns {_arg(result)}; from_torch converts "
                f"models that return one tensor computed from their input."
            )
        order = [n for n in nodes if n in live and n.op not in ("placeholder", "output")]
        for n in order:
            if self._is_meta(n) or n.op == "get_attr":
                continue
            self.ops[n] = self._op(n)
        self._check_in_place(nodes)
        self._check_shared_parameters(order)
        return self._assemble(source, output, [n for n in order if n in self.ops])

    def _trace(self) -> fx.Graph:
        tracer = _Tracer()
        tracer.record_stack_traces = True
        try:
            return tracer.trace(self.root)
        except Exception as e:
            raise ConversionError(
                f"from_torch traces {type(self.root).__name__}.forward with torch.fx, which "
                f"failed: {type(e).__name__}: {e}. forward must be symbolically traceable: no "
                f"Python control flow on tensor values or shapes (if, assert, loops over "
                f"x.size()). Supported: {_SUPPORTED}."
            ) from e

    # -------------------------------------------------------- describing nodes
    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module {node.target} ({self.modules[node.target]!r}){_location(node)}"
        return f"`{_code(node)}` (node {node.name}){_location(node)}"

    def _fail(self, node: fx.Node, why: str, supported: bool = True) -> ConversionError:
        tail = f" Supported: {_SUPPORTED}." if supported else ""
        return ConversionError(f"{self._where(node)}: {why}.{tail}")

    # --------------------------------------------------------- shape queries
    def _is_meta(self, node) -> bool:
        """Whether the node computes sizes (``x.size(0)``, ``x.shape[0]``), not tensors."""
        if not isinstance(node, fx.Node):
            return False
        if node in self.meta:
            return True
        kind = None
        if node.op == "call_method" and node.target in _META_METHODS:
            kind = "batch" if node.target == "size" and self._size_index(node) == 0 else (
                "sizes" if node.target == "size" and self._size_index(node) is None else "other")
        elif (node.op == "call_function" and node.target is getattr and len(node.args) == 2
              and node.args[1] in _META_ATTRIBUTES):
            kind = "sizes" if node.args[1] == "shape" else "other"
        elif node.op == "call_function" and node.all_input_nodes and all(
                self._is_meta(n) for n in node.all_input_nodes):
            src = node.args[0] if node.args else None
            if (node.target is operator.getitem and self.meta.get(src) == "sizes"
                    and node.args[1] == 0):
                kind = "batch"
            else:
                kind = "other"
        if kind is not None:
            self.meta[node] = kind
        return kind is not None

    @staticmethod
    def _size_index(node: fx.Node):
        if len(node.args) > 1:
            return node.args[1]
        return node.kwargs.get("dim")

    # -------------------------------------------------------- node -> layer
    def _op(self, node: fx.Node) -> _Op:
        if node.op in ("call_function", "call_method"):
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
            key = next((k for k in _NO_KERNEL_FUNCTIONS if k in name), None)
            if key is not None:
                raise self._fail(node, f"{_fn_name(node.target)} {_NO_KERNEL_FUNCTIONS[key]}. "
                                       f"{_EMPIRICAL}")
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                raise self._fail(node, (
                    f"it uses the parameter or buffer '{a.target}' directly. from_torch takes "
                    f"parameters only from modules whose initialisation it knows (nn.Linear, "
                    f"nn.Conv1d/2d/3d); write this as such a module"))
        if node.op == "call_module":
            return self._module_op(node)
        if node.op in ("call_function", "call_method"):
            return self._function_op(node)
        raise self._fail(node, f"{node.op} nodes have no kernel rule")

    def _module_op(self, node: fx.Node) -> _Op:
        m = self.modules[node.target]
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            raise self._fail(node, "it is called with more than one argument; from_torch "
                                   "converts modules applied to one tensor")
        return _Op("layer", [node.args[0]], self._module_layer(m, node))

    def _module_layer(self, m: nn.Module, node: fx.Node) -> Layer:
        o = self.options
        w_std = o.w_std if o.w_std is not None else 1 / math.sqrt(3)

        def bias(present: bool, fan_in: int):
            if not present:
                return None
            return o.b_std if o.b_std is not None else 1 / math.sqrt(3 * fan_in)

        def uninitialised():
            return self._fail(node, (
                "it has not been initialised, so its in_features/in_channels is unknown; "
                "run one forward pass on example inputs before from_torch"), supported=False)

        if isinstance(m, nn.Linear):
            if getattr(m, "has_uninitialized_params", lambda: False)():
                raise uninitialised()
            fan_in = m.in_features
            return Linear(m.out_features, w_std=w_std, b_std=bias(m.bias is not None, fan_in),
                          parameterization=o.parameterization, in_features=fan_in)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if getattr(m, "has_uninitialized_params", lambda: False)():
                raise uninitialised()
            if m.groups != 1:
                raise self._fail(node, (
                    f"a grouped convolution (groups={m.groups}) connects each output channel "
                    f"to in_channels/groups inputs; ntkit's Conv has no grouped or depthwise "
                    f"rule. Use groups=1"))
            fan_in = m.in_channels * math.prod(m.kernel_size)
            cls = (Conv1d, Conv2d, Conv3d)[len(m.kernel_size) - 1]
            padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
            return cls(m.out_channels, tuple(m.kernel_size), tuple(m.stride), padding,
                       tuple(m.dilation), w_std, bias(m.bias is not None, fan_in),
                       padding_mode=m.padding_mode, parameterization=o.parameterization,
                       in_channels=m.in_channels)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            if m.ceil_mode:
                raise self._fail(node, (
                    "ceil_mode=True keeps partial windows at the edge, which nk.AvgPool does "
                    "not model; use ceil_mode=False (with padding if needed)"))
            if getattr(m, "divisor_override", None):
                raise self._fail(node, (
                    f"divisor_override={m.divisor_override} divides by a constant other than "
                    f"the window; drop it (or use nk.SumPool and scale the weights)"))
            cls = {nn.AvgPool1d: AvgPool1d, nn.AvgPool2d: AvgPool2d,
                   nn.AvgPool3d: AvgPool3d}[next(c for c in (nn.AvgPool1d, nn.AvgPool2d,
                                                             nn.AvgPool3d) if isinstance(m, c))]
            stride = m.stride if m.stride not in (None, (), []) else None
            return cls(m.kernel_size, stride, m.padding, count_include_pad=m.count_include_pad)
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            ndim = next(i + 1 for i, c in enumerate(
                (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d))
                if isinstance(m, c))
            return self._global_pool(m.output_size, node, ndim=ndim)
        if type(m) is nn.ReLU:
            return ReLU()
        if type(m) is nn.LeakyReLU:
            return LeakyReLU(m.negative_slope)
        if type(m) is nn.GELU and m.approximate == "none":
            return GELU()
        if type(m) in _NUMERICAL:
            if getattr(m, "inplace", False):  # quadrature must not overwrite its nodes
                m = copy.copy(m)
                m.inplace = False
            return Elementwise(m, degree=o.degree, name=repr(m))
        if isinstance(m, nn.Identity):
            return Identity()
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise self._fail(node, "only nn.Flatten(start_dim=1, end_dim=-1) is supported",
                                 supported=False)
            return Flatten()
        if isinstance(m, nn.Dropout):
            return Dropout(m.p, mode="train" if m.training else "eval")
        if isinstance(m, nn.LayerNorm):
            if m.elementwise_affine:
                raise self._fail(node, (
                    "it has a learnable per-feature scale and shift; their NTK through a "
                    "following nonlinearity has no layer-wise rule. Use nn.LayerNorm(..., "
                    "elementwise_affine=False), whose twin is nk.LayerNorm"), supported=False)
            return _TorchLayerNorm(tuple(m.normalized_shape), m.eps, self._where(node))
        name = type(m).__name__
        reason = next((r for key, r in _NO_KERNEL.items() if key in name), None)
        why = f"{name} {reason}" if reason else f"{name} has no infinite-width kernel rule in ntkit"
        if key_hint := next((k for k in ("BatchNorm", "MaxPool") if k in name), None):
            why += f". {_EMPIRICAL}" + (
                " (or replace it with nn.AvgPool)" if key_hint == "MaxPool" else
                " (or remove it, or use nn.LayerNorm(elementwise_affine=False))")
        raise self._fail(node, why)

    def _global_pool(self, output_size, node: fx.Node, ndim: int | None = None) -> Layer:
        sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size,)
        if ndim is not None and len(sizes) == 1:
            sizes = tuple(sizes) * ndim
        if not sizes or any(s != 1 for s in sizes):
            raise self._fail(node, (
                f"adaptive average pooling to output size {output_size!r}: only output size 1 "
                f"(global average pooling, nk.GlobalAvgPool) is converted; for other sizes use "
                f"nn.AvgPool with an explicit kernel_size and stride"), supported=False)
        return _GlobalAvgPool(self._where(node), ndim=ndim)

    def _function_op(self, node: fx.Node) -> _Op:
        target, method = node.target, node.op == "call_method"
        name = target if method else getattr(target, "__name__", "")
        args, kwargs = node.args, node.kwargs
        first = args[0] if args else kwargs.get("input")
        # sums: residual connections
        if (target in _SUM_METHODS) if method else (target in _SUM_FUNCTIONS):
            other = args[1] if len(args) > 1 else kwargs.get("other")
            pair = [first, other]
            if not all(isinstance(a, fx.Node) and not self._is_meta(a) for a in pair):
                raise self._scalar(node)
            alpha = args[2] if len(args) > 2 else kwargs.get("alpha", 1)
            if alpha != 1:
                raise self._fail(node, (
                    f"alpha={alpha!r} scales a branch by a constant, which ntkit has no rule "
                    f"for; add the branches with alpha=1"), supported=False)
            return _Op("sum", pair)
        if (target in _ARITHMETIC_METHODS) if method else (target in _ARITHMETIC_FUNCTIONS):
            if any(not isinstance(a, fx.Node) or self._is_meta(a)
                   for a in list(args) + list(kwargs.values())):
                raise self._scalar(node)
            raise self._fail(node, (
                f"{_fn_name(target)} of tensors has no kernel rule in from_torch (the sum of "
                f"branches, x + y, has one; for products of independent branches build the "
                f"network with nk.FanInProd)"))
        if not method and target in _CAT_FUNCTIONS:
            tensors = first if first is not None else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            if dim != 1:
                raise self._fail(node, (
                    f"concatenation along dim={dim!r}; from_torch converts torch.cat(..., "
                    f"dim=1), along the channel (feature) axis, into nk.FanInConcat"),
                    supported=False)
            if (not isinstance(tensors, (list, tuple)) or not tensors
                    or not all(isinstance(t, fx.Node) and not self._is_meta(t) for t in tensors)):
                raise self._fail(node, "torch.cat of a list of tensors computed from the input "
                                       "is converted, not of constants", supported=False)
            if len(tensors) == 1:
                return _Op("layer", [tensors[0]], Identity())
            return _Op("concat", list(tensors))
        if not isinstance(first, fx.Node) or self._is_meta(first):
            raise self._fail(node, "its first argument is not a tensor computed from the input")
        layer = self._unary(node, target, method, name, args[1:], dict(kwargs))
        return _Op("layer", [first], layer)

    def _scalar(self, node: fx.Node) -> ConversionError:
        return self._fail(node, (
            "arithmetic with a constant or a size (x * 2, x + 1, x / n) has no infinite-width "
            "kernel rule in ntkit: scaling or shifting a hidden layer changes what the next "
            "layer receives in ways the layer rules do not model. Remove it, or fold a scale "
            "into the weights' standard deviations of a hand-built ntkit network (w_std, "
            "b_std). Sums of two tensors (x + f(x)) are supported"), supported=False)

    def _unary(self, node, target, method, name, rest, kwargs) -> Layer:
        kwargs.pop("input", None)
        if method and target in _ACTIVATION_METHODS and not rest and not kwargs:
            return self._module_layer(_ACTIVATION_METHODS[target](), node)
        if not method and target in _ACTIVATION_FUNCTIONS:
            return self._module_layer(self._activation_module(node, rest, kwargs), node)
        if (method and target == "flatten") or (not method and target is torch.flatten):
            start = rest[0] if rest else kwargs.get("start_dim", 0)
            end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
            if (start, end) != (1, -1):
                raise self._fail(node, (
                    f"flatten(start_dim={start!r}, end_dim={end!r}); only flatten(x, 1) (all "
                    f"axes but the batch) is supported"), supported=False)
            return Flatten()
        if (method and target in ("view", "reshape")) or (not method and target is torch.reshape):
            shape = list(rest) if not (len(rest) == 1 and isinstance(rest[0], (tuple, list))) \
                else list(rest[0])
            if not shape and "shape" in kwargs:
                shape = list(kwargs["shape"])
            if (len(shape) == 2 and self._is_meta(shape[0])
                    and self.meta[shape[0]] == "batch" and shape[1] == -1):
                return Flatten()
            raise self._fail(node, (
                "only reshapes that flatten all axes but the batch, x.view(x.size(0), -1), are "
                "supported; write torch.flatten(x, 1)"), supported=False)
        if method and target in ("contiguous", "clone") and not rest:
            return Identity()
        if (method and target == "mean") or (not method and target is torch.mean):
            dims = rest[0] if rest else kwargs.get("dim")
            if isinstance(dims, int) and not isinstance(dims, bool):
                dims = (dims,)
            if (not isinstance(dims, (tuple, list)) or not dims
                    or not all(isinstance(d, int) for d in dims) or any(d in (0, 1) for d in dims)):
                raise self._fail(node, (
                    f"a mean over dim={dims!r}; only the mean over all spatial axes "
                    f"(x.mean((2, 3)) for (N, C, H, W)), global average pooling, is supported"),
                    supported=False)
            return _GlobalAvgPool(self._where(node), dims=tuple(dims))
        if not method and name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d",
                                   "adaptive_avg_pool3d"):
            size = rest[0] if rest else kwargs.get("output_size")
            return self._global_pool(size, node, ndim=int(name[-2]))
        if not method and name in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
            n = int(name[-2])
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"] + (
                ["divisor_override"] if n > 1 else [])
            params = self._bind(node, names, rest, kwargs)
            module = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[n - 1](**params)
            return self._module_layer(module, node)
        if not method and target in (F.dropout, torch.dropout):
            keys = ["p", "training", "inplace"] if target is F.dropout else ["p", "train"]
            params = self._bind(node, keys, rest, kwargs)
            training = params.get("training", params.get("train", True))
            return Dropout(params.get("p", 0.5), mode="train" if training else "eval")
        what = f"the method .{target}()" if method else _fn_name(target)
        raise self._fail(node, f"{what} has no infinite-width kernel rule in from_torch")

    def _bind(self, node, names, rest, kwargs) -> dict:
        if len(rest) > len(names) or any(k not in names for k in kwargs):
            raise self._fail(node, f"unexpected arguments; expected {', '.join(names)}")
        params = dict(zip(names, rest))
        params.update(kwargs)
        for k, v in params.items():
            if isinstance(v, fx.Node):
                raise self._fail(node, f"argument {k} is computed in forward; it must be a "
                                       f"constant")
        return params

    def _activation_module(self, node, rest, kwargs) -> nn.Module:
        cls, names = _ACTIVATION_FUNCTIONS[node.target]
        params = self._bind(node, names, rest, kwargs)
        params.pop("inplace", None)
        return cls(**params)

    # ------------------------------------------------------------ global checks
    def _mutated(self, node: fx.Node):
        """The tensor ``node`` changes in place, or None."""
        first = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(first, fx.Node):
            return None
        if node.op == "call_module":
            return first if getattr(self.modules.get(node.target), "inplace", False) else None
        if node.op == "call_method":
            name = node.target
            return first if name.endswith("_") and not name.startswith("__") else None
        if node.op != "call_function":
            return None
        target = node.target
        if target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return first
        if getattr(target, "__name__", "").endswith("_") or node.kwargs.get("inplace") is True:
            return first
        spec = _ACTIVATION_FUNCTIONS.get(target)
        if spec is not None and "inplace" in spec[1]:
            i = spec[1].index("inplace") + 1
            if len(node.args) > i and node.args[i] is True:
                return first
        if target is F.dropout and len(node.args) > 3 and node.args[3] is True:
            return first
        return None

    def _may_alias(self, node: fx.Node) -> bool:
        """Whether ``node``'s result may share memory with its (first) input."""
        if self._mutated(node) is not None:
            return True
        if node.op == "call_module":
            return isinstance(self.modules.get(node.target),
                              (nn.Identity, nn.Flatten, nn.Dropout))
        if node.op == "call_method":
            return node.target in _ALIAS_METHODS
        return node.op == "call_function" and node.target in _ALIAS_FUNCTIONS

    def _check_in_place(self, nodes: list[fx.Node]) -> None:
        """Refuse changes in place to a tensor (or a view of it) that is used elsewhere: the
        traced graph does not say which uses see the value before the change."""
        users = {n: [u for u in n.users if not self._is_meta(u)] for n in nodes}
        for n in nodes:
            target = self._mutated(n)
            came, cur = n, target
            while cur is not None:
                others = [u for u in users[cur] if u is not came]
                if others:
                    names = ", ".join(f"`{_code(u)}`" if u.op != "output" else "the output"
                                      for u in others)
                    seen = "" if cur is target else f" (through its view {came.name})"
                    raise self._fail(n, (
                        f"it changes {cur.name} in place{seen}, but {cur.name} is also used by "
                        f"{names}; the traced graph does not say whether that use sees the "
                        f"value before or after the change. Write it out of place (x = "
                        f"relu(x), inplace=False, out = out + identity)"), supported=False)
                if cur.op == "placeholder" or not self._may_alias(cur) or not cur.args:
                    break
                nxt = cur.args[0]
                if not isinstance(nxt, fx.Node) or self._is_meta(nxt):
                    break
                came, cur = cur, nxt

    def _check_shared_parameters(self, order: list[fx.Node]) -> None:
        owner: dict[int, tuple[fx.Node, str]] = {}
        for n in order:
            if n.op != "call_module":
                continue
            for pname, p in self.modules[n.target].named_parameters():
                if id(p) in owner:
                    first, first_name = owner[id(p)]
                    same = first.target == n.target
                    what = (f"is called more than once (also as {first.name})" if same else
                            f"shares parameter {pname} with module {first.target} "
                            f"({first_name})")
                    raise self._fail(n, (
                        f"it {what}; the infinite-width kernel assumes every layer has its own "
                        f"independently initialised weights. Use a separate module for each "
                        f"use"), supported=False)
                owner[id(p)] = (n, pname)

    # ------------------------------------------------- series-parallel assembly
    def _assemble(self, source: fx.Node, output: fx.Node, order: list[fx.Node]) -> Sequential:
        ins: dict[fx.Node, list[_Slot]] = {}
        kind: dict[fx.Node, str] = {}
        for n in order:
            op = self.ops[n]
            if op.kind == "layer":
                ins[n], kind[n] = [_Slot(op.inputs[0], [op.layer])], "pass"
            else:
                ins[n], kind[n] = [_Slot(i) for i in op.inputs], op.kind
        ins[output], kind[output] = [_Slot(output.args[0])], "sink"
        outs: dict[fx.Node, list[_Slot]] = {n: [] for n in [source, *order]}
        for slots in ins.values():
            for s in slots:
                outs[s.src].append(s)
        remaining = list(order)
        changed = True
        while changed:
            changed = False
            for n in list(remaining):
                if kind[n] in ("sum", "concat") and len({id(s.src) for s in ins[n]}) == 1:
                    slots = ins[n]
                    src = slots[0].src
                    chains = [s.chain for s in slots]
                    if kind[n] == "sum":
                        self._check_uncorrelated(n, chains)
                    merge = FanInSum() if kind[n] == "sum" else FanInConcat()
                    new = _Slot(src, [FanOut(len(chains)),
                                      Parallel(*(_branch(c) for c in chains)), merge])
                    outs[src] = [s for s in outs[src] if all(s is not t for t in slots)] + [new]
                    ins[n], kind[n] = [new], "pass"
                    changed = True
                if kind[n] == "pass" and len(outs[n]) == 1:
                    (slot,), (mine,) = outs[n], ins[n]
                    slot.src, slot.chain = mine.src, mine.chain + slot.chain
                    outs[mine.src] = [s for s in outs[mine.src] if s is not mine] + [slot]
                    del ins[n], kind[n], outs[n]
                    remaining.remove(n)
                    changed = True
        if remaining:
            stuck = next((n for n in remaining if kind[n] in ("sum", "concat")), remaining[0])
            srcs = list(dict.fromkeys(s.src for s in ins[stuck]))
            elsewhere = [
                f"{s.name} is also used by "
                + ", ".join(t.name for t in s.users if t is not stuck and t.op != "output"
                            and not self._is_meta(t))
                for s in srcs if s is not source and len(outs.get(s, ())) > 1]
            detail = f" ({'; '.join(elsewhere)})" if elsewhere else ""
            raise self._fail(stuck, (
                f"the graph is not series-parallel: this merges tensors "
                f"({', '.join(s.name for s in srcs)}) that do not branch from one common "
                f"tensor within a nested block{detail}. from_torch converts models in which "
                f"every tensor used more than once has all its uses rejoin at one add or "
                f"torch.cat (blocks may nest), as in residual and Inception blocks"),
                supported=False)
        (final,) = ins[output]
        return Sequential(*final.chain)

    def _check_uncorrelated(self, node: fx.Node, chains: list[list[Layer]]) -> None:
        plain = [i for i, c in enumerate(chains) if not _fresh(c)]
        if len(plain) > 1:
            raise self._fail(node, (
                f"it adds branches of which {len(plain)} do not end in a layer with its own "
                f"zero-mean weights (nn.Linear or nn.Conv, possibly followed by pooling, "
                f"flattening, dropout or LayerNorm); such branches are correlated, so the kernel of their "
                f"sum is not the sum of their kernels (nk.FanInSum). from_torch converts sums "
                f"in which at most one branch, such as the identity shortcut of a residual "
                f"block, does not end in such a layer"), supported=False)


def _branch(chain: list[Layer]) -> Layer:
    if not chain:
        return Identity()
    return chain[0] if len(chain) == 1 else Sequential(*chain)


#: Layers that keep a branch an odd function of its last weights (so uncorrelated with the
#: other branches): linear parameter-free ones, and LayerNorm.
_PASS_ODD = (Identity, Flatten, AvgPool1d, AvgPool2d, AvgPool3d, SumPool1d, SumPool2d, SumPool3d,
             GlobalAvgPool, Dropout, LayerNorm)


def _fresh(chain) -> bool:
    """Whether a branch's output is an odd function of weights of its own with a symmetric
    distribution (it ends in a Linear or Conv, possibly followed by linear parameter-free
    layers or LayerNorm), so that it is uncorrelated with every other branch."""
    chain = list(chain)
    while chain:
        layer = chain.pop()
        if isinstance(layer, (Linear, Conv1d, Conv2d, Conv3d)):
            return True
        if isinstance(layer, (FanInSum, FanInConcat)) and chain and isinstance(
                chain[-1], Parallel):
            return all(_fresh(b.layers if isinstance(b, Sequential) else [b])
                       for b in chain[-1].layers)
        if isinstance(layer, Sequential):
            chain += list(layer.layers)
            continue
        if not isinstance(layer, _PASS_ODD):
            return False
    return False


# --------------------------------------------- layers that check torch's axes
class _ShapeChecked:
    """Mixin: runs ``self._check(shape)`` on the per-example shape before the layer's
    kernel rule and its finite twin."""

    def propagate(self, k):
        if not isinstance(k, tuple):
            self._check(k.shape)
        return super().propagate(k)

    def _build(self, shape, ctx):
        self._check(shape)
        return super()._build(shape, ctx)


class _GlobalAvgPool(_ShapeChecked, GlobalAvgPool):
    """`GlobalAvgPool` that checks it pools exactly the spatial axes the torch model did."""

    def __init__(self, where: str, *, ndim: int | None = None, dims: tuple | None = None):
        self.where, self.ndim, self.dims = where, ndim, dims

    def _check(self, shape) -> None:
        if not shape or isinstance(shape[0], tuple):
            return  # the parent's message
        rank = len(shape) + 1  # with the batch axis
        spatial = set(range(2, rank))
        if self.ndim is not None and len(shape) - 1 != self.ndim:
            raise ValueError(
                f"{self.where} pools {self.ndim} spatial axes, but receives per-example shape "
                f"{tuple(shape)} with {len(shape) - 1}."
            )
        if self.dims is not None:
            dims = {d % rank if -rank <= d < rank else None for d in self.dims}
            if dims != spatial or not spatial:
                raise ValueError(
                    f"{self.where} averages over dims {self.dims} of inputs with per-example "
                    f"shape {tuple(shape)}; only the mean over all spatial axes "
                    f"{tuple(sorted(spatial))} (global average pooling) has a twin."
                )

    def __repr__(self) -> str:
        return "GlobalAvgPool()"


class _TorchLayerNorm(_ShapeChecked, LayerNorm):
    """`LayerNorm` over the axes `torch.nn.LayerNorm` normalises: the features of dense
    inputs, or all of ``(C, *S)`` (``axis="all"``) when ``normalized_shape`` is all of them."""

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, where: str) -> None:
        super().__init__(axis="channels" if len(normalized_shape) == 1 else "all", eps=eps)
        self.normalized_shape, self.where = normalized_shape, where

    def _check(self, shape) -> None:
        if not shape or isinstance(shape[0], tuple):
            return
        if tuple(shape) != self.normalized_shape:
            raise ValueError(
                f"{self.where} normalises the last {len(self.normalized_shape)} axes, of shape "
                f"{self.normalized_shape}, but receives per-example shape {tuple(shape)}; only "
                f"normalising all of them (normalized_shape = x.shape[1:]) has a kernel rule."
            )


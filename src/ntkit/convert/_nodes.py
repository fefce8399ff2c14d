"""`from_torch`'s rules for single nodes of a traced graph: a module call, a
function or a tensor method becomes an ntkit layer, a sum or a concatenation.

Module rules come from the layer registry: each layer class names the torch
modules it converts from and holds the rule (``from_torch_module``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..layers import Dropout, Flatten, Identity, Layer
from ..layers.activations import Activation
from ..layers.pool import GlobalAvgPool, TorchGlobalAvgPool, torch_global_pool
from ..layers.registry import TorchContext, layer_classes, module_rule
from ..layers.transformer import TokenReadout
from ._tracing import (
    _ACTIVATION_FUNCTIONS,
    _ACTIVATION_METHODS,
    _ARITHMETIC_FUNCTIONS,
    _ARITHMETIC_METHODS,
    _CAT_FUNCTIONS,
    _EMPIRICAL,
    _META_ATTRIBUTES,
    _META_METHODS,
    _NO_KERNEL,
    _NO_KERNEL_FUNCTIONS,
    _SUM_FUNCTIONS,
    _SUM_METHODS,
    _SUPPORTED,
    ConversionError,
    _code,
    _fn_name,
    _location,
    _Op,
    torch_base,
)


class _NodeRules:
    """Node -> layer rules of `_Converter` (which holds ``root``, ``options``,
    ``modules`` and ``meta``)."""

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
        op = self._sequence_op(node)
        if op is None:
            op = self._plain_op(node)
        self._keep_layout(node, op)
        return op

    def _keep_layout(self, node: fx.Node, op: _Op) -> None:
        """A sequence stays one through layers that act on each position's channels
        alike (activations, dropout, identity, sums); flattening ends it; other
        layers have no rule on sequences."""
        lay = None if node in self.layout else self._layout_in(node)
        if lay is None:
            return
        if op.kind == "sum" or (op.kind == "layer" and isinstance(
                op.layer, (Activation, Dropout, Identity))):
            self.layout[node] = lay
        elif not (op.kind == "layer" and isinstance(op.layer, (Flatten, GlobalAvgPool,
                                                                TokenReadout))):
            raise self._fail(node, "it acts on a sequence (N, L, E), where only position-wise "
                                   "nn.Linear and nn.LayerNorm, activations, dropout, "
                                   "residual sums, attention and encoder modules, the mean "
                                   "over positions and the first or last token have rules",
                             supported=False)

    def _plain_op(self, node: fx.Node) -> _Op:
        if node.op in ("call_function", "call_method"):
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
            key = next((k for k in _NO_KERNEL_FUNCTIONS if k in name), None)
            if key is not None:
                raise self._fail(node, f"{_fn_name(node.target)} {_NO_KERNEL_FUNCTIONS[key]}. "
                                       f"{_EMPIRICAL}")
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                owner = self.modules.get(a.target.rpartition(".")[0])
                base = None if owner is None else torch_base(type(owner))
                if base is not None and type(owner).forward is not base.forward:
                    raise self._fail(node, (
                        f"{type(owner).__name__} subclasses nn.{base.__name__} and overrides "
                        f"forward, which uses its parameter '{a.target}' directly; from_torch "
                        f"converts a subclass of a torch layer only when it inherits forward. "
                        f"Write the change as separate modules or functions in the model's "
                        f"forward"))
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
        """The layer of module ``m``: the rule of the layer class that declares its
        torch class (`ntkit.layers.registry`), or an error naming what is missing."""
        base = torch_base(type(m))
        if base is not None and type(m).forward is base.forward:
            return self._subclass_layer(m, base, node)
        cls = module_rule(m)
        if cls is not None:
            return cls.from_torch_module(m, self._context(node))
        name = type(m).__name__
        reason = next((r for key, r in _NO_KERNEL.items() if key in name), None)
        why = f"{name} {reason}" if reason else f"{name} has no infinite-width kernel rule in ntkit"
        if key_hint := next((k for k in ("BatchNorm", "MaxPool") if k in name), None):
            why += f". {_EMPIRICAL}" + (
                " (or replace it with nn.AvgPool)" if key_hint == "MaxPool" else
                " (or remove it, or use nn.LayerNorm(elementwise_affine=False))")
        raise self._fail(node, why)

    def _subclass_layer(self, m: nn.Module, base: type, node: fx.Node) -> Layer:
        """A user subclass of torch layer ``base`` that inherits ``forward`` (a leaf of
        `_Tracer`; it computes what the base does): converted by the base's rule, or
        refused naming the base."""
        cls = next((c for c in layer_classes() if base in getattr(c, "torch_modules", ())),
                   None)
        if cls is None:
            reason = next((r for key, r in _NO_KERNEL.items() if key in base.__name__),
                          "has no infinite-width kernel rule in ntkit")
            raise self._fail(node, (
                f"{type(m).__name__} is a subclass of nn.{base.__name__}; {base.__name__} "
                f"{reason}. {_EMPIRICAL}"))
        return cls.from_torch_module(m, self._context(node))

    def _context(self, node: fx.Node) -> TorchContext:
        o = self.options
        return TorchContext(
            parameterization=o.parameterization, w_std=o.w_std, b_std=o.b_std, degree=o.degree,
            where=self._where(node),
            fail=lambda why, supported=True: self._fail(node, why, supported))

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
            return TorchGlobalAvgPool(self._where(node), dims=tuple(dims))
        if not method and name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d",
                                   "adaptive_avg_pool3d"):
            size = rest[0] if rest else kwargs.get("output_size")
            return torch_global_pool(size, self._context(node), ndim=int(name[-2]))
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

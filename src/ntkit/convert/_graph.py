"""`from_torch`'s driver: traces a model, checks the graph as a whole (changes in
place, shared parameters) and rebuilds it as nested ntkit containers."""

from __future__ import annotations

import itertools
import operator

from torch import fx, nn
from torch.nn import functional as F

from ..layers import (
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    Conv1d,
    Conv2d,
    Conv3d,
    Dropout,
    FanInConcat,
    FanInSum,
    FanOut,
    Flatten,
    GlobalAvgPool,
    Identity,
    Layer,
    LayerNorm,
    Linear,
    MultiheadAttention,
    Parallel,
    Sequential,
    SumPool1d,
    SumPool2d,
    SumPool3d,
)
from ._nodes import _NodeRules
from ._sequence import SequenceRules, _attr_of
from ._tracing import (
    _ACTIVATION_FUNCTIONS,
    _ALIAS_FUNCTIONS,
    _ALIAS_METHODS,
    _SUPPORTED,
    ConversionError,
    _arg,
    _code,
    _is_leaf,
    _Op,
    _Options,
    _Slot,
    _Tracer,
)


class _Converter(SequenceRules, _NodeRules):
    def __init__(self, root: nn.Module, options: _Options) -> None:
        self.root, self.options = root, options
        self.modules = dict(root.named_modules())
        self.meta: dict[fx.Node, str] = {}
        self.ops: dict[fx.Node, _Op] = {}
        self.layout: dict[fx.Node, str] = {}
        self.seeds = itertools.count(options.seed)  # of the attention layers

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
                live.update(self._data_inputs(n))
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
            if self._is_meta(n) or n.op == "get_attr" or _attr_of(n) is not None:
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
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(
                f"from_torch traces {type(self.root).__name__}.forward with torch.fx, which "
                f"failed: {type(e).__name__}: {e}. forward must be symbolically traceable: no "
                f"Python control flow on tensor values or shapes (if, assert, loops over "
                f"x.size()). Supported: {_SUPPORTED}."
            ) from e

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
        if isinstance(layer, (Linear, Conv1d, Conv2d, Conv3d, MultiheadAttention)):
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

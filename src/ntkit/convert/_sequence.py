"""`from_torch` for sequence models: token embeddings, torch's attention and
transformer encoder modules, and the operations on ``(N, L, E)`` tensors around
them (position-wise Linear and LayerNorm, mean over positions, a token).

torch holds sequences channels last, ``(N, L, E)`` (``batch_first``) or
``(L, N, E)``; ntkit channels first, ``(N, E, L)``. The converter tracks which
tensors are sequences (`Seq`): the output of ``nn.Embedding`` (ids ``(N, L)``
for the twin whatever torch's order) and of the attention modules. On them
``nn.Linear`` is a 1x1 `Conv1d` and ``nn.LayerNorm`` normalises channels at each
position; ``x.mean(1)`` (``x.mean(0)`` when not batch-first) is `GlobalAvgPool`
and ``x[:, 0]`` / ``x[:, -1]`` (``x[0]`` / ``x[-1]``) a `TokenReadout`.

Variances are those of torch's initialisation: ``in_proj_weight`` is Xavier
uniform on ``(3E, E)``, variance ``2 / (E + 3E)``, so ``w_std^2 = 1/2`` for
queries, keys and values; ``out_proj`` and the feed-forward layers are
``nn.Linear`` (``w_std^2 = 1/3``); all attention biases start at zero and are
trained (``proj_bias``, ``b_init="zero"``); LayerNorm's scale and shift start at
1 and 0 (``affine``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator

import torch
from torch import fx, nn

from ..layers import (
    Conv1d,
    FanInSum,
    FanOut,
    GlobalAvgPool,
    Identity,
    LayerNorm,
    Parallel,
    Sequential,
)
from ..layers.activations import GELU, ReLU
from ..layers.embedding import Embedding, sinusoidal_embeddings
from ..layers.mha import MultiheadAttention
from ..layers.normalization import Dropout
from ..layers.registry import TorchContext
from ..layers.transformer import TokenReadout
from ._tracing import _Op

__all__ = [
    "SEQUENCE_MODULES",
    "batch_first",
    "position_layernorm",
    "position_linear",
    "sequence_layer",
]

SEQUENCE_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)

#: Variance of torch's Xavier-uniform ``in_proj_weight`` ``(3E, E)`` times ``E``.
_IN_PROJ_W2 = 0.5


def batch_first(m: nn.Module) -> bool:
    """Whether a sequence module takes ``(N, L, E)`` (else ``(L, N, E)``)."""
    if isinstance(m, nn.TransformerEncoder):
        m = m.layers[0]
    if isinstance(m, nn.TransformerEncoderLayer):
        m = m.self_attn
    return bool(m.batch_first)


def sequence_layer(m: nn.Module, ctx: TorchContext, causal: bool, seeds: Iterator[int],
                   n_samples: int):
    """The ntkit twin of one call of an attention or encoder module; ``seeds`` gives
    each attention layer its seed, in the order of conversion (independent draws)."""
    if isinstance(m, nn.MultiheadAttention):
        return attention(m, ctx, causal, next(seeds), n_samples)
    if isinstance(m, nn.TransformerEncoderLayer):
        return encoder_layer(m, ctx, causal, seeds, n_samples)
    layers = list(m.layers)
    _refuse_cloned(layers, ctx)
    blocks = [encoder_layer(layer, ctx, causal, seeds, n_samples) for layer in layers]
    if m.norm is not None:
        blocks.append(position_layernorm(m.norm, ctx))
    return Sequential(*blocks)


def attention(m: nn.MultiheadAttention, ctx: TorchContext, causal: bool, seed: int,
              n_samples: int) -> MultiheadAttention:
    """`MultiheadAttention` from torch's self-attention module."""
    if not m._qkv_same_embed_dim:
        raise ctx.fail("it has kdim or vdim different from embed_dim (separate query, key "
                       "and value inputs); only self-attention on one sequence has a rule",
                       supported=False)
    if m.bias_k is not None:
        raise ctx.fail("add_bias_kv=True appends a learned key and value (a learned bias on "
                       "the attention logits), which has no infinite-width rule here",
                       supported=False)
    if m.add_zero_attn:
        raise ctx.fail("add_zero_attn=True appends a zero key, which has no rule here",
                       supported=False)
    if m.training and m.dropout > 0:
        raise ctx.fail(f"it is in training mode with dropout={m.dropout} on the attention "
                       f"weights, which has no kernel rule; call model.eval() before "
                       f"converting (the kernel of the network as used at inference)",
                       supported=False)
    e = m.embed_dim
    bias = m.in_proj_bias is not None
    w_in = math.sqrt(_IN_PROJ_W2) if ctx.w_std is None else ctx.w_std
    return MultiheadAttention(
        e, m.num_heads, w_query_std=w_in, w_key_std=w_in, w_value_std=w_in,
        w_out_std=ctx.weight_std(), b_std=1.0 if bias else None,
        b_init="zero" if bias else "normal", proj_bias=bias,
        parameterization=ctx.parameterization, causal=causal, n_samples=n_samples,
        seed=seed, in_channels=e)


def encoder_layer(m: nn.TransformerEncoderLayer, ctx: TorchContext, causal: bool,
                  seeds: Iterator[int], n_samples: int) -> Sequential:
    """A block of `Sequential` layers computing ``nn.TransformerEncoderLayer``."""
    if m.training and m.dropout.p > 0:
        raise ctx.fail(f"it is in training mode with dropout={m.dropout.p}: dropout in "
                       f"training mode makes the residual stream non-Gaussian before its "
                       f"LayerNorm, which has no kernel rule; call model.eval() before "
                       f"converting (the kernel of the network as used at inference) or "
                       f"set dropout=0", supported=False)
    act = _activation(m, ctx)
    attn = attention(m.self_attn, ctx, causal, next(seeds), n_samples)
    ff = [position_linear(m.linear1, ctx), act, _dropout(m.dropout),
          position_linear(m.linear2, ctx), _dropout(m.dropout2)]
    sa = [attn, _dropout(m.dropout1)]
    n1, n2 = position_layernorm(m.norm1, ctx), position_layernorm(m.norm2, ctx)

    def residual(inner: list) -> list:
        return [FanOut(2), Parallel(Identity(), Sequential(*inner)), FanInSum()]

    if m.norm_first:
        return Sequential(*residual([n1, *sa]), *residual([n2, *ff]))
    return Sequential(*residual(sa), n1, *residual(ff), n2)


def position_linear(m: nn.Linear, ctx: TorchContext) -> Conv1d:
    """``nn.Linear`` on the channels of each position: a 1x1 `Conv1d`."""
    fan_in = m.in_features
    return Conv1d(m.out_features, 1, w_std=ctx.weight_std(),
                  b_std=ctx.bias_std(m.bias is not None, fan_in),
                  parameterization=ctx.parameterization, in_channels=fan_in)


def position_layernorm(m: nn.LayerNorm, ctx: TorchContext) -> LayerNorm:
    """``nn.LayerNorm(E)`` on the channels of each position."""
    if len(m.normalized_shape) != 1:
        raise ctx.fail(f"it normalises the last {len(m.normalized_shape)} axes of a "
                       f"sequence; only nn.LayerNorm(embed_dim), over the channels of each "
                       f"position, has a rule there", supported=False)
    affine = bool(m.elementwise_affine)
    return LayerNorm(eps=m.eps, affine=affine, bias=affine and m.bias is not None)


def _activation(m: nn.TransformerEncoderLayer, ctx: TorchContext):
    act = m.activation
    if act is nn.functional.relu or isinstance(act, nn.ReLU):
        return ReLU()
    if act is nn.functional.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return GELU()
    if isinstance(act, nn.GELU):
        return GELU(approximate="tanh")
    raise ctx.fail(f"its activation {act!r} is not relu or gelu; those two convert",
                   supported=False)


def _dropout(m: nn.Dropout):
    return Dropout(m.p, mode="train" if m.training else "eval")


def _refuse_cloned(layers: list[nn.Module], ctx: TorchContext) -> None:
    """nn.TransformerEncoder deep-copies its layer, so all its layers start with the
    same weights; the kernel assumes independent ones."""
    if len(layers) < 2:
        return
    first = [p.detach() for p in layers[0].parameters()]
    for i, layer in enumerate(layers[1:], 1):
        same = all(torch.equal(a, b.detach()) for a, b in zip(first, layer.parameters()))
        if same:
            raise ctx.fail(
                f"its layers 0 and {i} hold identical weights: nn.TransformerEncoder "
                f"deep-copies the layer it is given, so all its layers start equal, while "
                f"the infinite-width kernel assumes independently initialised layers. "
                f"Give each layer its own initialisation before converting, e.g. `for i in "
                f"range(len(encoder.layers)): encoder.layers[i] = "
                f"nn.TransformerEncoderLayer(...)` with the same arguments",
                supported=False)


# ----------------------------------------------------------- node rules (a mixin)
_CALL_ARGS = {
    nn.MultiheadAttention: ("query", "key", "value", "key_padding_mask", "need_weights",
                            "attn_mask", "average_attn_weights", "is_causal"),
    nn.TransformerEncoderLayer: ("src", "src_mask", "src_key_padding_mask", "is_causal"),
    nn.TransformerEncoder: ("src", "mask", "src_key_padding_mask", "is_causal"),
}
_MASK_ARGS = {"attn_mask", "src_mask", "mask"}


class SequenceRules:
    """The sequence rules of `_Converter` (`layout`: node -> ``"tok"`` (an embedding's
    output, either order), ``"nlc"`` or ``"lnc"``; absent: channels first)."""

    def _data_inputs(self, node) -> list:
        """The inputs a node's value depends on as data: for attention and encoder
        modules their sequence, not their masks (padding masks are the kernel's
        ``mask=``; a causal mask is read from ``is_causal``)."""
        if node.op == "call_module" and isinstance(self.modules.get(node.target),
                                                   SEQUENCE_MODULES):
            call = self._call_args(node)
            names = ("query", "key", "value") if "query" in call else ("src",)
            return [call[n] for n in names if isinstance(call.get(n), fx.Node)]
        return list(node.all_input_nodes)

    def _call_args(self, node) -> dict:
        m = self.modules[node.target]
        names = _CALL_ARGS[next(c for c in _CALL_ARGS if isinstance(m, c))]
        if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
            raise self._fail(node, f"unexpected arguments; {type(m).__name__} takes "
                                   f"{', '.join(names)}")
        call = dict(zip(names, node.args))
        call.update(node.kwargs)
        return call

    def _layout_in(self, node):
        ins = [a for a in self._data_inputs(node)
               if isinstance(a, fx.Node) and a.op != "get_attr" and not self._is_meta(a)]
        return next((self.layout[a] for a in ins if a in self.layout), None)

    def _sequence_op(self, node):
        """The op of a node that involves sequences, or None for the ordinary rules."""
        lay = self._layout_in(node)
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, SEQUENCE_MODULES):
                return self._sequence_module_op(node, m, lay)
            if isinstance(m, nn.Embedding):
                self.layout[node] = "tok"
                return None
            if lay is None:
                return None
            if isinstance(m, nn.Linear):
                return self._seq(node, lay, position_linear(m, self._context(node)))
            if isinstance(m, nn.LayerNorm):
                return self._seq(node, lay, position_layernorm(m, self._context(node)))
            return None
        if node.op not in ("call_function", "call_method"):
            return None
        if node.target is operator.getitem and _is_call_of(node.args[0], self.modules,
                                                          nn.MultiheadAttention):
            if node.args[1] != 0:
                raise self._fail(node, "it takes the attention weights of "
                                       "nn.MultiheadAttention; only its output, [0], has a "
                                       "kernel rule", supported=False)
            return self._seq(node, self.layout[node.args[0]], Identity())
        pos = self._positional(node)
        if pos is not None or lay is None:
            return pos
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name == "mean":
            return self._mean_over_positions(node, lay)
        if node.target is operator.getitem:
            return self._token(node, lay)
        return None

    def _seq(self, node, lay, layer):
        self.layout[node] = lay
        return _Op("layer", [node.args[0]], layer)

    def _sequence_module_op(self, node, m, lay):
        call = self._call_args(node)
        if "query" in call and not (call.get("key") is call["query"] is call.get("value")):
            raise self._fail(node, "its query, key and value are different tensors (cross-"
                                   "attention); only self-attention, m(x, x, x), has a rule",
                             supported=False)
        src = call.get("query", call.get("src"))
        order = "nlc" if batch_first(m) else "lnc"
        if lay is None and src.op != "placeholder":
            raise self._fail(node, "its input is not a sequence (N, L, E) from nn.Embedding "
                                   "or another attention module", supported=False)
        if lay not in (None, "tok", order):
            raise self._fail(node, f"its input is a sequence in the other order "
                                   f"(batch_first={order == 'lnc'}); use one order throughout",
                             supported=False)
        causal = call.get("is_causal") is True
        if any(call.get(k) is not None for k in _MASK_ARGS) and not causal:
            raise self._fail(node, "it is given an attention mask without is_causal=True; the "
                                   "causal mask (is_causal=True) and padding masks (pass "
                                   "net.kernel(..., mask=present) instead) have rules, other "
                                   "masks do not", supported=False)
        o = self.options
        layer = sequence_layer(m, self._context(node), causal, self.seeds, o.n_samples)
        self.layout[node] = order
        return _Op("layer", [src], layer)

    def _mean_over_positions(self, node, lay):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        want = {"nlc": (1,), "lnc": (0,), "tok": (0, 1)}[lay]
        if node.kwargs.get("keepdim") or len(dims) != 1 or dims[0] not in want:
            raise self._fail(node, f"a mean over dim={dims!r} of a sequence; only the mean "
                                   f"over positions (x.mean(1) for (N, L, E), x.mean(0) for "
                                   f"(L, N, E)) has a rule", supported=False)
        return _Op("layer", [node.args[0]], GlobalAvgPool())

    def _token(self, node, lay):
        index = node.args[1]
        first = {0: "first", -1: "last"}
        which = None
        if lay in ("nlc", "tok") and isinstance(index, tuple) and len(index) in (2, 3) and (
                index[0] == slice(None)) and index[1] in first and index[2:] in (
                (), (slice(None),)):
            which = first[index[1]]
        elif lay in ("lnc", "tok") and not isinstance(index, bool) and index in first:
            which = first[index]
        if which is None:
            raise self._fail(node, f"indexing a sequence with {index!r}; only its first or "
                                   f"last token (x[:, 0], x[:, -1]; x[0], x[-1] when not "
                                   f"batch-first) has a rule", supported=False)
        return _Op("layer", [node.args[0]], TokenReadout(which))

    def _positional(self, node):
        """``embedding(ids) + pos``: a learned (nn.Parameter) or sinusoidal (buffer)
        positional table added to an nn.Embedding's output."""
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if len(args) != 2 or not (node.target in (operator.add, torch.add) or
                                  node.target == "add"):
            return None
        tables = [a for a in args if _attr_of(a) is not None]
        if len(tables) != 1:
            return None
        (table,) = tables
        (emb,) = [a for a in args if a is not table]
        op = self.ops.get(emb)
        if op is None or op.kind != "layer" or not isinstance(op.layer, Embedding) or (
                op.layer.pos_emb != "none"):
            raise self._fail(node, "it adds a parameter or buffer; only a positional table "
                                   "added to an nn.Embedding's output has a rule",
                             supported=False)
        if len([u for u in emb.users if not self._is_meta(u)]) != 1:
            raise self._fail(node, "the embedding's output is also used without the "
                                   "positions", supported=False)
        name = _attr_of(table)
        params = dict(self.root.named_parameters())
        value = params[name] if name in params else self.root.get_buffer(name)
        c = op.layer.out_channels
        v = value.detach().to(torch.float64)
        if v.shape[-1] != c or sum(d != 1 for d in v.shape[:-1]) > 1:
            raise self._fail(node, f"the positional table {name} has shape "
                                   f"{tuple(v.shape)}; a table (L, E), (1, L, E) or "
                                   f"(L, 1, E) with E = {c} has a rule", supported=False)
        v = v.reshape(-1, c)  # (L, E)
        e = op.layer
        if isinstance(value, nn.Parameter):
            new = Embedding(c, e.num_embeddings, w_std=e.w_std, pos_emb="learned",
                            pos_std=float(v.pow(2).mean().sqrt()),
                            parameterization=self.options.parameterization)
        elif torch.allclose(v.T, sinusoidal_embeddings(c, v.shape[0]).to(v), atol=1e-5):
            new = Embedding(c, e.num_embeddings, w_std=e.w_std, pos_emb="sinusoidal",
                            parameterization=self.options.parameterization)
        else:
            raise self._fail(node, f"the buffer {name} added to the embedding is not the "
                                   f"sinusoidal table of Vaswani et al. (nk.sinusoidal_"
                                   f"embeddings); fixed tables other than it have no rule",
                             supported=False)
        self.ops[emb] = _Op("layer", op.inputs, new)
        self.layout[node] = self.layout[emb]
        return _Op("layer", [emb], Identity())


def _is_call_of(node, modules, cls) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(modules.get(node.target), cls))


def _attr_of(node):
    """The parameter or buffer name behind ``node`` (through slicing), or None."""
    while isinstance(node, fx.Node) and node.target is operator.getitem:
        node = node.args[0]
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None

"""Token embeddings: the input layer of a transformer, from integer token ids
``(N, L)`` to features ``(N, C, L)``.

Integer inputs are valid only for a network whose first layer is an
`Embedding`: ``net.kernel(ids1, ids2)`` then codes the ids as floats
``(N, 1, L)`` (`token_ids_as_input`), and the embedding computes its kernel
from the ids themselves, never from a product of them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import is_int, is_real
from .._side import SideModule, mask_input
from ..kernel import Kernel
from ._affine import check_parameterization
from .base import BuildContext, Kernels, Layer, Shapes, single

__all__ = ["Embedding", "NTKEmbedding", "sinusoidal_embeddings", "token_ids_as_input"]

PositionalKind = Literal["none", "learned", "sinusoidal"]
#: Ids up to this bound are exact in float32, the coding of `token_ids_as_input`.
MAX_TOKENS = 2**24


class Embedding(Layer):
    """Token embeddings with optional positional embeddings (the input layer).

    For token ids ``t`` of shape ``(N, L)`` the finite layer computes (all
    parameters standard normal, as `torch.nn.Embedding`'s initialisation)::

        y[c, p] = w_std E[c, t_p] + pos_std P[c, p]     # pos_emb="learned"
        y[c, p] = w_std E[c, t_p] + pos_std S[c, p]     # pos_emb="sinusoidal"

    with ``S`` the fixed sinusoids of Vaswani et al. 2017 (eq. in section 3.5:
    ``S[2i, p] = sin(p / 10000^(2i/C))``, ``S[2i+1, p] = cos(...)``). The
    embedding is not divided by a fan-in: a one-hot input has one non-zero
    entry. Its kernels between position ``p`` of ``x`` and ``q`` of ``x'`` are::

        nngp = w_std^2 [t_p == t'_q] + pos_std^2 R[p, q]
        ntk  = w_std^2 [t_p == t'_q] + pos_std^2 [p == q]   (learned)
        ntk  = w_std^2 [t_p == t'_q]                         (sinusoidal, fixed)

    with ``R = I`` for learned embeddings and ``R = S^T S / C`` (the channel
    average of the fixed sinusoids, at ``out_channels`` channels) for
    sinusoidal ones. The token weights are trained, so they enter the NTK as
    their NNGP (``d y / d E`` is the one-hot input). In standard parameterization
    (``E`` drawn with standard deviation ``w_std`` and ``P`` with ``pos_std``, as
    a torch model holds them) each gradient is 1: ``ntk = [t_p == t'_q] + [p == q]``.

    Args:
        out_channels: embedding width ``C``.
        num_embeddings: vocabulary size; ids must lie in ``[0, num_embeddings)``.
        w_std: scale of the token embeddings (1: torch's ``N(0, 1)`` init).
        pos_emb: ``"none"``, ``"learned"`` (a trained per-position parameter
            added to the tokens) or ``"sinusoidal"`` (fixed).
        pos_std: scale of the positional embeddings.
        parameterization: ``"ntk"`` (scales multiply standard normal parameters)
            or ``"standard"`` (parameters drawn at their scales).
        dtype: dtype of the kernels computed from ids (integer inputs carry
            none); default `torch.get_default_dtype()`.

    Raises:
        ValueError: invalid sizes or scales, or a ``pos_emb`` not in the list.
    """

    spec_names = ("embedding",)
    torch_modules = (nn.Embedding,)
    honours_masks = True

    def __init__(self, out_channels: int, num_embeddings: int, *, w_std: float = 1.0,
                 pos_emb: PositionalKind = "none", pos_std: float = 1.0,
                 dtype: torch.dtype | None = None,
                 parameterization: Literal["ntk", "standard"] = "ntk") -> None:
        for name, value in (("out_channels", out_channels), ("num_embeddings", num_embeddings)):
            if not is_int(value) or value < 1:
                raise ValueError(f"Embedding: {name} must be a positive int, got {value!r}.")
        if int(num_embeddings) > MAX_TOKENS:
            raise ValueError(f"Embedding: num_embeddings={num_embeddings} exceeds "
                             f"{MAX_TOKENS}, the largest vocabulary whose ids are exact "
                             f"in the float coding of token inputs.")
        for name, value in (("w_std", w_std), ("pos_std", pos_std)):
            if not is_real(value) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Embedding: {name} must be a finite number >= 0, got "
                                 f"{value!r}.")
        if pos_emb not in ("none", "learned", "sinusoidal"):
            raise ValueError(f"Embedding: pos_emb must be 'none', 'learned' or 'sinusoidal', "
                             f"got {pos_emb!r}.")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise TypeError(f"Embedding: dtype must be torch.float32 or torch.float64, got "
                            f"{dtype!r}.")
        self.parameterization = check_parameterization(parameterization, "Embedding")
        self.out_channels = int(out_channels)
        self.num_embeddings = int(num_embeddings)
        self.w_std, self.pos_std = float(w_std), float(pos_std)
        self.pos_emb = pos_emb
        self.dtype = dtype

    # ----------------------------------------------------------- token inputs
    def token_input_layer(self) -> Embedding:
        return self

    def token_inputs(self, x1, x2) -> tuple[Tensor, Tensor | None]:
        """Token ids ``(N, L)`` checked and coded as floats ``(N, 1, L)`` in ``dtype``."""
        dtype = self.dtype or torch.get_default_dtype()
        return (token_ids_as_input(x1, "x1", self.num_embeddings, dtype),
                None if x2 is None else token_ids_as_input(x2, "x2", self.num_embeddings,
                                                           dtype))

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"})

    @classmethod
    def from_torch_module(cls, module: nn.Embedding, ctx) -> Embedding:
        if module.max_norm is not None:
            raise ctx.fail("nn.Embedding with max_norm renormalises looked-up rows during "
                           "forward, which has no Gaussian limit; set max_norm=None")
        if module.padding_idx is not None:
            raise ctx.fail("nn.Embedding with padding_idx keeps one row at zero (never drawn "
                           "nor trained); drop padding_idx and pass a padding mask, "
                           "net.kernel(..., mask=...), instead")
        return cls(module.embedding_dim, module.num_embeddings)

    # ---------------------------------------------------------------- the rule
    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if not k.is_input or k.inputs is None:
            raise ValueError(f"{self!r} reads token ids and must be the first layer of the "
                             f"network.")
        x1, x2 = k.inputs
        t1 = _ids(x1)
        t2 = t1 if x2 is None else _ids(x2)
        length = t1.shape[1]
        dtype, device = k.nngp.dtype, k.nngp.device
        w2 = self.w_std**2
        pairs = k.position_pairs
        pos_nngp = pos_ntk = None
        if self.pos_emb != "none":
            pos_nngp = self._pos_covariance(length).to(dtype=dtype, device=device)
            pos_ntk = pos_nngp if self.pos_emb == "learned" else None
            if pos_ntk is not None and self.parameterization == "standard":
                pos_ntk = torch.eye(length, dtype=dtype, device=device)

        def pos(mat: Tensor | None, like: Tensor, pair_layout: bool) -> Tensor:
            if mat is None:
                return torch.zeros((), dtype=dtype, device=device)
            return mat if pair_layout else torch.diagonal(mat)

        def eq(a: Tensor, b: Tensor, pair_layout: bool, batch_pair: bool) -> Tensor:
            if pair_layout:
                e = (a[:, None, :, None] == b[None, :, None, :]) if batch_pair else (
                    a[:, :, None] == b[:, None, :])
            else:
                e = (a[:, None, :] == b[None, :, :]) if batch_pair else torch.ones_like(
                    a, dtype=torch.bool)
            return e.to(dtype)

        if k.diagonal:
            token = eq(t1, t1, pairs, False)
        else:
            token = eq(t1, t2, pairs, True)
        nngp = w2 * token + pos(pos_nngp, token, pairs)
        ntk = (1.0 if self.parameterization == "standard" else w2) * token + pos(
            pos_ntk, token, pairs)
        self_pairs = pairs and k.cov_pairs
        cov1 = w2 * eq(t1, t1, self_pairs, False) + pos(pos_nngp, token, self_pairs)
        if x2 is None:
            cov2 = cov1
        else:
            cov2 = w2 * eq(t2, t2, self_pairs, False) + pos(pos_nngp, token, self_pairs)
        if k.diagonal:
            cov1 = cov2 = nngp
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2,
                         shape=(self.out_channels, length),
                         is_gaussian=self.pos_emb != "sinusoidal", is_input=False)

    def _pos_covariance(self, length: int) -> Tensor:
        """The positional embeddings' covariance between positions, ``(L, L)`` float64,
        times ``pos_std^2``."""
        if self.pos_emb == "learned":
            return self.pos_std**2 * torch.eye(length, dtype=torch.float64)
        s = sinusoidal_embeddings(self.out_channels, length)
        return self.pos_std**2 * (s.T @ s) / self.out_channels

    # ---------------------------------------------------------------- finite twin
    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        shape = tuple(shape)
        if len(shape) == 2 and shape[0] == 1:  # ids coded as floats (N, 1, L)
            shape = shape[1:]
        if len(shape) != 1 or isinstance(shape[0], tuple):
            raise ValueError(f"{self!r} takes token ids of per-example shape (L,) but "
                             f"receives {shape}; pass input_shape=(L,) for ids (N, L).")
        return NTKEmbedding(self, shape[0], ctx), (self.out_channels, shape[0])

    def spec_call(self):
        kw = {}
        if self.w_std != 1.0:
            kw["w_std"] = self.w_std
        if self.pos_emb != "none":
            kw["pos_emb"] = self.pos_emb
        if self.pos_std != 1.0:
            kw["pos_std"] = self.pos_std
        if self.parameterization != "ntk":
            kw["parameterization"] = self.parameterization
        return "embedding", [self.out_channels, self.num_embeddings], kw

    def __repr__(self) -> str:
        parts = [str(self.out_channels), str(self.num_embeddings)]
        if self.w_std != 1.0:
            parts.append(f"w_std={self.w_std}")
        if self.pos_emb != "none":
            parts.append(f"pos_emb={self.pos_emb!r}, pos_std={self.pos_std}")
        if self.parameterization != "ntk":
            parts.append(f"parameterization={self.parameterization!r}")
        return f"Embedding({', '.join(parts)})"


def sinusoidal_embeddings(channels: int, length: int) -> Tensor:
    """The fixed sinusoids ``(channels, length)`` of Vaswani et al. 2017 (section 3.5),
    in float64: ``S[2i, p] = sin(p w_i)``, ``S[2i+1, p] = cos(p w_i)``,
    ``w_i = 10000^(-2i / channels)``."""
    p = torch.arange(length, dtype=torch.float64)
    i = torch.arange(0, channels, 2, dtype=torch.float64)
    freq = torch.pow(torch.tensor(10000.0, dtype=torch.float64), -i / channels)
    out = torch.zeros(channels, length, dtype=torch.float64)
    out[0::2] = torch.sin(freq[:, None] * p)
    out[1::2] = torch.cos(freq[: channels // 2, None] * p)
    return out


def _ids(x: Tensor) -> Tensor:
    """Token ids ``(N, L)`` (int64) from their float coding ``(N, 1, L)`` or ids."""
    if x.is_floating_point():
        x = x.reshape(x.shape[0], -1)
        return x.to(torch.int64)
    return x.reshape(x.shape[0], -1).to(torch.int64)


def token_ids_as_input(x, name: str, num_embeddings: int, dtype: torch.dtype) -> Tensor:
    """Token ids ``(N, L)`` checked and coded as floats ``(N, 1, L)`` for the kernel.

    Args:
        x: token ids ``(N, L)``: an integer tensor (or NumPy array), computed in
            ``dtype``, or a float32/float64 one holding whole numbers, computed in its
            own dtype.
        name: ``"x1"`` or ``"x2"``, for messages.
        num_embeddings: the vocabulary size; ids must lie in ``[0, num_embeddings)``.
        dtype: the float dtype of the coding (and of the kernel).

    Raises:
        TypeError: ids that are not integers.
        ValueError: a shape other than ``(N, L)``, or ids out of range.
    """
    if not isinstance(x, Tensor):
        try:
            import numpy as np
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}: token ids must be an integer tensor (N, L); could not "
                            f"convert {type(x).__name__} ({e}).") from None
    if x.is_complex() or x.dtype == torch.bool or x.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"{name} has dtype {x.dtype}, but this network starts with an Embedding, which "
            f"takes token ids (N, L): integers, or float32/float64 holding whole numbers "
            f"(the kernel's dtype); pass ids.long(), or drop the Embedding to feed features.")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; token ids must be (N, L) with "
                         f"N >= 1 examples of L >= 1 tokens.")
    if x.is_floating_point():
        dtype = x.dtype
        if x.device.type != "meta" and not bool((x == torch.round(x)).all()):
            raise ValueError(f"{name} holds values that are not whole numbers, but this "
                             f"network starts with an Embedding, which takes token ids; pass "
                             f"integer ids (N, L), or drop the Embedding to feed features.")
    if x.device.type != "meta" and x.numel() and (
            int(x.min()) < 0 or int(x.max()) >= num_embeddings):
        raise ValueError(f"{name} holds token ids in [{int(x.min())}, {int(x.max())}], outside "
                         f"the vocabulary [0, {num_embeddings}) of the Embedding; check the "
                         f"tokenizer or raise num_embeddings.")
    return x.to(dtype).unsqueeze(1)


class NTKEmbedding(SideModule):
    """The finite twin of `Embedding`: ``weight`` ``(num_embeddings, C)`` and
    ``pos_weight`` ``(C, L)`` standard normal, scaled in `forward`. Takes ids
    ``(N, L)`` or their float coding ``(N, 1, L)``; returns ``(N, C, L)``."""

    def __init__(self, layer: Embedding, length: int, ctx: BuildContext) -> None:
        super().__init__()
        self.w_std, self.pos_std, self.length = layer.w_std, layer.pos_std, length
        draw_w, draw_p = 1.0, 1.0
        if layer.parameterization == "standard":  # drawn at scale, no multipliers
            draw_w, draw_p, self.w_std, self.pos_std = self.w_std, self.pos_std, 1.0, 1.0
        self.weight = nn.Parameter(ctx.randn(layer.num_embeddings, layer.out_channels) * draw_w)
        self.register_parameter("pos_weight", None)
        self.register_buffer("sinusoids", None)
        if layer.pos_emb == "learned":
            self.pos_weight = nn.Parameter(ctx.randn(layer.out_channels, length) * draw_p)
        elif layer.pos_emb == "sinusoidal":
            self.sinusoids = (sinusoidal_embeddings(layer.out_channels, length) * draw_p).to(
                dtype=ctx.dtype, device=ctx.device)

    def forward(self, x, side: dict | None = None, **side_inputs):
        if isinstance(x, Tensor) and x.ndim == 2:  # ids (N, L) -> the coding (N, 1, L)
            x = x.unsqueeze(1).to(x.dtype if x.is_floating_point() else torch.float64)
        return super().forward(x, side, **side_inputs)

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        ids = _ids(x)
        if ids.shape[1] != self.length:
            raise ValueError(f"NTKEmbedding was built for sequences of {self.length} tokens, "
                             f"got {ids.shape[1]}.")
        out = self.w_std * nn.functional.embedding(ids, self.weight).transpose(1, 2)
        if self.pos_weight is not None:
            out = out + self.pos_std * self.pos_weight
        elif self.sinusoids is not None:
            out = out + self.pos_std * self.sinusoids
        return mask_input(out, side.get("mask"))

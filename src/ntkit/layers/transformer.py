"""Transformer encoders composed from layers: blocks (pre-LN and post-LN) of
`MultiheadAttention`, residual sums and a position-wise MLP, and readouts of a
sequence (mean, first token, last token).

A block is a `Sequential` of ordinary layers, so its kernel rule, finite twin,
masks and spec follow from theirs:

- post-LN (Vaswani et al. 2017; ``torch.nn.TransformerEncoderLayer`` with
  ``norm_first=False``): ``x = LN(x + MHA(x))``, ``x = LN(x + FF(x))``;
- pre-LN (Xiong et al. 2020; ``norm_first=True``): ``x = x + MHA(LN(x))``,
  ``x = x + FF(LN(x))``;

with ``FF = Conv1d(d_ff, 1) -> ReLU/GELU -> Conv1d(d_model, 1)`` (a position-wise
`Linear`). LayerNorm here has no learned scale and shift (see `LayerNorm`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._side import SideModule
from ..kernel import Kernel
from .activations import GELU, ReLU
from .base import BuildContext, Kernels, Layer, Shapes, single
from .containers import FanInSum, FanOut, Identity, Parallel, Sequential
from .conv import Conv1d
from .mha import MultiheadAttention
from .normalization import LayerNorm
from .pool import GlobalAvgPool

__all__ = ["TokenReadout", "encoder", "encoder_block", "readout"]


def encoder_block(d_model: int, n_heads: int, d_ff: int, *, norm_first: bool = False,
                  activation: Literal["relu", "gelu"] = "relu", causal: bool = False,
                  w_std: float = 1.0, b_std: float = 0.0, attn_b_std: float | None = 0.0,
                  w_query_std: float = 1.0, w_key_std: float = 1.0,
                  n_samples: int = 256, seed: int = 0, eps: float = 1e-5) -> Sequential:
    """One transformer encoder block on sequences ``(N, d_model, L)``.

    Args:
        d_model: width of the residual stream.
        n_heads: heads of the attention's finite twin.
        d_ff: hidden width of the position-wise MLP.
        norm_first: pre-LN (True) or post-LN (False, torch's default).
        activation: ``"relu"`` or ``"gelu"`` (exact erf GELU).
        causal: decoder-style attention (each position sees itself and earlier ones).
        w_std, b_std: scales of the MLP's weights and biases.
        attn_b_std: the attention output's bias scale (None: no bias).
        w_query_std, w_key_std: scales of the query and key weights (their
            product sets the logits' variance).
        n_samples, seed: the attention's logit draws (see `MultiheadAttention`).
        eps: LayerNorm's epsilon.

    Returns:
        A `Sequential` of layers.
    """
    if activation not in ("relu", "gelu"):
        raise ValueError(f"encoder_block: activation must be 'relu' or 'gelu', got "
                         f"{activation!r}.")
    act = ReLU() if activation == "relu" else GELU()
    attn = MultiheadAttention(d_model, n_heads, w_query_std=w_query_std, w_key_std=w_key_std,
                              b_std=attn_b_std, causal=causal, n_samples=n_samples, seed=seed)
    mlp = Sequential(Conv1d(d_ff, 1, w_std=w_std, b_std=b_std), act,
                     Conv1d(d_model, 1, w_std=w_std, b_std=b_std))

    def residual(inner: Layer) -> list[Layer]:
        return [FanOut(2), Parallel(Identity(), inner), FanInSum()]

    if norm_first:
        return Sequential(*residual(Sequential(LayerNorm(eps=eps), attn)),
                          *residual(Sequential(LayerNorm(eps=eps), mlp)))
    return Sequential(*residual(attn), LayerNorm(eps=eps), *residual(mlp), LayerNorm(eps=eps))


def encoder(n_blocks: int, d_model: int, n_heads: int, d_ff: int, *, seed: int = 0,
            **block_options) -> Sequential:
    """``n_blocks`` `encoder_block` s in a row, their attention draws seeded
    ``seed, seed + 1, ...`` (independent draws per block)."""
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"encoder: n_blocks must be a positive int, got {n_blocks!r}.")
    return Sequential(*(encoder_block(d_model, n_heads, d_ff, seed=seed + i, **block_options)
                        for i in range(n_blocks)))


def readout(kind: Literal["mean", "first", "last"]) -> Layer:
    """The layer that turns a sequence ``(N, C, L)`` into one vector ``(N, C)``:
    ``"mean"`` over present positions (`GlobalAvgPool`), the ``"first"`` token
    (a CLS token) or the ``"last"`` present one (`TokenReadout`)."""
    if kind == "mean":
        return GlobalAvgPool()
    return TokenReadout(kind)


class TokenReadout(Layer):
    """One token of each sequence: ``(N, C, L)`` to ``(N, C)``.

    ``which="first"`` takes position 0 (a CLS token); ``"last"`` the last
    position, or with a mask (``kernel(..., mask=)``) the last present one of
    each example, so the kernel is ``K[i, j, last_i, last_j]``.

    Args:
        which: ``"first"`` or ``"last"``.
    """

    spec_names = ("tokenreadout",)
    honours_masks = True

    def __init__(self, which: Literal["first", "last"] = "first") -> None:
        if which not in ("first", "last"):
            raise ValueError(f"TokenReadout: which must be 'first' or 'last', got {which!r}.")
        self.which = which

    def needs_position_pairs(self) -> bool:
        return self.which == "last"  # per-example last positions pair different positions

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"})

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if len(k.spatial_shape) != 1:
            raise ValueError(f"{self!r} takes sequences (N, C, L) but receives per-example "
                             f"shape {k.shape}.")
        length = k.spatial_shape[0]
        pair = k.side_pair("mask")

        def positions(n: int, m: Tensor | None) -> Tensor:
            if self.which == "first":
                return torch.zeros(n, dtype=torch.long, device=k.device)
            if m is None:
                return torch.full((n,), length - 1, dtype=torch.long, device=k.device)
            return _last_present(m)

        pos1 = positions(k.cov1.shape[0], None if pair is None else pair[0])
        same = k.diagonal or (k.cov2 is k.cov1 and (pair is None or pair[1] is pair[0]))
        pos2 = pos1 if same else positions(k.cov2.shape[0], None if pair is None else pair[1])
        r1 = torch.arange(pos1.shape[0], device=k.device)
        r2 = torch.arange(pos2.shape[0], device=k.device)

        def pick_self(c: Tensor, pos: Tensor, rows: Tensor) -> Tensor:
            if k.position_pairs and k.cov_pairs:
                return c[rows, pos, pos]
            return c[rows, pos]

        cov1 = pick_self(k.cov1, pos1, r1)
        cov2 = cov1 if k.cov2 is k.cov1 and pos2 is pos1 else pick_self(k.cov2, pos2, r2)
        if k.diagonal:
            if k.position_pairs:
                nngp, ntk = k.nngp[r1, pos1, pos1], k.ntk[r1, pos1, pos1]
            else:
                nngp, ntk = k.nngp[r1, pos1], k.ntk[r1, pos1]
        else:
            a, b = r1[:, None], r2[None, :]
            if k.position_pairs:
                p1, p2 = pos1[:, None], pos2[None, :]
                nngp, ntk = k.nngp[a, b, p1, p2], k.ntk[a, b, p1, p2]
            else:  # "first", or "last" without masks: matching positions suffice
                nngp, ntk = k.nngp[a, b, pos1[:, None]], k.ntk[a, b, pos1[:, None]]
        return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape=(k.shape[0],),
                         position_pairs=False, cov_pairs=True).with_side("mask", None)

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        if not shape or isinstance(shape[0], tuple) or len(shape) != 2:
            raise ValueError(f"{self!r} takes sequences (N, C, L), got per-example shape "
                             f"{shape}.")
        return _TokenReadoutModule(self.which), (shape[0],)

    def spec_call(self):
        return "tokenreadout", ([] if self.which == "first" else [self.which]), {}

    def __repr__(self) -> str:
        return f"TokenReadout({self.which!r})"


def _last_present(mask: Tensor) -> Tensor:
    """The index of each example's last present position, ``(N,)`` from ``(N, L)``."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, idx, -1).amax(1)


class _TokenReadoutModule(SideModule):
    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        mask = side.pop("mask", None)
        if self.which == "first":
            return x[:, :, 0]
        if mask is None:
            return x[:, :, -1]
        pos = _last_present(mask.reshape(mask.shape[0], -1))
        return x[torch.arange(x.shape[0], device=x.device), :, pos]

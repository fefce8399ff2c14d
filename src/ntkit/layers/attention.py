"""Global self-attention over the positions of sequences ``(N, C, L)`` (or any
``(N, C, *S)``, positions flattened), in the infinite-width limit of many heads
and wide keys, queries and values.

The kernel rules are those of Hron, Bahri, Sohl-Dickstein & Novak, "Infinite
attention: NNGP and NTK for deep attention networks" (ICML 2020), with
neural-tangents' conventions (``stax.GlobalSelfAttention``), so that the same
architecture gives the same numbers. Two limits have a closed form:

- ``linear_scaling=True`` (the paper's ``d^-1`` scaling): logits are
  ``q . k / n_key`` with tied query and key weights. They converge to the
  deterministic ``w_q w_k K(x_p, x_q)``, a function of each example's own
  position covariance, so each example has a fixed attention matrix ``A`` and
  the layer acts on the kernel like a position-mixing linear map.
- ``linear_scaling=False`` with ``mechanism="identity"`` (``d^-1/2``): logits
  ``q . k / sqrt(n_key)`` with independent weights are Gaussian in the limit,
  and the output kernel is a product of two input kernels.

Masks (``kernel(..., mask=)``, neural-tangents' semantics, see `_masks`): absent
keys leave the attention (a logit of ``-inf`` before the softmax, 0 for the
other mechanisms), the positional embeddings are zero at absent positions (their
covariance ``R`` is masked like the kernel), and the outputs at absent queries
are zeros; the mask passes through unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import is_int, is_real
from .._side import SideModule, mask_input
from ..kernel import Kernel, position_diagonal
from ._spatial import require_pairs
from .base import BuildContext, Kernels, Layer, Shapes, single
from .linear import _affine

__all__ = ["SelfAttention", "NTKSelfAttention"]

Mechanism = Literal["softmax", "identity", "abs", "relu"]
PositionalEmbedding = Literal["none", "sum"]
_MECHANISMS = ("softmax", "identity", "abs", "relu")


class SelfAttention(Layer):
    """Multi-head global self-attention of any width (Hron et al. 2020).

    For inputs ``x`` of shape ``(N, C, *S)`` with positions ``p`` (all spatial
    axes flattened), head ``h`` computes (NTK parameterization, all weights
    standard normal, ``E`` the optional positional embeddings)::

        u = (x + E) W_h / sqrt(C)                       # keys/queries, n_key channels
        logits[p, q] = w_query w_key u_p . u'_q / n_key # linear_scaling=True, u' = u (tied)
        logits[p, q] = w_query w_key u_p . u'_q / sqrt(n_key)   # False, u' from own W'_h
        head_h = mechanism(logits) (w_value x V_h / sqrt(C))    # softmax over keys q;
                                                        # x + E with pos_emb_in_values
        y = (w_out / sqrt(n_heads n_value)) [head_1, ..., head_H] O + b_std b

    which is neural-tangents' ``stax.GlobalSelfAttention`` (``n_chan_out``,
    ``n_chan_key``, ``n_chan_val``, ``n_heads``, ``W_*_std``, ``b_std``).

    Kernel rules, with ``K``, ``Theta`` the incoming NNGP and NTK between
    positions, ``K~ = K + pos_emb_std^2 R`` (``R`` the positional embeddings'
    covariance; ``K~ = K`` without them), ``Theta~ = Theta + pos_emb_std^2 R``
    (the embeddings are trained), ``Kv``, ``Theta_v`` the values' kernels (``K``,
    ``Theta``, or ``K~``, ``Theta~`` with ``pos_emb_in_values``), ``ov = w_out w_value``
    and ``qk = w_query w_key``:

    - ``linear_scaling=True`` (the paper's ``d^-1`` scaling): each
      example's attention matrix ``A_i = mechanism(qk K~(x_i, x_i))`` (softmax
      over key positions), then::

          K'(x1, x2) = ov^2 A_1 Kv(x1, x2) A_2^T + b_std^2
          Theta'     = ov^2 A_1 (Theta_v + 2 Kv) A_2^T + b_std^2

      (the ``2 Kv`` are the value and output weights; the query and key
      weights' share vanishes in this limit).
    - ``linear_scaling=False``, ``mechanism="identity"`` (``d^-1/2`` scaling;
      the logits are Gaussian)::

          K'[p, p']  = (qk ov)^2 K~[p, p'] <K~, Kv> + b_std^2
          Theta'     = (qk ov)^2 ((<K~, Theta_v> + <Kv, Theta~>) K~
                                  + <K~, Kv> (Theta~ + 4 K~)) + b_std^2

      with ``<A, B> = sum_{q, q'} A[q, q'] B[q, q']`` per pair of examples.

    The finite twin, `NTKSelfAttention`, converges to these kernels as
    ``n_heads`` (for the ``d^-1/2`` limit) and ``key_channels`` (for the ``d^-1``
    one) grow.

    Masks (``kernel(..., mask=)``, neural-tangents' ``GlobalSelfAttention``): each
    ``A_i`` gives absent keys no weight (``-inf`` logits before the softmax, 0
    for the other mechanisms), ``R`` is zero at absent positions, and outputs at
    absent queries are zero; the twin does the same with ``model(x, mask=m)``.

    Args:
        out_channels: output width.
        n_heads: number of heads.
        key_channels: channels of keys and queries per head; default
            ``out_channels // n_heads``.
        value_channels: channels of values per head; default
            ``out_channels // n_heads``.
        w_key_std, w_query_std: key and query weight scales; the kernels depend
            only on their product.
        w_value_std, w_out_std: value and output weight scales; the kernels
            depend only on their product.
        b_std: bias standard deviation (one bias per output channel); ``None``
            for no bias.
        mechanism: ``"softmax"`` (over key positions), ``"identity"``, ``"abs"``
            or ``"relu"``, applied to the logits.
        linear_scaling: scale logits by ``1 / key_channels`` and tie query and
            key weights (True), or by ``1 / sqrt(key_channels)`` with independent
            weights (False; only ``mechanism="identity"`` has a closed form).
        pos_emb: ``"none"``, or ``"sum"``: trainable positional embeddings
            ``E`` (standard normal, one per channel and position, times
            ``pos_emb_std``) added to the inputs of keys and queries.
        pos_emb_std: scale of the positional embeddings.
        pos_emb_decay: covariance of the embeddings between positions as a
            function of their distance ``d = sum_axes |p_a - q_a|^p``
            (``p = pos_emb_p_norm``), taking and returning a float64 tensor,
            e.g. ``lambda d: torch.exp(-d / 4)``; it must give a positive
            semi-definite matrix. Default ``None``: independent embeddings per
            position, ``R = I``.
        pos_emb_p_norm: the ``p`` of the distance above.
        pos_emb_in_values: add the embeddings to the values' inputs too.
        in_channels: checked against the inputs when given.

    Raises:
        ValueError: a mechanism other than ``"identity"`` with
            ``linear_scaling=False`` (no closed-form kernel), ``out_channels``
            not divisible by ``n_heads`` when the per-head channels are left to
            their default, or invalid widths and scales.
    """

    spec_names = ("selfattention", "attention")
    honours_masks = True

    def __init__(
        self,
        out_channels: int,
        n_heads: int = 1,
        *,
        key_channels: int | None = None,
        value_channels: int | None = None,
        w_key_std: float = 1.0,
        w_query_std: float = 1.0,
        w_value_std: float = 1.0,
        w_out_std: float = 1.0,
        b_std: float | None = 0.0,
        mechanism: Mechanism = "softmax",
        linear_scaling: bool = True,
        pos_emb: PositionalEmbedding = "none",
        pos_emb_std: float = 1.0,
        pos_emb_decay: Callable[[Tensor], Tensor] | None = None,
        pos_emb_p_norm: float = 2.0,
        pos_emb_in_values: bool = False,
        in_channels: int | None = None,
    ) -> None:
        _check_int("out_channels", out_channels)
        _check_int("n_heads", n_heads)
        for name, value in (("key_channels", key_channels), ("value_channels", value_channels)):
            if value is not None:
                _check_int(name, value)
            elif out_channels % n_heads:
                raise ValueError(
                    f"SelfAttention: out_channels={out_channels} is not divisible by "
                    f"n_heads={n_heads}, so the default {name} (out_channels // n_heads) is "
                    f"undefined; choose n_heads dividing out_channels or pass {name} "
                    f"explicitly."
                )
        if in_channels is not None:
            _check_int("in_channels", in_channels)
        for name, value in (("w_key_std", w_key_std), ("w_query_std", w_query_std),
                            ("w_value_std", w_value_std), ("w_out_std", w_out_std),
                            ("b_std", b_std), ("pos_emb_std", pos_emb_std)):
            if not (value is None and name == "b_std"):
                _check_std(name, value)
        if mechanism not in _MECHANISMS:
            raise ValueError(f"SelfAttention: mechanism must be one of {_MECHANISMS}, got "
                             f"{mechanism!r}.")
        if not isinstance(linear_scaling, bool):
            raise TypeError(f"SelfAttention: linear_scaling must be a bool, got "
                            f"{linear_scaling!r}.")
        if not linear_scaling and mechanism != "identity":
            raise ValueError(
                f"SelfAttention: mechanism={mechanism!r} with linear_scaling=False (logits "
                f"scaled by 1/sqrt(key_channels)) has no closed-form infinite-width kernel "
                f"(Hron et al. 2020); use linear_scaling=True (1/key_channels scaling) or "
                f"mechanism='identity'."
            )
        if pos_emb not in ("none", "sum"):
            raise ValueError(f"SelfAttention: pos_emb must be 'none' or 'sum', got {pos_emb!r}.")
        if pos_emb_decay is not None and not callable(pos_emb_decay):
            raise TypeError(
                f"SelfAttention: pos_emb_decay must be None or a function of the distance "
                f"tensor, e.g. lambda d: torch.exp(-d / 4); got {type(pos_emb_decay).__name__}."
            )
        if (not is_real(pos_emb_p_norm) or not (math.isfinite(pos_emb_p_norm) and pos_emb_p_norm > 0)):
            raise ValueError(f"SelfAttention: pos_emb_p_norm must be a finite number > 0, got "
                             f"{pos_emb_p_norm!r}.")
        out_channels, n_heads = int(out_channels), int(n_heads)
        self.out_channels = out_channels
        self.n_heads = n_heads
        self.key_channels = int(key_channels or out_channels // n_heads)
        self.value_channels = int(value_channels or out_channels // n_heads)
        self.w_key_std, self.w_query_std = float(w_key_std), float(w_query_std)
        self.w_value_std, self.w_out_std = float(w_value_std), float(w_out_std)
        self.b_std = None if b_std is None else float(b_std)
        self.mechanism = mechanism
        self.linear_scaling = linear_scaling
        self.pos_emb = pos_emb
        self.pos_emb_std = float(pos_emb_std)
        self.pos_emb_decay = pos_emb_decay
        self.pos_emb_p_norm = float(pos_emb_p_norm)
        self.pos_emb_in_values = bool(pos_emb_in_values)
        self.in_channels = None if in_channels is None else int(in_channels)

    def needs_position_pairs(self) -> bool:
        return True

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"})

    # ---------------------------------------------------------------- the rule
    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        spatial = self._spatial(k.shape)
        require_pairs(k, self)
        p = math.prod(spatial)
        b = 1 if k.diagonal else 2
        # Each example's own position covariance sets its attention matrix: tiles
        # that carry only variances replay it from the pass over single examples.
        cov_pairs = k.cov_pairs
        c1, c2 = k.self_covariances(lambda c: c)
        k = k.replace(cov1=c1, cov2=c2, cov_pairs=True)

        def flat(t: Tensor, batch: int) -> Tensor:
            return t.reshape(*t.shape[:batch], p, p)

        def unflat(t: Tensor, batch: int) -> Tensor:
            return t.reshape(*t.shape[:batch], *spatial, *spatial)

        nngp, ntk = flat(k.nngp, b), flat(k.ntk, b)
        cov1 = nngp if k.diagonal else flat(k.cov1, 1)
        same2 = k.cov2 is k.cov1
        cov2 = cov1 if same2 else flat(k.cov2, 1)
        mask = k.side_pair("mask")
        f1 = f2 = None  # present positions (N, P), flattened
        if mask is not None:
            f1 = mask[0].reshape(mask[0].shape[0], p)
            f2 = f1 if mask[1] is mask[0] else mask[1].reshape(mask[1].shape[0], p)
        emb = emb11 = emb22 = None
        if self.pos_emb == "sum":
            emb = self.pos_emb_std**2 * pos_emb_covariance(
                spatial, self.pos_emb_decay, self.pos_emb_p_norm).to(nngp.dtype).to(nngp.device)
            emb11 = emb22 = emb
            if f1 is not None:  # embeddings are zero at absent positions
                emb11 = emb * (f1[:, :, None] & f1[:, None, :])
                emb22 = emb11 if f2 is f1 else emb * (f2[:, :, None] & f2[:, None, :])
                emb = emb11 if k.diagonal else emb * (f1[:, None, :, None] & f2[None, :, None, :])

        def keys(t: Tensor, e: Tensor | None = emb) -> Tensor:  # keys' and queries' inputs
            return t if e is None else t + e

        def values(t: Tensor, e: Tensor | None = emb) -> Tensor:  # the values' inputs
            return keys(t, e) if self.pos_emb_in_values else t

        ov2 = (self.w_out_std * self.w_value_std) ** 2
        b2 = 0.0 if self.b_std is None else self.b_std**2
        if self.linear_scaling:
            a1 = self._attention(keys(cov1, emb11), f1)
            a2 = a1 if same2 and f2 is f1 else self._attention(keys(cov2, emb22), f2)
            if k.diagonal:
                out_nngp = _mix(values(nngp), a1, a1, diagonal=True)
                out_ntk = _mix(values(ntk) + 2 * values(nngp), a1, a1, diagonal=True)
            else:
                out_nngp = _mix(values(nngp), a1, a2)
                out_ntk = _mix(values(ntk) + 2 * values(nngp), a1, a2)
                out_cov1 = _mix(values(cov1, emb11), a1, a1, diagonal=True)
                out_cov2 = out_cov1 if same2 else _mix(values(cov2, emb22), a2, a2,
                                                       diagonal=True)
            scale = ov2
        else:
            def product(t: Tensor, e: Tensor | None = emb) -> Tensor:  # K~ <K~, Kv> per pair
                return keys(t, e) * _inner(keys(t, e), values(t, e))

            out_nngp = product(nngp)
            kk, kv = keys(nngp), values(nngp)
            tk = ntk if emb is None else ntk + emb
            tv = tk if self.pos_emb_in_values else ntk
            out_ntk = ((_inner(kk, tv) + _inner(kv, tk)) * kk
                       + _inner(kk, kv) * (tk + 4 * kk))
            if not k.diagonal:
                out_cov1 = product(cov1, emb11)
                out_cov2 = out_cov1 if same2 else product(cov2, emb22)
            scale = (self.w_query_std * self.w_key_std) ** 2 * ov2
        out_nngp = _affine(out_nngp, scale, b2)
        out_ntk = _affine(out_ntk, scale, b2)
        if k.diagonal:
            out_cov1 = out_cov2 = out_nngp
        else:
            out_cov1 = _affine(out_cov1, scale, b2)
            out_cov2 = out_cov1 if same2 else _affine(out_cov2, scale, b2)
        out_cov1, out_cov2 = unflat(out_cov1, 1), unflat(out_cov2, 1)
        if not cov_pairs:
            out_cov1 = position_diagonal(out_cov1, 1)
            out_cov2 = out_cov1 if same2 else position_diagonal(out_cov2, 1)
        return k.replace(
            nngp=unflat(out_nngp, b), ntk=unflat(out_ntk, b), cov1=out_cov1, cov2=out_cov2,
            shape=(self.out_channels, *spatial), is_gaussian=True, is_input=False,
            cov_pairs=cov_pairs,
        )

    def _attention(self, cov: Tensor, present: Tensor | None = None) -> Tensor:
        """Each example's attention matrix from its position covariance ``(N, P, P)``;
        keys absent under ``present`` ``(N, P)`` get no weight."""
        logits = cov * (self.w_query_std * self.w_key_std)
        return _attend(logits, present, self.mechanism)

    # ---------------------------------------------------------------- finite twin
    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        spatial = self._spatial(shape)
        factor = None
        if self.pos_emb == "sum" and self.pos_emb_decay is not None:
            factor = _pos_emb_factor(spatial, self.pos_emb_decay, self.pos_emb_p_norm)
        module = NTKSelfAttention(self, shape[0], math.prod(spatial), factor, ctx)
        return module, (self.out_channels, *spatial)

    # ------------------------------------------------------------------ helpers
    def _spatial(self, shape: Shapes) -> tuple[int, ...]:
        if not shape or isinstance(shape[0], tuple):
            raise ValueError(f"{self!r} takes one input but receives branches {shape}.")
        if len(shape) < 2:
            raise ValueError(
                f"{self!r} attends over positions and takes sequences (N, C, L) (or (N, C, "
                f"*spatial), positions flattened) but receives dense features of per-example "
                f"shape {tuple(shape)}; reshape x to (N, C, L)."
            )
        if self.in_channels is not None and shape[0] != self.in_channels:
            raise ValueError(
                f"{self!r} expects {self.in_channels} input channels but receives {shape[0]} "
                f"(per-example shape {tuple(shape)}); inputs are channels first, (N, C, L), "
                f"or change in_channels."
            )
        return tuple(shape[1:])

    def spec_call(self):
        if self.pos_emb_decay is not None:
            raise ValueError(f"{self!r}: pos_emb_decay is a Python function, which has no "
                             f"compact spec form.")
        per_head = self.out_channels // self.n_heads
        defaults = {"key_channels": per_head, "value_channels": per_head, "w_key_std": 1.0,
                    "w_query_std": 1.0, "w_value_std": 1.0, "w_out_std": 1.0, "b_std": 0.0,
                    "mechanism": "softmax", "linear_scaling": True, "pos_emb": "none",
                    "pos_emb_std": 1.0, "pos_emb_p_norm": 2.0, "pos_emb_in_values": False,
                    "in_channels": None}
        kw = {k: getattr(self, k) for k, d in defaults.items() if getattr(self, k) != d}
        args = [self.out_channels] + ([self.n_heads] if self.n_heads != 1 else [])
        return "selfattention", args, kw

    def __repr__(self) -> str:
        parts = [f"{self.out_channels}", f"n_heads={self.n_heads}"]
        default = self.out_channels // self.n_heads
        if self.key_channels != default:
            parts.append(f"key_channels={self.key_channels}")
        if self.value_channels != default:
            parts.append(f"value_channels={self.value_channels}")
        for name in ("w_key_std", "w_query_std", "w_value_std", "w_out_std"):
            if getattr(self, name) != 1.0:
                parts.append(f"{name}={getattr(self, name)}")
        parts.append(f"b_std={self.b_std}")
        parts.append(f"mechanism={self.mechanism!r}")
        if not self.linear_scaling:
            parts.append("linear_scaling=False")
        if self.pos_emb != "none":
            parts.append(f"pos_emb={self.pos_emb!r}, pos_emb_std={self.pos_emb_std}")
            if self.pos_emb_decay is not None:
                parts.append(f"pos_emb_decay={getattr(self.pos_emb_decay, '__name__', '?')}, "
                             f"pos_emb_p_norm={self.pos_emb_p_norm}")
            if self.pos_emb_in_values:
                parts.append("pos_emb_in_values=True")
        return f"SelfAttention({', '.join(parts)})"


_MECHANISM_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax": lambda t: torch.softmax(t, dim=-1),
    "identity": lambda t: t,
    "abs": torch.abs,
    "relu": torch.relu,
}


def _attend(logits: Tensor, present: Tensor | None, mechanism: str) -> Tensor:
    """``mechanism(logits)`` over the last axis (keys), with absent keys (``present``
    ``(N, P)``, broadcast over the leading axes of each example) given no weight: a
    logit of ``-inf`` before the softmax, 0 for the other mechanisms (neural-tangents'
    ``GlobalSelfAttention``). Every example has a present key (masks are checked)."""
    if present is not None:
        absent = ~present.reshape(present.shape[0], *([1] * (logits.ndim - 2)),
                                  present.shape[-1])
        fill = -math.inf if mechanism == "softmax" else 0.0
        logits = logits.masked_fill(absent, fill)
    return _MECHANISM_FNS[mechanism](logits)


def _mix(t: Tensor, a1: Tensor, a2: Tensor, *, diagonal: bool = False) -> Tensor:
    """``a1_i t_ij a2_j^T`` over positions: ``t`` is ``(N1, N2, P, P)`` (or ``(N, P, P)``
    with ``diagonal``), ``a1`` ``(N1, P, P)`` and ``a2`` ``(N2, P, P)``."""
    if diagonal:
        return a1 @ t @ a2.transpose(-1, -2)
    return a1.unsqueeze(1) @ t @ a2.transpose(-1, -2).unsqueeze(0)


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """``sum_{q, q'} a[..., q, q'] b[..., q, q']``, kept as two trailing unit axes."""
    return (a * b).sum((-2, -1), keepdim=True)


@functools.lru_cache(maxsize=32)
def _pos_emb_covariance_cached(spatial: tuple[int, ...], decay, p_norm: float) -> Tensor:
    n = math.prod(spatial)
    if decay is None:
        return torch.eye(n, dtype=torch.float64)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in spatial],
                           indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids], -1)  # (P, ndim)
    dist = (coords[:, None, :] - coords[None, :, :]).abs().pow(p_norm).sum(-1)
    r = decay(dist)
    if not isinstance(r, Tensor) or r.shape != (n, n):
        raise ValueError(
            f"SelfAttention: pos_emb_decay must map the ({n}, {n}) distance tensor to a "
            f"tensor of the same shape (elementwise), got "
            f"{tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__}."
        )
    r = r.to(torch.float64)
    if not bool(torch.isfinite(r).all()) or not torch.allclose(r, r.T):
        raise ValueError("SelfAttention: pos_emb_decay gives a covariance between positions "
                         "that is not finite and symmetric; use a finite elementwise function "
                         "of the distance.")
    return r


def pos_emb_covariance(spatial: tuple[int, ...], decay: Callable[[Tensor], Tensor] | None,
                       p_norm: float) -> Tensor:
    """The covariance ``R`` of positional embeddings between flattened positions,
    ``(P, P)`` in float64: ``decay(sum_axes |p_a - q_a|^p_norm)``, or ``I`` when
    ``decay`` is None (neural-tangents' ``_pos_emb_pdist``)."""
    return _pos_emb_covariance_cached(tuple(spatial), decay, float(p_norm))


def _pos_emb_factor(spatial: tuple[int, ...], decay, p_norm: float) -> Tensor:
    """A square root ``L`` (``L L^T = R``) of the embeddings' covariance, ``(P, P)``."""
    r = pos_emb_covariance(spatial, decay, p_norm)
    vals, vecs = torch.linalg.eigh(r)
    if float(vals.min()) < -1e-8 * max(1.0, float(vals.abs().max())):
        raise ValueError(
            f"SelfAttention: pos_emb_decay gives a covariance between positions that is not "
            f"positive semi-definite (smallest eigenvalue {float(vals.min()):.3g}), so no "
            f"embeddings have it; use a positive-definite decay such as "
            f"lambda d: torch.exp(-d) with pos_emb_p_norm=1 or 2."
        )
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


class NTKSelfAttention(SideModule):
    """The finite twin of `SelfAttention`, in NTK parameterization.

    Parameters are standard normal and scaled in `forward`: ``key_weight``
    (and ``query_weight`` unless tied) ``(n_heads, in_channels, key_channels)``,
    ``value_weight`` ``(n_heads, in_channels, value_channels)``, ``out_weight``
    ``(out_channels, n_heads * value_channels)``, ``bias`` ``(out_channels,)``,
    ``pos_emb`` ``(in_channels, positions)``. Inputs ``(N, C, *S)``.

    With a mask (``model(x, mask=m)``): the embeddings are zero at absent
    positions, absent keys get no weight and outputs at absent queries are zero.
    """

    def __init__(self, layer: SelfAttention, in_channels: int, positions: int,
                 pos_emb_factor: Tensor | None, ctx: BuildContext) -> None:
        super().__init__()
        h, nk, nv = layer.n_heads, layer.key_channels, layer.value_channels
        self.in_channels, self.out_channels = in_channels, layer.out_channels
        self.mechanism, self.linear_scaling = layer.mechanism, layer.linear_scaling
        self.w_key_std, self.w_query_std = layer.w_key_std, layer.w_query_std
        self.w_value_std, self.w_out_std = layer.w_value_std, layer.w_out_std
        self.b_std, self.pos_emb_std = layer.b_std or 0.0, layer.pos_emb_std
        self.pos_emb_in_values = layer.pos_emb_in_values
        self.key_weight = nn.Parameter(ctx.randn(h, in_channels, nk))
        if self.linear_scaling:
            self.register_parameter("query_weight", None)  # tied to the keys
        else:
            self.query_weight = nn.Parameter(ctx.randn(h, in_channels, nk))
        self.value_weight = nn.Parameter(ctx.randn(h, in_channels, nv))
        self.out_weight = nn.Parameter(ctx.randn(layer.out_channels, h * nv))
        if layer.b_std is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(ctx.randn(layer.out_channels))
        if layer.pos_emb == "sum":
            self.pos_emb = nn.Parameter(ctx.randn(in_channels, positions))
        else:
            self.register_parameter("pos_emb", None)
        self.register_buffer("pos_emb_factor", None if pos_emb_factor is None else
                             pos_emb_factor.to(ctx.dtype).to(ctx.device))

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        mask = side.get("mask")
        n, c, *spatial = x.shape
        present = None if mask is None else mask.reshape(n, 1, -1)  # (N, 1, P)
        xv = x.reshape(n, c, -1)  # (N, C, P)
        xk = xv
        if self.pos_emb is not None:
            emb = self.pos_emb if self.pos_emb_factor is None else (
                self.pos_emb @ self.pos_emb_factor.T)
            if present is not None:
                emb = emb * present.to(emb.dtype)
            xk = xv + self.pos_emb_std * emb
            if self.pos_emb_in_values:
                xv = xk
        u = torch.einsum("ncp,hck->nhpk", xk, self.key_weight) / math.sqrt(c)
        keys = self.w_key_std * u
        if self.query_weight is None:
            queries = self.w_query_std * u
        else:
            queries = self.w_query_std * torch.einsum(
                "ncp,hck->nhpk", xk, self.query_weight) / math.sqrt(c)
        n_key = u.shape[-1]
        norm = n_key if self.linear_scaling else math.sqrt(n_key)
        attn = _attend(queries @ keys.transpose(-1, -2) / norm,
                       None if present is None else present[:, 0], self.mechanism)
        values = torch.einsum("ncp,hcv->nhpv", xv, self.value_weight) * (
            self.w_value_std / math.sqrt(c))
        heads = (attn @ values).permute(0, 2, 1, 3).flatten(2)  # (N, P, H * n_value)
        out = heads @ self.out_weight.T * (self.w_out_std / math.sqrt(heads.shape[-1]))
        if self.bias is not None:
            out = out + self.b_std * self.bias
        out = out.transpose(1, 2).reshape(n, self.out_channels, *spatial)
        return out if mask is None else mask_input(out, mask)

    def extra_repr(self) -> str:
        h, _, nk = self.key_weight.shape
        return (f"{self.in_channels}, {self.out_channels}, n_heads={h}, key_channels={nk}, "
                f"value_channels={self.value_weight.shape[-1]}, mechanism={self.mechanism!r}, "
                f"linear_scaling={self.linear_scaling}")


def _check_int(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"SelfAttention: {name} must be a positive int, got {value!r}.")


def _check_std(name: str, value) -> None:
    if not is_real(value):
        raise TypeError(f"SelfAttention: {name} must be a real number, got "
                        f"{type(value).__name__} {value!r}.")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"SelfAttention: {name} must be finite and >= 0, got {value}.")

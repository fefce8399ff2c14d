"""Multi-head softmax self-attention at the standard ``1/sqrt(d_head)`` scaling, in the
limit of many wide heads, its kernels computed by sampling the Gaussian logits.

Hron, Bahri, Sohl-Dickstein & Novak, "Infinite attention: NNGP and NTK for deep
attention networks" (ICML 2020), section 3: with independent query and key
weights and logits ``q . k / sqrt(d_head)``, the logits of every head converge
(``d_head -> inf``) to a Gaussian process over (example, query, key) with
covariance ``s^2 K(x_p, x'_p') K(x_q, x'_q')`` (``s = w_query w_key``), and the
output (``n_heads -> inf``) to a Gaussian process whose kernel is an expectation
over those logits (their eq. 9), which has no closed form for the softmax.
neural-tangents refuses this case; here the expectation is computed by Monte
Carlo over the joint Gaussian logits of each pair of inputs, with an explicit
seed, an error that falls as ``n_samples^-1/2``, and `numerical_error` to
report it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import is_int, is_real
from .._side import SideModule, mask_input
from ..kernel import Kernel, position_diagonal
from ._affine import check_b_init, check_parameterization
from ._spatial import require_pairs
from .base import BuildContext, Kernels, Layer, Shapes, single

__all__ = ["MultiheadAttention", "NTKMultiheadAttention", "NumericalError", "numerical_error"]

#: Elements of one chunk of sampled logits (pairs x samples x L x L); bounds memory.
_CHUNK_ELEMENTS = 1 << 22


class MultiheadAttention(Layer):
    """Multi-head self-attention with softmax at the ``1/sqrt(d_head)`` scaling.

    For inputs ``(N, C, L)`` (positions ``p``; any ``(N, C, *S)`` flattened), head
    ``h`` of the finite layer computes, in NTK parameterization with standard
    normal weights::

        Q = w_query x^T W_q / sqrt(C),  K = w_key x^T W_k / sqrt(C)   # (L, d_head)
        A = softmax(Q K^T / sqrt(d_head))        # over keys; causal/absent keys: -inf
        head_h = A (w_value x^T W_v / sqrt(C))
        y = (w_out / sqrt(n_heads d_head)) [head_1 .. head_H] O + b_std b

    the attention of torch's ``nn.MultiheadAttention`` without projection biases.
    In the limit (Hron et al. 2020, eqs. 9-10), with ``K``, ``T`` the incoming
    NNGP and NTK between positions (``K12 = K(x1, x2)``), ``ov = w_out w_value``,
    ``s = w_query w_key`` and ``G1, G2`` the logits of ``x1`` and ``x2``, jointly
    Gaussian with ``Cov(G1[p,q], G2[p',r]) = s^2 K12[p,p'] K12[q,r]``::

        K'[p,p'] = ov^2 E[(A1 K12 A2^T)[p,p']] + b_std^2
        T'[p,p'] = ov^2 E[(A1 (T12 + 2 K12) A2^T)[p,p']
                         + s^2 ((2 K12 + T12)[p,p'] <M_pp', K12> + K12[p,p'] <M_pp', T12>)]
                   + b_std^2

    where ``A = softmax(G)`` and ``M_pp' = J(a_p) K12 J(a'_p')`` with
    ``J(a) = diag(a) - a a^T`` the softmax Jacobian of query row ``p``: the last
    terms are the query and key weights (``2 K12 K12``) and the inputs of queries
    and keys (``T12 K12``, ``K12 T12``), which do not vanish at this scaling.
    With ``mechanism="identity"`` (``A = G``) the same formulas give
    `SelfAttention`'s closed form (``linear_scaling=False``), a check of both.

    ``parameterization="standard"`` (torch's: weights ``N(0, w^2 / fan_in)``, no
    multipliers) has the same NNGP; each weight's NTK term is multiplied by
    ``fan_in / w^2`` of its weight (as `Linear`'s): the value and output terms
    become ``(C w_out^2 + E w_value^2) E[A1 K12 A2^T]`` and the query and key
    terms ``ov^2 C (w_key^2 + w_query^2) K12[p,p'] E<M_pp', K12>`` (``C`` the input
    width, ``E = out_channels``). ``proj_bias=True`` adds torch's query, key and
    value biases, which start at zero and are trained: the value bias adds
    ``w_out^2 E[(A1 1)(A2 1)^T]`` (1 where a query sees a key), the query bias
    ``ov^2 w_key^2 E<M_pp', K12>``, the key bias nothing (a shift of a query's
    logits that is the same for all keys leaves the softmax unchanged).
    ``b_init="zero"`` starts the output bias at zero (torch's ``out_proj.bias``):
    it leaves the NNGP and adds ``b_std^2`` to the NTK (``1`` in standard
    parameterization).

    Numerics: for each pair of inputs the ``2L x 2L`` covariance of their
    positions is factored (symmetric square root ``R``), and the logits are
    ``s R_x Xi R_x^T`` for standard normal ``Xi`` (``2L x 2L``), drawn once per
    call from ``torch.Generator().manual_seed(seed)`` and shared by all pairs and
    tiles, so the kernel does not depend on tiling. Each draw is used four times
    (``Xi``, ``-Xi`` and their block swaps), which makes ``k(x, x)`` symmetric
    and cancels odd terms. The sampling error of each entry falls as
    ``n_samples^-1/2`` (four times the samples, half the error);
    `numerical_error` estimates it from independent replicates.

    Args:
        out_channels: output width.
        n_heads: heads of the finite twin (the kernel is their infinite limit).
        w_query_std, w_key_std, w_value_std, w_out_std: weight scales.
        b_std: output bias scale; None for no bias.
        causal: decoder attention: query ``p`` sees only keys ``q <= p``.
        mechanism: ``"softmax"``, or ``"identity"`` (no normalisation, the closed
            form of `SelfAttention`, for checks).
        n_samples: Gaussian logit draws per pair of inputs, a multiple of 4.
        seed: seed of the draws; or pass ``generator``.
        generator: a `torch.Generator` from which the seed is drawn once, here.
        in_channels: checked against the inputs when given.
        parameterization: ``"ntk"`` or ``"standard"``.
        proj_bias: trained query, key and value biases starting at zero.
        b_init: ``"normal"`` or ``"zero"``, for the output bias (see `Linear`).

    Raises:
        ValueError: invalid widths, scales or sample counts.
    """

    spec_names = ("multiheadattention", "mha")
    honours_masks = True

    def __init__(self, out_channels: int, n_heads: int = 1, *, w_query_std: float = 1.0,
                 w_key_std: float = 1.0, w_value_std: float = 1.0, w_out_std: float = 1.0,
                 b_std: float | None = 0.0, causal: bool = False,
                 mechanism: Literal["softmax", "identity"] = "softmax",
                 n_samples: int = 256, seed: int = 0,
                 generator: torch.Generator | None = None,
                 in_channels: int | None = None,
                 parameterization: Literal["ntk", "standard"] = "ntk",
                 proj_bias: bool = False, b_init: Literal["normal", "zero"] = "normal"
                 ) -> None:
        for name, value in (("out_channels", out_channels), ("n_heads", n_heads),
                            ("n_samples", n_samples)):
            if not is_int(value) or value < 1:
                raise ValueError(f"MultiheadAttention: {name} must be a positive int, got "
                                 f"{value!r}.")
        if out_channels % n_heads:
            raise ValueError(f"MultiheadAttention: out_channels={out_channels} is not "
                             f"divisible by n_heads={n_heads} (d_head = out_channels // "
                             f"n_heads, as torch.nn.MultiheadAttention).")
        if n_samples % 4:
            raise ValueError(f"MultiheadAttention: n_samples must be a multiple of 4 (each "
                             f"draw is used with its sign flip and block swap), got "
                             f"{n_samples}; use {4 * math.ceil(n_samples / 4)}.")
        for name, value in (("w_query_std", w_query_std), ("w_key_std", w_key_std),
                            ("w_value_std", w_value_std), ("w_out_std", w_out_std),
                            ("b_std", b_std)):
            if value is None and name == "b_std":
                continue
            if not is_real(value) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"MultiheadAttention: {name} must be a finite number >= 0, "
                                 f"got {value!r}.")
        if mechanism not in ("softmax", "identity"):
            raise ValueError(f"MultiheadAttention: mechanism must be 'softmax' or 'identity', "
                             f"got {mechanism!r}.")
        if not isinstance(causal, bool):
            raise TypeError(f"MultiheadAttention: causal must be a bool, got {causal!r}.")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"MultiheadAttention: generator must be a torch.Generator, "
                                f"got {type(generator).__name__}.")
            seed = int(torch.randint(0, 2**62, (), generator=generator,
                                     device=generator.device))
        if not is_int(seed) or seed < 0:
            raise ValueError(f"MultiheadAttention: seed must be an int >= 0, got {seed!r}.")
        if in_channels is not None and (not is_int(in_channels) or in_channels < 1):
            raise ValueError(f"MultiheadAttention: in_channels must be a positive int, got "
                             f"{in_channels!r}.")
        if not isinstance(proj_bias, bool):
            raise TypeError(f"MultiheadAttention: proj_bias must be a bool, got {proj_bias!r}.")
        self.parameterization = check_parameterization(parameterization, "MultiheadAttention")
        self.proj_bias = proj_bias
        self.b_init = check_b_init(b_init, b_std, "MultiheadAttention")
        self.out_channels, self.n_heads = int(out_channels), int(n_heads)
        self.w_query_std, self.w_key_std = float(w_query_std), float(w_key_std)
        self.w_value_std, self.w_out_std = float(w_value_std), float(w_out_std)
        self.b_std = None if b_std is None else float(b_std)
        self.causal, self.mechanism = causal, mechanism
        self.n_samples, self.seed = int(n_samples), int(seed)
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
        cov_pairs = k.cov_pairs
        c1, c2 = k.self_covariances(lambda c: c)
        same2 = c2 is c1
        mask = k.side_pair("mask")
        f1 = f2 = None
        if mask is not None:
            f1 = mask[0].reshape(mask[0].shape[0], p)
            f2 = f1 if mask[1] is mask[0] else mask[1].reshape(mask[1].shape[0], p)
        xi = self._draws(p, k.dtype, k.device)

        def flat(t: Tensor, batch: int) -> Tensor:
            return t.reshape(*t.shape[:batch], p, p)

        def unflat(t: Tensor, batch: int) -> Tensor:
            return t.reshape(*t.shape[:batch], *spatial, *spatial)

        def self_pairs(cov: Tensor, present: Tensor | None) -> Tensor:
            cov = flat(cov, 1)
            return self._expect(cov, cov, cov, None, present, present, xi)[0]

        if k.diagonal:
            nngp, ntk = flat(k.nngp, 1), flat(k.ntk, 1)
            out_nngp, out_ntk = self._expect(nngp, nngp, nngp, ntk, f1, f1, xi, k.shape[0])
            out_cov1 = out_cov2 = out_nngp
        else:
            n1, n2 = k.nngp.shape[:2]
            a, b = flat(c1, 1), flat(c2, 1)
            k11 = a[:, None].expand(n1, n2, p, p).reshape(-1, p, p)
            k22 = b[None].expand(n1, n2, p, p).reshape(-1, p, p)
            m1 = None if f1 is None else f1[:, None].expand(n1, n2, p).reshape(-1, p)
            m2 = None if f2 is None else f2[None].expand(n1, n2, p).reshape(-1, p)
            out_nngp, out_ntk = self._expect(k11, flat(k.nngp, 2).reshape(-1, p, p), k22,
                                             flat(k.ntk, 2).reshape(-1, p, p), m1, m2, xi,
                                             k.shape[0])
            out_nngp = out_nngp.reshape(n1, n2, p, p)
            out_ntk = out_ntk.reshape(n1, n2, p, p)
            out_cov1 = self_pairs(c1, f1)
            out_cov2 = out_cov1 if same2 and f2 is f1 else self_pairs(c2, f2)
        ov2 = (self.w_out_std * self.w_value_std) ** 2
        b2 = 0.0 if self.b_std is None or self.b_init == "zero" else self.b_std**2
        if self.b_std is None:
            b_ntk = 0.0
        else:  # the output bias's gradient
            b_ntk = 1.0 if self.parameterization == "standard" else self.b_std**2
        out_nngp, out_ntk = ov2 * out_nngp + b2, out_ntk + b_ntk
        if k.diagonal:
            out_cov1 = out_cov2 = out_nngp
        else:
            out_cov1 = ov2 * out_cov1 + b2
            out_cov2 = out_cov1 if same2 and f2 is f1 else ov2 * out_cov2 + b2
        b_axes = 1 if k.diagonal else 2
        out_cov1, out_cov2 = unflat(out_cov1, 1), unflat(out_cov2, 1)
        if not cov_pairs:
            out_cov1 = position_diagonal(out_cov1, 1)
            out_cov2 = out_cov1 if out_cov2 is out_cov1 else position_diagonal(out_cov2, 1)
        return k.replace(nngp=unflat(out_nngp, b_axes), ntk=unflat(out_ntk, b_axes),
                         cov1=out_cov1, cov2=out_cov2, shape=(self.out_channels, *spatial),
                         is_gaussian=True, is_input=False, cov_pairs=cov_pairs)

    def _draws(self, p: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The standard normal draws ``(n_samples, 2P, 2P)``: ``n_samples / 4`` from the
        seed, each followed by its sign flip, block swap and both (Hron et al.'s
        logits are odd in the draw, and the swap exchanges the two inputs)."""
        g = torch.Generator().manual_seed(self.seed)
        base = torch.randn(self.n_samples // 4, 2 * p, 2 * p, generator=g, dtype=torch.float64)
        swap = base.roll((p, p), dims=(1, 2))
        xi = torch.stack((base, -base, swap, -swap), 1).reshape(-1, 2 * p, 2 * p)
        return xi.to(dtype=dtype, device=device)

    def _expect(self, k11: Tensor, k12: Tensor, k22: Tensor, t12: Tensor | None,
                m1: Tensor | None, m2: Tensor | None, xi: Tensor, c_in: int = 0
                ) -> tuple[Tensor, Tensor | None]:
        """The sample mean of ``A1 K12 A2^T`` and (``t12`` not None) the NTK without
        the output bias, over the logit draws ``xi``, for a batch of input pairs
        ``(B, P, P)`` (``m1``, ``m2``: present positions ``(B, P)``, or None)."""
        m = _sample_means(self, k11, k12, k22, t12, m1, m2, xi)
        ntk = None if t12 is None else _ntk_terms(self, m, k12, t12, c_in)
        return m["aka"], ntk

    # ---------------------------------------------------------------- finite twin
    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        spatial = self._spatial(shape)
        return NTKMultiheadAttention(self, shape[0], ctx), (self.out_channels, *spatial)

    def _spatial(self, shape: Shapes) -> tuple[int, ...]:
        if not shape or isinstance(shape[0], tuple):
            raise ValueError(f"{self!r} takes one input but receives branches {shape}.")
        if len(shape) < 2:
            raise ValueError(f"{self!r} attends over positions and takes sequences (N, C, L) "
                             f"but receives dense features of per-example shape "
                             f"{tuple(shape)}; reshape x to (N, C, L).")
        if self.in_channels is not None and shape[0] != self.in_channels:
            raise ValueError(f"{self!r} expects {self.in_channels} input channels but "
                             f"receives {shape[0]}; inputs are channels first, (N, C, L).")
        return tuple(shape[1:])

    def spec_call(self):
        defaults = {"w_query_std": 1.0, "w_key_std": 1.0, "w_value_std": 1.0,
                    "w_out_std": 1.0, "b_std": 0.0, "causal": False, "mechanism": "softmax",
                    "n_samples": 256, "seed": 0, "in_channels": None,
                    "parameterization": "ntk", "proj_bias": False, "b_init": "normal"}
        kw = {k: getattr(self, k) for k, d in defaults.items() if getattr(self, k) != d}
        args = [self.out_channels] + ([self.n_heads] if self.n_heads != 1 else [])
        return "multiheadattention", args, kw

    def __repr__(self) -> str:
        parts = [str(self.out_channels), str(self.n_heads)]
        for name in ("w_query_std", "w_key_std", "w_value_std", "w_out_std"):
            if getattr(self, name) != 1.0:
                parts.append(f"{name}={getattr(self, name)}")
        parts.append(f"b_std={self.b_std}")
        if self.causal:
            parts.append("causal=True")
        if self.mechanism != "softmax":
            parts.append(f"mechanism={self.mechanism!r}")
        for name, default in (("parameterization", "ntk"), ("proj_bias", False),
                              ("b_init", "normal")):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)!r}")
        parts.append(f"n_samples={self.n_samples}, seed={self.seed}")
        return f"MultiheadAttention({', '.join(parts)})"


#: Eigenvalues of a pair's joint covariance below this fraction of its largest are
#: taken as 0. Pairs of inputs that share positions (an input with itself, repeated
#: tokens) have singular covariances, whose square root moves as the square root of
#: rounding errors: 1e-16 in the kernel would move the sampled logits by 1e-8 and
#: make tiled and untiled kernels differ. Dropping directions of relative variance
#: below 1e-6 moves the logits by at most 1e-3 of their scale along them, far below
#: the sampling error, and makes results reproducible across tiles and dtypes.
EIGEN_FLOOR = 1e-6


def _sqrt_psd(j: Tensor) -> Tensor:
    """The symmetric square root of PSD matrices ``(B, n, n)``, computed in float64,
    with eigenvalues below ``EIGEN_FLOOR`` times the largest set to 0."""
    vals, vecs = torch.linalg.eigh(j.to(torch.float64))
    floor = EIGEN_FLOOR * vals[..., -1:].clamp_min(0)
    vals = torch.where(vals > floor, vals, 0.0)
    return ((vecs * vals.sqrt()[..., None, :]) @ vecs.transpose(-1, -2)).to(j.dtype)


def _attend(g: Tensor, present: Tensor | None, causal: bool, mechanism: str) -> Tensor:
    """Attention weights from logits ``(B, S, P, P)``: absent keys (``present``
    ``(B, P)``) and, if ``causal``, later keys get none; a query with no key left
    gets zeros (its output is absent anyway)."""
    p = g.shape[-1]
    keep = None
    if present is not None:
        keep = present[:, None, None, :].expand(g.shape[0], 1, p, p)
    if causal:
        tri = torch.ones(p, p, dtype=torch.bool, device=g.device).tril()
        keep = tri if keep is None else keep & tri
    if mechanism == "identity":
        return g if keep is None else g * keep.to(g.dtype)
    if keep is None:
        return torch.softmax(g, -1)
    a = torch.softmax(g.masked_fill(~keep, -math.inf), -1)
    return torch.where(keep.any(-1, keepdim=True), a, 0.0)


def _sample_means(layer: MultiheadAttention, k11: Tensor, k12: Tensor, k22: Tensor,
                  t12: Tensor | None, m1: Tensor | None, m2: Tensor | None, xi: Tensor
                  ) -> dict[str, Tensor]:
    """The means over the draws ``xi`` ``(S, 2P, 2P)`` of the NNGP bracket
    ``aka = A1 K12 A2^T`` and (``t12`` not None) the pieces of the NTK (see
    `_ntk_terms`) for pairs of inputs ``(B, P, P)``; the draws are processed in
    chunks that keep ``B x chunk x P x P`` under ``_CHUNK_ELEMENTS``."""
    b, p, _ = k12.shape
    joint = torch.cat((torch.cat((k11, k12), -1), torch.cat((k12.transpose(-1, -2), k22), -1)),
                      -2)
    r = _sqrt_psd(joint)
    r1, r2 = r[:, :p], r[:, p:]
    s = layer.w_query_std * layer.w_key_std
    kv = k12[:, None]
    n_total = xi.shape[0]
    chunk = max(4, (_CHUNK_ELEMENTS // max(1, b * p * p * 4)) // 4 * 4)
    names = ("aka",) if t12 is None else ("aka", "ata", "fk", "ft", "a11a")
    sums = {n: torch.zeros(b, p, p, dtype=k12.dtype, device=k12.device) for n in names}
    for i0 in range(0, n_total, chunk):
        z = xi[i0:i0 + chunk]
        g1 = s * torch.einsum("bpa,sac,bqc->bspq", r1, z, r1)
        g2 = s * torch.einsum("bpa,sac,bqc->bspq", r2, z, r2)
        a1 = _attend(g1, m1, layer.causal, layer.mechanism)
        a2 = _attend(g2, m2, layer.causal, layer.mechanism)
        a2t = a2.transpose(-1, -2)
        nn_s = (a1 @ kv) @ a2t  # (B, S, P, P)
        sums["aka"] += nn_s.sum(1)
        if t12 is None:
            continue
        ata = a1 @ t12[:, None] @ a2t
        if layer.mechanism == "identity":
            f_k = _bracket_identity(kv, kv)
            f_t = _bracket_identity(kv, t12[:, None])
        else:
            shared = (kv @ a2t, kv.transpose(-1, -2) @ a1.transpose(-1, -2))
            f_k = _bracket(a1, a2, a2t, kv, kv, nn_s, nn_s, shared)
            f_t = _bracket(a1, a2, a2t, kv, t12[:, None], nn_s, ata, shared)
        sums["ata"] += ata.sum(1)
        sums["fk"] += f_k.expand_as(nn_s).sum(1)
        sums["ft"] += f_t.expand_as(nn_s).sum(1)
        sums["a11a"] += (a1.sum(-1)[..., :, None] * a2.sum(-1)[..., None, :]).sum(1)
    return {n: v / n_total for n, v in sums.items()}


def _ntk_terms(layer: MultiheadAttention, m: dict, k12: Tensor, t12: Tensor, c_in: int
               ) -> Tensor:
    """The NTK of `MultiheadAttention` without its output bias, from the sample
    means ``m`` (``aka = E[A1 K12 A2^T]``, ``ata`` the same with ``T12``, ``fk`` and
    ``ft`` the brackets ``E<M_pp', K12>`` and ``E<M_pp', T12>``, ``a11a``); ``c_in``
    is the input width (the standard parameterization's fan-ins)."""
    wq2, wk2 = layer.w_query_std**2, layer.w_key_std**2
    wv2, wo2 = layer.w_value_std**2, layer.w_out_std**2
    ov2, s2 = wo2 * wv2, wq2 * wk2
    if layer.parameterization == "ntk":  # value and output; query and key weights
        c_aka, c_kfk = 2 * ov2, 2 * ov2 * s2
    else:  # each weight's term times fan_in / w^2 (see `Linear`)
        c_aka, c_kfk = layer.out_channels * wv2 + c_in * wo2, ov2 * c_in * (wq2 + wk2)
    out = ov2 * m["ata"] + c_aka * m["aka"] + ov2 * s2 * (t12 * m["fk"] + k12 * m["ft"])
    out = out + c_kfk * k12 * m["fk"]
    if layer.proj_bias:  # value bias; query bias (the key bias shifts a softmax row)
        out = out + wo2 * m["a11a"] + ov2 * wk2 * m["fk"]
    return out


def _bracket(a1, a2, a2t, kv, bm, a_kv_a, a_b_a, shared):
    """``<M_pp', B>`` for all query pairs: ``M_pp' = J(a1_p) Kv J(a2_p')`` with the softmax
    Jacobian ``J(a) = diag(a) - a a^T``, expanded into four products of ``(P, P)``
    matrices (``a_kv_a = A1 Kv A2^T``, ``a_b_a = A1 B A2^T``, ``shared`` =
    ``(Kv A2^T, Kv^T A1^T)``, which do not depend on ``B``)."""
    kv_a2t, kvt_a1t = shared
    term1 = a1 @ (kv * bm) @ a2t
    term2 = a1 @ (kv_a2t * (bm @ a2t))
    term3 = (a2 @ (kvt_a1t * (bm.transpose(-1, -2) @ a1.transpose(-1, -2)))).transpose(
        -1, -2)
    return term1 - term2 - term3 + a_kv_a * a_b_a


def _bracket_identity(kv, bm):
    """``<M_pp', B>`` for the identity mechanism (``J = I``): ``<Kv, B>`` for every pair."""
    return (kv * bm).sum((-2, -1), keepdim=True)


class NTKMultiheadAttention(SideModule):
    """The finite twin of `MultiheadAttention`: ``query_weight``, ``key_weight``,
    ``value_weight`` ``(n_heads, C, d_head)``, ``out_weight`` ``(out_channels,
    out_channels)``, ``bias``, and with ``proj_bias`` the zero-initialised
    ``query_bias``, ``key_bias``, ``value_bias`` ``(n_heads, 1, d_head)``; plain
    matmuls and softmax (no fused kernel), so forward-mode derivatives exist.
    In NTK parameterization the weights are standard normal and scaled in forward;
    in standard parameterization they are drawn at their scale. Inputs ``(N, C, *S)``."""

    def __init__(self, layer: MultiheadAttention, in_channels: int, ctx: BuildContext) -> None:
        super().__init__()
        h, d = layer.n_heads, layer.out_channels // layer.n_heads
        e = layer.out_channels
        stds = (layer.w_query_std, layer.w_key_std, layer.w_value_std, layer.w_out_std)
        fans = (in_channels, in_channels, in_channels, h * d)
        scales = [w / math.sqrt(f) for w, f in zip(stds, fans)]
        self.standard = layer.parameterization == "standard"
        draw = [sc if self.standard else 1.0 for sc in scales]
        self.multipliers = [1.0 if self.standard else sc for sc in scales]
        self.causal, self.mechanism = layer.causal, layer.mechanism
        self.query_weight = nn.Parameter(ctx.randn(h, in_channels, d) * draw[0])
        self.key_weight = nn.Parameter(ctx.randn(h, in_channels, d) * draw[1])
        self.value_weight = nn.Parameter(ctx.randn(h, in_channels, d) * draw[2])
        self.out_weight = nn.Parameter(ctx.randn(e, h * d) * draw[3])
        for name in ("query_bias", "key_bias", "value_bias"):
            if layer.proj_bias:
                ref = self.query_weight
                self.register_parameter(name, nn.Parameter(ref.new_zeros(h, 1, d)))
            else:
                self.register_parameter(name, None)
        b_std = layer.b_std or 0.0
        self.bias_multiplier = 1.0
        if layer.b_std is None:
            self.register_parameter("bias", None)
        elif layer.b_init == "zero":
            self.bias = nn.Parameter(self.out_weight.new_zeros(e))
            self.bias_multiplier = 1.0 if self.standard else b_std
        elif self.standard:
            self.bias = nn.Parameter(ctx.randn(e) * b_std)
        else:
            self.bias = nn.Parameter(ctx.randn(e))
            self.bias_multiplier = b_std

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        mq, mk, mv, mo = self.multipliers
        mask = side.get("mask")
        n, c, *spatial = x.shape
        xf = x.reshape(n, c, -1)
        d = self.query_weight.shape[-1]

        def project(weight: Tensor, multiplier: float, bias: Tensor | None) -> Tensor:
            y = torch.einsum("ncp,hcd->nhpd", xf, weight) * multiplier
            return y if bias is None else y + bias

        q = project(self.query_weight, mq, self.query_bias)
        k = project(self.key_weight, mk, self.key_bias)
        v = project(self.value_weight, mv, self.value_bias)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # (N, H, P, P)
        present = None if mask is None else mask.reshape(n, -1)
        a = _attend(logits, present, self.causal, self.mechanism)
        heads = (a @ v).permute(0, 2, 1, 3).flatten(2)  # (N, P, H d)
        out = heads @ self.out_weight.T * mo
        if self.bias is not None:
            out = out + self.bias_multiplier * self.bias
        out = out.transpose(1, 2).reshape(n, -1, *spatial)
        return out if mask is None else mask_input(out, mask)


@dataclass(frozen=True)
class NumericalError:
    """A kernel computed with sampled attention and its estimated sampling error.

    Attributes:
        kernel: the mean kernel over the replicates (its own error is
            ``nngp_error / sqrt(replicates)``).
        nngp_error: per-entry standard deviation, over replicates, of
            ``net.kernel(...)``'s NNGP: the error of one call at the network's
            ``n_samples``; shape of ``kernel.nngp``.
        ntk_error: the same for the NTK.
        replicates: the number of independent replicates.
    """

    kernel: Kernel
    nngp_error: Tensor
    ntk_error: Tensor
    replicates: int

    def relative(self) -> tuple[float, float]:
        """The largest NNGP and NTK errors over the largest entry of each kernel."""
        return (float(self.nngp_error.max() / self.kernel.nngp.abs().max()),
                float(self.ntk_error.max() / self.kernel.ntk.abs().max()))


def numerical_error(net: Layer, x1, x2=None, *, replicates: int = 4, **kernel_kwargs
                    ) -> NumericalError:
    """``net.kernel(x1, x2, ...)`` with the sampling error of its attention layers.

    Each replicate recomputes the kernel with every `MultiheadAttention` layer's
    seed changed (independent draws); the spread of the replicates is the error
    of one call (Hron et al.'s expectation has no closed form). Layers after the
    attention transform the kernel smoothly, so the spread measures the error of
    the network's output kernel, not only of the attention layer.

    Args:
        net: the network.
        x1, x2: its inputs, as for `Layer.kernel`.
        replicates: independent replicates, >= 2.
        **kernel_kwargs: passed to `Layer.kernel` (``mask=``, ``diagonal=``, ...).

    Raises:
        ValueError: ``replicates < 2``, or a network without sampled attention.
    """
    import copy

    if not is_int(replicates) or replicates < 2:
        raise ValueError(f"numerical_error: replicates must be an int >= 2 (a spread needs "
                         f"two), got {replicates!r}.")
    if not _attention_layers(net):
        raise ValueError(f"numerical_error: {type(net).__name__} has no MultiheadAttention "
                         f"layer; its kernel is computed in closed form, without sampling "
                         f"error.")
    runs = []
    for r in range(replicates):
        copy_ = copy.deepcopy(net)
        for layer in _attention_layers(copy_):
            layer.seed = (layer.seed + 7919 * (r + 1) * 1_000_003) % 2**62
        runs.append(copy_.kernel(x1, x2, **kernel_kwargs))
    nngp = torch.stack([k.nngp for k in runs])
    ntk = torch.stack([k.ntk for k in runs])
    mean = runs[0].replace(nngp=nngp.mean(0), ntk=ntk.mean(0))
    return NumericalError(mean, nngp.std(0), ntk.std(0), int(replicates))


def _attention_layers(net: Layer) -> list[MultiheadAttention]:
    found, todo, seen = [], [net], set()
    while todo:
        layer = todo.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, MultiheadAttention):
            found.append(layer)
        for value in vars(layer).values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, Layer):
                    todo.append(item)
    return found

"""Leading-order 1/width corrections of fully connected networks at initialisation.

A network ``Linear, act, Linear, act, ..., Linear`` with hidden widths
``n_1, ..., n_{L-1}``. Write ``z^l`` for the pre-activations of layer ``l``,
``G^l_ab = sb^2 + (sw^2 / n_{l-1}) sum_k s(z^{l-1}_k(a)) s(z^{l-1}_k(b))`` for
the *stochastic metric* (the covariance of ``z^l`` given the layers below;
Roberts, Yaida & Hanin 2022, "The Principles of Deep Learning Theory" (PDLT),
eq. 4.73) and ``Theta^l`` for the empirical NTK of one neuron of layer ``l``.
The empirical NNGP of a network is ``G^L`` (the readout's metric, which is also
the NNGP of its last hidden layer's features); its empirical NTK is
``Theta^L_11``. Given the layers below, the neurons of a layer are independent
and ``z^l ~ N(0, G^l)``, which gives exact layer-to-layer identities; the
fluctuations are then expanded to first order in ``1/n`` (the delta method):

- NNGP covariance, the four-point vertex (PDLT eq. 4.90, written for the
  covariance of the metric ``Cov[G_ab, G_cd] = V_(ab)(cd) / n``)::

      Cov[G^{l+1}]_(p)(q) = sw^4 / n_l (<s_a s_b s_c s_d> - <s_a s_b><s_c s_d>)
                            + sw^4 sum_{p'q'} dg_p/dG_p' Cov[G^l]_(p')(q') dg_q/dG_q'

  with ``<.>`` over ``N(0, K^l)`` and ``g_p(G) = <s_a s_b>_G``. The first term
  is the variance of an average of ``n_l`` independent neurons, the second the
  propagated fluctuation of ``G^l``.
- NNGP mean shift (PDLT eq. 4.91ff, the 1/n part of the two-point function)::

      E[G^{l+1}] - K^{l+1} = sw^2 (dg . dG^l + 1/2 d2g : Cov[G^l])

- NTK. The forward equation (PDLT eq. 8.12; Hanin & Nica 2020) of the NTK in
  NTK parameterization with ``lambda_b = sb^2``, ``lambda_W = sw^2``
  (standard parameterization: ``lambda_b = 1``, ``lambda_W = n_l``)::

      Theta^{l+1}_ij = delta_ij (lambda_b + lambda_W / n_l sum_k s_k s_k)
                       + sw^2 / n_l sum_{k1 k2} W_ik1 W_jk2 s'_k1 s'_k2 Theta^l_k1k2

  Each diagonal entry is a common level ``T^{l+1} = lambda_b + lambda_W Phi +
  sw^2 Psi`` (``Phi = mean_k s_k s_k``, ``Psi = mean_k s'_k s'_k Theta^l_kk``)
  plus a neuron's own noise from its weight row,
  ``eps_i = sw^2 / n_l sum (W_ik1 W_ik2 - delta) M_k1k2`` with
  ``Var[eps_ab] = O^{l+1}_(ab)(ab) + O^{l+1}_(ab)(ba)``, where
  ``O_(ab)(cd) = E[Theta_k1k2;ab Theta_k1k2;cd]`` (``k1 != k2``) obeys::

      O^{l+1}_(ab)(cd) = sw^4 (<s'_a s'_b s'_c s'_d> Theta_ab Theta_cd / n_l
                               + <s'_a s'_c><s'_b s'_d> O^l_(ab)(cd))

  The variance of the readout's NTK is ``Var[T^L] + Var[eps^L]``, with
  ``Var[T]`` carried jointly with ``Cov[G]`` through the same delta method
  (hidden neurons' own noise averages out at this order). This is PDLT's
  NTK-variance recursion (ch. 8, the A and B tensors) in the form of a
  joint covariance of ``(G, T)``.

- NTK mean shift (PDLT ch. 8, the 1/n part of the NTK mean): ``E[T^{l+1}] =
  lambda_b + lambda_W E[Phi] + sw^2 E[Psi]`` with ``E[Psi] = E[d(G) T] + c^l``
  expanded to second order in ``(G, T)``, and ``c^l = E[s'_a s'_b eps]``, a
  neuron's own NTK noise against its own activations. By Stein's lemma in the
  neuron's weight row, ``c^l = sw^2 / n sum_{a'c'} E[d^2(s'_a s'_b)/dz_a' dz_c']
  U^l[a', c']`` with ``U^l[a', c'] = sw^2 / n sum_{j1 j2} M_j1j2 s_j1(a')
  s_j2(c')``, whose off-diagonal part (``j1 != j2``) again follows from Stein's
  lemma one layer down: ``U^{l+1} = sw^2 Theta^l <s'_a s'_b s_a' s_c'> +
  sw^2 sw'^2 (n_l / n_{l-1}) E_a U^l E_b^T`` with ``E_a[a', a''] =
  <d(s'_a s_a')/dz_a''>``. ``c^l`` is PDLT's NTK-preactivation cross correlation
  (the ``D`` and ``F`` tensors of sec. 8.4, which feed the ``1/n`` part of the NTK
  mean there); Dyer & Gur-Ari 2019 (sec. 3, Feynman diagrams) give the same
  order ``1/n`` for the mean's shift, and Hanin & Nica 2019 its ReLU form. Checked
  against Monte Carlo (tests/test_finite_ntk_mean.py: an exact O(n) conditional
  sampler with control variates, fitted ``b + c/n`` over widths 64..512): ReLU and
  erf at depth 2 agree within 1.5% and reject a coefficient 10% off; ReLU at
  depth 3 agrees within its 3-5% standard error.

Only the pair ``(x1_i, x2_j)`` and the two inputs themselves enter an entry's
corrections, so each entry is one independent small problem (``m = 2`` inputs,
three covariance entries): memory and time are linear in the entries asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import check_finite_output
from ..layers.activations import Activation
from ..layers.base import number
from ..layers.containers import Sequential
from ..layers.linear import Linear
from ._moments import moments, pair_index

__all__ = ["FiniteWidthKernel", "finite_width", "nngp_four_point"]

#: Input pairs per call of the recursions (bounds the work memory of `finite_width`).
PAIR_CHUNK = 8192


@dataclass(frozen=True)
class FiniteWidthKernel:
    """The infinite-width kernels and their leading-order finite-width corrections.

    All ``(N1, N2)`` tensors are per entry of the kernels between ``x1`` and ``x2``.

    Attributes:
        nngp: infinite-width NNGP.
        ntk: infinite-width NTK.
        nngp_var: variance of the empirical NNGP entry (the readout's metric
            ``G^L``, i.e. the NNGP of the last hidden layer's features) at these
            widths, to leading order ``O(1/n)``.
        nngp_mean: mean of the empirical NNGP entry including its ``1/n`` shift.
        ntk_var: variance of the empirical NTK entry of one output, ``O(1/n)``
            relative to ``ntk ** 2``.
        ntk_mean: mean of the empirical NTK entry including its ``1/n`` shift (in
            standard parameterization ``ntk`` itself uses the given widths).
        kurtosis: ``(N1,)``: ``E f^4 / (3 (E f^2)^2)`` of one output at each
            input of ``x1`` (1 for a Gaussian), to leading order:
            ``1 + Var[G_aa] / K_aa^2``.
        width: the hidden widths used.
    """

    nngp: Tensor
    ntk: Tensor
    nngp_var: Tensor
    nngp_mean: Tensor
    ntk_var: Tensor
    ntk_mean: Tensor
    kurtosis: Tensor
    width: tuple[int, ...]


@dataclass(frozen=True)
class _Layer:
    sw2: float
    sb2: float
    lam_w: float
    lam_b: float


def _parse(net, caller: str = "finite_width") -> tuple[list[Linear], list[Activation]]:
    """The Linear layers and the activations between them of an MLP (``caller``, the
    function that names itself in the errors; only finite_width checks the biases)."""
    layers: list = []

    def flatten(layer) -> None:
        if isinstance(layer, Sequential):
            for sub in layer.layers:
                flatten(sub)
        else:
            layers.append(layer)

    flatten(net)
    linears, acts = layers[0::2], layers[1::2]
    ok = (len(layers) % 2 == 1 and all(isinstance(x, Linear) for x in linears)
          and all(isinstance(a, Activation) for a in acts))
    if not ok:
        raise ValueError(
            f"{caller} supports fully connected networks nk.Sequential(Linear, act, "
            f"Linear, act, ..., Linear) with ntkit activations; got layers "
            f"{[type(x).__name__ for x in layers]}. Other architectures: estimate with "
            f"nk.monte_carlo_kernel over built networks.")
    for lin in linears if caller == "finite_width" else ():
        if lin.b_init != "normal":
            raise ValueError(f"{lin!r}: finite_width supports b_init='normal' only.")
    return linears, acts


def _layer(lin: Linear, fan_in: int) -> _Layer:
    sw2 = number(lin.w_std) ** 2
    sb = number(lin.b_std)
    sb2 = 0.0 if sb is None else sb**2
    if lin.parameterization == "ntk":
        return _Layer(sw2, sb2, sw2, sb2)
    return _Layer(sw2, sb2, float(fan_in), 0.0 if sb is None else 1.0)


def _widths(width, hidden: int) -> tuple[int, ...]:
    if isinstance(width, int) and not isinstance(width, bool):
        widths = (width,) * hidden
    elif isinstance(width, Sequence) and len(width) == hidden:
        widths = tuple(width)
    else:
        raise ValueError(
            f"width must be a positive int or a list of {hidden} ints (one per hidden layer), "
            f"got {width!r}.")
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive ints, got {widths!r}.")
    return widths


def _propagate(linears, acts, widths, k0: Tensor, fan_in0: int) -> dict[str, Tensor]:
    """Runs the recursions of the module docstring for a batch of input sets.

    Args:
        k0: ``(B, P)`` input kernel ``x_a . x_b / features`` over the pairs of
            each set of ``m`` inputs (order of `pair_index`).

    Returns:
        ``K, T`` (B, P) infinite-width NNGP and NTK; ``cov`` (B, 2P, 2P) joint
        covariance of ``(G, T)``; ``o_same, o_swap`` (B, P); ``mu_g`` (B, P).
    """
    b, p = k0.shape
    m = round((math.sqrt(8 * p + 1) - 1) / 2)
    ia, ib = pair_index(m)
    diag = {a: ia.index(a) for a in range(m) if (a, a) in zip(ia, ib)}
    paa = torch.tensor([diag[a] for a in ia])
    pbb = torch.tensor([diag[c] for c in ib])
    pmat = torch.tensor([[min(ia.index(min(a, c)) + (max(a, c) - min(a, c)), p - 1)
                          for c in range(m)] for a in range(m)])
    first = _layer(linears[0], fan_in0)
    kk = first.sw2 * k0 + first.sb2
    tt = first.lam_w * k0 + first.lam_b
    cov = k0.new_zeros(b, 2 * p, 2 * p)
    o_same, o_swap = k0.new_zeros(b, p), k0.new_zeros(b, p)
    mu_g, mu_t = k0.new_zeros(b, p), k0.new_zeros(b, p)
    u = k0.new_zeros(b, p, m, m)  # U^l_p[a', c'] (module docstring); 0 after layer 1
    prev = None  # (sw^2, fan-in) of the layer that made the current pre-activations
    eye = torch.eye(p, dtype=k0.dtype)
    for act, lin, n in zip(acts, linears[1:], widths):
        lay = _layer(lin, n)
        mo = moments(act, kk)
        g, d = mo.g, mo.d
        # Means (delta method to second order; c: a neuron's NTK noise against its s's).
        cov_gg = cov[:, :p, :p]
        mu_phi = (torch.einsum("bpq,bq->bp", mo.jac_g, mu_g)
                  + 0.5 * torch.einsum("bpqr,bqr->bp", mo.hess_g, cov_gg))
        cov_tg = cov[:, p:, :p]  # [p, q] = Cov[T_p, G_q]
        own = 0.0
        if prev is not None:
            usym = (u + u.transpose(-1, -2))[:, :, ia, ib]
            own = prev[0] / prev[1] * (mo.jac_d * usym).sum(-1)
        mu_psi = (d * mu_t + tt * torch.einsum("bpq,bq->bp", mo.jac_d, mu_g)
                  + 0.5 * tt * torch.einsum("bpqr,bqr->bp", mo.hess_d, cov_gg)
                  + (mo.jac_d * cov_tg).sum(-1) + own)
        mu_g, mu_t = lay.sw2 * mu_phi, lay.lam_w * mu_phi + lay.sw2 * mu_psi
        # U^{l+1}: E[s'_a s'_b s_a' s_c'] (own neurons) + off-diagonal NTK entries.
        x_ac = mo.x4[:, pmat, :].permute(0, 3, 1, 2)  # [p, a', c'] = E[s'_a s'_b s_a' s_c']
        kmat = kk[:, pmat]
        grad = torch.einsum("bji,biac->bacj", torch.linalg.pinv(kmat, hermitian=True), mo.y3)
        u_new = lay.sw2 * tt[:, :, None, None] * x_ac
        if prev is not None:
            u_new = u_new + lay.sw2 * prev[0] * (n / prev[1]) * (grad[:, ia] @ u @ grad[:, ib]
                                                                  .transpose(-1, -2))
        u, prev = u_new, (lay.sw2, n)
        # Covariances.
        jac = k0.new_zeros(b, 2 * p, 2 * p)
        jac[:, :p, :p] = mo.jac_g
        jac[:, p:, :p] = tt[:, :, None] * mo.jac_d
        jac[:, p:, p:] = torch.diag_embed(d)
        noise = k0.new_empty(b, 2 * p, 2 * p)
        noise[:, :p, :p] = mo.f4 - g[:, :, None] * g[:, None, :]
        cross = (mo.x4 - g[:, :, None] * d[:, None, :]) * tt[:, None, :]
        noise[:, :p, p:] = cross
        noise[:, p:, :p] = cross.transpose(1, 2)
        noise[:, p:, p:] = (mo.d4 - d[:, :, None] * d[:, None, :]) * (tt[:, :, None]
                                                                       * tt[:, None, :])
        mix = torch.cat([torch.cat([lay.sw2 * eye, 0 * eye], 1),
                         torch.cat([lay.lam_w * eye, lay.sw2 * eye], 1)], 0)
        cov = mix @ (jac @ cov @ jac.transpose(1, 2) + noise / n) @ mix.T
        d4pp = torch.diagonal(mo.d4, dim1=1, dim2=2)
        own_var = lay.sw2**2 * d4pp * tt * tt / n
        o_same = own_var + lay.sw2**2 * d[:, paa] * d[:, pbb] * o_same
        o_swap = own_var + lay.sw2**2 * d * d * o_swap
        kk, tt = lay.sw2 * g + lay.sb2, lay.lam_b + lay.lam_w * g + lay.sw2 * d * tt
    return {"K": kk, "T": tt, "cov": cov, "o_same": o_same, "o_swap": o_swap, "mu_g": mu_g,
            "mu_t": mu_t}


def _as_float64(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor of shape (N, features), got "
                         f"{getattr(x, 'shape', type(x).__name__)}.")
    return x.detach().to(torch.float64)


def finite_width(net, x1: Tensor, x2: Tensor | None = None, *, width: int | Sequence[int]
                 ) -> FiniteWidthKernel:
    """Leading-order finite-width statistics of a fully connected network's kernels.

    Implements the recursions of `ntkit.finite.corrections` (PDLT ch. 4 and 8;
    Hanin & Nica 2020; Yaida 2020): the variance of the empirical NNGP and NTK
    entries, their mean shifts and the output's kurtosis, at order ``1/n``.
    Computed in float64; the result is float64 on the CPU.

    Args:
        net: ``nk.Sequential(Linear, act, ..., Linear)`` (NTK or standard
            parameterization, any bias; ntkit activations; kinked ones
            ReLU/LeakyReLU/Abs/Sign are integrated exactly, smooth ones by
            Gauss-Hermite quadrature).
        x1: ``(N1, features)`` inputs.
        x2: ``(N2, features)`` inputs, or None for ``x1``.
        width: the hidden width, one int for all hidden layers or one per layer.

    Returns:
        A `FiniteWidthKernel` with ``(N1, N2)`` entries.
    """
    linears, acts = _parse(net)
    widths = _widths(width, len(acts))
    a = _as_float64(x1, "x1")
    bmat = a if x2 is None else _as_float64(x2, "x2")
    if bmat.shape[1] != a.shape[1]:
        raise ValueError(f"x1 and x2 must have the same features, got {tuple(a.shape)} and "
                         f"{tuple(bmat.shape)}.")
    f = a.shape[1]
    n1, n2 = a.shape[0], bmat.shape[0]
    # Single inputs (m = 1): the diagonal entries and the kurtosis.
    single = lambda x: _propagate(linears, acts, widths, (x * x).sum(1, keepdim=True) / f, f)
    s1 = single(a)
    # Pairs (m = 2): every entry whose two inputs differ.
    same = torch.cdist(a, bmat) == 0
    ii, jj = torch.nonzero(~same, as_tuple=True)
    if x2 is None:
        keep = ii < jj
        ii, jj = ii[keep], jj[keep]
    k0 = torch.stack([(a[ii] ** 2).sum(1), (a[ii] * bmat[jj]).sum(1), (bmat[jj] ** 2).sum(1)],
                     1) / f
    out = {k: torch.zeros(n1, n2, dtype=torch.float64)
           for k in ("nngp", "ntk", "nngp_var", "ntk_var", "nngp_mean", "ntk_mean")}

    def fill(res, rows, cols, pidx, p) -> None:
        cov = res["cov"]
        vals = {"nngp": res["K"][:, pidx], "ntk": res["T"][:, pidx],
                "nngp_var": cov[:, pidx, pidx],
                "ntk_var": cov[:, p + pidx, p + pidx] + res["o_same"][:, pidx]
                + res["o_swap"][:, pidx],
                "nngp_mean": res["K"][:, pidx] + res["mu_g"][:, pidx],
                "ntk_mean": res["T"][:, pidx] + res["mu_t"][:, pidx]}
        for k, v in vals.items():
            out[k][rows, cols] = v
            if x2 is None:
                out[k][cols, rows] = v

    for start in range(0, ii.numel(), PAIR_CHUNK):  # work memory bounded, output linear
        part = slice(start, start + PAIR_CHUNK)
        fill(_propagate(linears, acts, widths, k0[part], f), ii[part], jj[part], 1, 3)
    si, sj = torch.nonzero(same, as_tuple=True)
    if si.numel():
        fill({k: v[si] for k, v in s1.items()}, si, sj, 0, 1)
    kurt = 1 + s1["cov"][:, 0, 0] / s1["K"][:, 0] ** 2
    result = dict(out, kurtosis=kurt)
    check_finite_output(result, "finite_width(...)", causes="kernel")
    return FiniteWidthKernel(nngp=out["nngp"], ntk=out["ntk"], nngp_var=out["nngp_var"],
                             nngp_mean=out["nngp_mean"], ntk_var=out["ntk_var"],
                             ntk_mean=out["ntk_mean"],
                             kurtosis=kurt, width=widths)


def nngp_four_point(net, x: Tensor, index: Tensor, *, width: int | Sequence[int]) -> Tensor:
    """``Cov[G(x_i, x_j), G(x_k, x_l)]`` of the empirical NNGP: the four-point vertex
    ``V_(ij)(kl) / n`` of PDLT eq. 4.90, at leading order.

    Each quadruple is its own problem on its ``m <= 4`` distinct inputs (identical
    rows of ``x`` count as one). ReLU-like activations (`ABReLU`: ReLU, LeakyReLU,
    Abs) are integrated exactly: with ``m <= 2`` by the polar rule, with ``m > 2`` by
    sequential conditioning with the last coordinate in closed form
    (`ntkit.finite._fourth`, ~1e-14 relative, also for nearly singular input sets);
    smooth activations (erf, tanh, GELU, ...) over the inputs each moment involves by a
    Gauss-Legendre rule split at every zero crossing: within ~1e-8 for one or two inputs,
    ~1e-5 absolute in ``E[s_a s_b s_c s_d]`` over four distinct inputs (checked against
    orthant probabilities for erf; ~4 s per quadruple and layer with four distinct
    inputs, 5.3 million nodes); other activations
    (Sign, user functions) by Gauss-Hermite quadrature, about 1e-3 relative.

    Args:
        net: as in `finite_width`.
        x: ``(N, features)`` inputs.
        index: ``(Q, 4)`` integer indices ``(i, j, k, l)`` into ``x``.
        width: as in `finite_width`.

    Returns:
        ``(Q,)`` float64 covariances.
    """
    linears, acts = _parse(net)
    widths = _widths(width, len(acts))
    x = _as_float64(x, "x")
    index = torch.as_tensor(index)
    if index.ndim != 2 or index.shape[1] != 4 or index.is_floating_point():
        raise ValueError(f"index must be an integer tensor of shape (Q, 4), got "
                         f"{tuple(index.shape)} {index.dtype}.")
    if index.numel() and (index.min() < 0 or index.max() >= x.shape[0]):
        raise ValueError(f"index must lie in [0, {x.shape[0]}), got values in "
                         f"[{int(index.min())}, {int(index.max())}].")
    f = x.shape[1]
    out = torch.empty(index.shape[0], dtype=torch.float64)
    groups: dict[int, list] = {}
    # identical inputs are one input (a singular covariance otherwise: the arc-cosine
    # derivatives are undefined at correlation 1)
    _, first = torch.unique(x, dim=0, return_inverse=True)
    rep = {}
    canon = [rep.setdefault(int(c), i) for i, c in enumerate(first.tolist())]
    for q, row in enumerate(index.tolist()):
        row = [canon[r] for r in row]
        uniq = sorted(set(row))
        groups.setdefault(len(uniq), []).append((q, uniq, [uniq.index(r) for r in row]))
    for m, items in groups.items():
        ia, ib = pair_index(m)
        where = {(a, c): p for p, (a, c) in enumerate(zip(ia, ib))}
        sets = torch.tensor([u for _, u, _ in items])
        xs = x[sets]  # (B, m, F)
        gram = torch.einsum("bif,bjf->bij", xs, xs) / f
        k0 = gram[:, ia, ib]
        res = _propagate(linears, acts, widths, k0, f)
        for row, (q, _, loc) in enumerate(items):
            p1 = where[tuple(sorted(loc[:2]))]
            p2 = where[tuple(sorted(loc[2:]))]
            out[q] = res["cov"][row, p1, p2]
    return check_finite_output(out, "nngp_four_point(...)", causes="kernel")

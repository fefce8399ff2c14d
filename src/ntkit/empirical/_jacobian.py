"""The per-example-Jacobian engine of the empirical NTK ("jacobian" and "structured").

Every parameter's per-example Jacobian is taken with ``vmap(jacrev)`` (a loop of
``jacrev`` over the examples for models with torch's recurrent modules, which vmap
cannot batch: `Problem.over_examples`), except those
of the structured sites (Linear and Conv layers, `_structured`), whose parts come
from the layers' inputs ``u`` and output cotangents ``g``: per layer, whichever of
two contractions costs fewer operations,

- Gram matrices, ``sum_{p,q} <g_iap, g_jbq> <u_ip, u_jq>`` (the Jacobian never formed:
  what makes wide dense layers cheap), or
- the Jacobians formed from ``g`` and ``u`` and contracted like the others; when the
  cotangents factor per channel (a layer before global pooling and a dense readout)
  they are kept factored (`separable`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import jacrev

from ._problem import Problem, batched_attention
from ._structured import CallsChanged, Hooks, Site, zero_probes
from ._tiles import contract_jacobians, outer


class Jacobians:
    """Per-example Jacobians for every parameter, with Linear and Conv layers
    (``sites``) through their output cotangents and inputs."""

    def __init__(self, problem: Problem, sites: list[Site]):
        self.problem = problem
        self.sites = sites
        taken = {n for s in sites for n in s.params}
        self.rest = {k: v for k, v in problem.params.items() if k not in taken}
        self.fixed = {k: v for k, v in problem.params.items() if k in taken}
        self.probes = zero_probes(sites, problem)
        self.hooks = Hooks(sites)
        self._sizes = self._measure()
        n1, n2 = problem.x1.shape[0], problem.xs2.shape[0]
        for s in sites:
            s.gram = self._gram_is_cheaper(s, n1, n2)

    def _measure(self) -> dict[str, tuple[int, int, int, int]]:
        """(G, P, K, C) of each site, from one example's shapes."""
        sizes = {s.name: s.sizes for s in self.sites if s.sizes is not None}
        if len(sizes) == len(self.sites):       # measured by `structured_sites`
            return sizes
        with self.hooks:
            (_, inputs) = self.hooks.run(
                lambda: self.problem.f(self.problem.params, self.problem.x1[0]), self.probes)
        for s in self.sites:
            u, g = s.arrays([t.detach().unsqueeze(0) for t in inputs[s.name]],
                            [p.new_zeros((1, 1) + p.shape) for p in self.probes[s.name]])
            sizes[s.name] = (u.shape[1], u.shape[2], u.shape[3], g.shape[4])
        return sizes

    def _gram_is_cheaper(self, s: Site, n1: int, n2: int) -> bool:
        """Whether the Gram contraction of a weight's part costs fewer operations than
        forming and contracting its Jacobians (`contraction_costs`), and fits."""
        jac, gram, fits = contraction_costs(self.problem, self._sizes[s.name], n1, n2)
        return s.weight is not None and gram < jac and fits

    def bytes_per_example(self, o: int | None = None) -> int:
        """Working memory per example for ``o`` outputs at a time (default all)."""
        o, e = o or self.problem.n_out, self.problem.entry
        n = o * sum(v.numel() for v in self.rest.values())
        for s in self.sites:
            groups, p, k, c = self._sizes[s.name]
            n += 2 * groups * p * k + 3 * o * groups * p * c
            if not s.gram and s.weight is not None:
                n += o * groups * c * k
        return max(1, n * e)

    def plan(self) -> tuple[int, int]:
        """Examples and outputs per chunk: all outputs if one example fits half the
        budget, else as many as fit (at least one)."""
        half = self.problem.budget // 2
        outs = self.problem.n_out
        while outs > 1 and self.bytes_per_example(outs) > half:
            outs = max(1, outs // 2)
        rows = max(1, half // self.bytes_per_example(outs))
        q = {"full": outs * outs, "diagonal": outs, "trace": 1}[self.problem.output]
        for s in self.sites:
            if s.gram:
                groups, p, _, _ = self._sizes[s.name]
                per_pair = q * groups * p * p * self.problem.entry
                rows = min(rows, max(1, math.isqrt(self.problem.budget // (4 * per_pair))))
        return rows, outs

    def features(self, x: Tensor, a0: int, a1: int) -> dict[str, tuple]:
        problem, hooks = self.problem, self.hooks

        def f(rest, probes, xi):
            return hooks.run(lambda: problem.f({**self.fixed, **rest}, xi, a0, a1), probes)

        jac = problem.over_examples(jacrev(f, argnums=(0, 1), has_aux=True), (None, None, 0))
        with hooks, batched_attention():
            try:
                (j_rest, j_probes), inputs = jac(self.rest, self.probes, x)
            except CallsChanged as e:
                raise ValueError(
                    f"layer {e} is called a different number of times for different inputs; "
                    f"use method='jacobian' for this model."
                ) from None
        feats: dict[str, tuple] = {}
        n = x.shape[0]
        for name, j in j_rest.items():
            feats[name] = ("jac", j.reshape(n, j.shape[1], -1))
        for s in self.sites:
            u, g = s.arrays(inputs[s.name], j_probes[s.name])
            if s.gram:
                # the bias's part comes from the same cotangent products as the weight's
                w_scale, b_scale = s.scales
                feats[s.weight] = ("gram", u if w_scale == 1.0 else u * w_scale, g, s.bias,
                                   None if s.bias is None else b_scale)
            else:
                sep = separable(u, g) if s.weight is not None else None
                if sep is not None:
                    w_scale = s.scales[0]
                    feats[s.weight] = ("sep", sep[0], sep[1] if w_scale == 1.0
                                       else sep[1] * w_scale)
                    if s.bias is not None:
                        feats[s.bias] = ("jac", s.jacobians(u, g, weight=False)[s.bias])
                else:
                    for pname, j in s.jacobians(u, g).items():
                        feats[pname] = ("jac", j)
        return feats

    @staticmethod
    def split_features(feats: dict[str, tuple], n: int) -> tuple[dict, dict]:
        """The features of a joint batch split into its first ``n`` examples and the
        rest (every tensor of a feature along its example axis; flags and names kept)."""
        def part(sl: slice) -> dict[str, tuple]:
            return {name: tuple(v[sl] if isinstance(v, Tensor) else v for v in f)
                    for name, f in feats.items()}
        return part(slice(None, n)), part(slice(n, None))

    def contract(self, fa: dict, fb: dict):
        output = self.problem.output
        for name, a in fa.items():
            b = fb[name]
            if a[0] == "sep" and b[0] == "sep":
                yield name, _separable_contract(a[1], a[2], b[1], b[2], output)
            elif a[0] in ("jac", "sep"):
                yield name, contract_jacobians(_unfactor(a), _unfactor(b), output)
            elif a[0] == "gram":
                bias, bias_scale = a[3], a[4]
                weight, part = _gram_contract(a[1], a[2], b[1], b[2], output, bias_scale)
                yield name, weight
                if bias is not None:
                    yield bias, part


def contraction_costs(problem: Problem, sizes: tuple[int, int, int, int], n1: int,
                      n2: int) -> tuple[int, int, bool]:
    """Operation counts of the two contractions of a structured weight's part, and
    whether the Gram one fits a quarter of the budget.

    Jacobians: forming them, ``N O G P C K``, then ``N1 N2 O' G C K`` with ``O'`` the
    output pairs contracted (``O^2`` for "full", ``O`` otherwise). Gram matrices:
    ``N1 N2 G P^2 (K + O' C + q)`` with ``q`` the output entries per pair.

    Args:
        problem: the checked call.
        sizes: the site's ``(G, P, K, C)``: groups, positions, inputs and outputs per group.
        n1, n2: the examples on either side.
    """
    groups, p, k, c = sizes
    o, q = problem.n_out, problem.out_pairs
    o2 = o * o if problem.output == "full" else o
    formed = (n1 if problem.x2 is None else n1 + n2) * o * groups * p * c * k
    jac = formed + n1 * n2 * o2 * groups * c * k
    gram = n1 * n2 * groups * p * p * (k + o2 * c + q)
    fits = q * groups * p * p * problem.entry <= problem.budget // 4
    return jac, gram, fits


def separable(u: Tensor, g: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(s, B)`` with ``J[i, a, (g, c), k] = s[i, a, (g, c)] B[i, (g, c), k]`` when every
    example's cotangents factor per channel as ``g[i, a, g, p, c] = s[i, a, g, c] h[i, g, p, c]``
    (to rounding), else None.

    That is the case for a layer whose output reaches the model's outputs through
    per-channel elementwise maps, a pooling over all positions and a dense readout
    (the last convolution of a CNN with global pooling): ``B = h^T u`` is then one
    product per example instead of one per output.
    """
    n, o, groups, p, c = g.shape
    if o < 4 or p < 2 or (n > 1 and separable(u[:1], g[:1]) is None):
        return None     # (the first example alone rejects most layers quickly)
    # in the cotangents' own layout (n, O, G, C, P): h, each channel's positions for the
    # output with the largest cotangent; scale, the least-squares factor of every output
    gt = g.transpose(-1, -2)
    norms = torch.linalg.vector_norm(gt, dim=-1)                         # (n, O, G, C)
    top = norms.argmax(1, keepdim=True)
    h = torch.gather(gt, 1, top.unsqueeze(-1).expand(n, 1, groups, c, p))  # (n, 1, G, C, P)
    hh = norms.gather(1, top).square().clamp_min(torch.finfo(g.dtype).tiny)
    scale = (gt * h).sum(-1) / hh
    err = torch.linalg.vector_norm(torch.addcmul(gt, scale.unsqueeze(-1), h, value=-1))
    if not bool(err <= 64 * torch.finfo(g.dtype).eps * torch.linalg.vector_norm(norms)):
        return None
    h = h.squeeze(1).transpose(-1, -2)                                   # (n, G, P, C)
    b = torch.matmul(h.transpose(-1, -2), u)                             # (n, G, C, K)
    return scale.reshape(n, o, groups * c), b.reshape(n, groups * c, -1)


def _unfactor(feature: tuple) -> Tensor:
    """A "jac" feature's Jacobians, or a "sep" feature's formed from its factors."""
    if feature[0] == "jac":
        return feature[1]
    s, b = feature[1], feature[2]
    return (s.unsqueeze(-1) * b.unsqueeze(1)).flatten(2)


def _separable_contract(sa: Tensor, ba: Tensor, sb: Tensor, bb: Tensor,
                        output: str) -> Tensor:
    """``sum_{c,k} s_a[i,a,c] B_a[i,c,k] s_b[j,b,c] B_b[j,c,k]`` in the output layout."""
    prod = torch.bmm(ba.transpose(0, 1), bb.permute(1, 2, 0)).permute(1, 2, 0)  # (n, m, C)
    if output == "trace":
        return (torch.einsum("iac,jac->ijc", sa, sb) * prod).sum(-1)
    if output == "diagonal":
        return torch.einsum("iac,jac,ijc->ija", sa, sb, prod)
    return torch.einsum("ijac,jbc->ijab", sa.unsqueeze(1) * prod.unsqueeze(2), sb)


def _gram_contract(ua: Tensor, ga: Tensor, ub: Tensor, gb: Tensor, output: str,
                   bias_scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """The weight's part ``sum_{g,p,q} <ga_iagp, gb_jbgq> <ua_igp, ub_jgq>`` and, when
    ``bias_scale`` is given, the bias's part ``bias_scale^2 sum_{g,p,q} <ga_iagp, gb_jbgq>``
    from the same cotangent products, in the output layout."""
    n, o, groups, p, c = ga.shape
    m, ob = gb.shape[:2]
    b2 = None if bias_scale is None else bias_scale ** 2
    if groups == 1 and p == 1:
        uu = ua.reshape(n, -1) @ ub.reshape(m, -1).T                    # (n, m)
        ga, gb = ga.reshape(n, o, c), gb.reshape(m, ob, c)
        if output == "full":
            flat = ga.reshape(n * o, c)
            gg = outer(flat, flat if gb is ga else gb.reshape(m * ob, c))
            gg = gg.reshape(n, o, m, ob).permute(0, 2, 1, 3)
            uu = uu[:, :, None, None]
        else:
            gg = torch.einsum("iac,jac->ij" if output == "trace" else "iac,jac->ija", ga, gb)
            uu = uu if output == "trace" else uu[..., None]
        bias = None if b2 is None else gg * b2
        return gg.mul_(uu), bias
    uu = torch.einsum("igpk,jgqk->ijgpq", ua, ub)
    if output == "trace":
        gg = torch.einsum("iagpc,jagqc->ijgpq", ga, gb)
    elif output == "diagonal":
        gg = torch.einsum("iagpc,jagqc->ijagpq", ga, gb)
        uu = uu[:, :, None]
    else:
        gg = torch.einsum("iagpc,jbgqc->ijabgpq", ga, gb)
        uu = uu[:, :, None, None]
    axes = tuple(range(gg.ndim - 3, gg.ndim))
    bias = None if b2 is None else gg.sum(axes) * b2
    return (gg * uu).sum(axes), bias


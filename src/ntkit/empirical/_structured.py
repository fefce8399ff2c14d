"""The structured empirical NTK of Linear and Conv layers.

For the weight of a dense or convolutional layer, the Jacobian of example ``i``'s
output ``a`` is an outer product summed over positions,
``dW = sum_p g[i, a, p] (x) u[i, p]``, of the cotangent ``g`` at the layer's output
and the layer's input ``u`` (a patch of it for a convolution). This module finds
such layers in a model (`structured_sites`), captures their inputs and output
cotangents with forward hooks (`Hooks`), arranges them as ``u (n, G, P, K)`` and
``g (n, O, G, P, C)`` (`Site.arrays`), and certifies the rule against autograd on
one example before it is used (`verified`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp

from ._problem import Problem

_TORCH_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TWIN = ("pads", "mode", "stride", "dilation")


def layer_kind(m: nn.Module) -> Literal["linear", "conv"] | None:
    """``"linear"`` or ``"conv"`` for a layer whose weight Jacobian is an outer product of
    output cotangent and input, else None.

    These are `torch.nn.Linear`, `torch.nn.Conv1d/2d/3d`, and modules shaped like them
    that scale their stored weight and bias in the forward pass (attributes ``w_scale``
    and ``b_scale``: ntkit's finite twins, built by ``Layer.build``): a dense one with
    ``weight (out_features, in_features)``, a convolution with ``weight (out, in, *k)``
    that pads explicitly (``pads`` in F.pad's order, ``mode``, ``stride``,
    ``dilation``). Known by their shape rather than their class, so this package needs
    none of ntkit's layers; a module taken for one it is not fails the autograd check
    (`verified`) and goes through per-example Jacobians.
    """
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, _TORCH_CONV):
        return "conv"
    w = getattr(m, "weight", None)
    if not isinstance(w, Tensor) or not hasattr(m, "w_scale") or not hasattr(m, "b_scale"):
        return None
    if w.ndim == 2 and tuple(w.shape) == (getattr(m, "out_features", None),
                                          getattr(m, "in_features", None)):
        return "linear"
    nd = w.ndim - 2
    if 1 <= nd <= 3 and all(hasattr(m, a) for a in _CONV_TWIN) and (
            len(m.stride) == len(m.dilation) == nd and len(m.pads) == 2 * nd):
        return "conv"
    return None


@dataclass
class Site:
    """A Linear or Conv layer whose weight (and bias) go the structured way."""

    name: str
    module: nn.Module
    weight: str | None                  # parameter names, if differentiated
    bias: str | None
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)   # per call, batch 1
    gram: bool = False                  # contract by Gram matrices (else Jacobians)
    sizes: tuple[int, int, int, int] | None = None  # (G, P, K, C) of `arrays`, one example

    @property
    def scales(self) -> tuple[float, float]:
        """Factors the layer's forward applies to its weight and bias (NTK parameterization)."""
        m = self.module
        return float(getattr(m, "w_scale", 1.0)), float(getattr(m, "b_scale", 1.0))

    @property
    def params(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]

    def arrays(self, inputs: list[Tensor], cot: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Inputs ``u (n, G, P, K)`` and cotangents ``g (n, O, G, P, C)`` from each call's
        captured input ``(n, *in)`` and output cotangent ``(n, O, *out)``, calls joined
        along the positions P."""
        us, gs = [], []
        for u, g in zip(inputs, cot):
            if layer_kind(self.module) == "linear":
                us.append(u.reshape(u.shape[0], 1, -1, u.shape[-1]))
                gs.append(g.reshape(g.shape[0], g.shape[1], 1, -1, g.shape[-1]))
            else:
                u, g = _conv_arrays(self.module, u, g)
                us.append(u)
                gs.append(g)
        return (torch.cat(us, 2), torch.cat(gs, 3)) if len(us) > 1 else (us[0], gs[0])

    def jacobians(self, u: Tensor, g: Tensor, weight: bool = True) -> dict[str, Tensor]:
        """Per example and output: ``{weight: (n, O, G*C*K), bias: (n, O, G*C)}``."""
        n, o, groups, p, c = g.shape
        w_scale, b_scale = self.scales
        out = {}
        if weight and self.weight is not None:
            # (n, G, O*C, P) @ (n, G, P, K) -> (n, G, O, C, K)
            gt = g.permute(0, 2, 1, 4, 3).reshape(n, groups, o * c, p)
            w = torch.matmul(gt, u).reshape(n, groups, o, c, -1)
            w = w.transpose(1, 2).reshape(n, o, -1)
            out[self.weight] = w if w_scale == 1.0 else w * w_scale
        if self.bias is not None:
            b = g.sum(3).reshape(n, o, -1)
            out[self.bias] = b if b_scale == 1.0 else b * b_scale
        return out


def _conv_geometry(m: nn.Module):
    """Kernel size, stride, dilation, F.pad widths, padding mode and groups."""
    if isinstance(m, _TORCH_CONV):
        return (m.kernel_size, m.stride, m.dilation, list(m._reversed_padding_repeated_twice),
                m.padding_mode, m.groups)
    return (tuple(m.weight.shape[2:]), tuple(m.stride), tuple(m.dilation), list(m.pads),
            m.mode, int(getattr(m, "groups", 1)))


def _conv_arrays(m: nn.Module, u: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Patches ``(n, G, P, K)`` and cotangents ``(n, O, G, P, C)`` of a convolution."""
    kernel, stride, dilation, pad, mode, groups = _conv_geometry(m)
    nd = len(kernel)
    n, o = g.shape[:2]
    if u.ndim == nd + 2:                     # an unbatched call: (C, *S) per example
        u, g = u.unsqueeze(1), g.unsqueeze(2)
    batch = u.shape[1]
    u = u.reshape(-1, *u.shape[2:])          # (n * B, Cin, *S)
    if any(pad):
        u = F.pad(u, pad, mode="constant" if mode == "zeros" else mode)
    cin = u.shape[1]
    if nd <= 2 and batch == 1:
        # torch's im2col: (n, Cin * taps, P), viewed as (n, G, P, K) without a copy
        as2d = (lambda t: t) if nd == 2 else (lambda t: (1,) + tuple(t))
        u = F.unfold(u if nd == 2 else u.unsqueeze(2), as2d(kernel), dilation=as2d(dilation),
                     stride=as2d(stride))
        npos = u.shape[-1]
        u = u.reshape(n, groups, -1, npos).transpose(-1, -2)
    else:
        for d in range(nd):
            u = u.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
        u = u[(Ellipsis,) + tuple(slice(None, None, dl) for dl in dilation)]
        # (n*B, Cin, *S_out, *k) -> (n, G, B*P, Cin/G * taps) in one copy
        npos = batch * math.prod(u.shape[2:2 + nd])
        u = u.reshape(n, batch, groups, cin // groups, *u.shape[2:])
        s_dims, k_dims = list(range(4, 4 + nd)), list(range(4 + nd, 4 + 2 * nd))
        u = u.permute(0, 2, 1, *s_dims, 3, *k_dims).reshape(n, groups, npos, -1)
    # cotangents (n, O, B, Cout, *S_out): a view (n, O, G, P, C) of (n, O, G, C, P) when B = 1
    cout = g.shape[3]
    g = g.reshape(n, o, batch, groups, cout // groups, -1)
    if batch == 1:
        g = g[:, :, 0].transpose(-1, -2)
    else:
        g = g.permute(0, 1, 3, 2, 5, 4).reshape(n, o, groups, npos, cout // groups)
    return u, g


class Hooks:
    """Forward hooks that add a probe to each call of the sites' modules and keep
    the call's input, so that derivatives with respect to the probes are the
    cotangents at the layers' outputs."""

    def __init__(self, sites: list[Site]):
        self.sites = sites
        self.probes: dict[str, list[Tensor]] | None = None
        self.inputs: dict[str, list[Tensor]] = {}
        self.shapes: dict[str, list[tuple[int, ...]]] | None = None
        self.handles = []

    def __enter__(self):
        for site in self.sites:
            self.handles.append(site.module.register_forward_hook(self._hook(site.name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str):
        def hook(module, args, out):
            if self.shapes is not None:
                self.shapes.setdefault(name, []).append(tuple(out.shape))
                self.inputs.setdefault(name, []).append(args[0])
                return None
            if self.probes is None:
                return None
            calls = self.inputs.setdefault(name, [])
            k = len(calls)
            if k >= len(self.probes[name]):
                raise CallsChanged(name)
            calls.append(args[0])
            return out + self.probes[name][k]
        return hook

    def run(self, fn, probes):
        """Calls ``fn()`` with ``probes`` active; returns its value and the inputs."""
        self.probes, self.inputs = probes, {}
        try:
            value = fn()
            inputs = self.inputs
        finally:
            self.probes, self.inputs = None, {}
        for name, calls in probes.items():
            if len(inputs.get(name, ())) != len(calls):
                raise CallsChanged(name)
        return value, inputs


class CallsChanged(RuntimeError):
    """A layer was called a different number of times than on the first example."""


def structured_sites(problem: Problem, *, verify: bool = True) -> list[Site]:
    """The Linear and Conv layers whose parameters can go the structured way, with
    their shapes (``out_shapes``, ``sizes``) from one forward pass of one example;
    checked against autograd on that example (`verified`) unless ``verify`` is False
    (candidates for a cost estimate, not yet to be used)."""
    by_module = {}
    for name, m in problem.model.named_modules():
        if layer_kind(m) is None or _is_parametrized(m):
            continue
        w, b = f"{name}.weight" if name else "weight", f"{name}.bias" if name else "bias"
        w = w if w in problem.params and problem.params[w] is not None else None
        b = b if b in problem.params and getattr(m, "bias", None) is not None else None
        if w is not None or b is not None:
            by_module[name] = Site(name, m, w, b)
    if not by_module:
        return []
    sites = list(by_module.values())
    hooks = Hooks(sites)
    hooks.shapes = {}
    with hooks, torch.no_grad():
        problem.f(problem.params, problem.x1[0])
    shapes, inputs, hooks.shapes, hooks.inputs = hooks.shapes, hooks.inputs, None, {}
    sites = [s for s in sites if s.name in shapes]
    p0 = next(iter(problem.params.values()))
    for s in sites:
        s.out_shapes = shapes[s.name]
        try:
            u, g = s.arrays([t.unsqueeze(0) for t in inputs[s.name]],
                            [p0.new_zeros((1, 1) + shape) for shape in s.out_shapes])
        except RuntimeError:    # shapes that do not fit the rule: not such a layer
            continue
        s.sizes = (u.shape[1], u.shape[2], u.shape[3], g.shape[4])
    sites = [s for s in sites if s.sizes is not None]
    if not sites or not verify:
        return sites
    return verified(problem, sites)


def _is_parametrized(m: nn.Module) -> bool:
    return bool(getattr(m, "parametrizations", None))


def verified(problem: Problem, sites: list[Site]) -> list[Site]:
    """The sites whose implied weight gradients equal autograd's on one example."""
    names = [n for s in sites for n in s.params]
    fixed = {k: v for k, v in problem.params.items() if k not in names}
    mine = {k: problem.params[k] for k in names}
    probes = zero_probes(sites, problem)
    x = problem.x1[0]
    hooks = Hooks(sites)

    def f(p, pr):
        return hooks.run(lambda: problem.f({**fixed, **p}, x), pr)

    gen = torch.Generator(device="cpu").manual_seed(0)
    p0 = next(iter(problem.params.values()))
    r = torch.randn(problem.n_out, generator=gen, dtype=p0.dtype).to(p0.device)
    try:
        with hooks:
            _, pull, inputs = vjp(f, mine, probes, has_aux=True)
            true, cot = pull(r)
    except CallsChanged:
        return []
    good = []
    eps = torch.finfo(p0.dtype).eps
    for s in sites:
        try:
            u, g = s.arrays([t.unsqueeze(0) for t in inputs[s.name]],
                            [t.unsqueeze(0).unsqueeze(0) for t in cot[s.name]])
            implied = s.jacobians(u, g)
            ok = True
            for pname, jac in implied.items():
                t = true[pname].reshape(-1)
                err = (jac.reshape(-1) - t).norm()
                ok &= bool(err <= 1e3 * eps * (t.norm() + jac.norm()) + 1e-30)
        except RuntimeError:    # shapes that do not fit the rule: not such a layer
            ok = False
        if ok:
            good.append(s)
    return good


def zero_probes(sites: list[Site], problem: Problem) -> dict[str, list[Tensor]]:
    """Zero tensors of each site's output shape per call: the points at which the
    cotangents are taken."""
    p0 = next(iter(problem.params.values()))
    return {s.name: [p0.new_zeros(shape) for shape in s.out_shapes] for s in sites}


"""The empirical NTK and NNGP of any PyTorch model.

The empirical NTK is ``Theta(x1, x2) = J(x1) J(x2)^T``, where ``J(x)`` is the
Jacobian of the model's outputs with respect to its trainable parameters at
their current values. Three exact methods are offered, all with `torch.func`
over chunks of inputs that fit a memory budget:

- ``"jacobian"``: per-example Jacobians, contracted parameter by parameter;
- ``"structured"``: for the weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``
  layers, the Jacobian of example ``i``'s output ``a`` is an outer product
  summed over positions, ``dW = sum_p g[i, a, p] (x) u[i, p]``, of the
  cotangent ``g`` at the layer's output and the layer's input ``u`` (a patch
  of it for a convolution). Its contribution is then either
  ``sum_{p,q} <g_iap, g_jbq> <u_ip, u_jq>`` (two Gram matrices, never forming
  the Jacobian: what makes wide dense layers cheap) or the product of the
  Jacobians formed from ``g`` and ``u``, whichever costs fewer operations for
  the shapes at hand. Only the cotangents at layer outputs are
  back-propagated. Every other parameter goes through ``"jacobian"``;
- ``"vector_products"``: ``J(x1) (J(x2)^T e)`` for each output basis vector
  ``e`` of ``x2`` (a vector-Jacobian then a Jacobian-vector product), which
  never holds a Jacobian but costs a forward-mode pass per pair of examples.

The structured rule is only trusted where it is checked: before use, the
weight gradients it implies for one example and a random output direction are
compared with autograd's. A layer whose weight is also used outside its own
forward (tied weights, ``F.linear(x, layer.weight)``) fails that check and
goes through ``"jacobian"`` instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .compute import parse_memory, progress_bar
from .layers.conv import NTKConv
from .layers.linear import NTKLinear

__all__ = ["empirical_nngp", "empirical_ntk"]

Output = Literal["trace", "full", "diagonal"]
Method = Literal["auto", "jacobian", "vector_products", "structured"]
_OUTPUTS = ("trace", "full", "diagonal")
_METHODS = ("auto", "jacobian", "vector_products", "structured")
#: Layers whose weight Jacobian is an outer product of output cotangent and input
#: (ntkit's own finite twins, built by ``Layer.build``, included).
_LINEAR_TYPES = (nn.Linear, NTKLinear)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, NTKConv)


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    output: Output = "trace",
    method: Method = "auto",
    params: dict[str, Tensor] | None = None,
    by_layer: bool | Literal["parameter", "module"] = False,
    memory_budget: int | str | None = None,
    progress: bool | None = None,
) -> Tensor | dict[str, Tensor]:
    """The finite-width NTK ``J(x1) J(x2)^T`` of ``model`` at its parameters.

    Args:
        model: any `torch.nn.Module` mapping a batch ``(N, ...)`` to outputs
            ``(N, *out)``; it must treat examples independently (call
            ``model.eval()`` for BatchNorm or Dropout).
        x1, x2: input batches (any dtype the model takes, e.g. token ids);
            ``x2=None`` for ``Theta(x1, x1)``.
        output: ``"trace"``: ``sum_a Theta[i, j, a, a]`` over the flattened
            outputs ``a``, shape ``(N1, N2)`` (divide by the number of outputs
            for the per-output mean that approaches the infinite-width NTK);
            ``"full"``: ``(N1, N2, O, O)``; ``"diagonal"``: ``(N1, N2, O)``.
        method: ``"structured"``, ``"jacobian"``, ``"vector_products"`` (see
            the module's docstring) or ``"auto"``: ``"structured"`` (which
            chooses the cheaper contraction per layer and is ``"jacobian"``
            for models without Linear or Conv layers) when one example's
            Jacobian parts fit the memory budget, else ``"vector_products"``.
        params: the parameters to differentiate, ``{name: tensor}``; default
            every parameter with ``requires_grad``. The others are held fixed.
        by_layer: ``True`` or ``"parameter"`` for ``{parameter name: its
            contribution}``, ``"module"`` for ``{module name: contribution}``
            (they sum to the whole), instead of the total.
        memory_budget: bytes, or a string such as ``"2GiB"``, for the working
            memory of a chunk of inputs (default 1 GiB); the result is extra.
        progress: show a progress bar over chunks (default: when long).

    Returns:
        The kernel in the parameters' dtype, on their device.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 2))
        >>> empirical_ntk(model, torch.randn(5, 3), output="full").shape
        torch.Size([5, 5, 2, 2])
    """
    problem = _Problem.make(model, x1, x2, params, output, memory_budget)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    group = _group(by_layer)
    problem.check_result_fits()
    if method == "vector_products":
        engine = _VectorProducts(problem, group is not None)
    else:
        sites = [] if method == "jacobian" else _structured_sites(problem)
        engine = _Jacobians(problem, sites)
        if method == "auto" and engine.bytes_per_example(1) > problem.budget:
            engine = _VectorProducts(problem, group is not None)
    return _tiled(problem, engine, group, by_layer is not False, progress)


def empirical_nngp(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    layer: str | None = None,
    output: Literal["mean", "full", "diagonal"] = "mean",
    memory_budget: int | str | None = None,
) -> Tensor:
    """The covariance of a finite network's outputs, or of a named layer's features.

    With features ``z(x)`` of shape ``(C, *S)`` per example (channels first,
    ``S`` the spatial axes, if any), ``"mean"`` gives
    ``(1/C) sum_c z_c(x1) z_c(x2)`` at matching positions, shape ``(N1, N2, *S)``:
    one network's estimate of the infinite-width NNGP of that layer (compare
    with ``net.kernel(x1, x2).nngp`` of the matching ntkit network).
    ``"full"`` gives every product ``z_a(x1) z_b(x2)`` of the flattened
    features, ``(N1, N2, F, F)``; ``"diagonal"`` the products of matching
    features, ``(N1, N2, F)``.

    Args:
        model: any `torch.nn.Module`; it is run as it is (train or eval mode).
        x1, x2: input batches; ``x2=None`` for ``K(x1, x1)``.
        layer: the name of a submodule (as in ``model.named_modules()``) whose
            output is used; default the model's output.
        output: ``"mean"``, ``"full"`` or ``"diagonal"``.
        memory_budget: bytes or a string such as ``"2GiB"``; inputs are run in
            chunks of about this size of features.

    Returns:
        The covariance in the features' dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if output not in ("mean", "full", "diagonal"):
        raise ValueError(f"output must be one of ('mean', 'full', 'diagonal'), got {output!r}.")
    x1 = _batch(x1, "x1")
    x2 = None if x2 is None else _batch(x2, "x2")
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        near = [n for n in modules if n and layer in n][:5]
        raise ValueError(
            f"{type(model).__name__} has no submodule named {layer!r}; names are those of "
            f"model.named_modules()" + (f", e.g. {near}." if near else
                                        f": {[n for n in modules if n][:8]}.")
        )
    budget = parse_memory(memory_budget)

    def features(x: Tensor) -> Tensor:
        got: list[Tensor] = []
        hook = None
        if layer is not None:
            hook = modules[layer].register_forward_hook(lambda m, a, o: got.append(o))
        try:
            with torch.no_grad():
                out = _call(model, x)
        finally:
            if hook is not None:
                hook.remove()
        z = out if layer is None else (got[0] if got else None)
        if not isinstance(z, Tensor) or z.ndim < 1 or z.shape[0] != x.shape[0]:
            what = "the model" if layer is None else f"layer {layer!r}"
            raise TypeError(f"{what} must produce a tensor (N, *features) for a batch of N "
                            f"inputs, got {type(z).__name__}"
                            + (f" of shape {tuple(z.shape)}." if isinstance(z, Tensor) else "."))
        return z.reshape(z.shape[0], -1) if output != "mean" else z

    first = features(x1[:1])
    per_example = first[0].numel() * first.element_size()
    rows = max(1, budget // (2 * per_example))
    z1 = torch.cat([features(x1[i:i + rows]) for i in range(0, x1.shape[0], rows)])
    z2 = z1 if x2 is None else torch.cat([features(x2[i:i + rows])
                                          for i in range(0, x2.shape[0], rows)])
    if output == "full":
        return torch.einsum("ia,jb->ijab", z1, z2)
    if output == "diagonal":
        return torch.einsum("ia,ja->ija", z1, z2)
    if z1.ndim == 1:
        return z1[:, None] * z2[None, :]
    c = z1.shape[1]
    a = z1.movedim(1, -1).reshape(z1.shape[0], -1, c)   # (N1, P, C)
    b = z2.movedim(1, -1).reshape(z2.shape[0], -1, c)
    k = torch.einsum("ipc,jpc->ijp", a, b) / c
    return k.reshape(z1.shape[0], z2.shape[0], *z1.shape[2:])


# ------------------------------------------------------------------ the problem
@dataclass
class _Problem:
    model: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    x1: Tensor
    x2: Tensor | None
    out_shape: tuple[int, ...]
    output: str
    budget: int

    @classmethod
    def make(cls, model, x1, x2, params, output, memory_budget) -> _Problem:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}.")
        params = _parameters(model, params)
        buffers = dict(model.named_buffers())
        x1 = _batch(x1, "x1")
        x2 = None if x2 is None else _batch(x2, "x2")
        _check_no_batch_statistics(model)
        out_shape = _output_shape(model, params, buffers, x1)
        if x2 is not None and x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x1 and x2 must have the same per-example shape, got "
                             f"{tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}.")
        _check_independent(model, x1)
        return cls(model, params, buffers, x1, x2, out_shape, output,
                   parse_memory(memory_budget))

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def xs2(self) -> Tensor:
        return self.x1 if self.x2 is None else self.x2

    @property
    def entry(self) -> int:
        return next(iter(self.params.values())).element_size()

    @property
    def out_pairs(self) -> int:
        """Output entries per pair of examples."""
        return self.n_out ** 2 if self.output == "full" else (
            self.n_out if self.output == "diagonal" else 1)

    def check_result_fits(self) -> None:
        n = self.x1.shape[0] * self.xs2.shape[0] * self.out_pairs * self.entry
        limit = _memory_size(next(iter(self.params.values())).device)
        if limit is not None and n > 0.8 * limit:
            raise MemoryError(
                f"output={self.output!r} for {self.x1.shape[0]} x {self.xs2.shape[0]} inputs "
                f"with {self.n_out} outputs each is {n / 2**30:.1f} GiB, more than this "
                f"device's memory ({limit / 2**30:.1f} GiB); use output='trace' or "
                f"'diagonal', or fewer inputs at a time."
            )

    def f(self, p: dict[str, Tensor], x: Tensor, a0: int = 0, a1: int | None = None) -> Tensor:
        """The flattened outputs ``a0:a1`` of one example (no batch axis)."""
        out = functional_call(self.model, (p, self.buffers), (x.unsqueeze(0),)).reshape(-1)
        return out if a0 == 0 and a1 in (None, out.shape[0]) else out[a0:a1]


def _memory_size(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def _group(by_layer) -> str | None:
    if by_layer is False or by_layer is None:
        return None
    if by_layer is True or by_layer == "parameter":
        return "parameter"
    if by_layer == "module":
        return "module"
    raise ValueError(f"by_layer must be False, True, 'parameter' or 'module', got {by_layer!r}.")


def _tiled(problem: _Problem, engine, group: str | None, split: bool, progress):
    """Runs ``engine`` over chunks of examples and of outputs, and assembles the kernel.

    A tile is (chunk of x1, chunk of outputs a) against (chunk of x2, chunk of outputs
    b), with b = a unless the output is "full". For Theta(x, x) only tiles on or above
    the diagonal of example chunks are computed; the others are their mirror images.
    """
    n1, n2, n_out = problem.x1.shape[0], problem.xs2.shape[0], problem.n_out
    rows, outs = engine.plan()
    chunks1 = [(i, min(i + rows, n1)) for i in range(0, n1, rows)]
    chunks2 = [(j, min(j + rows, n2)) for j in range(0, n2, rows)]
    ochunks = [(a, min(a + outs, n_out)) for a in range(0, n_out, outs)]
    output = problem.output
    symmetric = problem.x2 is None
    tiles = [(i, a, j, b) for ii, i in enumerate(chunks1) for a in ochunks
             for jj, j in enumerate(chunks2) if not symmetric or jj >= ii
             for b in (ochunks if output == "full" else [a])]
    out_tail = {"trace": (), "diagonal": (n_out,), "full": (n_out, n_out)}[output]
    result: dict[str, Tensor] = {}
    p0 = next(iter(problem.params.values()))

    def target(name: str) -> Tensor:
        key = "" if not split else (name if group == "parameter" else name.rpartition(".")[0])
        if key not in result:
            result[key] = p0.new_zeros((n1, n2) + out_tail)
        return result[key]

    bar = progress_bar(tiles, desc="empirical NTK", unit="tile", progress=progress, min_items=4)
    cached: tuple | None = None
    for (i0, i1), (a0, a1), (j0, j1), (b0, b1) in bar:
        if cached is None or cached[0] != (i0, a0):
            cached = ((i0, a0), engine.features(problem.x1[i0:i1], a0, a1))
        fa = cached[1]
        same = symmetric and (i0, a0) == (j0, b0)
        fb = fa if same else engine.features(problem.xs2[j0:j1], b0, b1)
        mirror = symmetric and i0 != j0
        for name, value in engine.contract(fa, fb):
            t = target(name)
            if output == "full":
                t[i0:i1, j0:j1, a0:a1, b0:b1] += value
                if mirror:
                    t[j0:j1, i0:i1, b0:b1, a0:a1] += value.transpose(0, 1).transpose(2, 3)
            elif output == "diagonal":
                t[i0:i1, j0:j1, a0:a1] += value
                if mirror:
                    t[j0:j1, i0:i1, a0:a1] += value.transpose(0, 1)
            else:
                t[i0:i1, j0:j1] += value
                if mirror:
                    t[j0:j1, i0:i1] += value.transpose(0, 1)
    bar.close()
    if not result:  # every structured part was empty (cannot happen with parameters)
        target("")
    return result if split else result[""]


def _outer(u: Tensor, v: Tensor) -> Tensor:
    """``u @ v.T`` for 2-D ``u, v``; for ``u is v`` with 512 rows or more only the blocks
    on and above the diagonal are multiplied (about 40% fewer operations), the rest mirrored, so the
    result is exactly symmetric."""
    if u is not v or u.shape[0] < 512:
        return u @ v.T
    n = u.shape[0]
    edges = [n * b // 4 for b in range(5)]
    out = u.new_empty(n, n)
    for b in range(4):
        r = slice(edges[b], edges[b + 1])
        for c in range(b, 4):
            q = slice(edges[c], edges[c + 1])
            block = u[r] @ u[q].T
            if c == b:  # BLAS need not round (i, j) and (j, i) alike: mirror the upper half
                block = block.triu() + block.triu(1).T
            out[r, q] = block
            if c > b:
                out[q, r] = block.T
    return out


def _contract(u: Tensor, v: Tensor, output: str) -> Tensor:
    """``sum_k u[i, a, k] v[j, b, k]`` in the output layout (``v is u`` for one tile of a
    symmetric kernel)."""
    if output == "trace":
        flat = u.reshape(u.shape[0], -1)
        return _outer(flat, flat if v is u else v.reshape(v.shape[0], -1))
    if output == "full":
        n, o = u.shape[:2]
        m, q = v.shape[:2]
        flat = u.reshape(n * o, -1)
        k = _outer(flat, flat if v is u else v.reshape(m * q, -1))
        return k.reshape(n, o, m, q).permute(0, 2, 1, 3)
    return torch.bmm(u.transpose(0, 1), v.permute(1, 2, 0)).permute(1, 2, 0)


# ------------------------------------------------------------------ structured layers
@dataclass
class _Site:
    """A Linear or Conv layer whose weight (and bias) go the structured way."""

    name: str
    module: nn.Module
    weight: str | None                  # parameter names, if differentiated
    bias: str | None
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)   # per call, batch 1
    gram: bool = False                  # contract by Gram matrices (else Jacobians)

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
            if isinstance(self.module, _LINEAR_TYPES):
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
    if isinstance(m, NTKConv):
        return (tuple(m.weight.shape[2:]), m.stride, m.dilation, list(m.pads), m.mode, 1)
    return (m.kernel_size, m.stride, m.dilation, list(m._reversed_padding_repeated_twice),
            m.padding_mode, m.groups)


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


class _Hooks:
    """Forward hooks that add a probe to each call of the sites' modules and keep
    the call's input, so that derivatives with respect to the probes are the
    cotangents at the layers' outputs."""

    def __init__(self, sites: list[_Site]):
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
                return None
            if self.probes is None:
                return None
            calls = self.inputs.setdefault(name, [])
            k = len(calls)
            if k >= len(self.probes[name]):
                raise _CallsChanged(name)
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
                raise _CallsChanged(name)
        return value, inputs


class _CallsChanged(RuntimeError):
    """A layer was called a different number of times than on the first example."""


def _structured_sites(problem: _Problem) -> list[_Site]:
    """The Linear and Conv layers whose parameters can go the structured way,
    checked against autograd on one example."""
    by_module = {}
    for name, m in problem.model.named_modules():
        if not isinstance(m, _LINEAR_TYPES + _CONV_TYPES) or _is_parametrized(m):
            continue
        w, b = f"{name}.weight" if name else "weight", f"{name}.bias" if name else "bias"
        w = w if w in problem.params and problem.params[w] is not None else None
        b = b if b in problem.params and getattr(m, "bias", None) is not None else None
        if w is not None or b is not None:
            by_module[name] = _Site(name, m, w, b)
    if not by_module:
        return []
    sites = list(by_module.values())
    hooks = _Hooks(sites)
    hooks.shapes = {}
    with hooks, torch.no_grad():
        problem.f(problem.params, problem.x1[0])
    shapes, hooks.shapes = hooks.shapes, None
    sites = [s for s in sites if s.name in shapes]
    for s in sites:
        s.out_shapes = shapes[s.name]
    if not sites:
        return []
    return _verified(problem, sites)


def _is_parametrized(m: nn.Module) -> bool:
    return bool(getattr(m, "parametrizations", None))


def _verified(problem: _Problem, sites: list[_Site]) -> list[_Site]:
    """The sites whose implied weight gradients equal autograd's on one example."""
    names = [n for s in sites for n in s.params]
    fixed = {k: v for k, v in problem.params.items() if k not in names}
    mine = {k: problem.params[k] for k in names}
    probes = _zero_probes(sites, problem)
    x = problem.x1[0]
    hooks = _Hooks(sites)

    def f(p, pr):
        return hooks.run(lambda: problem.f({**fixed, **p}, x), pr)

    gen = torch.Generator(device="cpu").manual_seed(0)
    p0 = next(iter(problem.params.values()))
    r = torch.randn(problem.n_out, generator=gen, dtype=p0.dtype).to(p0.device)
    try:
        with hooks:
            _, pull, inputs = vjp(f, mine, probes, has_aux=True)
            true, cot = pull(r)
    except _CallsChanged:
        return []
    good = []
    eps = torch.finfo(p0.dtype).eps
    for s in sites:
        u, g = s.arrays([t.unsqueeze(0) for t in inputs[s.name]],
                        [t.unsqueeze(0).unsqueeze(0) for t in cot[s.name]])
        implied = s.jacobians(u, g)
        ok = True
        for pname, jac in implied.items():
            t = true[pname].reshape(-1)
            err = (jac.reshape(-1) - t).norm()
            ok &= bool(err <= 1e3 * eps * (t.norm() + jac.norm()) + 1e-30)
        if ok:
            good.append(s)
    return good


def _zero_probes(sites: list[_Site], problem: _Problem) -> dict[str, list[Tensor]]:
    p0 = next(iter(problem.params.values()))
    return {s.name: [p0.new_zeros(shape) for shape in s.out_shapes] for s in sites}


# ------------------------------------------------------------------ engines
class _Jacobians:
    """Per-example Jacobians for every parameter, with Linear and Conv layers
    (``sites``) through their output cotangents and inputs."""

    def __init__(self, problem: _Problem, sites: list[_Site]):
        self.problem = problem
        self.sites = sites
        taken = {n for s in sites for n in s.params}
        self.rest = {k: v for k, v in problem.params.items() if k not in taken}
        self.fixed = {k: v for k, v in problem.params.items() if k in taken}
        self.probes = _zero_probes(sites, problem)
        self.hooks = _Hooks(sites)
        self._sizes = self._measure()
        n1, n2 = problem.x1.shape[0], problem.xs2.shape[0]
        for s in sites:
            s.gram = self._gram_is_cheaper(s, n1, n2)

    def _measure(self) -> dict[str, tuple[int, int, int, int]]:
        """(G, P, K, C) of each site, from one example's shapes."""
        sizes = {}
        if not self.sites:
            return sizes
        with self.hooks:
            (_, inputs) = self.hooks.run(
                lambda: self.problem.f(self.problem.params, self.problem.x1[0]), self.probes)
        o = self.problem.n_out
        for s in self.sites:
            u, g = s.arrays([t.detach().unsqueeze(0) for t in inputs[s.name]],
                            [p.new_zeros((1, 1) + p.shape) for p in self.probes[s.name]])
            sizes[s.name] = (u.shape[1], u.shape[2], u.shape[3], g.shape[4])
        del o
        return sizes

    def _gram_is_cheaper(self, s: _Site, n1: int, n2: int) -> bool:
        """Operation counts of the two contractions of a weight's part.

        Jacobians: forming them, ``N O G P C K``, then ``N1 N2 O' G C K`` with ``O'`` the
        output pairs contracted (``O^2`` for "full", ``O`` otherwise). Gram matrices:
        ``N1 N2 G P^2 (K + O' C + q)`` with ``q`` the output entries per pair."""
        groups, p, k, c = self._sizes[s.name]
        o, q = self.problem.n_out, self.problem.out_pairs
        o2 = o * o if self.problem.output == "full" else o
        formed = (n1 if self.problem.x2 is None else n1 + n2) * o * groups * p * c * k
        jac = formed + n1 * n2 * o2 * groups * c * k
        gram = n1 * n2 * groups * p * p * (k + o2 * c + q)
        fits = q * groups * p * p * self.problem.entry <= self.problem.budget // 4
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

        jac = vmap(jacrev(f, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0))
        with hooks:
            try:
                (j_rest, j_probes), inputs = jac(self.rest, self.probes, x)
            except _CallsChanged as e:
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
                sep = _separable(u, g) if s.weight is not None else None
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

    def contract(self, fa: dict, fb: dict):
        output = self.problem.output
        for name, a in fa.items():
            b = fb[name]
            if a[0] == "sep" and b[0] == "sep":
                yield name, _separable_contract(a[1], a[2], b[1], b[2], output)
            elif a[0] in ("jac", "sep"):
                yield name, _contract(_unfactor(a), _unfactor(b), output)
            elif a[0] == "gram":
                bias, bias_scale = a[3], a[4]
                weight, part = _gram_contract(a[1], a[2], b[1], b[2], output, bias_scale)
                yield name, weight
                if bias is not None:
                    yield bias, part


def _separable(u: Tensor, g: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(s, B)`` with ``J[i, a, (g, c), k] = s[i, a, (g, c)] B[i, (g, c), k]`` when every
    example's cotangents factor per channel as ``g[i, a, g, p, c] = s[i, a, g, c] h[i, g, p, c]``
    (to rounding), else None.

    That is the case for a layer whose output reaches the model's outputs through
    per-channel elementwise maps, a pooling over all positions and a dense readout
    (the last convolution of a CNN with global pooling): ``B = h^T u`` is then one
    product per example instead of one per output.
    """
    n, o, groups, p, c = g.shape
    if o < 4 or p < 2 or (n > 1 and _separable(u[:1], g[:1]) is None):
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


def _separable_contract(sa: Tensor, ba: Tensor, sb: Tensor, bb: Tensor, output: str) -> Tensor:
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
            gg = _outer(flat, flat if gb is ga else gb.reshape(m * ob, c))
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


class _VectorProducts:
    """``J(x1) (J(x2)^T e)`` for every output basis vector ``e``: no Jacobian held.

    One forward-mode pass carries every parameter's tangent at once; with
    ``split`` (contributions per parameter) there is one pass per parameter."""

    def __init__(self, problem: _Problem, split: bool):
        self.problem = problem
        self.split = split

    def plan(self) -> tuple[int, int]:
        per = self.problem.n_out * sum(p.numel() for p in self.problem.params.values())
        return max(1, self.problem.budget // (4 * per * self.problem.entry)), self.problem.n_out

    def features(self, x: Tensor, a0: int, a1: int) -> Tensor:
        return x

    def contract(self, a: Tensor, b: Tensor):
        problem = self.problem
        params, f = problem.params, problem.f
        p0 = next(iter(params.values()))

        def pullback(x: Tensor, e: Tensor) -> dict[str, Tensor]:
            return vjp(lambda p: f(p, x), params)[1](e)[0]

        basis = torch.eye(problem.n_out, dtype=p0.dtype, device=p0.device)
        # (N2, O, *param): J2^T e for every example of b and output e
        cot = vmap(vmap(pullback, in_dims=(None, 0)), in_dims=(0, None))(b, basis)
        groups = [[name] for name in params] if self.split else [list(params)]
        try:
            for names in groups:
                def push(x: Tensor, t: dict[str, Tensor], names=names) -> Tensor:
                    tangent = {k: t[k] if k in names else torch.zeros_like(v)
                               for k, v in params.items()}
                    return jvp(lambda p: f(p, x), (params,), (tangent,))[1]

                # (N1, N2, O_b, O_a): J1 J2^T restricted to these parameters
                pushed = vmap(vmap(vmap(push, in_dims=(None, 0)), in_dims=(None, 0)),
                              in_dims=(0, None))(a, {k: cot[k] for k in names})
                full = pushed.transpose(-1, -2)  # (N1, N2, O_a, O_b)
                if problem.output == "full":
                    yield names[0], full
                else:
                    d = torch.diagonal(full, 0, -2, -1)
                    yield names[0], d.sum(-1) if problem.output == "trace" else d
        except NotImplementedError as e:
            raise NotImplementedError(
                f"method='vector_products' needs forward-mode AD through every operation of "
                f"the model, which PyTorch lacks here ({e}). Use method='jacobian' or "
                f"'structured' (PyTorch's attention kernels, for one, have no forward-mode "
                f"derivative)."
            ) from e


# ------------------------------------------------------------------ checks
def _parameters(model: nn.Module, params: dict[str, Tensor] | None) -> dict[str, Tensor]:
    if params is None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    else:
        known = dict(model.named_parameters())
        unknown = [n for n in params if n not in known]
        if unknown:
            raise ValueError(f"params names {unknown[:5]} are not parameters of "
                             f"{type(model).__name__}; names are those of "
                             f"model.named_parameters().")
        params = {n: p.detach() for n, p in params.items()}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad), so "
            f"its NTK is zero; pass params= to choose which to differentiate."
        )
    for name, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point() or p.is_complex():
            raise TypeError(
                f"parameter {name!r} has dtype {getattr(p, 'dtype', type(p).__name__)}; the "
                f"empirical NTK needs real floating-point parameters (float32 or float64)."
            )
    return params


def _batch(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape "
                         f"{tuple(x.shape)}.")
    if x.is_complex():
        raise TypeError(f"{name} has complex dtype {x.dtype}; use real inputs.")
    return x


def _call(model: nn.Module, x: Tensor):
    try:
        return model(x)
    except Exception as e:
        raise ValueError(_misfit(model, x, e)) from e


def _misfit(model: nn.Module, x: Tensor, e: Exception) -> str:
    hint = ""
    if not x.is_floating_point():
        hint = (f" x has dtype {x.dtype}: integer inputs suit models that start with an "
                f"embedding; otherwise pass floating-point inputs (x.float()).")
    return (f"{type(model).__name__} cannot be applied to inputs of per-example shape "
            f"{tuple(x.shape[1:])} and dtype {x.dtype} ({type(e).__name__}: {e}); pass x of "
            f"the shape the model takes, with the batch axis first.{hint}")


def _check_no_batch_statistics(model: nn.Module) -> None:
    bn = [n for n, m in model.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bn:
        raise ValueError(
            f"{type(model).__name__} has BatchNorm in training mode ({', '.join(bn)}), which "
            f"mixes the examples of a batch, so one example's output has no Jacobian of its "
            f"own; call model.eval() to use the running statistics."
        )


def _check_independent(model: nn.Module, x: Tensor) -> None:
    """Refuses models whose output for one example depends on the batch, or is random."""
    if x.shape[0] < 2:
        return
    with torch.no_grad():
        both = model(x[:2])[:1]
        alone = model(x[:1])
    if not isinstance(both, Tensor) or not isinstance(alone, Tensor):
        raise TypeError("the model must return a tensor (N, *outputs).")
    if both.shape != alone.shape or not torch.allclose(both, alone, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{type(model).__name__}'s output for an example changes with the rest of the batch "
            f"or between calls (batch statistics, or Dropout in training mode); the empirical "
            f"NTK needs examples treated independently and deterministically: call "
            f"model.eval()."
        )


def _output_shape(model, params, buffers, x: Tensor) -> tuple[int, ...]:
    try:
        with torch.no_grad():
            out = functional_call(model, (params, buffers), (x[:1],))
    except Exception as e:
        raise ValueError(_misfit(model, x, e)) from e
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError(
            f"the model must return one floating-point tensor (N, *outputs), got "
            f"{type(out).__name__}" + (f" of dtype {out.dtype}." if isinstance(out, Tensor)
                                       else "; wrap it to return the output to differentiate."))
    if out.ndim < 1 or out.shape[0] != 1:
        raise ValueError(
            f"the model's output for a batch of 1 has shape {tuple(out.shape)}; it must keep "
            f"the batch axis first, (N, *outputs) (a model that reduces over the batch, e.g. "
            f"returns a loss, has no per-example Jacobian)."
        )
    return tuple(out.shape[1:])

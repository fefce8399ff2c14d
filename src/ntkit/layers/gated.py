"""Gated recurrent layers (torch's ``nn.GRU`` and ``nn.LSTM``): a numerical NNGP.

A GRU's or an LSTM's gates multiply Gaussian processes (``r * (W_hn h)``,
``f * c + i * g``, ``o * tanh(c)``), so the kernel after such a layer is no
layer-wise closed form of the kernel before it. The Tensor Programs framework
(Yang 2019, *Wide feedforward or recurrent neural networks of any architecture
are Gaussian processes*, NeurIPS; Theorem 4.2 / the NETSOR master theorem) still
defines the infinite-width NNGP: at infinite width the coordinates of every
hidden vector are i.i.d. draws of one random variable, where each matrix
product is a Gaussian process over all (example, step) pairs,

    U_k x_t      ~ GP(0, u_std^2 x_t . x'_s / m)               (input products)
    W_k h_{t-1}  ~ GP(0, w_std^2 E[h_{t-1} h'_{s-1}])          (recurrent products)

independent across the weight matrices ``k`` (one per gate) and of the biases
``b ~ N(0, b_std^2)`` (a per-unit scalar shared by all steps), and the states are
torch's gate equations applied coordinatewise. The second moment
``E[h_t h'_s]`` is the NNGP of the hidden states.

`gated_nngp` computes it by Monte Carlo over ``S`` coordinates (``samples``),
step by step: the input products are drawn from their known covariance; at step
``t`` the recurrent products of all steps ``<= t`` are jointly Gaussian with
covariance ``w_std^2`` times the second moments of the states before them,
estimated from the samples; their Cholesky factor (ordered by step, so that the
draws of earlier steps stay as they were) extends the earlier draws to step
``t``. Error: a standard error ``~ 1/sqrt(S)`` (returned with the estimate), a
bias ``O(1/S)`` from feeding estimated second moments forward, and a jitter of
``1e-10 w_std^2`` on the factorised covariances (for repeated inputs); all
in float64. The same draws (from one seed) serve every pair of inputs, so the
estimate is a deterministic, smooth function of the inputs.

Each pair of inputs is computed as a two-example program (the NNGP of a pair
depends only on that pair): per pair ``O(S L^2 (G + L))`` operations for ``S``
samples, ``L`` steps and ``G`` gates (the state moments, the draws and the
step-ordered Cholesky factors), ``O(S L G)`` memory, pairs chunked by the memory
budget; ``K(x, x)`` computes the pairs ``i <= j`` only.

Only the NNGP: the NTK of a gated network needs the backward program as well
(Yang 2020, Tensor Programs II), which ntkit does not implement; the layers
therefore have no kernel rule inside networks (`propagate` refuses, naming
`GRU.nngp` and `ntkit.empirical_ntk` of the finite twin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .._budget import parse_memory
from .._checks import is_int
from .base import BuildContext, Kernels, Layer, Shapes

__all__ = ["GRU", "LSTM", "GatedNNGP", "gated_nngp"]

Cell = Literal["gru", "lstm"]
Readout = Literal["all", "last", "mean"]
_READOUTS = ("all", "last", "mean")
_GATES = {"gru": 3, "lstm": 4}
_JITTER = 1e-10


@dataclass(frozen=True)
class GatedNNGP:
    """A Monte Carlo NNGP and its standard error.

    Attributes:
        mean: the estimate, ``(N1, N2)`` (readouts ``"last"``, ``"mean"``) or
            ``(N1, N2, L)`` (``"all"``: matching steps).
        stderr: the standard error of each entry (the sample standard deviation
            of the per-coordinate products over ``sqrt(samples)``), same shape.
        samples: the number of coordinates ``S`` drawn.
    """

    mean: Tensor
    stderr: Tensor
    samples: int


def _step_gru(pre_in, rec, bias, h):
    """One GRU step (torch's equations) on coordinates: ``pre_in (..., 3, E)`` the input
    products with their bias, ``rec (..., 3, E)`` the recurrent products, ``bias (..., 3)``
    the recurrent biases ``b_h*``, ``h (..., E)`` the previous state."""
    r = torch.sigmoid(pre_in[..., 0, :] + rec[..., 0, :] + bias[..., 0, None])
    z = torch.sigmoid(pre_in[..., 1, :] + rec[..., 1, :] + bias[..., 1, None])
    n = torch.tanh(pre_in[..., 2, :] + r * (rec[..., 2, :] + bias[..., 2, None]))
    return (1 - z) * n + z * h, None


def _step_lstm(pre_in, rec, bias, h, c):
    """One LSTM step (torch's gate order i, f, g, o); returns ``(h, c)``."""
    a = pre_in + rec + bias[..., None]
    i, f = torch.sigmoid(a[..., 0, :]), torch.sigmoid(a[..., 1, :])
    g, o = torch.tanh(a[..., 2, :]), torch.sigmoid(a[..., 3, :])
    c = f * c + i * g
    return o * torch.tanh(c), c


def _pair_states(cell: Cell, xa: Tensor, xb: Tensor, draws: dict[str, Tensor], w2: float,
                 u2: float, b: float) -> Tensor:
    """The coordinates' hidden states ``(P, S, L, 2)`` of ``P`` pairs of sequences
    ``xa, xb (P, C, L)`` (float64), from the standard normal ``draws``."""
    p, m, steps = xa.shape
    gates = _GATES[cell]
    # input products: one Gaussian over the (step, example) index, ordered step-major
    xs = torch.stack([xa, xb], 1).permute(0, 3, 1, 2).reshape(p, 2 * steps, m)
    kin = xs @ xs.transpose(1, 2) * (u2 / m)
    eye = torch.eye(2 * steps, dtype=xs.dtype)
    f_in = torch.linalg.cholesky(kin + (_JITTER * max(u2, 1e-300)) * eye)
    pre_in = torch.einsum("pab,sgb->psga", f_in, draws["input"])     # (P, S, G, 2L)
    pre_in = pre_in + b * draws["bias_ih"][None, :, :, None]
    bias_h = b * draws["bias_hh"][None]                                # (1, S, G)
    s = draws["input"].shape[0]
    h = xs.new_zeros(p, s, 2)
    c = xs.new_zeros(p, s, 2)
    states = []
    rec = xs.new_zeros(p, s, gates, 2)
    for t in range(steps):
        if t > 0 and w2 > 0:
            hist = torch.stack(states, 2).reshape(p, s, 2 * t)          # (step, example)
            cov = torch.einsum("psa,psb->pab", hist, hist) * (w2 / s)
            f_rec = torch.linalg.cholesky(
                cov + (_JITTER * w2) * torch.eye(2 * t, dtype=xs.dtype))
            # rows of step t's recurrent products (they read h_{t-1}) over all draws so far
            rec = torch.einsum("pab,sgb->psga", f_rec[:, -2:, :],
                               draws["recurrent"][:, :, :2 * t])
        step_in = pre_in[..., 2 * t:2 * t + 2]
        if cell == "gru":
            h, _ = _step_gru(step_in, rec, bias_h, h)
        else:
            h, c = _step_lstm(step_in, rec, bias_h, h, c)
        states.append(h)
    return torch.stack(states, 2)


def gated_nngp(cell: Cell, x1: Tensor, x2: Tensor | None = None, *, w_std: float = 1.0,
               u_std: float = 1.0, b_std: float | None = 0.0, readout: Readout = "last",
               samples: int = 4096, seed: int = 0,
               memory_budget: int | str | None = None) -> GatedNNGP:
    """The NNGP of one GRU or LSTM layer over sequences, by Monte Carlo (module docstring).

    The layer (torch's equations, zero initial state) reads ``x (N, C, L)`` with
    input weights of variance ``u_std^2 / C``, recurrent weights of variance
    ``w_std^2 / n`` (``n`` the hidden width), and the two biases of each gate
    (torch's ``b_ih`` and ``b_hh``) of variance ``b_std^2`` each.

    Args:
        cell: ``"gru"`` or ``"lstm"``.
        x1: sequences ``(N1, C, L)``, channels first.
        x2: sequences ``(N2, C, L)`` of the same ``C`` and ``L``, or None for
            ``K(x1, x1)`` (pairs ``i <= j`` computed, mirrored: exactly symmetric).
        w_std, u_std, b_std: the weight and bias scales (``b_std=None``: no biases).
        readout: ``"last"``: the state at the last step, ``(N1, N2)``; ``"mean"``: the
            mean state over the steps, ``(N1, N2)``; ``"all"``: every step, the kernel
            at matching steps ``(N1, N2, L)``.
        samples: Monte Carlo coordinates ``S``; the standard error falls as
            ``1/sqrt(S)``.
        seed: the seed of the draws (the same draws serve every pair).
        memory_budget: bytes (or a string such as ``"1GiB"``) for one chunk of pairs;
            default 1 GiB.

    Returns:
        A `GatedNNGP`: the estimate and its standard error, in ``x1``'s dtype.
    """
    if cell not in _GATES:
        raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}.")
    if readout not in _READOUTS:
        raise ValueError(f"readout must be one of {_READOUTS}, got {readout!r}.")
    if not is_int(samples) or samples < 2:
        raise ValueError(f"samples must be an int >= 2 (Monte Carlo coordinates), got "
                         f"{samples!r}.")
    x1 = _check_sequences(x1, "x1")
    if x2 is not None:
        x2 = _check_sequences(x2, "x2")
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x1 and x2 must have the same channels and length (C, L), got "
                             f"{tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}; a gated "
                             f"layer's Monte Carlo NNGP takes sequences of equal length.")
    dtype = x1.dtype
    n1, _, steps = x1.shape
    gates = _GATES[cell]
    gen = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    draws = {"input": torch.randn(samples, gates, 2 * steps, generator=gen, dtype=f64),
             "recurrent": torch.randn(samples, gates, 2 * steps, generator=gen, dtype=f64),
             "bias_ih": torch.randn(samples, gates, generator=gen, dtype=f64),
             "bias_hh": torch.randn(samples, gates, generator=gen, dtype=f64)}
    a = x1.detach().to("cpu", f64)
    bb = a if x2 is None else x2.detach().to("cpu", f64)
    n2 = bb.shape[0]
    if x2 is None:
        ii, jj = torch.triu_indices(n1, n1)
    else:
        ii, jj = torch.meshgrid(torch.arange(n1), torch.arange(n2), indexing="ij")
        ii, jj = ii.reshape(-1), jj.reshape(-1)
    per_pair = samples * (2 * steps) * (2 * gates + 6) * 8
    chunk = max(1, parse_memory(memory_budget) // per_pair)
    b = 0.0 if b_std is None else float(b_std)
    tail = (steps,) if readout == "all" else ()
    mean = torch.empty(ii.shape[0], *tail, dtype=f64)
    err = torch.empty_like(mean)
    for start in range(0, ii.shape[0], chunk):
        sl = slice(start, start + chunk)
        hs = _pair_states(cell, a[ii[sl]], bb[jj[sl]], draws, float(w_std) ** 2,
                          float(u_std) ** 2, b)                          # (P, S, L, 2)
        if readout == "last":
            prod = hs[:, :, -1, 0] * hs[:, :, -1, 1]
        elif readout == "mean":
            avg = hs.mean(2)
            prod = avg[..., 0] * avg[..., 1]
        else:
            prod = hs[..., 0] * hs[..., 1]                               # (P, S, L)
        mean[sl] = prod.mean(1)
        err[sl] = prod.std(1) / math.sqrt(samples)
    out_m = mean.new_empty(n1, n2, *tail)
    out_e = err.new_empty(n1, n2, *tail)
    out_m[ii, jj], out_e[ii, jj] = mean, err
    if x2 is None:
        out_m[jj, ii], out_e[jj, ii] = mean, err
    return GatedNNGP(out_m.to(x1.device, dtype), out_e.to(x1.device, dtype), int(samples))


def _check_sequences(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of sequences (N, C, L), got "
                        f"{type(x).__name__}.")
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"{name} must be sequences (N, C, L) (channels first, as Conv1d; "
                         f"transpose torch's batch_first (N, L, C) with x.transpose(1, 2)), "
                         f"got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating-point, got {x.dtype}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has NaN or infinite entries; the kernel of non-finite "
                         f"inputs is not finite. Remove or impute them.")
    return x


class _Gated(Layer):
    """What GRU and LSTM share: arguments, the numerical NNGP, the refusal, the twin."""

    cell: Cell = "gru"

    def __init__(self, out_channels: int, *, w_std: float = 1.0, u_std: float = 1.0,
                 b_std: float | None = 0.0, readout: Readout = "last", samples: int = 4096,
                 generator: torch.Generator | None = None) -> None:
        name = type(self).__name__
        if not is_int(out_channels) or out_channels <= 0:
            raise ValueError(f"{name}: out_channels must be a positive int (the hidden "
                             f"width), got {out_channels!r}.")
        for label, v in (("w_std", w_std), ("u_std", u_std), ("b_std", b_std)):
            if v is None and label == "b_std":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{name}: {label} must be a finite number >= 0 (tensor "
                                 f"hyperparameters are not supported: the NNGP is a Monte "
                                 f"Carlo estimate), got {v!r}.")
        if readout not in _READOUTS:
            raise ValueError(f"{name}: readout must be one of {_READOUTS} (every step, the "
                             f"last step, or the mean over steps), got {readout!r}.")
        if not is_int(samples) or samples < 2:
            raise ValueError(f"{name}: samples must be an int >= 2, got {samples!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{name}: generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}.")
        self.out_channels = int(out_channels)
        self.w_std, self.u_std = float(w_std), float(u_std)
        self.b_std = None if b_std is None else float(b_std)
        self.readout = readout
        self.samples = int(samples)
        # one seed drawn now: every call (and every tile) then uses the same draws
        self.seed = 0 if generator is None else int(
            torch.randint(0, 2 ** 62, (), generator=generator, device=generator.device))

    def nngp(self, x1: Tensor, x2: Tensor | None = None, *,
             memory_budget: int | str | None = None) -> GatedNNGP:
        """The infinite-width NNGP of this layer applied to sequences ``(N, C, L)``, by
        Monte Carlo with its standard error (see `ntkit.layers.gated`).

        Args:
            x1: sequences ``(N1, C, L)``; x2: ``(N2, C, L)`` or None for ``K(x1, x1)``.
            memory_budget: bytes (or e.g. ``"1GiB"``) for one chunk of input pairs.

        Returns:
            A `GatedNNGP` (``mean``, ``stderr``: ``(N1, N2)``, or ``(N1, N2, L)`` for
            ``readout="all"``).
        """
        return gated_nngp(self.cell, x1, x2, w_std=self.w_std, u_std=self.u_std,
                          b_std=self.b_std, readout=self.readout, samples=self.samples,
                          seed=self.seed, memory_budget=memory_budget)

    def propagate(self, k: Kernels) -> Kernels:
        name = type(self).__name__
        raise ValueError(
            f"{name} has no kernel rule inside ntkit networks: its gates multiply Gaussian "
            f"processes, so its NNGP is no closed form of the kernel before it, and its NTK "
            f"needs the backward Tensor Program, which ntkit does not implement. For the NNGP "
            f"of the layer on sequences use {name.lower()}.nngp(x1, x2) (Monte Carlo, with its "
            f"standard error); for an NTK use nk.empirical_ntk({name.lower()}.build(x.shape[1:],"
            f" generator=...), x) of the finite twin (exact at that width).")

    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        if not shape or isinstance(shape[0], tuple) or len(shape) != 2:
            raise ValueError(f"{self!r} takes sequences of per-example shape (channels, "
                             f"length), got {shape}.")
        m, steps = int(shape[0]), int(shape[1])
        module = GatedTwin(self.cell, m, self.out_channels, readout=self.readout,
                           bias=self.b_std is not None, dtype=ctx.dtype, device=ctx.device)
        gates, n = _GATES[self.cell], self.out_channels
        rnn = module.rnn
        with torch.no_grad():
            rnn.weight_ih_l0.copy_(ctx.randn(gates * n, m) * (self.u_std / math.sqrt(m)))
            rnn.weight_hh_l0.copy_(ctx.randn(gates * n, n) * (self.w_std / math.sqrt(n)))
            if self.b_std is not None:
                rnn.bias_ih_l0.copy_(ctx.randn(gates * n) * self.b_std)
                rnn.bias_hh_l0.copy_(ctx.randn(gates * n) * self.b_std)
        return module, ((n, steps) if self.readout == "all" else (n,))

    def __repr__(self) -> str:
        extra = "" if self.readout == "last" else f", readout={self.readout!r}"
        return (f"{type(self).__name__}({self.out_channels}, w_std={self.w_std}, "
                f"u_std={self.u_std}, b_std={self.b_std}{extra}, samples={self.samples})")


class GatedTwin(nn.Module):
    """The finite twin of `GRU`/`LSTM`: torch's ``nn.GRU``/``nn.LSTM`` (one layer, zero
    initial state) on sequences ``(N, C, L)`` channels first, with a readout: every step
    ``(N, n, L)``, the last step ``(N, n)`` or the mean over steps ``(N, n)``."""

    def __init__(self, cell: Cell, in_channels: int, hidden: int, *, readout: Readout,
                 bias: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        kind = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = kind(in_channels, hidden, bias=bias, batch_first=True, dtype=dtype,
                        device=device)
        self.readout = readout

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3:
            raise ValueError(f"GatedTwin takes sequences (N, C, L), got shape "
                             f"{tuple(x.shape)}.")
        out, _ = self.rnn(x.transpose(1, 2))                            # (N, L, n)
        if self.readout == "last":
            return out[:, -1]
        if self.readout == "mean":
            return out.mean(1)
        return out.transpose(1, 2)


class GRU(_Gated):
    """A GRU layer (torch's ``nn.GRU``, one layer, zero initial state) over sequences
    ``(N, C, L)``, with a Monte Carlo NNGP (`nngp`) and a finite twin (`build`).

    Equations (torch's): ``r = sigma(W_ir x + b_ir + W_hr h + b_hr)``,
    ``z = sigma(W_iz x + b_iz + W_hz h + b_hz)``,
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``, with
    input weights ``N(0, u_std^2 / C)``, recurrent weights ``N(0, w_std^2 / n)``, every
    bias ``N(0, b_std^2)`` (standard parameterization; the NNGP is the same in NTK
    parameterization). The NNGP follows Yang (2019)'s Tensor Programs, computed as in
    `ntkit.layers.gated`; the NTK is not offered (`propagate` refuses, so the layer
    cannot sit inside a network's `kernel`): use `ntkit.empirical_ntk` of the twin.

    Args:
        out_channels: the hidden width ``n`` (of the twin).
        w_std, u_std, b_std: recurrent, input and bias scales (``b_std=None``: no bias).
        readout: ``"last"`` (default), ``"mean"`` or ``"all"`` (every step).
        samples: Monte Carlo coordinates ``S`` (standard error ``~ 1/sqrt(S)``).
        generator: a `torch.Generator` from which the layer draws the seed of its
            Monte Carlo draws once (None: seed 0); the NNGP is then deterministic.
    """

    cell = "gru"


class LSTM(_Gated):
    """An LSTM layer (torch's ``nn.LSTM``, one layer, zero initial states) over sequences
    ``(N, C, L)``, with a Monte Carlo NNGP (`nngp`) and a finite twin (`build`).

    Equations (torch's, gate order i, f, g, o): ``i, f, o = sigma(W_i* x + b_i* + W_h* h +
    b_h*)``, ``g = tanh(...)``, ``c' = f c + i g``, ``h' = o tanh(c')``; weights and biases
    drawn as for `GRU`, whose docstring gives the arguments and what is not offered.
    """

    cell = "lstm"

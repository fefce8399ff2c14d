"""Elman recurrent layers (torch's ``nn.RNN``): their infinite-width NNGP and NTK.

The kernel follows the recurrent NTK of Alemohammad et al. 2021, *The recurrent
neural tangent kernel* (ICLR 2021), Theorem 1, computed over pairs of steps by
`ntkit.layers.recurrence` (the time recursion and its equations live there);
stacked layers feed each layer's hidden-state kernel to the next, and a
bidirectional layer averages the kernels of its two directions (its features
are their concatenation). The finite twin is `ntkit.layers.recurrent_twin`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import as_std, is_int
from ..kernel import Kernel, position_diagonal
from ._affine import check_parameterization
from .activations import Activation
from .base import BuildContext, Kernels, Layer, Shapes, number, scalar, single
from .recurrence import ElmanCoefficients, PairGrid, elman_pairs, reverse_steps
from .recurrent_twin import NTKRNN, TorchRNN, convert_torch_rnn
from .registry import normal_name, spec_constructors

__all__ = ["RNN"]

Readout = Literal["all", "last", "mean"]
_READOUTS = ("all", "last", "mean")


class RNN(Layer):
    """An Elman recurrent layer over sequences ``(N, C, L)`` (channels first, as `Conv1d`).

    Per layer and direction, with hidden width ``n = out_channels`` and input
    width ``m``, NTK parameterization::

        g_t = (w_std / sqrt(n)) W h_{t-1} + (u_std / sqrt(m)) U x_t + b_std b,   h_t = phi(g_t)

    with ``W, U, b ~ N(0, 1)``; standard parameterization draws ``W ~ N(0,
    w_std^2/n)``, ``U ~ N(0, u_std^2/m)``, ``b ~ N(0, b_std^2)`` and uses them
    plainly (same NNGP, NTK as neural-tangents' ``Dense`` in that
    parameterization). The initial state ``h_{-1}`` is zero, or with ``h0_std >
    0`` drawn independently for every sequence (and every layer and
    direction) from ``N(0, h0_std^2)``; it is not trained. The input kernel of
    a step pair is ``x_t . x'_t' / m``.

    The kernel is the recurrent NTK of Alemohammad et al. 2021 (Theorem 1),
    see `ntkit.layers.recurrence.elman_pairs` for the recursion over step pairs
    ``(t, t')``. Stacked layers (``num_layers``) feed each layer's hidden states
    to the next; a bidirectional layer concatenates a forward and a backward
    pass (``2 n`` channels), so its kernel is the mean of theirs, and the next
    layer's input width is ``2 n``. Cost per pair of inputs: O(num_layers * L *
    L'); only matching steps, O(num_layers * L), when nothing needs other pairs
    (``readout="last"`` with equal lengths, or ``"all"`` when no later layer
    mixes positions).

    Outputs (``readout``): ``"all"``, the hidden states of every step ``(N, D n,
    L)`` (``D = 2`` if bidirectional), so that convolutions, pooling or
    attention may follow; ``"last"``, the hidden state at each sequence's last
    step ``(N, D n)``; ``"mean"``, their mean over each sequence's steps. For a
    bidirectional layer, ``"last"`` is the output at the last step (torch's
    ``output[n, length_n - 1]``: the forward direction's final state and the
    backward direction's first).

    Sequences of different lengths: ``net.kernel(x1, x2, mask=(m1, m2))`` with
    booleans ``(N, L)`` holding a prefix of True per sequence. They are aligned
    as torch's packed sequences: every sequence starts at step 0; absent steps
    never reach the present ones (the forward pass runs over each sequence's own
    steps, the backward direction starts at each sequence's own last step); the
    hidden states at absent steps are zero (``"all"``, as ``pad_packed_sequence``
    gives); ``"last"`` reads each sequence's own last step and ``"mean"``
    averages its own steps. Different lengths with ``"last"`` or a backward
    direction read step pairs ``(t, t')`` off the diagonal: a first layer
    computes them from the inputs; after other layers only ``readout="mean"``
    (or a later layer that mixes positions) provides them, and otherwise the
    kernel call says so.

    Args:
        out_channels: the hidden width ``n`` (used by `build` and by the standard
            parameterization).
        activation: the nonlinearity ``phi``: an ntkit activation layer with a
            closed form (`ReLU`, `Erf`, ...) or by quadrature (`Tanh`,
            `Elementwise`), or its spec name (``"relu"``).
        w_std: recurrent weight scale (a number or a 0-dim tensor).
        u_std: input weight scale.
        b_std: bias standard deviation; None for no bias.
        h0_std: standard deviation of the random initial state (0: zero state).
        num_layers: stacked recurrent layers.
        bidirectional: add a backward direction to every layer.
        readout: ``"all"``, ``"last"`` or ``"mean"`` (above).
        parameterization: ``"ntk"`` or ``"standard"``.
    """

    spec_names = ("rnn",)
    torch_modules = (nn.RNN, TorchRNN)
    torch_subclasses = False
    honours_masks = True

    def __init__(self, out_channels: int, activation: Activation | str = "relu", *,
                 w_std: float | Tensor = 1.0, u_std: float | Tensor = 1.0,
                 b_std: float | Tensor | None = 0.0, h0_std: float | Tensor = 0.0,
                 num_layers: int = 1, bidirectional: bool = False, readout: Readout = "all",
                 parameterization: Literal["ntk", "standard"] = "ntk") -> None:
        if not is_int(out_channels) or out_channels <= 0:
            raise ValueError(f"RNN: out_channels must be a positive int (the hidden width), got "
                             f"{out_channels!r}.")
        if not is_int(num_layers) or num_layers <= 0:
            raise ValueError(f"RNN: num_layers must be a positive int, got {num_layers!r}.")
        if not isinstance(bidirectional, bool):
            raise TypeError(f"RNN: bidirectional must be True or False, got {bidirectional!r}.")
        if readout not in _READOUTS:
            raise ValueError(f"RNN: readout must be one of {_READOUTS} (every step, each "
                             f"sequence's last step, or the mean over its steps), got "
                             f"{readout!r}.")
        check_parameterization(parameterization, "RNN")
        self.out_channels = int(out_channels)
        self.activation = _as_activation(activation)
        self.w_std = as_std(w_std, "w_std")
        self.u_std = as_std(u_std, "u_std")
        self.b_std = None if b_std is None else as_std(b_std, "b_std")
        self.h0_std = as_std(h0_std, "h0_std")
        self.num_layers = int(num_layers)
        self.bidirectional = bidirectional
        self.readout = readout
        self.parameterization = parameterization
        #: standard parameterization: NTK of the bias parameters per layer (torch's
        #: nn.RNN has two biases, b_ih and b_hh; `from_torch` sets 2).
        self._bias_grads = 1.0

    # ------------------------------------------------------------ the registry
    def spec_call(self):
        act = self.activation.spec_call()
        if act is None or act[1] or act[2]:
            return None  # the grammar has no nested layers: only parameter-free activations
        kw = {"w_std": self.w_std, "u_std": self.u_std, "b_std": self.b_std,
              "h0_std": self.h0_std, "num_layers": self.num_layers,
              "bidirectional": self.bidirectional, "readout": self.readout,
              "parameterization": self.parameterization}
        defaults = {"w_std": 1.0, "u_std": 1.0, "b_std": 0.0, "h0_std": 0.0, "num_layers": 1,
                    "bidirectional": False, "readout": "all", "parameterization": "ntk"}
        if any(isinstance(v, Tensor) for v in kw.values()):
            return None
        kw = {k: v for k, v in kw.items() if v != defaults[k]}
        return "rnn", [self.out_channels, act[0]], kw

    @classmethod
    def from_torch_module(cls, module: nn.Module, ctx) -> Layer:
        return convert_torch_rnn(cls, module, ctx)

    # ---------------------------------------------------------------- the rule
    def needs_position_pairs(self) -> bool:
        # The mean reads every step pair (t, t'). Each sequence's own last step and the
        # backward direction under masks of different lengths read pairs too; a first
        # layer computes those from the inputs themselves (see `propagate`).
        return self.readout == "mean"

    def side_inputs(self) -> frozenset[str]:
        return frozenset({"mask"})

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def propagate(self, k: Kernels) -> Kernel:
        k = single(k, self)
        if len(k.shape) != 2:
            raise ValueError(
                f"{self!r} takes sequences (N, channels, length) but receives per-example "
                f"shape {k.shape}; give inputs (N, C, L) (channels first, as Conv1d; transpose "
                f"torch's batch_first (N, L, C) with x.transpose(1, 2)).")
        steps = k.shape[1]
        len1, len2, masks = _lengths(k, steps)
        varied = len1 is not None
        grid_needed = (self.readout == "mean" or (self.readout == "all" and k.position_pairs)
                       or (varied and (self.bidirectional or self.readout == "last")))
        built_pairs = grid_needed and not k.position_pairs
        if built_pairs:
            k = _with_step_pairs(k, self)
        grid = PairGrid(diagonal=k.diagonal, chain=not grid_needed,
                        self_pairs=k.x1_is_x2 or k.diagonal)
        b = 1 if k.diagonal else 2
        if grid.chain:
            kin = (position_diagonal(k.nngp, b) if k.position_pairs else k.nngp)[..., None]
            tin = (position_diagonal(k.ntk, b) if k.position_pairs else k.ntk)[..., None]
        else:
            kin, tin = k.nngp, k.ntk
        qin1, qin2 = k.position_variances()
        nngp, ntk, e1, e2 = self._run(grid, kin, tin, qin1, qin2, len1, len2, k.shape[0])
        out = self._read(k, grid, nngp, ntk, e1, e2, len1, len2, masks)
        return out.to_position_diagonal() if built_pairs else out

    def _coefficients(self, layer: int, fan_in: int, like: Tensor) -> ElmanCoefficients:
        w, u = scalar(self.w_std, like), scalar(self.u_std, like)
        b2 = 0.0 if self.b_std is None else scalar(self.b_std, like) ** 2
        h0 = (scalar(self.h0_std, like) ** 2 if isinstance(self.h0_std, Tensor)
              else float(self.h0_std) ** 2)
        return ElmanCoefficients(
            w2=w * w, u2=u * u, b2=b2, h0=h0,
            standard=self.parameterization == "standard", width=self.out_channels,
            fan_in=fan_in, bias_grads=0.0 if self.b_std is None else self._bias_grads)

    def _run(self, grid: PairGrid, kin, tin, qin1, qin2, len1, len2, in_channels: int):
        """All layers and directions: the last layer's hidden-state kernels ``(*B, L, P)``
        and per-step variances ``(N1, L)``, ``(N2, L')``."""
        fan_in = in_channels
        row_batch = 0
        col_batch = 0 if grid.diagonal else 1
        for layer in range(self.num_layers):
            coef = self._coefficients(layer, fan_in, kin)
            parts = [elman_pairs(self.activation, coef, grid, kin, tin, qin1, qin2)]
            if self.bidirectional:
                def flip(t, lengths_rows=len1, lengths_cols=len2):
                    t = reverse_steps(t, lengths_rows, t.ndim - 2, row_batch)
                    if not grid.chain:
                        t = reverse_steps(t, lengths_cols, t.ndim - 1, col_batch)
                    return t
                rq1 = reverse_steps(qin1, len1, 1, 0)
                rq2 = rq1 if qin2 is qin1 else reverse_steps(qin2, len2, 1, 0)
                n_, t_, e1_, e2_ = elman_pairs(self.activation, coef, grid, flip(kin), flip(tin),
                                               rq1, rq2)
                parts.append((flip(n_), flip(t_), reverse_steps(e1_, len1, 1, 0),
                              e1_ if e2_ is e1_ else reverse_steps(e2_, len2, 1, 0)))
            if len(parts) == 1:
                kin, tin, qin1, qin2 = parts[0]
            else:
                (n0, t0, a0, c0), (n1, t1, a1, c1) = parts
                shared = c0 is a0
                kin, tin = (n0 + n1) / 2, (t0 + t1) / 2
                qin1 = (a0 + a1) / 2
                qin2 = qin1 if shared else (c0 + c1) / 2
            fan_in = self.out_channels * self.directions
        return kin, tin, qin1, qin2

    def _read(self, k: Kernel, grid: PairGrid, nngp, ntk, e1, e2, len1, len2, masks) -> Kernel:
        width = self.out_channels * self.directions
        steps = nngp.shape[-2]
        if masks is not None:
            p1, p2 = (m.to(nngp.dtype) for m in masks)
            e1 = e1 * p1
            e2 = e1 if grid.diagonal else e2 * p2
            if grid.chain:
                present = p1[:, None, :, None] * p2[None, :, :, None] if not grid.diagonal \
                    else p1[..., None]
            elif grid.diagonal:
                present = p1[:, :, None] * p1[:, None, :]
            else:
                present = p1[:, None, :, None] * p2[None, :, None, :]
            nngp, ntk = nngp * present, ntk * present
        if self.readout == "all":
            if grid.chain:
                nngp, ntk = nngp[..., 0], ntk[..., 0]
                return k.replace(nngp=nngp, ntk=ntk, cov1=e1, cov2=e2, shape=(width, steps),
                                 is_gaussian=False, is_input=False, ntk_per_channel=False,
                                 position_pairs=False, cov_pairs=True)
            if k.diagonal:
                cov1 = cov2 = nngp if k.cov_pairs else e1
            elif k.cov_pairs:
                cov1 = self._self_covariance(k.cov1, len1, masks and masks[0], k.shape[0])
                cov2 = cov1 if k.cov2 is k.cov1 else self._self_covariance(
                    k.cov2, len2, masks and masks[1], k.shape[0])
            else:
                cov1, cov2 = e1, e2
            return k.replace(nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, shape=(width, steps),
                             is_gaussian=False, is_input=False, ntk_per_channel=False,
                             position_pairs=True, cov_pairs=k.cov_pairs)
        dense = {"shape": (width,), "is_gaussian": False, "is_input": False,
                 "ntk_per_channel": False,
                 "position_pairs": False, "cov_pairs": True}
        if self.readout == "last":
            nngp, ntk = _last(grid, nngp, len1, len2), _last(grid, ntk, len1, len2)
            c1 = _last_of(e1, len1)
            c2 = c1 if (grid.diagonal or e2 is e1) else _last_of(e2, len2)
            return k.replace(nngp=nngp, ntk=ntk, cov1=c1, cov2=c2, **dense).with_side(
                "mask", None)
        # mean over each sequence's own steps
        nngp, ntk = _mean(grid, nngp, len1, len2), _mean(grid, ntk, len1, len2)

        def compute(cov):
            which = 0 if cov is k.cov1 else 1
            lengths = (len1, len2)[which]
            full = self._self_covariance(cov, lengths, masks and masks[which], k.shape[0])
            return _mean(PairGrid(True, False, True), full, lengths, lengths)

        c1, c2 = k.self_covariances(compute, diagonal_result=nngp)
        return k.replace(nngp=nngp, ntk=ntk, cov1=c1, cov2=c2, **dense).with_side("mask", None)

    def _self_covariance(self, cov: Tensor, lengths, mask, in_channels: int) -> Tensor:
        """Each sequence's hidden states between all its steps ``(N, L, L)``, from its
        input covariance ``(N, L, L)``."""
        grid = PairGrid(diagonal=True, chain=False, self_pairs=True)
        q = position_diagonal(cov, 1)
        nngp, _, _, _ = self._run(grid, cov, torch.zeros_like(cov), q, q, lengths, lengths,
                                  in_channels)
        if mask is not None:
            p = mask.to(nngp.dtype)
            nngp = nngp * p[:, :, None] * p[:, None, :]
        return nngp

    # --------------------------------------------------------- the finite twin
    def _build(self, shape: Shapes, ctx: BuildContext) -> tuple[nn.Module, Shapes]:
        if not shape or isinstance(shape[0], tuple) or len(shape) != 2:
            raise ValueError(f"{self!r} takes sequences of per-example shape (channels, length), "
                             f"got {shape}.")
        module = NTKRNN(int(shape[0]), self.out_channels, self.activation.fn,
                        w_std=number(self.w_std), u_std=number(self.u_std),
                        b_std=number(self.b_std), h0_std=number(self.h0_std),
                        num_layers=self.num_layers, bidirectional=self.bidirectional,
                        readout=self.readout, parameterization=self.parameterization, ctx=ctx)
        width = self.out_channels * self.directions
        return module, ((width, shape[1]) if self.readout == "all" else (width,))

    def __repr__(self) -> str:
        extra = ""
        if self.h0_std != 0.0:
            extra += f", h0_std={self.h0_std}"
        if self.num_layers != 1:
            extra += f", num_layers={self.num_layers}"
        if self.bidirectional:
            extra += ", bidirectional=True"
        if self.readout != "all":
            extra += f", readout={self.readout!r}"
        if self.parameterization != "ntk":
            extra += ", parameterization='standard'"
        return (f"RNN({self.out_channels}, {self.activation!r}, w_std={self.w_std}, "
                f"u_std={self.u_std}, b_std={self.b_std}{extra})")


def _as_activation(activation) -> Activation:
    if isinstance(activation, str):
        table = {normal_name(n): c for n, c in spec_constructors().items()}
        ctor = table.get(normal_name(activation))
        layer = ctor() if ctor is not None else None
        if not isinstance(layer, Activation):
            raise ValueError(f"RNN: activation {activation!r} is not the name of an ntkit "  # noqa: TRY004
                             f"activation; give e.g. 'relu', 'erf', 'tanh' or an instance such "
                             f"as nk.Erf().")
        return layer
    if not isinstance(activation, Activation):
        raise TypeError(f"RNN: activation must be an ntkit activation layer (nk.ReLU(), "
                        f"nk.Erf(), nk.Tanh(), nk.Elementwise(fn), ...) or its name, got "
                        f"{type(activation).__name__}.")
    return activation


def _lengths(k: Kernel, steps: int):
    """Per-example lengths ``(N1,)``, ``(N2,)`` and the masks, from the kernel's
    ``"mask"`` side input; ``(None, None, None)`` when every sequence is complete."""
    pair = k.side_pair("mask")
    if pair is None:
        return None, None, None
    m1, m2 = pair
    m2 = m1 if m2 is None else m2
    out = []
    for m, which in ((m1, "x1"), (m2, "x2")):
        if m.ndim != 2 or m.shape[1] != steps:
            raise ValueError(f"RNN: the mask for {which} must be (N, L) with L = {steps} steps, "
                             f"got shape {tuple(m.shape)}.")
        n = m.sum(1)
        prefix = torch.arange(steps, device=m.device)[None, :] < n[:, None]
        if not bool((prefix == m).all()):
            raise ValueError(f"RNN: the mask for {which} must hold a prefix of True per sequence "
                             f"(every sequence starts at step 0, as torch's packed sequences); "
                             f"it has gaps or starts late. Left-align the sequences.")
        if bool((n == 0).any()):
            raise ValueError(f"RNN: the mask for {which} has a sequence without any step; "
                             f"every sequence needs at least one present step.")
        out.append(n)
    if bool((out[0] == steps).all()) and bool((out[1] == steps).all()):
        return None, None, None
    return out[0], out[1], (m1, m2)


def _with_step_pairs(k: Kernel, layer: RNN) -> Kernel:
    """The input kernel ``k`` (matching steps only) with every step pair, computed from
    the inputs it holds; an error when it is not the inputs' kernel."""
    if not k.is_input or k.inputs is None:
        raise ValueError(
            f"{layer!r} reads every pair of steps here (sequences of different lengths with "
            f"readout='last' or bidirectional), but after other layers it receives matching "
            f"steps only. Make the RNN the first layer, or put a layer that mixes positions "
            f"after it (e.g. RNN(readout='all') then nk.GlobalAvgPool()), or use "
            f"readout='mean'.")
    x1, x2 = k.inputs
    c = x1.shape[1]
    if k.diagonal:
        nngp = torch.einsum("ncl,ncm->nlm", x1, x1) / c
    else:
        nngp = torch.einsum("icl,jcm->ijlm", x1, x1 if x2 is None else x2) / c
    return k.replace(nngp=nngp, ntk=torch.zeros_like(nngp), position_pairs=True, cov_pairs=False,
                     inputs=k.inputs)


def _last(grid: PairGrid, t: Tensor, len1, len2) -> Tensor:
    """The entries at each pair's own last steps: ``(*B,)`` from ``(*B, L, P)``."""
    if len1 is None:
        return t[..., -1, -1]
    i1 = (len1 - 1).to(t.device)
    if grid.diagonal:
        ar = torch.arange(t.shape[0], device=t.device)
        return t[ar, i1, i1]
    i2 = (len2 - 1).to(t.device)
    a1 = torch.arange(t.shape[0], device=t.device)[:, None]
    a2 = torch.arange(t.shape[1], device=t.device)[None, :]
    return t[a1, a2, i1[:, None], i2[None, :]]


def _last_of(e: Tensor, lengths) -> Tensor:
    if lengths is None:
        return e[:, -1]
    return e[torch.arange(e.shape[0], device=e.device), (lengths - 1).to(e.device)]


def _mean(grid: PairGrid, t: Tensor, len1, len2) -> Tensor:
    """The mean over each pair's own steps (absent steps are zero already)."""
    total = t.sum((-2, -1))
    if len1 is None:
        return total / (t.shape[-2] * t.shape[-1])
    n1 = len1.to(t.dtype)
    if grid.diagonal:
        return total / (n1 * n1)
    return total / (n1[:, None] * len2.to(t.dtype)[None, :])

"""Finite recurrent networks: the twin of `ntkit.layers.RNN`, a torch wrapper that
puts ``nn.RNN`` into ntkit's sequence layout with a readout, and the conversion
of torch's ``nn.RNN`` (see `convert_torch_rnn`)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .._side import SideModule
from .base import BuildContext

__all__ = ["NTKRNN", "TorchRNN", "convert_torch_rnn"]


def _lengths_of(mask: Tensor | None, n: int, steps: int, device) -> Tensor | None:
    if mask is None:
        return None
    lengths = mask.sum(1).to(device)
    return None if bool((lengths == steps).all()) else lengths


def _reverse_time(x: Tensor, lengths: Tensor | None) -> Tensor:
    """``x`` ``(L, N, C)`` with each sequence's present steps reversed (absent
    steps receive values the caller ignores)."""
    if lengths is None:
        return x.flip(0)
    steps = x.shape[0]
    ar = torch.arange(steps, device=x.device)
    idx = (lengths[None, :] - 1 - ar[:, None]) % steps  # (L, N)
    return torch.gather(x, 0, idx[:, :, None].expand_as(x))


def _readout(seq: Tensor, lengths: Tensor | None, readout: str) -> Tensor:
    """``seq`` ``(L, N, C)`` (absent steps zero) -> ``(N, C, L)``, ``(N, C)`` last or mean."""
    steps, n = seq.shape[:2]
    if readout == "all":
        return seq.permute(1, 2, 0)
    if readout == "last":
        last = (lengths - 1) if lengths is not None else torch.full(
            (n,), steps - 1, device=seq.device)
        return seq[last, torch.arange(n, device=seq.device)]
    if lengths is None:
        return seq.mean(0)
    return seq.sum(0) / lengths.to(seq.dtype)[:, None]


class NTKRNN(SideModule):
    """The finite twin of `ntkit.layers.RNN`: stacked, optionally bidirectional Elman
    layers in NTK or standard parameterization, over ``(N, C, L)``.

    Parameters per layer ``l`` and direction (suffix ``_reverse``):
    ``weight_hh_l{l}`` ``(n, n)``, ``weight_ih_l{l}`` ``(n, m_l)``, ``bias_l{l}``
    ``(n,)``, drawn in that order. A mask (``model(x, mask=m)``, booleans ``(N,
    L)``, a prefix of True per sequence) runs each sequence over its own steps
    as torch's packed sequences do. With ``h0_std > 0`` the initial states are
    drawn at every call, independently per sequence, from the module's own
    generator (seeded at build from the build's generator).
    """

    def __init__(self, in_channels: int, hidden: int, fn, *, w_std: float, u_std: float,
                 b_std: float | None, h0_std: float, num_layers: int, bidirectional: bool,
                 readout: str, parameterization: str, ctx: BuildContext) -> None:
        super().__init__()
        self.fn = fn
        self.hidden = hidden
        self.num_layers = num_layers
        self.directions = 2 if bidirectional else 1
        self.readout = readout
        self.h0_std = float(h0_std or 0.0)
        ntk = parameterization == "ntk"
        self.parameterization = parameterization
        self.scales: dict[str, float] = {}
        for layer in range(num_layers):
            fan_in = in_channels if layer == 0 else hidden * self.directions
            for d in range(self.directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                for name, shape, std in (("weight_hh", (hidden, hidden), w_std / math.sqrt(hidden)),
                                         ("weight_ih", (hidden, fan_in), u_std / math.sqrt(fan_in)),
                                         ("bias", (hidden,), b_std)):
                    if std is None:
                        self.register_parameter(name + sfx, None)
                        continue
                    w = ctx.randn(*shape)
                    self.register_parameter(name + sfx, nn.Parameter(w if ntk else w * std))
                    self.scales[name + sfx] = std if ntk else 1.0
        self.h0_generator = None
        if self.h0_std > 0 and ctx.device.type != "meta":
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=ctx.generator,
                                     device=ctx.generator.device if ctx.generator is not None
                                     else "cpu"))
            self.h0_generator = torch.Generator(device=ctx.device).manual_seed(seed)

    def _p(self, name: str) -> Tensor | None:
        p = getattr(self, name)
        if p is None:
            return None
        s = self.scales[name]
        return p * s if s != 1.0 else p

    def forward_side(self, x: Tensor, side: dict) -> Tensor:
        if x.ndim != 3:
            raise ValueError(f"NTKRNN takes sequences (N, C, L), got shape {tuple(x.shape)}.")
        n, _, steps = x.shape
        lengths = _lengths_of(side.get("mask"), n, steps, x.device)
        seq = x.permute(2, 0, 1)  # (L, N, C)
        present = None
        if lengths is not None:
            present = (torch.arange(steps, device=x.device)[:, None] < lengths[None, :]
                       ).to(x.dtype)[:, :, None]
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                inp = seq if d == 0 else _reverse_time(seq, lengths)
                out = self._direction(inp, sfx)
                outs.append(out if d == 0 else _reverse_time(out, lengths))
            seq = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if present is not None:
                seq = seq * present
        return _readout(seq, lengths, self.readout)

    def _direction(self, inp: Tensor, sfx: str) -> Tensor:
        w, u, b = self._p("weight_hh" + sfx), self._p("weight_ih" + sfx), self._p("bias" + sfx)
        drive = inp @ u.T
        if b is not None:
            drive = drive + b
        n = inp.shape[1]
        if self.h0_std > 0:
            h = torch.randn(n, self.hidden, generator=self.h0_generator, dtype=inp.dtype,
                            device=inp.device) * self.h0_std
        else:
            h = inp.new_zeros(n, self.hidden)
        out = []
        for t in range(inp.shape[0]):
            h = self.fn(drive[t] + h @ w.T)
            out.append(h)
        return torch.stack(out)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, num_layers={self.num_layers}, "
                f"directions={self.directions}, readout={self.readout!r}, "
                f"parameterization={self.parameterization!r}")


class TorchRNN(nn.Module):
    """``nn.RNN`` in ntkit's sequence layout, with a readout: for ``nn.Sequential``
    models that `ntkit.from_torch` converts.

    torch's ``nn.RNN`` takes ``(N, L, C)`` (``batch_first``) or ``(L, N, C)`` and
    returns a tuple, so it cannot sit inside ``nn.Sequential`` by itself. This
    wrapper takes sequences channels first, ``(N, C, L)`` (as ``nn.Conv1d`` and
    ntkit do), whatever the inner module's ``batch_first``, and returns
    ``(N, D H, L)`` (``readout="all"``), the output at each sequence's last step
    ``(N, D H)`` (``"last"``: torch's ``output[n, length_n - 1]``), or the mean
    over each sequence's steps (``"mean"``). ``forward(x, mask=m)`` with
    booleans ``(N, L)`` (a prefix of True per sequence) runs each sequence over
    its own steps through a packed sequence.

    Args:
        rnn: an ``nn.RNN`` (any ``batch_first``, ``num_layers``, ``bidirectional``,
            ``nonlinearity``; ``dropout=0`` for conversion).
        readout: ``"all"``, ``"last"`` or ``"mean"``.
    """

    def __init__(self, rnn: nn.RNN, readout: str = "last") -> None:
        super().__init__()
        if type(rnn) is not nn.RNN:
            raise TypeError(f"TorchRNN wraps an nn.RNN, got {type(rnn).__name__}.")
        if readout not in ("all", "last", "mean"):
            raise ValueError(f"TorchRNN: readout must be 'all', 'last' or 'mean', got "
                             f"{readout!r}.")
        self.rnn = rnn
        self.readout = readout

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.ndim != 3:
            raise ValueError(f"TorchRNN takes sequences (N, C, L), got shape {tuple(x.shape)}.")
        n, _, steps = x.shape
        seq = x.permute(2, 0, 1)  # (L, N, C)
        lengths = _lengths_of(mask, n, steps, x.device)
        inp = seq.transpose(0, 1) if self.rnn.batch_first else seq
        if lengths is None:
            out, _ = self.rnn(inp)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(
                inp, lengths.cpu(), batch_first=self.rnn.batch_first, enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(
                out, batch_first=self.rnn.batch_first, total_length=steps)
        if self.rnn.batch_first:
            out = out.transpose(0, 1)
        return _readout(out, lengths, self.readout)

    def extra_repr(self) -> str:
        return f"readout={self.readout!r}"


class TorchRNNInitWarning(UserWarning):
    """A converted ``nn.RNN`` keeps torch's input scaling, which vanishes at large widths."""


def convert_torch_rnn(cls, module: nn.Module, ctx):
    """The ntkit layer(s) of an ``nn.RNN`` or a `TorchRNN`, with torch's initialisation.

    torch draws every weight and both biases of ``nn.RNN`` from ``U(-1/sqrt(H),
    1/sqrt(H))`` (variance ``1 / (3 H)``, ``H = hidden_size``), the input-to-hidden
    weights included. In ntkit's terms, layer ``l`` with input width ``m_l`` is
    ``RNN(H, w_std=1/sqrt(3), u_std=sqrt(m_l / (3 H)), b_std=sqrt(2 / (3 H)))`` in
    standard parameterization (two bias vectors, so the standard NTK's bias term
    is 2); a stacked module becomes one `RNN` per layer (their ``u_std`` differ)
    in a `Sequential`. The first layer's input term, ``m / (3 H)``, vanishes as
    ``H`` grows: a `TorchRNNInitWarning` says so. ``w_std``/``b_std`` given to
    `from_torch` replace the weight scales (recurrent and input alike) and the
    bias scale.

    A bare ``nn.RNN`` converts with ``readout="all"``; the converted network takes
    ``(N, C, L)``, i.e. ``x.transpose(1, 2)`` of a ``batch_first`` input. A
    `TorchRNN` takes ``(N, C, L)`` itself and gives its readout.
    """
    from .activations import ReLU
    from .containers import Sequential
    from .elementwise import Tanh

    readout = "all"
    if isinstance(module, TorchRNN):
        readout, module = module.readout, module.rnn
    if type(module) is not nn.RNN:
        raise ctx.fail(f"{type(module).__name__} is not an nn.RNN.")
    if module.nonlinearity not in ("tanh", "relu"):
        raise ctx.fail(f"nonlinearity {module.nonlinearity!r} has no rule.")
    if module.dropout and module.num_layers > 1:
        raise ctx.fail(f"dropout={module.dropout} between recurrent layers has no kernel rule "
                       f"here; set dropout=0 (or convert an evaluation-mode copy).")
    hidden, m = module.hidden_size, module.input_size
    dirs = 2 if module.bidirectional else 1
    bias = bool(module.bias)
    if ctx.w_std is None:
        warnings.warn(
            f"{ctx.where}: torch initialises nn.RNN's input-to-hidden weights with variance "
            f"1/(3*hidden_size), so the input enters the first layer's kernel with weight "
            f"u_std^2 = input_size/(3*hidden_size) = {m / (3 * hidden):.3g}, which vanishes as "
            f"the hidden size grows (the wide network then forgets its input). The converted "
            f"kernel keeps torch's value; for an input that counts at any width use "
            f"nk.RNN(H, activation, u_std=1.0, ...) or pass w_std= to from_torch.",
            TorchRNNInitWarning, stacklevel=2)
    act = ReLU() if module.nonlinearity == "relu" else Tanh(degree=ctx.degree)
    layers = []
    for layer in range(module.num_layers):
        fan_in = m if layer == 0 else hidden * dirs
        w_std = ctx.w_std if ctx.w_std is not None else 1 / math.sqrt(3)
        u_std = ctx.w_std if ctx.w_std is not None else math.sqrt(fan_in / (3 * hidden))
        if not bias:
            b_std = None
        else:
            b_std = ctx.b_std if ctx.b_std is not None else math.sqrt(2 / (3 * hidden))
        rnn = cls(hidden, act, w_std=w_std, u_std=u_std, b_std=b_std,
                  bidirectional=module.bidirectional,
                  readout=readout if layer == module.num_layers - 1 else "all",
                  parameterization=ctx.parameterization)
        if bias and ctx.b_std is None:
            rnn._bias_grads = 2.0
        layers.append(rnn)
    return layers[0] if len(layers) == 1 else Sequential(*layers)

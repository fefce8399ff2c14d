"""`from_torch`: the infinite-width twin of an existing PyTorch model.

The model is traced with `torch.fx`; each node becomes an ntkit layer, and the
graph of tensors is rebuilt as nested containers: a tensor used by ``k`` later
operations becomes ``FanOut(k)`` followed by ``Parallel`` of the branches,
which rejoin at the add (``FanInSum``) or ``torch.cat`` (``FanInConcat``) that
merges them. This works for every series-parallel graph (chains, residual
blocks, nested blocks, Inception-style concatenations); others are refused.

The package: `_tracing` (the error type, known torch functions, the tracer),
`_nodes` (one node -> one layer; module rules come from the layer registry,
`ntkit.layers.registry`) and `_graph` (whole-graph checks and assembly).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..layers import Sequential
from ._graph import _Converter
from ._tracing import ConversionError, _Options

__all__ = ["ConversionError", "from_torch"]


def from_torch(
    module: nn.Module,
    *,
    parameterization: Literal["ntk", "standard"] = "standard",
    w_std: float | None = None,
    b_std: float | None = None,
    degree: int | str = "auto",
    n_samples: int = 256,
    seed: int = 0,
) -> Sequential:
    """The infinite-width twin of a PyTorch model.

    Each ``nn.Linear`` becomes a `Linear` of the same widths, each
    ``nn.Conv1d/2d/3d`` a `Conv1d`/`Conv2d`/`Conv3d` with its kernel size,
    stride, padding (ints, ``"same"`` or ``"valid"``; zeros, circular, reflect
    or replicate), dilation and ``in_channels``. By default weights and biases
    have the variances of PyTorch's default initialisation of these modules
    (uniform on ``+-1/sqrt(fan_in)``, variance ``1 / (3 fan_in)``, with
    ``fan_in = in_features`` or ``in_channels * prod(kernel_size)``), that is
    ``w_std = 1/sqrt(3)`` and ``b_std = 1/sqrt(3 fan_in)``, in standard
    parameterization: the kernel of the model as PyTorch initialises and
    trains it. Activations with a closed form use it; other parameter-free
    elementwise ones (tanh, SiLU, ...) use the quadrature path, `Elementwise`.
    ``nn.AvgPool*`` become `AvgPool1d`/`2d`/`3d`, ``nn.AdaptiveAvgPool*(1)``
    and means over the spatial axes `GlobalAvgPool` (which drops the size-1
    spatial axes that torch keeps; a following flatten is then a no-op).

    Models other than ``nn.Sequential`` are traced with `torch.fx`, so their
    ``forward`` must be symbolically traceable (no control flow on tensor
    values). A tensor used several times branches (`FanOut`, `Parallel`) and
    the branches must rejoin at one ``+`` (`FanInSum`) or ``torch.cat(...,
    dim=1)`` (`FanInConcat`), possibly nested: residual blocks with an identity
    or a projection shortcut, ResNet-style networks (without BatchNorm),
    Inception-style concatenations. In a sum, all branches but one must end in
    a layer with its own zero-mean weights (Linear or Conv, possibly followed
    by pooling, flattening, dropout or LayerNorm): then the branches are
    uncorrelated and the kernel of the sum is the sum of their kernels.

    The kernel itself exists where every activation receives Gaussian
    pre-activations (see `ReLU`): a sum is Gaussian when all its branches are,
    e.g. an identity shortcut of a Conv's output, a 1x1 projection shortcut,
    or pre-activation blocks (ReLU before each Conv, as WideResNet). A
    torchvision-style ResNet whose identity blocks add a ReLU's output before
    the next ReLU converts, and its finite twin builds, but ``kernel`` refuses
    it: that sum has no closed-form kernel (nor in neural-tangents).

    Args:
        module: the model: an ``nn.Sequential`` (nested ones are flattened) or
            an ``nn.Module`` whose ``forward`` combines supported modules and
            functions, on one input.
        parameterization: ``"standard"`` (PyTorch's) or ``"ntk"``.
        w_std: weight standard deviation times ``sqrt(fan_in)`` for every
            Linear and Conv, instead of PyTorch's default.
        b_std: bias standard deviation for every Linear and Conv with a bias,
            instead of PyTorch's default.
        degree: quadrature nodes per axis for activations without closed form, or
            ``"auto"`` (adapted to the pre-activation variance; see `Elementwise`).
        n_samples: logit draws of each converted attention layer (see
            `MultiheadAttention`; the kernel's sampling error falls as
            ``n_samples^-1/2``, and `numerical_error` reports it).
        seed: seed of the first converted attention layer; the next ones take
            ``seed + 1, ...``.

    Sequence models: ``nn.Embedding`` (ids ``(N, L)``, also for the twin), a
    learned positional ``nn.Parameter`` or the sinusoidal table (a buffer) added
    to its output, ``nn.MultiheadAttention`` called as self-attention
    (``attn(x, x, x)[0]``), ``nn.TransformerEncoderLayer`` (pre- and post-LN,
    relu or gelu) and ``nn.TransformerEncoder``, position-wise ``nn.Linear`` and
    ``nn.LayerNorm`` (with its learnable scale and shift), and the readouts
    ``x.mean(1)``, ``x[:, 0]``, ``x[:, -1]`` (``x.mean(0)``, ``x[0]``, ``x[-1]``
    when not batch-first) convert with torch's initial variances
    (`ntkit.convert._sequence`). The twin holds sequences channels first,
    ``(N, E, L)``: a model that takes floats ``(N, L, E)`` straight into an
    attention module has a twin that takes ``x.transpose(1, 2)``. ``is_causal=True``
    is the causal mask; padding masks (``src_key_padding_mask``, True where
    absent) are not read from the model: pass ``net.kernel(..., mask=present)``
    (True where present). ``x[:, -1]`` becomes ``TokenReadout("last")``, which
    with a padding mask takes each sequence's last present token.

    Raises:
        ConversionError: (a `TypeError` and a `ValueError`) for a model that
            cannot be traced, or contains a module or function with no kernel
            rule (BatchNorm, max pooling, grouped convolutions, scalar
            arithmetic such as ``x * 2``, ...), shares parameters between
            layers, changes tensors in place ambiguously, or whose graph is not
            series-parallel; the message names the module or operation (and its
            line in ``forward``) and what is supported.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch takes a torch.nn.Module, got {type(module).__name__}.")
    for name, value, low in (("n_samples", n_samples, 4), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (
                name == "n_samples" and value % 4):
            raise ValueError(f"from_torch: {name} must be an int >= {low}"
                             f"{' and a multiple of 4' if name == 'n_samples' else ''}, got "
                             f"{value!r}.")
    options = _Options(parameterization, w_std, b_std, degree, n_samples, seed)
    return _Converter(module, options).run()

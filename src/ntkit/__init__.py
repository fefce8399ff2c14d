"""ntkit: infinite-width NNGP and neural tangent kernels on PyTorch.

The public surface is re-exported here; everything else is private. The public
submodules that pull in more (``nk.predict``, ``nk.solvers``, ``nk.sklearn``,
``nk.plot``, ...) are attributes too, imported on first access, so that
``import ntkit`` loads only the layer algebra and torch.
"""

from __future__ import annotations

import importlib

from ._budget import parse_memory
from .convert import ConversionError, from_torch
from .empirical import empirical_nngp, empirical_ntk, empirical_ntk_by_layer
from .kernel import Kernel
from .kernel_matrix import TileDone, kernel_matrix, write_kernel_matrix
from .layers import (
    GELU,
    ABReLU,
    Abs,
    Activation,
    Aggregate,
    EdgeList,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    Cos,
    Dropout,
    Elementwise,
    Erf,
    Exp,
    ExpNormalized,
    Gabor,
    Hermite,
    Polynomial,
    SigmoidLike,
    FanInConcat,
    FanInProd,
    FanInSum,
    FanOut,
    Flatten,
    Gaussian,
    GlobalAvgPool,
    GlobalSumPool,
    Identity,
    Layer,
    LayerNorm,
    LeakyReLU,
    Linear,
    LocallyConnected1d,
    LocallyConnected2d,
    LocallyConnected3d,
    Monomial,
    Parallel,
    RNN,
    GRU,
    LSTM,
    Rbf,
    RectifiedMonomial,
    ReLU,
    Repeat,
    SelfAttention,
    Embedding,
    MultiheadAttention,
    TokenReadout,
    encoder_block,
    numerical_error,
    Sequential,
    Sigmoid,
    Sign,
    Sin,
    Softplus,
    SumPool1d,
    SumPool2d,
    SumPool3d,
    Tanh,
    TorchRNN,
)
from .linearize import TaylorModel, linearize, taylor
from .monte_carlo import empirical_kernels, monte_carlo_kernel
from .finite import finite_width, nngp_four_point

__version__ = "0.1.0"

#: Public submodules imported on first access as ``nk.<name>`` (module-level
#: ``__getattr__``, PEP 562). ``nk.kernel_matrix`` is the function of that name;
#: its module is ``importlib.import_module("ntkit.kernel_matrix")``.
_LAZY_SUBMODULES = ("cli", "datasets", "demo", "errors", "features", "plot", "predict", "solvers",
                    "sklearn", "spec", "theory")

__all__ = [
    "ExpNormalized", "Gabor", "Hermite", "Polynomial", "SigmoidLike",
    "GELU",
    "ABReLU",
    "Abs",
    "Activation",
    "Aggregate",
    "EdgeList",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "ConversionError",
    "Cos",
    "Dropout",
    "Elementwise",
    "Erf",
    "Exp",
    "FanInConcat",
    "FanInProd",
    "FanInSum",
    "FanOut",
    "Flatten",
    "Gaussian",
    "GlobalAvgPool",
    "GlobalSumPool",
    "Identity",
    "Kernel",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LocallyConnected1d",
    "LocallyConnected2d",
    "LocallyConnected3d",
    "Monomial",
    "Parallel",
    "RNN",
    "GRU",
    "LSTM",
    "Rbf",
    "ReLU",
    "RectifiedMonomial",
    "Repeat",
    "SelfAttention",
    "Embedding",
    "MultiheadAttention",
    "TokenReadout",
    "encoder_block",
    "numerical_error",
    "Sequential",
    "Sign",
    "Sin",
    "SumPool1d",
    "SumPool2d",
    "SumPool3d",
    "Sigmoid",
    "Softplus",
    "Tanh",
    "TorchRNN",
    "TaylorModel",
    "TileDone",
    "empirical_kernels",
    "empirical_nngp",
    "empirical_ntk",
    "empirical_ntk_by_layer",
    "finite_width",
    "nngp_four_point",
    "from_torch",
    "kernel_matrix",
    "linearize",
    "monte_carlo_kernel",
    "parse_memory",
    "taylor",
    "write_kernel_matrix",
]


def __getattr__(name: str):
    """``nk.predict`` and the other public submodules, imported on first access."""
    if name in _LAZY_SUBMODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but needs something missing: say what
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {n for n in _LAZY_SUBMODULES})

"""The infinite-width layer algebra: each layer has a kernel rule and a finite twin.

Every layer class declares its spec names and the torch modules it converts
from (`ntkit.layers.registry`); the spec grammar, `from_torch` and the
estimators' activation names are read from there.
"""

from .activations import (
    GELU,
    ABReLU,
    Abs,
    Activation,
    Cos,
    Erf,
    Exp,
    Gaussian,
    LeakyReLU,
    Rbf,
    ReLU,
    Sign,
    Sin,
)
from .attention import SelfAttention
from .embedding import Embedding
from .mha import MultiheadAttention, numerical_error
from .transformer import TokenReadout, encoder, encoder_block, readout
from .base import Layer, input_kernel
from .containers import (
    FanInConcat,
    FanInProd,
    FanInSum,
    FanOut,
    Identity,
    Parallel,
    Repeat,
    Sequential,
)
from .conv import Conv1d, Conv2d, Conv3d
from .conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from .conv_local import LocallyConnected1d, LocallyConnected2d, LocallyConnected3d
from .elementwise import Elementwise, Sigmoid, Softplus, Tanh
from .graph import Aggregate, EdgeList
from .linear import Flatten, Linear
from .normalization import Dropout, LayerNorm
from .polynomial import Monomial, RectifiedMonomial
from .gated import GRU, LSTM
from .recurrent import RNN
from .recurrent_twin import TorchRNN
from .special import ExpNormalized, Gabor, Hermite, Polynomial, SigmoidLike
from .pool import (
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    GlobalAvgPool,
    GlobalSumPool,
    SumPool1d,
    SumPool2d,
    SumPool3d,
)

__all__ = [
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Aggregate",
    "RNN", "TorchRNN",
    "GRU", "LSTM",
    "Embedding", "MultiheadAttention", "TokenReadout", "encoder", "encoder_block", "readout",
    "numerical_error",
    "EdgeList",
    "Hermite", "Polynomial", "ExpNormalized", "Gabor", "SigmoidLike",
    "Layer", "input_kernel", "Linear", "Flatten", "Activation", "ReLU", "LeakyReLU", "ABReLU",
    "Abs", "Sign", "Erf", "GELU", "Sin", "Cos", "Rbf", "Gaussian", "Exp", "Monomial",
    "RectifiedMonomial", "Elementwise", "Tanh", "Sigmoid", "Softplus", "LayerNorm", "Dropout",
    "Sequential", "Parallel", "FanOut", "FanInSum", "FanInConcat", "FanInProd", "Repeat",
    "Identity", "Conv1d", "Conv2d", "Conv3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "SumPool1d", "SumPool2d", "SumPool3d", "GlobalAvgPool", "GlobalSumPool",
    "SelfAttention", "LocallyConnected1d", "LocallyConnected2d", "LocallyConnected3d",
]

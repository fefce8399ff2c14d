"""ntkit: infinite-width NNGP and neural tangent kernels on PyTorch.

The public surface is re-exported here; everything else is private.
"""

from .compute import parse_memory
from .convert import ConversionError, from_torch
from .empirical import empirical_nngp, empirical_ntk
from .kernel import Kernel
from .layers import (
    AvgPool1d, AvgPool2d, AvgPool3d, Conv1d, Conv2d, Conv3d, GlobalAvgPool, GlobalSumPool,
    SumPool1d, SumPool2d, SumPool3d,
    ABReLU, Abs, Activation, Cos, Dropout, Elementwise, Erf, Exp, FanInConcat, FanInProd,
    FanInSum, FanOut, Flatten, Gaussian, GELU, Identity, Layer, LayerNorm, LeakyReLU, Linear,
    Monomial, Parallel, Rbf, RectifiedMonomial, ReLU, Repeat, Sequential, Sign, Sin,
)
from .layers import SelfAttention
from .linearize import TaylorModel, linearize, taylor
from .monte_carlo import empirical_kernels, monte_carlo_kernel
from .kernel_matrix import TileDone, kernel_matrix, write_kernel_matrix

__version__ = "0.1.0"

__all__ = [
    "Kernel", "Layer", "Linear", "Flatten", "Activation", "ReLU", "LeakyReLU", "ABReLU", "Abs",
    "Sign", "Erf", "GELU", "Sin", "Cos", "Rbf", "Gaussian", "Exp", "Monomial",
    "RectifiedMonomial", "Elementwise", "LayerNorm", "Dropout", "Sequential", "Parallel",
    "FanOut", "FanInSum", "FanInConcat", "FanInProd", "Repeat", "Identity", "from_torch",
    "ConversionError", "empirical_ntk", "empirical_nngp",
    "monte_carlo_kernel", "empirical_kernels", "parse_memory",
    "Conv1d", "Conv2d", "Conv3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "SumPool1d",
    "SumPool2d", "SumPool3d", "GlobalAvgPool", "GlobalSumPool",
    "SelfAttention",
    "linearize", "taylor", "TaylorModel",
    "kernel_matrix", "write_kernel_matrix", "TileDone",
]

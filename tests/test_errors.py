"""Bad input: each case raises the right exception type, and the message says what was
received and what to do about it.

`expect` checks several key phrases of the message (case-insensitive regexes), so a
test fails both when the wrong exception comes and when the message stops being useful.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import ntkit as nk


@contextmanager
def expect(exc: type[BaseException], *phrases: str):
    """Like pytest.raises(exc), and every regex in `phrases` must occur in the message."""
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value)
    missing = [p for p in phrases if not re.search(p, message, flags=re.IGNORECASE)]
    assert not missing, f"message lacks {missing}:\n{message}"


def _x(n: int = 3, d: int = 4, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(0))


def _mlp(**linear_kw) -> nk.Sequential:
    return nk.Sequential(nk.Linear(8, **linear_kw), nk.ReLU(), nk.Linear(1))


# ------------------------------------------------------------ feature counts
def test_linear_in_features_mismatch():
    """A Linear with in_features=5 given 4 features names both counts and the fix."""
    with expect(ValueError, r"expects 5 input features", r"receives 4",
                r"\(N, 5\)|change in_features"):
        _mlp(in_features=5).kernel(_x(d=4))


def test_from_torch_linear_in_features_mismatch():
    """from_torch keeps nn.Linear(5, ...)'s in_features and checks it against 4-feature input."""
    net = nk.from_torch(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)))
    with expect(ValueError, r"expects 5 input features", r"receives 4", r"\(N, 5\)"):
        net.kernel(_x(d=4))


def test_x1_x2_feature_mismatch():
    """x1 and x2 with different feature counts: both shapes are named."""
    with expect(ValueError, r"x1 has per-example shape \(4,\)", r"x2 has \(5,\)",
                r"same features"):
        _mlp().kernel(_x(d=4), _x(d=5))


def test_build_input_shape_mismatch():
    """build() with an input_shape contradicting in_features names both."""
    with expect(ValueError, r"expects 5 input features", r"input_shape gives 4"):
        _mlp(in_features=5).build((4,))


def test_spatial_input_to_linear():
    """(N, C, L) inputs into a dense Linear: the message names the shape and Flatten."""
    with expect(ValueError, r"\(3, 4\)", r"Flatten\(\)"):
        _mlp().kernel(torch.randn(2, 3, 4, dtype=torch.float64))


# ------------------------------------------------------------- bad values
@pytest.mark.parametrize("which", ["x1", "x2"])
def test_nan_inputs(which):
    """NaN in either batch: the message counts them, names the rows and says what to do."""
    bad = _x()
    bad[1, 2] = float("nan")
    args = (bad, None) if which == "x1" else (_x(), bad)
    with expect(ValueError, rf"{which} contains 1 NaN", r"rows affected: \[1\]",
                r"remove or impute"):
        _mlp().kernel(*args)


def test_infinite_inputs():
    """+-inf inputs: counted and located like NaN."""
    bad = _x()
    bad[0, 0], bad[2, 3] = float("inf"), -float("inf")
    with expect(ValueError, r"x2 contains 0 NaN and 2 infinite", r"\[0, 2\]",
                r"remove or impute"):
        _mlp().kernel(_x(), bad)


def test_empty_batch():
    """An empty batch (0 rows): named, with its shape, and what to pass instead."""
    with expect(ValueError, r"empty batch", r"\(0, 4\)", r"at least one example"):
        _mlp().kernel(torch.empty(0, 4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_integer_dtype(dtype):
    """Integer/bool inputs are a TypeError naming the dtype and the conversion."""
    with expect(TypeError, re.escape(str(dtype)), r"floating-point", r"\.double\(\)"):
        _mlp().kernel(torch.ones(3, 4, dtype=dtype))


def test_complex_dtype():
    """Complex inputs: TypeError with the dtype and how to split real/imaginary parts."""
    with expect(TypeError, r"complex128", r"real inputs", r"view_as_real"):
        _mlp().kernel(torch.ones(3, 4, dtype=torch.complex128))


def test_half_precision_dtype():
    """float16 is not computed in: the message says which dtypes are and how to convert."""
    with expect(TypeError, r"float16", r"float32 or float64", r"\.float\(\)"):
        _mlp().kernel(torch.ones(3, 4, dtype=torch.float16))


@pytest.mark.parametrize("shape", [(4,), ()], ids=["1-D", "0-D"])
def test_not_a_batch(shape):
    """A 1-D (or 0-D) tensor: the message gives the shape and both ways to add the axis."""
    with expect(ValueError, re.escape(str(shape)), r"\(N, features\)", r"unsqueeze\(0\)"):
        _mlp().kernel(torch.ones(shape, dtype=torch.float64))


def test_not_a_tensor():
    """A string is refused with its type name and what is accepted."""
    with expect(TypeError, r"got str", r"torch\.Tensor"):
        _mlp().kernel("not a tensor")


def test_ragged_nested_list():
    """A ragged nested list cannot become a tensor: TypeError saying what to pass."""
    with expect(TypeError, r"could not be converted", r"torch\.Tensor of shape"):
        _mlp().kernel([[1.0, 2.0], [1.0]])


def test_dtype_mismatch():
    """x1 float64 and x2 float32: both dtypes named and the cast to make."""
    with expect(TypeError, r"x1 has dtype torch\.float64", r"x2 has dtype torch\.float32",
                r"x2\.to\(x1\.dtype\)"):
        _mlp().kernel(_x(), _x(dtype=torch.float32))


def test_different_devices():
    """x2 on another device (meta here; there is no GPU): a ValueError naming both
    devices and how to move x2, not an internal error from inspecting x2's values."""
    x2 = _x().to("meta")
    with expect(ValueError, r"\bcpu\b", r"\bmeta\b", r"x2\.to\(x1\.device\)"):
        _mlp().kernel(_x(), x2)


# ----------------------------------------------------- architectures without a rule
@pytest.mark.parametrize(
    "module, phrase",
    [
        (nn.BatchNorm1d(8), r"BatchNorm1d mixes the examples"),
        (nn.MaxPool1d(2), r"MaxPool1d has no closed-form"),
        (nn.PReLU(), r"PReLU has a learnable slope"),
        (nn.Softmax(dim=1), r"Softmax has no infinite-width kernel rule"),
    ],
    ids=["BatchNorm1d", "MaxPool1d", "PReLU", "Softmax"],
)
def test_from_torch_module_without_kernel(module, phrase):
    """from_torch of a model containing a module with no kernel rule: TypeError naming the
    module by its path in the model, why, and the list of supported modules."""
    model = nn.Sequential(nn.Linear(4, 8), module, nn.Linear(8, 1))
    with expect(TypeError, r"module 1 \(", phrase, r"Supported: nn\.Sequential, nn\.Linear"):
        nk.from_torch(model)


def test_from_torch_nested_path_in_message():
    """An unsupported module inside a nested Sequential is named by its dotted path."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.PReLU()), nn.Linear(8, 1))
    with expect(TypeError, r"module 1\.1 \(PReLU"):
        nk.from_torch(model)


def test_activation_after_activation():
    """Sequential(Linear, ReLU, ReLU): the second ReLU has no Gaussian pre-activations; the
    message says so and tells to put a Linear (or compose with Elementwise)."""
    net = nk.from_torch(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.ReLU(), nn.Linear(8, 1)))
    with expect(ValueError, r"ReLU\(\) needs Gaussian pre-activations",
                r"output of a nonlinear layer", r"put a Linear", r"Elementwise"):
        net.kernel(_x())


def test_activation_on_raw_inputs():
    """An activation first: the message says it receives the raw inputs."""
    with expect(ValueError, r"Gaussian pre-activations", r"raw inputs", r"put a Linear"):
        nk.Sequential(nk.Erf(), nk.Linear(1)).kernel(_x())


def test_layernorm_on_raw_inputs():
    """LayerNorm on the raw inputs (not zero-mean): refused, telling to put a Linear first."""
    with expect(ValueError, r"raw inputs", r"zero-mean", r"Linear before LayerNorm"):
        nk.Sequential(nk.LayerNorm(), nk.Linear(1)).kernel(_x())


@pytest.mark.parametrize("module", [nn.Linear(4, 1), nn.ModuleList([nn.Linear(4, 1)])],
                         ids=["Linear", "ModuleList"])
def test_from_torch_not_sequential(module):
    """from_torch of a non-Sequential module: TypeError naming its type and what to write."""
    with expect(TypeError, rf"got {type(module).__name__}", r"nn\.Sequential of supported"):
        nk.from_torch(module)


def test_from_torch_not_a_module():
    """from_torch of a plain list: TypeError naming the type."""
    with expect(TypeError, r"torch\.nn\.Module, got list"):
        nk.from_torch([nn.Linear(4, 1)])


def test_from_torch_layernorm_affine_before_a_nonlinearity():
    """nn.LayerNorm with a learnable affine converts; straight before a nonlinearity its
    kernel is refused, saying why and what to put in between."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))
    net = nk.from_torch(model)
    with expect(ValueError, r"ReLU", r"learnable scale \(affine=True\)",
                r"Put a Linear"):
        net.kernel(torch.randn(3, 4))


def test_torch_module_in_ntkit_sequential():
    """An nn.Module inside nk.Sequential: TypeError pointing to from_torch."""
    with expect(TypeError, r"argument 0 is Linear", r"nk\.from_torch"):
        nk.Sequential(nn.Linear(3, 4))


# ---------------------------------------------------------- call arguments
def test_diagonal_with_x2():
    """diagonal=True with an x2 is contradictory: the message gives both correct calls."""
    with expect(ValueError, r"diagonal=True", r"takes no x2",
                r"net\.kernel\(x1, diagonal=True\)"):
        _mlp().kernel(_x(), _x(), diagonal=True)


@pytest.mark.parametrize(
    "kwargs, exc, phrases",
    [
        (dict(out_features=0), ValueError, [r"out_features must be a positive int, got 0"]),
        (dict(out_features=3.0), ValueError, [r"positive int, got 3\.0"]),
        (dict(out_features=True), ValueError, [r"positive int, got True"]),
        (dict(out_features=3, w_std=-1.0), ValueError, [r">= 0", r"w_std=-1"]),
        (dict(out_features=3, b_std=-0.1), ValueError, [r">= 0", r"b_std=-0\.1"]),
        (dict(out_features=3, w_std=float("nan")), ValueError, [r"w_std=nan"]),
        (dict(out_features=3, parameterization="mup"), ValueError,
         [r"'ntk' or 'standard'", r"got 'mup'"]),
    ],
    ids=["zero-width", "float-width", "bool-width", "negative-w_std", "negative-b_std",
         "nan-w_std", "unknown-parameterization"],
)
def test_invalid_linear_arguments(kwargs, exc, phrases):
    """Invalid Linear arguments are refused at construction, naming the bad value."""
    out = kwargs.pop("out_features")
    with expect(exc, *phrases):
        nk.Linear(out, **kwargs)


@pytest.mark.parametrize("in_features", [0, -2], ids=["zero", "negative"])
def test_invalid_linear_in_features(in_features):
    """in_features must be a positive int like out_features; a nonsensical one should be
    refused at construction rather than surface later as 'expects -2 input features'."""
    with expect(ValueError, r"in_features", re.escape(str(in_features))):
        nk.Linear(3, in_features=in_features)


def test_invalid_linear_w_std_type():
    """A string w_std should get ntkit's own message, not Python's comparison error."""
    with expect((TypeError, ValueError), r"w_std"):
        nk.Linear(3, w_std="1")


def test_dropout_on_raw_inputs():
    """Dropout on the raw inputs (train mode) has no kernel: the message says where to put it."""
    with expect(ValueError, r"Dropout on the raw inputs", r"after a Linear"):
        nk.Sequential(nk.Dropout(0.1), nk.Linear(1)).kernel(_x())


@pytest.mark.parametrize("p", [1.0, -0.1], ids=["p=1", "p<0"])
def test_dropout_invalid_p(p):
    with expect(ValueError, r"\[0, 1\)", re.escape(str(p))):
        nk.Dropout(p)


@pytest.mark.parametrize(
    "net, got",
    [
        (nk.Sequential(nk.Linear(4), nk.FanOut(3), nk.Parallel(nk.Linear(2), nk.Linear(2)),
                       nk.FanInSum()), r"receives 3 branches"),
        (nk.Sequential(nk.Linear(4), nk.Parallel(nk.Linear(2), nk.Linear(2)), nk.FanInSum()),
         r"receives one input"),
    ],
    ids=["3-branches-into-2", "one-input-into-2"],
)
def test_parallel_wrong_number_of_branches(net, got):
    """Parallel with 2 layers given 3 branches (or none): the counts and the FanOut to use."""
    with expect(ValueError, r"Parallel with 2 layers needs 2 branches", got, r"FanOut\(2\)"):
        net.kernel(_x())


def test_network_ending_with_branches():
    """A network whose output is still two branches: told to end with a fan-in."""
    with expect(ValueError, r"ends with 2 branches", r"FanInSum\(\)"):
        nk.Sequential(nk.Linear(3), nk.FanOut(2)).kernel(_x())


def test_branches_into_single_input_layer():
    """Two branches into a Linear: the message names the layer and the ways to merge."""
    with expect(ValueError, r"Linear\(3.*takes one input but receives 2 branches",
                r"FanInSum\(\)", r"Parallel"):
        nk.Sequential(nk.FanOut(2), nk.Linear(3)).kernel(_x())


def test_fan_in_unequal_widths():
    """FanInSum of branches of different widths names the shapes and the fix."""
    net = nk.Sequential(nk.FanOut(2), nk.Parallel(nk.Linear(2), nk.Linear(3)), nk.FanInSum())
    with expect(ValueError, r"\[\(2,\), \(3,\)\]", r"same out_features"):
        net.kernel(_x())


@pytest.mark.parametrize("generator", [0, None, "seed"], ids=["int", "None", "str"])
def test_monte_carlo_needs_generator(generator):
    """monte_carlo_kernel without a torch.Generator: TypeError naming what came and the fix."""
    with expect(TypeError, rf"got {type(generator).__name__}",
                r"torch\.Generator\(\)\.manual_seed"):
        nk.monte_carlo_kernel(_mlp(), _x(), n_samples=2, generator=generator)


def test_monte_carlo_torch_module():
    """monte_carlo_kernel of a torch module points to from_torch."""
    with expect(TypeError, r"got Linear", r"from_torch"):
        nk.monte_carlo_kernel(nn.Linear(4, 1), _x(), n_samples=1, generator=torch.Generator())


@pytest.mark.parametrize("n", [0, -1, True, 2.0], ids=["0", "-1", "True", "2.0"])
def test_monte_carlo_bad_n_samples(n):
    with expect(ValueError, r"n_samples must be a positive int", re.escape(repr(n))):
        nk.monte_carlo_kernel(_mlp(), _x(), n_samples=n, generator=torch.Generator())


def test_build_generator_type():
    """build(generator=int) is a TypeError with the right spelling."""
    with expect(TypeError, r"got int", r"torch\.Generator\(\)\.manual_seed"):
        _mlp().build(4, generator=0)


@pytest.mark.parametrize("shape", [(0,), (4, -1)], ids=["zero", "negative"])
def test_build_bad_input_shape(shape):
    with expect(ValueError, r"positive sizes", re.escape(str(shape))):
        _mlp().build(shape)


@pytest.mark.parametrize(
    "fn, phrase",
    [
        (lambda x: x.sum(), r"same shape"),
        (lambda x: x.reshape(1, -1), r"same shape"),
        (lambda x: x.undefined_method(), r"could not be applied"),
    ],
    ids=["reduces", "reshapes", "raises"],
)
def test_elementwise_not_elementwise(fn, phrase):
    """Elementwise with a function that is not elementwise is refused at construction."""
    with expect(TypeError, r"Elementwise: fn=", phrase):
        nk.Elementwise(fn)


def test_elementwise_not_callable():
    with expect(TypeError, r"callable", r"got int"):
        nk.Elementwise(3)


@pytest.mark.parametrize("budget", ["lots", "12 parsecs", "-5MB", "MB", "", "1e9"])
def test_bad_memory_budget_strings(budget):
    """Unparseable memory_budget strings: the string is echoed and examples are given."""
    with expect(ValueError, re.escape(repr(budget)), r"not understood", r"'512MB'"):
        _mlp().kernel(_x(), memory_budget=budget)


@pytest.mark.parametrize("budget", ["1.2.3MB", "."], ids=["two-dots", "dot"])
def test_malformed_number_in_memory_budget(budget):
    """A malformed number must get the same helpful message, not float()'s
    'could not convert string to float'."""
    with expect(ValueError, re.escape(repr(budget)), r"not understood"):
        nk.parse_memory(budget)


@pytest.mark.parametrize("budget", [0, -1, "0", "0MB"], ids=["0", "-1", "'0'", "'0MB'"])
def test_non_positive_memory_budget(budget):
    with expect(ValueError, r"must be positive"):
        _mlp().kernel(_x(), memory_budget=budget)


def test_sub_byte_memory_budget_is_not_zero():
    """parse_memory('0.5') rounds to 0 bytes; it must be refused (or rounded up), never
    returned as a budget of 0."""
    try:
        value = nk.parse_memory("0.5")
    except ValueError:
        return
    assert value > 0


def test_infinite_memory_budget():
    """memory_budget=float('inf') should be a ValueError with ntkit's message (or mean
    'unlimited'), not int()'s OverflowError."""
    try:
        value = nk.parse_memory(float("inf"))
    except ValueError as e:
        assert "memory_budget" in str(e)
        return
    assert value > 0


def test_kernel_index_errors():
    """Too many indices on a Kernel: IndexError naming the layout and the counts."""
    k = _mlp().kernel(_x())
    with expect(IndexError, r"full Kernel takes at most 2", r"got 3"):
        k[0, 1, 2]
    with expect(IndexError, r"diagonal Kernel takes at most 1", r"got 2"):
        _mlp().kernel(_x(), diagonal=True)[0, 1]


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda: nk.Monomial(-1), r"degree must be a non-negative int, got -1"),
        (lambda: nk.RectifiedMonomial(1.5), r"degree must be a non-negative int, got 1\.5"),
        (lambda: nk.Rbf(0.0), r"gamma must be positive, got 0"),
        (lambda: nk.FanOut(0), r"n must be a positive int, got 0"),
        (lambda: nk.Repeat(nk.Linear(2), -1), r"non-negative int, got -1"),
        (lambda: nk.LayerNorm(eps=-1.0), r"eps must be >= 0"),
        (lambda: nk.Dropout(0.5, mode="test"), r"'train' or 'eval', got 'test'"),
    ],
    ids=["Monomial", "RectifiedMonomial", "Rbf", "FanOut", "Repeat", "LayerNorm", "Dropout-mode"],
)
def test_invalid_layer_arguments(make, phrase):
    with expect(ValueError, phrase):
        make()


def test_gaussian_infinite_moment():
    """Gaussian(b>0) with too-large pre-activation variance: the bound is in the message."""
    net = nk.Sequential(nk.Linear(4, w_std=3.0), nk.Gaussian(b=1.0), nk.Linear(1))
    with expect(ValueError, r"infinite", r"1/\(2b\) = 0\.5", r"smaller b"):
        net.kernel(_x())


def test_from_torch_flatten_start_dim():
    with expect(TypeError, r"module 0", r"start_dim=1, end_dim=-1"):
        nk.from_torch(nn.Sequential(nn.Flatten(0), nn.Linear(4, 1)))

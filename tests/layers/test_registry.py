"""The layer registry: one table behind the spec grammar, `to_spec`, `from_torch` and
the estimators' activation names; and NumPy scalars wherever a number is taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ntkit.layers as L
from ntkit.convert import ConversionError, from_torch
from ntkit.layers import registry
from ntkit.sklearn._architecture import (
    ACTIVATIONS, activation_layer, check_depth, check_std, mlp,
)
from ntkit.spec import LAYERS, parse_architecture, to_spec

X = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _same_kernel(a: L.Layer, b: L.Layer, x: torch.Tensor = X) -> None:
    ka, kb = a.kernel(x), b.kernel(x)
    torch.testing.assert_close(ka.nngp, kb.nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ka.ntk, kb.ntk, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------- vocabularies
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_estimator_activation_parses_in_a_spec(name):
    """activation="tanh" in the estimators and "...-tanh-..." in a spec are one layer."""
    via_spec = parse_architecture(f"linear(16, w_std=1.5)-{name}-linear(1)")
    activation = mlp(1, name, 1.5, 0.0).layers[1]
    via_estimator = L.Sequential(L.Linear(16, w_std=1.5), activation, L.Linear(1))
    assert type(via_spec.layers[1]) is type(via_estimator.layers[1])
    _same_kernel(via_spec, via_estimator)


def test_every_spec_activation_works_in_the_estimators():
    """Every activation of the grammar is an estimator activation: by name when it takes
    no argument, as ``name(args)`` otherwise; and the names that need arguments are
    exactly those without a default."""
    with_args = {"abrelu": "abrelu(-0.5, 1.0)", "monomial": "monomial(2)",
                 "rectifiedmonomial": "rectifiedmonomial(2)", "hermite": "hermite(2)",
                 "polynomial": "polynomial((0.0, 1.0, 0.5))"}
    for key, ctor in LAYERS.items():
        cls = getattr(ctor, "__self__", ctor)
        if not (isinstance(cls, type) and issubclass(cls, (L.Activation, L.Identity))):
            continue
        text = with_args.get(key, key)
        layer = activation_layer(text)
        assert isinstance(layer, (L.Activation, L.Identity)), text
        assert (key in with_args) == (key not in {n.replace("_", "") for n in ACTIVATIONS})


def test_unknown_activation_is_refused_with_the_names():
    with pytest.raises(ValueError, match=r"activation='swish' is not a known.*'relu'"):
        activation_layer("swish")
    with pytest.raises(ValueError, match="not a known activation"):
        activation_layer("linear(3)")  # a layer, but not an activation


def test_activation_with_arguments_matches_the_hand_built_layer():
    net = mlp(2, "leaky_relu(negative_slope=0.2)", 1.5, 0.1)
    hand = L.Sequential(L.Linear(512, w_std=1.5, b_std=0.1), L.LeakyReLU(0.2),
                        L.Linear(512, w_std=1.5, b_std=0.1), L.LeakyReLU(0.2),
                        L.Linear(1, w_std=1.5, b_std=0.1))
    _same_kernel(net, hand)
    assert not torch.allclose(net.kernel(X).ntk, mlp(2, "relu", 1.5, 0.1).kernel(X).ntk)


def test_spec_names_come_from_the_classes():
    """LAYERS is the registry: each class's declared names, and nothing else."""
    declared = {registry.normal_name(n) for cls in registry.layer_classes()
                for n in cls.__dict__.get("spec_names", ())}
    assert set(LAYERS) == declared
    assert LAYERS["dense"] is L.Linear and LAYERS["leakyrelu"] is L.LeakyReLU


# -------------------------------------------------------------- torch modules
#: A module of each registered torch class, with a layer that gives it Gaussian inputs.
TORCH_EXAMPLES = {
    nn.Linear: (lambda: nn.Linear(3, 4), (3,)),
    nn.Conv1d: (lambda: nn.Conv1d(2, 3, 3), (2, 6)),
    nn.Conv2d: (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 4, 4)),
    nn.Conv3d: (lambda: nn.Conv3d(2, 3, 2), (2, 3, 3, 3)),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), (2, 4)),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(2, 3, 2, padding=1), (2, 3, 3)),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(2, 3, 2), (2, 2, 2, 2)),
    nn.AvgPool1d: (lambda: nn.AvgPool1d(2), (2, 6)),
    nn.AvgPool2d: (lambda: nn.AvgPool2d(2), (2, 4, 4)),
    nn.AvgPool3d: (lambda: nn.AvgPool3d(2), (2, 4, 4, 4)),
    nn.AdaptiveAvgPool1d: (lambda: nn.AdaptiveAvgPool1d(1), (2, 6)),
    nn.AdaptiveAvgPool2d: (lambda: nn.AdaptiveAvgPool2d(1), (2, 4, 4)),
    nn.AdaptiveAvgPool3d: (lambda: nn.AdaptiveAvgPool3d(1), (2, 3, 3, 3)),
    nn.Flatten: (nn.Flatten, (2, 3, 3)),
    nn.Identity: (nn.Identity, (3,)),
    nn.Dropout: (lambda: nn.Dropout(0.2), (3,)),
    nn.LayerNorm: (lambda: nn.LayerNorm(4, elementwise_affine=False), (3,)),
    nn.GELU: (nn.GELU, (3,)),
    nn.LeakyReLU: (lambda: nn.LeakyReLU(0.3), (3,)),
    nn.ReLU: (nn.ReLU, (3,)),
    nn.RNN: (lambda: nn.RNN(2, 4, num_layers=1), (2, 5)),
    L.TorchRNN: (lambda: L.TorchRNN(nn.RNN(2, 4, batch_first=True), readout="last"), (2, 5)),
    nn.Embedding: (lambda: nn.Embedding(5, 4), (6,)),  # the first layer: token ids (N, 6)
}


@pytest.mark.parametrize("module_cls", sorted(registry._TORCH, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_every_registered_torch_module_converts(module_cls):
    """Each torch class a layer declares converts, inside a model, to the layer that
    declares it, and its kernel is finite."""
    make, shape = TORCH_EXAMPLES.get(module_cls, (module_cls, (3,)))
    channels = shape[0]
    first = (nn.Linear(channels, 4) if len(shape) == 1 else
             (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(shape) - 2](channels, channels, 1))
    model = nn.Sequential(first, make())
    if module_cls in (nn.Linear, nn.Embedding):
        model = nn.Sequential(make())
    net = from_torch(model)
    layer = net.layers[-1]
    assert isinstance(layer, registry._TORCH[module_cls][0]), (module_cls, layer)
    x = torch.randn(3, *shape, dtype=torch.float64)
    if module_cls is nn.LayerNorm:
        x = torch.randn(3, 3, dtype=torch.float64)
    if module_cls is nn.Embedding:
        x = torch.randint(0, 5, (3, *shape)).double()
    k = net.kernel(x)
    assert torch.isfinite(k.nngp).all() and torch.isfinite(k.ntk).all()


def test_activation_subclasses_do_not_convert_as_their_parent():
    """A subclass of nn.ReLU may change forward: it is not taken for ReLU."""
    class Shifted(nn.ReLU):
        def forward(self, x):
            return super().forward(x) - 1

    with pytest.raises(ConversionError, match="relu - 1"):  # traced through, not a ReLU
        from_torch(nn.Sequential(nn.Linear(3, 4), Shifted()))
    assert registry.module_rule(nn.ReLU()) is L.ReLU
    assert registry.module_rule(Shifted()) is None


# ------------------------------------------------------------ one new class
def test_a_new_layer_is_one_class(monkeypatch):
    """A layer declared in one place is known to the spec grammar, to_spec and
    from_torch at once."""
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))
    monkeypatch.setattr(registry, "_TORCH", dict(registry._TORCH))
    monkeypatch.setattr(registry, "_CLASSES", list(registry._CLASSES))

    class Softsign(nn.Module):
        def forward(self, x):
            return x / (1 + x.abs())

    class Scaled(L.ABReLU):
        """``2 relu(x)``: ABReLU(0, 2), under a name of its own."""

        spec_names = ("scaled_relu",)
        torch_modules = (Softsign,)

        def __init__(self) -> None:
            super().__init__(0.0, 2.0)

        @classmethod
        def from_torch_module(cls, module, ctx):
            return cls()

        def spec_call(self):
            return "scaled_relu", [], {}

    net = parse_architecture("linear(8)-scaled_relu-linear(1)")
    assert type(net.layers[1]) is Scaled
    assert to_spec(net) == "linear(8)-scaled_relu-linear(1)"
    _same_kernel(net, L.Sequential(L.Linear(8), L.ABReLU(0.0, 2.0), L.Linear(1)))
    converted = from_torch(nn.Sequential(nn.Linear(3, 8), Softsign()))
    assert type(converted.layers[-1]) is Scaled
    with pytest.raises(ValueError, match="already taken"):
        type("Clash", (L.ReLU,), {"spec_names": ("scaled_relu",)})


# ------------------------------------------------------------- NumPy scalars
def test_numpy_scalars_are_numbers():
    """np.int64 widths, sizes and counts and np.float32/np.float64 scales give the
    layers of the same Python numbers: the same kernel, repr and spec string."""
    i, f = np.int64, np.float32
    pairs = [
        (L.Linear(i(5), w_std=f(1.5), b_std=np.float64(0.25), in_features=i(3)),
         L.Linear(5, w_std=1.5, b_std=0.25, in_features=3)),
        (L.Repeat(L.Sequential(L.Linear(i(4)), L.Monomial(i(2))), i(2)),
         L.Repeat(L.Sequential(L.Linear(4), L.Monomial(2)), 2)),
        (L.Sequential(L.Linear(4), L.FanOut(i(2)), L.Parallel(L.Linear(4), L.Identity()),
                      L.FanInSum()),
         L.Sequential(L.Linear(4), L.FanOut(2), L.Parallel(L.Linear(4), L.Identity()),
                      L.FanInSum())),
        (L.Sequential(L.Linear(4), L.Elementwise(torch.sin, degree=i(20)), L.Linear(4),
                      L.LeakyReLU(f(0.5))),
         L.Sequential(L.Linear(4), L.Elementwise(torch.sin, degree=20), L.Linear(4),
                      L.LeakyReLU(0.5))),
    ]
    for got, want in pairs:
        assert repr(got) == repr(want)
        _same_kernel(got, want)
    assert to_spec(pairs[0][0]) == to_spec(pairs[0][1])
    assert isinstance(pairs[0][0].out_features, int)
    # w_std keeps float32 rounding: 1.5 is exact in float32, so the kernels agree.


def test_numpy_scalars_in_spatial_layers():
    i = np.int64
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    got = L.Sequential(L.Conv2d(i(4), i(3), stride=i(1), padding=i(1), dilation=(i(1), i(1))),
                       L.AvgPool2d((i(2), i(2))), L.Flatten(), L.Linear(i(1)))
    want = L.Sequential(L.Conv2d(4, 3, padding=1), L.AvgPool2d(2), L.Flatten(), L.Linear(1))
    _same_kernel(got, want, x)
    assert to_spec(got) == to_spec(want)
    seq = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _same_kernel(L.Sequential(L.SelfAttention(i(8), i(2), key_channels=i(4)), L.Flatten()),
                 L.Sequential(L.SelfAttention(8, 2, key_channels=4), L.Flatten()), seq)


def test_numpy_scalars_in_the_estimators_options():
    """What GridSearchCV passes from np.arange and np.linspace grids."""
    assert check_depth(np.int64(2)) == 2 and type(check_depth(np.int64(2))) is int
    assert check_std(np.float32(1.5), "w_std", positive=True) == 1.5
    assert type(check_std(np.float64(0.5), "b_std", positive=False)) is float
    for bad in (np.float64(-1.0), np.float32("nan"), True, "1.5"):
        with pytest.raises(ValueError, match="w_std must be a finite number"):
            check_std(bad, "w_std", positive=True)
    for bad in (np.int64(-1), np.float64(2.0), np.bool_(True)):
        with pytest.raises(ValueError, match="depth must be an int"):
            check_depth(bad)
    _same_kernel(mlp(check_depth(np.int64(2)), "erf", check_std(np.float32(1.5), "w", positive=True),
                     0.0),
                 mlp(2, "erf", 1.5, 0.0))


def test_numpy_bools_and_floats_are_not_counts():
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        L.Linear(np.float64(3.0))
    with pytest.raises(ValueError, match="positive int"):
        L.FanOut(np.bool_(True))
    with pytest.raises(ValueError, match="kernel_size must be an int"):
        L.Conv2d(4, np.float32(3))

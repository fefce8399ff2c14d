"""The contract battery: every public layer and container, the same checks.

Each public `Layer` subclass of ntkit has one example below (`EXAMPLES`); a
class without one fails `test_every_public_layer_is_in_the_battery`, so a new
layer joins the battery by adding one line here. Every example is checked for:

- its input `Kernel` is not modified (``x2=None``, a distinct ``x2``, diagonal);
- ``diagonal=True`` equals the diagonal of the full kernel;
- a tiled kernel (a memory budget that forces tiles not dividing N) equals the
  untiled one;
- ``k(x, x)`` is exactly symmetric;
- float32 agrees with float64 (tolerances from one dtype-keyed table);
- ``to_spec`` -> ``parse_architecture`` and ``eval(repr(...))`` give the same
  kernel (or ``to_spec`` refuses a layer the grammar does not cover);
- the finite twin's Monte Carlo kernel approaches the analytic one.

Each example sits in a small network, ``before + [layer] + [Flatten(), Linear]``:
``before`` makes the layer's input Gaussian (a Linear or a Conv) and supplies
branches for the fan-in containers; the readout makes the output dense.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import ntkit
import ntkit.layers as L
from ntkit.layers import input_kernel
from ntkit.monte_carlo import monte_carlo_kernel
from ntkit.spec import parse_architecture, to_spec

W = 48  # hidden width of the examples (the Monte Carlo twins' width)
READOUT = 32  # outputs of the readout: Monte Carlo averages over them


def _inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


#: Per-example shapes of the input kinds, and the layer each starts with.
SHAPES = {"dense": (4,), "seq": (3, 6), "image": (2, 4, 4), "volume": (2, 3, 3, 3),
          "tokens": (6,)}
FIRST: dict[str, Callable[[], L.Layer]] = {
    "dense": lambda: L.Linear(W, w_std=1.5, b_std=0.2),
    "seq": lambda: L.Conv1d(W, 3, padding="same", w_std=1.5, b_std=0.2),
    "image": lambda: L.Conv2d(W, 3, padding="same", w_std=1.5, b_std=0.2),
    "volume": lambda: L.Conv3d(W, 2, padding="same", w_std=1.5, b_std=0.2),
}
N = 7  # examples: tiles of 2, 3, 4 ... rows do not divide it


@dataclass
class Case:
    """An example of a layer class: the layer, its inputs and its place in a network."""

    make: Callable[[], L.Layer]
    kind: str = "dense"
    before: Callable[[], list] | None = None  # default: FIRST[kind]
    after: Callable[[], list] = field(default=lambda: [])
    slow_mc: bool = False  # Monte Carlo too slow for the default run

    def layer(self) -> L.Layer:
        return self.make()

    def prefix(self) -> list:
        return self.before() if self.before is not None else [FIRST[self.kind]()]

    def network(self, layer: L.Layer | None = None) -> L.Sequential:
        layer = self.layer() if layer is None else layer
        return L.Sequential(*self.prefix(), layer, *self.after(), L.Flatten(),
                            L.Linear(READOUT, w_std=1.2, b_std=0.1))


def _two() -> list:
    return [L.Linear(W, w_std=1.5, b_std=0.2), L.FanOut(2),
            L.Parallel(L.Linear(W, b_std=0.3), L.Linear(W, w_std=0.8))]


#: One example per public layer class; a class missing here fails the battery.
EXAMPLES: dict[type, Case] = {
    # affine and reshaping
    L.Linear: Case(lambda: L.Linear(W, w_std=1.3, b_std=0.4)),
    L.Flatten: Case(L.Flatten, "image"),
    # closed-form activations
    L.ReLU: Case(L.ReLU),
    L.LeakyReLU: Case(lambda: L.LeakyReLU(0.2)),
    L.ABReLU: Case(lambda: L.ABReLU(-0.5, 1.5)),
    L.Abs: Case(L.Abs),
    L.Sign: Case(L.Sign),
    L.Erf: Case(lambda: L.Erf(a=1.2, b=0.7, c=0.1)),
    L.GELU: Case(L.GELU),
    L.Sin: Case(lambda: L.Sin(a=1.1, b=0.8, c=0.2)),
    L.Cos: Case(lambda: L.Cos(b=0.7, c=0.3)),
    L.Rbf: Case(lambda: L.Rbf(0.3)),
    L.Gaussian: Case(lambda: L.Gaussian(a=1.0, b=-0.5)),
    L.Exp: Case(lambda: L.Exp(a=0.8, b=0.4)),
    L.Monomial: Case(lambda: L.Monomial(2)),
    L.Hermite: Case(lambda: L.Hermite(3)),
    L.Polynomial: Case(lambda: L.Polynomial([0.1, 1.0, -0.3, 0.2])),
    L.Gabor: Case(L.Gabor),
    L.SigmoidLike: Case(L.SigmoidLike),
    L.ExpNormalized: Case(lambda: L.ExpNormalized(gamma=0.5, shift=-0.5)),
    L.RectifiedMonomial: Case(lambda: L.RectifiedMonomial(2)),
    # quadrature
    L.Elementwise: Case(lambda: L.Elementwise(torch.tanh, degree=48)),
    L.Tanh: Case(L.Tanh),
    L.Sigmoid: Case(lambda: L.Sigmoid(degree=32)),
    L.Softplus: Case(L.Softplus),
    # normalization
    L.LayerNorm: Case(lambda: L.LayerNorm(axis="all"), "image"),
    L.Dropout: Case(lambda: L.Dropout(0.25)),
    # convolutions and pooling
    L.Conv1d: Case(lambda: L.Conv1d(W, 3, stride=2, padding=1, w_std=1.2, b_std=0.3), "seq"),
    L.Conv2d: Case(lambda: L.Conv2d(W, 2, dilation=2, padding="same", padding_mode="circular",
                                    w_std=1.1, b_std=0.2), "image"),
    L.Conv3d: Case(lambda: L.Conv3d(W, 2, padding=1, b_std=0.6, b_init="zero"), "volume"),
    L.ConvTranspose1d: Case(lambda: L.ConvTranspose1d(W, 3, stride=2, padding=1, output_padding=1,
                                                      w_std=1.2, b_std=0.3), "seq"),
    L.ConvTranspose2d: Case(lambda: L.ConvTranspose2d(W, 2, stride=(2, 1), dilation=(1, 2),
                                                      padding="same",
                                                      w_std=1.1, b_std=0.2), "image"),
    L.ConvTranspose3d: Case(lambda: L.ConvTranspose3d(W, 2, padding=1, b_std=0.6,
                                                      b_init="zero"), "volume"),
    L.LocallyConnected1d: Case(lambda: L.LocallyConnected1d(W, 3, stride=2, padding=1,
                                                            w_std=1.2, b_std=0.3), "seq"),
    L.LocallyConnected2d: Case(lambda: L.LocallyConnected2d(W, 2, padding="same", w_std=1.1,
                                                            b_std=0.2), "image"),
    L.LocallyConnected3d: Case(lambda: L.LocallyConnected3d(W, 2, padding="valid", b_std=0.6,
                                                            b_init="zero"),
                               "volume"),
    L.AvgPool1d: Case(lambda: L.AvgPool1d(3, stride=2, padding=1), "seq"),
    L.AvgPool2d: Case(lambda: L.AvgPool2d(2, padding=1, count_include_pad=False), "image"),
    L.AvgPool3d: Case(lambda: L.AvgPool3d(2, stride=1), "volume"),
    L.SumPool1d: Case(lambda: L.SumPool1d(2), "seq"),
    L.SumPool2d: Case(lambda: L.SumPool2d(3, stride=1, padding=1), "image"),
    L.SumPool3d: Case(lambda: L.SumPool3d(2, stride=1), "volume"),
    L.GlobalAvgPool: Case(L.GlobalAvgPool, "image"),
    L.GlobalSumPool: Case(L.GlobalSumPool, "seq"),
    L.SelfAttention: Case(lambda: L.SelfAttention(W, 2, w_query_std=0.5, b_std=0.1), "seq",
                          slow_mc=True),
    L.Embedding: Case(lambda: L.Embedding(W, 5, w_std=1.3, pos_emb="learned", pos_std=0.7),
                      "tokens", before=lambda: []),
    L.RNN: Case(lambda: L.RNN(W, L.Erf(), w_std=1.2, u_std=1.0, b_std=0.2, bidirectional=True),
                "seq"),
    L.MultiheadAttention: Case(lambda: L.MultiheadAttention(W, 2, w_query_std=1.5, b_std=0.1,
                                                            causal=True, n_samples=64,
                                                            proj_bias=True, b_init="zero"),
                               "seq",
                               slow_mc=True),
    L.TokenReadout: Case(lambda: L.TokenReadout("last"), "seq"),
    L.Aggregate: Case(lambda: L.Aggregate(torch.eye(6) + torch.rand(
        6, 6, generator=torch.Generator().manual_seed(3)).round()), "seq"),
    # from_torch's twins that check torch's axes
    L.pool.TorchGlobalAvgPool: Case(lambda: L.pool.TorchGlobalAvgPool("a test", ndim=2),
                                    "image"),
    L.normalization.TorchLayerNorm: Case(
        lambda: L.normalization.TorchLayerNorm((W,), 1e-5, "a test", affine=True)),
    # containers
    L.Sequential: Case(lambda: L.Sequential(L.ReLU(), L.Linear(W, b_std=0.6, b_init="zero"))),
    L.Repeat: Case(lambda: L.Repeat(L.Sequential(L.Linear(W, w_std=1.4), L.Erf()), 2)),
    L.Identity: Case(L.Identity),
    L.FanOut: Case(lambda: L.FanOut(2),
                   after=lambda: [L.Parallel(L.Linear(W), L.Identity()), L.FanInSum()]),
    L.Parallel: Case(lambda: L.Parallel(L.Linear(W), L.Sequential(L.ReLU(), L.Linear(W))),
                     before=lambda: [L.Linear(W, w_std=1.5), L.FanOut(2)],
                     after=lambda: [L.FanInSum()]),
    L.FanInSum: Case(L.FanInSum, before=_two),
    L.FanInProd: Case(L.FanInProd, before=_two),
    L.FanInConcat: Case(L.FanInConcat, before=lambda: [
        L.Linear(W, w_std=1.5), L.FanOut(2), L.Parallel(L.Linear(W), L.Linear(2 * W))]),
}

#: Abstract bases: no instance of their own.
ABSTRACT = {L.Layer, L.Activation}
#: Layers without a kernel rule (they refuse net.kernel): GRU and LSTM, whose NNGP is a
#: Monte Carlo estimate outside networks, checked in tests/test_gated.py.
NO_KERNEL_RULE = {L.GRU, L.LSTM}
#: Layers the spec grammar does not cover: `to_spec` must refuse them by name.
NO_SPEC = {L.Elementwise, L.FanOut, L.Parallel, L.FanInSum, L.FanInProd, L.FanInConcat,
           L.pool.TorchGlobalAvgPool, L.normalization.TorchLayerNorm,
           L.Aggregate}

#: Tolerances by dtype: float32 kernels against float64 ones (max error over max value).
#: Unit roundoff is 6e-8; a few layers of O(1)-conditioned rules stay near 1e-6.
DTYPE_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}
#: Kernels by 2-D Gauss-Hermite quadrature (`Elementwise`) are not symmetric beyond
#: rounding: x1's pre-activation is sampled on one axis, x2's on both, and the rule's
#: error changes when the roles swap (tanh after w_std=1.5: 1e-4 at degree 64, 2e-3 at
#: 32). neural-tangents does the same, and the reference tests match it, so k(x, x) is
#: symmetric, and mirrored tiles equal computed ones, only to this tolerance.
QUADRATURE = {L.Elementwise, L.Tanh, L.Sigmoid, L.Softplus}
QUADRATURE_RTOL = 1e-2
#: Monte Carlo against the analytic kernel (max error over max value): width 48,
#: READOUT outputs x MC_SAMPLES networks; seeds fixed.
MC_SAMPLES = 48
MC_RTOL = 0.2

CASES = [pytest.param(cls, id=cls.__name__) for cls in EXAMPLES]
MC_CASES = [pytest.param(cls, id=cls.__name__,
                         marks=[pytest.mark.slow] if EXAMPLES[cls].slow_mc else [])
            for cls in EXAMPLES]


def _x(case: Case, seed: int = 0, n: int = N) -> torch.Tensor:
    if case.kind == "tokens":  # token ids (as whole float64 numbers) for an Embedding
        return torch.randint(0, 5, (n, *SHAPES["tokens"]),
                             generator=torch.Generator().manual_seed(seed)).double()
    return _inputs((n, *SHAPES[case.kind]), seed)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


def _assert_same(a: ntkit.Kernel, b: ntkit.Kernel, rtol: float = 1e-10) -> None:
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _tensors(k) -> dict[str, torch.Tensor]:
    """Every tensor a kernel (or a tuple of branch kernels) holds, by field name."""
    ks = k if isinstance(k, tuple) else (k,)
    out = {}
    for i, one in enumerate(ks):
        for f in dataclasses.fields(one):
            v = getattr(one, f.name)
            for j, t in enumerate(v if isinstance(v, tuple) else (v,)):
                if isinstance(t, torch.Tensor):
                    out[f"{i}.{f.name}.{j}"] = t
    return out


# ------------------------------------------------------------------- coverage
def _public_layer_classes() -> set[type]:
    found, todo = set(), [L.Layer]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            path = sub.__module__.split(".") + [sub.__name__]
            if path[0] == "ntkit" and not any(part.startswith("_") for part in path):
                found.add(sub)
    return found


def test_every_public_layer_is_in_the_battery():
    """A public Layer subclass of ntkit without an example here fails."""
    missing = _public_layer_classes() - set(EXAMPLES) - ABSTRACT - NO_KERNEL_RULE
    assert not missing, f"add these layers to EXAMPLES: {sorted(c.__name__ for c in missing)}"
    assert L.Linear in _public_layer_classes()  # the witness sees layers at all


def test_every_registered_class_is_in_the_battery():
    from ntkit.layers.registry import layer_classes

    assert set(layer_classes()) <= set(EXAMPLES)


@pytest.mark.parametrize("cls", CASES)
def test_example_is_an_instance_of_its_class(cls):
    assert type(EXAMPLES[cls].layer()) is cls


# ------------------------------------------------------------- the contract
@pytest.mark.parametrize("cls", CASES)
def test_input_kernel_is_not_modified(cls):
    """propagate returns a new Kernel and leaves every tensor of its input as it was,
    for k(x, x), k(x1, x2) and the diagonal."""
    case = EXAMPLES[cls]
    layer, prefix = case.layer(), L.Sequential(*case.prefix())
    pairs = L.Sequential(prefix, layer, *case.after()).needs_position_pairs()
    x1, x2 = _x(case, 0), _x(case, 1, n=N - 2)
    for k_in in (input_kernel(x1, None, position_pairs=pairs),
                 input_kernel(x1, x2, position_pairs=pairs),
                 input_kernel(x1, None, position_pairs=pairs, diagonal=True)):
        k_in = prefix.propagate(k_in)
        before = {name: t.clone() for name, t in _tensors(k_in).items()}
        layer.propagate(k_in)
        after = _tensors(k_in)
        assert before.keys() == after.keys()
        for name, t in before.items():
            assert torch.equal(t, after[name]), f"{cls.__name__} changed its input's {name}"


@pytest.mark.parametrize("cls", CASES)
def test_diagonal_is_the_diagonal_of_the_full_kernel(cls):
    net, x = EXAMPLES[cls].network(), _x(EXAMPLES[cls])
    full, diag = net.kernel(x), net.kernel(x, diagonal=True)
    assert diag.nngp.shape == (N,)
    torch.testing.assert_close(diag.nngp, torch.diagonal(full.nngp), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.ntk, torch.diagonal(full.ntk), rtol=1e-10, atol=1e-12)


def _three_row_budget(net: L.Layer, x: torch.Tensor) -> int:
    """A memory budget for tiles of 3 x 3 input pairs (see `ntkit.tiling.tiled_kernel`);
    the test checks the tiles it gets, and tries other budgets if this one is off."""
    try:
        from ntkit._budget import TEMPORARIES_PER_ENTRY
        from ntkit.tiling import peak_positions
    except ImportError:
        return 2**10
    positions = peak_positions(net, tuple(x.shape[1:]), x.dtype)
    if x.ndim > 2 and net.needs_position_pairs():
        positions **= 2
    return x.element_size() * positions * TEMPORARIES_PER_ENTRY * 9


@pytest.mark.parametrize("cls", CASES)
def test_tiled_equals_untiled_with_ragged_tiles(cls):
    """Budgets that force tiles whose sides do not divide N give the same kernel,
    for k(x, x) and k(x1, x2)."""
    case = EXAMPLES[cls]
    x1, x2 = _x(case, 0), _x(case, 1, n=N - 1)
    for args in ((x1,), (x1, x2)):
        net = case.network()
        whole = net.kernel(*args)
        sides: list[tuple[int, int]] = []
        rule = net._forward

        def recording(k, rule=rule, sides=sides):
            one = k[0] if isinstance(k, tuple) else k
            sides.append(tuple(one.nngp.shape[:2]))
            return rule(k)

        net._forward = recording  # the rule the tiles run through
        ragged = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for budget in (_three_row_budget(net, x1), *(2**e for e in range(10, 24))):
                sides.clear()
                tiled = net.kernel(*args, memory_budget=budget, progress=False)
                rows = {s[0] for s in sides}
                if len(sides) > 1 and any(N % r for r in rows):
                    ragged = True
                    _assert_same(tiled, whole,
                                 rtol=QUADRATURE_RTOL if cls in QUADRATURE else 1e-10)
                    break
        assert ragged, f"no budget gave ragged tiles for {cls.__name__}: {sides}"


@pytest.mark.parametrize("cls", CASES)
def test_self_kernel_is_exactly_symmetric(cls):
    """k(x, x) is exactly symmetric, for every layer (quadrature ones included), in
    float64 and float32; the gap bound first says how far off a failure is."""
    case = EXAMPLES[cls]
    exact = True
    for dtype in (torch.float64, torch.float32):
        k = case.network().kernel(_x(case).to(dtype))
        bound = QUADRATURE_RTOL if cls in QUADRATURE else 8 * torch.finfo(dtype).eps
        for t in (k.nngp, k.ntk):
            gap = float((t - t.T).abs().max() / t.abs().max())
            assert gap <= bound, f"{dtype}: asymmetric by {gap:.1e}"
            exact = exact and torch.equal(t, t.T)
    assert exact, "k(x, x) is not exactly symmetric (tiling.py symmetrises diagonal tiles)"


@pytest.mark.parametrize("cls", CASES)
def test_float32_agrees_with_float64(cls):
    case = EXAMPLES[cls]
    net, x = case.network(), _x(case)
    k64, k32 = net.kernel(x), net.kernel(x.float())
    assert k32.nngp.dtype == torch.float32
    for name in ("nngp", "ntk"):
        err = _rel(getattr(k32, name), getattr(k64, name))
        assert err < DTYPE_RTOL[torch.float32], f"{name}: {err:.2e}"


@pytest.mark.parametrize("cls", CASES)
def test_spec_round_trip(cls):
    """to_spec -> parse_architecture gives the same kernel and the same string; a
    layer the grammar does not cover is refused by name."""
    case = EXAMPLES[cls]
    layer = case.layer()
    if cls in NO_SPEC:
        with pytest.raises(ValueError, match="no compact spec form"):
            to_spec(layer)
        return
    spec = to_spec(layer)
    again = parse_architecture(spec)
    assert to_spec(again) == spec
    x = _x(case)
    _assert_same(case.network(again).kernel(x), case.network(layer).kernel(x), rtol=1e-12)


@pytest.mark.parametrize("cls", CASES)
def test_repr_round_trip(cls):
    """``eval(repr(layer))`` with the layer names in scope is a layer of the same kernel."""
    case = EXAMPLES[cls]
    layer = case.layer()
    scope = {**vars(L), "tanh": torch.tanh}
    again = eval(repr(layer), scope)  # noqa: S307 - our own repr
    assert isinstance(again, L.Layer)
    x = _x(case)
    _assert_same(case.network(again).kernel(x), case.network(layer).kernel(x), rtol=1e-12)


@pytest.mark.parametrize("cls", MC_CASES)
def test_monte_carlo_twin_approaches_the_kernel(cls):
    """The mean empirical kernels of sampled finite twins (`build`) approach the
    analytic NNGP and NTK; and a wrong kernel (another readout scale) does not pass."""
    case = EXAMPLES[cls]
    net, x = case.network(), _x(case, n=3)
    k = net.kernel(x)
    mc = monte_carlo_kernel(net, x, n_samples=MC_SAMPLES, progress=False,
                            generator=torch.Generator().manual_seed(7))
    err_nngp, err_ntk = _rel(mc.nngp, k.nngp), _rel(mc.ntk, k.ntk)
    assert err_nngp < MC_RTOL and err_ntk < MC_RTOL, (err_nngp, err_ntk)
    assert _rel(mc.nngp, 1.5 * k.nngp) > MC_RTOL  # the tolerance can tell a 50% error


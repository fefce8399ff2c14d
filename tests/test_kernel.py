"""The `Kernel` value: immutability, slicing, casting, and that layers never modify the
tensors they receive (kernels are shared between FanOut branches)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import ntkit as nk
from ntkit.layers import input_kernel

FIELDS = ("nngp", "ntk", "cov1", "cov2")


def _x(n: int, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


NETS = {
    "relu-mlp": lambda: nk.Sequential(nk.Linear(16, w_std=1.4, b_std=0.2), nk.ReLU(),
                                      nk.Linear(16, w_std=1.4, b_std=0.2), nk.ReLU(),
                                      nk.Linear(1)),
    "standard-erf-layernorm": lambda: nk.Sequential(
        nk.Linear(8, b_std=0.3, parameterization="standard"), nk.LayerNorm(), nk.Erf(),
        nk.Linear(2, parameterization="standard")),
    "residual-gelu": lambda: nk.Sequential(
        nk.Linear(6, b_std=0.1), nk.FanOut(2),
        nk.Parallel(nk.Sequential(nk.GELU(), nk.Linear(6)), nk.Identity()), nk.FanInSum(),
        nk.Sin(), nk.Linear(1)),
}


def _assert_same(a: nk.Kernel, b: nk.Kernel, rtol: float = 1e-12) -> None:
    for f in FIELDS:
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=rtol, atol=rtol * 1e-2,
                                   msg=lambda m, f=f: f"field {f}: {m}")


#: A row slice of k(x, x) holds self-pairs (x_i, x_i), which the self-kernel computes
#: exactly from the variances, while k(x[rows], x) computes the same pairs as a cross
#: pair, through arccos at correlation 1 - ulp: ~1e-8 apart for ReLU's NTK.
CROSS_RTOL = 1e-7


# ------------------------------------------------------------------ value semantics
def test_kernel_is_frozen():
    """Assigning any field of a Kernel raises FrozenInstanceError."""
    k = NETS["relu-mlp"]().kernel(_x(4))
    for field in (*FIELDS, "shape", "diagonal", "x1_is_x2"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(k, field, getattr(k, field))


def test_replace_returns_new_object():
    """replace() gives a new Kernel with the change; the original keeps its values."""
    k = NETS["relu-mlp"]().kernel(_x(4))
    before = k.nngp.clone()
    k2 = k.replace(nngp=k.nngp * 2, x1_is_x2=not k.x1_is_x2)
    assert k2 is not k
    assert torch.equal(k.nngp, before) and torch.equal(k2.nngp, 2 * before)
    assert k2.ntk is k.ntk and k2.x1_is_x2 != k.x1_is_x2


def test_batch_shape_dtype_device_and_repr():
    k = NETS["relu-mlp"]().kernel(_x(4), _x(3, seed=1))
    assert k.batch_shape == (4, 3)
    assert k.dtype == torch.float64 and k.device == torch.device("cpu")
    assert "nngp=(4, 3)" in repr(k)
    kd = NETS["relu-mlp"]().kernel(_x(4), diagonal=True)
    assert kd.batch_shape == (4,) and "diagonal" in repr(kd)


# ------------------------------------------------------------------------ slicing
INDICES = {
    "slice": slice(1, 5),
    "step-slice": slice(0, 7, 3),
    "negative-slice": slice(-3, None),
    "list": [6, 0, 3],
    "tensor": torch.tensor([2, 4]),
    "bool-mask": torch.tensor([True, False, True, True, False, False, True]),
    "int": 3,
    "negative-int": -1,
}


def _as_rows(index, n: int) -> torch.Tensor:
    """The rows an index selects, keeping the axis for integers."""
    if isinstance(index, int):
        index = slice(index, index + 1 if index != -1 else None)
    return torch.arange(n)[index]


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("rows", INDICES.values(), ids=INDICES.keys())
def test_row_slice_of_self_kernel(net_name, rows):
    """k(x, x)[rows] == k(x[rows], x) for every kind of index; ints keep their axis."""
    net, x = NETS[net_name](), _x(7)
    k = net.kernel(x)
    r = _as_rows(rows, 7)
    sliced = k[rows]
    assert sliced.nngp.shape == (len(r), 7)
    _assert_same(sliced, net.kernel(x[r], x), CROSS_RTOL)
    assert not sliced.x1_is_x2


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize(
    "rows, cols",
    [(slice(1, 4), slice(0, 6, 2)), ([5, 1], torch.tensor([0, 3, 4])), (2, -1), (slice(None), 4)],
    ids=["slices", "list-tensor", "int-int", "all-int"],
)
def test_row_col_slice_of_cross_kernel(net_name, rows, cols):
    """k(x1, x2)[rows, cols] == k(x1[rows], x2[cols])."""
    net, x1, x2 = NETS[net_name](), _x(7), _x(6, seed=1)
    r, c = _as_rows(rows, 7), _as_rows(cols, 6)
    sliced = net.kernel(x1, x2)[rows, cols]
    assert sliced.nngp.shape == (len(r), len(c))
    _assert_same(sliced, net.kernel(x1[r], x2[c]))


@pytest.mark.parametrize("index", [slice(1, 5), slice(0, 7, 2), 3],
                         ids=["slice", "step", "int"])
def test_square_slice_of_self_kernel_is_self_kernel(index):
    """k(x, x)[s, s] with the same slice is k(x[s], x[s]): still a self-kernel
    (x1_is_x2), and equal to net.kernel(x[s]) even with Dropout, which treats
    self-pairs differently."""
    net = nk.Sequential(nk.Linear(8), nk.ReLU(), nk.Dropout(0.3), nk.Linear(1))
    x = _x(7)
    sliced = net.kernel(x)[index, index]
    assert sliced.x1_is_x2
    _assert_same(sliced, net.kernel(x[_as_rows(index, 7)]))


def test_slice_of_self_kernel_with_distinct_rows_cols():
    """Rows != cols of a self-kernel is no longer a self-kernel."""
    k = NETS["relu-mlp"]().kernel(_x(7))
    assert not k[1:3, 2:4].x1_is_x2
    assert not k[1:3].x1_is_x2


@pytest.mark.parametrize("index", [np.int64(3), torch.tensor(3)], ids=["numpy-int", "0-d-tensor"])
def test_integer_like_index_keeps_axis(index):
    """NumPy integers and 0-d tensors are integers too: like int they must keep the axis
    (today they drop it, and the column selection then fails with 'too many indices')."""
    k = NETS["relu-mlp"]().kernel(_x(7))
    sliced = k[index]
    assert sliced.nngp.shape == (1, 7)
    _assert_same(sliced, k[3])


@pytest.mark.parametrize("index", [7, -8, 100], ids=["n", "-n-1", "100"])
def test_out_of_range_integer_index_raises(index):
    """An integer past the end is an IndexError, as for tensors, not an empty Kernel."""
    k = NETS["relu-mlp"]().kernel(_x(7))
    with pytest.raises(IndexError):
        k[index]


@pytest.mark.parametrize("index", [slice(2, 6), [0, 6, 3], 4, -2],
                         ids=["slice", "list", "int", "negative-int"])
def test_diagonal_kernel_slicing(index):
    """A diagonal kernel takes one index: kd[i] == k(x[i], diagonal=True), all four fields."""
    net, x = NETS["residual-gelu"](), _x(7)
    kd = net.kernel(x, diagonal=True)
    r = _as_rows(index, 7)
    sliced = kd[index]
    assert sliced.diagonal and sliced.nngp.shape == (len(r),)
    _assert_same(sliced, net.kernel(x[r], diagonal=True))


# ------------------------------------------------------------------------ casting
@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
def test_to_float32_casts_every_tensor(diagonal):
    """.to(torch.float32) casts nngp, ntk, cov1 and cov2 and keeps the other fields."""
    k = NETS["standard-erf-layernorm"]().kernel(_x(5), diagonal=diagonal)
    k32 = k.to(torch.float32)
    for f in FIELDS:
        assert getattr(k32, f).dtype == torch.float32, f
        torch.testing.assert_close(getattr(k32, f).double(), getattr(k, f), rtol=1e-6, atol=1e-7)
    assert k32.dtype == torch.float32
    assert (k32.shape, k32.diagonal, k32.x1_is_x2) == (k.shape, k.diagonal, k.x1_is_x2)
    assert k.nngp.dtype == torch.float64  # the original is untouched


def test_to_device_moves_every_tensor():
    """.to('meta') moves all four tensors (the only other device on a CPU-only machine)."""
    km = NETS["relu-mlp"]().kernel(_x(4)).to("meta")
    assert all(getattr(km, f).device.type == "meta" for f in FIELDS)


# --------------------------------------------------------- no in-place modification
@pytest.mark.parametrize("as_numpy", [False, True], ids=["tensor", "numpy"])
@pytest.mark.parametrize("net_name", list(NETS))
def test_inputs_are_not_modified(net_name, as_numpy):
    """net.kernel(x1, x2) leaves its inputs as they were (NumPy inputs share memory with
    the tensors made from them, so they are checked too)."""
    x1, x2 = _x(6), _x(4, seed=1)
    a, b = (x1.numpy(), x2.numpy()) if as_numpy else (x1, x2)
    c1, c2 = x1.clone(), x2.clone()
    net = NETS[net_name]()
    net.kernel(a, b)
    net.kernel(a)
    net.kernel(a, diagonal=True)
    net.kernel(a, b, memory_budget=2000)
    assert torch.equal(x1, c1) and torch.equal(x2, c2)


ACTS = {
    "ReLU": nk.ReLU(), "LeakyReLU": nk.LeakyReLU(0.2), "ABReLU": nk.ABReLU(-0.5, 1.5),
    "Abs": nk.Abs(), "Sign": nk.Sign(), "Erf": nk.Erf(), "GELU": nk.GELU(), "Sin": nk.Sin(),
    "Cos": nk.Cos(), "Rbf": nk.Rbf(), "Gaussian": nk.Gaussian(), "Exp": nk.Exp(b=0.5),
    "Monomial2": nk.Monomial(2), "RectifiedMonomial2": nk.RectifiedMonomial(2),
    "Elementwise-tanh": nk.Elementwise(torch.tanh, degree=8),
}
LAYERS = {**ACTS, "Linear-ntk": nk.Linear(3, b_std=0.5),
          "Linear-standard": nk.Linear(3, b_std=0.5, parameterization="standard"),
          "LayerNorm": nk.LayerNorm(), "Dropout": nk.Dropout(0.4), "Flatten": nk.Flatten(),
          "Identity": nk.Identity()}


def _gaussian_kernel(mode: str) -> nk.Kernel:
    """A Kernel after a Linear, in one of the three layouts a layer can receive."""
    x1, x2 = _x(5), _x(4, seed=1)
    if mode == "self":
        k = input_kernel(x1, None)
    elif mode == "cross":
        k = input_kernel(x1, x2)
    else:
        k = input_kernel(x1, None, diagonal=True)
    return nk.Linear(7, w_std=1.2, b_std=0.3).propagate(k)


@pytest.mark.parametrize("mode", ["self", "cross", "diagonal"])
@pytest.mark.parametrize("layer", LAYERS.values(), ids=LAYERS.keys())
def test_layer_does_not_modify_received_kernel(layer, mode):
    """propagate() returns a new Kernel and leaves every tensor it received unchanged
    (FanOut hands the same tensors to all branches)."""
    k = _gaussian_kernel(mode)
    saved = {f: getattr(k, f).clone() for f in FIELDS}
    out = layer.propagate(k)
    for f in FIELDS:
        assert torch.equal(getattr(k, f), saved[f]), f"{layer!r} modified its input's {f}"
    if not isinstance(layer, (nk.Identity, nk.Flatten)):  # these two may pass k through
        assert out is not k


@pytest.mark.parametrize("merge", [nk.FanInSum(), nk.FanInProd(), nk.FanInConcat()],
                         ids=["sum", "prod", "concat"])
def test_fan_in_does_not_modify_branches(merge):
    ks = (_gaussian_kernel("self"), _gaussian_kernel("self").replace(shape=(7,)))
    saved = [{f: getattr(k, f).clone() for f in FIELDS} for k in ks]
    merge.propagate(ks)
    for k, s in zip(ks, saved):
        assert all(torch.equal(getattr(k, f), s[f]) for f in FIELDS)


@pytest.mark.parametrize("order", ["branch-first", "identity-first"])
@pytest.mark.parametrize("act", ["ReLU", "Erf", "Sign", "Dropout"])
def test_fanout_branches_see_uncorrupted_kernel(order, act):
    """A residual block's kernel is the sum of its branches' kernels computed separately:
    FanOut(2) -> Parallel(Sequential(act, Linear), Identity()) -> FanInSum equals
    k(Linear, act, Linear) + k(Linear), whichever branch comes first. A branch that
    modified the shared kernel in place would corrupt the Identity branch."""
    layer = ACTS.get(act) or nk.Dropout(0.3)
    if isinstance(layer, nk.Dropout):
        layer_seq = [nk.ReLU(), layer]
    else:
        layer_seq = [layer]
    first = nk.Linear(6, w_std=1.3, b_std=0.2)
    second = nk.Linear(6, w_std=0.9, b_std=0.1)
    branch = nk.Sequential(*layer_seq, second)
    pair = (branch, nk.Identity()) if order == "branch-first" else (nk.Identity(), branch)
    net = nk.Sequential(first, nk.FanOut(2), nk.Parallel(*pair), nk.FanInSum())
    x = _x(6)
    for args in ((x,), (x, _x(3, seed=2))):
        k = net.kernel(*args)
        a = nk.Sequential(first, branch).kernel(*args)
        b = nk.Sequential(first).kernel(*args)
        for f in FIELDS:
            torch.testing.assert_close(getattr(k, f), getattr(a, f) + getattr(b, f),
                                       rtol=1e-12, atol=1e-14)
    kd = net.kernel(x, diagonal=True)
    ad = nk.Sequential(first, branch).kernel(x, diagonal=True)
    bd = nk.Sequential(first).kernel(x, diagonal=True)
    torch.testing.assert_close(kd.nngp, ad.nngp + bd.nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kd.ntk, ad.ntk + bd.ntk, rtol=1e-12, atol=1e-14)

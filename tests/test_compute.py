"""Tiling machinery: the progress bar, tile counts, the symmetric path, budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ntkit as nk
import ntkit.tiling


def _net():
    return nk.Sequential(nk.Linear(8, b_std=0.1), nk.ReLU(), nk.Linear(1))


def test_progress_bar_shown_on_request(capsys):
    """progress=True draws a tqdm bar over the tiles on stderr; False draws none."""
    x = torch.randn(40, 5, dtype=torch.float64)
    _net().kernel(x, memory_budget=40 * 8 * 24 * 25, progress=True)  # ~5x5-entry tiles
    assert "kernel tiles" in capsys.readouterr().err
    _net().kernel(x, memory_budget=40 * 8 * 24 * 25, progress=False)
    assert "kernel tiles" not in capsys.readouterr().err


def test_monte_carlo_progress_bar(capsys):
    """monte_carlo_kernel shows a bar over sampled networks when asked."""
    x = torch.randn(3, 4, dtype=torch.float64)
    nk.monte_carlo_kernel(_net(), x, n_samples=3, generator=torch.Generator().manual_seed(0),
                          progress=True)
    assert "networks" in capsys.readouterr().err


# ------------------------------------------------------------- the symmetric path
def _cnn():
    """Pools: its tiles use the self trace (position pairs)."""
    return nk.Sequential(nk.Conv2d(4, 3, padding="same", w_std=1.3, b_std=0.2), nk.ReLU(),
                         nk.GlobalAvgPool(), nk.Linear(1))


def _mlp():
    return nk.Sequential(nk.Linear(8, w_std=1.4, b_std=0.1), nk.ReLU(), nk.Linear(1))


#: Architectures, their inputs, and a budget that forces several tiles of each kernel.
CASES = {
    "mlp-f32": (_mlp, (30, 5), torch.float32, 4 * 24 * 64),     # 8 x 8 tiles
    "mlp-f64": (_mlp, (30, 5), torch.float64, 8 * 24 * 64),
    "cnn-f32": (_cnn, (9, 2, 4, 4), torch.float32, 4 * 256 * 24 * 9),  # 3 x 3 tiles
}


@pytest.fixture
def tile_calls(monkeypatch) -> list[tuple]:
    """Records ``(rows, cols)`` of every tile `tiled_kernel` computes."""
    calls: list[tuple] = []
    original = ntkit.tiling._tile

    def counted(rule, x1, x2, r, c, *args):
        calls.append((r, c))
        return original(rule, x1, x2, r, c, *args)

    monkeypatch.setattr(ntkit.tiling, "_tile", counted)
    return calls


def _twice(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x`` again, as users write it: the same object, or a view of it."""
    return {"same": x, "view": x.view(x.shape)}


@pytest.mark.parametrize("how", ["same", "view"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_of_x_and_x_takes_the_symmetric_path(case, how, tile_calls):
    """``net.kernel(x, x)`` equals ``net.kernel(x)`` bit for bit and computes the same
    tiles (the upper triangle), fewer than the general pair ``k(x, x')`` with x' one
    element off; float32 self-pairs equal the diagonal kernel (no arccos rounding)."""
    make, shape, dtype, budget = CASES[case]
    net = make()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    k_self = net.kernel(x, memory_budget=budget)
    self_tiles = sorted(tile_calls)
    tile_calls.clear()
    k_twice = net.kernel(x, _twice(x)[how], memory_budget=budget)
    assert sorted(tile_calls) == self_tiles
    for field in ("nngp", "ntk", "cov1", "cov2"):
        assert torch.equal(getattr(k_twice, field), getattr(k_self, field)), field
    assert k_twice.x1_is_x2

    # witness that the counts can differ: a general pair computes every tile
    other = x.clone()
    other.view(-1)[0] += 1
    tile_calls.clear()
    k_pair = net.kernel(x, other, memory_budget=budget)
    assert len(tile_calls) > len(self_tiles) > 1
    assert not k_pair.x1_is_x2
    # an equal copy is another tensor: the general pair too (a result must not depend on
    # whether a batch happens to equal another one)
    tile_calls.clear()
    k_copy = net.kernel(x, x.clone(), memory_budget=budget)
    assert len(tile_calls) > len(self_tiles) and not k_copy.x1_is_x2

    # self-pairs against the float64 diagonal: at rounding on the symmetric path; the
    # general pair (x against x and one more input) goes through arccos near 1
    n = shape[0]
    truth = net.kernel(x.double(), diagonal=True)
    general = net.kernel(x, torch.cat([x, x[:1] + 1]), memory_budget=budget)
    tol = SELF_PAIR_RTOL[dtype]
    for field in ("nngp", "ntk"):
        want = getattr(truth, field)
        assert _rel(torch.diagonal(getattr(k_twice, field)), want) < tol, field
    if dtype == torch.float32:
        assert _rel(torch.diagonal(general.ntk[:, :n]), truth.ntk) > tol  # tol can fail


#: Self-pairs k(x_i, x_i) of the symmetric path against float64: a few roundings
#: (observed 2.6e-7 in float32, 2e-16 in float64); the arccos path is off by 1e-5-1e-4.
SELF_PAIR_RTOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want.double()).abs() / want.double().abs()).max())


def test_different_inputs_are_not_merged():
    """Inputs of another shape, dtype or memory (equal copies included) keep the
    general path; only the tensor itself or a view of it read alike is merged."""
    from ntkit.kernel import same_inputs

    x = torch.randn(4, 3, dtype=torch.float64)
    assert same_inputs(x, x) and same_inputs(x, x[:]) and same_inputs(x, x.view(4, 3))
    assert not same_inputs(x, x.clone())
    assert not same_inputs(x[1:], x[:3])
    assert not same_inputs(x, None)
    assert not same_inputs(x, x[:3])
    assert not same_inputs(x, x.float())
    assert not same_inputs(x, x.t().contiguous().t()[:, :2])
    y = x.clone()
    y[3, 2] = torch.nextafter(y[3, 2], torch.tensor(10.0, dtype=torch.float64))
    assert not same_inputs(x, y)


# --------------------------------------------------------------- the self trace
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("pair", [False, True], ids=["k(x)", "k(x1,x2)"])
def test_returned_kernel_carries_no_self_trace(pair, grad):
    """The recording of the tiles (SelfTrace) serves the tiles only: a kernel returned by
    `net.kernel` holds none (nor the inputs), with and without gradients, and it was
    there to be dropped (the network's tiles record one)."""
    w = torch.tensor(1.3, requires_grad=grad)
    net = nk.Sequential(nk.Conv2d(4, 3, padding="same", w_std=w), nk.ReLU(),
                        nk.GlobalAvgPool(), nk.Linear(1))
    x1 = torch.randn(9, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    x2 = torch.randn(7, 2, 4, 4, generator=torch.Generator().manual_seed(3)) if pair else None
    recorded = []
    original = ntkit.tiling._tile

    def spy(*args):
        k = original(*args)
        recorded.append(k.self_trace is not None)
        return k

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ntkit.tiling, "_tile", spy)
        k = net.kernel(x1, x2, memory_budget=4 * 256 * 24 * 9)
    assert len(recorded) > 1 and any(recorded)
    assert k.self_trace is None
    assert k.inputs is None
    assert k.ntk.requires_grad == grad


# ------------------------------------------------------------------- budgets
@pytest.mark.parametrize("budget, want", [
    (np.int64(3 << 20), 3 << 20), (np.int32(1000), 1000), (np.uint64(7), 7),
    (np.float32(1.5e6), 1_500_000), (np.float64(2.5e9), 2_500_000_000),
    (2**20, 2**20), (1e6, 1_000_000), ("2GiB", 2 << 30), ("512MB", 512_000_000), (None, 1 << 30),
], ids=lambda v: f"{type(v).__name__}({v})")
def test_parse_memory_takes_numpy_scalars(budget, want):
    """NumPy integers and floats (as a parameter grid gives them) count as numbers."""
    got = nk.parse_memory(budget)
    assert got == want and type(got) is int


@pytest.mark.parametrize("budget, error", [
    (True, TypeError), (np.bool_(True), TypeError), ([1], TypeError),
    (np.float64("inf"), ValueError), (np.float32("nan"), ValueError), (np.int64(0), ValueError),
    (-5, ValueError), ("lots", ValueError),
], ids=lambda v: repr(v))
def test_parse_memory_refuses(budget, error):
    with pytest.raises(error, match="memory_budget"):
        nk.parse_memory(budget)


def test_numpy_budget_reaches_the_tiles(tile_calls):
    """``memory_budget=np.int64(...)`` sizes tiles as the same int does."""
    x = torch.randn(30, 5, dtype=torch.float64)
    budget = 8 * 24 * 64  # 8 x 8 tiles
    want = _mlp().kernel(x, memory_budget=budget)
    tiles = sorted(tile_calls)
    tile_calls.clear()
    got = _mlp().kernel(x, memory_budget=np.int64(budget))
    assert sorted(tile_calls) == tiles and len(tiles) > 1
    assert torch.equal(got.ntk, want.ntk)


# ------------------------------------------------------------------ old homes
def test_compute_module_is_a_deprecated_alias():
    """``ntkit.compute``'s names resolve to their new homes, with a DeprecationWarning;
    ``input_kernel`` is importable from layers.base and layers as before."""
    import ntkit.compute
    from ntkit import _budget, kernel, layers
    from ntkit.layers import base

    with pytest.warns(DeprecationWarning, match="ntkit._budget"):
        assert ntkit.compute.parse_memory is _budget.parse_memory
    with pytest.warns(DeprecationWarning, match="ntkit.tiling"):
        assert ntkit.compute.tiled_kernel is ntkit.tiling.tiled_kernel
    with pytest.raises(AttributeError):
        ntkit.compute.no_such_name  # noqa: B018
    assert base.input_kernel is layers.input_kernel is kernel.input_kernel

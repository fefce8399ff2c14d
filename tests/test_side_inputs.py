"""The plumbing of per-example side inputs (masks, adjacency patterns): checks at
the public boundary, each tile seeing its own rows and columns, and the finite
twins' containers handing them on."""

import pytest
import torch
from torch import nn

import ntkit as nk
from ntkit._side import SideModule, check_side_inputs
from ntkit.layers.base import Layer


class _CountPresent(Layer):
    """Test layer: adds (present positions of x1_i) * (present positions of x2_j) to
    the NNGP, so the result shows which mask rows each tile received."""

    def side_inputs(self):
        return frozenset({"mask"})

    def propagate(self, k):
        m1, m2 = k.side_pair("mask")
        c1 = m1.flatten(1).sum(1).to(k.dtype)
        c2 = m2.flatten(1).sum(1).to(k.dtype)
        extra = c1 * c2 if k.diagonal else c1[:, None] * c2[None, :]
        extra = extra.reshape(*extra.shape, *([1] * (k.nngp.ndim - extra.ndim)))
        return k.replace(nngp=k.nngp + extra)

    def _build(self, shape, ctx):
        return _CountModule(), shape


class _CountModule(SideModule):
    def forward_side(self, x, side):
        side["seen"] = side["mask"].sum()
        return x


def _data(n, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return x, mask, lengths


def _expected(x1, m1, x2, m2):
    z1 = x1 * m1[:, None]
    z2 = x2 * m2[:, None]
    base = torch.einsum("icl,jcl->ijl", z1, z2) / x1.shape[1]
    return base + (m1.sum(1)[:, None] * m2.sum(1)[None, :]).to(base.dtype)[:, :, None]


@pytest.mark.parametrize("budget", [None, 4000])
def test_each_tile_sees_its_own_mask_rows(budget):
    x1, m1, _ = _data(9)
    x2, m2, _ = _data(6, seed=1)
    net = _CountPresent()
    k = net.kernel(x1, x2, mask=(m1, m2), memory_budget=budget)
    torch.testing.assert_close(k.nngp, _expected(x1, m1, x2, m2), rtol=1e-12, atol=1e-12)
    ks = net.kernel(x1, mask=m1, memory_budget=budget)
    torch.testing.assert_close(ks.nngp, _expected(x1, m1, x1, m1), rtol=1e-12, atol=1e-12)
    kd = net.kernel(x1, mask=m1, diagonal=True, memory_budget=budget)
    full = _expected(x1, m1, x1, m1)
    torch.testing.assert_close(kd.nngp, torch.diagonal(full, 0, 0, 1).T)


def test_same_tensor_with_other_mask_is_a_cross_kernel():
    x, m, _ = _data(5)
    other = m.clone()
    other[:, 0] = False
    k = _CountPresent().kernel(x, x, mask=(m, other))
    torch.testing.assert_close(k.nngp, _expected(x, m, x, other))


def test_errors_say_what_was_wrong():
    x, m, _ = _data(4)
    with pytest.raises(ValueError, match="no layer that reads it"):
        nk.Conv1d(4, 3).kernel(x, mask=m) if "mask" not in nk.Conv1d(4, 3).side_inputs() \
            else nk.Linear(3).kernel(x.flatten(1), mask=m)
    net = _CountPresent()
    with pytest.raises(ValueError, match="must be a pair"):
        net.kernel(x, x[:2], mask=m)
    with pytest.raises(ValueError, match="x2 is None"):
        net.kernel(x, mask=(m, m))
    with pytest.raises(TypeError, match="booleans"):
        net.kernel(x, mask=m.double())
    with pytest.raises(ValueError, match=r"needs \(N, \*spatial\)"):
        net.kernel(x, mask=m[:, :3])
    with pytest.raises(ValueError, match="dense inputs"):
        check_side_inputs(x.flatten(1), None, {"mask": m}, {"mask"}, "net")
    with pytest.raises(ValueError, match=r"\(N, V, V\)"):
        check_side_inputs(x, None, {"pattern": torch.ones(4, 7, 6)}, {"pattern"}, "net")


def test_twin_containers_hand_side_inputs_on():
    x, m, _ = _data(4)
    model = nk.Sequential(nk.Identity(), _CountPresent(), nk.Identity()).build((3, 7))
    out = model(x, mask=m)
    torch.testing.assert_close(out, x * m[:, None])  # absent positions zeroed at the top
    side = {"mask": m}
    model(x, side)
    assert int(side["seen"]) == int(m.sum())
    with pytest.raises(TypeError, match="side inputs"):
        model(x, colour=m)
    assert isinstance(model, nn.Sequential)

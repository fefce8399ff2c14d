"""Shared tolerances and fixtures of the ntkit test suite."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

# tests/reference.py (the neural-tangents reference loader) is imported as `reference`.
sys.path.insert(0, str(Path(__file__).parent))

#: Tolerances of closed-form kernels, by dtype, for `rel_err` (max abs error / max abs value)
#: and for `torch.testing.assert_close`-style checks (rtol, atol).
#: float64: rounding is ~1e-16 per operation; a few layers of O(1)-conditioned formulas
#: stay far below 1e-6. float32: unit roundoff 6e-8; the same formulas stay below ~1e-6
#: (observed <= 8e-7 on the reference cases), so 1e-5 leaves a 10x margin while still
#: catching sqrt(eps) ~ 3e-4 losses (arccos near correlation 1).
TOL = {
    torch.float64: dict(rtol=1e-6, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}

#: Kernels computed by quadrature (ntkit's `Elementwise`, neural-tangents'
#: `ElementwiseNumerical`): implementations of the same rule may differ in node
#: computation and summation order, and the rule's own error can be ~1e-3 (degree 25).
NUMERICAL_RTOL = 1e-4


def _float64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu()
    return torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: views may be read-only


def rel_err(got, want) -> float:
    """``max |got - want| / max |want|`` in float64 (tensors or arrays; the absolute error
    when ``want`` is zero)."""
    got, want = _float64(got), _float64(want)
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    return err / scale if scale > 0 else err


@pytest.fixture(scope="session")
def make_generator() -> Callable[[int], torch.Generator]:
    """A factory of seeded CPU generators: ``make_generator(seed)``."""

    def make(seed: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    return make


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: tiny tensors run faster without thread start-up (much faster
    when another process shares the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ResidualLayerNorm(torch.nn.Module):
    """A small residual block with LayerNorm: ``out(norm(x + b(act(a(x)))))``, 6 -> 2."""

    def __init__(self, act=torch.relu):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.out = torch.nn.Linear(6, 2)
        self.act = act

    def forward(self, x):
        return self.out(self.norm(x + self.b(self.act(self.a(x)))))

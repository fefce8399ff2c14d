"""Parity with neural-tangents on the kernel reference cases of tests/data.

Witness: kernels computed by neural-tangents 0.6.5 in float64 (tests/data/README.md),
on the same inputs, for the same architecture built by `reference.network`.
"""

from __future__ import annotations

import pytest
import torch

import reference
from conftest import NUMERICAL_RTOL, TOL, rel_err

CASES = reference.cases("kernel")
#: Cases whose kernel is computed by quadrature (both here and in the reference).
NUMERICAL = {"fc_tanh_numerical"}

KEYS = ("nngp", "ntk", "nngp_11", "ntk_11")


def test_all_cases_are_collected():
    """The parametrization covers every kernel case of cases.json, dense and convolutional."""
    names = [c["name"] for c in CASES]
    assert len(names) >= 16 and len(set(names)) == len(names)
    assert sum(n.startswith("cnn") for n in names) >= 3


def _kernels(case: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    a = reference.arrays(case["name"])
    net = reference.network(case["layers"])
    x1, x2 = a["x1"].to(dtype), a["x2"].to(dtype)
    k12 = net.kernel(x1, x2)
    k11 = net.kernel(x1)
    got = {"nngp": k12.nngp, "ntk": k12.ntk, "nngp_11": k11.nngp, "ntk_11": k11.ntk}
    for key, value in got.items():
        assert value.dtype == dtype, key
        assert value.shape == a[key].shape, key
    return got


def _tolerance(case: dict, dtype: torch.dtype) -> float:
    rtol = TOL[dtype]["rtol"]
    return max(rtol, NUMERICAL_RTOL) if case["name"] in NUMERICAL else rtol


CLOSED_FORM = [c for c in CASES if c["name"] not in NUMERICAL]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CLOSED_FORM, ids=[c["name"] for c in CLOSED_FORM])
def test_matches_neural_tangents(case, dtype):
    """k(x1, x2) and k(x1, x1), NNGP and NTK, against the stored neural-tangents kernels.

    Relative error = max abs error / max abs value <= 1e-6 (float64) or 1e-5 (float32).
    The quadrature case has its own test below.
    """
    want = reference.arrays(case["name"])
    got = _kernels(case, dtype)
    tol = _tolerance(case, dtype)
    errors = {key: rel_err(got[key], want[key]) for key in KEYS}
    bad = {key: f"{e:.2e}" for key, e in errors.items() if not e <= tol}
    assert not bad, f"{case['name']} ({dtype}): relative errors above {tol:.0e}: {bad}"


def _with_degree(case: dict, degree) -> dict:
    layers = [[name, dict(kw, deg=degree) if name == "ElementwiseNumerical" else kw]
              for name, kw in case["layers"]]
    return dict(case, layers=layers)


@pytest.mark.parametrize("case", [c for c in CASES if c["name"] in NUMERICAL],
                         ids=sorted(NUMERICAL))
def test_quadrature_case(case):
    """The quadrature case, against degree-300 quadrature computed here.

    The stored neural-tangents kernels (degree 25) are no longer matched to 1e-4: both
    libraries used a Cholesky factorisation from x1's side, and ntkit's rule is now the
    symmetric square root (symmetric in x1, x2 and more accurate; see
    `ntkit.Elementwise`), so at degree 25 the two differ by their rules' errors (~3e-3).
    What is asserted instead, against degree-300 quadrature (converged: degree 128 is
    within 1e-7 of it):
    - the default degree ("auto") is within 1e-6 (float64), 1e-5 (float32);
    - at neural-tangents' degree 25, ntkit is closer than neural-tangents is (measured
      7e-4..6e-3 against NT's 3e-3..5.8e-2), key by key;
    - neural-tangents' kernels converge to the same values (within NT's own degree-25
      error, 1e-1), so the degree-300 reference is not ntkit's alone.
    """
    want = dict(reference.arrays(case["name"]))
    for key in ("nngp_11", "ntk_11"):  # NT's k(x1, x1) is not symmetric; compare it averaged
        want[key] = (want[key] + want[key].T) / 2
    exact = _kernels(_with_degree(case, 300), torch.float64)
    auto = _kernels(_with_degree(case, "auto"), torch.float64)
    auto_32 = _kernels(_with_degree(case, "auto"), torch.float32)
    at_25 = _kernels(case, torch.float64)
    for key in KEYS:
        nt_error = rel_err(want[key], exact[key])
        assert rel_err(auto[key], exact[key]) <= 1e-6, key
        assert rel_err(auto_32[key].double(), exact[key]) <= TOL[torch.float32]["rtol"], key
        assert rel_err(at_25[key], exact[key]) < nt_error, key
        assert nt_error <= 1e-1, key


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_self_kernel_is_symmetric(case):
    """k(x1, x1) is exactly symmetric (witness: its own transpose), the quadrature case
    included (ntkit symmetrises diagonal tiles; see ntkit.tiling)."""
    net = reference.network(case["layers"])
    k11 = net.kernel(reference.arrays(case["name"])["x1"])
    for field in ("nngp", "ntk"):
        m = getattr(k11, field)
        assert torch.equal(m, m.T), field

"""Closed-form activation kernels against ntkit's numerical path.

Witness: ``nk.Elementwise(act.fn, degree=...)``, 2-D Gauss-Hermite quadrature of
E[f(X) f(Y)] and E[f'(X) f'(Y)] with f' by autodiff of ``act.fn``: it shares nothing with
the closed forms but the function itself. Every comparison is after a ``Linear`` (Gaussian
pre-activations with unequal variances and correlations of both signs), on the NNGP and NTK
of k(x1, x2) and on the diagonal ``cov1`` = k(x1_i, x1_i).
"""

from __future__ import annotations

import pytest
import torch

import ntkit as nk
from conftest import TOL, rel_err


@pytest.fixture(scope="module")
def inputs(make_generator):
    g = make_generator(7)
    x1 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x2 = torch.randn(5, 5, generator=g, dtype=torch.float64)
    return x1, x2


def _net(act: nk.Layer) -> nk.Sequential:
    # Pre-activation variances 1.44 |x|^2 / 5 + 0.09, between ~0.3 and ~4 here.
    return nk.Sequential(nk.Linear(8, w_std=1.2, b_std=0.3), act)


_ERRORS: dict[tuple[str, int], dict[str, float]] = {}


def _errors(act: nk.Activation, degree: int, x1, x2) -> dict[str, float]:
    """Relative errors of Elementwise(act.fn, degree) against the closed form (cached: the
    inputs are the module's fixed ones)."""
    key = (repr(act), degree)
    if key not in _ERRORS:
        _ERRORS[key] = _compute_errors(act, degree, x1, x2)
    return _ERRORS[key]


def _compute_errors(act: nk.Activation, degree: int, x1, x2) -> dict[str, float]:
    want = _net(act).kernel(x1, x2)
    # Kinked functions take the Cholesky rule (both orders averaged), which puts each
    # kink at 0 on a grid axis; the default symmetric-square-root rule is the more
    # accurate one for smooth functions (see nk.Elementwise).
    rule = "cholesky" if any(act is a for a, *_ in KINKED) else "symmetric"
    got = _net(nk.Elementwise(act.fn, degree=degree, name=repr(act), rule=rule)).kernel(x1, x2)
    return {f: rel_err(getattr(got, f), getattr(want, f)) for f in ("nngp", "ntk", "cov1")}


# ------------------------------------------------------------------ smooth activations
#: Smooth (entire) functions: quadrature converges exponentially. Observed at degree 120
#: on these inputs: <= 1e-11 (Erf(), the slowest: erf'^2 ~ exp(-2 v u^2) is narrow at
#: v ~ 4; at degree 60 it is still 1e-6), rounding level for the rest (polynomials of
#: degree <= 8 are integrated exactly). 1e-8 leaves a 1000x margin.
SMOOTH_DEGREE = 120
SMOOTH_RTOL = 1e-8

SMOOTH = [
    nk.Erf(), nk.Erf(1.3, 0.7, 0.2), nk.GELU(), nk.Sin(), nk.Sin(1.2, 0.8, 0.3),
    nk.Cos(0.9, 1.1, 0.4), nk.Gaussian(1.0, -0.5), nk.Exp(0.5, 0.4), nk.Rbf(0.6),
    *[nk.Monomial(n) for n in range(5)],
]


@pytest.mark.parametrize("act", SMOOTH, ids=repr)
def test_smooth_closed_form_matches_quadrature(inputs, act):
    """nngp, ntk, cov1 within 1e-8 of Elementwise(act.fn, degree=120)."""
    errors = _errors(act, SMOOTH_DEGREE, *inputs)
    bad = {f: f"{e:.1e}" for f, e in errors.items() if not e <= SMOOTH_RTOL}
    assert not bad, f"{act!r}: relative errors above {SMOOTH_RTOL:.0e}: {bad}"


# ------------------------------------------------------------------ kinked activations
#: Functions with a kink (ReLU family, Abs, RectifiedMonomial(1)) or a jump (Sign,
#: RectifiedMonomial(0)) converge algebraically: a tensor-product rule cannot resolve a
#: discontinuity along the line slope*u + resid*v = 0. Observed relative errors at degree
#: 90 / 180 / 360 on these inputs (nngp; ntk):
#:   ReLU              2.2e-3 1.1e-3 5.2e-4 ; 2.5e-2 1.6e-2 9.7e-3
#:   LeakyReLU(0.2)    1.4e-3 6.6e-4 3.3e-4 ; 1.4e-2 8.9e-3 5.5e-3
#:   ABReLU(-0.3,1.7)  2.8e-3 1.4e-3 6.9e-4 ; 3.7e-2 2.3e-2 1.4e-2
#:   Abs               4.0e-3 2.0e-3 9.7e-4 ; 6.7e-2 4.2e-2 2.6e-2
#:   Sign              1.3e-1 8.9e-2 5.7e-2 ; (0: both NTKs vanish)
#:   RectMonomial(0)   5.0e-2 3.4e-2 2.2e-2 ; (0)
#:   RectMonomial(1)   = ReLU
#:   RectMonomial(2)   3.7e-5 8.5e-6 2.2e-6 ; 1.7e-3 7.9e-4 3.7e-4
#:   RectMonomial(3)   8.1e-6 2.3e-6 5.6e-7 ; 1.8e-5 5.0e-6 1.1e-6
#: i.e. error ~ degree^-1 for E[f f] with a kink, ~ degree^-0.6..-0.7 for a jump (E[f' f'] of
#: the ReLU family, E[f f] of Sign), ~ degree^-2 for smoother ones. The tolerances below are
#: about 2x the error observed at degree 360 (numpy's hermgauss overflows beyond ~370).
#: Convergence (not a constant offset, which a wrong closed form would leave) is asserted
#: separately: the error must shrink when the degree doubles.
KINKED_DEGREE = 360
KINKED = [
    # (activation, nngp rtol, ntk rtol)
    (nk.ReLU(), 1e-3, 2e-2),
    (nk.LeakyReLU(0.2), 1e-3, 1.2e-2),
    (nk.ABReLU(-0.3, 1.7), 1.5e-3, 3e-2),
    (nk.Abs(), 2e-3, 5e-2),
    (nk.Sign(), 0.12, 0.0),
    (nk.RectifiedMonomial(0), 5e-2, 0.0),
    (nk.RectifiedMonomial(1), 1e-3, 2e-2),
    (nk.RectifiedMonomial(2), 5e-6, 8e-4),
    (nk.RectifiedMonomial(3), 1.2e-6, 2.5e-6),
]
#: cov1 = E[f(X)^2] is a 1-D integral whose only kink, at 0, sits symmetrically between
#: the symmetric nodes: the quadrature is exact up to rounding there (observed <= 1e-15).
COV_RTOL = TOL[torch.float64]["rtol"]


@pytest.mark.parametrize(("act", "nngp_tol", "ntk_tol"), KINKED, ids=[repr(a) for a, *_ in KINKED])
def test_kinked_closed_form_matches_quadrature(inputs, act, nngp_tol, ntk_tol):
    """nngp, ntk, cov1 against Elementwise(act.fn, degree=360) within the observed
    quadrature error (table above)."""
    errors = _errors(act, KINKED_DEGREE, *inputs)
    tols = {"nngp": nngp_tol, "ntk": ntk_tol, "cov1": COV_RTOL}
    bad = {f: f"{e:.1e} > {tols[f]:.0e}" for f, e in errors.items() if not e <= tols[f]}
    assert not bad, f"{act!r}: {bad}"


@pytest.mark.parametrize(("act", "nngp_tol", "ntk_tol"), KINKED, ids=[repr(a) for a, *_ in KINKED])
def test_kinked_quadrature_converges_to_closed_form(inputs, act, nngp_tol, ntk_tol):
    """The quadrature error shrinks by at least 1/0.8 per doubling of the degree,
    90 -> 180 -> 360, for each nonzero quantity: the closed form is the limit."""
    errs = [_errors(act, d, *inputs) for d in (90, 180, 360)]
    for f in ("nngp", "ntk"):
        e = [x[f] for x in errs]
        if e[0] == 0:  # Sign / RectifiedMonomial(0): both NTKs identically 0
            assert e == [0.0, 0.0, 0.0], f
            continue
        assert e[1] <= 0.8 * e[0] and e[2] <= 0.8 * e[1], f"{act!r} {f}: errors {e}"


# ----------------------------------------------------------------------------- Sign
def test_sign_ntk_is_identically_zero(inputs):
    """sign' = 0 almost everywhere: after Sign the NTK is exactly 0 (cross, self and
    diagonal kernels), and after a readout Linear it equals the readout's NNGP."""
    x1, x2 = inputs
    net = _net(nk.Sign())
    for k in (net.kernel(x1, x2), net.kernel(x1)):
        assert torch.count_nonzero(k.ntk) == 0
        assert torch.count_nonzero(k.nngp) > 0
    assert torch.count_nonzero(net.kernel(x1, diagonal=True).ntk) == 0
    head = nk.Sequential(net, nk.Linear(1, w_std=1.3, b_std=0.2)).kernel(x1, x2)
    torch.testing.assert_close(head.ntk, head.nngp, rtol=0, atol=0)


# ------------------------------------------------------------------- self pairs, float32
CLOSED_FORMS = SMOOTH + [a for a, *_ in KINKED]


@pytest.mark.parametrize("act", CLOSED_FORMS, ids=repr)
def test_self_pairs_float32(inputs, act):
    """The diagonal of k(x1, x1) (nngp, ntk) and cov1 in float32 agree with float64 within
    the float32 tolerance.

    Witness: the same closed form in float64. Pairs of an input with itself have correlation
    exactly 1; a rule that recovers the angle as arccos(k / (sqrt(v) sqrt(v))) loses
    sqrt(eps) there (~3e-4 in float32, for E[f' f'] of the ReLU family and E[f f] of
    RectifiedMonomial(0)).
    """
    x1, _ = inputs
    net = _net(act)
    k64 = net.kernel(x1)
    k32 = net.kernel(x1.float())
    rtol = TOL[torch.float32]["rtol"]
    errors = {
        "nngp diag": rel_err(k32.nngp.diagonal(), k64.nngp.diagonal()),
        "ntk diag": rel_err(k32.ntk.diagonal(), k64.ntk.diagonal()),
        "cov1": rel_err(k32.cov1, k64.cov1),
    }
    bad = {f: f"{e:.1e}" for f, e in errors.items() if not e <= rtol}
    assert not bad, f"{act!r}: float32 vs float64 above {rtol:.0e}: {bad}"


# -------------------------------------------------------------- the numerical path itself
@pytest.mark.parametrize("degree", [400])
def test_elementwise_high_degree_is_finite_or_refused(inputs, degree):
    """A degree that Elementwise accepts gives a finite kernel (numpy's hermgauss returns
    NaN weights beyond ~370 nodes); otherwise the constructor must refuse it."""
    x1, x2 = inputs
    try:
        act = nk.Elementwise(torch.tanh, degree=degree)
    except ValueError:
        return
    k = _net(act).kernel(x1, x2)
    assert torch.isfinite(k.nngp).all() and torch.isfinite(k.ntk).all(), (
        f"Elementwise(tanh, degree={degree}) accepted the degree but returned non-finite "
        f"kernels"
    )

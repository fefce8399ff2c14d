"""ntkit.predict: closed-form gradient-descent dynamics and GP inference.

Witnesses: neural-tangents' ensemble predictions (tests/data, float64), explicit
matrix exponentials and inverses, and discrete gradient descent with small steps.
"""

from __future__ import annotations

import math

import pytest
import reference
import torch

import ntkit as nk
from ntkit import predict

F64 = torch.float64
CASE = reference.cases("gradient_descent_mse_ensemble")[0]


def _ensemble():
    a = reference.arrays(CASE["name"])
    net = reference.network(CASE["layers"])
    args = CASE["args"]
    pred = predict.gradient_descent_mse_ensemble(
        net, a["x_train"], a["y_train"], learning_rate=args["learning_rate"],
        diag_reg=args["diag_reg"])
    return pred, a


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_ensemble_matches_neural_tangents(get):
    """Mean and covariance at t = 0.5, 5 and inf, NNGP and NTK, equal neural-tangents'
    (float64, <= 1e-6 relative), from one call with a vector of times."""
    pred, a = _ensemble()
    times = [0.5, 5.0, math.inf]
    out = pred(a["x_test"], times, get=get, compute_cov=True)
    for i, t in enumerate(["0.5", "5.0", "inf"]):
        mean, cov = a[f"{get}_mean_t{t}"], a[f"{get}_cov_t{t}"]
        assert (out.mean[i] - mean).abs().max() <= 1e-6 * mean.abs().max(), t
        assert (out.cov[i] - cov).abs().max() <= 1e-6 * cov.abs().max(), t
    single = pred(a["x_test"], 5.0, get=get)
    assert torch.allclose(single.mean, out.mean[1], rtol=1e-12, atol=0)

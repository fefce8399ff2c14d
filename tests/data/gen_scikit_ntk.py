"""Generates scikit_ntk_reference.npz: scikit-ntk 1.2.1's NeuralTangentKernel
(float64) for tests/test_scikit_ntk.py, so that the parity test runs without
scikit-ntk installed. Run with scikit-ntk importable (``pip install scikit-ntk``):
    python tests/data/gen_scikit_ntk.py

Arrays: for each input dimension ``d`` in ``dims``, inputs ``x_d{d}`` (6, d) and
``z_d{d}`` (3, d) whose rows have norms log-uniform in [0.01, 100] (in d = 1 they
include opposite signs, where scikit-ntk's gradient is NaN); for each case ``i``
(``depth[i]``, ``bias[i]``, ``dim[i]``): ``k[i]`` = k(x, x) (6, 6), ``kxz[i]`` =
k(x, z) (6, 3), ``diag[i]`` = diag(x) (6,) and ``grad[i]`` = d k(x, x) / d log(bias)
(6, 6), NaN where scikit-ntk gives NaN and everywhere for bias = 0.
"""
import pathlib

import numpy as np
from skntk import NeuralTangentKernel

rng = np.random.default_rng(15)
dims = [1, 3, 50]
out = {"dims": np.array(dims)}
for d in dims:
    for name, n in (("x", 6), ("z", 3)):
        u = rng.standard_normal((n, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        out[f"{name}_d{d}"] = u * np.exp(rng.uniform(np.log(0.01), np.log(100.0), (n, 1)))
depth, bias, dim, ks, kxzs, diags, grads = [], [], [], [], [], [], []
for L in range(1, 6):
    for b in (0.0, 0.3, 2.0):
        for d in dims:
            depth.append(L), bias.append(b), dim.append(d)
            x, z = out[f"x_d{d}"], out[f"z_d{d}"]
            kern = NeuralTangentKernel(L, bias=b)
            ks.append(kern(x)), kxzs.append(kern(x, z)), diags.append(kern.diag(x))
            grad = np.full((len(x), len(x)), np.nan)
            if b > 0:
                with np.errstate(divide="ignore", invalid="ignore"):
                    grad = kern(x, eval_gradient=True)[1][:, :, 0]
            grads.append(grad)
out.update(depth=np.array(depth), bias=np.array(bias), dim=np.array(dim), k=np.array(ks),
           kxz=np.array(kxzs), diag=np.array(diags), grad=np.array(grads))
np.savez_compressed(pathlib.Path(__file__).with_name("scikit_ntk_reference.npz"), **out)

"""Generates activations_nt.json: neural-tangents 0.6.5 kernels (float64) of small
networks with the activations of ntkit.layers.special and GELU's tanh approximation,
for tests/test_activations_extra.py. Run with the peer install:
    ~/.cache/ntkit-peers/nt/bin/python tests/data/gen_activations_nt.py

Each case: a list of layers [name, kwargs] (ntkit's reading in the test), the
inputs' name and neural-tangents' nngp and ntk of k(x1, x2) and k(x1, x1).

- ``Hermite`` cases use unit-variance pre-activations (inputs scaled to
  x.x / d = 1, Dense(W_std=1, b_std=0)), where neural-tangents' rule k^n is exact;
  ``hermite3_nonunit`` breaks that assumption (neural-tangents' value is then not
  the kernel of its own finite network; the test checks that ntkit's differs).
- ``gelu_tanh_numerical``: ElementwiseNumerical of jax.nn.gelu(approximate=True)
  (neural-tangents' ``Gelu(approximate=True)`` kernel is the exact GELU's, stored
  as ``gelu_tanh_nt_closed``).
"""
import json
import pathlib

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
from neural_tangents import stax

rng = np.random.default_rng(0)
D = 5
x_fc1 = rng.standard_normal((4, D))
x_fc2 = rng.standard_normal((3, D))


def unit(x):  # rows with x.x / d = 1
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True))


x_img1 = rng.standard_normal((3, 2, 4, 3))  # N C H W (ntkit's layout)
x_img2 = rng.standard_normal((2, 2, 4, 3))
INPUTS = {"fc": (x_fc1, x_fc2), "fc_unit": (unit(x_fc1), unit(x_fc2)),
          "img": (x_img1, x_img2)}


def nt_layer(name, kw):
    if name == "Dense":
        return stax.Dense(kw["out"], W_std=kw["w_std"], b_std=kw["b_std"])
    if name == "Conv":
        return stax.Conv(kw["out"], kw["kernel"], padding=kw["padding"].upper(),
                         W_std=kw["w_std"], b_std=kw["b_std"])
    if name == "Flatten":
        return stax.Flatten()
    if name == "GlobalAvgPool":
        return stax.GlobalAvgPool()
    if name == "Hermite":
        return stax.Hermite(kw["degree"])
    if name == "Polynomial":
        return stax.Polynomial(kw["coef"])
    if name == "Gabor":
        return stax.Gabor()
    if name == "SigmoidLike":
        return stax.Sigmoid_like()
    if name == "ExpNormalized":
        return stax.ExpNormalized(**kw)
    if name == "GeluTanhNumerical":
        return stax.ElementwiseNumerical(lambda t: jax.nn.gelu(t, approximate=True),
                                         deg=kw["deg"])
    if name == "GeluTanh":
        return stax.Gelu(approximate=True)
    raise KeyError(name)


def dense(out, w_std=1.5, b_std=0.2):
    return ["Dense", {"out": out, "w_std": w_std, "b_std": b_std}]


def mlp(act, **kw):
    return [dense(7, **kw), act, dense(6, **kw), act, dense(1, **kw)]


unit_dense = {"w_std": 1.0, "b_std": 0.0}
CASES = {
    **{f"hermite{n}": ("fc_unit", mlp(["Hermite", {"degree": n}], **unit_dense))
       for n in (0, 1, 2, 3, 5)},
    "hermite3_nonunit": ("fc", mlp(["Hermite", {"degree": 3}])),
    "polynomial_cubic": ("fc", mlp(["Polynomial", {"coef": [0.1, 1.0, -0.3, 0.2]}])),
    "polynomial_constant": ("fc", mlp(["Polynomial", {"coef": [0.5]}])),
    "polynomial_quartic": ("fc", mlp(["Polynomial", {"coef": [0.0, -0.4, 0.0, 0.0, 0.1]}],
                                     w_std=1.1, b_std=0.1)),
    "gabor": ("fc", mlp(["Gabor", {}])),
    "sigmoid_like": ("fc", mlp(["SigmoidLike", {}])),
    "exp_normalized": ("fc", mlp(["ExpNormalized", {}])),
    "exp_normalized_clip": ("fc", mlp(["ExpNormalized", {"gamma": 0.5, "shift": -0.5,
                                                         "do_clip": True}])),
    "gelu_tanh_numerical": ("fc", mlp(["GeluTanhNumerical", {"deg": 101}])),
    "gelu_tanh_nt_closed": ("fc", mlp(["GeluTanh", {}])),
    "cnn_gabor_flatten": ("img", [
        ["Conv", {"out": 4, "kernel": [2, 2], "padding": "same", "w_std": 1.3, "b_std": 0.2}],
        ["Gabor", {}],
        ["Conv", {"out": 4, "kernel": [3, 2], "padding": "valid", "w_std": 1.2, "b_std": 0.1}],
        ["Gabor", {}], ["Flatten", {}], dense(1)]),
    "cnn_exp_normalized_gap": ("img", [
        ["Conv", {"out": 4, "kernel": [2, 2], "padding": "same", "w_std": 1.3, "b_std": 0.2}],
        ["ExpNormalized", {"gamma": 0.8, "shift": -0.7}],
        ["Conv", {"out": 4, "kernel": [2, 2], "padding": "same", "w_std": 1.2, "b_std": 0.1}],
        ["Polynomial", {"coef": [0.1, 1.0, 0.2]}], ["GlobalAvgPool", {}], dense(1)]),
}


def to_nt(x):
    return np.moveaxis(x, 1, -1) if x.ndim > 2 else x


out = {"inputs": {k: [a.tolist(), b.tolist()] for k, (a, b) in INPUTS.items()}, "cases": {}}
for name, (inputs, layers) in CASES.items():
    _, _, kernel_fn = stax.serial(*[nt_layer(n, kw) for n, kw in layers])
    x1, x2 = (to_nt(x) for x in INPUTS[inputs])
    cross = kernel_fn(x1, x2, ("nngp", "ntk"))
    same = kernel_fn(x1, None, ("nngp", "ntk"))
    out["cases"][name] = {
        "inputs": inputs, "layers": layers,
        "nngp": np.asarray(cross.nngp).tolist(), "ntk": np.asarray(cross.ntk).tolist(),
        "nngp_same": np.asarray(same.nngp).tolist(), "ntk_same": np.asarray(same.ntk).tolist(),
    }
    print(name, np.asarray(cross.nngp).ravel()[:3])
path = pathlib.Path(__file__).with_name("activations_nt.json")
path.write_text(json.dumps(out))

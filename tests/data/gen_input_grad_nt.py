"""Generates input_grad_nt.npz: neural-tangents 0.6.5 gradients (float64) of kernels in
their first input, ``d/dx1 sum(W * k(x1, x2))`` for the NNGP and the NTK, by
``jax.grad`` of ``kernel_fn``, for tests/test_input_grad.py. Run with the peer install:
    ~/.cache/ntkit-peers/nt/bin/python tests/data/gen_input_grad_nt.py

Networks (ntkit's reading in the test's ``NETS``):
- ``mlp_<act>``: Dense(8, 1.5, 0.1) -> act -> Dense(8, 1.5, 0.1) -> act -> Dense(1),
  act in Relu, Erf, Gelu, Abs, LeakyRelu(0.1);
- ``mlp0_relu``: the same with b_std = 0 in the first layer (zero inputs then have
  zero variance at the first Relu);
- ``cnn``: Conv(4, (3, 3), SAME, 1.4, 0.1) -> Relu -> AvgPool((2, 2), strides=(2, 2))
  -> Conv(4, (2, 2), VALID, 1.3, 0.2) -> Relu -> GlobalAvgPool -> Dense(1, 1.1, 0.1)
  (stax's AvgPool strides default to 1, torch's to the window);
- ``cnn0``: the same with b_std = 0 in the first Conv (windows over the zero rows of
  the ``img_zero`` inputs have zero variance).

Modes: ``cross`` = d/dx1 of k(x1, x2); ``self`` = d/dx of k(x, None) (the gradient
through both slots); ``copy`` = d/dx1 of k(x1, x2) at x2 equal to x1 (one slot; all
self-pairs at correlation 1). Arrays: ``x_<inputs>``, ``w_<shape>``, and per case
``<net>-<inputs>-<mode>-{nngp,ntk}`` (inputs in PyTorch layout: NCHW images,
transposed to NHWC for neural-tangents and the gradients transposed back).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
from neural_tangents import stax

rng = np.random.default_rng(0)
fc1, fc2 = rng.standard_normal((5, 6)), rng.standard_normal((4, 6))
fc_zero = fc1.copy()
fc_zero[2] = 0.0
img1, img2 = rng.standard_normal((3, 2, 6, 6)), rng.standard_normal((2, 2, 6, 6))
img_zero = img1.copy()
img_zero[:, :, :2] = 0.0  # the top two rows: windows of the first row see only zeros
INPUTS = {"fc": (fc1, fc2), "fc_zero": (fc_zero, fc2), "img": (img1, img2),
          "img_zero": (img_zero, img2)}


def mlp(act, b0=0.1):
    return stax.serial(stax.Dense(8, W_std=1.5, b_std=b0), act,
                       stax.Dense(8, W_std=1.5, b_std=0.1), act, stax.Dense(1))


def cnn(b0=0.1):
    return stax.serial(
        stax.Conv(4, (3, 3), padding="SAME", W_std=1.4, b_std=b0), stax.Relu(),
        stax.AvgPool((2, 2), strides=(2, 2)),
        stax.Conv(4, (2, 2), padding="VALID", W_std=1.3, b_std=0.2), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1, W_std=1.1, b_std=0.1))


NETS = {
    "mlp_relu": mlp(stax.Relu()), "mlp_erf": mlp(stax.Erf()), "mlp_gelu": mlp(stax.Gelu()),
    "mlp_abs": mlp(stax.Abs()), "mlp_leaky": mlp(stax.LeakyRelu(0.1)),
    "mlp0_relu": mlp(stax.Relu(), b0=0.0), "cnn": cnn(), "cnn0": cnn(b0=0.0),
}
CASES = [(net, inputs, mode)
         for net, inputs in [("mlp_relu", "fc"), ("mlp_erf", "fc"), ("mlp_gelu", "fc"),
                             ("mlp_abs", "fc"), ("mlp_leaky", "fc"), ("mlp0_relu", "fc_zero"),
                             ("cnn", "img"), ("cnn0", "img_zero")]
         for mode in ("cross", "self", "copy")]


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def nchw(g):
    return np.transpose(np.asarray(g), (0, 3, 1, 2)) if g.ndim == 4 else np.asarray(g)


def input_grad(kernel_fn, w, x1, x2, get, mode):
    """d/dx1 sum(w * k(x1, .)) with the second argument given by ``mode``."""
    second = {"cross": lambda a: x2, "self": lambda a: None, "copy": lambda a: x1}[mode]
    return np.asarray(jax.grad(lambda a: jnp.sum(w * kernel_fn(a, second(a), get)))(x1))


out = {f"x_{name}_{i}": x for name, pair in INPUTS.items() for i, x in zip((1, 2), pair)}
weights = {}
for net, inputs, mode in CASES:
    kernel_fn = NETS[net][2]
    x1, x2 = (nhwc(x) for x in INPUTS[inputs])
    n2 = x2.shape[0] if mode == "cross" else x1.shape[0]
    key = f"w_{x1.shape[0]}x{n2}"
    if key not in weights:
        weights[key] = rng.standard_normal((x1.shape[0], n2))
    w = weights[key]
    for get in ("nngp", "ntk"):
        g = input_grad(kernel_fn, w, x1, x2, get, mode)
        assert np.isfinite(g).all(), (net, inputs, mode, get)
        out[f"{net}-{inputs}-{mode}-{get}"] = nchw(g)
out.update(weights)
path = pathlib.Path(__file__).with_name("input_grad_nt.npz")
np.savez_compressed(path, **out)
print(f"wrote {path} ({len(out)} arrays)")

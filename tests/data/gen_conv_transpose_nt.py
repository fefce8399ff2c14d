"""Generates conv_transpose_nt.json: neural-tangents 0.6.5 kernels (float64) of
Conv(SAME) -> Relu -> ConvTranspose -> Relu -> Flatten -> Dense, for
tests/test_conv_transpose.py. Run with the peer install:
    $(../shared/peers/install-neural-tangents) tests/data/gen_conv_transpose_nt.py
"""
import json
import pathlib

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
from neural_tangents import stax

rng = np.random.default_rng(0)
x = rng.standard_normal((3, 2, 5, 4))  # N C H W (ntkit's layout)
xt = np.transpose(x, (0, 2, 3, 1))  # neural-tangents' NHWC
out = {"x": x.tolist(), "cases": []}
for k, s, pad in [((3, 2), (2, 1), "VALID"), ((2, 3), (2, 2), "VALID"), ((2, 2), (3, 1), "VALID"),
                  ((3, 2), (2, 1), "SAME"), ((2, 2), (2, 2), "SAME"), ((3, 3), (1, 1), "SAME"),
                  ((3, 3), (2, 2), "SAME"), ((4, 2), (3, 3), "SAME")]:
    for param in ["ntk", "standard"]:
        _, _, kf = stax.serial(
            stax.Conv(4, (2, 2), padding="SAME", W_std=1.3, b_std=0.2, parameterization=param),
            stax.Relu(),
            stax.ConvTranspose(5, k, strides=s, padding=pad, W_std=1.4, b_std=0.3,
                               parameterization=param),
            stax.Relu(), stax.Flatten(), stax.Dense(1, W_std=1.1, b_std=0.1,
                                                    parameterization=param))
        kk = kf(xt, None, ("nngp", "ntk"))
        out["cases"].append({"kernel_size": k, "stride": s, "padding": pad.lower(),
                             "parameterization": param, "nngp": np.asarray(kk.nngp).tolist(),
                             "ntk": np.asarray(kk.ntk).tolist()})
path = pathlib.Path(__file__).with_name("conv_transpose_nt.json")
path.write_text(json.dumps(out))

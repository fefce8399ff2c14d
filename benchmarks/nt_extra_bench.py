"""neural-tangents (JAX) timings of the workloads that the peers' nt_bench.py lacks:
graph aggregation, transposed and unshared (locally connected) convolutions, each
convolution workload with a Flatten and with a GlobalAvgPool readout ("_gap"). One
JSON line per case, like nt_bench.py; run with the neural-tangents python by
benchmarks/run.py (the "ntx" runner):

    ~/.cache/ntkit-peers/nt/bin/python benchmarks/nt_extra_bench.py graph [--reps N]

The workloads are the same as ntkit's in run.py (same shapes and hyperparameters;
neural-tangents' layout NHWC / NVC, and its dense pattern is the transpose of ntkit's).
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", False)
from neural_tangents import stax

args = sys.argv[1:]
REPS = 3
if "--reps" in args:
    i = args.index("--reps")
    REPS = int(args[i + 1])
    del args[i:i + 2]
cases = args or ["graph", "conv_transpose", "conv_local", "conv_transpose_gap",
                 "conv_local_gap"]
rng = np.random.default_rng(0)


def timeit(fn):
    jax.block_until_ready(fn())  # compile / warm-up
    ts = []
    for _ in range(REPS):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return min(ts)


if "graph" in cases:
    # 200 graphs of 30 nodes, 8 features; random weighted patterns with self loops;
    # [Dense(64) over channels, Relu, Aggregate] x 2 + GlobalSumPool + Dense(1)
    n, v, c = 200, 30, 8
    x = jnp.asarray(rng.standard_normal((n, v, c)), jnp.float32)
    a = (rng.random((n, v, v)) < 0.2) + np.eye(v)
    a = jnp.asarray(np.transpose(a, (0, 2, 1)), jnp.float32)  # neural-tangents' x @ A
    agg = lambda: stax.Aggregate(aggregate_axis=1, batch_axis=0, channel_axis=-1)
    _, _, kfn = stax.serial(stax.Dense(64, W_std=1.4, b_std=0.1), stax.Relu(), agg(),
                            stax.Dense(64, W_std=1.4, b_std=0.1), stax.Relu(), agg(),
                            stax.GlobalSumPool(), stax.Dense(1))
    kfn = jax.jit(kfn, static_argnames="get")
    t = timeit(lambda: kfn(x, x, ("nngp", "ntk"), pattern=(a, a)))
    print(json.dumps({"case": "graph_gcn2_N200_V30_ntk", "seconds": t}))
for gap in (False, True):
    suffix = "_gap" if gap else ""
    readout = stax.GlobalAvgPool() if gap else stax.Flatten()
    if "conv_transpose" + suffix in cases:
        # 64 images 3 x 8 x 8: ConvTranspose(64, 3x3, stride 2, SAME) -> 16 x 16, Relu,
        # Conv(64, 3x3, SAME), Relu, Flatten (or GlobalAvgPool), Dense(1)
        x = jnp.asarray(rng.standard_normal((64, 8, 8, 3)), jnp.float32)
        _, _, kfn = stax.serial(
            stax.ConvTranspose(64, (3, 3), strides=(2, 2), padding="SAME", W_std=1.4,
                               b_std=0.1),
            stax.Relu(), stax.Conv(64, (3, 3), padding="SAME", W_std=1.4, b_std=0.1),
            stax.Relu(), readout, stax.Dense(1))
        kfn = jax.jit(kfn, static_argnames="get")
        t = timeit(lambda: kfn(x, x, ("nngp", "ntk")))
        print(json.dumps({"case": f"conv_transpose{suffix}_N64_8x8x3_s2_ntk", "seconds": t}))
    if "conv_local" + suffix in cases:
        # 64 images 3 x 16 x 16: Conv(64, 3x3, SAME), Relu, ConvLocal(64, 3x3, SAME), Relu,
        # Flatten (or GlobalAvgPool), Dense(1)
        x = jnp.asarray(rng.standard_normal((64, 16, 16, 3)), jnp.float32)
        _, _, kfn = stax.serial(
            stax.Conv(64, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
            stax.ConvLocal(64, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
            readout, stax.Dense(1))
        kfn = jax.jit(kfn, static_argnames="get")
        t = timeit(lambda: kfn(x, x, ("nngp", "ntk")))
        print(json.dumps({"case": f"conv_local{suffix}_N64_16x16x3_ntk", "seconds": t}))

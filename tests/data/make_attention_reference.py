"""Writes the neural-tangents reference kernels of self-attention: tests/data/attention_*.npz.

Run with the peer's python (neural-tangents 0.6.5, JAX 0.4.30), not ntkit's::

    ~/.cache/ntkit-peers/nt/bin/python tests/data/make_attention_reference.py

Each case is a `stax` network built around `stax.GlobalSelfAttention`; its ntkit twin
is in tests/test_attention.py (`REFERENCE_NETS`), keep both in sync. Inputs are drawn in
PyTorch layout, channels first ((N, C, L) or (N, C, H, W)), and moved to neural-tangents'
channels-last layout for the call. Arrays in each file (float64):

- ``x1``, ``x2``: the inputs, channels first;
- ``nngp``, ``ntk``: k(x1, x2), ``(N1, N2)`` (the networks end with a Dense readout);
- ``nngp_11``, ``ntk_11``: k(x1, x1);
- for 1-d inputs, ``nngp_attn``, ``ntk_attn``: k(x1, x2) right after the first attention
  layer, between every pair of positions, ``(N1, N2, L, L)``;
- ``spec``: the stax architecture as JSON, ``[[name, kwargs], ...]`` (decay functions by
  the names of `DECAYS`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
# Linear scaling ties query and key weights; neural-tangents warns about it at every call.
warnings.filterwarnings("ignore", message="Linear scaling attention used")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

OUT = Path(__file__).parent


#: Positional-embedding decay functions by name (the same names map to torch functions in
#: tests/test_attention.py).
DECAYS = {"exp(-d/3)": lambda d: jnp.exp(-d / 3), "exp(-d/2)": lambda d: jnp.exp(-d / 2)}

#: name -> (layers as [stax name, kwargs], x1 shape, x2 shape, index of the first attention).
CASES = {
    # Softmax, 1/n_key scaling, two attention layers with different scales, biases.
    "attention_softmax_seq": (
        [
            ["Conv", dict(out_chan=16, filter_shape=(3,), padding="SAME", W_std=1.3, b_std=0.2)],
            ["GlobalSelfAttention", dict(
                n_chan_out=16, n_chan_key=16, n_chan_val=16, n_heads=2, linear_scaling=True,
                W_key_std=1.2, W_query_std=0.9, W_value_std=1.1, W_out_std=0.8, b_std=0.3,
                attention_mechanism="SOFTMAX")],
            ["Relu", {}],
            ["GlobalSelfAttention", dict(
                n_chan_out=16, n_chan_key=16, n_chan_val=16, n_heads=2, linear_scaling=True,
                W_key_std=1.5, W_value_std=1.2, b_std=None, attention_mechanism="SOFTMAX")],
            ["GlobalAvgPool", {}],
            ["Dense", dict(out_dim=1, W_std=1.0, b_std=0.1)],
        ],
        (4, 3, 6), (3, 3, 6), 1,
    ),
    # Identity mechanism, 1/sqrt(n_key) scaling (Gaussian logits), summed positional
    # embeddings with covariance exp(-|p - q| / 3) in the keys and queries only.
    "attention_identity_posemb_seq": (
        [
            ["Conv", dict(out_chan=16, filter_shape=(1,), W_std=1.1, b_std=0.3)],
            ["GlobalSelfAttention", dict(
                n_chan_out=16, n_chan_key=16, n_chan_val=16, n_heads=4, linear_scaling=False,
                W_key_std=0.9, W_query_std=1.1, W_value_std=1.2, W_out_std=0.9, b_std=0.2,
                attention_mechanism="IDENTITY", pos_emb_type="SUM", W_pos_emb_std=0.7,
                pos_emb_p_norm=1, pos_emb_decay_fn="exp(-d/3)")],
            ["Relu", {}],
            ["GlobalAvgPool", {}],
            ["Dense", dict(out_dim=1, W_std=1.2, b_std=0.1)],
        ],
        (4, 2, 5), (3, 2, 5), 1,
    ),
    # Softmax straight on the inputs (input NTK zero), independent embeddings per position
    # (R = I) added to keys, queries and values.
    "attention_softmax_posemb_values_input": (
        [
            ["GlobalSelfAttention", dict(
                n_chan_out=8, n_chan_key=8, n_chan_val=8, n_heads=1, linear_scaling=True,
                W_key_std=1.4, b_std=0.1, attention_mechanism="SOFTMAX", pos_emb_type="SUM",
                W_pos_emb_std=0.8, val_pos_emb=True)],
            ["Erf", {}],
            ["GlobalAvgPool", {}],
            ["Dense", dict(out_dim=1, W_std=1.0, b_std=0.2)],
        ],
        (3, 4, 5), (2, 4, 5), 0,
    ),
    # Images: positions of (H, W) flattened; abs mechanism, Gaussian-decay embeddings
    # (p = 2 over both axes) in the values too.
    "attention_abs_posemb_2d": (
        [
            ["Conv", dict(out_chan=8, filter_shape=(2, 2), padding="SAME", W_std=1.2, b_std=0.1)],
            ["GlobalSelfAttention", dict(
                n_chan_out=8, n_chan_key=8, n_chan_val=8, n_heads=2, linear_scaling=True,
                W_key_std=0.8, W_out_std=1.1, b_std=0.2, attention_mechanism="ABS",
                pos_emb_type="SUM", W_pos_emb_std=0.6, pos_emb_p_norm=2,
                pos_emb_decay_fn="exp(-d/2)", val_pos_emb=True)],
            ["Relu", {}],
            ["GlobalAvgPool", {}],
            ["Dense", dict(out_dim=1, W_std=1.0, b_std=0.1)],
        ],
        (3, 2, 3, 4), (2, 2, 3, 4), 1,
    ),
}


def stax_layer(name: str, kw: dict):
    kw = dict(kw)
    if "pos_emb_decay_fn" in kw:
        kw["pos_emb_decay_fn"] = DECAYS[kw["pos_emb_decay_fn"]]
    return getattr(stax, name)(**kw)


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def main() -> None:
    rng = np.random.RandomState(2020)
    for name, (spec, shape1, shape2, first_attention) in CASES.items():
        x1 = rng.randn(*shape1)
        x2 = rng.randn(*shape2)
        layers = [stax_layer(n, kw) for n, kw in spec]
        _, _, kernel_fn = stax.serial(*layers)
        k12 = kernel_fn(channels_last(x1), channels_last(x2), ("nngp", "ntk"))
        k11 = kernel_fn(channels_last(x1), None, ("nngp", "ntk"))
        arrays = dict(x1=x1, x2=x2, nngp=k12.nngp, ntk=k12.ntk, nngp_11=k11.nngp,
                      ntk_11=k11.ntk, spec=np.array(json.dumps(spec)))
        if len(shape1) == 3:
            _, _, prefix_fn = stax.serial(*layers[:first_attention + 1])
            kp = prefix_fn(channels_last(x1), channels_last(x2), ("nngp", "ntk"))
            assert kp.nngp.shape == (shape1[0], shape2[0], shape1[2], shape1[2]), kp.nngp.shape
            arrays.update(nngp_attn=kp.nngp, ntk_attn=kp.ntk)
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        np.savez(OUT / f"{name}.npz", **arrays)
        print(name, {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()

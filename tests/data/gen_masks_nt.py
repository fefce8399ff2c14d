"""Writes tests/data/masks_nt.npz: neural-tangents 0.6.5 kernels (float64) of masked,
variable-length inputs, for tests/test_masks.py.

Run with the peer's python (neural-tangents 0.6.5, JAX), not ntkit's::

    ~/.cache/ntkit-peers/nt/bin/python tests/data/gen_masks_nt.py

neural-tangents takes masks through ``mask_constant``: input entries equal to it are
masked (zeroed, and the position is absent). Every channel of an absent position is set
to NaN here and ``mask_constant=nan`` is passed, so that the mask is per position, as
ntkit's ``mask=`` is (True where present, the opposite of neural-tangents' convention).
Inputs are drawn channels first (ntkit's layout) and moved to channels last for the call.

Arrays, per case ``<name>``: ``<name>/x1``, ``<name>/x2`` (inputs, absent positions
zero), ``<name>/m1``, ``<name>/m2`` (ntkit masks, True = present), ``<name>/nngp``,
``<name>/ntk`` (k(x1, x2)), ``<name>/nngp_11``, ``<name>/ntk_11`` (k(x1, x1)), and
``<name>/spec`` (the stax layers as JSON, mirrored in tests/test_masks.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
warnings.filterwarnings("ignore", message="Linear scaling attention used")

import numpy as np
from jax import numpy as jnp
from neural_tangents import stax

OUT = Path(__file__).with_name("masks_nt.npz")
DECAYS = {"exp(-d/3)": lambda d: jnp.exp(-d / 3)}

#: name -> (stax layers [name, kwargs], x1 shape, x2 shape, lengths of x1, lengths of x2).
#: Lengths are per example (1-d) or (height, width) of the present top-left block (2-d).
CASES = {
    # Conv1d + ReLU + GlobalAvgPool + Dense: the sequence case.
    "conv_gap": (
        [["Conv", dict(out_chan=8, filter_shape=(3,), padding="SAME", W_std=1.3, b_std=0.2)],
         ["Relu", {}],
         ["Conv", dict(out_chan=8, filter_shape=(3,), padding="SAME", W_std=1.1, b_std=0.3)],
         ["Relu", {}],
         ["GlobalAvgPool", {}],
         ["Dense", dict(out_dim=1, W_std=1.2, b_std=0.1)]],
        (4, 3, 7), (3, 3, 7), [7, 3, 5, 1], [2, 6, 4],
    ),
    # Strided and VALID convolutions (the output mask follows the window centres),
    # average pooling, a sum readout.
    "conv_strided_pool_gsp": (
        [["Conv", dict(out_chan=8, filter_shape=(3,), strides=(2,), padding="SAME", W_std=1.2,
                       b_std=0.1)],
         ["Erf", {}],
         ["Conv", dict(out_chan=8, filter_shape=(2,), padding="VALID", W_std=1.4, b_std=0.2)],
         ["Relu", {}],
         ["AvgPool", dict(window_shape=(2,), strides=(1,), padding="VALID")],
         ["GlobalSumPool", {}],
         ["Dense", dict(out_dim=1, W_std=0.9, b_std=0.1)]],
        (3, 2, 9), (2, 2, 9), [9, 4, 6], [5, 8],
    ),
    # Flatten: absent positions contribute zeros to the mean over positions.
    "conv_flatten": (
        [["Conv", dict(out_chan=8, filter_shape=(3,), padding="SAME", W_std=1.3, b_std=0.4)],
         ["Relu", {}],
         ["Flatten", {}],
         ["Dense", dict(out_dim=1, W_std=1.0, b_std=0.1)]],
        (3, 2, 6), (2, 2, 6), [6, 2, 4], [3, 5],
    ),
    # Images of different sizes in one batch.
    "conv2d_gap": (
        [["Conv", dict(out_chan=8, filter_shape=(2, 2), padding="SAME", W_std=1.2, b_std=0.2)],
         ["Relu", {}],
         ["GlobalAvgPool", {}],
         ["Dense", dict(out_dim=1, W_std=1.0, b_std=0.1)]],
        (3, 2, 4, 5), (2, 2, 4, 5), [(4, 5), (2, 3), (3, 2)], [(1, 4), (4, 4)],
    ),
    # Softmax attention (1/n_key scaling): absent keys leave the softmax.
    "attention_softmax": (
        [["Conv", dict(out_chan=8, filter_shape=(1,), W_std=1.2, b_std=0.1)],
         ["GlobalSelfAttention", dict(
             n_chan_out=8, n_chan_key=8, n_chan_val=8, n_heads=2, linear_scaling=True,
             W_key_std=1.4, W_query_std=0.9, W_value_std=1.1, W_out_std=0.8, b_std=0.3,
             attention_mechanism="SOFTMAX")],
         ["Relu", {}],
         ["GlobalAvgPool", {}],
         ["Dense", dict(out_dim=1, W_std=1.0, b_std=0.1)]],
        (4, 3, 6), (3, 3, 6), [6, 2, 4, 1], [3, 5, 6],
    ),
    # Softmax with independent positional embeddings (R = I) in keys, queries and values.
    "attention_softmax_posemb": (
        [["Conv", dict(out_chan=8, filter_shape=(3,), padding="SAME", W_std=1.1, b_std=0.2)],
         ["GlobalSelfAttention", dict(
             n_chan_out=8, n_chan_key=8, n_chan_val=8, n_heads=1, linear_scaling=True,
             W_key_std=1.3, b_std=0.1, attention_mechanism="SOFTMAX", pos_emb_type="SUM",
             W_pos_emb_std=0.8, val_pos_emb=True)],
         ["Erf", {}],
         ["GlobalAvgPool", {}],
         ["Dense", dict(out_dim=1, W_std=1.0, b_std=0.2)]],
        (3, 2, 5), (2, 2, 5), [5, 2, 3], [4, 1],
    ),
    # Identity mechanism, 1/sqrt(n_key) scaling, decaying embeddings in keys and queries.
    "attention_identity_posemb": (
        [["Conv", dict(out_chan=8, filter_shape=(1,), W_std=1.1, b_std=0.3)],
         ["GlobalSelfAttention", dict(
             n_chan_out=8, n_chan_key=8, n_chan_val=8, n_heads=4, linear_scaling=False,
             W_key_std=0.9, W_query_std=1.1, W_value_std=1.2, W_out_std=0.9, b_std=0.2,
             attention_mechanism="IDENTITY", pos_emb_type="SUM", W_pos_emb_std=0.7,
             pos_emb_p_norm=1, pos_emb_decay_fn="exp(-d/3)")],
         ["Relu", {}],
         ["GlobalAvgPool", {}],
         ["Dense", dict(out_dim=1, W_std=1.2, b_std=0.1)]],
        (3, 2, 5), (2, 2, 5), [5, 3, 2], [1, 4],
    ),
    # Relu attention: absent keys get weight zero.
    "attention_relu": (
        [["Conv", dict(out_chan=8, filter_shape=(2,), padding="SAME", W_std=1.0, b_std=0.2)],
         ["GlobalSelfAttention", dict(
             n_chan_out=8, n_chan_key=8, n_chan_val=8, n_heads=2, linear_scaling=True,
             W_key_std=1.1, b_std=0.2, attention_mechanism="RELU")],
         ["Relu", {}],
         ["GlobalAvgPool", {}],
         ["Dense", dict(out_dim=1, W_std=1.0, b_std=0.1)]],
        (3, 2, 6), (2, 2, 6), [6, 3, 4], [2, 5],
    ),
}


def stax_layer(name: str, kw: dict):
    kw = dict(kw)
    if "pos_emb_decay_fn" in kw:
        kw["pos_emb_decay_fn"] = DECAYS[kw["pos_emb_decay_fn"]]
    return getattr(stax, name)(**kw)


def present(shape, lengths) -> np.ndarray:
    """ntkit masks (N, *spatial), True where present: a prefix (1-d) or a top-left block."""
    n, _, *spatial = shape
    m = np.zeros((n, *spatial), dtype=bool)
    for i, ln in enumerate(lengths):
        if len(spatial) == 1:
            m[i, :ln] = True
        else:
            m[i, :ln[0], :ln[1]] = True
    return m


def main() -> None:
    rng = np.random.RandomState(15)
    arrays = {}
    for name, (spec, shape1, shape2, len1, len2) in CASES.items():
        m1, m2 = present(shape1, len1), present(shape2, len2)
        x1 = rng.randn(*shape1) * m1[:, None]
        x2 = rng.randn(*shape2) * m2[:, None]

        def nt_input(x, m):  # channels last, absent positions marked by NaN
            return np.moveaxis(np.where(m[:, None], x, np.nan), 1, -1)

        _, _, kernel_fn = stax.serial(*[stax_layer(n, kw) for n, kw in spec])
        k12 = kernel_fn(nt_input(x1, m1), nt_input(x2, m2), ("nngp", "ntk"),
                        mask_constant=np.nan)
        k11 = kernel_fn(nt_input(x1, m1), None, ("nngp", "ntk"), mask_constant=np.nan)
        case = dict(x1=x1, x2=x2, m1=m1, m2=m2, nngp=k12.nngp, ntk=k12.ntk,
                    nngp_11=k11.nngp, ntk_11=k11.ntk, spec=np.array(json.dumps(spec)))
        for key, value in case.items():
            arrays[f"{name}/{key}"] = np.asarray(value)
        assert np.isfinite(np.asarray(k12.ntk)).all() and np.isfinite(np.asarray(k11.ntk)).all()
        print(name, np.asarray(k12.nngp).ravel()[:3])
    np.savez(OUT, **arrays)


if __name__ == "__main__":
    main()

"""Writes tests/data/transformer_nt.npz: neural-tangents 0.6.5 kernels (float64) of
transformer encoder blocks where ntkit's and neural-tangents' conventions coincide
(GlobalSelfAttention with the 1/n_key linear scaling and tied keys: ntkit's
SelfAttention), inside full blocks: residual sums, LayerNorm over channels, a
position-wise MLP, post-LN and pre-LN, with and without a padding mask.

Run with the peer's python (neural-tangents 0.6.5, JAX), not ntkit's::

    ~/.cache/ntkit-peers/nt/bin/python tests/data/gen_transformer_nt.py

Masks follow tests/data/gen_masks_nt.py: every channel of an absent position is NaN
and ``mask_constant=nan``. Inputs are drawn channels first (ntkit's layout) and moved
to channels last for the call. Arrays per case ``<name>``: ``x1``, ``x2``, ``m1``,
``m2`` (True = present), ``nngp``, ``ntk`` (k(x1, x2)), ``nngp_11``, ``ntk_11``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
warnings.filterwarnings("ignore", message="Linear scaling attention used")

import numpy as np
from neural_tangents import stax

OUT = Path(__file__).with_name("transformer_nt.npz")
D, FF, HEADS, EPS = 16, 32, 2, 1e-12


def block(norm_first: bool):
    attn = stax.GlobalSelfAttention(
        n_chan_out=D, n_chan_key=D // HEADS, n_chan_val=D // HEADS, n_heads=HEADS,
        linear_scaling=True, W_key_std=1.3, W_value_std=1.1, W_query_std=0.9, W_out_std=1.0,
        b_std=0.1, attention_mechanism="SOFTMAX")
    mlp = stax.serial(stax.Conv(FF, (1,), W_std=1.4, b_std=0.2), stax.Relu(),
                      stax.Conv(D, (1,), W_std=1.2, b_std=0.1))
    ln = stax.LayerNorm(axis=-1, eps=EPS)
    if norm_first:
        return stax.serial(
            stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(ln, attn)),
            stax.FanInSum(),
            stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(ln, mlp)),
            stax.FanInSum())
    return stax.serial(
        stax.FanOut(2), stax.parallel(stax.Identity(), attn), stax.FanInSum(), ln,
        stax.FanOut(2), stax.parallel(stax.Identity(), mlp), stax.FanInSum(), ln)


def network(norm_first: bool):
    return stax.serial(stax.Conv(D, (1,), W_std=1.5, b_std=0.3), block(norm_first),
                       block(norm_first), stax.GlobalAvgPool(), stax.Dense(1, W_std=1.0))


CASES = {  # name -> (norm_first, lengths of x1 or None, lengths of x2 or None)
    "post_ln": (False, None, None),
    "pre_ln": (True, None, None),
    "post_ln_masked": (False, [6, 3, 5], [2, 6]),
}


def main() -> None:
    rng = np.random.default_rng(17)
    out = {}
    for name, (norm_first, l1, l2) in CASES.items():
        x1 = rng.standard_normal((3, 4, 6))
        x2 = rng.standard_normal((2, 4, 6))
        m1 = np.ones((3, 6), bool) if l1 is None else np.arange(6)[None] < np.array(l1)[:, None]
        m2 = np.ones((2, 6), bool) if l2 is None else np.arange(6)[None] < np.array(l2)[:, None]
        x1, x2 = x1 * m1[:, None], x2 * m2[:, None]

        def nt_input(x, m):
            return np.moveaxis(np.where(m[:, None], x, np.nan), 1, -1)

        _, _, kernel_fn = network(norm_first)
        kw = {} if l1 is None else {"mask_constant": np.nan}
        a, b = (nt_input(x1, m1), nt_input(x2, m2)) if kw else (np.moveaxis(x1, 1, -1),
                                                                 np.moveaxis(x2, 1, -1))
        k12 = kernel_fn(a, b, ("nngp", "ntk"), **kw)
        k11 = kernel_fn(a, None, ("nngp", "ntk"), **kw)
        out.update({f"{name}/x1": x1, f"{name}/x2": x2, f"{name}/m1": m1, f"{name}/m2": m2,
                    f"{name}/nngp": np.asarray(k12.nngp), f"{name}/ntk": np.asarray(k12.ntk),
                    f"{name}/nngp_11": np.asarray(k11.nngp),
                    f"{name}/ntk_11": np.asarray(k11.ntk)})
    np.savez(OUT, **out)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Loads the neural-tangents reference cases of tests/data and builds ntkit twins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import ntkit as nk

DATA = Path(__file__).parent / "data"


def cases(kind: str = "kernel", prefix: str = "") -> list[dict]:
    spec = json.loads((DATA / "cases.json").read_text())
    return [c for c in spec["cases"] if c["kind"] == kind and c["name"].startswith(prefix)]


def arrays(name: str) -> dict[str, torch.Tensor]:
    with np.load(DATA / f"{name}.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


_NUMERICAL = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}


def layer(name: str, kw: dict) -> nk.Layer:
    """The ntkit counterpart of one stax layer (see tests/data/README.md)."""
    if name == "Dense":
        return nk.Linear(kw["out_dim"], w_std=kw.get("W_std", 1.0), b_std=kw.get("b_std", 0.0),
                         parameterization=kw.get("parameterization", "ntk"))
    simple = {"Relu": nk.ReLU, "Abs": nk.Abs, "Sign": nk.Sign, "Identity": nk.Identity,
              "FanInSum": nk.FanInSum, "FanInConcat": nk.FanInConcat, "Flatten": nk.Flatten}
    if name in simple:
        return simple[name]()
    if name == "Conv":
        return nk.Conv2d(kw["out_chan"], kw["filter_shape"], stride=kw.get("strides", 1),
                         padding=kw.get("padding", "VALID").lower(), w_std=kw.get("W_std", 1.0),
                         b_std=kw.get("b_std", 0.0),
                         parameterization=kw.get("parameterization", "ntk"))
    if name == "AvgPool":
        return nk.AvgPool2d(kw["window_shape"], stride=kw.get("strides"),
                            padding=kw.get("padding", "VALID").lower())
    if name == "GlobalAvgPool":
        return nk.GlobalAvgPool()
    if name == "LeakyRelu":
        return nk.LeakyReLU(kw["alpha"])
    if name == "Erf":
        return nk.Erf(**kw)
    if name == "Gelu":
        return nk.GELU()
    if name == "Sin":
        return nk.Sin(**kw)
    if name == "Rbf":
        return nk.Rbf(kw["gamma"])
    if name == "ElementwiseNumerical":
        return nk.Elementwise(_NUMERICAL[kw["fn"]], degree=kw["deg"])
    if name == "LayerNorm":
        return nk.LayerNorm(eps=1e-12)
    if name == "FanOut":
        return nk.FanOut(kw["num"])
    if name == "parallel":
        return nk.Parallel(*[network(b) for b in kw["branches"]])
    raise KeyError(f"no ntkit counterpart for stax layer {name}")


def network(layers: list) -> nk.Sequential:
    return nk.Sequential(*[layer(n, kw) for n, kw in layers])

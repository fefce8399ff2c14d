"""Writes tests/data/mup_reference.json: the `mup` package's (1.0.0) muP for a reference
MLP (nn.Linear(8, n), ReLU, nn.Linear(n, n), ReLU, MuReadout(n, 3); base width 64) at
widths 64, 256, 1024: each parameter's learning-rate multiplier under MuSGD and MuAdam,
the standard deviation of its initial values after ``set_base_shapes`` (times the
readout's forward multiplier ``1/width_mult`` for the readout), and the readout
multiplier. Run with ``pip install --no-deps mup`` (it needs only torch)."""

import json
from pathlib import Path

import torch
from mup import MuAdam, MuReadout, MuSGD, set_base_shapes
from torch import nn


def model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         MuReadout(width, 3))


def main() -> None:
    out = {"mup_version": "1.0.0", "base_width": 64, "widths": {}}
    for width in (64, 256, 1024):
        torch.manual_seed(0)  # the generator script's own draws; not the library's
        base, delta, net = model(64), model(128), model(width)
        set_base_shapes(net, base, delta=delta)
        names = [n for n, _ in net.named_parameters()]
        entry = {}
        for opt_name, opt in (("sgd", MuSGD), ("adam", MuAdam)):
            o = opt(net.parameters(), lr=1.0)
            lr = {}
            for g in o.param_groups:
                for p in g["params"]:
                    lr[next(n for n, q in net.named_parameters() if q is p)] = g["lr"]
            entry[f"lr_{opt_name}"] = [lr[n] for n in names]
        mult = net[4].output_mult / net[4].width_mult()
        entry["names"] = names
        entry["readout_multiplier"] = mult
        entry["weight_std"] = [float(net[i].weight.detach().std()) * (mult if i == 4 else 1.0)
                               for i in (0, 2, 4)]
        out["widths"][str(width)] = entry
    path = Path(__file__).with_name("mup_reference.json")
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

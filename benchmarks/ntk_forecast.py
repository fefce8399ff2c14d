"""Issue 18, build item 2: the NTK's forecast change at width n after t steps against
what `NTKTracker` measures on networks of that width.

Setup (the tests' setup, wider): 32 digits, parity labels +-1, full-batch gradient
descent, lr 0.5, 100 steps, ntkit MLPs in NTK parameterization (w_std 1.4, b_std 0.1
in the hidden layers, readout w_std 1, b_std 0.1), float64. For each network:

- ``fit``: `ntk_change_forecast(exponent=None)`, the exponent fitted on the ladder (12
  seeds);
- ``asym``: the default, ``exponent="asymptotic"`` (`asymptotic_exponent`: 1 smooth, 3/4
  with a kink), its coefficient from the widest ladder width;
- ``measured``: the mean relative change of 6 networks of the target width, trained and
  tracked (`NTKTracker`) as the ladder's are (seeds unlike the ladder's), with its
  standard error.

Also the wall time of the forecast against the time the measurement took. Usage::

    OMP_NUM_THREADS=2 python benchmarks/ntk_forecast.py [--out benchmarks/ntk_forecast_results.md]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import ntkit as nk
from ntkit.datasets import load_digits
from ntkit.finite import ntk_change_forecast
from ntkit.finite.forecast import _relative_change

LR, STEPS, F64 = 0.5, 100, torch.float64


def mlp(act, depth, width=8):
    layers = []
    for _ in range(depth):
        layers += [nk.Linear(width, 1.4, 0.1), act]
    return nk.Sequential(*layers, nk.Linear(1, 1.0, 0.1))


def measure(net, x, y, seed):
    """One network's relative NTK change, trained as the forecast's ladder is (the
    tests train by hand; here the library's own loop, with `NTKTracker`, is the point)."""
    return _relative_change(net, x, y[:, None], x, width=net.layers[0].out_features, lr=LR,
                            steps=STEPS, seed=seed, dtype=F64)


CASES = [  # activation, depth, ladder, targets
    (nk.Erf(), 1, (128, 256, 512), (4096, 16384)),
    (nk.Tanh(), 1, (128, 256, 512), (4096, 16384)),
    (nk.ReLU(), 1, (128, 256, 512), (4096, 16384)),
    (nk.Abs(), 1, (128, 256, 512), (4096, 16384)),
    (nk.Tanh(), 2, (64, 128, 256), (1024, 2048)),
    (nk.ReLU(), 2, (64, 128, 256), (1024, 2048)),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    x, y = load_digits()
    x, y = x[:32], (y[:32] % 2).to(F64) * 2 - 1
    header = ("| activation | depth | ladder | width | fit (alpha) | asym (alpha) | measured "
              "(6 nets) | fit / measured | asym / measured | forecast s | measure s |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    load = os.getloadavg()[0]
    for act, depth, ladder, targets in CASES:
        net = mlp(act, depth)
        for width in targets:
            t0 = time.perf_counter()
            fit = ntk_change_forecast(net, x, y, width=width, lr=LR, steps=STEPS, widths=ladder,
                                      seeds=12, exponent=None)
            t_fc = time.perf_counter() - t0
            asym = ntk_change_forecast(net, x, y, width=width, lr=LR, steps=STEPS,
                                       widths=ladder, seeds=12, exponent="asymptotic")
            t0 = time.perf_counter()
            m = torch.tensor([measure(mlp(act, depth, width), x, y, 1000 + s)
                              for s in range(6)])
            t_m = time.perf_counter() - t0
            mean, se = float(m.mean()), float(m.std() / math.sqrt(len(m)))
            row = (f"| {act!r} | {depth} | {ladder[0]}-{ladder[-1]} | {width} | "
                   f"{fit.predicted:.3g} ({fit.exponent:.2f}) | "
                   f"{asym.predicted:.3g} ({asym.exponent:.2f}) | {mean:.3g} +- {se:.2g} | "
                   f"{fit.predicted / mean:.2f} | {asym.predicted / mean:.2f} | "
                   f"{t_fc:.1f} | {t_m:.1f} |")
            rows.append(row)
            print(row, flush=True)
    text = "\n".join(rows) + (f"\n\nload average at the start {load:.1f}, at the end "
                              f"{os.getloadavg()[0]:.1f}; OMP_NUM_THREADS="
                              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# ntk_change_forecast against NTKTracker (benchmarks/ntk_forecast.py)"
                     "\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()

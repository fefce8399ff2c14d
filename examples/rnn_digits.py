"""Digits as sequences: the recurrent NTK against a trained nn.RNN and an MLP's NTK.

scikit-learn's handwritten digits (8 x 8 images) are read as sequences of 8 rows
of 8 pixels, ``(N, 8 channels, 8 steps)``. Three classifiers, each fit on the same
1000 training images and scored on the other 797:

- the NTK of a 1-layer ReLU RNN read at the last step (`nk.RNN`, infinite width),
  by kernel regression on one-hot labels (``NTKRegressor`` with a spec string and
  ``input_shape``);
- a finite ``nn.RNN`` (ReLU, 256 hidden units, last step, + Linear), trained with
  Adam on cross-entropy;
- the NTK of a 2-hidden-layer ReLU MLP on the 64 pixels.

Run: ``python examples/rnn_digits.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import ntkit as nk
from ntkit.sklearn import NTKRegressor


def data(n_train: int = 1000):
    digits = load_digits()
    images = digits.images / 16.0                      # (N, 8 rows, 8 columns)
    x = images.transpose(0, 2, 1)                      # (N, C = 8 columns, L = 8 rows)
    x = (x - x.mean()) / x.std()
    y = digits.target
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def kernel_accuracy(architecture, input_shape, x_tr, y_tr, x_te, y_te) -> float:
    est = NTKRegressor(architecture, input_shape=input_shape, diag_reg=1e-4)
    est.fit(x_tr.reshape(len(x_tr), -1), np.eye(10)[y_tr])
    pred = est.predict(x_te.reshape(len(x_te), -1)).argmax(1)
    return float((pred == y_te).mean())


def trained_rnn_accuracy(x_tr, y_tr, x_te, y_te, *, epochs: int = 30, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = nn.Sequential(nk.TorchRNN(nn.RNN(8, 256, nonlinearity="relu", batch_first=True),
                                      readout="last"), nn.Linear(256, 10))
    xt = torch.tensor(x_tr, dtype=torch.float32)
    yt = torch.tensor(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(100):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = model(torch.tensor(x_te, dtype=torch.float32)).argmax(1).numpy()
    return float((pred == y_te).mean())


def main() -> None:
    x_tr, y_tr, x_te, y_te = data()
    rows = []
    t0 = time.perf_counter()
    rnn_spec = "rnn(256, relu, w_std=1.0, u_std=1.4, b_std=0.1, readout=last)-linear(10)"
    rows.append(("RNN NTK (nk.RNN, infinite width, last step)",
                 kernel_accuracy(rnn_spec, (8, 8), x_tr, y_tr, x_te, y_te),
                 time.perf_counter() - t0))
    t0 = time.perf_counter()
    rows.append(("trained nn.RNN (ReLU, 256 units, Adam, 30 epochs)",
                 trained_rnn_accuracy(x_tr, y_tr, x_te, y_te), time.perf_counter() - t0))
    t0 = time.perf_counter()
    mlp_spec = "2*(linear(512, w_std=1.5, b_std=0.1)-relu)-linear(10)"
    rows.append(("MLP NTK (2 hidden ReLU layers, 64 pixels)",
                 kernel_accuracy(mlp_spec, None, x_tr, y_tr, x_te, y_te),
                 time.perf_counter() - t0))
    print(f"digits as 8 rows of 8 pixels: {len(y_tr)} train, {len(y_te)} test\n")
    print("| model | test accuracy | seconds |")
    print("|---|---|---|")
    for name, acc, sec in rows:
        print(f"| {name} | {acc:.3f} | {sec:.1f} |")


if __name__ == "__main__":
    main()

"""Digits as sequences of 8 rows: the infinite-width transformer's NTK regression
against an MLP's NTK and a trained small torch transformer.

Each 8 x 8 digit (scikit-learn's bundled ``load_digits``) is a sequence of 8 tokens,
one per row: the row's 8 pixels (scaled to [0, 1]) and a one-hot of the row's index
(positions), as ``(N, 16, 8)`` channels first. Three models, the same split:

- transformer NTK: ``Conv1d(64, 1)`` (the token projection), two post-LN
  `ntkit.encoder_block` s with softmax attention at 1/sqrt(d_head) (sampled logits),
  mean readout, ``Linear(1)``; kernel ridge regression on one-hot labels with the NTK
  (the infinite ensemble's mean at t = inf);
- MLP NTK: 2 x [Linear(512), ReLU] + Linear(1) on the 64 pixels, the same regression;
- trained: ``nn.TransformerEncoder`` (d_model 32, 4 heads, 2 layers, d_ff 64) with a
  linear token projection, learned positions and a mean readout, Adam.

Run: ``python examples/transformer_digits.py [--train 200 --test 200]``; prints a
table of test accuracy and seconds.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import ntkit as nk


def digits_as_sequences(n_train: int, n_test: int, seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = torch.as_tensor(x, dtype=torch.float64)[perm] / 16.0
    y = torch.as_tensor(y)[perm]
    rows = x.reshape(-1, 8, 8).transpose(1, 2)  # (N, 8 pixels, 8 rows)
    pos = torch.eye(8, dtype=torch.float64).expand(len(y), 8, 8)
    seq = torch.cat((rows, pos), 1)  # (N, 16, 8)
    tr, te = slice(0, n_train), slice(n_train, n_train + n_test)
    return seq[tr], y[tr], seq[te], y[te], x[tr], x[te]


def ntk_regression(kernel_fn, x_tr, y_tr, x_te, reg: float = 1e-4) -> torch.Tensor:
    """Test predictions of kernel ridge regression with the NTK on one-hot labels."""
    k_tr = kernel_fn(x_tr, None).ntk
    k_te = kernel_fn(x_te, x_tr).ntk
    targets = nn.functional.one_hot(y_tr, 10).to(k_tr.dtype) - 0.1
    eye = torch.eye(len(y_tr), dtype=k_tr.dtype)
    alpha = torch.linalg.solve(k_tr + reg * k_tr.diagonal().mean() * eye, targets)
    return (k_te @ alpha).argmax(1)


class SmallTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 32)
        self.pos = nn.Parameter(torch.randn(8, 32) * 0.1)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(32, 10)

    def forward(self, x):  # x (N, 16, 8): the first 8 channels are the pixels
        h = self.proj(x[:, :8].transpose(1, 2)) + self.pos
        return self.out(self.enc(h).mean(1))


def train_transformer(x_tr, y_tr, x_te, epochs: int = 150) -> torch.Tensor:
    torch.manual_seed(0)
    model = SmallTransformer().double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x_tr), y_tr)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(x_te).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--n-samples", type=int, default=32)
    args = parser.parse_args()
    x_tr, y_tr, x_te, y_te, f_tr, f_te = digits_as_sequences(args.train, args.test)
    transformer = nk.Sequential(nk.Conv1d(64, 1), nk.encoder_block(
        64, 4, 128, n_samples=args.n_samples), nk.encoder_block(
        64, 4, 128, n_samples=args.n_samples, seed=1), nk.GlobalAvgPool(), nk.Linear(1))
    mlp = nk.Sequential(nk.Linear(512), nk.ReLU(), nk.Linear(512), nk.ReLU(), nk.Linear(1))
    rows = []
    t0 = time.perf_counter()
    pred = ntk_regression(lambda a, b: transformer.kernel(a, b), x_tr, y_tr, x_te)
    rows.append(("transformer NTK (infinite width)", pred, time.perf_counter() - t0))
    t0 = time.perf_counter()
    pred = ntk_regression(lambda a, b: mlp.kernel(a, b), f_tr, y_tr, f_te)
    rows.append(("MLP NTK (infinite width)", pred, time.perf_counter() - t0))
    t0 = time.perf_counter()
    pred = train_transformer(x_tr, y_tr, x_te)
    rows.append(("trained nn.TransformerEncoder", pred, time.perf_counter() - t0))
    print(f"digits as 8-row sequences: {args.train} train, {args.test} test")
    print(f"{'model':36s} {'test accuracy':>14s} {'seconds':>9s}")
    for name, pred, seconds in rows:
        acc = float((pred == y_te).double().mean())
        print(f"{name:36s} {acc:14.3f} {seconds:9.1f}")


if __name__ == "__main__":
    main()

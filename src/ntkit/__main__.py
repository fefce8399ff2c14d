"""``python -m ntkit`` / ``ntkit``: the NNGP and NTK of an MLP on bundled digits."""

from __future__ import annotations

import argparse
import time

import torch

import ntkit as nk
from ntkit.datasets import load_digits


def demo(depth: int = 3, n_train: int = 1000) -> None:
    """Prints a short summary of the infinite-width kernels of a ReLU MLP on digits,
    and the test accuracy of NNGP and NTK kernel regression (t = infinity)."""
    x, y = load_digits()
    net = nk.Sequential(
        nk.Repeat(nk.Sequential(nk.Linear(512, w_std=1.5, b_std=0.1), nk.ReLU()), depth),
        nk.Linear(10, w_std=1.5, b_std=0.1),
    )
    print(f"data: scikit-learn digits, {x.shape[0]} images of {x.shape[1]} pixels (float64)")
    print(f"network: {depth} x [Linear(512, w_std=1.5, b_std=0.1), ReLU] + Linear(10)")
    t0 = time.perf_counter()
    k = net.kernel(x)
    elapsed = time.perf_counter() - t0
    print(f"kernel: {k.nngp.shape[0]} x {k.nngp.shape[1]} NNGP and NTK in {elapsed:.2f} s")
    for name, mat in (("NNGP", k.nngp), ("NTK", k.ntk)):
        eig = torch.linalg.eigvalsh(mat)
        print(f"  {name}: diagonal mean {mat.diagonal().mean():.4f}, off-diagonal mean "
              f"{(mat.sum() - mat.trace()) / (mat.numel() - mat.shape[0]):.4f}, "
              f"eigenvalues [{eig[0]:.2e}, {eig[-1]:.2e}]")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    tr, te = perm[:n_train], perm[n_train:]
    targets = torch.nn.functional.one_hot(y, 10).to(x.dtype) - 0.1
    for name, mat in (("NNGP", k.nngp), ("NTK", k.ntk)):
        ktt = mat[tr][:, tr]
        reg = 1e-6 * ktt.diagonal().mean()
        alpha = torch.linalg.solve(ktt + reg * torch.eye(len(tr), dtype=x.dtype), targets[tr])
        acc = (mat[te][:, tr] @ alpha).argmax(1).eq(y[te]).double().mean()
        print(f"  {name} kernel regression (t = inf), {len(tr)} train / {len(te)} test: "
              f"accuracy {acc:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ntkit", description=__doc__)
    parser.add_argument("command", nargs="?", default="demo", choices=["demo"],
                        help="what to run (default: demo)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers of the MLP")
    args = parser.parse_args(argv)
    demo(depth=args.depth)


if __name__ == "__main__":
    main()

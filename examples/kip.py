"""Dataset distillation by kernel inducing points (KIP) with ntkit's infinite-width NTK.

KIP (Nguyen, Chen & Lee 2021, "Dataset Meta-Learning from Kernel Ridge-Regression",
ICLR; eq. 2 there) learns a small support set ``(X_s, y_s)`` such that kernel ridge
regression (KRR) from it predicts a large training set well. Each step samples a
target batch ``(X_t, y_t)`` of real training images and takes an Adam step on the
support images against::

    loss = 1/2 || y_t - K_ts (K_ss + reg I)^-1 y_s ||^2 / |y_t|,
    reg  = 1e-6 * trace(K_ss) / n_s        (the paper's regulariser)

``K`` is the NTK of a ReLU network at infinite width, differentiable in its inputs
(``x.requires_grad_()``, see ``ntkit.Layer.kernel``). Here the data are scikit-learn's
8x8 digits (10 classes, a fixed stratified train/test split); the support set has 10
images per class, initialised with random real training images; the labels stay
fixed one-hot (centred: ``onehot - 0.1``; the paper also offers learning them,
``--learn-labels`` here). The result is compared with KRR on 10 random real images
per class (the initial support sets) and on the whole training set.

Run (under a minute on one CPU core)::

    python examples/kip.py                      # writes examples/kip_digits.png
    python examples/kip.py --arch conv --steps 100 --draws 1 --out /tmp/kip

(the CNN's NTK costs about 0.8 s of CPU per step against 0.02 s for the MLP's)

and it prints a Markdown table of test accuracies.
"""

from __future__ import annotations

import argparse
import pathlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor

import ntkit as nk

CLASSES = 10
#: KIP's ridge, relative to the mean of the support kernel's diagonal (Nguyen et al.).
REG = 1e-6


@dataclass
class Split:
    """The digits, split once: images standardised per image, ``(N, 64)`` (or
    ``(N, 1, 8, 8)`` for a CNN), and labels."""

    x_train: Tensor
    labels_train: Tensor
    x_test: Tensor
    labels_test: Tensor


def load_split(arch: str = "fc", seed: int = 0, test_fraction: float = 0.3) -> Split:
    """scikit-learn's digits (`ntkit.datasets.load_digits`) in a stratified split
    fixed by ``seed`` (the same for every run of the example), shaped for ``arch``."""
    from sklearn.model_selection import train_test_split

    from ntkit.datasets import load_digits

    x, labels = load_digits(dtype=torch.float64)
    if arch == "conv":
        x = x.reshape(-1, 1, 8, 8)
    tr, te = train_test_split(torch.arange(x.shape[0]).numpy(), test_size=test_fraction,
                              random_state=seed, stratify=labels.numpy())
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return Split(x[tr], labels[tr], x[te], labels[te])


def network(arch: str) -> nk.Sequential:
    """The network whose NTK KIP uses: a 3-layer ReLU MLP (``fc``) or a 2-layer ReLU
    CNN on the 8x8 images read out by Flatten (``conv``; Flatten keeps the kernel
    at matching positions only, 64 numbers per pair of images)."""
    if arch == "fc":
        return nk.Sequential(nk.Linear(512, w_std=2**0.5, b_std=0.1), nk.ReLU(),
                             nk.Linear(512, w_std=2**0.5, b_std=0.1), nk.ReLU(),
                             nk.Linear(CLASSES, w_std=2**0.5, b_std=0.1))
    if arch == "conv":
        return nk.Sequential(nk.Conv2d(64, 3, padding="same", w_std=2**0.5, b_std=0.1),
                             nk.ReLU(),
                             nk.Conv2d(64, 3, padding="same", w_std=2**0.5, b_std=0.1),
                             nk.ReLU(), nk.Flatten(),
                             nk.Linear(CLASSES, w_std=2**0.5, b_std=0.1))
    raise ValueError(f"arch must be 'fc' or 'conv', got {arch!r}.")


def targets(labels: Tensor) -> Tensor:
    """Centred one-hot regression targets ``(N, 10)``."""
    return torch.nn.functional.one_hot(labels, CLASSES).to(torch.float64) - 1.0 / CLASSES


def krr_predict(net, x_support: Tensor, y_support: Tensor, x_query: Tensor) -> Tensor:
    """Kernel ridge regression with the NTK from the support set to ``x_query``:
    ``K_qs (K_ss + reg I)^-1 y_s``, ``(N_q, 10)`` (differentiable in the support)."""
    k_ss = net.kernel(x_support).ntk
    k_qs = net.kernel(x_query, x_support).ntk
    n = k_ss.shape[0]
    reg = REG * k_ss.diagonal().mean().detach()
    eye = torch.eye(n, dtype=k_ss.dtype)
    return k_qs @ torch.linalg.solve(k_ss + reg * eye, y_support)


def kip_loss(net, x_support: Tensor, y_support: Tensor, x_target: Tensor, y_target: Tensor
             ) -> Tensor:
    """The KIP loss: mean squared error / 2 of KRR from the support to the targets."""
    pred = krr_predict(net, x_support, y_support, x_target)
    return 0.5 * ((pred - y_target) ** 2).mean()


def accuracy(net, x_support: Tensor, y_support: Tensor, split: Split) -> float:
    """Test accuracy of KRR from the support set."""
    with torch.no_grad():
        pred = krr_predict(net, x_support, y_support, split.x_test)
    return float((pred.argmax(1) == split.labels_test).double().mean())


def random_support(split: Split, per_class: int, gen: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
    """``per_class`` random real training images of each class and their labels."""
    index = []
    for c in range(CLASSES):
        members = (split.labels_train == c).nonzero()[:, 0]
        index.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    index = torch.cat(index)
    return split.x_train[index], split.labels_train[index]


def kip(net, split: Split, x_init: Tensor, labels_init: Tensor, *, steps: int,
        batch: int, lr: float, learn_labels: bool, gen: torch.Generator
        ) -> tuple[Tensor, Tensor, list[float]]:
    """Learns the support images (and labels, with ``learn_labels``) by Adam on the
    KIP loss over target batches of ``batch`` random training images.

    Returns:
        The learned images ``(n_s, 64)``, labels ``(n_s, 10)`` and the loss per step.
    """
    x_s = x_init.clone().requires_grad_(True)
    y_s = targets(labels_init).requires_grad_(learn_labels)
    params = [x_s, y_s] if learn_labels else [x_s]
    opt = torch.optim.Adam(params, lr=lr)
    y_train = targets(split.labels_train)
    history = []
    for _ in range(steps):
        pick = torch.randperm(split.x_train.shape[0], generator=gen)[:batch]
        loss = kip_loss(net, x_s, y_s, split.x_train[pick], y_train[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return x_s.detach(), y_s.detach(), history


def plot_support(images: Tensor, labels: Tensor, path: pathlib.Path, title: str) -> None:
    """The support images as a grid, one column per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_class = images.shape[0] // CLASSES
    fig, axes = plt.subplots(per_class, CLASSES, figsize=(CLASSES * 0.8, per_class * 0.8 + 0.4),
                             squeeze=False)
    order = labels.argsort(stable=True)
    for j, i in enumerate(order.tolist()):
        ax = axes[j % per_class, j // per_class]
        ax.imshow(images[i].reshape(8, 8).numpy(), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        if j % per_class == 0:
            ax.set_title(str(int(labels[i])), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns the numbers it prints (for tests)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["fc", "conv"], default="fc")
    p.add_argument("--steps", type=int, default=500, help="Adam steps per KIP run")
    p.add_argument("--batch", type=int, default=400, help="target images per step")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--draws", type=int, default=3,
                   help="random support sets (each also a KIP initialisation)")
    p.add_argument("--learn-labels", action="store_true")
    p.add_argument("--out", type=pathlib.Path,
                   default=pathlib.Path(__file__).resolve().parent)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; kernels of 100 x 400 pairs are too small "
                        "to gain from more (on a busy machine, extra threads spin-wait)")
    args = p.parse_args(argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace) -> dict:
    """KIP from ``args.draws`` random support sets, the baselines, table and figure."""
    t0, c0 = time.perf_counter(), time.process_time()
    split = load_split(args.arch)
    net = network(args.arch)
    gen = torch.Generator().manual_seed(0)
    random_acc, kip_acc, histories = [], [], []
    learned = None
    for draw in range(args.draws):
        x0, l0 = random_support(split, args.per_class, gen)
        random_acc.append(accuracy(net, x0, targets(l0), split))
        x_s, y_s, hist = kip(net, split, x0, l0, steps=args.steps, batch=args.batch,
                             lr=args.lr, learn_labels=args.learn_labels, gen=gen)
        kip_acc.append(accuracy(net, x_s, y_s, split))
        histories.append(hist)
        if learned is None:
            learned = (x_s, l0)
    full_acc = accuracy(net, split.x_train, targets(split.labels_train), split)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0

    def stat(values: list[float]) -> str:
        t = torch.tensor(values, dtype=torch.float64)
        spread = f" ± {float(t.std()):.3f}" if len(values) > 1 else ""
        return f"{float(t.mean()):.3f}{spread}"

    n = args.per_class * CLASSES
    labels_how = "learned" if args.learn_labels else "fixed one-hot"
    print(f"KIP on digits ({split.x_train.shape[0]} train / {split.x_test.shape[0]} test), "
          f"NTK of the '{args.arch}' network, {args.steps} Adam steps, target batch "
          f"{args.batch}, labels {labels_how}; {args.draws} draws, {seconds:.0f} s "
          f"({cpu:.0f} s of CPU)\n")
    print(f"| support set ({n} images) | KRR test accuracy (NTK) |")
    print("|---|---|")
    print(f"| KIP: {args.per_class} learned images per class | {stat(kip_acc)} |")
    print(f"| {args.per_class} random real images per class | {stat(random_acc)} |")
    print(f"| whole training set ({split.x_train.shape[0]} images) | {full_acc:.3f} |")
    figure = args.out / "kip_digits.png"
    assert learned is not None
    plot_support(*learned, figure, f"KIP: {n} learned digits (NTK, '{args.arch}')")
    print(f"\nfigure: {figure}")
    return {"kip": kip_acc, "random": random_acc, "full": full_acc, "losses": histories,
            "seconds": seconds, "cpu_seconds": cpu, "figure": figure}


if __name__ == "__main__":
    main()

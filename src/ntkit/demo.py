"""The computation behind ``ntkit demo``: infinite against finite width on digits.

Each step is a function that returns its results as a frozen dataclass; the
command line calls them in order, prints as it goes and hands the results to
`report` and `figures`:

1. `digits_split`: scikit-learn's 8x8 digits, a seeded train/test split, one-hot
   targets shifted to mean zero.
2. `infinite_ensembles`: the NNGP and NTK of the ReLU MLP, a learning rate half the
   largest stable step, and the infinite ensembles' test mean and covariance over
   a grid of training times (`ntkit.predict.gradient_descent_mse_ensemble`),
   summarised by `ensemble_stats`.
3. `finite_networks`: MLPs of each width trained by full-batch gradient descent
   on the same loss ``0.5/|y| ||f - y||^2`` with the same learning rate.
4. `ntk_distance_vs_width`: the relative distance between the empirical NTK at
   initialisation and the infinite NTK, over widths (theory: ``~ width^-1/2``).

No global state: every random draw comes from a generator seeded from
``DemoSettings.seed``. Progress bars go to stderr.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DemoResult", "DemoSettings", "DigitsSplit", "DistanceResult", "EnsembleStats",
           "FiniteRun", "InfiniteResult", "architecture", "digits_split", "ensemble_stats",
           "figures", "finite_networks", "has_matplotlib", "infinite_ensembles",
           "ntk_distance_vs_width", "report", "table", "train_mlp", "write_figures"]

#: Digits in scikit-learn's set: ``n_train + n_test`` must not exceed it.
N_DIGITS = 1797


@dataclass(frozen=True)
class DemoSettings:
    """The options of ``ntkit demo`` (see its ``--help``)."""

    widths: tuple[int, ...]
    n_train: int
    n_test: int
    steps: int
    depth: int
    seed: int
    quick: bool
    threads: int = 1


@dataclass(frozen=True)
class DigitsSplit:
    """Train and test digits, float64: inputs ``(N, 64)``, targets ``(N, 10)`` (one-hot
    minus 0.1), and the test labels ``(Nt,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labels_test: Tensor


@dataclass(frozen=True)
class EnsembleStats:
    """Test metrics of an infinite ensemble at each of ``T`` times, arrays ``(T,)``.

    ``loss``/``loss_std`` and ``acc``/``acc_std``: of one network drawn from the
    ensemble (mean and spread over networks); ``mean_loss``/``mean_acc``: of the
    ensemble's mean output.
    """

    loss: np.ndarray
    loss_std: np.ndarray
    acc: np.ndarray
    acc_std: np.ndarray
    mean_loss: np.ndarray
    mean_acc: np.ndarray


@dataclass(frozen=True)
class InfiniteResult:
    """The infinite-width side: train kernels, learning rate, times and statistics."""

    kernels: Any                      # ntkit Kernel on the training inputs (nngp, ntk)
    learning_rate: float
    times: np.ndarray                 # (T,) step counts, the last is ``steps``
    stats: dict[str, EnsembleStats]   # "nngp", "ntk"
    seconds: float


@dataclass(frozen=True)
class FiniteRun:
    """Test loss and accuracy ``(T,)`` of one trained MLP at the times, and its training
    time."""

    loss: np.ndarray
    acc: np.ndarray
    seconds: float


@dataclass(frozen=True)
class DistanceResult:
    """``||empirical NTK - infinite NTK|| / ||infinite NTK||`` at initialisation:
    ``distances`` ``(len(widths), seeds)`` on ``n_examples`` training digits."""

    widths: list[int]
    distances: np.ndarray
    n_examples: int
    seconds: float

    @property
    def slope(self) -> float:
        """Slope of the mean distance against width on log-log axes (theory: -0.5)."""
        return float(np.polyfit(np.log(self.widths), np.log(self.distances.mean(1)), 1)[0])


@dataclass(frozen=True)
class DemoResult:
    """Everything the demo's table and figures show."""

    settings: DemoSettings
    infinite: InfiniteResult
    finite: dict[int, FiniteRun]
    entk_init: Tensor | None          # empirical NTK of the widest MLP at init (train)
    distance: DistanceResult


def architecture(depth: int, width: int | str) -> str:
    """The demo's MLP as an ntkit spec: ``depth`` hidden ReLU layers of ``width``."""
    return (f"{depth}*(linear({width},w_std=1.5,b_std=0.1)-relu)"
            f"-linear(10,w_std=1.5,b_std=0.1)")


def digits_split(s: DemoSettings) -> DigitsSplit:
    """``s.n_train`` training and ``s.n_test`` test digits, split with seed ``s.seed``."""
    from .datasets import load_digits

    x, labels = load_digits(dtype=torch.float64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(s.seed))
    tr, te = perm[:s.n_train], perm[s.n_train:s.n_train + s.n_test]
    y = torch.nn.functional.one_hot(labels, 10).to(torch.float64) - 0.1
    return DigitsSplit(x[tr], y[tr], x[te], y[te], labels[te])


def infinite_ensembles(data: DigitsSplit, s: DemoSettings) -> InfiniteResult:
    """Train kernels, learning rate (half the largest stable step of the NTK) and the
    NNGP and NTK ensembles' test statistics at 25 log-spaced times up to ``s.steps``."""
    from . import predict
    from .spec import parse_architecture

    net = parse_architecture(architecture(s.depth, 512))
    t0 = time.perf_counter()
    k_train = net.kernel(data.x_train)
    lr = 0.5 * predict.max_learning_rate(k_train.ntk, y_size=data.y_train.numel())
    times = np.unique(np.round(np.logspace(0, math.log10(s.steps), 25)).astype(int))
    ensemble = predict.gradient_descent_mse_ensemble(net, data.x_train, data.y_train,
                                                     learning_rate=lr)
    t = torch.as_tensor(times, dtype=torch.float64)
    out = {g: ensemble(data.x_test, t, get=g, compute_cov=True) for g in ("nngp", "ntk")}
    seconds = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(s.seed + 1)
    stats = {g: ensemble_stats(out[g].mean, out[g].cov, data.y_test, data.labels_test, gen)
             for g in out}
    return InfiniteResult(k_train, lr, times, stats, seconds)


def ensemble_stats(mean: Tensor, cov: Tensor, y: Tensor, labels: Tensor,
                   gen: torch.Generator, samples: int = 32) -> EnsembleStats:
    """Test metrics of the ensemble at each time.

    ``mean``: ``(T, Nt, O)``; ``cov``: ``(T, Nt, Nt)`` shared by the outputs; ``y``:
    ``(Nt, O)``; ``labels``: ``(Nt,)``. A network drawn from the ensemble has test
    outputs ``f ~ N(mean, cov)`` per output, so its loss ``0.5/|y| ||f - y||^2`` has
    mean ``0.5/|y| (||d||^2 + O tr C)`` and variance
    ``(0.5/|y|)^2 sum_o (2 tr(C^2) + 4 d_o' C d_o)`` with ``d = mean - y`` (moments of
    a Gaussian quadratic form); its accuracy's mean and spread are estimated from
    ``samples`` draws with ``gen``.
    """
    d = mean - y
    scale = 0.5 / y.numel()
    n_out = y.shape[1]
    tr_c = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    loss = scale * ((d * d).sum((1, 2)) + n_out * tr_c)
    quad = torch.einsum("tio,tij,tjo->t", d, cov, d)
    var = scale ** 2 * (2 * n_out * (cov * cov).sum((1, 2)) + 4 * quad)
    lam, vec = torch.linalg.eigh(cov)
    root = vec * lam.clamp(min=0).sqrt()[:, None, :]
    z = torch.randn((samples,) + tuple(mean.shape[1:]), generator=gen, dtype=mean.dtype)
    f = mean[:, None] + torch.einsum("tij,sjo->tsio", root, z)
    acc = (f.argmax(-1) == labels).to(mean.dtype).mean(-1)          # (T, samples)
    mean_loss = scale * (d * d).sum((1, 2))
    mean_acc = (mean.argmax(-1) == labels).to(mean.dtype).mean(-1)
    return EnsembleStats(loss=loss.numpy(), loss_std=var.clamp(min=0).sqrt().numpy(),
                         acc=acc.mean(1).numpy(), acc_std=acc.std(1).numpy(),
                         mean_loss=mean_loss.numpy(), mean_acc=mean_acc.numpy())


def train_mlp(model: torch.nn.Module, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor,
              labels: Tensor, lr: float, times: np.ndarray, *, desc: str) -> FiniteRun:
    """Full-batch gradient descent on ``0.5/|y| ||f(x) - y||^2``, test metrics at ``times``
    (step counts). ``x``: ``(N, 64)``, ``y``: ``(N, 10)``, likewise the test set.

    Raises:
        FloatingPointError: the loss diverged (the message names ``desc`` and ``lr``).
    """
    from tqdm import tqdm

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    marks = {int(t) for t in times}
    loss_t, acc_t = [], []
    t0 = time.perf_counter()
    for step in tqdm(range(1, int(times[-1]) + 1), desc=desc, unit="step", leave=False):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * ((model(x) - y) ** 2).sum() / y.numel()
        loss.backward()
        opt.step()
        if step in marks:
            with torch.no_grad():
                f = model(x_test)
                loss_t.append(float(0.5 * ((f - y_test) ** 2).sum() / y_test.numel()))
                acc_t.append(float((f.argmax(1) == labels).float().mean()))
    if not math.isfinite(loss_t[-1]):
        raise FloatingPointError(f"the network of {desc} diverged at learning rate {lr:.3g}.")
    return FiniteRun(np.array(loss_t), np.array(acc_t), time.perf_counter() - t0)


def finite_networks(data: DigitsSplit, s: DemoSettings, lr: float, times: np.ndarray
                    ) -> tuple[dict[int, FiniteRun], Tensor | None]:
    """An MLP of each width in ``s.widths`` trained in float32 (seed ``s.seed + width``),
    and the empirical NTK (per output) of the widest at initialisation on the train set."""
    import ntkit as nk

    from .spec import parse_architecture

    finite: dict[int, FiniteRun] = {}
    x32, y32 = data.x_train.float(), data.y_train.float()
    x_te32, y_te32 = data.x_test.float(), data.y_test.float()
    entk_init = None
    for width in s.widths:
        model = parse_architecture(architecture(s.depth, width)).build(
            (64,), generator=torch.Generator().manual_seed(s.seed + width))
        if width == max(s.widths):
            entk_init = nk.empirical_ntk(model, x32) / 10
        finite[width] = train_mlp(model, x32, y32, x_te32, y_te32, data.labels_test, lr, times,
                                  desc=f"width {width}")
    return finite, entk_init


def ntk_distance_vs_width(data: DigitsSplit, s: DemoSettings) -> DistanceResult:
    """Empirical NTK at initialisation against the infinite NTK, on the first 100 (quick:
    50) training digits, for widths 64 to 4096 (quick: 1024) and ``s.widths``, over 3
    (quick: 2) seeds each."""
    from tqdm import tqdm

    import ntkit as nk

    from .spec import parse_architecture

    widths = sorted({2 ** i for i in range(6, 11 if s.quick else 13)} | set(s.widths))
    n_sub, seeds = (50, 2) if s.quick else (100, 3)
    x_sub = data.x_train[:n_sub]
    k_sub = parse_architecture(architecture(s.depth, 512)).kernel(x_sub).ntk
    distances = np.zeros((len(widths), seeds))
    t0 = time.perf_counter()
    bar = tqdm(total=len(widths) * seeds, desc="empirical NTK vs width", unit="net")
    for i, width in enumerate(widths):
        arch = parse_architecture(architecture(s.depth, int(width)))
        for j in range(seeds):
            model = arch.build((64,), dtype=torch.float64,
                               generator=torch.Generator().manual_seed(10_000 * j + int(width)))
            e = nk.empirical_ntk(model, x_sub) / 10
            distances[i, j] = float(torch.linalg.norm(e - k_sub) / torch.linalg.norm(k_sub))
            bar.update()
    bar.close()
    return DistanceResult(widths, distances, n_sub, time.perf_counter() - t0)


# ------------------------------------------------------------------ presenting
def report(r: DemoResult) -> list[str]:
    """The lines printed after the runs: the table of test metrics at the last time and
    the empirical-vs-infinite distance summary."""
    inf, dist = r.infinite, r.distance
    rows = []
    for g, name in (("ntk", "NTK"), ("nngp", "NNGP")):
        st = inf.stats[g]
        rows.append((f"infinite {name} ensemble, mean", f"{st.mean_acc[-1]:.3f}",
                     f"{st.mean_loss[-1]:.4f}", f"{inf.seconds:.1f}"))
    for g, name in (("ntk", "NTK"), ("nngp", "NNGP")):
        st = inf.stats[g]
        rows.append((f"infinite {name}: one network", f"{st.acc[-1]:.3f} ± {st.acc_std[-1]:.3f}",
                     f"{st.loss[-1]:.4f} ± {st.loss_std[-1]:.4f}", "-"))
    for width, run in r.finite.items():
        rows.append((f"MLP width {width}", f"{run.acc[-1]:.3f}", f"{run.loss[-1]:.4f}",
                     f"{run.seconds:.1f}"))
    mean = dist.distances.mean(1)
    return [
        "",
        f"test metrics at t = {int(inf.times[-1])} (loss 0.5/|y| ||f - y||^2):",
        table(("model", "test accuracy", "test loss", "seconds"), rows),
        ("(ensemble, mean: the prediction of the infinite ensemble, its mean output; one "
         "network: a single infinitely wide network drawn from it, mean ± std over networks)"),
        (f"empirical vs infinite NTK on {dist.n_examples} digits: relative distance "
         f"{mean[0]:.3f} at width {dist.widths[0]}, {mean[-1]:.3f} at width "
         f"{dist.widths[-1]} (slope {dist.slope:.2f} on log-log; theory -0.5) in "
         f"{dist.seconds:.1f} s"),
    ]


def figures(r: DemoResult) -> dict[str, Any]:
    """The three matplotlib figures by file name: training curves, kernel spectra, and
    empirical-vs-infinite NTK distance against width."""
    from . import plot

    s, inf = r.settings, r.infinite
    curves = {}
    for g, name in (("ntk", "infinite NTK ensemble"), ("nngp", "infinite NNGP ensemble")):
        st = inf.stats[g]
        curves[name] = plot.Curve(loss=st.loss, loss_std=st.loss_std, accuracy=st.acc,
                                  accuracy_std=st.acc_std)
    for width, run in r.finite.items():
        curves[f"MLP width {width}"] = plot.Curve(loss=run.loss, accuracy=run.acc)
    kernels = {"infinite NNGP": inf.kernels.nngp, "infinite NTK": inf.kernels.ntk}
    if r.entk_init is not None:
        kernels[f"empirical NTK, width {max(s.widths)} at init"] = r.entk_init
    return {
        "training_curves.png": plot.training_curves(
            inf.times, curves, title=f"digits, {s.n_train} train / {s.n_test} test, "
                                     f"learning rate {inf.learning_rate:.3g}"),
        "eigenvalue_spectrum.png": plot.eigenvalue_spectrum(
            kernels, title=f"kernel spectra on the {s.n_train} training digits"),
        "ntk_distance_vs_width.png": plot.kernel_distance_vs_width(
            r.distance.widths, r.distance.distances,
            title=f"empirical vs infinite NTK, {r.distance.n_examples} digits, "
                  f"depth {s.depth}"),
    }


def write_figures(r: DemoResult, out_dir: Path) -> list[Path]:
    """`figures` saved as PNGs in ``out_dir`` (created); their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(r).items():
        fig.savefig(out_dir / name, dpi=110)
        paths.append(out_dir / name)
    return paths


def table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def fmt(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def has_matplotlib() -> bool:
    """Whether matplotlib (``pip install 'ntkit[plot]'``) can be imported."""
    try:
        import matplotlib
    except ImportError:
        return False
    return True

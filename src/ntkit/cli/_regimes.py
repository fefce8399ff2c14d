"""``ntkit regimes``: the lazy (NTK parameterization) and the feature-learning (muP)
regimes side by side on digits (`ntkit.finite.regimes`), as a table and a figure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ._errors import CommandError, failing
from ._options import CONTEXT, force_option, widths_callback
from ._output import check_outputs, write_atomically

__all__ = ["regimes"]


@click.command("regimes", context_settings=CONTEXT)
@click.option("--widths", callback=widths_callback, default="64,128,256,512,1024,2048,4096",
              show_default=True,
              help="hidden widths of the one-hidden-layer MLP")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="full-batch SGD steps")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.2,
              show_default=True, help="learning rate at the base width (64)")
@click.option("--train", "n_train", type=click.IntRange(min=10), default=1000,
              show_default=True, help="training examples (the rest of the 1797 are the test)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="initialisations averaged over at each width")
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="draw the three panels to this image (.png, .pdf)")
@click.option("--table", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the numbers to this .json")
@force_option()
def regimes(widths: list[int], steps: int, lr: float, n_train: int, seed: int, seeds: int,
            out: Path | None, table: Path | None, force: bool) -> None:
    """Train the same MLP on digits under NTK parameterization and under muP at several
    widths; print and draw the relative change of the NTK, the test loss and the
    features' distance from initialisation against width.

    Under NTK parameterization the NTK and the features freeze as the width grows (the
    kernel regime: the NTK's change falls like 1/width, the features' like
    1/sqrt(width)); under muP they keep moving (feature learning); standard
    parameterization with muP's learning rates is unstable. The fitted log-log slopes
    against width are printed.

    \b
    Examples:
      ntkit regimes -o regimes.png
      ntkit regimes --widths 64,256 --steps 20 --table regimes.json
    """
    import torch

    from .. import datasets
    from ..finite.regimes import regimes as run
    from ..finite.regimes import regimes_figure

    check_outputs({"-o/--out": out, "--table": table}, {}, force=force)
    if out is not None and out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise click.BadParameter(f"figures are written to .png, .pdf or .svg, got "
                                 f"{out.name!r}.", param_hint="-o/--out")
    x, y = datasets.load_digits(dtype=torch.float32)
    if n_train >= len(x):
        raise CommandError(f"--train {n_train} leaves no test examples among the {len(x)} "
                           f"digits; give at most {len(x) - 1}.")
    onehot = torch.nn.functional.one_hot(y, 10).to(torch.float32)
    t0 = time.perf_counter()
    with failing("the regimes run failed"):
        result = run(x[:n_train], onehot[:n_train], x[n_train:], onehot[n_train:],
                     widths=widths, steps=steps, lr=lr, seed=seed, seeds=seeds)
    click.echo(f"digits: {n_train} train, {len(x) - n_train} test, {steps} SGD steps, "
               f"lr {lr:g} at width 64, {seeds} seed(s), {time.perf_counter() - t0:.1f} s")
    click.echo(f"{'width':>7} {'param':>9} {'NTK change':>11} {'test loss':>10} "
               f"{'feature dist':>13}")
    for i, w in enumerate(widths):
        for name in ("ntk", "mup", "sp_mup_lr"):
            r = result[name]
            click.echo(f"{w:7d} {name:>9} {r['ntk_change'][i]:11.4g} {r['test_loss'][i]:10.4g} "
                       f"{r['feature_distance'][i]:13.4g}")
    for name in ("ntk", "mup", "sp_mup_lr"):
        s = result["slopes"][name]
        click.echo(f"log-log slope against width, {name:>9}: NTK change "
                   f"{s['ntk_change']:+.2f}, feature distance {s['feature_distance']:+.2f}")
    if table is not None:
        write_atomically(table, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        click.echo(f"wrote the numbers to {table}")
    if out is not None:
        fig = regimes_figure(result)
        write_atomically(out, lambda tmp: fig.savefig(tmp))
        click.echo(f"drew the figure to {out}")

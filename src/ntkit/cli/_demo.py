"""``ntkit demo`` (infinite vs finite width on digits) and ``ntkit bench``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from ._errors import CommandError
from ._options import CONTEXT, widths_callback

__all__ = ["bench", "demo", "run_demo"]


@click.command(context_settings=CONTEXT)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("ntkit-demo"), show_default=True,
              help="directory for the three PNG figures")
@click.option("--widths", multiple=True, callback=widths_callback,
              help="widths of the finite networks trained beside the infinite ones, e.g. "
                   "64,256,1024  [default: 64,256,1024; --quick: 64,256]")
@click.option("--n-train", type=click.IntRange(10, 1500), default=None,
              help="training digits  [default: 500; --quick: 200]")
@click.option("--n-test", type=click.IntRange(10, 1500), default=None,
              help="test digits  [default: 500; --quick: 200]")
@click.option("--steps", type=click.IntRange(1, 10**6), default=None,
              help="gradient-descent steps (training time t)  [default: 2000; --quick: 300]")
@click.option("--depth", type=click.IntRange(1, 10), default=1, show_default=True,
              help="hidden layers of the MLP")
@click.option("--seed", type=int, default=0, show_default=True,
              help="seed of the split, the finite networks and the ensemble samples")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="torch CPU threads during the demo; its steps are small, and one thread "
                   "is fastest on a small or shared machine")
@click.option("--quick", is_flag=True, help="smaller settings, for a run of a few seconds")
def demo(out_dir: Path, widths: tuple[int, ...] | None, n_train: int | None,
         n_test: int | None, steps: int | None, depth: int, seed: int, threads: int,
         quick: bool) -> None:
    """Infinite vs finite width on scikit-learn's digits, with three figures.

    Fits the infinite-width NTK and NNGP ensembles of a ReLU MLP (ntkit.predict: the
    closed-form gradient-descent dynamics, mean and covariance over training time),
    trains finite MLPs of each width by full-batch gradient descent on the same loss
    (0.5/|y| ||f - y||^2) with the same learning rate, prints a table, and writes
    training_curves.png, eigenvalue_spectrum.png and ntk_distance_vs_width.png to --out
    (figures need matplotlib: pip install 'ntkit[plot]'; without it they are skipped).
    """
    from .. import cli
    from ..demo import N_DIGITS, DemoSettings

    settings = DemoSettings(
        widths=widths or ((64, 256) if quick else (64, 256, 1024)),
        n_train=n_train or (200 if quick else 500),
        n_test=n_test or (200 if quick else 500),
        steps=steps or (300 if quick else 2000),
        depth=depth, seed=seed, quick=quick, threads=threads,
    )
    if settings.n_train + settings.n_test > N_DIGITS:
        raise click.BadParameter(
            f"--n-train {settings.n_train} + --n-test {settings.n_test} exceeds the "
            f"{N_DIGITS} digits.", param_hint="--n-train/--n-test")
    cli.run_demo(settings, out_dir)      # looked up on the package: its one public name


def run_demo(s, out_dir: Path) -> None:
    """The body of `ntkit demo` (see its help) for `ntkit.demo.DemoSettings` ``s``, with
    ``s.threads`` torch threads (the previous number is restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        _run_demo(s, out_dir)
    finally:
        torch.set_num_threads(before)


def _run_demo(s, out_dir: Path) -> None:
    from .. import demo as d

    start = time.perf_counter()
    data = d.digits_split(s)
    click.echo(f"data: scikit-learn digits (8x8), {s.n_train} train / {s.n_test} test, "
               f"split seed {s.seed}")
    click.echo(f"network: {d.architecture(s.depth, 'W')}  (ntkit spec; W = width)")
    infinite = d.infinite_ensembles(data, s)
    click.echo(f"learning rate {infinite.learning_rate:.3g} (half the largest stable step of "
               f"the infinite NTK); t = {s.steps} steps")
    finite, entk_init = d.finite_networks(data, s, infinite.learning_rate, infinite.times)
    result = d.DemoResult(s, infinite, finite, entk_init, d.ntk_distance_vs_width(data, s))
    for line in d.report(result):
        click.echo(line)
    if d.has_matplotlib():
        paths = d.write_figures(result, out_dir)
        click.echo(f"figures: {', '.join(str(p) for p in paths)}")
    else:
        click.echo("figures: skipped, matplotlib is not installed (pip install 'ntkit[plot]')")
    click.echo(f"total {time.perf_counter() - start:.1f} s")


@click.command(context_settings={**CONTEXT, "ignore_unknown_options": True,
                                 "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the reference benchmarks (benchmarks/run.py of a source checkout).

    ARGS go to benchmarks/run.py: case names (fc, cnn, myrtle, entk, ...) and its
    options, e.g. `ntkit bench fc cnn --reps 2 --no-peer`; `ntkit bench -- --help`
    shows them. benchmarks/gpu_check.sh runs the GPU checks and benchmarks.
    """
    script = bench_script()
    _check_bench_cases(args, script)
    proc = subprocess.run([sys.executable, str(script), *args], check=False)
    if proc.returncode != 0:
        sys.exit(proc.returncode)


def bench_vocabulary(script: Path) -> tuple[tuple[str, ...], frozenset[str]] | None:
    """The case names (keys of ``CASES``) of benchmarks/run.py and its options that take
    a value, read from its source without running it (it imports torch); None when the
    script does not have that form."""
    try:
        tree = ast.parse(script.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    cases, valued = None, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CASES"
                                                for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            cases = tuple(k.value for k in node.value.keys
                          if isinstance(k, ast.Constant) and isinstance(k.value, str))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" \
                and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).startswith("-") \
                and not any(k.arg == "action" for k in node.keywords):
            valued.update(str(a.value) for a in node.args if isinstance(a, ast.Constant))
    return None if not cases else (cases, frozenset(valued))


def _check_bench_cases(args: tuple[str, ...], script: Path) -> None:
    """A usage error (exit 2, one line) naming the valid cases when ``args`` name a case
    benchmarks/run.py does not have; its own --help is left to it."""
    vocabulary = bench_vocabulary(script)
    if vocabulary is None or "-h" in args or "--help" in args:
        return
    cases, valued = vocabulary
    named, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in valued                 # --reps 2: the 2 is no case
        else:
            named.append(a)
    unknown = [a for a in named if a not in cases]
    if unknown:
        raise CommandError(f"no benchmark case {', '.join(map(repr, unknown))}; the cases are "
                           f"{', '.join(cases)} (options: ntkit bench -- --help).", exit_code=2)


def bench_script(package_dir: Path | None = None) -> Path:
    """benchmarks/run.py: under $NTKIT_BENCHMARKS, beside the source tree of the ``ntkit``
    package in ``package_dir`` (default: this one), or under the working directory."""
    package_dir = package_dir or Path(__file__).resolve().parents[1]
    candidates = [package_dir.parents[1] / "benchmarks" / "run.py",
                  Path.cwd() / "benchmarks" / "run.py"]
    env = os.environ.get("NTKIT_BENCHMARKS")
    if env:
        candidates.insert(0, Path(env) / "run.py")
    for c in candidates:
        if c.is_file():
            return c
    raise CommandError("ntkit bench runs benchmarks/run.py from a source checkout of ntkit, "
                       "and none was found (looked in "
                       + ", ".join(str(c.parent) for c in candidates)
                       + "); run it from a clone of the repository, or set NTKIT_BENCHMARKS "
                         "to the benchmarks directory.")

"""The ``ntkit`` command line: demo, kernel, fit, predict, bench.

A thin shell over the public API (`ntkit.spec`, ``net.kernel``,
`ntkit.kernel_matrix`, `ntkit.sklearn`, `ntkit.demo`) and `ntkit._data_files`
(data files, datasets, labels). One module per command group:

- `ntkit.cli._kernel`: ``ntkit kernel``
- `ntkit.cli._fit`: ``ntkit fit`` and ``ntkit predict``
- `ntkit.cli._demo`: ``ntkit demo`` and ``ntkit bench``
- `ntkit.cli._options`: options shared by the commands (``--get``, data options)
- `ntkit.cli._errors`: the one table from exception type to exit status and message

Errors in what the user gave (files, specs, labels) and failed computations print
one ``Error: ...`` line and exit with a non-zero status (see `ntkit.cli._errors`);
``--help`` works on every command.
"""

from __future__ import annotations

import click

from ._curve import curve
from ._demo import bench, demo, run_demo
from ._errors import Commands
from ._fit import fit, predict_cmd
from ._kernel import kernel
from ._options import CONTEXT
from ._regimes import regimes

__all__ = ["cli", "main", "run_demo"]


@click.group(cls=Commands, context_settings=CONTEXT, invoke_without_command=True)
@click.version_option(package_name="ntkit", prog_name="ntkit")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Infinite-width NNGP and NTK kernels of neural networks, on PyTorch.

    Without a command, runs `ntkit demo`.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(demo)


for _command in (demo, kernel, fit, predict_cmd, bench, curve, regimes):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ntkit`` console script and ``python -m ntkit``."""
    cli.main(args=argv, prog_name="ntkit")

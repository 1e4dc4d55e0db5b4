"""``dask lplr …``: the ``lplr`` command as a subcommand of Dask's own CLI.

Registered as a ``dask_cli`` entry point (pyproject.toml), which Dask's CLI loads when it starts:
so ``dask config get lplr`` also shows this package's defaults (:mod:`lplr_dask.config`), and
``dask lplr compress IN OUT --rank 64`` is ``lplr compress IN OUT --rank 64``.
"""

from __future__ import annotations

import sys

import click

from lplr_dask.cli import main

__all__ = ["lplr"]


@click.command(
    name="lplr",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lplr(args: tuple[str, ...]) -> None:
    """Compress matrices into low-rank, low-precision factors (lplr --help)."""
    sys.exit(main(list(args)))

"""Logging: the library reports through ``logging.getLogger("lplr_dask")`` and prints nothing itself.

A program that wants the messages configures logging as usual (``logging.basicConfig(level=
logging.INFO)``); the ``lplr`` command installs one stderr handler with :func:`configure`.
Unconfigured, nothing is printed at all, warnings included: the package's
:class:`logging.NullHandler` keeps Python's last-resort handler out, as the logging HOWTO
advises for libraries. The command line's own outcome line (an error, a stop) is printed with
:func:`report`, the one other writer to stderr.

What goes through the logger: the steps' progress (heartbeat lines and a final ``done`` or
``failed`` line per step, :mod:`lplr_dask.progress`), the dashboard address, what a command
chose (rank, chunks, resume) and its warnings.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["logger", "info", "warning", "report", "configure", "live_console"]

#: The name of the handler :func:`configure` installs.
CLI_HANDLER = "lplr-cli"

#: The package's logger; every module logs through it (or a child of it).
logger = logging.getLogger("lplr_dask")
logger.addHandler(logging.NullHandler())


def info(message: str) -> None:
    """Log ``message`` at INFO level: the default ``log`` callable of the library's functions."""
    logger.info(message)


def warning(message: str) -> None:
    """Log ``message`` at WARNING level."""
    logger.warning(message)


def report(line: str) -> None:
    """Print ``line`` on stderr at once: the command line's one-line outcome (an error, a stop).

    Not through the logger: the line is printed whatever logging's configuration, ``--quiet``
    included, and also before :func:`configure` has run (a usage error) or after the command's
    handler is removed.
    """
    print(line, file=sys.stderr, flush=True)


def configure(verbosity: int = 0) -> None:
    """Install the command line's one handler: plain lines on stderr.

    Parameters
    ----------
    verbosity : int, default=0
        ``-1`` (``--quiet``): warnings and errors only; ``0``: progress and results; ``1``
        (``-v``) and more: debug messages, and distributed's own loggers at INFO.
    """
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(CLI_HANDLER)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for old in [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def live_console() -> Any:
    """A rich Console on the command line's stream when that is a terminal and progress is logged
    (:func:`configure` at verbosity >= 0), for a live progress bar; otherwise None (plain lines).
    """
    if not logger.isEnabledFor(logging.INFO):
        return None
    for handler in logger.handlers:
        if handler.get_name() == CLI_HANDLER and isinstance(handler, logging.StreamHandler):
            from rich.console import Console

            console = Console(file=handler.stream)
            return console if console.is_terminal else None
    return None

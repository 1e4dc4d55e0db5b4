"""Logging: the library reports through ``logging.getLogger("lplr_dask")`` and prints nothing itself.

A program that wants the messages configures logging as usual (``logging.basicConfig(level=
logging.INFO)``); the ``lplr`` command installs one stderr handler with :func:`configure`.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["logger", "info", "warning", "configure"]

#: The package's logger; every module logs through it (or a child of it).
logger = logging.getLogger("lplr_dask")
logger.addHandler(logging.NullHandler())


def info(message: str) -> None:
    """Log ``message`` at INFO level: the default ``log`` callable of the library's functions."""
    logger.info(message)


def warning(message: str) -> None:
    """Log ``message`` at WARNING level."""
    logger.warning(message)


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
    handler.setFormatter(logging.Formatter("%(message)s"))
    for old in [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

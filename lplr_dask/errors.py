"""Exceptions of lplr-dask: each also subclasses the builtin it refines.

The CLI turns any :class:`LplrError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

__all__ = [
    "LplrError",
    "LplrValueError",
    "LplrTypeError",
    "SourceNotFoundError",
    "OutputExistsError",
    "OutputLockedError",
    "StoreFormatError",
    "NonFiniteError",
]


class LplrError(Exception):
    """Base class of every error this package raises on bad input."""


class LplrValueError(LplrError, ValueError):
    """An argument or input has a bad value."""


class LplrTypeError(LplrError, TypeError):
    """An argument or input has a bad type (for example a non-numeric dtype)."""


class SourceNotFoundError(LplrError, FileNotFoundError):
    """The input matrix does not exist."""


class OutputExistsError(LplrError, FileExistsError):
    """The output exists and neither ``overwrite`` nor ``resume`` was given."""


class OutputLockedError(LplrError, FileExistsError):
    """Another job is writing the output: its lock file is present and its process alive."""


class StoreFormatError(LplrValueError):
    """A compressed store is incomplete, of an unknown format, or of a newer version."""


class NonFiniteError(LplrValueError):
    """The input holds NaN or Inf."""

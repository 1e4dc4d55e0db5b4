"""Validation of arguments at the public boundary, in one place.

Each ``parse_*`` function takes a value as a user gave it (from Python or from a CLI flag),
returns it in its canonical type, or raises an :class:`~lplr_dask.errors.LplrError` whose message
reads "Expected … Got … instead." and, where there is one, says what to do. The library's public
functions call these once and then run a body that does not check again (the manner of zarr's
``parse_*`` helpers and scikit-learn's ``randomized_svd`` / ``_randomized_svd``).

Names are given as a user knows them: ``"rank (--rank)"`` names both the keyword and the flag.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from lplr_dask.errors import LplrTypeError, LplrValueError

__all__ = ["expected", "parse_int", "parse_float", "parse_choice", "parse_bool", "exactly_one", "at_most_one"]

T = TypeVar("T")


def expected(what: str, got: Any, hint: str = "", *, error: type[Exception] = LplrValueError) -> Exception:
    """The exception for a bad value: ``Expected {what}. Got {got!r} instead. {hint}``.

    Returned, not raised, so the caller's ``raise`` shows where the check is.
    """
    return error(f"Expected {what}. Got {got!r} instead." + (f" {hint}" if hint else ""))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def parse_int(
    value: Any,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    hint: str = "",
    error: type[Exception] = LplrValueError,
) -> int:
    """``value`` as an int within ``[minimum, maximum]``.

    Booleans and floats are refused, even ``2.0``: a rank or a seed is a count.

    Raises
    ------
    LplrValueError
        (or ``error``) If ``value`` is not an integer in range.
    """
    if minimum is not None and maximum is not None:
        what = f"{name} to be an integer from {minimum} to {maximum}"
    elif minimum is not None:
        what = f"{name} to be an integer >= {minimum}"
    elif maximum is not None:
        what = f"{name} to be an integer <= {maximum}"
    else:
        what = f"{name} to be an integer"
    if not _is_int(value):
        raise expected(what, value, hint, error=error)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise expected(what, value, hint, error=error)
    return int(value)


def parse_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    inclusive: tuple[bool, bool] = (True, True),
    hint: str = "",
) -> float:
    """``value`` as a finite float within ``low``…``high`` (ends included as ``inclusive`` says).

    Raises
    ------
    LplrValueError
        If ``value`` is not a real number (booleans are refused), not finite, or out of range.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{'>=' if inclusive[0] else '>'} {low:g}")
    if high is not None:
        bounds.append(f"{'<=' if inclusive[1] else '<'} {high:g}")
    what = f"{name} to be a number" + (f" {' and '.join(bounds)}" if bounds else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
        raise expected(what, value, hint)
    v = float(value)
    if low is not None and (v < low or (v == low and not inclusive[0])):
        raise expected(what, value, hint)
    if high is not None and (v > high or (v == high and not inclusive[1])):
        raise expected(what, value, hint)
    return v


def parse_choice(value: Any, name: str, choices: Sequence[T], hint: str = "") -> T:
    """``value`` if it is one of ``choices``.

    Raises
    ------
    LplrValueError
        Naming the choices.
    """
    if value not in choices:
        raise expected(f"{name} to be one of {', '.join(map(repr, choices))}", value, hint)
    return value  # type: ignore[no-any-return]


def parse_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (numpy's too).

    Raises
    ------
    LplrTypeError
        For anything else: ``0`` and ``"yes"`` are not flags.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise expected(f"{name} to be True or False", value, error=LplrTypeError)
    return bool(value)


def exactly_one(what: str, **given: Any) -> tuple[str, Any]:
    """The one keyword of ``given`` that is not None, as (name, value).

    ``what`` names the choice for the message: "Expected exactly one of {what}. Got … instead."

    Raises
    ------
    LplrValueError
        If none or more than one is given.
    """
    named = [(k, v) for k, v in given.items() if v is not None]
    if len(named) != 1:
        got = ", ".join(k for k, _ in named) if named else "none"
        raise LplrValueError(f"Expected exactly one of {what}. Got {got} instead.")
    return named[0]


def at_most_one(what: str, **given: Any) -> None:
    """Raise :class:`LplrValueError` if more than one keyword of ``given`` is truthy."""
    named = [k for k, v in given.items() if v]
    if len(named) > 1:
        raise LplrValueError(f"Give at most one of {what}. Got {', '.join(named)}.")

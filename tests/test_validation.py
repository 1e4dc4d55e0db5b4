"""The argument checks of :mod:`lplr_dask.validation`: canonical values back, "Expected … Got … instead." errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lplr_dask.errors import LplrError, LplrTypeError, LplrValueError
from lplr_dask.validation import at_most_one, exactly_one, expected, parse_bool, parse_choice, parse_float, parse_int


def test_expected_builds_the_message_and_is_returned_not_raised():
    e = expected("rank to be an integer", 2.5)
    assert isinstance(e, LplrValueError) and isinstance(e, ValueError) and isinstance(e, LplrError)
    assert str(e) == "Expected rank to be an integer. Got 2.5 instead."
    e = expected("a seed", "x", "Give an integer.", error=LplrTypeError)
    assert isinstance(e, LplrTypeError) and isinstance(e, TypeError)
    assert str(e) == "Expected a seed. Got 'x' instead. Give an integer."


# --------------------------------------------------------------------------------------------
# parse_int


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3)])
def test_parse_int_returns_a_plain_int(value):
    out = parse_int(value, "rank", minimum=1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 2.0, np.float64(2.0), "2", None])
def test_parse_int_refuses_what_is_not_a_count(value):
    with pytest.raises(LplrValueError, match=re.escape(f"Expected rank to be an integer >= 1. Got {value!r} instead.")):
        parse_int(value, "rank", minimum=1)


@pytest.mark.parametrize(
    "kwargs, value, message",
    [
        ({"minimum": 1}, 0, "Expected k to be an integer >= 1. Got 0 instead."),
        ({"maximum": 16}, 17, "Expected k to be an integer <= 16. Got 17 instead."),
        ({"minimum": 1, "maximum": 16}, 0, "Expected k to be an integer from 1 to 16. Got 0 instead."),
        ({"minimum": 1, "maximum": 16}, 17, "Expected k to be an integer from 1 to 16. Got 17 instead."),
        ({}, 1.5, "Expected k to be an integer. Got 1.5 instead."),
    ],
)
def test_parse_int_names_the_range(kwargs, value, message):
    with pytest.raises(LplrValueError, match=f"^{re.escape(message)}$"):
        parse_int(value, "k", **kwargs)


def test_parse_int_keeps_the_ends_of_the_range():
    assert parse_int(1, "k", minimum=1, maximum=16) == 1
    assert parse_int(16, "k", minimum=1, maximum=16) == 16
    assert parse_int(-5, "k") == -5


def test_parse_int_hint_and_error_type():
    with pytest.raises(LplrTypeError, match=r"^Expected seed to be an integer >= 0\. Got -1 instead\. Use 0\.$"):
        parse_int(-1, "seed", minimum=0, hint="Use 0.", error=LplrTypeError)


# --------------------------------------------------------------------------------------------
# parse_float


@pytest.mark.parametrize("value", [2, 2.0, np.float32(2.0), np.int64(2)])
def test_parse_float_returns_a_plain_float(value):
    out = parse_float(value, "budget", low=0)
    assert out == 2.0 and type(out) is float


@pytest.mark.parametrize("value", [True, np.bool_(False), "1", None, float("nan"), float("inf"), -float("inf")])
def test_parse_float_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(LplrValueError, match=r"^Expected budget to be a number > 0\. Got .* instead\.$"):
        parse_float(value, "budget", low=0, inclusive=(False, True))


@pytest.mark.parametrize(
    "inclusive, value, ok",
    [
        ((True, True), 0.0, True),
        ((True, True), 1.0, True),
        ((False, True), 0.0, False),
        ((True, False), 1.0, False),
        ((False, False), 0.5, True),
        ((True, True), -0.1, False),
        ((True, True), 1.1, False),
    ],
)
def test_parse_float_bounds(inclusive, value, ok):
    if ok:
        assert parse_float(value, "e", low=0, high=1, inclusive=inclusive) == value
    else:
        with pytest.raises(LplrValueError, match=r"Expected e to be a number"):
            parse_float(value, "e", low=0, high=1, inclusive=inclusive)


def test_parse_float_names_the_bounds():
    with pytest.raises(LplrValueError, match=r"^Expected e to be a number > 0 and < 1\. Got 1 instead\. Try 0\.05\.$"):
        parse_float(1, "e", low=0, high=1, inclusive=(False, False), hint="Try 0.05.")
    with pytest.raises(LplrValueError, match=r"^Expected noise to be a number >= 0\. Got -1 instead\.$"):
        parse_float(-1, "noise", low=0)
    with pytest.raises(LplrValueError, match=r"^Expected x to be a number <= 2\.5\. Got 3 instead\.$"):
        parse_float(3, "x", high=2.5)
    assert parse_float(-1e300, "x") == -1e300  # no bounds: any finite number


# --------------------------------------------------------------------------------------------
# parse_choice, parse_bool


def test_parse_choice():
    assert parse_choice("poly", "kind", ("lowrank", "poly")) == "poly"
    with pytest.raises(
        LplrValueError, match=r"^Expected kind to be one of 'lowrank', 'poly'\. Got 'nope' instead\. See --help\.$"
    ):
        parse_choice("nope", "kind", ("lowrank", "poly"), "See --help.")
    with pytest.raises(LplrValueError, match=r"one of 1, 2\. Got 3 instead"):
        parse_choice(3, "passes", [1, 2])


def test_parse_bool():
    assert parse_bool(True, "overwrite") is True
    assert parse_bool(np.bool_(False), "overwrite") is False
    for value in (0, 1, "yes", None):
        with pytest.raises(
            LplrTypeError, match=re.escape(f"Expected overwrite to be True or False. Got {value!r} instead.")
        ):
            parse_bool(value, "overwrite")


# --------------------------------------------------------------------------------------------
# exactly_one, at_most_one


def test_exactly_one_returns_the_one_given():
    assert exactly_one("rank or budget", rank=4, budget=None) == ("rank", 4)
    assert exactly_one("rank or budget", rank=None, budget=0) == ("budget", 0)  # 0 is given: only None is not


def test_exactly_one_refuses_none_or_several():
    with pytest.raises(LplrValueError, match=r"^Expected exactly one of rank or budget\. Got none instead\.$"):
        exactly_one("rank or budget", rank=None, budget=None)
    with pytest.raises(LplrValueError, match=r"^Expected exactly one of a, b or c\. Got a, c instead\.$"):
        exactly_one("a, b or c", a=1, b=None, c=2)


def test_at_most_one():
    at_most_one("overwrite and resume", overwrite=False, resume=False)
    at_most_one("overwrite and resume", overwrite=True, resume=False)
    at_most_one("overwrite and resume", overwrite=None, resume=0)
    with pytest.raises(LplrValueError, match=r"^Give at most one of overwrite and resume\. Got overwrite, resume\.$"):
        at_most_one("overwrite and resume", overwrite=True, resume=True)

"""Tests of lplr_dask/schema.py: the ``lplr`` attrs are checked once, when a store opens; keys a
reader does not know are ignored; the arrays' shapes follow from the attrs."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import schema
from lplr_dask.errors import StoreFormatError
from lplr_dask.quantize import QuantizerSpec

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v2-group.lplr.zarr")


def _with_attrs(tmp_path, edit) -> str:
    """A copy of the v2 group8 fixture whose ``lplr`` attrs ``edit`` changed in place."""
    path = os.fspath(tmp_path / "s.lplr.zarr")
    shutil.copytree(FIXTURE, path)
    g = zarr.open_group(path, mode="r+")
    meta = g.attrs["lplr"]
    edit(meta)
    g.attrs["lplr"] = meta
    return path


def _set(key: str, value):
    def edit(meta):
        *parents, last = key.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("complete", "no", "true or false"),
        ("version", True, "a positive integer"),
        ("version", "2", "a positive integer"),
        ("rank", 0, "an integer >= 1"),
        ("bits", [4, 17], "a list of two integers 1 to 16"),
        ("bits", [4], "a list of two integers 1 to 16"),
        ("passes", 3, "an integer from 1 to 2"),
        ("quantizer.L.granularity", "row", "'tensor', 'channel' or 'group'"),
        ("quantizer.L.group_size", 0, "an integer >= 1"),
        ("quantizer.R.symmetric", "yes", "true or false"),
        ("quantizer.R.rounding", "up", "'nearest' or 'stochastic' or 'gptq'"),
        ("source.shape", [24, -16], "a list of two integers >= 1"),
        ("source.shape", [24], "a list of two integers >= 1"),
        ("source.dtype", 4, "a dtype name"),
    ],
)
def test_attrs_of_the_wrong_type_are_refused_naming_the_key(tmp_path, key, value, expected):
    path = _with_attrs(tmp_path, _set(key, value))
    message = f"Expected attrs 'lplr.{key}' of {path!r} to be {expected}"
    pattern = "^" + re.escape(message) + r".* Got .* instead\. .*recompress or restore it"
    with pytest.raises(StoreFormatError, match=pattern):
        lplr_dask.open_factors(path)


def test_unknown_keys_are_ignored_inside_the_quantizer_too(tmp_path, client):
    def edit(meta):
        meta["quantizer"]["L"]["dither"] = {"kind": "blue-noise"}  # a later version's optional key
        meta["new_key"] = 1

    f = lplr_dask.open_factors(_with_attrs(tmp_path, edit))
    expected = np.load(FIXTURE.replace(".lplr.zarr", ".expected.npy"))
    np.testing.assert_allclose(f.to_dask(np.float64).compute(), expected, rtol=1e-12, atol=1e-12)


def test_a_shape_that_disagrees_with_the_arrays_is_refused(tmp_path):
    path = _with_attrs(tmp_path, _set("source.shape", [24, 17]))  # R/codes holds 16 columns
    message = (
        f"Expected array R/codes of {path!r} of shape (3, 17) and dtype uint8 (from its attrs 'lplr': "
        "source.shape, rank, bits, quantizer). Got shape (3, 16) and dtype uint8 instead."
    )
    with pytest.raises(StoreFormatError, match="^" + re.escape(message)):
        lplr_dask.open_factors(path)
    path = _with_attrs(tmp_path / "b", _set("quantizer.R.group_size", 4))  # R/scale holds ceil(16/8) groups
    pattern = re.escape("Expected array R/scale of") + r".*shape \(3, 4\).*Got shape \(3, 2\)"
    with pytest.raises(StoreFormatError, match=pattern):
        lplr_dask.open_factors(path)


def test_parse_quantizer_spec_uses_known_fields_and_defaults():
    spec = schema.parse_quantizer_spec({"granularity": "channel", "extra": [1]}, "s", "quantizer.L")
    assert spec == QuantizerSpec("channel", 0, False, "nearest")
    spec = schema.parse_quantizer_spec({"granularity": "group", "group_size": 8, "symmetric": True}, "s", "quantizer.R")
    assert spec == QuantizerSpec("group", 8, True, "nearest")


def test_array_shapes_follow_the_format_table():
    meta = {
        "source": {"shape": [100, 30]},
        "rank": 5,
        "quantizer": {"L": {"granularity": "group", "group_size": 32}, "R": {"granularity": "channel"}},
    }
    assert schema.array_shapes(meta) == {
        "L/codes": (100, 5),
        "R/codes": (5, 30),
        "L/scale": (4, 5),
        "L/offset": (4, 5),
        "R/scale": (5, 1),
        "R/offset": (5, 1),
    }
    meta["quantizer"]["R"] = {"granularity": "tensor"}
    assert schema.array_shapes(meta)["R/scale"] == (1, 1)

"""docs/FORMAT.md: its reader runs, it documents every attr, and old fixture stores still open."""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask.errors import StoreFormatError
from lplr_dask.store import FORMAT_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "FORMAT.md")
FIXTURES = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "v*.lplr.zarr")))


def _doc() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def reader():
    """The reader in docs/FORMAT.md, extracted and executed: its namespace."""
    block = re.search(r"<!-- reader:begin -->\s*```python\n(.*?)```\s*<!-- reader:end -->", _doc(), re.S)
    assert block, "docs/FORMAT.md lost its reader block"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 36 and "lplr_dask" not in code  # short, numpy and zarr only
    namespace: dict = {}
    exec(compile(code, DOC, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def read_lplr(reader):
    """The documented ``read_lplr`` with ``read_backbone``: (L, R, Q)."""
    return lambda path: (*reader["read_lplr"](path), reader["read_backbone"](path))


def test_a_fixture_of_the_current_version_is_committed():
    versions = {int(re.match(r"v(\d+)-", os.path.basename(p)).group(1)) for p in FIXTURES}
    assert FORMAT_VERSION in versions, "run tests/fixtures/make_fixture.py after a format version change"
    assert set(range(1, FORMAT_VERSION + 1)) <= versions  # every version ever written stays tested


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_todays_reader_opens_every_fixture(path, client):
    expected = np.load(path.replace(".lplr.zarr", ".expected.npy"))
    f = lplr_dask.open_factors(path)
    np.testing.assert_allclose(f.to_dask(np.float64).compute(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f.matvec(np.ones(f.shape[1])), expected @ np.ones(f.shape[1]), rtol=1e-10)


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_the_documented_reader_decodes_every_fixture(path, read_lplr, reader):
    assert len(reader["read_lplr"](path)) == 2  # (L, R), as the reader of versions 1 and 2 returned
    L, R, Q = read_lplr(path)
    np.testing.assert_allclose(L @ R + Q, np.load(path.replace(".lplr.zarr", ".expected.npy")), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "quantizer, bits",
    [("paper", (3, 5)), ("default", (8, 8)), ("group48-sym", (4, 4)), ("channel-stochastic", (2, 12))],
)
def test_the_documented_reader_matches_factors_on_fresh_stores(
    client, tmp_store, small_matrix, read_lplr, quantizer, bits
):
    f = lplr_dask.compress(small_matrix, tmp_store, rank=9, bits=bits, quantizer=quantizer)
    L, R, Q = read_lplr(tmp_store)
    np.testing.assert_allclose(L, f.L().compute(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(R, f.R().compute(), rtol=1e-12, atol=1e-12)
    assert Q == 0.0


def test_the_documented_reader_decodes_a_backbone(client, tmp_store, small_matrix, read_lplr):
    f = lplr_dask.compress(small_matrix, tmp_store, rank=5, backbone_bits=3)
    L, R, Q = read_lplr(tmp_store)
    np.testing.assert_allclose(Q, f.Q().compute(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(L @ R + Q, f.to_dask(np.float64).compute(), rtol=1e-12, atol=1e-10)


def test_every_attr_of_a_store_is_documented(client, tmp_path, small_matrix):
    f = lplr_dask.compress(small_matrix, tmp_path / "t.lplr.zarr", target_error=0.2)
    lplr_dask.evaluate(small_matrix, f)
    attrs = zarr.open_group(tmp_path / "t.lplr.zarr", mode="r").attrs["lplr"]
    lplr_dask.compress(small_matrix, tmp_path / "b.lplr.zarr", rank=4, backbone_bits=2, backbone_iters=2)
    with_backbone = zarr.open_group(tmp_path / "b.lplr.zarr", mode="r").attrs["lplr"]
    doc = _doc()
    keys = set(attrs) | {f"{k}.{sub}" for k in ("source", "sketch", "target_error") for sub in attrs[k]}
    keys |= {f"quantizer.L.{sub}" for sub in attrs["quantizer"]["L"]} | set(attrs["timings"])
    keys |= set(with_backbone) | {f"backbone.{sub}" for sub in with_backbone["backbone"]}
    keys |= set(with_backbone["timings"])
    missing = sorted(k for k in keys if f"`{k.rsplit('.', 1)[-1]}`" not in doc)
    assert not missing, f"docs/FORMAT.md does not describe {missing}"
    assert f"# The `*.lplr.zarr` format, version {FORMAT_VERSION}" in doc


def test_the_reader_and_open_factors_refuse_newer_and_incomplete_stores(tmp_path, read_lplr):
    import shutil

    for change, message in (({"version": FORMAT_VERSION + 1}, "Upgrade"), ({"complete": False}, "incomplete")):
        path = tmp_path / f"{next(iter(change))}.lplr.zarr"
        shutil.copytree(FIXTURES[0], path)
        g = zarr.open_group(path, mode="r+")
        g.attrs["lplr"] = {**g.attrs["lplr"], **change}
        with pytest.raises(StoreFormatError, match=message):
            lplr_dask.open_factors(path)
        with pytest.raises(ValueError, match="not a complete lplr-zarr store"):
            read_lplr(path)

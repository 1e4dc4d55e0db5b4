"""Tests for lplr_dask/store.py."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from lplr_dask import store
from lplr_dask.quantize import quantize

# ---------------------------------------------------------------------------------------------
# Codes on disk: the codec choice and the bit budget
# ---------------------------------------------------------------------------------------------

#: The bound of issue 5: codes take at most 5% more than ``entries × B / 8`` bytes on disk.
SLACK = 1.05


def _uniform_codes(shape: tuple[int, int], bits: int, seed: int = 0) -> np.ndarray:
    """Codes spread evenly over all ``2**bits`` levels: incompressible beyond ``bits/8``."""
    return np.random.default_rng(seed).integers(0, 1 << bits, shape).astype(np.uint8)


def _gaussian_codes(shape: tuple[int, int], bits: int, seed: int = 0) -> np.ndarray:
    """Gaussian data under one min-max range (the paper's quantizer): few levels used often."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.asarray(quantize(x, bits, spec="paper").codes)


def _chunk_bytes(tmp_path, name: str) -> int:
    """Bytes of the chunk files of array ``name`` in the test store (its ``zarr.json`` left out)."""
    return store.bytes_on_disk(tmp_path / "s.zarr", f"{name}/c")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("make", [_uniform_codes, _gaussian_codes], ids=["uniform", "gaussian"])
def test_codes_on_disk_within_the_bit_budget(tmp_path, bits, make):
    shape, chunks = (4096, 64), (1024, 64)
    codes = make(shape, bits)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = store.create_codes(group, "codes", shape, chunks, bits, sample_from=da.from_array(codes, chunks=chunks))
    arr[...] = codes
    assert _chunk_bytes(tmp_path, "codes") <= SLACK * codes.size * bits / 8
    np.testing.assert_array_equal(arr[...], codes)


def test_codes_on_disk_beat_the_budget_where_they_are_skewed(tmp_path):
    # entropy coding is the point of trying Zstd: Gaussian codes under a min-max range at 2 bits
    # use two of their four levels 95% of the time (measured 0.76 of 2/8 on such codes)
    shape, chunks = (4096, 64), (1024, 64)
    codes = _gaussian_codes(shape, 2)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = store.create_codes(group, "codes", shape, chunks, 2, sample_from=codes)
    arr[...] = codes
    assert _chunk_bytes(tmp_path, "codes") <= 0.85 * codes.size * 2 / 8


def test_codes_compressor_picks_the_smaller_codec():
    assert isinstance(store.codes_compressor(2), BloscCodec)  # no sample: the bit-shuffle bound
    assert isinstance(store.codes_compressor(1, _uniform_codes((1024, 64), 1)), BloscCodec)
    assert isinstance(store.codes_compressor(2, _gaussian_codes((1024, 64), 2)), ZstdCodec)


def test_codes_on_disk_of_uint16_codes(tmp_path):
    bits, shape = 12, (2048, 64)
    codes = np.random.default_rng(1).integers(0, 1 << bits, shape).astype(np.uint16)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = store.create_codes(group, "codes", shape, (512, 64), bits, sample_from=codes)
    assert arr.dtype == np.uint16
    arr[...] = codes
    assert _chunk_bytes(tmp_path, "codes") <= SLACK * codes.size * bits / 8


@pytest.mark.parametrize("axis", [0, 1])
def test_codes_sample_is_one_chunk_from_across_the_array(axis):
    # value = the index along the chunked axis, so the sample shows where its runs come from
    length, width, chunk = 1000, 6, 80
    x = np.broadcast_to(np.arange(length)[:, None], (length, width)).astype(np.int64)
    x = x if axis == 0 else x.T
    chunks = (chunk, width) if axis == 0 else (width, chunk)
    sample = store.codes_sample(da.from_array(x, chunks=(50, 50)), chunks)
    assert sample.shape == chunks
    taken = np.unique(sample)
    assert taken.size == chunk and taken[0] == 0 and taken[-1] == length - 1
    runs = np.split(taken, np.flatnonzero(np.diff(taken) > 1) + 1)
    assert len(runs) == store.SAMPLE_RUNS and all(r.size == chunk // store.SAMPLE_RUNS for r in runs)


def test_codes_sample_of_a_one_chunk_array_is_the_array():
    x = np.arange(12).reshape(4, 3)
    np.testing.assert_array_equal(store.codes_sample(da.from_array(x), (8, 3)), x)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_compress_stores_codes_within_the_bit_budget(client, tmp_store, bits):
    import lplr_dask
    from lplr_dask.datasets import synthetic

    n, d, k = 1024, 512, 64
    A = synthetic((n, d), rank=16, chunks=(256, 256), seed=2)
    f = lplr_dask.compress(A, tmp_store, rank=k, bits=(bits, bits), log=lambda m: None)
    for name, entries in (("L", n * k), ("R", k * d)):
        assert store.bytes_on_disk(tmp_store, f"{name}/codes/c") <= SLACK * entries * bits / 8
    assert store.codes_bytes(tmp_store) <= SLACK * k * (n + d) * bits / 8
    assert 0 < store.codes_bytes(tmp_store) < f.nbytes


def test_info_splits_codes_from_scales_and_metadata(client, tmp_store, small_matrix):
    import lplr_dask
    from lplr_dask.cli import _summary

    f = lplr_dask.compress(small_matrix, tmp_store, rank=8, bits=(4, 4), log=lambda m: None)
    s = _summary(f)
    assert s["bytes_codes"] == store.codes_bytes(tmp_store)
    assert s["bytes_codes"] + s["bytes_scales_and_metadata"] == s["bytes_on_disk"] == f.nbytes
    assert s["bytes_scales_and_metadata"] >= store.bytes_on_disk(tmp_store, "zarr.json")

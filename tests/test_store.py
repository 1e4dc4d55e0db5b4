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


def test_a_store_writes_its_json_documents_compact_and_leaves_zarrs_setting(client, tmp_store, small_matrix):
    """Every zarr.json of a store (a backbone's too) is one line; the caller's zarr keeps its indent."""
    import glob
    import json
    import os

    import lplr_dask

    before = zarr.config.get("json_indent")
    lplr_dask.compress(small_matrix, tmp_store, rank=8, bits=(4, 4), backbone_bits=2, log=lambda m: None)
    documents = glob.glob(os.path.join(tmp_store, "**", "zarr.json"), recursive=True)
    assert len(documents) >= 13  # the root, L, R, Q and their codes, scales and offsets
    for path in documents:
        text = open(path).read()
        assert "\n" not in text.strip(), path
        assert text == json.dumps(json.loads(text)), path  # json's compact form, nothing lost
    assert zarr.config.get("json_indent") == before
    with zarr.config.set({"json_indent": 2}):
        store.write_meta(store.open_group(tmp_store, mode="r+"), {"x": 1}, "other")
        assert zarr.config.get("json_indent") == 2
    assert "\n" not in open(os.path.join(tmp_store, "zarr.json")).read().strip()


# ---------------------------------------------------------------------------------------------
# Integrity (format version 2): every chunk stored, each with a crc32c; missing chunks named
# ---------------------------------------------------------------------------------------------


def _chunk_files(root, name: str) -> list[str]:
    import os

    base = os.path.join(root, *name.split("/"))
    return sorted(
        os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs if f != "zarr.json"
    )


def test_every_array_written_stores_all_its_chunks_with_a_checksum(tmp_path):
    from zarr.codecs import Crc32cCodec

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    codes = np.zeros((64, 8), np.uint8)  # all fill values: Zarr's default would store no chunk
    arr = store.create_codes(group, "codes", codes.shape, (16, 8), 4, sample_from=codes)
    arr[...] = codes
    store.write_small(group, "scale", np.zeros((1, 8)))
    out = store.write_array(da.zeros((40, 30), chunks=(20, 10), dtype=np.float32), tmp_path / "w.zarr")
    assert _chunk_files(tmp_path / "s.zarr", "codes") == ["c/0/0", "c/1/0", "c/2/0", "c/3/0"]
    assert _chunk_files(tmp_path / "s.zarr", "scale") == ["c/0/0"]
    assert len(_chunk_files(tmp_path / "w.zarr", "")) == 6
    for a in (arr, group["scale"], out):
        assert isinstance(a.metadata.codecs[-1], Crc32cCodec)
    assert isinstance(arr.metadata.codecs[-2], (BloscCodec, ZstdCodec))  # the codec choice is kept


def test_missing_chunks_lists_what_the_store_lacks(tmp_path):
    import os

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = store.create_codes(group, "L/codes", (64, 8), (16, 8), 4)
    arr[...] = 1
    assert store.missing_chunks(arr) == []
    os.remove(tmp_path / "s.zarr" / "L" / "codes" / "c" / "2" / "0")
    assert store.missing_chunks(arr) == ["c/2/0"]


def test_damage_messages_name_the_chunks_and_what_to_do():
    one = [{"array": "L/codes", "chunk": "c/1/0", "problem": "is missing"}]
    assert store.damage_message("s.lplr.zarr", one) == (
        "s.lplr.zarr: chunk L/codes c/1/0 is missing — the store is damaged; recompress or restore it"
    )
    assert store.damage_message("s.lplr.zarr", one, version=1) == (
        "s.lplr.zarr: chunk L/codes c/1/0 is missing (a version-1 store leaves out a chunk whose values are "
        "all 0, which codes almost never are) — most likely the store is damaged; recompress or restore it"
    )
    many = [{"array": "R/codes", "chunk": f"c/0/{j}", "problem": "is missing"} for j in range(8)]
    assert store.damage_message("s", many) == (
        "s: 8 chunks are damaged: R/codes c/0/0 is missing; R/codes c/0/1 is missing; R/codes c/0/2 is "
        "missing; R/codes c/0/3 is missing; R/codes c/0/4 is missing; and 3 more — the store is damaged; "
        "recompress or restore it"
    )


def test_read_chunks_names_a_chunk_that_fails_to_decode(tmp_path):
    from lplr_dask.errors import StoreFormatError

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = store.create_codes(group, "R/codes", (4, 30), (4, 10), 8)
    arr[...] = np.arange(120).reshape(4, 30)
    x = store.read_chunks(arr, "R/codes", "s.lplr.zarr")
    assert x.chunks == ((4,), (10, 10, 10))
    np.testing.assert_array_equal(x.compute(scheduler="sync"), np.arange(120).reshape(4, 30))
    chunk = tmp_path / "s.zarr" / "R" / "codes" / "c" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    with pytest.raises(StoreFormatError, match=r"^s\.lplr\.zarr: chunk R/codes c/0/1 fails its crc32c checksum"):
        x.compute(scheduler="sync")
    np.testing.assert_array_equal(x[:, 20:].compute(scheduler="sync"), np.arange(120).reshape(4, 30)[:, 20:])
    chunk.unlink()  # deleted after the store was opened: zarr would read zeros
    with pytest.raises(StoreFormatError, match=r"^s\.lplr\.zarr: chunk R/codes c/0/1 is missing — the store"):
        x.compute(scheduler="sync")


# ---------------------------------------------------------------------------------------------
# The scratch of a running job: its names and its layout on disk (part of the format)
# ---------------------------------------------------------------------------------------------


def test_scratch_names_are_the_work_group_of_the_format():
    import lplr_dask

    assert store.SCRATCH == "_work"  # on disk: a store left by an older version resumes
    assert set(store.SCRATCH_ARRAYS) == {"Y", "AG", "Z", "PT", "W", "W_done", "Y_done", "sumsq"}
    assert [store.scratch_name(n) for n in ("Y", "W_done")] == ["_work/Y", "_work/W_done"]
    with pytest.raises(
        lplr_dask.LplrValueError, match=r"Expected a scratch array to be one of 'Y', .* Got 'L' instead"
    ):
        store.scratch_name("L")


def test_scratch_arrays_on_disk_and_their_removal(tmp_path):
    from zarr.codecs import Crc32cCodec

    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    store.remove_scratch(group)  # none yet: nothing to do
    y = store.create_scratch(group, "Y", (40, 3), (20, 3))
    marks = store.create_scratch_marks(group, "W_done", 5)
    assert group["_work/Y"].shape == (40, 3) and y.dtype == np.float64 and y.chunks == (20, 3)
    assert [type(c) for c in y.metadata.codecs[1:]] == [Crc32cCodec]  # uncompressed, checksummed
    assert marks.dtype == np.uint8 and marks.chunks == (1,) and np.asarray(marks[...]).tolist() == [0] * 5
    marks[3] = 1
    assert np.asarray(group[store.scratch_name("W_done")][...]).tolist() == [0, 0, 0, 1, 0]
    store.create_scratch(group, "W", (3, 40), (3, 20))[...] = 1.0
    assert store.bytes_on_disk(tmp_path / "s.zarr", "_work/W/c") == 2 * (3 * 20 * 8 + store.CHECKSUM_BYTES)
    store.remove_scratch(group)
    assert store.SCRATCH not in zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert not (tmp_path / "s.zarr" / "_work").exists()

"""Task sizes from the input's chunking: merged tiny chunks, warnings that carry the fix."""

from __future__ import annotations

import math
import os

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import blocks, chunking, factorize
from lplr_dask.blocks import PANEL_ROWS
from lplr_dask.datasets import synthetic
from lplr_dask.errors import LplrValueError
from lplr_dask.factorize import Params
from lplr_dask.quantize import quantizer_pair
from lplr_dask.sources import as_matrix, read_source


def _params(rank: int = 64, passes: int = 2) -> Params:
    spec_l, spec_r = quantizer_pair("default")
    return Params(rank=rank, bits=(8, 8), quantizer="default", spec_l=spec_l, spec_r=spec_r, passes=passes)


def test_well_chunked_input_is_left_alone():
    A = da.zeros((32768, 16384), chunks=(4096, 4096), dtype=np.float32)
    logged: list[str] = []
    assert chunking.plan(A, _params(256), source="A.zarr", log=logged.append) is A
    assert logged == []


def test_many_tiny_chunks_are_read_merged_whole():
    A = da.zeros((32768, 16384), chunks=(256, 128), dtype=np.float32)
    logged: list[str] = []
    B = chunking.plan(A, _params(), source="/data/A.zarr", log=logged.append)
    rows, cols = B.chunksize
    # aligned: every merged chunk is a whole number of stored chunks, near the target size
    assert rows % 256 == 0 and cols % 128 == 0
    assert chunking.TARGET_ENTRIES // 2 < rows * cols <= chunking.TARGET_ENTRIES
    (msg,) = logged
    assert "16384 chunks" in msg and f"as {B.chunksize} chunks" in msg
    assert "da.from_zarr('/data/A.zarr').rechunk((4096, 4096)).to_zarr('/data/A-rechunked.zarr')" in msg
    assert msg.endswith("Current shape: (32768, 16384), current chunksize: (256, 128).")


def test_few_small_chunks_are_not_merged():
    A = da.zeros((600, 400), chunks=(128, 128), dtype=np.float32)  # 20 tasks: overhead is fine
    logged: list[str] = []
    assert chunking.plan(A, _params(8), log=logged.append) is A and logged == []


@pytest.mark.parametrize(
    "shape, chunks",
    [((100_000, 100_000), (16384, 16384)), ((10_000_000, 1000), (10_000_000, 1))],
    ids=["large-square", "whole-columns"],
)
def test_chunks_that_force_large_tasks_warn_with_the_fix(shape, chunks):
    A = da.zeros(shape, chunks=chunks, dtype=np.float32)
    logged: list[str] = []
    assert chunking.plan(A, _params(256), log=logged.append) is A
    (msg,) = logged
    assert "MiB" in msg and f"A = A.rechunk({chunking.suggested_chunks(shape)})" in msg


def test_task_bytes_grow_with_chunk_and_rank_not_with_matrix():
    small = chunking.task_bytes((4096, 4096), 4, 256, 10)
    assert chunking.task_bytes((4096, 4096), 4, 512, 10) > small
    assert chunking.task_bytes((8192, 4096), 4, 256, 10) > small
    assert chunking.task_bytes((4096, 4096), 4, 256, 10, oversample=1025) > small
    # the chunk itself and one float64 panel are always counted
    assert small > 4096 * 4096 * 4 + PANEL_ROWS * 4096 * 8


@pytest.mark.parametrize(
    "shape, expected",
    [((32768, 16384), (4096, 4096)), ((600, 400), (600, 400)), ((10_000_000, 1000), (16777, 1000))],
)
def test_suggested_chunks(shape, expected):
    assert chunking.suggested_chunks(shape) == expected


def test_compress_passes_the_warning_to_its_log(client, small_matrix, tmp_store, monkeypatch):
    monkeypatch.setattr(chunking, "MAX_TASK_BYTES", 1)
    logged: list[str] = []
    lplr_dask.compress(small_matrix, tmp_store, rank=4, log=logged.append)
    assert any(m.startswith("warning: with chunks of (128, 128) at rank 4") for m in logged), logged


# --------------------------------------------------------------------------------------------
# merging by task count (issue 15): Zarr opened at the merged chunks, bounded by worker memory


class _Workers:
    """A stand-in client whose workers have ``memory`` bytes over ``threads`` threads each."""

    def __init__(self, memory: int, threads: int = 1):
        self.info = {"workers": {"w0": {"memory_limit": memory, "nthreads": threads}}}

    def scheduler_info(self):
        return self.info


def _virtual(tmp_path, shape, chunks):
    """A Zarr array of ``shape`` and ``chunks`` with no chunk written: opening and planning read nothing."""
    path = os.fspath(tmp_path / "virtual.zarr")
    zarr.create_array(store=path, shape=shape, chunks=chunks, dtype="float32", fill_value=0)
    src = read_source(path)
    return src, as_matrix(src)


def test_200k_tiny_zarr_chunks_give_at_most_5k_pass1_tasks(tmp_path):
    src, A = _virtual(tmp_path, (114688, 114688), (256, 256))
    assert A.npartitions == 200_704
    logged: list[str] = []
    B = chunking.plan(A, _params(256), source=src, log=logged.append)
    assert B.chunksize == (4096, 4096) and B.npartitions == 784
    assert len(B.__dask_graph__()) == B.npartitions + 1  # one getter per merged chunk (+ the reader), no rechunk
    products = factorize.pass1(B, _params(256))
    assert len(dask.base.merge(*(x.__dask_graph__() for x in products.values()))) <= 5000
    assert "200704 chunks" in logged[0] and "16x16 at a time" in logged[0]


def test_a_pass_of_a_virtual_4tb_matrix_plans_at_most_20k_tasks(tmp_path):
    src, A = _virtual(tmp_path, (10**7, 10**5), (4096, 4096))
    params = _params(256)
    logged: list[str] = []
    B = chunking.plan(A, params, source=src, log=logged.append)
    assert A.npartitions == 61_050 and B.npartitions <= chunking.max_tasks() == 20_000
    rows, cols = B.chunksize
    assert rows % 4096 == 0 and cols % 4096 == 0 and len(B.__dask_graph__()) == B.npartitions + 1
    assert chunking.task_bytes(B.chunksize, 4, 256, 10) <= chunking.task_memory(None) <= chunking.MAX_TASK_BYTES
    chunking.check_memory(B, params, _Workers(4 * 2**30), log=logged.append)  # accepted, without a note
    assert logged == [
        f"note: the input's 61050 chunks are read 2x2 at a time as {B.chunksize} chunks: "
        f"{B.npartitions} tasks per pass (lplr.chunking.max-tasks: 20000)"
    ]


def test_merged_tasks_stay_within_the_workers_memory(tmp_path):
    src, A = _virtual(tmp_path, (10**7, 10**5), (4096, 4096))
    params = _params(256)
    small = _Workers(2 * 2**30, threads=2)  # 1 GiB per thread: 300 MiB per task at most
    logged: list[str] = []
    B = chunking.plan(A, params, source=src, client=small, log=logged.append)
    assert chunking.task_memory(small) == int(chunking.TASK_SHARE * 2**30 / 2)
    assert A.npartitions > B.npartitions > chunking.max_tasks()  # as far as memory lets it
    assert chunking.task_bytes(B.chunksize, 4, 256, 10) <= chunking.task_memory(small)
    assert "more than lplr.chunking.max-tasks (20000)" in logged[-1]
    chunking.check_memory(B, params, small, log=logged.append)  # what plan chose, check_memory accepts


def test_max_tasks_is_a_dask_config_key():
    A = da.zeros((4096, 4096), chunks=(1024, 1024), dtype=np.float32)  # 16 chunks
    with dask.config.set({"lplr.chunking.max-tasks": 4}):
        B = chunking.plan(A, _params(8), log=lambda _: None)
    assert B.chunksize == (2048, 2048) and B.npartitions == 4  # not Zarr: rechunked, as before
    with dask.config.set({"lplr.chunking.max-tasks": 0}), pytest.raises(LplrValueError, match="max-tasks"):
        chunking.plan(A, _params(8), log=lambda _: None)


def test_merged_zarr_reads_keep_codes_and_a_resume_keeps_the_chunking(client, tmp_path):
    """Same merged chunking, same codes (even float32 products); float64 products: the same codes
    as the stored chunking. A resumed job reads with the chunking its store recorded."""
    data = synthetic((600, 400), rank=12, decay=0.8, noise=0.01, chunks=(128, 128), seed=3).compute()
    zarr.create_array(os.fspath(tmp_path / "tiny.zarr"), data=data, chunks=(64, 64))  # 70 chunks
    zarr.create_array(os.fspath(tmp_path / "merged.zarr"), data=data, chunks=(256, 256))
    kw = dict(rank=8, seed=5, log=lambda _: None)
    with dask.config.set({"lplr.chunking.max-tasks": 8}):  # 70 chunks of 64², read 4x4 at a time: 6 tasks
        a = lplr_dask.compress(tmp_path / "tiny.zarr", tmp_path / "a.lplr.zarr", **kw)
        a64 = lplr_dask.compress(tmp_path / "tiny.zarr", tmp_path / "a64.lplr.zarr", precision="float64", **kw)
    b = lplr_dask.compress(tmp_path / "merged.zarr", tmp_path / "b.lplr.zarr", **kw)
    c64 = lplr_dask.compress(tmp_path / "tiny.zarr", tmp_path / "c64.lplr.zarr", precision="float64", **kw)
    assert a.attrs["source"]["chunks"] == [256, 256] and c64.attrs["source"]["chunks"] == [64, 64]
    for x, y in [(a, b), (a64, c64)]:
        for cx, cy in zip(_codes(x.path), _codes(y.path)):
            np.testing.assert_array_equal(cx, cy)
    src = read_source(tmp_path / "tiny.zarr")
    logged: list[str] = []
    B = chunking.plan(as_matrix(src), _params(8), source=src, resume=a.path, log=logged.append)
    assert B.chunksize == (256, 256) and logged == [
        "resume: reading the input as (256, 256) chunks, as the store's job started"
    ]


def _codes(path):
    g = zarr.open_group(path, mode="r")
    return g["L/codes"][...], g["R/codes"][...]


def test_zarr_and_file_sources_are_read_by_strips_of_the_planned_chunks(tmp_path):
    data = np.arange(600 * 500, dtype=np.int16).reshape(600, 500)
    zarr.create_array(store=os.fspath(tmp_path / "a.zarr"), data=data, chunks=(100, 50))
    np.save(tmp_path / "a.npy", data)
    for where in (tmp_path / "a.zarr", tmp_path / "a.npy"):
        src = read_source(os.fspath(where), chunks=(100, 50))
        A = as_matrix(src)
        strips = chunking.strips(A, src)
        assert strips is not None and strips.width == 4, where
        rows, cols = slice(100, 300), slice(50, 250)
        np.testing.assert_array_equal(strips.reader(rows, cols), A[rows, cols].compute())  # cast like A: float32
        assert strips.reader(rows, cols).dtype == A.dtype == np.float32
    dask_src = read_source(da.from_array(data.astype(np.float32), chunks=100))
    assert chunking.strips(as_matrix(dask_src), dask_src) is None  # a dask array: a task per chunk


def test_strips_widen_to_keep_a_pass_within_max_tasks(tmp_path):
    src, A = _virtual(tmp_path, (10**6, 10**5), (4096, 4096))  # 245 x 25 chunks
    assert chunking.strips(A, src).width == 4
    with dask.config.set({"lplr.chunking.max-tasks": 1000}):
        assert chunking.strips(A, src).width == math.ceil(A.npartitions * (4 / 3) / 1000) == 9
    with dask.config.set({"lplr.chunking.max-tasks": 10}):
        assert chunking.strips(A, src).width == 25  # at most a row of chunks


def test_both_passes_of_a_virtual_matrix_are_under_one_task_per_chunk(tmp_path):
    from dask.base import collections_to_expr

    src, A = _virtual(tmp_path, (10**6, 10**5), (4096, 4096))
    params = _params(256)
    strips = chunking.strips(A, src)
    rows, _ = factorize._pass1_blocks(A, params, strips=strips)
    pass1 = blocks.map_row_blocks(rows, lambda x, i, r0: 1.0)
    PT = da.zeros((A.shape[0], 256), chunks=(4096, 256))
    pass2 = blocks.map_column_blocks(factorize.project(A, PT, strips=strips), lambda w, j, c0: 1.0)
    for x in (pass1, pass2):
        tasks = len(collections_to_expr([x], optimize_graph=True).__dask_graph__())
        assert tasks <= 0.6 * A.npartitions, (tasks, A.npartitions)


def test_strips_narrow_to_keep_one_per_thread_of_the_cluster(tmp_path):
    src, A = _virtual(tmp_path, (4096 * 8, 4096 * 8), (4096, 4096))  # 8 x 8 chunks
    assert chunking.strips(A, src).width == 4  # 16 strips
    assert chunking.strips(A, src, threads=16).width == 4  # 16 strips: one per thread
    assert chunking.strips(A, src, threads=17).width == 3  # 24 strips
    assert chunking.strips(A, src, threads=32).width == 2  # 32 strips
    assert chunking.strips(A, src, threads=1000).width == 1  # a chunk per task: as many as there are

"""Task sizes from the input's chunking: merged tiny chunks, warnings that carry the fix."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

import lplr_dask
from lplr_dask import chunking
from lplr_dask.blocks import PANEL_ROWS
from lplr_dask.factorize import Params
from lplr_dask.quantize import quantizer_pair


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

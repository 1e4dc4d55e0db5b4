"""How often compress reads A: twice (two-pass), once (one-pass), 2 + 2q with power iterations.

A wrapping Zarr store appends each chunk key it serves to a file, so reads are counted across
the worker processes of the cluster, through the whole public ``compress``.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

import lplr_dask
from lplr_dask import guard


class CountingStore(WrapperStore[Any]):
    """Records every chunk read (``get`` of a ``c/…`` key) as a line in ``log_path``; a read of
    a byte range (what the input's fingerprint samples) as the key followed by ``~range``."""

    def __init__(self, store: Any, log_path: str):
        super().__init__(store)
        self.log_path = log_path

    def _with_store(self, store: Any) -> CountingStore:
        return type(self)(store, self.log_path)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if key.startswith("c/"):
            with open(self.log_path, "a") as f:  # O_APPEND: whole short lines from any process
                f.write(key + ("~range" if byte_range is not None else "") + "\n")
        return await self._store.get(key, prototype, byte_range)

    async def getsize(self, key: str) -> int:  # zarr's WrapperStore leaves it to Store's, a whole get
        return await self._store.getsize(key)


@pytest.fixture
def counted(tmp_path):
    """A 600×400 matrix in 128×128 chunks (20 chunks) opened through a CountingStore."""
    path = os.fspath(tmp_path / "A.zarr")
    lplr_dask.generate(path, (600, 400), rank=12, chunks=(128, 128), seed=3)
    log = os.fspath(tmp_path / "reads.log")
    array = zarr.open_array(store=CountingStore(LocalStore(path, read_only=True), log), mode="r")

    def reads() -> collections.Counter[str]:
        if not os.path.exists(log):
            return collections.Counter()
        with open(log) as f:
            return collections.Counter(f.read().split())

    return array, reads


def whole(counts: collections.Counter[str]) -> collections.Counter[str]:
    """The reads of whole chunks among ``counts`` (the decoded reads of the passes)."""
    return collections.Counter({k: n for k, n in counts.items() if not k.endswith("~range")})


def assert_fingerprint_windows_only(counts: collections.Counter[str], jobs: int = 1) -> None:
    """The byte-range reads among ``counts`` are the fingerprint's: windows of the sampled
    chunks only, at most :data:`guard.FINGERPRINT_CHUNK_WINDOWS` each per job."""
    sampled = {"c/" + "/".join(map(str, c)) for c in guard._sample_coords((5, 4), guard.FINGERPRINT_CHUNKS)}
    assert len(sampled) == guard.FINGERPRINT_CHUNKS
    ranged = {k.removesuffix("~range"): n for k, n in counts.items() if k.endswith("~range")}
    assert set(ranged) == sampled, ranged
    assert all(jobs <= n <= jobs * guard.FINGERPRINT_CHUNK_WINDOWS for n in ranged.values()), ranged


def test_counting_store_counts(counted):
    array, reads = counted
    array[:130, :10]  # two chunks of the first column
    assert reads() == {"c/0/0": 1, "c/1/0": 1}


@pytest.mark.parametrize("passes, power_iters, expected", [(2, 0, 2), (1, 0, 1), (2, 1, 4)])
def test_compress_reads_each_chunk_exactly(client, counted, tmp_store, passes, power_iters, expected):
    array, reads = counted
    lplr_dask.compress(array, tmp_store, rank=8, passes=passes, power_iters=power_iters, log=lambda _: None)
    counts = reads()
    # every chunk read whole exactly this often; besides, a few byte ranges of the chunks the
    # input's fingerprint samples (lplr_dask.guard.fingerprint: stored bytes, not decoded)
    assert whole(counts) == dict.fromkeys((f"c/{i}/{j}" for i in range(5) for j in range(4)), expected), counts
    assert_fingerprint_windows_only(counts)


@pytest.mark.parametrize("power_iters", [0, 1])
def test_cache_input_reads_each_chunk_once_and_gives_the_same_codes(client, counted, tmp_path, power_iters):
    """``cache_input``: one read of each chunk for both passes (and the power iterations), the
    same codes as reading the source in each pass."""
    array, reads = counted
    plain = lplr_dask.compress(array, tmp_path / "plain.lplr.zarr", rank=8, power_iters=power_iters, log=lambda _: None)
    before = reads()
    lines: list[str] = []
    cached = lplr_dask.compress(
        array, tmp_path / "cached.lplr.zarr", rank=8, power_iters=power_iters, cache_input=True, log=lines.append
    )
    counts = reads() - before
    assert whole(counts) == dict.fromkeys((f"c/{i}/{j}" for i in range(5) for j in range(4)), 1), counts
    assert_fingerprint_windows_only(counts)
    assert "cache input" in cached.attrs["timings"]
    assert not any("does not fit" in line for line in lines)
    for name in ("L/codes", "R/codes"):
        np.testing.assert_array_equal(cached._arrays[name][...], plain._arrays[name][...])


def test_cache_input_that_does_not_fit_reads_the_source_in_each_pass(client, counted, tmp_store, monkeypatch):
    """Workers too small for A: a note, and the source is read twice as without the option."""
    array, reads = counted
    monkeypatch.setattr(lplr_dask.chunking, "cache_room", lambda A, params, client: A.nbytes - 1)
    lines: list[str] = []
    factors = lplr_dask.compress(array, tmp_store, rank=8, cache_input=True, log=lines.append)
    assert any("--cache-input" in line and "does not fit" in line for line in lines), lines
    assert "cache input" not in factors.attrs["timings"]
    counts = reads()
    assert whole(counts) == dict.fromkeys((f"c/{i}/{j}" for i in range(5) for j in range(4)), 2), counts
    assert_fingerprint_windows_only(counts)


def test_cache_input_with_one_pass_is_refused(counted, tmp_store):
    array, _ = counted
    with pytest.raises(lplr_dask.errors.LplrValueError, match="cache_input.*two passes"):
        lplr_dask.compress(array, tmp_store, rank=8, passes=1, cache_input=True)

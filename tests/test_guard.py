"""The user's data is never destroyed: outputs that overlap an input, foreign ``--overwrite``
targets, a second writer and a changed input are refused before anything is written; tiny and
huge values give correct estimates."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import guard
from lplr_dask.errors import LplrValueError, NonFiniteError, StoreFormatError

LPLR = [sys.executable, "-m", "lplr_dask.cli"]
CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "--memory-limit", "2GiB"]


def lplr(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LPLR, *map(str, args)], capture_output=True, text=True, timeout=300)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        os.path.relpath(os.path.join(d, f), root): hashlib.sha256(Path(d, f).read_bytes()).hexdigest()
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "par" / "a.zarr"
    lplr_dask.generate(path, (300, 200), rank=6, noise=0.01, chunks=(128, 128), seed=1)
    return path


# --------------------------------------------------------------------------------------------
# outputs that would destroy an input


@pytest.mark.parametrize(
    "case",
    ["same", "parent", "inside"],
)
def test_location_relations_are_refused(source, case):
    out = {"same": source, "parent": source.parent, "inside": source / "x.lplr.zarr"}[case]
    with pytest.raises(
        LplrValueError,
        match={"same": " is the input", "parent": "contains the input", "inside": "lies inside the input"}[case],
    ):
        guard.check_output(out, [source], overwrite=True)


def test_symlinked_and_relative_spellings_are_resolved(source, tmp_path, monkeypatch):
    link = tmp_path / "link.zarr"
    link.symlink_to(source, target_is_directory=True)
    with pytest.raises(LplrValueError, match="is the input"):
        guard.check_output(link, [source])
    monkeypatch.chdir(source.parent)
    with pytest.raises(LplrValueError, match="is the input"):
        guard.check_output("./a.zarr/", [source])


def test_remote_urls_are_normalized():
    assert guard.location_key("s3://b/x//y/") == guard.location_key("s3://b/x/y")
    a = guard.location_key("s3://b/x", {"endpoint_url": "http://h1:9000"})
    b = guard.location_key("s3://b/x", {"endpoint_url": "http://h2:9000"})
    assert a != b
    with pytest.raises(LplrValueError, match="contains the input"):
        guard.check_output("s3://b/x", ["s3://b/x/a.zarr"])


def test_sibling_outputs_are_allowed(source):
    guard.check_output(source.parent / "a.lplr.zarr", [source], overwrite=True)  # no error


@pytest.mark.parametrize(
    "argv",
    [
        lambda s: ["compress", s, s, "--rank", "4", "--overwrite"],
        lambda s: ["compress", s, s.parent, "--rank", "4", "--overwrite"],
        lambda s: ["compress", s, s / "in.lplr.zarr", "--rank", "4"],
        lambda s: ["convert", s, s, "--overwrite"],
        lambda s: ["convert", s, s.parent, "--overwrite"],
        lambda s: ["compress-group", s.parent / "g.zarr", s.parent / "g.zarr", "--rank", "4", "--overwrite"],
        lambda s: ["compress-group", s.parent / "g.zarr", s.parent / "g.zarr" / "m", "--rank", "4"],
    ],
    ids=[
        "compress-same",
        "compress-parent",
        "compress-inside",
        "convert-same",
        "convert-parent",
        "group-same",
        "group-inside",
    ],
)
def test_cli_refuses_and_leaves_input_byte_identical(source, argv):
    group = zarr.open_group(str(source.parent / "g.zarr"), mode="w")
    group.create_array("m", shape=(64, 48), chunks=(32, 32), dtype="f4")[...] = 1.0
    before = tree_digest(source.parent)
    r = lplr(*argv(source), *CLUSTER)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "would destroy the input" in last, last
    assert tree_digest(source.parent) == before


def test_an_output_inside_a_shard_of_a_sharded_checkpoint_is_refused(tmp_path):
    from safetensors.numpy import save_file

    ckpt, shards = tmp_path / "ckpt", tmp_path / "ckpt" / "shards"
    shards.mkdir(parents=True)
    save_file({"w": np.ones((4, 4), np.float32)}, shards / "s1.safetensors")
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "shards/s1.safetensors"}}))
    guard.check_output(tmp_path / "out.lplr.zarr", [index])  # beside the checkpoint: fine
    with pytest.raises(LplrValueError, match="contains the input"):
        guard.check_output(shards, [index], overwrite=True)  # the shard's folder, not the index's


@pytest.mark.parametrize("name", ["up.safetensors", "W.npy", "d.h5", "model.safetensors.index.json", "x.json/"])
def test_zarr_outputs_named_like_other_formats_are_refused(tmp_path, name):
    with pytest.raises(LplrValueError, match="written as a Zarr store.*Name it with .zarr"):
        guard.check_output(str(tmp_path / name), [])
    guard.check_output(str(tmp_path / name), [], zarr=False)  # a file the caller writes itself
    guard.check_output(tmp_path / "ok.zarr", [])
    with pytest.raises(LplrValueError, match="ends with '.safetensors'"):
        lplr_dask.generate(tmp_path / "g.safetensors", (10, 10))


def test_overwrite_of_foreign_data_is_refused(source, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(LplrValueError, match="not an output of lplr-dask"):
        lplr_dask.compress(source, foreign, rank=4, overwrite=True)
    plain = tmp_path / "plain.zarr"
    zarr.create_array(str(plain), shape=(4, 4), dtype="f4")[...] = 1.0
    for target in (foreign, plain):
        before = tree_digest(target)
        with pytest.raises(LplrValueError, match="not an output of lplr-dask"):
            lplr_dask.convert(source, target, overwrite=True)
        assert tree_digest(target) == before
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_overwrite_of_own_outputs_still_works(source, tmp_path, client):
    out = tmp_path / "o.lplr.zarr"
    lplr_dask.compress(source, out, rank=4)
    lplr_dask.compress(source, out, rank=5, overwrite=True)
    assert lplr_dask.open_factors(out).rank == 5
    copy = tmp_path / "c.zarr"
    lplr_dask.convert(source, copy)
    lplr_dask.convert(source, copy, overwrite=True)  # marked lplr_convert: replaceable
    assert guard.is_tool_output(copy) and guard.is_tool_output(source)  # generate marks its output
    assert guard.is_tool_output(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# one writer at a time


def test_second_writer_is_refused_and_stale_lock_broken(source, tmp_path, client):
    out = tmp_path / "o.lplr.zarr"
    lplr_dask.compress(source, out, rank=4)
    assert not (out / guard.LOCK_NAME).exists()  # released on completion
    running = guard.StoreLock(out)
    running.acquire()  # a live job (this process) holds it
    before = tree_digest(out)
    with pytest.raises(guard.OutputLockedError, match=r"being written by job .*`rm .*lplr-lock"):
        lplr_dask.compress(source, out, rank=8, overwrite=True)
    with pytest.raises(guard.OutputLockedError):
        lplr_dask.compress(source, out, rank=4, resume=True)
    assert tree_digest(out) == before
    running.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = dict(running.job, job_id="deadbeef", pid=int(dead.stdout))
    (out / guard.LOCK_NAME).write_text(json.dumps(stale))  # left by a killed job on this host
    lplr_dask.compress(source, out, rank=8, overwrite=True)
    assert lplr_dask.open_factors(out).rank == 8 and not (out / guard.LOCK_NAME).exists()


def test_lock_from_another_host_is_reported_not_broken(source, tmp_path):
    out = tmp_path / "o.lplr.zarr"
    out.mkdir()
    other = {"job_id": "abc", "host": "node-17", "pid": 1, "started": "2026-12-01T00:00:00+00:00", "command": "lplr"}
    (out / guard.LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(guard.OutputLockedError, match="node-17"):
        guard.StoreLock(out).acquire()
    assert json.loads((out / guard.LOCK_NAME).read_text()) == other


# --------------------------------------------------------------------------------------------
# resume of a changed input


def _fail_in_pass2(monkeypatch, src: Path, out: Path) -> None:
    """Run a compression that fails in pass 2, after the basis is written (resumable)."""
    from lplr_dask import factorize

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash in pass 2")

    with monkeypatch.context() as m:
        m.setattr(factorize, "project", broken)
        with pytest.raises(RuntimeError, match="simulated"):
            lplr_dask.compress(src, out, rank=4, overwrite=out.exists(), log=lambda _: None)
    assert zarr.open_group(str(out)).attrs["lplr"]["stage"] == "basis"


def test_resume_refuses_a_regenerated_input(tmp_path, client, monkeypatch):
    src = tmp_path / "a.zarr"
    lplr_dask.generate(src, (300, 200), rank=6, chunks=(128, 128), seed=1)
    out = tmp_path / "o.lplr.zarr"
    _fail_in_pass2(monkeypatch, src, out)
    recorded = zarr.open_group(str(out)).attrs["lplr"]["source"]["fingerprint"]
    assert recorded["method"] == "zarr-chunk-windows" and recorded["shape"] == [300, 200]
    lplr_dask.compress(src, out, rank=4, resume=True)  # the same input resumes

    _fail_in_pass2(monkeypatch, src, out)
    lplr_dask.generate(src, (300, 200), rank=6, chunks=(128, 128), seed=2, overwrite=True)  # same shape
    before = tree_digest(out)
    with pytest.raises(StoreFormatError, match="changed since the job started"):
        lplr_dask.compress(src, out, rank=4, resume=True)
    assert tree_digest(out) == before


def test_fingerprint_ignores_attributes_and_sees_one_chunk(tmp_path):
    from lplr_dask.sources import read_source

    src = tmp_path / "a.zarr"
    arr = zarr.create_array(str(src), shape=(64, 64), chunks=(16, 16), dtype="f4")
    arr[...] = np.arange(64 * 64, dtype="f4").reshape(64, 64)
    first = guard.fingerprint(read_source(src), read_source(src).array)
    arr.attrs["note"] = "added later"
    assert guard.fingerprint(read_source(src), read_source(src).array) == first
    arr[63, 63] = -1.0  # the last chunk is always sampled
    assert guard.fingerprint(read_source(src), read_source(src).array) != first


@pytest.mark.parametrize("where", [(0, 0), (511, 511), "all"])
def test_fingerprint_of_a_chunk_larger_than_its_windows_sees_its_ends_and_a_regeneration(tmp_path, where):
    """A chunk stored in more bytes than the windows hashed (incompressible values): an edit of
    its first or last value, or new values throughout, still changes the fingerprint."""
    from lplr_dask.sources import read_source

    src = tmp_path / "a.zarr"
    arr = zarr.create_array(str(src), shape=(512, 512), chunks=(512, 512), dtype="f4")
    arr[...] = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
    assert arr.nbytes_stored() > guard.FINGERPRINT_CHUNK_WINDOWS * guard.FINGERPRINT_WINDOW
    first = guard.fingerprint(read_source(src), read_source(src).array)
    assert first["method"] == "zarr-chunk-windows"
    if where == "all":
        arr[...] = np.random.default_rng(1).standard_normal((512, 512), dtype=np.float32)
    else:
        arr[where] = 7.0
    assert guard.fingerprint(read_source(src), read_source(src).array) != first


def test_fingerprint_recorded_the_earlier_way_is_computed_that_way(tmp_path):
    """A store started by an earlier version recorded ``zarr-chunks`` (whole chunks hashed):
    ``like`` it, the input is hashed that way again, so its resume is still checked."""
    from lplr_dask.sources import read_source

    src = tmp_path / "a.zarr"
    lplr_dask.generate(src, (300, 200), rank=6, chunks=(128, 128), seed=1)
    old = guard.fingerprint(read_source(src), read_source(src).array, like={"method": "zarr-chunks"})
    assert old["method"] == "zarr-chunks"
    assert old != guard.fingerprint(read_source(src), read_source(src).array)
    again = guard.fingerprint(read_source(src), read_source(src).array, like=old)
    assert again == old
    guard.check_fingerprint(old, again, out="o.lplr.zarr", source=str(src))
    lplr_dask.generate(src, (300, 200), rank=6, chunks=(128, 128), seed=2, overwrite=True)
    changed = guard.fingerprint(read_source(src), read_source(src).array, like=old)
    with pytest.raises(StoreFormatError, match="changed since the job started"):
        guard.check_fingerprint(old, changed, out="o.lplr.zarr", source=str(src))


# --------------------------------------------------------------------------------------------
# tiny, huge and non-finite values


@pytest.mark.parametrize("factor", [1e-30, 2e19, 1e30])
def test_tiny_and_huge_float32_values_compress_with_correct_estimates(tmp_path, client, factor):
    base = lplr_dask.datasets.synthetic((400, 300), rank=8, decay=0.8, noise=0.05, chunks=(128, 128), seed=4)
    plain = lplr_dask.compress(base, tmp_path / "p.lplr.zarr", rank=6)
    scaled_src = (base.astype(np.float64) * factor).astype(np.float32)
    assert np.isfinite(scaled_src.compute()).all()
    scaled = lplr_dask.compress(scaled_src, tmp_path / "s.lplr.zarr", rank=6)
    assert scaled.attrs["norm_fro"] == pytest.approx(plain.attrs["norm_fro"] * factor, rel=1e-5)
    assert scaled.attrs["error_estimate"] == pytest.approx(plain.attrs["error_estimate"], rel=1e-3)
    exact = lplr_dask.evaluate(scaled_src, scaled)
    assert exact == pytest.approx(lplr_dask.evaluate(base, plain), rel=1e-3)
    assert 0.01 < exact < 0.5


def test_nan_is_still_named_by_its_chunk(tmp_path, client):
    A = np.ones((300, 200), dtype=np.float32) + np.random.default_rng(0).random((300, 200), dtype=np.float32)
    A[200, 150] = np.nan
    import dask.array as da

    with pytest.raises(NonFiniteError, match=r"rows 128:256|rows 256:300") as e:
        lplr_dask.compress(da.from_array(A, chunks=(128, 128)), tmp_path / "o.lplr.zarr", rank=4)
    assert "columns 128:200" in str(e.value)
    assert not (tmp_path / "o.lplr.zarr").exists()


# --------------------------------------------------------------------------------------------
# tasks that cannot fit the workers


def test_task_larger_than_worker_memory_is_refused_up_front(tmp_path, client):
    src = tmp_path / "virtual.zarr"  # no chunk written: nothing to read, so a refusal is instant
    zarr.create_array(str(src), shape=(30000, 30000), chunks=(30000, 30000), dtype="f4")
    with pytest.raises(LplrValueError, match=r"lplr convert .*virtual\.zarr SMALLER\.zarr --chunks \d+x\d+") as e:
        lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=8, log=lambda _: None)
    assert "per thread" in str(e.value)
    assert not (tmp_path / "o.lplr.zarr").exists()


def test_a_damaged_input_chunk_is_named(tmp_path, client):
    src = tmp_path / "a.zarr"
    lplr_dask.convert(lplr_dask.datasets.synthetic((300, 200), rank=4, chunks=(128, 128), seed=1), src)
    chunk = src / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])  # truncated: its crc32c no longer matches
    with pytest.raises(LplrValueError, match=r"input .*a\.zarr.* is damaged: its chunk c/1/0 fails its crc32c"):
        lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=4, log=lambda _: None)

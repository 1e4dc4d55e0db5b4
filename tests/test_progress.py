"""Progress a person can follow: chunks of A done of all, GiB/s, ETA, heartbeats, done or failed."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask._expr import FinalizeCompute
from dask.base import collections_to_expr

import lplr_dask
from lplr_dask import factorize, progress
from lplr_dask.datasets import synthetic
from lplr_dask.quantize import quantizer_pair

#: A heartbeat line: ``pass 1: sketch: 37% (6/16 chunks, 614 MiB/s, ETA 12 s)``.
HEARTBEAT = re.compile(
    r"^(?P<step>.+?): (?P<pct>\d+)% \((?P<done>\d+)/(?P<total>\d+) (?P<unit>chunks|tasks)(?:, [\d.]+ [KMG]iB/s)?, ETA .+\)$"
)
#: A final line: ``pass 1: sketch: done: 16 chunks in 9.5 s (1.1 GiB/s)``.
DONE = re.compile(
    r"^(?P<step>.+?): done: (?P<total>\d+) (?P<unit>chunks|tasks) in [\d.]+ (?:s|min \d+ s|h \d+ min)(?: \([\d.]+ [KMG]iB/s\))?$"
)


def _zarr(path, shape, chunks, seed=0):
    A = synthetic(shape, rank=16, decay=0.9, noise=0.01, chunks=chunks, seed=seed)
    z = zarr.create_array(path, shape=shape, chunks=chunks, dtype="float32")
    da.store(A, z)
    return str(path)


def _steps(lines):
    """{step: (heartbeats, final line)} in the order the steps ran."""
    out: dict[str, tuple[list[re.Match], re.Match | None]] = {}
    for line in lines:
        if m := HEARTBEAT.match(line):
            out.setdefault(m["step"], ([], None))[0].append(m)
        elif m := DONE.match(line):
            out[m["step"]] = (out.get(m["step"], ([], None))[0], m)
    return out


@pytest.fixture
def lplr_logger():
    """The package logger as a program that never configured it has it (the CLI's in-process
    tests install their handler and stop propagation); restored afterwards."""
    logger = logging.getLogger("lplr_dask")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_cli_heartbeats_in_a_batch_log(tmp_path):
    # stderr to a file, as in a SLURM job: plain heartbeat lines during each pass, monotone, then
    # "done" with the chunk count of A (64), for both reads of A
    src = _zarr(tmp_path / "A.zarr", (2048, 2048), (256, 256))
    log = tmp_path / "job.err"
    env = {**os.environ, "DASK_LPLR__PROGRESS__INTERVAL": "0.1s"}
    with open(log, "w") as err:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lplr_dask.cli",
                "compress",
                src,
                str(tmp_path / "A.lplr.zarr"),
                "--rank",
                "32",
                "--workers",
                "1",
                "--threads-per-worker",
                "1",
                "--json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            check=True,
            timeout=300,
        )
    lines = log.read_text().splitlines()
    assert lines[0].startswith("Dask dashboard: http")  # the link stays, first
    assert not any("\r" in line or "━" in line for line in lines)  # no bar in a file
    steps = _steps(lines)
    for step in ("pass 1: sketch", "pass 2: project"):
        beats, final = steps[step]
        assert final is not None and final["total"] == "64" and final["unit"] == "chunks", step
        assert len(beats) >= 2, (step, lines)
        pcts = [int(b["pct"]) for b in beats]
        assert pcts == sorted(pcts) and sum(p < 100 for p in pcts) >= 2, pcts  # during the pass
        assert all(b["total"] == "64" and b["unit"] == "chunks" for b in beats)
        assert lines.index(beats[0].string) < lines.index(final.string)
    assert all(steps[s][1] is not None for s in steps)  # every step ends with its done line
    assert not any("failed" in line for line in lines)


def test_totals_are_the_chunks_of_a(client, tmp_path, caplog, lplr_logger):
    src = _zarr(tmp_path / "A.zarr", (768, 512), (128, 128))  # 6 x 4 chunks
    caplog.set_level(logging.INFO, logger="lplr_dask")
    lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=8, power_iters=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "lplr_dask"]
    steps = _steps(lines)
    reads = [s for s, (_, final) in steps.items() if final["unit"] == "chunks"]
    assert reads == [
        "pass 1: sketch",
        "power iteration (1 of 1: Aᵀ·Q)",
        "power iteration (1 of 1: A·Z)",
        "pass 2: project",
    ]
    assert all(steps[s][1]["total"] == "24" for s in reads)
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "lplr_dask")
    assert any(line.startswith("compress 768x512 float32 -> ") for line in lines)  # the summary too
    # one label per step: no step reported twice
    finals = [m["step"] for line in lines if (m := DONE.match(line))]
    assert len(finals) == len(set(finals))


def test_one_pass_counts_the_one_read(client, tmp_path, caplog, lplr_logger):
    src = _zarr(tmp_path / "A.zarr", (512, 512), (128, 128))
    caplog.set_level(logging.INFO, logger="lplr_dask")
    lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=8, passes=1)
    steps = _steps(r.getMessage() for r in caplog.records)
    assert steps["pass 1: sketch"][1]["total"] == "16" and steps["pass 1: sketch"][1]["unit"] == "chunks"
    assert steps["pass 2: project (one-pass, no read of A)"][1]["unit"] == "tasks"


def test_a_failing_step_says_failed(client, tmp_path, caplog, lplr_logger):
    A = synthetic((512, 256), rank=4, chunks=(128, 128), seed=1)
    A = da.where((da.arange(512) == 300)[:, None], np.nan, A)  # one chunk holds a NaN
    caplog.set_level(logging.INFO, logger="lplr_dask")
    with pytest.raises(lplr_dask.NonFiniteError):
        lplr_dask.compress(A, tmp_path / "o.lplr.zarr", rank=4)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "lplr_dask"]
    failed = [m for level, m in lines if m.startswith("pass 1: sketch: failed after ")]
    assert len(failed) == 1 and failed[0].endswith("chunks done; NonFiniteError)"), lines
    assert (logging.WARNING, failed[0]) in lines
    assert not any(m.startswith("pass 1: sketch: done") for _, m in lines)


def test_local_scheduler_counts_chunks_and_failures(caplog, lplr_logger):
    # no distributed client: dask's threads scheduler, counted by a local callback
    caplog.set_level(logging.INFO, logger="lplr_dask")
    A = da.ones((400, 300), chunks=(100, 100))
    with dask.config.set(scheduler="threads"):
        (total,) = progress.compute("sum", (A * 2).sum(), chunks_of=A)
        assert total == 2 * 400 * 300

        def boom(x):
            raise ZeroDivisionError("boom")

        with pytest.raises(ZeroDivisionError):
            progress.compute("boom", A.map_blocks(boom, dtype=A.dtype).sum())
    messages = [r.getMessage() for r in caplog.records]
    assert DONE.match(next(m for m in messages if m.startswith("sum: done")))["total"] == "12"
    assert any(re.match(r"boom: failed after [\d.]+ s \(\d+/\d+ tasks done; ZeroDivisionError\)", m) for m in messages)
    assert not any(m.startswith("boom: done") for m in messages)


def test_the_library_prints_nothing_unconfigured(client, tmp_path, capfd, lplr_logger):
    # logging as a program leaves it (lplr_logger): the package's NullHandler, no level set
    src = _zarr(tmp_path / "A.zarr", (512, 384), (128, 128))
    capfd.readouterr()
    lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=8)
    assert lplr_dask.evaluate(src, tmp_path / "o.lplr.zarr") < 0.5
    lplr_dask.logs.warning("a warning")  # even warnings: no last-resort handler
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_reads_chunk_finds_one_task_per_chunk(tmp_path):
    # whatever blockwise fusion makes of pass 1's graph, one task per chunk of A computes it
    src = _zarr(tmp_path / "A.zarr", (512, 768), (128, 128))
    spec_l, spec_r = quantizer_pair("default")
    for passes, A in [
        (2, da.from_zarr(src)),
        (1, da.from_zarr(src)),
        (2, da.from_zarr(src).rechunk((256, 128))),
        (2, synthetic((512, 768), rank=4, chunks=(128, 128))),
    ]:
        p = factorize.Params(
            rank=8, bits=(8, 8), quantizer="default", spec_l=spec_l, spec_r=spec_r, passes=passes, range_oversample=8
        )
        products = factorize.pass1(A, p)
        # the graph as a distributed client builds it (Client.compute)
        dsk = dict(FinalizeCompute(collections_to_expr(list(products.values()), True)).optimize().__dask_graph__())
        found = [k for k, v in dsk.items() if progress.reads_chunk(k, v, A.name)]
        assert len(found) == A.npartitions, (passes, A.chunks)


def test_heartbeat_and_done_lines_read_well():
    line = progress._Line("pass 1: sketch", "chunks", 2**30 / 10, t0=0.0)
    assert line.heartbeat(6, 16, now=6.0) == "pass 1: sketch: 37% (6/16 chunks, 102 MiB/s, ETA 10 s)"
    assert line.heartbeat(0, 16, now=40.0) == "pass 1: sketch: 0% (0/16 chunks, ETA ?)"
    assert line.done(16, now=9.5) == "pass 1: sketch: done: 16 chunks in 9.5 s (172 MiB/s)"
    assert progress._Line("x", "chunks", 2**20, t0=0.0).rate(3, 2.0) == "1.5 MiB/s"
    assert progress._Line("x", "chunks", 2**30, t0=0.0).rate(30, 2.0) == "15 GiB/s"
    assert progress._Line("x", "chunks", 2**30, t0=0.0).rate(11, 10.0) == "1.1 GiB/s"
    assert progress._Line("x", "chunks", 2**10, t0=0.0).rate(1, 2.0) == "0.5 KiB/s"
    assert progress._duration(250) == "4 min 10 s" and progress._duration(3 * 3600 + 120) == "3 h 02 min"
    assert HEARTBEAT.match(line.heartbeat(6, 16, now=6.0)) and DONE.match(line.done(16, now=9.5))
    # nothing counted (a scheduler that cannot load the counter): the time only
    assert line.heartbeat(0, 0, now=90.0) == "pass 1: sketch: running for 1 min 30 s"
    assert line.done(0, now=90.0) == "pass 1: sketch: done in 1 min 30 s"


def test_interval_comes_from_dask_config():
    assert progress.interval() == 30 or "DASK_LPLR__PROGRESS__INTERVAL" in os.environ
    with dask.config.set({"lplr.progress.interval": "2s"}):
        assert progress.interval() == 2.0


@pytest.mark.slow
def test_heartbeats_at_the_default_interval_on_a_long_pass(tmp_path, caplog, lplr_logger):
    # A pass of about 33 s (one chunk read as slowly as a distant store serves it) on one worker
    # thread, at the default 30 s interval: a user sees it is alive before it ends.
    from distributed import Client, LocalCluster

    assert progress.interval() == 30 or "DASK_LPLR__PROGRESS__INTERVAL" in os.environ
    A = synthetic((256, 256), rank=4, chunks=(256, 256), seed=2)
    A = A.map_blocks(lambda b: (time.sleep(33), b)[1], meta=A._meta)  # meta given: no call to infer it
    caplog.set_level(logging.INFO, logger="lplr_dask")
    # silence_logs=False: distributed's default would set the level of caplog's handlers to WARNING
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0", silence_logs=False
        ) as cluster,
        Client(cluster),
    ):
        start = time.time()
        lplr_dask.compress(A, tmp_path / "o.lplr.zarr", rank=4, passes=1)  # one read of A
    records = [r for r in caplog.records if r.getMessage().startswith("pass 1: sketch")]
    beats = [r for r in records if HEARTBEAT.match(r.getMessage())]
    assert len(beats) >= 1 and DONE.match(records[-1].getMessage())["total"] == "1"
    assert records[-1].created - start > 30
    times = [start] + [r.created for r in records]
    assert max(b - a for a, b in zip(times, times[1:])) <= 30 + 5  # never silent for longer than the interval

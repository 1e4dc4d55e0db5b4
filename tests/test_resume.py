"""Fault tolerance: a worker killed in pass 2, a client killed in pass 2 and ``--resume``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

import lplr_dask

ARGS = {"rank": 8, "bits": (4, 4), "seed": 5}
CHUNK = 200

JOB = r"""
import logging, sys, time
import dask.array as da
from distributed import Client, LocalCluster
import lplr_dask

src, out, delay, resume = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library logs; this job shows it
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c, Client(c):
        A = da.from_zarr(src).map_blocks(lambda b: (time.sleep(delay), b)[1], dtype="f4")
        lplr_dask.compress(A, out, rank=8, bits=(4, 4), seed=5, resume=resume)
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "a.zarr"
    lplr_dask.generate(path, (400, 2400), rank=6, chunks=(CHUNK, CHUNK), seed=2)
    return path


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """Codes of an undisturbed run."""
    out = tmp_path_factory.mktemp("ref") / "ref.lplr.zarr"
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c, Client(c):
        lplr_dask.compress(source, out, **ARGS)
    return _codes(out)


def _codes(path) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return np.asarray(g["L/codes"][...]), np.asarray(g["R/codes"][...])


def _chunks_done(out) -> int:
    """Column chunks of W marked done so far (0 before pass 2 starts)."""
    try:
        return int(np.asarray(zarr.open_group(str(out), mode="r")["_work/W_done"][...]).sum())
    except (KeyError, FileNotFoundError, ValueError, zarr.errors.BaseZarrError):  # not created yet
        return 0


def _wait_for_pass2(out, total: int, timeout: float = 120.0, alive=lambda: True) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout and alive():
        done = _chunks_done(out)
        if 0 < done < total:
            return done
        time.sleep(0.02)
    raise AssertionError(f"pass 2 was not caught in progress ({_chunks_done(out)} of {total} chunks done)")


def test_client_killed_in_pass2_then_resume(source, reference, tmp_path):
    out = tmp_path / "o.lplr.zarr"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    total = 2400 // CHUNK
    proc = subprocess.Popen(
        [sys.executable, str(script), str(source), str(out), "0.15", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_for_pass2(out, total, alive=lambda: proc.poll() is None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = _chunks_done(out)
    assert 0 < done_before < total
    with pytest.raises(lplr_dask.StoreFormatError, match="incomplete"):
        lplr_dask.open_factors(out)

    r = subprocess.run(
        [sys.executable, str(script), str(source), str(out), "0", "1"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    m = re.search(r"resume: (\d+) of (\d+) column chunks of W already written; computing (\d+)", r.stderr)
    assert m, r.stderr
    already, n, computed = map(int, m.groups())
    assert n == total and already >= done_before and computed == total - already
    for got, want in zip(_codes(out), reference):
        np.testing.assert_array_equal(got, want)
    assert lplr_dask.open_factors(out).attrs["complete"] is True


def test_worker_killed_in_pass2(source, reference, tmp_path):
    import dask.array as da
    from distributed import Client, LocalCluster

    out = tmp_path / "o.lplr.zarr"
    total = 2400 // CHUNK
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1"
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = list(client.run(os.getpid).values())
        A = da.from_zarr(str(source)).map_blocks(lambda b: (time.sleep(0.1), b)[1], dtype="f4")
        errors: list[BaseException] = []

        def job() -> None:
            try:
                with Client(cluster.scheduler_address, set_as_default=True):
                    lplr_dask.compress(A, out, **ARGS)
            except BaseException as e:  # reported below
                errors.append(e)

        t = threading.Thread(target=job)
        t.start()
        _wait_for_pass2(out, total, alive=t.is_alive)
        os.kill(pids[0], signal.SIGKILL)
        t.join(timeout=300)
        assert not t.is_alive() and not errors, errors
        assert len(client.run(os.getpid)) == 2  # the nanny restarted the killed worker
    for got, want in zip(_codes(out), reference):
        np.testing.assert_array_equal(got, want)

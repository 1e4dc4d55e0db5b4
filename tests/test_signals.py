"""Ctrl-C and SIGTERM: exit status 130 and 143, one line naming ``--resume``, and a job it finishes.

Real ``lplr compress`` subprocesses on a matrix large enough to be caught in pass 1 or pass 2
(told apart by the store's ``stage`` attr: "started" during pass 1, "basis" during pass 2).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import lplr_dask

LPLR = [sys.executable, "-m", "lplr_dask.cli"]
ARGS = ["--rank", "16", "--bits", "6", "6", "--seed", "3", "--workers", "1", "--threads-per-worker", "1"]


def test_importing_the_package_leaves_signal_handlers_alone(tmp_path):
    code = (
        "import signal, sys\n"
        "import lplr_dask, lplr_dask.cluster, lplr_dask.cli\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
        "assert 'dask_jobqueue' not in sys.modules\n"
        "lplr_dask.cluster._jobqueue_options('slurm')  # imports dask_jobqueue, as --cluster does\n"
        "assert 'dask_jobqueue' in sys.modules\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)\n"
        "assert lplr_dask.cli.main(['info', 'none.lplr.zarr']) == 2\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main put it back\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("signals") / "a.zarr"
    lplr_dask.generate(path, (4000, 4000), rank=16, chunks=(500, 500), seed=1)
    return path


def _codes(path) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return np.asarray(g["L/codes"][...]), np.asarray(g["R/codes"][...])


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """Codes of an undisturbed run with the same arguments."""
    out = tmp_path_factory.mktemp("reference") / "o.lplr.zarr"
    r = subprocess.run(
        [*LPLR, "compress", str(source), str(out), *ARGS, "-q"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return _codes(out)


def _stage(out) -> str | None:
    try:
        return zarr.open_group(str(out), mode="r").attrs["lplr"]["stage"]
    except Exception:  # noqa: BLE001 - not created yet, or its attrs half written
        return None


def _interrupt(source, out, *, stage: str, signum: int, group: bool) -> subprocess.CompletedProcess[str]:
    """Start ``lplr compress``, wait until the store is at `stage`, send `signum`; the finished run."""
    command = [*LPLR, "compress", str(source), str(out), *ARGS, "--overwrite"]
    # a background child of a script ignores SIGINT; Ctrl-C at a terminal is a SIGINT to the group
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        t0 = time.monotonic()
        while _stage(out) != stage:
            assert proc.poll() is None and time.monotonic() - t0 < 120, "the job ended before it was caught at " + stage
            time.sleep(0.02)
        time.sleep(0.3)  # into the pass: the stage is written just before it starts
        assert proc.poll() is None, "the pass ended before the signal"
        (os.killpg if group else os.kill)(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _resume_line(r: subprocess.CompletedProcess[str], word: str) -> str:
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{word}: rerun with --resume to finish: lplr compress "), r.stderr
    assert last.endswith(" --resume") and "--overwrite" not in last, last
    assert "Traceback" not in r.stderr, r.stderr
    return last


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, signum, group, code, word",
    [
        ("started", signal.SIGINT, True, 130, "interrupted"),  # Ctrl-C in pass 1: the whole process group
        ("basis", signal.SIGTERM, False, 143, "terminated"),  # kill PID in pass 2
    ],
    ids=["ctrl-c-in-pass-1", "sigterm-in-pass-2"],
)
def test_interrupt_then_resume(source, reference, tmp_path, stage, signum, group, code, word):
    out = tmp_path / "o.lplr.zarr"
    r = _interrupt(source, out, stage=stage, signum=signum, group=group)
    assert r.returncode == code, (r.returncode, r.stderr)
    line = _resume_line(r, word)
    if stage == "basis":
        assert _stage(out) == "basis"  # pass 1's work is kept for --resume

    resume = shlex.split(line.split(": ", 2)[2])[1:]  # the command it names, without "lplr"
    done = subprocess.run([*LPLR, *resume, "-q"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for got, want in zip(_codes(out), reference):
        np.testing.assert_array_equal(got, want)
    assert lplr_dask.open_factors(out).attrs["complete"] is True


def test_a_dropped_stop_is_delivered_again_while_a_step_runs():
    """Python drops a signal handler's exception raised inside a gc callback ("Exception
    ignored in …"); the recorded signal is sent again until the step stops."""
    import time

    from lplr_dask import interrupts

    calls = []

    def handler(signum, frame):
        calls.append(signum)
        interrupts.request(signum)
        if len(calls) > 1:  # the first one is "dropped": it raises nothing
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        signal.raise_signal(signal.SIGINT)
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            with interrupts.redelivered():
                time.sleep(10)
        assert time.perf_counter() - t0 < 3 * interrupts.REDELIVER_SECONDS
        assert calls == [signal.SIGINT, signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupts.clear()
    with interrupts.redelivered():  # nothing requested: nothing sent
        time.sleep(1.5 * interrupts.REDELIVER_SECONDS)
    assert len(calls) == 2

"""Tests against a real SLURM: the single-node cluster of cluster/slurm/start-single-node.sh.

Skipped with the reason when SLURM is not installed or its node is not up; with
``LPLR_REQUIRE_SERVICES=1`` (CI) the same condition fails instead (see tests/_services.py).
Everything talks over 127.0.0.1 only: the jobqueue scheduler and workers use interface ``lo``.

The PBS tests use the PBS commands of Debian's slurm-wlm-torque (``qsub``, ``qstat``, ``qdel`` as
wrappers over SLURM; the start script installs them): they exercise the PBS command interface
and the ``#PBS`` directives as SLURM's sbatch reads them, not a PBS server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dask
import dask.array as da
import pytest
from _services import require_service

import lplr_dask
from lplr_dask.cluster import ClusterError, get_client
from lplr_dask.cluster.jobqueue import _import_jobqueue

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
UP_STATES = {"idle", "mixed", "allocated", "completing"}
START = "sudo cluster/slurm/start-single-node.sh"


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    """Skip (or fail with LPLR_REQUIRE_SERVICES=1) unless a SLURM node is up."""
    for command in ("sbatch", "sinfo", "squeue", "scancel"):
        if shutil.which(command) is None:
            require_service(f"`{command}` not found: SLURM is not installed here; run {START}")
    result = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        require_service(f"sinfo failed ({result.stderr.strip()}): slurmctld is not up; run {START}")
    states = {state.rstrip("*~#!%$@^-") for state in result.stdout.split()}
    if not states & UP_STATES:
        require_service(f"no SLURM node is up (sinfo states: {sorted(states)}); run {START}")
    # dask-jobqueue's defaults enter dask.config at its import. Imported first inside a test's
    # dask.config.set({"jobqueue.slurm...."}), they would be removed with the "jobqueue" key
    # when that block exits, and the next test's cluster fails (KeyError: 'shared-temp-directory').
    _import_jobqueue()


def _squeue(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (name, state)} of the given jobs that SLURM still lists."""
    result = subprocess.run(
        ["squeue", "--noheader", "--format=%i %j %T", "--jobs", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    jobs = {}
    for line in result.stdout.splitlines():
        job_id, name, state = line.split()
        jobs[job_id] = (name, state)
    return jobs


def _small_jobs(tmp_path: Path, **extra: object) -> dict[str, object]:
    """Dask config for one-core, 1 GiB worker jobs on loopback (the test node has 2 cores)."""
    return {
        "jobqueue.slurm.cores": 1,
        "jobqueue.slurm.processes": 1,
        "jobqueue.slurm.memory": "1GiB",
        "jobqueue.slurm.walltime": "00:10:00",
        "jobqueue.slurm.interface": "lo",
        "jobqueue.slurm.log-directory": str(tmp_path / "worker-logs"),
        "jobqueue.slurm.scheduler-options": {"dashboard_address": "127.0.0.1:0"},
        "lplr.cluster.worker-timeout": "60s",
        **extra,
    }


def test_cluster_slurm_runs_workers_as_jobs(tmp_path: Path) -> None:
    lines: list[str] = []
    with dask.config.set(_small_jobs(tmp_path)):
        with get_client(cluster="slurm", jobs=2, log=lines.append) as client:
            client.wait_for_workers(2, timeout=60)
            job_ids = [job.job_id for job in client.cluster.workers.values()]
            assert len(job_ids) == 2 and all(job_ids)
            assert _squeue(job_ids) == {i: ("lplr-worker", "RUNNING") for i in job_ids}
            workers = client.scheduler_info()["workers"].values()
            assert all(w["host"] == "127.0.0.1" and w["nthreads"] == 1 for w in workers)
            x = da.ones((1000, 1000), chunks=250)
            assert float((x @ x.T).sum().compute()) == 1000.0**3
    assert any(line.startswith("Dask dashboard: http://127.0.0.1:") for line in lines)
    assert any("Submitted 2 SLURM job(s)" in line for line in lines)
    # Closing the context cancels the jobs.
    deadline = time.monotonic() + 30
    while _squeue(job_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _squeue(job_ids) == {}


def test_cluster_slurm_job_that_cannot_run_fails_at_once(tmp_path: Path) -> None:
    # The node has far less than 1000 GiB: `sbatch --test-only` says so before any submission.
    config = _small_jobs(tmp_path, **{"jobqueue.slurm.memory": "1000GiB"})
    with dask.config.set(config):
        with pytest.raises(ClusterError, match=r"sbatch refuses the Dask worker job: .*[Mm]emory"):
            with get_client(cluster="slurm", log=lambda line: None):
                pass


def test_cluster_slurm_worker_timeout_names_the_jobs(tmp_path: Path) -> None:
    # A job that may only start in an hour is accepted but stays pending: the worker timeout
    # fires, the message names the pending job, and closing cancels it.
    config = _small_jobs(
        tmp_path,
        **{
            "jobqueue.slurm.job-extra-directives": ["--begin=now+1hour"],
            "lplr.cluster.worker-timeout": "3s",
        },
    )
    lines: list[str] = []
    with dask.config.set(config), pytest.raises(ClusterError) as error:
        with get_client(cluster="slurm", log=lines.append):
            pass
    message = str(error.value)
    assert "No Dask worker joined within 3 s after submitting 1 SLURM job(s): jobs " in message
    job_id = message.split(": jobs ")[1].split()[0]
    assert _squeue([job_id]) == {}, "closing the cluster cancels the pending job"
    assert not any(line.startswith("Warning") for line in lines), lines


def _sbatch(tmp_path: Path, **env: str) -> tuple[int, str]:
    """Run cluster/slurm/compress.sbatch to completion; return its exit status and log."""
    environment = {**os.environ, "JOB_DIR": str(tmp_path / "job"), **env}
    if Path(sys.prefix) == REPO / ".venv":
        # Exercise the script's default: $SLURM_SUBMIT_DIR/.venv when submitted from the repo.
        environment.pop("VIRTUAL_ENV", None)
        environment.pop("VENV", None)
    else:
        environment["VENV"] = sys.prefix
    log = tmp_path / "sbatch.out"
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={log}", "cluster/slurm/compress.sbatch"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = log.read_text() if log.exists() else ""
    return result.returncode, f"{result.stderr}\n{text}"


def _generate(source: Path) -> None:
    """A 2000 × 1000 matrix of rank 10 plus 0.1 % noise, in 500 × 500 chunks."""
    subprocess.run(
        [
            *(str(Path(sys.executable).parent / "lplr"), "generate", str(source)),
            *("--shape", "2000x1000", "--rank", "10", "--noise", "0.001"),
            *("--chunks", "500x500", "--workers", "1", "--quiet"),
        ],
        check=True,
        timeout=300,
    )


def test_sbatch_compress(tmp_path: Path) -> None:
    source, out = tmp_path / "A.zarr", tmp_path / "A.lplr.zarr"
    _generate(source)
    status, log = _sbatch(
        tmp_path,
        IN=str(source),
        OUT=str(out),
        LPLR_ARGS="--rank 20 --quiet",
        SCHEDULER_HOST="127.0.0.1",
        DASHBOARD_ADDRESS="127.0.0.1:0",
    )
    assert status == 0, log
    assert "2 Dask worker(s) up" in log
    assert not (tmp_path / "job" / "scheduler.json").exists()  # cleaned up by the trap
    factors = lplr_dask.open_factors(out)
    assert factors.shape == (2000, 1000) and factors.rank == 20
    # A sketch of exactly the matrix's rank (10) is noise-sensitive: its error is ~0.05 here.
    # With 2x oversampling the error is ~0.01 (8-bit codes, 0.1% noise), well under 0.05.
    assert lplr_dask.evaluate(source, factors) < 0.05


def test_sbatch_without_input_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IN", raising=False)
    status, log = _sbatch(tmp_path, OUT=str(tmp_path / "x.lplr.zarr"))
    assert status != 0
    assert "set IN to the input Zarr array" in log


# --------------------------------------------------------------------------------------------
# PBS through slurm-wlm-torque's wrappers


@pytest.fixture()
def pbs_commands() -> None:
    """Skip (or fail with LPLR_REQUIRE_SERVICES=1) unless slurm-wlm-torque's PBS commands are here."""
    for command in ("qsub", "qstat", "qdel", "generate_pbs_nodefile"):
        if shutil.which(command) is None:
            require_service(f"`{command}` not found: slurm-wlm-torque is not installed; run {START}")


def _qstat_state(job_id: str) -> str | None:
    """The job's PBS state letter (Q, R, C, ...) in `qstat JOB`; None once SLURM forgot the job."""
    result = subprocess.run(["qstat", job_id], capture_output=True, text=True, timeout=30)
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == job_id:
            return fields[4]
    return None


def _wait_for_pbs_job(job_id: str, timeout: float) -> int:
    """Poll ``qstat`` until the job is complete (C); its exit status (from ``scontrol show job``).

    The wrapper's ``qstat -f`` has no exit status, so it is read from SLURM, which keeps a
    finished job for MinJobAge (60 s on the test node): polled every 0.5 s, the job is still there.
    """
    deadline = time.monotonic() + timeout
    while (state := _qstat_state(job_id)) not in ("C", None):
        if time.monotonic() > deadline:
            subprocess.run(["qdel", job_id], timeout=30, check=False)
            pytest.fail(f"PBS job {job_id} still in state {state} after {timeout:g} s; deleted it with qdel")
        time.sleep(0.5)
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    match = re.search(r"\bExitCode=(\d+):(\d+)", shown.stdout)
    assert match, f"no ExitCode for job {job_id} in scontrol's output: {shown.stdout!r} {shown.stderr!r}"
    return int(match.group(1))


def test_qsub_compress_pbs(tmp_path: Path, pbs_commands: None) -> None:
    source, out = tmp_path / "A.zarr", tmp_path / "A.lplr.zarr"
    _generate(source)
    log = tmp_path / "qsub.out"
    # -V exports this environment (the wrapper's -v NAME=VALUE list would go through a shell
    # unquoted, so LPLR_ARGS with spaces could not pass that way). -l replaces the script's
    # #PBS -l select=2:ncpus=8:mem=32gb, too big for the test node.
    env = {
        **os.environ,
        "IN": str(source),
        "OUT": str(out),
        "LPLR_ARGS": "--rank 20 --quiet",
        "VENV": sys.prefix,
        "JOB_DIR": str(tmp_path / "job"),
        "SCHEDULER_HOST": "127.0.0.1",
        "DASHBOARD_ADDRESS": "127.0.0.1:0",
        "WORKER_MEMORY": "1.5GiB",
        "START_TIMEOUT": "120",
    }
    submitted = subprocess.run(
        [
            *("qsub", "-V", "-j", "oe", "-o", str(log)),
            *("-l", "select=1:ncpus=2:mem=2gb,walltime=00:10:00"),
            "cluster/pbs/compress.pbs",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and job_id.isdigit(), submitted.stdout + submitted.stderr
    status = _wait_for_pbs_job(job_id, timeout=600)
    text = log.read_text() if log.exists() else ""
    assert status == 0, text
    assert f"compress.pbs: job {job_id} (lplr-compress) started" in text  # PBS_JOBID, #PBS -N
    assert "nodes vm: 1 node(s) x 2 thread(s)" in text.replace(os.uname().nodename, "vm")  # ncpus=2
    assert "1 Dask worker(s) up" in text
    assert "compress.pbs: done (exit status 0)" in text
    assert not (tmp_path / "job" / "scheduler.json").exists()  # cleaned up by the trap
    factors = lplr_dask.open_factors(out)
    assert factors.shape == (2000, 1000) and factors.rank == 20
    assert lplr_dask.evaluate(source, factors) < 0.05


def test_cluster_pbs_compresses_through_qsub(tmp_path: Path, pbs_commands: None) -> None:
    # `lplr compress --cluster pbs`: dask-jobqueue's PBSCluster writes a job script of #PBS
    # lines (-N, -l select=1:ncpus=..:mem=..MB, -l walltime) and submits it with qsub; the
    # wrapper's sbatch reads those lines. Its -o/-e default to files in the current directory,
    # so the command runs in the worker log directory.
    source, out = tmp_path / "A.zarr", tmp_path / "A.lplr.zarr"
    _generate(source)
    logs = tmp_path / "worker-logs"
    logs.mkdir()
    env = {
        **os.environ,
        "DASK_JOBQUEUE__PBS__CORES": "1",
        "DASK_JOBQUEUE__PBS__PROCESSES": "1",
        "DASK_JOBQUEUE__PBS__MEMORY": "1.5GiB",
        "DASK_JOBQUEUE__PBS__WALLTIME": "00:10:00",
        "DASK_JOBQUEUE__PBS__INTERFACE": "lo",
        "DASK_JOBQUEUE__PBS__LOG_DIRECTORY": str(logs),
        "DASK_JOBQUEUE__PBS__SCHEDULER_OPTIONS": "{'dashboard_address': '127.0.0.1:0'}",
        "DASK_LPLR__CLUSTER__WORKER_TIMEOUT": "120s",
    }
    result = subprocess.run(
        [
            *(str(Path(sys.executable).parent / "lplr"), "compress", str(source), str(out)),
            *("--rank", "20", "--cluster", "pbs", "--jobs", "2"),
        ],
        cwd=logs,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Submitted 2 PBS job(s)" in result.stderr
    factors = lplr_dask.open_factors(out)
    assert factors.shape == (2000, 1000) and factors.rank == 20
    assert lplr_dask.evaluate(source, factors) < 0.05
    # The wrapper's -e: one stderr log per worker job, named after the job id, where the worker logs.
    worker_logs = sorted(logs.glob("*.e*"))
    assert len(worker_logs) == 2, sorted(logs.iterdir())
    job_ids = [path.name.rsplit(".e", 1)[1] for path in worker_logs]
    assert all("Registered to" in path.read_text() for path in worker_logs), [p.read_text() for p in worker_logs]
    # Closing the cluster deleted the jobs (qdel).
    deadline = time.monotonic() + 30
    while _squeue(job_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _squeue(job_ids) == {}

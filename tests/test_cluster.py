"""Tests of lplr_dask.cluster against real scheduler and worker processes on 127.0.0.1.

The cluster fixtures start ``dask scheduler`` and two ``dask worker`` processes with subprocess
(random ports, loopback only) and tear them down after the module. The PBS parts are checked as
text only: no PBS server is available to run them against.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import dask
import dask.array as da
import dask_jobqueue
import distributed
import numpy as np
import pytest

from lplr_dask.cluster import (
    ClusterError,
    _jobqueue_options,
    add_cluster_arguments,
    client_from_args,
    get_client,
    security_from_args,
)
from lplr_dask.errors import LplrValueError

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60  # s for a scheduler or workers to come up on a busy 2-core machine
SHORT_CONNECT = {"lplr.cluster.connect-timeout": "3s"}


class DaskProcesses(NamedTuple):
    address: str
    scheduler_file: Path


class TLSFiles(NamedTuple):
    ca: Path
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        return [
            *("--tls-ca-file", str(self.ca)),
            *("--tls-cert", str(self.cert)),
            *("--tls-key", str(self.key)),
        ]


# --------------------------------------------------------------------------------------------
# Helpers: processes and certificates


def _stop(processes: list[subprocess.Popen]) -> None:
    """Terminate workers before the scheduler (the list order), then wait; kill stragglers."""
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _dask_processes(directory: Path, *, n_workers: int = 2, tls: TLSFiles | None = None) -> Iterator[DaskProcesses]:
    """Run a scheduler and `n_workers` one-thread workers on 127.0.0.1 until the context ends."""
    directory.mkdir(parents=True, exist_ok=True)
    scheduler_file = directory / "scheduler.json"
    tls_flags = tls.flags() if tls else []
    protocol = "tls" if tls else "tcp"
    processes: list[subprocess.Popen] = []
    logs = []

    def start(module: str, name: str, args: list[str]) -> None:
        log = open(directory / f"{name}.log", "wb")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        command = [sys.executable, "-m", f"distributed.cli.{module}", *args, *tls_flags]
        processes.insert(0, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    try:
        start(
            "dask_scheduler",
            "scheduler",
            [
                *("--host", f"{protocol}://127.0.0.1", "--port", "0"),
                *("--dashboard-address", "127.0.0.1:0"),
                *("--scheduler-file", str(scheduler_file)),
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not scheduler_file.exists():
            if processes[-1].poll() is not None or time.monotonic() > deadline:
                pytest.fail("dask scheduler did not start:\n" + (directory / "scheduler.log").read_text())
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(n_workers):
            start(
                "dask_worker",
                f"worker-{i}",
                [
                    address,
                    *("--host", "127.0.0.1", "--name", f"worker-{i}"),
                    *("--nthreads", "1", "--memory-limit", "1GiB", "--no-dashboard"),
                    *("--death-timeout", "30"),
                ],
            )
        security = _security(tls) if tls else None
        with distributed.Client(address, security=security, timeout=START_TIMEOUT) as client:
            client.wait_for_workers(n_workers, timeout=START_TIMEOUT)
        yield DaskProcesses(address, scheduler_file)
    finally:
        _stop(processes)
        for log in logs:
            log.close()


def _security(tls: TLSFiles) -> distributed.Security:
    args = argparse.Namespace(tls_ca_file=tls.ca, tls_cert=tls.cert, tls_key=tls.key)
    security = security_from_args(args)
    assert security is not None
    return security


def _make_tls_files(directory: Path, name: str) -> TLSFiles:
    """A fresh CA and a certificate it signs for 127.0.0.1/localhost (PEM files)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}.key")
    try:
        _make_tls_files_cryptography(files, name)
    except ImportError:  # cryptography is optional; the openssl CLI does the same
        _make_tls_files_openssl(files, name)
    return files


def _make_tls_files_cryptography(files: TLSFiles, name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(hours=1)}
    valid["not_valid_after"] = now + datetime.timedelta(days=1)

    def build(subject: str, issuer: x509.Name, public_key, extension) -> x509.CertificateBuilder:
        builder = x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]),
            issuer_name=issuer,
            public_key=public_key,
            serial_number=x509.random_serial_number(),
            **valid,
        )
        return builder.add_extension(extension, critical=False)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = build(
        f"{name} test CA",
        ca_name,
        ca_key.public_key(),
        x509.BasicConstraints(ca=True, path_length=None),
    ).sign(ca_key, hashes.SHA256())
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = build("localhost", ca_name, key.public_key(), x509.SubjectAlternativeName(names)).sign(
        ca_key, hashes.SHA256()
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _make_tls_files_openssl(files: TLSFiles, name: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("TLS test needs the cryptography package or the openssl command")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_key, csr, ext = (files.ca.with_suffix(s) for s in (".cakey", ".csr", ".ext"))
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for command in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", files.ca, "-days", "1"] + ["-subj", f"/CN={name} test CA"],
        ["req", *ec, "-keyout", files.key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial"]
        + ["-out", files.cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lplr compress")
    add_cluster_arguments(parser)
    return parser


def _check_runs_on_two_workers(client: distributed.Client) -> None:
    """A small dask.array computation through `client` is right and both workers answer."""
    x = da.from_array(np.arange(10_000.0).reshape(100, 100), chunks=25)
    assert float((x @ x.T).trace().compute()) == pytest.approx(float(((x**2).sum()).compute()))
    assert dask.base.get_scheduler() == client.get  # the yielded client is the default
    names = sorted(info["name"] for info in client.scheduler_info()["workers"].values())
    assert names == ["worker-0", "worker-1"]
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tcp_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskProcesses]:
    with _dask_processes(tmp_path_factory.mktemp("tcp-cluster")) as processes:
        yield processes


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return _make_tls_files(tmp_path_factory.mktemp("tls"), "good")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, tls_files: TLSFiles) -> Iterator[DaskProcesses]:
    with _dask_processes(tmp_path_factory.mktemp("tls-cluster"), tls=tls_files) as processes:
        yield processes


# --------------------------------------------------------------------------------------------
# An existing scheduler: by address, by scheduler file


def test_scheduler_address_runs_on_both_workers(tcp_cluster: DaskProcesses) -> None:
    lines: list[str] = []
    with get_client(scheduler=tcp_cluster.address, log=lines.append) as client:
        assert client.scheduler.address == tcp_cluster.address
        _check_runs_on_two_workers(client)
    assert client.status == "closed"
    assert any(line.startswith("Dask dashboard: http://127.0.0.1:") for line in lines)
    # Only the client was closed: the scheduler and its workers are still there.
    with get_client(scheduler=tcp_cluster.address, log=lines.append) as again:
        assert len(again.scheduler_info()["workers"]) == 2


def test_scheduler_file_runs_on_both_workers(tcp_cluster: DaskProcesses) -> None:
    with get_client(scheduler_file=tcp_cluster.scheduler_file, log=lambda line: None) as client:
        assert client.scheduler.address == tcp_cluster.address
        _check_runs_on_two_workers(client)
    assert client.status == "closed"


@pytest.mark.parametrize("flag", ["--scheduler", "--scheduler-file"])
def test_client_from_args(tcp_cluster: DaskProcesses, flag: str) -> None:
    value = tcp_cluster.address if flag == "--scheduler" else str(tcp_cluster.scheduler_file)
    args = _parser().parse_args([flag, value])
    with client_from_args(args, log=lambda line: None) as client:
        _check_runs_on_two_workers(client)


def test_default_log_goes_to_the_package_logger(
    tcp_cluster: DaskProcesses, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lplr_dask"), get_client(scheduler=tcp_cluster.address):
        pass
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # stdout is for results; the library prints nothing itself
    assert any(r.name == "lplr_dask" and "Dask dashboard: http://127.0.0.1:" in r.getMessage() for r in caplog.records)


def test_current_client_is_reused_and_left_open(tcp_cluster: DaskProcesses) -> None:
    with distributed.Client(tcp_cluster.address) as outer:
        with get_client(log=lambda line: None) as client:
            assert client is outer
        assert outer.status == "running"
        # Any option means "not the current client": a new one is made and closed.
        with get_client(scheduler=tcp_cluster.address, log=lambda line: None) as other:
            assert other is not outer
        assert outer.status == "running"


# --------------------------------------------------------------------------------------------
# TLS


def test_tls_with_certificates(tls_cluster: DaskProcesses, tls_files: TLSFiles) -> None:
    assert tls_cluster.address.startswith("tls://127.0.0.1:")
    args = _parser().parse_args(["--scheduler", tls_cluster.address, *tls_files.flags()])
    with client_from_args(args, log=lambda line: None) as client:
        _check_runs_on_two_workers(client)


def test_tls_scheduler_file_with_certificates(tls_cluster: DaskProcesses, tls_files: TLSFiles) -> None:
    args = _parser().parse_args(["--scheduler-file", str(tls_cluster.scheduler_file), *tls_files.flags()])
    with client_from_args(args, log=lambda line: None) as client:
        assert len(client.scheduler_info()["workers"]) == 2


def test_tls_without_certificates_fails_clearly(tls_cluster: DaskProcesses) -> None:
    with pytest.raises(ClusterError, match=r"uses TLS and needs certificates.*--tls-ca-file"):
        with get_client(scheduler=tls_cluster.address):
            pass


def test_tls_scheduler_over_tcp_fails_clearly(tls_cluster: DaskProcesses) -> None:
    address = tls_cluster.address.replace("tls://", "tcp://")
    with dask.config.set(SHORT_CONNECT), pytest.raises(ClusterError, match=r"tls:// address"):
        with get_client(scheduler=address):
            pass


def test_tls_with_certificates_of_another_ca_fails(tls_cluster: DaskProcesses, tmp_path: Path) -> None:
    stranger = _make_tls_files(tmp_path, "stranger")
    with dask.config.set(SHORT_CONNECT), pytest.raises(ClusterError, match="signed by its CA"):
        with get_client(scheduler=tls_cluster.address, security=_security(stranger)):
            pass


@pytest.mark.parametrize("missing", ["--tls-ca-file", "--tls-cert", "--tls-key"])
def test_tls_needs_all_three_files(tls_files: TLSFiles, missing: str) -> None:
    flags = tls_files.flags()
    i = flags.index(missing)
    args = _parser().parse_args(flags[:i] + flags[i + 2 :])
    with pytest.raises(ClusterError, match=f"{missing} missing"):
        security_from_args(args)


def test_tls_file_must_exist(tls_files: TLSFiles, tmp_path: Path) -> None:
    args = _parser().parse_args([*tls_files.flags()[:4], "--tls-key", str(tmp_path / "nothing.key")])
    with pytest.raises(ClusterError, match=r"--tls-key .*nothing\.key: no such file"):
        security_from_args(args)


def test_tls_files_must_be_pem(tls_files: TLSFiles, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    flags = tls_files.flags()
    args = _parser().parse_args([*flags[2:], "--tls-ca-file", str(junk)])
    with pytest.raises(ClusterError, match=r"--tls-ca-file: cannot load .*junk\.pem.*Expected PEM"):
        security_from_args(args)
    args = _parser().parse_args([*flags[:4], "--tls-key", str(junk)])
    with pytest.raises(ClusterError, match=r"--tls-cert/--tls-key: cannot load .*Expected PEM"):
        security_from_args(args)
    stranger = _make_tls_files(tmp_path, "stranger")  # a key that is not the certificate's
    args = _parser().parse_args([*flags[:4], "--tls-key", str(stranger.key)])
    with pytest.raises(ClusterError, match=r"--tls-cert/--tls-key: cannot load"):
        security_from_args(args)


def test_no_tls_flags_means_dask_config() -> None:
    assert security_from_args(_parser().parse_args([])) is None


# --------------------------------------------------------------------------------------------
# The embedded local cluster


def test_local_cluster_from_flags() -> None:
    args = _parser().parse_args(["--workers", "2", "--threads-per-worker", "1", "--memory-limit", "700MiB"])
    lines: list[str] = []
    with client_from_args(args, log=lines.append) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        workers = client.scheduler_info()["workers"].values()
        assert [w["nthreads"] for w in workers] == [1, 1]
        assert [w["memory_limit"] for w in workers] == [700 * 2**20] * 2
        assert all(w["host"] == "127.0.0.1" for w in workers)
        assert int(da.ones((200, 200), chunks=50).sum().compute()) == 40_000
        cluster = client.cluster
    assert client.status == "closed"
    assert cluster.status.name == "closed"  # what get_client started, it stops
    assert lines[-1].startswith("Dask dashboard: http://127.0.0.1:")


def test_local_cluster_fails_tasks_once_no_worker_is_left() -> None:
    from distributed.scheduler import NoWorkerError

    with dask.config.set({"lplr.cluster.no-workers-timeout": "1s"}):
        with get_client(workers=1, threads_per_worker=1, log=lambda line: None) as client:
            client.cluster.scale(0)  # as if the last worker had died for good
            deadline = time.monotonic() + 30
            while client.scheduler_info()["workers"] and time.monotonic() < deadline:
                time.sleep(0.05)
            t0 = time.monotonic()
            with pytest.raises(NoWorkerError, match="without any running workers"):
                client.submit(sum, [1, 2]).result(timeout=30)
            assert time.monotonic() - t0 < 15  # the timeout, not the result's


def test_local_cluster_with_tls(tls_files: TLSFiles) -> None:
    with get_client(workers=1, security=_security(tls_files), log=lambda line: None) as client:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [1, 2, 3]).result() == 6


# --------------------------------------------------------------------------------------------
# Bad input: clear errors of our own


def test_cluster_error_is_a_value_error() -> None:
    assert issubclass(ClusterError, LplrValueError)
    assert issubclass(ClusterError, ValueError)


def test_missing_scheduler_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    with pytest.raises(ClusterError, match=r"does not exist.*dask scheduler --scheduler-file"):
        with get_client(scheduler_file=path):
            pass


def test_scheduler_file_that_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "notes.json"
    path.write_text("not json")
    with pytest.raises(ClusterError, match="is not a Dask scheduler file"):
        with get_client(scheduler_file=path):
            pass


def test_unreachable_scheduler_times_out_clearly() -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with dask.config.set(SHORT_CONNECT), pytest.raises(ClusterError) as error:
        with get_client(scheduler=address):
            pass
    assert time.monotonic() - start < 30  # the configured timeout applies, not a hang
    message = str(error.value)
    assert f"Could not connect to the Dask scheduler at {address}" in message
    assert "within 3 s" in message
    assert "CONNECT_TIMEOUT" in message  # says how to wait longer


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"scheduler": "tcp://127.0.0.1:1", "cluster": "slurm"}, "at most one of"),
        ({"scheduler": "tcp://127.0.0.1:1", "workers": 2}, "--workers size the local cluster"),
        ({"cluster": "slurm", "memory_limit": "2GiB"}, "cluster/jobqueue.yaml"),
        ({"cluster": "sge"}, "one of \\['pbs', 'slurm'\\]"),
        ({"workers": 0}, "--workers to be a positive integer"),
        ({"cluster": "slurm", "jobs": 0}, "--jobs to be a positive integer"),
        ({"memory_limit": "lots"}, "size like 2GiB"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ClusterError, match=match):
        with get_client(**options):
            pass


def test_jobs_needs_cluster() -> None:
    args = _parser().parse_args(["--jobs", "3"])
    with pytest.raises(ClusterError, match="--jobs applies to --cluster"):
        with client_from_args(args):
            pass


def test_cluster_without_batch_system(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / qsub here
    for kind, command in [("slurm", "sbatch"), ("pbs", "qsub")]:
        with pytest.raises(ClusterError, match=f"needs the `{command}` command"):
            with get_client(cluster=kind):
                pass


# --------------------------------------------------------------------------------------------
# Command-line flags


def test_flags_parse() -> None:
    parser = _parser()
    args = parser.parse_args(["--cluster", "slurm", "--jobs", "4"])
    assert (args.cluster, args.jobs, args.scheduler, args.workers) == ("slurm", 4, None, None)
    args = parser.parse_args(["--workers", "3", "--threads-per-worker", "2", "--memory-limit", "2GiB"])
    assert (args.workers, args.threads_per_worker, args.memory_limit) == (3, 2, "2GiB")
    args = parser.parse_args(["--scheduler", "tcp://10.0.0.5:8786"])
    assert args.scheduler == "tcp://10.0.0.5:8786"
    assert parser.parse_args(["--scheduler-file", "s.json"]).scheduler_file == "s.json"
    assert "Dask cluster" in parser.format_help()


@pytest.mark.parametrize(
    "argv",
    [
        ["--scheduler", "tcp://a:1", "--scheduler-file", "s.json"],
        ["--cluster", "slurm", "--workers", "2"],
        ["--cluster", "lsf"],
        ["--workers", "0"],
        ["--threads-per-worker", "two"],
        ["--memory-limit", "lots"],
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# dask-jobqueue defaults from cluster/jobqueue.yaml


def test_jobqueue_defaults_come_from_the_yaml() -> None:
    options = _jobqueue_options("slurm")
    assert options["job_name"] == "lplr-worker"
    assert (options["cores"], options["processes"], options["memory"]) == (8, 2, "32GiB")


@pytest.mark.slow
def test_jobqueue_defaults_ship_in_the_wheel(tmp_path: Path) -> None:
    """An installed lplr-dask (no repository beside it) finds the same defaults: package data."""
    import zipfile

    repo = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(repo),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("lplr_dask-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("lplr_dask/jobqueue.yaml").decode()
    assert shipped == (repo / "cluster" / "jobqueue.yaml").read_text()


def test_users_dask_config_wins() -> None:
    with dask.config.set({"jobqueue.slurm.cores": 2, "jobqueue.slurm.walltime": "00:05:00"}):
        options = _jobqueue_options("slurm")
    # The user's values stay in dask.config (not passed), and the job size is theirs as a
    # whole: cores=2 with lplr's processes=2 and 32GiB would be a different job than asked.
    assert not {"cores", "processes", "memory", "walltime"} & set(options)
    assert options["job_name"] == "lplr-worker"


def test_jobqueue_processes_above_cores_is_an_error() -> None:
    with dask.config.set({"jobqueue.pbs.cores": 1, "jobqueue.pbs.processes": 4}):
        with pytest.raises(ClusterError, match="processes=4 is more than cores=1"):
            _jobqueue_options("pbs")


def test_jobqueue_config_file_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("jobqueue:\n  pbs:\n    queue: workq\n")
    monkeypatch.setenv("LPLR_JOBQUEUE_CONFIG", str(path))
    assert _jobqueue_options("pbs") == {"queue": "workq"}
    path.write_text("jobqueue: [not, a, mapping]\n")
    with pytest.raises(ClusterError, match="is not a dask-jobqueue config"):
        _jobqueue_options("pbs")


# --------------------------------------------------------------------------------------------
# Batch scripts. NOT run against a real PBS server (none is available): text checks only.
# The SLURM script runs for real in tests/test_slurm.py.


def _job_script(kind: str) -> str:
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]
    options = _jobqueue_options(kind)
    scheduler = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    with cls(**options, scheduler_options=scheduler) as cluster:  # scheduler only, no jobs
        return cluster.job_script()


def test_pbscluster_job_script_has_the_directives() -> None:
    script = _job_script("pbs")
    assert "#PBS -N lplr-worker" in script
    assert "#PBS -l select=1:ncpus=8:mem=" in script
    assert "#PBS -l walltime=02:00:00" in script
    assert "distributed.cli.dask_worker tcp://127.0.0.1:" in script
    assert "--nworkers 2" in script and "--death-timeout 120" in script


def test_slurmcluster_job_script_has_the_directives() -> None:
    script = _job_script("slurm")
    assert "#SBATCH -J lplr-worker" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH -t 02:00:00" in script
    assert "--local-directory ${TMPDIR:-/tmp}" in script


@pytest.mark.parametrize("script", ["cluster/pbs/compress.pbs", "cluster/slurm/compress.sbatch"])
def test_batch_scripts_are_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_pbs_script_text() -> None:
    text = (REPO / "cluster/pbs/compress.pbs").read_text()
    for needle in [
        "#PBS -l select=",
        "#PBS -l walltime=",
        "#PBS -N ",
        "$PBS_NODEFILE",
        "pbsdsh",
        '/bin/dask" scheduler',
        "/bin/dask' worker",
        "--scheduler-file",
        'lplr" compress "$IN" "$OUT"',
        "trap cleanup EXIT",
    ]:
        assert needle in text, needle


def test_sbatch_script_text() -> None:
    text = (REPO / "cluster/slurm/compress.sbatch").read_text()
    for needle in [
        "#SBATCH --ntasks=",
        "#SBATCH --time=",
        "srun",
        "--scheduler-file",
        "dask-mpi",  # the comment that says why not
        'lplr" compress "$IN" "$OUT"',
        "trap cleanup EXIT",
    ]:
        assert needle in text, needle


def _stand_in_venv(directory: Path) -> Path:
    """A VENV for the batch scripts whose `lplr` only reports the workers it reaches.

    `python` and `dask` forward to this interpreter; `lplr compress IN OUT --scheduler-file F`
    connects through get_client and prints the worker count and a small sum, so the scripts'
    Dask plumbing is tested without the real compression.
    """
    bin_ = directory / "bin"
    bin_.mkdir(parents=True)
    for name, target in [
        ("python", sys.executable),
        ("dask", Path(sys.executable).parent / "dask"),
    ]:
        (bin_ / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
    (bin_ / "lplr").write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            import dask.array as da
            from lplr_dask.cluster import get_client
            command, source, out, flag, scheduler_file = sys.argv[1:6]
            assert (command, flag) == ("compress", "--scheduler-file"), sys.argv
            with get_client(scheduler_file=scheduler_file) as client:
                n = len(client.scheduler_info()["workers"])
                total = int(da.ones(100, chunks=10).sum().compute())
            print(f"stand-in lplr: {{source}} -> {{out}}, {{n}} worker(s), sum {{total}}")
            """
        )
    )
    for path in bin_.iterdir():
        path.chmod(0o755)
    return directory


def test_pbs_script_runs_with_a_stand_in_pbsdsh(tmp_path: Path) -> None:
    # No PBS here: a `pbsdsh` that runs its command locally and a two-line PBS_NODEFILE (one
    # node listed twice, as PBS does per cpu) stand in for the server.
    venv = _stand_in_venv(tmp_path / "venv")
    fake_bin = tmp_path / "pbs-bin"
    fake_bin.mkdir()
    pbsdsh = fake_bin / "pbsdsh"
    pbsdsh.write_text('#!/bin/sh\n[ "$1" = -n ] && [ "$3" = -- ] || exit 64\nshift 3\nexec "$@"\n')
    pbsdsh.chmod(0o755)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("node0\nnode0\n")
    env = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "PBS_NODEFILE": str(nodefile),
        "PBS_O_WORKDIR": str(tmp_path),
        "PBS_JOBID": "1.pbs",
        "IN": "in.zarr",
        "OUT": "out.zarr",
        "VENV": str(venv),
        "THREADS": "1",
        "WORKER_MEMORY": "1GiB",
        "SCHEDULER_HOST": "127.0.0.1",
        "DASHBOARD_ADDRESS": "127.0.0.1:0",
        "START_TIMEOUT": "60",
    }
    result = subprocess.run(
        ["bash", str(REPO / "cluster/pbs/compress.pbs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "stand-in lplr: in.zarr -> out.zarr, 1 worker(s), sum 100" in result.stdout
    assert "1 node(s) x 1 thread(s)" in result.stderr
    assert not (tmp_path / "lplr-dask-1.pbs" / "scheduler.json").exists()  # cleaned up
    assert (tmp_path / "lplr-dask-1.pbs" / "worker-node0.log").exists()

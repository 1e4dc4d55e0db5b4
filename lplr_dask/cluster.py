"""Where the computation runs: a Dask client from command-line options or keywords.

Four ways to get workers, one per option (see ``cluster/README.md``):

- the embedded default, a :class:`distributed.LocalCluster` of worker processes on
  127.0.0.1 (``--workers N --threads-per-worker T --memory-limit 2GiB`` size it);
- an existing scheduler, by address (``--scheduler tcp://HOST:PORT``) or by the JSON file that
  ``dask scheduler --scheduler-file F`` writes (``--scheduler-file F``), as in a batch job;
- a dask-jobqueue cluster whose workers are SLURM or PBS jobs (``--cluster slurm --jobs N``),
  with defaults from ``cluster/jobqueue.yaml`` under the user's own Dask configuration;
- a :class:`distributed.Client` that is already current, when no option is given.

Timeouts come from the Dask configuration (``DASK_LPLR__CLUSTER__CONNECT_TIMEOUT=60s`` in the
environment, or ``dask.config.set``):

``lplr.cluster.connect-timeout`` (default ``"30s"``)
    how long to try to reach a scheduler;
``lplr.cluster.worker-timeout`` (default ``"600s"``)
    how long to wait for the first worker of a SLURM/PBS cluster (the jobs may queue);
``lplr.cluster.no-workers-timeout`` (default ``"120s"``)
    the embedded local cluster: how long a task may wait while no worker is left (all of them
    killed for exceeding their memory, say) before it fails with
    :class:`distributed.scheduler.NoWorkerError` instead of waiting forever. A
    ``distributed.scheduler.no-workers-timeout`` of the user's own wins.

dask-jobqueue is imported only for ``--cluster``, and without the SIGINT handler its import
installs (``sys.exit()`` on Ctrl-C): this module never changes the process's signal handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import dask.config
import distributed
import yaml
from dask.utils import format_bytes, parse_bytes, parse_timedelta

from lplr_dask import logs
from lplr_dask.errors import LplrValueError

__all__ = [
    "ClusterError",
    "add_cluster_arguments",
    "client_from_args",
    "get_client",
    "security_from_args",
]


class _BatchSystem(NamedTuple):
    cluster_class: str  # in dask_jobqueue
    submit: str  # command that submits a job script
    queue: str  # command that shows the user's jobs, for messages
    test_only: tuple[str, ...]  # submit options that check a job without submitting it


#: Batch systems that ``--cluster`` accepts.
_CLUSTER_KINDS: dict[str, _BatchSystem] = {
    "slurm": _BatchSystem("SLURMCluster", "sbatch", "squeue --me", ("--test-only",)),
    "pbs": _BatchSystem("PBSCluster", "qsub", "qstat -u $USER", ()),
}

#: jobqueue keys that together size a job; the user setting one of them replaces all of ours.
_JOB_SIZE_KEYS = ("cores", "processes", "memory")

#: Environment variable naming a jobqueue YAML file to use instead of ``cluster/jobqueue.yaml``.
_JOBQUEUE_CONFIG_ENV = "LPLR_JOBQUEUE_CONFIG"

_DEFAULT_CONNECT_TIMEOUT = "30s"
_DEFAULT_WORKER_TIMEOUT = "600s"
_DEFAULT_NO_WORKERS_TIMEOUT = "120s"


class ClusterError(LplrValueError):
    """A Dask cluster could not be started or reached; the message says why and what to do.

    A :class:`ValueError` (through :class:`~lplr_dask.errors.LplrValueError`), so the CLI
    reports it as one line on stderr with exit status 2.
    """


#: Kept for :mod:`lplr_dask.convert` and :mod:`lplr_dask.group` until they log through
#: :mod:`lplr_dask.logs` themselves.
print_to_stderr = logs.info


def _import_jobqueue() -> ModuleType:
    """Import dask-jobqueue (which loads its defaults into ``dask.config``) for ``--cluster``.

    Its import runs ``signal.signal(SIGINT, lambda *_: sys.exit())`` (in ``dask_jobqueue.runner``),
    which would turn Ctrl-C into a silent exit with status 0 in whatever process imported it;
    the handler that was there before is put back.
    """
    previous = signal.getsignal(signal.SIGINT)
    import dask_jobqueue

    if threading.current_thread() is threading.main_thread() and previous is not None:
        signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


# --------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _memory_limit(text: str) -> str:
    try:
        _check_memory_limit(text)
    except ClusterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that choose where the computation runs to `parser`.

    Adds ``--scheduler``, ``--scheduler-file``, ``--cluster`` and ``--workers`` (mutually
    exclusive), ``--jobs`` (with ``--cluster``), ``--threads-per-worker`` and ``--memory-limit``
    (for the embedded local cluster) and ``--tls-ca-file``, ``--tls-cert``, ``--tls-key``.
    :func:`client_from_args` turns the parsed options into a client.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser (or subcommand parser) to extend; two argument groups are added to it.
    """
    group = parser.add_argument_group(
        "Dask cluster",
        "Where to compute. Default: a local cluster of worker processes on this machine\n"
        "(or the current Dask client, when called from Python).",
    )
    mode = group.add_mutually_exclusive_group()
    mode.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786",
    )
    mode.add_argument(
        "--scheduler-file",
        metavar="FILE",
        help="scheduler file written by `dask scheduler --scheduler-file FILE`",
    )
    mode.add_argument(
        "--cluster",
        choices=sorted(_CLUSTER_KINDS),
        help="submit the workers as batch jobs (dask-jobqueue; defaults in cluster/jobqueue.yaml)",
    )
    mode.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="local cluster: number of worker processes (default: from the CPU count)",
    )
    group.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="N",
        help="with --cluster: number of batch jobs to submit (default 1)",
    )
    group.add_argument(
        "--threads-per-worker",
        type=_positive_int,
        metavar="T",
        help="local cluster: threads per worker process",
    )
    group.add_argument(
        "--memory-limit",
        type=_memory_limit,
        metavar="SIZE",
        help="local cluster: memory limit per worker, e.g. 2GiB (default: RAM / workers)",
    )
    tls = parser.add_argument_group(
        "TLS", "Certificates for tls:// schedulers (default: Dask's distributed.comm.tls config)."
    )
    tls.add_argument("--tls-ca-file", metavar="FILE", help="CA certificate (PEM)")
    tls.add_argument("--tls-cert", metavar="FILE", help="this client's certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="this client's private key (PEM)")


def security_from_args(args: argparse.Namespace) -> distributed.Security | None:
    """Build the TLS security from ``--tls-ca-file``, ``--tls-cert`` and ``--tls-key``.

    Parameters
    ----------
    args : argparse.Namespace
        Options parsed by a parser extended with :func:`add_cluster_arguments`.

    Returns
    -------
    distributed.Security or None
        Encryption required, the one certificate used for every role (client, scheduler and
        workers, so that it also secures a cluster started here); None when no TLS option is
        given, which means Dask's ``distributed.comm.tls`` configuration applies.

    Raises
    ------
    ClusterError
        Only some of the three options are given, or a file does not exist.
    """
    files = {
        "--tls-ca-file": getattr(args, "tls_ca_file", None),
        "--tls-cert": getattr(args, "tls_cert", None),
        "--tls-key": getattr(args, "tls_key", None),
    }
    given = {flag: path for flag, path in files.items() if path}
    if not given:
        return None
    missing = [flag for flag in files if flag not in given]
    if missing:
        raise ClusterError(
            f"TLS needs all of --tls-ca-file, --tls-cert and --tls-key; {', '.join(missing)} "
            "missing. Give the CA certificate, this client's certificate and its private key."
        )
    for flag, path in given.items():
        if not Path(path).is_file():
            raise ClusterError(f"{flag} {path}: no such file. Expected a PEM file.")
    ca, cert, key = (os.fspath(path) for path in files.values())
    _check_pem(ca, cert, key)
    return distributed.Security(
        require_encryption=True,
        tls_ca_file=ca,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


def _no_password() -> bytes:
    raise ClusterError("--tls-key is encrypted; Dask needs an unencrypted private key (PEM).")


def _check_pem(ca: str, cert: str, key: str) -> None:
    """Load the TLS files as Python's ``ssl`` (and so Dask) will, before anything starts.

    Raises
    ------
    ClusterError
        A file is not PEM, the key is encrypted, or the key does not belong to the certificate.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    for flag, load in (
        ("--tls-ca-file", lambda: context.load_verify_locations(cafile=ca)),
        ("--tls-cert/--tls-key", lambda: context.load_cert_chain(cert, key, password=_no_password)),
    ):
        try:
            load()
        except (ssl.SSLError, OSError) as e:
            raise ClusterError(
                f"{flag}: cannot load {ca if flag == '--tls-ca-file' else f'{cert} and {key}'} "
                f"({e}). Expected PEM files (-----BEGIN CERTIFICATE----- ...; the key: -----BEGIN "
                "PRIVATE KEY-----, unencrypted, of that certificate)."
            ) from e


@contextlib.contextmanager
def client_from_args(
    args: argparse.Namespace, *, log: Callable[[str], None] = logs.info
) -> Iterator[distributed.Client]:
    """Yield a client for the options added by :func:`add_cluster_arguments`.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options (missing attributes count as not given).
    log : callable, default=lplr_dask.logs.info
        Receives progress lines such as the dashboard address.

    Yields
    ------
    distributed.Client

    Raises
    ------
    ClusterError
        Inconsistent options, or the cluster cannot be started or reached; see :func:`get_client`.
    """
    jobs = getattr(args, "jobs", None)
    cluster = getattr(args, "cluster", None)
    if jobs is not None and cluster is None:
        raise ClusterError(
            "--jobs applies to --cluster slurm|pbs only. Add --cluster, or size a local "
            "cluster with --workers."
        )
    with get_client(
        scheduler=getattr(args, "scheduler", None),
        scheduler_file=getattr(args, "scheduler_file", None),
        cluster=cluster,
        jobs=1 if jobs is None else jobs,
        workers=getattr(args, "workers", None),
        threads_per_worker=getattr(args, "threads_per_worker", None),
        memory_limit=getattr(args, "memory_limit", None),
        security=security_from_args(args),
        device=getattr(args, "device", "cpu"),
        log_level=logging.INFO if getattr(args, "verbose", 0) > 0 else logging.WARNING,
        log=log,
    ) as client:
        yield client


# --------------------------------------------------------------------------------------------
# Python API


@contextlib.contextmanager
def get_client(
    *,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    cluster: str | None = None,
    jobs: int = 1,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    security: distributed.Security | None = None,
    device: str = "cpu",
    log_level: int = logging.WARNING,
    log: Callable[[str], None] = logs.info,
) -> Iterator[distributed.Client]:
    """Yield a Dask client, starting or connecting to a cluster, and clean up afterwards.

    At most one of `scheduler`, `scheduler_file` and `cluster` may be given; without any, a
    local cluster is started (sized by `workers`, `threads_per_worker`, `memory_limit`),
    unless a client is already current and no option at all is given, in which case that
    client is yielded and left open. Whatever this function starts, it closes on exit; it
    never shuts down a scheduler it only connected to.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler, ``tcp://HOST:PORT`` or ``tls://HOST:PORT``.
    scheduler_file : path, optional
        JSON file written by ``dask scheduler --scheduler-file``; it must exist already.
    cluster : {"slurm", "pbs"}, optional
        Submit `jobs` batch jobs of workers through dask-jobqueue. Job sizes come from the
        ``jobqueue.<cluster>`` Dask configuration, whose defaults are taken from
        ``cluster/jobqueue.yaml`` (or the file named by ``$LPLR_JOBQUEUE_CONFIG``) for every key
        that the user's own configuration leaves at dask-jobqueue's default.
    jobs : int, default=1
        Number of batch jobs with `cluster`. Waits until at least one worker has joined.
    workers : int, optional
        Local cluster: worker processes (default: chosen by Dask from the CPU count).
    threads_per_worker : int, optional
        Local cluster: threads per worker (default: CPU count / workers).
    memory_limit : str or int, optional
        Local cluster: memory limit per worker, bytes or a string like ``"2GiB"``
        (default ``"auto"``: the machine's memory / workers).
    security : distributed.Security, optional
        TLS settings (see :func:`security_from_args`); default: Dask's configuration.
    device : {"cpu", "cuda"}, default="cpu"
        With "cuda" the local cluster has one worker process per GPU (`workers` counts GPUs;
        see :func:`lplr_dask.gpu_cluster.gpu_local_cluster`).
    log_level : int, default=logging.WARNING
        Local cluster: the least level of distributed's messages shown (its memory warnings
        are WARNINGs), in this process and the workers'. A task's error reaches the caller once,
        as an exception, without the workers' "Compute Failed" log of it.
    log : callable, default=lplr_dask.logs.info
        Receives progress lines, among them ``"Dask dashboard: <link>"``.

    Yields
    ------
    distributed.Client
        Set as the default client while the context is open.

    Raises
    ------
    ClusterError
        Conflicting options; a missing or unreadable scheduler file; no scheduler reachable
        within ``lplr.cluster.connect-timeout``; ``sbatch``/``qsub`` not found; no SLURM/PBS
        worker within ``lplr.cluster.worker-timeout``; or a local cluster that fails to start.
    """
    _check_options(
        scheduler=scheduler,
        scheduler_file=scheduler_file,
        cluster=cluster,
        jobs=jobs,
        workers=workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
    )
    local_options = (workers, threads_per_worker, memory_limit, security)
    if scheduler is None and scheduler_file is None and cluster is None:
        if all(option is None for option in local_options):
            current = _current_client()
            if current is not None:
                yield current
                return
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            client = _connect(scheduler, security=security, source="from --scheduler")
            stack.callback(client.close)
        elif scheduler_file is not None:
            address = _read_scheduler_file(scheduler_file)
            client = _connect(
                address, security=security, source=f"from scheduler file {scheduler_file}"
            )
            stack.callback(client.close)
        elif cluster is not None:
            client = _start_jobqueue(stack, cluster, jobs=jobs, security=security, log=log)
        elif device == "cuda":
            from lplr_dask.gpu_cluster import gpu_local_cluster

            with _no_workers_timeout():
                local = stack.enter_context(gpu_local_cluster(
                    workers, threads_per_worker=threads_per_worker, security=security,
                    memory_limit="auto" if memory_limit is None else memory_limit,
                    dashboard_address="127.0.0.1:8787",
                ))
            client = stack.enter_context(distributed.Client(local, security=security))
            _set_up_local_workers(stack, client)
        else:
            client = _start_local(
                stack,
                workers=workers,
                threads_per_worker=threads_per_worker,
                memory_limit=memory_limit,
                security=security,
                log_level=log_level,
            )
        log(f"Dask dashboard: {client.dashboard_link}")
        yield client


def _check_options(
    *,
    scheduler: str | None,
    scheduler_file: str | os.PathLike[str] | None,
    cluster: str | None,
    jobs: int,
    workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | int | None,
) -> None:
    modes = {
        "--scheduler": scheduler,
        "--scheduler-file": scheduler_file,
        "--cluster": cluster,
    }
    chosen = [flag for flag, value in modes.items() if value is not None]
    if len(chosen) > 1:
        raise ClusterError(
            f"Expected at most one of --scheduler, --scheduler-file and --cluster. "
            f"Got {' and '.join(chosen)} instead."
        )
    local = {
        "--workers": workers,
        "--threads-per-worker": threads_per_worker,
        "--memory-limit": memory_limit,
    }
    local_given = [flag for flag, value in local.items() if value is not None]
    if chosen and local_given:
        how = (
            "set cores/processes/memory in cluster/jobqueue.yaml or the jobqueue Dask config"
            if cluster is not None
            else "size the workers where the scheduler's workers are started"
        )
        raise ClusterError(
            f"{', '.join(local_given)} size the local cluster only and cannot be combined with "
            f"{chosen[0]}; {how}."
        )
    if cluster is not None and cluster not in _CLUSTER_KINDS:
        raise ClusterError(
            f"Expected --cluster to be one of {sorted(_CLUSTER_KINDS)}. Got {cluster!r} instead."
        )
    for flag, value in {
        "--jobs": jobs,
        "--workers": workers,
        "--threads-per-worker": threads_per_worker,
    }.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ClusterError(f"Expected {flag} to be a positive integer. Got {value!r} instead.")
    if memory_limit is not None:
        _check_memory_limit(memory_limit)


def _check_memory_limit(value: str | int) -> None:
    if value == "auto":
        return
    try:
        nbytes = parse_bytes(value) if isinstance(value, str) else int(value)
    except (ValueError, TypeError) as e:
        raise ClusterError(
            f"Expected --memory-limit to be a size like 2GiB or 500MB, or 'auto'. "
            f"Got {value!r} instead."
        ) from e
    if nbytes <= 0:
        raise ClusterError(f"Expected --memory-limit to be positive. Got {value!r} instead.")


def _current_client() -> distributed.Client | None:
    try:
        client = distributed.default_client()
    except ValueError:  # no client is current
        return None
    return client if client.status == "running" else None


def _timeout(key: str, default: str) -> float:
    return parse_timedelta(dask.config.get(key, default))


def _read_scheduler_file(path: str | os.PathLike[str]) -> str:
    file = Path(path)
    if not file.is_file():
        raise ClusterError(
            f"Scheduler file {str(path)!r} does not exist. Start a scheduler with "
            f"`dask scheduler --scheduler-file {path}` (or wait until it has written the file), "
            "or connect by address with --scheduler tcp://HOST:PORT."
        )
    try:
        address = json.loads(file.read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ClusterError(
            f"Scheduler file {str(path)!r} is not a Dask scheduler file (expected JSON with an "
            f"'address' key): {e}. Point --scheduler-file at the file that `dask scheduler "
            "--scheduler-file` writes."
        ) from e
    if not isinstance(address, str):
        raise ClusterError(
            f"Scheduler file {str(path)!r} has address {address!r}; expected a string like "
            "tcp://HOST:PORT."
        )
    return address


def _connect(
    address: str, *, security: distributed.Security | None, source: str
) -> distributed.Client:
    timeout = _timeout("lplr.cluster.connect-timeout", _DEFAULT_CONNECT_TIMEOUT)
    if address.startswith("tls://") and security is None:
        security = distributed.Security()  # from Dask's config
        if not security.tls_ca_file:
            raise ClusterError(
                f"The scheduler at {address} ({source}) uses TLS and needs certificates. Give "
                "--tls-ca-file, --tls-cert and --tls-key (or set distributed.comm.tls.* in the "
                "Dask config)."
            )
    try:
        return distributed.Client(address, security=security, timeout=timeout)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        hint = (
            "Check that the scheduler is running and that the address and port are right"
            + (
                "; for a tls:// scheduler, that the certificates are signed by its CA"
                if address.startswith("tls://")
                else "; a TLS scheduler has a tls:// address and needs --tls-* options"
            )
            + ". Wait longer with DASK_LPLR__CLUSTER__CONNECT_TIMEOUT=120s."
        )
        raise ClusterError(
            f"Could not connect to the Dask scheduler at {address} ({source}) within "
            f"{timeout:g} s: {e}. {hint}"
        ) from e


@contextlib.contextmanager
def _dashboard_port_fallback_quietly() -> Iterator[None]:
    """Hide the warning that port 8787 is busy: a free port is used; the logged link shows it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Port 8787 is already in use", UserWarning)
        yield


def _start_local(
    stack: contextlib.ExitStack,
    *,
    workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | int | None,
    security: distributed.Security | None,
    log_level: int,
) -> distributed.Client:
    with _dashboard_port_fallback_quietly(), _no_workers_timeout():
        try:
            local = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=threads_per_worker,
                memory_limit="auto" if memory_limit is None else memory_limit,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:8787",
                security=security,
                silence_logs=log_level,
            )
        except (OSError, TimeoutError, ValueError) as e:
            raise ClusterError(
                f"Could not start a local Dask cluster (workers={workers}, threads_per_worker="
                f"{threads_per_worker}, memory_limit={memory_limit}): {e}. Try fewer workers or "
                "a smaller --memory-limit."
            ) from e
    stack.callback(local.close)
    client = distributed.Client(local, security=security)
    stack.callback(client.close)
    _set_up_local_workers(stack, client)
    return client


def _no_workers_timeout() -> contextlib.AbstractContextManager[None]:
    """The Dask config under which a local cluster starts: tasks fail once no worker is left.

    ``distributed.scheduler.no-workers-timeout`` if the user set it, else
    ``lplr.cluster.no-workers-timeout`` (default 120 s); the scheduler of a local cluster runs in
    this process and reads the key as it starts.
    """
    timeout = dask.config.get("distributed.scheduler.no-workers-timeout", None) or dask.config.get(
        "lplr.cluster.no-workers-timeout", _DEFAULT_NO_WORKERS_TIMEOUT
    )
    return dask.config.set({"distributed.scheduler.no-workers-timeout": timeout})


def _set_up_local_workers(stack: contextlib.ExitStack, client: distributed.Client) -> None:
    """Quiet repeats in this process's (the scheduler's) log and set up the workers, until `stack` closes."""
    stack.callback(_filter_repeats())
    try:
        client.register_plugin(_LocalWorkerSetup())
    except OSError:  # a worker died meanwhile: the scheduler keeps the plugin for its replacement
        pass


class _RepeatFilter(logging.Filter):
    """Drop distributed's records that only repeat what the client reports once.

    A worker's "Compute Failed" (the task's error, which reaches the client as its exception)
    and "ended with CancelledError" (tasks cancelled because the client stopped, on Ctrl-C);
    the scheduler's "marked as failed because ..." after the first (one line per task).
    """

    def __init__(self) -> None:
        super().__init__()
        self.timed_out = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "marked as failed because" in message:
            first, self.timed_out = not self.timed_out, True
            return first
        return not (message.startswith("Compute Failed") or "ended with CancelledError" in message)


def _filter_repeats() -> Callable[[], None]:
    """Add a :class:`_RepeatFilter` to distributed's handlers here; returns what removes it."""
    handlers = [h for h in logging.getLogger("distributed").handlers
                if not any(isinstance(f, _RepeatFilter) for f in h.filters)]
    repeat = _RepeatFilter()
    for handler in handlers:
        handler.addFilter(repeat)
    return lambda: [handler.removeFilter(repeat) for handler in handlers] and None


class _LocalWorkerSetup(distributed.WorkerPlugin):
    """Set up each worker process of the embedded local cluster (restarted ones too).

    The workers ignore SIGINT: Ctrl-C at a terminal reaches the whole process group, and the
    client, which handles it, closes the workers itself (else each prints a traceback). Their
    repeats of the client's errors are dropped (see :class:`_RepeatFilter`).
    """

    name = "lplr-local-worker-setup"

    def setup(self, worker: distributed.Worker) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        _filter_repeats()


def _jobqueue_config_path() -> Path:
    """The YAML file of lplr's dask-jobqueue defaults: ``$LPLR_JOBQUEUE_CONFIG`` or the package's.

    ``lplr_dask/jobqueue.yaml`` is a symbolic link to ``cluster/jobqueue.yaml`` in the repository
    (one file to edit) and a copy of it in a built wheel (package data), so an installed
    lplr-dask finds its defaults without the repository.
    """
    env = os.environ.get(_JOBQUEUE_CONFIG_ENV)
    if env:
        return Path(env)
    return Path(__file__).parent / "jobqueue.yaml"


def _jobqueue_options(kind: str) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue cluster of `kind` from ``cluster/jobqueue.yaml``.

    Only keys that differ from dask-jobqueue's own default, and that the current Dask
    configuration leaves at that default, are returned, so that a user's
    ``~/.config/dask/jobqueue.yaml``, ``DASK_JOBQUEUE__...`` environment variables or
    ``dask.config.set`` win over lplr's defaults. ``cores``, ``processes`` and ``memory`` go
    together: if the user sets any of them, lplr's values for all three are dropped.

    Parameters
    ----------
    kind : {"slurm", "pbs"}

    Returns
    -------
    dict
        Keyword arguments for ``SLURMCluster`` / ``PBSCluster`` (empty when the file is absent).

    Raises
    ------
    ClusterError
        The file exists but is not valid YAML of the form ``jobqueue: {kind: {...}}``.
    """
    path = _jobqueue_config_path()
    if not path.is_file():
        return {}
    _import_jobqueue()  # its defaults in dask.config are what "left at the default" compares with
    try:
        ours = (yaml.safe_load(path.read_text()) or {}).get("jobqueue", {}).get(kind, {})
    except (yaml.YAMLError, AttributeError) as e:
        raise ClusterError(
            f"{path} is not a dask-jobqueue config (expected YAML 'jobqueue: {{{kind}: ...}}'): {e}"
        ) from e
    package_file = importlib.resources.files("dask_jobqueue") / "jobqueue.yaml"
    package = yaml.safe_load(package_file.read_text())["jobqueue"][kind]
    current = dask.config.get(f"jobqueue.{kind}", {})
    user_set = {key for key in package if current.get(key) != package[key]}
    if user_set & set(_JOB_SIZE_KEYS):
        # cores, processes and memory only make sense together: the user's choice of any of
        # them replaces lplr's job size (else cores=1 with our processes=2 gives 0 threads).
        user_set |= set(_JOB_SIZE_KEYS)
    options = {}
    for key, value in ours.items():
        if value != package.get(key) and key not in user_set:
            name = "job_name" if key == "name" else key.replace("-", "_")
            options[name] = value
    cores = options.get("cores", current.get("cores"))
    processes = options.get("processes", current.get("processes"))
    if cores is not None and processes is not None and processes > cores:
        raise ClusterError(
            f"jobqueue.{kind}: processes={processes} is more than cores={cores}, which leaves "
            f"workers without threads. Set jobqueue.{kind}.processes to at most cores "
            "(in ~/.config/dask/jobqueue.yaml or DASK_JOBQUEUE__...)."
        )
    return options


def _start_jobqueue(
    stack: contextlib.ExitStack,
    kind: str,
    *,
    jobs: int,
    security: distributed.Security | None,
    log: Callable[[str], None],
) -> distributed.Client:
    system = _CLUSTER_KINDS[kind]
    if shutil.which(system.submit) is None:
        raise ClusterError(
            f"--cluster {kind} needs the `{system.submit}` command, which is not on PATH. Run on "
            f"a {kind.upper()} login node (load its module first), or use --scheduler-file "
            f"inside a batch job (see cluster/{kind}/)."
        )
    options = _jobqueue_options(kind)
    dask_jobqueue = _import_jobqueue()
    try:
        with _dashboard_port_fallback_quietly():
            jobqueue = getattr(dask_jobqueue, system.cluster_class)(security=security, **options)
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        raise ClusterError(
            f"Could not start the dask-jobqueue {system.cluster_class}: {e}. Check the "
            f"jobqueue.{kind} settings in {_jobqueue_config_path()} and your Dask config."
        ) from e
    leftovers = f"check `{system.queue}` for leftover jobs"
    stack.callback(_close_quietly, jobqueue.close, f"the {kind.upper()} cluster", leftovers, log)
    _check_job_accepted(jobqueue.job_script(), kind, system)
    client = distributed.Client(jobqueue, security=security)
    stack.callback(client.close)
    jobqueue.scale(jobs=jobs)
    log(f"Submitted {jobs} {kind.upper()} job(s) of Dask workers; waiting for the first one")
    timeout = _timeout("lplr.cluster.worker-timeout", _DEFAULT_WORKER_TIMEOUT)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as e:
        job_ids = [job.job_id for job in jobqueue.workers.values() if job.job_id]
        submitted = (
            f"jobs {', '.join(job_ids)} may still be queued or may have failed"
            if job_ids
            else f"{system.submit} accepted none of them (its error is logged above)"
        )
        raise ClusterError(
            f"No Dask worker joined within {timeout:g} s after submitting {jobs} "
            f"{kind.upper()} job(s): {submitted}. Check the queue (`{system.queue}`) and the job "
            f"logs (jobqueue.{kind}.log-directory); wait longer with "
            "DASK_LPLR__CLUSTER__WORKER_TIMEOUT=1800s."
        ) from e
    workers = client.scheduler_info(n_workers=-1)["workers"]
    memory = sum(w.get("memory_limit", 0) for w in workers.values())
    log(f"{len(workers)} worker(s) up, {format_bytes(memory)} of memory in all")
    return client


def _check_job_accepted(script: str, kind: str, system: _BatchSystem) -> None:
    """Ask the batch system whether it would run `script` (SLURM: ``sbatch --test-only``).

    A job that can never run (more memory or cores than any node has, a wrong partition) then
    fails here with the batch system's reason, instead of as a worker timeout minutes later.
    """
    if not system.test_only:
        return
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "lplr-worker-job.sh"
        path.write_text(script)
        result = subprocess.run(
            [system.submit, *system.test_only, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if result.returncode != 0:
        reason = " ".join((result.stderr or result.stdout).split())
        raise ClusterError(
            f"{system.submit} refuses the Dask worker job: {reason}. Make jobqueue.{kind} (cores, "
            f"memory, walltime, queue, account) fit the {kind.upper()} partitions (see `sinfo`), "
            f"in ~/.config/dask/jobqueue.yaml or {_jobqueue_config_path()}."
        )


def _close_quietly(
    close: Callable[[], object], what: str, hint: str, log: Callable[[str], None]
) -> None:
    """Close `what`, reporting rather than raising a failure (cleanup must not mask an error)."""
    try:
        close()
    except Exception as e:  # noqa: BLE001 - dask-jobqueue can assert on jobs that never started
        log(f"Warning: could not close {what} cleanly ({type(e).__name__}: {e}); {hint}")

"""The client: the embedded local cluster, a running scheduler, or SLURM/PBS jobs.

:func:`get_client` (and :func:`client_from_args`, its command-line form) chooses between:

- the embedded default, a :class:`distributed.LocalCluster` of worker processes on
  127.0.0.1 (``--workers N --threads-per-worker T --memory-limit 2GiB`` size it), one worker
  per GPU with ``device="cuda"`` (:mod:`lplr_dask.cluster.gpu`);
- an existing scheduler, by address (``--scheduler tcp://HOST:PORT``) or by the JSON file that
  ``dask scheduler --scheduler-file F`` writes (``--scheduler-file F``), as in a batch job;
- a dask-jobqueue cluster whose workers are SLURM or PBS jobs (``--cluster slurm --jobs N``,
  :mod:`lplr_dask.cluster.jobqueue`);
- a :class:`distributed.Client` that is already current, when no option is given.

A local cluster's tasks fail with :class:`distributed.scheduler.NoWorkerError` once no worker
has been left for ``lplr.cluster.no-workers-timeout`` (all of them killed for exceeding their
memory, say) instead of waiting forever; a ``distributed.scheduler.no-workers-timeout`` of the
user's own wins.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import dask.config
import distributed

from lplr_dask import logs
from lplr_dask.cluster.arguments import _check_options, security_from_args
from lplr_dask.cluster.base import ClusterError, _dashboard_port_fallback_quietly, _timeout
from lplr_dask.cluster.gpu import gpu_local_cluster
from lplr_dask.cluster.jobqueue import _start_jobqueue

__all__ = ["client_from_args", "get_client"]


@contextlib.contextmanager
def client_from_args(
    args: argparse.Namespace, *, log: Callable[[str], None] = logs.info
) -> Iterator[distributed.Client]:
    """Yield a client for the options added by :func:`~lplr_dask.cluster.add_cluster_arguments`.

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
            "--jobs applies to --cluster slurm|pbs only. Add --cluster, or size a local cluster with --workers."
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
        TLS settings (see :func:`~lplr_dask.cluster.security_from_args`); default: Dask's
        configuration.
    device : {"cpu", "cuda"}, default="cpu"
        With "cuda" the local cluster has one worker process per GPU (`workers` counts GPUs;
        see :func:`lplr_dask.cluster.gpu.gpu_local_cluster`).
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
            client = _connect(address, security=security, source=f"from scheduler file {scheduler_file}")
            stack.callback(client.close)
        elif cluster is not None:
            client = _start_jobqueue(stack, cluster, jobs=jobs, security=security, log=log)
        elif device == "cuda":
            with _no_workers_timeout():
                local = stack.enter_context(
                    gpu_local_cluster(
                        workers,
                        threads_per_worker=threads_per_worker,
                        security=security,
                        memory_limit="auto" if memory_limit is None else memory_limit,
                        dashboard_address="127.0.0.1:8787",
                    )
                )
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


def _current_client() -> distributed.Client | None:
    try:
        client = distributed.default_client()
    except ValueError:  # no client is current
        return None
    return client if client.status == "running" else None


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
            f"Scheduler file {str(path)!r} has address {address!r}; expected a string like tcp://HOST:PORT."
        )
    return address


def _connect(address: str, *, security: distributed.Security | None, source: str) -> distributed.Client:
    timeout = _timeout("lplr.cluster.connect-timeout")
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
            f"Could not connect to the Dask scheduler at {address} ({source}) within {timeout:g} s: {e}. {hint}"
        ) from e


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
    ``lplr.cluster.no-workers-timeout`` (120 s in ``lplr.yaml``); the scheduler of a local
    cluster runs in this process and reads the key as it starts.
    """
    timeout = dask.config.get("distributed.scheduler.no-workers-timeout") or dask.config.get(
        "lplr.cluster.no-workers-timeout"
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
    handlers = [
        h for h in logging.getLogger("distributed").handlers if not any(isinstance(f, _RepeatFilter) for f in h.filters)
    ]
    repeat = _RepeatFilter()
    for handler in handlers:
        handler.addFilter(repeat)

    def remove() -> None:
        for handler in handlers:
            handler.removeFilter(repeat)

    return remove


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

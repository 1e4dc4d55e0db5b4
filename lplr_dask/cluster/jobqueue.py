"""Workers as SLURM or PBS batch jobs, through dask-jobqueue (``--cluster slurm|pbs --jobs N``).

The jobs' defaults are lplr's ``cluster/jobqueue.yaml`` (``lplr_dask/jobqueue.yaml`` links to it,
a built wheel holds a copy; ``$LPLR_JOBQUEUE_CONFIG`` names another file). They go under the
user's Dask configuration by Dask's own rule for package defaults, the one
:func:`dask.config.update_defaults` applies (``dask.config.update(..., priority="new-defaults")``):
a key that the user's ``~/.config/dask/jobqueue.yaml``, ``DASK_JOBQUEUE__...`` environment
variables or ``dask.config.set`` moved off dask-jobqueue's default keeps the user's value. The
result is passed to the cluster class as keywords, not written into the global configuration,
so a dask-jobqueue cluster that the user starts in the same process is not changed by lplr.

dask-jobqueue is imported only for ``--cluster``, and without the SIGINT handler its import
installs (``sys.exit()`` on Ctrl-C): this module never changes the process's signal handlers.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import dask.config
import distributed
import yaml
from dask.utils import format_bytes

from lplr_dask.cluster.base import ClusterError, _dashboard_port_fallback_quietly, _timeout

__all__: list[str] = []


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


def _jobqueue_config_path() -> Path:
    """The YAML file of lplr's dask-jobqueue defaults: ``$LPLR_JOBQUEUE_CONFIG`` or the package's.

    ``lplr_dask/jobqueue.yaml`` is a symbolic link to ``cluster/jobqueue.yaml`` in the repository
    (one file to edit) and a copy of it in a built wheel (package data), so an installed
    lplr-dask finds its defaults without the repository.
    """
    env = os.environ.get(_JOBQUEUE_CONFIG_ENV)
    if env:
        return Path(env)
    return Path(__file__).parent.parent / "jobqueue.yaml"


def _jobqueue_options(kind: str) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue cluster of `kind` from ``cluster/jobqueue.yaml``.

    The file's ``jobqueue.<kind>`` values are layered under the current Dask configuration as
    :func:`dask.config.update_defaults` would layer them (see the module docstring); the keys
    whose value that changes are returned. ``cores``, ``processes`` and ``memory`` go together:
    if the user sets any of them, lplr's values for all three are dropped.

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
        The file exists but is not valid YAML of the form ``jobqueue: {kind: {...}}``, or the
        resulting job has more worker processes than cores.
    """
    path = _jobqueue_config_path()
    if not path.is_file():
        return {}
    _import_jobqueue()  # registers dask-jobqueue's defaults, which "the user's own" differs from
    ours = _read_jobqueue_file(path, kind)
    package = dask.config.merge(*dask.config.defaults).get("jobqueue", {}).get(kind, {})
    current = dask.config.get(f"jobqueue.{kind}")
    if any(current.get(key) != package.get(key) for key in _JOB_SIZE_KEYS):
        # cores, processes and memory only make sense together: the user's choice of any of
        # them replaces lplr's job size (else cores=1 with our processes=2 gives 0 threads).
        ours = {key: value for key, value in ours.items() if key not in _JOB_SIZE_KEYS}
    job = dask.config.update(copy.deepcopy(current), ours, priority="new-defaults", defaults=package)
    cores, processes = job.get("cores"), job.get("processes")
    if cores is not None and processes is not None and processes > cores:
        raise ClusterError(
            f"jobqueue.{kind}: processes={processes} is more than cores={cores}, which leaves "
            f"workers without threads. Set jobqueue.{kind}.processes to at most cores "
            "(in ~/.config/dask/jobqueue.yaml or DASK_JOBQUEUE__...)."
        )
    return {
        "job_name" if key == "name" else key.replace("-", "_"): value
        for key, value in job.items()
        if value != current.get(key)
    }


def _read_jobqueue_file(path: Path, kind: str) -> dict[str, Any]:
    """The ``jobqueue.<kind>`` mapping of the YAML file at `path` (empty if it has none)."""
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("jobqueue", {}).get(kind) or {}
    except (yaml.YAMLError, AttributeError) as e:
        raise ClusterError(
            f"{path} is not a dask-jobqueue config (expected YAML 'jobqueue: {{{kind}: ...}}'): {e}"
        ) from e


def _start_jobqueue(
    stack: contextlib.ExitStack,
    kind: str,
    *,
    jobs: int,
    security: distributed.Security | None,
    log: Callable[[str], None],
) -> distributed.Client:
    """Submit `jobs` batch jobs of workers of `kind`; the client once one worker has joined.

    The cluster and client close when `stack` does.

    Raises
    ------
    ClusterError
        No ``sbatch``/``qsub``; the cluster cannot start; the batch system refuses the job; or
        no worker within ``lplr.cluster.worker-timeout``.
    """
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
    timeout = _timeout("lplr.cluster.worker-timeout")
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


def _close_quietly(close: Callable[[], object], what: str, hint: str, log: Callable[[str], None]) -> None:
    """Close `what`, reporting rather than raising a failure (cleanup must not mask an error)."""
    try:
        close()
    except Exception as e:  # noqa: BLE001 - dask-jobqueue can assert on jobs that never started
        log(f"Warning: could not close {what} cleanly ({type(e).__name__}: {e}); {hint}")

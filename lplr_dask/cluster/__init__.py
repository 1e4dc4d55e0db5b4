"""Where the computation runs: a Dask client from command-line options or keywords.

Four ways to get workers, one per option (see ``cluster/README.md``):

- the embedded default, a :class:`distributed.LocalCluster` of worker processes on
  127.0.0.1 (``--workers N --threads-per-worker T --memory-limit 2GiB`` size it);
- an existing scheduler, by address (``--scheduler tcp://HOST:PORT``) or by the JSON file that
  ``dask scheduler --scheduler-file F`` writes (``--scheduler-file F``), as in a batch job;
- a dask-jobqueue cluster whose workers are SLURM or PBS jobs (``--cluster slurm --jobs N``),
  with defaults from ``cluster/jobqueue.yaml`` under the user's own Dask configuration;
- a :class:`distributed.Client` that is already current, when no option is given.

One module per subject:

:mod:`~lplr_dask.cluster.arguments`
    the flags (:func:`add_cluster_arguments`), the checks of the choice, the TLS files;
:mod:`~lplr_dask.cluster.local`
    :func:`get_client` and :func:`client_from_args`, the local cluster, a running scheduler;
:mod:`~lplr_dask.cluster.jobqueue`
    SLURM/PBS workers through dask-jobqueue (imported only for ``--cluster``, without the SIGINT
    handler its import installs: this package never changes the process's signal handlers);
:mod:`~lplr_dask.cluster.gpu`
    one worker per GPU for ``--device cuda``;
:mod:`~lplr_dask.cluster.base`
    :class:`ClusterError` and the timeouts, which all of them share.

Timeouts come from the Dask configuration, defaults in ``lplr_dask/lplr.yaml``
(``DASK_LPLR__CLUSTER__CONNECT_TIMEOUT=60s`` in the environment, or ``dask.config.set``):

``lplr.cluster.connect-timeout`` (default ``"30s"``)
    how long to try to reach a scheduler;
``lplr.cluster.worker-timeout`` (default ``"600s"``)
    how long to wait for the first worker of a SLURM/PBS cluster (the jobs may queue);
``lplr.cluster.no-workers-timeout`` (default ``"120s"``)
    the embedded local cluster: how long a task may wait while no worker is left (all of them
    killed for exceeding their memory, say) before it fails with
    :class:`distributed.scheduler.NoWorkerError` instead of waiting forever. A
    ``distributed.scheduler.no-workers-timeout`` of the user's own wins.
"""

from lplr_dask import logs
from lplr_dask.cluster.arguments import add_cluster_arguments, security_from_args
from lplr_dask.cluster.base import ClusterError
from lplr_dask.cluster.jobqueue import _jobqueue_options  # noqa: F401  (tests and scripts use it)
from lplr_dask.cluster.local import client_from_args, get_client

__all__ = [
    "ClusterError",
    "add_cluster_arguments",
    "client_from_args",
    "get_client",
    "security_from_args",
]

#: The old name of :func:`lplr_dask.logs.info`, kept for code that still imports it from here.
print_to_stderr = logs.info

"""The options that choose where the computation runs: the flags, their checks, the TLS files.

:func:`add_cluster_arguments` adds the flags to a parser; :func:`security_from_args` turns the
``--tls-*`` ones into a :class:`distributed.Security` after loading the PEM files as ``ssl`` will;
:func:`_check_options` checks the choice as a whole, from the command line or from Python
(:func:`lplr_dask.cluster.get_client`'s keywords).
"""

from __future__ import annotations

import argparse
import os
import ssl
from pathlib import Path

import distributed
from dask.utils import parse_bytes

from lplr_dask.cluster.base import ClusterError
from lplr_dask.cluster.jobqueue import _CLUSTER_KINDS
from lplr_dask.validation import expected

__all__ = ["add_cluster_arguments", "security_from_args"]


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
    :func:`~lplr_dask.cluster.client_from_args` turns the parsed options into a client.

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
    ca, cert, key = (os.fspath(path) for path in files.values() if path is not None)
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
    """Check the choice of where to run as a whole (the keywords of ``get_client``).

    Raises
    ------
    ClusterError
        More than one of `scheduler`, `scheduler_file` and `cluster`; a local cluster's size
        with one of them; an unknown `cluster`; a count that is not a positive integer; or a
        `memory_limit` that is not a positive size.
    """
    modes = {
        "--scheduler": scheduler,
        "--scheduler-file": scheduler_file,
        "--cluster": cluster,
    }
    chosen = [flag for flag, value in modes.items() if value is not None]
    if len(chosen) > 1:
        raise ClusterError(
            f"Expected at most one of --scheduler, --scheduler-file and --cluster. Got {' and '.join(chosen)} instead."
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
            f"{', '.join(local_given)} size the local cluster only and cannot be combined with {chosen[0]}; {how}."
        )
    if cluster is not None and cluster not in _CLUSTER_KINDS:
        kinds = sorted(_CLUSTER_KINDS)
        raise expected(f"--cluster to be one of {kinds}", cluster, error=ClusterError)
    for flag, value in {
        "--jobs": jobs,
        "--workers": workers,
        "--threads-per-worker": threads_per_worker,
    }.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise expected(f"{flag} to be a positive integer", value, error=ClusterError)
    if memory_limit is not None:
        _check_memory_limit(memory_limit)


def _check_memory_limit(value: str | int) -> None:
    if value == "auto":
        return
    try:
        nbytes = parse_bytes(value) if isinstance(value, str) else int(value)
    except (ValueError, TypeError) as e:
        raise expected("--memory-limit to be a size like 2GiB or 500MB, or 'auto'", value, error=ClusterError) from e
    if nbytes <= 0:
        raise expected("--memory-limit to be positive", value, error=ClusterError)

"""What every way of getting workers shares: :class:`ClusterError`, the timeouts, a quiet dashboard.

The timeouts are the Dask configuration's ``lplr.cluster.*`` keys, whose defaults are in
``lplr_dask/lplr.yaml`` (see :mod:`lplr_dask.config`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import dask.config
from dask.utils import parse_timedelta

import lplr_dask.config  # noqa: F401  (lplr's defaults in dask.config)
from lplr_dask.errors import LplrValueError

__all__ = ["ClusterError"]


class ClusterError(LplrValueError):
    """A Dask cluster could not be started or reached; the message says why and what to do.

    A :class:`ValueError` (through :class:`~lplr_dask.errors.LplrValueError`), so the CLI
    reports it as one line on stderr with exit status 2.
    """


def _timeout(key: str) -> float:
    """Seconds of the Dask config `key`, such as ``"lplr.cluster.connect-timeout"``."""
    return parse_timedelta(dask.config.get(key))


@contextlib.contextmanager
def _dashboard_port_fallback_quietly() -> Iterator[None]:
    """Hide the warning that port 8787 is busy: a free port is used; the logged link shows it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Port 8787 is already in use", UserWarning)
        yield

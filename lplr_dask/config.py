"""lplr's settings in the Dask configuration: the ``lplr:`` keys, whose defaults are ``lplr.yaml``.

Importing this module (``import lplr_dask`` does) adds ``lplr_dask/lplr.yaml`` to Dask's
defaults with :func:`dask.config.update_defaults`, as dask-jobqueue's ``config.py`` does with its
``jobqueue.yaml``. A value of the user's wins: ``~/.config/dask/*.yaml``, the environment
(``DASK_LPLR__PROGRESS__INTERVAL=5s``) or ``dask.config.set({"lplr.progress.interval": "5s"})``.
Code reads a key with ``dask.config.get("lplr.progress.interval")``, with no default of its own.

The keys (see ``lplr.yaml`` for what each means):

``lplr.progress.interval``
    at most this long between two heartbeat lines of a step (:mod:`lplr_dask.progress`);
``lplr.cluster.connect-timeout``, ``.worker-timeout``, ``.no-workers-timeout``
    how long to wait for a scheduler, for the first SLURM/PBS worker, and for a worker while
    none is left (:mod:`lplr_dask.cluster`);
``lplr.max-rank``
    the largest rank a budget (``--bits-per-entry`` with ``--bits``) or ``--match-nq`` sets; above
    it the rank is capped with a warning (:func:`lplr_dask.budget.resolve_rank`);
``lplr.central.in-process-bytes``
    the steps between the passes run in the client process while the thin matrices they read
    take at most this many bytes (:attr:`lplr_dask.factorize.StageContext.central`);
``lplr.chunking.max-tasks``
    at most this many tasks per read of A: smaller chunks are read merged, as far as a merged
    task fits the workers' memory (:func:`lplr_dask.chunking.plan`);
``lplr.array.max-bytes``
    ``np.asarray(factors)`` reconstructs ``L·R`` in memory up to this size, and above it raises
    naming ``factors.to_dask()`` (:meth:`lplr_dask.factors.Factors.__array__`).
"""

from __future__ import annotations

import importlib.resources

import dask.config
import yaml

__all__ = ["defaults"]

#: lplr's defaults as ``lplr.yaml`` holds them: ``{"lplr": {...}}``.
defaults: dict = yaml.safe_load((importlib.resources.files("lplr_dask") / "lplr.yaml").read_text())

dask.config.update_defaults(defaults)

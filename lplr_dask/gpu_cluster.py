"""Compatibility: :mod:`lplr_dask.cluster.gpu` (one Dask worker per GPU) under its old name."""

from lplr_dask.cluster.gpu import (  # noqa: F401
    PinnedGPUCluster,
    gpu_local_cluster,
    visible_gpus,
    worker_environments,
)

__all__ = ["gpu_local_cluster", "visible_gpus", "worker_environments"]

"""One Dask worker per GPU on this machine: the embedded cluster for ``--device cuda``.

With dask-cuda installed this is its :class:`dask_cuda.LocalCUDACluster` (which also pins CPU
affinity and can spill device memory). Without it, a :class:`distributed.LocalCluster` of worker
processes whose worker ``i`` runs with ``CUDA_VISIBLE_DEVICES`` rotated so that GPU ``i`` is its
device 0, as dask-cuda does: CuPy in that worker then allocates on its own GPU only.

The client process needs CuPy too (dask arrays of cupy chunks carry a cupy ``_meta``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import distributed
from dask.system import CPU_COUNT

from lplr_dask.backend import cupy_with_gpu
from lplr_dask.errors import LplrValueError

__all__ = ["PinnedGPUCluster", "gpu_local_cluster", "visible_gpus", "worker_environments"]


def visible_gpus(n_gpus: int | None = None, *, environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs to put workers on: the first ``n_gpus`` that this process sees.

    Parameters
    ----------
    n_gpus : int, optional
        How many (default: all).
    environ : mapping, optional
        The environment to read ``CUDA_VISIBLE_DEVICES`` from (default ``os.environ``).

    Returns
    -------
    list of str
        Entries of ``CUDA_VISIBLE_DEVICES`` (indices, ``GPU-…`` or ``MIG-…`` UUIDs) when it is
        set, else ``"0"`` … ``"count-1"``; as many as CuPy counts.

    Raises
    ------
    LplrValueError
        Without CuPy or a GPU (naming the extra to install), or for more GPUs than are visible.
    """
    count = int(cupy_with_gpu().cuda.runtime.getDeviceCount())
    listed = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "")
    devices = [d.strip() for d in listed.split(",") if d.strip()] or [str(i) for i in range(count)]
    return _first(devices[:count], n_gpus)


def _first(devices: list[str], n_gpus: int | None) -> list[str]:
    if n_gpus is None:
        return devices
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or not 1 <= n_gpus <= len(devices):
        raise LplrValueError(
            f"Expected a number of GPUs from 1 to {len(devices)} (the GPUs visible here: "
            f"{','.join(devices)}; with --device cuda, --workers counts GPUs). Got {n_gpus!r} instead."
        )
    return devices[:n_gpus]


def worker_environments(devices: Sequence[str]) -> list[dict[str, str]]:
    """``CUDA_VISIBLE_DEVICES`` for each worker: worker ``i`` sees ``devices[i]`` first.

    The rest follow in turn (``["0", "1", "2"]`` gives ``"0,1,2"``, ``"1,2,0"``, ``"2,0,1"``), as in
    dask-cuda, so each worker's device 0 is its own GPU and the others stay reachable.

    Raises
    ------
    LplrValueError
        If ``devices`` is empty or names a GPU twice.
    """
    devices = [str(d) for d in devices]
    if not devices or len(set(devices)) != len(devices):
        raise LplrValueError(f"Expected distinct GPUs, at least one. Got {devices!r} instead.")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[i:] + devices[:i])} for i in range(len(devices))]


class PinnedGPUCluster(distributed.LocalCluster):
    """A LocalCluster of worker processes, worker ``i`` pinned to ``devices[i]``.

    Scaling is bounded by the number of GPUs: one worker each.
    """

    def __init__(self, devices: Sequence[str], **kwargs: Any):
        self._environments = worker_environments(devices)
        super().__init__(n_workers=0, processes=True, **kwargs)
        self.scale(len(self._environments))
        self.sync(self._correct_state)

    def new_worker_spec(self) -> dict[int, dict[str, Any]]:
        free = sorted(set(range(len(self._environments))) - set(self.worker_spec))
        if not free:
            raise LplrValueError(
                f"This cluster runs one worker per GPU and has {len(self._environments)} GPUs; "
                "it cannot scale beyond that."
            )
        spec = copy.deepcopy(self.new_spec)
        options = spec.setdefault("options", {})
        options["env"] = {**options.get("env", {}), **self._environments[free[0]]}
        return {free[0]: spec}


def gpu_local_cluster(
    n_gpus: int | None = None,
    *,
    devices: Sequence[str] | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int = "auto",
    **kwargs: Any,
) -> distributed.LocalCluster:
    """Start a local cluster of one worker process per GPU.

    Parameters
    ----------
    n_gpus : int, optional
        Use the first ``n_gpus`` visible GPUs (default: all of them).
    devices : sequence of str, optional
        The GPUs by index or UUID, instead of the visible ones (no CuPy check here then).
    threads_per_worker : int, optional
        Default: this machine's cores shared out among the workers; the threads read and
        decompress Zarr chunks and draw the sketch blocks on the host while the GPU computes.
    memory_limit : str or int, default="auto"
        Host memory per worker.
    **kwargs
        Passed on to the cluster class (``host``, ``dashboard_address``, ``security``, …).

    Returns
    -------
    distributed.LocalCluster
        A :class:`dask_cuda.LocalCUDACluster` when dask-cuda is installed, else a
        :class:`PinnedGPUCluster`. Close it (or use it as a context manager) when done.

    Raises
    ------
    LplrValueError
        Without CuPy or a GPU (naming ``pip install "lplr-dask[gpu]"``), for more GPUs than are
        visible, or if the workers cannot start.
    """
    devices = visible_gpus(n_gpus) if devices is None else _first([str(d) for d in devices], n_gpus)
    if threads_per_worker is None:
        threads_per_worker = max(1, CPU_COUNT // len(devices))
    kwargs.setdefault("host", "127.0.0.1")
    options = dict(threads_per_worker=threads_per_worker, memory_limit=memory_limit, **kwargs)
    try:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            return PinnedGPUCluster(devices, **options)
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=devices, n_workers=len(devices), **options)
    except (OSError, TimeoutError) as e:
        raise LplrValueError(
            f"Could not start one Dask worker per GPU on {','.join(devices)}: {e}. Check the GPUs "
            "with nvidia-smi, or give fewer with --workers."
        ) from e

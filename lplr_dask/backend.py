"""numpy/cupy dispatch: the one place that decides which array library a chunk belongs to."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["array_namespace", "is_cupy", "to_host"]


def is_cupy(x: Any) -> bool:
    """True for a cupy array, or a dask array whose chunks (``_meta``) are cupy arrays."""
    meta = getattr(x, "_meta", x)
    return type(meta).__module__.split(".")[0] == "cupy"


def array_namespace(x: Any) -> ModuleType:
    """The array module for ``x``: ``cupy`` for cupy arrays (or dask arrays of them), else ``numpy``.

    Dask arrays get ``numpy``: its functions dispatch to dask through ``__array_function__``.
    """
    if is_cupy(x) and not type(x).__module__.startswith("dask"):
        import cupy

        return cupy
    return np


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of ``x`` (a no-op for numpy arrays)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def to_device(A: Any, device: str) -> Any:
    """A dask array whose chunks live on ``device`` ("cpu": numpy; "cuda": cupy).

    Raises
    ------
    LplrValueError
        For an unknown device, or "cuda" without CuPy or a visible GPU.
    """
    from lplr_dask.errors import LplrValueError

    if device == "cpu":
        return A
    if device != "cuda":
        raise LplrValueError(f"Expected device 'cpu' or 'cuda'. Got {device!r} instead.")
    try:
        import cupy
    except ImportError as e:
        raise LplrValueError(
            "--device cuda needs CuPy, which is not installed. Install it with "
            '`pip install "lplr-dask[gpu]"` (or use --device cpu).'
        ) from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise LplrValueError(f"--device cuda: CuPy is installed but no CUDA GPU is usable ({e}). Use --device cpu.") from e
    if count < 1:
        raise LplrValueError("--device cuda: CuPy sees no CUDA GPU. Use --device cpu.")
    return A.map_blocks(cupy.asarray, meta=cupy.empty((0, 0), A.dtype))

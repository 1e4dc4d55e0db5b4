"""numpy/cupy dispatch: the one place that decides which array library a chunk belongs to.

A chunk is a cupy array when the type of the chunk (or, for a dask array, of its ``_meta``)
comes from the ``cupy`` package; everything else is treated as numpy. The rest of the package
asks these functions instead of testing types itself:

- :func:`array_namespace` gives the module to compute a chunk with (``cupy`` or ``numpy``);
- :func:`to_device` / :func:`like` put the chunks of a dask array on a device (``"cpu"`` or
  ``"cuda"``), or on the device of another array;
- :func:`to_host` / :func:`to_host_blocks` bring chunks back to numpy, as Zarr writes need.

Sketches and stochastic rounding draw their random numbers on the host (numpy) and copy them,
so CPU and GPU runs with one seed use the same random matrices (see :mod:`lplr_dask.sketch`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from lplr_dask.errors import LplrValueError

__all__ = [
    "DEVICES",
    "GPU_EXTRA_HINT",
    "array_namespace",
    "check_device",
    "cupy_with_gpu",
    "device_of",
    "is_cupy",
    "like",
    "to_device",
    "to_host",
    "to_host_blocks",
]

#: The values of ``device=`` (``--device``).
DEVICES = ("cpu", "cuda")

#: How to get CuPy, quoted in every error about a missing CuPy or GPU.
GPU_EXTRA_HINT = (
    'Install CuPy with `pip install "lplr-dask[gpu]"` (CUDA 12; `"lplr-dask[gpu-cuda13]"` for '
    "CUDA 13), or use --device cpu."
)


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


def device_of(x: Any) -> str:
    """``"cuda"`` for a cupy array or a dask array of cupy chunks, else ``"cpu"``."""
    return "cuda" if is_cupy(x) else "cpu"


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of ``x`` (a no-op for numpy arrays)."""
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def cupy_with_gpu() -> ModuleType:
    """The ``cupy`` module, after checking that it imports and sees a CUDA GPU.

    Raises
    ------
    LplrValueError
        If CuPy is not installed, its CUDA libraries do not load, or no GPU is visible; the
        message names the extra to install (:data:`GPU_EXTRA_HINT`).
    """
    try:
        import cupy
    except ImportError as e:
        raise LplrValueError(f"--device cuda needs CuPy, which is not installed. {GPU_EXTRA_HINT}") from e
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # CUDA driver missing or broken: cupy raises its own runtime errors
        raise LplrValueError(
            f"--device cuda: CuPy is installed but no CUDA GPU is usable ({type(e).__name__}: {e}). "
            f"Check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES. {GPU_EXTRA_HINT}"
        ) from e
    if count < 1:
        raise LplrValueError(
            f"--device cuda: CuPy sees no CUDA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES). {GPU_EXTRA_HINT}"
        )
    return cupy


def check_device(device: str) -> None:
    """Validate ``device`` (``"cpu"`` or ``"cuda"``); for ``"cuda"``, that CuPy sees a GPU.

    Raises
    ------
    LplrValueError
        For an unknown device, or ``"cuda"`` without CuPy or a visible GPU.
    """
    if device not in DEVICES:
        raise LplrValueError(f"Expected device 'cpu' or 'cuda'. Got {device!r} instead.")
    if device == "cuda":
        cupy_with_gpu()


def to_device(A: Any, device: str) -> Any:
    """A dask array whose chunks live on ``device`` ("cpu": numpy; "cuda": cupy).

    A no-op when the chunks are there already (as told by ``A._meta``); otherwise each chunk is
    copied when its task runs, so nothing moves until the array is computed.

    Raises
    ------
    LplrValueError
        For an unknown device, or "cuda" without CuPy or a visible GPU.
    """
    check_device(device)
    if device == device_of(A):
        return A
    if device == "cpu":
        return to_host_blocks(A)
    import cupy  # importable: check_device has seen it work

    return A.map_blocks(cupy.asarray, dtype=A.dtype, meta=cupy.empty((0,) * A.ndim, dtype=A.dtype))


def like(X: Any, A: Any) -> Any:
    """The dask array ``X`` with its chunks on the device of ``A`` (see :func:`to_device`).

    For the thin operands of a product with A: a basis computed on the host meets a GPU-resident
    A, or the reverse.
    """
    return to_device(X, device_of(A))


def to_host_blocks(X: Any) -> Any:
    """The dask array ``X`` with numpy chunks, for Zarr writes and host-side reductions.

    A no-op for numpy chunks; cupy chunks are copied to the host when their task runs.
    """
    if not is_cupy(X):
        return X
    return X.map_blocks(to_host, dtype=X.dtype, meta=np.empty((0,) * X.ndim, dtype=X.dtype))

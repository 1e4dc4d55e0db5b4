"""Opening the input matrix: a Zarr array (path or URL), a zarr.Array, or a dask array."""

from __future__ import annotations

import os
from typing import Any

import dask.array as da
import numpy as np
import zarr

from lplr_dask.errors import LplrTypeError, LplrValueError, SourceNotFoundError

__all__ = ["open_source", "compute_dtype", "describe"]


def open_source(source: Any) -> da.Array:
    """The input as a 2-D dask array with regular chunks, validated.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, dask.array.Array or numpy.ndarray
        A path or URL of a Zarr array; an open Zarr array; or an array.

    Raises
    ------
    SourceNotFoundError
        If a path names nothing.
    LplrValueError
        If the array is not 2-D or is empty.
    LplrTypeError
        If its dtype is not real numeric.
    """
    if isinstance(source, (str, os.PathLike)):
        arr = _open_zarr(os.fspath(source))
        A = da.from_zarr(arr)
    elif isinstance(source, zarr.Array):
        A = da.from_zarr(source)
    elif isinstance(source, da.Array):
        A = source
    elif isinstance(source, np.ndarray):
        A = da.from_array(source, chunks="auto")
    else:
        raise LplrTypeError(
            "Expected a path or URL of a Zarr array, a zarr.Array, a dask array or a numpy array. "
            f"Got {type(source).__name__} instead."
        )
    if A.ndim != 2:
        raise LplrValueError(f"Expected a 2-D matrix. Got an array of shape {A.shape} instead.")
    if 0 in A.shape:
        raise LplrValueError(f"Expected a non-empty matrix. Got shape {A.shape}.")
    compute_dtype(A.dtype)
    return regular(A)


def _open_zarr(path: str) -> zarr.Array:
    if "://" not in path and not os.path.exists(path):
        raise SourceNotFoundError(f"Input {path!r} does not exist. Check the path, or create a test matrix with `lplr generate {path} --shape 20000x10000`.")
    try:
        node = zarr.open(path, mode="r")
    except Exception as e:  # zarr raises several types for "nothing here"
        raise SourceNotFoundError(f"Expected a Zarr array at {path!r}. Could not open one: {e}") from e
    if isinstance(node, zarr.Group):
        names = [name for name, _ in node.arrays()]
        raise LplrValueError(
            f"{path!r} is a Zarr group, not an array. Name an array inside it, one of: "
            f"{', '.join(repr(f'{path}/{n}') for n in names) or '(none)'}."
        )
    return node


def compute_dtype(dtype: Any) -> np.dtype:
    """float64 stays float64; other real numbers are computed in float32.

    Raises
    ------
    LplrTypeError
        For complex, boolean, string or object dtypes.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iuf":
        return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    raise LplrTypeError(
        f"Expected a real numeric matrix (float or integer). Got dtype {dtype} instead; convert it "
        "first (complex: compress real and imaginary parts separately)."
    )


def regular(A: da.Array) -> da.Array:
    """A with regular chunks (all equal but the last), as whole-chunk Zarr writes need."""
    chunks = []
    for c in A.chunks:
        regular_axis = all(x == c[0] for x in c[:-1]) and c[-1] <= c[0]
        chunks.append(c if regular_axis else max(c))
    return A if tuple(chunks) == A.chunks else A.rechunk(tuple(chunks))


def describe(source: Any, A: da.Array) -> dict[str, Any]:
    """What the attrs record about the source."""
    return {
        "path": os.fspath(source) if isinstance(source, (str, os.PathLike)) else None,
        "shape": list(A.shape),
        "dtype": str(A.dtype),
        "chunks": [int(A.chunks[0][0]), int(A.chunks[1][0])],
    }

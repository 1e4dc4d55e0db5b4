"""Using a compressed matrix: lazy reconstruction, products, error, storage figures."""

from __future__ import annotations

import os
from typing import Any

import dask.array as da
import numpy as np

from lplr_dask import store
from lplr_dask.errors import LplrValueError
from lplr_dask.quantize import QuantizerSpec, block_scales, decode_block

__all__ = ["Factors", "open_factors", "relative_error"]


def decode_factor(
    codes: da.Array, scale: np.ndarray, offset: np.ndarray, spec: QuantizerSpec, channel_axis: int,
    dtype: Any = np.float64,
) -> da.Array:
    """Lazily decode a codes array (dask) with its stored scales."""
    g = spec.group_size if spec.granularity == "group" else 0

    def block(c: Any, block_info: Any = None) -> Any:
        loc = block_info[0]["array-location"]
        s = block_scales(scale, loc, g, channel_axis)
        o = block_scales(offset, loc, g, channel_axis)
        return decode_block(c, s, o, dtype)

    return codes.map_blocks(block, dtype=dtype, meta=np.empty((0, 0), dtype))


class Factors:
    """A compressed matrix ``A ≈ L·R`` in an ``*.lplr.zarr`` store.

    Nothing is read until asked: :meth:`L`, :meth:`R` and :meth:`to_dask` are lazy dask arrays
    decoded block by block from the codes.

    Attributes
    ----------
    path : str
    attrs : dict
        The store's ``lplr`` attrs (parameters, timings, errors).
    shape : (int, int)
    rank : int
    bits : (int, int)
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._group = store.open_group(self.path)
        self.attrs: dict[str, Any] = store.read_meta(self._group, path=self.path)
        self.shape: tuple[int, int] = tuple(self.attrs["source"]["shape"])  # type: ignore[assignment]
        self.rank: int = int(self.attrs["rank"])
        self.bits: tuple[int, int] = tuple(self.attrs["bits"])  # type: ignore[assignment]
        q = self.attrs["quantizer"]
        self._spec = {"L": QuantizerSpec(**q["L"]), "R": QuantizerSpec(**q["R"])}

    def __repr__(self) -> str:
        n, d = self.shape
        return f"Factors({self.path!r}, shape=({n}, {d}), rank={self.rank}, bits={self.bits})"

    def _factor(self, name: str, dtype: Any) -> da.Array:
        g = self._group
        return decode_factor(
            da.from_zarr(g[f"{name}/codes"]),
            store.read_small(g, f"{name}/scale"),
            store.read_small(g, f"{name}/offset"),
            self._spec[name],
            channel_axis=1 if name == "L" else 0,
            dtype=dtype,
        )

    def L(self, dtype: Any = np.float64) -> da.Array:
        """The decoded left factor (n × k), lazily."""
        return self._factor("L", dtype)

    def R(self, dtype: Any = np.float64) -> da.Array:
        """The decoded right factor (k × d), lazily."""
        return self._factor("R", dtype)

    def to_dask(self, dtype: Any = np.float32) -> da.Array:
        """The reconstruction ``L·R`` (n × d) as a lazy dask array, chunked like the source."""
        return (self.L() @ self.R()).astype(dtype)

    def matmat(self, X: Any) -> np.ndarray:
        """``L·(R·X)`` without reconstructing; X of shape (d, m) or (d,)."""
        X = np.asarray(X, dtype=np.float64)
        if X.shape[0] != self.shape[1]:
            raise LplrValueError(f"Expected x with {self.shape[1]} rows. Got shape {X.shape} instead.")
        v = (self.R() @ X).compute()
        return (self.L() @ v).compute()

    def matvec(self, x: Any) -> np.ndarray:
        """``L·(R·x)`` for a vector x of length d."""
        return self.matmat(np.ravel(x))

    def rmatvec(self, y: Any) -> np.ndarray:
        """``Rᵀ·(Lᵀ·y)`` for a vector y of length n."""
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.shape[0] != self.shape[0]:
            raise LplrValueError(f"Expected y of length {self.shape[0]}. Got shape {y.shape} instead.")
        v = (self.L().T @ y).compute()
        return (self.R().T @ v).compute()

    @property
    def nbytes(self) -> int:
        """Bytes on disk: the sum of the file sizes under the store, metadata included."""
        return store.bytes_on_disk(self.path)

    @property
    def bits_per_entry(self) -> float:
        """Measured bits per entry of A: ``nbytes × 8 / (n·d)``."""
        n, d = self.shape
        return self.nbytes * 8 / (n * d)

    @property
    def theoretical_bits_per_entry(self) -> float:
        """``k·(n·B1 + d·B2) / (n·d)``, scales not counted."""
        n, d = self.shape
        return self.rank * (n * self.bits[0] + d * self.bits[1]) / (n * d)


def open_factors(path: str | os.PathLike[str]) -> Factors:
    """Open a completed ``*.lplr.zarr`` store.

    Raises
    ------
    StoreFormatError
        If the store is missing, incomplete, or of a newer format version.
    """
    return Factors(path)


def relative_error(A: da.Array, factors: Factors) -> float:
    """Exact ``‖A − L·R‖_F / ‖A‖_F``, streamed in one read of A.

    Each task reads one chunk of A and the codes that cover it, and returns two sums of squares.
    """
    if tuple(A.shape) != factors.shape:
        raise LplrValueError(f"Expected a matrix of shape {factors.shape}. Got {A.shape} instead.")
    Lh = factors.L().rechunk({0: A.chunks[0], 1: -1})
    Rh = factors.R().rechunk({0: -1, 1: A.chunks[1]})

    def block(a: Any, lb: Any, rb: Any) -> Any:
        a64 = a.astype(np.float64)
        diff = a64 - lb @ rb
        return np.array([[[float((diff * diff).sum()), float((a64 * a64).sum())]]])

    parts = da.blockwise(
        block, "ijt", A, "ij", Lh, "ik", Rh, "kj",
        new_axes={"t": 2}, adjust_chunks={"i": 1, "j": 1}, concatenate=True, dtype=np.float64, meta=np.empty((0, 0, 0)),
    )
    from lplr_dask.progress import compute

    (sums,) = compute("evaluate (one read of A)", parts.sum(axis=(0, 1)))
    num, den = sums
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))

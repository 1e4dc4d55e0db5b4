"""The quantized backbone of ``A ≈ Q + L·R`` (``--backbone B0``): its codes, scales and residual.

``Q = Q_B0(X)`` is stored in A's chunking as ``Q/codes`` (n × d, ``B0``-bit), with one range
per column of each row chunk: ``Q/scale`` and ``Q/offset`` are (row chunks × d), float32, chunked
one row chunk by one column chunk of A. So every chunk of Q is coded from the matching chunk of
X alone: a task reads one chunk of A (and, after the first round, the rows of L and columns of
R that cover it) and writes whole chunks of the three arrays (zarr-python #3682: no two tasks
write parts of one chunk). Rounding is to nearest, ``2**B0`` levels over the column's range, its
min–max range shrunk to the one of least squared error (:func:`encode_chunk`).

The low-rank factors are then the LPLR of the residual ``A − Q̂``, which :func:`residual` gives
lazily, chunk by chunk, from A and the stored codes: no n × d float array is ever stored.
The numbers behind the choice of per-column ranges and of the default rounds are in
``benchmarks/RESULTS.md`` ("Beyond low rank").
"""

from __future__ import annotations

from typing import Any, cast

import dask.array as da
import numpy as np
import zarr

from lplr_dask import store
from lplr_dask.backend import array_namespace, like, to_host
from lplr_dask.quantize import decode_block, encode_block

__all__ = [
    "encode_chunk",
    "decode_chunk",
    "create_arrays",
    "ChunkWriter",
    "decoded",
    "residual",
    "quantized",
    "scale_shape",
    "stored",
]

#: The dtype of the backbone's scales and offsets: one pair per column of a row chunk, so their
#: bytes are 64 / (rows of a chunk) bits per entry of A (float64 would double that).
SCALE_DTYPE = np.dtype(np.float32)
#: Shrink factors of a column's min–max half-range that :func:`encode_chunk` tries, 1 first.
CLIP_GRID = np.linspace(1.0, 0.2, 17)


def scale_shape(shape: tuple[int, int], row_chunk: int) -> tuple[int, int]:
    """The shape of ``Q/scale`` and ``Q/offset`` for A of ``shape`` in row chunks of ``row_chunk``."""
    n, d = shape
    return (-(-n // row_chunk), d)


def encode_chunk(x: Any, bits: int) -> tuple[Any, Any, Any]:
    """``(codes, scale, offset)`` of one chunk: a clipped range per column, nearest rounding.

    Each column's min–max range is shrunk about its centre by the factor of :data:`CLIP_GRID`
    (1 first: the min–max range itself) that codes the column with the least squared error, its
    step and offset rounded to :data:`SCALE_DTYPE` first; values outside clip to the end levels.
    At 1–3 bits this lowers the error of per-column quantization by 20–50 % on heavy-tailed and
    outlier-laden matrices (benchmarks/RESULTS.md, "Beyond low rank"). ``scale`` and ``offset``
    are (1, c); decoding with them gives exactly the values chosen.
    """
    xp = array_namespace(x)
    x64 = x.astype(np.float64)
    levels = (1 << bits) - 1
    lo, hi = x64.min(axis=0, keepdims=True), x64.max(axis=0, keepdims=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = xp.full(lo.shape, np.inf)
    step_best = xp.ones(lo.shape, dtype=SCALE_DTYPE)
    low_best = lo.astype(SCALE_DTYPE)
    for shrink in CLIP_GRID:
        low = (mid - shrink * half).astype(SCALE_DTYPE)
        step = xp.where(half > 0, 2 * shrink * half / levels, 1.0).astype(SCALE_DTYPE)
        step = xp.where(step > 0, step, xp.ones_like(step))  # a float32 step of a tiny range can round to 0
        s64, l64 = step.astype(np.float64), low.astype(np.float64)
        y = l64 + xp.clip(xp.rint((x64 - l64) / s64), 0, levels) * s64
        err = ((x64 - y) ** 2).sum(axis=0, keepdims=True)
        better = err < best
        best = xp.where(better, err, best)
        step_best = xp.where(better, step, step_best)
        low_best = xp.where(better, low, low_best)
    codes = encode_block(x64, step_best.astype(np.float64), low_best.astype(np.float64), bits)
    return codes, step_best, low_best


def decode_chunk(codes: Any, scale: Any, offset: Any) -> Any:
    """The float64 values of one chunk of codes with its (1, c) scale and offset."""
    return decode_block(codes, scale.astype(np.float64), offset.astype(np.float64))


def create_arrays(group: zarr.Group, shape: tuple[int, int], chunks: tuple[int, int], bits: int) -> None:
    """Create (or replace) the empty ``Q/codes``, ``Q/scale`` and ``Q/offset`` of A's ``shape`` and ``chunks``."""
    r, c = chunks
    store.create_codes(group, "Q/codes", shape, chunks, bits, dimension_names=("row", "col"))
    for name in ("Q/scale", "Q/offset"):
        store.create_float(
            group, name, scale_shape(shape, r), (1, c), dtype=SCALE_DTYPE, dimension_names=("row_chunk", "col")
        )


class ChunkWriter:
    """Codes one chunk of X and writes it whole to ``Q/codes``, ``Q/scale`` and ``Q/offset``
    (a picklable callable for :func:`dask.array.map_blocks`); returns the chunk's ``‖A‖²``
    as a (1, 1) block, so the same read gives the error's denominator."""

    def __init__(self, root: Any, bits: int):
        self.root, self.bits = root, bits

    def __call__(self, x: Any, a: Any, block_info: Any = None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[0]["array-location"]
        i = block_info[0]["chunk-location"][0]
        codes, step, lo = encode_chunk(x, self.bits)
        group = zarr.open_group(self.root, mode="r+")
        # every chunk is stored, zeros too (the setting is not kept in the arrays' metadata, and a
        # missing chunk reads as damage): an all-zero block of A codes to all-zero codes
        with zarr.config.set({"array.write_empty_chunks": True}):
            cast(zarr.Array, group["Q/codes"])[r0:r1, c0:c1] = to_host(codes)
            cast(zarr.Array, group["Q/scale"])[i : i + 1, c0:c1] = to_host(step)
            cast(zarr.Array, group["Q/offset"])[i : i + 1, c0:c1] = to_host(lo)
        a64 = a.astype(np.float64)
        return np.array([[float((a64 * a64).sum())]])


def decoded(codes: da.Array, scale: da.Array, offset: da.Array, dtype: Any = np.float64) -> da.Array:
    """The backbone ``Q̂`` (n × d), lazily, chunked like its codes, in ``dtype``.

    ``codes`` is the stored ``Q/codes`` as a dask array in its own chunks; ``scale`` and
    ``offset`` the stored ones (row chunks × d), each chunk of the codes decoded with its row of them.
    """
    r, c = codes.chunksize
    s = scale.rechunk({0: 1, 1: codes.chunks[1]})
    o = offset.rechunk({0: 1, 1: codes.chunks[1]})
    if len(s.chunks[0]) != len(codes.chunks[0]):
        raise ValueError(
            f"Q/scale has {s.shape[0]} rows; expected one per row chunk of Q/codes ({len(codes.chunks[0])})"
        )

    def block(q: Any, sb: Any, ob: Any) -> Any:
        return decode_chunk(q, sb, ob).astype(dtype, copy=False)

    return da.map_blocks(block, codes, s, o, dtype=np.dtype(dtype), meta=np.empty((0, 0), dtype=dtype))


def stored(group: zarr.Group, dtype: Any = np.float64) -> da.Array:
    """The backbone ``Q̂`` of the store ``group``, lazily, in its stored chunks."""
    return decoded(
        da.from_zarr(group["Q/codes"]), da.from_zarr(group["Q/scale"]), da.from_zarr(group["Q/offset"]), dtype
    )


def quantized(A: da.Array, bits: int) -> da.Array:
    """``Q̂ = Q_bits(A)`` as a store would code it in A's chunks, lazily and without writing
    anything (float64): for planning a backbone (:func:`lplr_dask.budget.choose_backbone`)."""

    def block(a: Any) -> Any:
        codes, step, lo = encode_chunk(a, bits)
        return decode_chunk(codes, step, lo)

    return da.map_blocks(block, A, dtype=np.float64)


def residual(A: da.Array, Q_hat: da.Array) -> da.Array:
    """``A − Q̂`` chunk by chunk, in A's float dtype (float64 for float64 A), on A's device."""
    dtype = np.result_type(A.dtype, np.float32)
    Q_hat = like(Q_hat.rechunk(A.chunks), A)
    return da.map_blocks(_minus, A, Q_hat, dtype=dtype)


def _minus(a: Any, q: Any) -> Any:
    return (a.astype(np.float64) - q).astype(np.result_type(a.dtype, np.float32), copy=False)

"""Block-wise products of a chunked matrix with thin operands, summed across blocks in float64.

Every product here is a sum of per-block products followed by dask's tree reduction, so a task
holds one chunk of A plus thin operands, never a whole row or column of blocks. The sums across
blocks are always float64. Each block's own product runs in the *precision* asked for:

- ``"float64"``: re-chunking A or changing the number of workers changes results only at the
  1e-16 level, so codes do not flip at rounding boundaries (identical codes for any chunking).
  A chunk of a narrower dtype is cast :data:`PANEL_ROWS` rows at a time, so a task's float64
  working copy is a fixed slice of a chunk (32 MiB for 4096-wide chunks).
- ``"float32"``: the chunk is used as it is read (no cast, no copy) and the thin operand is cast
  to float32: the GEMM costs about half as much, which on a CPU is about half of a pass (one
  float64 GEMM of a 4096² chunk with k = 256 takes about as long as reading and decoding the
  chunk; measured: benchmarks/RESULTS.md, "Compress vs read pass and svd_compressed"). Results
  move at the 1e-7 level with the chunking: a code of L can move by one level where a value
  lies near a rounding boundary (rarely with the paper's sketch; more with the default
  range oversampling, whose top directions move by that noise over the spectral gap), and R,
  solved against that L, then moves in some of its codes; the error barely changes (measured:
  benchmarks/RESULTS.md, "Figures behind the code's comments", from ``tests/test_api.py``).

:func:`compute_dtype` turns ``"auto"`` into float32 for float32 (and narrower) input and float64
otherwise: a float32 matrix carries no more than float32's precision into the products anyway.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import dask.array as da
import numpy as np

from lplr_dask.backend import array_namespace, like
from lplr_dask.errors import LplrValueError, NonFiniteError
from lplr_dask.sketch import sketch_rows, sparse_sign_rows

__all__ = [
    "PRECISIONS",
    "compute_dtype",
    "starts",
    "sketch_right",
    "sketch_left",
    "sketch_both",
    "left_multiply",
    "right_multiply",
    "map_row_blocks",
    "tall_chunks",
    "qr_chunks",
    "PANEL_ROWS",
]

#: (stream, width, scale) of one generated operand.
Stream = tuple[int, int, float]

#: Rows of a chunk of A cast to float64 at a time (see the module docstring).
PANEL_ROWS = 1024

#: The precisions a block product can run in (see the module docstring).
PRECISIONS = ("auto", "float32", "float64")


def compute_dtype(dtype: Any, precision: str = "float64") -> np.dtype:
    """The dtype of each block's product for input ``dtype`` and ``precision``.

    ``"auto"`` gives float32 for floating input of at most 4 bytes, float64 otherwise.
    """
    if precision not in PRECISIONS:
        raise LplrValueError(f"Expected precision 'auto', 'float32' or 'float64'. Got {precision!r} instead.")
    if precision == "auto":
        dt = np.dtype(dtype)
        return np.dtype(np.float32 if dt.kind == "f" and dt.itemsize <= 4 else np.float64)
    return np.dtype(precision)


def starts(chunks: Sequence[int]) -> da.Array:
    """A dask array holding each block's start offset, one block per chunk."""
    s = np.cumsum((0, *chunks[:-1])).astype(np.int64)
    return da.from_array(s, chunks=1)


def _panels(a: Any, dtype: Any = np.float64) -> Iterator[tuple[slice, Any]]:
    """``(rows, a[rows] as dtype)`` for consecutive slices of :data:`PANEL_ROWS` rows.

    A chunk already of ``dtype`` comes whole, in one panel, without a copy. Otherwise the panels
    are cast into one buffer (fresh memory costs page faults every time): use each panel before
    asking for the next.
    """
    if a.dtype == dtype:
        yield slice(0, a.shape[0]), a
        return
    buffer = None
    for r in range(0, a.shape[0], PANEL_ROWS):
        rows = slice(r, r + PANEL_ROWS)
        part = a[rows]
        if buffer is None:
            buffer = array_namespace(a).empty((min(PANEL_ROWS, a.shape[0]), a.shape[1]), dtype=dtype)
        panel = buffer[: part.shape[0]]
        panel[...] = part
        yield rows, panel


def _where(a: Any, r0: int, c0: int) -> str:
    return f"the chunk at rows {r0}:{r0 + a.shape[0]}, columns {c0}:{c0 + a.shape[1]}"


def _magnitude(a: Any, r0: int, c0: int, check: bool) -> float:
    """``max |a|`` (two reductions, no temporary); raise NonFiniteError naming the chunk if
    ``check`` and the chunk itself holds a NaN or Inf."""
    m = max(float(a.max()), -float(a.min()))
    if check and not np.isfinite(m):
        raise NonFiniteError(
            f"The input holds NaN or Inf in {_where(a, r0, c0)}. Replace or drop non-finite values "
            "(for example with numpy.nan_to_num) and run again."
        )
    return m


#: A chunk whose largest magnitude lies outside ``2**±RESCALE_EXPONENT[dtype]`` is scaled by a
#: power of two (exactly) before its products, so their squares neither overflow nor underflow.
RESCALE_EXPONENT = {np.dtype(np.float32): 40, np.dtype(np.float64): 400}


def _rescale_exponent(m: float, dtype: np.dtype) -> int:
    """0 if a chunk of largest magnitude ``m`` is safe in ``dtype``, else e with ``m·2^-e`` in [0.5, 1)."""
    bound = RESCALE_EXPONENT[np.dtype(dtype)]
    if m == 0 or not np.isfinite(m) or 2.0**-bound <= m <= 2.0**bound:
        return 0
    return int(np.frexp(m)[1])


def _check_finite(part: Any, a: Any, r0: int, c0: int) -> None:
    """Raise if a product of a finite chunk overflowed (float32 products of huge values)."""
    xp = array_namespace(part)
    if not bool(xp.isfinite(part).all()):
        raise LplrValueError(
            f"The products of {_where(a, r0, c0)} overflow {part.dtype} (its values are finite but too "
            "large for it). Compress with --precision float64 (precision='float64')."
        )


def _sketch_block(
    a: Any,
    r0: int,
    c0: int,
    *,
    seed: int,
    streams: Sequence[Stream],
    sumsq: bool,
    left: tuple[int, int] | None,
    check: bool,
    precision: str = "float64",
) -> tuple[Any, Any]:
    """One chunk's parts of ``A·[S_1 | …][| row sums of squares]`` and of ``Ψ·A``.

    Both come from the same panels of the chunk, so a chunk is read and cast (if at all) once.
    The parts are in the precision of the products (a float32 GEMM's result stays float32;
    parts summed over several panels are float64): :func:`_sum_blocks` adds them in float64.

    Returns
    -------
    (right, left) : arrays of shape (1, rows, widths) and (1, ℓ, columns), or None when not asked
    """
    xp = array_namespace(a)
    dtype = compute_dtype(a.dtype, precision)
    rows_, cols = a.shape
    e = _rescale_exponent(_magnitude(a, r0, c0, check), dtype) if (check or sumsq) else 0
    if e:  # an exact power-of-two scaling: the products of tiny or huge values stay in range
        a = a * xp.asarray(2.0**-e, dtype=a.dtype)
    width = sum(w for _, w, _ in streams) + int(sumsq)
    s = (
        xp.concatenate([sketch_rows(seed, st, c0, c0 + cols, w, scale=sc, xp=xp) for st, w, sc in streams], axis=1)
        if streams
        else None
    )
    if s is not None and s.dtype != dtype:
        s = s.astype(dtype)
    psi = _sparse_sign_map(seed, left[0], r0, rows_, left[1], xp, dtype) if left else None
    right: Any = xp.empty((rows_, width), dtype=dtype) if width else None
    out: Any = None
    for rows, p in _panels(a, dtype):
        if s is not None:
            right[rows, : s.shape[1]] = p @ s
        if sumsq:
            right[rows, -1] = xp.einsum("ij,ij->i", p, p)
        if psi is not None:
            out = _accumulate(out, psi[:, rows] @ p)
    if check:
        for product in (right, out):
            if product is not None:
                _check_finite(product, a, r0, c0)
    if e:  # undo the scaling in float64, where the results fit
        right = None if right is None else right.astype(np.float64) * 2.0**e
        if sumsq:
            right[:, -1] *= 2.0**e  # squares: scaled twice
        out = None if out is None else out.astype(np.float64) * 2.0**e
    return (None if right is None else right[None]), (None if out is None else out[None])


def _sketches(
    A: da.Array,
    seed: int,
    streams: Sequence[Stream],
    *,
    sumsq: bool,
    left: tuple[int, int] | None,
    check: bool,
    precision: str = "float64",
) -> tuple[da.Array | None, da.Array | None]:
    """Lazy ``A·[S_1 | …]`` (n × widths) and ``Ψ·A`` (ℓ × d): one task per chunk of A for both."""
    width = sum(w for _, w, _ in streams) + int(sumsq)
    options = dict(seed=seed, streams=list(streams), sumsq=sumsq, left=left, check=check, precision=precision)

    def block(a: Any, r0: Any, c0: Any) -> tuple[Any, Any]:
        return _sketch_block(a, int(r0[0]), int(c0[0]), **options)  # type: ignore[arg-type]

    both = da.blockwise(
        block,
        "ij",
        A,
        "ij",
        starts(A.chunks[0]),
        "i",
        starts(A.chunks[1]),
        "j",
        align_arrays=False,
        dtype=np.float64,
        meta=np.empty((0, 0), dtype=object),  # each chunk is a (right, left) pair
    )
    right = left_ = None
    dtype = compute_dtype(A.dtype, precision)
    if width:
        parts = da.blockwise(
            _first, "jik", both, "ij", new_axes={"k": width}, adjust_chunks={"j": 1}, dtype=dtype, meta=_meta3(A, dtype)
        )
        right = _sum_blocks(parts)
    if left:
        parts = da.blockwise(
            _second,
            "ikj",
            both,
            "ij",
            new_axes={"k": left[1]},
            adjust_chunks={"i": 1},
            dtype=dtype,
            meta=_meta3(A, dtype),
        )
        left_ = _sum_blocks(parts)
    return right, left_


def _accumulate(total: Any, part: Any) -> Any:
    """``total + part`` in float64; the first part as it is (a float32 product stays float32)."""
    if total is None:
        return part
    return total.astype(np.float64, copy=False) + part


def _sum_blocks(parts: da.Array) -> da.Array:
    """The sum over axis 0 of per-block products, as a binary tree, in float64.

    Pairs are added as soon as both exist, so a worker holds few partial products at once, and
    how many does not grow with the number of blocks summed (the rows or columns of A). The
    per-block products travel in their own dtype (a float32 GEMM's result is float32: casting
    it first would double the bytes moved between workers and add nothing); every sum is float64.
    """
    return da.reduction(
        parts,
        _keep,
        _add64,
        combine=_add64,
        axis=0,
        split_every=2,
        dtype=np.float64,
        meta=_meta3(parts, np.float64),
    )


def _keep(x: Any, axis: Any = None, keepdims: bool = True) -> Any:
    return x


def _add64(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    return x.sum(axis=axis, dtype=np.float64, keepdims=keepdims)


def _first(pair: tuple[Any, Any]) -> Any:
    return pair[0]


def _second(pair: tuple[Any, Any]) -> Any:
    return pair[1]


def sketch_right(
    A: da.Array,
    seed: int,
    streams: Sequence[Stream],
    *,
    check: bool = True,
    sumsq: bool = False,
    precision: str = "float64",
) -> da.Array:
    """``A @ [S_1 | S_2 | …]`` with each ``S_i`` generated block-wise from ``(seed, stream)``.

    Parameters
    ----------
    A : dask array of shape (n, d)
    seed : int
    streams : sequence of (stream, width, scale)
    check : bool, default=True
        Raise :class:`NonFiniteError` naming the chunk if A holds NaN or Inf.
    sumsq : bool, default=False
        Append one column holding each row's sum of squares (in the same read of A: the
        Frobenius norm for the error estimate).
    precision : {"float64", "float32", "auto"}, default="float64"
        The dtype of each block's product (see the module docstring); the sums are float64.

    Returns
    -------
    dask array of shape (n, sum of widths [+ 1]), float64, chunked like A's rows.
    """
    right, _ = _sketches(A, seed, streams, sumsq=sumsq, left=None, check=check, precision=precision)
    return right


def sketch_left(
    A: da.Array, seed: int, stream: int, width: int, *, check: bool = True, precision: str = "float64"
) -> da.Array:
    """``Ψ @ A`` with Ψ (width × n) a sparse sign map generated block-wise by A's rows.

    Ψᵀ's rows come from :func:`lplr_dask.sketch.sparse_sign_rows`: each row of A is added, with
    random signs, into ``SPARSE_NNZ`` of the ``width`` rows of the result, so a chunk costs
    ``SPARSE_NNZ`` multiply-adds per entry rather than ``width`` for a dense Gaussian Ψ.

    Returns
    -------
    dask array of shape (width, d), float64, chunked like A's columns.
    """
    _, left = _sketches(A, seed, [], sumsq=False, left=(stream, width), check=check, precision=precision)
    return left


def sketch_both(
    A: da.Array,
    seed: int,
    streams: Sequence[Stream],
    stream: int,
    width: int,
    *,
    sumsq: bool = False,
    precision: str = "float64",
) -> tuple[da.Array, da.Array]:
    """:func:`sketch_right` and :func:`sketch_left` of A from one task per chunk.

    Each chunk of A is read and cast to float64 once for both products (as two separate
    products would read it once only by holding it in memory until both had used it).

    Returns
    -------
    (right, left) : dask arrays of shapes (n, sum of widths [+ 1]) and (width, d), float64
    """
    return _sketches(  # type: ignore[return-value]
        A, seed, streams, sumsq=sumsq, left=(stream, width), check=True, precision=precision
    )


def _sparse_sign_map(
    seed: int, stream: int, r0: int, rows: int, width: int, xp: ModuleType, dtype: Any = np.float64
) -> Any:
    """The columns ``r0:r0 + rows`` of Ψ (width × n) as a CSC matrix of ``xp``'s sparse module."""
    pos, signs = sparse_sign_rows(seed, stream, r0, r0 + rows, width)
    signs = signs.astype(dtype)
    sparse = importlib.import_module("scipy.sparse" if xp is np else "cupyx.scipy.sparse")
    indptr = np.arange(0, pos.size + 1, pos.shape[1], dtype=np.int32)
    parts = (signs.ravel(), pos.ravel().astype(np.int32), indptr)  # int32 indices, as cupyx wants
    return sparse.csc_matrix(tuple(xp.asarray(v) for v in parts), shape=(width, rows))


def left_multiply(PT: da.Array, A: da.Array, *, precision: str = "float64") -> da.Array:
    """``PTᵀ @ A`` for a thin ``PT`` (n × k) whose row chunks match A's row chunks.

    ``precision`` is the dtype of each block's product (see the module docstring).

    Returns
    -------
    dask array of shape (k, d), float64, chunked like A's columns.
    """
    PT = like(PT, A).rechunk({0: A.chunks[0], 1: -1})

    def block(pt: Any, a: Any) -> Any:
        dtype = compute_dtype(a.dtype, precision)
        ptt = pt.T.astype(dtype, copy=False)
        part: Any = None
        for rows, p in _panels(a, dtype):
            part = _accumulate(part, ptt[:, rows] @ p)
        return part[None]

    dtype = compute_dtype(A.dtype, precision)
    parts = da.blockwise(block, "ikj", PT, "ik", A, "ij", adjust_chunks={"i": 1}, dtype=dtype, meta=_meta3(A, dtype))
    return _sum_blocks(parts)


def right_multiply(A: da.Array, M: da.Array, *, precision: str = "float64") -> da.Array:
    """``A @ M`` for a thin ``M`` (d × k) whose row chunks match A's column chunks.

    ``precision`` is the dtype of each block's product (see the module docstring).

    Returns
    -------
    dask array of shape (n, k), float64, chunked like A's rows.
    """
    M = like(M, A).rechunk({0: A.chunks[1], 1: -1})

    def block(a: Any, m: Any) -> Any:
        xp = array_namespace(a)
        dtype = compute_dtype(a.dtype, precision)
        m = m.astype(dtype, copy=False)
        part = xp.empty((a.shape[0], m.shape[1]), dtype=dtype)
        for rows, p in _panels(a, dtype):
            part[rows] = p @ m
        return part[None]

    dtype = compute_dtype(A.dtype, precision)
    parts = da.blockwise(block, "jik", A, "ij", M, "jk", adjust_chunks={"j": 1}, dtype=dtype, meta=_meta3(A, dtype))
    return _sum_blocks(parts)


def map_column_blocks(W: da.Array, fn: Callable[[Any, int, int], Any]) -> da.Array:
    """Apply ``fn(block, j, c0)`` to each column block of a thin W (one row chunk).

    Returns a tiny (1, nblocks) array of whatever ``fn`` returns as a (1, 1) array, so that
    computing it runs the side effects (writes) without gathering W.
    """

    def block(w: Any, block_info: Any = None) -> Any:
        j = block_info[0]["chunk-location"][1]
        c0 = block_info[0]["array-location"][1][0]
        return np.asarray(fn(w, j, c0), dtype=np.float64).reshape(1, 1)

    return da.map_blocks(
        block,
        W,
        chunks=((1,), (1,) * W.numblocks[1]),
        dtype=np.float64,
        meta=np.empty((0, 0)),
    )


def map_row_blocks(X: da.Array, fn: Callable[[Any, int, int], Any]) -> da.Array:
    """Apply ``fn(block, i, r0)`` to each row block of a tall X (one column chunk).

    Returns a tiny (nblocks, 1) array of whatever ``fn`` returns as a (1, 1) array, so that
    computing it runs the side effects (writes) without gathering X (:func:`map_column_blocks`).
    """

    def block(x: Any, block_info: Any = None) -> Any:
        i = block_info[0]["chunk-location"][0]
        r0 = block_info[0]["array-location"][0][0]
        return np.asarray(fn(x, i, r0), dtype=np.float64).reshape(1, 1)

    return da.map_blocks(
        block,
        X,
        chunks=((1,) * X.numblocks[0], (1,)),
        dtype=np.float64,
        meta=np.empty((0, 0)),
    )


def tall_chunks(n: int, k: int, target: int) -> tuple[int, ...]:
    """Row chunks near ``target`` rows, every one at least ``k`` rows (for TSQR)."""
    size = max(target, k)
    nblocks = max(1, n // size)
    base, extra = divmod(n, nblocks)
    return tuple(base + (1 if i < extra else 0) for i in range(nblocks))


def qr_chunks(n: int, k: int, target: int) -> tuple[int, ...]:
    """Row chunks for a TSQR of an n×k matrix: near ``target`` rows, every one at least ``2k`` rows.

    ``dask.array.linalg.tsqr`` stacks the k×k R factors of its blocks and recurses only while a
    block holds at least two of them (its rows >= 2k); with shorter blocks it stacks all
    ``n/rows`` R factors into one task, which grows with n (n·k/rows × k: 86 GB at n = 10^7,
    k = 2100 in 4096-row blocks). With blocks of at least 2k rows every task of the TSQR holds
    at most one block (fewer than ``2·max(target, 2k)`` rows × k), whatever n.
    """
    return tall_chunks(n, 2 * k, target)


def _meta3(A: da.Array, dtype: Any = np.float64) -> Any:
    xp = array_namespace(A._meta) if hasattr(A, "_meta") else np
    return xp.empty((0, 0, 0), dtype=dtype)

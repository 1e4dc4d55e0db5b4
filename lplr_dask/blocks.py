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

Row strips
----------
Given a :class:`Strips` (a reader of A's source and a strip width), the passes read A by row
strips: one task reads ``width`` chunks of one row of chunks *in turn* straight from the source
(the reader), adds up their products and holds one chunk at a time, so a pass schedules about
``2/width`` tasks per chunk of A (the strips and the tree sum of their products) instead of
about 2 (a read-and-multiply task per chunk and the tree sum), with the same memory per task.
Pass 2's strips read their row block of ``pinv(L)ᵀ`` once for the whole strip. The strips'
products are the same block products summed in float64 in another order (1e-16 relative).
Without a reader (an array computed by dask, an in-memory array) each chunk of A is its own
task, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
from dask.base import tokenize

from lplr_dask.backend import array_namespace, like
from lplr_dask.errors import LplrValueError, NonFiniteError
from lplr_dask.lanes import lane_product, scatter_rows
from lplr_dask.progress import Reads
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
    "Strips",
    "Reader",
    "Lanes",
    "STRIP_WIDTH",
    "STRIP_SPLIT",
    "column_groups",
    "reads",
]

#: (stream, width, scale) of one generated Gaussian operand.
Stream = tuple[int, int, float]

#: (stream, width, zeta) of a lane sparse sign sketch (:mod:`lplr_dask.lanes`).
Lanes = tuple[int, int, int]

#: Rows of a chunk of A cast to float64 at a time (see the module docstring).
PANEL_ROWS = 1024

#: The precisions a block product can run in (see the module docstring).
PRECISIONS = ("auto", "float32", "float64")

#: Reads ``A[rows, columns]`` (two slices, absolute offsets) as A's chunks hold it: A's dtype,
#: on A's device. It travels inside every strip task, so it must pickle small (a Zarr array
#: object or a file's path, never the data): :class:`lplr_dask.sources.ChunkReader`.
Reader = Callable[[slice, slice], Any]

#: Chunks of a row of A one task reads in turn, by default (:class:`Strips`): with the tree
#: sum's :data:`STRIP_SPLIT`, a pass costs about ``1/4 + 1/12`` tasks per chunk of A.
STRIP_WIDTH = 4

#: Partial products a task of the tree sum over strips adds at once.
STRIP_SPLIT = 4


class Strips(NamedTuple):
    """How the passes read A: ``width`` chunks of a row of chunks per task, through ``reader``
    (see the module docstring)."""

    reader: Reader
    width: int = STRIP_WIDTH


def reads(A: da.Array, strips: Strips | None, *, row_blocks: Sequence[int] | None = None) -> Any:
    """What a pass over A reads, for ``chunks_of=`` of :func:`lplr_dask.progress.compute`: A itself
    (one task per chunk), or the strip tasks of the row blocks ``row_blocks`` (default: all)."""
    if strips is None:
        return A
    nrows = len(A.chunks[0]) if row_blocks is None else len(row_blocks)
    chunks = nrows * len(A.chunks[1])
    return Reads(_strip_name(A), A.nbytes * chunks / max(A.npartitions, 1), chunks)


def _strip_name(A: da.Array) -> str:
    """The prefix of the key names of the strip tasks reading A."""
    return f"lplr-strips-{A.name}"


def column_groups(blocks_: Sequence[int], width: int) -> list[list[int]]:
    """The column blocks ``blocks_`` in consecutive groups of ``width``: one strip task each."""
    return [list(blocks_[s : s + width]) for s in range(0, len(blocks_), width)]


class _Grid(NamedTuple):
    """The strips of a pass as blockwise inputs: a 1-d object array of row ``(start, rows)``
    pairs (index ``"i"``), one of column groups, each a tuple of ``(start, columns)`` pairs
    (index ``"b"``), and the output chunk sizes. Without contracted indices, so that dask fuses
    a strip with what uses it (a contraction's ``concatenate`` stops blockwise fusion)."""

    rows: da.Array
    groups: da.Array
    row_sizes: tuple[int, ...]
    group_widths: tuple[int, ...]


def _objects(items: Sequence[Any]) -> da.Array:
    """A 1-d dask array of Python objects, one per block."""
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return da.from_array(out, chunks=1)


def _grid(A: da.Array, strips: Strips, row_blocks: Sequence[int] | None, col_blocks: Sequence[int] | None) -> _Grid:
    """The strips of the row blocks ``row_blocks`` × the groups of ``col_blocks`` (default: all)."""
    rchunks, cchunks = A.chunks
    rb = list(range(len(rchunks))) if row_blocks is None else list(row_blocks)
    cb = list(range(len(cchunks))) if col_blocks is None else list(col_blocks)
    r0 = np.cumsum((0, *rchunks[:-1])).tolist()
    c0 = np.cumsum((0, *cchunks[:-1])).tolist()
    groups = column_groups(cb, max(1, int(strips.width)))
    return _Grid(
        _objects([(r0[i], rchunks[i]) for i in rb]),
        _objects([tuple((c0[j], cchunks[j]) for j in g) for g in groups]),
        tuple(rchunks[i] for i in rb),
        tuple(int(sum(cchunks[j] for j in g)) for g in groups),
    )


def _strip_chunks(reader: Reader, rows: Any, group: Any) -> Iterator[tuple[int, int, Any]]:
    """``(r0, c0, chunk)`` for the chunks of one strip, each read when asked for (use it first)."""
    r0, height = rows[0]
    for c0, width in group[0]:
        yield r0, c0, reader(slice(r0, r0 + height), slice(c0, c0 + width))


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


def starts(chunks: Sequence[int], offset: int = 0) -> da.Array:
    """A dask array holding each block's start offset (plus ``offset``), one block per chunk."""
    s = offset + np.cumsum((0, *chunks[:-1])).astype(np.int64)
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
    lanes: Lanes | None = None,
) -> tuple[Any, Any]:
    """One chunk's parts of ``A·[S_lanes | S_1 | …][| row sums of squares]`` and of ``Ψ·A``.

    Both come from the same panels of the chunk, so a chunk is read and cast (if at all) once.
    The lane sketch's columns (``lanes``) and the row sums of squares come from one call of the
    compiled kernel (:func:`lplr_dask.lanes.lane_product`), ``Ψ·A`` from another
    (:func:`lplr_dask.lanes.scatter_rows`); the Gaussian streams are a GEMM.
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
    lw = lanes[1] if lanes else 0
    width = lw + sum(w for _, w, _ in streams) + int(sumsq)
    s = (
        xp.concatenate([sketch_rows(seed, st, c0, c0 + cols, w, scale=sc, xp=xp) for st, w, sc in streams], axis=1)
        if streams
        else None
    )
    if s is not None and s.dtype != dtype:
        s = s.astype(dtype)
    pos, signs = sparse_sign_rows(seed, left[0], r0, r0 + rows_, left[1]) if left else (np.empty((0, 0)),) * 2
    right: Any = (xp.zeros if lanes else xp.empty)((rows_, width), dtype=dtype) if width else None
    out: Any = None
    for rows, p in _panels(a, dtype):
        squares = xp.zeros(p.shape[0], dtype=dtype) if (lanes and sumsq) else None
        if lanes:
            lane_product(
                p, c0, seed=seed, stream=lanes[0], width=lw, zeta=lanes[2], out=right[rows, :lw], sumsq=squares
            )
        if s is not None:
            right[rows, lw : lw + s.shape[1]] = p @ s
        if sumsq:
            right[rows, -1] = squares if squares is not None else xp.einsum("ij,ij->i", p, p)
        if left:
            out = scatter_rows(p, pos[rows], signs[rows], left[1], out=out)
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


def _width_of(lanes: Lanes | None, streams: Sequence[Stream], sumsq: bool) -> int:
    """Columns of the right product of :func:`_sketches`."""
    return (lanes[1] if lanes else 0) + sum(w for _, w, _ in streams) + int(sumsq)


def _sketches(
    A: da.Array,
    seed: int,
    streams: Sequence[Stream],
    *,
    sumsq: bool,
    left: tuple[int, int] | None,
    check: bool,
    precision: str = "float64",
    strips: Strips | None = None,
    row_blocks: Sequence[int] | None = None,
    lanes: Lanes | None = None,
    origin: tuple[int, int] = (0, 0),
) -> tuple[da.Array | None, da.Array | None]:
    """Lazy ``A·[S_1 | …]`` (n × widths) and ``Ψ·A`` (ℓ × d): one task per chunk of A for both,
    or one per row strip (``strips``, see the module docstring). ``row_blocks`` keeps only those
    row blocks of the first (in this order); a strip pass computes nothing else. ``origin``: A is
    the block of a larger matrix whose entry (0, 0) sits at these (row, column) offsets, and
    meets the operators' rows there (a task per chunk)."""
    if origin != (0, 0):
        strips = None
    if left and _width_of(lanes, streams, sumsq):
        # Both products at once (one-pass): their tree sums cross (Y over a row's chunks, Z over a
        # column's), so a strip's pair of partial products waits for both, and with strips the
        # pairs held went past a worker's spill threshold (tests/test_memory.py): a task per chunk.
        strips = None
    width = _width_of(lanes, streams, sumsq)
    options = dict(
        seed=seed, streams=list(streams), sumsq=sumsq, left=left, check=check, precision=precision, lanes=lanes
    )
    meta = np.empty((0, 0), dtype=object)  # each block is a (right, left) pair
    if strips is None:

        def block(a: Any, r0: Any, c0: Any) -> tuple[Any, Any]:
            return _sketch_block(a, int(r0[0]), int(c0[0]), **options)  # type: ignore[arg-type]

        both = da.blockwise(
            block,
            "ib",
            A,
            "ib",
            starts(A.chunks[0], origin[0]),
            "i",
            starts(A.chunks[1], origin[1]),
            "b",
            align_arrays=False,
            meta=meta,
        )
        row_sizes, group_widths = A.chunks
    else:
        grid = _grid(A, strips, row_blocks, None)
        strip = _SketchStrip(strips.reader, options)
        name = f"{_strip_name(A)}-{tokenize(options, grid.rows.name, grid.groups.name)}"
        both = da.blockwise(strip, "ib", grid.rows, "i", grid.groups, "b", name=name, meta=meta, align_arrays=False)
        row_sizes, group_widths = grid.row_sizes, grid.group_widths
    right = left_ = None
    dtype = compute_dtype(A.dtype, precision)
    if width:
        parts = da.blockwise(
            _first,
            "bik",
            both,
            "ib",
            new_axes={"k": width},
            adjust_chunks={"b": 1, "i": row_sizes},
            dtype=dtype,
            meta=_meta3(A, dtype),
        )
        right = _sum_blocks(parts, split_every=2 if strips is None else STRIP_SPLIT)
        if strips is None and row_blocks is not None:
            right = _row_blocks(right, row_blocks)
    if left:
        parts = da.blockwise(
            _second,
            "ikb",
            both,
            "ib",
            new_axes={"k": left[1]},
            adjust_chunks={"i": 1, "b": group_widths},
            dtype=dtype,
            meta=_meta3(A, dtype),
        )
        left_ = _sum_blocks(parts, split_every=2 if strips is None else STRIP_SPLIT)
        if strips is not None:
            left_ = left_.rechunk({1: A.chunks[1]})
    return right, left_


class _SketchStrip:
    """One strip's parts of :func:`_sketches` (a picklable callable: the reader and the options
    travel with it, the strip's offsets come as its blockwise inputs)."""

    def __init__(self, reader: Reader, options: dict[str, Any]):
        self.reader, self.options = reader, options

    def __call__(self, rows: Any, group: Any) -> tuple[Any, Any]:
        right: Any = None
        lefts = []
        for r0, c0, a in _strip_chunks(self.reader, rows, group):
            r, l_ = _sketch_block(a, r0, c0, **self.options)
            right = None if r is None else _accumulate(right, r)
            if l_ is not None:
                lefts.append(l_)
            del a  # one chunk at a time: else the last one lives on while the next is read
        if len(lefts) > 1:
            return right, array_namespace(lefts[0]).concatenate(lefts, axis=2)
        return right, (lefts[0] if lefts else None)


def _row_blocks(X: da.Array, row_blocks: Sequence[int]) -> da.Array:
    """The row blocks ``row_blocks`` of X, or X itself when that is all of them."""
    if list(row_blocks) == list(range(X.numblocks[0])):
        return X
    return da.concatenate([X.blocks[i] for i in row_blocks], axis=0)


def _accumulate(total: Any, part: Any) -> Any:
    """``total + part`` in float64; the first part as it is (a float32 product stays float32)."""
    if total is None:
        return part
    return total.astype(np.float64, copy=False) + part


def _sum_blocks(parts: da.Array, split_every: int = 2) -> da.Array:
    """The sum over axis 0 of per-block products, as a binary tree, in float64.

    Pairs are added as soon as both exist, so a worker holds few partial products at once, and
    how many does not grow with the number of blocks summed (the rows or columns of A; a
    task adds ``split_every`` of them). The
    per-block products travel in their own dtype (a float32 GEMM's result is float32: casting
    it first would double the bytes moved between workers and add nothing); every sum is float64.
    """
    return da.reduction(
        parts,
        _keep,
        _add64,
        combine=_add64,
        axis=0,
        split_every=split_every,
        concatenate=False,  # add the parts as they come: a concatenated copy cost 2× the sum
        dtype=np.float64,
        meta=_meta3(parts, np.float64),
    )


def _keep(x: Any, axis: Any = None, keepdims: bool = True) -> Any:
    return x


def _add64(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """The float64 sum over axis 0 of the parts ``x`` (a list of (1, …) blocks, or one block),
    added pairwise into one float64 result rather than concatenated first (2–3× less time on
    the one-pass co-range parts, 8 against 19 ms for two 1025 × 4096 float32 parts)."""
    parts = x if isinstance(x, list) else [x]  # one reduced axis: a flat list
    xp = array_namespace(parts[0])
    if len(parts) == 1:
        total = parts[0].astype(np.float64, copy=False)
    else:
        total = xp.add(parts[0], parts[1], dtype=np.float64)
        for part in parts[2:]:
            total += part
    return total if keepdims else total[0]


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
    strips: Strips | None = None,
    row_blocks: Sequence[int] | None = None,
    lanes: Lanes | None = None,
) -> da.Array:
    """``A @ [S_lanes | S_1 | S_2 | …]`` with each ``S_i`` generated block-wise from ``(seed, stream)``.

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
    strips : Strips, optional
        Read A by row strips through its reader (see the module docstring); default: one task
        per chunk of A.
    row_blocks : sequence of int, optional
        Only these row blocks of the result, in this order (default: all).
    lanes : (stream, width, zeta), optional
        First columns of the result from a lane sparse sign sketch (:mod:`lplr_dask.lanes`).

    Returns
    -------
    dask array of shape (n, sum of widths [+ 1]) (the rows of ``row_blocks``), float64,
    chunked like A's rows.
    """
    right, _ = _sketches(
        A,
        seed,
        streams,
        sumsq=sumsq,
        left=None,
        check=check,
        precision=precision,
        strips=strips,
        row_blocks=row_blocks,
        lanes=lanes,
    )
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
    strips: Strips | None = None,
    lanes: Lanes | None = None,
    origin: tuple[int, int] = (0, 0),
) -> tuple[da.Array, da.Array]:
    """:func:`sketch_right` and :func:`sketch_left` of A from one task per chunk (or per strip).

    Each chunk of A is read and cast to float64 once for both products (as two separate
    products would read it once only by holding it in memory until both had used it).
    ``origin`` (row, column): A is the block of a larger matrix at these offsets, and its
    products are with the operators' rows there (S and G by column, Ψ by row): what
    :mod:`lplr_dask.append` sketches a block appended to a compressed matrix with.

    Returns
    -------
    (right, left) : dask arrays of shapes (n, sum of widths [+ 1]) and (width, d), float64
    """
    return _sketches(  # type: ignore[return-value]
        A,
        seed,
        streams,
        sumsq=sumsq,
        left=(stream, width),
        check=True,
        precision=precision,
        strips=strips,
        lanes=lanes,
        origin=origin,
    )


def left_multiply(
    PT: da.Array,
    A: da.Array,
    *,
    precision: str = "float64",
    strips: Strips | None = None,
    col_blocks: Sequence[int] | None = None,
) -> da.Array:
    """``PTᵀ @ A`` for a thin ``PT`` (n × k) whose row chunks match A's row chunks.

    ``precision`` is the dtype of each block's product (see the module docstring). With
    ``strips``, a task reads a row strip of A and its row block of PT once (see the module
    docstring). ``col_blocks`` keeps only those column blocks of the result, in this order (a
    strip pass computes nothing else).

    Returns
    -------
    dask array of shape (k, d) (the columns of ``col_blocks``), float64, chunked like A's columns.
    """
    PT = like(PT, A).rechunk({0: A.chunks[0], 1: -1})
    dtype = compute_dtype(A.dtype, precision)
    if strips is None:

        def block(pt: Any, a: Any) -> Any:
            return _left_part(pt.T.astype(dtype, copy=False), a, dtype)[None]

        parts = da.blockwise(
            block, "ikj", PT, "ik", A, "ij", adjust_chunks={"i": 1}, dtype=dtype, meta=_meta3(A, dtype)
        )
        out = _sum_blocks(parts)
        return out if col_blocks is None else _col_blocks(out, col_blocks)
    grid = _grid(A, strips, None, col_blocks)
    strip = _LeftStrip(strips.reader, dtype)
    name = f"{_strip_name(A)}-{tokenize(PT.name, dtype, grid.groups.name)}"
    parts = da.blockwise(
        strip,
        "ikb",
        PT,
        "ik",
        grid.rows,
        "i",
        grid.groups,
        "b",
        align_arrays=False,
        adjust_chunks={"i": 1, "b": grid.group_widths},
        name=name,
        dtype=dtype,
        meta=_meta3(A, dtype),
    )
    cb = range(len(A.chunks[1])) if col_blocks is None else col_blocks
    return _sum_blocks(parts, split_every=STRIP_SPLIT).rechunk({1: tuple(A.chunks[1][j] for j in cb)})


def _left_part(ptt: Any, a: Any, dtype: Any) -> Any:
    """``ptt @ a`` panel by panel (``ptt``: k × rows, already in ``dtype``)."""
    part: Any = None
    for rows, p in _panels(a, dtype):
        part = _accumulate(part, ptt[:, rows] @ p)
    return part


class _LeftStrip:
    """One strip's part of :func:`left_multiply`: its row block of PT read once for all its chunks."""

    def __init__(self, reader: Reader, dtype: Any):
        self.reader, self.dtype = reader, dtype

    def __call__(self, pt: Any, rows: Any, group: Any) -> Any:
        ptt = pt.T.astype(self.dtype, copy=False)
        parts = []
        for _, _, a in _strip_chunks(self.reader, rows, group):
            parts.append(_left_part(ptt, a, self.dtype))
            del a  # one chunk at a time: else the last one lives on while the next is read
        out = parts[0] if len(parts) == 1 else array_namespace(parts[0]).concatenate(parts, axis=1)
        return out[None]


def _col_blocks(X: da.Array, col_blocks: Sequence[int]) -> da.Array:
    """The column blocks ``col_blocks`` of X, or X itself when that is all of them."""
    if list(col_blocks) == list(range(X.numblocks[1])):
        return X
    return da.concatenate([X.blocks[:, j] for j in col_blocks], axis=1)


def right_multiply(A: da.Array, M: da.Array, *, precision: str = "float64", strips: Strips | None = None) -> da.Array:
    """``A @ M`` for a thin ``M`` (d × k) whose row chunks match A's column chunks.

    ``precision`` is the dtype of each block's product (see the module docstring); with
    ``strips``, a task reads a row strip of A and the rows of M it meets (see the module docstring).

    Returns
    -------
    dask array of shape (n, k), float64, chunked like A's rows.
    """
    M = like(M, A).rechunk({0: A.chunks[1], 1: -1})
    dtype = compute_dtype(A.dtype, precision)
    if strips is None:

        def block(a: Any, m: Any) -> Any:
            return _right_part(a, m.astype(dtype, copy=False), dtype)[None]

        parts = da.blockwise(block, "jik", A, "ij", M, "jk", adjust_chunks={"j": 1}, dtype=dtype, meta=_meta3(A, dtype))
        return _sum_blocks(parts)
    grid = _grid(A, strips, None, None)
    strip = _RightStrip(strips.reader, dtype)
    name = f"{_strip_name(A)}-{tokenize(M.name, dtype, grid.groups.name)}"
    parts = da.blockwise(
        strip,
        "bik",
        grid.rows,
        "i",
        grid.groups,
        "b",
        M.rechunk({0: grid.group_widths}),
        "bk",
        align_arrays=False,
        adjust_chunks={"b": 1, "i": grid.row_sizes},
        name=name,
        dtype=dtype,
        meta=_meta3(A, dtype),
    )
    return _sum_blocks(parts, split_every=STRIP_SPLIT)


def _right_part(a: Any, m: Any, dtype: Any) -> Any:
    """``a @ m`` panel by panel (``m`` already in ``dtype``)."""
    part = array_namespace(a).empty((a.shape[0], m.shape[1]), dtype=dtype)
    for rows, p in _panels(a, dtype):
        part[rows] = p @ m
    return part


class _RightStrip:
    """One strip's part of :func:`right_multiply`: the rows of M of its columns, chunk by chunk."""

    def __init__(self, reader: Reader, dtype: Any):
        self.reader, self.dtype = reader, dtype

    def __call__(self, rows: Any, group: Any, m: Any) -> Any:
        m = m.astype(self.dtype, copy=False)
        out: Any = None
        offset = 0
        for _, _, a in _strip_chunks(self.reader, rows, group):
            width = a.shape[1]
            out = _accumulate(out, _right_part(a, m[offset : offset + width], self.dtype))
            offset += width
            del a  # one chunk at a time
        return out[None]


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

"""Compiled kernels of a structured sparse range sketch ("lanes") and of the sparse co-range product.

Pass 1 of LPLR multiplies each chunk of A by a thin sketch S (d × width). A dense Gaussian S costs
``width`` multiply-adds per entry of A; the *lane sketch* here costs ``zeta``, with the same scale
(``E[S Sᵀ] = I``) [1]_ [2]_:

- the ``width`` sketch columns are split into ``zeta`` groups whose sizes differ by at most 1;
- every row of S (a column of A) holds one non-zero ``±1/sqrt(zeta)`` in each group, so
  ``zeta`` non-zeros in all, and each row of S has norm exactly 1;
- the columns of A come in *runs* of :data:`LANES` consecutive columns aligned to absolute
  multiples of :data:`LANES` (``run = col // LANES``, ``lane = col % LANES``). A run and a group
  share one random offset ``base[run, group]`` in ``[0, group size)``, and column ``col`` goes to
  sketch column ``group_start + (base[run, group] + lane) % group_size`` of each group, with its
  own random sign per (column, group).

So the 16 columns of a run land on 16 consecutive sketch columns of each group (with one wrap at
the group's end): the kernel reads a row of a chunk once, contiguously, and adds 16-wide vectors.
A group must hold at least :data:`LANES` columns, or the lanes of a run would collide
(``width >= LANES · zeta``); a narrower sketch is refused, not given fewer groups, since that
would change S's distribution behind the caller's back (see :func:`lane_groups`).

Like :mod:`lplr_dask.sketch`, S is cut into blocks of :data:`~lplr_dask.sketch.SKETCH_BLOCK`
rows, block ``b`` of stream ``s`` drawn from ``SeedSequence(seed, spawn_key=(s, b))`` and cached
per process, so any chunking of A's columns (any start, any width, not aligned to 16) meets the
same S.

The co-range product ``Ψ·A`` of one-pass mode uses a sparse sign map whose columns (the rows of
A) hold a few ±1 at given positions (:func:`lplr_dask.sketch.sparse_sign_rows`):
:func:`scatter_rows` adds one row of A, scaled, to each of those rows of the product.

Kernels
-------
On numpy chunks both products run in a numba kernel, compiled once per process and cached on
disk (one thread per call, the GIL released: Dask runs one task per thread). Without numba, and
on CuPy chunks always, they run as a sparse-dense product (``scipy.sparse`` or
``cupyx.scipy.sparse``). :data:`KERNEL` chooses; tests set it to compare the two.

References
----------
.. [1] J. Nelson, H. L. Nguyễn. "OSNAP: Faster numerical linear algebra algorithms via sparser
   subspace embeddings." FOCS 2013.
.. [2] J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. "Streaming low-rank matrix approximation
   with an application to scientific simulation." SIAM J. Sci. Comput. 41(4), 2019, §3.3.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from lplr_dask.backend import array_namespace
from lplr_dask.errors import LplrTypeError
from lplr_dask.sketch import SKETCH_BLOCK
from lplr_dask.validation import expected, parse_int

try:
    import numba
except ImportError:  # the sparse products are used instead (see KERNEL)
    numba = None  # type: ignore[assignment]

__all__ = [
    "LANES",
    "DEFAULT_ZETA",
    "KERNELS",
    "KERNEL",
    "lane_groups",
    "lane_product",
    "lane_matrix",
    "scatter_rows",
]

#: Columns of A per run: the run's columns land on this many consecutive sketch columns per group.
LANES = 16

#: Non-zeros per row of the lane sketch.
DEFAULT_ZETA = 4

#: How a product on numpy chunks runs: a compiled numba kernel, or a sparse-dense product.
KERNELS = ("numba", "sparse")

#: The kernel for numpy chunks: "numba" when numba imports, else "sparse" (CuPy chunks always use
#: "sparse"). A module-level switch so tests can compare the two.
KERNEL = "numba" if numba is not None else "sparse"

#: Generated blocks of the lane sketch a process keeps. A block is small (its offsets and signs:
#: ``zeta × (SKETCH_BLOCK + SKETCH_BLOCK / LANES × 8)`` bytes, 24 KiB at ``zeta = 4``), so the
#: cache can hold more of them than :mod:`lplr_dask.sketch` does of its Gaussian blocks.
CACHED_LANE_BLOCKS = 32

#: Runs per generated block.
_RUNS_PER_BLOCK = SKETCH_BLOCK // LANES

#: Rows of a chunk per sparse product of the fallback: scipy's product copies its dense operand
#: to the layout it reads (the panel's transpose), which is about 2× faster for a panel that
#: stays in cache than for a whole chunk (measured on a 4096² float32 chunk, one thread: 165 ms
#: whole, of which 155 ms the transpose; 80–95 ms in panels of 256 rows).
_PANEL_ROWS = 256

#: The dtypes the kernels compute in.
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class _LaneBlock(NamedTuple):
    """One generated block: the offsets of its runs and the signs of its columns."""

    base: np.ndarray  # (SKETCH_BLOCK // LANES, zeta) int64, base[run, group] in [0, group size)
    signs: np.ndarray  # (zeta, SKETCH_BLOCK) int8, ±1


def lane_groups(width: int, zeta: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``zeta`` groups of ``width`` sketch columns: their starts and sizes.

    Sizes differ by at most 1 (the first ``width % zeta`` groups are one larger).

    Raises
    ------
    LplrValueError
        If ``width`` or ``zeta`` is not a positive integer, or a group would hold fewer than
        :data:`LANES` columns (``width < LANES · zeta``): the 16 columns of a run would then
        collide in it. Use ``zeta <= width // LANES``, or a wider sketch.
    """
    width = parse_int(width, "width", minimum=1)
    zeta = parse_int(zeta, "zeta", minimum=1)
    if width < LANES * zeta:
        fit = f"zeta <= {width // LANES}" if width >= LANES else f"a sketch of at least {LANES} columns"
        raise expected(
            f"width >= {LANES}·zeta (groups of at least {LANES} sketch columns, so that the {LANES} columns of a "
            f"run of A land on distinct columns of each group)",
            f"width={width} with zeta={zeta}",
            f"Use {fit}, or a wider sketch.",
        )
    sizes = np.full(zeta, width // zeta, dtype=np.int64)
    sizes[: width % zeta] += 1
    starts = np.concatenate(([0], np.cumsum(sizes[:-1])))
    return starts, sizes


@functools.lru_cache(maxsize=CACHED_LANE_BLOCKS)
def _lane_block(seed: int, stream: int, block: int, width: int, zeta: int) -> _LaneBlock:
    """Block ``block`` of stream ``stream``: the offsets, then the signs, from one generator."""
    _, sizes = lane_groups(width, zeta)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))
    base = np.ascontiguousarray(rng.integers(0, sizes[:, None], size=(zeta, _RUNS_PER_BLOCK)).T)
    signs = rng.integers(0, 2, size=(zeta, SKETCH_BLOCK), dtype=np.int8) * np.int8(2) - np.int8(1)
    base.flags.writeable = False
    signs.flags.writeable = False
    return _LaneBlock(base, signs)


def _lane_slice(seed: int, stream: int, c0: int, cols: int, width: int, zeta: int) -> _LaneBlock:
    """Rows ``c0:c0 + cols`` of S (``cols >= 1``): the offsets of the runs they touch, their signs."""
    first, last = c0 // SKETCH_BLOCK, (c0 + cols - 1) // SKETCH_BLOCK
    parts = [_lane_block(seed, stream, b, width, zeta) for b in range(first, last + 1)]
    run0 = c0 // LANES - first * _RUNS_PER_BLOCK
    runs = (c0 + cols - 1) // LANES - c0 // LANES + 1
    lo = c0 - first * SKETCH_BLOCK
    if len(parts) == 1:
        return _LaneBlock(parts[0].base[run0 : run0 + runs], parts[0].signs[:, lo : lo + cols])
    base = np.concatenate([p.base for p in parts])[run0 : run0 + runs]
    signs = np.concatenate([p.signs for p in parts], axis=1)[:, lo : lo + cols]
    return _LaneBlock(base, signs)


def _targets(c0: int, part: _LaneBlock, width: int) -> np.ndarray:
    """The sketch column of each (column, group) of ``part``: (cols, zeta) int64."""
    starts, sizes = lane_groups(width, part.base.shape[1])
    col = c0 + np.arange(part.signs.shape[1])
    base = part.base[col // LANES - c0 // LANES]
    return starts + (base + (col % LANES)[:, None]) % sizes


def lane_matrix(seed: int, stream: int, rows: int, width: int, zeta: int = DEFAULT_ZETA) -> np.ndarray:
    """The dense lane sketch S (``rows × width``, float64), for tests and in-memory references.

    Row ``j`` of S multiplies column ``j`` of A; see the module docstring for its structure.
    """
    rows = parse_int(rows, "rows", minimum=0)
    lane_groups(width, zeta)
    out = np.zeros((rows, width))
    if rows:
        part = _lane_slice(int(seed), int(stream), 0, rows, width, zeta)
        np.put_along_axis(out, _targets(0, part, width), part.signs.T / np.sqrt(zeta), axis=1)
    return out


def lane_product(
    a: Any,
    c0: int,
    *,
    seed: int,
    stream: int,
    width: int,
    zeta: int = DEFAULT_ZETA,
    out: Any = None,
    sumsq: Any = None,
) -> Any:
    """``out += a @ S[c0:c0 + cols]`` for a chunk ``a`` of A, and its rows' sums of squares.

    Parameters
    ----------
    a : ndarray of shape (rows, cols), float32 or float64
        A chunk of A (numpy or cupy), columns ``c0:c0 + cols`` of A. The product is computed in
        its dtype. The numba kernel reads a C-contiguous chunk; another is copied first.
    c0 : int
        The chunk's first column in A: any offset, not necessarily a multiple of :data:`LANES`.
    seed, stream : int
        The user's seed and which matrix (as in :func:`lplr_dask.sketch.sketch_rows`).
    width : int
        Columns of S.
    zeta : int, default=DEFAULT_ZETA
        Non-zeros per row of S; ``width >= LANES · zeta`` (see :func:`lane_groups`).
    out : ndarray of shape (rows, width), float32 or float64, optional
        Added to in place; a new zero array of a's dtype when not given.
    sumsq : ndarray of shape (rows,), float32 or float64, optional
        Added to in place: the rows' sums of squares of ``a``, accumulated in float64 (by the
        numba kernel in the same sweep of the chunk as the product).

    Returns
    -------
    out : ndarray of shape (rows, width)

    Raises
    ------
    LplrTypeError
        If ``a`` is not a 2-D float32 or float64 array, or ``out`` or ``sumsq`` not float32/float64.
    LplrValueError
        For a bad ``c0``, ``seed``, ``stream``, ``width`` or ``zeta``, or ``out`` or ``sumsq`` of the
        wrong shape.
    """
    xp = array_namespace(a)
    _check_chunk(a)
    c0 = parse_int(c0, "c0", minimum=0)
    seed = parse_int(seed, "seed", minimum=0)
    stream = parse_int(stream, "stream", minimum=0)
    starts, sizes = lane_groups(width, zeta)
    rows, cols = a.shape
    out = _check_out(xp, out, (rows, int(width)), a.dtype, "out")
    if sumsq is not None:
        _check_out(xp, sumsq, (rows,), a.dtype, "sumsq")
    if rows == 0 or cols == 0:
        return out
    part = _lane_slice(seed, stream, c0, cols, int(width), int(zeta))
    scale = 1.0 / np.sqrt(zeta)
    if xp is np and KERNEL == "numba":
        signs = part.signs.astype(a.dtype) * a.dtype.type(scale)
        padded = starts + LANES * np.arange(len(sizes))  # each group padded by LANES columns
        folds = np.stack([padded, starts, sizes], axis=1)
        offsets = padded + part.base
        _lane_kernel(np.ascontiguousarray(a), c0 % LANES, offsets, signs, folds, LANES, out, sumsq)
        return out
    values = part.signs.T.astype(a.dtype) * a.dtype.type(scale)
    st = _csc(xp, _targets(c0, part, int(width)), values, (int(width), cols))  # Sᵀ
    for r in range(0, rows, _PANEL_ROWS):  # the sparse product reads aᵀ in rows: a panel at a time
        out[r : r + _PANEL_ROWS] += (st @ a[r : r + _PANEL_ROWS].T).T
    if sumsq is not None:
        sumsq += xp.einsum("ij,ij->i", a, a, dtype=np.float64)
    return out


def scatter_rows(a: Any, positions: Any, signs: Any, width: int, out: Any = None) -> Any:
    """``out += Ψ @ a``, where Ψ's column ``i`` (row ``i`` of ``a``) is ``signs[i]`` at ``positions[i]``.

    The one-pass co-range product ``Ψ·A`` of one chunk of rows of A, for a sparse sign map as
    :func:`lplr_dask.sketch.sparse_sign_rows` gives it: each row of ``a``, times its signs, is
    added to rows ``positions[i]`` of ``out``.

    Parameters
    ----------
    a : ndarray of shape (rows, cols), float32 or float64
        A chunk of A (numpy or cupy). The product is computed in its dtype; the numba kernel
        reads a C-contiguous chunk, another is copied first.
    positions : numpy ndarray of shape (rows, nnz), integer
        The rows of ``out`` each row of ``a`` goes to, in ``[0, width)``; on the host.
    signs : numpy ndarray of shape (rows, nnz)
        Their factors (±1), on the host.
    width : int
        Rows of Ψ (ℓ).
    out : ndarray of shape (width, cols), float32 or float64, optional
        Added to in place; a new zero array of a's dtype when not given.

    Returns
    -------
    out : ndarray of shape (width, cols)

    Raises
    ------
    LplrTypeError
        If ``a`` is not a 2-D float32 or float64 array, ``positions`` not integers, or ``out``
        not float32/float64.
    LplrValueError
        If ``positions`` and ``signs`` are not both (rows, nnz), a position is outside
        ``[0, width)``, or ``out`` is not (width, cols).
    """
    xp = array_namespace(a)
    _check_chunk(a)
    width = parse_int(width, "width", minimum=1)
    rows, cols = a.shape
    positions, signs = np.asarray(positions), np.asarray(signs)
    if positions.dtype.kind not in "iu":
        raise expected("integer positions", f"dtype {positions.dtype}", error=LplrTypeError)
    if positions.ndim != 2 or positions.shape[0] != rows or signs.shape != positions.shape:
        raise expected(
            f"positions and signs of shape ({rows}, nnz), one row per row of the chunk",
            f"shapes {positions.shape} and {signs.shape}",
        )
    if positions.size and (positions.min() < 0 or positions.max() >= width):
        raise expected(
            f"positions in [0, {width})",
            f"positions from {positions.min()} to {positions.max()}",
            "Pass Ψ's own width.",
        )
    out = _check_out(xp, out, (width, cols), a.dtype, "out")
    if rows == 0 or cols == 0 or positions.size == 0:
        return out
    values = signs.astype(a.dtype)
    if xp is np and KERNEL == "numba":
        _scatter_kernel(np.ascontiguousarray(a), positions, values, out)
        return out
    out += _csc(xp, positions, values, (width, rows)) @ a
    return out


def _check_chunk(a: Any) -> None:
    if getattr(a, "ndim", None) != 2 or np.dtype(a.dtype) not in _DTYPES:
        got = f"{getattr(a, 'ndim', '?')}-D {getattr(a, 'dtype', type(a).__name__)}"
        raise expected(
            "a 2-D float32 or float64 chunk",
            got,
            "Cast it first (blocks.compute_dtype says to which).",
            error=LplrTypeError,
        )


def _check_out(xp: ModuleType, out: Any, shape: tuple[int, ...], dtype: np.dtype, name: str) -> Any:
    """``out`` after checking its shape and dtype; a new zero array of ``dtype`` when None."""
    if out is None:
        return xp.zeros(shape, dtype=dtype)
    if np.dtype(out.dtype) not in _DTYPES:
        raise expected(f"{name} of dtype float32 or float64", f"dtype {out.dtype}", error=LplrTypeError)
    if tuple(out.shape) != shape:
        raise expected(f"{name} of shape {shape}", tuple(out.shape))
    return out


def _csc(xp: ModuleType, rows: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> Any:
    """A CSC matrix of ``xp``'s sparse module whose column ``j`` holds ``values[j]`` at ``rows[j]``.

    ``rows`` and ``values`` are host arrays of shape (columns, nnz); indices are int32, as
    cupyx wants them.
    """
    sparse = importlib.import_module("scipy.sparse" if xp is np else "cupyx.scipy.sparse")
    indptr = np.arange(0, rows.size + 1, rows.shape[1], dtype=np.int32)
    parts = (values.ravel(), rows.ravel().astype(np.int32), indptr)
    return sparse.csc_matrix(tuple(xp.asarray(v) for v in parts), shape=shape)


# ---------------------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------------------
#
# The inner loops run over a length passed as an argument (``lanes``, ``cols``), not a constant:
# LLVM cannot prove that the arrays are distinct, and a loop of 16 known iterations it unrolls
# into scalar code, while a loop of unknown length it vectorizes behind one run-time overlap
# check (measured: about 1.6× faster at zeta = 4). Indices are slices' own, from 0: numba's
# negative-index wrap-around on a computed index would also stop the vectorizer.


def _lane_rows(a, lead, offsets, signs, folds, lanes, out, sumsq):  # type: ignore[no-untyped-def]
    """``out += a @ S`` (and ``sumsq += rows' sums of squares`` when ``sumsq`` is not None).

    ``offsets[q, g]``: where lane 0 of run ``q`` lands in group ``g`` of a padded row, whose
    group ``g`` starts at ``folds[g, 0]`` and holds ``folds[g, 2] + lanes`` columns, so that a
    run's lanes are always consecutive; the padded row is then folded onto ``out[i]``, group
    ``g`` at ``folds[g, 1]``, its last ``lanes`` columns wrapped to the group's start.
    ``signs[g, j]``: the value of column ``j`` of the chunk in group ``g``. ``lead``: the lane
    of the chunk's first column.
    """
    rows, cols = a.shape
    runs, zeta = offsets.shape
    full0, full1 = min(lead, 1), (lead + cols) // lanes  # the runs inside the chunk: full0 <= q < full1
    padded = np.zeros(folds[-1, 0] + folds[-1, 2] + lanes, dtype=a.dtype)  # one row, reused
    squares = np.zeros(lanes)  # per-lane partial sums, reused
    for i in range(rows):
        row = a[i]
        padded[:] = 0
        squares[:] = 0
        for q in range(full0, full1):
            j0 = q * lanes - lead  # the chunk column of lane 0 of run q
            x = row[j0 : j0 + lanes]
            if sumsq is not None:
                for lane in range(lanes):
                    squares[lane] += float(x[lane]) * float(x[lane])
            for g in range(zeta):
                s = signs[g, j0 : j0 + lanes]
                w = padded[offsets[q, g] : offsets[q, g] + lanes]
                for lane in range(lanes):
                    w[lane] += s[lane] * x[lane]
        for end in range(2):  # the first and the last run, if the chunk starts or ends inside them
            q = end * (runs - 1)
            if full0 <= q < full1 or (end == 1 and runs == 1):
                continue
            j0 = q * lanes - lead
            for lane in range(max(0, -j0), min(lanes, cols - j0)):
                if sumsq is not None:
                    squares[lane] += float(row[j0 + lane]) * float(row[j0 + lane])
                for g in range(zeta):
                    padded[offsets[q, g] + lane] += signs[g, j0 + lane] * row[j0 + lane]
        for g in range(zeta):
            first, start, size = folds[g, 0], folds[g, 1], folds[g, 2]
            o, p = out[i, start : start + size], padded[first : first + size + lanes]
            for t in range(size):
                o[t] += p[t]
            for t in range(lanes):
                o[t] += p[size + t]
        if sumsq is not None:
            total = 0.0
            for lane in range(lanes):
                total += squares[lane]
            sumsq[i] += total


def _scatter(a, positions, signs, out):  # type: ignore[no-untyped-def]
    """``out[positions[i, k]] += signs[i, k] * a[i]`` for every row ``i`` and non-zero ``k``."""
    rows, cols = a.shape
    for i in range(rows):
        x = a[i]
        for k in range(positions.shape[1]):
            s = signs[i, k]
            o = out[positions[i, k]]
            for j in range(cols):
                o[j] += s * x[j]


#: The compiled kernels (None without numba).
_lane_kernel: Any = None
_scatter_kernel: Any = None
if numba is not None:
    _jit = numba.njit(cache=True, nogil=True, fastmath=False)
    _lane_kernel = _jit(_lane_rows)
    _scatter_kernel = _jit(_scatter)

"""Seeded, block-wise random test matrices that are never materialized whole.

A sketch operator with ``N`` rows (the columns of A for S and G, the rows of A for Ψ) is cut into
fixed blocks of :data:`SKETCH_BLOCK` rows. Block ``b`` of stream ``s`` is drawn from
``SeedSequence(seed, spawn_key=(s, b))``, so the same seed gives the same matrix whatever the
input's chunking, the number of workers, or which task asks for a slice.

Streams
-------
- :data:`STREAM_S`: the sketch S (d×k), i.i.d. N(0, 1/k), as in the reference ``lplr()``.
- :data:`STREAM_G`: test columns G (d×p), i.i.d. N(0, 1), for the error estimate.
- :data:`STREAM_PSI`: the co-range sketch Ψᵀ (n×ℓ) for one-pass mode [2]_: a sparse sign map,
  :data:`SPARSE_NNZ` entries ±1 in distinct random columns of each row [3]_, so that ``Ψ·A``
  costs ``SPARSE_NNZ`` multiply-adds per entry of A instead of ℓ (see :func:`sparse_sign_rows`).

References
----------
.. [1] R. Saha, V. Srivastava, M. Pilanci. "Matrix Compression via Randomized Low Rank and Low
   Precision Factorization." NeurIPS 2023.
.. [2] J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. "Practical sketching algorithms for
   low-rank matrix approximation." SIAM J. Matrix Anal. Appl. 38(4), 2017.
.. [3] J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. "Streaming low-rank matrix approximation
   with an application to scientific simulation." SIAM J. Sci. Comput. 41(4), 2019, §3.3.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "SKETCH_BLOCK",
    "SPARSE_NNZ",
    "STREAM_S",
    "STREAM_G",
    "STREAM_PSI",
    "sketch_rows",
    "sketch_matrix",
    "sparse_sign_rows",
]

#: Rows per generated block. Fixed: changing it changes every sketch (it is stored in the attrs).
SKETCH_BLOCK = 4096

STREAM_S = 0
STREAM_G = 1
STREAM_PSI = 2

#: Non-zeros per row of a sparse sign map (Tropp et al. 2019 recommend 8).
SPARSE_NNZ = 8

#: Generated blocks a process keeps for reuse, per kind: a bound on the cache's memory
#: (``CACHED_BLOCKS × SKETCH_BLOCK × width × 8`` bytes, 64 MiB for blocks of S at k + p = 512,
#: the default's for k = 256) that does not grow with the number of columns of A (its effect on
#: peak memory: benchmarks/RESULTS.md, "Compress vs read pass and svd_compressed").
CACHED_BLOCKS = 4


@functools.lru_cache(maxsize=CACHED_BLOCKS)
def _block(seed: int, stream: int, block: int, width: int) -> np.ndarray:
    """Block ``block`` of stream ``stream``: (SKETCH_BLOCK, width) standard normals, float64.

    Cached per process: a worker reuses the same sketch block for every row block of A.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))
    out = rng.standard_normal((SKETCH_BLOCK, width))
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=CACHED_BLOCKS)
def _block_on(xp: ModuleType, seed: int, stream: int, block: int, width: int) -> Any:
    """:func:`_block` on ``xp``'s device: copied once per process (numpy: the host block itself)."""
    host = _block(seed, stream, block, width)
    return host if xp is np else xp.asarray(host)


def sketch_rows(
    seed: int,
    stream: int,
    start: int,
    stop: int,
    width: int,
    *,
    scale: float = 1.0,
    xp: ModuleType = np,
) -> np.ndarray:
    """Rows ``start:stop`` of a (conceptually unbounded) Gaussian matrix with ``width`` columns.

    Parameters
    ----------
    seed : int
        The user's seed.
    stream : int
        Which matrix (:data:`STREAM_S`, :data:`STREAM_G` or :data:`STREAM_PSI`).
    start, stop : int
        Row range, any alignment.
    width : int
        Number of columns (k, p or ℓ).
    scale : float, default=1.0
        Multiplies the standard normals (``1/sqrt(k)`` for S).
    xp : module, default=numpy
        ``cupy`` returns the rows on the GPU. They are generated on the host from the same
        stream, so CPU and GPU runs share one S (and can resume or audit each other), and each
        block is copied to the device once per process, not once per chunk of A.

    Returns
    -------
    ndarray of shape (stop - start, width), float64
    """
    if stop <= start:
        return xp.zeros((0, width))
    first, last = start // SKETCH_BLOCK, (stop - 1) // SKETCH_BLOCK
    parts = [_block_on(xp, int(seed), stream, b, width) for b in range(first, last + 1)]
    rows = parts[0] if len(parts) == 1 else xp.concatenate(parts)
    lo = start - first * SKETCH_BLOCK
    out = rows[lo : lo + stop - start]
    return out * scale if scale != 1.0 else out.copy()


def sketch_matrix(seed: int, stream: int, rows: int, width: int, *, scale: float = 1.0) -> np.ndarray:
    """The whole (rows × width) matrix, for tests and in-memory references only."""
    return sketch_rows(seed, stream, 0, rows, width, scale=scale)


@functools.lru_cache(maxsize=CACHED_BLOCKS)
def _sparse_block(seed: int, stream: int, block: int, width: int, nnz: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``block`` of a sparse sign map: (positions, signs), each (SKETCH_BLOCK, nnz).

    Each row gets ``nnz`` distinct columns out of ``width``, uniformly (Floyd's sampling, one
    vectorized step per non-zero), and independent signs ±1.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))
    pos = np.empty((SKETCH_BLOCK, nnz), dtype=np.int64)
    for i, top in enumerate(range(width - nnz, width)):
        pick = rng.integers(0, top + 1, size=SKETCH_BLOCK)
        taken = (pos[:, :i] == pick[:, None]).any(axis=1)
        pos[:, i] = np.where(taken, top, pick)
    signs = rng.integers(0, 2, size=(SKETCH_BLOCK, nnz)).astype(np.float64) * 2.0 - 1.0
    pos.flags.writeable = False
    signs.flags.writeable = False
    return pos, signs


def sparse_sign_rows(seed: int, stream: int, start: int, stop: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of a sparse sign matrix with ``width`` columns [3]_.

    Each row holds ``min(SPARSE_NNZ, width)`` entries ±1 in distinct, uniformly random columns
    and zeros elsewhere. Like :func:`sketch_rows`, it is cut into fixed blocks drawn from
    ``(seed, stream, block)``, so any slicing gives the same matrix.

    Returns
    -------
    positions : ndarray of shape (stop - start, nnz), int64
        The columns of the non-zeros of each row, in no particular order.
    signs : ndarray of shape (stop - start, nnz), float64
        Their values, ±1.
    """
    nnz = min(SPARSE_NNZ, width)
    if stop <= start:
        return np.zeros((0, nnz), dtype=np.int64), np.zeros((0, nnz))
    first, last = start // SKETCH_BLOCK, (stop - 1) // SKETCH_BLOCK
    parts = [_sparse_block(int(seed), stream, b, width, nnz) for b in range(first, last + 1)]
    lo = start - first * SKETCH_BLOCK
    pos, signs = (np.concatenate([part[i] for part in parts])[lo : lo + stop - start] for i in range(2))
    return pos, signs

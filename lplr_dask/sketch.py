"""Seeded, block-wise random test matrices that are never materialized whole.

A sketch operator with ``N`` rows (the columns of A for S and G, the rows of A for Ψ) is cut into
fixed blocks of :data:`SKETCH_BLOCK` rows. Block ``b`` of stream ``s`` is drawn from
``SeedSequence(seed, spawn_key=(s, b))``, so the same seed gives the same matrix whatever the
input's chunking, the number of workers, or which task asks for a slice.

Streams
-------
- :data:`STREAM_S`: the sketch S (d×k), i.i.d. N(0, 1/k), as in the reference ``lplr()``.
- :data:`STREAM_G`: test columns G (d×p), i.i.d. N(0, 1), for the error estimate.
- :data:`STREAM_PSI`: the co-range sketch Ψᵀ (n×ℓ), i.i.d. N(0, 1), for one-pass mode [2]_.

References
----------
.. [1] R. Saha, V. Srivastava, M. Pilanci. "Matrix Compression via Randomized Low Rank and Low
   Precision Factorization." NeurIPS 2023.
.. [2] J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. "Practical sketching algorithms for
   low-rank matrix approximation." SIAM J. Matrix Anal. Appl. 38(4), 2017.
"""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np

__all__ = ["SKETCH_BLOCK", "STREAM_S", "STREAM_G", "STREAM_PSI", "sketch_rows", "sketch_matrix"]

#: Rows per generated block. Fixed: changing it changes every sketch (it is stored in the attrs).
SKETCH_BLOCK = 4096

STREAM_S = 0
STREAM_G = 1
STREAM_PSI = 2


@functools.lru_cache(maxsize=16)
def _block(seed: int, stream: int, block: int, width: int) -> np.ndarray:
    """Block ``block`` of stream ``stream``: (SKETCH_BLOCK, width) standard normals, float64.

    Cached per process: a worker reuses the same sketch block for every row block of A.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))
    out = rng.standard_normal((SKETCH_BLOCK, width))
    out.flags.writeable = False
    return out


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
        ``cupy`` returns the rows on the GPU (generated on the host from the same stream, so CPU
        and GPU runs share one S).

    Returns
    -------
    ndarray of shape (stop - start, width), float64
    """
    if stop <= start:
        return xp.zeros((0, width))
    first, last = start // SKETCH_BLOCK, (stop - 1) // SKETCH_BLOCK
    parts = [_block(int(seed), stream, b, width) for b in range(first, last + 1)]
    rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
    lo = start - first * SKETCH_BLOCK
    out = rows[lo : lo + stop - start]
    out = out * scale if scale != 1.0 else out.copy()
    return out if xp is np else xp.asarray(out)


def sketch_matrix(seed: int, stream: int, rows: int, width: int, *, scale: float = 1.0) -> np.ndarray:
    """The whole (rows × width) matrix, for tests and in-memory references only."""
    return sketch_rows(seed, stream, 0, rows, width, scale=scale)

"""The counter-based random stream of stochastic rounding (splitmix64).

Each entry of a matrix gets its uniform from its position alone (:func:`rounding_uniforms`), so
the codes of stochastic rounding do not depend on the chunking, the worker or the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["rounding_key", "rounding_uniforms"]

#: splitmix64 constants (Steele, Lea, Flood 2014): the increment and the two multipliers.
_GOLDEN, _MIX1, _MIX2 = (np.uint64(v) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def rounding_key(seed: int | np.random.SeedSequence | np.random.Generator | None) -> int:
    """The 64-bit key of stochastic rounding's uniforms, from a seed (None means 0)."""
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63))
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed or 0))
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def rounding_uniforms(key: int, loc: list[tuple[int, int]], width: int, xp: Any = np) -> Any:
    """Uniforms in [0, 1) for the entries at ``loc`` of a matrix with ``width`` columns.

    Entry ``(i, j)`` gets output number ``i·width + j`` of the splitmix64 generator started at
    ``key``: a counter-based stream, so a block's uniforms depend only on its position, not on how
    the matrix is chunked, which worker draws them, or the device (integer arithmetic is exact on
    numpy and cupy alike). Dask and numpy inputs therefore get the same codes.

    Parameters
    ----------
    key : int
        From :func:`rounding_key`.
    loc : [(row_start, row_stop), (col_start, col_stop)]
    width : int
        Columns of the whole matrix.
    xp : module, default=numpy
        numpy or cupy.

    References
    ----------
    .. [1] G. L. Steele, D. Lea, C. H. Flood. "Fast splittable pseudorandom number generators."
       OOPSLA 2014.
    """
    (r0, r1), (c0, c1) = loc
    rows = xp.arange(r0, r1, dtype=xp.uint64)[:, None]
    cols = xp.arange(c0, c1, dtype=xp.uint64)[None, :]
    z = (rows * xp.uint64(width) + cols + xp.uint64(1)) * xp.uint64(_GOLDEN) + xp.uint64(key)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(_MIX1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(_MIX2)
    z = z ^ (z >> xp.uint64(31))
    return (z >> xp.uint64(11)).astype(xp.float64) * (1.0 / (1 << 53))

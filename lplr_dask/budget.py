"""Rank and bits from a storage budget; the paper's fair rank."""

from __future__ import annotations

import math

from lplr_dask.errors import LplrValueError

__all__ = ["fair_rank", "rank_for_bits_per_entry", "theoretical_bits_per_entry"]


def fair_rank(n: int, d: int, bits: tuple[int, int], b_nq: float, *, cr: float = 1.0) -> int:
    """The paper's fair rank: ``floor(cr·n·d·B_nq / (n·B1 + d·B2))``, capped at ``min(n, d)``.

    At ``cr = 1`` the factors take as many bits as naive ``B_nq``-bit quantization of A.
    A result of 0 means the matrix is too small to gain from a factorization at this budget.
    """
    b1, b2 = bits
    return min(n, d, math.floor(cr * n * d * b_nq / (n * b1 + d * b2)))


def theoretical_bits_per_entry(n: int, d: int, rank: int, bits: tuple[int, int]) -> float:
    """``k·(n·B1 + d·B2) / (n·d)``: the codes' bits per entry of A, scales not counted."""
    return rank * (n * bits[0] + d * bits[1]) / (n * d)


def rank_for_bits_per_entry(n: int, d: int, bits: tuple[int, int], budget: float) -> int:
    """The largest rank whose codes fit ``budget`` bits per entry of A.

    Raises
    ------
    LplrValueError
        If not even rank 1 fits.
    """
    if not budget > 0:
        raise LplrValueError(f"Expected a positive bits-per-entry budget. Got {budget!r} instead.")
    k = fair_rank(n, d, bits, budget)
    if k < 1:
        need = theoretical_bits_per_entry(n, d, 1, bits)
        raise LplrValueError(
            f"A budget of {budget} bits per entry is below what rank 1 needs at bits {bits} for a "
            f"{n}x{d} matrix ({need:.4g}). Raise --bits-per-entry or lower --bits."
        )
    return k

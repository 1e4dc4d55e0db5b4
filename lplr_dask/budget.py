"""Rank and bits from a storage budget in bits per entry on disk; the paper's fair rank.

A budget of X bits per entry allows ``X·n·d/8`` bytes on disk for the whole store: codes, scales,
offsets and metadata. :func:`storage_bytes` bounds what a store takes from above, so a rank it
allows never exceeds the budget:

- **codes**: at most ``SLACK × entries × B/8`` bytes plus :data:`CHUNK_OVERHEAD` per chunk. Bit-shuffled
  Blosc stores B-bit codes in B/8 of their uint8 size whatever their values (plus headers and
  the 4-byte crc32c of format version 2 per chunk; every chunk is stored; measured:
  benchmarks/RESULTS.md, "Figures behind the code's comments"); the store switches to Zstd only
  where a sample of the codes comes out smaller (:func:`lplr_dask.store.codes_compressor`), so
  the bound holds and a store usually comes in under it;
- **scales and offsets**: 8 bytes per value (float64), one value for ``tensor``, k for
  ``channel``, k per group for ``group``, plus :data:`CHUNK_OVERHEAD` per array;
- **metadata**: :data:`METADATA_BYTES`, about three times what a store's ``zarr.json`` documents
  and attrs take (measured: benchmarks/RESULTS.md, "Figures behind the code's comments").

:func:`choose` picks the rank k *and* the bits (B1, B2) for a budget: for each pair of a small grid
(:data:`BITS_GRID`) the ranks that fit are scored by the error :class:`lplr_dask.target.Plan`
predicts, and the lowest wins. The prediction needs A's spectrum as the sketch sees it: the plan
runs the compression's own pass 1 at the largest rank considered (one extra read of A), and
because a TSQR ``Y = Q·T`` of the sketch gives nested bases, ``Q[:, :j]`` spans the first j sketch
columns at every j, so the test columns' residual after projecting on them gives the tail energy
``‖A − P_j·A‖²`` for all j at once; the rank-k basis is made from the first k + p columns as the
compression makes it, L's rounding is simulated on it and R's added as
noise of variance ``Δ²/12`` per entry (see :mod:`lplr_dask.target`). Choosing costs that one read
and a TSQR of an n × k basis per candidate, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np

from lplr_dask import backbone, logs
from lplr_dask.backend import to_host_blocks
from lplr_dask.blocks import Strips
from lplr_dask.errors import LplrValueError
from lplr_dask.options import BACKBONE_STARTS, MAX_RANK_KEY, SizeRule, configured_max_rank
from lplr_dask.progress import compute
from lplr_dask.quantize import QuantizerSpec, parse_quantizer
from lplr_dask.store import CHECKSUM_BYTES
from lplr_dask.target import DEFAULT_MAX_RANK, ErrorPlan

__all__ = [
    "BACKBONE_GRID",
    "BITS_GRID",
    "backbone_bytes",
    "choose_backbone",
    "CENTRAL_STEPS",
    "PAPER_SPECS",
    "Choice",
    "SizedRank",
    "capped_rank",
    "choose",
    "fair_rank",
    "gaussian_ratio",
    "without_backbone",
    "rank_for_bits_per_entry",
    "resolve_rank",
    "storage_bytes",
    "theoretical_bits_per_entry",
]

#: Codes may take this much more than ``entries × B / 8`` bytes (issue 5's bound).
SLACK = 1.05
#: Bytes of headers per stored chunk, an upper bound: Blosc and Zstd headers (measured:
#: benchmarks/RESULTS.md, "Figures behind the code's comments") and the chunk's crc32c checksum
#: (:data:`lplr_dask.store.CHECKSUM_BYTES`).
CHUNK_OVERHEAD = 64 + CHECKSUM_BYTES
#: Bytes of Zarr metadata documents and attrs, an upper bound (measured: as above).
METADATA_BYTES = 16 * 1024
#: The (B1, B2) pairs :func:`choose` considers. Mostly B1 ≤ B2: least squares onto the quantized
#: basis absorbs part of L's rounding, and nearest rounding of R nothing of R's; but gptq rounding
#: of R (the default's) feeds R's rounding errors back through L̂ᵀL̂, and then (8, 6) and (6, 4)
#: won cells of the equal-bytes benchmark (benchmarks/RESULTS.md, "Quantizers", "A wider grid of
#: bit pairs"). Above 8 bits (uint16 codes) for matrices of low rank and little noise, where 8-bit
#: rounding is the larger error.
BITS_GRID: tuple[tuple[int, int], ...] = (
    (12, 12),
    (10, 10),
    (8, 8),
    (6, 8),
    (8, 6),
    (4, 8),
    (6, 6),
    (4, 6),
    (6, 4),
    (4, 4),
    (3, 3),
    (2, 2),
)
#: The backbone bits :func:`choose_backbone` considers (0: none), the issue's range: above 4 bits
#: a backbone alone is already near float16's error for most weights.
BACKBONE_GRID: tuple[int, ...] = (0, 1, 2, 3, 4)
#: Ranks tried per pair, as fractions of the largest that fits: more rank lowers the tail but can
#: raise the rounding noise (a worse-conditioned basis), so the best may be below the largest.
RANK_STEPS = (1.0, 0.5, 0.25, 0.125)
#: Test columns the plan uses at least (as :mod:`lplr_dask.target` does).
PLAN_TEST_COLUMNS = 32

#: The quantizers of L and R that bounds assume unless told: the paper's, one range each.
PAPER_SPECS: tuple[QuantizerSpec, QuantizerSpec] = (parse_quantizer("paper"), parse_quantizer("paper"))


def fair_rank(n: int, d: int, bits: tuple[int, int], b_nq: float, *, cr: float = 1.0) -> int:
    """The paper's fair rank: ``floor(cr·n·d·B_nq / (n·B1 + d·B2))``, capped at ``min(n, d)``.

    At ``cr = 1`` the factors' codes take as many bits as naive ``B_nq``-bit quantization of A.
    A result of 0 means the matrix is too small to gain from a factorization at this budget.
    """
    b1, b2 = bits
    return min(n, d, math.floor(cr * n * d * b_nq / (n * b1 + d * b2)))


def theoretical_bits_per_entry(n: int, d: int, rank: int, bits: tuple[int, int]) -> float:
    """``k·(n·B1 + d·B2) / (n·d)``: the codes' bits per entry of A, scales not counted."""
    return rank * (n * bits[0] + d * bits[1]) / (n * d)


def _scale_values(spec: QuantizerSpec, rank: int, length: int) -> int:
    """Values in one scale (or offset) array of a factor whose long axis has ``length`` entries."""
    if spec.granularity == "tensor":
        return 1
    if spec.granularity == "channel":
        return rank
    return rank * -(-length // spec.group_size)


def storage_bytes(
    n: int,
    d: int,
    rank: int,
    bits: tuple[int, int],
    *,
    specs: tuple[QuantizerSpec, QuantizerSpec] = PAPER_SPECS,
    chunks: tuple[int, int] | None = None,
) -> float:
    """An upper bound of the bytes on disk of a store (see the module docstring).

    Parameters
    ----------
    n, d : int
        The matrix's shape.
    rank : int
    bits : (int, int)
        (B1, B2).
    specs : (QuantizerSpec, QuantizerSpec), default=("paper", "paper")
        The quantizers of L and R (their scales' sizes).
    chunks : (int, int), optional
        A's chunk shape: L's codes are chunked by A's row chunks, R's by its column chunks.
        Default: one chunk each. The compression only ever merges chunks, so a bound from the
        input's chunks holds.

    Returns
    -------
    float
        Bytes.
    """
    row_chunk, col_chunk = chunks or (n, d)
    codes = SLACK * rank * (n * bits[0] + d * bits[1]) / 8
    codes += CHUNK_OVERHEAD * (-(-n // row_chunk) + -(-d // col_chunk))
    scales = sum(2 * (8 * _scale_values(spec, rank, length) + CHUNK_OVERHEAD) for spec, length in zip(specs, (n, d)))
    return codes + scales + METADATA_BYTES


def rank_for_bits_per_entry(
    n: int,
    d: int,
    bits: tuple[int, int],
    budget: float,
    *,
    specs: tuple[QuantizerSpec, QuantizerSpec] = PAPER_SPECS,
    chunks: tuple[int, int] | None = None,
) -> int:
    """The largest rank whose store fits ``budget`` bits per entry on disk (:func:`storage_bytes`).

    Raises
    ------
    LplrValueError
        If the budget is not positive, or not even rank 1 fits.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise LplrValueError(f"Expected a positive bits-per-entry budget. Got {budget!r} instead.")
    allowed = budget * n * d / 8
    fixed = storage_bytes(n, d, 0, bits, specs=specs, chunks=chunks)
    per_rank = storage_bytes(n, d, 1, bits, specs=specs, chunks=chunks) - fixed  # the bound is linear in k
    k = min(n, d, math.floor((allowed - fixed) / per_rank))
    if k < 1:
        need = (fixed + per_rank) * 8 / (n * d)
        raise LplrValueError(
            f"A budget of {budget} bits per entry on disk is below what rank 1 needs at bits {tuple(bits)} "
            f"for a {n}x{d} matrix ({need:.4g}, scales and {METADATA_BYTES // 1024} KiB of metadata "
            "included). Raise --bits-per-entry or lower --bits."
        )
    return k


#: What the central steps cost, for the messages about a rank above ``lplr.max-rank``.
CENTRAL_STEPS = (
    "the central steps (the Gram matrix of the sketch and its eigh, the k x k GPTQ factor, pinv's SVD) "
    "run on one process in O(k^3) time"
)


class SizedRank(NamedTuple):
    """The rank a size rule sets, and the cap it met."""

    rank: int
    #: ``{"requested": K, "max_rank": MAX}`` when the rule set a rank K above ``lplr.max-rank``
    #: (MAX, :func:`lplr_dask.options.configured_max_rank`) and ``rank`` is MAX; else None.
    cap: dict[str, int] | None


def resolve_rank(
    shape: tuple[int, int],
    bits: tuple[int, int],
    size: SizeRule,
    *,
    specs: tuple[QuantizerSpec, QuantizerSpec] = PAPER_SPECS,
    chunks: tuple[int, int] | None = None,
    log: Callable[[str], None] = logs.warning,
) -> int:
    """The rank that ``size`` (a rank, bits per entry or match-nq rule) sets for a matrix of ``shape``.

    ``bits_per_entry`` gives the largest rank whose store fits the budget on disk with the
    quantizers ``specs`` (L, R) and A's ``chunks`` (:func:`rank_for_bits_per_entry`);
    ``match_nq`` the paper's fair rank (:func:`fair_rank`). Either is capped at the Dask config
    ``lplr.max-rank`` (:func:`lplr_dask.options.configured_max_rank`, default 4096) with a warning
    through ``log``; a ``rank`` above it is the user's and is kept, with a note. Only the shape
    and the chunks are used: nothing of A is read. :func:`capped_rank` also says what was capped.

    Raises
    ------
    LplrValueError
        If the rank is outside ``1..min(n, d)`` (for ``match_nq``: 0, the matrix is too small to
        gain), or ``size`` is a target error (:mod:`lplr_dask.target` finds that rank).
    """
    return capped_rank(shape, bits, size, specs=specs, chunks=chunks, log=log).rank


def capped_rank(
    shape: tuple[int, int],
    bits: tuple[int, int],
    size: SizeRule,
    *,
    specs: tuple[QuantizerSpec, QuantizerSpec] = PAPER_SPECS,
    chunks: tuple[int, int] | None = None,
    log: Callable[[str], None] = logs.warning,
) -> SizedRank:
    """:func:`resolve_rank`'s rank, with the cap it met.

    Returns
    -------
    SizedRank
        The rank, and ``cap``: ``{"requested": K, "max_rank": MAX}`` when the rule's rank K was
        capped at MAX (the store's attrs record it as ``rank_cap``), else None.

    Raises
    ------
    LplrValueError
        As :func:`resolve_rank`.
    """
    n, d = shape
    if size.kind == "rank":
        k = int(size.value)
    elif size.kind == "bits_per_entry":
        k = rank_for_bits_per_entry(n, d, bits, size.value, specs=specs, chunks=chunks)
    elif size.kind == "match_nq":
        k = fair_rank(n, d, bits, size.value)
        if k < 1:
            raise LplrValueError(
                f"The fair rank against {size.value:g}-bit quantization of a {n}x{d} matrix at bits "
                f"{bits} is 0: the matrix is too small to gain from a factorization. Keep it "
                "uncompressed or quantize it directly."
            )
    else:
        raise LplrValueError("A target error sets the rank by a search (lplr_dask.target.meet_target), not here.")
    if not 1 <= k <= min(n, d):
        raise LplrValueError(f"Expected rank from 1 to min(n, d) = {min(n, d)} for a {n}x{d} matrix. Got {k!r}.")
    top = configured_max_rank()
    if k <= top:
        return SizedRank(k, None)
    if size.kind == "rank":
        log(f"note: rank {k} is above {MAX_RANK_KEY} = {top}, as asked: {CENTRAL_STEPS}.")
        return SizedRank(k, None)
    rule = (
        f"a budget of {size.value:g} bits per entry allows rank {k}"
        if size.kind == "bits_per_entry"
        else f"the fair rank against {size.value:g}-bit quantization is {k}"
    )
    log(
        f"warning: {rule}, capped at {top} ({MAX_RANK_KEY}): {CENTRAL_STEPS}. "
        f"To take rank {k}, raise the cap with DASK_LPLR__MAX_RANK={k} or give --rank {k} (rank={k})."
    )
    return SizedRank(top, {"requested": k, "max_rank": top})


class Choice(NamedTuple):
    """What :func:`choose` picked, and what it weighed."""

    rank: int
    bits: tuple[int, int]
    predicted: float
    #: (rank, bits, predicted error) of every candidate scored.
    candidates: list[tuple[int, tuple[int, int], float]]
    #: ‖A‖²_F of the matrix chosen for, as the plan measured it.
    norm2: float = 0.0
    #: B0 of the backbone chosen with them (:func:`choose_backbone`); 0: none.
    backbone_bits: int = 0
    #: The backbone's first round (:data:`lplr_dask.options.BACKBONE_STARTS`) chosen with it.
    backbone_start: str = "backbone"
    #: The plan the prediction came from (its spectrum serves the factors-first prediction).
    plan: ErrorPlan | None = None


def choose(
    A: da.Array,
    budget: float,
    *,
    specs: tuple[QuantizerSpec, QuantizerSpec] = PAPER_SPECS,
    grid: Sequence[tuple[int, int]] = BITS_GRID,
    seed: int = 0,
    passes: int = 2,
    power_iters: int = 0,
    oversample: int | None = None,
    test_columns: int = 10,
    max_rank: int | None = None,
    log: Callable[[str], None] = logs.info,
    strips: Strips | None = None,
) -> Choice:
    """The rank and bits of the lowest predicted error within ``budget`` bits per entry on disk.

    Parameters
    ----------
    A : dask array of shape (n, d)
        The matrix, chunked as the compression will read it.
    budget : float
        Bits per entry of A on disk, scales and metadata included.
    specs : (QuantizerSpec, QuantizerSpec)
        The quantizers of L and R.
    grid : sequence of (int, int), default=BITS_GRID
        The (B1, B2) pairs considered.
    seed, passes, power_iters, oversample : as for :func:`lplr_dask.compress`
    test_columns : int, default=10
        Raised to at least :data:`PLAN_TEST_COLUMNS` for the plan.
    max_rank : int, optional
        The largest rank considered. Default :data:`lplr_dask.target.DEFAULT_MAX_RANK`; never
        above the Dask config ``lplr.max-rank`` (:func:`lplr_dask.options.configured_max_rank`).
    log : callable, default=lplr_dask.logs.info
        Receives the choice made.
    strips : lplr_dask.blocks.Strips, optional
        Read A by row strips for the plan (:func:`lplr_dask.chunking.strips`).

    Returns
    -------
    Choice

    Raises
    ------
    LplrValueError
        If no pair of the grid fits rank 1 into the budget.
    """
    n, d = A.shape
    chunks = (int(A.chunks[0][0]), int(A.chunks[1][0]))
    fits = _fits((n, d), budget, grid, specs, chunks)
    if not fits:
        # the smallest pair's message says what rank 1 needs
        smallest = min(grid, key=lambda b: n * b[0] + d * b[1])
        rank_for_bits_per_entry(n, d, smallest, budget, specs=specs, chunks=chunks)
    top = min(max(fits.values()), max_rank or DEFAULT_MAX_RANK, configured_max_rank())
    log(f"bits per entry {budget}: sketch spectrum up to rank {top} (one extra read of A)")
    plan = ErrorPlan.measure(
        A,
        bits=next(iter(fits)),
        spec=specs[0],
        spec_r=specs[1],
        seed=seed,
        test_columns=max(test_columns, PLAN_TEST_COLUMNS),
        power_iters=power_iters,
        passes=passes,
        max_rank=top,
        oversample=oversample,
        strips=strips,
    )
    candidates = _scored(plan, fits)
    k, bits, predicted = min(candidates, key=lambda c: c[2])
    log(f"bits per entry {budget}: rank {k}, bits {bits} (predicted error {predicted:.4g})")
    return Choice(k, bits, predicted, candidates, plan.norm2, plan=plan)


def _fits(
    shape: tuple[int, int],
    budget: float,
    grid: Sequence[tuple[int, int]],
    specs: tuple[QuantizerSpec, QuantizerSpec],
    chunks: tuple[int, int],
) -> dict[tuple[int, int], int]:
    """The largest rank each pair of ``grid`` fits into ``budget``, for the pairs that fit rank 1."""
    fits: dict[tuple[int, int], int] = {}
    for bits in grid:
        try:
            fits[(bits[0], bits[1])] = rank_for_bits_per_entry(*shape, bits, budget, specs=specs, chunks=chunks)
        except LplrValueError:
            continue
    return fits


def _scored(plan: ErrorPlan, fits: dict[tuple[int, int], int]) -> list[tuple[int, tuple[int, int], float]]:
    """(rank, bits, predicted error) of the ranks :data:`RANK_STEPS` takes of each pair's fit."""
    candidates = []
    for bits, k_fit in fits.items():
        scored = plan.with_bits(bits)
        ranks = sorted({max(1, math.floor(min(k_fit, plan.max_rank) * f)) for f in RANK_STEPS})
        candidates += [(k, bits, scored.estimate(k)) for k in ranks]
    return candidates


def backbone_bytes(n: int, d: int, bits: int, chunks: tuple[int, int] | None = None) -> float:
    """An upper bound of the bytes on disk of a ``bits``-bit backbone of an n × d matrix in
    ``chunks`` (:mod:`lplr_dask.backbone`): its codes as :func:`storage_bytes` bounds them, and a
    float32 scale and offset per column of each row chunk, with the headers of every chunk."""
    r, c = chunks or (n, d)
    blocks_ = -(-n // r) * -(-d // c)
    return SLACK * n * d * bits / 8 + 3 * CHUNK_OVERHEAD * blocks_ + 2 * 4 * -(-n // r) * d


def without_backbone(size: SizeRule, shape: tuple[int, int], backbone_bits: int, chunks: tuple[int, int]) -> SizeRule:
    """``size`` for the factors beside a fixed ``backbone_bits``-bit backbone: a bits-per-entry
    budget less what the backbone takes on disk (:func:`backbone_bytes`); a match-nq rule's
    ``B_nq`` less ``B0`` (the fair rank counts codes only, and Q's are B0 bits per entry); a rank
    unchanged.

    Raises
    ------
    LplrValueError
        If the backbone alone takes the whole budget.
    """
    if not backbone_bits or size.kind not in ("bits_per_entry", "match_nq"):
        return size
    n, d = shape
    if size.kind == "match_nq":
        taken = float(backbone_bits)
        flag = f"--match-nq {size.value:g}"
        what = f"{backbone_bits} bits per entry of codes"
        fix = "Raise --match-nq or lower --backbone."
    else:
        taken = backbone_bytes(n, d, backbone_bits, chunks) * 8 / (n * d)
        flag = f"--bits-per-entry {size.value:g}"
        what = f"{taken:.3g} bits per entry on disk"
        fix = "Raise the budget, lower --backbone, or give --backbone auto."
    if taken >= size.value:
        raise LplrValueError(
            f"Expected a budget above what a {backbone_bits}-bit backbone takes of a {n}x{d} matrix "
            f"({what}). Got {flag}. {fix}"
        )
    return dataclasses.replace(size, value=size.value - taken)


def choose_backbone(
    A: da.Array,
    budget: float,
    *,
    grid: Sequence[int] = BACKBONE_GRID,
    starts: Sequence[str] = BACKBONE_STARTS,
    log: Callable[[str], None] = logs.info,
    strips: Strips | None = None,
    **kwargs: Any,
) -> Choice:
    """:func:`choose` over backbones too: the B0 of ``grid`` (0: none), the start of ``starts``,
    rank and bits of the lowest predicted error of ``A ≈ Q + L·R`` within ``budget`` bits per
    entry on disk.

    The backbone-first start (``Q = Q_B0(A)``, then the factors of ``A − Q̂``) costs one read of A
    per B0 that leaves the factors at least rank 1: its plan is measured on the residual
    ``A − Q̂_B0(A)`` (formed chunk by chunk, nothing written), and its predicted error
    ``ε·‖A − Q̂‖ / ‖A‖``. The factors-first start (the factors of A, then ``Q = Q_B0(A − L̂·R̂)``)
    costs one read of A for all B0 together (:func:`_factors_first`). ``kwargs`` go to
    :func:`choose` (the quantizers, seed, …).

    Raises
    ------
    LplrValueError
        If not even B0 = 0 fits rank 1 into the budget.
    """
    n, d = A.shape
    chunks = (int(A.chunks[0][0]), int(A.chunks[1][0]))
    plain = choose(A, budget, log=log, strips=strips, **kwargs)
    assert plain.plan is not None
    best = plain
    rests = {}
    for b0 in sorted(b for b in grid if b > 0):
        rest = budget - backbone_bytes(n, d, b0, chunks) * 8 / (n * d)
        if rest > 0:
            rests[b0] = rest
    options: list[Choice] = []
    if "backbone" in starts:
        for b0, rest in rests.items():
            try:
                choice = choose(backbone.residual(A, backbone.quantized(A, b0)), rest, log=log, **kwargs)
            except LplrValueError:  # the backbone leaves the factors not even rank 1
                continue
            scale = math.sqrt(choice.norm2 / plain.norm2) if plain.norm2 > 0 else 1.0
            predicted = choice.predicted * scale
            log(
                f"bits per entry {budget}: backbone {b0} bits, rank {choice.rank}, bits {choice.bits} "
                f"(predicted error {predicted:.4g})"
            )
            options.append(choice._replace(predicted=predicted, backbone_bits=b0, norm2=plain.norm2))
    if "factors" in starts:
        options += _factors_first(A, plain.plan, budget, rests, log=log, **kwargs)
    for choice in options:
        if choice.predicted < best.predicted:
            best = choice
    if best.backbone_bits:
        start = " from the factors" if best.backbone_start == "factors" else ""
        log(
            f"bits per entry {budget}: chose a {best.backbone_bits}-bit backbone{start} with rank {best.rank}, "
            f"bits {best.bits}"
        )
    else:
        log(f"bits per entry {budget}: chose no backbone (rank {best.rank}, bits {best.bits})")
    return best


#: Columns of A that :func:`_factors_first` codes to predict the backbone of the factors' residual.
SAMPLE_COLUMNS = 64


def _factors_first(
    A: da.Array,
    plan: ErrorPlan,
    budget: float,
    rests: dict[int, float],
    *,
    specs: tuple[QuantizerSpec, QuantizerSpec] = PAPER_SPECS,
    grid: Sequence[tuple[int, int]] = BITS_GRID,
    seed: int = 0,
    log: Callable[[str], None] = logs.info,
    **_: Any,
) -> list[Choice]:
    """The factors-first choice of each B0 of ``rests`` (B0 → bits per entry left to the factors).

    The factors are chosen as without a backbone, from A's own ``plan`` (no read), within the
    bits B0 leaves. Their predicted squared error has two parts (:meth:`ErrorPlan.parts`): what
    the span of L̂ leaves of A, and R's rounding noise. Q then codes that residual: the first part
    shrinks by the ratio ``‖E − Q̂_B0(E)‖ / ‖E‖`` measured on :data:`SAMPLE_COLUMNS` columns of A
    (E: their residual after projecting on L̂; Q's ranges are per column of each row chunk, so
    the sampled columns are coded exactly as the store would code them; one read of A), the
    second by that ratio of Gaussian noise (:func:`gaussian_ratio`). The factors fitted again
    to ``A − Q̂`` can only do better than this prediction assumes.
    """
    n, d = A.shape
    chunks = (int(A.chunks[0][0]), int(A.chunks[1][0]))
    firsts: dict[int, tuple[int, tuple[int, int], list[tuple[int, tuple[int, int], float]]]] = {}
    for b0, rest in rests.items():
        fits = _fits((n, d), rest, grid, specs, chunks)
        if fits:
            candidates = _scored(plan, fits)
            k, bits, _predicted = min(candidates, key=lambda c: c[2])
            firsts[b0] = (k, bits, candidates)
    if not firsts or plan.norm2 == 0.0:
        return []
    columns = min(d, SAMPLE_COLUMNS)
    log(f"bits per entry {budget}: the backbone from the factors, on {columns} columns of A (one more read of A)")
    ratios = _residual_ratios(A, plan, {b0: k for b0, (k, _, _) in firsts.items()}, columns, seed)
    out = []
    for b0, (k, bits, candidates) in firsts.items():
        spanned, noise = plan.with_bits(bits).parts(k)
        predicted = math.sqrt(ratios[b0] ** 2 * spanned + gaussian_ratio(b0) ** 2 * noise)
        log(
            f"bits per entry {budget}: backbone {b0} bits from the factors, rank {k}, bits {bits} "
            f"(predicted error {predicted:.4g})"
        )
        out.append(Choice(k, bits, predicted, candidates, plan.norm2, b0, "factors", plan))
    return out


def _residual_ratios(A: da.Array, plan: ErrorPlan, ranks: dict[int, int], columns: int, seed: int) -> dict[int, float]:
    """B0 → ``‖E − Q̂_B0(E)‖ / ‖E‖`` on ``columns`` columns of A drawn with ``seed``, E their
    residual after projecting on the plan's L̂ at rank ``ranks[B0]``."""
    n, d = A.shape
    picked = np.sort(np.random.default_rng(seed).choice(d, columns, replace=False))
    (S,) = compute(
        "budget: columns for the backbone from the factors",
        to_host_blocks(A[:, picked]).astype(np.float64).rechunk({1: -1}),
        persist=True,
    )
    sums = {}
    for k in sorted(set(ranks.values())):
        Q, _ = da.linalg.tsqr(plan.quantized_basis(k))
        Sq = S.rechunk({0: Q.chunks[0]})
        E = (Sq - Q @ (Q.T @ Sq)).rechunk({0: A.chunks[0]})  # Q's ranges are per row chunk of A
        for b0, rank in ranks.items():
            if rank == k:
                sums[b0] = (((E - backbone.quantized(E, b0)) ** 2).sum(), (E**2).sum())
    (done,) = dask.compute(sums)
    return {b0: math.sqrt(err / total) if total > 0 else 0.0 for b0, (err, total) in done.items()}


@functools.cache
def gaussian_ratio(bits: int) -> float:
    """``‖X − Q̂_bits(X)‖ / ‖X‖`` for standard normal X coded as a backbone codes it
    (:func:`lplr_dask.backbone.encode_chunk`, measured on 4096 × 16 draws of seed 0)."""
    X = np.random.default_rng(0).standard_normal((4096, 16))
    codes, step, low = backbone.encode_chunk(X, bits)
    return float(np.linalg.norm(X - backbone.decode_chunk(codes, step, low)) / np.linalg.norm(X))

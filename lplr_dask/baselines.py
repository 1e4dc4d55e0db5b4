"""The paper's comparisons at the same storage: NQ, DSVD, LSVD, and an in-memory LPLR reference.

For A (n×d), rank k and bits (B1, B2) [1]_:

- **NQ**: quantize A directly at ``B_nq`` bits;
- **DSVD**: truncated SVD ``A ≈ U_k Σ_k V_kᵀ``; ``U_k`` at B1 bits, ``Σ_k V_kᵀ`` at B2 bits;
- **LSVD** (the paper's LPLR-SVD): ``Z = U_k Σ_k`` rotated by a k×k Gaussian S,
  ``L = Q_B1(Z·S)``, then ``R = Q_B2(pinv(L)·A)`` as in LPLR;
- **LPLR reference**: :func:`lplr_reference` computes in memory exactly what
  :func:`lplr_dask.compress` computes (the same S, quantizer and least squares), for tests;
- **backbone reference**: :func:`backbone_reference`, ``A ≈ Q + L·R`` with a ``B0``-bit
  quantized backbone ``Q`` and LPLR of the residual, alternated (LQER / CALDERA-like), in
  memory: the measured study of issue 20 (``benchmarks/bench_backbone.py``) before it runs out
  of core.

At the fair rank (:func:`lplr_dask.budget.fair_rank`) the factors take as many bits as NQ.
Every function takes a numpy array; NQ, DSVD and LSVD also take a dask array and then return
lazy dask arrays (DSVD's SVD is :func:`dask.array.linalg.svd_compressed`, persisted). Decoded
values are float64.

References
----------
.. [1] R. Saha, V. Srivastava, M. Pilanci. "Matrix Compression via Randomized Low Rank and Low
   Precision Factorization." NeurIPS 2023. arXiv:2310.11028.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np

from lplr_dask.budget import resolve_rank as resolve_size
from lplr_dask.errors import LplrTypeError, LplrValueError
from lplr_dask.factorize import (
    basis_hessian,
    derived_seed,
    pinv_factor,
    project,
    ranges_to_scales,
    resolve_oversample,
    sketch_rotation,
)
from lplr_dask.factors import Factors, decode_factor, product_error
from lplr_dask.factors import relative_error as factors_error
from lplr_dask.options import SizeRule
from lplr_dask.quantize import (
    Quantized,
    QuantizerSpec,
    check_bits,
    dequantize,
    encode_blocks,
    gptq_factor,
    parse_quantizer,
    quantize,
    quantizer_pair,
)
from lplr_dask.sketch import STREAM_S, sketch_matrix
from lplr_dask.sources import compute_dtype

__all__ = [
    "naive_quantize",
    "dsvd",
    "lsvd",
    "lplr_codes",
    "lplr_reference",
    "backbone_reference",
    "clipped_quantize",
    "chunk_backbone",
    "relative_error",
    "Reference",
]


class Reference(NamedTuple):
    """The in-memory LPLR computation: codes of both factors and what was quantized.

    ``L`` quantizes ``Y = A·S`` (n×k, channel axis 1) with ``spec_l`` and ``R`` quantizes
    ``W = pinv(L̂)·A`` (k×d, channel axis 0) with ``spec_r``.
    """

    L: Quantized
    R: Quantized
    Y: np.ndarray
    W: np.ndarray
    spec_l: QuantizerSpec
    spec_r: QuantizerSpec

    @property
    def spec(self) -> QuantizerSpec:
        """The one quantizer of both factors (kept from before L:R pairs); else an AttributeError."""
        if self.spec_l != self.spec_r:
            raise AttributeError(
                f"This reference quantized L with {self.spec_l.name!r} and R with {self.spec_r.name!r}: "
                "read spec_l and spec_r."
            )
        return self.spec_l

    def decoded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(L̂, R̂)`` in float64."""
        return _decode(self.L, self.spec_l, 1), _decode(self.R, self.spec_r, 0)


def naive_quantize(A: Any, bits: int, *, quantizer: str | QuantizerSpec = "paper", seed: int = 0) -> Any:
    """NQ: quantize A directly at ``bits`` bits and decode it.

    Parameters
    ----------
    A : ndarray or dask array of shape (n, d)
    bits : int
        ``B_nq``, from 1 to 16.
    quantizer : str or QuantizerSpec, default="paper"
        Any name :func:`lplr_dask.quantize.parse_quantizer` reads but ``gptq`` rounding, which
        needs a basis; channels are A's columns.
    seed : int, default=0
        For stochastic rounding only.

    Returns
    -------
    ndarray or dask array of shape (n, d), float64
        The reconstruction (lazy for a dask A).
    """
    X = _as_matrix(A)
    spec = parse_quantizer(quantizer)
    if spec.rounding == "gptq":
        raise LplrValueError(
            f"Expected nearest or stochastic rounding for NQ, which quantizes A itself: gptq rounding "
            f"feeds errors through a basis that A does not have. Got {spec.name!r}; use "
            f"{dataclasses.replace(spec, rounding='nearest').name!r}."
        )
    return _quantize_decode(X, check_bits(bits, "B_nq"), spec, 1, seed)


def dsvd(
    A: Any,
    rank: int,
    bits: tuple[int, int] = (8, 8),
    *,
    quantizer: str | QuantizerSpec = "paper",
    seed: int = 0,
    power_iters: int = 2,
) -> tuple[Any, Any]:
    """DSVD: truncated SVD with quantized factors, ``Q_B1(U_k) · Q_B2(Σ_k V_kᵀ)``.

    Parameters
    ----------
    A : ndarray or dask array of shape (n, d)
    rank : int
        k, from 1 to ``min(n, d)``.
    bits : (int, int), default=(8, 8)
        B1 for ``U_k``, B2 for ``Σ_k V_kᵀ``.
    quantizer : str or QuantizerSpec, default="paper"
        As for :func:`lplr_dask.compress` (``L_NAME:R_NAME`` for ``U_k`` and ``Σ_k V_kᵀ``).
    seed : int, default=0
        For stochastic rounding, and the sketch of the randomized SVD of a dask A.
    power_iters : int, default=2
        Power iterations of :func:`dask.array.linalg.svd_compressed` (dask A only; a numpy A
        gets the exact SVD).

    Returns
    -------
    L_hat : ndarray or dask array of shape (n, k), float64
    R_hat : ndarray or dask array of shape (k, d), float64
    """
    X, k, (b1, b2), (spec_l, spec_r) = _validate(A, rank, bits, quantizer)
    U, s, Vt = _truncated_svd(X, k, seed=seed, power_iters=power_iters)
    L_hat = _quantize_decode(U, b1, spec_l, 1, derived_seed(seed, 1))
    R_hat = _quantize_decode(s[:, None] * Vt, b2, spec_r, 0, derived_seed(seed, 2), basis=L_hat)
    return L_hat, R_hat


def lsvd(
    A: Any,
    rank: int,
    bits: tuple[int, int] = (8, 8),
    *,
    quantizer: str | QuantizerSpec = "paper",
    seed: int = 0,
    power_iters: int = 2,
) -> tuple[Any, Any]:
    """LSVD (the paper's LPLR-SVD): LPLR with the sketch ``A·S`` replaced by ``U_k Σ_k · S``.

    ``S`` is k×k with i.i.d. N(0, 1/k) entries (:data:`lplr_dask.sketch.STREAM_S` of ``seed``);
    then ``L = Q_B1(U_k Σ_k S)``, ``R = Q_B2(pinv(L̂)·A)``.

    Parameters
    ----------
    A : ndarray or dask array of shape (n, d)
    rank, bits, quantizer, seed, power_iters
        As for :func:`dsvd`.

    Returns
    -------
    L_hat : ndarray or dask array of shape (n, k), float64
    R_hat : ndarray or dask array of shape (k, d), float64
    """
    X, k, bits, (spec_l, spec_r) = _validate(A, rank, bits, quantizer)
    U, s, _ = _truncated_svd(X, k, seed=seed, power_iters=power_iters)
    S = sketch_matrix(seed, STREAM_S, k, k, scale=1.0 / math.sqrt(k))
    Z = (U * s) @ S
    if isinstance(X, da.Array):
        (Z,) = dask.persist(Z)
        L_hat = _quantize_decode(Z, bits[0], spec_l, 1, derived_seed(seed, 1))
        (W,) = dask.persist(project(X, pinv_factor(L_hat)))
        return L_hat, _quantize_decode(W, bits[1], spec_r, 0, derived_seed(seed, 2), basis=L_hat)
    return _from_basis(X, Z, bits, (spec_l, spec_r), seed).decoded()


def lplr_codes(
    A: np.ndarray,
    rank: int,
    bits: tuple[int, int] = (8, 8),
    *,
    quantizer: str | QuantizerSpec = "paper",
    seed: int = 0,
    oversample: int | None = None,
) -> Reference:
    """LPLR in memory with exactly the semantics of :func:`lplr_dask.compress` (two passes).

    ``S = sketch_matrix(seed, STREAM_S, d, ℓ, scale=1/sqrt(ℓ))`` with ℓ = k + p columns (p from
    ``oversample`` as compress() resolves it), ``Y = A·S``, with p > 0 ``Y ← Y·M`` (M from
    :func:`lplr_dask.factorize.sketch_rotation` of ``YᵀY``), and ``W = pinv(L̂)·A`` in float64,
    the pseudo-inverse cutting singular values below ``max(n, k)·eps·σ_max`` as :func:`lplr_dask.factorize.pinv_factor` does. With nearest
    rounding the codes equal compress()'s except at exact rounding ties; stochastic rounding
    draws differ (compress() seeds one stream per block). gptq rounding of R feeds its errors
    through ``L̂ᵀ·L̂`` as compress() does: a tie that rounds the other way there moves the codes
    after it in its column of R.

    Parameters
    ----------
    A : ndarray of shape (n, d)
    rank, bits, quantizer, seed, oversample
        As for :func:`lplr_dask.compress`.

    Returns
    -------
    Reference
    """
    if isinstance(A, da.Array):
        raise LplrTypeError(
            "Expected a numpy array for the in-memory reference. Got a dask array; use lplr_dask.compress."
        )
    X, k, bits, specs = _validate(A, rank, bits, quantizer)
    p = resolve_oversample(oversample, k, X.shape)
    S = sketch_matrix(seed, STREAM_S, X.shape[1], k + p, scale=1.0 / math.sqrt(k + p))
    Y = X @ S
    if p:
        Y = Y @ sketch_rotation(Y.T @ Y, k, seed)
    return _from_basis(X, Y, bits, specs, seed)


def lplr_reference(
    A: np.ndarray,
    rank: int,
    bits: tuple[int, int] = (8, 8),
    *,
    quantizer: str | QuantizerSpec = "paper",
    seed: int = 0,
    oversample: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The decoded factors ``(L̂, R̂)`` of :func:`lplr_codes`, float64."""
    return lplr_codes(A, rank, bits, quantizer=quantizer, seed=seed, oversample=oversample).decoded()


def backbone_reference(
    A: np.ndarray,
    backbone_bits: int,
    rank: int,
    bits: tuple[int, int] = (8, 8),
    *,
    iters: int = 1,
    start: str = "backbone",
    backbone_quantizer: str | QuantizerSpec = "channel",
    clip: bool = False,
    quantizer: str | QuantizerSpec = "default",
    seed: int = 0,
    oversample: int | None = None,
    row_chunk: int | None = None,
    keep: str = "best",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``A ≈ Q + L̂·R̂`` in memory: a ``backbone_bits``-bit backbone plus low-rank factors.

    Each round quantizes what the factors leave, ``Q = Q_B0(A − L̂·R̂)``, then factors what the
    backbone leaves, ``(L̂, R̂) = LPLR(A − Q)`` (:func:`lplr_reference`). With ``start="backbone"``
    the first round starts from no factors, ``Q = Q_B0(A)`` (LQER-like for one round; CALDERA
    and LoftQ alternate from there); with ``start="factors"`` from ``L̂·R̂ = LPLR(A)``, which
    suits matrices that are nearly low rank (their quantized A leaves a full-rank residual that
    no rank fits). Neither order lowers the error every round (the quantizer is not a
    projection): the round with the lowest ``‖A − Q − L̂·R̂‖_F`` is returned.

    Parameters
    ----------
    A : ndarray of shape (n, d)
    backbone_bits : int
        ``B0``, 1 to 16.
    rank, bits, quantizer, seed, oversample
        Of the factors, as for :func:`lplr_reference`; the seed is the same every round.
    iters : int, default=1
        Rounds ``T``.
    start : {"backbone", "factors"}, default="backbone"
        What the first round starts from.
    backbone_quantizer : str or QuantizerSpec, default="channel"
        Of ``Q`` (channels are A's columns): nearest or stochastic rounding, as for
        :func:`naive_quantize`.
    clip : bool, default=False
        Instead, quantize ``Q`` per column with a clipped range (:func:`clipped_quantize`): the
        min–max range of a heavy-tailed column wastes low-bit levels on its extremes. For this
        study only: no store quantizer does this yet.
    row_chunk : int, optional
        Instead, quantize ``Q`` as ``compress(..., backbone_bits=B0)`` stores it: a min–max range
        per column of each block of ``row_chunk`` rows (A's row chunks), scales rounded to
        float32, nearest rounding (:func:`chunk_backbone`).
    keep : {"best", "last"}, default="best"
        Return the round of lowest error, or the last round (as ``compress`` does: it keeps
        only one round's arrays).

    Returns
    -------
    (Q, L̂, R̂) : ndarrays, float64
        The decoded backbone (n × d) and factors (n × k, k × d) of the best round.

    Raises
    ------
    LplrValueError
        For ``iters`` below 1, an unknown ``start``, or what :func:`naive_quantize` and
        :func:`lplr_reference` refuse.
    """
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise LplrValueError(f"Expected iters, the rounds of the backbone, an integer >= 1. Got {iters!r}.")
    if start not in ("backbone", "factors"):
        raise LplrValueError(f"Expected start 'backbone' or 'factors'. Got {start!r}.")
    if keep not in ("best", "last"):
        raise LplrValueError(f"Expected keep 'best' or 'last'. Got {keep!r}.")
    X = _as_matrix(A)
    if isinstance(X, da.Array):
        raise LplrTypeError("Expected a numpy array for the in-memory reference. Got a dask array.")

    def factors(B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return lplr_reference(B, rank, bits, quantizer=quantizer, seed=seed, oversample=oversample)

    if start == "factors":
        L, R = factors(X)
        low_rank = L @ R
    else:
        low_rank = np.zeros_like(X)
    best: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None = None
    for _ in range(int(iters)):
        if row_chunk is not None:
            Q = chunk_backbone(X - low_rank, backbone_bits, row_chunk)
        elif clip:
            Q = clipped_quantize(X - low_rank, backbone_bits)
        else:
            Q = naive_quantize(X - low_rank, backbone_bits, quantizer=backbone_quantizer, seed=seed)
        L, R = factors(X - Q)
        low_rank = L @ R
        error = float(np.linalg.norm(X - Q - low_rank))
        if best is None or error < best[0] or keep == "last":
            best = (error, Q, L, R)
    assert best is not None  # iters >= 1
    return best[1], best[2], best[3]


def chunk_backbone(X: np.ndarray, bits: int, row_chunk: int) -> np.ndarray:
    """``X`` quantized as a store's backbone: per column of each block of ``row_chunk`` rows, the
    clipped range of least squared error (:data:`CLIP_GRID`, as :func:`clipped_quantize`) with
    its step and low end rounded to float32 before the codes are chosen, nearest rounding.

    Written out here apart from :mod:`lplr_dask.backbone` (the reference a test holds it to).
    """
    out = np.empty(X.shape, dtype=np.float64)
    levels = (1 << bits) - 1
    for r0 in range(0, X.shape[0], row_chunk):
        x = np.asarray(X[r0 : r0 + row_chunk], dtype=np.float64)
        lo, hi = x.min(axis=0, keepdims=True), x.max(axis=0, keepdims=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        best = np.full(lo.shape, np.inf)
        for shrink in CLIP_GRID:
            low = (mid - shrink * half).astype(np.float32).astype(np.float64)
            step = np.where(half > 0, 2 * shrink * half / levels, 1.0).astype(np.float32).astype(np.float64)
            step[step == 0] = 1.0
            y = low + np.clip(np.rint((x - low) / step), 0, levels) * step
            err = ((x - y) ** 2).sum(axis=0, keepdims=True)
            better = (err < best)[0]
            out[r0 : r0 + row_chunk][:, better] = y[:, better]
            best = np.where(err < best, err, best)
    return out


#: Shrink factors of a column's min–max half-range that :func:`clipped_quantize` tries.
CLIP_GRID = np.linspace(1.0, 0.2, 17)


def clipped_quantize(X: np.ndarray, bits: int) -> np.ndarray:
    """``X`` quantized per column at ``bits`` bits with the clipped range of least squared error.

    Each column's range is its min–max range shrunk about its centre by the factor of
    :data:`CLIP_GRID` that gives the column the least squared error; values outside are clipped
    to the end levels (the range search of AWQ and GPTQ implementations). Two float32 per
    column, as ``channel``. Decoded, float64.
    """
    X = np.asarray(X, dtype=np.float64)
    levels = (1 << check_bits(bits, "B0")) - 1
    lo, hi = X.min(axis=0), X.max(axis=0)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = np.full(X.shape[1], np.inf)
    out = np.empty_like(X)
    for shrink in CLIP_GRID:
        low = mid - shrink * half
        step = np.where(half > 0, 2 * shrink * half / levels, 1.0)
        Y = low + np.clip(np.rint((X - low) / step), 0, levels) * step
        err = ((X - Y) ** 2).sum(axis=0)
        better = err < best
        out[:, better], best[better] = Y[:, better], err[better]
    return out


def relative_error(A: Any, approx_or_factors: Any) -> float:
    """``‖A − Â‖_F / ‖A‖_F`` (``‖Â‖_F`` for a zero A).

    Parameters
    ----------
    A : ndarray or dask array of shape (n, d)
    approx_or_factors : array, (L, R) pair, or Factors
        The reconstruction Â, or factors with ``Â = L·R`` (never formed whole when A or a factor
        is a dask array: streamed in one read of A).
    """
    if isinstance(approx_or_factors, Factors):
        return factors_error(_as_dask(A), approx_or_factors)
    if isinstance(approx_or_factors, tuple):
        L, R = approx_or_factors
        if any(isinstance(x, da.Array) for x in (A, L, R)):
            return product_error(_as_dask(A), da.asarray(L), da.asarray(R), label="relative error")
        approx = np.asarray(L) @ np.asarray(R)
    else:
        approx = approx_or_factors
    if isinstance(A, da.Array) or isinstance(approx, da.Array):
        A64 = da.asarray(A).astype(np.float64)
        num, den = dask.compute(((A64 - approx) ** 2).sum(), (A64**2).sum())
    else:
        A64 = np.asarray(A, dtype=np.float64)
        num, den = ((A64 - approx) ** 2).sum(), (A64**2).sum()
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


# ---------------------------------------------------------------------------------------------


def _from_basis(
    A: np.ndarray, Y: np.ndarray, bits: tuple[int, int], specs: tuple[QuantizerSpec, QuantizerSpec], seed: int
) -> Reference:
    """``L = Q_B1(Y)``, ``R = Q_B2(pinv(L̂)·A)`` in memory."""
    n, k = Y.shape
    spec_l, spec_r = specs
    qL = quantize(Y, bits[0], spec=spec_l, channel_axis=1, seed=derived_seed(seed, 1))
    L_hat = _decode(qL, spec_l, 1)
    W = np.linalg.pinv(L_hat, rtol=max(n, k) * np.finfo(np.float64).eps) @ A
    hessian = L_hat.T @ L_hat if spec_r.rounding == "gptq" else None
    qR = quantize(W, bits[1], spec=spec_r, channel_axis=0, seed=derived_seed(seed, 2), hessian=hessian)
    return Reference(qL, qR, Y, W, spec_l, spec_r)


def _decode(q: Quantized, spec: QuantizerSpec, channel_axis: int) -> np.ndarray:
    g = spec.group_size if spec.granularity == "group" else 0
    return dequantize(q, dtype=np.float64, group_size=g, channel_axis=channel_axis)


def _quantize_decode(X: Any, bits: int, spec: QuantizerSpec, channel_axis: int, seed: int, basis: Any = None) -> Any:
    """``Q_B(X)`` decoded to float64; for a dask X the scales are computed first, so that A is
    read once for them and once for the codes rather than held in memory between the two.

    ``basis`` (the decoded L̂ that multiplies X) is used by gptq rounding only."""
    gptq = spec.rounding == "gptq"
    if not isinstance(X, da.Array):
        hessian = basis.T @ basis if gptq else None
        q = quantize(X, bits, spec=spec, channel_axis=channel_axis, seed=seed, hessian=hessian)
        return _decode(q, spec, channel_axis)
    scale, offset = dask.compute(*ranges_to_scales(X, bits, spec, channel_axis))
    factor = gptq_factor(basis_hessian(basis).compute()) if gptq else None
    codes = encode_blocks(X, bits, spec, scale, offset, channel_axis=channel_axis, seed=seed, factor=factor)
    return decode_factor(codes, scale, offset, spec, channel_axis)


def _truncated_svd(X: Any, k: int, *, seed: int, power_iters: int) -> tuple[Any, Any, Any]:
    """``U_k, σ_k, V_kᵀ``: exact for numpy; randomized and persisted for dask."""
    if isinstance(X, da.Array):
        usv = da.linalg.svd_compressed(X, k, n_power_iter=power_iters, seed=seed, compute=True)
        return dask.persist(*usv)
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    return U[:, :k], s[:k], Vt[:k]


def _as_matrix(A: Any) -> Any:
    """A as a float64 numpy or dask matrix, validated."""
    if not isinstance(A, da.Array):
        A = np.asarray(A)
    if A.ndim != 2:
        raise LplrValueError(f"Expected a 2-D matrix. Got an array of shape {A.shape} instead.")
    compute_dtype(A.dtype)
    return A.astype(np.float64)


def _as_dask(A: Any) -> da.Array:
    return A if isinstance(A, da.Array) else da.from_array(np.asarray(A), chunks="auto")


def _validate(
    A: Any, rank: int, bits: tuple[int, int], quantizer: str | QuantizerSpec
) -> tuple[Any, int, tuple[int, int], tuple[QuantizerSpec, QuantizerSpec]]:
    """A as float64, the rank, (B1, B2) and the quantizers of L and R, each checked."""
    X = _as_matrix(A)
    k = resolve_size(X.shape, (1, 1), SizeRule.from_args(rank=rank))
    return X, k, (check_bits(bits[0], "B1"), check_bits(bits[1], "B2")), quantizer_pair(quantizer)

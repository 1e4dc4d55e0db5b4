"""The smallest factorization whose relative error meets a target: ``--target-error E``.

At the given bits (B1, B2) the storage ``k·(n·B1 + d·B2)`` grows with the rank, so the smallest
storage is the smallest rank k whose error is at most E. It is found from one extra read of A:

1. **The sketch spectrum.** ``Y = A·Ω`` (n × (k_max + p) with the compression's oversampling p,
   Gaussian, with the same power iterations as the compression) and the test columns ``A·G`` (the
   same G as the free error estimate), in one read (the compression's own pass 1 at rank k_max),
   kept on the workers. A TSQR ``Y = Q·T`` gives nested bases: ``Q[:, :j]`` spans the first j
   sketch columns. With ``c = Qᵀ·A·G`` the residual of that span at *every* j is
   ``tail²(j) = (‖A·G‖² − Σ_{i<j} ‖c_i‖²) / (t·‖A‖²_F)`` (t test columns; the free estimate's
   normalization). The rank-k basis lies in the span of its k + p sketch columns, so
   ``tail²(k + p)`` bounds its error from below, which rules out the ranks below the first that
   could meet E.
2. **The error at one rank** is predicted without reading A: make the rank-k basis from the first
   k + p sketch columns as the compression does (:func:`lplr_dask.factorize.truncate_sketch`, with
   the leading block of the sketch's Gram matrix), quantize it as the compression quantizes its
   basis (``L̂``), project the test columns on ``L̂`` (the least-squares
   residual, L's rounding included) and add R's rounding noise: variance ``Δ_c²/12`` (``Δ_c²/6``
   stochastic) per entry of row c of ``W = pinv(L̂)·A``, with ``Δ_c = range_c / (2^B2 − 1)`` and
   ``range_c ≈ 2·E[max of m normals]·rms_c`` for m entries sharing a scale; ``rms_c`` comes from
   ``pinv(L̂)·A·G``, and the noise reaches ``L̂·R`` weighted by ``‖L̂_c‖²`` — with gptq rounding
   of R by ``1/U_cc²`` instead (``U`` from :func:`lplr_dask.quantize.gptq_factor` of ``L̂ᵀL̂``:
   the error that row c adds after the feedback of the rows before it; Chee et al. 2023, LDLQ).
3. **Search.** From the first rank the tail allows, the rank grows by a quarter until the
   prediction meets E (with a margin), then a bisection finds the smallest such rank. Quantization
   noise grows with the rank once the basis becomes ill-conditioned, so past the best rank more
   rank does not help: then E is out of reach at these bits.
4. **Check.** The chosen rank is compressed and its free error estimate (the same test columns)
   compared with E. If it is above, the search runs again above that rank against a target lowered
   by the ratio of measured to predicted error, at most a few times.

The result records the target, the achieved estimate and every attempt in the attrs
(``target_error``). When E is out of reach at every rank up to ``max_rank`` (at these bits), a
:class:`LplrValueError` says how close the best rank gets and what to change.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np

from lplr_dask import backbone, blocks, chunking, guard, logs, store
from lplr_dask.backend import to_host, to_host_blocks
from lplr_dask.errors import LplrValueError
from lplr_dask.factorize import Params, pass1, power_iterate, quantize_basis, resolve_oversample, truncate_sketch
from lplr_dask.factors import Factors, decode_factor, open_factors
from lplr_dask.job import cluster_client, compress_at_rank, open_matrix
from lplr_dask.options import Options, SizeRule, configured_max_rank
from lplr_dask.progress import compute
from lplr_dask.quantize import QuantizerSpec, gptq_factor

__all__ = ["ErrorPlan", "Plan", "compress_to_target", "meet_target", "DEFAULT_MAX_RANK", "MAX_ATTEMPTS"]

#: The largest rank the sketch spectrum covers by default (Y is n × (max_rank + p) float64 on the
#: workers, p the oversampling: 2·max_rank columns by default).
DEFAULT_MAX_RANK = 512
#: Compressions tried before giving up.
MAX_ATTEMPTS = 3
#: The search aims this far below the target, for the noise of the estimates.
MARGIN = 0.95
#: Test columns at least: the estimate decides, so it gets more columns than a plain compression's.
MIN_TEST_COLUMNS = 32
#: One-pass mode's error relative to two passes (Tropp et al. 2017: ×1.1–1.2).
ONE_PASS_FACTOR = 1.2


def _spread(m: int) -> float:
    """``range / rms`` of m Gaussian samples: twice the expected maximum of m standard normals."""
    if m < 3:
        return 2.0 * 0.5642 if m == 2 else 0.0  # E[max of 2] = 1/sqrt(pi)
    a = math.sqrt(2.0 * math.log(m))
    return 2.0 * (a - (math.log(math.log(m)) + math.log(4 * math.pi)) / (2 * a))


class ErrorPlan:
    """Predicted relative errors of LPLR at any rank up to ``max_rank``, from a measured sketch.

    Made by :meth:`measure` (one read of A); the constructor only holds what was measured.

    Parameters
    ----------
    Y, AG : dask arrays
        The sketch (n × (max_rank + p)) and the test columns (n × t), on the host, persisted.
    gram : ndarray
        ``YᵀY``.
    tail2 : ndarray of shape (sketch columns + 1,)
        ``tail2[j]``: the squared relative residual of the span of the first j sketch columns.
    norm2, ag2 : float
        ``t·‖A‖²_F`` and ``‖A·G‖²``.
    params : lplr_dask.factorize.Params
        The sketch's parameters (at rank = its columns); its bits are the ones predicted for.
    shape : (int, int)
    max_rank : int
    oversample : int or None
    passes : {1, 2}

    Attributes
    ----------
    tail2 : ndarray
    """

    def __init__(
        self,
        *,
        Y: da.Array,
        AG: da.Array,
        gram: np.ndarray,
        tail2: np.ndarray,
        norm2: float,
        ag2: float,
        params: Params,
        shape: tuple[int, int],
        max_rank: int,
        oversample: int | None,
        passes: int,
    ):
        self.Y, self.AG, self._gram, self.tail2, self.norm2, self.ag2 = Y, AG, gram, tail2, norm2, ag2
        self._params, self.shape, self.kmax, self.oversample, self.passes = params, shape, max_rank, oversample, passes
        self.bits, self.spec, self.spec_r, self.seed, self.d = (
            params.bits,
            params.spec_l,
            params.spec_r,
            params.seed,
            shape[1],
        )
        self._cache: dict[int, tuple[float, float]] = {}

    @classmethod
    def measure(
        cls,
        A: da.Array,
        *,
        bits: tuple[int, int],
        spec: QuantizerSpec,
        spec_r: QuantizerSpec | None = None,
        seed: int = 0,
        test_columns: int = 10,
        power_iters: int = 0,
        passes: int = 2,
        max_rank: int = DEFAULT_MAX_RANK,
        oversample: int | None = None,
        strips: blocks.Strips | None = None,
    ) -> ErrorPlan:
        """The plan of A, from the compression's own pass 1 at rank ``max_rank`` (one read of A).

        Parameters
        ----------
        A : dask array of shape (n, d)
        bits : (int, int)
        spec : QuantizerSpec
            The quantizer of L, and of R unless ``spec_r`` is given.
        spec_r : QuantizerSpec, optional
            The quantizer of R.
        seed, test_columns, power_iters, passes
            As for :func:`lplr_dask.compress`: the test columns are the same as the compression's.
        max_rank : int, default=DEFAULT_MAX_RANK
            The largest rank considered (capped at ``min(n, d)`` and at the Dask config
            ``lplr.max-rank``, :func:`lplr_dask.options.configured_max_rank`).
        oversample : int, optional
            As for :func:`lplr_dask.compress`: the sketch has ``max_rank`` plus that many columns, and
            the rank-k basis is made from the top k directions of its first k + p.
        strips : lplr_dask.blocks.Strips, optional
            Read A by row strips through a reader of its source (:func:`lplr_dask.chunking.strips`).
        """
        n, d = A.shape
        kmax = int(min(n, d, max_rank, configured_max_rank()))
        width = kmax + resolve_oversample(oversample, kmax, (n, d))  # columns of the sketch
        params = Params(
            rank=width,
            bits=bits,
            quantizer=spec.name,
            spec_l=spec,
            spec_r=spec_r or spec,
            seed=seed,
            test_columns=test_columns,
        )
        products = pass1(A, params, strips=strips)  # the compression's own first read, at rank max_rank
        Y, AG, sumsq = compute(
            "target: sketch spectrum",
            products["Y"],
            products["AG"],
            products["sumsq"],
            persist=True,
            chunks_of=blocks.reads(A, strips),
        )
        if power_iters:
            Y = power_iterate(A, Y, power_iters, compute, strips=strips)
        tall = blocks.qr_chunks(n, width, Y.chunks[0][0])  # no TSQR cliff (blocks.qr_chunks)
        # the rest works on the thin sketches only: on the host, whatever device A is on
        Y, AG = (to_host_blocks(X).rechunk({0: tall, 1: -1}) for X in (Y, AG))
        Y, AG = compute("target: sketch spectrum", Y, AG, persist=True)
        Q, _ = da.linalg.tsqr(Y)
        c, ag2, sumsq = dask.compute(Q.T @ AG, (AG**2).sum(), sumsq)
        # errors relative to ‖A‖_F as the free estimate has them: ‖(A − A_k)·G‖² / (t·‖A‖²_F)
        norm2 = float(to_host(sumsq)) * test_columns
        captured = np.concatenate([[0.0], np.cumsum((c**2).sum(axis=1))])
        tail2 = np.clip((float(ag2) - captured) / norm2, 0.0, None) if norm2 > 0 else np.zeros(width + 1)
        (gram,) = dask.compute(Y.T @ Y)
        return cls(
            Y=Y,
            AG=AG,
            gram=gram,
            tail2=tail2,
            norm2=norm2,
            ag2=float(ag2),
            params=params,
            shape=(n, d),
            max_rank=kmax,
            oversample=oversample,
            passes=passes,
        )

    def with_bits(self, bits: tuple[int, int]) -> ErrorPlan:
        """The same sketch spectrum predicting for other bits (B1, B2): no read of A."""
        other = copy.copy(self)
        other.bits, other._params, other._cache = bits, dataclasses.replace(self._params, bits=bits), {}
        return other

    @property
    def max_rank(self) -> int:
        return self.kmax

    def columns(self, k: int) -> int:
        """Sketch columns ℓ behind the rank-k basis: k plus the oversampling, as far as the plan's
        sketch reaches (beyond, the prediction is for a less oversampled basis: pessimistic)."""
        return min(k + resolve_oversample(self.oversample, k, self.shape), len(self.tail2) - 1)

    def basis(self, k: int) -> da.Array:
        """The unquantized rank-k basis as the compression makes it, from the plan's sketch."""
        ell = self.columns(k)
        p = dataclasses.replace(self._params, rank=k, range_oversample=ell - k)
        return truncate_sketch(self.Y[:, :ell], p, gram=self._gram[:ell, :ell])

    def _low_rank_factor(self) -> float:
        return ONE_PASS_FACTOR if self.passes == 1 else 1.0

    def quantized_basis(self, k: int) -> da.Array:
        """L̂ at rank k: :meth:`basis` rounded as the compression rounds it, decoded (n × k)."""
        q = quantize_basis(self.basis(k), dataclasses.replace(self._params, rank=k))
        return decode_factor(q.codes, q.scale, q.offset, self.spec, channel_axis=1)

    def estimate(self, k: int) -> float:
        """The predicted relative error of LPLR at rank k (see the module docstring, step 2)."""
        return math.sqrt(sum(self.parts(k)))

    def parts(self, k: int) -> tuple[float, float]:
        """The squared relative error :meth:`estimate` predicts at rank k, in its two parts: what
        the span of L̂ leaves of A, and R's rounding noise."""
        if k in self._cache:
            return self._cache[k]
        if self.norm2 == 0.0:
            return (0.0, 0.0)
        Q, T = da.linalg.tsqr(self.quantized_basis(k))
        c, T = dask.compute(Q.T @ self.AG, T)
        resid2 = max(self.ag2 - float((c**2).sum()), 0.0) * self._low_rank_factor() ** 2
        l2 = (T**2).sum(axis=0)  # ‖L̂_c‖²
        if self.spec_r.rounding == "gptq":  # what each row's error costs after the feedback
            l2 = 1.0 / np.diag(gptq_factor(T.T @ T)) ** 2
        w2 = (np.linalg.pinv(T) @ c) ** 2  # (pinv(L̂)·A·G)², each row: ‖W_c‖² · (one per test column)
        w2 = w2.sum(axis=1)
        spec = self.spec_r
        levels = (1 << self.bits[1]) - 1
        variance = 1 / 6 if spec.rounding == "stochastic" else 1 / 12
        if spec.granularity == "group":
            spread = _spread(spec.group_size)
        else:
            spread = _spread(self.d)
        if spec.granularity == "tensor":  # one step for the whole factor, set by its widest row
            noise = float(l2.sum() * w2.max())
        else:
            noise = float(l2 @ w2)
        noise *= variance * (spread / levels) ** 2
        self._cache[k] = (resid2 / self.norm2, noise / self.norm2)
        return self._cache[k]

    def first(self, target: float) -> int | None:
        """The smallest rank whose unquantized residual could be below ``target``, or None.

        The rank-k basis lies in the span of its ℓ sketch columns, so ``tail2[ℓ]`` bounds its
        residual from below.
        """
        bound = np.array([self.tail2[self.columns(k)] for k in range(1, self.max_rank + 1)])
        ok = np.flatnonzero(np.sqrt(bound) * self._low_rank_factor() <= target)
        return int(ok[0]) + 1 if ok.size else None

    def search(self, target: float, above: int = 0) -> tuple[int | None, int, float]:
        """The smallest rank above ``above`` predicted to meet ``target``.

        Returns
        -------
        (rank or None, best rank seen, its predicted error)
        """
        lo = self.first(target)
        if lo is None:
            k = self.max_rank
            return None, k, self.estimate(k)
        k = max(lo, above + 1)
        if k > self.max_rank:
            return None, self.max_rank, self.estimate(self.max_rank)
        bad, seen = k - 1, {}
        while True:
            seen[k] = self.estimate(k)
            if seen[k] <= target:
                break
            bad = k
            worse = len(seen) >= 3 and seen[k] > min(seen.values()) * 1.05
            if k == self.max_rank or worse:  # past the best rank: quantization noise dominates
                best = min(seen, key=seen.__getitem__)
                return None, best, seen[best]
            k = min(self.max_rank, max(k + 1, math.ceil(k * 1.25)))
        good = k
        while good - bad > 1:
            mid = (good + bad) // 2
            if self.estimate(mid) <= target:
                good = mid
            else:
                bad = mid
        return good, good, self.estimate(good)


def Plan(A: da.Array, **kwargs: Any) -> ErrorPlan:
    """:meth:`ErrorPlan.measure` of A: the name before issue 17 (a class whose constructor read A)."""
    return ErrorPlan.measure(A, **kwargs)


def compress_to_target(
    source: Any,
    out: str | os.PathLike[str],
    target: float,
    *,
    bits: tuple[int, int] = (8, 8),
    quantizer: str = "default",
    seed: int = 0,
    passes: int = 2,
    power_iters: int = 0,
    oversample: int | None = None,
    test_columns: int = 10,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "cpu",
    max_rank: int = DEFAULT_MAX_RANK,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = logs.info,
) -> Factors:
    """Compress at the smallest rank whose estimated relative error is at most ``target``.

    Parameters
    ----------
    source, out
        As for :func:`lplr_dask.compress`.
    target : float
        The relative Frobenius error to meet, in (0, 1).
    bits, quantizer, seed, passes, power_iters, oversample, overwrite, device, storage_options
        As for :func:`lplr_dask.compress`.
    test_columns : int, default=10
        Raised to at least :data:`MIN_TEST_COLUMNS`: the error estimate decides here.
    resume : bool, default=False
        Keep a completed output made for the same target; anything else is redone.
    max_rank : int, default=DEFAULT_MAX_RANK
        The largest rank considered; never above the Dask config ``lplr.max-rank``
        (:func:`lplr_dask.options.configured_max_rank`).
    log : callable, default=lplr_dask.logs.info
        Receives the ranks tried.

    Returns
    -------
    Factors
        Whose attrs ``target_error`` hold ``target``, the ``achieved`` estimate, the ``predicted``
        error of the plan and the ``attempts`` (rank, estimate).

    Raises
    ------
    LplrValueError
        If ``target`` is not in (0, 1), or no rank up to ``max_rank`` reaches it at these bits
        (the message gives the best estimate and what to change). Nothing is left at ``out``.
    """
    size = SizeRule("target_error", target)
    guard.check_output(out, [source], overwrite=overwrite, storage_options=storage_options)
    options = Options(
        bits=bits,
        quantizer=quantizer,
        seed=seed,
        passes=passes,
        power_iters=power_iters,
        oversample=oversample,
        test_columns=test_columns,
        device=device,
        storage_options=storage_options,
    )
    with cluster_client(log, device) as client:  # as compress: the current client, or a local cluster
        return meet_target(
            source,
            out,
            size.value,
            options,
            client=client,
            overwrite=overwrite,
            resume=resume,
            max_rank=max_rank,
            log=log,
        )


def meet_target(
    source: Any,
    out: str | os.PathLike[str],
    target: float,
    options: Options,
    *,
    client: Any,
    overwrite: bool = False,
    resume: bool = False,
    max_rank: int = DEFAULT_MAX_RANK,
    log: Callable[[str], None] = logs.info,
) -> Factors:
    """:func:`compress_to_target`'s body, for validated arguments (``options``, ``target`` in (0, 1)).

    ``client`` is the cluster's client (or None) that :func:`lplr_dask.job.compress_at_rank` gets.
    """
    path = os.fspath(out)
    storage_options = options.storage_options
    if resume and store.exists(path, storage_options):
        try:
            done = open_factors(path, storage_options=storage_options)
            if done.attrs.get("target_error", {}).get("target") == target:
                log(f"{path}: already complete for target error {target}; nothing to do")
                return done
        except LplrValueError:
            pass
        log(f"{path}: not a completed result for target error {target}; starting over")
        overwrite = True
    options = options.replace(test_columns=max(options.test_columns, MIN_TEST_COLUMNS))
    src, A = open_matrix(source, options, log=log)
    spec, spec_r = options.specs
    planned, scale, strips = A, 1.0, chunking.strips(A, src)
    if options.backbone_bits and options.backbone_start != "factors":
        planned, scale = _backbone_residual(A, options.backbone_bits, log)
        strips = None
    p = ErrorPlan.measure(
        planned,
        bits=options.bits,
        spec=spec,
        spec_r=spec_r,
        seed=options.seed,
        test_columns=options.test_columns,
        power_iters=options.power_iters,
        passes=options.passes,
        max_rank=max_rank,
        oversample=options.oversample,
        strips=strips,
    )
    aim, above = target * MARGIN, 0
    attempts: list[dict[str, Any]] = []
    for _ in range(MAX_ATTEMPTS):
        k, kbest, ebest = p.search(aim / scale, above)
        ebest *= scale
        if k is None:
            break
        predicted = p.estimate(k) * scale
        log(f"target error {target}: trying rank {k} (predicted error {predicted:.4g})")
        factors = compress_at_rank(
            source, path, k, options, client=client, overwrite=overwrite or bool(attempts), log=log
        )
        estimate = float(factors.attrs["error_estimate"])
        attempts.append({"rank": k, "predicted": predicted, "estimate": estimate})
        if estimate <= target:
            return _record(factors, target, attempts, storage_options)
        aim *= predicted / estimate  # the prediction was optimistic by this much
        above = k
    if attempts:
        store.remove(path, storage_options)  # the last attempt missed the target
        best = min(attempts, key=lambda a: a["estimate"])
        kbest, ebest, how = best["rank"], best["estimate"], "measured"
    else:
        how = "predicted"
    raise LplrValueError(
        f"Target error {target} is out of reach at bits {tuple(options.bits)} for ranks up to {p.max_rank}: "
        f"the best {how} error estimate is {ebest:.4g} (rank {kbest}). Raise --bits (quantization "
        "limits the error), allow a larger target, or use --rank directly."
    )


def _backbone_residual(A: da.Array, bits: int, log: Callable[[str], None]) -> tuple[da.Array, float]:
    """What the factors of a backbone-first compression see, ``A − Q̂_B0(A)`` (formed chunk by
    chunk, nothing written), and ``‖A − Q̂‖ / ‖A‖``: the plan of the residual predicts errors
    relative to its own norm, the target is relative to A's. One read of A."""
    R = backbone.residual(A, backbone.quantized(A, bits))
    a2, r2 = (float(to_host(x)) for x in compute("target: backbone residual", (A**2).sum(), (R**2).sum(), chunks_of=A))
    scale = math.sqrt(r2 / a2) if a2 > 0 else 1.0
    log(f"target error: a {bits}-bit backbone leaves {scale:.4g} of A's norm to the factors")
    return R, scale


def _record(
    factors: Factors, target: float, attempts: list[dict[str, Any]], storage_options: dict[str, Any] | None
) -> Factors:
    """Store the target and the attempts in the attrs; return the reopened factors."""
    group = store.open_group(factors.path, mode="r+", storage_options=storage_options)
    meta = store.read_meta(group, path=factors.path)
    meta["target_error"] = {
        "target": target,
        "achieved": attempts[-1]["estimate"],
        "predicted": attempts[-1]["predicted"],
        "attempts": attempts,
    }
    store.write_meta(group, meta)
    return open_factors(factors.path, storage_options=storage_options)

"""The LPLR passes over a chunked matrix: sketch, quantize the basis, project, quantize.

For A (n×d), rank k and bits (B1, B2) [1]_:

1. pass 1: ``Y = A·S`` (S d×(k+p), i.i.d. N(0, 1/(k+p)), generated block-wise; p extra columns,
   the range oversampling, 0 in the paper); in the same read, and
   the same task per chunk of A, the test columns ``A·G`` and ``‖A‖_F`` for the error estimate
   and, in one-pass mode, ``Z = Ψ·A`` [2]_ with Ψ (ℓ×n) a sparse sign map [3]_;
   optional power iterations ``Y ← A·orth(Aᵀ·orth(Y))``, two reads each;
2. central: with p > 0, Y's top-k directions, mixed by a seeded orthogonal k×k matrix
   (:func:`truncate_sketch`); ``L = Q_B1(Y)``, codes written to ``L/``; ``pinv(L)`` from a
   TSQR of the decoded L (row blocks of at least 2k rows) and one SVD of its k×k factor, in
   float64; pass 1 writes each row strip whole with a completion mark (its resume points);
3. pass 2: ``W[:, j] = pinv(L)·A[:, j]`` per column chunk j (one-pass: ``W = (Ψ·L)^† Z``),
   written whole-chunk to scratch with a per-chunk completion mark (the resume points);
4. ``R = Q_B2(W)`` from the scratch (k×d: k/n of A), codes to ``R/``; with ``gptq`` rounding
   each rounding error is fed back through ``H = L̂ᵀ·L̂`` [4]_;
5. the error estimate ``‖AG − L·(R·G)‖ / (√p·‖A‖_F)`` from the stored test columns and the
   Frobenius norm summed in pass 1: no extra read.

The functions here take and return dask arrays; :func:`run` drives them against a store through
the table :data:`STAGES` of named stages (:func:`sketch_and_code_basis`, :func:`project_onto_basis`,
:func:`code_r`, :func:`estimate_and_finish`), each resumable: after each, the attrs' ``stage``
says it is done, and a resumed job starts at the next. What a later stage reuses (Y, AG, Z,
``pinv(L)ᵀ``, W) goes to scratch arrays in the output store (:data:`lplr_dask.store.SCRATCH`), not
to worker memory, so a worker holds chunks and their products only: its memory is set by the chunk
shape, its threads and the rank, not by n or d (``tests/test_memory.py``). Power iterations are
the exception: they persist their n×k and d×k iterates on the workers.

References
----------
.. [1] R. Saha, V. Srivastava, M. Pilanci. "Matrix Compression via Randomized Low Rank and Low
   Precision Factorization." NeurIPS 2023.
.. [2] J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. "Practical sketching algorithms for
   low-rank matrix approximation." SIAM J. Matrix Anal. Appl. 38(4), 2017.
.. [3] J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. "Streaming low-rank matrix approximation
   with an application to scientific simulation." SIAM J. Sci. Comput. 41(4), 2019.
.. [4] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh. "GPTQ: Accurate Post-Training
   Quantization for Generative Pre-trained Transformers." ICLR 2023.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any, cast

import dask
import dask.array as da
import dask.utils
import numpy as np
import zarr
from zarr.abc.store import Store

from lplr_dask import backbone, blocks, store
from lplr_dask.backend import array_namespace, device_of, like, to_host, to_host_blocks
from lplr_dask.errors import LplrValueError
from lplr_dask.lanes import LANES
from lplr_dask.progress import compute, in_process
from lplr_dask.quantize import (
    Quantized,
    QuantizerSpec,
    block_scales,
    decode_block,
    encode_blocks,
    gptq_factor,
    ranges,
    scale_from_range,
)
from lplr_dask.sketch import SKETCH_BLOCK, SPARSE_NNZ, STREAM_G, STREAM_PSI, STREAM_S

__all__ = [
    "Params",
    "pass1",
    "pass1_part",
    "truncate_sketch",
    "pinv_factor",
    "host_pinv_factor",
    "project",
    "error_estimate",
    "decode_factor",
    "derived_seed",
    "StageContext",
    "Stage",
    "STAGES",
    "STAGE_NAMES",
    "sketch_and_code_basis",
    "project_onto_basis",
    "code_r",
    "estimate_and_finish",
    "run",
    "basis_hessian",
    "ranges_to_scales",
    "resolve_oversample",
    "check_oversample",
    "sketch_rotation",
    "power_iterate",
    "quantize_basis",
    "orth",
    "one_pass_projector",
    "stages_after",
]

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Params:
    """Everything that determines the codes (stored in the attrs; ``--resume`` checks it)."""

    rank: int
    bits: tuple[int, int]
    quantizer: str
    spec_l: QuantizerSpec
    spec_r: QuantizerSpec
    seed: int = 0
    passes: int = 2
    power_iters: int = 0
    test_columns: int = 10
    precision: str = "float64"
    """The dtype of each block product of A ("float32" or "float64"; :func:`blocks.compute_dtype`)."""
    range_oversample: int = 0
    """Extra columns p of the range sketch: Y has k + p columns, and L is made from its top k
    directions (:func:`truncate_sketch`); 0 is the paper's sketch of exactly k columns."""
    sketch: str = "gaussian"
    """The range sketch S: "gaussian" (the paper's) or "sparse" (a lane sparse sign embedding
    with :attr:`zeta` non-zeros per row, :mod:`lplr_dask.lanes`)."""
    zeta: int = 0
    """Non-zeros per row of a sparse S (0 for a Gaussian one)."""
    backbone_bits: int = 0
    """B0 of a quantized backbone ``A ≈ Q + L·R`` (:mod:`lplr_dask.backbone`); 0: none."""
    backbone_iters: int = 1
    """Rounds T of the backbone: each codes ``Q = Q_B0(A − L̂·R̂)`` (from no factors the first
    time), then the factors of ``A − Q̂``."""
    backbone_start: str = "backbone"
    """What the first round starts from: "backbone" (``Q = Q_B0(A)``) or "factors" (the factors
    of A first, as without a backbone: for matrices close to low rank)."""

    @property
    def sketch_columns(self) -> int:
        """Columns ℓ = k + p of the range sketch ``Y = A·S``."""
        return self.rank + self.range_oversample

    @property
    def oversample(self) -> int:
        """Rows ℓ of the co-range sketch Ψ in one-pass mode (Tropp et al. 2017: ℓ = 2s + 1, s = 2k).

        With a range sketch of k columns, ``E‖A − L·(ΨL)^†ΨA‖² = (1 + k/(ℓ − k − 1))·‖A − L·L^†A‖²``
        for Gaussian Ψ (Tropp et al. 2017, Thm. 4.3): ℓ = 4k + 1 costs at most 1.33× the two-pass
        residual in squares, 1.15× in norm.
        """
        return 4 * self.rank + 1

    def as_attrs(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "bits": list(self.bits),
            "quantizer": {
                "name": self.quantizer,
                "L": dataclasses.asdict(self.spec_l),
                "R": dataclasses.asdict(self.spec_r),
            },
            "seed": self.seed,
            "passes": self.passes,
            "power_iters": self.power_iters,
            "precision": self.precision,
            "sketch": {
                "kind": self.sketch,
                **({"zeta": self.zeta, "lanes": LANES} if self.sketch == "sparse" else {}),
                "block_rows": SKETCH_BLOCK,
                "test_columns": self.test_columns,
                "range_oversample": self.range_oversample,
                "oversample": self.oversample if self.passes == 1 else None,
                "co_range": {"kind": "sparse-sign", "nnz": SPARSE_NNZ} if self.passes == 1 else None,
            },
            "backbone": (
                {
                    "bits": self.backbone_bits,
                    "iters": self.backbone_iters,
                    "ranges": "clipped-column-per-row-chunk",
                    **({"start": "factors"} if self.backbone_start == "factors" else {}),
                }
                if self.backbone_bits
                else None
            ),
        }


def resolve_oversample(oversample: int | None, rank: int, shape: tuple[int, int]) -> int:
    """Extra range-sketch columns p for ``oversample`` (None: the default, p = k), at most
    ``min(n, d) − k`` (more columns than that cannot span more).

    Raises
    ------
    LplrValueError
        If ``oversample`` is not None or an integer >= 0.
    """
    check_oversample(oversample)
    p = rank if oversample is None else int(oversample)
    return max(0, min(p, min(shape) - rank))


def check_oversample(oversample: Any) -> None:
    """Raise :class:`LplrValueError` unless ``oversample`` is None or an integer >= 0."""
    if oversample is None:
        return
    if isinstance(oversample, bool) or not isinstance(oversample, (int, np.integer)) or oversample < 0:
        raise LplrValueError(
            f"Expected oversample (extra range-sketch columns) to be an integer >= 0, or None for the "
            f"default (the rank). Got {oversample!r}. Use 0 for the paper's sketch of exactly k columns."
        )


def pass1(A: da.Array, p: Params, *, strips: blocks.Strips | None = None) -> dict[str, da.Array]:
    """The lazy products of the first read of A (by row ``strips``: :mod:`lplr_dask.blocks`).

    Returns
    -------
    dict with ``Y`` (n × (k + p), p the range oversampling), ``AG`` (n × test columns),
    ``sumsq`` (0-d: ‖A‖²_F) and, for one-pass mode, ``Z`` (ℓ×d); all float64.
    """
    k, t = p.sketch_columns, p.test_columns
    yg, Z = _pass1_blocks(A, p, strips=strips)
    out = {"Y": yg[:, :k], "AG": yg[:, k : k + t], "sumsq": yg[:, k + t].sum()}
    if Z is not None:
        out["Z"] = Z
    return out


def pass1_part(A: da.Array, p: Params, origin: tuple[int, int]) -> tuple[da.Array, da.Array]:
    """One-pass pass 1 of a block of a larger matrix whose entry (0, 0) sits at ``origin``.

    The products are with the operators' rows at those offsets (S and G by column, Ψ by row), so
    they are the parts of that matrix's sketches (Tropp et al. 2019, the streaming update) that a
    compression of the whole would have summed from these chunks.

    Returns
    -------
    (right, Z) : dask arrays, float64
        ``[Y | AG | row sums of squares]`` (rows × (k + p + t + 1)) and ``Z = Ψ·A`` (ℓ × columns).
    """
    right, Z = _pass1_blocks(A, dataclasses.replace(p, passes=1), origin=origin)
    return right, cast(da.Array, Z)


def _pass1_blocks(
    A: da.Array,
    p: Params,
    *,
    strips: blocks.Strips | None = None,
    row_blocks: list[int] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> tuple[da.Array, da.Array | None]:
    """``[Y | AG | row sums of squares]`` (n × (k + p + t + 1), one column chunk: what a row
    strip of pass 1 writes; two-pass: only the ``row_blocks``) and, one-pass, Z; from one task
    per chunk of A, or per row strip of chunks (``strips``)."""
    k, t = p.sketch_columns, p.test_columns
    lanes = (STREAM_S, k, p.zeta) if p.sketch == "sparse" else None
    streams = [(STREAM_G, t, 1.0)] if lanes else [(STREAM_S, k, 1.0 / math.sqrt(k)), (STREAM_G, t, 1.0)]
    if p.passes == 1:
        return blocks.sketch_both(
            A,
            p.seed,
            streams,
            STREAM_PSI,
            p.oversample,
            sumsq=True,
            precision=p.precision,
            strips=strips,
            lanes=lanes,
            origin=origin,
        )
    right = blocks.sketch_right(
        A, p.seed, streams, sumsq=True, precision=p.precision, strips=strips, row_blocks=row_blocks, lanes=lanes
    )
    return right, None


def orth(X: da.Array) -> da.Array:
    """An orthonormal basis of the columns of a tall X (TSQR), float64.

    The TSQR's row blocks have at least 2k rows (:func:`lplr_dask.blocks.qr_chunks`), so it
    recurses and no task grows with n.
    """
    n, k = X.shape
    X = X.rechunk({0: blocks.qr_chunks(n, k, X.chunks[0][0]), 1: -1})
    q, _ = da.linalg.tsqr(X)
    return q


def power_iterate(
    A: da.Array,
    Y: da.Array,
    q: int,
    run: Callable[..., Any],
    *,
    precision: str = "float64",
    strips: blocks.Strips | None = None,
) -> da.Array:
    """``Y ← A·orth(Aᵀ·orth(Y))`` q times (two reads of A each), persisting between steps."""
    reads = blocks.reads(A, strips)
    for i in range(q):
        step = f"power iteration ({i + 1} of {q}"
        (Q,) = run(f"{step}: orth(Y))", orth(Y))
        AtQ = blocks.left_multiply(Q, A, precision=precision, strips=strips)
        (Zt,) = run(f"{step}: Aᵀ·Q)", orth(AtQ.T), chunks_of=reads)
        (Y,) = run(f"{step}: A·Z)", blocks.right_multiply(A, Zt, precision=precision, strips=strips), chunks_of=reads)
    return Y


def sketch_rotation(gram: Any, rank: int, seed: int) -> np.ndarray:
    """The ℓ×k matrix ``M`` that turns an oversampled sketch Y (n×ℓ) into the rank-k basis ``Y·M``.

    ``M = V_k·polar(V_kᵀ·Ω)``: ``V_k`` holds the top-k eigenvectors of ``gram = YᵀY`` (the right
    singular vectors of Y, so ``Y·V_k`` spans the top-k left singular subspace of Y, a better
    estimate of A's than k sketch columns: the oversampling of Halko, Martinsson, Tropp 2011),
    and the k×k orthogonal polar factor of ``V_kᵀ·Ω`` (Ω ℓ×k Gaussian, seeded) mixes those
    directions so that every column of the basis has about the same spread, as a Gaussian
    sketch's columns do: the unmixed columns, one singular direction each, quantize far worse
    (measured: benchmarks/RESULTS.md, "Quantizers", "In numpy on the same matrices"). ``M``
    depends on the top-k subspace only, not on which eigenvectors span it (a rotation ``V_k·Q``
    gives the same M), so repeated singular values and the eigenvectors' signs cannot change the
    codes.
    """
    gram = np.asarray(gram, dtype=np.float64)
    ell = gram.shape[0]
    _, V = np.linalg.eigh((gram + gram.T) / 2)
    V = V[:, ::-1][:, :rank]
    rng = np.random.default_rng(derived_seed(seed, 3))
    U, _, Wt = np.linalg.svd(V.T @ rng.standard_normal((ell, rank)))
    return V @ (U @ Wt)


def truncate_sketch(Y: da.Array, p: Params, *, gram: Any = None) -> da.Array:
    """The rank-k basis ``Y·M`` (:func:`sketch_rotation`) of a sketch with ``p.range_oversample``
    extra columns; Y itself when there are none. ``gram`` (``YᵀY``) is computed unless given.
    """
    if p.range_oversample == 0:
        return Y
    Y = Y.rechunk({1: -1})
    if gram is None:
        (gram,) = dask.compute(Y.T @ Y)
    M = sketch_rotation(to_host(gram), p.rank, p.seed)
    return Y.map_blocks(_times, M, chunks=(Y.chunks[0], (p.rank,)), dtype=Y.dtype)


def _times(y: Any, m: np.ndarray) -> Any:
    """``y·m`` with m moved to y's device."""
    return y @ array_namespace(y).asarray(m)


def ranges_to_scales(X: da.Array, bits: int, spec: QuantizerSpec, channel_axis: int) -> tuple[da.Array, da.Array]:
    """Lazy (scale, offset) of X for ``spec``: a dask reduction."""
    lo, hi = ranges(X, spec, channel_axis=channel_axis)
    return scale_from_range(lo, hi, bits)


def quantize_basis(Y: da.Array, p: Params) -> Quantized:
    """``L = Q_B1(Y)``: scales computed (a small reduction over the persisted Y), codes lazily."""
    scale, offset = dask.compute(*ranges_to_scales(Y, p.bits[0], p.spec_l, 1))
    codes = encode_blocks(Y, p.bits[0], p.spec_l, scale, offset, channel_axis=1, seed=derived_seed(p.seed, 1))
    return Quantized(codes, scale, offset, p.bits[0])


def pinv_factor(L_hat: da.Array) -> da.Array:
    """``pinv(L)ᵀ`` (n×k) as a lazy dask array: ``L = Q·R`` by a Gram-based QR, then ``Q·pinv(R)ᵀ``.

    The QR is CholeskyQR2 in the form of :func:`_orthonormalize` applied twice (two k×k Grams and
    two products by k×k factors, all GEMMs, instead of a TSQR's Householder factorizations: 2.4 s
    against 4.6 s for the benchmark's 32768×256 basis with dask's threads scheduler in one
    process; numpy's own QR of it takes 1.3 s, its Gram 0.07 s), with eigen-
    decompositions of the Grams rather than Cholesky factors, so a rank-deficient basis has no
    failure case: its null directions become zero columns of Q. The second pass makes Q
    orthonormal to rounding for a basis of condition up to about 1e8 (the first one's error is
    about κ²·eps); then ``R = Qᵀ·L`` (k×k) and its pseudo-inverse once, in one task (an SVD of R,
    a delayed task of its own, which dask cannot fuse into the product of each row block).

    Row blocks of at least 2k rows (:func:`lplr_dask.blocks.qr_chunks`): every task holds at most
    one row block and k×k matrices, whatever n. Singular values of R below ``max(n, k)·eps·σ_max``
    are treated as zero, as ``numpy.linalg.lstsq`` does, so a rank-deficient quantized basis (for
    example at B1 = 1) still gives the least-squares solution of minimum norm.
    """
    n, k = L_hat.shape
    L_hat = L_hat.rechunk({0: blocks.qr_chunks(n, k, L_hat.chunks[0][0]), 1: -1})
    Q = _orthonormalize(_orthonormalize(L_hat))
    R = Q.T @ L_hat
    # one task of its own (a delayed, not a blockwise layer): shared by the products of all row blocks
    inverse = da.from_delayed(
        dask.delayed(_pinv_transposed, pure=True)(R, max(n, k)), shape=(k, k), dtype=np.float64, meta=R._meta
    )
    return Q @ inverse


def host_pinv_factor(L_hat: np.ndarray) -> np.ndarray:
    """``pinv(L)ᵀ`` (n×k) of an in-memory basis: :func:`pinv_factor`'s algorithm in plain numpy.

    The same CholeskyQR2 with eigendecompositions of the Grams and the same cut of small singular
    values, as whole-matrix GEMMs: for the benchmark's 32768×256 basis about 0.5 s against 2–2.5 s
    for the blocked dask graph in dask's threads scheduler (benchmarks/RESULTS.md, issue 16).
    It holds L, Q and the result at once (3·n·k float64): for the central steps in the client
    (:attr:`StageContext.central_in_process`).
    """
    n, k = L_hat.shape
    Q = L_hat @ _inverse_root(L_hat.T @ L_hat)
    Q = Q @ _inverse_root(Q.T @ Q)
    return Q @ _pinv_transposed(Q.T @ L_hat, max(n, k))


def _orthonormalize(X: da.Array) -> da.Array:
    """``X·T`` with orthonormal columns where X's are independent: ``T = V·Λ^(-1/2)`` from the
    eigendecomposition ``XᵀX = V·Λ·Vᵀ`` (one k×k task), with zero columns for the eigenvalues at
    or below ``k·eps·λ_max`` (directions X does not span to within rounding)."""
    k = X.shape[1]
    T = da.from_delayed(
        dask.delayed(_inverse_root, pure=True)(X.T @ X), shape=(k, k), dtype=np.float64, meta=np.empty((0, 0))
    )
    return X @ T


def _inverse_root(H: Any) -> np.ndarray:
    """``V·Λ^(-1/2)`` of a symmetric positive semi-definite H, zero where ``λ <= k·eps·λ_max``."""
    lam, V = np.linalg.eigh((np.asarray(H) + np.asarray(H).T) / 2)
    tol = max(float(lam.max(initial=0.0)), 0.0) * len(lam) * np.finfo(np.float64).eps
    scale = np.divide(1.0, np.sqrt(np.clip(lam, tol, None)), out=np.zeros_like(lam), where=lam > tol)
    return V * scale


def _pinv_transposed(R: Any, m: int) -> Any:
    """``pinv(R)ᵀ`` of a square R by its SVD, cutting singular values below ``m·eps·σ_max``."""
    U, s, Vt = np.linalg.svd(R)
    tol = s.max(initial=0.0) * m * np.finfo(np.float64).eps
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > tol)
    return (U * inv) @ Vt


def project(
    A: da.Array,
    PT: da.Array,
    *,
    precision: str = "float64",
    strips: blocks.Strips | None = None,
    col_blocks: list[int] | None = None,
) -> da.Array:
    """``W = pinv(L)·A`` = ``PTᵀ·A`` (k×d; the column blocks ``col_blocks``), column-chunked like A."""
    return blocks.left_multiply(PT, A, precision=precision, strips=strips, col_blocks=col_blocks)


def one_pass_projector(L_hat: da.Array, p: Params) -> np.ndarray:
    """``(Ψ·L)^†`` (k×ℓ) for one-pass mode, Ψ regenerated block-wise by rows."""
    psi_l = blocks.sketch_left(L_hat, p.seed, STREAM_PSI, p.oversample, check=False).compute()
    return np.linalg.pinv(psi_l)


def basis_hessian(L_hat: da.Array) -> da.Array:
    """``H = L̂ᵀ·L̂`` (k×k) of the decoded basis (float64), lazily: a reduction over its row blocks.

    gptq rounding of R (:func:`lplr_dask.quantize.encode_gptq_block`) weighs R's rounding errors
    by it, since the error that counts is ``‖L̂·(W − R̂)‖_F``.
    """
    return L_hat.T @ L_hat


def error_estimate(resid_sumsq: float, norm_fro: float, test_columns: int) -> float:
    """``‖(A − L·R)·G‖_F / (√p·‖A‖_F)`` for p Gaussian test columns G: the relative error, estimated.

    ``resid_sumsq`` is ``‖(A − L·R)·G‖²_F`` and ``norm_fro`` is ``‖A‖_F``.

    ``E‖E·G‖²_F = p·‖E‖²_F`` for G with i.i.d. N(0, 1) entries, so the estimate is unbiased in
    squares; its relative spread is about ``1/sqrt(2·p·r)``, r the effective rank of the residual
    ``(Σσ²)²/Σσ⁴`` (large for noise-like residuals). ‖A‖_F comes exact from pass 1, so it adds
    no spread, unlike ``‖A·G‖`` whose spread is set by A's often small effective rank.
    """
    if norm_fro <= 0:
        return 0.0
    return math.sqrt(resid_sumsq / test_columns) / norm_fro


def _columns(X: da.Array, todo: list[int]) -> da.Array:
    """The column blocks ``todo`` of X, or X itself when that is all of them.

    Selecting blocks after the product (not from A before it) keeps each read of A fused with
    its product in one task; dask culls the products of the blocks not selected.
    """
    if todo == list(range(X.numblocks[1])):
        return X
    return da.concatenate([X.blocks[:, j] for j in todo], axis=1)


def decode_factor(
    codes: da.Array,
    scale: np.ndarray,
    offset: np.ndarray,
    spec: QuantizerSpec,
    channel_axis: int,
    dtype: Any = np.float64,
) -> da.Array:
    """Lazily decode a codes array (dask) with its stored scales: the factor L̂ or R̂, block by block.

    Parameters
    ----------
    codes : dask.array.Array
        The codes, as stored (``L/codes`` n×k, ``R/codes`` k×d).
    scale, offset : ndarray
        Their stored scales and offsets, shaped per the quantizer's granularity.
    spec : QuantizerSpec
    channel_axis : int
        1 for L (a channel is a column), 0 for R (a row).
    dtype : dtype, default=float64

    Returns
    -------
    dask.array.Array
        Chunked like ``codes``; each block decoded with the scales of its rows or columns.

    Notes
    -----
    ``scale`` and ``offset`` are two keys of the graph that every block depends on, so a
    distributed scheduler sends each once per worker; inside the blocks' function they would
    travel with every task (``groupN`` scales of L are k·n/N values: 16 MB × 200 tasks was 3.4 GB).
    """
    g = spec.group_size if spec.granularity == "group" else 0

    def block(c: Any, s: Any, o: Any, block_info: Any = None) -> Any:
        loc = block_info[0]["array-location"]
        return decode_block(c, block_scales(s, loc, g, channel_axis), block_scales(o, loc, g, channel_axis), dtype)

    shared = dask.delayed(scale), dask.delayed(offset)
    return da.map_blocks(block, codes, *shared, dtype=dtype, meta=np.empty((0, 0), dtype))


def derived_seed(seed: int, purpose: int) -> int:
    """An integer seed for a secondary purpose of ``seed``: 1 the stochastic rounding of L, 2 that
    of R, 3 the mixing of an oversampled sketch (:func:`sketch_rotation`)."""
    return int(np.random.SeedSequence(seed, spawn_key=(100 + purpose,)).generate_state(1)[0])


_derived = derived_seed  # the name before issue 17


# ---------------------------------------------------------------------------------------------
# The stages: each reads what the one before left in the store and writes what the next needs
# ---------------------------------------------------------------------------------------------


class _Runner:
    """Computes a step with progress (:func:`lplr_dask.progress.compute`), records its time under
    the label without its parenthesised sub-step ("code R (scales)" counts for "code R")."""

    def __init__(self, log: Log, timings: dict[str, float]):
        self.log = log
        self.timings = timings

    def __call__(self, label: str, *arrays: Any, persist: bool = True, chunks_of: Any = None) -> tuple[Any, ...]:
        t0 = time.perf_counter()
        out = compute(label, *arrays, persist=persist, chunks_of=chunks_of)
        self._add(label, time.perf_counter() - t0)
        return out

    def _add(self, label: str, seconds: float) -> None:
        key = label.split(" (")[0]
        self.timings[key] = round(self.timings.get(key, 0.0) + seconds, 3)


@dataclasses.dataclass
class StageContext:
    """What the stages of :func:`run` share: the input, the output store, the parameters, the
    attrs written so far and the runner that computes and times each step.

    Attributes
    ----------
    A : dask.array.Array
        The input, n×d.
    root : str or zarr Store
        The output store, as workers reopen it (:func:`lplr_dask.store.locate`).
    group : zarr.Group
        The output store, open for writing.
    params : Params
    meta : dict
        The attrs so far (read only: a stage returns what it adds).
    runner : _Runner
        Computes a labelled step with progress and adds its time to ``runner.timings``.
    log : callable
    strips : lplr_dask.blocks.Strips or None
        How the passes read A: by row strips through a reader of its source, or (None) a task
        per chunk of A.
    """

    A: da.Array
    root: str | Store
    group: zarr.Group
    params: Params
    meta: dict[str, Any]
    runner: _Runner
    log: Log
    strips: blocks.Strips | None = None

    @classmethod
    def open(
        cls,
        A: da.Array,
        root: str | Store,
        params: Params,
        meta: dict[str, Any],
        *,
        log: Log,
        strips: blocks.Strips | None = None,
    ) -> StageContext:
        """Open the store at ``root`` for the stages; timings go on from those in ``meta``."""
        runner = _Runner(log, dict(meta.get("timings", {})))
        return cls(A, root, store.open_group(root, mode="r+"), params, meta, runner, log, strips)

    def central(self) -> contextlib.AbstractContextManager[None]:
        """Where the steps between the passes compute (they read the scratch and the stored
        factors, never A): in this process (:func:`lplr_dask.progress.in_process`: no round trip
        to the cluster per step, and each step's work in one place) while A is on the host and
        the thin matrices they read — Y (n × (k + p)), W (k × d) and, one-pass, Z (ℓ × d), as
        float64 — take at most the Dask config ``lplr.central.in-process-bytes`` (default 1 GiB);
        on the cluster otherwise."""
        return in_process() if self.central_in_process else contextlib.nullcontext()

    @property
    def central_in_process(self) -> bool:
        """Whether :meth:`central` computes in this process (A on the host, thin matrices small)."""
        (n, d), p = self.A.shape, self.params
        thin = 8 * (n * p.sketch_columns + p.rank * d + (p.oversample * d if p.passes == 1 else 0))
        limit = dask.utils.parse_bytes(dask.config.get("lplr.central.in-process-bytes"))
        return device_of(self.A) == "cpu" and thin <= limit

    @property
    def row_chunk(self) -> int:
        """Rows of A's chunks: the row chunks of L, Y, AG and PT."""
        return int(self.A.chunks[0][0])

    @property
    def col_chunk(self) -> int:
        """Columns of A's chunks: the column chunks of R, Z and W."""
        return int(self.A.chunks[1][0])

    def stored_factor(self, name: str) -> da.Array:
        """The factor ``name`` ("L" or "R") decoded lazily from its codes, scales and offsets."""
        spec, axis = (self.params.spec_l, 1) if name == "L" else (self.params.spec_r, 0)
        return decode_factor(
            da.from_zarr(self.group[f"{name}/codes"]),
            store.read_small(self.group, f"{name}/scale"),
            store.read_small(self.group, f"{name}/offset"),
            spec,
            channel_axis=axis,
        )

    def scratch(self, name: str) -> zarr.Array:
        """The scratch array ``name`` (:data:`lplr_dask.store.SCRATCH_ARRAYS`)."""
        return cast(zarr.Array, self.group[store.scratch_name(name)])


def sketch_and_code_basis(job: StageContext) -> dict[str, Any]:
    """Pass 1 and the basis: the sketches of one read of A, then ``L = Q_B1(Y)``.

    Reads A once (and twice per power iteration). Writes the scratch arrays ``Y``, ``AG`` (and
    ``Z`` in one-pass mode), then ``L/codes``, ``L/scale``, ``L/offset`` from Y, after the power
    iterations and the truncation of an oversampled sketch (:func:`truncate_sketch`).

    Returns
    -------
    dict
        ``norm_fro``: ‖A‖_F, summed in the same read (the error estimate's denominator).
    """
    A, p = job.A, job.params
    norm_fro = _write_sketches(job)
    Y = like(da.from_zarr(job.scratch("Y")), A)
    if p.power_iters:  # Y then lives on the cluster's workers
        Y = power_iterate(A, Y, p.power_iters, job.runner, precision=p.precision, strips=job.strips)
    with job.central() if not p.power_iters else contextlib.nullcontext():
        qL = quantize_basis(truncate_sketch(Y, p), p)
        _store_codes(
            job.group, "L/codes", qL.codes.rechunk((job.row_chunk, p.rank)), p.bits[0], job.runner, "basis: quantize L"
        )
    store.write_small(job.group, "L/scale", qL.scale)
    store.write_small(job.group, "L/offset", qL.offset)
    return {"norm_fro": norm_fro}


def _write_sketches(job: StageContext) -> float:
    """Pass 1 (:func:`pass1`): write Y, AG (and Z) to the scratch, not to worker memory; ‖A‖_F.

    Resumable by row strips (a row chunk of A): one task per strip writes its rows of Y and AG
    whole-chunk, its part of ‖A‖²_F to the scratch ``sumsq`` and then (two-pass) its mark in
    ``Y_done`` (:class:`_YWriter`), so a resumed job reads only the strips not marked (it logs how
    many were). One-pass mode's ``Z = Ψ·A`` is a sum over all rows, so there the marks are set
    all together once Z is stored too: an interrupted one-pass pass 1 is redone whole (storing a
    partial ℓ×d Z per strip would cost strips × ℓ × d). With every mark set, pass 1 is not run
    again at all (the resume point between pass 1 and the basis).
    """
    A, p = job.A, job.params
    n, d = A.shape
    marks = _y_marks(job)
    done = np.asarray(marks[...]).astype(bool)
    todo = [i for i in range(len(A.chunks[0])) if not done[i]]
    if done.any():
        job.log(f"resume: {int(done.sum())} of {done.size} row strips of pass 1 already written; computing {len(todo)}")
    if todo:
        strips = job.strips if p.passes == 2 else None  # one-pass: a task per chunk (blocks._sketches)
        rows, Z = _pass1_blocks(A, p, strips=strips, row_blocks=todo)
        writes = [blocks.map_row_blocks(rows, _YWriter(job.root, todo, p, mark=Z is None))]
        if Z is not None:
            target = store.create_scratch(job.group, "Z", (p.oversample, d), (p.oversample, job.col_chunk))
            Z = Z.rechunk((p.oversample, job.col_chunk))
            writes.append(da.store(to_host_blocks(Z), target, lock=False, compute=False))
        job.runner("pass 1: sketch", *writes, persist=False, chunks_of=blocks.reads(A, strips, row_blocks=todo))
        marks[...] = 1  # two-pass: already set strip by strip; one-pass: now that Z is stored
    return math.sqrt(float(np.asarray(job.scratch("sumsq")[...]).sum()))


def _y_marks(job: StageContext) -> zarr.Array:
    """The scratch ``Y_done`` marks; created, with empty ``Y``, ``AG`` and ``sumsq``, when pass 1
    first starts (a store started by a version without marks gets them: its pass 1 is redone)."""
    if store.scratch_name("Y_done") in job.group:
        return job.scratch("Y_done")
    A, p = job.A, job.params
    n, strips = A.shape[0], len(A.chunks[0])
    store.create_scratch(job.group, "Y", (n, p.sketch_columns), (job.row_chunk, p.sketch_columns))
    store.create_scratch(job.group, "AG", (n, p.test_columns), (job.row_chunk, p.test_columns))
    store.create_scratch(job.group, "sumsq", (strips, 1), (1, 1))
    return store.create_scratch_marks(job.group, "Y_done", strips)


def project_onto_basis(job: StageContext) -> dict[str, Any]:
    """Pass 2: ``W = pinv(L)·A`` (one-pass: ``(Ψ·L)^†·Z``), one whole column chunk per task.

    Reads the stored L and A once (one-pass: the scratch ``Z``, not A); two-pass mode first
    writes ``pinv(L)ᵀ`` to the scratch ``PT``. Writes each column chunk of the scratch ``W`` and
    then its mark in ``W_done``, so a resumed job computes only the chunks not marked (it logs
    how many were).

    Returns
    -------
    dict
        Nothing: W stays in the scratch for :func:`code_r`.
    """
    ncb = len(job.A.chunks[1])
    done = np.asarray(_w_marks(job)[...]).astype(bool)
    todo = [j for j in range(ncb) if not done[j]]
    if done.any():
        job.log(f"resume: {int(done.sum())} of {ncb} column chunks of W already written; computing {len(todo)}")
    if todo:
        W, label = _projection(job, todo)
        one_pass = job.params.passes == 1
        with job.central() if one_pass else contextlib.nullcontext():  # one-pass reads Z, not A
            job.runner(
                label,
                blocks.map_column_blocks(W, _WWriter(job.root, todo)),
                persist=False,
                chunks_of=None if one_pass else blocks.reads(job.A, job.strips),
            )
    return {}


def _w_marks(job: StageContext) -> zarr.Array:
    """The scratch ``W_done`` marks; created, with an empty ``W``, when pass 2 first starts."""
    if store.scratch_name("W_done") in job.group:
        return job.scratch("W_done")
    store.create_scratch(job.group, "W", (job.params.rank, job.A.shape[1]), (job.params.rank, job.col_chunk))
    return store.create_scratch_marks(job.group, "W_done", len(job.A.chunks[1]))


def _projection(job: StageContext, todo: list[int]) -> tuple[da.Array, str]:
    """The lazy column chunks ``todo`` of W, and the progress label of computing them."""
    A, p = job.A, job.params
    L_hat = job.stored_factor("L")
    if p.passes == 1:
        with job.central():
            M = one_pass_projector(L_hat, p)
        Z = da.from_zarr(job.scratch("Z"))
        return blocks.left_multiply(
            da.from_array(M.T), like(_columns(Z, todo), A)
        ), "pass 2: project (one-pass, no read of A)"
    # stored in the block products' precision: pass 2 reads each row block of it once per column chunk of A,
    # and casts it to that precision anyway (float32 under "auto" for float32 input: half the bytes)
    dtype = blocks.compute_dtype(A.dtype, p.precision)
    pt = store.create_scratch(job.group, "PT", (A.shape[0], p.rank), (job.row_chunk, p.rank), dtype=dtype)
    if job.central_in_process:  # one numpy task: its GEMMs cost a quarter of the same in dask's blocks
        PT = da.from_delayed(dask.delayed(host_pinv_factor)(L_hat), L_hat.shape, np.float64, meta=np.empty((0, 0)))
    else:
        PT = pinv_factor(L_hat)
    PT = to_host_blocks(PT.astype(dtype).rechunk({0: A.chunks[0], 1: -1}))
    with job.central():
        job.runner("basis: pinv(L)", da.store(PT, pt, lock=False, compute=False), persist=False)
    PT = like(da.from_zarr(pt), A)
    if job.strips is not None:  # only the strips of the columns to do
        return project(A, PT, precision=p.precision, strips=job.strips, col_blocks=todo), "pass 2: project"
    return _columns(project(A, PT, precision=p.precision), todo), "pass 2: project"


def code_r(job: StageContext) -> dict[str, Any]:
    """``R = Q_B2(W)``: the scales from a reduction over the scratch ``W``, then the codes.

    Reads the scratch ``W`` (and, for ``gptq`` rounding, the stored L for ``H = L̂ᵀ·L̂``,
    :func:`basis_hessian`); not A. Writes ``R/codes``, ``R/scale``, ``R/offset``.

    Returns
    -------
    dict
        Nothing: the error estimate reads R from the store.
    """
    p = job.params
    W = like(da.from_zarr(job.scratch("W")), job.A)
    gptq = p.spec_r.rounding == "gptq"  # then also the k×k factor on the client, from the stored basis
    rs, ro, *H = job.runner(
        "code R (scales)",
        *ranges_to_scales(W, p.bits[1], p.spec_r, 0),
        *([basis_hessian(job.stored_factor("L"))] if gptq else []),
        persist=False,
    )
    factor = gptq_factor(H[0]) if gptq else None
    codes = encode_blocks(W, p.bits[1], p.spec_r, rs, ro, channel_axis=0, seed=derived_seed(p.seed, 2), factor=factor)
    _store_codes(job.group, "R/codes", codes.rechunk((p.rank, job.col_chunk)), p.bits[1], job.runner, "code R")
    store.write_small(job.group, "R/scale", rs)
    store.write_small(job.group, "R/offset", ro)
    return {}


def estimate_and_finish(job: StageContext) -> dict[str, Any]:
    """The free error estimate (:func:`error_estimate`), then the scratch removed.

    Reads the stored L and R, the scratch ``AG`` and ``norm_fro`` from the attrs; not A.
    Removes the scratch (:func:`lplr_dask.store.remove_scratch`).

    Returns
    -------
    dict
        ``error_estimate``, and ``complete``: True.
    """
    p = job.params
    rg = blocks.sketch_right(job.stored_factor("R"), p.seed, [(STREAM_G, p.test_columns, 1.0)], check=False)
    resid = da.from_zarr(job.scratch("AG")) - job.stored_factor("L") @ rg
    (num,) = job.runner("error estimate", (resid**2).sum(), persist=False)
    # with a backbone the sketches are of A − Q̂: AG − L̂·R̂·G is (A − Q̂ − L̂·R̂)·G, over ‖A‖_F
    norms = (
        {"norm_fro": job.meta["input_norm_fro"], "residual_norm_fro": job.meta["norm_fro"]} if p.backbone_bits else {}
    )
    estimate = error_estimate(float(num), norms.get("norm_fro", job.meta["norm_fro"]), p.test_columns)
    store.remove_scratch(job.group, keep_sketches=bool(job.meta.get("appendable")))
    return {**norms, "error_estimate": estimate, "complete": True}


def code_backbone(job: StageContext, round: int = 1, *, from_factors: bool = False) -> dict[str, Any]:
    """Round ``round`` of the backbone: ``Q = Q_B0(A − L̂·R̂)`` (``Q_B0(A)`` in round 1 unless
    ``from_factors``: the stored factors of A itself), one read of A.

    Each task codes one chunk of A (less, after round 1, the rows of the stored L̂ and columns of
    R̂ that cover it) and writes its chunk of ``Q/codes``, ``Q/scale`` and ``Q/offset`` whole
    (:class:`lplr_dask.backbone.ChunkWriter`). Removes the previous round's scratch first: the
    passes after it sketch the new residual ``A − Q̂``. An interrupted round is redone whole (it
    reads only A and the factors it leaves unchanged).

    Returns
    -------
    dict
        ``input_norm_fro``: ‖A‖_F, from the same read (the error's denominator).
    """
    A, p = job.A, job.params
    store.remove_scratch(job.group)
    X = A
    if round > 1 or from_factors:
        L = like(job.stored_factor("L"), A).rechunk({0: A.chunks[0], 1: -1})
        R = like(job.stored_factor("R"), A).rechunk({0: -1, 1: A.chunks[1]})
        X = da.blockwise(_minus_product, "ij", A, "ij", L, "ik", R, "kj", dtype=np.float64, concatenate=True)
    backbone.create_arrays(job.group, A.shape, (job.row_chunk, job.col_chunk), p.backbone_bits)
    parts = da.map_blocks(
        backbone.ChunkWriter(job.root, p.backbone_bits), X, A, chunks=(1, 1), dtype=np.float64, meta=np.empty((0, 0))
    )
    (total,) = job.runner(f"backbone (round {round}: code Q)", parts.sum(), persist=False, chunks_of=A)
    return {"input_norm_fro": math.sqrt(float(total))}


def _minus_product(a: Any, lb: Any, rb: Any) -> Any:
    return a.astype(np.float64) - lb @ rb


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resumable step of :func:`run`: once ``step`` has run, the attrs' ``stage`` is ``name``.
    A ``central`` step reads no A: it runs where :meth:`StageContext.central` says."""

    name: str
    step: Callable[[StageContext], dict[str, Any]]
    central: bool = False
    reads_input: bool = False
    """The step reads A itself, not the residual ``A − Q̂`` of a backbone (:func:`code_backbone`)."""


#: The stages of a job, in order. A store's ``stage`` attr names the last one done.
STAGES = (
    Stage("basis", sketch_and_code_basis),
    Stage("projected", project_onto_basis),
    Stage("coded", code_r, central=True),
    Stage("complete", estimate_and_finish, central=True),
)
#: The values of the ``stage`` attr in order: "started" (nothing done yet), then each stage's name.
STAGE_NAMES = ("started", *(s.name for s in STAGES))


def stages_of(p: Params) -> tuple[Stage, ...]:
    """The stages of a job with parameters ``p``: :data:`STAGES`, or with a backbone its T rounds
    (``backbone``, ``basis``, ``projected``, ``coded``; the names of rounds after the first end in
    " 2", " 3", …) and then ``complete``."""
    if not p.backbone_bits:
        return STAGES
    rounds: list[Stage] = []
    if p.backbone_start == "factors":  # first the factors of A itself, as without a backbone
        rounds.extend(dataclasses.replace(s, name=s.name + " 0", reads_input=True) for s in STAGES[:-1])
    for t in range(1, p.backbone_iters + 1):
        suffix = "" if t == 1 else f" {t}"
        step = functools.partial(code_backbone, round=t, from_factors=p.backbone_start == "factors")
        rounds.append(Stage(f"backbone{suffix}", step, reads_input=True))
        rounds.extend(dataclasses.replace(s, name=s.name + suffix) for s in STAGES[:-1])
    return (*rounds, STAGES[-1])


def stages_after(stage: str, p: Params | None = None) -> tuple[Stage, ...]:
    """The stages still to run for a store whose ``stage`` attr is ``stage``: "started" or the name
    of one of :func:`stages_of` ``p`` (:data:`STAGES` without ``p``)."""
    stages = STAGES if p is None else stages_of(p)
    names = ("started", *(s.name for s in stages))
    return stages[names.index(stage) :]


def run(
    A: da.Array,
    root: str | Store,
    p: Params,
    meta: dict[str, Any],
    *,
    log: Log,
    strips: blocks.Strips | None = None,
) -> dict[str, Any]:
    """Run (or resume) the passes, writing the store at ``root``; return the final attrs.

    ``meta`` holds the attrs written so far (``stage`` says how far a previous run got); each
    stage of :data:`STAGES` not yet done runs, then its attrs, its ``stage`` and the timings so
    far are added to ``meta`` and written to the store.
    """
    job = StageContext.open(A, root, p, meta, log=log, strips=strips)
    for stage in stages_after(meta.get("stage", "started"), p):
        if p.backbone_bits:  # the passes factor A − Q̂, a task per chunk (the strips read A's source)
            job.A = A if stage.reads_input else backbone.residual(A, backbone.stored(job.group))
            job.strips = strips if stage.reads_input else None
        with job.central() if stage.central else contextlib.nullcontext():
            meta.update(stage.step(job))
        meta["stage"] = stage.name
        meta["timings"] = job.runner.timings
        store.write_meta(job.group, meta)
    return meta


#: Codes up to this many bytes (a factor's, all workers together) are computed once and kept on
#: the workers while a sample of them picks the codec, then written; larger ones are computed
#: twice (the sample's chunks, then all), so that no worker holds more than its chunks.
PERSIST_CODES_BYTES = 256 * 2**20


def _store_codes(group: zarr.Group, name: str, codes: da.Array, bits: int, run: _Runner, label: str) -> None:
    """Write lazy codes whole-chunk to a new codes array ``name`` chunked like ``codes``."""
    if codes.nbytes <= PERSIST_CODES_BYTES:
        (codes,) = run(f"{label} (codes)", codes)
    target = store.create_codes(
        group,
        name,
        codes.shape,
        (int(codes.chunks[0][0]), int(codes.chunks[1][0])),
        bits,
        sample_from=codes,
    )
    run(f"{label} (write)", da.store(to_host_blocks(codes), target, lock=False, compute=False), persist=False)


class _YWriter:
    """Writes one row strip of pass 1 (its rows of Y and AG, its ‖A‖²) and, with ``mark``, sets
    its mark in ``Y_done`` (a picklable callable for :func:`lplr_dask.blocks.map_row_blocks`)."""

    def __init__(self, root: str | Store, todo: list[int], p: Params, *, mark: bool):
        self.root, self.todo, self.mark = root, todo, mark
        self.k, self.t = p.sketch_columns, p.test_columns

    def __call__(self, rows: Any, i_local: int, r0_local: int) -> float:
        i = self.todo[i_local]
        group = zarr.open_group(self.root, mode="r+")
        y = cast(zarr.Array, group[store.scratch_name("Y")])
        r0 = i * y.chunks[0]
        rows = to_host(rows)
        k, t = self.k, self.t
        y[r0 : r0 + rows.shape[0]] = rows[:, :k]
        cast(zarr.Array, group[store.scratch_name("AG")])[r0 : r0 + rows.shape[0]] = rows[:, k : k + t]
        sumsq = float(rows[:, k + t].sum())
        cast(zarr.Array, group[store.scratch_name("sumsq")])[i, 0] = sumsq
        if self.mark:
            cast(zarr.Array, group[store.scratch_name("Y_done")])[i] = 1
        return sumsq


class _WWriter:
    """Writes one column chunk of W to the scratch and marks it done (a picklable callable)."""

    def __init__(self, root: str | Store, todo: list[int]):
        self.root, self.todo = root, todo

    def __call__(self, w: Any, j_local: int, c0_local: int) -> float:
        j = self.todo[j_local]
        group = zarr.open_group(self.root, mode="r+")
        arr = cast(zarr.Array, group[store.scratch_name("W")])
        c0 = j * arr.chunks[1]
        arr[:, c0 : c0 + w.shape[1]] = to_host(w)
        cast(zarr.Array, group[store.scratch_name("W_done")])[j] = 1
        return 1.0

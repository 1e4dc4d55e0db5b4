"""Error-feedback rounding of R against its basis: GPTQ [1]_, the LDLQ of QuIP [2]_.

It chooses the codes of R to minimize ``‖L̂·(W − R̂)‖_F`` rather than ``‖W − R̂‖_F``, with the same
scales as nearest rounding: :func:`gptq_factor` factors the damped inverse Hessian of the basis
once, :func:`encode_gptq_block` codes a block of R's columns with it.

References
----------
.. [1] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh. "GPTQ: Accurate Post-Training
   Quantization for Generative Pre-trained Transformers." ICLR 2023. arXiv:2210.17323.
.. [2] J. Chee, Y. Cai, V. Kuleshov, C. De Sa. "QuIP: 2-Bit Quantization of Large Language
   Models With Guarantees." NeurIPS 2023. arXiv:2307.13304.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lplr_dask.backend import array_namespace, to_host
from lplr_dask.errors import LplrValueError
from lplr_dask.quantize.spec import code_dtype

__all__ = ["GPTQ_DAMP", "GPTQ_BATCH", "gptq_factor", "encode_gptq_block", "check_gptq"]

#: Damping of the Hessian before :func:`gptq_factor` inverts it, relative to its mean diagonal.
GPTQ_DAMP = 1e-6

#: Rows of R whose rounding errors are fed on to the later rows together (see :func:`encode_gptq_block`).
GPTQ_BATCH = 64


def gptq_factor(hessian: Any, *, damp: float = GPTQ_DAMP) -> np.ndarray:
    """The upper Cholesky factor U of ``(H + λ·I)⁻¹`` that :func:`encode_gptq_block` feeds errors with.

    Parameters
    ----------
    hessian : array of shape (k, k)
        ``H = L̂ᵀ·L̂`` for the basis L̂ (n×k) that multiplies the quantized matrix (numpy or cupy;
        computed on the host in float64).
    damp : float, default=GPTQ_DAMP
        ``λ = damp · mean(diag(H))`` (1 for a zero H). A basis that is rank deficient (a column of
        L̂ repeated, or B1 = 1) needs the damping; where even it leaves ``H + λ·I`` numerically
        indefinite, λ grows tenfold until the factorization succeeds.

    Returns
    -------
    ndarray of shape (k, k), float64
        Upper triangular with a positive diagonal, ``Uᵀ·U = (H + λ·I)⁻¹``.

    Raises
    ------
    LplrValueError
        If ``hessian`` is not square, not finite, or far from positive semi-definite.

    References
    ----------
    .. [1] E. Frantar et al. "GPTQ." ICLR 2023, Algorithm 1 (the Cholesky form of the inverse).
    """
    H = np.asarray(to_host(hessian), dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or not np.isfinite(H).all():
        raise LplrValueError(
            f"Expected a finite square Hessian L̂ᵀ·L̂ (k×k). Got shape {H.shape}"
            f"{'' if np.isfinite(H).all() else ' with non-finite entries'} instead."
        )
    k = H.shape[0]
    mean = float(np.trace(H)) / k if k else 0.0
    lam = damp * mean if mean > 0 else 1.0
    eye = np.eye(k)
    for _ in range(32):
        try:
            chol = np.linalg.cholesky(H + lam * eye)
            inv = np.linalg.inv(chol)  # lower triangular: (H + λI)⁻¹ = invᵀ·inv
            return np.linalg.cholesky(inv.T @ inv).T
        except np.linalg.LinAlgError:
            lam *= 10.0
    raise LplrValueError(
        f"Expected a positive semi-definite Hessian L̂ᵀ·L̂; damping up to {lam:.3g} did not make it "
        "definite. Check the basis for huge or non-finite values, or use nearest rounding."
    )


def check_gptq(shape: tuple[int, ...], factor: Any, channel_axis: int) -> None:
    """Raise unless gptq rounding can code a matrix of ``shape`` (k×m) with a k×k ``factor``.

    Raises
    ------
    LplrValueError
        If ``channel_axis`` is not 0, or ``factor`` is missing or not k×k.
    """
    if channel_axis != 0:
        raise LplrValueError(
            "Expected channel_axis=0 for gptq rounding: it codes R (k×d), whose rows are its "
            f"channels, in the order of its rows. Got channel_axis={channel_axis}."
        )
    if factor is None or tuple(factor.shape) != (shape[0], shape[0]):
        got = "none" if factor is None else f"shape {tuple(factor.shape)}"
        raise LplrValueError(
            f"Expected the {shape[0]}×{shape[0]} factor of the Hessian (gptq_factor(L̂ᵀ·L̂)) for gptq "
            f"rounding of a matrix with {shape[0]} rows. Got {got} instead."
        )


def encode_gptq_block(x: Any, scale: Any, offset: Any, bits: int, factor: Any) -> Any:
    """Codes of the k×m block ``x`` of R by error-feedback rounding against the basis (GPTQ, LDLQ).

    What counts is ``‖L̂·(W − R̂)‖_F``, not ``‖W − R̂‖_F``: with ``H = L̂ᵀ·L̂`` far from a multiple
    of the identity (the columns of a sketch are correlated), rounding each entry to nearest is a
    poor choice. Rows are coded in order 0..k−1; each row is rounded to nearest (clipped to the
    ``2**bits`` levels of its scale), and its rounding error, divided by ``U[i, i]``, is subtracted
    from the rows not yet coded through ``U[i, i+1:]`` (``U`` from :func:`gptq_factor`). This is
    GPTQ's update, which equals QuIP's LDLQ: each row's code is the nearest level to its target
    corrected for the errors of the rows before it.

    The updates are applied lazily, as GPTQ does: within a batch of :data:`GPTQ_BATCH` rows
    they go to the batch's own rows only, and the rows after it get the batch's errors at once,
    in one GEMM. The arithmetic is the same; the memory traffic falls from k²·m/2 to about
    k·m·GPTQ_BATCH/2 entries (several times faster at k = 1024 and m = 4096; measured:
    benchmarks/RESULTS.md, "Figures behind the code's comments").

    Every column is coded independently (each output column of those GEMMs is computed from the
    same column alone), so a column's codes do not depend on which other columns share the
    block: any column chunking of R gives the same codes (tested).

    Parameters
    ----------
    x : array of shape (k, m)
        Columns of W (numpy or cupy); computed in float64.
    scale, offset : arrays
        Broadcast against ``x`` (as for :func:`~lplr_dask.quantize.encode_block`); from the
        ranges of W, as nearest rounding's.
    bits : int
    factor : array of shape (k, k)
        From :func:`gptq_factor`; copied to ``x``'s device.

    Returns
    -------
    array of shape (k, m), ``code_dtype(bits)``

    References
    ----------
    .. [1] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh. "GPTQ: Accurate Post-Training
       Quantization for Generative Pre-trained Transformers." ICLR 2023.
    .. [2] J. Chee, Y. Cai, V. Kuleshov, C. De Sa. "QuIP: 2-Bit Quantization of Large Language
       Models With Guarantees." NeurIPS 2023 (LDLQ, Theorem 1: LDLQ is GPTQ).
    """
    xp = array_namespace(x)
    w = x.astype(np.float64, copy=True)
    s = xp.broadcast_to(scale, w.shape)
    o = xp.broadcast_to(offset, w.shape)
    U = xp.asarray(factor, dtype=np.float64)
    top = (1 << bits) - 1
    codes = xp.empty(w.shape, dtype=code_dtype(bits))
    k = w.shape[0]
    for b0 in range(0, k, GPTQ_BATCH):
        b1 = min(b0 + GPTQ_BATCH, k)
        errors = xp.empty((b1 - b0, w.shape[1]))
        for i in range(b0, b1):
            c = xp.clip(xp.rint((w[i] - o[i]) / s[i]), 0, top)
            codes[i] = c
            errors[i - b0] = err = (w[i] - (c * s[i] + o[i])) / U[i, i]
            if i + 1 < b1:
                w[i + 1 : b1] -= U[i, i + 1 : b1, None] * err[None, :]
        if b1 < k:
            w[b1:] -= U[b0:b1, b1:].T @ errors
    return codes

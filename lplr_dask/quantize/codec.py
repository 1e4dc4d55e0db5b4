"""Quantize a matrix and decode it back: the scales, then each block's codes by its rounding.

:func:`quantize` takes the ranges and scales of the whole matrix (:mod:`~lplr_dask.quantize.scalar`)
and codes it with the rounding its :class:`~lplr_dask.quantize.QuantizerSpec` names: nearest,
stochastic (uniforms from :mod:`~lplr_dask.quantize.rng`) or gptq
(:mod:`~lplr_dask.quantize.gptq`). Numpy and cupy arrays are coded at once, dask arrays block by
block (:func:`encode_blocks`), with the same codes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np

from lplr_dask.backend import array_namespace
from lplr_dask.errors import LplrValueError
from lplr_dask.quantize.gptq import check_gptq, encode_gptq_block, gptq_factor
from lplr_dask.quantize.rng import rounding_key, rounding_uniforms
from lplr_dask.quantize.scalar import block_scales, decode_block, encode_block, expand_groups, ranges, scale_from_range
from lplr_dask.quantize.spec import QuantizerSpec, check_bits, code_dtype, parse_quantizer

__all__ = ["Quantized", "quantize", "dequantize", "encode_blocks", "encode", "decode"]

Seed = int | np.random.SeedSequence | np.random.Generator | None


class Quantized(NamedTuple):
    """Codes and the affine map back: ``x ≈ codes * scale + offset``.

    ``scale`` and ``offset`` broadcast against ``codes`` (after
    :func:`~lplr_dask.quantize.expand_groups`).
    """

    codes: Any
    scale: Any
    offset: Any
    bits: int


def quantize(
    x: Any,
    bits: int,
    *,
    spec: QuantizerSpec | str = "paper",
    channel_axis: int = 1,
    seed: Seed = None,
    hessian: Any = None,
) -> Quantized:
    """Quantize a matrix to ``bits``-bit codes.

    Parameters
    ----------
    x : array of shape (m, c)
        numpy, cupy or dask array of floats.
    bits : int
        From 1 to 16; codes are uint8 for ``bits <= 8``, uint16 above.
    spec : QuantizerSpec or str, default="paper"
        The quantizer (see :func:`~lplr_dask.quantize.parse_quantizer`). ``"paper"`` is the
        reference semantics.
    channel_axis : {0, 1}, default=1
        Which axis indexes channels for ``channel``/``group`` scales.
    seed : int, SeedSequence or Generator, optional
        Seed for stochastic rounding (ignored for nearest rounding; None means 0). Each entry's
        uniform depends on the seed and the entry's position only
        (:func:`~lplr_dask.quantize.rounding_uniforms`), so numpy, cupy and dask inputs get the
        same codes, however they are chunked.
    hessian : array of shape (m, m), optional
        ``L̂ᵀ·L̂`` for the basis L̂ (·×m) that multiplies ``x`` (m×c): needed by, and only used by,
        ``gptq`` rounding (:func:`~lplr_dask.quantize.encode_gptq_block`), which needs
        ``channel_axis=0``.

    Returns
    -------
    Quantized
        ``codes`` (same shape as ``x``), ``scale`` and ``offset`` (see
        :func:`~lplr_dask.quantize.ranges`), ``bits``.

    Raises
    ------
    LplrValueError
        If ``bits`` is outside 1..16 or ``x`` is not 2-D; for ``gptq`` rounding, if ``hessian``
        is missing or not m×m, or ``channel_axis`` is not 0.

    Examples
    --------
    >>> q = quantize(np.array([[0.0, 1.0], [2.0, 3.0]]), 2)
    >>> q.codes.tolist()
    [[0, 1], [2, 3]]
    """
    bits = check_bits(bits)
    spec = parse_quantizer(spec)
    if getattr(x, "ndim", None) != 2:
        raise LplrValueError(f"Expected a 2-D array. Got shape {getattr(x, 'shape', None)} instead.")
    factor = None
    if spec.rounding == "gptq":
        if hessian is None:
            raise LplrValueError(
                "Expected hessian=L̂ᵀ·L̂ for gptq rounding, which feeds rounding errors through the "
                "basis L̂ that multiplies x. Pass the Hessian, or use nearest rounding."
            )
        factor = gptq_factor(hessian)
    lo, hi = ranges(x, spec, channel_axis=channel_axis)
    scale, offset = scale_from_range(lo, hi, bits)
    if _is_dask(x):
        codes = encode_blocks(x, bits, spec, scale, offset, channel_axis=channel_axis, seed=seed, factor=factor)
        return Quantized(codes, scale, offset, bits)
    g = spec.group_size if spec.granularity == "group" else 0
    s, o = (expand_groups(v, x.shape, g, channel_axis) for v in (scale, offset))
    if factor is not None:
        check_gptq(x.shape, factor, channel_axis)
        return Quantized(encode_gptq_block(x, s, o, bits, factor), scale, offset, bits)
    loc = [(0, x.shape[0]), (0, x.shape[1])]
    stochastic = spec.rounding == "stochastic"
    dither = rounding_uniforms(rounding_key(seed), loc, x.shape[1], array_namespace(x)) if stochastic else None
    return Quantized(encode_block(x, s, o, bits, dither=dither), scale, offset, bits)


def encode_blocks(
    x: Any,
    bits: int,
    spec: QuantizerSpec,
    scale: Any,
    offset: Any,
    *,
    channel_axis: int,
    seed: Seed = None,
    factor: Any = None,
) -> Any:
    """Codes of a dask array, block by block, given the scales (numpy or lazy dask).

    Each block takes the part of the scales that covers it; stochastic rounding takes the
    uniforms of the block's entries from :func:`~lplr_dask.quantize.rounding_uniforms` with the
    key :func:`~lplr_dask.quantize.rounding_key` makes of ``seed``, so the codes do not depend on
    the chunking or on which worker runs a block, and equal those of :func:`quantize` on the
    whole matrix.

    ``gptq`` rounding needs ``factor`` (k×k, :func:`~lplr_dask.quantize.gptq_factor`) and
    ``channel_axis=0``; its blocks hold all k rows (x is rechunked to one block of rows) and any
    number of columns, which it codes independently (:func:`~lplr_dask.quantize.encode_gptq_block`).
    """
    g = spec.group_size if spec.granularity == "group" else 0
    key = rounding_key(seed) if spec.rounding == "stochastic" else None
    width = x.shape[1]
    if spec.rounding == "gptq":
        check_gptq(x.shape, factor, channel_axis)
        x = x.rechunk({0: -1})

    def block(xb: Any, s: Any, o: Any, f: Any, block_info: Any = None) -> Any:
        loc = block_info[0]["array-location"]
        s, o = (block_scales(v, loc, g, channel_axis) for v in (s, o))
        if f is not None:
            return encode_gptq_block(xb, s, o, bits, f)
        dither = None if key is None else rounding_uniforms(key, loc, width, array_namespace(xb))
        return encode_block(xb, s, o, bits, dither=dither)

    dtype = code_dtype(bits)
    f = None if spec.rounding != "gptq" else dask.delayed(factor)
    return da.map_blocks(
        block, x, dask.delayed(scale), dask.delayed(offset), f, dtype=dtype, meta=x._meta.astype(dtype)
    )


def dequantize(q: Quantized, *, dtype: Any = np.float32, group_size: int = 0, channel_axis: int = 1) -> Any:
    """Decode a :class:`Quantized` back to floats: ``codes * scale + offset``.

    Parameters
    ----------
    q : Quantized
        From :func:`quantize`.
    dtype : dtype, default=float32
        Output dtype.
    group_size, channel_axis : int
        Needed only for ``group`` scales, as given to :func:`quantize`.
    """
    s, o = (expand_groups(v, q.codes.shape, group_size, channel_axis) for v in (q.scale, q.offset))
    return decode_block(q.codes, s, o, dtype)


def _is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask.")


# Aliases that read well at call sites.
encode = quantize
decode = dequantize

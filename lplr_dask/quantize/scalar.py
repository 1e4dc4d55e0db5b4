"""Uniform scalar quantization of one block: ranges, scales, codes, and back.

The reference semantics are those of Saha, Srivastava and Pilanci (2023) [1]_: one min-max range,
``2**B`` levels including both endpoints (step ``(max - min) / (2**B - 1)``) and round-to-nearest.
:func:`ranges` adds the granularities of :class:`~lplr_dask.quantize.QuantizerSpec` (per channel,
per group) and symmetric ranges; :func:`encode_block` adds stochastic rounding. Reductions are
the array's own, so on a dask array the scales come from a dask reduction.

References
----------
.. [1] R. Saha, V. Srivastava, M. Pilanci. "Matrix Compression via Randomized Low Rank and Low
   Precision Factorization." NeurIPS 2023. arXiv:2310.11028.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lplr_dask.backend import array_namespace
from lplr_dask.quantize.spec import QuantizerSpec, code_dtype

__all__ = [
    "ranges",
    "scale_from_range",
    "expand_groups",
    "block_scales",
    "encode_block",
    "decode_block",
]


def ranges(x: Any, spec: QuantizerSpec, *, channel_axis: int = 1) -> tuple[Any, Any]:
    """Return ``(lo, hi)`` of each scale group, shaped to broadcast over grouped ``x``.

    Parameters
    ----------
    x : array of shape (m, c)
        The matrix (numpy, cupy or dask).
    spec : QuantizerSpec
        The granularity and symmetry.
    channel_axis : {0, 1}, default=1
        The axis that indexes channels (1 for L, whose columns are channels; 0 for R).

    Returns
    -------
    lo, hi : arrays
        Shape (1, 1) for ``tensor``; (1, c) or (m, 1) for ``channel``; for ``group`` the long axis
        holds ``ceil(len / group_size)`` groups.
    """
    if spec.granularity == "group":
        xg = _to_groups(x, spec.group_size, channel_axis)
        group_axis = 1 if channel_axis == 1 else 2
        lo = _squeeze_groups(xg.min(axis=group_axis, keepdims=True), channel_axis)
        hi = _squeeze_groups(xg.max(axis=group_axis, keepdims=True), channel_axis)
    else:
        axis = None if spec.granularity == "tensor" else 1 - channel_axis
        lo = x.min(axis=axis, keepdims=True)
        hi = x.max(axis=axis, keepdims=True)
    if spec.symmetric:
        amax = np.maximum(abs(lo), abs(hi))
        lo, hi = -amax, amax
    return lo, hi


def _to_groups(x: Any, g: int, channel_axis: int) -> Any:
    """Reshape (m, c) into groups of ``g`` along the long axis, padding with edge values."""
    xp = array_namespace(x)
    long_axis = 1 - channel_axis
    length = x.shape[long_axis]
    ngroups = -(-length // g)
    pad = ngroups * g - length
    if pad:
        widths = [(0, 0), (0, 0)]
        widths[long_axis] = (0, pad)
        x = xp.pad(x, widths, mode="edge")
    if channel_axis == 1:  # long axis 0: (ngroups, g, c)
        return x.reshape(ngroups, g, x.shape[1])
    return x.reshape(x.shape[0], ngroups, g)  # (c, ngroups, g)


def _squeeze_groups(v: Any, channel_axis: int) -> Any:
    if channel_axis == 1:  # (ngroups, 1, c) -> (ngroups, c)
        return v.reshape(v.shape[0], v.shape[2])
    return v.reshape(v.shape[0], v.shape[1])  # (c, ngroups, 1) -> (c, ngroups)


def scale_from_range(lo: Any, hi: Any, bits: int) -> tuple[Any, Any]:
    """Step and offset for ``2**bits`` levels from ``lo`` to ``hi``; a zero range gets step 1."""
    levels = (1 << bits) - 1
    step = (hi - lo) / levels
    step = step + (step == 0) * 1.0
    return step, lo


def expand_groups(v: Any, shape: tuple[int, int], group_size: int, channel_axis: int) -> Any:
    """Repeat per-group values ``v`` along the long axis to cover a matrix of ``shape``."""
    return block_scales(v, [(0, shape[0]), (0, shape[1])], group_size, channel_axis)


def block_scales(v: Any, loc: list[tuple[int, int]], group_size: int, channel_axis: int) -> Any:
    """The part of per-channel or per-group values ``v`` that covers the block at ``loc``.

    ``loc`` is a dask ``array-location``: ``[(row_start, row_stop), (col_start, col_stop)]``.
    Axes of length 1 broadcast and are kept whole.
    """
    index: list[slice] = []
    long_axis = 1 - channel_axis
    for axis, (start, stop) in enumerate(loc):
        if v.shape[axis] == 1:
            index.append(slice(None))
        elif axis == long_axis and group_size:
            index.append(slice(start // group_size, -(-stop // group_size)))
        else:
            index.append(slice(start, stop))
    part = v[tuple(index)]
    if not group_size or part.shape[long_axis] == 1:
        return part
    # expand groups to entries; the block may start inside a group
    start, stop = loc[long_axis]
    out = array_namespace(part).repeat(part, group_size, axis=long_axis)
    first = start - (start // group_size) * group_size
    index = [slice(None), slice(None)]
    index[long_axis] = slice(first, first + stop - start)
    return out[tuple(index)]


def encode_block(
    x: Any,
    scale: Any,
    offset: Any,
    bits: int,
    *,
    dither: Any = None,
) -> Any:
    """Codes of one block given broadcastable ``scale`` and ``offset`` (nearest or stochastic).

    With ``dither`` (uniforms in [0, 1) shaped like ``x``, from
    :func:`~lplr_dask.quantize.rounding_uniforms`) the rounding is stochastic: ``floor(t + u)``,
    which is unbiased: ``E[code] = t`` inside the range.
    """
    xp = array_namespace(x)
    t = (x - offset) / scale
    t = xp.rint(t) if dither is None else xp.floor(t + dither)
    t = xp.clip(t, 0, (1 << bits) - 1)
    return t.astype(code_dtype(bits))


def decode_block(codes: Any, scale: Any, offset: Any, dtype: Any = np.float64) -> Any:
    """``codes * scale + offset`` in ``dtype``."""
    return (codes.astype(dtype) * scale + offset).astype(dtype, copy=False)

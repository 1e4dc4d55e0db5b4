"""Uniform scalar quantization: encode to integer codes with scales, decode back.

The reference semantics are those of Saha, Srivastava and Pilanci (2023), ``lplr()`` in the
authors' ``src/lplr/compressors.py``: one min-max range for the whole matrix, ``2**B`` levels
including both endpoints (step ``(max - min) / (2**B - 1)``) and round-to-nearest.

This module adds the choices that :class:`QuantizerSpec` names: the scale granularity (whole
matrix, per channel, per group of entries along the long axis), symmetric (abs-max) ranges and
stochastic rounding. Everything here works on numpy, cupy and dask arrays alike: reductions are
the array's own, so on a dask array the scales come from a dask reduction.

References
----------
.. [1] R. Saha, V. Srivastava, M. Pilanci. "Matrix Compression via Randomized Low Rank and Low
   Precision Factorization." NeurIPS 2023. arXiv:2310.11028.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import numpy as np

from lplr_dask.errors import LplrValueError

__all__ = [
    "QuantizerSpec",
    "Quantized",
    "parse_quantizer",
    "quantizer_pair",
    "rounding_key",
    "rounding_uniforms",
    "code_dtype",
    "quantize",
    "dequantize",
    "encode",
    "decode",
]

Granularity = Literal["tensor", "channel", "group"]
Rounding = Literal["nearest", "stochastic"]


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """How a factor is quantized.

    Parameters
    ----------
    granularity : {"tensor", "channel", "group"}, default="tensor"
        One range for the whole matrix; one per channel (a column of L, a row of R: the index
        along the rank axis); or one per group of ``group_size`` consecutive entries along the
        long axis within each channel.
    group_size : int, default=0
        Entries per group when ``granularity="group"``.
    symmetric : bool, default=False
        Use ``[-absmax, absmax]`` as the range instead of ``[min, max]``.
    rounding : {"nearest", "stochastic"}, default="nearest"
        Round-to-nearest, or unbiased stochastic rounding (seeded).
    """

    granularity: Granularity = "tensor"
    group_size: int = 0
    symmetric: bool = False
    rounding: Rounding = "nearest"

    def __post_init__(self) -> None:
        if self.granularity not in ("tensor", "channel", "group"):
            raise LplrValueError(
                f"Expected granularity 'tensor', 'channel' or 'group'. Got {self.granularity!r} instead."
            )
        if self.granularity == "group" and self.group_size < 1:
            raise LplrValueError(
                f"Expected a positive group_size with granularity 'group'. Got {self.group_size} instead."
            )
        if self.rounding not in ("nearest", "stochastic"):
            raise LplrValueError(
                f"Expected rounding 'nearest' or 'stochastic'. Got {self.rounding!r} instead."
            )

    @property
    def name(self) -> str:
        """A short name that :func:`parse_quantizer` reads back."""
        parts = [self.granularity if self.granularity != "group" else f"group{self.group_size}"]
        if self.symmetric:
            parts.append("sym")
        if self.rounding == "stochastic":
            parts.append("stochastic")
        return "-".join(parts)


#: Named presets. ``paper`` reproduces the reference semantics exactly; ``default`` (per-channel
#: min-max ranges, nearest rounding) had the lowest error at equal bytes on disk of every
#: granularity × symmetry × rounding measured (benchmarks/RESULTS.md, "Quantizers").
PRESETS: dict[str, QuantizerSpec] = {
    "paper": QuantizerSpec("tensor"),
    "default": QuantizerSpec("channel"),
}


def parse_quantizer(name: str | QuantizerSpec) -> QuantizerSpec:
    """Read a quantizer name: a preset (``paper``, ``default``) or ``GRAN[-sym][-stochastic]``.

    ``GRAN`` is ``tensor``, ``channel`` or ``groupN`` (for example ``group256``).

    Raises
    ------
    LplrValueError
        If the name is not of that form.
    """
    if isinstance(name, QuantizerSpec):
        return name
    if name in PRESETS:
        return PRESETS[name]
    head, *flags = name.split("-")
    unknown = set(flags) - {"sym", "stochastic"}
    try:
        if unknown:
            raise ValueError
        if head.startswith("group"):
            gran, group = "group", int(head[len("group") :])
        else:
            gran, group = head, 0
        return QuantizerSpec(
            gran,  # type: ignore[arg-type]
            group,
            symmetric="sym" in flags,
            rounding="stochastic" if "stochastic" in flags else "nearest",
        )
    except (ValueError, LplrValueError) as e:
        raise LplrValueError(
            f"Expected a quantizer: one of {sorted(PRESETS)} or GRAN[-sym][-stochastic] with GRAN "
            f"tensor, channel or groupN (e.g. 'group256-sym'). Got {name!r} instead."
        ) from e


def quantizer_pair(name: str | QuantizerSpec) -> tuple[QuantizerSpec, QuantizerSpec]:
    """The quantizers of L and of R: one name for both, or ``L_NAME:R_NAME``.

    Each name is one that :func:`parse_quantizer` reads, e.g. ``"channel:tensor"`` for per-column
    scales on L and one range for R.

    Raises
    ------
    LplrValueError
        If either name is not a quantizer, or there are more than two.
    """
    if isinstance(name, QuantizerSpec) or ":" not in name:
        spec = parse_quantizer(name)
        return spec, spec
    parts = name.split(":")
    if len(parts) != 2:
        raise LplrValueError(
            f"Expected one quantizer for both factors or two as L_NAME:R_NAME (e.g. 'channel:tensor'). Got {name!r} instead."
        )
    return parse_quantizer(parts[0]), parse_quantizer(parts[1])


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` as an int if it is within 1..16, else raise :class:`LplrValueError`."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise LplrValueError(f"Expected {what} to be an integer from 1 to 16. Got {bits!r} instead.")
    return int(bits)


def code_dtype(bits: int) -> np.dtype:
    """The unsigned integer dtype that holds ``bits``-bit codes: uint8 up to 8 bits, else uint16."""
    return np.dtype(np.uint8 if check_bits(bits) <= 8 else np.uint16)


class Quantized(NamedTuple):
    """Codes and the affine map back: ``x ≈ codes * scale + offset``.

    ``scale`` and ``offset`` broadcast against ``codes`` (after :func:`expand_groups`).
    """

    codes: Any
    scale: Any
    offset: Any
    bits: int


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
        axis = 1 if channel_axis == 1 else 2
        lo = _squeeze_groups(xg.min(axis=axis, keepdims=True), channel_axis)
        hi = _squeeze_groups(xg.max(axis=axis, keepdims=True), channel_axis)
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
    xp = _namespace(x)
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


def expand_groups(v: Any, shape: tuple[int, int], group_size: int, channel_axis: int) -> Any:
    """Repeat per-group values ``v`` along the long axis to cover a matrix of ``shape``."""
    return block_scales(v, [(0, shape[0]), (0, shape[1])], group_size, channel_axis)


def scale_from_range(lo: Any, hi: Any, bits: int) -> tuple[Any, Any]:
    """Step and offset for ``2**bits`` levels from ``lo`` to ``hi``; a zero range gets step 1."""
    levels = (1 << bits) - 1
    step = (hi - lo) / levels
    step = step + (step == 0) * 1.0
    return step, lo


def _namespace(x: Any) -> Any:
    from lplr_dask.backend import array_namespace

    return array_namespace(x)


def encode_block(
    x: Any,
    scale: Any,
    offset: Any,
    bits: int,
    *,
    dither: Any = None,
) -> Any:
    """Codes of one block given broadcastable ``scale`` and ``offset`` (nearest or stochastic).

    With ``dither`` (uniforms in [0, 1) shaped like ``x``, from :func:`rounding_uniforms`) the
    rounding is stochastic: ``floor(t + u)``, which is unbiased: ``E[code] = t`` inside the range.
    """
    xp = _namespace(x)
    t = (x - offset) / scale
    t = xp.rint(t) if dither is None else xp.floor(t + dither)
    t = xp.clip(t, 0, (1 << bits) - 1)
    return t.astype(code_dtype(bits))


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


def decode_block(codes: Any, scale: Any, offset: Any, dtype: Any = np.float64) -> Any:
    """``codes * scale + offset`` in ``dtype``."""
    return (codes.astype(dtype) * scale + offset).astype(dtype, copy=False)


def quantize(
    x: Any,
    bits: int,
    *,
    spec: QuantizerSpec | str = "paper",
    channel_axis: int = 1,
    seed: int | np.random.SeedSequence | np.random.Generator | None = None,
) -> Quantized:
    """Quantize a matrix to ``bits``-bit codes.

    Parameters
    ----------
    x : array of shape (m, c)
        numpy, cupy or dask array of floats.
    bits : int
        From 1 to 16; codes are uint8 for ``bits <= 8``, uint16 above.
    spec : QuantizerSpec or str, default="paper"
        The quantizer (see :func:`parse_quantizer`). ``"paper"`` is the reference semantics.
    channel_axis : {0, 1}, default=1
        Which axis indexes channels for ``channel``/``group`` scales.
    seed : int, SeedSequence or Generator, optional
        Seed for stochastic rounding (ignored for nearest rounding; None means 0). Each entry's
        uniform depends on the seed and the entry's position only (:func:`rounding_uniforms`),
        so numpy, cupy and dask inputs get the same codes, however they are chunked.

    Returns
    -------
    Quantized
        ``codes`` (same shape as ``x``), ``scale`` and ``offset`` (see :func:`ranges`), ``bits``.

    Raises
    ------
    LplrValueError
        If ``bits`` is outside 1..16 or ``x`` is not 2-D.

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
    lo, hi = ranges(x, spec, channel_axis=channel_axis)
    scale, offset = scale_from_range(lo, hi, bits)
    g = spec.group_size if spec.granularity == "group" else 0
    stochastic = spec.rounding == "stochastic"
    if _is_dask(x):
        codes = encode_blocks(x, bits, spec, scale, offset, channel_axis=channel_axis, seed=seed)
        return Quantized(codes, scale, offset, bits)
    s, o = (expand_groups(v, x.shape, g, channel_axis) for v in (scale, offset))
    loc = [(0, x.shape[0]), (0, x.shape[1])]
    dither = rounding_uniforms(rounding_key(seed), loc, x.shape[1], _namespace(x)) if stochastic else None
    return Quantized(encode_block(x, s, o, bits, dither=dither), scale, offset, bits)


def encode_blocks(
    x: Any,
    bits: int,
    spec: QuantizerSpec,
    scale: Any,
    offset: Any,
    *,
    channel_axis: int,
    seed: int | np.random.SeedSequence | np.random.Generator | None = None,
) -> Any:
    """Codes of a dask array, block by block, given the scales (numpy or lazy dask).

    Each block takes the part of the scales that covers it; stochastic rounding takes the
    uniforms of the block's entries from :func:`rounding_uniforms` with the key
    :func:`rounding_key` makes of ``seed``, so the codes do not depend on the chunking or on
    which worker runs a block, and equal those of :func:`quantize` on the whole matrix.
    """
    import dask
    import dask.array as da

    g = spec.group_size if spec.granularity == "group" else 0
    key = rounding_key(seed) if spec.rounding == "stochastic" else None
    width = x.shape[1]

    def block(xb: Any, s: Any, o: Any, block_info: Any = None) -> Any:
        loc = block_info[0]["array-location"]
        s, o = (block_scales(v, loc, g, channel_axis) for v in (s, o))
        dither = None if key is None else rounding_uniforms(key, loc, width, _namespace(xb))
        return encode_block(xb, s, o, bits, dither=dither)

    dtype = code_dtype(bits)
    return da.map_blocks(
        block, x, dask.delayed(scale), dask.delayed(offset), dtype=dtype, meta=x._meta.astype(dtype)
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
    out = _namespace(part).repeat(part, group_size, axis=long_axis)
    first = start - (start // group_size) * group_size
    index = [slice(None), slice(None)]
    index[long_axis] = slice(first, first + stop - start)
    return out[tuple(index)]


def _is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask.")


# Aliases that read well at call sites.
encode = quantize
decode = dequantize

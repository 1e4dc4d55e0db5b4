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


#: Named presets. ``paper`` reproduces the reference semantics exactly.
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
    rng: np.random.Generator | None = None,
) -> Any:
    """Codes of one block given broadcastable ``scale`` and ``offset`` (nearest or stochastic).

    With ``rng`` the rounding is stochastic: ``floor(t + u)`` with ``u ~ U[0, 1)``, which is
    unbiased: ``E[code] = t``.
    """
    xp = _namespace(x)
    t = (x - offset) / scale
    if rng is None:
        t = xp.rint(t)
    else:
        t = xp.floor(t + xp.asarray(rng.random(t.shape)))  # drawn on the host: same codes on a GPU
    t = xp.clip(t, 0, (1 << bits) - 1)
    return t.astype(code_dtype(bits))


def decode_block(codes: Any, scale: Any, offset: Any, dtype: Any = np.float64) -> Any:
    """``codes * scale + offset`` in ``dtype``."""
    return (codes.astype(dtype) * scale + offset).astype(dtype, copy=False)


def quantize(
    x: Any,
    bits: int,
    *,
    spec: QuantizerSpec | str = "paper",
    channel_axis: int = 1,
    seed: int | np.random.Generator | None = None,
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
    seed : int or Generator, optional
        Seed for stochastic rounding (ignored for nearest rounding). Dask inputs derive one
        stream per block from it.

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
    rng = _as_generator(seed) if stochastic else None
    return Quantized(encode_block(x, s, o, bits, rng=rng), scale, offset, bits)


def encode_blocks(
    x: Any,
    bits: int,
    spec: QuantizerSpec,
    scale: Any,
    offset: Any,
    *,
    channel_axis: int,
    seed: int | None = None,
) -> Any:
    """Codes of a dask array, block by block, given the scales (numpy or lazy dask).

    Each block takes the part of the scales that covers it; stochastic rounding draws from a
    stream derived from ``seed`` and the block's position, so results do not depend on which
    worker runs a block.
    """
    import dask
    import dask.array as da

    g = spec.group_size if spec.granularity == "group" else 0
    stochastic = spec.rounding == "stochastic"

    def block(xb: Any, s: Any, o: Any, block_info: Any = None) -> Any:
        loc = block_info[0]["array-location"]
        s, o = (block_scales(v, loc, g, channel_axis) for v in (s, o))
        return encode_block(xb, s, o, bits, rng=_block_rng(seed, loc) if stochastic else None)

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


def _as_generator(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _block_rng(seed: Any, loc: list[tuple[int, int]]) -> np.random.Generator:
    """A generator for the block at ``loc``, derived from ``seed`` and the block's position."""
    base = int(seed) if seed is not None and not isinstance(seed, np.random.Generator) else 0
    return np.random.default_rng(np.random.SeedSequence(base, spawn_key=(loc[0][0], loc[1][0])))


def _is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask.")


# Aliases that read well at call sites.
encode = quantize
decode = dequantize

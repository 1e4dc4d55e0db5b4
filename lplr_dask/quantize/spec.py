"""The names and grammar of quantizers: :class:`QuantizerSpec`, its presets, and the bit widths.

A quantizer is named ``GRAN[-sym][-stochastic|-gptq]`` (:func:`parse_quantizer`), or one for each
factor as ``L_NAME:R_NAME`` (:func:`quantizer_pair`); :data:`PRESETS` names the measured choices.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from lplr_dask.errors import LplrValueError
from lplr_dask.validation import parse_choice, parse_int

__all__ = [
    "Granularity",
    "Rounding",
    "GRANULARITIES",
    "ROUNDINGS",
    "PRESETS",
    "QuantizerSpec",
    "parse_quantizer",
    "quantizer_pair",
    "check_bits",
    "code_dtype",
]

Granularity = Literal["tensor", "channel", "group"]
Rounding = Literal["nearest", "stochastic", "gptq"]

#: The scale granularities, in the order names list them.
GRANULARITIES = ("tensor", "channel", "group")

#: The rounding modes, in the order names list them.
ROUNDINGS = ("nearest", "stochastic", "gptq")


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
    rounding : {"nearest", "stochastic", "gptq"}, default="nearest"
        Round-to-nearest; unbiased stochastic rounding (seeded); or, for R only, error-feedback
        rounding against the basis L̂ (:func:`~lplr_dask.quantize.encode_gptq_block`): the
        scales are the same as nearest rounding's, the codes minimize ``‖L̂·(W − R̂)‖_F`` greedily.

    Raises
    ------
    LplrValueError
        If ``granularity`` or ``rounding`` is not one of the above, or ``group_size`` is not a
        positive integer with granularity ``group``.
    """

    granularity: Granularity = "tensor"
    group_size: int = 0
    symmetric: bool = False
    rounding: Rounding = "nearest"

    def __post_init__(self) -> None:
        parse_choice(self.granularity, "granularity", GRANULARITIES)
        if self.granularity == "group":
            parse_int(self.group_size, "group_size with granularity 'group'", minimum=1)
        parse_choice(self.rounding, "rounding", ROUNDINGS)

    @property
    def name(self) -> str:
        """A short name that :func:`parse_quantizer` reads back."""
        parts = [self.granularity if self.granularity != "group" else f"group{self.group_size}"]
        if self.symmetric:
            parts.append("sym")
        if self.rounding != "nearest":
            parts.append(self.rounding)
        return "-".join(parts)


#: Named presets: a name :func:`quantizer_pair` reads. ``paper`` reproduces the reference
#: semantics exactly. ``default`` — per-channel min-max ranges (columns of L, rows of R), nearest
#: rounding for L and gptq rounding against L̂ for R — had, on the paper's sketch, the lowest error
#: at equal bytes on disk over every cell measured with and without a power iteration (without
#: power iterations alone ``channel:tensor-gptq`` is a little lower, but its one range for R breaks
#: down on an ill-conditioned basis), and on the default's range-oversampled sketch a lower error
#: than the paper's method in every cell: benchmarks/RESULTS.md, "Quantizers" (its paragraphs
#: "The default now" and "The quantizer, on the paper's sketch").
PRESETS: dict[str, str] = {
    "paper": "tensor",
    "default": "channel:channel-gptq",
}

_NAME_FORM = "GRAN[-sym][-stochastic|-gptq] with GRAN tensor, channel or groupN (e.g. 'group256-sym', 'channel-gptq')"


def parse_quantizer(name: str | QuantizerSpec) -> QuantizerSpec:
    """Read the quantizer of one factor: a preset or ``GRAN[-sym][-stochastic|-gptq]``.

    ``GRAN`` is ``tensor``, ``channel`` or ``groupN`` (for example ``group256``). A preset that
    names two quantizers (``L_NAME:R_NAME``) is read by :func:`quantizer_pair` only.

    Raises
    ------
    LplrValueError
        If the name is not of that form, or is a preset of two quantizers.
    """
    if isinstance(name, QuantizerSpec):
        return name
    if name in PRESETS:
        if ":" in PRESETS[name]:
            raise LplrValueError(
                f"Expected the quantizer of one factor. Got the preset {name!r}, which names one for L "
                f"and one for R ({PRESETS[name]!r}); read it with quantizer_pair({name!r})."
            )
        name = PRESETS[name]
    head, *flags = name.split("-")
    unknown = set(flags) - {"sym", *ROUNDINGS[1:]}
    try:
        roundings = [f for f in flags if f in ROUNDINGS]
        if unknown or len(roundings) > 1:
            raise ValueError
        if head.startswith("group"):
            gran, group = "group", int(head[len("group") :])
        else:
            gran, group = head, 0
        return QuantizerSpec(
            gran,  # type: ignore[arg-type]
            group,
            symmetric="sym" in flags,
            rounding=roundings[0] if roundings else "nearest",  # type: ignore[arg-type]
        )
    except (ValueError, LplrValueError) as e:
        raise LplrValueError(
            f"Expected a quantizer: one of {sorted(PRESETS)} or {_NAME_FORM}. Got {name!r} instead."
        ) from e


def quantizer_pair(name: str | QuantizerSpec) -> tuple[QuantizerSpec, QuantizerSpec]:
    """The quantizers of L and of R: one name for both, or ``L_NAME:R_NAME``.

    Each name is one that :func:`parse_quantizer` reads, e.g. ``"channel:tensor"`` for per-column
    scales on L and one range for R. ``gptq`` rounding is for R only: one name such as
    ``"channel-gptq"`` gives L the same quantizer with nearest rounding (``channel:channel-gptq``).

    Raises
    ------
    LplrValueError
        If either name is not a quantizer, there are more than two, or L's rounding is ``gptq``.
    """
    if isinstance(name, str) and name in PRESETS:
        name = PRESETS[name]
    if isinstance(name, QuantizerSpec) or ":" not in name:
        spec = parse_quantizer(name)
        if spec.rounding == "gptq":
            return dataclasses.replace(spec, rounding="nearest"), spec
        return spec, spec
    parts = name.split(":")
    if len(parts) != 2:
        raise LplrValueError(
            f"Expected one quantizer for both factors or two as L_NAME:R_NAME (e.g. 'channel:tensor'). Got {name!r} instead."
        )
    spec_l, spec_r = parse_quantizer(parts[0]), parse_quantizer(parts[1])
    if spec_l.rounding == "gptq":
        raise LplrValueError(
            f"Expected nearest or stochastic rounding for L: gptq rounding feeds R's rounding errors "
            f"through the basis L̂, and L has no such basis (its own rounding error is absorbed by the "
            f"least squares W = pinv(L̂)·A). Got {name!r}; put -gptq on R's quantizer, e.g. '"
            f"{dataclasses.replace(spec_l, rounding='nearest').name}:"
            f"{dataclasses.replace(spec_r, rounding='gptq').name}'."
        )
    return spec_l, spec_r


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` as an int if it is within 1..16, else raise :class:`LplrValueError`."""
    return parse_int(bits, what, minimum=1, maximum=16)


def code_dtype(bits: int) -> np.dtype:
    """The unsigned integer dtype that holds ``bits``-bit codes: uint8 up to 8 bits, else uint16."""
    return np.dtype(np.uint8 if check_bits(bits) <= 8 else np.uint16)

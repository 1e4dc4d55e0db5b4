"""What a compression is asked to do: :class:`Options` (how) and :class:`SizeRule` (how big).

Both are frozen and validated when made, so the code below the public boundary never checks an
argument again: :func:`lplr_dask.compress` and the CLI build them from what the user gave, the
sizing (:mod:`lplr_dask.budget`, :mod:`lplr_dask.target`) turns the size rule into a rank, and
:func:`lplr_dask.job.compress_at_rank` compresses at that rank with these options.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import dask.config
import numpy as np

import lplr_dask.config  # noqa: F401  (the lplr.max-rank default in dask.config)
from lplr_dask.backend import check_device
from lplr_dask.blocks import compute_dtype
from lplr_dask.errors import LplrTypeError, LplrValueError
from lplr_dask.factorize import Params, check_oversample, resolve_oversample
from lplr_dask.lanes import DEFAULT_ZETA, LANES
from lplr_dask.quantize import QuantizerSpec, check_bits, quantizer_pair
from lplr_dask.validation import at_most_one, parse_bool, parse_choice, parse_float, parse_int

__all__ = [
    "BACKBONE_STARTS",
    "SKETCHES",
    "DEFAULT_SKETCH",
    "MIN_ZETA",
    "sketch_params",
    "DEFAULT_BITS",
    "MAX_RANK_KEY",
    "Options",
    "SizeRule",
    "SIZE_FLAGS",
    "check_job",
    "configured_max_rank",
    "check_backbone_rounds",
    "is_backbone_search",
]

#: (B1, B2) unless given, or chosen for a bits-per-entry budget.
DEFAULT_BITS = (8, 8)

#: The range sketches of pass 1: the paper's dense Gaussian S, or a lane sparse sign embedding
#: (:mod:`lplr_dask.lanes`: ``DEFAULT_ZETA`` non-zeros per row, a compiled kernel).
SKETCHES = ("gaussian", "sparse")

#: The sketch unless one is asked for: the sparse one, as accurate as the Gaussian within 1% (geometric
#: mean 0.996 of the errors over 36 cells at equal bytes) at a fraction of pass 1's cost
#: (benchmarks/RESULTS.md, "CPU cost of a pass").
DEFAULT_SKETCH = "sparse"

#: Fewest non-zeros per row of a sparse sketch: a narrower sketch (under ``2·LANES`` = 32 columns)
#: is Gaussian, whose GEMM is cheap at that width anyway.
MIN_ZETA = 2

#: What the backbone's first round starts from: ``Q = Q_B0(A)`` ("backbone", LQER-like), or the
#: factors of A first and Q from what they leave ("factors": better on matrices close to low rank
#: and on low rank plus outliers, benchmarks/RESULTS.md "Beyond low rank").
BACKBONE_STARTS = ("backbone", "factors")
#: The size keywords and their CLI flags, in the order messages name them.
SIZE_FLAGS = {
    "rank": "--rank",
    "bits_per_entry": "--bits-per-entry",
    "match_nq": "--match-nq",
    "target_error": "--target-error",
}

#: The Dask-config key of the largest rank a budget or a fair rank may set (default in lplr.yaml).
MAX_RANK_KEY = "lplr.max-rank"

SizeKind = Literal["rank", "bits_per_entry", "match_nq", "target_error"]


@dataclasses.dataclass(frozen=True)
class Options:
    """The settings that determine the codes, and where they are computed.

    Parameters
    ----------
    bits : (int, int), default=(8, 8)
        B1 for L and B2 for R, each from 1 to 16.
    passes : {1, 2}, default=2
    power_iters : int, default=0
        Two-pass only.
    oversample : int, optional
        Extra range-sketch columns p (default: p = k).
    quantizer : str or QuantizerSpec, default="default"
    seed : int, default=0
    test_columns : int, default=10
    precision : {"auto", "float32", "float64"}, default="auto"
    sketch : {"gaussian", "sparse"}, optional
        The range sketch of pass 1 (:data:`SKETCHES`); None: :data:`DEFAULT_SKETCH`, or for
        ``--resume`` the sketch the store was started with (:func:`lplr_dask.job.compress_at_rank`).
    device : {"cpu", "cuda"}, default="cpu"
    cache_input : bool, default=False
        Two-pass only: keep A's decoded chunks in the workers' memory from pass 1 to pass 2 when
        they fit (:func:`lplr_dask.job.compress_at_rank`); it changes no code.
    storage_options : dict, optional
        fsspec options for a remote source and output.
    appendable : bool, default=False
        Keep the one-pass sketches in the store, so that rows or columns can be appended later
        without reading A again (:func:`lplr_dask.append`); one-pass mode only. It changes no code.
    backbone_bits : int, default=0
        B0 of a quantized backbone, ``A ≈ Q + L·R`` (:mod:`lplr_dask.backbone`), 1 to 16; 0: none.
    backbone_iters : int, default=1
        Rounds of the backbone (each one more read of A and the passes of the factors again).
    backbone_start : {"backbone", "factors"}, optional
        What the backbone's first round starts from (:data:`BACKBONE_STARTS`). Default: "backbone",
        or with ``backbone_bits="auto"`` the start the budget search predicts best.

    See :func:`lplr_dask.compress` for what each means. A bad value raises
    :class:`~lplr_dask.errors.LplrValueError` (or :class:`~lplr_dask.errors.LplrTypeError`)
    when the object is made.
    """

    bits: tuple[int, int] = DEFAULT_BITS
    passes: int = 2
    power_iters: int = 0
    oversample: int | None = None
    quantizer: Any = "default"
    seed: int = 0
    test_columns: int = 10
    precision: str = "auto"
    sketch: str | None = None
    device: str = "cpu"
    cache_input: bool = False
    storage_options: dict[str, Any] | None = dataclasses.field(default=None, compare=False)
    appendable: bool = False
    backbone_bits: int = 0
    backbone_iters: int = 1
    backbone_start: str | None = None

    def __post_init__(self) -> None:
        bits = self.bits
        if not isinstance(bits, (tuple, list)) or len(bits) != 2:
            raise LplrValueError(f"Expected bits to be a pair (B1, B2). Got {bits!r} instead.")
        object.__setattr__(self, "bits", (check_bits(bits[0], "B1"), check_bits(bits[1], "B2")))
        if self.passes not in (1, 2) or isinstance(self.passes, bool):
            raise LplrValueError(f"Expected passes 1 or 2. Got {self.passes!r}.")
        if (
            isinstance(self.power_iters, bool)
            or not isinstance(self.power_iters, (int, np.integer))
            or self.power_iters < 0
        ):
            raise LplrValueError(f"Expected power_iters >= 0. Got {self.power_iters!r}.")
        object.__setattr__(self, "power_iters", int(self.power_iters))
        if self.passes == 1 and self.power_iters:
            raise LplrValueError(
                "Expected no power iterations (power_iters=0) with one pass (passes=1, --passes 1): each power "
                f"iteration reads A twice more. Got power_iters={self.power_iters} (--power-iters) instead. "
                "Use passes=2 (--passes 2)."
            )
        check_oversample(self.oversample)
        object.__setattr__(self, "cache_input", parse_bool(self.cache_input, "cache_input"))
        if self.cache_input and self.passes == 1:
            raise LplrValueError(
                "Expected cache_input (--cache-input) with two passes: it keeps A's chunks in memory for the "
                "second read, and one pass (passes=1, --passes 1) reads A once. Got both instead. Drop one of them."
            )
        object.__setattr__(self, "seed", _seed(self.seed))
        object.__setattr__(self, "test_columns", parse_int(self.test_columns, "test_columns", minimum=1))
        compute_dtype(np.float32, self.precision)  # rejects a bad name
        if self.sketch is not None:
            parse_choice(self.sketch, "sketch", SKETCHES)
        quantizer_pair(self.quantizer)
        check_device(self.device)
        object.__setattr__(self, "appendable", parse_bool(self.appendable, "appendable (--appendable)"))
        if self.appendable and self.passes != 1:
            raise LplrValueError(
                "Expected one pass (passes=1, --passes 1) with appendable=True (--appendable): an append updates "
                f"the one-pass sketches. Got passes={self.passes} instead. Add --passes 1."
            )

        object.__setattr__(
            self,
            "backbone_bits",
            parse_int(
                self.backbone_bits, "backbone_bits (--backbone)", minimum=0, maximum=16, hint="0 is no backbone."
            ),
        )
        object.__setattr__(
            self, "backbone_iters", parse_int(self.backbone_iters, "backbone_iters (--backbone-iters)", minimum=1)
        )
        if self.backbone_start is not None:
            parse_choice(self.backbone_start, "backbone_start (--backbone-start)", BACKBONE_STARTS)
        if self.backbone_bits and self.appendable:
            raise LplrValueError(
                "Expected appendable=True (--appendable) without a backbone: an append updates the one-pass "
                f"sketches of A, and with backbone_bits={self.backbone_bits} (--backbone) they are of A − Q. "
                "Drop one of them."
            )

    @property
    def specs(self) -> tuple[QuantizerSpec, QuantizerSpec]:
        """The quantizers of L and R."""
        return quantizer_pair(self.quantizer)

    @property
    def quantizer_name(self) -> str:
        """The quantizer's name as the attrs record it."""
        return self.quantizer if isinstance(self.quantizer, str) else self.specs[0].name

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def params(self, rank: int, shape: tuple[int, int], dtype: Any) -> Params:
        """What determines the codes of a rank-``rank`` compression of a matrix of ``shape`` and ``dtype``."""
        spec_l, spec_r = self.specs
        oversample = resolve_oversample(self.oversample, rank, shape)
        return Params(
            rank=rank,
            bits=self.bits,
            quantizer=self.quantizer_name,
            spec_l=spec_l,
            spec_r=spec_r,
            seed=self.seed,
            passes=self.passes,
            power_iters=self.power_iters,
            test_columns=self.test_columns,
            precision=compute_dtype(dtype, self.precision).name,
            range_oversample=oversample,
            **sketch_params(self.sketch, rank + oversample),
            backbone_bits=self.backbone_bits,
            backbone_iters=self.backbone_iters if self.backbone_bits else 1,
            backbone_start=(self.backbone_start or "backbone") if self.backbone_bits else "backbone",
        )


def sketch_params(kind: str | None, columns: int) -> dict[str, Any]:
    """The ``sketch`` and ``zeta`` of :class:`~lplr_dask.factorize.Params` for a sketch ``kind``
    (None: :data:`DEFAULT_SKETCH`) of ``columns`` columns: a sparse one has ``DEFAULT_ZETA``
    non-zeros per row, fewer when its columns cannot hold that many groups of
    :data:`~lplr_dask.lanes.LANES` (one group per non-zero), and is Gaussian below
    :data:`MIN_ZETA` groups (fewer than 32 columns: k + p < 32)."""
    zeta = min(DEFAULT_ZETA, columns // LANES) if (kind or DEFAULT_SKETCH) == "sparse" else 0
    return {"sketch": "sparse", "zeta": zeta} if zeta >= MIN_ZETA else {"sketch": "gaussian", "zeta": 0}


def _seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LplrTypeError(f"Expected seed to be a non-negative integer (stored in the attrs). Got {seed!r}.")
    return int(seed)


@dataclasses.dataclass(frozen=True)
class SizeRule:
    """How the rank is set: exactly one of a rank, a budget, a fair rank, or a target error.

    Attributes
    ----------
    kind : {"rank", "bits_per_entry", "match_nq", "target_error"}
    value : int or float
        The rank (an int >= 1); bits per entry of A on disk (> 0); the bits B of naive
        quantization whose size the factors match (> 0); or the relative error to meet, in (0, 1).
    """

    kind: SizeKind
    value: float

    def __post_init__(self) -> None:
        if self.kind not in SIZE_FLAGS:
            raise LplrValueError(f"Expected a size rule of {', '.join(SIZE_FLAGS)}. Got {self.kind!r} instead.")
        v = self.value
        if self.kind == "rank":
            v = parse_int(v, "rank (--rank)", minimum=1, hint="A rank is from 1 to min(n, d).")
        elif self.kind == "target_error":
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0 < v < 1:
                raise LplrValueError(
                    f"Expected a target relative error between 0 and 1 (e.g. 0.05). Got {v!r} instead."
                )
            v = float(v)
        elif self.kind == "bits_per_entry":
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0:
                raise LplrValueError(f"Expected a positive bits-per-entry budget. Got {v!r} instead.")
            v = float(v)
        else:
            v = parse_float(v, "match_nq (--match-nq)", low=0, inclusive=(False, True))
        object.__setattr__(self, "value", v)

    @classmethod
    def from_args(
        cls,
        *,
        rank: int | None = None,
        bits_per_entry: float | None = None,
        match_nq: float | None = None,
        target_error: float | None = None,
    ) -> SizeRule:
        """The rule from the one keyword given.

        Raises
        ------
        LplrValueError
            If none or more than one is given, or its value is out of range.
        """
        given = {
            k: v
            for k, v in (
                ("rank", rank),
                ("bits_per_entry", bits_per_entry),
                ("match_nq", match_nq),
                ("target_error", target_error),
            )
            if v is not None
        }
        if target_error is not None and len(given) > 1:
            raise LplrValueError("Give target_error (--target-error) alone, without rank, bits_per_entry or match_nq.")
        if len(given) != 1:
            names = " or ".join(
                [
                    ", ".join(f"{k} ({f})" for k, f in list(SIZE_FLAGS.items())[:-1]),
                    f"target_error ({SIZE_FLAGS['target_error']})",
                ]
            )
            raise LplrValueError(f"Expected exactly one of {names}. Got {', '.join(given) if given else 'none'}.")
        ((kind, value),) = given.items()
        return cls(kind, value)  # type: ignore[arg-type]

    def as_kwargs(self) -> dict[str, float]:
        """``{kind: value}``, the keyword :func:`lplr_dask.compress` takes."""
        return {self.kind: self.value}


def configured_max_rank() -> int:
    """The documented maximum rank: the Dask config ``lplr.max-rank`` (default 4096, ``lplr.yaml``).

    A rank that ``bits_per_entry`` or ``match_nq`` sets is capped at it
    (:func:`lplr_dask.budget.resolve_rank`), and the plans of ``target_error`` and of a budget
    without bits stop at it: the central steps (the ℓ×ℓ Gram of the sketch and its eigh, the
    k×k GPTQ factor, pinv's SVD) cost O(k³) on one process. Set it like any Dask setting:
    ``DASK_LPLR__MAX_RANK=8192`` or ``dask.config.set({"lplr.max-rank": 8192})``.

    Raises
    ------
    LplrValueError
        If the setting is not an integer >= 1.
    """
    value = dask.config.get(MAX_RANK_KEY)
    if isinstance(value, str) and value.strip().isdigit():  # a YAML or environment string
        value = int(value)
    return parse_int(value, f"the Dask config {MAX_RANK_KEY} (DASK_LPLR__MAX_RANK)", minimum=1)


def check_job(overwrite: bool, resume: bool) -> None:
    """Refuse both ``overwrite`` and ``resume``."""
    at_most_one("overwrite (--overwrite) and resume (--resume)", overwrite=overwrite, resume=resume)


def is_backbone_search(backbone_bits: Any) -> bool:
    """Whether ``backbone_bits`` asks the budget search to choose the backbone (``"auto"``)."""
    return isinstance(backbone_bits, str) and backbone_bits == "auto"


def check_backbone_rounds(backbone_bits: Any, backbone_iters: Any, backbone_start: Any) -> None:
    """Refuse rounds (``backbone_iters``) or a start (``backbone_start``) without a backbone: they
    would change nothing. ``backbone_bits="auto"`` takes them for the backbone it may choose."""
    if backbone_bits or (backbone_iters == 1 and backbone_start is None):
        return
    given = ", ".join(
        f"{name}={value!r} ({flag})"
        for name, value, flag, unset in (
            ("backbone_iters", backbone_iters, "--backbone-iters", 1),
            ("backbone_start", backbone_start, "--backbone-start", None),
        )
        if value != unset
    )
    raise LplrValueError(
        f"Expected {given} with a backbone: without one (backbone_bits=0) it changes nothing. "
        "Give --backbone B0 (or auto with --bits-per-entry), or drop it."
    )

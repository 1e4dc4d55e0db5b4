"""The ``lplr`` attrs of a store, validated once: their types, and the array shapes they imply.

One ``parse_*`` function per part of the attrs (zarr's style): each takes the raw JSON value and
returns it checked, or raises :class:`~lplr_dask.errors.StoreFormatError` with "Expected … Got …
instead." naming the store and the key. Keys a reader does not know are ignored (docs/FORMAT.md:
later versions may add optional ones), inside ``quantizer.L`` and ``quantizer.R`` too.
:func:`array_shapes` gives the shape every array of a complete store must have.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from lplr_dask.errors import StoreFormatError
from lplr_dask.quantize import ROUNDINGS, QuantizerSpec

__all__ = ["parse_meta", "parse_quantizer_spec", "array_shapes", "arrays_of", "ARRAYS", "BACKBONE_ARRAYS"]

#: The arrays of a complete store, in the order readers check them.
ARRAYS = ("L/codes", "L/scale", "L/offset", "R/codes", "R/scale", "R/offset")
#: The arrays a store with a backbone (format version 3, attrs ``backbone``) has besides.
BACKBONE_ARRAYS = ("Q/codes", "Q/scale", "Q/offset")


def arrays_of(meta: dict[str, Any]) -> tuple[str, ...]:
    """The arrays a complete store with the (parsed) attrs ``meta`` has."""
    return ARRAYS + (BACKBONE_ARRAYS if meta.get("backbone") else ())


_GRANULARITIES = ("tensor", "channel", "group")
_FIX = "The store is damaged or was not written by lplr-dask; recompress or restore it."


def _fail(where: str, key: str, expected: str, value: Any) -> StoreFormatError:
    return StoreFormatError(f"Expected attrs 'lplr.{key}' of {where!r} to be {expected}. Got {value!r} instead. {_FIX}")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(meta: dict[str, Any], key: str, where: str, *, low: int = 0, high: int | None = None, path: str = "") -> int:
    value = meta.get(key)
    if not _is_int(value) or value < low or (high is not None and value > high):
        span = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise _fail(where, path or key, span, value)
    return int(value)


def _int_pair(value: Any, where: str, key: str, *, low: int, high: int | None = None) -> list[int]:
    span = f"{low} to {high}" if high is not None else f">= {low}"
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(_is_int(v) and v >= low for v in value)
        and (high is None or all(v <= high for v in value))
    ):
        raise _fail(where, key, f"a list of two integers {span}", value)
    return [int(v) for v in value]


def _dict(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, key, "an object", value)
    return value


def parse_quantizer_spec(value: Any, where: str, key: str) -> QuantizerSpec:
    """The :class:`QuantizerSpec` of ``quantizer.L`` or ``quantizer.R``, from its known fields only.

    ``granularity`` is required, and ``group_size`` with ``group``; ``symmetric`` and
    ``rounding`` (how the codes were chosen, not how they decode) default to the dataclass's.

    Raises
    ------
    StoreFormatError
        For a field of the wrong type or value.
    """
    q = _dict(value, where, key)
    fields: dict[str, Any] = {}
    if q.get("granularity") not in _GRANULARITIES:
        raise _fail(where, f"{key}.granularity", "'tensor', 'channel' or 'group'", q.get("granularity"))
    fields["granularity"] = q["granularity"]
    if "group_size" in q or q["granularity"] == "group":
        fields["group_size"] = _int(
            q, "group_size", where, low=1 if q["granularity"] == "group" else 0, path=f"{key}.group_size"
        )
    if "symmetric" in q:
        if not isinstance(q["symmetric"], bool):
            raise _fail(where, f"{key}.symmetric", "true or false", q["symmetric"])
        fields["symmetric"] = q["symmetric"]
    if "rounding" in q:
        if q["rounding"] not in ROUNDINGS:
            raise _fail(where, f"{key}.rounding", " or ".join(map(repr, ROUNDINGS)), q["rounding"])
        fields["rounding"] = q["rounding"]
    return QuantizerSpec(**fields)


def parse_meta(meta: dict[str, Any], where: str, *, newest: int) -> dict[str, Any]:
    """Check the types of the ``lplr`` attrs a reader uses; return them unchanged.

    Parameters
    ----------
    meta : dict
        The attrs, whose ``format`` is already known to be ``"lplr-zarr"``.
    where : str
        The store, for messages.
    newest : int
        The newest format version this reader knows.

    Raises
    ------
    StoreFormatError
        For a version newer than ``newest`` (upgrade), or a key of the wrong type.
    """
    version = meta.get("version")
    if not _is_int(version) or version < 1:
        raise _fail(where, "version", "a positive integer", version)
    if version > newest:
        raise StoreFormatError(
            f"{where!r} has lplr format version {version!r}; this lplr-dask reads versions up to "
            f"{newest}. Upgrade lplr-dask (pip install -U lplr-dask)."
        )
    if not isinstance(meta.get("complete"), bool):
        raise _fail(where, "complete", "true or false", meta.get("complete"))
    if "stage" in meta and not isinstance(meta["stage"], str):
        raise _fail(where, "stage", "a string", meta["stage"])
    _int(meta, "rank", where, low=1)
    _int_pair(meta.get("bits"), where, "bits", low=1, high=16)
    for key in ("seed", "power_iters"):
        _int(meta, key, where)
    _int(meta, "passes", where, low=1, high=2)
    q = _dict(meta.get("quantizer"), where, "quantizer")
    if not isinstance(q.get("name"), str):
        raise _fail(where, "quantizer.name", "a string", q.get("name"))
    for side in ("L", "R"):
        parse_quantizer_spec(q.get(side), where, f"quantizer.{side}")
    if meta.get("backbone") is not None:
        b = _dict(meta["backbone"], where, "backbone")
        if version < 3:
            raise _fail(where, "backbone", "absent below format version 3", b)
        _int(b, "bits", where, low=1, high=16, path="backbone.bits")
        _int(b, "iters", where, low=1, path="backbone.iters")
    source = _dict(meta.get("source"), where, "source")
    _int_pair(source.get("shape"), where, "source.shape", low=1)
    if not isinstance(source.get("dtype"), str):
        raise _fail(where, "source.dtype", "a dtype name such as 'float32'", source.get("dtype"))
    if "chunks" in source:
        _int_pair(source["chunks"], where, "source.chunks", low=1)
    dims = source.get("dims")
    if dims is not None and not (
        isinstance(dims, list) and len(dims) == 2 and len(set(dims)) == 2 and all(isinstance(d, str) for d in dims)
    ):
        raise _fail(where, "source.dims", "a list of two different names", dims)
    for name, coord in _dict(source.get("coords", {}), where, "source.coords").items():
        c = _dict(coord, where, f"source.coords.{name}")
        if not (isinstance(c.get("dims"), list) and isinstance(c.get("dtype"), str) and "values" in c):
            raise _fail(where, f"source.coords.{name}", "an object of dims, dtype and values", coord)
    return meta


def array_shapes(meta: dict[str, Any], where: str = "") -> dict[str, tuple[int, int]]:
    """The shape of each array of :data:`ARRAYS` that the (parsed) attrs imply (docs/FORMAT.md).

    ``L/codes`` is (n, k) and ``R/codes`` (k, d) with (n, d) = ``source.shape``; scales and
    offsets are (1, 1) for ``tensor``, (1, k) / (k, 1) for ``channel``, and (ceil(n / g), k) /
    (k, ceil(d / g)) for ``group``.
    """
    n, d = meta["source"]["shape"]
    k = meta["rank"]
    q = meta["quantizer"]
    shapes: dict[str, tuple[int, int]] = {"L/codes": (n, k), "R/codes": (k, d)}
    for side, length in (("L", n), ("R", d)):
        spec = parse_quantizer_spec(q[side], where, f"quantizer.{side}")
        along = {"tensor": 1, "channel": 1, "group": -(-length // max(spec.group_size, 1))}[spec.granularity]
        across = 1 if spec.granularity == "tensor" else k
        shape = (along, across) if side == "L" else (across, along)
        shapes[f"{side}/scale"] = shapes[f"{side}/offset"] = shape
    if meta.get("backbone"):
        rows = meta["source"].get("chunks", [n, d])[0]
        shapes["Q/codes"] = (n, d)
        shapes["Q/scale"] = shapes["Q/offset"] = (-(-n // rows), d)
    return shapes

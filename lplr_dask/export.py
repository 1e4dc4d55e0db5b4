"""``lplr export``: a compressed store back to PyTorch's format, safetensors.

Each matrix of the store (one ``*.lplr.zarr``, or every member of a ``compress-group`` output) is
written as its reconstruction ``L·R`` in the source's dtype (bfloat16 stays bfloat16), or with
``factorized=True`` as its two dequantized factors ``NAME.L`` (n × k) and ``NAME.R`` (k × d), so
a model can replace a Linear of weight ``NAME`` by two Linears of rank k
(:func:`lplr_dask.nn.load_factorized`). Arrays the group copied (biases, norms, small matrices)
are written as they were, in their own dtype.

The files are written with the ``safetensors`` package. A file holds at most ``max_shard_size``
bytes of tensors: beyond that the output is sharded as Hugging Face does, ``OUT-00001-of-00003
.safetensors`` … beside an index ``OUT.safetensors.index.json`` whose ``weight_map`` names each
tensor's shard. Memory holds one shard's tensors at a time. Each file is written under a
temporary name and renamed when whole; a failed export removes what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from lplr_dask import guard, logs, store
from lplr_dask.errors import LplrValueError, OutputExistsError, StoreFormatError
from lplr_dask.factors import open_factors
from lplr_dask.sources import INDEX_SUFFIX, itemsize, parse_location, shard_files

__all__ = ["export_safetensors", "parse_size", "bfloat16_bits", "EXPORT_FORMAT", "FACTOR_DTYPES"]

#: The ``__metadata__`` key that marks a file as this tool's export (``--overwrite`` replaces only those).
EXPORT_FORMAT = "lplr-export"
#: Dtypes ``factor_dtype`` may name, besides ``"source"``.
FACTOR_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: Hugging Face's default shard size.
DEFAULT_MAX_SHARD_SIZE = "5GB"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class _Tensor(NamedTuple):
    """One tensor of the output: its name, dtype name, shape and how to read it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]  # in ``dtype`` (bfloat16: float32, rounded when written)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an integer.

    Raises
    ------
    LplrValueError
        For anything else, or a size below one byte.
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        raw = str(text).strip().upper().replace(" ", "")
        number = raw.rstrip("KMGTIB")
        unit = raw[len(number) :]
        try:
            value = int(float(number) * _UNITS[unit])
        except (ValueError, KeyError):
            raise LplrValueError(
                f"Expected a size such as 5GB, 500MB or 2GiB (units B, KB, MB, GB, TB, KiB, MiB, GiB). Got {text!r}."
            ) from None
    if value < 1:
        raise LplrValueError(f"Expected a positive size. Got {text!r}.")
    return value


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 nearest to each float32 of ``x`` (ties to even), as its uint16 bit patterns.

    Written here rather than taken from ``ml_dtypes`` or torch: it is a few integer operations,
    and neither package is a dependency. NaN stays a (quiet) NaN.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _encode(tensor: _Tensor) -> np.ndarray:
    """The tensor's little-endian bytes as an array whose buffer safetensors writes."""
    x = tensor.read()
    if tensor.dtype == "bfloat16":
        return bfloat16_bits(x)
    return np.ascontiguousarray(x, dtype=np.dtype(tensor.dtype).newbyteorder("<"))


def _serialize_file(tensors: dict[str, tuple[str, np.ndarray]], path: str, metadata: dict[str, str]) -> None:
    """Write ``{name: (dtype name, little-endian array)}`` with ``safetensors.serialize_file``.

    safetensors 0.8 takes :class:`safetensors.TensorSpec` (a pointer to the buffer); earlier
    releases take a dict holding the bytes. The dtype names (``"bfloat16"``, ``"float32"``, …)
    are the same in both.
    """
    import safetensors

    spec = getattr(safetensors, "TensorSpec", None)
    if spec is not None:
        specs = {
            name: spec(dtype=dtype, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
            for name, (dtype, a) in tensors.items()
        }
    else:
        specs = {
            name: {"dtype": dtype, "shape": list(a.shape), "data": a.tobytes()} for name, (dtype, a) in tensors.items()
        }
    safetensors.serialize_file(specs, path, metadata=metadata)


def _members(
    path: str, storage_options: dict[str, Any] | None, name: str | None
) -> tuple[Any, list[tuple[str, str, str]]]:
    """The store's root group, and ``(tensor name, action, location)`` of every array in it, in
    the group's order.

    Raises
    ------
    StoreFormatError
        If a group output is not complete.
    """
    root = store.open_group(path, storage_options=storage_options)
    meta: Any = root.attrs.get("lplr_group")
    if meta is None:  # one *.lplr.zarr store (open_factors refuses what is not a complete one)
        source = open_factors(path, storage_options=storage_options).attrs["source"].get("path")
        return root, [(name or _tensor_name(source), "lplr", path)]
    if not meta.get("complete"):
        raise StoreFormatError(
            f"{path!r} is an incomplete compress-group output. Finish it with `lplr compress-group ... --resume`."
        )
    if name is not None:
        raise LplrValueError(f"{path!r} is a compress-group output: its tensors keep their names; drop name/--name.")
    base = path.rstrip("/")
    return root, [(e["name"], e["action"], f"{base}/{e['name']}") for e in meta["arrays"]]


def _tensor_name(source: str | None) -> str:
    """A single store's tensor name: the safetensors tensor it came from (its attrs'
    ``source.path``), else ``"weight"``."""
    fmt, _, key = parse_location(source or "")
    return key if fmt == "safetensors" and key else "weight"


def _tensors(
    root: Any,
    members: list[tuple[str, str, str]],
    *,
    factorized: bool,
    factor_dtype: str,
    storage_options: dict[str, Any] | None,
) -> Iterator[_Tensor]:
    """The output's tensors, each read only when its shard is written."""
    for name, action, location in members:
        if action != "lplr":
            arr = store.open_array(root, name, location)
            copy_attrs: Any = arr.attrs.get("lplr_copy", {})
            dtype = copy_attrs.get("source_dtype", str(arr.dtype))
            yield _Tensor(name, dtype, tuple(arr.shape), partial(_read_copy, arr, dtype))
            continue
        f = open_factors(location, storage_options=storage_options)
        source_dtype = f.attrs["source"]["dtype"]
        if not factorized:
            compute = "float32" if source_dtype in ("bfloat16", "float16") else None
            yield _Tensor(name, source_dtype, f.shape, partial(_dense, f, compute))
            continue
        if f.backbone_bits:
            raise LplrValueError(
                f"Expected stores of L·R alone for a factorized export. Got {location!r}, which has a "
                f"{f.backbone_bits}-bit backbone (A ≈ Q + L·R): a module of the two factors would drop Q. "
                "Export it dense (without --factorized / factorized=False)."
            )
        dtype = factor_dtype
        if factor_dtype == "source":
            dtype = source_dtype if source_dtype in FACTOR_DTYPES else "float32"
        compute = "float32" if dtype == "bfloat16" else dtype
        yield _Tensor(f"{name}.L", dtype, (f.shape[0], f.rank), partial(_factor, f, "L", compute))
        yield _Tensor(f"{name}.R", dtype, (f.rank, f.shape[1]), partial(_factor, f, "R", compute))


def _dense(f: Any, dtype: str | None) -> np.ndarray:
    """``L·R`` of a store, in ``dtype`` (None: the source's)."""
    return np.asarray(f.to_dask(dtype=dtype).compute())


def _factor(f: Any, side: str, dtype: str) -> np.ndarray:
    """The dequantized factor ``side`` ("L" or "R") of a store, in ``dtype``."""
    return np.asarray((f.L if side == "L" else f.R)(dtype).compute())


def _read_copy(arr: Any, dtype: str) -> np.ndarray:
    """A copied array, in its source dtype (bfloat16: the float32 that holds it exactly)."""
    x = np.asarray(arr[...])
    return x.astype(np.float32 if dtype == "bfloat16" else dtype, copy=False)


def _shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    """Tensors packed in order into shards of at most ``max_bytes`` (a larger tensor alone in one)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _check_out(out: str, store_path: str, overwrite: bool, storage_options: dict[str, Any] | None) -> str:
    """The output's stem (``OUT`` of ``OUT.safetensors``), after refusing a bad or foreign output."""
    if store.is_remote(out):
        raise LplrValueError(f"Expected a local output file for {out!r}: lplr export writes to local disk.")
    if not out.endswith(".safetensors"):
        raise LplrValueError(
            f"Expected an output named *.safetensors. Got {out!r}; name it {os.path.splitext(out)[0] or out}.safetensors."
        )
    guard.check_output(out, [store_path], storage_options=storage_options, what="output of lplr export", zarr=False)
    stem = out[: -len(".safetensors")]
    for existing in (out, _index_of(stem)):
        if not os.path.exists(existing):
            continue
        if not overwrite:
            raise OutputExistsError(f"Output {existing!r} exists. Give another path, or --overwrite to replace it.")
        if not _is_export(existing):
            raise LplrValueError(
                f"Refusing to overwrite {existing!r}: it is not an output of lplr export (no {EXPORT_FORMAT!r} "
                "metadata). Choose another output path, or delete it yourself if you mean to replace it."
            )
    return stem


def _index_of(stem: str) -> str:
    """The index of a sharded export ``stem.safetensors``: ``stem.safetensors.index.json``."""
    return stem + ".safetensors" + INDEX_SUFFIX


def _previous_files(out: str, stem: str) -> list[str]:
    """The files of an earlier export at ``out`` (checked by :func:`_check_out` as ours)."""
    index = _index_of(stem)
    found = [p for p in (out, index) if os.path.exists(p)]
    if os.path.exists(index):
        with contextlib.suppress(Exception):  # a damaged old index: its shards stay, the index is replaced
            found += shard_files(index)
    return found


def _is_export(path: str) -> bool:
    """Whether ``path`` (a .safetensors file or its index) was written by :func:`export_safetensors`."""
    import safetensors

    try:
        if path.endswith(INDEX_SUFFIX):
            with open(path, encoding="utf-8") as f:
                return EXPORT_FORMAT in json.load(f).get("metadata", {})
        with safetensors.safe_open(path, framework="np") as f:  # reads the header only
            return EXPORT_FORMAT in (f.metadata() or {})
    except (OSError, ValueError, AttributeError, safetensors.SafetensorError):
        return False


def export_safetensors(
    store_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    factorized: bool = False,
    factor_dtype: str = "source",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    name: str | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = logs.info,
) -> dict[str, Any]:
    """Write a compressed store's tensors to ``out`` (``OUT.safetensors``), sharded if large.

    Parameters
    ----------
    store_path : str or os.PathLike
        A ``*.lplr.zarr`` store or a ``compress-group`` output (path or URL).
    out : str or os.PathLike
        A local ``*.safetensors`` path. If the tensors exceed ``max_shard_size``, the shards
        ``OUT-0000i-of-0000N.safetensors`` and the index ``OUT.safetensors.index.json`` are
        written instead (``out`` itself is not).
    factorized : bool, default=False
        Write each compressed matrix ``NAME`` as ``NAME.L`` and ``NAME.R`` instead of ``L·R``.
    factor_dtype : {"source", "float16", "bfloat16", "float32", "float64"}, default="source"
        The factors' dtype with ``factorized``: ``"source"`` keeps a float source's dtype
        (float32 for integer sources).
    max_shard_size : str or int, default="5GB"
        The most bytes of tensors in one file (:func:`parse_size`).
    name : str, optional
        The tensor name of a single store (default: its safetensors source tensor's name, else
        ``"weight"``); a group's members keep theirs.
    overwrite : bool, default=False
        Replace an existing output that this tool exported.
    storage_options : dict, optional
        fsspec options for a remote store.
    log : callable, default=lplr_dask.logs.info

    Returns
    -------
    dict
        ``{"store", "out", "files", "index", "tensors", "bytes", "factorized"}``: the files
        written, the index (None when not sharded), the tensors' names and the bytes of tensors.

    Raises
    ------
    LplrValueError
        For an output not named ``*.safetensors``, one that is or lies in the store, a foreign
        file to overwrite, a bad ``factor_dtype`` or ``max_shard_size``; ``factorized`` for a
        store with a backbone (its Q is not a factor).
    OutputExistsError
        If the output exists and ``overwrite`` is false.
    StoreFormatError
        If the store is not a complete lplr store or group output.
    """
    store_path, out = os.fspath(store_path), os.fspath(out)
    if factor_dtype != "source" and factor_dtype not in FACTOR_DTYPES:
        raise LplrValueError(
            f"Expected factor_dtype 'source' or one of {', '.join(FACTOR_DTYPES)}. Got {factor_dtype!r}."
        )
    max_bytes = parse_size(max_shard_size)
    stem = _check_out(out, store_path, overwrite, storage_options)
    previous = _previous_files(out, stem)
    root, members = _members(store_path, storage_options, name)
    tensors = list(
        _tensors(root, members, factorized=factorized, factor_dtype=factor_dtype, storage_options=storage_options)
    )
    shards = _shards(tensors, max_bytes)
    names = (
        [out]
        if len(shards) == 1
        else [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    index = None if len(shards) == 1 else _index_of(stem)
    metadata = {"format": "pt", EXPORT_FORMAT: json.dumps({"store": store_path, "factorized": factorized})}
    written: list[str] = []
    try:
        for i, (path, shard) in enumerate(zip(names, shards)):
            log(
                f"export {i + 1}/{len(shards)}: {len(shard)} tensors, {sum(t.nbytes for t in shard) / 1e6:.1f} MB -> {path}"
            )
            _write_whole(path, partial(_write_shard, shard, metadata=metadata), written)
        if index is not None:
            body = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors), EXPORT_FORMAT: metadata[EXPORT_FORMAT]},
                "weight_map": {t.name: os.path.basename(p) for p, shard in zip(names, shards) for t in shard},
            }
            _write_whole(index, partial(_write_json, body=body), written)
        for path in set(previous) - set(written):  # what an export replaced leaves no stale shard
            os.remove(path)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):  # cleaning up must not hide the failure
                os.remove(path)
        raise
    return {
        "store": store_path,
        "out": index or out,
        "files": names,
        "index": index,
        "tensors": [t.name for t in tensors],
        "bytes": sum(t.nbytes for t in tensors),
        "factorized": factorized,
    }


def _write_whole(path: str, write: Callable[[str], None], written: list[str]) -> None:
    """``write`` to a temporary name beside ``path``, then rename it to ``path`` (recorded in ``written``)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    written.append(path)


def _write_shard(shard: list[_Tensor], path: str, *, metadata: dict[str, str]) -> None:
    """Read and encode one shard's tensors (only they are in memory), then write them."""
    _serialize_file({t.name: (t.dtype, _encode(t)) for t in shard}, path, metadata)


def _write_json(path: str, *, body: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2)
        f.write("\n")

"""Opening the input matrix wherever it is, lazily, and the dtype it is computed in.

Locations
---------
- a Zarr array, v3 or v2, local or remote (fsspec URLs such as ``s3://bucket/IN.zarr``), also
  inside a group: ``IN.zarr/path/to/array``;
- a NumPy ``.npy`` file: ``W.npy`` (memory-mapped for each block read, so only that block is
  resident);
- an HDF5 dataset: ``FILE.h5:/path/to/dataset`` (h5py);
- a safetensors tensor: ``FILE.safetensors:tensor_name`` (bfloat16 is widened to float32 as it
  is read: NumPy has no bfloat16);
- a tensor of a sharded safetensors checkpoint: ``model.safetensors.index.json:tensor_name``
  (the index's ``weight_map`` names the shard file that holds it; the location is resolved to
  ``SHARD.safetensors:tensor_name``). The index alone is a group (:func:`list_arrays`);
- a ``zarr.Array``, a dask array or a NumPy array.

Files are read block by block by whichever worker runs the task: the dask graph holds a small
picklable reader (:class:`FileArray`), never the data.

dtype policy
------------
float16, bfloat16 and float32 inputs are computed in float32, float64 in float64; integers are
converted to float32 with a note; complex, boolean and non-numeric inputs are refused. The attrs
record the source's own dtype, which ``decompress`` writes back.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
import zarr

from lplr_dask import store
from lplr_dask.backend import device_of
from lplr_dask.errors import LplrTypeError, LplrValueError, SourceNotFoundError
from lplr_dask.store import is_remote  # re-exported: the one URL test lives in store

__all__ = [
    "Source",
    "FileArray",
    "read_source",
    "open_source",
    "as_matrix",
    "list_arrays",
    "member",
    "shard_files",
    "is_group",
    "FILE_FORMATS",
    "INDEX_SUFFIX",
    "compute_dtype",
    "output_dtype",
    "cast_to",
    "is_remote",
    "regular",
    "describe",
    "itemsize",
    "parse_location",
    "zarr_array_of",
    "with_chunks",
    "ChunkReader",
    "chunk_reader",
]

#: File name endings read by a :class:`FileArray`, and their format.
FILE_FORMATS = {
    ".npy": "npy",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".he5": "hdf5",
    ".safetensors": "safetensors",
}

#: How the index of a sharded safetensors checkpoint is named (``model.safetensors.index.json``).
INDEX_SUFFIX = ".index.json"

#: safetensors dtype codes and the NumPy dtype their bytes are read as.
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


class Source(NamedTuple):
    """An input as found, before validation.

    Attributes
    ----------
    array : dask.array.Array
        The data, lazily, in a dtype NumPy can hold (bfloat16 already widened to float32).
    dtype : str
        The source's own dtype name (``"bfloat16"`` for bfloat16 tensors).
    path : str or None
        The location it was opened from, if any.
    format : str
        ``"zarr"``, ``"npy"``, ``"hdf5"``, ``"safetensors"``, ``"dask"`` or ``"numpy"``.
    """

    array: da.Array
    dtype: str
    path: str | None
    format: str


def read_source(
    source: Any,
    *,
    storage_options: dict[str, Any] | None = None,
    chunks: Any = "auto",
) -> Source:
    """Find the input and wrap it as a lazy dask array, without reading it.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, dask.array.Array or numpy.ndarray
        A location (see the module docstring) or an array.
    storage_options : dict, optional
        fsspec options for remote Zarr stores (``endpoint_url``, ``key``, …); default: the
        usual environment (``AWS_*`` variables, ``~/.aws``, ``FSSPEC_*`` configuration).
    chunks : str or tuple, default="auto"
        Block shape for files (``.npy``, HDF5, safetensors); Zarr keeps its own chunks.

    Raises
    ------
    SourceNotFoundError
        If nothing is at the location, or a file has no such dataset or tensor.
    LplrValueError
        If the location names a group or a file without saying which array in it.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        fmt, path, key = parse_location(text)
        if fmt == "safetensors-index":
            if not key:
                names = list_arrays(path)
                raise LplrValueError(
                    f"{path!r} is the index of a sharded safetensors checkpoint; name the tensor to read as "
                    f"'{path}:NAME', one of: {', '.join(repr(n) for n in list(names)[:20]) or '(none)'}. To "
                    "compress every matrix of it, use `lplr compress-group`."
                )
            text = _index_member(path, key)
            fmt, path, key = parse_location(text)
        if fmt == "zarr":
            arr = _open_zarr(path, storage_options)
            return Source(zarr_to_dask(arr, text), str(arr.dtype), text, "zarr")
        reader = FileArray.open(fmt, path, key)
        return Source(reader.to_dask(chunks), reader.source_dtype, text, fmt)
    if isinstance(source, zarr.Array):
        return Source(zarr_to_dask(source, str(source.store_path)), str(source.dtype), None, "zarr")
    if isinstance(source, da.Array):
        return Source(source, str(source.dtype), None, "dask")
    if isinstance(source, np.ndarray):
        blocks = -1 if source.dtype.hasobject else chunks  # dask cannot size object blocks
        return Source(da.from_array(source, chunks=blocks), str(source.dtype), None, "numpy")
    raise LplrTypeError(
        "Expected a path or URL of a Zarr array, a .npy, HDF5 or safetensors location, a "
        f"zarr.Array, a dask array or a numpy array. Got {type(source).__name__} instead."
    )


class _InputArray:
    """A Zarr input for :func:`dask.array.from_array`: a chunk that fails to decode (a bad
    checksum, a truncated or garbled file) raises :class:`LplrValueError` naming it, instead of the
    codec's own error. A read of several stored chunks (a merged block, :func:`with_chunks`)
    names the one that fails. Picklable: it travels to the workers with the zarr array it wraps."""

    def __init__(self, arr: zarr.Array, where: str):
        self.arr, self.where = arr, where
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            return np.asarray(self.arr[index])
        except store.DECODE_ERRORS as e:
            coords, error = self._damaged_chunk(index if isinstance(index, tuple) else (index,), e)
            raise LplrValueError(
                f"The input {self.where!r} is damaged: its chunk {store.chunk_key(self.arr, coords)} "
                f"{store.decode_problem(error)}. Restore or regenerate the input."
            ) from error

    def _damaged_chunk(self, index: tuple[Any, ...], error: BaseException) -> tuple[tuple[int, ...], BaseException]:
        """The stored chunk of the read ``index`` that fails to decode, and its error.

        A read of several chunks is retried one chunk at a time to find the one; a read of one
        chunk (or a selection other than plain slices) is named by where it starts.
        """
        grid = _chunk_ranges(self.arr, index)
        candidates = list(itertools.product(*grid)) if grid is not None else []
        if len(candidates) > 1:
            for coords in candidates:
                selection = tuple(slice(i * size, (i + 1) * size) for i, size in zip(coords, self.arr.chunks))
                try:
                    self.arr[selection]
                except store.DECODE_ERRORS as e:
                    return coords, e
        return store.chunk_of(self.arr, index), error


def _chunk_ranges(arr: zarr.Array, index: tuple[Any, ...]) -> list[range] | None:
    """The stored chunks a selection of plain slices covers, as a range of chunk coordinates
    per axis; None for any other selection."""
    if len(index) != arr.ndim or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
        return None
    grid = []
    for i, size, extent in zip(index, arr.chunks, arr.shape):
        start, stop, _ = i.indices(extent)
        grid.append(range(start // size, -(-stop // size)) if stop > start else range(0))
    return grid


def zarr_to_dask(arr: zarr.Array, where: str, chunks: tuple[int, ...] | None = None) -> da.Array:
    """A Zarr array as a lazy dask array whose damaged chunks are named when read (:class:`_InputArray`).

    Parameters
    ----------
    arr : zarr.Array
    where : str
        The location named in the error for a damaged chunk.
    chunks : tuple of int, optional
        The blocks of the dask array, one task each (as ``dask.array.from_zarr(arr, chunks=...)``):
        whole multiples of the stored chunks read each stored chunk once. Default: the stored
        chunks, one task per stored chunk.
    """
    from dask.base import tokenize

    blocks = tuple(arr.chunks) if chunks is None else tuple(int(c) for c in chunks)
    return da.from_array(
        _InputArray(arr, where),
        chunks=blocks,
        name="from-zarr-" + tokenize(arr, where, blocks),
        meta=np.empty((0,) * arr.ndim, arr.dtype),
    )


def with_chunks(src: Source, chunks: tuple[int, ...]) -> Source:
    """The Zarr source ``src`` read ``chunks`` at a time: one task per block, not per stored chunk.

    The Zarr array is opened at ``chunks`` directly (as ``dask.array.from_zarr(path,
    chunks=chunks)``), so a block of many small stored chunks is one task that reads them all
    (zarr fetches them concurrently), where a ``rechunk`` of the stored chunks would keep one task
    per stored chunk and add its own. A damaged stored chunk inside a block is still named.

    Raises
    ------
    LplrValueError
        If ``src`` is not a Zarr source opened by :func:`read_source` (other formats: rechunk
        their array).
    """
    reader = _input_array(src.array) if src.format == "zarr" else None
    if reader is None:
        raise LplrValueError(
            f"Expected a Zarr source opened by read_source. Got a {src.format} source instead; "
            "rechunk its array (src.array.rechunk(chunks))."
        )
    return src._replace(array=zarr_to_dask(reader.arr, reader.where, chunks))


def _input_array(array: da.Array) -> _InputArray | None:
    """The :class:`_InputArray` a dask array made by :func:`zarr_to_dask` reads, if any."""
    found = _base_array(array)
    return found if isinstance(found, _InputArray) else None


def _base_array(array: da.Array) -> _InputArray | FileArray | None:
    """The :class:`_InputArray` or :class:`FileArray` a dask array made by :func:`zarr_to_dask`
    or :meth:`FileArray.to_dask` reads, if any.

    Only the graph's materialized layers are looked at (``from_array`` keeps its reader in one):
    the layer of the blocks is not expanded, which takes seconds for 10^5 chunks.
    """
    for layer in array.dask.layers.values():
        mapping = getattr(layer, "mapping", None)
        if isinstance(mapping, dict):
            found = next((v for v in mapping.values() if isinstance(v, (_InputArray, FileArray))), None)
            if found is not None:
                return found
    return None


class ChunkReader:
    """Reads ``A[rows, columns]`` of a matrix straight from its Zarr array or file, as the dask
    array of :func:`as_matrix` (and :func:`lplr_dask.backend.to_device`) would compute it: cast
    to its compute dtype, on its device. The reader of row strips (:class:`lplr_dask.blocks.Strips`):
    it pickles as the Zarr array object or the file's path, never the data, and a damaged Zarr
    chunk is still named (:class:`_InputArray`)."""

    def __init__(self, base: _InputArray | FileArray, dtype: Any, device: str = "cpu"):
        self.base, self.dtype, self.device = base, np.dtype(dtype), device

    def __call__(self, rows: slice, columns: slice) -> Any:
        x = np.asarray(self.base[rows, columns])
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        if self.device == "cuda":
            import cupy

            return cupy.asarray(x)
        return x


def chunk_reader(src: Source, A: da.Array) -> ChunkReader | None:
    """A :class:`ChunkReader` of ``A`` (the matrix of ``src``: :func:`as_matrix`, maybe reopened
    at other chunks or moved to a device), or None when ``src`` is not a Zarr array or a file
    read by this module (a dask or numpy array: the tasks take its chunks as they are)."""
    base = _base_array(src.array) if src.format in ("zarr", *FILE_FORMATS.values()) else None
    if base is None or tuple(base.shape) != tuple(A.shape):
        return None
    return ChunkReader(base, A.dtype, device_of(A))


def open_source(
    source: Any,
    *,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> da.Array:
    """The input as a validated 2-D dask array with regular chunks, in its compute dtype.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, dask.array.Array or numpy.ndarray
        See :func:`read_source`.
    storage_options : dict, optional
        fsspec options for a remote store.
    log : callable, optional
        Receives a note when the input is converted (integers to float32).

    Raises
    ------
    SourceNotFoundError
        If a location names nothing.
    LplrValueError
        If the array is not 2-D or is empty.
    LplrTypeError
        If its dtype is not real numeric.
    """
    return as_matrix(read_source(source, storage_options=storage_options), log=log)


def as_matrix(src: Source, *, log: Callable[[str], None] | None = None) -> da.Array:
    """Validate a :class:`Source` as a matrix and cast it to :func:`compute_dtype`.

    Raises
    ------
    LplrValueError
        If the array is not 2-D or is empty.
    LplrTypeError
        If its dtype is not real numeric.
    """
    A = src.array
    if A.ndim != 2:
        raise LplrValueError(f"Expected a 2-D matrix. Got an array of shape {A.shape} instead.")
    if 0 in A.shape:
        raise LplrValueError(f"Expected a non-empty matrix. Got shape {A.shape}.")
    target = compute_dtype(src.dtype)
    if np.dtype(A.dtype).kind in "iu" and log is not None:
        log(
            f"note: the input is integer ({src.dtype}); it is computed in {target} and "
            f"`lplr decompress` writes {src.dtype} back, rounded"
        )
    if A.dtype != target:
        A = A.astype(target)
    return regular(A)


def parse_location(text: str) -> tuple[str, str, str | None]:
    """Split a location into ``(format, path, key)``.

    ``FILE.h5:/dataset`` gives ``("hdf5", "FILE.h5", "/dataset")``;
    ``FILE.safetensors:name`` gives ``("safetensors", "FILE.safetensors", "name")``;
    ``W.npy`` gives ``("npy", "W.npy", None)``; ``model.safetensors.index.json:name`` gives
    ``("safetensors-index", "model.safetensors.index.json", "name")``; anything else is Zarr:
    ``("zarr", text, None)``.
    """
    if text.lower().endswith(INDEX_SUFFIX):
        return "safetensors-index", text, None
    head, sep, key = text.rpartition(":")
    if sep and head.lower().endswith(INDEX_SUFFIX):
        return "safetensors-index", head, key
    if sep and os.path.splitext(head)[1].lower() in FILE_FORMATS:
        return FILE_FORMATS[os.path.splitext(head)[1].lower()], head, key
    ext = os.path.splitext(text)[1].lower()
    if ext in FILE_FORMATS:
        return FILE_FORMATS[ext], text, None
    return "zarr", text, None


def _open_zarr(path: str, storage_options: dict[str, Any] | None) -> zarr.Array:
    remote = is_remote(path)
    if not remote and not os.path.exists(path):
        raise SourceNotFoundError(
            f"Input {path!r} does not exist. Check the path, or create a test matrix with "
            f"`lplr generate {path} --shape 20000x10000`."
        )
    try:
        node = zarr.open(path, mode="r", storage_options=storage_options if remote else None)
    except Exception as e:  # zarr and fsspec raise several types for "nothing here"
        raise SourceNotFoundError(
            f"Expected a Zarr array (v3 or v2) at {path!r}. Could not open one: {type(e).__name__}: {e}"
            + (" Check the URL and the storage options (--storage-options)." if remote else "")
        ) from e
    if isinstance(node, zarr.Group):
        listing = [
            f"{path.rstrip('/')}/{name} ({'x'.join(map(str, shape))} {dtype})"
            for name, (shape, dtype) in _zarr_arrays(node).items()
        ]
        shown = ", ".join(repr(x) for x in listing[:20]) + (
            f" and {len(listing) - 20} more" if len(listing) > 20 else ""
        )
        raise LplrValueError(
            f"{path!r} is a Zarr group, not an array. Name an array inside it, one of: "
            f"{shown or '(none: the group holds no arrays)'}. To compress every matrix of the "
            "group, use `lplr compress-group`."
        )
    return node


def _zarr_arrays(group: zarr.Group) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        name: (tuple(node.shape), str(node.dtype))
        for name, node in sorted(group.members(max_depth=None), key=lambda m: m[0])
        if isinstance(node, zarr.Array)
    }


def list_arrays(
    location: str, *, storage_options: dict[str, Any] | None = None
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array in a Zarr group, HDF5 file, safetensors file or sharded safetensors checkpoint
    (its ``*.index.json``): ``{name: (shape, dtype)}``.

    Names are relative paths (``encoder/layer0/weight``) or tensor names; :func:`member` turns
    one back into a location. The dtype is the source's own (``"bfloat16"`` included).

    Raises
    ------
    SourceNotFoundError
        If nothing is at the location.
    LplrValueError
        If the location is a single array (``.npy``, or a Zarr array).
    """
    fmt, path, key = parse_location(os.fspath(location))
    if fmt == "zarr":
        remote = is_remote(path)
        if not remote and not os.path.exists(path):
            raise SourceNotFoundError(f"Input {path!r} does not exist. Expected a Zarr group.")
        try:
            node = zarr.open(path, mode="r", storage_options=storage_options if remote else None)
        except Exception as e:
            raise SourceNotFoundError(
                f"Expected a Zarr group at {path!r}. Could not open one: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(node, zarr.Group):
            raise LplrValueError(f"Expected a Zarr group at {path!r}. Got an array; use `lplr compress` for one array.")
        return _zarr_arrays(node)
    if fmt == "safetensors-index" and not key:
        weight_map = _weight_map(path)
        tensors: dict[str, tuple[tuple[int, ...], str]] = {}
        for shard in _shard_paths(path, weight_map):
            tensors.update(list_arrays(shard))
        _check_index_covers(path, weight_map, tensors)
        return dict(sorted(tensors.items()))
    if fmt == "npy" or key:
        raise LplrValueError(
            f"Expected a group of arrays (a Zarr group, an HDF5 or safetensors file). Got the single array {location!r}."
        )
    _check_file(path)
    if fmt == "hdf5":
        import h5py

        found: dict[str, tuple[tuple[int, ...], str]] = {}
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda name, obj: (
                    found.__setitem__(name, (tuple(obj.shape), str(obj.dtype)))
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
        return dict(sorted(found.items()))
    header, _ = _safetensors_header(path)
    return {
        name: (tuple(info["shape"]), _safetensors_dtype_name(info["dtype"]))
        for name, info in sorted(header.items())
        if name != "__metadata__"
    }


def member(location: str, name: str) -> str:
    """The location of array ``name`` (from :func:`list_arrays`) inside a group or file."""
    fmt, path, _ = parse_location(os.fspath(location))
    if fmt == "zarr":
        return f"{path.rstrip('/')}/{name}"
    if fmt == "safetensors-index":
        return _index_member(path, name)
    return f"{path}:{name}"


def is_group(location: Any, *, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``location`` names a group of arrays (:func:`list_arrays`) rather than one array:
    an HDF5 or safetensors file with no ``:name``, a sharded checkpoint's index, or a Zarr group.
    Reads at most a Zarr node's metadata; False for arrays and for what does not exist."""
    if not isinstance(location, (str, os.PathLike)):
        return False
    fmt, path, key = parse_location(os.fspath(location))
    if fmt in ("hdf5", "safetensors", "safetensors-index"):
        return not key
    if fmt != "zarr" or (not is_remote(path) and not os.path.exists(path)):
        return False
    try:
        node = zarr.open(path, mode="r", storage_options=storage_options if is_remote(path) else None)
    except Exception:  # nothing Zarr here: read_source says what is wrong
        return False
    return isinstance(node, zarr.Group)


def _weight_map(index: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name → shard file (as written).

    Raises
    ------
    SourceNotFoundError
        If the index does not exist.
    LplrValueError
        If it is not JSON with a ``weight_map`` object of file names.
    """
    _check_file(index)
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (ValueError, AttributeError) as e:
        raise LplrValueError(
            f"Expected the index of a sharded safetensors checkpoint at {index!r}: JSON with a "
            f'"weight_map" of tensor names to shard files. It is not a JSON object ({e}).'
        ) from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LplrValueError(
            f"Expected the index of a sharded safetensors checkpoint at {index!r}: JSON with a "
            '"weight_map" of tensor names to shard files. It has no such object.'
        )
    return weight_map


def shard_files(index: str) -> list[str]:
    """The shard files a sharded checkpoint's index names, as paths, in order of first mention.

    Raises
    ------
    SourceNotFoundError
        If the index or a shard it names does not exist.
    LplrValueError
        If the index is malformed, or names a shard outside its own directory.
    """
    return _shard_paths(index, _weight_map(index))


def _shard_paths(index: str, weight_map: dict[str, str]) -> list[str]:
    """:func:`shard_files` of an index whose ``weight_map`` is already read."""
    base = os.path.dirname(index)
    shards = []
    for shard in dict.fromkeys(weight_map.values()):
        if os.path.isabs(shard) or os.path.normpath(shard).startswith(os.pardir):
            raise LplrValueError(
                f"The index {index!r} names the shard {shard!r} outside its own directory; shards must lie "
                "beside the index."
            )
        path = os.path.join(base, shard)
        if not os.path.isfile(path):
            raise SourceNotFoundError(
                f"The index {index!r} names the shard {shard!r}, which does not exist at {path!r}. "
                "Download every shard of the checkpoint next to its index."
            )
        shards.append(path)
    return shards


def _index_member(index: str, name: str) -> str:
    """``SHARD.safetensors:name``: where the index says tensor ``name`` lies."""
    weight_map = _weight_map(index)
    if name not in weight_map:
        raise SourceNotFoundError(
            f"{index!r} has no tensor {name!r}. It has: {', '.join(repr(n) for n in list(weight_map)[:20]) or '(none)'}."
        )
    return f"{os.path.join(os.path.dirname(index), weight_map[name])}:{name}"


def _check_index_covers(index: str, weight_map: dict[str, str], found: dict[str, Any]) -> None:
    """Raise :class:`LplrValueError` if a tensor of the index is missing from the shard it names."""
    missing = [n for n in weight_map if n not in found]
    if missing:
        raise LplrValueError(
            f"The index {index!r} names tensors its shards do not hold: {', '.join(map(repr, missing[:10]))}"
            f"{' and more' if len(missing) > 10 else ''}. The checkpoint is incomplete or its index is stale."
        )


def _check_file(path: str) -> None:
    if is_remote(path):
        raise LplrValueError(
            f"Expected a local file for {path!r}: .npy, HDF5 and safetensors are read from local "
            "disk only. Copy it locally, or convert it to Zarr (`lplr convert`) and upload that."
        )
    if not os.path.isfile(path):
        raise SourceNotFoundError(f"Input file {path!r} does not exist. Check the path.")


def _safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data begins.

    Raises
    ------
    LplrValueError
        If the header's length (the first 8 bytes) runs past the end of the file, or the header
        is not a JSON object.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if file_size < 8 or size > file_size - 8:
            raise LplrValueError(
                f"Expected a safetensors file at {path!r}. Its first 8 bytes give a header of {size} "
                f"bytes, but the file has {file_size} bytes in all: it is truncated or not safetensors."
            )
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise LplrValueError(f"Expected a safetensors file at {path!r}. Its header is not valid JSON.") from e
    if not isinstance(header, dict):
        raise LplrValueError(f"Expected a safetensors file at {path!r}. Its header is not a JSON object.")
    return header, 8 + size


def _check_safetensors_extent(path: str, name: str, info: dict[str, Any], start: int) -> None:
    """Raise :class:`LplrValueError` unless tensor ``name``'s bytes lie within the file and fit its shape."""
    try:
        begin, end = (int(x) for x in info["data_offsets"])
        nbytes = int(np.prod(info["shape"], dtype=object)) * np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).itemsize
    except (KeyError, TypeError, ValueError) as e:
        raise LplrValueError(
            f"Expected a safetensors file at {path!r}. Tensor {name!r} has no valid shape, dtype and data_offsets."
        ) from e
    if not 0 <= begin <= end <= os.path.getsize(path) - start or end - begin != nbytes:
        raise LplrValueError(
            f"Expected a safetensors file at {path!r}. Tensor {name!r} claims bytes {begin}:{end} of the data "
            f"({nbytes} for its shape {info['shape']}), beyond the file's {os.path.getsize(path) - start} bytes "
            "of data or of the wrong size: the file is truncated or damaged."
        )


def _safetensors_dtype_name(code: str) -> str:
    if code == "BF16":
        return "bfloat16"
    if code not in _SAFETENSORS_DTYPES:
        raise LplrTypeError(
            f"Expected a safetensors tensor of a float, integer or bool dtype. Got {code}, which "
            "lplr-dask does not read; convert the tensor to float16 or float32 first."
        )
    return str(np.dtype(_SAFETENSORS_DTYPES[code]))


class FileArray:
    """A lazily read array in a ``.npy``, HDF5 or safetensors file.

    Each ``reader[index]`` opens the file, reads that block and closes it (a ``.npy`` or
    safetensors file is memory-mapped only for the read), so a task holds one block and the
    object pickles as a few strings: dask ships it to workers instead of data.

    Attributes
    ----------
    shape : tuple of int
    dtype : numpy.dtype
        The dtype blocks are returned in (float32 for bfloat16 tensors).
    source_dtype : str
        The file's own dtype name.
    """

    def __init__(
        self,
        fmt: str,
        path: str,
        key: str | None,
        shape: tuple[int, ...],
        dtype: str,
        offset: int = 0,
        source_dtype: str | None = None,
        block: tuple[int, ...] | None = None,
    ):
        self.fmt, self.path, self.key = fmt, path, key
        self.shape = tuple(int(s) for s in shape)
        self.source_dtype = source_dtype or str(np.dtype(dtype))
        self._raw = np.dtype(dtype)
        self.dtype = np.dtype(np.float32) if self.source_dtype == "bfloat16" else self._raw
        self.offset = offset
        self.block = block

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def open(cls, fmt: str, path: str, key: str | None) -> FileArray:
        """Read the file's header (shape and dtype) and return a reader.

        Raises
        ------
        SourceNotFoundError
            If the file, dataset or tensor does not exist.
        LplrValueError
            If an HDF5 or safetensors location does not name a dataset or tensor.
        """
        _check_file(path)
        if fmt == "npy":
            try:
                mm = np.load(path, mmap_mode="r")  # maps the file; reads only the header
            except ValueError as e:
                raise LplrTypeError(f"Expected a numeric .npy file. {path!r} cannot be memory-mapped: {e}") from e
            return cls("npy", path, None, mm.shape, mm.dtype.str)
        names = list_arrays(path)
        where = "dataset" if fmt == "hdf5" else "tensor"
        if not key:
            raise LplrValueError(
                f"{path!r} is {'an HDF5' if fmt == 'hdf5' else 'a safetensors'} file; name the {where} to read as '{path}:NAME', one of: "
                f"{', '.join(repr(member(path, n)) for n in list(names)[:20]) or '(none)'}."
            )
        name = key.lstrip("/") if fmt == "hdf5" else key
        if name not in names:
            raise SourceNotFoundError(
                f"{path!r} has no {where} {key!r}. It has: {', '.join(repr(n) for n in list(names)[:20]) or '(none)'}."
            )
        if fmt == "hdf5":
            import h5py

            with h5py.File(path, "r") as f:
                ds = f[name]
                return cls("hdf5", path, name, ds.shape, ds.dtype.str, block=ds.chunks)
        header, start = _safetensors_header(path)
        info = header[name]
        _check_safetensors_extent(path, name, info, start)
        return cls(
            "safetensors",
            path,
            name,
            info["shape"],
            _SAFETENSORS_DTYPES[info["dtype"]],
            offset=start + int(info["data_offsets"][0]),
            source_dtype=names[name][1],
        )

    def __getitem__(self, index: Any) -> np.ndarray:
        if self.fmt == "hdf5":
            import h5py

            with h5py.File(self.path, "r") as f:
                return np.asarray(f[self.key][index])
        if self.fmt == "npy":
            mm = np.load(self.path, mmap_mode="r")
        else:
            mm = np.memmap(self.path, dtype=self._raw, mode="r", offset=self.offset, shape=self.shape)
        out = np.array(mm[index])  # a copy: the mapping closes when ``mm`` goes
        del mm
        if self.source_dtype == "bfloat16":  # the upper half of a float32
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def to_dask(self, chunks: Any = "auto") -> da.Array:
        """The file as a dask array whose tasks each read one block."""
        from dask.base import tokenize

        chunks = da.core.normalize_chunks(chunks, self.shape, dtype=self.dtype, previous_chunks=self.block)
        mtime = os.path.getmtime(self.path)
        name = f"read-{self.fmt}-" + tokenize(self.path, self.key, mtime, chunks)
        return da.from_array(self, chunks=chunks, name=name, lock=False, meta=np.empty((0,) * self.ndim, self.dtype))


def compute_dtype(dtype: Any) -> np.dtype:
    """float64 stays float64; other real numbers (bfloat16 included) are computed in float32.

    Raises
    ------
    LplrTypeError
        For complex, boolean, string or object dtypes.
    """
    if str(dtype) == "bfloat16":
        return np.dtype(np.float32)
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # a name NumPy does not know, such as "StringDType()" from Zarr's string arrays
        pass
    if isinstance(dtype, np.dtype) and dtype.kind in "iuf":
        return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    raise LplrTypeError(
        f"Expected a real numeric matrix (float or integer). Got dtype {dtype} instead; convert it "
        "first (complex: compress real and imaginary parts separately)."
    )


def output_dtype(name: str) -> np.dtype:
    """The dtype a reconstruction is written in for a source of dtype ``name``.

    The source's own, except bfloat16, which Zarr cannot store: float32 (exact for every
    bfloat16 value).
    """
    return np.dtype(np.float32) if name == "bfloat16" else np.dtype(name)


def cast_to(x: da.Array, dtype: Any) -> da.Array:
    """``x`` in ``dtype``: rounded to nearest and clipped to the range for integer dtypes."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return da.clip(da.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def regular(A: da.Array) -> da.Array:
    """A with regular chunks (all equal but the last), as whole-chunk Zarr writes need."""
    chunks = []
    for c in A.chunks:
        regular_axis = all(x == c[0] for x in c[:-1]) and c[-1] <= c[0]
        chunks.append(c if regular_axis else max(c))
    return A if tuple(chunks) == A.chunks else A.rechunk(tuple(chunks))


def describe(src: Source, A: da.Array) -> dict[str, Any]:
    """What the attrs record about the source: location, shape, its own dtype, chunks.

    The dtype is the source's (``"bfloat16"`` included), not the compute dtype, which
    :func:`compute_dtype` derives from it.
    """
    return {
        "path": src.path,
        "shape": list(A.shape),
        "dtype": src.dtype,
        "chunks": [int(A.chunks[0][0]), int(A.chunks[1][0])],
    }


def itemsize(dtype: str) -> int:
    """Bytes per entry of a source dtype name (``"bfloat16"`` included)."""
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def zarr_array_of(source: Any, storage_options: dict[str, Any] | None) -> Any:
    """The zarr.Array behind a Zarr :class:`Source` (read by its chunks' stored bytes, e.g. for a fingerprint)."""
    if source.path is None:  # an open zarr.Array: da.from_zarr keeps it as the graph's one input
        found = [
            v.arr if isinstance(v, _InputArray) else v
            for v in source.array.dask.values()
            if isinstance(v, (zarr.Array, _InputArray))
        ]
        if found:
            return found[0]
    return _open_zarr(parse_location(source.path)[1], storage_options)

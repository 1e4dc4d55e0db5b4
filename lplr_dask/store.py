"""The ``*.lplr.zarr`` format: a Zarr v3 group holding the codes, scales and JSON attrs.

Layout::

    OUT.lplr.zarr/
        L/codes   (n, k)  uint8|uint16, row-chunked like the source
        L/scale   L/offset    float64, shaped per the quantizer granularity
        R/codes   (k, d)  uint8|uint16, column-chunked like the source
        R/scale   R/offset
        _work/    scratch arrays while a job runs (deleted at completion):
            Y       (n, k + p)  the range sketch A·S, row-chunked like the source
            AG      (n, t)      the test columns A·G, for the error estimate
            sumsq   (n chunks, 1) ‖A‖²_F of each row strip of the source
            Y_done  (n chunks,) uint8, 1 once that row strip of Y, AG and sumsq is written
            Z       (ℓ, d)      the co-range sketch Ψ·A (one-pass mode)
            PT      (n, k)      pinv(L)ᵀ (two-pass mode)
            W       (k, d)      pinv(L)·A, column-chunked like the source
            W_done  (d chunks,) uint8, 1 once that column chunk of W is written
        sketches/ an appendable store's one-pass sketches (``compress --appendable``), kept:
            Y, AG, Z, sumsq   as in ``_work``, for the next append (removed by ``lplr finalize``)
        _append/  a whole store in progress while an append runs (:mod:`lplr_dask.append`)

Every array carries Zarr v3 ``dimension_names`` (:func:`dimension_names_of`): ``("row", "rank")``
for L's codes, ``("rank", "col")`` for R's, ``("scale_row", "scale_col")`` for scales and offsets,
the names of :data:`SCRATCH_DIMS` for scratch arrays, and ``("row", "col")`` (or the source's
dims) for a matrix :func:`write_array` writes, so that xarray names the axes of what it opens.

Group attrs hold ``lplr``: a JSON dict with the format name and version, the source, the
parameters, timings and errors, and ``complete``, written last. A reader refuses an incomplete
store or a newer version (:func:`read_meta`, checked by :mod:`lplr_dask.schema`).

Since version 2 every array this package writes stores all of its chunks (a chunk of fill
values too, so that a missing chunk file is damage, never "all zeros") and ends each chunk with
a crc32c checksum (:data:`CHECKSUM`). Readers list the chunks of a store when they open it
(:func:`missing_chunks`, no data read) and read codes through :func:`read_chunks`, which names
the chunk that fails to decode.

The scratch layout is :data:`SCRATCH` and :data:`SCRATCH_ARRAYS`; :func:`scratch_name` names an
array in it, :func:`create_scratch` and :func:`create_scratch_marks` create one, and
:func:`remove_scratch` deletes it all when a job completes; in an appendable store it first
keeps the sketches under :data:`SKETCHES` (:data:`KEPT_SKETCHES`). :func:`move_node` moves an
array or group inside a store (a rename on a local disk), as an append's commit does.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any, Literal, Union

import dask.array as da
import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from lplr_dask import schema
from lplr_dask.backend import is_cupy, to_host, to_host_blocks
from lplr_dask.errors import OutputExistsError, StoreFormatError
from lplr_dask.progress import compute
from lplr_dask.quantize import code_dtype
from lplr_dask.validation import parse_choice

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PLAIN_FORMAT_VERSION",
    "is_remote",
    "locate",
    "filesystem",
    "exists",
    "clear",
    "compact_json",
    "create_group",
    "open_group",
    "read_meta",
    "write_meta",
    "new_meta",
    "with_old_defaults",
    "changed_params",
    "jsonable",
    "codes_compressor",
    "codes_sample",
    "create_codes",
    "SCRATCH",
    "SCRATCH_ARRAYS",
    "scratch_name",
    "create_scratch",
    "create_scratch_marks",
    "remove_scratch",
    "SKETCHES",
    "KEPT_SKETCHES",
    "STAGING",
    "appendable_meta",
    "save_sketches",
    "move_node",
    "remove_node",
    "sketch_bytes",
    "write_small",
    "read_small",
    "bytes_on_disk",
    "codes_bytes",
    "write_array",
    "dimension_names_of",
    "MATRIX_DIMS",
    "SCRATCH_DIMS",
    "remove",
    "discard",
    "open_arrays",
    "missing_chunks",
    "chunk_key",
    "chunk_of",
    "read_chunks",
    "damage_message",
    "check_chunks_present",
    "open_array",
    "chunk_coords",
    "error_text",
    "DECODE_ERRORS",
    "decode_problem",
    "CHECKSUM",
    "CHECKSUM_BYTES",
]

FORMAT_NAME = "lplr-zarr"
#: 1: the first format. 2: every chunk stored (fill values too) and crc32c-checksummed.
#: 3: a quantized backbone ``Q/`` (``A ≈ Q + L·R``, attrs ``backbone``); a store without one is
#: still written as version 2, which older readers open.
FORMAT_VERSION = 3
#: The version of a store without a backbone.
PLAIN_FORMAT_VERSION = 2

#: The bytes-to-bytes codec that ends every array's codec chain: a crc32c of each stored chunk
#: (4 bytes), checked on every read, so a truncated or bit-flipped chunk fails loudly.
CHECKSUM = Crc32cCodec()
#: Bytes :data:`CHECKSUM` adds to each chunk.
CHECKSUM_BYTES = 4
#: Array config of everything written: chunks of fill values are stored too, so a chunk missing
#: from a version-2 store is damage (a partial copy), not an all-zero chunk left out.
ALL_CHUNKS: Any = {"write_empty_chunks": True}  # zarr types this as a total TypedDict of every key
#: Damaged chunks a message names before it says how many more there are.
NAMED_DAMAGE = 5


#: Zstd level of the entropy-coding candidate for codes: higher levels store a little fewer bytes
#: but encode far slower (measured on LPLR codes: benchmarks/RESULTS.md, "Storage of the codes").
CODES_ZSTD_LEVEL = 3
#: Contiguous runs a codes sample is cut into (see :func:`codes_sample`).
SAMPLE_RUNS = 8


@contextlib.contextmanager
def compact_json() -> Iterator[None]:
    """Write zarr's JSON documents without indentation (zarr's ``json_indent``, 2 by default) while
    in the block; also a decorator. A store's dozen ``zarr.json`` files take ~6.0 KB instead of
    ~8.7 KB: 0.15 bits per entry of a 384 × 384 matrix (a transformer's weights are this small).
    Readers see the same JSON."""
    with zarr.config.set({"json_indent": None}):
        yield


def codes_compressor(bits: int, sample: np.ndarray | None = None) -> Any:
    """The Zarr codec for ``bits``-bit codes: bit-shuffled Blosc, or plain Zstd where it is smaller.

    Two codecs can store the codes, and neither is always the smaller:

    - **Blosc (zstd, bit-shuffle)** stores each of the 8 (or 16) bit planes of the codes apart, so
      the ``8 - bits`` planes that are always zero cost almost nothing: ``bits/8`` of the uint8 size
      for any codes, whatever their distribution. This is the bound the bit budget relies on. It
      holds when a chunk's entry count is a multiple of 8; c-blosc leaves a block of any other size
      un-shuffled, which costs bytes, the most at 1 bit (benchmarks/RESULTS.md, "Storage of the
      codes").
    - **Zstd** entropy-codes the bytes: codes that use few of their levels often (Gaussian-like
      codes under a min-max range, background rows of an image, small rows of R under one range
      for the whole matrix) take well under ``bits/8``; codes spread over all levels take more
      (at 1 bit more than ``bits/8``, since Huffman codes spend at least a bit a byte: the table of
      benchmarks/RESULTS.md, "Storage of the codes").

    Parameters
    ----------
    bits : int
        Bits per code, 1 to 16.
    sample : ndarray, optional
        Codes shaped like one chunk of the array, from :func:`codes_sample`. Without it the codec
        is Blosc bit-shuffle; with it, whichever codec stores the sample in fewer bytes.

    Returns
    -------
    BloscCodec or ZstdCodec
    """
    candidates = _codes_candidates()
    if sample is None:
        return candidates[0][0]
    data = np.ascontiguousarray(to_host(sample))
    sizes = [len(encoder.encode(data)) for _, encoder in candidates]
    return candidates[int(np.argmin(sizes))][0]


def _codes_candidates() -> list[tuple[Any, Any]]:
    """(Zarr codec, the numcodecs codec it runs) pairs, bit-shuffle first: the fallback."""
    import numcodecs

    return [
        (
            BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle),
            numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE),
        ),
        (ZstdCodec(level=CODES_ZSTD_LEVEL), numcodecs.Zstd(level=CODES_ZSTD_LEVEL)),
    ]


def codes_sample(codes: Any, chunks: tuple[int, int]) -> np.ndarray:
    """One chunk's worth of a lazy codes array, drawn from the whole of it, to choose a codec.

    Along the chunked (long) axis the sample takes :data:`SAMPLE_RUNS` contiguous runs spread
    evenly over the array: contiguous so that neighbouring rows (or columns) keep the
    correlations a compressor exploits, spread out so that one unusual chunk (an image's empty
    border) does not decide. Computing it evaluates only the chunks the runs touch.

    Parameters
    ----------
    codes : dask array of shape (m, c)
        The codes as they will be written (numpy or cupy chunks).
    chunks : (int, int)
        The chunk shape of the array they will be written to.

    Returns
    -------
    ndarray of shape ``min(chunks, codes.shape)`` (numpy)
    """
    if is_cupy(codes):
        codes = to_host_blocks(codes) if hasattr(codes, "dask") else to_host(codes)
    chunked = [axis for axis in (0, 1) if chunks[axis] < codes.shape[axis]]
    part = codes[: chunks[0], : chunks[1]]
    if chunked:
        axis = chunked[0]
        length, want = codes.shape[axis], chunks[axis]
        runs = min(SAMPLE_RUNS, want)
        sizes = [want // runs + (i < want % runs) for i in range(runs)]
        starts = np.linspace(0, length - max(sizes), runs).astype(np.int64)
        index = np.concatenate([np.arange(s, s + size) for s, size in zip(starts, sizes)])
        part = codes[index, : chunks[1]] if axis == 0 else codes[: chunks[0], index]
    return np.asarray(part.compute() if hasattr(part, "compute") else part)


def _float_compressor() -> Any:
    return ZstdCodec(level=3)


def _checksummed(compressor: Any) -> list[Any]:
    """The ``compressors`` of an array this package writes: ``compressor`` (if any), then the crc32c."""
    return [compressor, CHECKSUM] if compressor is not None else [CHECKSUM]


#: Where a store is: a local path or fsspec URL, or a zarr Store (see :func:`locate`).
Location = Union[str, "os.PathLike[str]", Store]
#: fsspec options for remote stores (``endpoint_url``, ``key``, ``secret``, …).
StorageOptions = dict[str, Any] | None


def _store_path(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


def is_remote(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://…``, ``gs://…``) rather than a local path (``file://`` is local)."""
    return "://" in path and not path.startswith("file://")


def locate(path: Location, storage_options: StorageOptions = None) -> str | Store:
    """What ``zarr.open_group`` / ``zarr.open_array`` should open for ``path``.

    A local path stays a path. An fsspec URL becomes a :class:`zarr.storage.FsspecStore` holding
    its filesystem, which pickles with the storage options: tasks that open the store on a worker
    (pass 2 writes, ``da.store``) reach the same endpoint with the same credentials without relying
    on the workers' environment. A Store is returned as it is.
    """
    if isinstance(path, Store):
        return path
    p = _store_path(path)
    if is_remote(p):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(p, storage_options=dict(storage_options or {}), read_only=False)
    return p


def filesystem(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> tuple[Any, str]:
    """The (synchronous) fsspec filesystem and the root path inside it for a local path or URL."""
    import fsspec

    p = _store_path(path)
    options = dict(storage_options or {}) if is_remote(p) else {}
    return fsspec.core.url_to_fs(p, **options)


def exists(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> bool:
    """Whether anything (a Zarr node or a plain file) exists at ``path``."""
    p = _store_path(path)
    if is_remote(p):
        fs, root = filesystem(p, storage_options)
        return bool(fs.exists(root))
    return os.path.exists(p)


def remove(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> None:
    """Delete a store (a local directory or an fsspec URL)."""
    p = _store_path(path)
    if is_remote(p):
        fs, root = filesystem(p, storage_options)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    elif os.path.isdir(p):
        shutil.rmtree(p)
    elif os.path.exists(p):
        os.remove(p)


def clear(
    path: str | os.PathLike[str], *, overwrite: bool, storage_options: StorageOptions = None, hint: str = ""
) -> None:
    """Make way for a new output at ``path``: remove what is there if ``overwrite``, else refuse.

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``overwrite`` is false (the message ends with ``hint``).
    """
    if exists(path, storage_options):
        if not overwrite:
            raise OutputExistsError(
                f"Output {os.fspath(path)!r} already exists. Pass --overwrite (overwrite=True) to replace it{hint}."
            )
        remove(path, storage_options)


@compact_json()
def create_group(
    path: str | os.PathLike[str], *, overwrite: bool = False, storage_options: StorageOptions = None
) -> zarr.Group:
    """Create an empty output group; refuse an existing path unless ``overwrite``.

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``overwrite`` is false.
    """
    clear(
        path,
        overwrite=overwrite,
        storage_options=storage_options,
        hint=", or --resume (resume=True) to finish an interrupted job",
    )
    return zarr.open_group(locate(path, storage_options), mode="w", zarr_format=3)


def open_group(path: Location, mode: Literal["r", "r+"] = "r", *, storage_options: StorageOptions = None) -> zarr.Group:
    """Open an existing output group (a local path, an fsspec URL or a Store from :func:`locate`).

    Raises
    ------
    StoreFormatError
        If there is no group at ``path``, an array instead, or its ``zarr.json`` is unreadable.
    """
    where = path if not isinstance(path, Store) else str(path)
    try:
        return zarr.open_group(locate(path, storage_options), mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:  # type: ignore[attr-defined]
        raise StoreFormatError(f"Expected an lplr store (a Zarr v3 group) at {where!r}. Found none.") from e
    except zarr.errors.ContainsArrayError as e:  # type: ignore[attr-defined]
        raise StoreFormatError(f"Expected an lplr store (a Zarr v3 group) at {where!r}. Found a Zarr array.") from e
    except (ValueError, TypeError, KeyError) as e:  # a corrupt zarr.json: JSON or metadata errors
        raise _damaged(os.fspath(where), f"its zarr.json is unreadable ({error_text(e)})") from e


@compact_json()
def write_meta(group: zarr.Group, meta: dict[str, Any], key: str = "lplr") -> None:
    """Write the attrs dict ``key`` (``lplr``; ``lplr_group``, ``lplr_convert``), JSON only."""
    group.attrs[key] = jsonable(meta)


def new_meta(source: dict[str, Any], params: dict[str, Any], *, device: str, version: str) -> dict[str, Any]:
    """The ``lplr`` attrs of a store a job has just started (``stage`` "started", not complete).

    Parameters
    ----------
    source : dict
        What the input is (:func:`lplr_dask.sources.describe`) and its ``fingerprint``.
    params : dict
        What determines the codes (:meth:`lplr_dask.factorize.Params.as_attrs`).
    device : str
        Where the job runs ("cpu" or "cuda").
    version : str
        The lplr-dask version that writes it.
    """
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION if params.get("backbone") else PLAIN_FORMAT_VERSION,
        "source": source,
        **params,
        "device": device,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lplr_dask_version": version,
        "stage": "started",
        "timings": {},
        "complete": False,
    }


def with_old_defaults(meta: dict[str, Any]) -> dict[str, Any]:
    """The attrs of a store started by an older version, with what it did not record filled in:
    float64 block products and the paper's sketch of exactly k columns (no range oversampling)."""
    out = dict(meta)
    out.setdefault("precision", "float64")
    out.setdefault("backbone", None)
    if isinstance(out.get("sketch"), dict):
        out["sketch"] = {"range_oversample": 0, **out["sketch"]}
    return out


def changed_params(meta: dict[str, Any], params: dict[str, Any], shape: tuple[int, int]) -> list[str]:
    """The keys of ``params`` (and "source shape") in which a started store's attrs differ: what
    forbids resuming it with these parameters. Empty when it may be resumed."""
    started = with_old_defaults(meta)
    changed = [key for key, v in params.items() if started.get(key) != jsonable(v)]
    if meta.get("source", {}).get("shape") != list(shape):
        changed.append("source shape")
    return changed


def read_meta(group: zarr.Group, *, require_complete: bool = True, path: str = "") -> dict[str, Any]:
    """Read and validate the ``lplr`` attrs (:func:`lplr_dask.schema.parse_meta`).

    Raises
    ------
    StoreFormatError
        If the group is not an lplr store, is of a newer format version, has an attr of the
        wrong type, or (with ``require_complete``) was not completed.
    """
    attrs: dict[str, Any] = dict(group.attrs)
    meta = dict(attrs.get("lplr") or {})
    where = path or str(group.store_path)
    if meta.get("format") != FORMAT_NAME:
        if "lplr_group" in attrs:
            members = [e["name"] for e in attrs["lplr_group"].get("arrays", []) if e.get("action") == "lplr"]
            example = f" (e.g. {where.rstrip('/')}/{members[0]})" if members else ""
            raise StoreFormatError(
                f"{where!r} is the output of compress-group, not one lplr store: open one of its "
                f"{len(members)} compressed arrays as {where.rstrip('/')}/NAME{example}; its attrs "
                "'lplr_group' list them all."
            )
        raise StoreFormatError(f"{where!r} is not an lplr store: its attrs have no 'lplr' format entry.")
    schema.parse_meta(meta, where, newest=FORMAT_VERSION)
    if require_complete and not meta["complete"] and "append_commit" in meta:
        raise StoreFormatError(
            f"{where!r} is being appended to: an append stopped while it moved the new factors into place. "
            "Finish it with `lplr append STORE NEW --rows|--columns --resume` (the same arguments)."
        )
    if require_complete and not meta["complete"]:
        raise StoreFormatError(
            f"{where!r} is incomplete (the job that wrote it did not finish). Finish it with "
            "`lplr compress ... --resume` using the same arguments, or rerun with --overwrite."
        )
    return meta


@compact_json()
def create_codes(
    group: zarr.Group,
    name: str,
    shape: tuple[int, int],
    chunks: tuple[int, int],
    bits: int,
    *,
    sample_from: Any = None,
    dimension_names: tuple[str, ...] | None = None,
) -> zarr.Array:
    """Create an empty codes array ``name`` (uint8 for ≤ 8 bits, else uint16).

    ``sample_from``, the lazy codes to be written, lets :func:`codes_compressor` pick the smaller
    codec from a :func:`codes_sample` of them; every chunk then uses that one codec.
    ``dimension_names`` default: ``("row", "rank")`` for ``L/codes``, ``("rank", "col")`` for
    ``R/codes`` (:func:`dimension_names_of`).
    """
    sample = None if sample_from is None else codes_sample(sample_from, chunks)
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=code_dtype(bits),
        compressors=_checksummed(codes_compressor(bits, sample)),
        fill_value=0,
        overwrite=True,
        config=ALL_CHUNKS,
        dimension_names=dimension_names or dimension_names_of(name, len(shape)),
    )


@compact_json()
def create_float(
    group: zarr.Group,
    name: str,
    shape: tuple[int, int],
    chunks: tuple[int, int],
    *,
    compress: bool = True,
    dtype: Any = np.float64,
    dimension_names: tuple[str, ...] | None = None,
) -> zarr.Array:
    """Create an empty float64 (or ``dtype``) array ``name`` (scratch and scales).

    ``dimension_names`` default: :func:`dimension_names_of` ``name`` (``("row", "col")`` for a
    name it does not know). ``compress=False`` stores raw bytes: for the scratch sketches, whose float64 entries are
    noise-like (zstd saves only a few percent of their bytes, for CPU time at every write and
    read; measured: benchmarks/RESULTS.md, "Figures behind the code's comments") and which are
    deleted when the job completes.
    """
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=np.dtype(dtype),
        compressors=_checksummed(_float_compressor() if compress else None),
        fill_value=0.0,
        overwrite=True,
        config=ALL_CHUNKS,
        dimension_names=dimension_names or dimension_names_of(name, len(shape)),
    )


#: The group of scratch arrays in an output store while its job runs (what ``--resume`` picks up);
#: removed when the job completes, so a complete store has none.
SCRATCH = "_work"
#: The scratch arrays, by name, and what each holds (k the rank, p the range oversampling, t the
#: test columns, ℓ the rows of the one-pass co-range sketch).
SCRATCH_ARRAYS: dict[str, str] = {
    "Y": "the range sketch A·S, n × (k + p), row-chunked like the source",
    "AG": "the test columns A·G, n × t, for the error estimate",
    "Z": "the co-range sketch Ψ·A, ℓ × d, column-chunked like the source (one-pass mode)",
    "PT": "pinv(L)ᵀ, n × k, row-chunked like the source (two-pass mode), in the block products' precision",
    "W": "pinv(L)·A, k × d, column-chunked like the source",
    "W_done": "one uint8 per column chunk of W, 1 once that chunk is written (the resume points of pass 2)",
    "Y_done": "one uint8 per row strip of A, 1 once its rows of Y and AG and its ‖A‖² are written "
    "(the resume points of pass 1; one-pass mode: all set once Z is written too)",
    "sumsq": "‖A‖²_F of each row strip of A, strips × 1, written with its rows of Y (pass 1)",
}


#: The ``dimension_names`` of each scratch array: the axes a job's arrays share have one name
#: (``row`` the rows of A, ``col`` its columns, ``rank`` the k of L and R), so that xarray can
#: open the scratch group as one Dataset; the rest are named by what they count.
SCRATCH_DIMS: dict[str, tuple[str, ...]] = {
    "Y": ("row", "sketch"),
    "AG": ("row", "test"),
    "Z": ("cosketch", "col"),
    "PT": ("row", "rank"),
    "W": ("rank", "col"),
    "W_done": ("col_chunk",),
    "Y_done": ("row_strip",),
    "sumsq": ("row_strip", "one"),
}
#: The ``dimension_names`` of a matrix written whole (:func:`write_array`: ``decompress``,
#: ``generate``, ``convert`` outputs) unless the caller gives the source's.
MATRIX_DIMS = ("row", "col")
_STORE_DIMS: dict[str, tuple[str, ...]] = {
    "L/codes": ("row", "rank"),
    "R/codes": ("rank", "col"),
    **{f"{side}/{what}": ("scale_row", "scale_col") for side in "LR" for what in ("scale", "offset")},
    **{f"{SCRATCH}/{name}": dims for name, dims in SCRATCH_DIMS.items()},
}


def dimension_names_of(name: str, ndim: int) -> tuple[str, ...]:
    """The Zarr ``dimension_names`` of the array ``name`` of a store (the module docstring):
    :data:`MATRIX_DIMS` for a 2-D array of any other name, ``dim_0``, ``dim_1``, … (xarray's
    default names) for any other number of axes."""
    if name.strip("/") in _STORE_DIMS:
        return _STORE_DIMS[name.strip("/")]
    return MATRIX_DIMS if ndim == 2 else tuple(f"dim_{i}" for i in range(ndim))


def scratch_name(name: str) -> str:
    """The path in the store of the scratch array ``name`` (a key of :data:`SCRATCH_ARRAYS`).

    Raises
    ------
    LplrValueError
        If ``name`` is not one of the scratch arrays.
    """
    return f"{SCRATCH}/{parse_choice(name, 'a scratch array', tuple(SCRATCH_ARRAYS))}"


def create_scratch(
    group: zarr.Group, name: str, shape: tuple[int, int], chunks: tuple[int, int], *, dtype: Any = np.float64
) -> zarr.Array:
    """Create the empty float64 (or ``dtype``) scratch array ``name`` (:func:`scratch_name`), uncompressed.

    Scratch entries are noise-like floats, read back once and deleted at completion: compressing
    them costs more time than it saves bytes (see :func:`create_float`). ``dtype`` float32 is for
    an operand that the block products use in float32 anyway (``PT`` under float32 precision).
    """
    return create_float(group, scratch_name(name), shape, chunks, compress=False, dtype=dtype)


@compact_json()
def create_scratch_marks(group: zarr.Group, name: str, count: int) -> zarr.Array:
    """Create the scratch array ``name`` of ``count`` completion marks (uint8, one per chunk), all 0.

    A worker sets its chunk's mark to 1 once the chunk is written, so a resumed job computes only
    the chunks not marked.
    """
    path = scratch_name(name)
    return group.create_array(
        path, shape=(count,), chunks=(1,), dtype=np.uint8, fill_value=0, dimension_names=dimension_names_of(path, 1)
    )


def remove_scratch(group: zarr.Group, *, keep_sketches: bool = False) -> None:
    """Delete the scratch group :data:`SCRATCH` and all in it (a job's last step); nothing if absent.

    With ``keep_sketches`` (an appendable store), the sketches are kept first (:func:`save_sketches`).
    """
    if keep_sketches:
        save_sketches(group)
    if SCRATCH in group:
        del group[SCRATCH]


#: The group of an appendable store's kept one-pass sketches (``compress --appendable``): what an
#: append updates instead of reading the matrix again; ``lplr finalize`` removes it.
SKETCHES = "sketches"
#: The scratch arrays an appendable store keeps under :data:`SKETCHES`, with the same shapes,
#: chunks and meaning (:data:`SCRATCH_ARRAYS`).
KEPT_SKETCHES = ("Y", "AG", "Z", "sumsq")
#: Where an append builds the grown store (a whole store in progress, its own attrs) before its
#: commit moves the new factors and sketches into place (:mod:`lplr_dask.append`).
STAGING = "_append"


def appendable_meta(shape: tuple[int, int], source: str | None) -> dict[str, Any]:
    """The attrs an appendable store adds: ``appendable`` (where its sketches are kept) and
    ``history``, the first entry of its shape history (docs/FORMAT.md, "Appendable stores")."""
    return {
        "appendable": {"sketches": SKETCHES, "arrays": list(KEPT_SKETCHES)},
        "history": [{"op": "compress", "shape": list(shape), "source": source, "created": _now()}],
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@compact_json()
def save_sketches(group: zarr.Group) -> None:
    """Move the one-pass sketches from the scratch to :data:`SKETCHES` (what is still there).

    ``Y``, ``Z`` and ``sumsq`` are moved (a rename on a local disk); ``AG`` is copied, as the
    error estimate reads it from the scratch: a job interrupted in between and resumed finds
    it there again. Each step can be repeated, so a resumed job's keeps what the first left.
    """
    if SKETCHES not in group:
        group.create_group(SKETCHES)
    for name in KEPT_SKETCHES:
        src, dst = scratch_name(name), f"{SKETCHES}/{name}"
        if src in group:
            move_node(group, src, dst, copy=name == "AG")


def move_node(group: zarr.Group, src: str, dst: str, *, copy: bool = False) -> None:
    """Move (or ``copy``) the array or group at ``src`` in ``group`` to ``dst``, replacing ``dst``.

    On a local disk a move is a rename of its directory; elsewhere (an fsspec store) every key is
    copied, then the source's keys deleted. ``dst`` is removed first, so a move interrupted
    half-way is finished by doing it again while ``src`` is complete: callers record a finished
    move (:mod:`lplr_dask.append` journals each in the attrs) and skip it.
    """
    root = _local_root(group)
    if root is not None:
        s, t = os.path.join(root, src), os.path.join(root, dst)
        if os.path.exists(t):
            shutil.rmtree(t)
        os.makedirs(os.path.dirname(t), exist_ok=True)
        if copy:
            shutil.copytree(s, t)
        else:
            os.replace(s, t)
        return
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import collect_aiterator, sync

    st, base = group.store, group.path.rstrip("/")
    full = lambda p: f"{base}/{p}" if base else p  # noqa: E731
    remove_node(group, dst)
    keys = collect_aiterator(st.list_prefix(full(src) + "/"))
    for key in keys:
        value = sync(st.get(key, prototype=default_buffer_prototype()))
        if value is not None:
            sync(st.set(full(dst) + key[len(full(src)) :], value))
    if not copy:
        remove_node(group, src)


def remove_node(group: zarr.Group, name: str) -> None:
    """Delete the array or group ``name`` of ``group`` and everything under it; nothing if absent."""
    root = _local_root(group)
    if root is not None:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        return
    from zarr.core.sync import collect_aiterator, sync

    base = group.path.rstrip("/")
    prefix = f"{base}/{name}" if base else name
    for key in collect_aiterator(group.store.list_prefix(prefix + "/")):
        sync(group.store.delete(key))


def _local_root(group: zarr.Group) -> str | None:
    """The directory of ``group`` when it lives on a local disk, else None."""
    from zarr.storage import LocalStore

    if isinstance(group.store, LocalStore):
        return os.path.join(str(group.store.root), group.path)
    return None


def sketch_bytes(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> int:
    """Bytes on disk of an appendable store's kept sketches (:data:`SKETCHES`; 0 for a plain store)."""
    return bytes_on_disk(path, SKETCHES, storage_options)


def write_small(group: zarr.Group, name: str, value: np.ndarray) -> None:
    """Write a small array whole (scales, offsets) as one chunk; a cupy array is copied to the host."""
    value = to_host(value).astype(np.float64, copy=False)
    arr = create_float(group, name, value.shape, value.shape or (1,))
    arr[...] = value


def read_small(group: zarr.Group, name: str, *, where: str = "", version: int = FORMAT_VERSION) -> np.ndarray:
    """Read a small array whole.

    Raises
    ------
    StoreFormatError
        If the array is missing or its chunk does not decode (naming ``name`` and the store).
    """
    where = where or str(group.store_path)
    arr = open_array(group, name, where)
    return _decoded(arr, name, where, (slice(None),) * arr.ndim, version=version)


def bytes_on_disk(path: str | os.PathLike[str], prefix: str = "", storage_options: StorageOptions = None) -> int:
    """Sum of the file sizes under the store (metadata included), or under ``prefix`` in it."""
    p = _store_path(path)
    if is_remote(p):
        fs, root = filesystem(p, storage_options)
        root = root.rstrip("/") + ("/" + prefix if prefix else "")
        return int(sum(fs.du(root, total=False).values())) if fs.exists(root) else 0
    root = os.path.join(p, prefix) if prefix else p
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def codes_bytes(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> int:
    """Bytes on disk of the chunks of ``L/codes`` and ``R/codes`` (and a backbone's ``Q/codes``):
    the codes alone.

    What is left of :func:`bytes_on_disk` is scales, offsets and metadata (Zarr's ``zarr.json``
    documents, the attrs).
    """
    return sum(bytes_on_disk(path, f"{name}/codes/c", storage_options) for name in ("L", "R", "Q"))


@compact_json()
def write_array(
    A: Any,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    attrs: dict[str, Any] | None = None,
    label: str = "write",
    storage_options: StorageOptions = None,
    dimension_names: tuple[str, ...] | list[str] | None = None,
) -> zarr.Array:
    """Write a dask array to a new Zarr v3 array at ``out``, one whole chunk per task.

    The array is chunked like ``A`` (whose chunks must be regular) and compressed with Zstd,
    every chunk stored and checksummed (:data:`CHECKSUM`). A failed write leaves nothing behind.
    ``dimension_names`` (e.g. the source's dims, attrs ``source.dims``) default to
    :data:`MATRIX_DIMS` for a matrix, ``dim_0``, … otherwise. The array is the root of its store,
    which xarray does not open (it opens groups): :func:`lplr_dask.open_dataarray` does.

    Raises
    ------
    OutputExistsError
        If ``out`` exists and ``overwrite`` is false.
    """
    clear(out, overwrite=overwrite, storage_options=storage_options)
    arr = zarr.create_array(
        locate(out, storage_options),
        shape=A.shape,
        chunks=tuple(int(c[0]) for c in A.chunks) or "auto",
        dtype=A.dtype,
        compressors=_checksummed(ZstdCodec(level=1)),
        zarr_format=3,
        config=ALL_CHUNKS,
        dimension_names=tuple(dimension_names) if dimension_names else dimension_names_of("", len(A.shape)),
    )
    if attrs:
        arr.attrs.update(jsonable(attrs))
    try:
        compute(label, da.store(A, arr, lock=False, compute=False), chunks_of=A)
    except BaseException:
        discard(out, storage_options)
        raise
    return arr


def discard(path: str | os.PathLike[str], storage_options: StorageOptions = None, *, wait: float = 5.0) -> None:
    """Remove the output of a failed write, never raising over the failure.

    When one task fails, others already running go on writing their chunks for a moment (a
    local ``rmtree`` then meets a directory that fills again, "Directory not empty"), so the
    removal is retried until the path stays gone for one pause (half a second), for ``wait``
    seconds at most.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            remove(path, storage_options)
        except OSError:
            pass
        time.sleep(0.5)
        if not exists(path, storage_options) or time.monotonic() > deadline:
            return


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars and arrays, tuples and non-string keys made plain JSON."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


_jsonable = jsonable  # the name before issue 17


# ---------------------------------------------------------------------------------------------
# Reading a store that may be damaged: every array opened and checked, every chunk accounted for
# ---------------------------------------------------------------------------------------------


def _damaged(where: str, what: str, *, version: int = FORMAT_VERSION) -> StoreFormatError:
    fix = (
        "the store is damaged; recompress or restore it"
        if version >= 2
        else ("most likely the store is damaged; recompress or restore it")
    )
    return StoreFormatError(f"{where}: {what} — {fix}")


def open_array(group: zarr.Group, name: str, where: str) -> zarr.Array:
    """``group[name]``, or a StoreFormatError naming the array when it is missing or unreadable."""
    try:
        arr = group[name]
    except KeyError:
        raise _damaged(where, f"array {name} is missing") from None
    except Exception as e:  # noqa: BLE001 - a corrupt zarr.json: JSON, metadata or codec errors
        raise _damaged(where, f"array {name} has unreadable metadata ({name}/zarr.json: {error_text(e)})") from e
    if not isinstance(arr, zarr.Array):
        raise _damaged(where, f"array {name} is a group, not an array")
    return arr


def open_arrays(group: zarr.Group, meta: dict[str, Any], where: str) -> dict[str, zarr.Array]:
    """The arrays of a complete store (:data:`lplr_dask.schema.ARRAYS`), each checked against the attrs.

    Only metadata is read: each array's ``zarr.json``, for its shape and dtype.

    Raises
    ------
    StoreFormatError
        If an array is missing, has unreadable metadata, or a shape or dtype other than the
        attrs imply (:func:`lplr_dask.schema.array_shapes`).
    """
    shapes = schema.array_shapes(meta, where)
    bits = dict(zip("LR", meta["bits"]))
    if meta.get("backbone"):
        bits["Q"] = meta["backbone"]["bits"]
    arrays = {}
    for name in schema.arrays_of(meta):
        arr = open_array(group, name, where)
        floats = np.dtype(np.float32) if name.startswith("Q/") else np.dtype(np.float64)
        dtype = code_dtype(bits[name[0]]) if name.endswith("/codes") else floats
        if tuple(arr.shape) != shapes[name] or arr.dtype != dtype:
            raise StoreFormatError(
                f"Expected array {name} of {where!r} of shape {shapes[name]} and dtype {dtype} (from its "
                f"attrs 'lplr': source.shape, rank, bits, quantizer). Got shape {tuple(arr.shape)} and "
                f"dtype {arr.dtype} instead. The store is damaged or its attrs were edited; recompress or restore it."
            )
        arrays[name] = arr
    return arrays


def chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The key of chunk ``coords`` of ``arr`` inside the array (``c/1/0``)."""
    return arr.metadata.encode_chunk_key(coords)


def chunk_coords(arr: zarr.Array) -> list[tuple[int, ...]]:
    """The coordinates of every chunk of ``arr``, in C order."""
    return list(itertools.product(*(range(c) for c in arr.cdata_shape)))


def missing_chunks(arr: zarr.Array) -> list[str]:
    """Keys of the chunks of ``arr`` that its store lacks, from one listing of the array (no data read)."""
    from zarr.core.sync import collect_aiterator

    prefix = arr.store_path.path.rstrip("/")
    prefix = prefix + "/" if prefix else ""
    present = {key[len(prefix) :] for key in collect_aiterator(arr.store_path.store.list_prefix(prefix))}
    return [key for key in map(lambda c: chunk_key(arr, c), chunk_coords(arr)) if key not in present]


def damage_message(where: str, problems: list[dict[str, str]], *, version: int = FORMAT_VERSION) -> str:
    """One line naming damaged chunks: ``{where}: chunk L/codes c/1/0 is missing — …``.

    ``problems`` are dicts with ``array``, ``chunk`` and ``problem`` (``"is missing"``, ``"cannot
    be decoded (…)"``); the first :data:`NAMED_DAMAGE` are named, then how many more there are.
    A version-1 store left out chunks of all zeros, so there a missing chunk is most likely,
    not surely, damage.
    """
    named = [f"{p['array']} {p['chunk']} {p['problem']}".replace("  ", " ") for p in problems[:NAMED_DAMAGE]]
    if len(problems) == 1:
        what = f"chunk {named[0]}"
    else:
        more = f"; and {len(problems) - NAMED_DAMAGE} more" if len(problems) > NAMED_DAMAGE else ""
        what = f"{len(problems)} chunks are damaged: " + "; ".join(named) + more
    if version < 2 and any(p["problem"] == "is missing" for p in problems):
        what += " (a version-1 store leaves out a chunk whose values are all 0, which codes almost never are)"
    return str(_damaged(where, what, version=version))


def check_chunks_present(arrays: dict[str, zarr.Array], where: str, *, version: int) -> None:
    """Refuse a store that lacks a chunk of any of ``arrays`` (one listing per array).

    Raises
    ------
    StoreFormatError
        Naming the missing chunks (:func:`damage_message`).
    """
    problems = [
        {"array": name, "chunk": key, "problem": "is missing"}
        for name, arr in arrays.items()
        for key in missing_chunks(arr)
    ]
    if problems:
        raise StoreFormatError(damage_message(where, problems, version=version))


def error_text(e: BaseException) -> str:
    """``TypeName: message`` on one line."""
    return f"{type(e).__name__}: {e}".replace("\n", " ")


#: What a codec raises on bytes it cannot decode: the checksum's ValueError, Zstd's RuntimeError,
#: Blosc's and numcodecs' ValueError, TypeError or EOFError on short input.
DECODE_ERRORS = (ValueError, RuntimeError, TypeError, EOFError)


def decode_problem(e: BaseException) -> str:
    """What a chunk that raised ``e`` (one of :data:`DECODE_ERRORS`) while decoding has: the text
    after the chunk's name in :func:`damage_message`."""
    if "checksum" in str(e):
        return "fails its crc32c checksum (truncated or altered)"
    return f"cannot be decoded ({error_text(e)})"


def chunk_of(arr: zarr.Array, index: tuple[Any, ...]) -> tuple[int, ...]:
    """The chunk that a (one-chunk) selection starts in."""
    coords = []
    for i, size in zip(index, arr.chunks):
        start = (i.start or 0) if isinstance(i, slice) else int(np.min(i)) if np.size(i) else 0
        coords.append(int(start) // size)
    return tuple(coords)


def _decoded(
    arr: zarr.Array, name: str, where: str, index: tuple[Any, ...], *, version: int = FORMAT_VERSION
) -> np.ndarray:
    """``arr[index]`` (within one chunk); a chunk that fails to decode or is missing raises a
    StoreFormatError naming it. A missing chunk reads as fill values (zeros), so only a block of
    zeros costs a look-up of its key."""
    try:
        block = np.asarray(arr[index])
    except DECODE_ERRORS as e:
        key = chunk_key(arr, chunk_of(arr, index))
        raise _damaged(where, f"chunk {name} {key} {decode_problem(e)}", version=version) from e
    if block.size and not block.any():
        from zarr.core.sync import sync

        key = chunk_key(arr, chunk_of(arr, index))
        prefix = arr.store_path.path.rstrip("/")
        if not sync(arr.store_path.store.exists(f"{prefix}/{key}" if prefix else key)):
            problem = {"array": name, "chunk": key, "problem": "is missing"}
            raise StoreFormatError(damage_message(where, [problem], version=version))
    return block


class _CheckedArray:
    """A zarr array for :func:`dask.array.from_array` whose reads name the chunk that fails (picklable)."""

    def __init__(self, arr: zarr.Array, name: str, where: str, version: int):
        self.arr, self.name, self.where, self.version = arr, name, where, version
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        return _decoded(self.arr, self.name, self.where, index, version=self.version)


def read_chunks(arr: zarr.Array, name: str, where: str, *, version: int = FORMAT_VERSION) -> Any:
    """``arr`` as a lazy dask array, one task per chunk, like :func:`dask.array.from_zarr`.

    A chunk that fails to decode (a bad checksum, a truncated or garbled file) or that is
    missing from the store when it is read raises :class:`StoreFormatError` naming ``name``,
    the chunk key and the store ``where``, instead of the codec's own error or fill values.
    """
    from dask.base import tokenize

    return da.from_array(
        _CheckedArray(arr, name, where, version),
        chunks=arr.chunks,
        name=f"read-{name}-" + tokenize(arr, name, where),
        meta=np.empty((0,) * arr.ndim, arr.dtype),
    )

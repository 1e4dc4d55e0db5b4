"""Guards for the user's data: outputs that would destroy an input, a second writer, a changed input.

Three checks, each made before anything is written:

- :func:`check_output`: an output that is, contains, or lies inside an input (resolved local
  paths; normalized URLs for remote stores) is refused, since replacing it would delete the input
  that the job is about to read lazily; and ``--overwrite`` of something this tool did not write
  is refused (:func:`is_tool_output`).
- :class:`StoreLock`: a lock file inside the output store names the job writing it; a second
  writer is refused while the first runs, a lock left by a dead process on this host is broken.
- :func:`fingerprint`: shape, dtype and a hash of the input's metadata and of a sample of its
  stored chunks, recorded when a job starts; ``--resume`` refuses an input that changed since.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np

from lplr_dask import store
from lplr_dask.errors import LplrError, LplrValueError, OutputLockedError, StoreFormatError
from lplr_dask.sources import FILE_FORMATS, INDEX_SUFFIX, parse_location, shard_files, zarr_array_of

__all__ = [
    "TOOL_ATTRS",
    "LOCK_NAME",
    "OutputLockedError",
    "location_key",
    "check_output",
    "is_tool_output",
    "StoreLock",
    "fingerprint",
    "check_fingerprint",
]

#: Attribute keys that mark a Zarr node as written by this tool (a store, a group output, or an
#: array written by ``generate``, ``convert``, ``decompress`` or a group's copy).
TOOL_ATTRS = ("lplr", "lplr_group", "lplr_generate", "lplr_convert", "lplr_decompress", "lplr_copy")

#: The lock file inside an output store while a job writes it.
LOCK_NAME = ".lplr-lock.json"

#: Chunks of a Zarr input whose stored bytes the fingerprint hashes (spread over the chunk grid).
FINGERPRINT_CHUNKS = 8
#: Bytes hashed at each of a few places of a file input (``.npy``, HDF5, safetensors).
FINGERPRINT_WINDOW = 2**16
#: Windows of a sampled Zarr chunk's stored bytes the fingerprint hashes (with the chunk's size).
FINGERPRINT_CHUNK_WINDOWS = 8


# --------------------------------------------------------------------------------------------
# Paths


def location_key(location: Any, storage_options: dict[str, Any] | None = None) -> tuple[str, str] | None:
    """A normalized ``(where, path)`` of a location, for comparing two of them.

    Local paths (and ``file://`` URLs) become ``("", realpath)``; an fsspec URL becomes
    ``(protocol and endpoint, path without the protocol)``. Returns None for what has no location
    (an in-memory array).
    """
    if isinstance(location, (str, os.PathLike)):
        text = os.fspath(location)
    else:
        text = _zarr_array_location(location)
        if text is None:
            return None
    local = _local_path(text)
    if local is not None:
        return "", os.path.realpath(os.path.abspath(local)).rstrip(os.sep) or os.sep
    protocol, rest = text.split("://", 1)
    endpoint = str(
        (storage_options or {}).get("endpoint_url")
        or (storage_options or {}).get("client_kwargs", {}).get("endpoint_url", "")
    )
    return f"{protocol.lower()}|{endpoint.rstrip('/')}", "/".join(p for p in rest.split("/") if p not in ("", "."))


def _local_path(text: str) -> str | None:
    """The local path a location names (``file://`` stripped), or None for an fsspec URL."""
    return None if store.is_remote(text) else text.removeprefix("file://")


def _zarr_array_location(obj: Any) -> str | None:
    """The local path of an open ``zarr.Array`` on a local store, else None."""
    import zarr

    if not isinstance(obj, zarr.Array):
        return None
    root = getattr(obj.store, "root", None)
    return None if root is None else os.path.join(os.fspath(root), obj.path)


def _input_path(source: Any) -> Any:
    """The location whose bytes an input occupies: a file for ``FILE.h5:/x``, else the path itself."""
    if isinstance(source, (str, os.PathLike)):
        _, path, _ = parse_location(os.fspath(source))
        return path
    return source


def _input_paths(source: Any) -> list[Any]:
    """Every location whose bytes an input occupies: for a sharded checkpoint's index, the index
    and its shards (those that exist); else :func:`_input_path`."""
    path = _input_path(source)
    if isinstance(path, str) and parse_location(path)[0] == "safetensors-index":
        try:
            return [path, *shard_files(path)]
        except LplrError:  # a missing or malformed index: reading it says what is wrong
            return [path]
    return [path]


#: Output names that are not Zarr stores: the file formats this tool reads, and the index of a
#: sharded checkpoint.
NOT_ZARR_SUFFIXES = (*FILE_FORMATS, INDEX_SUFFIX, ".json")


def check_zarr_name(out: Any, what: str = "output") -> None:
    """Refuse a Zarr output named like a file of another format (``up.safetensors``, ``W.npy``).

    Raises
    ------
    LplrValueError
        If ``out`` ends with a suffix of :data:`NOT_ZARR_SUFFIXES`.
    """
    if not isinstance(out, (str, os.PathLike)):
        return
    name = os.fspath(out).rstrip("/").lower()
    suffix = next((s for s in NOT_ZARR_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        return
    hint = (
        " To write safetensors, run `lplr export STORE.lplr.zarr OUT.safetensors` on a compressed store."
        if suffix in (".safetensors", INDEX_SUFFIX)
        else ""
    )
    raise LplrValueError(
        f"The {what} {os.fspath(out)!r} is written as a Zarr store (a directory), but its name ends with "
        f"{suffix!r}, the name of another format. Name it with .zarr (or no suffix).{hint}"
    )


def _inside(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    if inner[0] != outer[0]:
        return False
    sep = "/" if inner[0] else os.sep
    return inner[1] == outer[1] or inner[1].startswith(outer[1].rstrip(sep) + sep)


def check_output(
    out: Any,
    inputs: Iterable[Any],
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    what: str = "output",
    zarr: bool = True,
) -> None:
    """Refuse an output that would destroy an input, or an ``overwrite`` of a foreign path.

    Parameters
    ----------
    out : str or os.PathLike
        The output location.
    inputs : iterable
        The locations (or open Zarr arrays) the job reads; None entries are skipped.
    overwrite : bool, default=False
        Whether the job will replace ``out``: then ``out`` must be missing, empty, or
        written by this tool (:func:`is_tool_output`).
    storage_options : dict, optional
        fsspec options, used to tell remote endpoints apart.
    what : str
        How messages name ``out``.
    zarr : bool, default=True
        Whether ``out`` is a Zarr store: then a name of another format is refused
        (:func:`check_zarr_name`), and ``overwrite`` checks for this tool's Zarr attributes.
        False for a file the caller checks itself (``lplr export``).

    Raises
    ------
    LplrValueError
        If ``out`` is, contains or lies inside an input (every shard of a sharded checkpoint
        counts), is a Zarr store named like another format, or ``overwrite`` would replace a
        file or Zarr data that this tool did not write.
    """
    if zarr:
        check_zarr_name(out, what)
    target = location_key(out, storage_options)
    for source, path in ((s, p) for s in inputs if s is not None for p in _input_paths(s)):
        key = location_key(path, storage_options)
        if key is None or target is None:
            continue
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else key[1]
        if key == target:
            relation = "is"
        elif _inside(key, target):
            relation = "contains"
        elif _inside(target, key):
            relation = "lies inside"
        else:
            continue
        raise LplrValueError(
            f"The {what} {os.fspath(out)!r} {relation} the input {name!r}: writing it would destroy the "
            "input. Choose an output path outside the input."
        )
    if overwrite and zarr:
        _check_replaceable(out, storage_options, what)


def _check_replaceable(out: Any, storage_options: dict[str, Any] | None, what: str) -> None:
    if not store.exists(out, storage_options) or is_tool_output(out, storage_options):
        return
    raise LplrValueError(
        f"Refusing to overwrite {os.fspath(out)!r}: it is not an output of lplr-dask (no Zarr node with "
        f"{', '.join(repr(a) for a in TOOL_ATTRS[:2])} or another lplr attribute). Choose another {what} "
        "path, or delete it yourself if you mean to replace it."
    )


def is_tool_output(path: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` is missing, an empty directory, or a Zarr node this tool wrote.

    A node counts when its attrs hold one of :data:`TOOL_ATTRS`, or when it holds this tool's
    lock file (a job that was interrupted before it wrote any attrs).
    """
    import zarr

    text = os.fspath(path)
    local = _local_path(text)
    if local is not None:
        if not os.path.exists(local) or (os.path.isdir(local) and not os.listdir(local)):
            return True
        if os.path.isfile(local):
            return False
    elif not store.exists(text, storage_options):
        return True
    if StoreLock(text, storage_options).holder() is not None:  # a job of this tool wrote (or writes) it
        return True
    try:
        node = zarr.open(store.locate(text, storage_options), mode="r")
    except Exception:  # noqa: BLE001 - not a Zarr node at all: not ours
        return False
    return any(key in node.attrs for key in TOOL_ATTRS)


# --------------------------------------------------------------------------------------------
# The lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class StoreLock:
    """A lock file inside an output store naming the job that writes it.

    Parameters
    ----------
    path : str or os.PathLike
        The output store (a local directory or an fsspec URL); it must exist.
    storage_options : dict, optional
        fsspec options for a remote store.

    Notes
    -----
    Locally the lock is created with ``O_EXCL``, so of two jobs starting at once only one gets
    it. On a remote store the check and the write are two requests: two jobs started within
    the same fraction of a second can both pass. A lock whose process has died on this host is
    broken automatically; one from another host is reported with how to remove it.
    """

    def __init__(self, path: Any, storage_options: dict[str, Any] | None = None):
        self.path = os.fspath(path)
        self.storage_options = storage_options
        self.job = {
            "job_id": uuid.uuid4().hex[:12],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "python",
        }
        self.held = False

    @property
    def _file(self) -> str:
        return self.path.rstrip("/") + "/" + LOCK_NAME

    def _fs(self) -> tuple[Any, str]:
        fs, root = store.filesystem(self.path, self.storage_options)
        return fs, root.rstrip("/") + "/" + LOCK_NAME

    def holder(self) -> dict[str, Any] | None:
        """The job recorded in the lock file, or None when there is none (or it is unreadable)."""
        try:
            fs, name = self._fs()
            if not fs.exists(name):
                return None
            return dict(json.loads(fs.cat_file(name)))
        except (OSError, ValueError, TypeError):
            return None

    def check_free(self) -> None:
        """Raise :class:`OutputLockedError` if a live job holds the lock; break a dead one's."""
        other = self.holder()
        if other is None or other.get("job_id") == self.job["job_id"]:
            return
        if other.get("host") == self.job["host"] and isinstance(other.get("pid"), int) and not _pid_alive(other["pid"]):
            self._remove()  # its process is gone: a stale lock
            return
        raise OutputLockedError(
            f"{self.path!r} is being written by job {other.get('job_id')} (pid {other.get('pid')} on host "
            f"{other.get('host')}, started {other.get('started')}: {other.get('command')}). Wait for it to "
            f"finish. If no such job is running (it was killed), remove the stale lock with "
            f"`rm {self._file}` and rerun."
        )

    def acquire(self) -> None:
        """Take the lock (the output must exist).

        Raises
        ------
        OutputLockedError
            If another live job holds it.
        """
        self.check_free()
        data = json.dumps(self.job).encode()
        fs, name = self._fs()
        if _local_path(self.path) is not None:
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check_free()  # raises for a live holder
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            fs.pipe_file(name, data)
        self.held = True

    def owned(self) -> bool:
        """Whether the lock file still names this job (another job may have replaced the store)."""
        other = self.holder()
        return other is not None and other.get("job_id") == self.job["job_id"]

    def release(self) -> None:
        """Remove the lock file if this job holds it."""
        if self.held and self.owned():
            self._remove()
        self.held = False

    def _remove(self) -> None:
        try:
            fs, name = self._fs()
            if fs.exists(name):
                fs.rm_file(name)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# The input's fingerprint


def fingerprint(
    source: Any, A: Any, *, storage_options: dict[str, Any] | None = None, like: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Shape, dtype and a hash of an input's metadata and a sample of its stored bytes.

    Parameters
    ----------
    source : lplr_dask.sources.Source
        The input as found (its ``path`` and ``format`` say how to sample it).
    A : dask array
        The matrix as computed (its shape and dtype are recorded).
    storage_options : dict, optional
        fsspec options for a remote input.
    like : dict, optional
        A recorded fingerprint to compare with: a Zarr input is hashed by its method when that is
        the older ``zarr-chunks``, so a store started by an earlier version still resumes checked.

    Returns
    -------
    dict
        ``{"shape", "dtype", "method", "sha256"}``. ``method`` is ``zarr-chunk-windows`` (the
        array's metadata without its attributes, and for up to :data:`FINGERPRINT_CHUNKS` chunks
        spread over the grid the stored size and :data:`FINGERPRINT_CHUNK_WINDOWS` windows of
        :data:`FINGERPRINT_WINDOW` bytes spread over the stored bytes: a regenerated input
        differs in all of them, while hashing whole 64 MiB chunks took 0.9 s of a 13 s job and
        downloaded 0.5 GB from a remote store), ``zarr-chunks`` (the same with the
        whole stored bytes of those chunks: what earlier versions recorded, computed only
        ``like`` such a record), ``file-sample`` (size and a few
        windows of the file), ``numpy-sample`` (a strided sample of an in-memory array), or
        ``shape-dtype`` (a dask array, whose graph says nothing reliable about its values: the
        hash covers nothing more). Reads no more than a few chunks' stored bytes; decodes nothing.
    """
    h = hashlib.sha256()
    array = source.array
    if source.format == "zarr":
        method = "zarr-chunks" if (like or {}).get("method") == "zarr-chunks" else "zarr-chunk-windows"
        _hash_zarr(h, zarr_array_of(source, storage_options), windows=method == "zarr-chunk-windows")
    elif source.format in ("npy", "hdf5", "safetensors") and source.path is not None:
        method = "file-sample"
        _hash_file(h, _input_path(source.path))
        h.update(source.path.encode())
    elif source.format == "numpy":
        method = "numpy-sample"
        values = np.asarray(array[tuple(slice(None, None, max(1, s // 64)) for s in array.shape)])
        h.update(np.ascontiguousarray(values).tobytes())
    else:  # a dask array: its graph is not its content, so only its shape and dtype are recorded
        method = "shape-dtype"
    return {"shape": [int(s) for s in A.shape], "dtype": str(source.dtype), "method": method, "sha256": h.hexdigest()}


def _sample_coords(grid: tuple[int, ...], count: int) -> list[tuple[int, ...]]:
    """Up to ``count`` chunk coordinates spread evenly over a chunk grid (first and last included)."""
    total = int(np.prod(grid))
    picks = sorted({int(round(x)) for x in np.linspace(0, total - 1, min(count, total))})
    return [tuple(int(c) for c in np.unravel_index(i, grid)) for i in picks]


def _hash_zarr(h: Any, arr: Any, *, windows: bool = True) -> None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    meta = arr.metadata.to_dict()
    meta.pop("attributes", None)
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    grid = tuple(-(-s // c) for s, c in zip(arr.shape, arr.chunks))
    prefix = f"{arr.path}/" if arr.path else ""
    for coords in _sample_coords(grid, FINGERPRINT_CHUNKS):
        key = prefix + arr.metadata.encode_chunk_key(coords)
        h.update(key.encode())
        if windows:
            h.update(_stored_windows(arr.store, key))
            continue
        buf = sync(arr.store.get(key, prototype=default_buffer_prototype()))
        h.update(b"<missing>" if buf is None else hashlib.sha256(buf.to_bytes()).digest())


def _stored_windows(store: Any, key: str) -> bytes:
    """A digest of a stored object's size and :data:`FINGERPRINT_CHUNK_WINDOWS` windows of
    :data:`FINGERPRINT_WINDOW` bytes evenly spread over it (first and last included; the whole
    object when it is shorter), read as concurrent byte ranges: about 0.5 MiB of a chunk leaves
    the store, local or remote."""
    import asyncio

    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    proto = default_buffer_prototype()

    async def read() -> list[Any]:
        if not await store.exists(key):
            return []
        size = await store.getsize(key)
        starts = np.unique(_window_starts(size, FINGERPRINT_CHUNK_WINDOWS))  # a short chunk: one window
        parts = await asyncio.gather(
            *(
                store.get(key, prototype=proto, byte_range=RangeByteRequest(int(a), int(a) + FINGERPRINT_WINDOW))
                for a in starts
            )
        )
        return [str(size).encode(), *(b"" if p is None else p.to_bytes() for p in parts)]

    parts = sync(read())
    return hashlib.sha256(b"".join(parts)).digest() if parts else b"<missing>"


def _window_starts(size: int, count: int) -> np.ndarray:
    """Offsets of ``count`` windows of :data:`FINGERPRINT_WINDOW` bytes evenly spread over
    ``size`` bytes, the first at 0 and the last ending at the end (repeated when it is short)."""
    return np.linspace(0, max(size - FINGERPRINT_WINDOW, 0), count).astype(np.int64)


def _hash_file(h: Any, path: str) -> None:
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        for start in _window_starts(size, 5):
            f.seek(int(start))
            h.update(f.read(FINGERPRINT_WINDOW))


def check_fingerprint(
    recorded: dict[str, Any] | None, current: dict[str, Any], *, out: str, source: str | None
) -> None:
    """Refuse to resume when the input changed since the job started.

    A store started by a version that recorded no fingerprint is resumed without the check.

    Raises
    ------
    StoreFormatError
        If ``recorded`` and ``current`` differ.
    """
    if not recorded or recorded.get("method") != current.get("method"):
        return
    if recorded == current:
        return
    what = (
        "shape or dtype" if (recorded["shape"], recorded["dtype"]) != (current["shape"], current["dtype"]) else "data"
    )
    raise StoreFormatError(
        f"Cannot resume {out!r}: its input {source or '(in-memory array)'!r} changed since the job started "
        f"(its {what} differs: {current['method']} fingerprint {current['sha256'][:12]} instead of "
        f"{recorded['sha256'][:12]}). Mixing factors of two inputs would be wrong: rerun with --overwrite "
        "to compress the input as it is now."
    )

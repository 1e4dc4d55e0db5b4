"""``lplr verify``: read every chunk of a store once and report what is damaged.

Opening a store (:func:`lplr_dask.open_factors`) checks its attrs, its arrays' shapes and that
every chunk is present, but reads no codes; a damaged chunk is found when it is read.
:func:`verify` reads them all, one task per chunk (on the current Dask client, if any), and
checks of each that it is present, decodes (its crc32c checksum matches, in a store of format
version 2), holds codes below ``2**bits`` (codes arrays) or finite values (scales and offsets).
On the output of ``compress-group`` it checks every member: each compressed store, and each
copied array (present and decodes). An appendable store's kept sketches (``sketches/``) are
checked too (present, decode, finite): the next ``lplr append`` computes from them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from lplr_dask import store
from lplr_dask.errors import StoreFormatError
from lplr_dask.progress import compute

__all__ = ["verify"]

Problem = dict[str, str]


def _check_chunk(arr: zarr.Array, name: str, coords: tuple[int, ...], limit: int | None, finite: bool) -> list[Problem]:
    """The problems of one chunk: it fails to decode, holds codes >= ``limit`` (if given), or
    (if ``finite``) NaN or Inf."""
    key = store.chunk_key(arr, coords)
    index = tuple(slice(c * s, (c + 1) * s) for c, s in zip(coords, arr.chunks))
    try:
        block = np.asarray(arr[index])
    except store.DECODE_ERRORS as e:
        return [{"array": name, "chunk": key, "problem": store.decode_problem(e)}]
    if limit is not None and block.size and int(block.max()) >= limit:
        return [{"array": name, "chunk": key, "problem": f"holds codes >= {limit} (2**bits)"}]
    if finite and not np.isfinite(block).all():
        return [{"array": name, "chunk": key, "problem": "holds NaN or Inf"}]
    return []


class _Plan:
    """What one verification reads: per array, the missing chunks now and one task per present chunk."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.tasks: list[Any] = []
        self.arrays = 0
        self.chunks = 0
        self.version = store.FORMAT_VERSION

    def array(self, arr: zarr.Array, name: str, *, limit: int | None = None, finite: bool = False) -> None:
        import dask

        missing = set(store.missing_chunks(arr))
        self.arrays += 1
        for coords in store.chunk_coords(arr):
            self.chunks += 1
            key = store.chunk_key(arr, coords)
            if key in missing:
                self.problems.append({"array": name, "chunk": key, "problem": "is missing"})
            else:
                self.tasks.append(dask.delayed(_check_chunk, pure=True)(arr, name, coords, limit, finite))

    def lplr_store(self, group: zarr.Group, where: str, prefix: str = "") -> None:
        meta = store.read_meta(group, path=where)
        self.version = min(self.version, int(meta["version"]))
        bits = dict(zip("LR", meta["bits"]))
        if meta.get("backbone"):  # format version 3: Q's codes
            bits["Q"] = int(meta["backbone"]["bits"])
        for name, arr in store.open_arrays(group, meta, where).items():
            if name.endswith("/codes"):
                self.array(arr, prefix + name, limit=1 << bits[name[0]])
            else:
                self.array(arr, prefix + name, finite=True)
        kept = meta.get("appendable")
        if isinstance(kept, dict):  # an appendable store: the sketches the next append reads
            folder = kept.get("sketches", store.SKETCHES)
            for name in kept.get("arrays", store.KEPT_SKETCHES):
                self.array(store.open_array(group, f"{folder}/{name}", where), f"{prefix}{folder}/{name}", finite=True)


def verify(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Check every chunk of an ``*.lplr.zarr`` store (or a ``compress-group`` output) in one read.

    Parameters
    ----------
    path : str or os.PathLike
        The store: a local path or an fsspec URL.
    storage_options : dict, optional
        fsspec options for a remote store.
    log : callable, optional
        Receives one line saying what is checked.

    Returns
    -------
    dict
        ``store``, ``version`` (the lowest format version among the stores checked),
        ``arrays_checked``, ``chunks_checked``, ``bytes_on_disk`` and ``problems`` (empty: the
        store is clean).

    Raises
    ------
    StoreFormatError
        If anything is damaged: the attrs, an array's metadata or shape (at once), or chunks
        (after the read, naming the first few and how many more; see
        :func:`lplr_dask.store.damage_message`); its ``problems`` attribute lists them all as
        dicts of ``array``, ``chunk`` and ``problem``.
    """

    where = os.fspath(path)
    group = store.open_group(where, storage_options=storage_options)
    plan = _Plan()
    members = group.attrs.get("lplr_group")
    if isinstance(members, dict):
        for entry in members.get("arrays", []):
            name = entry["name"]
            if entry.get("action") == "lplr":
                member = store.open_group(f"{where.rstrip('/')}/{name}", storage_options=storage_options)
                plan.lplr_store(member, f"{where.rstrip('/')}/{name}", prefix=f"{name}/")
            else:
                plan.array(store.open_array(group, name, where), name)  # a copy: NaN may be data
    else:
        plan.lplr_store(group, where)
    log(f"verify {where}: {plan.arrays} arrays, {plan.chunks} chunks")
    if plan.tasks:
        for found in compute(f"verify {plan.chunks} chunks", *plan.tasks):
            plan.problems.extend(found)
    if plan.problems:
        error = StoreFormatError(store.damage_message(where, plan.problems, version=plan.version))
        error.problems = plan.problems  # type: ignore[attr-defined]
        raise error
    return {
        "store": where,
        "version": plan.version,
        "arrays_checked": plan.arrays,
        "chunks_checked": plan.chunks,
        "bytes_on_disk": store.bytes_on_disk(where, storage_options=storage_options),
        "problems": plan.problems,
    }

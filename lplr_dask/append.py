"""Append rows or columns to a compressed matrix without reading what it compressed [1]_.

An appendable store (``lplr compress IN OUT --passes 1 --appendable``) keeps the one-pass
sketches of A (n×d) under ``sketches/`` (:data:`lplr_dask.store.SKETCHES`): the range sketch
``Y = A·S``, the co-range sketch ``Z = Ψ·A``, the test columns ``A·G`` and ‖A‖² by row strip.
All four are linear in A, and S, G (by column) and Ψ (by row) are generated block-wise from the
seed and the absolute position (:mod:`lplr_dask.sketch`), never from the total shape, so:

- **new rows B** (m×d): Y gains the rows ``B·S``, ``Z += Ψ[:, n:n+m]·B``, A·G gains ``B·G``,
  ‖A‖² gains ‖B‖²;
- **new columns C** (n×m): ``Y += C·S[d:d+m]``, Z gains the columns ``Ψ·C``, ``A·G += C·G[d:d+m]``,
  ‖A‖² gains ‖C‖²;

and the factors are recomputed from the sketches alone by the stages of one-pass mode
(:data:`lplr_dask.factorize.STAGES` after pass 1: the basis, ``W = (Ψ·L̂)^† Z``, R, the error
estimate). Only the new block is read. With the parameters the store recorded (rank, bits, seed,
the range oversampling ``p`` and the sketch kind, both resolved from the first shape, and the
block products' precision), the result is a one-pass compression of the concatenation: with
float64 products its codes are those of ``compress --passes 1`` of the whole matrix
(``tests/test_append.py``).

Chunks. The new block is read in the store's chunks (``source.chunks``), and the store's extent
along the appended axis must be a whole number of them: a block that began inside a partial
chunk would be cut into other chunks than a compression of the whole, whose float32 block
products (``precision="auto"`` on float32 input) would then differ.

Crash safety. The previous factors stay valid and openable until the new ones are complete:

1. the grown store is built in ``OUT/_append/`` (:data:`lplr_dask.store.STAGING`), a store in
   progress with its own attrs: its ``_work`` sketches first (marked done once all are written),
   then the stages, each resumable as in a compression;
2. the commit writes ``append_commit`` (a journal) to the attrs with ``complete: false``, moves
   ``L``, ``R`` and ``sketches`` from ``_append/`` into place (a rename each on a local disk, a
   copy of their keys on an fsspec store), recording each move in the journal, then writes the
   grown store's attrs (``complete: true``, the shape history) and removes ``_append/``.

An append stopped before the commit leaves the store as it was (plus ``_append/``): ``--resume``
continues it from its last stage, a run without ``--resume`` discards it and starts over; both
give the same codes. Stopped during the commit (a local commit is a few renames, during which
Ctrl-C and SIGTERM are held back until it is done), the store refuses to open, naming the
command, and ``--resume`` finishes the moves.

References
----------
.. [1] J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. "Streaming low-rank matrix approximation
   with an application to scientific simulation." SIAM J. Sci. Comput. 41(4), 2019.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import dask.array as da
import numpy as np
import zarr

from lplr_dask import factorize, guard, logs, store
from lplr_dask.backend import like, to_device, to_host_blocks
from lplr_dask.errors import LplrValueError, StoreFormatError
from lplr_dask.factors import Factors, open_factors
from lplr_dask.job import cluster_client
from lplr_dask.options import Options
from lplr_dask.progress import compute
from lplr_dask.sources import Source, as_matrix, read_source, with_chunks
from lplr_dask.validation import parse_choice

__all__ = ["AXES", "AppendPlan", "append", "check_append", "finalize", "stored_options"]

Log = Callable[[str], None]

#: The axes a block can be appended along: ``rows`` (B is m×d) or ``columns`` (C is n×m).
AXES = ("rows", "columns")

#: What the commit moves from the staging store into place, in this order.
_MOVED = ("L", "R", store.SKETCHES)


def append(
    store_path: str | os.PathLike[str],
    new: Any,
    *,
    axis: str,
    resume: bool = False,
    storage_options: dict[str, Any] | None = None,
    log: Log = logs.info,
) -> Factors:
    """Append the rows or columns ``new`` to the matrix an appendable store compresses.

    Reads ``new`` once and nothing the store compressed: the kept sketches are updated and the
    factors, the error estimate and the attrs recomputed from them (see the module docstring).

    Parameters
    ----------
    store_path : str or os.PathLike
        An ``*.lplr.zarr`` store written with ``appendable=True`` (``--appendable``).
    new : str, os.PathLike, zarr.Array, dask or numpy array
        The block, as :func:`lplr_dask.compress` reads a source: m×d for ``axis="rows"``, n×m for
        ``axis="columns"``, of the store's source dtype.
    axis : {"rows", "columns"}
    resume : bool, default=False
        Finish an interrupted append of the same block. Without it, an interrupted append's
        staging is discarded and the append starts over (the same result).
    storage_options : dict, optional
        fsspec options for a remote store or block.
    log : callable, default=lplr_dask.logs.info

    Returns
    -------
    Factors
        The grown store, opened.

    Raises
    ------
    LplrValueError
        For a store written without ``appendable=True``, a block of the wrong width, height or
        dtype, or a store whose extent along ``axis`` does not fill whole chunks; nothing is
        changed.
    StoreFormatError
        For an incomplete or damaged store.
    """
    plan = check_append(store_path, new, axis=axis, resume=resume, storage_options=storage_options)
    group, path, part, params, entry = plan.group, plan.path, plan.part, plan.params, plan.entry
    entry["fingerprint"] = guard.fingerprint(
        plan.source, part, storage_options=storage_options, like=_recorded_fingerprint(group, plan.meta)
    )
    options = stored_options(plan.meta, storage_options)
    lock = guard.StoreLock(path, storage_options)
    lock.acquire()
    try:
        with cluster_client(log, options.device):
            _append(group, path, part, params, entry, resume=resume, storage_options=storage_options, log=log)
    finally:
        lock.release()
    return open_factors(path, storage_options=storage_options)


class AppendPlan(NamedTuple):
    """An append checked by :func:`check_append`: the store, the block read in its chunks, the
    parameters of the grown matrix and its history entry (without the block's fingerprint)."""

    group: zarr.Group
    path: str
    meta: dict[str, Any]
    source: Source
    part: da.Array
    params: factorize.Params
    entry: dict[str, Any]


def check_append(
    store_path: str | os.PathLike[str],
    new: Any,
    *,
    axis: str,
    resume: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> AppendPlan:
    """Check an append as :func:`append` does, before anything is read or written (the CLI calls
    it before a cluster starts).

    Raises
    ------
    LplrValueError, StoreFormatError
        As :func:`append`.
    """
    axis = parse_choice(axis, "axis (--rows or --columns)", AXES)
    path = os.fspath(store_path)
    group = store.open_group(path, mode="r+", storage_options=storage_options)
    meta = store.read_meta(group, require_complete=False, path=path)
    _check_store(meta, group, path, resume=resume)
    guard.check_output(path, [new], storage_options=storage_options, what="store appended to")
    options = stored_options(meta, storage_options)
    src = read_source(new, storage_options=storage_options)
    part = _read_part(src, meta, axis, path, options.device)
    n, d = meta["source"]["shape"]
    shape = (n + part.shape[0], d) if axis == "rows" else (n, d + part.shape[1])
    params = _params(options, meta, shape, part.dtype, path)
    entry = {"op": "append", "axis": axis, "shape": list(shape), "source": src.path}
    return AppendPlan(group, path, meta, src, part, params, entry)


def finalize(
    store_path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None, log: Log = logs.info
) -> Factors:
    """Remove an appendable store's kept sketches: the plain format again, no more appends.

    The shape history (attrs ``history``) stays. A store that is already plain is left as it is
    (leftover sketches of a finalize that was stopped are removed).

    Raises
    ------
    StoreFormatError
        For an incomplete store, or one whose append stopped in its commit (finish it first).
    """
    path = os.fspath(store_path)
    group = store.open_group(path, mode="r+", storage_options=storage_options)
    meta = store.read_meta(group, require_complete=True, path=path)
    lock = guard.StoreLock(path, storage_options)
    lock.acquire()
    try:
        if store.STAGING in group:
            log(f"{path}: discarding an interrupted append")
            store.remove_node(group, store.STAGING)
        freed = store.sketch_bytes(path, storage_options)
        if "appendable" in meta:  # the attrs first: a finalize stopped after it leaves a plain store
            meta.pop("appendable")
            store.write_meta(group, meta)
        store.remove_node(group, store.SKETCHES)
        log(f"{path}: finalized; the kept sketches ({freed:,} bytes) removed")
    finally:
        lock.release()
    return open_factors(path, storage_options=storage_options)


def stored_options(meta: dict[str, Any], storage_options: dict[str, Any] | None = None) -> Options:
    """The :class:`~lplr_dask.options.Options` a store's attrs record: those of its compression,
    with the resolved range oversampling and sketch kind (an append must not resolve them again
    from the grown shape) and the block products' precision."""
    sketch = meta["sketch"]
    return Options(
        bits=tuple(meta["bits"]),  # type: ignore[arg-type]
        passes=meta["passes"],
        oversample=int(sketch.get("range_oversample", 0)),
        quantizer=meta["quantizer"]["name"],
        seed=meta["seed"],
        test_columns=int(sketch["test_columns"]),
        precision=meta.get("precision", "float64"),
        sketch=sketch["kind"],
        device=meta.get("device", "cpu"),
        storage_options=storage_options,
        appendable=True,
    )


def _check_store(meta: dict[str, Any], group: zarr.Group, path: str, *, resume: bool) -> None:
    """Refuse a store that cannot take an append (nothing is changed)."""
    if "append_commit" in meta:
        if not resume:
            raise StoreFormatError(
                f"{path!r}: an append stopped while it moved the new factors into place. Finish it with "
                "the same command and --resume."
            )
        return
    if not meta["complete"]:
        store.read_meta(group, path=path)  # raises: incomplete, with the command that finishes it
    if "appendable" not in meta:
        raise LplrValueError(
            f"Expected an appendable store (compressed with --appendable, API appendable=True). Got {path!r}, "
            "which keeps no sketches: appending to it would need the matrix it compressed. Recompress the "
            "matrix with `lplr compress IN OUT --passes 1 --appendable`, then append to that."
        )
    if store.SKETCHES not in group:
        raise StoreFormatError(
            f"{path!r}: its attrs say it is appendable but its sketches ({store.SKETCHES}/) are missing — the "
            "store is damaged; recompress it with --appendable."
        )


def _read_part(src: Source, meta: dict[str, Any], axis: str, path: str, device: str) -> da.Array:
    """The block ``src`` checked against the store and read in its chunks, on ``device``.

    Raises
    ------
    LplrValueError
        For another dtype than the store's source, the wrong width (rows) or height (columns), or
        a store whose extent along ``axis`` is not a whole number of its chunks.
    """
    n, d = meta["source"]["shape"]
    r, c = meta["source"].get("chunks") or (n, d)
    dtype = meta["source"]["dtype"]
    if src.dtype != dtype:
        raise LplrValueError(
            f"Expected {axis} of dtype {dtype} (the dtype the store {path!r} compressed). Got {src.dtype} "
            f"instead. Cast them first, e.g. numpy's .astype('{dtype}') before writing them."
        )
    part = as_matrix(src)
    m = part.shape[1] if axis == "rows" else part.shape[0]
    want, side = (d, "columns") if axis == "rows" else (n, "rows")
    if m != want:
        raise LplrValueError(
            f"Expected {axis} of {want} {side} to append to the {n}x{d} matrix of {path!r}. Got a "
            f"{part.shape[0]}x{part.shape[1]} matrix instead."
        )
    extent, chunk = (n, r) if axis == "rows" else (d, c)
    if extent % chunk:
        raise LplrValueError(
            f"Expected the {extent} {axis} of {path!r} to fill whole chunks of {chunk} {axis} (its last chunk "
            f"holds {extent % chunk}) to append {axis}: a block that began inside a chunk would be cut into other "
            f"chunks than a compression of the whole matrix. Append blocks of a multiple of {chunk} {axis} (the "
            f"last one may be shorter), or recompress with --appendable from an input whose chunks divide its "
            f"{axis} (lplr convert IN IN2.zarr --chunks RxC)."
        )
    if src.format == "zarr":  # reopened at the store's chunks: a task per chunk, no rechunk layer
        part = as_matrix(with_chunks(src, (r, c)))
    else:
        part = part.rechunk((r, c))
    return to_device(part, device)


def _params(options: Options, meta: dict[str, Any], shape: tuple[int, int], dtype: Any, path: str) -> Any:
    """The :class:`~lplr_dask.factorize.Params` of the grown matrix: the store's own, or a refusal."""
    params = options.params(int(meta["rank"]), shape, dtype)
    changed = store.changed_params(meta, params.as_attrs(), tuple(meta["source"]["shape"]))
    if changed:
        raise StoreFormatError(
            f"Cannot append to {path!r}: this lplr-dask would sketch it with other {', '.join(changed)} than the "
            "store recorded (it was written by another version). Append with the version that wrote it, or "
            "recompress the whole matrix."
        )
    return params


def _append(
    group: zarr.Group,
    path: str,
    part: da.Array,
    params: factorize.Params,
    entry: dict[str, Any],
    *,
    resume: bool,
    storage_options: dict[str, Any] | None,
    log: Log,
) -> None:
    """Build the grown store in the staging group (or go on with it), then commit it."""
    root = store.read_meta(group, require_complete=False, path=path)
    if "append_commit" in root:
        _same_append(store.read_meta(_staging(group), require_complete=False), entry, path)
        log(f"resume: finishing the commit of the append to {path}")
        _commit(group, path, log)
        return
    if store.STAGING in group:
        staged = store.read_meta(_staging(group), require_complete=False)
        if staged.get("append") == root.get("history", [None])[-1]:  # committed; only its removal stopped
            store.remove_node(group, store.STAGING)
        elif resume:
            _same_append(staged, entry, path)
            log(f"resume: an append to {path} stopped at stage {staged.get('stage')!r}; going on from there")
        else:
            log(f"{path}: discarding an interrupted append (rerun with --resume to go on with it instead)")
            store.remove_node(group, store.STAGING)
    elif resume and _last_append(root) == _key(entry):
        log(f"{path}: this block is already appended; nothing to do")
        return
    t0 = time.perf_counter()
    location = store.locate(_staging_path(path), storage_options)
    if store.STAGING not in group:
        staged = _staged_meta(root, entry)
        store.write_meta(group.create_group(store.STAGING), staged)
    staging = store.open_group(location, mode="r+")
    staged = store.read_meta(staging, require_complete=False)
    if not staged["complete"]:
        if staged["stage"] == "started" and not _sketched(staging):
            staged["timings"] = _write_sketches(group, staging, part, params, entry, path)
            store.write_meta(staging, staged)
        n, d = entry["shape"]
        staged = factorize.run(_unread(part, (n, d)), location, params, staged, log=log)
        staged["timings"]["total"] = round(time.perf_counter() - t0 + staged["timings"].get("total", 0.0), 3)
        store.write_meta(staging, staged)
    _commit(group, path, log)


def _recorded_fingerprint(group: zarr.Group, root: dict[str, Any]) -> dict[str, Any] | None:
    """The block fingerprint an append's resume compares with: the interrupted append's, else
    the last append's (hashed like it, a block recorded by an earlier version is still known)."""
    if store.STAGING in group:
        staged = store.read_meta(_staging(group), require_complete=False)
        return cast(dict[str, Any] | None, (staged.get("append") or {}).get("fingerprint"))
    last = (root.get("history") or [None])[-1]
    return last.get("fingerprint") if last and last.get("op") == "append" else None


def _staging(group: zarr.Group) -> zarr.Group:
    """The staging store of an append in progress (:data:`lplr_dask.store.STAGING`)."""
    return cast(zarr.Group, group[store.STAGING])


def _staging_path(path: str) -> str:
    return path.rstrip("/") + "/" + store.STAGING


def _staged_meta(root: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The attrs of the grown store as it starts: the store's, with the new shape, not complete."""
    staged = {k: v for k, v in root.items() if k not in ("error_exact", "append_commit")}
    staged["source"] = {**root["source"], "shape": entry["shape"]}
    staged.update(stage="started", complete=False, timings={}, append={**entry, "created": _now()})
    return staged


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _key(entry: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What tells two appends apart: the axis and the block's fingerprint (shape, dtype, a hash)."""
    if not entry:
        return None
    return entry.get("axis"), json.dumps(entry.get("fingerprint"), sort_keys=True)


def _last_append(root: dict[str, Any]) -> tuple[Any, ...] | None:
    history = root.get("history") or [None]
    return _key(history[-1]) if history[-1] and history[-1].get("op") == "append" else None


def _same_append(staged: dict[str, Any], entry: dict[str, Any], path: str) -> None:
    """Refuse to resume an interrupted append with another block than it was started with."""
    if _key(staged.get("append")) != _key(entry):
        raise StoreFormatError(
            f"Cannot resume the append to {path!r}: it was started with another block (or axis). Rerun it with "
            "that block and --resume, or without --resume to discard it and append this one."
        )


def _sketched(staging: zarr.Group) -> bool:
    """Whether the staging store's sketches are all written (their marks all set)."""
    name = store.scratch_name("Y_done")
    return name in staging and bool(np.asarray(cast(zarr.Array, staging[name])[...]).all())


def _write_sketches(
    group: zarr.Group,
    staging: zarr.Group,
    part: da.Array,
    params: factorize.Params,
    entry: dict[str, Any],
    path: str,
) -> dict[str, float]:
    """The grown sketches, from the kept ones and one read of ``part``, to the staging scratch.

    Its marks ``Y_done`` are created, all set, once every array is written: the stages then take
    pass 1 as done (they never read the matrix), and an interrupted write is done again.
    Returns the step's timings.
    """
    n_new, d_new = entry["shape"]
    rows = entry["axis"] == "rows"
    n, d = (n_new - part.shape[0], d_new) if rows else (n_new, d_new - part.shape[1])
    r, c = int(part.chunks[0][0]), int(part.chunks[1][0])
    kp, t = params.sketch_columns, params.test_columns
    right, Zp = factorize.pass1_part(part, params, (n, 0) if rows else (0, d))
    Yp, AGp = to_host_blocks(right[:, :kp]), to_host_blocks(right[:, kp : kp + t])
    sq = to_host_blocks(
        da.map_blocks(_strip_sum, right[:, kp + t : kp + t + 1], chunks=((1,) * right.numblocks[0], (1,)))
    )
    Zp = _host_matrix(Zp)

    def kept(name: str) -> da.Array:
        where = f"{store.SKETCHES}/{name}"
        return store.read_chunks(cast(zarr.Array, group[where]), where, path)

    if rows:
        grown = {
            "Y": da.concatenate([kept("Y"), Yp]),
            "AG": da.concatenate([kept("AG"), AGp]),
            "sumsq": da.concatenate([kept("sumsq"), sq]),
            "Z": kept("Z") + Zp,
        }
    else:
        grown = {
            "Y": kept("Y") + Yp,
            "AG": kept("AG") + AGp,
            "sumsq": kept("sumsq") + sq,
            "Z": da.concatenate([kept("Z"), Zp], axis=1),
        }
    strips = math.ceil(n_new / r)
    chunks = {"Y": (r, kp), "AG": (r, t), "sumsq": (1, 1), "Z": (params.oversample, c)}
    writes = []
    for name, X in grown.items():
        target = store.create_scratch(staging, name, tuple(X.shape), chunks[name])
        writes.append(da.store(X.rechunk(chunks[name]), target, lock=False, compute=False))
    assert grown["sumsq"].shape == (strips, 1)
    t0 = time.perf_counter()
    compute(f"append: sketch the new {entry['axis']}", *writes, persist=False, chunks_of=part)
    store.create_scratch_marks(staging, "Y_done", strips)[...] = 1
    return {"append: sketch": round(time.perf_counter() - t0, 3)}


def _host_matrix(X: da.Array) -> da.Array:
    """``X`` with numpy chunks and a 2-D float64 meta (a tree sum's result carries a 3-D one)."""
    X = to_host_blocks(X)
    return da.Array(X.dask, X.name, X.chunks, meta=np.empty((0, 0), np.float64))


def _strip_sum(x: Any) -> Any:
    """The (1, 1) sum of a row strip's row sums of squares: its ‖·‖²."""
    return x.sum(keepdims=True).reshape(1, 1)


def _unread(part: da.Array, shape: tuple[int, int]) -> da.Array:
    """A stand-in for the grown matrix, with its shape, chunks, dtype and device, that raises if a
    chunk of it is ever computed: the stages after pass 1 read the sketches, never the matrix."""
    chunks = (int(part.chunks[0][0]), int(part.chunks[1][0]))
    return like(da.zeros(shape, chunks=chunks, dtype=part.dtype), part).map_blocks(
        _never, dtype=part.dtype, meta=part._meta
    )


def _never(block: Any) -> Any:
    raise RuntimeError("an append read the grown matrix it never has: a bug in lplr_dask.append")


def _commit(group: zarr.Group, path: str, log: Log) -> None:
    """Move the staging store's factors and sketches into place and write its attrs (journaled)."""
    staged = store.read_meta(_staging(group), require_complete=True, path=_staging_path(path))
    root = store.read_meta(group, require_complete=False, path=path)
    journal = root.get("append_commit") or {"moved": []}
    with _held_signals(store.is_remote(path)):
        root.update(append_commit=journal, complete=False)
        store.write_meta(group, root)
        for name in _MOVED:
            if name in journal["moved"] or name not in _staging(group):  # moved (a rename is one step)
                continue
            store.move_node(group, f"{store.STAGING}/{name}", name)
            journal["moved"].append(name)
            store.write_meta(group, root)
        final = {k: v for k, v in staged.items() if k != "append"}
        final["history"] = [*staged.get("history", []), staged["append"]]
        store.write_meta(group, final)
        store.remove_node(group, store.STAGING)
    n, d = final["source"]["shape"]
    log(f"{path}: appended {staged['append']['axis']}; now {n}x{d}, error estimate {final['error_estimate']:.4g}")


@contextlib.contextmanager
def _held_signals(remote: bool) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the block runs (in the main thread, for a local store:
    a commit of a few renames), then deliver one that came, as it would have been."""
    if remote or threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if came:
            signal.raise_signal(came[0])

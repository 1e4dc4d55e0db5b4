"""One compression at a given rank: open the input, start or resume the store, run the stages.

:func:`compress_at_rank` is the worker below :func:`lplr_dask.compress`: its arguments have been
validated (an :class:`~lplr_dask.options.Options` and a rank), and it does not check them again.
The sizing (:mod:`lplr_dask.budget`, :mod:`lplr_dask.target`) and :func:`lplr_dask.compress_group`
call it directly. What it protects:

- the output is locked while the job writes it (:class:`lplr_dask.guard.StoreLock`), and the
  input's fingerprint is recorded so that ``resume`` refuses an input that changed;
- a failure leaves the store resumable; a fresh store that *failed* (not was interrupted)
  before anything worth resuming is removed, and only if this job still owns its lock.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import dask.array as da

from lplr_dask import chunking, factorize, guard, logs, store
from lplr_dask.backend import to_device
from lplr_dask.blocks import Strips
from lplr_dask.cluster import get_client
from lplr_dask.errors import StoreFormatError
from lplr_dask.factors import Factors, open_factors
from lplr_dask.options import SKETCHES, Options
from lplr_dask.progress import compute, current_client
from lplr_dask.sources import Source, as_matrix, describe, read_source

__all__ = ["cluster_client", "compress_at_rank", "open_matrix", "package_version"]

Log = Callable[[str], None]


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from a source tree not installed)."""
    try:
        return version("lplr-dask")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def cluster_client(log: Log, device: str = "cpu") -> Iterator[Any]:
    """The current client, or a local cluster's for the time of the block."""
    if current_client() is not None:
        yield current_client()
        return
    with get_client(log=log, device=device) as client:
        yield client


def open_matrix(source: Any, options: Options, *, log: Log = logs.info) -> tuple[Source, da.Array]:
    """The input as read (:func:`lplr_dask.sources.read_source`) and as a matrix on the options' device."""
    src = read_source(source, storage_options=options.storage_options)
    return src, to_device(as_matrix(src, log=log), options.device)


def compress_at_rank(
    source: Any,
    out: str | os.PathLike[str],
    rank: int,
    options: Options,
    *,
    client: Any,
    overwrite: bool = False,
    resume: bool = False,
    matrix: tuple[Source, da.Array] | None = None,
    attrs: dict[str, Any] | None = None,
    log: Log = logs.info,
) -> Factors:
    """Compress ``source`` at ``rank`` into the store ``out``; or finish it (``resume``).

    Parameters
    ----------
    source
        As for :func:`lplr_dask.compress`.
    out : str or os.PathLike
        The store; the caller has checked that it may be written (:func:`lplr_dask.guard.check_output`).
    rank : int
        From 1 to ``min(n, d)``.
    options : Options
    client : distributed.Client or None
        Whose workers' memory the chunking must fit (None: nothing is checked).
    overwrite, resume : bool
        Replace an existing store; or finish an interrupted one started with the same parameters.
    matrix : (Source, dask array), optional
        ``source`` as :func:`open_matrix` opened it already.
    attrs : dict, optional
        More attrs for a fresh store, e.g. the sizing's ``rank_cap`` (a resumed store keeps its own).
    log : callable

    Returns
    -------
    Factors

    Raises
    ------
    OutputExistsError, OutputLockedError, StoreFormatError
        If the store exists without ``overwrite``/``resume``, another job writes it, or it
        cannot be resumed with these parameters and this input.
    """
    src, A = matrix or open_matrix(source, options, log=log)
    options = _resumed_sketch(os.fspath(out), options) if resume else options
    params = options.params(rank, A.shape, A.dtype)
    A = chunking.plan(
        A,
        params,
        source=src,
        client=client,
        resume=os.fspath(out) if resume else None,
        storage_options=options.storage_options,
        log=log,
    )
    path = os.fspath(out)
    storage_options = options.storage_options
    if store.exists(path, storage_options) and not (overwrite or resume):
        store.clear(
            path,
            overwrite=False,
            storage_options=storage_options,
            hint=", or --resume (resume=True) to finish an interrupted job",
        )
    chunking.check_memory(A, params, client, source=src.path, log=log)
    lock = guard.StoreLock(path, storage_options)
    meta = _start(path, src, A, params, lock, options, overwrite=overwrite, resume=resume, attrs=attrs)
    try:
        if meta.get("complete"):
            log(f"{path}: already complete; nothing to do")
        else:
            strips = chunking.strips(A, src, threads=_threads(client))
            if options.cache_input:
                A, strips = _cached(A, params, meta, client, log=log, strips=strips)
            _run(A, path, params, meta, lock, resume=resume, storage_options=storage_options, log=log, strips=strips)
    finally:
        lock.release()
    return open_factors(path, storage_options=storage_options)


def _cached(
    A: da.Array, params: factorize.Params, meta: dict[str, Any], client: Any, *, log: Log, strips: Strips | None
) -> tuple[da.Array, Strips | None]:
    """A with its decoded chunks kept in the workers' memory (``cache_input``), read by chunk;
    or A and ``strips`` unchanged (with a note) when they would not fit or no pass is left.

    The chunks are read and decoded once, by a step of their own ("cache input"); both passes
    then read them from memory, so the second decode of the source is saved. They are released
    when the job ends.
    """
    if meta.get("stage") != "started":
        return A, strips  # pass 1 is done: A is read once more at most, and a cache would not save it
    room = chunking.cache_room(A, params, client)
    gib = A.nbytes / 2**30
    if room is None or A.nbytes > room:
        have = "an unknown amount" if room is None else f"{room / 2**30:,.1f} GiB"
        log(
            f"note: --cache-input: A ({gib:,.1f} GiB) does not fit in the workers' memory ({have} below their "
            "spill threshold, after the passes' tasks); reading it from the source in each pass instead"
        )
        return A, strips
    t0 = time.perf_counter()
    (A,) = compute(f"cache input ({gib:,.1f} GiB in the workers' memory)", A, persist=True, chunks_of=A)
    timings = meta.setdefault("timings", {})
    timings["cache input"] = round(time.perf_counter() - t0 + timings.get("cache input", 0.0), 3)
    return A, None


def _threads(client: Any) -> int | None:
    """The worker threads of ``client``'s cluster (None without a client or workers)."""
    try:
        threads = sum(client.nthreads().values()) if client is not None else 0
    except Exception:  # noqa: BLE001 - no scheduler info: strips sized without it
        return None
    return threads or None


def _resumed_sketch(path: str, options: Options) -> Options:
    """``options`` with the sketch the store at ``path`` was started with, when none was asked
    for (``sketch=None``): a store started before the default sketch changed resumes with its own."""
    if options.sketch is not None or not store.exists(path, options.storage_options):
        return options
    try:
        group = store.open_group(path, storage_options=options.storage_options)
        kind = store.read_meta(group, require_complete=False, path=path).get("sketch", {}).get("kind")
    except StoreFormatError:  # not a store to resume: _start says why
        return options
    return options.replace(sketch=kind) if kind in SKETCHES else options


def _start(
    path: str,
    src: Source,
    A: da.Array,
    params: factorize.Params,
    lock: guard.StoreLock,
    options: Options,
    *,
    overwrite: bool,
    resume: bool,
    attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create the output (or reopen it for ``resume``), take its lock, and return its attrs.

    Raises
    ------
    OutputLockedError
        If another job is writing the output.
    StoreFormatError
        If ``resume`` finds a store started with other parameters, or of an input that changed.
    """
    storage_options = options.storage_options
    if resume and store.exists(path, storage_options):
        group = store.open_group(path, mode="r+", storage_options=storage_options)
        meta = store.read_meta(group, require_complete=False, path=path)
        recorded = meta.get("source", {}).get("fingerprint")
        current = guard.fingerprint(src, A, storage_options=storage_options, like=recorded)
        changed = store.changed_params(meta, params.as_attrs(), A.shape)
        if changed:
            raise StoreFormatError(
                f"Cannot resume {path!r}: it was started with different {', '.join(changed)}. "
                "Rerun with the same arguments, or with --overwrite to start over."
            )
        guard.check_fingerprint(recorded, current, out=path, source=src.path)
        lock.acquire()
        return meta
    current = guard.fingerprint(src, A, storage_options=storage_options)
    if store.exists(path, storage_options):
        lock.check_free()  # a running job's output is not replaced under it
    group = store.create_group(path, overwrite=overwrite, storage_options=storage_options)
    lock.acquire()
    meta = store.new_meta(
        {**describe(src, A), "fingerprint": current},
        params.as_attrs(),
        device=options.device,
        version=package_version(),
    )
    meta.update(attrs or {})
    if options.appendable:  # the sketches are kept at the end (lplr_dask.append)
        meta.update(store.appendable_meta(A.shape, src.path))
    store.write_meta(group, meta)
    return meta


def _run(
    A: da.Array,
    path: str,
    params: factorize.Params,
    meta: dict[str, Any],
    lock: guard.StoreLock,
    *,
    resume: bool,
    storage_options: Any,
    log: Log,
    strips: Strips | None = None,
) -> dict[str, Any]:
    """Run the stages on a started store (reading A by row ``strips``, if any); on failure leave it resumable, or remove a fresh one
    that failed (not was interrupted) before anything worth resuming."""
    n, d = A.shape
    log(
        f"compress {n}x{d} {A.dtype} -> {path}: rank {params.rank}, bits {params.bits}, "
        f"quantizer {params.quantizer}, passes {params.passes}"
    )
    t0 = time.perf_counter()
    fresh = meta["stage"] == "started" and not resume
    try:
        meta = factorize.run(A, store.locate(path, storage_options), params, meta, log=log, strips=strips)
    except BaseException as e:
        if not lock.owned():  # another job replaced the store meanwhile: leave its files alone
            raise
        group = store.open_group(path, storage_options=storage_options)
        started = store.read_meta(group, require_complete=False)["stage"] == "started"
        if fresh and started and isinstance(e, Exception):
            # failed before anything worth resuming: leave nothing behind (tasks still running may
            # write for a moment after the failure: discard retries until the path stays gone)
            store.discard(path, storage_options)
        else:
            log(f"{path}: incomplete; finish it with --resume (same arguments)")
        raise
    meta["timings"]["total"] = round(time.perf_counter() - t0 + meta["timings"].get("total", 0.0), 3)
    store.write_meta(store.open_group(path, mode="r+", storage_options=storage_options), meta)
    return meta

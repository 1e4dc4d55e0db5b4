"""Task sizes from the input's chunking: sensible defaults, warnings with the fix, peak memory.

Every task of the passes holds one chunk of A, float64 panels of it (see
:data:`lplr_dask.blocks.PANEL_ROWS`) and thin operands whose size is set by the chunk and the
rank: a pass-1 product of ``rows × (k + p + 1)``, a pass-2 product of ``k × columns``, in
one-pass mode a co-range product of ``ℓ × columns``, and the cached sketch blocks. So a worker's
memory is set by the chunk shape, its threads and the rank, not by the size of A (the persisted
n×k basis is spread over the workers on top of that).

:func:`plan` looks at the chunking before anything runs:

- chunks so small that per-task overhead dominates (many thousands of tasks of under a megabyte
  each) are read merged, whole source chunks at a time, so reads stay aligned with the stored
  chunks and output chunks are still written whole;
- chunks so many that one pass would schedule more than ``lplr.chunking.max-tasks`` tasks
  (Dask config, default 20000: a distributed scheduler spends about 1 ms of CPU per task) are
  merged too, as far as one task of the merged chunks fits :func:`task_memory` (at most
  :data:`MAX_TASK_BYTES`, and half of what :func:`check_memory` allows a worker thread);
- a Zarr input is then opened at the merged chunks directly
  (:func:`lplr_dask.sources.with_chunks`): one task per merged chunk, which reads its stored
  chunks; other inputs are rechunked (a rechunk keeps one task per block as read);
- chunks so large (or so long and thin) that one task needs more than :data:`MAX_TASK_BYTES`
  are reported, with the command that rewrites the input with better chunks.

The merged chunking changes no value of A, so for one merged chunking the codes are those of an
input stored in it. Another chunking moves codes only with float32 block products
(``precision="auto"`` on float32 input: a code of L near a rounding boundary can move by one
level, see :mod:`lplr_dask.blocks`); with ``precision="float64"`` codes are identical for any
chunking. A resumed job reads with the chunking its store recorded (``source.chunks``), whatever
this plan would choose now (another cluster's memory, another ``max-tasks``), so its stages go on
with the chunks they started with.

:func:`worker_memory_peaks` reads each worker process's peak resident memory (for benchmarks and
the tests that prove the bound).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dask.array as da
import dask.config
import numpy as np

from lplr_dask import logs, store
from lplr_dask.backend import like
from lplr_dask.blocks import PANEL_ROWS, STRIP_SPLIT, STRIP_WIDTH, Strips
from lplr_dask.errors import LplrValueError
from lplr_dask.sketch import SKETCH_BLOCK
from lplr_dask.sources import Source, as_matrix, chunk_reader, with_chunks
from lplr_dask.validation import parse_int

if TYPE_CHECKING:
    from lplr_dask.factorize import Params

__all__ = [
    "TARGET_ENTRIES",
    "MAX_TASK_BYTES",
    "task_bytes",
    "suggested_chunks",
    "plan",
    "strips",
    "max_tasks",
    "task_memory",
    "DEFAULT_THREAD_MEMORY",
    "check_memory",
    "cache_room",
    "worker_memory_peaks",
]

#: Entries of a well-sized chunk: 4096 × 4096, 64 MiB of float32.
TARGET_ENTRIES = 4096 * 4096
#: A task estimated above this many bytes gets a warning.
MAX_TASK_BYTES = 2**30
#: Chunks of fewer entries than this (1 MiB of float32) are "tiny"...
TINY_ENTRIES = 512 * 512
#: ... and merged when they make more tasks than this for one read of A.
MANY_TASKS = 1000
#: The memory of one worker thread that :func:`plan` assumes when no worker tells it (no client,
#: or no worker joined yet): 4 GiB, a node of 128 GiB over 32 cores.
DEFAULT_THREAD_MEMORY = 4 * 2**30

_MiB = 2**20


def task_bytes(
    chunk: tuple[int, int],
    itemsize: int,
    rank: int,
    test_columns: int,
    oversample: int | None = None,
    range_oversample: int = 0,
) -> int:
    """Estimated peak bytes of the largest task of a pass over chunks of shape ``chunk``.

    Parameters
    ----------
    chunk : (int, int)
        Rows and columns of one chunk of A.
    itemsize : int
        Bytes per entry of A.
    rank, test_columns : int
        k and p.
    oversample : int, optional
        ℓ, the rows of the co-range sketch in one-pass mode.
    range_oversample : int, default=0
        Extra columns of the range sketch in pass 1 (it has ``rank + range_oversample``).

    Returns
    -------
    int
        The chunk, one float64 panel, and the larger of the pass-1 working set (its product,
        the sketch block and its slice, the co-range product) and the pass-2 one (the rows of
        the basis, the product).
    """
    r, c = chunk
    k, t = rank + range_oversample, test_columns
    base = r * c * itemsize + min(r, PANEL_ROWS) * c * 8
    pass1 = r * (k + t + 1) * 8 + (SKETCH_BLOCK + c) * (k + t) * 8 + (oversample or 0) * c * 8
    pass2 = (r + c) * rank * 8
    return int(base + max(pass1, pass2))


def suggested_chunks(shape: tuple[int, int]) -> tuple[int, int]:
    """Chunks of about :data:`TARGET_ENTRIES` entries: square, or full width (height) when the
    matrix is narrower (shorter) than a square chunk."""
    side = math.isqrt(TARGET_ENTRIES)
    n, d = shape
    if n < side or d < side:
        short = min(n, d)
        long = min(max(n, d), TARGET_ENTRIES // short)
        return (short, long) if n < d else (long, short)
    return side, side


def max_tasks() -> int:
    """Tasks one read of A may schedule, at most: the Dask config ``lplr.chunking.max-tasks``.

    Raises
    ------
    LplrValueError
        If the setting is not an integer >= 1.
    """
    return parse_int(
        dask.config.get("lplr.chunking.max-tasks"),
        "the Dask config lplr.chunking.max-tasks",
        minimum=1,
        hint="Set it to a count of tasks per pass, e.g. DASK_LPLR__CHUNKING__MAX_TASKS=20000.",
    )


def task_memory(client: Any = None) -> int:
    """Bytes one task of a merged chunking may take (:func:`task_bytes`).

    At most :data:`MAX_TASK_BYTES` (above it :func:`plan` warns), and at most half the share of
    the smallest worker thread's memory that :func:`check_memory` allows (above that it notes
    the size); :data:`DEFAULT_THREAD_MEMORY` per thread when ``client`` is None or has no worker.
    """
    budget = _thread_memory(client)
    share = DEFAULT_THREAD_MEMORY if budget is None else budget[0] / budget[1]
    return int(min(MAX_TASK_BYTES, TASK_SHARE * share / 2))


def _tasks(shape: tuple[int, int], chunk: tuple[int, int]) -> int:
    """Chunks of shape ``chunk`` in a matrix of ``shape``: the tasks of one read."""
    return -(-shape[0] // chunk[0]) * -(-shape[1] // chunk[1])


def _merged_chunks(
    chunk: tuple[int, int], shape: tuple[int, int], *, fits: Callable[[tuple[int, int]], bool], limit: int
) -> tuple[int, int]:
    """Whole-chunk multiples of ``chunk`` (powers of two) to read as one task.

    Tiny chunks (under :data:`TINY_ENTRIES`, more than :data:`MANY_TASKS` of them) grow to near
    :data:`TARGET_ENTRIES`; then any chunking grows while a read has more than ``limit`` tasks.
    Each step doubles the shorter side, so merged chunks tend to square, and is taken only if a
    task of the result ``fits``.
    """
    (r, c), (n, d) = chunk, shape
    tiny = r * c < TINY_ENTRIES and _tasks(shape, chunk) > MANY_TASKS
    fr = fc = 1
    while (tiny and 2 * r * fr * c * fc <= TARGET_ENTRIES) or _tasks(shape, (r * fr, c * fc)) > limit:
        if r * fr < n and (r * fr <= c * fc or c * fc >= d):
            grown = (2 * fr, fc)
        elif c * fc < d:
            grown = (fr, 2 * fc)
        else:
            break
        if not fits((min(r * grown[0], n), min(c * grown[1], d))):
            break
        fr, fc = grown
    return min(r * fr, n), min(c * fc, d)


def _task_args(itemsize: int, params: Params) -> tuple[int, int, int, int | None, int]:
    """The arguments of :func:`task_bytes` after the chunk, for ``params``."""
    oversample = params.oversample if params.passes == 1 else None
    return itemsize, params.rank, params.test_columns, oversample, params.range_oversample


def _rechunk_hint(source: str | None, chunks: tuple[int, int]) -> str:
    """The command that rewrites the input with ``chunks`` (a Zarr copy next to it)."""
    if source is not None:
        stem = source.rstrip("/").removesuffix(".zarr")
        return (
            f'python -c "import dask.array as da; da.from_zarr({source!r}).rechunk({chunks})'
            f'.to_zarr({stem + "-rechunked.zarr"!r})"'
        )
    return f"A = A.rechunk({chunks}) before compressing A"


def plan(
    A: da.Array,
    params: Params,
    *,
    source: str | Source | None = None,
    client: Any = None,
    resume: str | None = None,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = logs.info,
) -> da.Array:
    """A read with sensible task sizes and counts; warn through ``log`` when the chunking forces bad ones.

    Parameters
    ----------
    A : dask array of shape (n, d)
        The input, chunked as stored.
    params : lplr_dask.factorize.Params
        The rank, test columns and passes that size the products.
    source : str or lplr_dask.sources.Source, optional
        What A was read from: its location is quoted in the rechunk command of a warning, and a
        Zarr :class:`~lplr_dask.sources.Source` is reopened at a merged chunking directly.
    client : distributed.Client, optional
        Whose workers' memory bounds a merged task (:func:`task_memory`).
    resume : str, optional
        The store a resumed job finishes: if it exists, the chunking it recorded is read again.
    storage_options : dict, optional
        fsspec options for a remote ``resume`` store.
    log : callable, default=lplr_dask.logs.info
        Receives the warnings and notes.

    Returns
    -------
    dask array
        ``A`` itself, or ``A`` read in merged chunks, each a whole multiple of the stored chunks
        (:func:`_merged_chunks`): many tiny chunks, or more than :func:`max_tasks` of them.

    Raises
    ------
    LplrValueError
        If ``lplr.chunking.max-tasks`` is not an integer >= 1.
    """
    shape = (int(A.shape[0]), int(A.shape[1]))
    chunk = (int(A.chunks[0][0]), int(A.chunks[1][0]))
    ntasks = A.npartitions
    itemsize = np.dtype(A.dtype).itemsize
    args = _task_args(itemsize, params)
    where = source.path if isinstance(source, Source) else source
    better = suggested_chunks(shape)
    found = f"Current shape: {shape}, current chunksize: {chunk}."
    limit, memory = max_tasks(), task_memory(client)
    recorded = _recorded_chunks(resume, storage_options)
    merged = recorded or _merged_chunks(chunk, shape, fits=lambda ch: task_bytes(ch, *args) <= memory, limit=limit)
    if merged != chunk:
        A = _read(A, source, merged)
        fr, fc = -(-merged[0] // chunk[0]), -(-merged[1] // chunk[1])
        if recorded:
            log(f"resume: reading the input as {merged} chunks, as the store's job started")
        elif chunk[0] * chunk[1] < TINY_ENTRIES:
            log(
                f"warning: the input's {ntasks} chunks of {chunk[0] * chunk[1] * itemsize / _MiB:.2g} MiB "
                f"make per-task overhead dominate; reading them {fr}x{fc} at a time as {merged} "
                f"chunks. For faster reads, rewrite the input with larger chunks: "
                f"{_rechunk_hint(where, better)}. {found}"
            )
        else:
            log(
                f"note: the input's {ntasks} chunks are read {fr}x{fc} at a time as {merged} chunks: "
                f"{A.npartitions} tasks per pass (lplr.chunking.max-tasks: {limit})"
            )
    if A.npartitions > limit and not recorded:
        log(
            f"note: one read of the input is {A.npartitions} tasks, more than lplr.chunking.max-tasks ({limit}): "
            f"larger merged chunks than {merged} would need more than {memory / _MiB:,.0f} MiB per task"
        )
    need = task_bytes(merged, *args)
    if need > MAX_TASK_BYTES:
        log(
            f"warning: with chunks of {merged} at rank {params.rank}, each task needs about "
            f"{need / _MiB:,.0f} MiB (the chunk, float64 panels of it and its products), per thread. "
            f"Workers may run out of memory; rewrite the input with smaller chunks: "
            f"{_rechunk_hint(where, better)}. {found}"
        )
    return A


def strips(A: da.Array, source: Source | None, *, threads: int | None = None) -> Strips | None:
    """How the passes read A (as :func:`plan` left it): by row strips through ``source``'s reader
    (:func:`lplr_dask.sources.chunk_reader`), or None (a dask or numpy array: a task per chunk).

    A strip is :data:`~lplr_dask.blocks.STRIP_WIDTH` chunks of a row of chunks, or as many more
    as keep a pass within :func:`max_tasks` (the strips and their tree sum), and never more
    than a row; and, given the cluster's ``threads``, as few as keep a strip per thread (a
    matrix with few chunks on a large cluster keeps its parallelism: a task per chunk when it
    has fewer chunks than the cluster threads). The memory of a
    task does not grow with it: a strip reads its chunks in turn.
    """
    reader = chunk_reader(source, A) if isinstance(source, Source) else None
    if reader is None:
        return None
    tasks_per_strip = 1 + 1 / (STRIP_SPLIT - 1)  # the strip, and its share of the tree sum
    rows, cols = len(A.chunks[0]), len(A.chunks[1])
    width = min(max(STRIP_WIDTH, math.ceil(A.npartitions * tasks_per_strip / max_tasks())), cols)
    while threads and width > 1 and rows * math.ceil(cols / width) < threads:
        width -= 1
    return Strips(reader, width)


def _read(A: da.Array, source: str | Source | None, chunks: tuple[int, int]) -> da.Array:
    """``A`` read in ``chunks``: a Zarr source reopened at them (one task per chunk), else rechunked."""
    if isinstance(source, Source) and source.format == "zarr":
        return like(as_matrix(with_chunks(source, chunks)), A)
    return A.rechunk(chunks)


def _recorded_chunks(resume: str | None, storage_options: dict[str, Any] | None) -> tuple[int, int] | None:
    """The chunks a store to resume recorded for its input (``source.chunks``), or None."""
    if resume is None or not store.exists(resume, storage_options):
        return None
    group = store.open_group(resume, storage_options=storage_options)
    chunks = store.read_meta(group, require_complete=False, path=resume).get("source", {}).get("chunks")
    return (int(chunks[0]), int(chunks[1])) if chunks else None


#: The share of a worker thread's memory (its limit over its threads) that one task may take:
#: distributed pauses a worker at 80% of its limit and restarts it at 95%, and the worker process
#: itself and the data it holds for other tasks need the rest.
TASK_SHARE = 0.6


def check_memory(
    A: da.Array, params: Params, client: Any, *, source: str | None = None, log: Callable[[str], None]
) -> None:
    """Refuse, before anything is read, a chunking whose tasks cannot fit the workers' memory.

    Parameters
    ----------
    A : dask array of shape (n, d)
        The input as it will be read (after :func:`plan`).
    params : lplr_dask.factorize.Params
        The rank, test columns and passes that size the products.
    client : distributed.Client or None
        Whose workers' memory limits count; nothing is checked without one, or before any
        worker has joined (a batch cluster whose jobs still queue).
    source : str, optional
        Where A was read from, quoted in the ``lplr convert`` command of the error.
    log : callable
        Receives a warning when a task takes more than half its share.

    Raises
    ------
    LplrValueError
        If one task's estimated memory (:func:`task_bytes`) exceeds :data:`TASK_SHARE` of the
        smallest worker's memory limit divided by its threads.
    """
    budget = _thread_memory(client)
    if budget is None:
        return
    limit, threads = budget
    share = limit / threads
    chunk = (int(A.chunks[0][0]), int(A.chunks[1][0]))
    args = _task_args(np.dtype(A.dtype).itemsize, params)
    need = task_bytes(chunk, *args)
    if need <= TASK_SHARE * share:
        if need > TASK_SHARE * share / 2:
            log(
                f"note: each task needs about {need / _MiB:,.0f} MiB of the {share / _MiB:,.0f} MiB a worker thread has"
            )
        return
    fit = _fitting_chunks(chunk, lambda c: task_bytes(c, *args) <= TASK_SHARE * share / 2)
    where = source or "IN"
    raise LplrValueError(
        f"Each task would need about {need / _MiB:,.0f} MiB (a {chunk[0]}x{chunk[1]} chunk at rank "
        f"{params.rank}), but the workers have {share / _MiB:,.0f} MiB per thread ({limit / _MiB:,.0f} MiB "
        f"over {threads} threads): they would run out of memory. Rewrite the input with smaller chunks: "
        f"`lplr convert {where} SMALLER.zarr --chunks {fit[0]}x{fit[1]}`, or give each worker more memory "
        "(--memory-limit) or fewer threads (--threads-per-worker)."
    )


def cache_room(A: da.Array, params: Params, client: Any) -> int | None:
    """Bytes the workers can keep of A's chunks while a pass still runs (``--cache-input``).

    Each worker's memory limit times the Dask config ``distributed.worker.memory.target`` (the
    fraction above which a worker starts to spill to disk), less one task's working set
    (:func:`task_bytes`) per thread, summed over the workers. None without a client, a worker,
    or a memory limit: nothing is known to fit.
    """
    if client is None:
        return None
    try:
        workers = list(client.scheduler_info()["workers"].values())
    except Exception:  # noqa: BLE001 - no scheduler info: nothing known to fit
        return None
    target = dask.config.get("distributed.worker.memory.target") or 1.0
    chunk = (int(A.chunks[0][0]), int(A.chunks[1][0]))
    task = task_bytes(chunk, *_task_args(np.dtype(A.dtype).itemsize, params))
    room = [int(w.get("memory_limit") or 0) * float(target) - int(w.get("nthreads") or 1) * task for w in workers]
    if not workers or any(w.get("memory_limit") in (None, 0) for w in workers):
        return None
    return int(sum(max(r, 0) for r in room))


def _thread_memory(client: Any) -> tuple[int, int] | None:
    """(memory limit, threads) of the worker with the least memory per thread, or None."""
    if client is None:
        return None
    try:
        workers = client.scheduler_info()["workers"].values()
    except Exception:  # noqa: BLE001 - no scheduler info: nothing to check against
        return None
    sized = [(int(w.get("memory_limit") or 0), max(int(w.get("nthreads") or 1), 1)) for w in workers]
    sized = [s for s in sized if s[0] > 0]
    return min(sized, key=lambda s: s[0] / s[1]) if sized else None


def _fitting_chunks(chunk: tuple[int, int], fits: Callable[[tuple[int, int]], bool]) -> tuple[int, int]:
    """``chunk`` with its longer side halved until ``fits`` (at least 256 on each side)."""
    r, c = chunk
    while not fits((r, c)) and max(r, c) > 256:
        if r >= c:
            r = max(256, r // 2)
        else:
            c = max(256, c // 2)
    return r, c


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status")


def worker_memory_peaks(client: Any, *, reset: bool = False) -> dict[str, int]:
    """Each worker process's peak resident memory (bytes) since start or the last reset.

    Read from the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``), so no short
    peak is missed between samples. Linux only.

    Parameters
    ----------
    client : distributed.Client
    reset : bool, default=False
        Reset the marks to the current resident memory after reading them.

    Returns
    -------
    dict
        Worker address to peak bytes.
    """
    peaks: dict[str, int] = client.run(_peak)
    if reset:
        client.run(_reset_peak)
    return peaks

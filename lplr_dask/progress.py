"""Progress of each step: chunks of A done of all, bytes of A per second and the time left, logged.

:func:`compute` runs one step (one labelled dask computation). What it counts comes from the
scheduler's own task states, not from the collections computed:

- a step that reads A (``chunks_of=A``) counts the tasks that compute a chunk of A, whether the
  chunk is its own task or, as blockwise fusion usually makes it, part of the task that reads it
  and multiplies it (:func:`reads_chunk`): exactly one per chunk of A for each pass;
- any other step counts all its tasks.

With a distributed client the counting is a scheduler plugin (:class:`ChunkCounter`): it picks
the tasks when the graph arrives and counts their transitions to memory, one set lookup per
transition; the client asks it for two numbers every poll (a scheduler handler). Without one (the threads or
synchronous scheduler) a local :class:`dask.callbacks.Callback` does the same.

Every message goes to the ``lplr_dask`` logger at INFO (a failure at WARNING): a heartbeat line
at least every ``lplr.progress.interval`` (dask config, default ``30s``;
``DASK_LPLR__PROGRESS__INTERVAL=2s`` in the environment) and at each 10 %::

    pass 1: sketch: 37% (6/16 chunks, 614 MiB/s, ETA 12 s)
    pass 1: sketch: done: 16 chunks in 9.5 s (1.1 GiB/s)

When the command line's handler writes to a terminal (:func:`lplr_dask.logs.live_console`) a
live rich bar replaces the heartbeat lines; the final line is logged either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import dask
from dask.callbacks import Callback
from distributed.diagnostics.plugin import SchedulerPlugin

import lplr_dask.config  # noqa: F401  (the lplr.progress.interval default in dask.config)
from lplr_dask import interrupts, logs

__all__ = ["compute", "in_process", "current_client", "set_quiet", "reads_chunk", "ChunkCounter", "interval", "Reads"]

_QUIET = False

#: Seconds between two looks at the counts (the live bar's refresh; heartbeats may wait longer).
POLL = 0.5


def set_quiet(quiet: bool) -> None:
    """Turn the progress messages off (``--quiet``) or on."""
    global _QUIET
    _QUIET = quiet


def interval() -> float:
    """Seconds between heartbeat lines at most: the dask config ``lplr.progress.interval``."""
    return float(dask.utils.parse_timedelta(dask.config.get("lplr.progress.interval"), default="s"))


#: True inside :func:`in_process`: computes run in this process, not on the current client.
_IN_PROCESS: contextvars.ContextVar[bool] = contextvars.ContextVar("lplr_in_process", default=False)


@contextlib.contextmanager
def in_process() -> Iterator[None]:
    """Run the block's computes in this process with dask's threads scheduler, not on the current
    client's cluster (:func:`current_client` is None inside): for small steps whose inputs this
    process can read, where a round trip to the cluster per step would cost more than the step."""
    token = _IN_PROCESS.set(True)
    try:
        with dask.config.set(scheduler="threads"):
            yield
    finally:
        _IN_PROCESS.reset(token)


def current_client() -> Any:
    """The current dask.distributed Client, or None (also inside :func:`in_process`)."""
    if _IN_PROCESS.get():
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


class Reads(NamedTuple):
    """What a step reads when each of its tasks reads several chunks of A (row strips,
    :class:`lplr_dask.blocks.Strips`): the tasks whose key names start with ``name`` read
    ``chunks`` chunks of A, ``nbytes`` bytes, in all. Progress counts those tasks and reports
    chunks in proportion (the final line: exactly ``chunks``)."""

    name: str
    nbytes: float
    chunks: int


def _in_chunks(counts: Callable[[], tuple[int, int]], chunks: int) -> Callable[[], tuple[int, int]]:
    """``counts`` of tasks that read ``chunks`` chunks of A in all, as counts of chunks."""

    def scaled() -> tuple[int, int]:
        done, total = counts()
        return (done * chunks // total, chunks) if total else (0, 0)

    return scaled


def compute(label: str, *collections: Any, persist: bool = False, chunks_of: Any = None) -> tuple[Any, ...]:
    """Compute (or persist) dask collections as one step called ``label``, reporting its progress.

    Parameters
    ----------
    label : str
        The step's name in the messages, e.g. ``"pass 1: sketch"``.
    *collections : dask collections
    persist : bool, default=False
        Keep the results on the workers as dask collections backed by futures (for what a later
        step reuses); otherwise they are gathered to the client.
    chunks_of : dask.array.Array or Reads, optional
        The matrix whose chunks the step reads: progress counts its chunks (and its bytes per second);
        a :class:`Reads` for tasks that read several chunks each; without it, progress counts
        the step's tasks.

    Returns
    -------
    tuple
        One result (or persisted collection) per collection.
    """
    client = current_client()
    name = None if chunks_of is None else chunks_of.name
    chunks = chunks_of.chunks if isinstance(chunks_of, Reads) else getattr(chunks_of, "npartitions", 0)
    nbytes = 0.0 if chunks_of is None else chunks_of.nbytes / max(chunks, 1)
    unit = "tasks" if chunks_of is None else "chunks"
    t0 = time.perf_counter()
    if client is None:
        counter = _LocalCounter(name)
        counts: Callable[[], tuple[int, int]] = counter.counts
        if isinstance(chunks_of, Reads):
            counts = _in_chunks(counts, chunks)
        with interrupts.redelivered(), counter, _report(label, counts, unit, nbytes, t0):
            return dask.persist(*collections) if persist else dask.compute(*collections)
    watch = _Watch(client, name)
    counts = _in_chunks(watch.counts, chunks) if isinstance(chunks_of, Reads) else watch.counts
    with interrupts.redelivered(), watch, _report(label, counts, unit, nbytes, t0):
        return _distributed(client, collections, persist)


def _distributed(client: Any, collections: tuple[Any, ...], persist: bool) -> tuple[Any, ...]:
    from distributed import futures_of, wait

    if not persist:
        return tuple(client.gather(client.compute(list(collections))))
    outs = client.persist(list(collections))
    futures = futures_of(outs)
    wait(futures)  # the results stay on the workers: nothing is gathered
    for future in futures:
        if future.status == "error":
            future.result()  # raises the task's error
    return tuple(outs)


# --------------------------------------------------------------------------------------------
# Which tasks are chunks of A


def _key_name(key: Any) -> str:
    return str(key[0]) if isinstance(key, tuple) and key else str(key)


def reads_chunk(key: Any, spec: Any, name: str) -> bool:
    """Whether the task ``key`` (its ``spec``) computes a chunk of the dask array called ``name``
    (or, for the ``name`` of a :class:`Reads`, is one of its tasks).

    True for a chunk's own task (``(name, i, j)``) and for a task that blockwise fusion made of
    the chunk and what uses it: its inner graph holds a key of layer ``name``.
    """
    if _key_name(key).startswith(name):
        return True
    from dask._task_spec import _execute_subgraph

    if getattr(spec, "func", None) is not _execute_subgraph:
        return False
    inner = spec.args[0] if spec.args else None
    # fusion may nest: a fused task's inner graph can hold a fused task of its own
    return isinstance(inner, dict) and any(reads_chunk(k, v, name) for k, v in inner.items())


class ChunkCounter(SchedulerPlugin):
    """A scheduler plugin counting one step's tasks: those of the next graph ``client`` submits
    that compute a chunk of array ``name`` (:func:`reads_chunk`), or all of them for ``None``.

    Cost on the scheduler: one look at each new task when the graph arrives, then one set lookup
    per task transition.
    """

    def __init__(self, client: str, name: str | None):
        self.client, self.chunks_of = client, name
        self.todo: set[Any] = set()
        self.total = self.done = 0

    async def start(self, scheduler: Any) -> None:
        # the client asks through this handler: an RPC that, unlike run_on_scheduler, logs nothing
        def lplr_progress(name: str) -> tuple[int, int]:
            return _plugin_counts(scheduler, name)

        scheduler.handlers.setdefault("lplr_progress", lplr_progress)

    def update_graph(self, scheduler: Any, *, client: str, tasks: list[Any], **kwargs: Any) -> None:
        if client != self.client:
            return
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is None or key in self.todo:
                continue
            if self.chunks_of is None or reads_chunk(key, ts.run_spec, self.chunks_of):
                self.total += 1
                if ts.state == "memory":
                    self.done += 1
                else:
                    self.todo.add(key)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if key in self.todo and finish == "memory":
            self.todo.discard(key)
            self.done += 1


def _plugin_counts(scheduler: Any, name: str) -> tuple[int, int]:
    plugin = scheduler.plugins[name]
    return plugin.done, plugin.total


class _Watch:
    """A :class:`ChunkCounter` on the client's scheduler while the ``with`` block runs."""

    def __init__(self, client: Any, name: str | None):
        self.client, self.chunks_of = client, name
        self.plugin: str | None = f"lplr-progress-{uuid.uuid4().hex}"

    def __enter__(self) -> _Watch:
        try:
            self.client.register_plugin(ChunkCounter(self.client.id, self.chunks_of), name=self.plugin)
        except Exception as e:  # noqa: BLE001 - e.g. a scheduler without lplr_dask: report time only
            logs.logger.debug("no progress counts from the scheduler (%s: %s)", type(e).__name__, e)
            self.plugin = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.plugin is not None:
            with contextlib.suppress(Exception):  # a closed client has no scheduler left to clean
                self.client.unregister_scheduler_plugin(self.plugin)

    def counts(self) -> tuple[int, int]:
        if self.plugin is None:
            return 0, 0
        done, total = self.client.sync(self.client.scheduler.lplr_progress, name=self.plugin)
        return done, total


class _LocalCounter(Callback):
    """The :class:`ChunkCounter` of dask's local schedulers (threads, synchronous)."""

    def __init__(self, name: str | None):
        super().__init__()
        self.chunks_of = name
        self.todo: set[Any] = set()
        self.total = self.done = 0

    def _start_state(self, dsk: Any, state: Any) -> None:
        for key, spec in dsk.items():
            if self.chunks_of is None or reads_chunk(key, spec, self.chunks_of):
                self.todo.add(key)
        self.total = len(self.todo)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if key in self.todo:
            self.done += 1

    def counts(self) -> tuple[int, int]:
        return self.done, self.total


# --------------------------------------------------------------------------------------------
# Reporting


def _duration(seconds: float) -> str:
    """``"9.5 s"``, ``"4 min 10 s"``, ``"3 h 02 min"``."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class _Line:
    """The text of one step's progress: percent, counts, rate of A, ETA."""

    def __init__(self, label: str, unit: str, chunk_bytes: float, t0: float):
        self.label, self.unit, self.chunk_bytes, self.t0 = label, unit, chunk_bytes, t0

    def rate(self, done: int, elapsed: float) -> str:
        if not self.chunk_bytes or not done or elapsed <= 0:
            return ""
        per_second = done * self.chunk_bytes / elapsed
        larger = (("GiB/s", 2**30), ("MiB/s", 2**20))
        unit, size = next(((u, z) for u, z in larger if per_second >= z), ("KiB/s", 2**10))
        value = per_second / size
        return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"

    def heartbeat(self, done: int, total: int, now: float) -> str:
        elapsed = now - self.t0
        if not total:  # nothing counted (a scheduler that cannot): the time it has run
            return f"{self.label}: running for {_duration(elapsed)}"
        pct = 100 * done // total if total else 0
        eta = _duration(elapsed * (total - done) / done) if done else "?"
        parts = [f"{done}/{total} {self.unit}", self.rate(done, elapsed), f"ETA {eta}"]
        return f"{self.label}: {pct}% ({', '.join(p for p in parts if p)})"

    def done(self, total: int, now: float) -> str:
        elapsed = now - self.t0
        if not total:
            return f"{self.label}: done in {_duration(elapsed)}"
        rate = self.rate(total, elapsed)
        return f"{self.label}: done: {total} {self.unit} in {_duration(elapsed)}" + (f" ({rate})" if rate else "")

    def failed(self, done: int, total: int, now: float, error: BaseException) -> str:
        why = "interrupted" if isinstance(error, KeyboardInterrupt) else type(error).__name__
        return f"{self.label}: failed after {_duration(now - self.t0)} ({done}/{total} {self.unit} done; {why})"


@contextlib.contextmanager
def _report(
    label: str, counts: Callable[[], tuple[int, int]], unit: str, chunk_bytes: float, t0: float
) -> Iterator[None]:
    """Report the step while the ``with`` block computes it: heartbeats or a live bar, then one
    final line, ``done`` or ``failed``."""
    line = _Line(label, unit, chunk_bytes, t0)
    quiet = _QUIET or not logs.logger.isEnabledFor(logging.INFO)
    console = None if quiet else logs.live_console()
    stop = threading.Event()
    last = [0, 0]  # done, total: what the final line reports after a failure
    if quiet:
        reporter = None
    else:
        target = _bar if console is not None else _heartbeats
        reporter = threading.Thread(target=target, args=(line, counts, stop, last, console), daemon=True)
        reporter.start()
    try:
        yield
    except BaseException as e:
        _finish(stop, reporter)
        with contextlib.suppress(Exception):
            last[:] = counts()
        logs.logger.warning(line.failed(last[0], last[1], time.perf_counter(), e))
        raise
    _finish(stop, reporter)
    if not quiet:
        with contextlib.suppress(Exception):
            last[:] = counts()
        logs.info(line.done(last[1], time.perf_counter()))


def _finish(stop: threading.Event, reporter: threading.Thread | None) -> None:
    stop.set()
    if reporter is not None:
        reporter.join()


def _heartbeats(
    line: _Line, counts: Callable[[], tuple[int, int]], stop: threading.Event, last: list[int], console: Any
) -> None:
    """Log a heartbeat at least every :func:`interval` seconds and at each 10 % (also at 100 %
    while the step's last tasks, after those counted, still run)."""
    every = interval()
    emitted, decile = time.perf_counter(), 0
    while not stop.wait(min(POLL * 2, every)):
        try:
            done, total = counts()
        except Exception:  # noqa: BLE001 - the scheduler went away: the computation will say why
            return
        last[:] = done, total
        now = time.perf_counter()
        tenth = 10 * done // total if total else 0
        if now - emitted >= every or (tenth > decile and done < total):
            logs.info(line.heartbeat(done, total, now))
            emitted, decile = now, max(decile, tenth)


def _bar(
    line: _Line, counts: Callable[[], tuple[int, int]], stop: threading.Event, last: list[int], console: Any
) -> None:
    """A live rich bar on the terminal, removed when the step ends (its final line stays)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(line.unit),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(line.label, total=None, rate="")
        while not stop.wait(POLL):
            try:
                done, total = counts()
            except Exception:  # noqa: BLE001 - the scheduler went away: the computation will say why
                return
            last[:] = done, total
            bar.update(task, completed=done, total=total or None, rate=line.rate(done, time.perf_counter() - line.t0))

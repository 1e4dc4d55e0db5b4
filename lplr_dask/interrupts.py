"""Stopping on Ctrl-C and SIGTERM, even where Python drops the exception a signal raised.

A signal handler's exception is raised wherever the main thread happens to be. When that is a
garbage-collector callback or a ``__del__`` (distributed installs a gc callback in every process
that runs a scheduler), Python prints "Exception ignored in …" and carries on: measured here, a
Ctrl-C in the first second of pass 1 was dropped in some runs and the job ran to completion
with exit status 0 (benchmarks/RESULTS.md, "Figures behind the code's comments"). So the
command line's handlers (:func:`request`) also record the signal, and while a step computes
(:func:`redelivered`, used by :func:`lplr_dask.progress.compute`) a recorded signal is delivered
to the main thread again every :data:`REDELIVER_SECONDS` until the step stops. The library
itself installs no handler: :func:`request` is only called by the CLI's.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["REDELIVER_SECONDS", "request", "requested", "clear", "redelivered"]

#: How long a step may keep running after a stop was requested before the signal is sent again.
REDELIVER_SECONDS = 1.0

_requested: int | None = None


def request(signum: int) -> None:
    """Record that signal ``signum`` asked the process to stop (called by a signal handler)."""
    global _requested
    _requested = signum


def requested() -> int | None:
    """The signal that asked to stop, or None."""
    return _requested


def clear() -> None:
    """Forget a recorded signal (the command line, once it has reported the stop)."""
    global _requested
    _requested = None


@contextlib.contextmanager
def redelivered() -> Iterator[None]:
    """While the block runs, send a recorded stop signal to the main thread again every
    :data:`REDELIVER_SECONDS` (its exception may have been dropped); nothing when none is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()
    main = threading.main_thread().ident

    def watch() -> None:
        while not done.wait(REDELIVER_SECONDS):
            if _requested is not None and main is not None:
                signal.pthread_kill(main, _requested)  # a real signal: it also ends a blocking wait

    watcher = threading.Thread(target=watch, name="lplr-interrupts", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()

"""Computing with a progress bar on stderr (stdout is kept for results and ``--json``)."""

from __future__ import annotations

import sys
import time
from typing import Any

import dask

__all__ = ["compute", "current_client", "set_quiet"]

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off (``--quiet``) or on."""
    global _QUIET
    _QUIET = quiet


def current_client() -> Any:
    """The current dask.distributed Client, or None."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def compute(label: str, *collections: Any, persist: bool = False) -> tuple[Any, ...]:
    """Compute (or persist) dask collections, showing a progress bar labelled ``label``.

    With ``persist`` the results stay on the workers as dask collections backed by futures
    (for what a later pass reuses); otherwise they are gathered to the client.
    """
    client = current_client()
    if client is None:
        return dask.persist(*collections) if persist else dask.compute(*collections)
    from distributed import futures_of

    if persist:
        outs = client.persist(list(collections))
        futures = futures_of(outs)
    else:
        futures = client.compute(list(collections))
    _watch(label, futures)
    if persist:
        from distributed import wait

        wait(futures)  # the results stay on the workers: nothing is gathered
        for future in futures:
            if future.status == "error":
                future.result()  # raises the task's error
        return tuple(outs)
    return tuple(client.gather(futures))


def _watch(label: str, futures: list[Any]) -> None:
    from distributed import as_completed

    from rich.console import Console

    console = Console(file=sys.stderr)
    if _QUIET or not futures or not console.is_terminal:
        t0 = time.perf_counter()
        for _ in as_completed(futures):
            pass
        if not _QUIET:
            print(f"{label}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=len(futures))
        for _ in as_completed(futures):
            bar.advance(task)

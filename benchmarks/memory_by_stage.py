"""Peak worker memory of each stage of a two-pass compress: row strips against a task per chunk.

Fresh LocalCluster (2 workers × 1 thread, 127.0.0.1) per run; each worker's kernel high-water
mark (VmHWM) is reset before each stage and read after it (:func:`lplr_dask.chunking.worker_memory_peaks`).
The matrices are bench_compress's (``--data``: run it first, or give other Zarr paths).

    python benchmarks/memory_by_stage.py --data /tmp/lplr_bench [--per-chunk-too]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from distributed import Client, LocalCluster

import lplr_dask
from lplr_dask import chunking, factorize
from lplr_dask.progress import set_quiet

MiB = 2**20
MATRICES = ("A-16384x8192-c4096.zarr", "A-32768x16384-c4096.zarr")


def stage_peaks(path: str, out: str, *, strips: bool, rank: int = 256) -> dict[str, float]:
    """MiB of the worker with the highest peak, per stage of compressing ``path``."""
    peaks: dict[str, float] = {}
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c,
        Client(c) as client,
    ):

        def wrap(stage: Any) -> Any:
            def step(job: Any) -> Any:
                chunking.worker_memory_peaks(client, reset=True)
                result = stage.step(job)
                peaks[stage.name] = max(chunking.worker_memory_peaks(client).values()) / MiB
                return result

            return dataclasses.replace(stage, step=step)

        saved, real = factorize.STAGES, chunking.strips
        factorize.STAGES = tuple(wrap(s) for s in saved)
        if not strips:
            chunking.strips = lambda *a, **k: None  # type: ignore[assignment]
        try:
            lplr_dask.compress(path, out, rank=rank, overwrite=True, log=lambda _: None)
        finally:
            factorize.STAGES, chunking.strips = saved, real
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lplr-bench"))
    parser.add_argument("--per-chunk-too", action="store_true", help="also a task per chunk (no strips)")
    args = parser.parse_args(argv)
    set_quiet(True)
    print("| reading | A | pass 1 (stage basis) MiB | pass 2 (stage projected) MiB |\n|---|---|---:|---:|")
    for strips in (True, False) if args.per_chunk_too else (True,):
        for name in MATRICES:
            p = stage_peaks(
                os.path.join(args.data, name), os.path.join(args.data, "stage-mem.lplr.zarr"), strips=strips
            )
            shape = name.split("-")[1]
            print(
                f"| {'strips' if strips else 'a task per chunk'} | {shape} | {p['basis']:.0f} | {p['projected']:.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale-out (issue 15): tasks per chunk per pass, graph build time and a 64-node wall-time model.

On virtual Zarr sources (float32 arrays created with a shape and chunks, no chunk written: nothing
is read, nothing is computed) of 1×, 4×, 16× and 64× of 10^6 × 10^5 entries and the 10^12-entry
shapes 10^7 × 10^5 and 10^6 × 10^6 in 4096² chunks, and 114688² in 200,704 chunks of 256², at k = 256 with the default options (two-pass,
range oversampling p = k, float32 products): the input is opened and planned as a job does
(``job.open_matrix``, ``chunking.plan`` without a client, ``chunking.strips``), then the graphs of
pass 1 (one writer task per row strip of the sketches, as ``factorize._write_sketches``) and pass 2
(``W = pinv(L)·A``, one writer task per column chunk) are built with the package's own functions
(``factorize._pass1_blocks``, ``factorize.project``, ``blocks.map_row_blocks``/``map_column_blocks``)
and counted as the scheduler receives them (optimized: fused and culled), with the row strips a job
uses and without them (a task per chunk, as before issue 15's strips). The scheduler's memory for
each pass is measured on a real scheduler process (``dask scheduler`` on 127.0.0.1, no worker: the
graph is submitted, its tasks wait, the scheduler's resident memory is read, the graph cancelled). The per-chunk costs of the model are measured here on one 4096² chunk with one BLAS
thread (threadpoolctl).

Usage::

    python benchmarks/bench_scale.py                # every shape, under 10 minutes on 2 cores
    python benchmarks/bench_scale.py --shapes 1x 4x

Prints a markdown table and its assumptions; ``benchmarks/RESULTS.md`` ("Scale-out (issue 15)")
holds a run of it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.base import collections_to_expr

from lplr_dask import blocks, chunking, factorize
from lplr_dask.job import open_matrix
from lplr_dask.options import Options

#: name: shape and stored chunk side. 1×, 4×, 16×, 64× of 10^6 × 10^5 entries (both sides × 1, 2,
#: 4, 8), the 10^12-entry shapes, and 200,704 tiny chunks (issue 15's case of ``A.rechunk``).
SHAPES = {
    "1x": ((10**6, 10**5), 4096),
    "4x": ((2 * 10**6, 2 * 10**5), 4096),
    "16x": ((4 * 10**6, 4 * 10**5), 4096),
    "64x": ((8 * 10**6, 8 * 10**5), 4096),
    "1e7x1e5": ((10**7, 10**5), 4096),
    "1e6x1e6": ((10**6, 10**6), 4096),
    "tiny": ((114688, 114688), 256),
}
#: The chunk side whose costs are measured (the model scales them by entries per task).
CHUNK = 4096
RANK = 256
#: The cluster of the model.
NODES, CORES = 64, 32
#: Scheduler CPU per task (measured 0.95-1.67 ms in issue 15); one scheduler process.
SCHEDULER_S_PER_TASK = 1e-3
#: Aggregate read bandwidth of the model: 1 GB/s per node from a parallel file system or object store.
BANDWIDTH = NODES * 1e9


def optimized_tasks(collections: list[Any]) -> tuple[int, float]:
    """Tasks of the graph the scheduler gets for ``collections`` (optimized), and seconds to build it."""
    t0 = time.perf_counter()
    n = len(collections_to_expr(collections, optimize_graph=True).__dask_graph__())
    return n, time.perf_counter() - t0


def _written(x: Any, i: int, offset: int) -> float:
    """A writer that writes nothing (the graph's shape is what is measured)."""
    return 1.0


def pass1_collections(A: da.Array, params: factorize.Params, strips: blocks.Strips | None) -> list[Any]:
    """Pass 1 as a job computes it: one writer task per row strip of ``[Y | AG | ‖row‖²]``."""
    rows, _ = factorize._pass1_blocks(A, params, strips=strips)
    return [blocks.map_row_blocks(rows, _written)]


def pass2_collections(
    A: da.Array, params: factorize.Params, scratch: zarr.Group, strips: blocks.Strips | None
) -> list[Any]:
    """Pass 2 as a job computes it: ``W = PTᵀ·A`` from the row-chunked scratch PT, one task per column chunk of W."""
    n = int(A.shape[0])
    dtype = blocks.compute_dtype(A.dtype, params.precision)
    pt = scratch.create_array(
        "PT", shape=(n, params.rank), chunks=(int(A.chunks[0][0]), params.rank), dtype=dtype, overwrite=True
    )
    W = factorize.project(A, da.from_zarr(pt), precision=params.precision, strips=strips)
    return [blocks.map_column_blocks(W, _written)]


@contextlib.contextmanager
def scheduler() -> Any:
    """A client of a ``dask scheduler`` process on 127.0.0.1 without workers, and that process's pid."""
    from distributed import Client

    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "scheduler.json")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"]
            + ["--no-dashboard", "--scheduler-file", file],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                if os.path.exists(file):
                    break
                time.sleep(0.1)
            with Client(scheduler_file=file, timeout=30) as client:
                yield client, proc.pid
        finally:
            proc.terminate()
            proc.wait(30)


def scheduler_mib(collections: list[Any]) -> float:
    """MiB of resident memory a fresh scheduler process gains holding ``collections``' tasks (none run)."""
    with scheduler() as (client, pid):
        return _held_mib(client, pid, collections)


def _held_mib(client: Any, pid: int, collections: list[Any]) -> float:
    import psutil

    def rss() -> int:
        return int(psutil.Process(pid).memory_info().rss)

    def held_tasks(dask_scheduler: Any) -> int:
        return len(dask_scheduler.tasks)

    before = rss()
    futures = client.compute(collections)
    deadline, last = time.time() + 600, -1
    while time.time() < deadline:  # until the scheduler holds the whole graph
        count = client.run_on_scheduler(held_tasks)
        if count and count == last:
            break
        last = count
        time.sleep(1.0)
    held = rss()
    client.cancel(futures)
    del futures
    time.sleep(1.0)
    return (held - before) / 2**20


def chunk_costs(tmp: str, params: factorize.Params) -> dict[str, float]:
    """Seconds, best of 5 with one BLAS thread, for one 4096² float32 chunk: read and decode it from
    a Zarr array (zarr's default codec), its pass-1 products, its pass-2 product."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    data = rng.standard_normal((CHUNK, CHUNK), dtype=np.float32)
    z = zarr.create_array(os.path.join(tmp, "chunk.zarr"), data=data, chunks=(CHUNK, CHUNK))

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with threadpool_limits(1):
        a = da.from_array(data, chunks=(CHUNK, CHUNK))
        pt = da.from_array(rng.standard_normal((CHUNK, params.rank)), chunks=(CHUNK, params.rank))
        products = list(factorize.pass1(a, params).values())
        return {
            "read": best(lambda: z[...]),
            "pass 1": best(lambda: dask.compute(*products, scheduler="sync")),
            "pass 2": best(lambda: factorize.project(a, pt, precision=params.precision).compute(scheduler="sync")),
        }


def blas() -> str:
    import threadpoolctl

    found = {
        f"{i['internal_api']} {i['version']} ({i.get('architecture', '?')} kernels)"
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas"
    }
    return ", ".join(sorted(found)) or "none found"


def measure(name: str, shape: tuple[int, int], chunk: int, tmp: str, options: Options) -> dict[str, Any]:
    """Plan a virtual source of ``shape`` in ``chunk``² chunks and count its passes' graphs, with
    the row strips a job uses and without; the scheduler's memory for each pass with them."""
    path = os.path.join(tmp, f"{name}.zarr")
    zarr.create_array(path, shape=shape, chunks=(chunk, chunk), dtype="float32", fill_value=0, overwrite=True)
    t0 = time.perf_counter()
    src, A = open_matrix(path, options, log=lambda _: None)
    params = options.params(RANK, A.shape, A.dtype)
    B = chunking.plan(A, params, source=src, log=lambda _: None)
    strips = chunking.strips(B, src, threads=NODES * CORES)  # as a job on the model's cluster
    planned = time.perf_counter() - t0
    scratch = zarr.open_group(os.path.join(tmp, f"{name}-scratch.zarr"), mode="w")
    p1, p2 = pass1_collections(B, params, strips), pass2_collections(B, params, scratch, strips)
    t1, build1 = optimized_tasks(p1)
    t2, build2 = optimized_tasks(p2)
    c1, _ = optimized_tasks(pass1_collections(B, params, None))
    c2, _ = optimized_tasks(pass2_collections(B, params, scratch, None))
    memory = max(scheduler_mib(p1), scheduler_mib(p2))
    return {
        "strip width": strips.width if strips else 1,
        "per chunk tasks": (c1, c2),
        "scheduler MiB": memory,
        "name": name,
        "shape": shape,
        "stored chunk": chunk,
        "stored": A.npartitions,
        "chunks": B.chunksize,
        "merged": B.npartitions,
        "tasks": (t1, t2),
        "build": planned + build1 + build2,
        "params": params,
    }


def model(row: dict[str, Any], costs: dict[str, float]) -> dict[str, float]:
    """Seconds of one job (two passes) on NODES × CORES threads: the I/O bound, and the prediction
    max(I/O, compute, scheduler) per pass, summed over the passes. A task's compute is the measured
    cost of a 4096² chunk scaled by its entries (per-chunk overheads of smaller chunks not counted)."""
    n, d = row["shape"]
    threads = NODES * CORES
    io = n * d * 4 / BANDWIDTH  # one read of A, float32
    scale = row["chunks"][0] * row["chunks"][1] / CHUNK**2  # a merged chunk is this many chunks' work
    width = row["strip width"]  # a strip task reads this many (merged) chunks in turn
    strips = math.ceil(n / row["chunks"][0]) * math.ceil(math.ceil(d / row["chunks"][1]) / width)
    total = 0.0
    for tasks, product in zip(row["tasks"], (costs["pass 1"], costs["pass 2"])):
        compute = math.ceil(strips / threads) * width * (costs["read"] + product) * scale
        total += max(io, compute, tasks * SCHEDULER_S_PER_TASK)
    return {"io": 2 * io, "predicted": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args(argv)
    options = Options()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        costs = chunk_costs(tmp, options.params(RANK, (10**6, 10**5), np.float32))
        rows = []
        for name in args.shapes:
            shape, chunk = SHAPES[name]
            rows.append(measure(name, shape, chunk, tmp, options))
            print(f"... {name}: {time.perf_counter() - started:.0f} s", flush=True)
    p = rows[0]["params"]
    print(
        f"\nk = {RANK}, range oversampling p = {p.range_oversample}, two-pass, {p.precision} products, "
        f"lplr.chunking.max-tasks = {chunking.max_tasks()}, "
        f"task memory bound {chunking.task_memory(None) / 2**20:.0f} MiB (no client: "
        f"{chunking.DEFAULT_THREAD_MEMORY / 2**30:.0f} GiB per worker thread assumed)"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; numpy {np.__version__}, dask {dask.__version__}, "
        f"zarr {zarr.__version__}; BLAS {blas()}"
    )
    print(
        f"measured per 4096² chunk, 1 thread: read+decode {costs['read'] * 1e3:.0f} ms, pass-1 products "
        f"{costs['pass 1'] * 1e3:.0f} ms, pass-2 product {costs['pass 2'] * 1e3:.0f} ms"
    )
    print(
        f"model: {NODES} nodes × {CORES} cores = {NODES * CORES} threads; per pass max(I/O, compute, scheduler): "
        f"I/O = bytes of A / {BANDWIDTH / 1e9:.0f} GB/s aggregate; compute = waves of strip tasks × chunks per strip "
        f"× (read+decode + product) × 4096² chunks per (merged) chunk; scheduler = {SCHEDULER_S_PER_TASK * 1e3:.0f} ms of CPU per task, one "
        "process; central steps (Gram, eigh, TSQR of L) and the coding of R not counted; I/O, compute "
        "and scheduling assumed to overlap fully\n"
    )
    print(
        "| source | shape | stored chunks | read as | chunks per strip | tasks / task chunk, a task per chunk "
        "(pass 1, 2) | tasks / task chunk, strips (pass 1, 2) | tasks / stored chunk (pass 1, 2) "
        "| total tasks (pass 1 + 2) | scheduler MiB (larger pass) | graph build s | I/O bound s | predicted s "
        "| predicted / I/O |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        (t1, t2), (c1, c2), m = row["tasks"], row["per chunk tasks"], model(row, costs)
        shape = f"{row['shape'][0]:.0e} × {row['shape'][1]:.0e}".replace("e+0", "e")
        print(
            f"| {row['name']} | {shape} | {row['stored']:,} of {row['stored chunk']}² | {row['chunks'][0]}×{row['chunks'][1]} "
            f"| {row['strip width']} | {c1 / row['merged']:.2f}, {c2 / row['merged']:.2f} "
            f"| {t1 / row['merged']:.2f}, {t2 / row['merged']:.2f} | {t1 / row['stored']:.3f}, {t2 / row['stored']:.3f} "
            f"| {t1:,} + {t2:,} = {t1 + t2:,} | {row['scheduler MiB']:.0f} "
            f"| {row['build']:.1f} | {m['io']:.0f} | {m['predicted']:.0f} | {m['predicted'] / m['io']:.2f} |"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

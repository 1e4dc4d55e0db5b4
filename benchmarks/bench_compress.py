"""LPLR compress against the read-pass limit and dask's svd_compressed, on one LocalCluster.

Runs, in one process and on one cluster (by default 2 workers × 1 thread, for a 2-core machine):

``compare`` (default)
    On a generated 32768×16384 float32 Zarr matrix in 4096² chunks (kept in ``--data`` between
    runs), at k = 256: a plain read of A (``A.sum()``), ``compress`` two-pass and one-pass with each
    sketch (``--sketch gaussian|sparse``), and
    ``da.linalg.svd_compressed(k=256, n_power_iter=0 and 2, compute=True)``. Prints seconds, the
    ratio of each to the read pass, the workers' CPU seconds, the peak worker memory and the
    relative errors (exact, each measured afterwards in one more read that is not timed).
``memory``
    ``compress`` two-pass on matrices of n·d/4 and n·d entries at the same chunking, each on a
    fresh cluster: the peak worker memory should stay flat.

The table goes to stdout and, unless ``--no-write``, replaces this benchmark's section of
``benchmarks/RESULTS.md`` (other sections are kept). Timings on a shared machine move with its
load: the load average is printed with the machine.

Usage::

    python benchmarks/bench_compress.py                      # compare, then memory
    python benchmarks/bench_compress.py --mode compare --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, wait

import lplr_dask
from lplr_dask import chunking
from lplr_dask.datasets import generate, parse_shape
from lplr_dask.options import DEFAULT_SKETCH, SKETCHES
from lplr_dask.progress import set_quiet

SECTION = "## Compress vs read pass and svd_compressed"
RESULTS = Path(__file__).with_name("RESULTS.md")
TARGETS = {"two-pass": 3.5, "cache-input": 2.7, "one-pass": 1.7}  # at most this many read passes (issue 16)
FASTER_THAN = {"two-pass": 1.15, "one-pass": 2.3}  # at least this much faster than svd_compressed q=0
MiB = 2**20


def _cpu_seconds() -> float:  # runs on each worker
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


class Step:
    """One timed step: wall seconds, worker CPU seconds, peak worker memory, errors, stage times."""

    def __init__(self, name: str):
        self.name = name
        self.seconds = self.cpu = 0.0
        self.peak = 0
        self.error: float | None = None
        self.estimate: float | None = None
        self.stages: dict[str, float] = {}


@contextlib.contextmanager
def measure(client: Any, step: Step) -> Iterator[None]:
    chunking.worker_memory_peaks(client, reset=True)
    cpu0 = sum(client.run(_cpu_seconds).values())
    t0 = time.perf_counter()
    yield
    step.seconds = time.perf_counter() - t0
    step.cpu = sum(client.run(_cpu_seconds).values()) - cpu0
    step.peak = max(chunking.worker_memory_peaks(client).values())


def svd_error(A: da.Array, u: da.Array, s: da.Array, v: da.Array) -> float:
    """``‖A − U·diag(s)·V‖_F / ‖A‖_F`` streamed over A's chunks, in float64."""
    A64 = A.astype(np.float64)
    us = (u * s).astype(np.float64).rechunk((A.chunks[0], -1))
    num, den = dask.compute(((A64 - us @ v.astype(np.float64).rechunk((-1, A.chunks[1]))) ** 2).sum(), (A64**2).sum())
    return float(np.sqrt(num / den))


def run_compare(client: Any, path: str, out_dir: str, rank: int) -> list[Step]:
    A = da.from_zarr(path)
    A.sum().compute()  # warm the workers and the page cache; not timed
    steps = []
    read = Step("read A (A.sum())")
    with measure(client, read):
        A.sum().compute()
    steps.append(read)
    # the defaults (float32 products for float32 A, p = k extra sketch columns, the default
    # sketch), the other sketch, then stop 9's arithmetic (float64 products) and the paper's
    # sketch of exactly k columns
    other = next(s for s in SKETCHES if s != DEFAULT_SKETCH)
    runs = [  # passes, precision, oversample, sketch, cache_input
        (2, "auto", None, DEFAULT_SKETCH, False),
        (1, "auto", None, DEFAULT_SKETCH, False),
        (2, "auto", None, DEFAULT_SKETCH, True),
        (2, "auto", None, other, False),
        (1, "auto", None, other, False),
        (2, "float64", None, DEFAULT_SKETCH, False),
        (2, "auto", 0, DEFAULT_SKETCH, False),
    ]
    for passes, precision, oversample, sketch, cache_input in runs:
        mode = "two-pass" if passes == 2 else "one-pass"
        step = Step(
            f"lplr compress {mode}"
            + (f" --sketch {sketch}" if sketch != DEFAULT_SKETCH else "")
            + (" --precision float64" if precision == "float64" else "")
            + (" --cache-input" if cache_input else "")
            + (" --oversample 0" if oversample == 0 else "")
        )
        with measure(client, step):
            f = lplr_dask.compress(
                path,
                os.path.join(out_dir, f"p{passes}.lplr.zarr"),
                rank=rank,
                passes=passes,
                precision=precision,
                cache_input=cache_input,
                oversample=oversample,
                sketch=sketch,
                overwrite=True,
                log=lambda _: None,
            )
        step.error, step.estimate = lplr_dask.evaluate(path, f), f.attrs["error_estimate"]
        step.stages = {k: v for k, v in f.attrs["timings"].items() if k != "total"}
        steps.append(step)
    for q in (0, 2):
        step = Step(f"svd_compressed q={q}")
        with measure(client, step):  # the factors end on the workers, as compress's end on disk
            u, s, v = client.persist(list(da.linalg.svd_compressed(A, k=rank, n_power_iter=q, compute=True, seed=0)))
            wait([u, s, v])
        step.error = svd_error(A, u, s, v)
        steps.append(step)
    return steps


def run_memory(client: Any, shape: tuple[int, int], path: str, out_dir: str, rank: int) -> tuple[tuple[int, int], Step]:
    step = Step(f"compress {shape[0]}x{shape[1]}")
    with measure(client, step):
        lplr_dask.compress(path, os.path.join(out_dir, "mem.lplr.zarr"), rank=rank, overwrite=True, log=lambda _: None)
    return shape, step


def chunk_costs(path: str, rank: int, test_columns: int = 10) -> dict[str, float]:
    """Seconds per chunk, in this process on one thread (best of 7): the floor of each pass.

    ``read``: fetch and decode one stored chunk; ``pass 1``: its products with S and G (and its
    row norms); ``pass 2``: ``pinv(L)ᵀ`` rows times it; ``Ψ·A``: the sparse co-range product;
    each with float32 products (what ``precision="auto"`` runs on float32 input) and float64.
    """
    import zarr

    from lplr_dask import blocks
    from lplr_dask.lanes import DEFAULT_ZETA
    from lplr_dask.sketch import STREAM_G, STREAM_PSI, STREAM_S

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    z = zarr.open_array(path, mode="r")
    r, c = z.chunks
    limit: Any = contextlib.nullcontext()
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(1)  # as on a worker with one thread
    with limit:
        chunk = z[:r, :c]
        a = da.from_array(chunk, chunks=(r, c))
        pt = da.from_array(np.ones((r, rank)), chunks=(r, rank))
        costs = {"read": best(lambda: z[r : 2 * r, :c])}
        for precision in ("float32", "float64"):
            costs[f"pass 1 {precision}"] = best(
                lambda precision=precision: blocks.sketch_right(
                    a,
                    0,
                    [(STREAM_S, rank, 1.0), (STREAM_G, test_columns, 1.0)],
                    sumsq=True,
                    precision=precision,
                ).compute(scheduler="sync")
            )
            costs[f"pass 2 {precision}"] = best(
                lambda precision=precision: blocks.left_multiply(pt, a, precision=precision).compute(scheduler="sync")
            )
            costs[f"Ψ·A {precision}"] = best(
                lambda precision=precision: blocks.sketch_left(
                    a, 0, STREAM_PSI, 4 * rank + 1, precision=precision
                ).compute(scheduler="sync")
            )
        # the default range oversampling sketches 2k columns in pass 1
        costs["pass 1 float32 2k"] = best(
            lambda: blocks.sketch_right(
                a,
                0,
                [(STREAM_S, 2 * rank, 1.0), (STREAM_G, test_columns, 1.0)],
                sumsq=True,
                precision="float32",
            ).compute(scheduler="sync")
        )
        # the sparse sketch of 2k columns (lane kernel), the test columns' GEMM and the row norms
        costs["pass 1 float32 2k sparse"] = best(
            lambda: blocks.sketch_right(
                a,
                0,
                [(STREAM_G, test_columns, 1.0)],
                sumsq=True,
                precision="float32",
                lanes=(STREAM_S, 2 * rank, DEFAULT_ZETA),
            ).compute(scheduler="sync")
        )
        # svd_compressed q=0's two products of each chunk, float32 as on float32 A: A·Ω with
        # k + 10 columns, then Qᵀ·A with k + 10 rows (its TSQR and small SVD come on top)
        omega = np.ones((c, rank + 10), dtype=np.float32)
        qt = np.ones((rank + 10, r), dtype=np.float32)
        a32 = np.asarray(chunk, dtype=np.float32)
        costs["svd q=0 A·Ω"] = best(lambda: a32 @ omega)
        costs["svd q=0 Qᵀ·A"] = best(lambda: qt @ a32)
        return costs


def ensure_matrix(data: str, shape: tuple[int, int], chunk: int, log: Callable[[str], None]) -> str:
    path = os.path.join(data, f"A-{shape[0]}x{shape[1]}-c{chunk}.zarr")
    if not os.path.exists(os.path.join(path, "zarr.json")):
        log(f"generating {path} (kept for later runs)")
        generate(path, shape, rank=512, decay=0.99, noise=0.1, chunks=(chunk, chunk), overwrite=True)
    return path


def machine(args: argparse.Namespace) -> list[str]:
    import psutil

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    blas = ""
    with contextlib.suppress(ImportError):
        import threadpoolctl

        found = {
            f"{i['internal_api']} {i['version']} ({i.get('architecture', '?')} kernels)"
            for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"
        }
        blas = "; BLAS " + ", ".join(sorted(found)) if found else ""
    import distributed
    import zarr

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"- numpy {np.__version__}, dask {dask.__version__}, distributed {distributed.__version__}, "
        f"zarr {zarr.__version__}{blas}",
        f"- cluster: LocalCluster, {args.workers} workers × {args.threads} thread(s), memory limit "
        f"{args.memory_limit} each; load average at the end: {load}",
    ]


def table_costs(costs: dict[str, float]) -> list[str]:
    read = costs["read"]
    lines = [
        "Per chunk, one thread, best of 7: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in costs.items()) + ".",
        "",
        "The floor these set (CPU per chunk, before any scheduling or central step, in read passes):",
    ]
    for precision in ("float32", "float64"):
        two = 2 * read + costs[f"pass 1 {precision}"] + costs[f"pass 2 {precision}"]
        one = read + costs[f"pass 1 {precision}"] + costs[f"Ψ·A {precision}"]
        lines.append(f"- {precision} products: two-pass ≥ {two / read:.2f}×, one-pass ≥ {one / read:.2f}×")
    two = 2 * read + costs["pass 1 float32 2k"] + costs["pass 2 float32"]
    one = read + costs["pass 1 float32 2k"] + costs["Ψ·A float32"]
    lines.append(
        f"- float32 products with the default oversampling (2k sketch columns in pass 1): two-pass ≥ "
        f"{two / read:.2f}×, one-pass ≥ {one / read:.2f}×"
    )
    two = 2 * read + costs["pass 1 float32 2k sparse"] + costs["pass 2 float32"]
    one = read + costs["pass 1 float32 2k sparse"] + costs["Ψ·A float32"]
    lines.append(
        f"- the same with the sparse sketch (lane kernel, ζ = 4): two-pass ≥ {two / read:.2f}×, one-pass ≥ {one / read:.2f}×"
    )
    lines.append(
        "- the pass-2 product alone is a dense k×n by n×d GEMM (2·n·d·k flops) whatever the sketch: two-pass ≥ "
        f"{(2 * read + costs['pass 2 float32']) / read:.2f}× with float32 products even if pass 1 cost no more than its read"
    )
    svd = 2 * read + costs["svd q=0 A·Ω"] + costs["svd q=0 Qᵀ·A"]
    lines.append(
        f"- svd_compressed q=0 reads each chunk twice, with a (k + 10)-column GEMM each time: ≥ {svd / read:.2f}×; "
        f"so the most the per-chunk work lets the defaults gain on it, before either's central steps: two-pass "
        f"{svd / two:.2f}×, one-pass {svd / one:.2f}×"
    )
    return lines


def table_compare(steps: list[Step], shape: tuple[int, int], chunk: int, rank: int) -> list[str]:
    read, read_cpu = steps[0].seconds, steps[0].cpu
    lines = [
        f"A: {shape[0]}×{shape[1]} float32 ({shape[0] * shape[1] * 4 / 2**30:.1f} GiB) Zarr, {chunk}² chunks, "
        f"zstd level 1; k = {rank}, bits (8, 8), default quantizer.",
        "",
        "| step | seconds | × read pass | worker CPU s | × read pass (CPU) | peak worker MiB | relative error (estimate) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        err = "" if s.error is None else f"{s.error:.4f}" + ("" if s.estimate is None else f" ({s.estimate:.4f})")
        lines.append(
            f"| {s.name} | {s.seconds:.1f} | {s.seconds / read:.2f} | {s.cpu:.1f} | {s.cpu / read_cpu:.2f} "
            f"| {s.peak / MiB:.0f} | {err} |"
        )
    by = {s.name: s for s in steps}
    two, one = by["lplr compress two-pass"], by["lplr compress one-pass"]
    lines += [
        "",
        "Worker CPU seconds move less with the machine's load than wall seconds do: where other "
        "processes share the cores, the CPU ratios are the steadier comparison.",
        "",
        "Stages of compress (seconds):",
    ]
    for s in steps:
        if not s.stages:
            continue
        lines.append(f"- {s.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in s.stages.items()))
    lines += ["", "Targets (wall seconds; CPU seconds in brackets):"]
    cached = by["lplr compress two-pass --cache-input"]
    for s, limit in ((two, TARGETS["two-pass"]), (cached, TARGETS["cache-input"]), (one, TARGETS["one-pass"])):
        ratio = s.seconds / read
        lines.append(
            f"- {s.name}: {ratio:.2f}× the read pass ({s.cpu / read_cpu:.2f}×) (target ≤ {limit}×): "
            f"{'met' if ratio <= limit else 'MISSED'}"
        )
    svd = by["svd_compressed q=0"]
    for s, mode in ((two, "two-pass"), (one, "one-pass")):
        speedup, factor = svd.seconds / s.seconds, FASTER_THAN[mode]
        lower = s.error is not None and svd.error is not None and s.error < svd.error
        lines.append(
            f"- speed-up of {mode} over svd_compressed q=0: {speedup:.2f}× ({svd.cpu / s.cpu:.2f}×), error "
            f"{s.error:.4f} against {svd.error:.4f} (target ≥ {factor}× at lower error): "
            f"{'met' if speedup >= factor and lower else 'MISSED'}"
        )
    return lines


def table_memory(rows: list[tuple[tuple[int, int], Step]], chunk: int, rank: int) -> list[str]:
    lines = [
        f"Peak worker memory, compress two-pass, k = {rank}, {chunk}² chunks:",
        "",
        "| A | entries | seconds | peak worker MiB |",
        "|---|---:|---:|---:|",
    ]
    for shape, s in rows:
        lines.append(f"| {shape[0]}×{shape[1]} | {shape[0] * shape[1]:,} | {s.seconds:.1f} | {s.peak / MiB:.0f} |")
    (_, small), (_, large) = rows[0], rows[-1]
    growth = large.peak / small.peak - 1
    lines += [
        "",
        f"- n·d × {rows[-1][0][0] * rows[-1][0][1] / (rows[0][0][0] * rows[0][0][1]):.0f}: peak "
        f"{growth:+.1%} (target within ±10%): {'met' if abs(growth) <= 0.10 else 'MISSED'}",
    ]
    return lines


def write_section(lines: list[str]) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it), keeping the others."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    section = "\n".join([SECTION, "", *lines]).rstrip() + "\n"
    start = text.find(SECTION)
    if start < 0:
        text = (text.rstrip() + "\n\n" if text else "") + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["compare", "memory", "all"], default="all")
    parser.add_argument("--shape", type=parse_shape, default=(32768, 16384))
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-limit", default="auto")
    parser.add_argument("--data", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lplr-bench"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)

    set_quiet(True)
    os.makedirs(args.data, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    n, d = args.shape
    out: list[str] = [
        f"Run {datetime.datetime.now().isoformat(timespec='minutes')} with "
        f"`python benchmarks/bench_compress.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip()
        + ":",
        "",
    ]

    def cluster() -> Any:
        return LocalCluster(
            n_workers=args.workers,
            threads_per_worker=args.threads,
            memory_limit=args.memory_limit,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )

    main_path = ensure_matrix(args.data, args.shape, args.chunk, log)
    if args.mode in ("compare", "all"):
        with cluster() as c, Client(c) as client:
            steps = run_compare(client, main_path, args.data, args.rank)
        out += table_compare(steps, args.shape, args.chunk, args.rank) + [""]
        out += table_costs(chunk_costs(main_path, args.rank)) + [""]
    if args.mode in ("memory", "all"):
        small = (n // 2, d // 2)
        paths = [(small, ensure_matrix(args.data, small, args.chunk, log)), (args.shape, main_path)]
        rows = []
        for shape, path in paths:
            with cluster() as c, Client(c) as client:  # fresh workers for each size
                rows.append(run_memory(client, shape, path, args.data, args.rank))
        out += table_memory(rows, args.chunk, args.rank) + [""]
    out += machine(args)
    print("\n".join(out))
    if not args.no_write:
        write_section(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

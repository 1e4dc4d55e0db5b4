"""Append cost (issue 19): the same block of rows appended to stores of 1×, 4× and 16× its size.

An embedding-table-like float32 matrix (low rank plus noise, d = 1024 columns, chunks of
2048 × 1024) is compressed with ``--passes 1 --appendable`` at n0 = 2048, 8192 and 32768 rows;
then the same m = 2048 rows are appended to each (``lplr_dask.append(..., axis="rows")``). For
each size the table gives the append's wall time, split into its read of the new block (the
timing ``append: sketch``: the block's sketches, the kept sketches copied and updated) and the
rest (the one-pass stages on the sketches: basis, ``W = (Ψ·L̂)^† Z``, R, the estimate, and the
commit), and, for comparison, a one-pass compression of the grown matrix from scratch. Each
cell is the best of ``--repeat`` runs (default 2), on fresh copies of the store.

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_append.py   # ~2 minutes on 2 cores

Prints a markdown table, then the BLAS library and its kernels as threadpoolctl names them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import zarr

import lplr_dask
from lplr_dask.datasets import synthetic
from lplr_dask.store import sketch_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scale import blas  # noqa: E402  (the BLAS names as threadpoolctl gives them)

D, CHUNK, BLOCK, RANK = 1024, 2048, 2048, 32
SIZES = (1, 4, 16)


def _quiet(_: str) -> None:
    pass


def _write(path: str, rows: int, seed: int) -> str:
    A = synthetic((rows, D), rank=40, decay=0.9, noise=0.05, chunks=(CHUNK, D), seed=seed)
    z = zarr.create_array(path, shape=A.shape, chunks=(CHUNK, D), dtype=np.float32, overwrite=True)
    for r in range(0, rows, CHUNK):
        z[r : r + CHUNK] = np.asarray(A[r : r + CHUNK].compute())
    return path


def _concat(path: str, parts: list[str]) -> str:
    arrays = [zarr.open_array(p, mode="r") for p in parts]
    rows = sum(a.shape[0] for a in arrays)
    z = zarr.create_array(path, shape=(rows, D), chunks=(CHUNK, D), dtype=np.float32, overwrite=True)
    r = 0
    for a in arrays:
        for s in range(0, a.shape[0], CHUNK):
            z[r : r + CHUNK] = a[s : s + CHUNK]
            r += CHUNK
    return path


def measure(tmp: str, factor: int, new: str, repeat: int) -> dict[str, Any]:
    base = _write(os.path.join(tmp, f"base{factor}.zarr"), factor * BLOCK, seed=factor)
    kw: dict[str, Any] = dict(rank=RANK, bits=(8, 8), passes=1, seed=0, log=_quiet)
    store = os.path.join(tmp, f"base{factor}.lplr.zarr")
    lplr_dask.compress(base, store, appendable=True, **kw)
    best: dict[str, Any] = {}
    for i in range(repeat):
        copy = os.path.join(tmp, f"copy{factor}-{i}.lplr.zarr")
        shutil.copytree(store, copy)
        t0 = time.perf_counter()
        f = lplr_dask.append(copy, new, axis="rows", log=_quiet)
        wall = time.perf_counter() - t0
        if not best or wall < best["append_s"]:
            sketch = f.attrs["timings"]["append: sketch"]
            best = {
                "append_s": wall,
                "read_s": sketch,
                "rest_s": wall - sketch,
                "sketch_bytes": sketch_bytes(copy),
                "error": f.attrs["error_estimate"],
            }
        shutil.rmtree(copy)
    whole = _concat(os.path.join(tmp, f"whole{factor}.zarr"), [base, new])
    p = lplr_dask.open_factors(store).attrs["sketch"]["range_oversample"]
    scratch = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ref = lplr_dask.compress(whole, os.path.join(tmp, f"ref{factor}.lplr.zarr"), oversample=p, overwrite=True, **kw)
        scratch.append(time.perf_counter() - t0)
    best.update(recompress_s=min(scratch), recompress_error=ref.attrs["error_estimate"])
    for path in (base, whole, store):
        shutil.rmtree(path)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one local worker (default 2)")
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    tmp = tempfile.mkdtemp(prefix="bench-append-")
    rows = []
    try:
        with LocalCluster(n_workers=1, threads_per_worker=args.threads, dashboard_address=":0") as cluster:
            with Client(cluster):
                new = _write(os.path.join(tmp, "new.zarr"), BLOCK, seed=99)
                for factor in SIZES:
                    r = measure(tmp, factor, new, args.repeat)
                    rows.append((factor, r))
                    print(f"{factor}x: {r}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"Append of {BLOCK} × {D} float32 rows (chunks {CHUNK} × {D}, rank {RANK}, bits 8 8, one pass) to stores "
        f"of n0 rows; best of {args.repeat}; 1 worker × {args.threads} threads.\n"
    )
    print(
        "| existing rows n0 | × block | append s | of which read + sketch s | refactor + commit s "
        "| recompress n0 + m s | append ÷ recompress | kept sketches MiB | estimate (append / recompress) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for factor, r in rows:
        print(
            f"| {factor * BLOCK} | {factor} | {r['append_s']:.2f} | {r['read_s']:.2f} | {r['rest_s']:.2f} "
            f"| {r['recompress_s']:.2f} | {r['append_s'] / r['recompress_s']:.2f} | {r['sketch_bytes'] / 2**20:.1f} "
            f"| {r['error']:.5f} / {r['recompress_error']:.5f} |"
        )
    print(f"\nBLAS: {blas()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

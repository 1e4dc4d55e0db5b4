"""The sparse (lane) range sketch against the Gaussian one: exact errors at equal bytes.

For each matrix of ``benchmarks/quantizers.py`` (phantom, lowrank, poly, student-t; 1000 × 1000
float32 in 200 × 200 chunks), each bit pair and each rank of a ladder, ``lplr_dask.compress``
runs twice on one LocalCluster with the library's defaults (default quantizer, range
oversampling p = k, two passes), once per sketch, and then once in one-pass mode with the sparse
sketch. The codes' sizes do not depend on the sketch (the same rank and bits), so a ratio of
errors at one (matrix, rank, bits) is a ratio at equal bytes; the bytes on disk are printed too.

Usage::

    python benchmarks/sketches.py            # about 5 minutes on 2 cores
    python benchmarks/sketches.py --datasets lowrank poly --ranks 32

Prints a Markdown table (errors, sparse ÷ Gaussian) and the geometric mean and range of the
ratios; ``benchmarks/RESULTS.md`` ("CPU cost of a pass") holds a run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import dask.array as da
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quantizers import CHUNKS, matrices  # noqa: E402

DATASETS = ["phantom", "lowrank", "poly", "student-t"]
RANKS = [16, 48, 128]
PAIRS = [(8, 8), (8, 4), (4, 4)]


def error(A: np.ndarray, path: str, **kw: object) -> tuple[float, int]:
    """Exact relative error and bytes on disk of one compression."""
    import lplr_dask
    from lplr_dask import store

    f = lplr_dask.compress(da.from_array(A, chunks=CHUNKS), path, overwrite=True, log=lambda m: None, **kw)
    recon = f.to_dask(np.float64).compute()
    a64 = A.astype(np.float64)
    return float(np.linalg.norm(a64 - recon) / np.linalg.norm(a64)), store.bytes_on_disk(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--ranks", nargs="+", type=int, default=RANKS)
    args = parser.parse_args(argv)
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    rows = []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
        tempfile.TemporaryDirectory() as tmp,
    ):
        path = os.path.join(tmp, "o.lplr.zarr")
        for name, A in matrices(args.datasets).items():
            for rank in args.ranks:
                for bits in PAIRS:
                    gauss, gbytes = error(A, path, rank=rank, bits=bits, sketch="gaussian")
                    sparse, sbytes = error(A, path, rank=rank, bits=bits, sketch="sparse")
                    one, _ = error(A, path, rank=rank, bits=bits, sketch="sparse", passes=1)
                    rows.append((name, rank, bits, gauss, sparse, one, gbytes, sbytes))
            print(f"... {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(
        "| matrix | rank | bits | error, gaussian | error, sparse | sparse ÷ gaussian | one-pass sparse "
        "÷ two-pass sparse | bytes, gaussian | bytes, sparse |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, rank, bits, g, s, o, gb, sb in rows:
        print(f"| {name} | {rank} | {bits} | {g:.4f} | {s:.4f} | {s / g:.3f} | {o / s:.3f} | {gb:,} | {sb:,} |")
    ratios = [s / g for *_, g, s, _o, _gb, _sb in rows]
    ones = [o / s for *_, s, o, _gb, _sb in rows]
    print(
        f"\nsparse ÷ gaussian over {len(ratios)} cells: geometric mean {math.exp(np.mean(np.log(ratios))):.3f}, "
        f"median {np.median(ratios):.3f}, range {min(ratios):.3f}–{max(ratios):.3f}"
    )
    print(f"one-pass ÷ two-pass (sparse): max {max(ones):.3f}, median {np.median(ones):.3f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

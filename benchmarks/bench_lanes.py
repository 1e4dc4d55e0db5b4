"""Lane sketch kernels (issue 16): per-chunk cost of pass 1's products on one thread, read-free.

On one in-memory 4096² chunk of standard normals, float32 and float64, with one BLAS thread
(threadpoolctl), the best of 7 runs of:

- ``lanes.lane_product`` (``out += a @ S`` for the lane sketch) at zeta = 2, 4, 8 and width 512
  (k + p for the default k = 256 with p = k), by the numba kernel, with the rows' sums of squares
  in the same sweep at zeta = 4, and by the sparse fallback (scipy);
- the dense GEMM ``a @ S`` it replaces, S a (4096 × 512) Gaussian in a's dtype;
- ``lanes.scatter_rows`` (``out += Ψ @ a``, one-pass mode's co-range product) at 4 and 8
  non-zeros per row of A and ℓ = 266 (and 8 at ℓ = 1025), by the numba kernel and by the scipy
  CSC product that ``blocks`` computes today (its matrix built from the positions, then
  multiplied).

Nothing is read from storage: the chunk is made once, before the timings. Compilation (numba)
happens in a warm-up call, outside them.

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_lanes.py   # < 2 minutes

Prints a markdown table, then the BLAS library and its kernels as threadpoolctl names them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from lplr_dask import lanes
from lplr_dask.sketch import STREAM_PSI, STREAM_S, sparse_sign_rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scale import blas  # noqa: E402  (the BLAS names as threadpoolctl gives them)

CHUNK = 4096
#: Columns of the range sketch: k + p for k = 256 and the default p = k.
WIDTH = 512
ZETAS = (2, 4, 8)
#: Rows ℓ of Ψ: 266 = k + 10 as issue 16 sets the case, and 4k + 1 = 1025, one-pass mode's
#: default (factorize.Params.oversample), at which ``out`` no longer fits in L2.
PSI_WIDTHS = (266, 1025)
NNZS = (4, 8)


def best(fn: Callable[[], Any], repeat: int) -> float:
    """Milliseconds, the best of ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def with_kernel(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with ``lanes.KERNEL`` set to ``name``."""

    def run() -> Any:
        saved, lanes.KERNEL = lanes.KERNEL, name
        try:
            return fn()
        finally:
            lanes.KERNEL = saved

    return run


Rows = dict[str, tuple[float, str]]  # name → (milliseconds, the name of its baseline row)


def timings(dtype: type, repeat: int) -> Rows:
    """The table's rows for one dtype."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((CHUNK, CHUNK)).astype(dtype)
    out = np.zeros((CHUNK, WIDTH), dtype=dtype)
    sumsq = np.zeros(CHUNK)
    gemm = f"dense GEMM a @ S, {WIDTH} columns"
    rows: Rows = {}

    def lane(zeta: int, with_sumsq: bool = False) -> Callable[[], Any]:
        return lambda: lanes.lane_product(
            a, 0, seed=1, stream=STREAM_S, width=WIDTH, zeta=zeta, out=out, sumsq=sumsq if with_sumsq else None
        )

    s = rng.standard_normal((CHUNK, WIDTH)).astype(dtype)
    rows[gemm] = best(lambda: a @ s, repeat), gemm
    for zeta in ZETAS:
        rows[f"lane_product numba, zeta={zeta}"] = best(with_kernel("numba", lane(zeta)), repeat), gemm
    rows["lane_product numba, zeta=4, + sums of squares"] = best(with_kernel("numba", lane(4, True)), repeat), gemm
    for zeta in ZETAS:
        rows[f"lane_product sparse (scipy), zeta={zeta}"] = best(with_kernel("sparse", lane(zeta)), repeat), gemm

    for width in PSI_WIDTHS:
        positions, signs = sparse_sign_rows(1, STREAM_PSI, 0, CHUNK, width)
        psi_out = np.zeros((width, CHUNK), dtype=dtype)
        for nnz in NNZS if width == PSI_WIDTHS[0] else NNZS[-1:]:
            pos, sg = positions[:, :nnz], signs[:, :nnz]

            def scatter(pos: np.ndarray = pos, sg: np.ndarray = sg, width: int = width, out: Any = psi_out) -> Any:
                return lanes.scatter_rows(a, pos, sg, width, out=out)

            base = f"scipy CSC Ψ @ a (as blocks does), nnz={nnz}, ℓ={width}"
            rows[base] = best(with_kernel("sparse", scatter), repeat), base
            rows[f"scatter_rows numba, nnz={nnz}, ℓ={width}"] = best(with_kernel("numba", scatter), repeat), base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per timing; the best is reported")
    args = parser.parse_args()
    with threadpool_limits(1):
        t32, t64 = timings(np.float32, args.repeat), timings(np.float64, args.repeat)
    print(f"Per {CHUNK}² chunk, one thread, best of {args.repeat}; × = its baseline's time over its own:\n")
    print("| product | float32 ms | × | float64 ms | × | baseline |")
    print("|---|---:|---:|---:|---:|---|")
    for name, (ms32, base) in t32.items():
        ms64 = t64[name][0]
        x32, x64 = t32[base][0] / ms32, t64[base][0] / ms64
        print(f"| {name} | {ms32:.1f} | {x32:.1f} | {ms64:.1f} | {x64:.1f} | {'—' if base == name else base} |")
    numba = getattr(lanes.numba, "__version__", "not installed")
    print(f"\nBLAS: {blas()}; numba {numba}; numpy {np.__version__}; {platform.machine()} {platform.processor()}")


if __name__ == "__main__":
    main()

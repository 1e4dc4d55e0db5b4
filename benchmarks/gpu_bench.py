"""Compress on the GPU against the CPU path, on the same data, in one run (issue 7).

(a) A resident on the device (8 GB float32 where memory allows, k = 256, two passes):
    ``compress(A_dev, device="cuda")`` against ``compress(A_host, device="cpu")`` on a host copy
    of the same A. Target on one H100: at least 50 GB/s of A.
(b) A read once from a Zarr array on the host (``passes=1``): the GPU run against a plain read of
    the same array (decompress every chunk, nothing else). Target: at least 80% of the read's speed.
    The CPU path runs on it too, for the errors.

Both GPU results must have relative errors within 2% of the CPU results' (exact errors, streamed);
the script exits 1 otherwise, 2 without a GPU. Speeds are printed with their targets, not enforced.
Everything runs in this process (one Dask worker with a thread per core), so the device arrays
never leave it. ``benchmarks/gpu_check.sh`` runs it after the ``gpu`` tests.

    python3 benchmarks/gpu_bench.py [--gb 8] [--zarr-gb 4] [--rank 256]
    python3 benchmarks/gpu_bench.py --device cpu --gb 0.02 --zarr-gb 0.01 --rank 16   # smoke test

With ``$OUT`` set, the results are also written to ``$OUT/gpu_bench.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread per Dask thread, set before numpy loads

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

#: Columns of the benchmark matrix and its chunk shape (float32: 128 MB chunks).
COLUMNS = 16384
CHUNKS = (8192, 4096)
#: Targets of issue 7 on one H100.
TARGET_DEVICE_GBPS = 50.0
TARGET_READ_FRACTION = 0.8
#: Largest allowed relative difference of the GPU and CPU errors.
ERROR_AGREEMENT = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=8.0, help="size of the device-resident A in GB (default 8)")
    p.add_argument("--zarr-gb", type=float, default=4.0, help="size of the host Zarr A in GB (default 4)")
    p.add_argument("--rank", type=int, default=256, help="rank k (default 256)")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="the device under test; 'cpu' runs this script without a GPU (a smoke test)",
    )
    p.add_argument("--workdir", default=None, help="where the Zarr array and outputs go (default: a temporary folder)")
    return p.parse_args(argv)


def rows_for(gb: float) -> int:
    """Rows of a float32 matrix of about ``gb`` GB with :data:`COLUMNS` columns, a whole number of row chunks."""
    rows = gb * 1e9 / (4 * COLUMNS)
    return max(CHUNKS[0], int(rows // CHUNKS[0]) * CHUNKS[0])


def fit_to_memory(args: argparse.Namespace, xp: ModuleType) -> list[str]:
    """Shrink the sizes to the free device and host memory; return notes on what was shrunk."""
    import psutil

    notes = []
    host_free = psutil.virtual_memory().available / 1e9
    if xp is not np:
        free, _ = xp.cuda.runtime.memGetInfo()
        device_cap = free / 1e9 / 3  # A, plus float64 copies of the chunks in flight, Y and W
        if args.gb > device_cap:
            notes.append(f"A on the device shrunk from {args.gb:g} GB to {device_cap:.1f} GB: {free / 1e9:.0f} GB free")
            args.gb = device_cap
    host_cap = host_free / 3  # the host copy of A and the Zarr array's page cache
    if args.gb > host_cap:
        notes.append(f"A shrunk from {args.gb:g} GB to {host_cap:.1f} GB: {host_free:.0f} GB of host memory free")
        args.gb = host_cap
    args.zarr_gb = min(args.zarr_gb, args.gb)
    return notes


def describe_machine(xp: ModuleType) -> dict[str, Any]:
    import dask
    import zarr

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "cpus": os.cpu_count(),
    }
    if xp is np:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    else:
        props = xp.cuda.runtime.getDeviceProperties(0)
        info["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        info["device_memory_gb"] = round(props["totalGlobalMem"] / 1e9, 1)
        info["cupy"] = xp.__version__
        info["cuda_runtime"] = xp.cuda.runtime.runtimeGetVersion()
    return info


def _low_rank_block(x: Any, xp: ModuleType, rank: int, noise: float, seed: int, block_info: Any = None) -> Any:
    """Block (i, j) of ``U·diag(s)·V + noise``: U's rows from i, V's columns from j, noise from both."""
    (r0, r1), (c0, c1) = block_info[0]["array-location"]
    i, j = block_info[0]["chunk-location"]

    def normals(stream: int, shape: tuple[int, int]) -> Any:
        return xp.random.default_rng(seed * 1_000_003 + stream).standard_normal(shape).astype(np.float32)

    u = normals(2 * i, (r1 - r0, rank))
    v = normals(2 * j + 1, (rank, c1 - c0))
    s = xp.asarray(0.9 ** np.arange(rank) / math.sqrt(rank), dtype=np.float32)
    return (u * s) @ v + noise * normals(1_000 * (i + 1) + j, (r1 - r0, c1 - c0))


def make_matrix(xp: ModuleType, rows: int, *, rank: int = 64, noise: float = 0.01, seed: int = 0) -> Any:
    """A lazy low-rank-plus-noise float32 dask array whose chunks are made on ``xp``'s device."""
    import dask.array as da

    zeros = da.zeros((rows, COLUMNS), chunks=CHUNKS, dtype=np.float32)
    return zeros.map_blocks(
        _low_rank_block,
        xp=xp,
        rank=rank,
        noise=noise,
        seed=seed,
        dtype=np.float32,
        meta=xp.empty((0, 0), dtype=np.float32),
    )


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def plain_read(path: str) -> int:
    """Read and decompress every chunk of the Zarr array at ``path``; return the bytes read."""
    import dask.array as da

    A = da.from_zarr(path)
    sizes = A.map_blocks(lambda b: np.full((1, 1), b.nbytes, dtype=np.int64), chunks=(1, 1), dtype=np.int64)
    return int(sizes.sum().compute())


def compress_run(A: Any, out: Path, device: str, rank: int, passes: int) -> dict[str, Any]:
    """Compress A (timed), then measure the exact error; the result's figures as a dict."""
    import lplr_dask

    f, seconds = timed(
        lambda: lplr_dask.compress(
            A,
            out,
            rank=rank,
            bits=(8, 8),
            passes=passes,
            device=device,
            overwrite=True,
            log=lambda _: None,
        )
    )
    return {"device": device, "passes": passes, "seconds": seconds, "stages": f.attrs["timings"], "factors": f}


def add_errors(runs: list[dict[str, Any]], A_eval: Any, nbytes: int) -> None:
    import lplr_dask

    for run in runs:
        run["error"] = lplr_dask.evaluate(A_eval, run.pop("factors"))
        run["gbps"] = nbytes / run["seconds"] / 1e9


def agreement(gpu: dict[str, Any], cpu: dict[str, Any]) -> float:
    return abs(gpu["error"] - cpu["error"]) / cpu["error"]


def show_run(name: str, run: dict[str, Any]) -> None:
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in run["stages"].items() if k != "total")
    print(f"    {name:<28} {run['seconds']:8.3f} s  {run['gbps']:8.2f} GB/s  error {run['error']:.6f}")
    print(f"      stages: {stages}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lplr_dask.backend import check_device, to_device
    from lplr_dask.errors import LplrError

    try:
        check_device(args.device)
    except LplrError as e:
        print(f"gpu_bench: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import cupy as xp
    else:
        xp = np
    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster, wait

    from lplr_dask.progress import set_quiet

    set_quiet(True)
    notes = fit_to_memory(args, xp)
    machine = describe_machine(xp)
    print(f"device: {machine['device']}; " + ", ".join(f"{k} {v}" for k, v in machine.items() if k != "device"))
    for note in notes:
        print(f"note: {note}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lplr-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine, "rank": args.rank, "notes": notes}
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=os.cpu_count(), processes=False, dashboard_address=":0", memory_limit=None
        ) as cluster,
        Client(cluster),
    ):
        # -- warm-up: compiles the device kernels on a small matrix, both modes ----------------------
        small = make_matrix(xp, 2 * CHUNKS[0])
        for passes in (2, 1):
            compress_run(small, work / "warm.lplr.zarr", args.device, args.rank, passes)

        # -- (a) A resident on the device --------------------------------------------------------------
        rows = rows_for(args.gb)
        A_dev = make_matrix(xp, rows).persist()
        wait(A_dev)
        A_host = to_device(A_dev, "cpu").persist()
        wait(A_host)
        nbytes = rows * COLUMNS * 4
        print(
            f"(a) A on the device: {rows}x{COLUMNS} float32 ({nbytes / 1e9:.2f} GB), chunks "
            f"{CHUNKS[0]}x{CHUNKS[1]}, rank {args.rank}, two passes"
        )
        gpu = compress_run(A_dev, work / "a-gpu.lplr.zarr", args.device, args.rank, 2)
        cpu = compress_run(A_host, work / "a-cpu.lplr.zarr", "cpu", args.rank, 2)
        add_errors([gpu, cpu], A_dev, nbytes)
        show_run(f'device="{args.device}"', gpu)
        show_run('device="cpu"', cpu)
        agree_a = agreement(gpu, cpu)
        print(
            f"    GPU/CPU speed {gpu['gbps'] / cpu['gbps']:.2f}x; errors differ by {100 * agree_a:.3f}% "
            f"(limit {100 * ERROR_AGREEMENT:g}%): {'OK' if agree_a <= ERROR_AGREEMENT else 'FAIL'}; "
            f"target >= {TARGET_DEVICE_GBPS:g} GB/s: {'MET' if gpu['gbps'] >= TARGET_DEVICE_GBPS else 'MISSED'}"
        )
        results["device_resident"] = {
            "shape": [rows, COLUMNS],
            "gb": nbytes / 1e9,
            "gpu": gpu,
            "cpu": cpu,
            "error_difference": agree_a,
        }

        # -- (b) A read once from host Zarr -----------------------------------------------------------
        zrows = rows_for(args.zarr_gb)
        path = str(work / "a.zarr")
        arr = zarr.create_array(
            path,
            shape=(zrows, COLUMNS),
            chunks=CHUNKS,
            dtype=np.float32,
            compressors=zarr.codecs.ZstdCodec(level=1),
            zarr_format=3,
            overwrite=True,
        )
        da.store(A_host[:zrows], arr, lock=False)
        del A_host
        znbytes, read_s = timed(lambda: plain_read(path))
        read_gbps = znbytes / read_s / 1e9
        print(
            f"(b) A read once from host Zarr: {zrows}x{COLUMNS} float32 ({znbytes / 1e9:.2f} GB, zstd level 1, "
            f"{sum(p.stat().st_size for p in Path(path).rglob('*')) / 1e9:.2f} GB on disk), rank {args.rank}, one pass"
        )
        print(f"    {'plain read':<28} {read_s:8.3f} s  {read_gbps:8.2f} GB/s")
        zgpu = compress_run(path, work / "b-gpu.lplr.zarr", args.device, args.rank, 1)
        zcpu = compress_run(path, work / "b-cpu.lplr.zarr", "cpu", args.rank, 1)
        add_errors([zgpu, zcpu], A_dev[:zrows], znbytes)
        show_run(f'device="{args.device}"', zgpu)
        show_run('device="cpu"', zcpu)
        agree_b = agreement(zgpu, zcpu)
        fraction = zgpu["gbps"] / read_gbps
        print(
            f"    GPU/plain read {fraction:.2f} (target >= {TARGET_READ_FRACTION:g}: "
            f"{'MET' if fraction >= TARGET_READ_FRACTION else 'MISSED'}); GPU/CPU speed "
            f"{zgpu['gbps'] / zcpu['gbps']:.2f}x; errors differ by {100 * agree_b:.3f}%: "
            f"{'OK' if agree_b <= ERROR_AGREEMENT else 'FAIL'}"
        )
        results["host_zarr"] = {
            "shape": [zrows, COLUMNS],
            "gb": znbytes / 1e9,
            "read_seconds": read_s,
            "read_gbps": read_gbps,
            "gpu": zgpu,
            "cpu": zcpu,
            "fraction_of_read": fraction,
            "error_difference": agree_b,
        }
    ok = agree_a <= ERROR_AGREEMENT and agree_b <= ERROR_AGREEMENT
    results["errors_agree"] = ok
    text = json.dumps(results, default=float)
    print(f"RESULT {text}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_bench.json").write_text(text)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

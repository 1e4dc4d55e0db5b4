"""Streaming: a simulation's snapshots appended column by column to a one-pass store (Tropp et al. 2019).

A generated advection–diffusion field on a G × G grid: two Gaussian blobs carried around circles
by a rotating flow while they diffuse (their width grows as sqrt(σ₀² + 2κt)), plus a weak
travelling wave, one snapshot per column (n = G² rows). The first snapshots are compressed with
``lplr compress --passes 1 --appendable``; then 20 blocks of snapshots arrive and each is
appended (``lplr_dask.append(..., axis="columns")``), reading only the new block. After each
append the same matrix is also recompressed from scratch (``compress --passes 1`` of all the
snapshots so far, with the store's recorded oversampling): the report compares their errors
(exact, one read each) and their times.

Run ``python -m pipelines.streaming [--quick] [--out results/streaming] [cluster options]``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import lplr_dask
from lplr_dask.store import sketch_bytes
from pipelines.common import Context, build_parser, fmt, markdown_table, pyplot, run_pipeline, save_figure, write_matrix

__all__ = ["main", "field"]

ROWS_PER_CHUNK = 1024


def field(grid: int, times: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Snapshots of the advection–diffusion field (G² × len(times), float32), one per column.

    Two Gaussian blobs advected around circles of radius 0.25 and 0.15 (angular speeds 1 and
    −1.6) and diffused (κ = 2e-4, width ``sqrt(σ₀² + 2κt)``, amplitude scaled to conserve mass),
    plus a travelling wave of amplitude 0.05 and Gaussian noise of 1e-3.
    """
    x = (np.arange(grid) + 0.5) / grid
    X, Y = np.meshgrid(x, x, indexing="ij")
    X, Y = X.ravel()[:, None], Y.ravel()[:, None]
    t = np.asarray(times, dtype=np.float64)[None, :]
    out = np.zeros((grid * grid, t.shape[1]))
    for radius, speed, s0, mass in ((0.25, 1.0, 0.05, 1.0), (0.15, -1.6, 0.035, 0.6)):
        cx, cy = 0.5 + radius * np.cos(speed * t), 0.5 + radius * np.sin(speed * t)
        s2 = s0**2 + 2 * 2e-4 * t
        out += mass * s0**2 / s2 * np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * s2))
    out += 0.05 * np.sin(2 * np.pi * (3 * X + 2 * Y) - 0.7 * t)
    out += 1e-3 * np.random.default_rng(seed).standard_normal(out.shape)
    return out.astype(np.float32)


def _silent(_: str) -> None:
    pass


def _body(ctx: Context) -> Path:
    quick = ctx.args.quick
    grid, block, first_blocks, appends = (32, 8, 4, 5) if quick else (64, 16, 4, 20)
    rank = 12 if quick else 16
    n = grid * grid
    total = (first_blocks + appends) * block
    A = field(grid, np.linspace(0, 4, total))  # two thirds of a turn of the faster blob
    chunks = (min(ROWS_PER_CHUNK, n), block)
    log = ctx.log if ctx.args.verbose else _silent
    kw: dict[str, Any] = dict(rank=rank, bits=(8, 8), passes=1, seed=0, log=log)

    first = write_matrix(ctx.work / "first.zarr", A[:, : first_blocks * block], chunks=chunks)
    store = str(ctx.work / "stream.lplr.zarr")
    t0 = time.perf_counter()
    f = lplr_dask.compress(first, store, appendable=True, **kw)
    first_seconds = time.perf_counter() - t0
    shutil.rmtree(first)  # the stream never reads it again
    p = f.attrs["sketch"]["range_oversample"]
    ctx.log(
        f"compressed the first {first_blocks * block} snapshots ({n}x{first_blocks * block}) in {first_seconds:.2f} s"
    )

    steps = []
    for i in range(appends):
        lo, hi = (first_blocks + i) * block, (first_blocks + i + 1) * block
        new = write_matrix(ctx.work / f"block{i}.zarr", A[:, lo:hi], chunks=chunks)
        t0 = time.perf_counter()
        f = lplr_dask.append(store, new, axis="columns", log=log)
        t_append = time.perf_counter() - t0
        whole = write_matrix(ctx.work / "whole.zarr", A[:, :hi], chunks=chunks)
        t0 = time.perf_counter()
        ref = lplr_dask.compress(whole, ctx.work / "scratch.lplr.zarr", oversample=p, overwrite=True, **kw)
        t_scratch = time.perf_counter() - t0
        e_append, e_scratch = lplr_dask.evaluate(whole, f), lplr_dask.evaluate(whole, ref)
        steps.append(
            {
                "append": i + 1,
                "snapshots": hi,
                "append_seconds": round(t_append, 3),
                "recompress_seconds": round(t_scratch, 3),
                "error_append": e_append,
                "error_recompress": e_scratch,
                "estimate_append": f.attrs["error_estimate"],
                "sketch_seconds": f.attrs["timings"].get("append: sketch"),
            }
        )
        ctx.log(
            f"append {i + 1}/{appends}: {hi} snapshots, {t_append:.2f} s (recompress {t_scratch:.2f} s), "
            f"error {e_append:.5f} (recompress {e_scratch:.5f})"
        )
        shutil.rmtree(new)
    info = lplr_dask.open_factors(store)
    sketches = sketch_bytes(store)
    figure = _figure(ctx, steps)
    rows = [
        [
            s["append"],
            s["snapshots"],
            fmt(s["append_seconds"], 3),
            fmt(s["recompress_seconds"], 3),
            fmt(s["error_append"], 5),
            fmt(s["error_recompress"], 5),
            fmt(s["estimate_append"], 5),
        ]
        for s in steps
    ]
    table = markdown_table(
        ["append", "snapshots", "append s", "recompress s", "error (append)", "error (recompress)", "estimate"], rows
    )
    same = max(abs(s["error_append"] - s["error_recompress"]) / s["error_recompress"] for s in steps)
    mean_a = float(np.mean([s["append_seconds"] for s in steps]))
    mean_r = float(np.mean([s["recompress_seconds"] for s in steps]))
    notes = (
        f"Field: {grid}×{grid} grid (n = {n} rows), {total} snapshots (columns) of float32, stored in "
        f"chunks of {chunks[0]}×{chunks[1]}; rank {rank}, bits (8, 8), one pass, default quantizer and sketch "
        f"(range oversampling p = {p}, recorded by the first compression and given to every recompression). "
        f"The first {first_blocks * block} snapshots were compressed with --appendable in {first_seconds:.2f} s "
        f"(their input then deleted); each append adds {block} snapshots. Errors are exact relative Frobenius "
        f"errors ‖A − L·R‖/‖A‖ of all snapshots so far (one read each, not timed); 'estimate' is the store's free "
        f"estimate after the append. The appended store and the recompression agree within {same:.1e} of the "
        f"error (float32 block products: the same chunks, so the same products, summed in another order). "
        f"Mean time per append {mean_a:.2f} s against {mean_r:.2f} s to recompress ({mean_r / mean_a:.2f}×); "
        f"an append reads only its {block} snapshots but rewrites the sketches and refactors from them, so its "
        f"time grows with the sketches (n·(k + p + t) + ℓ·d floats), far slower than the data. Final store: "
        f"{info.shape[0]}×{info.shape[1]}, {info.nbytes:,} bytes of factors on disk, and {sketches:,} more of kept "
        f"sketches (`lplr finalize` removes them)."
    )
    return ctx.write_report(
        "Streaming: appending snapshots to a one-pass store",
        [notes, table, f"![timings and errors]({figure.name})"],
        {
            "grid": grid,
            "block": block,
            "rank": rank,
            "first_seconds": first_seconds,
            "steps": steps,
            "bytes_on_disk": info.nbytes,
            "bytes_sketches": sketches,
        },
    )


def _figure(ctx: Context, steps: list[dict[str, Any]]) -> Path:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = [s["snapshots"] for s in steps]
    a.plot(x, [s["append_seconds"] for s in steps], "o-", label="append (reads the new block)")
    a.plot(x, [s["recompress_seconds"] for s in steps], "s--", label="recompress from scratch")
    a.set_xlabel("snapshots compressed")
    a.set_ylabel("seconds")
    a.set_ylim(bottom=0)
    a.legend()
    b.plot(x, [s["error_append"] for s in steps], "o-", label="appended")
    b.plot(x, [s["error_recompress"] for s in steps], "s--", label="recompressed")
    b.set_xlabel("snapshots compressed")
    b.set_ylabel("relative Frobenius error")
    b.legend()
    fig.tight_layout()
    return save_figure(fig, ctx.out / "streaming.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the streaming pipeline; return the exit status."""
    parser = build_parser("streaming", __doc__.split("\n\n")[0])
    return run_pipeline("streaming", parser, _body, argv)


if __name__ == "__main__":
    sys.exit(main())

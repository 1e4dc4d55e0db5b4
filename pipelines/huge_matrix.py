"""A matrix as large as you choose: generate → compress → evaluate → report.

A synthetic low-rank-plus-noise matrix (:func:`lplr_dask.generate`, default 65536 × 32768 float32,
8 GiB) is written to Zarr chunk by chunk, compressed with :func:`lplr_dask.compress` on the Dask
cluster the options choose, and evaluated exactly in one more read (:func:`lplr_dask.evaluate`).
The report gives the timing breakdown per pass (the store's ``timings`` attrs), read throughput,
the bytes on disk, and the free error estimate next to the exact error.

Run ``python -m pipelines.huge_matrix [--shape 65536x32768] [--rank 128] [--quick] [cluster options]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lplr_dask
from lplr_dask.datasets import KINDS, parse_shape
from lplr_dask.sources import open_source
from lplr_dask.store import bytes_on_disk
from pipelines.common import Context, build_parser, markdown_table, pyplot, run_pipeline, save_figure

__all__ = ["main"]

_QUICK = {"shape": "4096x2048", "chunks": "1024x1024", "rank": 16, "true_rank": 8}
_FULL = {"shape": "65536x32768", "chunks": "4096x4096", "rank": 128, "true_rank": 64}


def _body(ctx: Context) -> Path:
    args = ctx.args
    preset = _QUICK if args.quick else _FULL
    chunks = parse_shape(args.chunks or preset["chunks"])
    rank = args.rank or preset["rank"]
    true_rank = args.true_rank or preset["true_rank"]
    timings: dict[str, float] = {}
    if args.input:
        source = args.input
        what = f"the Zarr array {source}"
    else:
        shape = parse_shape(args.shape or preset["shape"])
        source = os.fspath(ctx.work / "A.zarr")
        ctx.log(f"generate {shape[0]}x{shape[1]} float32 ({shape[0] * shape[1] * 4 / 2**30:.2f} GiB) -> {source}")
        t0 = time.perf_counter()
        lplr_dask.generate(
            source,
            shape,
            overwrite=True,
            chunks=chunks,
            rank=true_rank,
            decay=args.decay,
            noise=args.noise,
            kind=args.kind,
            seed=args.seed,
        )
        timings["generate"] = time.perf_counter() - t0
        what = (
            f"synthetic `{args.kind}` matrix (rank {true_rank}, decay {args.decay}, noise "
            f"{args.noise}, seed {args.seed}), generated here"
        )
    A = open_source(source)
    n, d = A.shape
    gib = A.nbytes / 2**30
    out = ctx.work / "A.lplr.zarr"
    ctx.log(f"compress {n}x{d} ({gib:.2f} GiB) at rank {rank}, bits {tuple(args.bits)}, passes {args.passes}")
    factors = lplr_dask.compress(
        source,
        out,
        rank=rank,
        bits=tuple(args.bits),
        passes=args.passes,
        power_iters=args.power_iters,
        oversample=args.oversample,
        quantizer=args.quantizer,
        seed=args.seed,
        overwrite=True,
        log=lambda m: ctx.log(m) if args.verbose else None,
    )
    t0 = time.perf_counter()
    exact = lplr_dask.evaluate(source, factors)
    timings["evaluate (exact error, one read)"] = time.perf_counter() - t0
    attrs = factors.attrs
    oversample = attrs.get("sketch", {}).get("range_oversample", 0)
    passes = {k: float(v) for k, v in attrs["timings"].items()}
    estimate = float(attrs["error_estimate"])
    ctx.log(f"error: estimate {estimate:.5f}, exact {exact:.5f}; compress {passes.get('total', 0):.1f}s")
    input_bytes = bytes_on_disk(source)
    all_times = {
        **({"generate": timings["generate"]} if "generate" in timings else {}),
        **{f"compress: {k}": v for k, v in passes.items() if k != "total"},
        "evaluate (exact error, one read)": timings["evaluate (exact error, one read)"],
    }
    time_rows = [[step, f"{sec:.1f}", _rate(step, sec, gib)] for step, sec in all_times.items()]
    time_rows.append(["compress: total", f"{passes.get('total', float('nan')):.1f}", ""])
    result_rows = [
        [
            "input",
            f"{n} × {d} {A.dtype}, {gib:.2f} GiB in memory, {input_bytes / 2**30:.2f} GiB on disk, chunks {A.chunksize[0]}×{A.chunksize[1]}",
        ],
        [
            "factors",
            f"rank {factors.rank}, bits {factors.bits}, quantizer {args.quantizer}, {oversample} extra sketch columns, {args.passes} pass(es), power iterations {args.power_iters}",
        ],
        [
            "bytes on disk",
            f"{factors.nbytes / 2**20:.1f} MiB ({factors.bits_per_entry:.3f} bits per entry; codes alone {factors.theoretical_bits_per_entry:.3f}; {8 * A.dtype.itemsize / factors.bits_per_entry:.0f}× smaller than {A.dtype})",
        ],
        ["error estimate (free, from the test columns)", f"{estimate:.5f}"],
        ["exact relative Frobenius error (lplr_dask.evaluate)", f"{exact:.5f}"],
        ["estimate / exact", f"{estimate / exact:.3f}" if exact > 0 else "—"],
    ]
    figure = _figure(ctx, all_times)
    notes = f"Input: {what}. Timings from the output store's `timings` attrs (compress) and wall clock (generate, evaluate)."
    return ctx.write_report(
        f"Huge matrix: {n} × {d} ({gib:.2f} GiB)",
        [
            notes,
            markdown_table(["", "value"], result_rows),
            "## Time per step",
            markdown_table(["step", "seconds", "GiB of A per second"], time_rows),
            f"![timings]({figure.name})",
        ],
        {
            "shape": [n, d],
            "gib": gib,
            "rank": factors.rank,
            "oversample": oversample,
            "bits": list(factors.bits),
            "timings": all_times,
            "compress_total": passes.get("total"),
            "error_estimate": estimate,
            "error_exact": exact,
            "bytes_on_disk": factors.nbytes,
            "bits_per_entry": factors.bits_per_entry,
        },
    )


def _rate(step: str, seconds: float, gib: float) -> str:
    """GiB/s for the steps that stream the whole of A once (written, or read)."""
    streams = step.startswith(("generate", "evaluate", "compress: pass 1", "compress: pass 2"))
    return f"{gib / seconds:.2f} GiB/s" if streams and seconds > 0 else ""


def _figure(ctx: Context, times: dict[str, float]) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(times) + 1.0))
    steps = list(times)[::-1]
    ax.barh(steps, [times[s] for s in steps], color="tab:blue")
    ax.set_xlabel("seconds")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("time per step", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, ctx.out / "timings.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the huge-matrix pipeline; return the exit status."""
    p = build_parser("huge_matrix", __doc__.split("\n\n")[0])
    p.add_argument("--input", default=None, help="compress this Zarr array instead of generating one")
    p.add_argument(
        "--shape",
        default=None,
        help=f"NxD to generate (default {_FULL['shape']}, 8 GiB float32; {_QUICK['shape']} with --quick)",
    )
    p.add_argument(
        "--chunks", default=None, help=f"chunk shape RxC (default {_FULL['chunks']}; {_QUICK['chunks']} with --quick)"
    )
    p.add_argument("--kind", default="lowrank", choices=KINDS, help="spectrum and noise of the generated matrix")
    p.add_argument(
        "--true-rank",
        type=int,
        default=None,
        help=f"rank of the generated low-rank part (default {_FULL['true_rank']}; {_QUICK['true_rank']} with --quick)",
    )
    p.add_argument("--decay", type=float, default=0.95, help="spectral decay of the generated matrix (default 0.95)")
    p.add_argument("--noise", type=float, default=0.01, help="relative noise of the generated matrix (default 0.01)")
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help=f"rank of the factors (default {_FULL['rank']}; {_QUICK['rank']} with --quick)",
    )
    p.add_argument(
        "--bits", type=int, nargs=2, default=[8, 8], metavar=("B1", "B2"), help="bits of L and R (default 8 8)"
    )
    p.add_argument("--passes", type=int, choices=(1, 2), default=2)
    p.add_argument("--power-iters", type=int, default=0)
    p.add_argument(
        "--oversample",
        type=int,
        default=None,
        metavar="P",
        help="extra range-sketch columns (default: P = rank; 0: the paper's sketch of exactly k columns)",
    )
    p.add_argument(
        "--quantizer",
        default="default",
        help="paper | default | tensor|channel|groupN[-sym][-stochastic|-gptq], or L_NAME:R_NAME "
        "(-gptq: R only, e.g. channel:channel-gptq)",
    )
    p.add_argument("--seed", type=int, default=0)
    return run_pipeline("huge_matrix", p, _body, argv)


if __name__ == "__main__":
    sys.exit(main())

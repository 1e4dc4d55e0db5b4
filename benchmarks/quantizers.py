"""Quantizers at equal bytes on disk: granularity × symmetry × rounding, and mixed L/R.

For each matrix (1000 × 1000, float32, 200 × 200 chunks), each quantizer (:func:`quantizer_names`:
the paper's, the best of the nearest-rounding ones measured before, and gptq rounding of R) and
each bit pair (B1, B2), ``lplr_dask.compress`` runs on a LocalCluster at a ladder of ranks
(nominal ``k·(n·B1 + d·B2)/(n·d)`` of 0.45, 0.9, 1.8 and 3.6 bits per entry). Each run records
the bytes on disk of the whole store (codes, scales, offsets, metadata) and the exact relative
error. Stochastic rounding, which only adds noise to nearest rounding's error, runs at the
fixed configurations of :data:`SAME_CONFIGS` only (when named with ``--quantizers``).

The comparison at equal bytes: for a budget of X bits per entry on disk, the error of a
(quantizer, bit pair) is interpolated, log-linearly in bytes, between the two ladder runs that
bracket X·n·d/8 bytes (none if they do not); a quantizer's error at X is the best over bit pairs.

Matrices
--------
- ``phantom``: the Shepp–Logan phantom (scikit-image) resized to 1000²;
- ``lowrank``: ``lplr_dask.datasets.synthetic`` rank 64, geometric decay 0.9, 1% Gaussian noise;
- ``poly``: polynomial spectrum ``s_i = 1/(i+1)`` over all 1000 singular values, 1% noise;
- ``student-t``: rank 64, decay 0.9, 10% Student-t (3 degrees of freedom) noise: heavy tails.

Run ``python benchmarks/quantizers.py`` (about 15 minutes on 2 cores); ``--datasets``,
``--quantizers``, ``--pairs`` and ``--ladder`` restrict it. Every compression uses the paper's
sketch of exactly k columns unless ``--oversample P`` (or ``k``: the library's default, as many
extra columns as the rank) or ``--power-iters Q`` gives it a better basis; the paper's method (its
quantizer on its sketch) stays the reference: run it with ``--json`` and merge the files with
``--from-json A.json,B.json``, which adds tables of the better bases at equal bytes, against the
paper's method and against the paper's quantizer on the same basis; ``--json FILE`` saves every run. The tables print as Markdown, followed by the
quantizer with the lowest geometric mean at equal bytes, without power iterations and over
every cell with and without them.

``--codecs`` measures the storage of the codes instead: for the paper's and per-channel quantizers
at B = 1, 2, 3, 4, 8 (rank for 1.8 nominal bits per entry), every chunk of L's and R's codes is
encoded with bit-shuffled Blosc and with Zstd at several levels; the table gives bytes ÷ the
budget ``entries × B / 8``, the codec the store chose and what it took on disk, and Zstd's
encoding speed per level.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import dask.array as da
import numpy as np

SHAPE = (1000, 1000)
CHUNKS = (200, 200)
LADDER = (0.45, 0.9, 1.8, 3.6)
BUDGETS = (0.5, 1.0, 2.0)
PAIRS = ((8, 8), (6, 6), (4, 4))
#: Fixed configurations compared across every quantizer: (bit pair, nominal bits per entry).
SAME_CONFIGS = (((4, 4), 1.8), ((8, 8), 1.8))


def quantizer_names() -> list[str]:
    """The paper's; the nearest-rounding quantizers that came closest to it in the full sweep of
    granularity × symmetry × rounding (benchmarks/RESULTS.md); gptq rounding of R with each range."""
    return [
        "tensor",
        "channel",
        "channel-sym",
        "tensor:channel",
        "group256",
        "channel:channel-gptq",
        "channel:tensor-gptq",
        "tensor:tensor-gptq",
        "tensor:channel-gptq",
    ]


def matrices(names: list[str]) -> dict[str, np.ndarray]:
    from lplr_dask.datasets import synthetic

    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "phantom":
            from skimage.data import shepp_logan_phantom
            from skimage.transform import resize

            out[name] = resize(shepp_logan_phantom(), SHAPE, anti_aliasing=True).astype(np.float32)
            continue
        kw = {
            "lowrank": dict(kind="lowrank", rank=64, decay=0.9, noise=0.01),
            "poly": dict(kind="poly", rank=min(SHAPE), decay=1.0, noise=0.01),
            "student-t": dict(kind="student-t", rank=64, decay=0.9, noise=0.1),
        }[name]
        out[name] = synthetic(SHAPE, chunks=SHAPE, seed=1, **kw).compute()
    return out


def run_one(
    A: np.ndarray,
    quantizer: str,
    bits: tuple[int, int],
    rank: int,
    path: str,
    power_iters: int = 0,
    oversample: int | None = 0,
) -> dict[str, Any]:
    import lplr_dask
    from lplr_dask import store

    t0 = time.perf_counter()
    f = lplr_dask.compress(
        da.from_array(A, chunks=CHUNKS),
        path,
        rank=rank,
        bits=bits,
        quantizer=quantizer,
        overwrite=True,
        power_iters=power_iters,
        oversample=oversample,
        log=lambda m: None,
    )
    seconds = time.perf_counter() - t0
    recon = f.to_dask(np.float64).compute()
    a64 = A.astype(np.float64)
    n, d = A.shape
    total = store.bytes_on_disk(path)
    return {
        "quantizer": quantizer,
        "power_iters": power_iters,
        "bits": list(bits),
        "rank": rank,
        "bytes": total,
        "oversample": "k" if oversample is None else oversample,
        "bytes_codes": store.codes_bytes(path),
        "bits_per_entry": total * 8 / (n * d),
        "nominal_bits_per_entry": rank * (n * bits[0] + d * bits[1]) / (n * d),
        "error": float(np.linalg.norm(a64 - recon) / np.linalg.norm(a64)),
        "seconds": round(seconds, 2),
    }


def at_budget(runs: list[dict[str, Any]], budget: float) -> float | None:
    """Error at ``budget`` bits per entry on disk, interpolated log-linearly between ladder runs."""
    pts = sorted((r["bits_per_entry"], r["error"]) for r in runs)
    for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
        if b0 <= budget <= b1:
            if b1 == b0:
                return min(e0, e1)
            w = (math.log(budget) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp((1 - w) * math.log(e0) + w * math.log(e1))
    return None


def best_at_budget(runs: list[dict[str, Any]], budget: float) -> tuple[float, tuple[int, int]] | None:
    """The lowest interpolated error over bit pairs, and its pair."""
    found = []
    for bits, group in itertools.groupby(sorted(runs, key=lambda r: r["bits"]), key=lambda r: tuple(r["bits"])):
        e = at_budget(list(group), budget)
        if e is not None:
            found.append((e, bits))
    return min(found) if found else None


def label(run: dict[str, Any]) -> str:
    """A run's row in the tables: the quantizer (``paper`` for ``tensor``), any range oversampling
    (``p=k``: the default, as many extra sketch columns as the rank) and any power iterations."""
    name = "paper" if run["quantizer"] == "tensor" else run["quantizer"]
    p, q = run.get("oversample", 0), run.get("power_iters", 0)
    return name + (f", p={p}" if p else "") + (f", q={q}" if q else "")


def _basis(row: str) -> str:
    """The basis part of a row's label (``, p=k, q=1``), empty for the paper's sketch."""
    name, _, rest = row.partition(", ")
    return f", {rest}" if rest else ""


def _best(runs: list[dict[str, Any]], dataset: str, row: str, budget: float) -> tuple[float, tuple[int, int]] | None:
    return best_at_budget([r for r in runs if r["dataset"] == dataset and label(r) == row], budget)


def _ratios(runs: list[dict[str, Any]], datasets: list[str], row: str, ref: str) -> list[float]:
    """``row``'s error ÷ ``ref``'s at equal bytes, every (matrix, budget) cell where both have one."""
    out = []
    for ds, budget in itertools.product(datasets, BUDGETS):
        a, b = _best(runs, ds, ref, budget), _best(runs, ds, row, budget)
        if a and b:
            out.append(b[0] / a[0])
    return out


def _geo(ratios: list[float]) -> float:
    return math.exp(float(np.mean(np.log(ratios))))


def _budget_table(
    runs: list[dict[str, Any]], datasets: list[str], rows: list[str], budget: float, ref: str
) -> list[str]:
    lines = ["| quantizer | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for row in rows:
        cells = []
        for ds in datasets:
            b, a = _best(runs, ds, row, budget), _best(runs, ds, ref, budget)
            ratio = f" ×{b[0] / a[0]:.2f}" if a and b else ""
            cells.append(f"{b[0]:.4f} ({b[1][0]},{b[1][1]}){ratio}" if b else "–")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def tables(runs: list[dict[str, Any]]) -> str:
    """The Markdown tables: equal bytes on disk, one fixed configuration, and (for runs with power
    iterations) the better basis at equal bytes; then the lowest geometric mean."""
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    rows = list(dict.fromkeys(label(r) for r in runs))
    plain = [q for q in rows if not _basis(q)]
    compared = [q for q in plain if "stochastic" not in q]
    lines = []
    for budget in BUDGETS:
        lines += [
            f"\n**{budget:g} bit{'s' * (budget != 1)} per entry on disk** (relative error, best bit pair; × paper's error)\n"
        ]
        lines += _budget_table(runs, datasets, compared, budget, "paper")
    lines += [
        "\n**Summary at equal bytes**: geometric mean of × paper over every (matrix, budget) cell, "
        "the best and the worst cell\n",
        "| quantizer | geometric mean | best | worst | cells |",
        "|---|---|---|---|---|",
    ]
    means = {}
    for q in compared:
        ratios = _ratios(runs, datasets, q, "paper")
        if ratios:
            means[q] = _geo(ratios)
            lines.append(f"| {q} | ×{means[q]:.3f} | ×{min(ratios):.2f} | ×{max(ratios):.2f} | {len(ratios)} |")
    for pair, nominal in SAME_CONFIGS:
        lines += [
            f"\n**Same configuration**: bits {pair}, rank for {nominal:g} nominal bits per entry "
            "(relative error / bits per entry on disk)\n",
            "| quantizer | " + " | ".join(datasets) + " |",
            "|---|" + "---|" * len(datasets),
        ]
        for q in plain:
            cells = []
            for ds in datasets:
                r = [
                    r
                    for r in runs
                    if r["dataset"] == ds
                    and label(r) == q
                    and tuple(r["bits"]) == pair
                    and math.isclose(r["nominal_bits_per_entry"], nominal, rel_tol=0.05)
                ]
                cells.append(f"{r[0]['error']:.4f} / {r[0]['bits_per_entry']:.2f}" if r else "–")
            lines.append(f"| {q} | " + " | ".join(cells) + " |")
    powered = [q for q in rows if _basis(q)]
    if powered:
        lines += _basis_tables(runs, datasets, powered)
    if means:
        best = min(means, key=means.__getitem__)
        lines.append(
            f"\nLowest geometric mean at equal bytes (no power iterations): {best} (×{means[best]:.3f} of paper)."
        )
    # with power iterations too: every cell of the quantizers run with and without them, × paper at q=0
    both = {
        q: _ratios(runs, datasets, q, "paper")
        + [x for row in powered if row.split(", ")[0] == q for x in _ratios(runs, datasets, row, "paper")]
        for q in compared
        if any(row.split(", ")[0] == q for row in powered)
    }
    if both:
        best = min(both, key=lambda q: _geo(both[q]))
        lines.append(
            f"Lowest geometric mean over every cell with and without a better basis: {best} "
            f"(×{_geo(both[best]):.3f} of paper without it; "
            + ", ".join(f"{q} ×{_geo(r):.3f}" for q, r in both.items() if q != best)
            + ")."
        )
    return "\n".join(lines)


def _basis_tables(runs: list[dict[str, Any]], datasets: list[str], powered: list[str]) -> list[str]:
    """Runs with a better basis (range oversampling, power iterations) against the paper's method
    (its sketch of exactly k columns, no power iterations) and the paper's quantizer on the same basis."""
    lines = []
    for budget in BUDGETS:
        lines += [
            f"\n**A better basis, {budget:g} bit{'s' * (budget != 1)} per entry on disk** "
            "(relative error, best bit pair; × the paper's method: its sketch and quantizer)\n"
        ]
        lines += _budget_table(runs, datasets, ["paper"] + powered, budget, "paper")
    lines += [
        "\n**Summary, a better basis at equal bytes**: geometric mean (best, worst cell) of × the "
        "paper's method, and of × the paper's quantizer on the same basis; the largest relative "
        "error of any run (every bit pair and rank of the ladder)\n",
        "| quantizer | × paper's method | × paper, same basis | largest error of a run |",
        "|---|---|---|---|",
    ]
    for row in powered:
        same = "paper" + _basis(row)
        r0, rq = _ratios(runs, datasets, row, "paper"), _ratios(runs, datasets, row, same)
        cells = [f"×{_geo(r):.3f} (×{min(r):.2f}, ×{max(r):.2f}; {len(r)} cells)" if r else "–" for r in (r0, rq)]
        worst = max(runs, key=lambda r: r["error"] if label(r) == row else -1.0)
        lines.append(
            f"| {row} | {cells[0]} | {cells[1] if row != same else '–'} | {worst['error']:.4g} "
            f"({worst['dataset']}, {tuple(worst['bits'])}, rank {worst['rank']}) |"
        )
    return lines


CODEC_BITS = (1, 2, 3, 4, 8)
ZSTD_LEVELS = (1, 3, 9, 15, 19)


def measure_codecs(path: str, bits: int) -> list[dict[str, Any]]:
    """Each codes array of the store at ``path``: bytes per candidate codec ÷ B/8, encode seconds."""
    import numcodecs
    import zarr

    from lplr_dask import store

    group = zarr.open_group(path, mode="r")
    out = []
    for name in ("L", "R"):
        arr = group[f"{name}/codes"]
        rows, cols = arr.chunks
        chunks = [
            np.ascontiguousarray(arr[i : i + rows, j : j + cols])
            for i in range(0, arr.shape[0], rows)
            for j in range(0, arr.shape[1], cols)
        ]
        budget = arr.size * bits / 8
        codecs = {"bitshuffle": numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)}
        codecs.update({f"zstd{lv}": numcodecs.Zstd(level=lv) for lv in ZSTD_LEVELS})
        row: dict[str, Any] = {
            "factor": name,
            "chosen": type(arr.metadata.codecs[-1]).__name__.replace("Codec", ""),
            "on_disk": store.bytes_on_disk(path, f"{name}/codes/c") / budget,
        }
        for cname, codec in codecs.items():
            t0 = time.perf_counter()
            size = sum(len(codec.encode(c)) for c in chunks)
            row[cname] = size / budget
            row[f"{cname}_mb_s"] = arr.size / 1e6 / max(time.perf_counter() - t0, 1e-9)
        out.append(row)
    return out


def codec_table(rows: list[dict[str, Any]]) -> str:
    """Means over matrices and factors, per quantizer and B."""
    head = ["quantizer", "B", "bit-shuffle", "zstd 3", "chosen", "on disk"] + [
        f"zstd {lv}" for lv in ZSTD_LEVELS if lv != 3
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    keys = list(dict.fromkeys((r["quantizer"], r["bits"]) for r in rows))
    for q, b in keys:
        sel = [r for r in rows if (r["quantizer"], r["bits"]) == (q, b)]
        mean = {k: float(np.mean([r[k] for r in sel])) for k in sel[0] if isinstance(sel[0][k], float)}
        chosen = "/".join(sorted({r["chosen"] for r in sel}))
        cells = [
            q if q != "tensor" else "paper",
            str(b),
            f"{mean['bitshuffle']:.3f}",
            f"{mean['zstd3']:.3f}",
            chosen,
            f"{mean['on_disk']:.3f}",
        ] + [f"{mean[f'zstd{lv}']:.3f}" for lv in ZSTD_LEVELS if lv != 3]
        lines.append("| " + " | ".join(cells) + " |")
    speed = {lv: float(np.median([r[f"zstd{lv}_mb_s"] for r in rows])) for lv in ZSTD_LEVELS}
    speed_bs = float(np.median([r["bitshuffle_mb_s"] for r in rows]))
    lines.append(
        "\nEncoding speed, median over arrays (MB of codes per second, one thread): bit-shuffle "
        f"{speed_bs:.0f}; " + ", ".join(f"zstd {lv} {v:.0f}" for lv, v in speed.items()) + "."
    )
    return "\n".join(lines)


def run_codecs(datasets: list[str]) -> str:
    from distributed import Client, LocalCluster

    rows = []
    work = tempfile.mkdtemp(prefix="lplr-codecs-")
    n, d = SHAPE
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster):
            for ds, A in matrices(datasets).items():
                for q, b in itertools.product(("tensor", "channel"), CODEC_BITS):
                    path = os.path.join(work, "out.lplr.zarr")
                    rank = max(2, round(1.8 * n * d / (n * b + d * b)))
                    run_one(A, q, (b, b), rank, path)
                    for r in measure_codecs(path, b):
                        rows.append({"dataset": ds, "quantizer": q, "bits": b, **r})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return codec_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="phantom,lowrank,poly,student-t")
    parser.add_argument("--quantizers", default=",".join(quantizer_names()), help="comma-separated names")
    parser.add_argument("--pairs", default=",".join(f"{a}x{b}" for a, b in PAIRS), help="B1xB2,...")
    parser.add_argument("--power-iters", type=int, default=0, help="power iterations of every compression")
    parser.add_argument(
        "--oversample",
        default="0",
        help="extra range-sketch columns of every compression: an integer, or k for the "
        "library's default (as many as the rank); default 0, the paper's sketch",
    )
    parser.add_argument(
        "--ladder",
        default=",".join(f"{x:g}" for x in LADDER),
        help="nominal bits per entry of the ranks run, comma-separated",
    )
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("--from-json", help="only print the tables of saved runs (comma-separated files, merged)")
    parser.add_argument("--codecs", action="store_true", help="measure the codecs of the codes instead")
    args = parser.parse_args(argv)
    if args.codecs:
        print(run_codecs(args.datasets.split(",")))
        return 0
    if args.from_json:
        runs: list[dict[str, Any]] = []
        for name in args.from_json.split(","):
            with open(name) as fh:
                runs += json.load(fh)["runs"]
        print(tables(runs))
        return 0
    from distributed import Client, LocalCluster

    pairs = [tuple(int(b) for b in p.split("x")) for p in args.pairs.split(",")]
    ladder = [float(x) for x in args.ladder.split(",")]
    quantizers = args.quantizers.split(",")
    if "tensor" not in quantizers:
        quantizers.insert(0, "tensor")  # the paper's quantizer: the reference of every ratio
    runs = []
    work = tempfile.mkdtemp(prefix="lplr-quantizers-")
    n, d = SHAPE
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster):
            for ds, A in matrices(args.datasets.split(",")).items():
                configs = [
                    (q, bits, nominal)
                    for q, bits, nominal in itertools.product(quantizers, pairs, ladder)
                    if "stochastic" not in q
                ]
                configs += [
                    (q, bits, nominal) for q in quantizers for bits, nominal in SAME_CONFIGS if "stochastic" in q
                ]
                for q, bits, nominal in configs:
                    rank = min(n, d, max(2, round(nominal * n * d / (n * bits[0] + d * bits[1]))))
                    oversample = None if args.oversample == "k" else int(args.oversample)
                    r = run_one(A, q, bits, rank, os.path.join(work, "out.lplr.zarr"), args.power_iters, oversample)
                    r["dataset"] = ds
                    runs.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": SHAPE, "chunks": CHUNKS, "runs": runs}, fh)
    print(tables(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantizers at equal bytes on disk: every granularity × symmetry × rounding, and mixed L/R.

For each matrix (1000 × 1000, float32, 200 × 200 chunks), each quantizer with nearest rounding
and each bit pair (B1, B2), ``lplr_dask.compress`` runs on a LocalCluster at a ladder of ranks
(nominal ``k·(n·B1 + d·B2)/(n·d)`` of 0.45, 0.9, 1.8 and 3.6 bits per entry). Each run records
the bytes on disk of the whole store (codes, scales, offsets, metadata) and the exact relative
error. Stochastic rounding, which only adds noise to nearest rounding's error, runs at the
fixed configurations of :data:`SAME_CONFIGS` only.

The comparison at equal bytes: for a budget of X bits per entry on disk, the error of a
(quantizer, bit pair) is interpolated, log-linearly in bytes, between the two ladder runs that
bracket X·n·d/8 bytes (none if they do not); a quantizer's error at X is the best over bit pairs.

Matrices
--------
- ``phantom``: the Shepp–Logan phantom (scikit-image) resized to 1000²;
- ``lowrank``: ``lplr_dask.datasets.synthetic`` rank 64, geometric decay 0.9, 1% Gaussian noise;
- ``poly``: polynomial spectrum ``s_i = 1/(i+1)`` over all 1000 singular values, 1% noise;
- ``student-t``: rank 64, decay 0.9, 10% Student-t (3 degrees of freedom) noise: heavy tails.

Run ``python benchmarks/quantizers.py`` (about an hour on 2 idle cores); ``--datasets``,
``--quantizers`` and ``--pairs`` restrict it; ``--json FILE`` saves every run. The tables print
as Markdown.

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
    """Every granularity × symmetric × rounding, then the two mixed L:R pairs."""
    names = []
    for gran, sym, stoch in itertools.product(("tensor", "channel", "group256"), (False, True), (False, True)):
        names.append("-".join([gran] + ["sym"] * sym + ["stochastic"] * stoch))
    return names + ["channel:tensor", "tensor:channel"]


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


def run_one(A: np.ndarray, quantizer: str, bits: tuple[int, int], rank: int, path: str) -> dict[str, Any]:
    import lplr_dask
    from lplr_dask import store

    t0 = time.perf_counter()
    f = lplr_dask.compress(
        da.from_array(A, chunks=CHUNKS), path, rank=rank, bits=bits, quantizer=quantizer, overwrite=True,
        log=lambda m: None,
    )
    seconds = time.perf_counter() - t0
    recon = f.to_dask(np.float64).compute()
    a64 = A.astype(np.float64)
    n, d = A.shape
    total = store.bytes_on_disk(path)
    return {
        "quantizer": quantizer, "bits": list(bits), "rank": rank, "bytes": total,
        "bytes_codes": store.codes_bytes(path), "bits_per_entry": total * 8 / (n * d),
        "nominal_bits_per_entry": rank * (n * bits[0] + d * bits[1]) / (n * d),
        "error": float(np.linalg.norm(a64 - recon) / np.linalg.norm(a64)), "seconds": round(seconds, 2),
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


def tables(runs: list[dict[str, Any]]) -> str:
    """The Markdown tables: equal bytes on disk, then one fixed configuration."""
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    names = list(dict.fromkeys(r["quantizer"] for r in runs))
    lines = []
    for budget in BUDGETS:
        lines += [f"\n**{budget:g} bit{'s' * (budget != 1)} per entry on disk** (relative error, best bit pair; × paper's error)\n",
                  "| quantizer | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
        ref = {ds: best_at_budget([r for r in runs if r["dataset"] == ds and r["quantizer"] == "tensor"], budget)
               for ds in datasets}
        for q in (q for q in names if "stochastic" not in q):
            cells = []
            for ds in datasets:
                b = best_at_budget([r for r in runs if r["dataset"] == ds and r["quantizer"] == q], budget)
                if b is None:
                    cells.append("–")
                    continue
                ratio = f" ×{b[0] / ref[ds][0]:.2f}" if ref[ds] else ""
                cells.append(f"{b[0]:.4f} ({b[1][0]},{b[1][1]}){ratio}")
            lines.append(f"| {'paper' if q == 'tensor' else q} | " + " | ".join(cells) + " |")
    lines += ["\n**Summary at equal bytes**: geometric mean of × paper over every (matrix, budget) cell, "
              "the best and the worst cell\n", "| quantizer | geometric mean | best | worst | cells |", "|---|---|---|---|---|"]
    for q in (q for q in names if "stochastic" not in q):
        ratios = []
        for ds, budget in itertools.product(datasets, BUDGETS):
            ref = best_at_budget([r for r in runs if r["dataset"] == ds and r["quantizer"] == "tensor"], budget)
            b = best_at_budget([r for r in runs if r["dataset"] == ds and r["quantizer"] == q], budget)
            if ref and b:
                ratios.append(b[0] / ref[0])
        if ratios:
            geo = math.exp(float(np.mean(np.log(ratios))))
            lines.append(f"| {'paper' if q == 'tensor' else q} | ×{geo:.3f} | ×{min(ratios):.2f} | ×{max(ratios):.2f} | {len(ratios)} |")
    for pair, nominal in SAME_CONFIGS:
        lines += [f"\n**Same configuration**: bits {pair}, rank for {nominal:g} nominal bits per entry "
                  "(relative error / bits per entry on disk)\n",
                  "| quantizer | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
        for q in names:
            cells = []
            for ds in datasets:
                r = [r for r in runs if r["dataset"] == ds and r["quantizer"] == q and tuple(r["bits"]) == pair
                     and math.isclose(r["nominal_bits_per_entry"], nominal, rel_tol=0.05)]
                cells.append(f"{r[0]['error']:.4f} / {r[0]['bits_per_entry']:.2f}" if r else "–")
            lines.append(f"| {'paper' if q == 'tensor' else q} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        chunks = [np.ascontiguousarray(arr[i : i + rows, j : j + cols])
                  for i in range(0, arr.shape[0], rows) for j in range(0, arr.shape[1], cols)]
        budget = arr.size * bits / 8
        codecs = {"bitshuffle": numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)}
        codecs.update({f"zstd{lv}": numcodecs.Zstd(level=lv) for lv in ZSTD_LEVELS})
        row: dict[str, Any] = {"factor": name, "chosen": type(arr.metadata.codecs[-1]).__name__.replace("Codec", ""),
                               "on_disk": store.bytes_on_disk(path, f"{name}/codes/c") / budget}
        for cname, codec in codecs.items():
            t0 = time.perf_counter()
            size = sum(len(codec.encode(c)) for c in chunks)
            row[cname] = size / budget
            row[f"{cname}_mb_s"] = arr.size / 1e6 / max(time.perf_counter() - t0, 1e-9)
        out.append(row)
    return out


def codec_table(rows: list[dict[str, Any]]) -> str:
    """Means over matrices and factors, per quantizer and B."""
    head = ["quantizer", "B", "bit-shuffle", "zstd 3", "chosen", "on disk"] + [f"zstd {lv}" for lv in ZSTD_LEVELS if lv != 3]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    keys = list(dict.fromkeys((r["quantizer"], r["bits"]) for r in rows))
    for q, b in keys:
        sel = [r for r in rows if (r["quantizer"], r["bits"]) == (q, b)]
        mean = {k: float(np.mean([r[k] for r in sel])) for k in sel[0] if isinstance(sel[0][k], float)}
        chosen = "/".join(sorted({r["chosen"] for r in sel}))
        cells = [q if q != "tensor" else "paper", str(b), f"{mean['bitshuffle']:.3f}", f"{mean['zstd3']:.3f}", chosen,
                 f"{mean['on_disk']:.3f}"] + [f"{mean[f'zstd{lv}']:.3f}" for lv in ZSTD_LEVELS if lv != 3]
        lines.append("| " + " | ".join(cells) + " |")
    speed = {lv: float(np.median([r[f"zstd{lv}_mb_s"] for r in rows])) for lv in ZSTD_LEVELS}
    speed_bs = float(np.median([r["bitshuffle_mb_s"] for r in rows]))
    lines.append("\nEncoding speed, median over arrays (MB of codes per second, one thread): bit-shuffle "
                 f"{speed_bs:.0f}; " + ", ".join(f"zstd {lv} {v:.0f}" for lv, v in speed.items()) + ".")
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
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("--from-json", help="only print the tables of a saved run")
    parser.add_argument("--codecs", action="store_true", help="measure the codecs of the codes instead")
    args = parser.parse_args(argv)
    if args.codecs:
        print(run_codecs(args.datasets.split(",")))
        return 0
    if args.from_json:
        with open(args.from_json) as fh:
            print(tables(json.load(fh)["runs"]))
        return 0
    from distributed import Client, LocalCluster

    pairs = [tuple(int(b) for b in p.split("x")) for p in args.pairs.split(",")]
    quantizers = args.quantizers.split(",")
    if "tensor" not in quantizers:
        quantizers.insert(0, "tensor")  # the paper's quantizer: the reference of every ratio
    runs: list[dict[str, Any]] = []
    work = tempfile.mkdtemp(prefix="lplr-quantizers-")
    n, d = SHAPE
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster):
            for ds, A in matrices(args.datasets.split(",")).items():
                configs = [(q, bits, nominal) for q, bits, nominal in itertools.product(quantizers, pairs, LADDER)
                           if "stochastic" not in q]
                configs += [(q, bits, nominal) for q in quantizers for bits, nominal in SAME_CONFIGS if "stochastic" in q]
                for q, bits, nominal in configs:
                    rank = max(2, round(nominal * n * d / (n * bits[0] + d * bits[1])))
                    r = run_one(A, q, bits, rank, os.path.join(work, "out.lplr.zarr"))
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

"""Beyond low rank (issue 20), measured before building it out of core: at equal bits per entry,
a quantized backbone plus low-rank factors (``A ≈ Q + L·R``, :func:`lplr_dask.baselines.backbone_reference`,
in memory) against per-channel NQ, LPLR with the library's defaults (``lplr_dask.compress(...,
bits_per_entry=X)``) and ZFP in fixed-rate mode (``zfpy``, the lossy codec Zarr users have).

Budgets X = 1, 2, 3, 4 bits per entry, counted as codes plus float32 scales and offsets (the
theoretical size; Zstd on the codes changes every method alike and is left out):

- NQ: B = X bits per entry, one min–max range per column (``channel``): X + 64/n; and NQ
  (clipped): each column's range shrunk to its least squared error
  (:func:`lplr_dask.baselines.clipped_quantize`);
- LPLR (default): ``compress(A, bits_per_entry=X)``, its own search over rank and bits;
  :attr:`Factors.theoretical_bits_per_entry`;
- backbone: B0 ∈ {1, …, X−1} bits of Q (per-column min–max or clipped ranges, 64/n bits) plus
  factors at (8, 8) or (4, 4) bits and the largest rank the rest of X allows, both starts
  (backbone first, factors first), 2 rounds; the best of that grid by measured error (an
  oracle choice: a search on the free estimate, issue 20 item 2, can at best match it);
- backbone (compress): the out-of-core store, ``compress(A, bits_per_entry=X, backbone_bits="auto")``:
  its own search over B0 ∈ {0, …, 4}, rank and bits, held to bytes on disk (like LPLR (default));
- backbone (compress, study's B0 k B): the out-of-core store at the study's choice of (B0, k, bits,
  start), two rounds (``--backbone-start``, ``--backbone-iters 2``); at X = 2 and 3 also
  recompressed with T = 1, 2, 3 rounds;
- ZFP: ``zfpy.compress_numpy(A32, rate=X)``; its bits are the compressed stream's.

Matrices: a low-rank-plus-sparse-outliers matrix, the Student-t and polynomial-decay matrices of
the synthetic generator, the Shepp–Logan phantom, and the 2-D weights of two layers of
all-MiniLM-L6-v2 (``--all-layers``: all six) whose mean is reported.

zfpy: ``pip install --target DIR zfpy`` and pass ``--zfpy DIR``. Do not install zfpy 1.0.1.post0
into the environment itself: numcodecs 0.16 parses its version as integers and fails to import
(so does zarr); it is put on ``sys.path`` here after zarr is imported.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_backbone.py --zfpy DIR``
(``--quick``: the synthetic matrices at 512×384 and one layer). Writes ``--out`` (default
``benchmarks/backbone``): ``results.json``, ``backbone.png`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pipelines.common, for MiniLM
import lplr_dask  # noqa: E402
from lplr_dask.baselines import backbone_reference, clipped_quantize, naive_quantize, relative_error  # noqa: E402
from pipelines.common import load_minilm, markdown_table, pyplot  # noqa: E402

BUDGETS = (1, 2, 3, 4)
FACTOR_BITS = ((8, 8), (4, 4))
METHODS = (
    "NQ",
    "NQ (clipped)",
    "LPLR (default)",
    "backbone",
    "backbone (compress, study's B0 k B)",
    "backbone (compress)",
    "ZFP",
)
#: Rounds T measured for the default of ``--backbone-iters``, at the budget search's choice.
ROUNDS = (1, 2, 3)


def matrices(quick: bool, all_layers: bool) -> dict[str, np.ndarray]:
    """The test matrices, float32, by name."""
    from lplr_dask.datasets import synthetic

    n, d = (512, 384) if quick else (1024, 768)
    rng = np.random.default_rng(0)
    low = synthetic((n, d), rank=16, decay=0.8, noise=0.01, chunks=(n, d), seed=1).compute()
    spikes = np.where(rng.random((n, d)) < 0.005, 30 * np.abs(low).max() * rng.choice([-1, 1], (n, d)), 0.0)
    found = {
        "low-rank + 0.5% outliers": (low + spikes).astype(np.float32),
        "student-t": synthetic((n, d), kind="student-t", rank=32, chunks=(n, d), seed=2).compute(),
        "poly decay": synthetic((n, d), kind="poly", rank=min(n, d), decay=0.5, chunks=(n, d), seed=3).compute(),
    }
    try:
        from skimage.data import shepp_logan_phantom
        from skimage.transform import resize

        found["phantom"] = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True).astype(np.float32)
    except ImportError:
        print("note: scikit-image missing: no phantom", file=sys.stderr)
    try:
        model = load_minilm()
        layers = range(6) if all_layers else ((0,) if quick else (0, 5))
        for name, p in model[0].auto_model.named_parameters():
            if p.ndim == 2 and any(name.startswith(f"encoder.layer.{i}.") for i in layers):
                W = p.detach().cpu().numpy().astype(np.float32)
                found[f"minilm:{name}"] = W if W.shape[0] >= W.shape[1] else W.T.copy()
    except Exception as e:  # noqa: BLE001 - the pipelines extra is optional here
        print(f"note: MiniLM not loaded ({type(e).__name__}: {e}): no transformer weights", file=sys.stderr)
    return found


def nq(A: np.ndarray, x: int) -> tuple[float, float, str]:
    n, d = A.shape
    return relative_error(A, naive_quantize(A, x, quantizer="channel")), x + 64 / n, f"B={x}"


def nq_clipped(A: np.ndarray, x: int) -> tuple[float, float, str]:
    n, d = A.shape
    return relative_error(A, clipped_quantize(A, x)), x + 64 / n, f"B={x} clipped"


def lplr_default(A: np.ndarray, x: int, tmp: Path) -> tuple[float, float, str]:
    path = tmp / f"a-{time.monotonic_ns()}.lplr.zarr"
    try:
        f = lplr_dask.compress(A, path, bits_per_entry=float(x), log=lambda m: None)
    except lplr_dask.LplrError as e:  # no rank fits the budget
        return math.nan, math.nan, f"refused: {e}"[:60]
    recon = f.to_dask(np.float64).compute()
    return relative_error(A, recon), f.theoretical_bits_per_entry, f"k={f.rank} B={f.bits[0]},{f.bits[1]}"


def backbone_compress(A: np.ndarray, x: int, tmp: Path) -> tuple[float, float, str]:
    """The out-of-core backbone as a user gets it: ``compress(A, bits_per_entry=X,
    backbone_bits="auto")`` (its search over B0 ∈ {0..4}, rank and bits, held to bytes on disk)."""
    path = tmp / f"b-{time.monotonic_ns()}.lplr.zarr"
    try:
        f = lplr_dask.compress(A, path, bits_per_entry=float(x), backbone_bits="auto", log=lambda m: None)
    except lplr_dask.LplrError as e:
        return math.nan, math.nan, f"refused: {e}"[:60]
    recon = f.to_dask(np.float64).compute()
    how = f"B0={f.backbone_bits} k={f.rank} B={f.bits[0]},{f.bits[1]} disk {f.bits_per_entry:.2f}"
    return relative_error(A, recon), f.theoretical_bits_per_entry, how


def backbone_at(A: np.ndarray, config: str, tmp: Path) -> tuple[float, float, str]:
    """The out-of-core store at the in-memory study's (B0, k, bits, start) (``config`` of
    :func:`backbone`), two rounds: what ``compress --backbone B0 --rank k --bits B1 B2
    --backbone-iters 2 --backbone-start S`` gives at the study's theoretical bits (the store's
    clipped ranges per column of a row chunk, the study's choice min–max or clipped)."""
    parts = dict(item.split("=") for item in config.split() if "=" in item)
    if "B0" not in parts:
        return math.nan, math.nan, "none fits"
    b1, b2 = (int(b) for b in parts["B"].split(","))
    f = lplr_dask.compress(
        A,
        tmp / f"s-{time.monotonic_ns()}.lplr.zarr",
        rank=int(parts["k"]),
        bits=(b1, b2),
        backbone_bits=int(parts["B0"]),
        backbone_iters=2,
        backbone_start="factors" if "factors first" in config else "backbone",
        log=lambda m: None,
    )
    recon = f.to_dask(np.float64).compute()
    start = "factors" if "factors first" in config else "backbone"
    how = f"B0={f.backbone_bits} k={f.rank} B={b1},{b2} T=2 start={start} disk {f.bits_per_entry:.2f}"
    return relative_error(A, recon), f.theoretical_bits_per_entry + 64 / A.shape[0], how


def rounds(A: np.ndarray, config: str, tmp: Path) -> dict[int, float]:
    """Errors of ``compress`` at the search's (B0, k, bits) of ``config`` for each of :data:`ROUNDS`."""
    parts = dict(item.split("=") for item in config.split() if "=" in item and not item.startswith("disk"))
    if "B0" not in parts or parts["B0"] == "0":
        return {}
    parts.pop("T", None)
    start = parts.pop("start", "backbone")
    b1, b2 = (int(b) for b in parts["B"].split(","))
    out = {}
    for t in ROUNDS:
        f = lplr_dask.compress(
            A,
            tmp / f"r-{time.monotonic_ns()}.lplr.zarr",
            rank=int(parts["k"]),
            bits=(b1, b2),
            backbone_bits=int(parts["B0"]),
            backbone_iters=t,
            backbone_start=start,
            log=lambda m: None,
        )
        out[t] = relative_error(A, f.to_dask(np.float64).compute())
    return out


def backbone(A: np.ndarray, x: int) -> tuple[float, float, str]:
    n, d = A.shape
    best = (math.inf, math.nan, "none fits")
    for b0 in range(1, x):
        for bits in FACTOR_BITS:
            per_rank = (n * bits[0] + d * bits[1] + 128) / (n * d)
            k = int((x - b0) / per_rank)
            k = min(k, min(n, d) - 1)
            if k < 1:
                continue
            for start in ("backbone", "factors"):
                for clip in (False, True):
                    Q, L, R = backbone_reference(A, b0, k, bits, iters=2, start=start, clip=clip)
                    err = relative_error(A, Q + L @ R)
                    if err < best[0]:
                        how = f"B0={b0}{' clipped' if clip else ''} k={k} B={bits[0]},{bits[1]} {start} first"
                        best = (err, b0 + 64 / n + k * per_rank, how)
    return best


def zfp(A: np.ndarray, x: int, zfpy: Any) -> tuple[float, float, str]:
    if zfpy is None:
        return math.nan, math.nan, "zfpy missing"
    A32 = np.ascontiguousarray(A, dtype=np.float32)
    buf = zfpy.compress_numpy(A32, rate=x)
    return relative_error(A, zfpy.decompress_numpy(buf).astype(np.float64)), len(buf) * 8 / A.size, f"rate={x}"


def run(found: dict[str, np.ndarray], zfpy: Any) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, A in found.items():
            for x in BUDGETS:
                t0 = time.perf_counter()
                row: dict[str, Any] = {"matrix": name, "shape": list(A.shape), "budget": x}
                for method, (err, bpe, how) in {
                    "NQ": nq(A, x),
                    "NQ (clipped)": nq_clipped(A, x),
                    "LPLR (default)": lplr_default(A, x, Path(tmp)),
                    "backbone": (study := backbone(A, x)),
                    "backbone (compress, study's B0 k B)": backbone_at(A, study[2], Path(tmp)),
                    "backbone (compress)": backbone_compress(A, x, Path(tmp)),
                    "ZFP": zfp(A, x, zfpy),
                }.items():
                    row[method] = {"error": err, "bits_per_entry": bpe, "config": how}
                if x in (2, 3):
                    row["rounds"] = rounds(A, row["backbone (compress, study's B0 k B)"]["config"], Path(tmp))
                rows.append(row)
                print(
                    f"[{time.perf_counter() - t0:6.1f}s] {name} X={x}: "
                    + ", ".join(f"{m} {row[m]['error']:.4f}" for m in METHODS),
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def _cell(entry: dict[str, Any]) -> str:
    if not math.isfinite(entry["error"]):
        return "–"
    return f"{entry['error']:.4f} ({entry['bits_per_entry']:.2f})"


def report(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    table = markdown_table(
        ["matrix", "X", *METHODS, "backbone's choice"],
        [
            [f"{r['matrix']} {r['shape'][0]}×{r['shape'][1]}", r["budget"], *(_cell(r[m]) for m in METHODS)]
            + [r["backbone"]["config"]]
            for r in rows
            if not r["matrix"].startswith("minilm:")
        ],
    )
    table += "\n\nbackbone (compress): the search's choice (bits per entry on disk)\n\n" + markdown_table(
        ["matrix", "X", "choice"], [[r["matrix"], r["budget"], r["backbone (compress)"]["config"]] for r in rows]
    )
    with_rounds = [r for r in rows if r.get("rounds")]
    if with_rounds:
        table += (
            "\n\nRounds T of the backbone at the search's (B0, k, bits), `--backbone-iters T`: relative error\n\n"
            + markdown_table(
                ["matrix", "X", *(f"T={t}" for t in ROUNDS)],
                [[r["matrix"], r["budget"], *(f"{r['rounds'][t]:.4f}" for t in ROUNDS)] for r in with_rounds],
            )
        )
    minilm = [r for r in rows if r["matrix"].startswith("minilm:")]
    if minilm:
        names = sorted({r["matrix"] for r in minilm})
        table += (
            f"\n\nMiniLM: mean ± std of the relative error over {len(names)} weight matrices "
            "(bits per entry: the mean)\n\n"
            + markdown_table(["X", *METHODS], [[x, *(_mean_cell(minilm, m, x) for m in METHODS)] for x in BUDGETS])
        )
    (out / "report.md").write_text(
        "# Backbone (Q + L·R) against NQ, LPLR and ZFP at equal bits per entry\n\n"
        f"Command: `{meta['command']}`; {meta['when']}, {meta['machine']}.\n\n"
        "Each cell: relative Frobenius error (bits per entry as counted, scales included).\n\n" + table + "\n"
    )
    return table


def _mean_cell(rows: list[dict[str, Any]], method: str, budget: int) -> str:
    """Mean ± std of ``method``'s error over ``rows`` at ``budget``, and its mean bits per entry."""
    errs = np.array([r[method]["error"] for r in rows if r["budget"] == budget], dtype=float)
    bpe = np.array([r[method]["bits_per_entry"] for r in rows if r["budget"] == budget], dtype=float)
    if not np.isfinite(errs).any():
        return "–"
    return f"{np.nanmean(errs):.4f} ± {np.nanstd(errs):.4f} ({np.nanmean(bpe):.2f})"


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault("MiniLM (mean)" if r["matrix"].startswith("minilm:") else r["matrix"], []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
    for ax, (name, rs) in zip(axes[0], groups.items()):
        for m, marker in zip(METHODS, "osvDP*^"):
            ys = [np.nanmean([r[m]["error"] for r in rs if r["budget"] == x]) for x in BUDGETS]
            ax.plot(list(BUDGETS), ys, marker=marker, label=m)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("bits per entry")
        ax.set_xticks(list(BUDGETS))
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative Frobenius error")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/backbone"))
    p.add_argument("--zfpy", help="a folder holding zfpy (pip install --target DIR zfpy)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--all-layers", action="store_true")
    args = p.parse_args(argv)
    import zarr  # noqa: F401 - numcodecs must be imported before zfpy's metadata is visible

    zfpy = None
    if args.zfpy:
        sys.path.insert(0, args.zfpy)
    try:
        import zfpy  # type: ignore[no-redef]
    except ImportError:
        print("note: zfpy not found: no ZFP column (see --zfpy)", file=sys.stderr)
    import os
    import platform

    from distributed import Client, LocalCluster

    args.out.mkdir(parents=True, exist_ok=True)
    found = matrices(args.quick, args.all_layers)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None, processes=False) as cluster,
        Client(cluster),
    ):
        t0 = time.perf_counter()
        rows = run(found, zfpy)
    meta = {
        "command": "python benchmarks/bench_backbone.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs), {time.perf_counter() - t0:.0f} s",
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(report(rows, args.out, meta))
    figure(rows, args.out / "backbone.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

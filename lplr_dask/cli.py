"""The ``lplr`` command: generate, convert, compress, compress-group, info, evaluate, decompress.

Exit status: 0 success; 2 bad input or usage (one line on stderr, no traceback); 1 anything else.
Results go to stdout as a short table, or as one JSON object with ``--json``; progress and the
dashboard address go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from lplr_dask.errors import LplrError

__all__ = ["main", "build_parser"]


class UsageError(LplrError, ValueError):
    """Bad command-line usage."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _storage_options(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"endpoint_url\": \"http://...\"}}', got {text!r}")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from lplr_dask.cluster import add_cluster_arguments

    p = _Parser(prog="lplr", description="Low-rank, low-precision compression of large matrices on Dask.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser, *, cluster: bool = True) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument(
            "--storage-options", type=_storage_options, metavar="JSON",
            default=os.environ.get("LPLR_STORAGE_OPTIONS"),  # argparse parses a string default with `type`
            help="fsspec options for s3://… and other URLs, e.g. '{\"endpoint_url\": \"http://host:9000\"}' "
            "(default: $LPLR_STORAGE_OPTIONS, else the usual AWS_* environment)",
        )
        if cluster:
            add_cluster_arguments(sp)

    def compression(sp: argparse.ArgumentParser) -> None:  # compress and compress-group
        sp.add_argument("--bits", type=int, nargs=2, metavar=("B1", "B2"),
                        help="bits for L and R (default 8 8; for compress with --bits-per-entry, chosen with the rank)")
        sp.add_argument("--passes", type=int, default=2, choices=[1, 2], help="reads of A (default 2)")
        sp.add_argument("--power-iters", type=int, default=0, help="power iterations (2 more reads each)")
        sp.add_argument("--oversample", type=_oversample, default=None, metavar="P",
                        help="extra range-sketch columns: L comes from the top k directions of k+P sketch columns "
                        "(default: P = rank; 0: the paper's sketch of exactly k columns)")
        sp.add_argument("--quantizer", default="default",
                        help="paper | default | tensor|channel|groupN[-sym][-stochastic|-gptq], or L_NAME:R_NAME "
                        "(-gptq: R only, e.g. channel:channel-gptq)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        sp.add_argument("--precision", default="auto", choices=["auto", "float32", "float64"],
                        help="dtype of each chunk's products (auto: float32 for float32 input, about 2x faster; "
                        "float64: codes identical for any chunking)")
        sp.add_argument("--evaluate", action="store_true", help="also measure the exact error (one more read of A)")
        mode = sp.add_mutually_exclusive_group()
        mode.add_argument("--overwrite", action="store_true", help="replace an existing output")
        mode.add_argument("--resume", action="store_true", help="finish an interrupted job (same arguments)")

    g = sub.add_parser("generate", help="write a synthetic low-rank-plus-noise matrix to Zarr")
    g.add_argument("out", help="output Zarr array path")
    g.add_argument("--shape", required=True, help="NxD, e.g. 200000x20000")
    g.add_argument("--rank", type=int, default=64, help="rank of the low-rank part (default 64)")
    g.add_argument("--decay", type=float, default=0.9, help="spectral decay (default 0.9)")
    g.add_argument("--noise", type=float, default=0.01, help="relative Frobenius noise level (default 0.01)")
    g.add_argument("--kind", default="lowrank", choices=["lowrank", "poly", "student-t"])
    g.add_argument("--chunks", default="4096x4096", help="chunk shape RxC (default 4096x4096)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overwrite", action="store_true")
    common(g)

    v = sub.add_parser("convert", help="stream a .npy, HDF5 dataset or safetensors tensor into chunked Zarr")
    v.add_argument("input", help="W.npy, FILE.h5:/dataset, FILE.safetensors:name, or a Zarr array")
    v.add_argument("out", help="output Zarr array (path or URL)")
    v.add_argument("--chunks", type=_chunks, help="chunk shape RxC (default: about 128 MiB blocks, or the Zarr input's)")
    v.add_argument("--overwrite", action="store_true")
    common(v)

    c = sub.add_parser("compress", help="compress a matrix into an *.lplr.zarr store")
    c.add_argument("input", help="input matrix: a Zarr array (path or URL, IN.zarr/path/in/group), W.npy, "
                   "FILE.h5:/dataset or FILE.safetensors:name")
    c.add_argument("out", help="output *.lplr.zarr path")
    size = c.add_argument_group("size (exactly one)")
    size.add_argument("--rank", type=int, help="target rank k")
    size.add_argument("--bits-per-entry", type=float, help="storage budget in bits per entry of A")
    size.add_argument("--match-nq", type=float, metavar="B", help="the paper's fair rank against B-bit naive quantization")
    size.add_argument("--target-error", type=float, metavar="E",
                      help="the smallest rank whose estimated relative error is at most E (one more read of A)")
    compression(c)
    common(c)

    cg = sub.add_parser("compress-group", help="compress every matrix of a Zarr group, HDF5 or safetensors file")
    cg.add_argument("input", help="a Zarr group (path or URL), FILE.h5 or FILE.safetensors")
    cg.add_argument("out", help="output group: one *.lplr.zarr subgroup per compressed matrix")
    rule = cg.add_argument_group("rule for each matrix (exactly one)")
    rule.add_argument("--rank", type=int, help="rank k (capped at min(n, d))")
    rule.add_argument("--bits-per-entry", type=float, help="storage budget in bits per entry")
    rule.add_argument("--match-nq", type=float, metavar="B", help="the fair rank against B-bit naive quantization")
    compression(cg)
    common(cg)

    i = sub.add_parser("info", help="describe an *.lplr.zarr store")
    i.add_argument("store")
    common(i, cluster=False)

    e = sub.add_parser("evaluate", help="exact relative Frobenius error, one read of A")
    e.add_argument("input")
    e.add_argument("store")
    common(e)

    d = sub.add_parser("decompress", help="write the reconstruction L·R to a Zarr array")
    d.add_argument("store")
    d.add_argument("out")
    d.add_argument("--dtype", default="source", choices=["source", "float16", "float32", "float64"],
                   help="dtype written (default: the source's; bfloat16 sources are written as float32)")
    d.add_argument("--overwrite", action="store_true")
    common(d)

    vf = sub.add_parser(
        "verify", help="read every chunk of a store once: present, checksum, codes in range, finite scales",
        description="Read every chunk of an *.lplr.zarr store (or of a compress-group output) once and check "
        "it: present, decodes with its checksum, codes below 2^bits, scales finite. Exit 0 when clean; "
        "exit 2 with one line naming the damaged chunks.",
        epilog="example: lplr verify OUT.lplr.zarr --json",
    )
    vf.add_argument("store", help="the *.lplr.zarr store or compress-group output to check (path or URL)")
    common(vf)
    return p


def _chunks(text: str) -> tuple[int, int]:
    from lplr_dask.datasets import parse_shape

    return parse_shape(text)


def _summary(factors: Any) -> dict[str, Any]:
    """The fields every result carries (table and JSON alike)."""
    a = factors.attrs
    n, d = factors.shape
    nbytes = factors.nbytes
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
        "oversample": a.get("sketch", {}).get("range_oversample", 0),
        "seed": a["seed"],
        "bytes_on_disk": nbytes,
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
    }


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


def _cmd_generate(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.cluster import client_from_args
    from lplr_dask.datasets import generate, parse_shape

    from lplr_dask.sources import is_remote

    shape = parse_shape(args.shape)
    if args.storage_options and is_remote(args.out):
        raise UsageError(
            "lplr generate: --storage-options is not supported for a remote output (the environment's "
            "configuration is); generate locally and upload with `lplr convert LOCAL.zarr URL --storage-options ...`"
        )
    t0 = time.perf_counter()
    with client_from_args(args, log=log):
        arr = generate(
            args.out, shape, rank=args.rank, decay=args.decay, noise=args.noise, kind=args.kind,
            chunks=_chunks(args.chunks), seed=args.seed, dtype=np.dtype(args.dtype), overwrite=args.overwrite,
        )
    return {
        "out": args.out, "shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
        "bytes": int(np.prod(arr.shape)) * arr.dtype.itemsize, "seconds": round(time.perf_counter() - t0, 3),
    }


def _exactly_one(args: argparse.Namespace, command: str, names: Sequence[str]) -> None:
    flags = ["--" + n.replace("_", "-") for n in names]
    given = [f for n, f in zip(names, flags) if getattr(args, n) is not None]
    if len(given) != 1:
        raise UsageError(f"lplr {command}: give exactly one of {', '.join(flags)} (got {', '.join(given) or 'none'})")


def _cmd_compress(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.api import compress, evaluate
    from lplr_dask.cluster import client_from_args

    _exactly_one(args, "compress", ("rank", "bits_per_entry", "match_nq", "target_error"))
    if args.passes == 1 and args.power_iters:
        raise UsageError("lplr compress: --passes 1 cannot be combined with --power-iters (each power iteration reads A twice more)")
    from lplr_dask.backend import check_device
    from lplr_dask.sources import open_source

    opts = args.storage_options
    open_source(args.input, storage_options=opts)  # bad input fails before a cluster starts
    check_device(args.device)  # so does --device cuda without CuPy or a GPU
    with client_from_args(args, log=log):
        factors = compress(
            args.input, args.out, rank=args.rank, bits=tuple(args.bits) if args.bits else None,
            bits_per_entry=args.bits_per_entry, match_nq=args.match_nq, target_error=args.target_error, passes=args.passes,
            power_iters=args.power_iters, oversample=args.oversample, quantizer=args.quantizer, seed=args.seed,
            overwrite=args.overwrite, resume=args.resume, device=args.device, storage_options=opts,
            precision=args.precision, log=log,
        )
        if args.evaluate:
            evaluate(args.input, factors, storage_options=opts)
    return _summary(factors)


def _cmd_convert(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.cluster import client_from_args
    from lplr_dask.convert import convert
    from lplr_dask.sources import read_source

    read_source(args.input, storage_options=args.storage_options)  # bad input fails before a cluster starts
    t0 = time.perf_counter()
    with client_from_args(args, log=log):
        arr = convert(args.input, args.out, chunks=args.chunks or "auto", overwrite=args.overwrite,
                      storage_options=args.storage_options, log=log)
    return {
        "input": args.input, "out": args.out, "shape": list(arr.shape), "dtype": str(arr.dtype),
        "source_dtype": arr.attrs["lplr_convert"]["source_dtype"], "chunks": list(arr.chunks),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _cmd_compress_group(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.api import DEFAULT_BITS
    from lplr_dask.cluster import client_from_args
    from lplr_dask.group import compress_group
    from lplr_dask.sources import list_arrays

    _exactly_one(args, "compress-group", ("rank", "bits_per_entry", "match_nq"))
    list_arrays(args.input, storage_options=args.storage_options)  # bad input fails before a cluster starts
    with client_from_args(args, log=log):
        return compress_group(
            args.input, args.out, rank=args.rank, bits=tuple(args.bits or DEFAULT_BITS), bits_per_entry=args.bits_per_entry,
            match_nq=args.match_nq, passes=args.passes, power_iters=args.power_iters, oversample=args.oversample,
            quantizer=args.quantizer,
            seed=args.seed, overwrite=args.overwrite, resume=args.resume, device=args.device,
            evaluate=args.evaluate, storage_options=args.storage_options, precision=args.precision, log=log,
        )


def _cmd_info(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.factors import open_factors

    return _summary(open_factors(args.store, storage_options=args.storage_options))


def _cmd_evaluate(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.api import evaluate
    from lplr_dask.cluster import client_from_args
    from lplr_dask.factors import open_factors

    factors = open_factors(args.store, storage_options=args.storage_options)
    with client_from_args(args, log=log):
        err = evaluate(args.input, factors, storage_options=args.storage_options)
    return {"store": args.store, "input": args.input, "error_exact": err, "error_estimate": factors.attrs.get("error_estimate")}


def _cmd_decompress(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask import store
    from lplr_dask.cluster import client_from_args
    from lplr_dask.errors import OutputExistsError
    from lplr_dask.factors import open_factors
    from lplr_dask.sources import cast_to, output_dtype

    opts = args.storage_options
    factors = open_factors(args.store, storage_options=opts)
    if store.exists(args.out, opts) and not args.overwrite:
        raise OutputExistsError(f"{args.out!r} already exists. Pass --overwrite to replace it.")
    source_dtype = factors.attrs["source"]["dtype"]
    dtype = output_dtype(source_dtype if args.dtype == "source" else args.dtype)
    if args.dtype == "source" and str(dtype) != source_dtype:
        log(f"note: the source is {source_dtype}, which Zarr cannot store; writing {dtype}")
    chunks = tuple(factors.attrs["source"]["chunks"])
    t0 = time.perf_counter()
    with client_from_args(args, log=log):
        recon = cast_to(factors.to_dask(dtype=np.float64), dtype).rechunk(chunks)
        store.write_array(recon, args.out, overwrite=args.overwrite, label="decompress", storage_options=opts)
    return {"store": args.store, "out": args.out, "shape": list(recon.shape), "dtype": str(dtype),
            "seconds": round(time.perf_counter() - t0, 3)}


def _cmd_verify(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from lplr_dask.cluster import client_from_args
    from lplr_dask.store import open_group
    from lplr_dask.verify import verify

    open_group(args.store, storage_options=args.storage_options)  # no store: fail before a cluster starts
    with client_from_args(args, log=log):
        return verify(args.store, storage_options=args.storage_options, log=log)


COMMANDS: dict[str, Callable[[argparse.Namespace, Callable[[str], None]], dict[str, Any]]] = {
    "generate": _cmd_generate,
    "convert": _cmd_convert,
    "compress": _cmd_compress,
    "compress-group": _cmd_compress_group,
    "info": _cmd_info,
    "evaluate": _cmd_evaluate,
    "decompress": _cmd_decompress,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lplr``; return the exit status."""
    from lplr_dask.progress import set_quiet

    try:
        args = build_parser().parse_args(argv)
        set_quiet(args.quiet)
        with _stdout_to_stderr(args.json):
            result = COMMANDS[args.command](args, _log)
    except LplrError as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun `lplr compress` with --resume to finish", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - the CLI's last resort: one line, exit 1
        if os.environ.get("LPLR_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set LPLR_DEBUG=1 for a traceback)".replace("\n", " "), file=sys.stderr)
        return 1
    _emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The public entry points: :func:`compress` and :func:`evaluate`."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from typing import Any, Callable, Iterator

import numpy as np

from lplr_dask import budget, chunking, factorize, guard, logs, store
from lplr_dask.errors import LplrTypeError, LplrValueError, StoreFormatError
from lplr_dask.factors import Factors, open_factors, relative_error
from lplr_dask.quantize import QuantizerSpec, check_bits, quantizer_pair
from lplr_dask.sources import Source, as_matrix, describe, open_source, read_source

__all__ = ["compress", "evaluate", "resolve_rank", "DEFAULT_BITS"]

#: (B1, B2) unless given, or chosen for a bits-per-entry budget.
DEFAULT_BITS = (8, 8)


def resolve_rank(
    shape: tuple[int, int],
    bits: tuple[int, int],
    *,
    rank: int | None,
    bits_per_entry: float | None,
    match_nq: float | None,
    specs: tuple[QuantizerSpec, QuantizerSpec] | None = None,
    chunks: tuple[int, int] | None = None,
) -> int:
    """The rank from exactly one of ``rank``, ``bits_per_entry``, ``match_nq``.

    ``bits_per_entry`` gives the largest rank whose store fits the budget on disk with the
    quantizers ``specs`` (L, R) and A's ``chunks`` (:func:`lplr_dask.budget.rank_for_bits_per_entry`).

    Raises
    ------
    LplrValueError
        If none or more than one is given, or the rank is outside ``1..min(n, d)``.
    """
    given = [name for name, v in (("rank", rank), ("bits_per_entry", bits_per_entry), ("match_nq", match_nq)) if v is not None]
    if len(given) != 1:
        raise LplrValueError(
            "Expected exactly one of rank (--rank), bits_per_entry (--bits-per-entry), match_nq "
            f"(--match-nq) or target_error (--target-error). Got {', '.join(given) if given else 'none'}."
        )
    n, d = shape
    if rank is not None:
        k = rank
    elif bits_per_entry is not None:
        k = budget.rank_for_bits_per_entry(n, d, bits, float(bits_per_entry), specs=specs or budget.PAPER_SPECS, chunks=chunks)
    else:
        k = budget.fair_rank(n, d, bits, float(match_nq))  # type: ignore[arg-type]
        if k < 1:
            raise LplrValueError(
                f"The fair rank against {match_nq}-bit quantization of a {n}x{d} matrix at bits "
                f"{bits} is 0: the matrix is too small to gain from a factorization. Keep it "
                "uncompressed or quantize it directly."
            )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= min(n, d):
        raise LplrValueError(f"Expected rank from 1 to min(n, d) = {min(n, d)} for a {n}x{d} matrix. Got {k!r}.")
    return int(k)


def _seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LplrTypeError(f"Expected seed to be a non-negative integer (stored in the attrs). Got {seed!r}.")
    return int(seed)


@contextlib.contextmanager
def _client(log: Callable[[str], None], device: str = "cpu") -> Iterator[Any]:
    from lplr_dask.progress import current_client

    if current_client() is not None:
        yield current_client()
        return
    from lplr_dask.cluster import get_client

    with get_client(log=log, device=device) as client:
        yield client


def compress(
    source: Any,
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    bits: tuple[int, int] | None = None,
    bits_per_entry: float | None = None,
    passes: int = 2,
    match_nq: float | None = None,
    power_iters: int = 0,
    oversample: int | None = None,
    quantizer: str = "default",
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "cpu",
    test_columns: int = 10,
    target_error: float | None = None,
    storage_options: dict[str, Any] | None = None,
    precision: str = "auto",
    log: Callable[[str], None] = logs.info,
) -> Factors:
    """Compress a matrix into a low-rank, low-precision factorization ``A ≈ L·R`` [1]_.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array or dask.array.Array
        The matrix (n × d): a path or URL of a Zarr array (v3 or v2, also inside a group:
        ``IN.zarr/path/to/array``), a ``.npy`` file, an HDF5 dataset (``FILE.h5:/dataset``), a
        safetensors tensor (``FILE.safetensors:name``), an open Zarr array, or a dask array.
        See :mod:`lplr_dask.sources` for the dtype policy.
    out : str or os.PathLike
        Where to write the ``*.lplr.zarr`` store: a local path or an fsspec URL.
    rank, bits_per_entry, match_nq, target_error : exactly one
        The rank k; or a budget of ``bits_per_entry`` bits per entry of A on disk (scales and
        metadata included), which it never exceeds: with ``bits``, the largest k that fits;
        without, the rank and bits of the lowest predicted error that fit, from a small grid
        (:func:`lplr_dask.budget.choose`, one more read of A); or
        the paper's fair rank against ``match_nq``-bit naive quantization; or the smallest rank
        whose estimated relative error is at most ``target_error`` (see
        :func:`lplr_dask.target.compress_to_target`).
    bits : (int, int), optional
        Bits B1 for L and B2 for R, each from 1 to 16. Default (8, 8), or chosen with the rank for
        ``bits_per_entry``.
    passes : {1, 2}, default=2
        Reads of A: two (the paper's least squares) or one (Tropp et al. 2017).
    power_iters : int, default=0
        Power iterations for slowly decaying spectra (two more reads each; two-pass only).
    oversample : int, optional
        Extra columns p of the range sketch: pass 1 sketches k + p columns and L is made from
        their top k directions (:func:`lplr_dask.factorize.truncate_sketch`), a better basis at
        no extra read of A; pass 1's products cost (k + p)/k as much. Default: p = k (at most
        ``min(n, d) − k``). 0 is the paper's sketch of exactly k columns.
    quantizer : str, default="default"
        ``"paper"`` for the reference semantics, ``"default"`` or a name that
        :func:`lplr_dask.quantize.parse_quantizer` reads; ``L_NAME:R_NAME`` for different
        quantizers of L and R (:func:`lplr_dask.quantize.quantizer_pair`).
    seed : int, default=0
        Seeds every random matrix; stored in the attrs.
    overwrite, resume : bool
        Replace an existing output, or finish an interrupted job with the same arguments.
    device : {"cpu", "cuda"}, default="cpu"
    test_columns : int, default=10
        Gaussian test columns sketched in pass 1 for the free error estimate.
    storage_options : dict, optional
        fsspec options (``endpoint_url``, ``key``, ``secret``, …) for remote ``source`` and
        ``out``; they travel with the store to the workers. Default: the environment's.
    precision : {"auto", "float32", "float64"}, default="auto"
        The dtype of each chunk's product with a thin operand (the sums across chunks are always
        float64). ``"auto"``: float32 for float32 (or narrower) input, float64 otherwise, about
        twice as fast on a CPU as float64 products. ``"float64"`` makes the codes identical for
        any chunking of A; with float32 products another chunking can move a code of L by one level
        where a value lies near a rounding boundary (within about 1e-7 of it for the paper's
        sketch: about 1 in 10⁵; measured 22 in 90,000 with the default oversampling, whose top
        directions move by the float32 noise over the spectral gap at k), and then R's codes,
        solved against that L, by one level (nearest rounding: measured 6%) or a few (gptq
        rounding: measured 39%): the error changes by about 1e-5 of itself. See
        :mod:`lplr_dask.blocks`.
    log : callable, default=lplr_dask.logs.info
        Receives what the compression chose and did; each step's progress goes to the ``lplr_dask``
        logger (:mod:`lplr_dask.progress`).

    Returns
    -------
    Factors

    Raises
    ------
    LplrValueError, LplrTypeError, SourceNotFoundError, OutputExistsError
        For bad arguments or input, before anything is written.

    References
    ----------
    .. [1] R. Saha, V. Srivastava, M. Pilanci. NeurIPS 2023.
    """
    choose_bits = bits is None and bits_per_entry is not None and rank is None and match_nq is None
    bits = DEFAULT_BITS if bits is None else bits
    bits = (check_bits(bits[0], "B1"), check_bits(bits[1], "B2"))
    if passes not in (1, 2):
        raise LplrValueError(f"Expected passes 1 or 2. Got {passes!r}.")
    if not isinstance(power_iters, (int, np.integer)) or power_iters < 0:
        raise LplrValueError(f"Expected power_iters >= 0. Got {power_iters!r}.")
    factorize.check_oversample(oversample)
    if passes == 1 and power_iters:
        raise LplrValueError("One-pass mode (passes=1) cannot use power iterations, which need 2 more reads each. Use passes=2.")
    if overwrite and resume:
        raise LplrValueError("Give at most one of overwrite (--overwrite) and resume (--resume).")
    from lplr_dask.blocks import compute_dtype

    compute_dtype(np.float32, precision)  # rejects a bad name before anything is read
    seed = _seed(seed)
    spec_l, spec_r = quantizer_pair(quantizer)
    guard.check_output(out, [source], overwrite=overwrite, storage_options=storage_options)
    if target_error is not None:
        if rank is not None or bits_per_entry is not None or match_nq is not None:
            raise LplrValueError("Give target_error (--target-error) alone, without rank, bits_per_entry or match_nq.")
        from lplr_dask.target import compress_to_target

        with _client(log, device):
            return compress_to_target(
                source, out, target_error, bits=bits, passes=passes, power_iters=int(power_iters),
                oversample=oversample, quantizer=quantizer, seed=seed, overwrite=overwrite, resume=resume, device=device,
                test_columns=test_columns, storage_options=storage_options, log=log,
            )
    src = read_source(source, storage_options=storage_options)
    A = as_matrix(src, log=log)
    from lplr_dask.backend import to_device

    A = to_device(A, device)
    if choose_bits:
        with _client(log, device):
            choice = budget.choose(
                A, float(bits_per_entry), specs=(spec_l, spec_r), seed=seed, passes=passes,  # type: ignore[arg-type]
                power_iters=int(power_iters), oversample=oversample, test_columns=test_columns, log=log,
            )
            return compress(
                source, out, rank=choice.rank, bits=choice.bits, passes=passes, power_iters=power_iters,
                oversample=oversample, quantizer=quantizer, seed=seed, overwrite=overwrite, resume=resume, device=device,
                test_columns=test_columns, storage_options=storage_options, precision=precision, log=log,
            )
    k = resolve_rank(A.shape, bits, rank=rank, bits_per_entry=bits_per_entry, match_nq=match_nq,
                     specs=(spec_l, spec_r), chunks=(int(A.chunks[0][0]), int(A.chunks[1][0])))
    params = factorize.Params(
        rank=k, bits=bits, quantizer=quantizer if isinstance(quantizer, str) else spec_l.name,
        spec_l=spec_l, spec_r=spec_r, seed=seed, passes=passes, power_iters=int(power_iters),
        test_columns=test_columns, precision=compute_dtype(A.dtype, precision).name,
        range_oversample=factorize.resolve_oversample(oversample, k, A.shape),
    )
    A = chunking.plan(A, params, source=src.path, log=log)
    path = os.fspath(out)
    if store.exists(path, storage_options) and not (overwrite or resume):
        store.clear(path, overwrite=False, storage_options=storage_options,
                    hint=", or --resume (resume=True) to finish an interrupted job")
    lock = guard.StoreLock(path, storage_options)
    with _client(log, device) as client:
        chunking.check_memory(A, params, client, source=src.path, log=log)
        meta = _start(path, src, A, params, lock, overwrite=overwrite, resume=resume, device=device,
                      storage_options=storage_options)
        try:
            if meta.get("complete"):
                log(f"{path}: already complete; nothing to do")
                return open_factors(path, storage_options=storage_options)
            meta = _run(A, path, params, meta, lock, resume=resume, storage_options=storage_options, log=log)
        finally:
            lock.release()
    return open_factors(path, storage_options=storage_options)


def _run(
    A: Any, path: str, params: factorize.Params, meta: dict[str, Any], lock: guard.StoreLock, *, resume: bool,
    storage_options: dict[str, Any] | None, log: Callable[[str], None],
) -> dict[str, Any]:
    """Run the passes on a started store; on failure leave it resumable, or remove a fresh one
    that failed (not was interrupted) before anything worth resuming."""
    n, d = A.shape
    k, bits = params.rank, params.bits
    log(f"compress {n}x{d} {A.dtype} -> {path}: rank {k}, bits {bits}, quantizer {params.quantizer}, passes {params.passes}")
    t0 = time.perf_counter()
    fresh = meta["stage"] == "started" and not resume
    try:
        meta = factorize.run(A, store.locate(path, storage_options), params, meta, log=log)
    except BaseException as e:
        if not lock.owned():  # another job replaced the store meanwhile: leave its files alone
            raise
        group = store.open_group(path, storage_options=storage_options)
        started = store.read_meta(group, require_complete=False)["stage"] == "started"
        if fresh and started and isinstance(e, Exception):
            store.remove(path, storage_options)  # failed before anything worth resuming: leave nothing behind
        else:
            log(f"{path}: incomplete; finish it with --resume (same arguments)")
        raise
    meta["timings"]["total"] = round(time.perf_counter() - t0 + meta["timings"].get("total", 0.0), 3)
    store.write_meta(store.open_group(path, mode="r+", storage_options=storage_options), meta)
    return meta


def _start(
    path: str, src: Source, A: Any, params: factorize.Params, lock: guard.StoreLock, *, overwrite: bool,
    resume: bool, device: str, storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create the output (or reopen it for ``resume``), take its lock, and return its attrs.

    Raises
    ------
    OutputLockedError
        If another job is writing the output.
    StoreFormatError
        If ``resume`` finds a store started with other parameters, or of an input that changed.
    """
    current = guard.fingerprint(src, A, storage_options=storage_options)
    if resume and store.exists(path, storage_options):
        group = store.open_group(path, mode="r+", storage_options=storage_options)
        meta = store.read_meta(group, require_complete=False, path=path)
        expected = params.as_attrs()
        started = _with_old_defaults(meta)
        changed = [key for key, v in expected.items() if started.get(key) != store._jsonable(v)]
        if meta.get("source", {}).get("shape") != list(A.shape):
            changed.append("source shape")
        if changed:
            raise StoreFormatError(
                f"Cannot resume {path!r}: it was started with different {', '.join(changed)}. "
                "Rerun with the same arguments, or with --overwrite to start over."
            )
        guard.check_fingerprint(meta.get("source", {}).get("fingerprint"), current, out=path, source=src.path)
        lock.acquire()
        return meta
    if store.exists(path, storage_options):
        lock.check_free()  # a running job's output is not replaced under it
    group = store.create_group(path, overwrite=overwrite, storage_options=storage_options)
    lock.acquire()
    meta = {
        "format": store.FORMAT_NAME,
        "version": store.FORMAT_VERSION,
        "source": {**describe(src, A), "fingerprint": current},
        **params.as_attrs(),
        "device": device,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lplr_dask_version": _version(),
        "stage": "started",
        "timings": {},
        "complete": False,
    }
    store.write_meta(group, meta)
    return meta


def _with_old_defaults(meta: dict[str, Any]) -> dict[str, Any]:
    """The attrs of a store started by an older version, with what it did not record filled in:
    float64 block products and the paper's sketch of exactly k columns (no range oversampling)."""
    out = dict(meta)
    out.setdefault("precision", "float64")
    if isinstance(out.get("sketch"), dict):
        out["sketch"] = {"range_oversample": 0, **out["sketch"]}
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lplr-dask")
    except PackageNotFoundError:
        return "unknown"


def evaluate(
    source: Any, factors: Factors | str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> float:
    """Exact relative Frobenius error ``‖A − L·R‖ / ‖A‖``, streamed in one read of A.

    The result is also stored in the factors' attrs as ``error_exact``. ``storage_options``
    are fsspec options for a remote source or store.
    """
    if not isinstance(factors, Factors):
        factors = open_factors(factors, storage_options=storage_options)
    A = open_source(source, storage_options=storage_options)
    with _client(logs.info):
        err = relative_error(A, factors)
    group = store.open_group(factors.path, mode="r+", storage_options=factors.storage_options)
    meta = store.read_meta(group, path=factors.path)
    meta["error_exact"] = err
    store.write_meta(group, meta)
    factors.attrs = meta
    return err

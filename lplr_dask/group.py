"""``lplr compress-group``: every matrix of a group (a model's weights) in one job, on one cluster.

Output layout (``OUT.lplr.zarr``, a Zarr v3 group)::

    OUT.lplr.zarr/              attrs "lplr_group": format, version, source, rule, one entry
                                per array, totals, complete (written last)
        <name>/                 for each compressed matrix: an *.lplr.zarr store (docs/FORMAT.md),
                                so ``lplr_dask.open_factors("OUT.lplr.zarr/<name>")`` opens it
        <name>                  for each array copied as it is: a plain Zarr array, attrs
                                "lplr_copy": {"reason", "source_dtype"}

``<name>`` is the array's path in the input group (``encoder/layer0/weight``) or its tensor name
in an HDF5 or safetensors file. Arrays that are not real 2-D matrices, and matrices too small to
gain from a factorization under the rule (fair rank 0, or factors at least as large as the
array itself, or full rank), are copied.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lplr_dask import budget, logs, store
from lplr_dask.api import evaluate as evaluate_error
from lplr_dask.cluster import get_client
from lplr_dask.errors import LplrValueError
from lplr_dask.guard import check_output
from lplr_dask.job import compress_at_rank
from lplr_dask.options import Options, check_job
from lplr_dask.sources import itemsize, list_arrays, member, read_source, regular

__all__ = ["GROUP_FORMAT_NAME", "GROUP_FORMAT_VERSION", "compress_group", "plan_rank", "format_table"]

GROUP_FORMAT_NAME = "lplr-zarr-group"
GROUP_FORMAT_VERSION = 1


def plan_rank(
    shape: tuple[int, ...],
    dtype: str,
    bits: tuple[int, int],
    *,
    rank: int | None = None,
    bits_per_entry: float | None = None,
    match_nq: float | None = None,
) -> tuple[int, str]:
    """The rank for one array of a group under the rule, or 0 and why it is copied instead.

    Parameters
    ----------
    shape, dtype
        The array's shape and its source dtype name.
    bits : (int, int)
    rank, bits_per_entry, match_nq : exactly one (validated by :func:`compress_group`)

    Returns
    -------
    (rank, reason)
        ``rank >= 1`` and ``""`` to compress; ``0`` and the reason to copy.
    """
    if len(shape) != 2:
        return 0, f"not a matrix ({len(shape)}-D)"
    if dtype != "bfloat16" and np.dtype(dtype).kind not in "iuf":
        return 0, f"not real numeric ({dtype})"
    n, d = shape
    if rank is not None:
        k = min(rank, n, d)
    else:
        k = budget.fair_rank(n, d, bits, float(bits_per_entry if bits_per_entry is not None else match_nq))  # type: ignore[arg-type]
    if k < 1:
        return 0, "too small to gain (fair rank 0)"
    if k >= min(n, d):
        return 0, f"too small to gain (rank {k} is full rank)"
    factor_bits = budget.theoretical_bits_per_entry(n, d, k, bits)
    if factor_bits >= 8 * itemsize(dtype):
        return (
            0,
            f"too small to gain (rank {k} needs {factor_bits:.3g} bits per entry, the array {8 * itemsize(dtype)})",
        )
    return k, ""


def _check_rule(rank: int | None, bits_per_entry: float | None, match_nq: float | None) -> dict[str, float]:
    given = {
        name: v
        for name, v in (("rank", rank), ("bits_per_entry", bits_per_entry), ("match_nq", match_nq))
        if v is not None
    }
    if len(given) != 1:
        raise LplrValueError(
            "Expected exactly one rule for every matrix of the group: rank (--rank), bits_per_entry "
            f"(--bits-per-entry) or match_nq (--match-nq). Got {', '.join(given) or 'none'}."
        )
    ((name, value),) = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value > 0:
        raise LplrValueError(f"Expected a positive {name}. Got {value!r} instead.")
    if name == "rank" and int(value) != value:
        raise LplrValueError(f"Expected an integer rank. Got {value!r} instead.")
    return {name: value}


def _row(i: int, total: int, entry: dict[str, Any], widths: tuple[int, int]) -> str:
    """One array's line of the table that :func:`compress_group` logs as it goes."""
    shape = "x".join(map(str, entry["shape"]))
    if entry["action"] == "lplr":
        error = entry["error_exact"] if entry.get("error_exact") is not None else entry["error_estimate"]
        what = f"lplr  rank {entry['rank']:<5}  error {error:.3g}" + (
            " (exact)" if entry.get("error_exact") is not None else ""
        )
    else:
        what = f"copy  {entry['reason']}"
    return (
        f"array {i:>{len(str(total))}}/{total}  {entry['name']:<{widths[0]}}  {shape:<{widths[1]}}  "
        f"{entry['dtype']:<8}  {entry['bits_per_entry']:6.3g} bits/entry  {entry['seconds']:7.1f} s  {what}"
    )


def compress_group(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    bits: tuple[int, int] = (8, 8),
    bits_per_entry: float | None = None,
    match_nq: float | None = None,
    passes: int = 2,
    power_iters: int = 0,
    oversample: int | None = None,
    quantizer: str = "default",
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "cpu",
    evaluate: bool = False,
    storage_options: dict[str, Any] | None = None,
    precision: str = "auto",
    log: Callable[[str], None] = logs.info,
) -> dict[str, Any]:
    """Compress every matrix of a group into one output group (layout in the module docstring).

    Parameters
    ----------
    source : str or os.PathLike
        A Zarr group (v3 or v2, local or remote), an HDF5 file or a safetensors file.
    out : str or os.PathLike
        The output group: a local path or an fsspec URL.
    rank, bits_per_entry, match_nq : exactly one
        The rule applied to each matrix: a rank (capped at ``min(n, d)``), a budget in bits per
        entry, or the fair rank against naive ``match_nq``-bit quantization. Here the budget
        counts the codes, ``k·(n·B1 + d·B2) / (n·d)`` (the paper's fair rank), not the bytes on
        disk as :func:`lplr_dask.compress` does: each store's metadata (about 16 KiB) would
        leave a small matrix of a model no rank at all.
    bits, passes, power_iters, oversample, quantizer, seed, device, precision
        As for :func:`lplr_dask.compress`, the same for every matrix.
    overwrite, resume : bool
        Replace an existing output; or finish an interrupted one (arrays already complete are
        kept, the others are resumed or redone).
    evaluate : bool, default=False
        Also measure each matrix's exact error (one more read of it).
    storage_options : dict, optional
        fsspec options for remote source and output.
    log : callable, default=lplr_dask.logs.info
        Receives progress: a line as each array starts, and as it finishes its row of a table
        (i/N, name, shape, dtype, bits per entry, seconds, action, rank, error); the steps of
        each compression report through :mod:`lplr_dask.progress` as for :func:`lplr_dask.compress`.

    Returns
    -------
    dict
        ``store``, ``source``, ``arrays`` (one dict per array: name, shape, dtype, action
        ``"lplr"`` or ``"copy"``, reason, rank, bits, bytes on disk, bits per entry, compression
        ratio, error estimate, exact error, seconds) and ``totals``; also stored in the output's
        attrs as ``lplr_group``.

    Raises
    ------
    LplrValueError
        For a bad rule, or an input that holds no arrays.
    OutputExistsError
        If ``out`` exists and neither ``overwrite`` nor ``resume`` is given.
    """
    rule = _check_rule(rank, bits_per_entry, match_nq)
    options = Options(
        bits=bits,
        passes=passes,
        power_iters=power_iters,
        oversample=oversample,
        quantizer=quantizer,
        seed=seed,
        precision=precision,
        device=device,
        storage_options=storage_options,
    )
    check_job(overwrite, resume)
    location = os.fspath(source)
    check_output(out, [location], overwrite=overwrite, storage_options=storage_options)
    arrays = list_arrays(location, storage_options=storage_options)
    if not arrays:
        raise LplrValueError(f"Expected a group holding arrays. {location!r} holds none.")
    root_path = os.fspath(out).rstrip("/")
    if resume and store.exists(root_path, storage_options):
        root = store.open_group(root_path, mode="r+", storage_options=storage_options)
    else:
        root = store.create_group(root_path, overwrite=overwrite, storage_options=storage_options)
    meta: dict[str, Any] = {
        "format": GROUP_FORMAT_NAME,
        "version": GROUP_FORMAT_VERSION,
        "source": location,
        "rule": rule,
        "bits": list(bits),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
    }
    root.attrs["lplr_group"] = store.jsonable(meta)
    entries = []
    t_start = time.perf_counter()
    widths = (max(map(len, arrays)), max(len("x".join(map(str, shape))) for shape, _ in arrays.values()))
    with get_client(log=log) as client:
        for i, (name, (shape, dtype)) in enumerate(arrays.items()):
            k, reason = plan_rank(shape, dtype, bits, **rule)  # type: ignore[arg-type]
            log(
                f"array {i + 1}/{len(arrays)}: {name} ({'x'.join(map(str, shape))} {dtype}): "
                + (f"rank {k}" if k else f"copy, {reason}")
            )
            parent = name.rpartition("/")[0]
            if parent:
                root.require_group(parent)
            target = f"{root_path}/{name}"
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"name": name, "shape": list(shape), "dtype": dtype}
            if k:
                factors = compress_at_rank(
                    member(location, name),
                    target,
                    k,
                    options,
                    client=client,
                    overwrite=not resume,
                    resume=resume,
                    log=log,
                )
                if evaluate:
                    evaluate_error(member(location, name), factors, storage_options=storage_options)
                nbytes = factors.nbytes
                entry.update(
                    action="lplr",
                    reason="",
                    rank=k,
                    bits=list(bits),
                    error_estimate=factors.attrs.get("error_estimate"),
                    error_exact=factors.attrs.get("error_exact"),
                )
            else:
                src = read_source(member(location, name), storage_options=storage_options)
                store.write_array(
                    regular(src.array),
                    target,
                    overwrite=True,
                    label=f"copy {name}",
                    storage_options=storage_options,
                    attrs={"lplr_copy": {"reason": reason, "source_dtype": dtype}},
                )
                nbytes = store.bytes_on_disk(target, storage_options=storage_options)
                entry.update(action="copy", reason=reason, rank=None, bits=None, error_estimate=0.0, error_exact=0.0)
            size = int(np.prod(shape, dtype=np.int64))
            entry.update(
                bytes_on_disk=nbytes,
                bits_per_entry=nbytes * 8 / max(size, 1),
                compression_ratio=size * itemsize(dtype) / nbytes,
                seconds=round(time.perf_counter() - t0, 3),
            )
            entries.append(entry)
            log(_row(i + 1, len(arrays), entry, widths))
    source_bytes = sum(int(np.prod(e["shape"], dtype=np.int64)) * itemsize(e["dtype"]) for e in entries)
    total_bytes = store.bytes_on_disk(root_path, storage_options=storage_options)
    meta.update(
        arrays=entries,
        totals={
            "arrays": len(entries),
            "compressed": sum(e["action"] == "lplr" for e in entries),
            "copied": sum(e["action"] == "copy" for e in entries),
            "source_bytes": source_bytes,
            "bytes_on_disk": total_bytes,
            "compression_ratio": source_bytes / total_bytes,
            "seconds": round(time.perf_counter() - t_start, 3),
        },
        complete=True,
    )
    root.attrs["lplr_group"] = store.jsonable(meta)
    return {"store": root_path, **meta}


def format_table(result: dict[str, Any]) -> str:
    """The summary table of :func:`compress_group`'s result: one row per array, then totals."""
    head = ["name", "shape", "dtype", "action", "rank", "bits", "bytes", "bits/entry", "ratio", "err est", "err exact"]
    rows = [head]
    for e in result["arrays"]:
        rows.append(
            [
                e["name"],
                "x".join(map(str, e["shape"])),
                e["dtype"],
                e["action"],
                str(e["rank"] or "-"),
                "/".join(map(str, e["bits"])) if e["bits"] else "-",
                str(e["bytes_on_disk"]),
                f"{e['bits_per_entry']:.3g}",
                f"{e['compression_ratio']:.3g}",
                "-" if e["error_estimate"] is None else f"{e['error_estimate']:.3g}",
                "-" if e["error_exact"] is None else f"{e['error_exact']:.3g}",
            ]
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    t = result["totals"]
    lines.append(
        f"total: {t['arrays']} arrays ({t['compressed']} compressed, {t['copied']} copied), "
        f"{t['source_bytes']} -> {t['bytes_on_disk']} bytes on disk (ratio {t['compression_ratio']:.3g}), "
        f"{t['seconds']:.1f}s -> {result['store']}"
    )
    return "\n".join(lines)

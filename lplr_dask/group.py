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
from typing import Any, NamedTuple

import numpy as np

from lplr_dask import budget, logs, store
from lplr_dask.api import evaluate as evaluate_error
from lplr_dask.cluster import get_client
from lplr_dask.errors import LplrValueError
from lplr_dask.guard import check_output
from lplr_dask.job import compress_at_rank
from lplr_dask.options import (
    MAX_RANK_KEY,
    Options,
    check_backbone_rounds,
    check_job,
    configured_max_rank,
    is_backbone_search,
)
from lplr_dask.sources import itemsize, list_arrays, member, read_source, regular

__all__ = ["GROUP_FORMAT_NAME", "GROUP_FORMAT_VERSION", "compress_group", "plan_rank", "check_backbone", "format_table"]

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
    backbone_bits: int = 0,
) -> tuple[int, str]:
    """The rank for one array of a group under the rule, or 0 and why it is copied instead.

    A budget rule counts a ``backbone_bits``-bit backbone's codes too: the factors get the
    budget less B0 bits per entry, and an array is copied where Q and the factors together take
    as many bits as its dtype.

    Parameters
    ----------
    shape, dtype
        The array's shape and its source dtype name.
    bits : (int, int)
    rank, bits_per_entry, match_nq : exactly one (validated by :func:`compress_group`)
    backbone_bits : int, default=0
        B0 of every member's backbone (0: none).

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
        b_nq = float(bits_per_entry if bits_per_entry is not None else match_nq)  # type: ignore[arg-type]
        if b_nq <= backbone_bits:
            return 0, f"too small to gain (a {backbone_bits}-bit backbone takes the budget of {b_nq:g} bits)"
        k = budget.fair_rank(n, d, bits, b_nq - backbone_bits)
    if k < 1:
        return 0, "too small to gain (fair rank 0)"
    if k >= min(n, d):
        return 0, f"too small to gain (rank {k} is full rank)"
    factor_bits = budget.theoretical_bits_per_entry(n, d, k, bits) + backbone_bits
    if factor_bits >= 8 * itemsize(dtype):
        with_q = f" with a {backbone_bits}-bit backbone" if backbone_bits else ""
        return (
            0,
            f"too small to gain (rank {k}{with_q} needs {factor_bits:.3g} bits per entry, "
            f"the array {8 * itemsize(dtype)})",
        )
    return k, ""


def check_backbone(backbone_bits: Any, backbone_iters: Any = 1, backbone_start: Any = None) -> None:
    """Refuse ``backbone_bits="auto"`` (``--backbone auto``) for a group, and rounds or a start
    without a backbone, before anything starts.

    Raises
    ------
    LplrValueError
        For ``"auto"``: a group sizes each member by the fair rank, with no budget search to
        choose a backbone; as :func:`lplr_dask.options.check_backbone_rounds`.
    """
    check_backbone_rounds(backbone_bits, backbone_iters, backbone_start)
    if is_backbone_search(backbone_bits):
        raise LplrValueError(
            "Expected a number of bits for a group's backbone (--backbone B0): compress-group sizes each matrix "
            "by the fair rank, with no budget search to choose one. Give --backbone 2 (or 0 for none), or run "
            "lplr compress --bits-per-entry X --backbone auto on one matrix."
        )


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
    sketch: str | None = None,
    cache_input: bool = False,
    log: Callable[[str], None] = logs.info,
    backbone_bits: int = 0,
    backbone_iters: int = 1,
    backbone_start: str | None = None,
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
        counts the codes, ``k·(n·B1 + d·B2) / (n·d)`` (the paper's fair rank) plus a backbone's
        B0, not the bytes on disk as :func:`lplr_dask.compress` does: each store's metadata
        (about 16 KiB) would leave a small matrix of a model no rank at all.
    bits, passes, power_iters, oversample, quantizer, seed, device, precision, sketch, cache_input
    backbone_bits, backbone_iters, backbone_start
        As for :func:`lplr_dask.compress`, the same for every matrix; ``backbone_bits`` a number
        (``"auto"`` is refused: no budget search runs here).
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
    check_backbone(backbone_bits, backbone_iters, backbone_start)
    options = Options(
        bits=bits,
        passes=passes,
        power_iters=power_iters,
        oversample=oversample,
        quantizer=quantizer,
        seed=seed,
        precision=precision,
        sketch=sketch,
        cache_input=cache_input,
        device=device,
        storage_options=storage_options,
        backbone_bits=backbone_bits,
        backbone_iters=backbone_iters,
        backbone_start=backbone_start,
    )
    check_job(overwrite, resume)
    location = os.fspath(source)
    check_output(out, [location], overwrite=overwrite, storage_options=storage_options)
    arrays = list_arrays(location, storage_options=storage_options)
    if not arrays:
        raise LplrValueError(f"Expected a group holding arrays. {location!r} holds none.")
    root_path = os.fspath(out).rstrip("/")
    root, meta = _start_output(
        root_path, location, rule, bits, overwrite=overwrite, resume=resume, storage_options=storage_options
    )
    entries = []
    t_start = time.perf_counter()
    widths = (max(map(len, arrays)), max(len("x".join(map(str, shape))) for shape, _ in arrays.values()))
    with get_client(log=log) as client:
        for i, (name, (shape, dtype)) in enumerate(arrays.items()):
            k, reason = plan_rank(shape, dtype, bits, **rule, backbone_bits=options.backbone_bits)  # type: ignore[arg-type]
            k, cap = _capped(name, k, rule, log)
            log(
                f"array {i + 1}/{len(arrays)}: {name} ({'x'.join(map(str, shape))} {dtype}): "
                + (f"rank {k}" if k else f"copy, {reason}")
            )
            parent = name.rpartition("/")[0]
            if parent:
                root.require_group(parent)
            member_of = _Member(location, root_path, name, shape, dtype)
            if k:
                entry = _compress_member(
                    member_of, k, options, client=client, resume=resume, evaluate=evaluate, log=log, cap=cap
                )
            else:
                entry = _copy_member(member_of, reason, storage_options)
            entries.append(entry)
            log(_row(i + 1, len(arrays), entry, widths))
    meta.update(arrays=entries, totals=_totals(entries, root_path, time.perf_counter() - t_start, storage_options))
    meta["complete"] = True
    store.write_meta(root, meta, "lplr_group")
    return {"store": root_path, **meta}


def _start_output(
    root_path: str,
    location: str,
    rule: dict[str, float],
    bits: tuple[int, int],
    *,
    overwrite: bool,
    resume: bool,
    storage_options: dict[str, Any] | None,
) -> tuple[Any, dict[str, Any]]:
    """Create the output group (or reopen it to resume) and write its attrs, not complete."""
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
    store.write_meta(root, meta, "lplr_group")
    return root, meta


class _Member(NamedTuple):
    """One array of the input group and where its result goes."""

    location: str
    root: str
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def source(self) -> str:
        return member(self.location, self.name)

    @property
    def target(self) -> str:
        return f"{self.root}/{self.name}"


def _capped(name: str, k: int, rule: dict[str, float], log: Callable[[str], None]) -> tuple[int, dict[str, int] | None]:
    """The rank a budget rule gives an array, at most ``lplr.max-rank`` (as :func:`lplr_dask.compress`
    caps it: :func:`lplr_dask.budget.capped_rank`), and the cap it met (None if none). A rank
    asked for (``rank``) is never capped."""
    top = configured_max_rank()
    if "rank" in rule or k <= top:
        return k, None
    log(
        f"warning: {name}: the rule allows rank {k}, capped at {top} ({MAX_RANK_KEY}): {budget.CENTRAL_STEPS}. "
        f"To take rank {k}, raise the cap with DASK_LPLR__MAX_RANK={k}."
    )
    return top, {"requested": k, "max_rank": top}


def _compress_member(
    m: _Member,
    rank: int,
    options: Options,
    *,
    client: Any,
    resume: bool,
    evaluate: bool,
    log: Callable[[str], None],
    cap: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Compress one matrix of the group at ``rank`` (``cap``: the rank cap it met); its entry of the result."""
    t0 = time.perf_counter()
    factors = compress_at_rank(
        m.source,
        m.target,
        rank,
        options,
        client=client,
        overwrite=not resume,
        resume=resume,
        log=log,
        attrs={"rank_cap": cap} if cap else None,
    )
    if evaluate:
        evaluate_error(m.source, factors, storage_options=options.storage_options)
    entry = {
        "name": m.name,
        "shape": list(m.shape),
        "dtype": m.dtype,
        "action": "lplr",
        "reason": "",
        "rank": rank,
        **({"rank_cap": cap} if cap else {}),
        "bits": list(options.bits),
        "error_estimate": factors.attrs.get("error_estimate"),
        "error_exact": factors.attrs.get("error_exact"),
    }
    return _sized(entry, factors.nbytes, time.perf_counter() - t0)


def _copy_member(m: _Member, reason: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Copy one array of the group as it is (``reason``: why it is not compressed); its entry."""
    t0 = time.perf_counter()
    src = read_source(m.source, storage_options=storage_options)
    store.write_array(
        regular(src.array),
        m.target,
        overwrite=True,
        label=f"copy {m.name}",
        storage_options=storage_options,
        attrs={"lplr_copy": {"reason": reason, "source_dtype": m.dtype}},
    )
    entry = {
        "name": m.name,
        "shape": list(m.shape),
        "dtype": m.dtype,
        "action": "copy",
        "reason": reason,
        "rank": None,
        "bits": None,
        "error_estimate": 0.0,
        "error_exact": 0.0,
    }
    return _sized(entry, store.bytes_on_disk(m.target, storage_options=storage_options), time.perf_counter() - t0)


def _sized(entry: dict[str, Any], nbytes: int, seconds: float) -> dict[str, Any]:
    """``entry`` with its bytes on disk, bits per entry, compression ratio and seconds."""
    size = int(np.prod(entry["shape"], dtype=np.int64))
    return {
        **entry,
        "bytes_on_disk": nbytes,
        "bits_per_entry": nbytes * 8 / max(size, 1),
        "compression_ratio": size * itemsize(entry["dtype"]) / nbytes,
        "seconds": round(seconds, 3),
    }


def _totals(
    entries: list[dict[str, Any]], root: str, seconds: float, storage_options: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``totals`` of a group's result."""
    source_bytes = sum(int(np.prod(e["shape"], dtype=np.int64)) * itemsize(e["dtype"]) for e in entries)
    total_bytes = store.bytes_on_disk(root, storage_options=storage_options)
    return {
        "arrays": len(entries),
        "compressed": sum(e["action"] == "lplr" for e in entries),
        "copied": sum(e["action"] == "copy" for e in entries),
        "source_bytes": source_bytes,
        "bytes_on_disk": total_bytes,
        "compression_ratio": source_bytes / total_bytes,
        "seconds": round(seconds, 3),
    }


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

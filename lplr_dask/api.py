"""The public entry points: :func:`compress` and :func:`evaluate`."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from lplr_dask import budget, chunking, guard, job, logs, store, target
from lplr_dask.errors import LplrValueError
from lplr_dask.factors import Factors, open_factors, relative_error
from lplr_dask.options import (
    BACKBONE_STARTS,
    DEFAULT_BITS,
    Options,
    SizeRule,
    check_backbone_rounds,
    check_job,
    is_backbone_search,
)
from lplr_dask.quantize import QuantizerSpec
from lplr_dask.sources import open_source

__all__ = ["compress", "evaluate", "resolve_rank", "check_backbone_args", "DEFAULT_BITS", "MAX_COORD_ENTRIES"]

#: The largest coordinate (entries) of an xarray input that the attrs record; larger ones are
#: left out, with a note (the attrs are one JSON document that every open reads whole).
MAX_COORD_ENTRIES = 100_000


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
    """The rank from exactly one of ``rank``, ``bits_per_entry``, ``match_nq``
    (:func:`lplr_dask.budget.resolve_rank` of their :class:`~lplr_dask.options.SizeRule`): a
    budget's or fair rank above the Dask config ``lplr.max-rank`` is capped at it, with a warning.

    Raises
    ------
    LplrValueError
        If none or more than one is given, or the rank is outside ``1..min(n, d)``.
    """
    size = SizeRule.from_args(rank=rank, bits_per_entry=bits_per_entry, match_nq=match_nq)
    return budget.resolve_rank(shape, bits, size, specs=specs or budget.PAPER_SPECS, chunks=chunks)


_client = job.cluster_client  # api._client: the name tests replace to run without a cluster


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
    sketch: str | None = None,
    cache_input: bool = False,
    log: Callable[[str], None] = logs.info,
    appendable: bool = False,
    backbone_bits: int | str = 0,
    backbone_iters: int = 1,
    backbone_start: str | None = None,
) -> Factors:
    """Compress a matrix into a low-rank, low-precision factorization ``A ≈ L·R`` [1]_.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, dask.array.Array, numpy.ndarray, xarray.DataArray or torch.Tensor
        The matrix (n × d): a path or URL of a Zarr array (v3 or v2, also inside a group:
        ``IN.zarr/path/to/array``), a ``.npy`` file, an HDF5 dataset (``FILE.h5:/dataset``), a
        safetensors tensor (``FILE.safetensors:name``), an open Zarr array, or a dask or numpy
        array. See :mod:`lplr_dask.sources` for the dtype policy. A 2-D ``xarray.DataArray`` is
        compressed as its data (dask-backed stays lazy) and its dims, name and coordinates of at
        most :data:`MAX_COORD_ENTRIES` entries (0-D or 1-D) are recorded in the attrs
        (``source.dims``, ``source.name``, ``source.coords``) for
        :meth:`~lplr_dask.factors.Factors.to_xarray`; larger or multi-dimensional coordinates are
        left out with a note. A CPU ``torch.Tensor`` is read through ``.numpy()``; a bfloat16
        one is widened to float32 (exact) and recorded as ``"bfloat16"``.
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
        twice as fast per chunk on a CPU as float64 products (measured: benchmarks/RESULTS.md,
        "Compress vs read pass and svd_compressed"). ``"float64"`` makes the codes identical for
        any chunking of A; with float32 products another chunking can move a few codes of L by one
        level where a value lies within about 1e-7 of a rounding boundary (more with the default
        oversampling, whose top directions move by the float32 noise over the spectral gap at k),
        and then R's codes, solved against that L, by one level (nearest rounding) or a few (gptq
        rounding), for a tiny change of the error (measured: benchmarks/RESULTS.md, "Figures
        behind the code's comments"). See :mod:`lplr_dask.blocks`.
    sketch : {"gaussian", "sparse"}, optional
        The range sketch S of pass 1. ``"gaussian"``: the paper's dense N(0, 1/k) matrix, a GEMM
        per chunk. ``"sparse"``: a sparse sign embedding with 4 non-zeros per row in runs of 16
        columns (:mod:`lplr_dask.lanes`), applied by a compiled kernel at a fraction of the GEMM's
        cost, with about the same error once oversampled and mixed as the default does (measured:
        benchmarks/RESULTS.md, "CPU cost of a pass"). Recorded in the attrs; a sketch of fewer
        than 16 columns (k + p < 16) is Gaussian either way. Default (None):
        :data:`lplr_dask.options.DEFAULT_SKETCH`.
    cache_input : bool, default=False
        Two-pass mode: read and decode A once, keep its chunks in the workers' memory, and run
        both passes from there, saving the second decode of the source. Only when A fits below
        the workers' spill threshold with room for the passes' tasks
        (:func:`lplr_dask.chunking.cache_room`); otherwise a note says so and each pass reads the
        source as without it. The codes are the same either way.
    log : callable, default=lplr_dask.logs.info
        Receives what the compression chose and did; each step's progress goes to the ``lplr_dask``
        logger (:mod:`lplr_dask.progress`).
    appendable : bool, default=False
        Keep the one-pass sketches in the store (``passes=1`` only), so that
        :func:`lplr_dask.append` can add rows or columns later without reading A again
        (docs/FORMAT.md, "Appendable stores"); :func:`lplr_dask.finalize` removes them.
    backbone_bits : int, default=0
        ``B0``: compress ``A ≈ Q + L·R`` with a ``B0``-bit backbone Q in A's chunking (a range
        per column of each row chunk, :mod:`lplr_dask.backbone`) and the factors of ``A − Q̂``,
        for matrices that are not low rank (weights, heavy tails; benchmarks/RESULTS.md,
        "Beyond low rank"). 0: no backbone. The store is format version 3. ``"auto"`` with
        ``bits_per_entry`` and no ``bits``: the budget search chooses B0 from
        :data:`lplr_dask.budget.BACKBONE_GRID` (0 included) with the rank and bits, one read of A
        per B0 (:func:`lplr_dask.budget.choose_backbone`).
    backbone_iters : int, default=1
        Rounds T: each codes ``Q = Q_B0(A − L̂·R̂)`` (``Q_B0(A)`` first), then the factors of
        ``A − Q̂`` again; one more read of A and the passes again per round.
    backbone_start : {"backbone", "factors"}, optional
        The first round from ``Q = Q_B0(A)`` (the default), or from the factors of A (the passes
        of A itself first, then ``Q = Q_B0(A − L̂·R̂)``): better on matrices close to low rank,
        and on low rank plus outliers (benchmarks/RESULTS.md, "Beyond low rank"). With
        ``backbone_bits="auto"`` and no start, the search predicts both and takes the better.

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
    size = SizeRule.from_args(rank=rank, bits_per_entry=bits_per_entry, match_nq=match_nq, target_error=target_error)
    search_backbone = check_backbone_args(
        size, bits, appendable=appendable, backbone_bits=backbone_bits, iters=backbone_iters, start=backbone_start
    )
    options = Options(
        bits=DEFAULT_BITS if bits is None else bits,
        passes=passes,
        power_iters=power_iters,
        oversample=oversample,
        quantizer=quantizer,
        seed=seed,
        test_columns=test_columns,
        precision=precision,
        sketch=sketch,
        cache_input=cache_input,
        device=device,
        storage_options=storage_options,
        appendable=appendable,
        backbone_bits=0 if search_backbone else backbone_bits,  # type: ignore[arg-type]  # a str fails there
        backbone_iters=backbone_iters,
        backbone_start=backbone_start,
    )
    check_job(overwrite, resume)
    source, recorded = _as_input(source, log)
    guard.check_output(out, [source], overwrite=overwrite, storage_options=storage_options)
    with _client(log, device) as client:
        factors = _compress(
            source,
            out,
            size,
            options,
            choose_bits=bits is None,
            search_backbone=search_backbone,
            client=client,
            overwrite=overwrite,
            resume=resume,
            log=log,
        )
    return _record_source(factors, recorded) if recorded else factors


def check_backbone_args(
    size: SizeRule, bits: Any, *, appendable: bool, backbone_bits: Any, iters: Any, start: Any
) -> bool:
    """Whether the budget search chooses the backbone (``backbone_bits="auto"``), after refusing
    what cannot go with it or without one (the CLI checks this before a cluster starts).

    Raises
    ------
    LplrValueError
        For ``"auto"`` without a bits-per-entry budget, with ``bits`` or with ``appendable``; for
        rounds or a start without a backbone (:func:`lplr_dask.options.check_backbone_rounds`).
    """
    search = is_backbone_search(backbone_bits)
    if search and (size.kind != "bits_per_entry" or bits is not None):
        raise LplrValueError(
            "Expected backbone_bits='auto' (--backbone auto) with bits_per_entry (--bits-per-entry) and no bits "
            "(--bits): the budget search chooses the backbone with the rank and bits. Give a number of bits instead."
        )
    if search and appendable:
        raise LplrValueError(
            "Expected appendable=True (--appendable) without a backbone: an append updates the one-pass sketches "
            "of A, and a backbone the search may choose would make them sketches of A − Q. Drop --backbone auto."
        )
    check_backbone_rounds(backbone_bits, iters, start)
    return search


def _is_instance(x: Any, module: str, name: str) -> bool:
    """Whether ``x`` is a ``module.name`` without importing ``module`` (optional: if it is not
    imported yet, ``x`` cannot be one)."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(x, getattr(mod, name))


def _as_input(source: Any, log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """An xarray.DataArray or torch.Tensor as an array :func:`lplr_dask.sources.read_source`
    takes, and what the attrs' ``source`` should record of it beyond that (empty for any other
    input, which is returned as it is).

    Raises
    ------
    LplrValueError
        For a tensor that is not on the CPU.
    """
    if _is_instance(source, "xarray", "DataArray"):
        return _from_xarray(source, log)
    if _is_instance(source, "torch", "Tensor"):
        return _from_torch(source)
    return source, {}


def _from_xarray(source: Any, log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """The data of a DataArray (dask or numpy) and its dims, name and small coordinates."""
    recorded: dict[str, Any] = {"dims": [str(d) for d in source.dims]}
    if isinstance(source.name, str):
        recorded["name"] = source.name
    coords, left_out = {}, []
    for name, coord in source.coords.items():
        entry = _coord_entry(coord)
        if entry is None:
            left_out.append(f"{name} {tuple(coord.shape)} {coord.dtype}")
        else:
            coords[str(name)] = entry
    recorded["coords"] = coords
    if left_out:
        log(
            f"note: coordinates not recorded (only 0-D or 1-D ones of at most {MAX_COORD_ENTRIES} numbers, "
            f"strings or dates are): {', '.join(left_out)}"
        )
    data = source.data
    return (data if hasattr(data, "dask") else np.asarray(data)), recorded


def _coord_entry(coord: Any) -> dict[str, Any] | None:
    """A coordinate as JSON (``dims``, ``dtype``, ``values``), or None when it is too large, has
    more than one dim, or holds values other than numbers, strings and dates."""
    values = np.asarray(coord.values)
    if values.ndim > 1 or values.size > MAX_COORD_ENTRIES:
        return None
    kind = values.dtype.kind
    if kind == "M":
        listed: Any = np.datetime_as_string(values).tolist()
    elif kind == "m":
        listed = values.astype(np.int64).tolist()
    elif kind in "biufU" or (kind == "O" and all(isinstance(v, str) for v in values.ravel())):
        listed = values.tolist()
    else:
        return None
    return {"dims": [str(d) for d in coord.dims], "dtype": values.dtype.str, "values": listed}


def _from_torch(source: Any) -> tuple[Any, dict[str, Any]]:
    """A CPU tensor as numpy (bfloat16 widened to float32, and recorded as bfloat16)."""
    import torch

    if source.device.type != "cpu":
        raise LplrValueError(
            f"Expected a torch.Tensor on the CPU. Got one on {source.device} instead. Pass tensor.cpu()."
        )
    tensor = source.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.to(torch.float32).numpy(), {"dtype": "bfloat16"}
    return tensor.numpy(), {}


def _record_source(factors: Factors, recorded: dict[str, Any]) -> Factors:
    """Add ``recorded`` to the attrs' ``source`` of the completed store; the reopened factors."""
    group = store.open_group(factors.path, mode="r+", storage_options=factors.storage_options)
    meta = store.read_meta(group, path=factors.path)
    meta["source"] = {**meta["source"], **recorded}
    store.write_meta(group, meta)
    return open_factors(factors.path, storage_options=factors.storage_options)


def _compress(
    source: Any,
    out: str | os.PathLike[str],
    size: SizeRule,
    options: Options,
    *,
    choose_bits: bool,
    client: Any,
    overwrite: bool,
    resume: bool,
    log: Callable[[str], None],
    search_backbone: bool = False,
) -> Factors:
    """:func:`compress`'s body, for validated arguments: the rank from ``size``, then the worker.

    ``choose_bits``: no bits were given, so a bits-per-entry budget chooses them with the rank;
    ``search_backbone``: and the backbone's bits too (:func:`lplr_dask.budget.choose_backbone`).
    """
    if size.kind == "target_error":
        return target.meet_target(
            source, out, size.value, options, client=client, overwrite=overwrite, resume=resume, log=log
        )
    matrix = job.open_matrix(source, options, log=log)
    A = matrix[1]
    chunks = (int(A.chunks[0][0]), int(A.chunks[1][0]))
    size = budget.without_backbone(size, A.shape, options.backbone_bits, chunks)  # Q's bytes count too
    if size.kind == "bits_per_entry" and choose_bits:
        search: Callable[..., budget.Choice] = budget.choose
        if search_backbone:
            starts = (options.backbone_start,) if options.backbone_start else BACKBONE_STARTS
            search = functools.partial(budget.choose_backbone, starts=starts)
        choice = search(
            A,
            size.value,
            specs=options.specs,
            seed=options.seed,
            passes=options.passes,
            power_iters=options.power_iters,
            oversample=options.oversample,
            test_columns=options.test_columns,
            log=log,
            strips=chunking.strips(A, matrix[0]),
        )
        k, cap = choice.rank, None
        options = options.replace(
            bits=choice.bits,
            backbone_bits=choice.backbone_bits or options.backbone_bits,
            backbone_start=choice.backbone_start if choice.backbone_bits else options.backbone_start,
        )
    else:
        k, cap = budget.capped_rank(A.shape, options.bits, size, specs=options.specs, chunks=chunks, log=log)
    return job.compress_at_rank(
        source,
        out,
        k,
        options,
        client=client,
        overwrite=overwrite,
        resume=resume,
        matrix=matrix,
        attrs=None if cap is None else {"rank_cap": cap},
        log=log,
    )


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


_version = job.package_version  # the name before issue 17

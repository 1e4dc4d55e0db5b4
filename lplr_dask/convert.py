"""``lplr convert``: stream a ``.npy``, HDF5 dataset, safetensors tensor or Zarr array into Zarr v3,
or every array of a group (an HDF5 or safetensors file, a sharded checkpoint's
``model.safetensors.index.json``, a Zarr group) into a Zarr v3 group.

Each task reads one block of the source (see :class:`lplr_dask.sources.FileArray`) and writes it
as one whole chunk of the output, so memory holds a few blocks whatever the source's size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import zarr

from lplr_dask import guard, logs, store
from lplr_dask.sources import list_arrays, member, read_source, regular

__all__ = ["convert", "convert_group"]


def convert(
    source: Any,
    out: str | os.PathLike[str],
    *,
    chunks: Any = "auto",
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = logs.info,
) -> zarr.Array:
    """Write ``source`` to a chunked Zarr v3 array at ``out``, block by block.

    Parameters
    ----------
    source : str, os.PathLike or array
        ``W.npy``, ``FILE.h5:/dataset``, ``FILE.safetensors:name``, a Zarr array (v2 or v3, local
        or remote) or an array; see :func:`lplr_dask.sources.read_source`.
    out : str or os.PathLike
        The output array: a local path or an fsspec URL.
    chunks : str or tuple, default="auto"
        The output's chunk shape; ``"auto"`` keeps a Zarr source's chunks and picks blocks of
        about dask's ``array.chunk-size`` for files.
    overwrite : bool, default=False
    storage_options : dict, optional
        fsspec options for remote source or output.
    log : callable, default=lplr_dask.logs.info
        Receives what is converted; the write's progress goes to the ``lplr_dask`` logger
        (:mod:`lplr_dask.progress`).

    Returns
    -------
    zarr.Array
        The output; its attrs ``lplr_convert`` record the source, its format and its dtype
        (bfloat16 is stored as float32, which holds every bfloat16 value exactly).

    Raises
    ------
    SourceNotFoundError, LplrValueError, LplrTypeError
        For a missing or ambiguous source.
    OutputExistsError
        If ``out`` exists and ``overwrite`` is false.
    LplrValueError
        If ``out`` is, contains or lies inside the source, or ``overwrite`` would replace
        something this tool did not write (:func:`lplr_dask.guard.check_output`).
    """
    guard.check_output(out, [source], overwrite=overwrite, storage_options=storage_options)
    src = read_source(source, storage_options=storage_options, chunks=chunks)
    A = src.array
    if src.format in ("zarr", "dask") and chunks != "auto":
        A = A.rechunk(chunks)
    A = regular(A)
    shape = "x".join(map(str, A.shape))
    log(f"convert {src.format} {shape} {src.dtype} -> {os.fspath(out)} (chunks {'x'.join(map(str, A.chunksize))})")
    arr = store.write_array(
        A,
        out,
        overwrite=overwrite,
        label=f"convert {shape}",
        storage_options=storage_options,
        attrs={"lplr_convert": {"source": src.path, "format": src.format, "source_dtype": src.dtype}},
    )
    return arr


def convert_group(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    chunks: Any = "auto",
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = logs.info,
) -> zarr.Group:
    """Write every array of a group to a Zarr v3 group at ``out``, one array after another.

    Parameters
    ----------
    source : str or os.PathLike
        An HDF5 or safetensors file, the ``*.index.json`` of a sharded safetensors checkpoint
        (its tensors are read from the shards it names), or a Zarr group.
    out : str or os.PathLike
        The output group: ``out/<name>`` for each array (:func:`convert`; ``chunks`` applies to
        its matrices, other arrays take ``"auto"``).
    chunks, overwrite, storage_options, log
        As for :func:`convert`.

    Returns
    -------
    zarr.Group
        The output; its attrs ``lplr_convert`` record the source, ``"format": "group"``, the
        arrays' names and ``complete`` (true once every array is written).

    Raises
    ------
    As :func:`convert`. A failed conversion removes the partial output.
    """
    location = os.fspath(source)
    guard.check_output(out, [location], overwrite=overwrite, storage_options=storage_options)
    arrays = list_arrays(location, storage_options=storage_options)
    root = store.create_group(out, overwrite=overwrite, storage_options=storage_options)
    meta = {"source": location, "format": "group", "arrays": list(arrays), "complete": False}
    store.write_meta(root, meta, "lplr_convert")
    base = os.fspath(out).rstrip("/")
    try:
        for i, (name, (shape, dtype)) in enumerate(arrays.items()):
            log(f"array {i + 1}/{len(arrays)}: {name} ({'x'.join(map(str, shape))} {dtype})")
            parent = name.rpartition("/")[0]
            if parent:
                root.require_group(parent)
            convert(
                member(location, name),
                f"{base}/{name}",
                chunks=chunks if len(shape) == 2 else "auto",
                overwrite=True,
                storage_options=storage_options,
                log=log,
            )
    except BaseException:
        store.discard(out, storage_options)
        raise
    store.write_meta(root, {**meta, "complete": True}, "lplr_convert")
    return root

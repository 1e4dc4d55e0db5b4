"""Synthetic test matrices written to Zarr chunk by chunk (never whole in memory).

``A = U·diag(s)·Vᵀ + noise``: U (n×r) and V (d×r) are Gaussian with unit-norm columns in
expectation, generated block-wise from the seed like the sketches; the noise is drawn per output
chunk. ``noise`` is the noise's Frobenius norm relative to the low-rank part's.

Kinds
-----
- ``lowrank``: geometric spectrum ``s_i = decay**i``, Gaussian noise.
- ``poly``: polynomial spectrum ``s_i = (i + 1)**(-decay)``, Gaussian noise.
- ``student-t``: geometric spectrum with Student-t (3 degrees of freedom) noise: heavy tails.
"""

from __future__ import annotations

import math
import os
from typing import Any

import dask.array as da
import numpy as np
import zarr

from lplr_dask import guard, store
from lplr_dask.errors import LplrValueError
from lplr_dask.sketch import sketch_rows
from lplr_dask.validation import parse_choice, parse_float, parse_int

__all__ = ["KINDS", "spectrum", "synthetic", "generate", "parse_shape"]

KINDS = ("lowrank", "poly", "student-t")
_STREAM_U, _STREAM_V = 10, 11


def parse_shape(text: str) -> tuple[int, int]:
    """Read ``"200000x20000"`` as ``(200000, 20000)``."""
    try:
        n, d = (int(x) for x in text.lower().split("x"))
        if n < 1 or d < 1:
            raise ValueError
    except ValueError as e:
        raise LplrValueError(f"Expected a shape like 20000x10000. Got {text!r} instead.") from e
    return n, d


def spectrum(kind: str, rank: int, decay: float) -> np.ndarray:
    """The singular values of the low-rank part."""
    i = np.arange(rank, dtype=np.float64)
    if kind == "poly":
        return (i + 1) ** (-decay)
    return decay**i


def synthetic(
    shape: tuple[int, int],
    *,
    rank: int = 64,
    decay: float = 0.9,
    noise: float = 0.01,
    kind: str = "lowrank",
    chunks: tuple[int, int] = (4096, 4096),
    seed: int = 0,
    dtype: Any = np.float32,
) -> da.Array:
    """The lazy matrix (see the module docstring); each chunk is generated on its own.

    Raises
    ------
    LplrValueError
        For an unknown kind, a rank that is not an integer from 1 to ``min(shape)``, or a noise
        level that is negative or not finite.
    """
    parse_choice(kind, "kind (--kind)", KINDS)
    n, d = shape
    rank = parse_int(rank, f"rank (--rank) of a {n}x{d} matrix", minimum=1, maximum=min(n, d))
    noise = parse_float(noise, "noise (--noise)", low=0)
    s = spectrum(kind, rank, decay)
    sigma = noise * float(np.linalg.norm(s)) / math.sqrt(n * d)
    chunks = (min(chunks[0], n), min(chunks[1], d))

    def block(block_info: Any = None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        i, j = block_info[None]["chunk-location"]
        u = sketch_rows(seed, _STREAM_U, r0, r1, rank, scale=1 / math.sqrt(n))
        v = sketch_rows(seed, _STREAM_V, c0, c1, rank, scale=1 / math.sqrt(d))
        out = (u * s) @ v.T
        if sigma > 0:
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(20, i, j)))
            if kind == "student-t":
                e = rng.standard_t(3, size=out.shape) / math.sqrt(3.0)  # unit variance
            else:
                e = rng.standard_normal(out.shape)
            out += sigma * e
        return out.astype(dtype)

    return da.map_blocks(
        block, chunks=da.core.normalize_chunks(chunks, shape), dtype=dtype, meta=np.empty((0, 0), dtype)
    )


def generate(
    out: str | os.PathLike[str],
    shape: tuple[int, int],
    *,
    overwrite: bool = False,
    chunks: tuple[int, int] = (4096, 4096),
    **kwargs: Any,
) -> zarr.Array:
    """Write :func:`synthetic` to a Zarr v3 array at ``out``, chunk by chunk (:func:`lplr_dask.store.write_array`).

    Raises
    ------
    OutputExistsError
        If ``out`` exists and ``overwrite`` is false.
    LplrValueError
        If ``overwrite`` would replace something this tool did not write.
    """
    guard.check_output(out, [], overwrite=overwrite)
    A = synthetic(shape, chunks=chunks, **kwargs)
    attrs = {"lplr_generate": {k: str(v) if k == "dtype" else v for k, v in kwargs.items()}}
    return store.write_array(A, out, overwrite=overwrite, attrs=attrs, label=f"generate {shape[0]}x{shape[1]}")

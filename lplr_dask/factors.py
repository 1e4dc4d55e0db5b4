"""Using a compressed matrix: lazy reconstruction, products, error, storage figures."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
from dask.utils import format_bytes, parse_bytes

from lplr_dask import backbone, schema, store
from lplr_dask.backend import like
from lplr_dask.errors import LplrTypeError, LplrValueError, StoreFormatError
from lplr_dask.factorize import decode_factor
from lplr_dask.progress import compute
from lplr_dask.quantize import QuantizerSpec
from lplr_dask.sources import cast_to, output_dtype, read_source, zarr_array_of

if TYPE_CHECKING:
    import xarray
    from scipy.sparse.linalg import LinearOperator

__all__ = ["Factors", "open_factors", "open_dataarray", "relative_error", "product_error", "decode_factor"]


def _check_index(index: Any, what: str) -> None:
    """Raise LplrTypeError unless ``index`` is an int, a slice, or a 1-D int/bool sequence."""
    if isinstance(index, (slice, int, np.integer)) and not isinstance(index, bool):
        return
    if isinstance(index, (list, tuple, np.ndarray)):
        arr = np.asarray(index)
        if arr.ndim == 1 and (arr.dtype.kind in "iub" or arr.size == 0):
            return
    raise LplrTypeError(
        f"Expected {what} to be an int, a slice, or a 1-D sequence of ints or booleans. Got "
        f"{type(index).__name__} {index!r} instead."
    )


def _chain(first: da.Array, second: da.Array, X: Any, name: str) -> np.ndarray:
    """``second·(first·X)`` in float64, the thin middle product computed first."""
    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] != first.shape[1]:
        raise LplrValueError(f"Expected {name} with {first.shape[1]} rows. Got shape {X.shape} instead.")
    return (second @ (first @ X).compute()).compute()


class Factors:
    """A compressed matrix ``A ≈ L·R`` in an ``*.lplr.zarr`` store.

    Nothing is read until asked: :meth:`L`, :meth:`R` and :meth:`to_dask` are lazy dask arrays
    decoded block by block from the codes. Opening reads the attrs (checked by
    :mod:`lplr_dask.schema`), each array's metadata, the scales and offsets, and one listing of
    each array's chunk keys: a store that lacks a chunk is refused there, and a chunk that fails
    to decode later raises :class:`~lplr_dask.errors.StoreFormatError` naming it.

    It is an array-like of the reconstruction ``L·R``: ``shape``, ``dtype``, ``ndim`` and ``size``
    are the source's; ``factors @ x`` and ``y @ factors`` are products through the thin factors
    (:meth:`matmat`, :meth:`rmatmat`); ``np.asarray(factors)`` reconstructs up to the Dask config
    ``lplr.array.max-bytes``; ``factors[rows, cols]`` is a block of it in memory (NumPy, as
    ``dask.array.from_array(factors, chunks=...)`` needs) and :meth:`block` the same block
    lazily; :meth:`to_dask` is the whole reconstruction, lazily, and :meth:`to_xarray` that as a
    DataArray with the source's dims and coords.

    Attributes
    ----------
    path : str
    storage_options : dict or None
        fsspec options for a remote store.
    attrs : dict
        The store's ``lplr`` attrs (parameters, timings, errors).
    shape : (int, int)
    dtype : numpy.dtype
        The source's dtype (attrs ``source.dtype``), in which :meth:`to_dask`, indexing and
        ``np.asarray`` reconstruct; float32 for a bfloat16 source, which NumPy cannot hold
        (float32 holds every bfloat16 value exactly). Integers are rounded and clipped to it.
    rank : int
    bits : (int, int)
    """

    #: NumPy defers to :meth:`__rmatmul__` for ``ndarray @ factors`` instead of reconstructing it.
    __array_ufunc__ = None
    ndim = 2

    def __init__(self, path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None):
        self.path = os.fspath(path)
        self.storage_options = storage_options
        self._group = store.open_group(self.path, storage_options=storage_options)
        self.attrs: dict[str, Any] = store.read_meta(self._group, path=self.path)
        self.shape: tuple[int, int] = tuple(self.attrs["source"]["shape"])  # type: ignore[assignment]
        self.dtype: np.dtype = _source_dtype(self.attrs["source"]["dtype"], self.path)
        self.rank: int = int(self.attrs["rank"])
        self.bits: tuple[int, int] = tuple(self.attrs["bits"])  # type: ignore[assignment]
        q = self.attrs["quantizer"]
        self._spec: dict[str, QuantizerSpec] = {
            side: schema.parse_quantizer_spec(q[side], self.path, f"quantizer.{side}") for side in ("L", "R")
        }
        self._version = int(self.attrs["version"])
        self._arrays = store.open_arrays(self._group, self.attrs, self.path)
        store.check_chunks_present(self._arrays, self.path, version=self._version)
        self._small = {
            name: store.read_small(self._group, name, where=self.path, version=self._version)
            for name in self._arrays
            if not name.endswith("/codes") and not name.startswith("Q/")
        }
        b = self.attrs.get("backbone")
        #: B0 of the quantized backbone ``Q`` (``A ≈ Q + L·R``); 0 without one.
        self.backbone_bits: int = int(b["bits"]) if b else 0

    def __repr__(self) -> str:
        n, d = self.shape
        extra = f", backbone_bits={self.backbone_bits}" if self.backbone_bits else ""
        return f"Factors({self.path!r}, shape=({n}, {d}), rank={self.rank}, bits={self.bits}{extra})"

    def Q(self, dtype: Any = np.float64) -> da.Array | None:
        """The decoded backbone (n × d) of ``A ≈ Q + L·R``, lazily, in A's chunking; None without one."""
        if not self.backbone_bits:
            return None
        arrays = {
            name: store.read_chunks(self._arrays[name], name, self.path, version=self._version)
            for name in schema.BACKBONE_ARRAYS
        }
        return backbone.decoded(arrays["Q/codes"], arrays["Q/scale"], arrays["Q/offset"], dtype)

    def _factor(self, name: str, dtype: Any) -> da.Array:
        codes = f"{name}/codes"
        return decode_factor(
            store.read_chunks(self._arrays[codes], codes, self.path, version=self._version),
            self._small[f"{name}/scale"],
            self._small[f"{name}/offset"],
            self._spec[name],
            channel_axis=1 if name == "L" else 0,
            dtype=dtype,
        )

    def L(self, dtype: Any = np.float64) -> da.Array:
        """The decoded left factor (n × k), lazily."""
        return self._factor("L", dtype)

    def R(self, dtype: Any = np.float64) -> da.Array:
        """The decoded right factor (k × d), lazily."""
        return self._factor("R", dtype)

    @property
    def size(self) -> int:
        """Entries of the matrix, ``n·d``."""
        return self.shape[0] * self.shape[1]

    def to_dask(self, dtype: Any = None) -> da.Array:
        """The reconstruction ``L·R`` (n × d) as a lazy dask array, chunked like the source.

        ``dtype`` defaults to the source's (:attr:`dtype`); the product is formed in float64
        and then cast (integers rounded and clipped).
        """
        product = self.L() @ self.R()
        Q = self.Q()
        if Q is not None:
            product = product.rechunk(Q.chunks) + Q
        return cast_to(product, self.dtype if dtype is None else dtype)

    def block(self, rows: Any = slice(None), cols: Any = slice(None)) -> da.Array:
        """A block of the reconstruction, ``L[rows]·R[:, cols]``, as a lazy dask array.

        Equals ``self.to_dask()[rows, cols]`` (the source's dtype) but decodes only the row
        chunks of L and the column chunks of R that the block touches. Each index is an int, a
        slice, or a 1-D sequence of ints or booleans; an int drops its axis. The axes are indexed
        independently (orthogonal indexing, like zarr's ``oindex`` or numpy's ``np.ix_``): two
        lists select a block, not points.

        Raises
        ------
        LplrTypeError
            For any other index (``None``, ``...``, floats, 2-D lists).
        """
        _check_index(rows, "rows")
        _check_index(cols, "cols")
        Q = self.Q()
        if Q is None:
            return cast_to(self.L()[rows, :] @ self.R()[:, cols], self.dtype)
        return cast_to(self.L()[rows, :] @ self.R()[:, cols] + Q[rows, :][..., cols], self.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        """``factors[rows, cols]``: that block of the reconstruction in memory, as NumPy.

        Indexes as :meth:`block` does (orthogonally), which reads only the codes the block
        touches, and computes it in this process (the synchronous scheduler: this is what
        ``dask.array.from_array(factors, chunks=...)`` calls in each of its tasks, and the codes
        of one block are a few chunk reads and one thin product). For a lazy block use
        :meth:`block`; for the whole matrix, :meth:`to_dask`.

        Raises
        ------
        LplrTypeError
            For any other index (more than two axes, ``None``, ``...``).
        """
        if isinstance(key, tuple) and len(key) != 2:
            raise LplrTypeError(f"Expected factors[rows] or factors[rows, cols]. Got {len(key)} indices.")
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        return np.asarray(self.block(rows, cols).compute(scheduler="sync")).view(_Block)

    def to_xarray(self, dtype: Any = None) -> xarray.DataArray:
        """The reconstruction as a lazy, dask-backed ``xarray.DataArray`` (:meth:`to_dask`).

        Its dims, name and coordinates are the source's when it was a DataArray (attrs
        ``source.dims``, ``source.name``, ``source.coords``; see :func:`lplr_dask.compress`),
        else dims ``("row", "col")`` and no coordinates. Its ``attrs`` name the store
        (``lplr_store``). Needs xarray (``pip install "lplr-dask[xarray]"``).
        """
        import xarray

        source = self.attrs["source"]
        return xarray.DataArray(
            self.to_dask(dtype),
            dims=tuple(source.get("dims") or store.MATRIX_DIMS),
            coords={name: _coord(entry) for name, entry in (source.get("coords") or {}).items()},
            name=source.get("name"),
            attrs={"lplr_store": self.path},
        )

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(factors)``: the reconstruction in memory, in the source's dtype (or ``dtype``).

        Raises
        ------
        LplrValueError
            If it would take more than the Dask config ``lplr.array.max-bytes`` (use
            :meth:`to_dask` or a product instead), or for ``copy=False``: a reconstruction is
            always a new array.
        """
        target = self.dtype if dtype is None else np.dtype(dtype)
        limit = parse_bytes(dask.config.get("lplr.array.max-bytes"))
        need = self.size * target.itemsize
        if need > limit:
            raise LplrValueError(
                f"Expected a reconstruction of at most {format_bytes(limit)} (Dask config "
                f"'lplr.array.max-bytes'). Got {self.shape[0]}x{self.shape[1]} {target} "
                f"({format_bytes(need)}) instead. Use factors.to_dask() for a lazy array, factors @ x "
                "for products, or raise the limit: dask.config.set({'lplr.array.max-bytes': '8GiB'})."
            )
        if copy is False:
            raise LplrValueError(
                "Expected copy=None or True: a reconstruction of the factors is always a new array. Got copy=False."
            )
        return np.asarray(self.to_dask(target).compute())

    def __matmul__(self, x: Any) -> np.ndarray:
        """``factors @ x`` = ``L·(R·x)`` for x of shape (d,) or (d, m): :meth:`matmat`, float64."""
        if np.ndim(x) not in (1, 2):
            return NotImplemented
        return self.matmat(x)

    def __rmatmul__(self, y: Any) -> np.ndarray:
        """``y @ factors`` = ``(y·L)·R`` for y of shape (n,) or (m, n): :meth:`rmatmat`, float64."""
        if np.ndim(y) not in (1, 2):
            return NotImplemented
        y = np.asarray(y)
        return self.rmatmat(y) if y.ndim == 1 else self.rmatmat(y.T).T

    def matmat(self, X: Any) -> np.ndarray:
        """``L·(R·X)`` without reconstructing, in float64.

        Parameters
        ----------
        X : array_like of shape (d, m) or (d,)

        Returns
        -------
        ndarray of shape (n, m) or (n,)
        """
        out = _chain(self.R(), self.L(), X, "x")
        Q = self.Q()
        return out if Q is None else out + (Q @ np.asarray(X, dtype=np.float64)).compute()

    def matvec(self, x: Any) -> np.ndarray:
        """``L·(R·x)`` for a vector x of length d."""
        return self.matmat(np.ravel(x))

    def rmatmat(self, Y: Any) -> np.ndarray:
        """``Rᵀ·(Lᵀ·Y)`` without reconstructing, in float64.

        Parameters
        ----------
        Y : array_like of shape (n, m) or (n,)

        Returns
        -------
        ndarray of shape (d, m) or (d,)
        """
        out = _chain(self.L().T, self.R().T, Y, "y")
        Q = self.Q()
        return out if Q is None else out + (Q.T @ np.asarray(Y, dtype=np.float64)).compute()

    def rmatvec(self, y: Any) -> np.ndarray:
        """``Rᵀ·(Lᵀ·y)`` for a vector y of length n."""
        return self.rmatmat(np.ravel(y))

    def as_linear_operator(self) -> LinearOperator:
        """The compressed matrix as a :class:`scipy.sparse.linalg.LinearOperator` (float64).

        Products go through :meth:`matmat` and :meth:`rmatmat`: each reads the codes once and
        never forms ``L·R``, so iterative solvers (``svds``, ``lsqr``) work on matrices of any
        size.
        """
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(
            self.shape,
            matvec=self.matvec,
            rmatvec=self.rmatvec,
            matmat=self.matmat,
            rmatmat=self.rmatmat,
            dtype=np.float64,
        )

    def nearest_rows(
        self, queries: Any, k: int = 10, *, metric: str = "cosine", batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows of ``L·R`` nearest to each query, for embeddings.

        Scores come block by block as ``L_b·(R·qᵀ)`` and row norms as ``‖(L·R)_i‖² =
        L_i·(R·Rᵀ)·L_iᵀ``, so a task holds one row chunk of L and a (rows × queries) block of
        scores; ``L·R`` is never formed. The top k are selected per block and merged
        (:func:`dask.array.argtopk`).

        Parameters
        ----------
        queries : array_like of shape (m, d) or (d,)
        k : int, default=10
            Neighbours per query, from 1 to n.
        metric : {"cosine", "euclidean"}, default="cosine"
            Cosine similarity (largest first; a zero row or query scores 0) or Euclidean
            distance (smallest first).
        batch_size : int, default=1024
            Queries per read of L: a score block holds (row chunk × batch_size) float64.

        Returns
        -------
        indices : ndarray of shape (m, k), int64
            Row indices, nearest first.
        scores : ndarray of shape (m, k), float64
            Their cosine similarities or Euclidean distances.

        Raises
        ------
        LplrValueError
            For queries of the wrong width, k outside 1..n, or an unknown metric.
        """
        Q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        n, d = self.shape
        if Q.ndim != 2 or Q.shape[1] != d:
            raise LplrValueError(f"Expected queries of shape (m, {d}) or ({d},). Got {np.shape(queries)} instead.")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise LplrValueError(f"Expected k from 1 to the number of rows ({n}). Got {k!r} instead.")
        if metric not in ("cosine", "euclidean"):
            raise LplrValueError(f"Expected metric 'cosine' or 'euclidean'. Got {metric!r} instead.")
        if self.backbone_bits:
            return self._nearest_reconstructed(Q, k, metric, batch_size)
        L, R = self.L(), self.R()
        RQ, G = dask.compute(R @ Q.T, R @ R.T)  # one read of R
        norms2 = da.maximum(((L @ G) * L).sum(axis=1), 0.0)[:, None]
        indices, scores = [], []
        for start in range(0, Q.shape[0], batch_size):
            q, rq = Q[start : start + batch_size], RQ[:, start : start + batch_size]
            dots = L @ rq
            qn2 = (q * q).sum(axis=1)[None, :]
            if metric == "cosine":
                denom = da.sqrt(norms2) * np.sqrt(qn2)
                score = da.where(denom > 0, dots / da.where(denom > 0, denom, 1.0), 0.0)
            else:
                score = -(norms2 - 2 * dots + qn2)  # larger is nearer
            idx, top = dask.compute(da.argtopk(score, k, axis=0), da.topk(score, k, axis=0))
            indices.append(idx.T.astype(np.int64))
            scores.append(top.T if metric == "cosine" else np.sqrt(np.maximum(-top.T, 0.0)))
        return np.concatenate(indices), np.concatenate(scores)

    def _nearest_reconstructed(
        self, Q: np.ndarray, k: int, metric: str, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`nearest_rows` of a store with a backbone: scores from the reconstruction, a row
        chunk at a time (the backbone has no thin form)."""
        X = self.to_dask(np.float64)
        norms2 = (X * X).sum(axis=1)[:, None]
        indices, scores = [], []
        for start in range(0, Q.shape[0], batch_size):
            q = Q[start : start + batch_size]
            dots = X @ q.T
            qn2 = (q * q).sum(axis=1)[None, :]
            if metric == "cosine":
                denom = da.sqrt(norms2) * np.sqrt(qn2)
                score = da.where(denom > 0, dots / da.where(denom > 0, denom, 1.0), 0.0)
            else:
                score = -(norms2 - 2 * dots + qn2)
            idx, top = dask.compute(da.argtopk(score, k, axis=0), da.topk(score, k, axis=0))
            indices.append(idx.T.astype(np.int64))
            scores.append(top.T if metric == "cosine" else np.sqrt(np.maximum(-top.T, 0.0)))
        return np.concatenate(indices), np.concatenate(scores)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the factors: the sum of the file sizes under the store, metadata
        included, less an appendable store's kept sketches (``lplr finalize`` removes those)."""
        total = store.bytes_on_disk(self.path, storage_options=self.storage_options)
        if not self.attrs.get("appendable"):
            return total
        return total - store.sketch_bytes(self.path, storage_options=self.storage_options)

    @property
    def bits_per_entry(self) -> float:
        """Measured bits per entry of A: ``nbytes × 8 / (n·d)``."""
        n, d = self.shape
        return self.nbytes * 8 / (n * d)

    @property
    def theoretical_bits_per_entry(self) -> float:
        """``k·(n·B1 + d·B2) / (n·d)`` (plus ``B0`` with a backbone), scales not counted."""
        n, d = self.shape
        return self.rank * (n * self.bits[0] + d * self.bits[1]) / (n * d) + self.backbone_bits


class _Block(np.ndarray):
    """A block ``factors[rows, cols]``: a NumPy array that still answers ``.compute()``.

    Until issue 18 indexing returned a lazy dask array; code that called ``.compute()`` on
    it keeps working (with a DeprecationWarning) while the block is now in memory, as
    ``dask.array.from_array`` needs. The lazy block is :meth:`Factors.block`.
    """

    def compute(self, **kwargs: Any) -> np.ndarray:
        """The block as a plain ndarray (deprecated: ``factors[...]`` is already in memory)."""
        warnings.warn(
            "factors[rows, cols] is a NumPy array now; drop .compute(), or use factors.block(rows, cols) "
            "for a lazy dask array",
            DeprecationWarning,
            stacklevel=2,
        )
        return np.asarray(self)


def _coord(entry: dict[str, Any]) -> tuple[tuple[str, ...], np.ndarray]:
    """A coordinate recorded in the attrs (``dims``, ``dtype``, ``values``) as xarray takes it."""
    return tuple(entry["dims"]), np.asarray(entry["values"], dtype=np.dtype(entry["dtype"]))


def _source_dtype(name: str, where: str) -> np.dtype:
    """The NumPy dtype of the reconstruction for the attrs' ``source.dtype`` (bfloat16: float32)."""
    try:
        return output_dtype(name)
    except TypeError as e:
        raise StoreFormatError(
            f"Expected attrs 'lplr.source.dtype' of {where!r} to be a NumPy dtype name or 'bfloat16'. "
            f"Got {name!r} instead. The store is damaged or was not written by lplr-dask; recompress or restore it."
        ) from e


def open_factors(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> Factors:
    """Open a completed ``*.lplr.zarr`` store (a local path or an fsspec URL).

    ``storage_options`` are fsspec options for a remote store (default: the environment's).

    Raises
    ------
    StoreFormatError
        If the store is missing, incomplete, of a newer format version, or damaged: attrs of
        the wrong type, a missing or misshapen array, a missing chunk (named), or scales whose
        chunk does not decode.
    """
    return Factors(path, storage_options=storage_options)


def open_dataarray(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> xarray.DataArray:
    """A Zarr array that is the root of its store as a lazy, dask-backed ``xarray.DataArray``.

    ``lplr decompress``, ``lplr generate`` and ``lplr convert`` write their matrix as the root
    array of a Zarr v3 store (the layout ``lplr compress`` reads back). xarray opens groups only:
    ``xr.open_zarr`` and ``xr.open_dataarray(..., engine="zarr")`` refuse a root array
    (``ContainsArrayError``, xarray 2026.9), so this wraps it instead: the dims are its
    ``dimension_names`` (``dim_0``, … if it has none), the data is read chunk by chunk, a
    damaged chunk is named, and ``attrs`` are the array's. Needs xarray.

    Raises
    ------
    SourceNotFoundError
        If there is no Zarr array at ``path``.
    """
    import xarray

    src = read_source(os.fspath(path), storage_options=storage_options)
    arr = zarr_array_of(src, storage_options)
    names = getattr(arr.metadata, "dimension_names", None)  # Zarr v2 has none
    dims = tuple(names) if names and all(names) else tuple(f"dim_{i}" for i in range(arr.ndim))
    return xarray.DataArray(
        src.array, dims=dims, name=os.path.basename(os.fspath(path).rstrip("/")) or None, attrs=dict(arr.attrs)
    )


def relative_error(A: da.Array, factors: Factors) -> float:
    """Exact ``‖A − L·R‖_F / ‖A‖_F``, streamed in one read of A.

    Each task reads one chunk of A and the codes that cover it, and returns two sums of squares.
    """
    if tuple(A.shape) != factors.shape:
        raise LplrValueError(f"Expected a matrix of shape {factors.shape}. Got {A.shape} instead.")
    return product_error(A, factors.L(), factors.R(), Q=factors.Q())


def product_error(
    A: da.Array, L: da.Array, R: da.Array, *, Q: da.Array | None = None, label: str = "evaluate (one read of A)"
) -> float:
    """``‖A − L·R‖_F / ‖A‖_F`` for lazy factors L (n×k) and R (k×d), streamed in one read of A;
    ``‖A − Q − L·R‖_F / ‖A‖_F`` with a lazy backbone ``Q`` (n×d).

    Each task holds one chunk of A (and of Q) and the rows of L and columns of R that cover it;
    sums of squares are accumulated in float64. A zero A gives ``‖L·R‖_F``.
    """
    Lh = like(L, A).rechunk({0: A.chunks[0], 1: -1})
    Rh = like(R, A).rechunk({0: -1, 1: A.chunks[1]})
    extra = () if Q is None else (like(Q, A).rechunk(A.chunks), "ij")

    def block(a: Any, lb: Any, rb: Any, *q: Any) -> Any:
        a64 = a.astype(np.float64)
        diff = a64 - lb @ rb - (q[0] if q else 0.0)
        return np.array([[[float((diff * diff).sum()), float((a64 * a64).sum())]]])

    parts = da.blockwise(
        block,
        "ijt",
        A,
        "ij",
        Lh,
        "ik",
        Rh,
        "kj",
        *extra,
        new_axes={"t": 2},
        adjust_chunks={"i": 1, "j": 1},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0)),
    )
    (sums,) = compute(label, parts.sum(axis=(0, 1)), chunks_of=A)
    num, den = sums
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))

"""Tests of lplr_dask/factors.py: the compressed form as an operator, against the dense
reconstruction; slicing that reads only the codes it needs; the reader's refusals; evaluate()."""

from __future__ import annotations

import os
import re
import shutil

import dask.array as da
import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import store
from lplr_dask.datasets import synthetic
from lplr_dask.errors import LplrTypeError, LplrValueError, StoreFormatError

SHAPE, CHUNKS = (600, 400), (128, 128)


@pytest.fixture(scope="module", params=["paper", "group48-sym"])
def stored(request, cluster, tmp_path_factory):
    """(factors, A, dense L·R in float64) for a 600×400 matrix compressed at rank 10.

    ``group48`` puts scale groups across chunk boundaries (128 is not a multiple of 48), so
    slicing must take the scales of the rows it keeps.
    """
    from distributed import Client

    A = synthetic(SHAPE, rank=12, decay=0.8, noise=0.01, chunks=CHUNKS, seed=3)
    path = os.fspath(tmp_path_factory.mktemp("factors") / "f.lplr.zarr")
    with Client(cluster):
        f = lplr_dask.compress(A, path, rank=10, bits=(6, 6), quantizer=request.param, log=lambda m: None)
    dense = f.L().compute() @ f.R().compute()
    return f, A.compute(), dense


def test_to_dask_is_the_product_chunked_like_the_source(stored):
    f, _, dense = stored
    recon = f.to_dask()
    assert recon.dtype == np.float32 and recon.chunksize == CHUNKS  # the source's dtype
    np.testing.assert_allclose(recon.compute(), dense, rtol=1e-6, atol=1e-6 * np.abs(dense).max())


def test_products_match_dense(stored):
    f, _, dense = stored
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(SHAPE[1]), rng.standard_normal((SHAPE[1], 3))
    y, Y = rng.standard_normal(SHAPE[0]), rng.standard_normal((SHAPE[0], 3))
    tol = {"rtol": 1e-5, "atol": 1e-5 * np.abs(dense).max()}  # float32 tolerance
    np.testing.assert_allclose(f.matvec(x), dense @ x, **tol)
    np.testing.assert_allclose(f.matvec(x[:, None]), dense @ x, **tol)
    np.testing.assert_allclose(f.matmat(X), dense @ X, **tol)
    np.testing.assert_allclose(f.rmatvec(y), dense.T @ y, **tol)
    np.testing.assert_allclose(f.rmatmat(Y), dense.T @ Y, **tol)


def test_products_refuse_wrong_shapes(stored):
    f, _, _ = stored
    with pytest.raises(LplrValueError, match="400 rows"):
        f.matvec(np.ones(SHAPE[0]))
    with pytest.raises(LplrValueError, match="600 rows"):
        f.rmatmat(np.ones((SHAPE[1], 2)))


def test_linear_operator_matches_dense(stored):
    from scipy.sparse.linalg import LinearOperator, svds

    f, _, dense = stored
    op = f.as_linear_operator()
    assert isinstance(op, LinearOperator) and op.shape == SHAPE
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(SHAPE[1]), rng.standard_normal(SHAPE[0])
    tol = {"rtol": 1e-5, "atol": 1e-5 * np.abs(dense).max()}
    np.testing.assert_allclose(op @ x, dense @ x, **tol)
    np.testing.assert_allclose(op.T @ y, dense.T @ y, **tol)
    np.testing.assert_allclose(op.matmat(np.eye(SHAPE[1])[:, :4]), dense[:, :4], **tol)
    s = svds(op, k=3, return_singular_vectors=False, random_state=0)
    np.testing.assert_allclose(np.sort(s)[::-1], np.linalg.svd(dense, compute_uv=False)[:3], rtol=1e-6)


def _orthogonal(x: np.ndarray, key):
    """``x[key]`` with each axis indexed independently (two lists select a block)."""
    rows, cols = key if isinstance(key, tuple) else (key, slice(None))
    return x[rows][..., cols] if np.ndim(x[rows]) == 2 else x[rows][cols]


@pytest.mark.parametrize(
    "key",
    [
        (slice(130, 250), slice(0, 100)),
        (slice(None, None, 7), slice(390, None)),
        (slice(500, 100, -3), slice(None)),
        ([5, 300, 4, 599], [0, 399, 200]),
        (np.arange(600) % 5 == 0, slice(10, 20)),
        (17, slice(None)),
        (slice(None), 250),
        (599, 3),
        slice(64, 70),
        -1,
    ],
)
def test_slicing_matches_dense(stored, key):
    f, _, dense = stored
    rows, cols = key if isinstance(key, tuple) else (key, slice(None))
    lazy, got = f.block(rows, cols), f[key]
    assert isinstance(lazy, da.Array) and isinstance(got, np.ndarray) and got.dtype == lazy.dtype == np.float32
    want = _orthogonal(dense.astype(np.float32), key)
    assert got.shape == lazy.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(dense).max())
    np.testing.assert_array_equal(lazy.compute(), got)


@pytest.mark.parametrize("key", [(1, 2, 3), (None, 1), (Ellipsis, 1), (1.5, 2), ([[1, 2]], 3)])
def test_slicing_refuses_other_indices(stored, key):
    f, _, _ = stored
    with pytest.raises(LplrTypeError):
        f[key]
    if len(key) == 2:
        with pytest.raises(LplrTypeError):
            f.block(*key)


def _corrupt_all_chunks_but(root: str, name: str, keep: set[tuple[int, int]]) -> int:
    """Overwrite every stored chunk file of ``name`` except those at ``keep`` with garbage."""
    base = os.path.join(root, *name.split("/"), "c")
    n = 0
    for i in os.listdir(base):
        for j in os.listdir(os.path.join(base, i)):
            if (int(i), int(j)) not in keep:
                with open(os.path.join(base, i, j), "wb") as fh:
                    fh.write(b"not a blosc chunk")
                n += 1
    return n


@pytest.mark.parametrize(
    "key, l_chunks, r_chunks",
    [
        ((slice(130, 250), slice(0, 100)), {(1, 0)}, {(0, 0)}),
        (([5, 300], [399, 2]), {(0, 0), (2, 0)}, {(0, 0), (0, 3)}),
        ((550, slice(260, 270)), {(4, 0)}, {(0, 2)}),
    ],
)
def test_slicing_reads_only_the_chunks_it_needs(stored, tmp_path, key, l_chunks, r_chunks):
    f, _, dense = stored
    root = os.fspath(tmp_path / "copy.lplr.zarr")
    shutil.copytree(f.path, root)
    # 5 row chunks of L and 4 column chunks of R: the rest are corrupted, so reading any of them fails
    assert _corrupt_all_chunks_but(root, "L/codes", l_chunks) == 5 - len(l_chunks)
    assert _corrupt_all_chunks_but(root, "R/codes", r_chunks) == 4 - len(r_chunks)
    g = lplr_dask.open_factors(root)
    np.testing.assert_array_equal(g[key], g.block(*key).compute(scheduler="threads"))
    np.testing.assert_allclose(
        g.block(*key).compute(scheduler="threads"),
        _orthogonal(dense.astype(np.float32), key),
        rtol=1e-6,
        atol=1e-6 * np.abs(dense).max(),
    )
    # the corruption bites: the whole of L·R reads the corrupted chunks
    with pytest.raises(StoreFormatError, match=r"chunk [LR]/codes c/\d/\d fails its crc32c checksum"):
        g.to_dask().compute(scheduler="threads")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_rows_match_brute_force(stored, metric):
    f, _, dense = stored
    rng = np.random.default_rng(2)
    queries = np.vstack(
        [dense[[3, 311]] + 1e-3 * rng.standard_normal((2, SHAPE[1])), rng.standard_normal((5, SHAPE[1]))]
    )
    idx, scores = f.nearest_rows(queries, k=6, metric=metric, batch_size=3)
    assert idx.shape == scores.shape == (7, 6) and idx.dtype == np.int64
    if metric == "cosine":
        sim = (queries @ dense.T) / np.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(dense, axis=1))
        want_idx = np.argsort(-sim, axis=1)[:, :6]
        want = np.take_along_axis(sim, want_idx, axis=1)
    else:
        dist = np.linalg.norm(queries[:, None, :] - dense[None, :, :], axis=2)
        want_idx = np.argsort(dist, axis=1)[:, :6]
        want = np.take_along_axis(dist, want_idx, axis=1)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    assert idx[0, 0] == 3 and idx[1, 0] == 311


def test_nearest_rows_single_query_and_bad_arguments(stored):
    f, _, dense = stored
    idx, scores = f.nearest_rows(dense[42], k=1)
    assert idx.tolist() == [[42]] and scores[0, 0] == pytest.approx(1.0)
    with pytest.raises(LplrValueError, match="queries"):
        f.nearest_rows(np.ones(SHAPE[0]))
    with pytest.raises(LplrValueError, match="k from 1"):
        f.nearest_rows(dense[0], k=0)
    with pytest.raises(LplrValueError, match="metric"):
        f.nearest_rows(dense[0], metric="manhattan")


def _copy_with_meta(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    group = zarr.open_group(dst, mode="r+")
    meta = dict(group.attrs["lplr"])
    meta.update(changes)
    group.attrs["lplr"] = meta
    return dst


def test_open_factors_refuses_incomplete_and_newer_stores(stored, tmp_path):
    f, _, _ = stored
    incomplete = _copy_with_meta(f.path, os.fspath(tmp_path / "a.lplr.zarr"), complete=False)
    with pytest.raises(StoreFormatError, match="incomplete.*--resume"):
        lplr_dask.open_factors(incomplete)
    newer = _copy_with_meta(f.path, os.fspath(tmp_path / "b.lplr.zarr"), version=store.FORMAT_VERSION + 1)
    with pytest.raises(StoreFormatError, match="version"):
        lplr_dask.open_factors(newer)
    with pytest.raises(StoreFormatError):
        lplr_dask.open_factors(tmp_path / "missing.lplr.zarr")
    zarr.open_group(os.fspath(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreFormatError, match="not an lplr store"):
        lplr_dask.open_factors(tmp_path / "plain.zarr")
    assert lplr_dask.open_factors(f.path).rank == 10  # the original still opens


def test_evaluate_matches_dense(client, stored, tmp_path):
    f, A, dense = stored
    path = os.fspath(tmp_path / "e.lplr.zarr")
    shutil.copytree(f.path, path)  # evaluate() writes error_exact into the attrs
    err = lplr_dask.evaluate(da.from_array(A, chunks=CHUNKS), path)
    want = np.linalg.norm(A.astype(np.float64) - dense) / np.linalg.norm(A.astype(np.float64))
    assert err == pytest.approx(want, rel=1e-9)
    assert lplr_dask.open_factors(path).attrs["error_exact"] == err


def _with_source_dtype(f, tmp_path, dtype: str):
    """A copy of ``f``'s store whose attrs say the source was ``dtype``."""
    path = os.fspath(tmp_path / f"{dtype}.lplr.zarr")
    return lplr_dask.open_factors(_copy_with_meta(f.path, path, source={**f.attrs["source"], "dtype": dtype}))


def test_the_array_protocol_attributes_are_the_sources(stored, tmp_path):
    f, _, _ = stored
    assert (f.shape, f.ndim, f.size, f.dtype) == (SHAPE, 2, SHAPE[0] * SHAPE[1], np.dtype(np.float32))
    g = _with_source_dtype(f, tmp_path, "float64")
    assert g.dtype == np.float64 and g.to_dask().dtype == np.float64 and g[:3, :4].dtype == np.float64
    assert _with_source_dtype(f, tmp_path, "bfloat16").dtype == np.float32  # NumPy has no bfloat16
    assert _with_source_dtype(f, tmp_path, "int16").to_dask().dtype == np.int16


def test_a_float64_source_reconstructs_in_float64(cluster, tmp_path):
    from distributed import Client

    A = synthetic((200, 150), rank=6, decay=0.8, noise=0.01, chunks=(64, 64), seed=1, dtype=np.float64)
    with Client(cluster):
        f = lplr_dask.compress(A, os.fspath(tmp_path / "f64.lplr.zarr"), rank=5, log=lambda m: None)
    dense = f.L().compute() @ f.R().compute()
    assert f.dtype == np.float64
    for got in (f.to_dask().compute(), f[:, :], np.asarray(f)):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, dense, rtol=1e-12, atol=1e-12 * np.abs(dense).max())  # float64 all the way


def test_integer_sources_reconstruct_rounded_and_clipped(stored, tmp_path):
    f, _, dense = stored
    g = _with_source_dtype(f, tmp_path, "int8")
    want = np.clip(np.rint(dense), -128, 127).astype(np.int8)
    assert np.array_equal(g.to_dask().compute(), want) and np.array_equal(np.asarray(g), want)


def test_matmul_is_the_product_through_the_factors(stored):
    f, _, dense = stored
    rng = np.random.default_rng(2)
    x, X = rng.standard_normal(SHAPE[1]), rng.standard_normal((SHAPE[1], 3))
    y, Y = rng.standard_normal(SHAPE[0]), rng.standard_normal((4, SHAPE[0]))
    tol = {"rtol": 1e-9, "atol": 1e-9 * np.abs(dense).max()}  # float64 products of the same factors
    for got, want in ((f @ x, dense @ x), (f @ X, dense @ X), (y @ f, y @ dense), (Y @ f, Y @ dense)):
        assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_allclose(f @ x.tolist(), dense @ x, **tol)  # lists too
    np.testing.assert_allclose(y.tolist() @ f, y @ dense, **tol)
    with pytest.raises(LplrValueError, match="400 rows"):
        f @ y
    with pytest.raises(LplrValueError, match="600 rows"):
        x @ f


def test_matmul_never_forms_the_dense_product(stored, monkeypatch):
    f, _, _ = stored
    shapes = []
    real = da.Array.__matmul__

    def spy(a, b):
        out = real(a, b)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(da.Array, "__matmul__", spy)
    f @ np.ones(SHAPE[1])
    np.ones((2, SHAPE[0])) @ f
    assert shapes and all(np.prod(s) <= 2 * max(SHAPE) for s in shapes)  # thin products only, never n x d


def test_asarray_reconstructs_below_the_limit_and_refuses_above(stored):
    import dask

    f, _, dense = stored
    got = np.asarray(f)
    assert got.dtype == np.float32 and got.shape == SHAPE
    np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-6 * np.abs(dense).max())
    assert np.asarray(f, dtype=np.float64).dtype == np.float64
    with dask.config.set({"lplr.array.max-bytes": SHAPE[0] * SHAPE[1] * 4 - 1}):
        with pytest.raises(
            LplrValueError, match=r"to_dask\(\).*lplr\.array\.max-bytes|lplr\.array\.max-bytes.*to_dask\(\)"
        ):
            np.asarray(f)
        np.asarray(f[:10])  # a block still converts
    with pytest.raises(ValueError, match="copy"):
        np.array(f, copy=False)


@pytest.mark.parametrize("distributed", [False, True])
def test_dask_from_array_computes_the_reconstruction(stored, cluster, distributed):
    import contextlib

    from distributed import Client

    f, _, dense = stored
    with Client(cluster) if distributed else contextlib.nullcontext():
        A = da.from_array(f, chunks=(100, 150))
        assert A.shape == SHAPE and A.dtype == np.float32 and A.numblocks == (6, 3)
        got = A.compute()
        part = A[250:420, 140:160].compute()
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-6 * np.abs(dense).max())
    np.testing.assert_allclose(part, dense[250:420, 140:160], rtol=1e-6, atol=1e-6 * np.abs(dense).max())


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
DAMAGED = "the store is damaged; recompress or restore it"


def _damaged_copy(tmp_path, damage, fixture: str = "v2-default") -> str:
    path = os.fspath(tmp_path / "d.lplr.zarr")
    shutil.copytree(os.path.join(FIXTURES, f"{fixture}.lplr.zarr"), path)
    damage(path)
    return path


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _write(os.path.join(p, "zarr.json"), "{"), "its zarr.json is unreadable (JSONDecodeError: "),
        (
            lambda p: _write(os.path.join(p, "L", "codes", "zarr.json"), '{"zarr_format": 3'),
            "array L/codes has unreadable metadata (L/codes/zarr.json: JSONDecodeError: ",
        ),
        (lambda p: shutil.rmtree(os.path.join(p, "L", "scale")), "array L/scale is missing — "),
        (lambda p: os.remove(os.path.join(p, "R", "offset", "c", "0", "0")), "chunk R/offset c/0/0 is missing — "),
        (
            lambda p: _write(os.path.join(p, "L", "scale", "c", "0", "0"), "xx"),
            "chunk L/scale c/0/0 fails its crc32c checksum",
        ),
    ],
    ids=["root zarr.json", "array zarr.json", "no L/scale", "no R/offset chunk", "bad L/scale chunk"],
)
def test_open_factors_names_damaged_metadata_and_small_arrays(tmp_path, damage, message):
    path = _damaged_copy(tmp_path, damage)
    with pytest.raises(StoreFormatError, match="^" + re.escape(f"{path}: {message}") + f".*{DAMAGED}$"):
        lplr_dask.open_factors(path)


def test_a_missing_chunk_of_a_version_1_store_is_refused_as_likely_damage(tmp_path):
    path = _damaged_copy(tmp_path, lambda p: os.remove(os.path.join(p, "L", "codes", "c", "2", "0")), "v1-default")
    with pytest.raises(
        StoreFormatError,
        match="^"
        + re.escape(
            f"{path}: chunk L/codes c/2/0 is missing (a version-1 store leaves out a chunk whose values are all 0, "
            "which codes almost never are) — most likely the store is damaged; recompress or restore it"
        )
        + "$",
    ):
        lplr_dask.open_factors(path)


def test_cli_info_on_a_damaged_store_is_one_line_exit_2(tmp_path, capsys):
    from lplr_dask.cli import main

    path = _damaged_copy(tmp_path, lambda p: os.remove(os.path.join(p, "R", "codes", "c", "0", "1")))
    assert main(["info", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: chunk R/codes c/0/1 is missing — {DAMAGED}"]


def test_an_indexed_block_still_answers_compute_with_a_deprecation_warning(stored):
    """``factors[rows, cols]`` was a lazy dask array before issue 18: ``.compute()`` on it still
    gives the block (and warns), and the block is NumPy otherwise."""
    f = stored[0]
    block = f[0:5, 0:7]
    assert isinstance(block, np.ndarray) and block.shape == (5, 7)
    with pytest.warns(DeprecationWarning, match="factors.block"):
        old = block.compute()
    assert type(old) is np.ndarray
    np.testing.assert_array_equal(old, np.asarray(f.block(slice(0, 5), slice(0, 7)).compute()))

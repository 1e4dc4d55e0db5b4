"""compress / evaluate through the public API: correctness, determinism, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask.baselines import relative_error
from lplr_dask.datasets import synthetic
from lplr_dask.errors import (
    LplrTypeError,
    LplrValueError,
    NonFiniteError,
    OutputExistsError,
    SourceNotFoundError,
    StoreFormatError,
)


def _codes(path: str) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    return np.asarray(g["L/codes"][...]), np.asarray(g["R/codes"][...])


def test_compress_reconstructs_low_rank_matrix(client, small_matrix, tmp_store):
    A = small_matrix.compute()
    f = lplr_dask.compress(small_matrix, tmp_store, rank=24, bits=(8, 8))
    assert f.shape == A.shape and f.rank == 24 and f.bits == (8, 8)
    recon = f.to_dask().compute()
    err = np.linalg.norm(A - recon) / np.linalg.norm(A)
    # rank 24 > true rank 12: the error is the 1% noise plus 8-bit quantization noise
    assert err < 0.03
    assert lplr_dask.evaluate(small_matrix, f) == pytest.approx(err, rel=1e-4)
    assert f.attrs["complete"] is True
    assert set(f.attrs["timings"]) >= {"pass 1: sketch", "pass 2: project", "total"}


@pytest.mark.parametrize("quantizer", ["paper", "default"])
def test_same_seed_same_codes_for_other_chunking(client, small_matrix, tmp_path, quantizer):
    """float64 products: codes identical for any chunking (sums differ at the 1e-16 level only)."""
    kw = dict(rank=10, bits=(4, 4), quantizer=quantizer, seed=7, precision="float64")
    a = lplr_dask.compress(small_matrix, tmp_path / "a.lplr.zarr", **kw)
    b = lplr_dask.compress(small_matrix.rechunk((200, 100)), tmp_path / "b.lplr.zarr", **kw)
    assert a.attrs["precision"] == "float64"
    for ca, cb in zip(_codes(a.path), _codes(b.path)):
        np.testing.assert_array_equal(ca, cb)


def test_float32_products_move_codes_by_at_most_one_level_with_the_chunking(client, tmp_path):
    """precision="auto" on float32 input: float32 block products, so another chunking may move a code
    of L that sits near a rounding boundary by one level: within ~1e-7 of it for the paper's sketch,
    more with the default oversampling, whose top-k directions of the sketch move by the float32
    noise divided by the gap between the k-th and the next singular value (here both in the noise:
    22 codes of 90,000 moved, against 1 with ``oversample=0``). R, solved against that L, then
    moves by one level in some of its codes (here 3,472 of 54,000; 501 with ``oversample=0``). The
    error does not change beyond 1e-3 of itself.

    Nearest rounding of R: gptq rounding (the default's) feeds the moved code of L, through L̂ᵀL̂,
    into more codes of R (measured 21,216 of 54,000, up to 7 levels; 7,658 and 4 with
    ``oversample=0``) at the same error (1e-5)."""
    A = synthetic((1500, 900), rank=40, decay=0.95, noise=0.05, chunks=(500, 300), seed=4)
    kw = dict(rank=60, bits=(8, 8), seed=7, quantizer="channel")
    a = lplr_dask.compress(A, tmp_path / "a.lplr.zarr", **kw)
    b = lplr_dask.compress(A.rechunk((700, 450)), tmp_path / "b.lplr.zarr", **kw)
    exact = lplr_dask.compress(A, tmp_path / "c.lplr.zarr", precision="float64", **kw)
    assert a.attrs["precision"] == b.attrs["precision"] == "float32"
    (la, ra), (lb, rb) = _codes(a.path), _codes(b.path)
    dl, dr = (np.abs(x.astype(np.int64) - y.astype(np.int64)) for x, y in ((la, lb), (ra, rb)))
    assert dl.max() <= 1 and dr.max() <= 1
    assert dl.sum() <= 5e-4 * la.size  # here 22 of 90,000
    assert dr.sum() <= 0.1 * ra.size
    M = A.compute()
    errs = [relative_error(M, f) for f in (a, b, exact)]
    assert errs[0] == pytest.approx(errs[2], rel=1e-3) and errs[1] == pytest.approx(errs[2], rel=1e-3)


def test_float32_products_with_the_default_quantizer_keep_the_error_for_another_chunking(client, tmp_path):
    """The default's gptq rounding routes a moved code of L into many codes of R: the codes are
    not comparable one by one across chunkings, so compare what they are for: L and the error."""
    A = synthetic((1500, 900), rank=40, decay=0.95, noise=0.05, chunks=(500, 300), seed=4)
    kw = dict(rank=60, bits=(8, 8), seed=7)
    a = lplr_dask.compress(A, tmp_path / "a.lplr.zarr", **kw)
    b = lplr_dask.compress(A.rechunk((700, 450)), tmp_path / "b.lplr.zarr", **kw)
    assert a.attrs["quantizer"]["R"]["rounding"] == "gptq"
    la, lb = _codes(a.path)[0], _codes(b.path)[0]
    assert np.abs(la.astype(np.int64) - lb.astype(np.int64)).sum() <= 5e-4 * la.size
    M = A.compute()
    assert relative_error(M, a) == pytest.approx(relative_error(M, b), rel=1e-3)


def test_same_codes_for_one_and_two_workers(small_matrix, tmp_path):
    from distributed import Client, LocalCluster

    paths = []
    for workers in (1, 2):
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1"
            ) as c,
            Client(c),
        ):
            f = lplr_dask.compress(small_matrix, tmp_path / f"w{workers}.lplr.zarr", rank=10, bits=(3, 5), seed=11)
            paths.append(f.path)
    for c1, c2 in zip(_codes(paths[0]), _codes(paths[1])):
        np.testing.assert_array_equal(c1, c2)


def test_different_seed_different_codes(client, small_matrix, tmp_path):
    a = lplr_dask.compress(small_matrix, tmp_path / "a.lplr.zarr", rank=8, seed=1)
    b = lplr_dask.compress(small_matrix, tmp_path / "b.lplr.zarr", rank=8, seed=2)
    assert not np.array_equal(_codes(a.path)[0], _codes(b.path)[0])


def test_zarr_path_source_and_attrs(client, tmp_path):
    src = tmp_path / "a.zarr"
    lplr_dask.generate(src, (500, 300), rank=5, chunks=(128, 128), seed=1)
    f = lplr_dask.compress(src, tmp_path / "o.lplr.zarr", match_nq=2, bits=(8, 8))
    assert f.rank == lplr_dask.fair_rank(500, 300, (8, 8), 2)
    src_attrs = f.attrs["source"]
    assert {k: src_attrs[k] for k in ("path", "shape", "dtype", "chunks")} == {
        "path": str(src),
        "shape": [500, 300],
        "dtype": "float32",
        "chunks": [128, 128],
    }
    assert f.attrs["format"] == "lplr-zarr" and f.attrs["version"] == 2 and f.attrs["seed"] == 0
    assert 0 < f.attrs["error_estimate"] < 1


def test_float64_input_computed_in_float64(client, tmp_store):
    A = synthetic((300, 200), rank=5, chunks=(100, 100), seed=0, dtype=np.float64)
    f = lplr_dask.compress(A, tmp_store, rank=10, bits=(16, 16))  # oversampled: sketch of rank k = r is noise-sensitive
    err = np.linalg.norm(A.compute() - f.to_dask(np.float64).compute()) / np.linalg.norm(A.compute())
    assert err < 0.02  # noise 1%, 16-bit codes add ~1e-5
    assert f.attrs["precision"] == "float64"  # "auto" keeps float64 input in float64


def test_unknown_precision_is_refused_before_anything_is_written(small_matrix, tmp_store):
    with pytest.raises(LplrValueError, match="precision 'auto', 'float32' or 'float64'. Got 'half'"):
        lplr_dask.compress(small_matrix, tmp_store, rank=4, precision="half")
    assert not os.path.exists(tmp_store)


def test_resume_of_complete_store_is_a_no_op(client, small_matrix, tmp_store):
    f1 = lplr_dask.compress(small_matrix, tmp_store, rank=6)
    f2 = lplr_dask.compress(small_matrix, tmp_store, rank=6, resume=True)
    assert f2.attrs["timings"] == f1.attrs["timings"]


def test_resume_with_other_arguments_is_refused(client, small_matrix, tmp_store):
    lplr_dask.compress(small_matrix, tmp_store, rank=6)
    with pytest.raises(StoreFormatError, match="rank"):
        lplr_dask.compress(small_matrix, tmp_store, rank=7, resume=True)


# ---- bad input: one exception of our own, nothing complete left behind -----------------------


def test_missing_input(tmp_path, tmp_store):
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        lplr_dask.compress(tmp_path / "nope.zarr", tmp_store, rank=2)


def test_not_2d(tmp_store):
    import dask.array as da

    with pytest.raises(LplrValueError, match="2-D"):
        lplr_dask.compress(da.ones((4, 4, 4)), tmp_store, rank=2)


def test_non_numeric(tmp_store):
    import dask.array as da

    with pytest.raises(LplrTypeError, match="complex"):
        lplr_dask.compress(da.ones((8, 8), dtype=np.complex64), tmp_store, rank=2)


@pytest.mark.parametrize("rank", [0, -1, 401, 2.5])
def test_rank_out_of_range(small_matrix, tmp_store, rank):
    with pytest.raises(LplrValueError, match="rank"):
        lplr_dask.compress(small_matrix, tmp_store, rank=rank)


@pytest.mark.parametrize("bits", [(0, 8), (8, 17), (8, 2.5)])
def test_bits_out_of_range(small_matrix, tmp_store, bits):
    with pytest.raises(LplrValueError, match="1 to 16"):
        lplr_dask.compress(small_matrix, tmp_store, rank=4, bits=bits)


@pytest.mark.parametrize("kwargs", [{}, {"rank": 4, "match_nq": 2}, {"rank": 4, "bits_per_entry": 1.0}])
def test_exactly_one_size_argument(small_matrix, tmp_store, kwargs):
    with pytest.raises(LplrValueError, match="exactly one of rank"):
        lplr_dask.compress(small_matrix, tmp_store, **kwargs)


def test_one_pass_with_power_iterations_is_refused(small_matrix, tmp_store):
    with pytest.raises(LplrValueError, match="power"):
        lplr_dask.compress(small_matrix, tmp_store, rank=4, passes=1, power_iters=1)


def test_existing_output_needs_overwrite(client, small_matrix, tmp_store):
    lplr_dask.compress(small_matrix, tmp_store, rank=4)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        lplr_dask.compress(small_matrix, tmp_store, rank=4)
    f = lplr_dask.compress(small_matrix, tmp_store, rank=5, overwrite=True)
    assert f.rank == 5


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_names_the_chunk(client, tmp_store, bad):
    A = synthetic((300, 200), rank=4, chunks=(100, 100), seed=0).compute()
    A[150, 120] = bad
    import dask.array as da

    with pytest.raises(NonFiniteError, match=r"rows 100:200, columns 100:200"):
        lplr_dask.compress(da.from_array(A, chunks=(100, 100)), tmp_store, rank=4)
    # nothing that open_factors would accept (here: nothing at all) is left behind
    with pytest.raises(StoreFormatError):
        lplr_dask.open_factors(tmp_store)


def test_open_factors_refuses_incomplete(client, small_matrix, tmp_store):
    from lplr_dask import store

    lplr_dask.compress(small_matrix, tmp_store, rank=4)
    g = store.open_group(tmp_store, mode="r+")
    meta = store.read_meta(g)
    meta["complete"] = False
    store.write_meta(g, meta)
    with pytest.raises(StoreFormatError, match="incomplete"):
        lplr_dask.open_factors(tmp_store)
    meta["complete"], meta["version"] = True, 99
    store.write_meta(g, meta)
    with pytest.raises(StoreFormatError, match="version 99"):
        lplr_dask.open_factors(tmp_store)


def test_resume_accepts_a_store_from_before_oversampling_and_precision(client, small_matrix, tmp_path):
    """A store started by an older version records neither ``precision`` nor the sketch's
    ``range_oversample``: they were float64 products and the paper's sketch, so a resume with
    those settings is the same job, and one with the new defaults is not."""
    from lplr_dask import store

    out = tmp_path / "old.lplr.zarr"
    kw = dict(rank=6, bits=(4, 4), oversample=0, precision="float64", log=lambda m: None)
    lplr_dask.compress(small_matrix, out, **kw)
    group = store.open_group(str(out), mode="r+")
    meta = store.read_meta(group)
    del meta["precision"], meta["sketch"]["range_oversample"]
    store.write_meta(group, meta)
    notes = []
    f = lplr_dask.compress(small_matrix, out, resume=True, **{**kw, "log": notes.append})
    assert any("already complete" in n for n in notes) and f.rank == 6
    with pytest.raises(lplr_dask.StoreFormatError, match="different sketch"):
        lplr_dask.compress(small_matrix, out, rank=6, bits=(4, 4), precision="float64", resume=True, log=lambda m: None)


# ---------------------------------------------------------------------------------------------
# The sparse range sketch (issue 16)


@pytest.fixture(scope="module")
def wide_rank_matrix():
    """A 900×700 matrix whose rank-32 sketch (64 columns with the default oversampling) holds
    four lane groups: the sparse sketch's full zeta."""
    return synthetic((900, 700), rank=48, decay=0.93, noise=0.01, chunks=(128, 128), seed=5)


def test_the_sparse_sketch_is_recorded_and_as_accurate_as_the_gaussian(client, wide_rank_matrix, tmp_path):
    kw = dict(rank=32, bits=(8, 4), seed=3)
    gauss = lplr_dask.compress(wide_rank_matrix, tmp_path / "g.lplr.zarr", sketch="gaussian", **kw)
    sparse = lplr_dask.compress(wide_rank_matrix, tmp_path / "s.lplr.zarr", sketch="sparse", **kw)
    one = lplr_dask.compress(wide_rank_matrix, tmp_path / "o.lplr.zarr", sketch="sparse", passes=1, **kw)
    assert gauss.attrs["sketch"]["kind"] == "gaussian" and "zeta" not in gauss.attrs["sketch"]
    assert sparse.attrs["sketch"]["kind"] == "sparse" and sparse.attrs["sketch"]["zeta"] == 4
    errors = [lplr_dask.evaluate(wide_rank_matrix, f) for f in (gauss, sparse, one)]
    assert errors[1] <= 1.1 * errors[0], errors
    assert errors[2] <= 1.3 * errors[1], errors
    assert not np.array_equal(_codes(gauss.path)[0], _codes(sparse.path)[0])  # another S indeed


def test_the_sparse_sketch_gives_the_same_codes_for_any_chunking(client, wide_rank_matrix, tmp_path):
    kw = dict(rank=32, bits=(4, 4), seed=7, precision="float64", sketch="sparse")
    a = lplr_dask.compress(wide_rank_matrix, tmp_path / "a.lplr.zarr", **kw)
    b = lplr_dask.compress(wide_rank_matrix.rechunk((300, 100)), tmp_path / "b.lplr.zarr", **kw)
    for ca, cb in zip(_codes(a.path), _codes(b.path)):
        np.testing.assert_array_equal(ca, cb)


def test_a_sketch_too_narrow_for_lanes_is_gaussian_and_a_bad_one_is_refused(client, small_matrix, tmp_path):
    f = lplr_dask.compress(small_matrix, tmp_path / "a.lplr.zarr", rank=12, sketch="sparse")  # 24 columns
    assert f.attrs["sketch"]["kind"] == "gaussian"
    f = lplr_dask.compress(small_matrix, tmp_path / "b.lplr.zarr", rank=16)  # 32 columns: two groups
    assert f.attrs["sketch"]["kind"] == "sparse" and f.attrs["sketch"]["zeta"] == 2
    with pytest.raises(LplrValueError, match="sketch to be one of 'gaussian', 'sparse'"):
        lplr_dask.compress(small_matrix, tmp_path / "c.lplr.zarr", rank=4, sketch="dense")
    assert not os.path.exists(tmp_path / "c.lplr.zarr")


def test_resume_with_another_sketch_is_refused_and_none_asked_for_takes_the_stores(client, small_matrix, tmp_path):
    sparse, gauss = tmp_path / "s.lplr.zarr", tmp_path / "g.lplr.zarr"
    lplr_dask.compress(small_matrix, sparse, rank=16, sketch="sparse")
    with pytest.raises(StoreFormatError, match="sketch"):
        lplr_dask.compress(small_matrix, sparse, rank=16, sketch="gaussian", resume=True)
    assert lplr_dask.compress(small_matrix, sparse, rank=16, resume=True).attrs["sketch"]["kind"] == "sparse"
    # a store started with the Gaussian sketch (as before the default changed) resumes without --sketch
    lplr_dask.compress(small_matrix, gauss, rank=16, sketch="gaussian")
    with pytest.raises(StoreFormatError, match="sketch"):
        lplr_dask.compress(small_matrix, gauss, rank=16, sketch="sparse", resume=True)
    notes: list[str] = []
    f = lplr_dask.compress(small_matrix, gauss, rank=16, resume=True, log=notes.append)
    assert any("already complete" in n for n in notes) and f.attrs["sketch"]["kind"] == "gaussian"

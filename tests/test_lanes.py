"""The lane sketch and the sparse co-range product: structure, scale, any chunking, both kernels.

Every product is checked against a dense reference (``lane_matrix``, or Ψ assembled from
``sparse_sign_rows``); the numba kernel against the sparse path; the sparse path on the strict
CuPy stand-in of tests/test_backend.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_backend import fake_cupy, ndarray  # noqa: F401  (fixture: the strict CuPy stand-in)

from lplr_dask import lanes
from lplr_dask.backend import to_host
from lplr_dask.errors import LplrTypeError, LplrValueError
from lplr_dask.lanes import LANES, lane_groups, lane_matrix, lane_product, scatter_rows
from lplr_dask.sketch import SKETCH_BLOCK, STREAM_PSI, STREAM_S, sparse_sign_rows

#: Columns of A in most tests: more than two generated blocks, not a multiple of LANES.
D = 2 * SKETCH_BLOCK + 203
WIDTH = 70  # groups of 18 and 17 at zeta = 4: uneven sizes and wraps at the groups' ends

#: Relative error of a float32 product against the float64 reference: each entry sums ~D·zeta /
#: WIDTH ≈ 480 terms of float32 rounding (6e-8 each, random signs): ~1e-6; 1e-5 leaves room.
F32_RTOL = 1e-5


@pytest.fixture(params=lanes.KERNELS)
def kernel(request, monkeypatch):
    """Each product path on numpy chunks: the numba kernel, then the sparse one."""
    monkeypatch.setattr(lanes, "KERNEL", request.param)
    return request.param


def _matrix(rows: int, cols: int, dtype: type = np.float64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(dtype)


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# The matrix S
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "zeta"), [(70, 4), (64, 4), (512, 8), (33, 2), (16, 1)])
def test_groups_split_the_width_evenly(width, zeta):
    starts, sizes = lane_groups(width, zeta)
    assert sizes.sum() == width and sizes.max() - sizes.min() <= 1 and sizes.min() >= LANES
    np.testing.assert_array_equal(starts, np.concatenate(([0], np.cumsum(sizes)[:-1])))


@pytest.mark.parametrize("zeta", [1, 2, 4])
def test_each_row_has_one_entry_per_group_of_the_right_size(zeta):
    S = lane_matrix(3, STREAM_S, D, WIDTH, zeta)
    starts, sizes = lane_groups(WIDTH, zeta)
    assert S.shape == (D, WIDTH)
    np.testing.assert_array_equal(np.abs(S[S != 0]), 1 / np.sqrt(zeta))
    for start, size in zip(starts, sizes):
        assert ((S[:, start : start + size] != 0).sum(axis=1) == 1).all()
    np.testing.assert_allclose((S**2).sum(axis=1), 1.0, rtol=1e-15)  # unit rows: E[S Sᵀ] = I
    assert 0.4 < (S > 0).mean() * WIDTH / zeta < 0.6  # random signs (half of D·zeta entries)


def test_the_16_columns_of_a_run_land_on_consecutive_columns_of_each_group():
    S = lane_matrix(5, STREAM_S, 4 * LANES, WIDTH)
    starts, sizes = lane_groups(WIDTH, 4)
    for run in range(4):
        rows = S[run * LANES : (run + 1) * LANES]
        for start, size in zip(starts, sizes):
            cols = np.nonzero(rows[:, start : start + size])[1]  # in row order: lane 0, 1, …
            np.testing.assert_array_equal(cols, (cols[0] + np.arange(LANES)) % size)


def test_seed_and_stream_choose_the_matrix():
    S = lane_matrix(1, STREAM_S, 300, WIDTH)
    np.testing.assert_array_equal(S, lane_matrix(1, STREAM_S, 300, WIDTH))
    assert not np.array_equal(S, lane_matrix(2, STREAM_S, 300, WIDTH))
    assert not np.array_equal(S, lane_matrix(1, STREAM_PSI, 300, WIDTH))
    assert not np.array_equal(S, lane_matrix(1, STREAM_S, 300, WIDTH, 2))


def test_the_scale_preserves_norms_on_average():
    """E[S Sᵀ] = I: averaged over seeds, ‖A·S‖² ≈ ‖A‖² and S Sᵀ ≈ I (a wrong scale fails)."""
    a = _matrix(20, 300)
    ratios = [np.linalg.norm(a @ lane_matrix(s, STREAM_S, 300, 64)) ** 2 / np.linalg.norm(a) ** 2 for s in range(200)]
    # per seed the ratio varies by ~3.5% (measured), the mean of 200 by ~0.25%: a scale of 1/zeta
    # instead of 1/sqrt(zeta) would give 0.25
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.01)
    gram = np.mean([(S := lane_matrix(s, STREAM_S, 48, 64)) @ S.T for s in range(2000)], axis=0)
    # an off-diagonal entry is ±1/4 with probability ~zeta/16 per seed: std 0.125/sqrt(2000)
    # ≈ 0.003 for the mean, whose largest of 48² entries lies near 4 std (0.011 measured); signs
    # that are not independent across columns would bias the entries of colliding columns
    np.testing.assert_allclose(gram, np.eye(48), atol=0.03)


# ---------------------------------------------------------------------------------------------
# lane_product
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lane_product_matches_the_dense_reference(kernel, dtype):
    a = _matrix(37, D, dtype)
    ref = a.astype(np.float64) @ lane_matrix(4, STREAM_S, D, WIDTH)
    out = lane_product(a, 0, seed=4, stream=STREAM_S, width=WIDTH)
    assert out.dtype == dtype and out.shape == (37, WIDTH)
    if dtype == np.float64:
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    else:
        assert _rel(out, ref) < F32_RTOL


@pytest.mark.parametrize(
    "cuts",
    [
        [0, D],
        [0, 5, 21, 4095, 4101, 8192, D],  # unaligned to 16 and to the generated blocks
        [0, 1, 2, 3, 19, 35, 36, D],  # chunks inside one run
        [0, 16, 4096, 4112, D],  # aligned
    ],
)
def test_any_chunking_of_the_columns_gives_the_same_product(kernel, cuts):
    a = _matrix(23, D)
    ref = a @ lane_matrix(9, STREAM_S, D, WIDTH)
    out = np.zeros((23, WIDTH))
    for c0, c1 in zip(cuts[:-1], cuts[1:]):
        lane_product(a[:, c0:c1], c0, seed=9, stream=STREAM_S, width=WIDTH, out=out)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    # one chunk alone is the product with its own rows of S
    part = lane_product(a[:, 4101:8192], 4101, seed=9, stream=STREAM_S, width=WIDTH)
    ref = a[:, 4101:8192] @ lane_matrix(9, STREAM_S, D, WIDTH)[4101:8192]
    np.testing.assert_allclose(part, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("zeta", [1, 2, 4])
def test_numba_and_sparse_kernels_agree(monkeypatch, dtype, zeta):
    a = _matrix(300, 5000, dtype, seed=1)
    assert a.shape[0] > lanes._PANEL_ROWS  # the sparse path sums more than one panel of rows
    results = {}
    for name in lanes.KERNELS:
        monkeypatch.setattr(lanes, "KERNEL", name)
        out, sumsq = np.zeros((300, WIDTH), dtype), np.zeros(300)
        for c0, c1 in [(0, 7), (7, 4099), (4099, 5000)]:
            lane_product(a[:, c0:c1], c0, seed=2, stream=STREAM_S, width=WIDTH, zeta=zeta, out=out, sumsq=sumsq)
        results[name] = out, sumsq
    (out_n, sq_n), (out_s, sq_s) = results["numba"], results["sparse"]
    # the same products summed in another order
    rtol = 1e-13 if dtype == np.float64 else F32_RTOL
    assert _rel(out_n, out_s) < rtol
    np.testing.assert_allclose(sq_n, sq_s, rtol=rtol)


def test_the_switch_chooses_the_kernel(monkeypatch):
    """KERNEL = "numba" runs the compiled kernel and "sparse" does not (so the comparison above
    compares two paths)."""
    calls = []
    monkeypatch.setattr(lanes, "_lane_kernel", lambda *args: calls.append("lane"))
    monkeypatch.setattr(lanes, "_scatter_kernel", lambda *args: calls.append("scatter"))
    a = _matrix(4, 40)
    pos, signs = sparse_sign_rows(0, STREAM_PSI, 0, 4, 20)
    for name in lanes.KERNELS:
        monkeypatch.setattr(lanes, "KERNEL", name)
        lane_product(a, 0, seed=0, stream=STREAM_S, width=WIDTH)
        scatter_rows(a, pos, signs, 20)
    assert calls == ["lane", "scatter"]


def test_sumsq_is_added_to_in_the_same_sweep(kernel):
    a = _matrix(30, 1000, np.float32)
    sumsq = np.full(30, 2.0)
    out = lane_product(a, 3, seed=0, stream=STREAM_S, width=WIDTH, sumsq=sumsq)
    np.testing.assert_allclose(sumsq, 2.0 + (a.astype(np.float64) ** 2).sum(axis=1), rtol=1e-7)
    np.testing.assert_array_equal(out, lane_product(a, 3, seed=0, stream=STREAM_S, width=WIDTH))


def test_out_is_added_to_and_may_be_wider_or_float64(kernel):
    a = _matrix(12, 600, np.float32)
    ref = a.astype(np.float64) @ lane_matrix(0, STREAM_S, 600, WIDTH)
    wide = np.ones((12, WIDTH + 3))  # float64, the product in the first WIDTH columns
    got = lane_product(a, 0, seed=0, stream=STREAM_S, width=WIDTH, out=wide[:, :WIDTH])
    assert got.base is wide
    assert _rel(wide[:, :WIDTH] - 1.0, ref) < F32_RTOL
    np.testing.assert_array_equal(wide[:, WIDTH:], 1.0)


def _chunk_in(layout: str) -> np.ndarray:
    """A 40 × 900 chunk stored Fortran-ordered, as every other column of a wider one, or read-only."""
    if layout == "F":
        return np.asfortranarray(_matrix(40, 900))
    if layout == "strided":
        return _matrix(40, 1800)[:, ::2]
    a = _matrix(40, 900)
    a.flags.writeable = False  # as a decoded chunk may be
    return a


@pytest.mark.parametrize("layout", ["F", "strided", "read-only"])
def test_any_layout_of_the_chunk_gives_the_same_product(kernel, layout):
    a = _chunk_in(layout)
    ref = np.ascontiguousarray(a) @ lane_matrix(0, STREAM_S, 900, WIDTH)
    out = lane_product(a, 0, seed=0, stream=STREAM_S, width=WIDTH)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


def test_empty_chunks(kernel):
    assert lane_product(np.zeros((0, 50)), 0, seed=0, stream=0, width=WIDTH).shape == (0, WIDTH)
    assert not lane_product(np.zeros((5, 0)), 16, seed=0, stream=0, width=WIDTH).any()


def test_lane_product_on_the_cupy_stand_in(fake_cupy):
    host = _matrix(20, 700)
    sumsq = fake_cupy.zeros(20)
    out = lane_product(fake_cupy.asarray(host[:, 9:]), 9, seed=3, stream=STREAM_S, width=WIDTH, sumsq=sumsq)
    assert isinstance(out, ndarray) and isinstance(sumsq, ndarray)  # on the device, from device operands
    ref = host[:, 9:] @ lane_matrix(3, STREAM_S, 700, WIDTH)[9:]
    np.testing.assert_allclose(to_host(out), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(to_host(sumsq), (host[:, 9:] ** 2).sum(axis=1), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# scatter_rows
# ---------------------------------------------------------------------------------------------


def _psi(r0: int, rows: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions, signs and the dense Ψ (width × rows) of rows ``r0:r0 + rows`` of the map."""
    pos, signs = sparse_sign_rows(6, STREAM_PSI, r0, r0 + rows, width)
    dense = np.zeros((width, rows))
    np.put_along_axis(dense.T, pos, signs, axis=1)
    return pos, signs, dense


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("nnz", [8, 4, 1])
def test_scatter_rows_matches_the_dense_map(kernel, dtype, nnz):
    pos, signs, _ = _psi(4000, 300, 266)
    pos, signs = pos[:, :nnz], signs[:, :nnz]  # distinct positions per row, any number of them
    dense = np.zeros((266, 300))
    np.put_along_axis(dense.T, pos, signs, axis=1)
    a = _matrix(300, 130, dtype)
    out = scatter_rows(a, pos, signs, 266)
    assert out.dtype == dtype and out.shape == (266, 130)
    ref = dense @ a.astype(np.float64)
    if dtype == np.float64:
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    else:
        assert _rel(out, ref) < F32_RTOL


def test_scatter_rows_sums_over_row_chunks(kernel):
    a = _matrix(5000, 64)
    *_, dense = _psi(0, 5000, 40)
    out = np.zeros((40, 64))
    for r0, r1 in [(0, 3), (3, 4097), (4097, 5000)]:
        pos, signs, _ = _psi(r0, r1 - r0, 40)
        scatter_rows(a[r0:r1], pos, signs, 40, out=out)
    np.testing.assert_allclose(out, dense @ a, rtol=1e-12, atol=1e-12 * np.abs(dense @ a).max())


def test_scatter_numba_and_sparse_agree(monkeypatch):
    a = _matrix(700, 90, np.float32)
    pos, signs, _ = _psi(0, 700, 50)
    out = {}
    for name in lanes.KERNELS:
        monkeypatch.setattr(lanes, "KERNEL", name)
        out[name] = scatter_rows(np.asfortranarray(a), pos, signs, 50, out=np.ones((50, 90)))
    assert _rel(out["numba"], out["sparse"]) < F32_RTOL


def test_scatter_rows_on_the_cupy_stand_in(fake_cupy):
    host = _matrix(120, 30)
    pos, signs, dense = _psi(10, 120, 26)
    out = scatter_rows(fake_cupy.asarray(host), pos, signs, 26)
    assert isinstance(out, ndarray)
    np.testing.assert_allclose(to_host(out), dense @ host, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "zeta", "match"),
    [
        (63, 4, r"width >= 16·zeta .* Got 'width=63 with zeta=4' instead\. Use zeta <= 3"),
        (10, 1, r"Use a sketch of at least 16 columns"),
        (64, 0, r"zeta to be an integer >= 1"),
        (0, 1, r"width to be an integer >= 1"),
        (64.0, 4, r"width to be an integer"),
    ],
)
def test_groups_narrower_than_a_run_are_refused(width, zeta, match):
    with pytest.raises(LplrValueError, match=match):
        lane_product(np.zeros((2, 40)), 0, seed=0, stream=0, width=width, zeta=zeta)
    with pytest.raises(LplrValueError, match=match):
        lane_matrix(0, 0, 40, width, zeta)


@pytest.mark.parametrize(
    "a", [np.zeros((3, 4), dtype=np.float16), np.zeros((3, 4), dtype=np.int64), np.zeros(4), np.zeros((2, 2, 2))]
)
def test_chunks_other_than_2d_float32_or_float64_are_refused(a):
    with pytest.raises(LplrTypeError, match="Expected a 2-D float32 or float64 chunk"):
        lane_product(a, 0, seed=0, stream=0, width=WIDTH)
    with pytest.raises(LplrTypeError, match="Expected a 2-D float32 or float64 chunk"):
        scatter_rows(a, np.zeros((3, 1), dtype=int), np.ones((3, 1)), 5)


def test_bad_out_sumsq_and_offsets_are_refused():
    a = np.zeros((3, 40))
    kw = dict(seed=0, stream=0, width=WIDTH)
    with pytest.raises(LplrValueError, match=r"Expected out of shape \(3, 70\)\. Got \(3, 69\) instead"):
        lane_product(a, 0, out=np.zeros((3, 69)), **kw)
    with pytest.raises(LplrTypeError, match="Expected out of dtype float32 or float64"):
        lane_product(a, 0, out=np.zeros((3, WIDTH), dtype=np.int32), **kw)
    with pytest.raises(LplrValueError, match=r"Expected sumsq of shape \(3,\)"):
        lane_product(a, 0, sumsq=np.zeros(4), **kw)
    with pytest.raises(LplrValueError, match="c0 to be an integer >= 0"):
        lane_product(a, -1, **kw)
    with pytest.raises(LplrValueError, match="seed to be an integer >= 0"):
        lane_product(a, 0, seed=-2, stream=0, width=WIDTH)


def test_bad_positions_are_refused():
    a = np.zeros((3, 5))
    with pytest.raises(LplrValueError, match=r"Expected positions in \[0, 4\)\. Got 'positions from 0 to 4'"):
        scatter_rows(a, np.array([[0], [4], [1]]), np.ones((3, 1)), 4)
    with pytest.raises(LplrValueError, match=r"positions from -1"):
        scatter_rows(a, np.array([[0], [-1], [1]]), np.ones((3, 1)), 4)
    with pytest.raises(LplrValueError, match=r"Expected positions and signs of shape \(3, nnz\)"):
        scatter_rows(a, np.zeros((2, 1), dtype=int), np.ones((2, 1)), 4)
    with pytest.raises(LplrValueError, match=r"Got 'shapes \(3, 2\) and \(3, 1\)'"):
        scatter_rows(a, np.zeros((3, 2), dtype=int), np.ones((3, 1)), 4)
    with pytest.raises(LplrTypeError, match="Expected integer positions"):
        scatter_rows(a, np.zeros((3, 1)), np.ones((3, 1)), 4)
    with pytest.raises(LplrValueError, match=r"Expected out of shape \(4, 5\)"):
        scatter_rows(a, np.zeros((3, 1), dtype=int), np.ones((3, 1)), 4, out=np.zeros((5, 4)))

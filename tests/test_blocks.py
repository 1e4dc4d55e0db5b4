"""Block-wise products: equal to the dense products, for any chunking, panels included."""

from __future__ import annotations

import weakref

import dask
import dask.array as da
import numpy as np
import pytest

from lplr_dask import blocks
from lplr_dask.blocks import PANEL_ROWS
from lplr_dask.errors import NonFiniteError
from lplr_dask.sketch import SPARSE_NNZ, STREAM_G, STREAM_PSI, STREAM_S, sketch_matrix, sparse_sign_rows

# chunk rows above PANEL_ROWS and not a multiple of it, so tasks cast several panels
CHUNKINGS = [(1300, 700), (2000, 1500), (PANEL_ROWS, 256), (333, 1500)]


@pytest.fixture(scope="module")
def A() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((2000, 1500)).astype(np.float32)


def _dense_psi(seed: int, stream: int, n: int, width: int) -> np.ndarray:
    """Ψ (width × n) built densely from the same generator."""
    pos, signs = sparse_sign_rows(seed, stream, 0, n, width)
    psi_t = np.zeros((n, width))
    np.put_along_axis(psi_t, pos, signs, axis=1)
    return psi_t.T


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_sketch_right_is_the_dense_product(A, chunks):
    S = np.concatenate([sketch_matrix(3, STREAM_S, 1500, 7, scale=0.5), sketch_matrix(3, STREAM_G, 1500, 4)], axis=1)
    out = blocks.sketch_right(da.from_array(A, chunks=chunks), 3, [(STREAM_S, 7, 0.5), (STREAM_G, 4, 1.0)], sumsq=True)
    assert out.dtype == np.float64 and out.chunks[0] == da.from_array(A, chunks=chunks).chunks[0]
    got = out.compute(scheduler="sync")
    A64 = A.astype(np.float64)
    np.testing.assert_allclose(got[:, :11], A64 @ S, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(got[:, 11], (A64**2).sum(axis=1), rtol=1e-12)


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_sketch_left_is_the_sparse_sign_product(A, chunks):
    got = blocks.sketch_left(da.from_array(A, chunks=chunks), 4, STREAM_PSI, 41).compute(scheduler="sync")
    np.testing.assert_allclose(got, _dense_psi(4, STREAM_PSI, 2000, 41) @ A.astype(np.float64), rtol=1e-12, atol=1e-10)


def test_sketch_both_is_both_products_from_one_task_per_chunk(A, monkeypatch):
    dA = da.from_array(A, chunks=(1300, 700))  # 2 × 3 chunks
    right, left = blocks.sketch_both(dA, 3, [(STREAM_S, 7, 0.5)], STREAM_PSI, 41, sumsq=True)
    calls = []
    real = blocks._sketch_block
    monkeypatch.setattr(blocks, "_sketch_block", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got_right, got_left = dask.compute(right, left, scheduler="sync")
    assert len(calls) == 6  # one task per chunk made both products
    monkeypatch.undo()
    np.testing.assert_array_equal(got_right, blocks.sketch_right(dA, 3, [(STREAM_S, 7, 0.5)], sumsq=True).compute())
    np.testing.assert_array_equal(got_left, blocks.sketch_left(dA, 3, STREAM_PSI, 41).compute())


def test_sparse_sign_map_has_nnz_distinct_signs_per_row():
    pos, signs = sparse_sign_rows(0, STREAM_PSI, 100, 9000, 41)  # crosses two generated blocks
    assert pos.shape == signs.shape == (8900, SPARSE_NNZ)
    assert all(len(set(row)) == SPARSE_NNZ for row in pos)
    assert pos.min() >= 0 and pos.max() < 41
    assert set(np.unique(signs)) == {-1.0, 1.0}
    # every column is hit about equally often: 8900·8/41 ≈ 1737 each, Poisson-like spread ≈ 42
    counts = np.bincount(pos.ravel(), minlength=41)
    assert np.all(np.abs(counts - counts.mean()) < 6 * np.sqrt(counts.mean()))


def test_sparse_sign_rows_do_not_depend_on_slicing():
    whole = sparse_sign_rows(2, STREAM_PSI, 0, 10_000, 30)
    cut = [sparse_sign_rows(2, STREAM_PSI, a, b, 30) for a, b in [(0, 1), (1, 4097), (4097, 10_000)]]
    for i in range(2):
        np.testing.assert_array_equal(np.concatenate([c[i] for c in cut]), whole[i])


def test_sparse_sign_narrower_than_nnz_fills_every_column():
    pos, _ = sparse_sign_rows(0, STREAM_PSI, 0, 50, 3)
    assert pos.shape == (50, 3)
    assert all(sorted(row) == [0, 1, 2] for row in pos)


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_left_and_right_multiply(A, chunks):
    rng = np.random.default_rng(1)
    PT, M = rng.standard_normal((2000, 6)), rng.standard_normal((1500, 5))
    dA = da.from_array(A, chunks=chunks)
    A64 = A.astype(np.float64)
    np.testing.assert_allclose(
        blocks.left_multiply(da.from_array(PT, chunks=(700, 6)), dA).compute(), PT.T @ A64, rtol=1e-12, atol=1e-10
    )
    np.testing.assert_allclose(
        blocks.right_multiply(dA, da.from_array(M, chunks=(600, 5))).compute(), A64 @ M, rtol=1e-12, atol=1e-10
    )


def test_products_agree_across_chunkings_to_rounding(A):
    """What keeps codes from flipping: other chunkings change results only at the 1e-16 level."""
    outs = [blocks.sketch_right(da.from_array(A, chunks=c), 0, [(STREAM_S, 16, 0.25)]).compute() for c in CHUNKINGS]
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_entry_names_its_chunk(A, bad):
    B = A.copy()
    B[1400, 800] = bad
    with pytest.raises(NonFiniteError, match=r"rows 1300:2000, columns 700:1400"):
        blocks.sketch_right(da.from_array(B, chunks=(1300, 700)), 0, [(STREAM_S, 3, 1.0)]).compute(scheduler="sync")


def test_tall_chunks_are_at_least_k_rows():
    chunks = blocks.tall_chunks(1000, 300, 128)
    assert sum(chunks) == 1000 and min(chunks) >= 300
    assert blocks.tall_chunks(10, 3, 4) == (5, 5)  # 10 // 4 = 2 blocks, evened out


def test_qr_chunks_are_at_least_2k_rows():
    """dask's TSQR recurses only when a block can hold two k×k R factors."""
    chunks = blocks.qr_chunks(4096, 100, 128)
    assert sum(chunks) == 4096 and min(chunks) >= 200 and max(chunks) < 400
    assert blocks.qr_chunks(1000, 100, 512) == blocks.tall_chunks(1000, 100, 512)  # tall enough already
    assert blocks.qr_chunks(150, 100, 128) == (150,)  # fewer than 2k rows: one block


def test_map_row_blocks_runs_on_each_row_block():
    X = da.arange(10.0, chunks=4)[:, None] * da.ones((1, 3))
    seen = blocks.map_row_blocks(X, lambda x, i, r0: 100 * i + r0 + x.shape[0]).compute(scheduler="sync")
    assert seen.shape == (3, 1) and seen[:, 0].tolist() == [4, 108, 210]


@pytest.mark.parametrize(
    ("dtype", "precision", "expected"),
    [
        (np.float32, "auto", np.float32),
        (np.float16, "auto", np.float32),
        (np.float64, "auto", np.float64),
        (np.int32, "auto", np.float64),
        (np.float32, "float64", np.float64),
        (np.float64, "float32", np.float32),
    ],
)
def test_compute_dtype(dtype, precision, expected):
    assert blocks.compute_dtype(dtype, precision) == expected


def test_compute_dtype_rejects_unknown_precision():
    from lplr_dask.errors import LplrValueError

    with pytest.raises(LplrValueError, match="precision 'auto', 'float32' or 'float64'.*'half'"):
        blocks.compute_dtype(np.float32, "half")


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_float32_products_match_float64_to_float32_rounding(A, chunks):
    """Float32 block products, summed in float64: every product within float32's rounding of the exact one."""
    rng = np.random.default_rng(2)
    PT, M = rng.standard_normal((2000, 6)), rng.standard_normal((1500, 5))
    dA = da.from_array(A, chunks=chunks)
    A64 = A.astype(np.float64)
    S = sketch_matrix(0, STREAM_S, 1500, 16, scale=0.25)
    G = sketch_matrix(0, STREAM_G, 1500, 3)
    right, left = blocks.sketch_both(
        dA, 0, [(STREAM_S, 16, 0.25), (STREAM_G, 3, 1.0)], STREAM_PSI, 9, sumsq=True, precision="float32"
    )
    right, left = dask.compute(right, left)
    assert right.dtype == left.dtype == np.float64

    # a float32 dot product of m terms is within about m·2⁻²⁴ of ‖x‖‖y‖ (here ≤ 1500·6e-8 = 1e-4);
    # the scale of each entry is ‖row‖·‖column‖, so compare against that, not entry by entry
    def close(got, want, scale):
        assert np.abs(got - want).max() <= 1e-4 * scale
        assert np.abs(got - want).max() > 0  # float32 products really were used

    row_norms = np.linalg.norm(A64, axis=1)
    close(right[:, :16], A64 @ S, row_norms.max() * np.linalg.norm(S, axis=0).max())
    close(right[:, 16:19], A64 @ G, row_norms.max() * np.linalg.norm(G, axis=0).max())
    np.testing.assert_allclose(right[:, 19], (A64**2).sum(axis=1), rtol=1e-5)
    psi = _dense_psi(0, STREAM_PSI, 2000, 9)
    close(left, psi @ A64, np.sqrt(SPARSE_NNZ) * np.linalg.norm(A64, axis=0).max())
    close(
        blocks.left_multiply(da.from_array(PT, chunks=(700, 6)), dA, precision="float32").compute(),
        PT.T @ A64,
        np.linalg.norm(PT, axis=0).max() * np.linalg.norm(A64, axis=0).max(),
    )
    close(
        blocks.right_multiply(dA, da.from_array(M, chunks=(600, 5)), precision="float32").compute(),
        A64 @ M,
        row_norms.max() * np.linalg.norm(M, axis=0).max(),
    )


def test_float32_products_do_not_copy_a_float32_chunk(A):
    """The chunk is used as read: one panel, the chunk itself, no float64 working copy."""
    chunk = A[:1300, :700]
    panels = list(blocks._panels(chunk, np.float32))
    assert len(panels) == 1 and panels[0][1] is chunk
    assert len(list(blocks._panels(chunk, np.float64))) == -(-1300 // PANEL_ROWS)


# ---------------------------------------------------------------------------------------------
# Row strips: a task reads several chunks of a row in turn through a reader of the source


class _Reader:
    """A picklable reader of an in-memory matrix that counts what it reads (for the tests)."""

    def __init__(self, data: np.ndarray):
        self.data, self.reads = data, []

    def __call__(self, rows: slice, cols: slice) -> np.ndarray:
        self.reads.append((rows.start, rows.stop, cols.start, cols.stop))
        return self.data[rows, cols]


STRIP_CHUNKS = (333, 160)  # 7 x 10 chunks: groups of 3 and 4 leave a short last group


@pytest.mark.parametrize("width", [1, 3, 4, 100])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_strip_products_equal_the_per_chunk_products(A, width, precision):
    B = A[:, :1500]
    dA = da.from_array(B, chunks=STRIP_CHUNKS)
    strips = blocks.Strips(_Reader(B), width)
    streams = [(STREAM_S, 7, 0.5), (STREAM_G, 4, 1.0)]
    tol = dict(rtol=1e-12, atol=1e-10)

    def both(**kw):
        return dask.compute(*blocks.sketch_both(dA, 3, streams, STREAM_PSI, 41, sumsq=True, precision=precision, **kw))

    for got, want in zip(both(strips=strips), both()):
        np.testing.assert_allclose(got, want, **tol)
    rows = blocks.sketch_right(dA, 3, streams, sumsq=True, precision=precision, strips=strips, row_blocks=[4, 0])
    want = blocks.sketch_right(dA, 3, streams, sumsq=True, precision=precision).compute()
    assert rows.chunks[0] == (333, 333)
    np.testing.assert_allclose(rows.compute(), np.concatenate([want[4 * 333 : 5 * 333], want[:333]]), **tol)

    rng = np.random.default_rng(0)
    PT = da.from_array(rng.standard_normal((2000, 6)), chunks=(500, 6))
    left = blocks.left_multiply(PT, dA, precision=precision).compute()
    got = blocks.left_multiply(PT, dA, precision=precision, strips=strips)
    assert got.chunks[1] == dA.chunks[1]
    np.testing.assert_allclose(got.compute(), left, **tol)
    picked = blocks.left_multiply(PT, dA, precision=precision, strips=strips, col_blocks=[9, 1, 2])
    assert picked.chunks[1] == (60, 160, 160)
    np.testing.assert_allclose(picked.compute(), np.concatenate([left[:, 1440:], left[:, 160:480]], axis=1), **tol)
    M = da.from_array(rng.standard_normal((1500, 5)), chunks=(700, 5))
    np.testing.assert_allclose(
        blocks.right_multiply(dA, M, precision=precision, strips=strips).compute(),
        blocks.right_multiply(dA, M, precision=precision).compute(),
        **tol,
    )


def test_a_strip_pass_reads_each_chunk_once_and_nothing_else(A):
    B = A[:, :1500]
    dA = da.from_array(B, chunks=STRIP_CHUNKS)
    reader = _Reader(B)
    blocks.sketch_right(dA, 3, [(STREAM_S, 7, 0.5)], strips=blocks.Strips(reader, 4)).compute(scheduler="sync")
    grid = [(r, min(r + 333, 2000), c, min(c + 160, 1500)) for r in range(0, 2000, 333) for c in range(0, 1500, 160)]
    assert sorted(reader.reads) == sorted(grid)  # every chunk once, as stored: whole chunks only
    reader.reads.clear()
    blocks.sketch_right(dA, 3, [(STREAM_S, 7, 0.5)], strips=blocks.Strips(reader, 4), row_blocks=[2]).compute(
        scheduler="sync"
    )
    assert sorted(reader.reads) == [g for g in grid if g[0] == 666]  # only the strips asked for


class _LiveReader(_Reader):
    """A reader that records, at each read, how many chunks it returned before are still alive."""

    def __init__(self, data: np.ndarray):
        super().__init__(data)
        self.refs: list[weakref.ref[np.ndarray]] = []
        self.alive: list[int] = []

    def __call__(self, rows: slice, cols: slice) -> np.ndarray:
        self.alive.append(sum(ref() is not None for ref in self.refs))
        chunk = self.data[rows, cols].copy()  # a copy: a view would keep nothing alive of its own
        self.refs.append(weakref.ref(chunk))
        return chunk


def test_a_strip_holds_one_chunk_at_a_time(A):
    """Each strip task lets go of a chunk before it reads the next one, in all three strip
    products (a loop variable kept the last chunk alive during the next read: twice the memory)."""
    B = A[:, :1500]
    dA = da.from_array(B, chunks=STRIP_CHUNKS)
    rng = np.random.default_rng(0)
    PT = da.from_array(rng.standard_normal((2000, 6)), chunks=(500, 6))
    M = da.from_array(rng.standard_normal((1500, 5)), chunks=(700, 5))
    for product in (
        lambda s: blocks.sketch_right(dA, 3, [(STREAM_S, 7, 0.5)], sumsq=True, strips=s),
        lambda s: blocks.left_multiply(PT, dA, strips=s),
        lambda s: blocks.right_multiply(dA, M, strips=s),
    ):
        reader = _LiveReader(B)
        product(blocks.Strips(reader, 4)).compute(scheduler="sync")
        assert len(reader.alive) == dA.npartitions
        assert max(reader.alive) == 0, reader.alive


def _tasks(*collections) -> int:
    from dask.base import collections_to_expr

    return len(collections_to_expr(list(collections), optimize_graph=True).__dask_graph__())


def test_a_strip_pass_is_less_than_one_task_per_chunk(A):
    dA = da.from_array(np.zeros((64 * 8, 64 * 24), np.float32), chunks=(8, 64))  # 64 x 24 chunks
    strips = blocks.Strips(_Reader(np.zeros(dA.shape, np.float32)), 4)
    streams = [(STREAM_S, 7, 0.5)]
    per_chunk = _tasks(blocks.sketch_right(dA, 0, streams)) / dA.npartitions
    stripped = _tasks(blocks.sketch_right(dA, 0, streams, strips=strips)) / dA.npartitions
    PT = da.zeros((dA.shape[0], 4), chunks=(8, 4))
    pass2 = _tasks(blocks.left_multiply(PT, dA, strips=strips)) / dA.npartitions
    assert per_chunk >= 2 and stripped <= 0.5 and pass2 <= 0.6, (per_chunk, stripped, pass2)


def test_column_groups_are_consecutive_runs_of_the_width():
    assert blocks.column_groups([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert blocks.column_groups([7, 3, 5], 4) == [[7, 3, 5]]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_lane_columns_are_the_dense_product_for_any_chunking(A, chunks, precision):
    from lplr_dask.lanes import lane_matrix

    dA = da.from_array(A, chunks=chunks)
    S = np.concatenate([lane_matrix(3, STREAM_S, 1500, 64, 4), sketch_matrix(3, STREAM_G, 1500, 4)], axis=1)
    want = A.astype(np.float64) @ S
    tol = dict(rtol=1e-12, atol=1e-9) if precision == "float64" else dict(rtol=1e-4, atol=1e-3)
    for strips in (None, blocks.Strips(_Reader(A), 3)):
        out = blocks.sketch_right(
            dA, 3, [(STREAM_G, 4, 1.0)], sumsq=True, precision=precision, strips=strips, lanes=(STREAM_S, 64, 4)
        ).compute(scheduler="sync")
        np.testing.assert_allclose(out[:, :68], want, **tol)
        np.testing.assert_allclose(out[:, 68], (A.astype(np.float64) ** 2).sum(axis=1), rtol=1e-5)

"""Block-wise sketches: independent of how they are sliced, right distribution, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from lplr_dask.sketch import SKETCH_BLOCK, STREAM_G, STREAM_S, sketch_matrix, sketch_rows


@pytest.mark.parametrize("cuts", [[0, 10_000], [0, 1, 4095, 4096, 4097, 9000, 10_000], [0, 333, 8192, 10_000]])
def test_slices_assemble_to_the_same_matrix(cuts):
    whole = sketch_matrix(7, STREAM_S, 10_000, 5)
    parts = np.concatenate([sketch_rows(7, STREAM_S, a, b, 5) for a, b in zip(cuts[:-1], cuts[1:])])
    np.testing.assert_array_equal(parts, whole)


def test_seed_and_stream_change_the_matrix():
    a = sketch_rows(1, STREAM_S, 0, 100, 4)
    assert not np.array_equal(a, sketch_rows(2, STREAM_S, 0, 100, 4))
    assert not np.array_equal(a, sketch_rows(1, STREAM_G, 0, 100, 4))
    np.testing.assert_array_equal(a, sketch_rows(1, STREAM_S, 0, 100, 4))


def test_gaussian_with_requested_variance():
    k = 16
    s = sketch_rows(0, STREAM_S, 0, 2 * SKETCH_BLOCK, k, scale=1 / np.sqrt(k))
    assert s.shape == (2 * SKETCH_BLOCK, k)
    # 131072 samples: the sample mean has std 1/sqrt(k·n) ≈ 0.0007, the variance estimate ≈ 0.4%
    assert abs(s.mean()) < 0.004
    assert s.var() * k == pytest.approx(1.0, rel=0.02)


def test_returned_rows_are_private_copies():
    a = sketch_rows(3, STREAM_S, 0, 10, 2)
    a[:] = 0
    assert sketch_rows(3, STREAM_S, 0, 10, 2).any()


def test_empty_range():
    assert sketch_rows(0, STREAM_S, 5, 5, 3).shape == (0, 3)

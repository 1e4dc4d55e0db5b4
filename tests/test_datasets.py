"""Synthetic matrices: the requested spectrum and noise, written chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from lplr_dask.datasets import generate, parse_shape, spectrum, synthetic
from lplr_dask.errors import LplrValueError, OutputExistsError


def test_noise_free_matrix_has_the_spectrum():
    A = synthetic((2000, 1500), rank=6, decay=0.5, noise=0.0, chunks=(512, 512), seed=1).compute()
    s = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    # U and V have i.i.d. N(0, 1/n) entries: columns are unit-norm and orthogonal up to O(1/sqrt(n))
    np.testing.assert_allclose(s[:6], spectrum("lowrank", 6, 0.5), rtol=0.15)
    assert s[6] < 1e-5 * s[0]


@pytest.mark.parametrize("kind", ["lowrank", "poly", "student-t"])
def test_noise_level_is_relative(kind):
    clean = synthetic((1000, 800), rank=5, noise=0.0, kind=kind, chunks=(300, 300), seed=2).compute()
    noisy = synthetic((1000, 800), rank=5, noise=0.1, kind=kind, chunks=(300, 300), seed=2).compute()
    rel = np.linalg.norm(noisy - clean) / np.linalg.norm(clean)
    assert rel == pytest.approx(0.1, rel=0.15)


def test_generate_writes_zarr_and_refuses_existing(tmp_path):
    out = tmp_path / "a.zarr"
    generate(out, (300, 200), rank=3, chunks=(128, 128), seed=0)
    arr = zarr.open_array(str(out))
    assert arr.shape == (300, 200) and arr.chunks == (128, 128) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[...], synthetic((300, 200), rank=3, chunks=(128, 128), seed=0).compute())
    with pytest.raises(OutputExistsError):
        generate(out, (300, 200), rank=3)


@pytest.mark.parametrize("text", ["10", "0x5", "axb", "3x4x5"])
def test_parse_shape_rejects(text):
    with pytest.raises(LplrValueError, match="shape like"):
        parse_shape(text)


def test_bad_parameters():
    with pytest.raises(LplrValueError, match="kind"):
        synthetic((10, 10), kind="nope")
    with pytest.raises(LplrValueError, match="rank"):
        synthetic((10, 10), rank=11)

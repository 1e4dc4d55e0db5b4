"""Shared fixtures: a LocalCluster client, small generated matrices, the ``xp`` backends."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lplr_dask.datasets import synthetic


@pytest.fixture(scope="session")
def cluster():
    """A LocalCluster of two worker processes on loopback, shared by the session."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        memory_limit="4GiB",
    ) as c:
        yield c


@pytest.fixture
def client(cluster):
    """A Client of the shared cluster, current for the test."""
    from distributed import Client

    with Client(cluster) as c:
        yield c


@pytest.fixture
def small_matrix():
    """A 600×400 low-rank-plus-noise float32 dask array in 128×128 chunks."""
    return synthetic((600, 400), rank=12, decay=0.8, noise=0.01, chunks=(128, 128), seed=3)


def _cupy_or_skip():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
        return cupy
    except Exception as e:  # ImportError, CUDA errors
        pytest.skip(f"cupy with a CUDA device is not available here ({type(e).__name__}: {e})")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module: numpy always, cupy when it imports and sees a device (marker ``gpu``)."""
    if request.param == "numpy":
        return np
    return _cupy_or_skip()


@pytest.fixture
def tmp_store(tmp_path):
    """A path for an output store."""
    return os.fspath(tmp_path / "out.lplr.zarr")

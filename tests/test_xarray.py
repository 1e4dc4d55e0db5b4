"""xarray in and out: a DataArray compressed keeps its dims and coords (Factors.to_xarray), torch
tensors go in, every array written carries dimension_names, and root arrays open as DataArrays."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

import lplr_dask
from lplr_dask import store
from lplr_dask.datasets import synthetic
from lplr_dask.errors import LplrValueError

SHAPE, CHUNKS = (300, 200), (100, 100)


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def dataarray():
    A = synthetic(SHAPE, rank=8, decay=0.7, noise=0.01, chunks=CHUNKS, seed=5)
    return xr.DataArray(
        A,
        dims=("time", "station"),
        coords={
            "time": pd.date_range("2026-01-01", periods=SHAPE[0], freq="h"),
            "station": [f"s{i}" for i in range(SHAPE[1])],
            "height": ("station", np.linspace(0.0, 1.0, SHAPE[1])),
            "run": 7,  # a scalar coordinate
            "grid": (("time", "station"), np.zeros(SHAPE)),  # 2-D: left out
        },
        name="temperature",
    )


@pytest.fixture(scope="module")
def compressed(dataarray, cluster, tmp_path_factory):
    from distributed import Client

    notes: list[str] = []
    path = os.fspath(tmp_path_factory.mktemp("xr") / "t.lplr.zarr")
    with Client(cluster):
        f = lplr_dask.compress(dataarray, path, rank=6, log=notes.append)
    return f, notes


def test_a_dataarray_round_trip_keeps_dims_and_coords(compressed, dataarray):
    f, notes = compressed
    out = f.to_xarray()
    assert isinstance(out.data, da.Array)  # lazy
    assert out.dims == ("time", "station") and out.name == "temperature" and out.shape == SHAPE
    assert out.dtype == dataarray.dtype
    for name in ("time", "station", "height", "run"):
        xr.testing.assert_identical(out.coords[name], dataarray.coords[name])
    assert "grid" not in out.coords and any("grid" in n and "not recorded" in n for n in notes)
    dense = f.L().compute() @ f.R().compute()
    np.testing.assert_allclose(out.values, dense, rtol=1e-6, atol=1e-6 * np.abs(dense).max())
    picked = out.sel(time="2026-01-02T03:00", station="s17").compute()
    assert float(picked) == pytest.approx(dense[27, 17], rel=1e-5)
    assert f.attrs["source"]["dims"] == ["time", "station"]


def test_large_coordinates_are_left_out_with_a_note(cluster, tmp_path, monkeypatch):
    from distributed import Client

    from lplr_dask import api

    monkeypatch.setattr(api, "MAX_COORD_ENTRIES", 100)
    A = xr.DataArray(np.random.default_rng(0).standard_normal((150, 80)), dims=("a", "b"), coords={"a": np.arange(150)})
    notes: list[str] = []
    with Client(cluster):
        f = lplr_dask.compress(A, os.fspath(tmp_path / "big.lplr.zarr"), rank=4, log=notes.append)
    out = f.to_xarray()
    assert out.dims == ("a", "b") and "a" not in out.coords and out.dtype == np.float64
    assert any("a (150,)" in n for n in notes)


def test_without_a_dataarray_the_dims_are_row_col(cluster, tmp_path):
    from distributed import Client

    with Client(cluster):
        f = lplr_dask.compress(
            synthetic((120, 90), rank=4, chunks=(60, 90), seed=1),
            os.fspath(tmp_path / "p.lplr.zarr"),
            rank=3,
            log=_quiet,
        )
    out = f.to_xarray()
    assert out.dims == ("row", "col") and not out.coords


def test_torch_tensors_go_in_and_bfloat16_is_recorded(cluster, tmp_path):
    torch = pytest.importorskip("torch")
    from distributed import Client

    rng = np.random.default_rng(2)
    W = (rng.standard_normal((96, 5)) @ rng.standard_normal((5, 64))).astype(np.float32)
    with Client(cluster):
        f32 = lplr_dask.compress(torch.from_numpy(W), os.fspath(tmp_path / "f32.lplr.zarr"), rank=5, log=_quiet)
        bf = lplr_dask.compress(
            torch.from_numpy(W).to(torch.bfloat16), os.fspath(tmp_path / "bf.lplr.zarr"), rank=5, log=_quiet
        )
    assert f32.attrs["source"]["dtype"] == "float32" and f32.dtype == np.float32
    assert bf.attrs["source"]["dtype"] == "bfloat16" and bf.dtype == np.float32  # NumPy has no bfloat16
    want = torch.from_numpy(W).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.linalg.norm(np.asarray(bf) - want) / np.linalg.norm(want) < 0.02
    assert np.linalg.norm(np.asarray(f32) - W) / np.linalg.norm(W) < 0.02


def test_a_tensor_off_the_cpu_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.zeros((4, 4), device="meta")
    with pytest.raises(LplrValueError, match="on the CPU.*tensor.cpu"):
        lplr_dask.compress(t, os.fspath(tmp_path / "m.lplr.zarr"), rank=1, log=_quiet)


def _all_arrays(group: zarr.Group, prefix: str = ""):
    for name, node in group.members():
        if isinstance(node, zarr.Array):
            yield f"{prefix}{name}", node
        else:
            yield from _all_arrays(node, f"{prefix}{name}/")


def test_every_array_of_a_store_has_dimension_names(compressed):
    f, _ = compressed
    arrays = dict(_all_arrays(zarr.open_group(f.path, mode="r")))
    assert set(arrays) >= {"L/codes", "R/codes", "L/scale", "R/offset"}
    for name, arr in arrays.items():
        assert arr.metadata.dimension_names == store.dimension_names_of(name, arr.ndim), name
    assert arrays["L/codes"].metadata.dimension_names == ("row", "rank")
    assert arrays["R/codes"].metadata.dimension_names == ("rank", "col")
    for side in "LR":  # each factor's group opens as one Dataset
        ds = xr.open_zarr(f.path, group=side, consolidated=False)
        assert set(ds.data_vars) == {"codes", "scale", "offset"}


def test_scratch_arrays_have_dimension_names(tmp_path):
    group = zarr.open_group(os.fspath(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    for name, dims in store.SCRATCH_DIMS.items():
        arr = (
            store.create_scratch_marks(group, name, 3)
            if name.endswith("_done")
            else store.create_scratch(group, name, (4, 2), (4, 2))
        )
        assert arr.metadata.dimension_names == dims, name


def test_root_arrays_open_as_dataarrays(compressed, tmp_path):
    f, _ = compressed
    src = os.fspath(tmp_path / "A.npy")
    A = np.random.default_rng(3).standard_normal((50, 40)).astype(np.float32)
    np.save(src, A)
    outs = {
        "converted": lplr_dask.convert(src, os.fspath(tmp_path / "c.zarr"), log=_quiet),
        "generated": lplr_dask.generate(os.fspath(tmp_path / "g.zarr"), (60, 30), rank=3, chunks=(30, 30)),
        "written": store.write_array(f.to_dask(), os.fspath(tmp_path / "d.zarr"), dimension_names=("time", "station")),
    }
    for what, arr in outs.items():
        path = os.fspath(arr.store_path.store.root)
        with pytest.raises(Exception, match="array"):  # xarray opens groups, not a root array
            xr.open_dataarray(path, engine="zarr")
        got = lplr_dask.open_dataarray(path)
        assert isinstance(got.data, da.Array), what
        assert got.dims == (("time", "station") if what == "written" else ("row", "col")), what
        np.testing.assert_array_equal(got.values, arr[...])
    np.testing.assert_array_equal(lplr_dask.open_dataarray(tmp_path / "c.zarr").values, A)

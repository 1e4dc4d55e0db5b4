"""``lplr convert`` and reading .npy, HDF5 and safetensors inputs directly."""

from __future__ import annotations

import json
import os

import dask
import h5py
import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import cli
from lplr_dask.convert import convert
from lplr_dask.errors import LplrTypeError, LplrValueError, OutputExistsError, SourceNotFoundError
from lplr_dask.sources import list_arrays, open_source, read_source


@pytest.fixture
def a():
    return np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)


def _write_safetensors(path, tensors):
    import torch
    from safetensors.torch import save_file

    save_file(
        {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in tensors.items()},
        path,
    )


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int16", "uint8"])
def test_npy_round_trip(tmp_path, a, dtype):
    x = (a * 50).astype(dtype)
    np.save(tmp_path / "a.npy", x)
    z = convert(tmp_path / "a.npy", tmp_path / "o.zarr", chunks=(64, 96))
    assert z.dtype == np.dtype(dtype) and z.chunks == (64, 96)
    np.testing.assert_array_equal(z[...], x)
    assert z.attrs["lplr_convert"] == {"source": str(tmp_path / "a.npy"), "format": "npy", "source_dtype": dtype}


def test_fortran_order_npy(tmp_path, a):
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    np.testing.assert_array_equal(convert(tmp_path / "f.npy", tmp_path / "o.zarr", chunks=(100, 50))[...], a)


def test_hdf5_datasets(tmp_path, a):
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_dataset("enc/w", data=a, chunks=(50, 40), compression="gzip")
        f.create_dataset("b", data=np.arange(7, dtype=np.int64))
    assert list_arrays(tmp_path / "m.h5") == {"b": ((7,), "int64"), "enc/w": ((300, 200), "float32")}
    for key in ("/enc/w", "enc/w"):
        z = convert(f"{tmp_path}/m.h5:{key}", tmp_path / "o.zarr", overwrite=True)
        np.testing.assert_array_equal(z[...], a)
    src = read_source(f"{tmp_path}/m.h5:/enc/w")
    assert src.array.chunks[0][0] % 50 == 0  # "auto" blocks align with the dataset's own chunks
    with pytest.raises(LplrValueError, match="name the dataset") as e:
        read_source(tmp_path / "m.h5")
    assert "m.h5:enc/w" in str(e.value)
    with pytest.raises(SourceNotFoundError, match="has no dataset '/nope'. It has: 'b', 'enc/w'"):
        read_source(f"{tmp_path}/m.h5:/nope")


def test_safetensors_tensors_including_bfloat16(tmp_path, a):
    import torch
    from safetensors import safe_open

    bf = torch.from_numpy(a).to(torch.bfloat16)
    _write_safetensors(
        tmp_path / "m.safetensors",
        {"w.bf16": bf, "w.f16": a.astype(np.float16), "w.f32": a, "n.i32": np.arange(6, dtype=np.int32).reshape(2, 3)},
    )
    assert list_arrays(tmp_path / "m.safetensors")["w.bf16"] == ((300, 200), "bfloat16")
    with safe_open(tmp_path / "m.safetensors", framework="numpy") as f:
        for name in ("w.f16", "w.f32", "n.i32"):
            z = convert(
                f"{tmp_path}/m.safetensors:{name}",
                tmp_path / "o.zarr",
                overwrite=True,
                chunks=(64, 64) if name[0] == "w" else "auto",
            )
            np.testing.assert_array_equal(z[...], f.get_tensor(name))
            assert z.dtype == f.get_tensor(name).dtype
    z = convert(f"{tmp_path}/m.safetensors:w.bf16", tmp_path / "o.zarr", overwrite=True, chunks=(64, 64))
    assert z.dtype == np.float32 and z.attrs["lplr_convert"]["source_dtype"] == "bfloat16"
    np.testing.assert_array_equal(z[...], bf.float().numpy())  # widening bfloat16 is exact
    with pytest.raises(LplrValueError, match="name the tensor"):
        read_source(tmp_path / "m.safetensors")
    with pytest.raises(SourceNotFoundError, match="has no tensor 'nope'"):
        read_source(f"{tmp_path}/m.safetensors:nope")


def test_unreadable_safetensors_dtype_is_refused(tmp_path):
    header = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "f8.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(LplrTypeError, match="F8_E4M3"):
        read_source(f"{tmp_path}/f8.safetensors:x")


def test_zarr_v2_to_v3_and_overwrite(tmp_path, a):
    zarr.create_array(tmp_path / "v2.zarr", data=a, chunks=(100, 100), zarr_format=2)
    z = convert(tmp_path / "v2.zarr", tmp_path / "o.zarr")
    assert z.metadata.zarr_format == 3 and z.chunks == (100, 100)
    np.testing.assert_array_equal(z[...], a)
    with pytest.raises(OutputExistsError):
        convert(tmp_path / "v2.zarr", tmp_path / "o.zarr")
    z = convert(tmp_path / "v2.zarr", tmp_path / "o.zarr", chunks=(150, 50), overwrite=True)
    assert z.chunks == (150, 50)


def test_compress_reads_files_directly_like_their_zarr_copy(client, tmp_path, small_matrix):
    m = small_matrix.compute()
    np.save(tmp_path / "m.npy", m)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["w"] = m
    _write_safetensors(tmp_path / "m.safetensors", {"w": m})
    kw = dict(rank=10, bits=(8, 8), seed=2, precision="float64")  # float64 products: codes identical for any chunking
    reference = lplr_dask.compress(
        open_source(tmp_path / "m.npy").rechunk((128, 128)), tmp_path / "ref.lplr.zarr", **kw
    )
    for loc in (f"{tmp_path}/m.npy", f"{tmp_path}/m.h5:/w", f"{tmp_path}/m.safetensors:w"):
        out = tmp_path / (os.path.basename(loc).replace(":", "_").replace("/", "") + ".lplr.zarr")
        f = lplr_dask.compress(loc, out, **kw)
        assert f.attrs["source"]["path"] == loc
        # results do not depend on chunking: the file's own blocks give the same codes
        np.testing.assert_array_equal(
            zarr.open_group(out)["R/codes"][...], zarr.open_group(reference.path)["R/codes"][...]
        )
        assert f.attrs["error_estimate"] == pytest.approx(reference.attrs["error_estimate"], rel=1e-9)


def _start_rss_sampler(dask_worker):
    import threading
    import time

    import psutil

    proc = psutil.Process()
    state = {"base": proc.memory_info().rss, "peak": 0, "stop": False}

    def loop():
        while not state["stop"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(0.002)

    threading.Thread(target=loop, daemon=True).start()
    dask_worker.lplr_rss = state


def _stop_rss_sampler(dask_worker):
    state = dask_worker.lplr_rss
    state["stop"] = True
    return state["base"], state["peak"]


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
def test_convert_memory_stays_far_below_a_source_larger_than_the_worker(tmp_path, fmt):
    """A 524 MB source through one worker limited to 384 MiB: the worker's RSS grows by a few blocks."""
    from distributed import Client, LocalCluster

    shape, rows = (16000, 8192), 1000
    rng = np.random.default_rng(0)
    if fmt == "npy":
        loc = str(tmp_path / "big.npy")
        big = np.lib.format.open_memmap(loc, mode="w+", dtype=np.float32, shape=shape)
        for i in range(0, shape[0], rows):
            big[i : i + rows] = rng.standard_normal((rows, shape[1]), dtype=np.float32)
        big.flush()
        del big
    else:
        loc = f"{tmp_path}/big.h5:/w"
        with h5py.File(tmp_path / "big.h5", "w") as f:
            ds = f.create_dataset("w", shape=shape, dtype=np.float32, chunks=(rows, 2048))
            for i in range(0, shape[0], rows):
                ds[i : i + rows] = rng.standard_normal((rows, shape[1]), dtype=np.float32)
    source_bytes = shape[0] * shape[1] * 4
    # 384 MiB: the worker's imports take 206 MiB with xarray installed, which left 50 MiB of a
    # 256 MiB limit (it failed once in CI, on a loaded machine)
    limit = 384 * 2**20
    assert source_bytes > limit
    # the test measures the RSS growth over the worker's base; a worker that starts near 80% of the
    # limit must not pause, or the write never ends
    no_pause = {"distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False}
    with (
        dask.config.set(no_pause),
        LocalCluster(
            n_workers=1, threads_per_worker=1, memory_limit=limit, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        c.run(_start_rss_sampler)
        z = convert(loc, tmp_path / "big.zarr", chunks=(rows, 2048))
        ((base, peak),) = c.run(_stop_rss_sampler).values()
    print(f"{fmt}: source {source_bytes / 2**20:.0f} MiB, worker RSS {base / 2**20:.0f} -> {peak / 2**20:.0f} MiB")
    assert peak < limit
    assert peak - base < source_bytes / 4, f"worker RSS grew by {(peak - base) / 2**20:.0f} MiB"
    check = slice(4000, 4010)
    if fmt == "npy":
        np.testing.assert_array_equal(z[check], np.load(loc, mmap_mode="r")[check])
    else:
        with h5py.File(tmp_path / "big.h5", "r") as f:
            np.testing.assert_array_equal(z[check], f["w"][check])


def test_cli_convert_json(tmp_path, a, capsys):
    np.save(tmp_path / "a.npy", a)
    assert (
        cli.main(
            [
                "convert",
                str(tmp_path / "a.npy"),
                str(tmp_path / "o.zarr"),
                "--chunks",
                "100x100",
                "--json",
                "--workers",
                "1",
                "--threads-per-worker",
                "1",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == [300, 200] and out["chunks"] == [100, 100] and out["source_dtype"] == "float32"
    assert cli.main(["convert", str(tmp_path / "nope.npy"), str(tmp_path / "x.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_sharded_checkpoint_converts_to_a_zarr_group(tmp_path, a, capsys):
    import json

    import torch

    from lplr_dask.cli import main
    from lplr_dask.convert import convert_group

    w = torch.from_numpy(a).to(torch.bfloat16)
    _write_safetensors(tmp_path / "s1.safetensors", {"enc.w": w})
    _write_safetensors(tmp_path / "s2.safetensors", {"enc.b": np.arange(5, dtype=np.int32)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"enc.w": "s1.safetensors", "enc.b": "s2.safetensors"}}))
    group = convert_group(index, tmp_path / "model.zarr", chunks=(128, 128), log=lambda m: None)
    assert group.attrs["lplr_convert"]["complete"] and group.attrs["lplr_convert"]["arrays"] == ["enc.b", "enc.w"]
    zw = zarr.open_array(tmp_path / "model.zarr" / "enc.w")
    assert zw.chunks == (128, 128) and zw.attrs["lplr_convert"]["source_dtype"] == "bfloat16"
    np.testing.assert_array_equal(zw[...], w.float().numpy())  # bfloat16 widened exactly
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "model.zarr" / "enc.b")[...], np.arange(5))
    assert main(["convert", str(index), str(tmp_path / "cli.zarr"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["names"] == ["enc.b", "enc.w"]
    # the converted group is a group input like any other
    assert lplr_dask.sources.list_arrays(tmp_path / "cli.zarr")["enc.w"] == ((300, 200), "float32")


def test_a_failed_group_conversion_leaves_nothing(tmp_path, a, monkeypatch):
    import importlib
    import json

    convert_module = importlib.import_module("lplr_dask.convert")  # the name lplr_dask.convert is the function

    _write_safetensors(tmp_path / "s1.safetensors", {"x": a, "y": a.copy()})
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "s1.safetensors", "y": "s1.safetensors"}}))
    real = convert_module.convert

    def failing(source, out, **kw):
        if str(out).endswith("/y"):
            raise OSError("disk full")
        return real(source, out, **kw)

    monkeypatch.setattr(convert_module, "convert", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_module.convert_group(index, tmp_path / "out.zarr", log=lambda m: None)
    assert not (tmp_path / "out.zarr").exists()

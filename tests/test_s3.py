"""Remote stores: an S3-compatible HTTP server (moto) on loopback, driven through s3fs.

The endpoint reaches the worker processes only through the storage options (no environment
variable names it), so results written by pass-2 tasks on the workers prove that the options
travel with the store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import cli, store
from lplr_dask.errors import LplrValueError, OutputExistsError, SourceNotFoundError

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (a real HTTP server on its own port) and a bucket in it."""
    mp = pytest.MonkeyPatch()
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        mp.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(**options).mkdir("lplr-test")
    yield options
    server.stop()
    mp.undo()


def _put(url, data, options, chunks=(128, 128), zarr_format=3):
    zarr.create_array(store.locate(url, options), data=data, chunks=chunks, zarr_format=zarr_format)


def _codes(path, options=None):
    g = zarr.open_group(store.locate(path, options), mode="r")
    return g["L/codes"][...], g["R/codes"][...], g.attrs["lplr"]["error_estimate"]


def assert_same_result(a, b, options):
    for x, y in zip(_codes(a, options if "://" in str(a) else None), _codes(b, options if "://" in str(b) else None)):
        np.testing.assert_array_equal(x, y)


def test_s3_in_and_out_match_a_local_array(client, tmp_path, s3, small_matrix):
    m = small_matrix.compute()
    zarr.create_array(tmp_path / "m.zarr", data=m, chunks=(128, 128))
    kw = dict(rank=8, bits=(4, 6), seed=3)
    local = lplr_dask.compress(tmp_path / "m.zarr", tmp_path / "local.lplr.zarr", **kw)
    local_error = lplr_dask.evaluate(tmp_path / "m.zarr", local)
    for fmt in (3, 2):
        src = f"s3://lplr-test/in{fmt}.zarr/weights/w"
        _put(src, m, s3, zarr_format=fmt)
        out = f"s3://lplr-test/out{fmt}.lplr.zarr"
        f = lplr_dask.compress(src, out, storage_options=s3, **kw)
        assert f.path == out and f.attrs["source"]["path"] == src
        assert_same_result(tmp_path / "local.lplr.zarr", out, s3)
        assert f.nbytes == store.bytes_on_disk(out, storage_options=s3) > 0
        assert not store.exists(f"{out}/_work", s3)  # scratch written by the workers, then removed
        again = lplr_dask.open_factors(out, storage_options=s3)
        np.testing.assert_allclose(again.matvec(np.ones(400)), f.matvec(np.ones(400)))
        assert lplr_dask.evaluate(src, again, storage_options=s3) == pytest.approx(local_error, rel=1e-9)
        assert again.attrs["error_exact"] == pytest.approx(local_error, rel=1e-9)  # written back to S3


def test_s3_errors_and_overwrite(client, s3, small_matrix):
    with pytest.raises(SourceNotFoundError, match="storage options"):
        lplr_dask.compress("s3://lplr-test/nothing.zarr", "s3://lplr-test/x.lplr.zarr", rank=2, storage_options=s3)
    g = zarr.open_group(store.locate("s3://lplr-test/grp.zarr", s3), mode="w")
    g.create_array("a", shape=(8, 4), dtype="f4")
    with pytest.raises(LplrValueError, match=r"s3://lplr-test/grp\.zarr/a \(8x4 float32\)"):
        lplr_dask.compress("s3://lplr-test/grp.zarr", "s3://lplr-test/x.lplr.zarr", rank=2, storage_options=s3)
    out = "s3://lplr-test/ow.lplr.zarr"
    lplr_dask.compress(small_matrix, out, rank=3, storage_options=s3)
    with pytest.raises(OutputExistsError):
        lplr_dask.compress(small_matrix, out, rank=3, storage_options=s3)
    assert lplr_dask.compress(small_matrix, out, rank=4, overwrite=True, storage_options=s3).rank == 4
    store.remove(out, s3)
    assert not store.exists(out, s3)


def test_cli_storage_options_on_every_command(client, tmp_path, s3, small_matrix, capsys, monkeypatch):
    m = small_matrix.compute()
    np.save(tmp_path / "m.npy", m)
    opts = ["--storage-options", json.dumps(s3)]
    sched = ["--scheduler", client.scheduler.address, "--quiet", "--json"]
    src, out, recon = "s3://lplr-test/cli.zarr", "s3://lplr-test/cli.lplr.zarr", "s3://lplr-test/recon.zarr"

    def run(*args):
        assert cli.main([*args, *opts, *sched]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    assert run("convert", str(tmp_path / "m.npy"), src)["shape"] == [600, 400]
    assert run("compress", src, out, "--rank", "12", "--evaluate")["error_exact"] < 0.1
    monkeypatch.setenv("LPLR_STORAGE_OPTIONS", json.dumps(s3))  # the default of --storage-options
    assert cli.main(["info", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rank"] == 12
    assert run("evaluate", src, out)["error_exact"] < 0.1
    assert run("decompress", out, recon)["dtype"] == "float32"
    r = zarr.open_array(store.locate(recon, s3), mode="r")[...]
    assert np.linalg.norm(r - m) / np.linalg.norm(m) < 0.1
    g = zarr.open_group(store.locate("s3://lplr-test/model.zarr", s3), mode="w")
    g.create_array("w", data=m, chunks=(128, 128))
    g.create_array("pos", data=np.ones((2, 384), np.float32))
    result = run("compress-group", "s3://lplr-test/model.zarr", "s3://lplr-test/model.lplr.zarr", "--match-nq", "4")
    assert [e["action"] for e in result["arrays"]] == ["copy", "lplr"]
    assert (
        lplr_dask.open_factors("s3://lplr-test/model.lplr.zarr/w", storage_options=s3).rank
        == result["arrays"][1]["rank"]
    )
    assert cli.main(["generate", "s3://lplr-test/g.zarr", "--shape", "10x10", *opts]) == 2
    assert "generate locally and upload with `lplr convert" in capsys.readouterr().err
    assert cli.main(["info", out, "--storage-options", "not json"]) == 2
    assert "--storage-options: expected a JSON object" in capsys.readouterr().err


def test_append_on_s3_commits_by_copying_keys_and_matches_a_local_append(client, tmp_path, s3):
    """An appendable store on S3 grows by an append whose commit copies keys (no rename there):
    the same codes as the same append on a local disk, and no staging left behind."""
    from lplr_dask.datasets import synthetic

    A = synthetic((384, 200), rank=6, noise=0.01, chunks=(128, 100), seed=7).compute()
    first, new = A[:256], A[256:]
    kw = dict(rank=6, passes=1, precision="float64", appendable=True, log=lambda m: None)
    zarr.create_array(tmp_path / "first.zarr", data=first, chunks=(128, 100))
    zarr.create_array(tmp_path / "new.zarr", data=new, chunks=(128, 100))
    lplr_dask.compress(tmp_path / "first.zarr", tmp_path / "local.lplr.zarr", **kw)
    lplr_dask.append(tmp_path / "local.lplr.zarr", tmp_path / "new.zarr", axis="rows", log=lambda m: None)
    _put("s3://lplr-test/first.zarr", first, s3, chunks=(128, 100))
    _put("s3://lplr-test/new.zarr", new, s3, chunks=(128, 100))
    out = "s3://lplr-test/grown.lplr.zarr"
    lplr_dask.compress("s3://lplr-test/first.zarr", out, storage_options=s3, **kw)
    f = lplr_dask.append(out, "s3://lplr-test/new.zarr", axis="rows", storage_options=s3, log=lambda m: None)
    assert f.shape == (384, 200)
    assert_same_result(tmp_path / "local.lplr.zarr", out, s3)
    assert not store.exists(f"{out}/_append", s3)
    assert lplr_dask.verify(out, storage_options=s3)["problems"] == []

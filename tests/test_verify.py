"""Tests of lplr_dask/verify.py and of damaged stores end to end: a codes chunk deleted, truncated
or bit-flipped is named on open or on read, by :func:`lplr_dask.verify.verify`, and by ``lplr
verify`` (exit 2, one line); a clean store verifies (exit 0)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask.datasets import synthetic
from lplr_dask.errors import StoreFormatError
from lplr_dask.verify import verify

FIX = "the store is damaged; recompress or restore it"
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def stored(cluster, tmp_path_factory):
    """A 600×400 matrix compressed at rank 8, 4 bits: L/codes in 5 row chunks, R/codes in 4 column chunks."""
    from distributed import Client

    A = synthetic((600, 400), rank=12, decay=0.8, noise=0.01, chunks=(128, 128), seed=3)
    path = os.fspath(tmp_path_factory.mktemp("verify") / "f.lplr.zarr")
    with Client(cluster):
        lplr_dask.compress(A, path, rank=8, bits=(4, 4), log=lambda m: None)
    return path


def _chunk(root: str, name: str, key: str) -> str:
    return os.path.join(root, *name.split("/"), *key.split("/"))


def delete(path: str) -> None:
    os.remove(path)


def truncate(path: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def bit_flip(path: str) -> None:
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    data[len(data) // 2] ^= 0x10
    with open(path, "wb") as fh:
        fh.write(bytes(data))


#: (damage, array, chunk key, what the message says of the chunk, a block of L·R that reads it)
CASES = [
    (delete, "L/codes", "c/1/0", "is missing", (slice(130, 140), slice(0, 10))),
    (truncate, "R/codes", "c/0/2", "fails its crc32c checksum", (slice(0, 10), slice(260, 270))),
    (bit_flip, "L/codes", "c/3/0", "fails its crc32c checksum", (slice(400, 410), slice(0, 10))),
]
IDS = ["delete", "truncate", "bit-flip"]


@pytest.fixture(params=CASES, ids=IDS)
def damaged(request, stored, tmp_path):
    """(copy of the store with one codes chunk damaged, array, key, problem, block that reads it)."""
    damage, name, key, problem, block = request.param
    root = os.fspath(tmp_path / "damaged.lplr.zarr")
    shutil.copytree(stored, root)
    damage(_chunk(root, name, key))
    return root, name, key, problem, block


def test_damage_is_named_on_open_or_on_read(client, damaged):
    root, name, key, problem, block = damaged
    expected = re.escape(f"{root}: chunk {name} {key} {problem}")
    if problem == "is missing":  # found from the listing when the store opens: no codes read
        with pytest.raises(StoreFormatError, match=f"^{expected} — {FIX}$"):
            lplr_dask.open_factors(root)
        return
    f = lplr_dask.open_factors(root)  # lazy: the damaged chunk is not read yet
    with pytest.raises(StoreFormatError, match=f"^{expected} \\(truncated or altered\\) — {FIX}$"):
        f.to_dask().compute()
    # a block that reads the chunk fails the same way; one that does not is read
    with pytest.raises(StoreFormatError, match=f"^{expected} \\(truncated or altered\\) — {FIX}$"):
        f[block].compute()
    assert f[0:5, 0:5].compute().shape == (5, 5)


def test_verify_names_the_damaged_chunk(client, damaged):
    root, name, key, problem, _ = damaged
    with pytest.raises(StoreFormatError, match="^" + re.escape(f"{root}: chunk {name} {key} {problem}")) as e:
        verify(root)
    assert e.value.problems == [{"array": name, "chunk": key, "problem": e.value.problems[0]["problem"]}]
    assert e.value.problems[0]["problem"].startswith(problem)


def _lplr_verify(client, *args: str) -> subprocess.CompletedProcess[str]:
    """``lplr verify ...`` in a subprocess, on the test cluster (no cluster of its own to start)."""
    address = client.scheduler.address
    return subprocess.run(
        [sys.executable, "-m", "lplr_dask.cli", "verify", *args, "--scheduler", address],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_verify_exits_2_naming_the_chunk(client, damaged):
    root, name, key, problem, _ = damaged
    r = _lplr_verify(client, root)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {root}: chunk {name} {key} {problem}") and last.endswith(FIX), last
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_verify_a_clean_store(client, stored):
    r = _lplr_verify(client, stored, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    # 5 + 4 codes chunks, and one chunk each for the four scales and offsets
    assert report == {
        "store": stored,
        "version": 2,
        "arrays_checked": 6,
        "chunks_checked": 13,
        "bytes_on_disk": lplr_dask.open_factors(stored).nbytes,
        "problems": [],
    }


def test_verify_lists_several_damaged_chunks_and_counts_the_rest(client, stored, tmp_path):
    root = os.fspath(tmp_path / "many.lplr.zarr")
    shutil.copytree(stored, root)
    for i in range(5):
        delete(_chunk(root, "L/codes", f"c/{i}/0"))
    for j in range(2):
        truncate(_chunk(root, "R/codes", f"c/0/{j}"))
    with pytest.raises(StoreFormatError) as e:
        verify(root)
    message = str(e.value)
    assert message.startswith(f"{root}: 7 chunks are damaged: L/codes c/0/0 is missing; L/codes c/1/0 is missing;")
    assert "; and 2 more — " in message and message.endswith(FIX) and "R/codes" not in message
    assert [p["chunk"] for p in e.value.problems if p["array"] == "R/codes"] == ["c/0/0", "c/0/1"]


def test_verify_checks_code_ranges_and_finite_scales(client, stored, tmp_path):
    root = os.fspath(tmp_path / "values.lplr.zarr")
    shutil.copytree(stored, root)
    g = zarr.open_group(root, mode="r+")
    g["L/codes"][256:260, :] = 16  # 4-bit codes: 16 is out of range, though the chunk's checksum is good
    scale = g["R/scale"][...]
    scale[2, 0] = np.nan
    g["R/scale"][...] = scale
    with pytest.raises(StoreFormatError) as e:
        verify(root)
    assert e.value.problems == [
        {"array": "L/codes", "chunk": "c/2/0", "problem": "holds codes >= 16 (2**bits)"},
        {"array": "R/scale", "chunk": "c/0/0", "problem": "holds NaN or Inf"},
    ]
    assert str(e.value).startswith(f"{root}: 2 chunks are damaged: L/codes c/2/0 holds codes >= 16")


@pytest.mark.parametrize("name", ["v1-default", "v2-default"])
def test_verify_fixtures_of_every_version(client, name):
    path = os.path.join(FIXTURES, f"{name}.lplr.zarr")
    report = verify(path)
    assert report["version"] == int(name[1]) and report["problems"] == [] and report["chunks_checked"] == 9


def test_verify_a_compress_group_output(client, tmp_path):
    w = synthetic((256, 192), rank=6, decay=0.8, noise=0.01, chunks=(128, 96), seed=1).compute()
    src = zarr.open_group(tmp_path / "model.zarr", mode="w")
    src.create_array("w", data=w, chunks=(128, 96))
    src.create_array("b", data=np.linspace(-1, 1, 192, dtype=np.float32), chunks=(64,))
    out = os.fspath(tmp_path / "model.lplr.zarr")
    lplr_dask.compress_group(tmp_path / "model.zarr", out, rank=4, log=lambda m: None)
    report = verify(out)
    # w: L/codes 2 chunks, R/codes 2, four scales and offsets; b: 3 chunks of the copy
    assert (report["arrays_checked"], report["chunks_checked"]) == (7, 11)
    delete(os.path.join(out, "b", "c", "1"))
    truncate(os.path.join(out, "w", "R", "codes", "c", "0", "1"))
    pattern = "^" + re.escape(f"{out}: 2 chunks are damaged: ") + f".* — {FIX}$"
    with pytest.raises(StoreFormatError, match=pattern) as e:
        verify(out)
    assert "b c/1 is missing" in str(e.value) and "w/R/codes c/0/1 fails its crc32c checksum" in str(e.value)


def test_cli_decompress_of_a_damaged_store_is_one_line_exit_2(client, stored, tmp_path, capsys):
    from lplr_dask.cli import main

    root = os.fspath(tmp_path / "t.lplr.zarr")
    shutil.copytree(stored, root)
    bit_flip(_chunk(root, "R/codes", "c/0/1"))
    out = tmp_path / "recon.zarr"
    assert main(["decompress", root, os.fspath(out), "--quiet"]) == 2  # the test's client is current
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert errors == [f"error: {root}: chunk R/codes c/0/1 fails its crc32c checksum (truncated or altered) — {FIX}"], (
        err
    )
    assert not out.exists()  # nothing half-written left behind


def test_verify_checks_an_appendable_stores_kept_sketches(client, tmp_path):
    A = synthetic((300, 200), rank=6, noise=0.01, chunks=(128, 128), seed=4)
    path = os.fspath(tmp_path / "a.lplr.zarr")
    lplr_dask.compress(A, path, rank=6, passes=1, appendable=True, log=lambda m: None)
    clean = verify(path)
    names = {f"sketches/{n}" for n in ("Y", "AG", "Z", "sumsq")}
    assert clean["problems"] == [] and clean["arrays_checked"] >= 6 + len(names)
    arr = zarr.open_array(os.path.join(path, "sketches", "Y"))
    key = "c/" + "/".join(["0"] * arr.ndim)
    bit_flip(os.path.join(path, "sketches", "Y", *key.split("/")))
    with pytest.raises(StoreFormatError, match="sketches/Y") as e:
        verify(path)
    assert [p["array"] for p in e.value.problems] == ["sketches/Y"]

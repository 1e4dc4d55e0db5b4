"""The ``lplr`` command end to end in subprocesses: results, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

LPLR = [sys.executable, "-m", "lplr_dask.cli"]
CLUSTER = ["--workers", "1", "--threads-per-worker", "2", "--memory-limit", "2GiB"]


def lplr(*args: str, cwd: os.PathLike[str] | str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LPLR, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "a.zarr"
    r = lplr("generate", path, "--shape", "900x500", "--rank", "8", "--noise", "0.01", "--chunks", "256x256", *CLUSTER)
    assert r.returncode == 0, r.stderr
    return path


def assert_usage_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_generate_compress_info_evaluate_decompress(source, tmp_path):
    out = tmp_path / "o.lplr.zarr"
    r = lplr("compress", source, out, "--rank", "16", "--bits", "8", "6", "--evaluate", *CLUSTER)
    assert r.returncode == 0, r.stderr
    assert "bits per entry" in r.stdout and "error exact" in r.stdout
    assert "Dask dashboard" in r.stderr and "pass 1" in r.stderr

    info = json.loads(lplr("info", out, "--json").stdout)
    assert info["shape"] == [900, 500] and info["rank"] == 16 and info["bits"] == [8, 6]
    assert info["bits_per_entry"] == pytest.approx(info["bytes_on_disk"] * 8 / (900 * 500))
    assert 0 < info["error_exact"] < 0.05

    r = lplr("evaluate", source, out, "--json", *CLUSTER)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["error_exact"] == pytest.approx(info["error_exact"])

    recon = tmp_path / "r.zarr"
    r = lplr("decompress", out, recon, *CLUSTER)
    assert r.returncode == 0, r.stderr
    a = np.asarray(zarr.open_array(str(source))[...])
    b = np.asarray(zarr.open_array(str(recon))[...])
    assert b.dtype == a.dtype and b.shape == a.shape
    assert np.linalg.norm(a - b) / np.linalg.norm(a) == pytest.approx(info["error_exact"], rel=1e-3)


def test_json_output_is_one_object(source, tmp_path):
    r = lplr("compress", source, tmp_path / "o.lplr.zarr", "--match-nq", "2", "--json", *CLUSTER)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # the whole of stdout parses
    assert data["rank"] == 900 * 500 * 2 // (900 * 8 + 500 * 8)


def test_help_exits_zero():
    r = lplr("--help")
    assert r.returncode == 0 and "compress" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--rank", "0"], ["rank", "1 to"]),
        (["--rank", "501"], ["rank", "500"]),
        (["--rank", "4", "--bits", "0", "8"], ["B1", "1 to 16"]),
        (["--rank", "4", "--bits", "8", "17"], ["B2", "1 to 16"]),
        ([], ["one of", "--rank", "--bits-per-entry", "--match-nq", "--target-error", "required"]),
        (["--rank", "4", "--match-nq", "2"], ["--match-nq", "not allowed with", "--rank"]),
        (["--rank", "4", "--passes", "1", "--power-iters", "1"], ["--passes 1", "--power-iters"]),
        (["--rank", "4", "--quantizer", "fancy"], ["quantizer", "fancy"]),
        (["--rank", "4", "--overwrite", "--resume"], ["not allowed"]),
        (["--rank", "4", "--oversample", "-1"], ["--oversample", ">= 0"]),
        (["--rank", "4", "--oversample", "k"], ["--oversample", "integer"]),
    ],
)
def test_bad_arguments(source, tmp_path, args, words):
    out = tmp_path / "o.lplr.zarr"
    assert_usage_error(lplr("compress", source, out, *args), *words)
    assert not out.exists()


def test_missing_input(tmp_path):
    assert_usage_error(lplr("compress", tmp_path / "nope.zarr", tmp_path / "o.lplr.zarr", "--rank", "2"), "does not exist")


def test_not_2d_and_non_numeric(tmp_path):
    zarr.create_array(str(tmp_path / "cube.zarr"), shape=(4, 4, 4), dtype="f4")
    assert_usage_error(lplr("compress", tmp_path / "cube.zarr", tmp_path / "o.lplr.zarr", "--rank", "2"), "2-D")
    zarr.create_array(str(tmp_path / "c.zarr"), shape=(8, 8), dtype="c8")
    assert_usage_error(lplr("compress", tmp_path / "c.zarr", tmp_path / "o.lplr.zarr", "--rank", "2"), "complex")


def test_nan_in_input(tmp_path):
    a = np.random.default_rng(0).standard_normal((300, 200)).astype("f4")
    a[250, 10] = np.nan
    src = zarr.create_array(str(tmp_path / "nan.zarr"), shape=a.shape, chunks=(100, 100), dtype="f4")
    src[...] = a
    out = tmp_path / "o.lplr.zarr"
    assert_usage_error(lplr("compress", tmp_path / "nan.zarr", out, "--rank", "3", *CLUSTER), "NaN", "rows 200:300")
    assert not out.exists()


def test_existing_output(source, tmp_path):
    out = tmp_path / "o.lplr.zarr"
    out.mkdir()
    assert_usage_error(lplr("compress", source, out, "--rank", "3", *CLUSTER), "--overwrite")


def test_info_on_incomplete_or_missing_store(tmp_path):
    assert_usage_error(lplr("info", tmp_path / "none.lplr.zarr"), "Found none")
    zarr.open_group(str(tmp_path / "x.lplr.zarr"), mode="w")
    assert_usage_error(lplr("info", tmp_path / "x.lplr.zarr"), "not an lplr store")

"""The ``lplr`` command end to end in subprocesses: results, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import re
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
        ([], ["exactly one of", "--rank", "--bits-per-entry", "--match-nq", "--target-error", "got none"]),
        (["--rank", "4", "--match-nq", "2"], ["exactly one", "(got --rank, --match-nq)"]),
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
    assert_usage_error(
        lplr("compress", tmp_path / "nope.zarr", tmp_path / "o.lplr.zarr", "--rank", "2"), "does not exist"
    )


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


# --------------------------------------------------------------------------------------------
# A command that explains itself


def _subparsers():
    from lplr_dask.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, action.choices


def test_version_and_python_m_lplr_dask():
    import lplr_dask

    r = lplr("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lplr {lplr_dask.__version__}", (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-m", "lplr_dask", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "compress-group" in r.stdout and "Examples" in r.stdout, r.stderr


def test_every_subcommand_has_examples_and_help_for_every_argument(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, commands = _subparsers()
    assert set(commands) == {
        "generate",
        "convert",
        "compress",
        "compress-group",
        "info",
        "evaluate",
        "decompress",
        "verify",
        "append",
        "finalize",
        "export",
    }
    for name, sub in commands.items():
        text = sub.format_help()
        assert "Examples:" in text and f"\n  lplr {name} " in text, text
        for action in sub._actions:
            assert action.help, (name, action.dest)
            if action.option_strings and action.nargs != 0:  # options that take a value have a short metavar
                assert action.metavar or action.choices, (name, action.dest)
        assert not re.search(r"--[a-z-]+ [A-Z]+_[A-Z_]+\b", text), text  # no BITS_PER_ENTRY-like metavars
        assert "-v, --verbose" in text and "-q, --quiet" in text


def test_usage_shows_the_size_options_as_one_choice(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, commands = _subparsers()
    assert "(--rank K | --bits-per-entry X | --match-nq B | --target-error E)" in commands["compress"].format_usage()
    assert "(--rank K | --bits-per-entry X | --match-nq B)" in commands["compress-group"].format_usage()
    group_help = commands["compress-group"].format_help()
    assert "counting the codes only" in group_help
    assert "scales and metadata included" in commands["compress"].format_help()


# --------------------------------------------------------------------------------------------
# Bad input fails before a cluster starts: one line, exit 2


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    zarr.create_array(str(d / "strings.zarr"), shape=(8, 8), dtype=str)
    zarr.create_array(str(d / "plain.zarr"), shape=(8, 8), dtype="f4")[...] = 1
    (d / "huge.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    (d / "junk.pem").write_text("not a certificate\n")
    return d


@pytest.mark.parametrize(
    "argv, words",
    [
        (["compress", "{d}/strings.zarr", "{d}/o", "--rank", "2"], ["real numeric", "StringDType"]),
        (["compress", "{d}/plain.zarr", "{d}/o", "--bits-per-entry", "inf"], ["--bits-per-entry", "finite", "'inf'"]),
        (["compress", "{d}/plain.zarr", "{d}/o", "--bits-per-entry", "nan"], ["--bits-per-entry", "finite"]),
        (["compress", "{d}/plain.zarr", "{d}/o", "--bits-per-entry", "-1"], ["--bits-per-entry", "> 0"]),
        (
            [
                "compress",
                "{d}/plain.zarr",
                "{d}/o",
                "--rank",
                "2",
                "--tls-ca-file",
                "{d}/junk.pem",
                "--tls-cert",
                "{d}/junk.pem",
                "--tls-key",
                "{d}/junk.pem",
            ],
            ["--tls-ca-file", "PEM"],
        ),
        (
            ["compress", "{d}/huge.safetensors:w", "{d}/o", "--rank", "2"],
            ["safetensors", "header of 4611686018427387904 bytes"],
        ),
        (["compress-group", "{d}/huge.safetensors", "{d}/o", "--rank", "2"], ["safetensors", "header"]),
        (["compress", "{d}/plain.zarr", "{d}/other.zarr", "--rank", "2", "--resume"], ["Cannot resume", "Zarr array"]),
        (["compress", "{d}/plain.zarr", "{d}/plain.zarr", "--rank", "2", "--overwrite"], ["would destroy the input"]),
        (["compress", "{d}/plain.zarr", "{d}/o", "--rank", "9"], ["rank", "1 to"]),
        (["compress", "{d}/plain.zarr", "{d}/o", "--rank", "2", "--quantizer", "fancy"], ["quantizer", "fancy"]),
        (["compress", "{d}/plain.zarr", "{d}/o", "--rank", "2", "--seed", "-1"], ["--seed", ">= 0"]),
        (["compress-group", "{d}/plain.zarr", "{d}/o", "--rank", "0"], ["--rank", ">= 1"]),
        (["generate", "{d}/g.zarr", "--shape", "10x10", "--rank", "20"], ["rank", "1 to 10"]),
        (["generate", "{d}/plain.zarr", "--shape", "10x10", "--rank", "2"], ["already exists", "--overwrite"]),
        (["convert", "{d}/plain.zarr", "{d}/plain.zarr", "--overwrite"], ["would destroy the input"]),
        (["evaluate", "{d}/plain.zarr", "{d}/none.lplr.zarr"], ["lplr store", "Found none"]),
    ],
    ids=lambda v: (
        " ".join(v[:1] + v[3:5])
        if isinstance(v, list) and v and v[0] in ("compress", "compress-group", "generate", "convert", "evaluate")
        else None
    ),
)
def test_bad_input_fails_before_the_cluster_starts(bad_inputs, argv, words):
    if "other.zarr" in " ".join(argv):
        zarr.create_array(str(bad_inputs / "other.zarr"), shape=(8, 8), dtype="f4", overwrite=True)
    r = lplr(*(a.format(d=bad_inputs) for a in argv), *CLUSTER)
    assert_usage_error(r, *words)
    assert "Dask dashboard" not in r.stderr, r.stderr  # no cluster was started
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (bad_inputs / "o").exists()


def test_no_workers_left_fails_with_advice(source, tmp_path):
    # 40 MiB is less than a worker process needs: the nanny kills each one as it starts
    env = {**os.environ, "DASK_LPLR__CLUSTER__NO_WORKERS_TIMEOUT": "2s"}
    r = subprocess.run(
        [
            *LPLR,
            "compress",
            str(source),
            str(tmp_path / "o.lplr.zarr"),
            "--rank",
            "2",
            "--workers",
            "1",
            "--memory-limit",
            "40MiB",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no workers left") or last.startswith("error: workers kept dying"), r.stderr
    assert "--memory-limit" in last and "--chunks 2048x2048" in last and "--resume" in last
    assert "exceeded 95% memory budget" in r.stderr  # distributed's warnings are shown
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# The CLI's early checks are the API's own (lplr_dask.options, guard, store), run in-process


def _main_error(capsys, *argv: str) -> str:
    """Run ``lplr`` in this process; assert exit 2 with one stderr line and no cluster; return the line."""
    from lplr_dask.cli import main

    assert main([*map(str, argv), *CLUSTER]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Dask dashboard" not in err
    return err.strip()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--rank", "2", "--bits", "0", "8"], "B1"),
        (["--rank", "2", "--quantizer", "fancy"], "fancy"),
        (["--rank", "2", "--passes", "1", "--power-iters", "2"], "passes"),
    ],
)
def test_compression_flags_are_checked_by_the_options_object(bad_inputs, tmp_path, capsys, args, expected):
    from lplr_dask.errors import LplrError
    from lplr_dask.options import Options

    kwargs = (
        {"bits": (0, 8)}
        if "--bits" in args
        else {"quantizer": "fancy"}
        if "--quantizer" in args
        else {"passes": 1, "power_iters": 2}
    )
    with pytest.raises(LplrError) as e:
        Options(**kwargs)
    for command in ("compress", "compress-group"):
        line = _main_error(capsys, command, bad_inputs / "plain.zarr", tmp_path / "o", *args)
        assert line == f"error: {e.value}" and expected in line  # the API's message, word for word
    assert not (tmp_path / "o").exists()


def test_size_rule_is_checked_by_the_api(bad_inputs, tmp_path, capsys):
    line = _main_error(capsys, "compress", bad_inputs / "plain.zarr", tmp_path / "o", "--target-error", "1.5")
    assert "target relative error between 0 and 1" in line and "1.5" in line
    line = _main_error(capsys, "compress", bad_inputs / "plain.zarr", tmp_path / "o", "--match-nq", "0.01")
    assert "fair rank" in line and "too small" in line  # budget.resolve_rank, before the cluster


def test_existing_output_is_refused_with_the_api_message(bad_inputs, tmp_path, capsys):
    out = tmp_path / "o.lplr.zarr"
    out.mkdir()
    line = _main_error(capsys, "compress", bad_inputs / "plain.zarr", out, "--rank", "2")
    assert line == (
        f"error: Output {str(out)!r} already exists. Pass --overwrite (overwrite=True) to replace it, "
        "or --resume (resume=True) to finish an interrupted job."
    )
    line = _main_error(capsys, "convert", bad_inputs / "plain.zarr", out)
    assert line.endswith("already exists. Pass --overwrite (overwrite=True) to replace it.")  # no --resume to convert


def test_resume_of_something_that_is_not_a_store(bad_inputs, tmp_path, capsys):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    line = _main_error(capsys, "compress", bad_inputs / "plain.zarr", tmp_path / "g.zarr", "--rank", "2", "--resume")
    assert line.startswith(f"error: Cannot resume {str(tmp_path / 'g.zarr')!r}: ") and "is not an lplr store" in line
    assert line.endswith("Give another output path, or --overwrite to replace it.")


def test_resume_of_a_missing_store_starts_it(bad_inputs, tmp_path, capsys):
    from lplr_dask.cli import main

    out = tmp_path / "o.lplr.zarr"
    assert (
        main(["compress", str(bad_inputs / "plain.zarr"), str(out), "--rank", "2", "--resume", "--quiet", *CLUSTER])
        == 0
    )
    assert zarr.open_group(str(out), mode="r").attrs["lplr"]["complete"]


def test_generate_parameters_are_checked_by_synthetic(tmp_path, capsys):
    line = _main_error(capsys, "generate", tmp_path / "g.zarr", "--shape", "10x10", "--rank", "2", "--noise", "-1")
    assert line == "error: Expected noise (--noise) to be a number >= 0. Got -1.0 instead."
    line = _main_error(capsys, "generate", tmp_path / "g.zarr", "--shape", "10x10", "--rank", "11")
    assert line == "error: Expected rank (--rank) of a 10x10 matrix to be an integer from 1 to 10. Got 11 instead."
    assert not (tmp_path / "g.zarr").exists()

"""``--json`` on every command: one JSON object on stdout and nothing else; progress on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lplr_dask import cli


def lplr(*args: str) -> tuple[dict, str]:
    """Run the ``lplr`` command in a fresh process; return its parsed stdout and its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "lplr_dask.cli", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must hold one JSON line, got: {proc.stdout!r}"
    return json.loads(lines[0]), proc.stderr


def test_every_command_prints_one_json_object(cluster, tmp_path):
    sched = ["--scheduler", cluster.scheduler_address]
    m, out, recon = str(tmp_path / "m.zarr"), str(tmp_path / "o.lplr.zarr"), str(tmp_path / "r.zarr")

    gen, err = lplr("generate", m, "--shape", "500x300", "--chunks", "128x128", "--rank", "8", *sched)
    assert gen["shape"] == [500, 300] and gen["chunks"] == [128, 128] and "generate 500x300" in err

    # the embedded cluster: its dashboard address and the workers' logs go to stderr, not stdout
    comp, err = lplr(
        "compress",
        m,
        out,
        "--rank",
        "10",
        "--bits",
        "6",
        "8",
        "--evaluate",
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
    )
    for key in (
        "store",
        "shape",
        "source_dtype",
        "rank",
        "bits",
        "quantizer",
        "passes",
        "bytes_on_disk",
        "bits_per_entry",
        "bits_per_entry_theoretical",
        "compression_ratio",
        "timings",
        "error_estimate",
        "error_exact",
    ):
        assert comp[key] is not None, key
    assert comp["shape"] == [500, 300] and comp["rank"] == 10 and comp["bits"] == [6, 8]
    assert {"pass 1: sketch", "pass 2: project", "error estimate", "total"} <= set(comp["timings"])
    assert comp["bits_per_entry"] == pytest.approx(comp["bytes_on_disk"] * 8 / (500 * 300))
    assert 0 < comp["error_exact"] < 0.5
    assert "Dask dashboard" in err and "pass 1: sketch" in err

    info, _ = lplr("info", out)
    assert {k: v for k, v in info.items() if k != "timings"} == {k: v for k, v in comp.items() if k != "timings"}

    ev, _ = lplr("evaluate", m, out, *sched)
    assert ev["error_exact"] == pytest.approx(comp["error_exact"], rel=1e-9)

    dec, err = lplr("decompress", out, recon, *sched)
    assert dec["shape"] == [500, 300] and dec["dtype"] == "float32" and "decompress" in err

    np.save(tmp_path / "a.npy", np.ones((40, 30), np.float32))
    conv, _ = lplr("convert", str(tmp_path / "a.npy"), str(tmp_path / "a.zarr"), *sched)
    assert conv["shape"] == [40, 30]

    import zarr

    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("w", data=zarr.open_array(m, mode="r")[...], chunks=(128, 128))
    g.create_array("pos", data=np.ones((2, 384), np.float32))
    grp, err = lplr(
        "compress-group", str(tmp_path / "g.zarr"), str(tmp_path / "g.lplr.zarr"), "--match-nq", "4", *sched
    )
    assert [e["action"] for e in grp["arrays"]] == ["copy", "lplr"] and grp["totals"]["arrays"] == 2
    assert "array 2/2" in err  # compress-group's row per array

    exp, err = lplr("export", str(tmp_path / "g.lplr.zarr"), str(tmp_path / "g.safetensors"))
    assert exp["tensors"] == 2 and exp["files"] == [str(tmp_path / "g.safetensors")] and "export 1/1" in err


def test_json_guard_sends_stray_output_to_stderr(monkeypatch, capfd):
    """Whatever a command prints to stdout, by Python or straight to descriptor 1, goes to stderr."""

    def noisy(args, log):
        print("a stray print")
        os.write(1, b"a stray write to fd 1\n")
        return {"ok": True}

    monkeypatch.setitem(cli.COMMANDS, "info", noisy)
    assert cli.main(["info", "whatever.lplr.zarr", "--json"]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out) == {"ok": True}
    assert "a stray print" in captured.err and "a stray write to fd 1" in captured.err
    assert cli.main(["info", "whatever.lplr.zarr"]) == 0  # without --json, stdout is left alone
    assert "a stray print" in capfd.readouterr().out

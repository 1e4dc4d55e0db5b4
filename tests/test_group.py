"""``lplr compress-group``: every matrix of a group in one job, small arrays copied."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import cli
from lplr_dask.datasets import synthetic
from lplr_dask.errors import LplrValueError, OutputExistsError
from lplr_dask.group import plan_rank


@pytest.fixture
def model(tmp_path):
    """A Zarr v2 group like a model's weights: mixed shapes and dtypes, a 2×384 table, a bias."""
    w = synthetic((300, 200), rank=10, decay=0.8, noise=0.01, chunks=(128, 128), seed=1).compute()
    g = zarr.open_group(tmp_path / "model.zarr", mode="w", zarr_format=2)
    enc = g.create_group("enc")
    enc.create_array("w", data=w, chunks=(128, 128))
    enc.create_array("b", data=np.linspace(-1, 1, 200, dtype=np.float32))
    g.create_array("w16", data=w[:256, :128].astype(np.float16))
    g.create_array("wint", data=np.rint(w[:200, :160] * 1e4).astype(np.int32))
    g.create_array("w64", data=w.T.astype(np.float64), chunks=(100, 100))
    g.create_array("pos", data=np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32))
    return tmp_path / "model.zarr", g


def test_plan_rank_rules():
    assert plan_rank((2, 384), "float32", (8, 8), match_nq=4) == (0, "too small to gain (fair rank 0)")
    assert plan_rank((384,), "float32", (8, 8), match_nq=4) == (0, "not a matrix (1-D)")
    assert plan_rank((4, 4), "bool", (8, 8), rank=1)[1] == "not real numeric (bool)"
    assert plan_rank((300, 200), "float32", (8, 8), match_nq=4) == (lplr_dask.fair_rank(300, 200, (8, 8), 4), "")
    assert plan_rank((300, 200), "float32", (8, 8), rank=500) == (0, "too small to gain (rank 200 is full rank)")
    assert plan_rank((300, 200), "float32", (8, 8), rank=199) == (199, "")  # 13.3 bits per entry < 32
    k, reason = plan_rank((300, 200), "float16", (16, 16), rank=199)  # 26.5 bits per entry >= 16
    assert k == 0 and reason.startswith("too small to gain (rank 199 needs 26.5 bits per entry, the array 16)")
    assert plan_rank((300, 200), "bfloat16", (4, 4), bits_per_entry=2)[0] == lplr_dask.fair_rank(300, 200, (4, 4), 2)


def test_compress_group_mixed_shapes_and_dtypes(client, tmp_path, model):
    src, g = model
    out = tmp_path / "model.lplr.zarr"
    lines = []
    result = lplr_dask.compress_group(src, out, match_nq=4, evaluate=True, log=lines.append)
    by_name = {e["name"]: e for e in result["arrays"]}
    assert set(by_name) == {"enc/w", "enc/b", "w16", "wint", "w64", "pos"}
    for name in ("enc/w", "w16", "wint", "w64"):
        e = by_name[name]
        n, d = e["shape"]
        assert e["action"] == "lplr" and e["rank"] == lplr_dask.fair_rank(n, d, (8, 8), 4)
        f = lplr_dask.open_factors(out / name)  # each compressed matrix is an *.lplr.zarr store
        assert f.attrs["source"]["dtype"] == e["dtype"] and f.rank == e["rank"]
        assert e["error_exact"] == f.attrs["error_exact"] < 0.1
        assert e["bytes_on_disk"] == f.nbytes
    assert by_name["w64"]["dtype"] == "float64" and by_name["wint"]["dtype"] == "int32"
    for name, reason in (("pos", "too small to gain (fair rank 0)"), ("enc/b", "not a matrix (1-D)")):
        e = by_name[name]
        assert e["action"] == "copy" and e["reason"] == reason and e["rank"] is None
        copy = zarr.open_array(out / name, mode="r")
        np.testing.assert_array_equal(copy[...], g[name][...])  # copied as it is
        assert copy.attrs["lplr_copy"] == {"reason": reason, "source_dtype": "float32"}
    attrs = zarr.open_group(out, mode="r").attrs["lplr_group"]
    assert attrs["complete"] and attrs["format"] == "lplr-zarr-group" and attrs["rule"] == {"match_nq": 4}
    assert attrs["totals"] == result["totals"]
    assert result["totals"]["compressed"] == 4 and result["totals"]["copied"] == 2
    assert result["totals"]["bytes_on_disk"] < result["totals"]["source_bytes"]
    rows = [x for x in lines if x.startswith("array ") and " bits/entry " in x]  # one row per array as it ends
    assert [r.split()[1:3] for r in rows] == [[f"{i}/6", name] for i, name in enumerate(by_name, 1)]
    w = rows[[r.split()[2] for r in rows].index("enc/w")].split()
    assert w[3:5] == ["300x200", "float32"] and w[9:12] == ["lplr", "rank", str(by_name["enc/w"]["rank"])]
    assert f"error {by_name['enc/w']['error_exact']:.3g} (exact)" in rows[[r.split()[2] for r in rows].index("enc/w")]
    assert "copy  not a matrix (1-D)" in rows[[r.split()[2] for r in rows].index("enc/b")]
    # the group itself is not one store: opening it says how to open its members
    with pytest.raises(lplr_dask.StoreFormatError, match=r"output of compress-group.*4 compressed arrays.*/enc/w\)"):
        lplr_dask.open_factors(out)


def test_compress_group_from_a_safetensors_file_with_bfloat16(client, tmp_path):
    import torch
    from safetensors.torch import save_file

    w = synthetic((256, 192), rank=8, decay=0.8, noise=0.01, chunks=(128, 128), seed=2).compute()
    save_file(
        {
            "layer.0.weight": torch.from_numpy(w).to(torch.bfloat16),
            "layer.0.bias": torch.zeros(192),
            "embed.pos": torch.randn(2, 384),
        },
        tmp_path / "m.safetensors",
    )
    out = tmp_path / "m.lplr.zarr"
    result = lplr_dask.compress_group(tmp_path / "m.safetensors", out, bits_per_entry=2, log=lambda m: None)
    by_name = {e["name"]: e for e in result["arrays"]}
    assert by_name["layer.0.weight"]["action"] == "lplr" and by_name["layer.0.weight"]["dtype"] == "bfloat16"
    assert by_name["embed.pos"]["action"] == "copy" and by_name["layer.0.bias"]["action"] == "copy"
    f = lplr_dask.open_factors(out / "layer.0.weight")
    assert f.attrs["source"]["dtype"] == "bfloat16" and f.theoretical_bits_per_entry <= 2


def test_compress_group_refuses_bad_rules_and_existing_output(client, tmp_path, model):
    src, _ = model
    with pytest.raises(LplrValueError, match="exactly one rule"):
        lplr_dask.compress_group(src, tmp_path / "o.lplr.zarr", rank=4, match_nq=4)
    with pytest.raises(LplrValueError, match="positive match_nq"):
        lplr_dask.compress_group(src, tmp_path / "o.lplr.zarr", match_nq=-1)
    with pytest.raises(LplrValueError, match="Got an array; use `lplr compress`"):
        lplr_dask.compress_group(src / "enc" / "w", tmp_path / "o.lplr.zarr", match_nq=4)
    (tmp_path / "o.lplr.zarr").mkdir()
    with pytest.raises(OutputExistsError, match="--resume"):
        lplr_dask.compress_group(src, tmp_path / "o.lplr.zarr", match_nq=4)


def test_cli_compress_group_table_then_resume(client, tmp_path, model, capsys):
    src, _ = model
    out = tmp_path / "m.lplr.zarr"
    args = [
        "compress-group",
        str(src),
        str(out),
        "--rank",
        "12",
        "--bits",
        "4",
        "4",
        "--scheduler",
        client.scheduler.address,
    ]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split()[:5] == ["name", "shape", "dtype", "action", "rank"]
    assert any(line.split()[:4] == ["pos", "2x384", "float32", "copy"] for line in table)
    assert any(line.split()[:5] == ["enc/w", "300x200", "float32", "lplr", "12"] for line in table)
    assert table[-1].startswith("total: 6 arrays (4 compressed, 2 copied)")
    assert cli.main(args) == 2 and "already exists" in capsys.readouterr().err
    assert cli.main([*args, "--resume", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["complete"] and result["totals"]["compressed"] == 4
    assert cli.main(["compress-group", str(src), str(out)]) == 2
    assert "exactly one of --rank" in capsys.readouterr().err


def test_a_budget_rank_above_the_maximum_is_capped_per_array(client, tmp_path, model):
    import dask

    src, _ = model
    lines: list[str] = []
    with dask.config.set({"lplr.max-rank": 8}):
        result = lplr_dask.compress_group(src, tmp_path / "o.lplr.zarr", match_nq=4, log=lines.append)
        asked = lplr_dask.compress_group(src, tmp_path / "r.lplr.zarr", rank=10, log=lambda _: None)
    w = next(e for e in result["arrays"] if e["name"] == "enc/w")
    fair = lplr_dask.fair_rank(300, 200, (8, 8), 4)
    assert fair > 8 and w["rank"] == 8 and w["rank_cap"] == {"requested": fair, "max_rank": 8}
    f = lplr_dask.open_factors(tmp_path / "o.lplr.zarr" / "enc" / "w")
    assert f.rank == 8 and f.attrs["rank_cap"] == {"requested": fair, "max_rank": 8}
    assert any(line.startswith(f"warning: enc/w: the rule allows rank {fair}, capped at 8") for line in lines)
    assert next(e for e in asked["arrays"] if e["name"] == "enc/w")["rank"] == 10  # a rank asked for: as asked

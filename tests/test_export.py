"""``lplr export``: a compressed store back to safetensors, and the PyTorch round trip from a
sharded bfloat16 checkpoint (compress-group → export → load) with ``lplr_dask.nn``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import lplr_dask
from lplr_dask import nn
from lplr_dask.cli import main
from lplr_dask.datasets import synthetic
from lplr_dask.errors import LplrValueError, OutputExistsError, StoreFormatError
from lplr_dask.export import bfloat16_bits, export_safetensors, parse_size
from lplr_dask.sources import list_arrays

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

RANK = 16


class Mlp(torch.nn.Module):
    """A stand-in for a transformer block: two Linears with biases, a norm, an integer buffer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = torch.nn.Linear(96, 128, dtype=dtype)
        self.norm = torch.nn.LayerNorm(128, dtype=dtype)
        self.down = torch.nn.Linear(128, 64, dtype=dtype)
        self.register_buffer("position_ids", torch.arange(10))

    def forward(self, x):
        return self.down(torch.relu(self.norm(self.up(x))))


def _low_rank(shape, seed):
    return torch.from_numpy(synthetic(shape, rank=8, decay=0.7, noise=0.01, chunks=shape, seed=seed).compute())


@pytest.fixture
def checkpoint(tmp_path):
    """A sharded bfloat16 checkpoint as Hugging Face writes one: two shards and an index.

    The 2-D weights are low rank plus noise (bfloat16), the biases bfloat16, the norm's weight
    float32 (a 1-D tensor in another dtype), ``position_ids`` int64.
    """
    tensors = {
        "up.weight": _low_rank((128, 96), 1).to(torch.bfloat16),
        "up.bias": torch.linspace(-1, 1, 128).to(torch.bfloat16),
        "norm.weight": torch.linspace(0.5, 1.5, 128),
        "norm.bias": torch.zeros(128, dtype=torch.bfloat16),
        "down.weight": _low_rank((64, 128), 2).to(torch.bfloat16),
        "down.bias": torch.full((64,), 0.25, dtype=torch.bfloat16),
        "position_ids": torch.arange(10),
    }
    shards = {
        "model-00001-of-00002.safetensors": ["up.weight", "up.bias", "norm.weight", "norm.bias"],
        "model-00002-of-00002.safetensors": ["down.weight", "down.bias", "position_ids"],
    }
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for file, names in shards.items():
        safetensors_torch.save_file({n: tensors[n] for n in names}, folder / file, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {n: file for file, names in shards.items() for n in names},
            }
        )
    )
    return index, tensors


@pytest.fixture
def compressed(client, tmp_path, checkpoint):
    index, tensors = checkpoint
    out = tmp_path / "model.lplr.zarr"
    result = lplr_dask.compress_group(index, out, rank=RANK, evaluate=True, log=lambda m: None)
    return out, result, tensors


def _relative_error(x, ref):
    x, ref = x.double(), ref.double()
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


def test_sharded_bfloat16_checkpoint_compress_group_export_load(compressed, tmp_path):
    out, result, tensors = compressed
    entries = {e["name"]: e for e in result["arrays"]}
    assert {n for n, e in entries.items() if e["action"] == "lplr"} == {"up.weight", "down.weight"}

    info = export_safetensors(out, tmp_path / "model.safetensors", log=lambda m: None)
    assert info["index"] is None and info["files"] == [os.fspath(tmp_path / "model.safetensors")]
    loaded = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, source in tensors.items():
        got = loaded[name]
        assert got.dtype == source.dtype and got.shape == source.shape, name
        if source.ndim == 1:  # copied as they were, bit for bit
            assert torch.equal(got, source), name
        else:  # within the error the group measured, plus bfloat16's rounding of the product
            exact = entries[name]["error_exact"]
            assert 0 < exact < 0.2
            assert _relative_error(got, source) == pytest.approx(exact, abs=0.01), name
    metadata = safetensors_torch.safe_open(tmp_path / "model.safetensors", "pt").metadata()
    assert metadata["format"] == "pt" and json.loads(metadata["lplr-export"])["factorized"] is False


def test_export_matches_the_reconstruction_rounded_to_bfloat16(compressed, tmp_path):
    out, _, _ = compressed
    export_safetensors(out, tmp_path / "m.safetensors", log=lambda m: None)
    loaded = safetensors_torch.load_file(tmp_path / "m.safetensors")
    recon = lplr_dask.open_factors(out / "up.weight").to_dask(np.float32).compute()
    assert torch.equal(loaded["up.weight"], torch.from_numpy(recon).to(torch.bfloat16))


def test_large_export_is_sharded_with_an_index(compressed, tmp_path):
    out, _, _ = compressed
    whole = export_safetensors(out, tmp_path / "one.safetensors", log=lambda m: None)
    info = export_safetensors(out, tmp_path / "sh.safetensors", max_shard_size="30KB", log=lambda m: None)
    assert info["index"] == os.fspath(tmp_path / "sh.safetensors.index.json") and len(info["files"]) >= 2
    assert not (tmp_path / "sh.safetensors").exists()
    assert [os.path.basename(f) for f in info["files"]] == [
        f"sh-{i:05d}-of-{len(info['files']):05d}.safetensors" for i in range(1, len(info["files"]) + 1)
    ]
    for f in info["files"]:
        assert os.path.getsize(f) < 30_000 + 2_000 or len(safetensors_torch.load_file(f)) == 1
    index = json.loads((tmp_path / "sh.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == whole["bytes"] and set(index["weight_map"]) == set(whole["tensors"])
    sharded = nn.load_tensors(info["index"])
    single = safetensors_torch.load_file(tmp_path / "one.safetensors")
    assert set(sharded) == set(single) and all(torch.equal(sharded[k], single[k]) for k in single)
    # the index of an export is itself an input: compress-group and convert read it as a checkpoint
    assert list_arrays(info["index"])["up.weight"] == ((128, 96), "bfloat16")


def test_factorized_export_swaps_two_linears_into_a_torch_model(compressed, tmp_path):
    out, _, tensors = compressed
    export_safetensors(out, tmp_path / "lr.safetensors", factorized=True, log=lambda m: None)
    loaded = safetensors_torch.load_file(tmp_path / "lr.safetensors")
    assert loaded["up.weight.L"].shape == (128, RANK) and loaded["up.weight.R"].shape == (RANK, 96)
    assert loaded["up.weight.L"].dtype == torch.bfloat16  # the source's dtype by default
    assert "up.weight" not in loaded and torch.equal(loaded["up.bias"], tensors["up.bias"])

    export_safetensors(out, tmp_path / "lr32.safetensors", factorized=True, factor_dtype="float32", log=lambda m: None)
    export_safetensors(out, tmp_path / "dense.safetensors", log=lambda m: None)
    f = lplr_dask.open_factors(out / "up.weight")
    L32 = safetensors_torch.load_file(tmp_path / "lr32.safetensors")["up.weight.L"]
    np.testing.assert_allclose(L32.numpy(), f.L(np.float32).compute(), rtol=1e-6)

    factorized = Mlp()
    replaced = nn.load_factorized(factorized, tmp_path / "lr32.safetensors")
    assert replaced == ["down", "up"]
    assert isinstance(factorized.up, torch.nn.Sequential) and factorized.up[0].weight.shape == (RANK, 96)
    assert sum(p.numel() for p in factorized.up.parameters()) == RANK * (96 + 128) + 128
    dense = Mlp()
    dense.load_state_dict(safetensors_torch.load_file(tmp_path / "dense.safetensors"))
    x = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_factorized, y_dense = factorized(x), dense(x)
        original = Mlp()
        original.load_state_dict(tensors)
        y_original = original(x)
    assert _relative_error(y_factorized, y_dense) < 0.01  # the same L·R, up to bfloat16 rounding
    assert _relative_error(y_factorized, y_original) < 0.2


def test_load_factorized_refuses_a_model_it_does_not_fit(compressed, tmp_path):
    out, _, _ = compressed
    export_safetensors(out, tmp_path / "lr.safetensors", factorized=True, factor_dtype="float32", log=lambda m: None)
    wrong = Mlp()
    wrong.up = torch.nn.Linear(96, 100)
    with pytest.raises(LplrValueError, match="the Linear 'up' is 100x96"):
        nn.load_factorized(wrong, tmp_path / "lr.safetensors")
    other = Mlp()
    other.up = torch.nn.Conv1d(96, 128, 1)
    with pytest.raises(LplrValueError, match="not a torch.nn.Linear"):
        nn.load_factorized(other, tmp_path / "lr.safetensors")
    extra = dict(safetensors_torch.load_file(tmp_path / "lr.safetensors"), stray=torch.zeros(1))
    with pytest.raises(LplrValueError, match="unexpected \\['stray'\\]"):
        nn.load_factorized(Mlp(), extra)
    assert nn.load_factorized(Mlp(), extra, strict=False) == ["down", "up"]


def test_single_store_export_takes_the_source_tensor_name(client, tmp_path):
    w = _low_rank((128, 96), 3)
    safetensors_torch.save_file({"lm_head.weight": w}, tmp_path / "w.safetensors")
    lplr_dask.compress(
        tmp_path / "w.safetensors:lm_head.weight", tmp_path / "w.lplr.zarr", rank=RANK, log=lambda m: None
    )
    info = export_safetensors(tmp_path / "w.lplr.zarr", tmp_path / "o.safetensors", log=lambda m: None)
    assert info["tensors"] == ["lm_head.weight"]
    got = safetensors_torch.load_file(tmp_path / "o.safetensors")["lm_head.weight"]
    assert got.dtype == torch.float32 and _relative_error(got, w) < 0.2
    named = export_safetensors(tmp_path / "w.lplr.zarr", tmp_path / "n.safetensors", name="W", log=lambda m: None)
    assert named["tensors"] == ["W"]


def test_export_refuses_bad_outputs_and_replaces_only_its_own(compressed, tmp_path):
    out, _, _ = compressed
    with pytest.raises(LplrValueError, match=r"named \*\.safetensors.*model\.safetensors"):
        export_safetensors(out, tmp_path / "model.pt")
    with pytest.raises(LplrValueError, match="destroy the input"):
        export_safetensors(out, out / "x.safetensors")
    with pytest.raises(LplrValueError, match="factor_dtype"):
        export_safetensors(out, tmp_path / "x.safetensors", factor_dtype="int8")
    with pytest.raises(LplrValueError, match="keep their names"):
        export_safetensors(out, tmp_path / "x.safetensors", name="w")
    target = tmp_path / "m.safetensors"
    export_safetensors(out, target, log=lambda m: None)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_safetensors(out, target)
    export_safetensors(out, target, overwrite=True, log=lambda m: None)  # an export of ours: replaced
    foreign = tmp_path / "foreign.safetensors"
    safetensors_torch.save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(LplrValueError, match="not an output of lplr export"):
        export_safetensors(out, foreign, overwrite=True)
    assert safetensors_torch.load_file(foreign)["x"].shape == (2,)  # untouched


def test_overwriting_a_sharded_export_with_a_single_file_leaves_no_stale_shard(compressed, tmp_path):
    out, _, _ = compressed
    sharded = export_safetensors(out, tmp_path / "m.safetensors", max_shard_size="30KB", log=lambda m: None)
    export_safetensors(out, tmp_path / "m.safetensors", overwrite=True, log=lambda m: None)
    assert (tmp_path / "m.safetensors").exists() and not os.path.exists(sharded["index"])
    assert not any(os.path.exists(f) for f in sharded["files"])


def test_a_failed_export_leaves_nothing(compressed, tmp_path, monkeypatch):
    out, _, _ = compressed
    from lplr_dask import export

    calls = []

    def failing(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path, metadata)

    real = export._serialize_file
    monkeypatch.setattr(export, "_serialize_file", failing)
    with pytest.raises(OSError, match="disk full"):
        export_safetensors(out, tmp_path / "m.safetensors", max_shard_size="30KB", log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "model.lplr.zarr"]


def test_an_incomplete_group_is_refused(compressed, tmp_path):
    out, _, _ = compressed
    import zarr

    root = zarr.open_group(out, mode="r+")
    root.attrs["lplr_group"] = {**root.attrs["lplr_group"], "complete": False}
    with pytest.raises(StoreFormatError, match="incomplete compress-group output"):
        export_safetensors(out, tmp_path / "m.safetensors")


def test_cli_export_and_zarr_outputs_named_like_safetensors(compressed, tmp_path, capsys):
    out, _, _ = compressed
    target = tmp_path / "cli.safetensors"
    assert main(["export", str(out), str(target), "--factorized", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tensors"] == 7 + 2 and result["factorized"] is True and target.exists()
    assert main(["decompress", str(out / "up.weight"), str(tmp_path / "up.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "ends with '.safetensors'" in err and "lplr export" in err
    assert not (tmp_path / "up.safetensors").exists()
    assert main(["export", str(out), str(tmp_path / "x.npy")]) == 2


@pytest.mark.parametrize(
    "text, value",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("30KB", 30_000), ("1024", 1024), (64, 64)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["five", "5XB", "0", "-1GB", True])
def test_parse_size_refuses(text):
    with pytest.raises(LplrValueError, match="size"):
        parse_size(text)


def test_bfloat16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
            np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, np.inf, -np.inf, 3.4e38, 1e-40], np.float32),
        ]
    )
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bfloat16_bits(x), expected)
    assert np.isnan(
        torch.from_numpy(bfloat16_bits(np.array([np.nan], np.float32)).view(np.int16))
        .view(torch.bfloat16)
        .float()
        .numpy()
    ).all()

"""Where the input is (Zarr groups, v2, files) and the dtype it is computed in."""

from __future__ import annotations

import json
import pickle

import dask.array as da
import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import cli
from lplr_dask.errors import LplrTypeError, LplrValueError, SourceNotFoundError
from lplr_dask.sources import (
    FileArray,
    as_matrix,
    cast_to,
    compute_dtype,
    list_arrays,
    member,
    open_source,
    output_dtype,
    parse_location,
    read_source,
    with_chunks,
)


def _codes(path):
    g = zarr.open_group(path, mode="r")
    return g["L/codes"][...], g["R/codes"][...], g.attrs["lplr"]["error_estimate"]


def assert_same_result(a, b):
    """Two stores hold identical codes and the same error estimate."""
    la, ra, ea = _codes(a)
    lb, rb, eb = _codes(b)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ra, rb)
    assert ea == pytest.approx(eb, rel=1e-12)


@pytest.fixture
def matrix(small_matrix):
    return small_matrix.compute()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a.zarr", ("zarr", "a.zarr", None)),
        ("a.zarr/enc/w", ("zarr", "a.zarr/enc/w", None)),
        ("s3://b/a.zarr/w", ("zarr", "s3://b/a.zarr/w", None)),
        ("w.npy", ("npy", "w.npy", None)),
        ("m.h5:/g/w", ("hdf5", "m.h5", "/g/w")),
        ("m.hdf5:w", ("hdf5", "m.hdf5", "w")),
        ("m.h5", ("hdf5", "m.h5", None)),
        ("model.safetensors:enc.0.weight", ("safetensors", "model.safetensors", "enc.0.weight")),
    ],
)
def test_parse_location(text, expected):
    assert parse_location(text) == expected


def test_array_inside_group_and_v2_match_a_lone_v3_array(client, tmp_path, matrix):
    lone = tmp_path / "lone.zarr"
    zarr.create_array(lone, data=matrix, chunks=(128, 128), zarr_format=3)
    for fmt in (3, 2):
        g = zarr.open_group(tmp_path / f"g{fmt}.zarr", mode="w", zarr_format=fmt)
        g.create_group("enc").create_array("w", data=matrix, chunks=(128, 128))
    kw = dict(rank=8, bits=(4, 4), seed=5)
    lplr_dask.compress(lone, tmp_path / "lone.lplr.zarr", **kw)
    for fmt in (3, 2):
        out = tmp_path / f"g{fmt}.lplr.zarr"
        f = lplr_dask.compress(tmp_path / f"g{fmt}.zarr" / "enc" / "w", out, **kw)
        assert f.attrs["source"]["path"].endswith("enc/w")
        assert_same_result(tmp_path / "lone.lplr.zarr", out)


def test_group_path_error_lists_its_arrays(tmp_path):
    g = zarr.open_group(tmp_path / "m.zarr", mode="w")
    g.create_group("enc").create_array("w", shape=(4, 3), dtype="f4")
    g.create_array("bias", shape=(3,), dtype="f4")
    with pytest.raises(LplrValueError, match="is a Zarr group") as e:
        open_source(tmp_path / "m.zarr")
    assert "m.zarr/enc/w (4x3 float32)" in str(e.value)
    assert "m.zarr/bias (3 float32)" in str(e.value)
    assert "compress-group" in str(e.value)


def test_missing_inputs_say_what_to_do(tmp_path):
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        open_source(tmp_path / "nope.zarr")
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        open_source(tmp_path / "nope.npy")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SourceNotFoundError, match="Expected a Zarr array"):
        open_source(tmp_path / "plain")
    with pytest.raises(LplrValueError, match="local disk only"):
        open_source("s3://bucket/w.npy")


def test_list_arrays_and_member(tmp_path):
    g = zarr.open_group(tmp_path / "m.zarr", mode="w")
    g.create_group("a").create_array("w", shape=(4, 3), dtype="f2")
    g.create_array("b", shape=(2,), dtype="i4")
    assert list_arrays(tmp_path / "m.zarr") == {"a/w": ((4, 3), "float16"), "b": ((2,), "int32")}
    assert member(str(tmp_path / "m.zarr"), "a/w") == f"{tmp_path / 'm.zarr'}/a/w"
    assert member("x.h5", "g/w") == "x.h5:g/w"
    with pytest.raises(LplrValueError, match="Got an array"):
        list_arrays(tmp_path / "m.zarr" / "b")


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("float16", "float32"),
        ("bfloat16", "float32"),
        ("float32", "float32"),
        ("float64", "float64"),
        ("int8", "float32"),
        ("uint16", "float32"),
        ("int64", "float32"),
    ],
)
def test_compute_dtype_policy(dtype, expected):
    assert compute_dtype(dtype) == np.dtype(expected)


@pytest.mark.parametrize("dtype", ["complex64", "bool", "U3", "O"])
def test_complex_and_non_numeric_are_refused(dtype):
    with pytest.raises(LplrTypeError, match="Expected a real numeric matrix"):
        compute_dtype(dtype)
    with pytest.raises(LplrTypeError):
        open_source(np.zeros((4, 3), dtype=dtype))


def test_zarr_string_arrays_are_refused(tmp_path):
    zarr.create_array(str(tmp_path / "s.zarr"), shape=(4, 3), dtype=str)
    with pytest.raises(LplrTypeError, match="Expected a real numeric matrix.*StringDType"):
        open_source(tmp_path / "s.zarr")


def _safetensors(path, header: bytes, data: bytes = b"", size: int | None = None) -> None:
    path.write_bytes((len(header) if size is None else size).to_bytes(8, "little") + header + data)


def test_safetensors_header_past_the_end_of_the_file_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    _safetensors(path, b"{}", size=2**62)  # read as is, it would allocate 4 EiB
    for call in (lambda: list_arrays(str(path)), lambda: open_source(f"{path}:w")):
        with pytest.raises(LplrValueError, match="header of 4611686018427387904 bytes, but the file has 10"):
            call()


def test_safetensors_tensor_past_the_end_of_the_file_is_refused(tmp_path):
    import json

    path = tmp_path / "cut.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [100, 100], "data_offsets": [0, 40000]}}).encode()
    _safetensors(path, header, b"\0" * 400)  # truncated: 400 of its 40000 bytes
    assert list_arrays(str(path)) == {"w": ((100, 100), "float32")}
    with pytest.raises(LplrValueError, match="claims bytes 0:40000.*truncated"):
        open_source(f"{path}:w")


def test_the_compute_path_casts_and_integers_get_a_note():
    notes = []
    A16 = open_source(da.ones((8, 4), dtype=np.float16, chunks=4), log=notes.append)
    assert A16.dtype == np.float32 and not notes
    assert open_source(np.ones((8, 4))).dtype == np.float64
    Ai = open_source(np.arange(32, dtype=np.int32).reshape(8, 4), log=notes.append)
    assert Ai.dtype == np.float32
    assert len(notes) == 1 and "int32" in notes[0] and "float32" in notes[0]


def test_matrix_shape_is_checked():
    with pytest.raises(LplrValueError, match="2-D"):
        as_matrix(read_source(np.zeros(5)))
    with pytest.raises(LplrValueError, match="non-empty"):
        open_source(np.zeros((0, 5)))


def test_file_reader_is_lazy_and_pickles_without_data(tmp_path, monkeypatch):
    a = np.arange(200 * 100, dtype=np.float32).reshape(200, 100)
    np.save(tmp_path / "a.npy", a)
    reads = []
    original = FileArray.__getitem__
    monkeypatch.setattr(FileArray, "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    src = read_source(tmp_path / "a.npy", chunks=(64, 100))
    A = open_source(tmp_path / "a.npy")
    assert not reads  # opening reads only the header
    reader = FileArray.open("npy", str(tmp_path / "a.npy"), None)
    assert len(pickle.dumps(reader)) < 1000  # the graph ships a path, never the 80 kB of data
    np.testing.assert_array_equal(src.array[60:70].compute(), a[60:70])
    assert reads and A.shape == (200, 100)


def test_cast_to_rounds_and_clips_integers():
    x = da.from_array(np.array([[-3.6, 0.4], [200.5, 1e6]]), chunks=1)
    np.testing.assert_array_equal(cast_to(x, np.int8).compute(), [[-4, 0], [127, 127]])
    np.testing.assert_array_equal(cast_to(x, np.uint8).compute(), [[0, 0], [200, 255]])
    assert cast_to(x, np.float16).dtype == np.float16
    assert output_dtype("bfloat16") == np.float32 and output_dtype("int16") == np.int16


@pytest.mark.parametrize("dtype", ["float16", "int16"])
def test_decompress_writes_the_source_dtype_back_unless_told(client, tmp_path, matrix, dtype, capsys):
    scale = 1.0 if dtype == "float16" else 20000.0 / np.abs(matrix).max()  # int16: use its range
    src = tmp_path / "m.zarr"
    zarr.create_array(src, data=(matrix * scale).astype(dtype), chunks=(128, 128))
    sched = ["--scheduler", client.scheduler.address]
    assert cli.main(["compress", str(src), str(tmp_path / "o.lplr.zarr"), "--rank", "20", "--quiet", *sched]) == 0
    assert cli.main(["decompress", str(tmp_path / "o.lplr.zarr"), str(tmp_path / "r.zarr"), "--quiet", *sched]) == 0
    recon = zarr.open_array(tmp_path / "r.zarr", mode="r")
    assert recon.dtype == np.dtype(dtype)
    ref = (matrix * scale).astype(dtype).astype(np.float64)
    assert np.linalg.norm(recon[...] - ref) / np.linalg.norm(ref) < 0.05
    assert (
        cli.main(
            [
                "decompress",
                str(tmp_path / "o.lplr.zarr"),
                str(tmp_path / "r64.zarr"),
                "--dtype",
                "float64",
                "--quiet",
                *sched,
            ]
        )
        == 0
    )
    assert zarr.open_array(tmp_path / "r64.zarr", mode="r").dtype == np.float64


def test_a_zarr_source_read_in_merged_chunks_is_one_task_per_block_and_names_a_damaged_chunk(tmp_path):
    path = tmp_path / "a.zarr"
    data = np.arange(300 * 200, dtype=np.float32).reshape(300, 200)
    lplr_dask.convert(da.from_array(data, chunks=(64, 64)), path, chunks=(64, 64), log=lambda _: None)
    src = read_source(path)
    merged = with_chunks(src, (128, 128)).array
    assert merged.chunksize == (128, 128) and len(merged.__dask_graph__()) == merged.npartitions + 1
    np.testing.assert_array_equal(merged.compute(), data)
    chunk = path / "c" / "1" / "0"  # rows 64:128, columns 0:64: inside merged block (0, 0), not its first chunk
    chunk.write_bytes(chunk.read_bytes()[:20])
    with pytest.raises(LplrValueError, match=r"input .*a\.zarr.* is damaged: its chunk c/1/0 fails its crc32c"):
        merged.blocks[0, 0].compute()
    np.testing.assert_array_equal(merged.blocks[1, 1].compute(), data[128:256, 128:])


def test_only_zarr_sources_are_reopened_in_other_chunks():
    with pytest.raises(LplrValueError, match="Expected a Zarr source"):
        with_chunks(read_source(da.ones((8, 8), chunks=4)), (8, 8))


def _sharded(tmp_path, tensors: dict[str, np.ndarray], shards: dict[str, list[str]], index: dict | None = None):
    """A sharded safetensors checkpoint: the shard files and ``model.safetensors.index.json``."""
    from safetensors.numpy import save_file

    for file, names in shards.items():
        save_file({n: tensors[n] for n in names}, tmp_path / file)
    path = tmp_path / "model.safetensors.index.json"
    body = index if index is not None else {"weight_map": {n: f for f, names in shards.items() for n in names}}
    path.write_text(json.dumps(body))
    return path


def test_sharded_checkpoint_lists_reads_and_resolves_its_tensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((6, 4)).astype(np.float32), "b.bias": np.arange(3, dtype=np.int64)}
    index = _sharded(tmp_path, tensors, {"s1.safetensors": ["a.weight"], "s2.safetensors": ["b.bias"]})
    assert list_arrays(index) == {"a.weight": ((6, 4), "float32"), "b.bias": ((3,), "int64")}
    assert lplr_dask.sources.member(str(index), "b.bias") == f"{tmp_path / 's2.safetensors'}:b.bias"
    src = read_source(f"{index}:a.weight")
    assert src.format == "safetensors" and src.path == f"{tmp_path / 's1.safetensors'}:a.weight"
    np.testing.assert_array_equal(src.array.compute(), tensors["a.weight"])
    assert lplr_dask.sources.is_group(index) and not lplr_dask.sources.is_group(f"{index}:a.weight")
    with pytest.raises(LplrValueError, match="sharded safetensors checkpoint; name the tensor.*'a.weight'"):
        read_source(index)
    with pytest.raises(SourceNotFoundError, match="has no tensor 'c'"):
        read_source(f"{index}:c")


def test_broken_sharded_checkpoints_are_named(tmp_path):
    tensors = {"a": np.zeros((2, 2), np.float32)}
    index = _sharded(
        tmp_path,
        tensors,
        {"s1.safetensors": ["a"]},
        index={"weight_map": {"a": "s1.safetensors", "b": "s9.safetensors"}},
    )
    with pytest.raises(SourceNotFoundError, match="names the shard 's9.safetensors', which does not exist"):
        list_arrays(index)
    for text, match in [
        ('{"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}', "names tensors its shards do not hold: 'b'"),
        ('{"weight_map": {"a": "../s1.safetensors"}}', "outside its own directory"),
        ("[1, 2]", "weight_map"),
        ("{not json", "not a JSON object"),
    ]:
        index.write_text(text)
        with pytest.raises(LplrValueError, match=match):
            list_arrays(index)

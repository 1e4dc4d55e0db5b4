"""Appending rows and columns to an appendable store (lplr_dask.append): the codes of one-pass
compression of the whole matrix, no read of what was compressed, crash safety, refusals."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import factorize, guard, store
from lplr_dask.cli import main
from lplr_dask.datasets import synthetic
from lplr_dask.errors import LplrValueError, StoreFormatError
from lplr_dask.options import Options
from lplr_dask.sources import read_source

CHUNK = 64
#: float64 products: the codes of an append equal those of compressing the whole (any chunking).
EXACT = dict(rank=16, bits=(4, 4), passes=1, seed=5, precision="float64")
ARRAYS = ("L/codes", "R/codes", "L/scale", "L/offset", "R/scale", "R/offset")


def _quiet(_: str) -> None:
    pass


def _matrix(shape: tuple[int, int] = (384, 320), dtype: Any = np.float64, seed: int = 3) -> np.ndarray:
    A = synthetic(shape, rank=12, decay=0.8, noise=0.01, chunks=(CHUNK, CHUNK), seed=seed).compute()
    return np.asarray(A, dtype=dtype)


def _save(path: Path, x: np.ndarray) -> str:
    z = zarr.create_array(str(path), shape=x.shape, chunks=(CHUNK, CHUNK), dtype=x.dtype)
    z[...] = x
    return str(path)


def _parts(A: np.ndarray, axis: str, cuts: list[int]) -> list[np.ndarray]:
    return np.split(A, cuts, axis=0 if axis == "rows" else 1)


def _stored(path: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    return {name: np.asarray(g[name][...]) for name in ARRAYS}


def _assert_same_codes(got: str, want: str) -> None:
    """Codes identical; scales and offsets to rounding (sums of the same products in another order:
    measured 2e-11 relative at most)."""
    a, b = _stored(got), _stored(want)
    for name in ARRAYS:
        if name.endswith("/codes"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-9, atol=0, err_msg=name)


def _snapshot(path: str) -> dict[str, int]:
    """Every file under the store with its size and modification time: what "nothing changed" means."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), path)] = (st.st_size, st.st_mtime_ns)
    return out


def _compress_first(tmp_path: Path, part: np.ndarray, **kw: Any) -> tuple[str, int]:
    """The first part compressed with --appendable, its input then moved away (never opened again);
    returns the store and its recorded range oversampling."""
    src = _save(tmp_path / "first.zarr", part)
    out = str(tmp_path / "grown.lplr.zarr")
    f = lplr_dask.compress(src, out, appendable=True, log=_quiet, **{**EXACT, **kw})
    shutil.move(src, tmp_path / "moved-away.zarr")
    return out, f.attrs["sketch"]["range_oversample"]


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_appends_give_the_codes_of_one_pass_compression_of_the_whole(client, tmp_path, axis):
    """Compress the first part, append two more (the first input moved away): the codes, scales
    and error estimate of ``compress --passes 1`` of the concatenation, with the oversampling the
    store recorded (p = k from the first shape) given explicitly, and the default sparse sketch."""
    A = _matrix()
    cuts = [128, 256] if axis == "rows" else [128, 192]
    first, *rest = _parts(A, axis, cuts)
    out, p = _compress_first(tmp_path, first)
    for i, part in enumerate(rest):
        f = lplr_dask.append(out, _save(tmp_path / f"part{i}.zarr", part), axis=axis, log=_quiet)
    ref = lplr_dask.compress(
        _save(tmp_path / "whole.zarr", A), tmp_path / "ref.lplr.zarr", oversample=p, log=_quiet, **EXACT
    )
    assert f.shape == A.shape and f.attrs["sketch"] == ref.attrs["sketch"]
    assert f.attrs["sketch"]["kind"] == "sparse"
    _assert_same_codes(out, ref.path)
    assert f.attrs["error_estimate"] == pytest.approx(ref.attrs["error_estimate"], rel=1e-10)
    assert f.attrs["norm_fro"] == pytest.approx(float(np.linalg.norm(A)), rel=1e-12)
    grown = np.cumsum([x.shape[0 if axis == "rows" else 1] for x in (first, *rest)])
    other = A.shape[1] if axis == "rows" else A.shape[0]
    shapes = [[int(g), other] if axis == "rows" else [other, int(g)] for g in grown]
    assert [e["shape"] for e in f.attrs["history"]] == shapes
    assert [e.get("axis") for e in f.attrs["history"]] == [None, axis, axis]
    assert store.SCRATCH not in zarr.open_group(out, mode="r") and store.STAGING not in zarr.open_group(out, mode="r")
    # the grown store's sketches are those a compression of the whole would keep
    whole = lplr_dask.compress(
        str(tmp_path / "whole.zarr"), tmp_path / "whole.lplr.zarr", oversample=p, appendable=True, log=_quiet, **EXACT
    )
    for name in store.KEPT_SKETCHES:
        got = zarr.open_group(out, mode="r")[f"{store.SKETCHES}/{name}"][...]
        want = zarr.open_group(whole.path, mode="r")[f"{store.SKETCHES}/{name}"][...]
        if name == "sumsq":  # by row strip; columns appended are summed strip by strip in another order
            got, want = got.sum(), want.sum()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max(), err_msg=name)


def test_rows_then_columns_and_float32_products_agree_within_1e_5(client, tmp_path):
    """float32 input with "auto" (float32) block products: rows then columns appended; the error
    estimate agrees with a one-pass compression of the whole within 1e-5 of itself (the new block
    is read in the store's chunks, so its block products are those of the whole's)."""
    A = _matrix(dtype=np.float32)
    kw = dict(rank=16, bits=(4, 4), passes=1, seed=5, precision="auto")
    out, p = _compress_first(tmp_path, A[:256, :256], **kw)
    lplr_dask.append(out, _save(tmp_path / "rows.zarr", A[256:, :256]), axis="rows", log=_quiet)
    f = lplr_dask.append(out, _save(tmp_path / "cols.zarr", A[:, 256:]), axis="columns", log=_quiet)
    ref = lplr_dask.compress(
        _save(tmp_path / "whole.zarr", A), tmp_path / "ref.lplr.zarr", oversample=p, log=_quiet, **kw
    )
    assert f.attrs["precision"] == ref.attrs["precision"] == "float32"
    assert f.attrs["error_estimate"] == pytest.approx(ref.attrs["error_estimate"], rel=1e-5)
    assert lplr_dask.evaluate(A, f) == pytest.approx(lplr_dask.evaluate(A, ref), rel=1e-5)


def test_an_interrupted_append_leaves_the_previous_factors_and_resumes_to_the_same_codes(client, tmp_path, monkeypatch):
    """Ctrl-C while the grown store's R is coded: the store still opens as before (shape, codes);
    --resume finishes it (reading no more of the block), and a clean retry gives the same codes."""
    A = _matrix()
    out, _ = _compress_first(tmp_path, A[:192])
    new = _save(tmp_path / "new.zarr", A[192:])
    want_dir = tmp_path / "want.lplr.zarr"
    shutil.copytree(out, want_dir)
    want = lplr_dask.append(str(want_dir), new, axis="rows", log=_quiet)
    before = _stored(out)

    def interrupted(H: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(factorize, "gptq_factor", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lplr_dask.append(out, new, axis="rows", log=_quiet)
    old = lplr_dask.open_factors(out)
    assert old.shape == (192, A.shape[1])
    for name, value in _stored(out).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    staged = zarr.open_group(out, mode="r")[store.STAGING].attrs["lplr"]
    assert staged["stage"] == "projected" and staged["source"]["shape"] == list(A.shape)

    lines: list[str] = []
    resumed = lplr_dask.append(out, new, axis="rows", resume=True, log=lines.append)
    assert any("going on from there" in line for line in lines)
    assert "append: sketch" in resumed.attrs["timings"]  # from the first run: the block was not read again
    _assert_same_codes(out, want.path)
    assert resumed.attrs["error_estimate"] == pytest.approx(want.attrs["error_estimate"], rel=1e-12)
    # --resume again: already appended, nothing done
    lines.clear()
    lplr_dask.append(out, new, axis="rows", resume=True, log=lines.append)
    assert any("already appended" in line for line in lines) and lplr_dask.open_factors(out).shape == A.shape

    # a clean retry (no --resume) discards the interrupted append and starts over
    retry = tmp_path / "retry.lplr.zarr"
    shutil.copytree(want_dir, retry)  # grown once; now interrupt a second append of columns and retry
    cols = _save(tmp_path / "cols.zarr", _matrix((A.shape[0], 64), seed=9))
    with monkeypatch.context() as m:
        m.setattr(factorize, "gptq_factor", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lplr_dask.append(str(retry), cols, axis="columns", log=_quiet)
    lines.clear()
    again = lplr_dask.append(str(retry), cols, axis="columns", log=lines.append)
    assert any("discarding an interrupted append" in line for line in lines)
    clean = lplr_dask.append(str(want_dir), cols, axis="columns", log=_quiet)
    _assert_same_codes(again.path, clean.path)


def test_a_block_appended_by_an_earlier_version_is_known_on_resume(client, tmp_path):
    """The last append's fingerprint recorded the earlier way (``zarr-chunks``): ``--resume``
    of the same block hashes it that way too, so it is still seen as already appended."""
    A = _matrix()
    first, new = _parts(A, "rows", [192])
    out, _ = _compress_first(tmp_path, first)
    block = _save(tmp_path / "new.zarr", new)
    lplr_dask.append(out, block, axis="rows", log=_quiet)
    g = zarr.open_group(out, mode="r+")
    meta = dict(g.attrs["lplr"])
    src = read_source(block)
    meta["history"][-1]["fingerprint"] = guard.fingerprint(src, src.array, like={"method": "zarr-chunks"})
    g.attrs["lplr"] = meta
    lines: list[str] = []
    lplr_dask.append(out, block, axis="rows", resume=True, log=lines.append)
    assert any("already appended" in line for line in lines), lines
    assert lplr_dask.open_factors(out).shape == A.shape


def test_an_append_stopped_in_its_commit_is_refused_until_resumed(client, tmp_path, monkeypatch):
    """Stopped after the commit moved L but not R: the store refuses to open, naming --resume, and
    refuses a run without --resume; --resume finishes the moves with the same codes."""
    A = _matrix()
    out, _ = _compress_first(tmp_path, A[:, :256])
    new = _save(tmp_path / "new.zarr", A[:, 256:])
    want_dir = tmp_path / "want.lplr.zarr"
    shutil.copytree(out, want_dir)
    want = lplr_dask.append(str(want_dir), new, axis="columns", log=_quiet)

    real = store.move_node
    calls = []

    def crash_after_one(group: Any, src: str, dst: str, **kw: Any) -> None:
        if src.startswith(store.STAGING):  # the commit's moves (not those keeping the sketches)
            calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk went away")
        real(group, src, dst, **kw)

    with monkeypatch.context() as m:
        m.setattr(store, "move_node", crash_after_one)
        with pytest.raises(OSError, match="disk went away"):
            lplr_dask.append(out, new, axis="columns", log=_quiet)
    assert calls == ["L", "R"]
    with pytest.raises(StoreFormatError, match="--resume"):
        lplr_dask.open_factors(out)
    with pytest.raises(StoreFormatError, match="--resume"):
        lplr_dask.append(out, new, axis="columns", log=_quiet)
    f = lplr_dask.append(out, new, axis="columns", resume=True, log=_quiet)
    assert f.shape == A.shape and "append_commit" not in f.attrs
    _assert_same_codes(out, want.path)


def _cli(*args: Any) -> int:
    return main([*map(str, args), "--quiet"])


def test_refusals_exit_2_and_change_nothing(client, tmp_path, capsys):
    """The wrong width, height or dtype, a store without --appendable, and a misaligned store are
    refused with exit 2 and one line, before a cluster starts, and the store is left as it was."""
    A = _matrix()
    out, _ = _compress_first(tmp_path, A[:192])
    plain = str(tmp_path / "plain.lplr.zarr")
    lplr_dask.compress(_save(tmp_path / "p.zarr", A), plain, log=_quiet, **EXACT)
    (tmp_path / "r").mkdir()
    ragged, _ = _compress_first(tmp_path / "r", A[:100])  # its last row chunk holds 36 of 64 rows
    cases = [
        (out, _save(tmp_path / "narrow.zarr", A[192:, :-64]), "--rows", ["Expected rows of 320 columns", "256"]),
        (out, _save(tmp_path / "short.zarr", A[:128, :64]), "--columns", ["Expected columns of 192 rows"]),
        (out, _save(tmp_path / "f32.zarr", A[192:].astype(np.float32)), "--rows", ["dtype float64", "float32"]),
        (plain, _save(tmp_path / "more.zarr", A[:64]), "--rows", ["--appendable"]),
        (ragged, str(tmp_path / "more.zarr"), "--rows", ["fill whole chunks of 64 rows", "holds 36"]),
    ]
    for target, new, flag, words in cases:
        before = _snapshot(target)
        capsys.readouterr()
        assert _cli("append", target, new, flag) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        for word in words:
            assert word in err, (word, err)
        assert _snapshot(target) == before
    with pytest.raises(LplrValueError, match="--passes 1"):
        Options(passes=2, appendable=True)
    assert _cli("compress", tmp_path / "p.zarr", tmp_path / "x.lplr.zarr", "--rank", "4", "--appendable") == 2
    assert not (tmp_path / "x.lplr.zarr").exists()


def test_cli_compress_append_info_finalize(cluster, tmp_path, capsys):
    """The commands end to end: info shows the shape history and the sketches' bytes apart from the
    factors'; finalize removes the sketches (the plain format), after which append is refused."""
    A = _matrix()
    first, new = _save(tmp_path / "a.zarr", A[:256]), _save(tmp_path / "b.zarr", A[256:])
    out = tmp_path / "a.lplr.zarr"
    on = ["--scheduler", cluster.scheduler_address]
    assert _cli("compress", first, out, "--rank", "8", "--passes", "1", "--appendable", *on) == 0
    capsys.readouterr()
    assert _cli("append", out, new, "--rows", "--json", *on) == 0
    info = json.loads(capsys.readouterr().out)
    info_attrs = dict(zarr.open_group(str(out), mode="r").attrs["lplr"])
    assert info["shape"] == [384, 320]
    assert info["shape_history"] == "256x320 compress, 384x320 +rows"
    sketches = store.bytes_on_disk(str(out), store.SKETCHES)
    assert info["bytes_sketches"] == sketches > 0
    assert info["bytes_factors"] == info["bytes_on_disk"] - sketches
    assert info["bits_per_entry"] == pytest.approx(info["bytes_factors"] * 8 / (384 * 320))
    assert _cli("finalize", out, "--json") == 0
    done = json.loads(capsys.readouterr().out)
    assert done["bytes_sketches"] is None and done["shape_history"] == info["shape_history"]
    # what is left: the factors, less the attrs' "appendable" entry
    assert done["bytes_codes"] == info["bytes_codes"] and 0 < info["bytes_factors"] - done["bytes_on_disk"] < 512
    g = zarr.open_group(str(out), mode="r")
    assert store.SKETCHES not in g and "appendable" not in g.attrs["lplr"]
    assert _cli("append", out, new, "--rows") == 2
    assert "--appendable" in capsys.readouterr().err
    _assert_reader_opens(str(out))
    _assert_attrs_documented(info_attrs)


def _assert_attrs_documented(attrs: dict[str, Any]) -> None:
    """Every key of an appended store's attrs (its history entries' too) is in docs/FORMAT.md."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md").read_text()
    keys = set(attrs) | set(attrs["appendable"]) | set(attrs["timings"])
    keys |= {k for entry in attrs["history"] for k in entry}
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"docs/FORMAT.md does not describe {missing}"


def _assert_reader_opens(path: str) -> None:
    """The NumPy reader of docs/FORMAT.md reads a grown, finalized store."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md").read_text()
    code = (
        text.split("<!-- reader:begin -->")[1].split("<!-- reader:end -->")[0].strip().strip("`").removeprefix("python")
    )
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 - the documented reader
    L, R = scope["read_lplr"](path)
    assert scope["read_backbone"](path) == 0.0
    assert L.shape[0] == 384 and R.shape[1] == 320


def test_append_and_finalize_are_exported():
    """As ``verify``: the function shadows its module's name on the package, the module stays importable."""
    module = importlib.import_module("lplr_dask.append")
    assert lplr_dask.append is module.append and lplr_dask.finalize is module.finalize
    assert {"append", "finalize"} <= set(lplr_dask.__all__)

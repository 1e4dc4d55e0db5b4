"""The quantized backbone out of core, ``compress(..., backbone_bits=B0)``: A ≈ Q + L·R (issue 20)."""

from __future__ import annotations

import json
import os
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import backbone, budget, factorize, store
from lplr_dask.baselines import backbone_reference, chunk_backbone, relative_error
from lplr_dask.errors import LplrValueError, StoreFormatError

CHUNKS = (64, 80)


def _quiet(_: str) -> None:
    pass


def _matrices() -> dict[str, np.ndarray]:
    """Three matrices a rank alone fits badly (float64, 192 × 160): low rank plus sparse
    outliers, low rank plus heavy-tailed noise, and a slowly decaying spectrum."""
    from lplr_dask.datasets import synthetic

    rng = np.random.default_rng(3)
    low = synthetic((192, 160), rank=8, decay=0.8, noise=0.01, chunks=(192, 160), seed=3).compute()
    low = low.astype(np.float64)
    return {
        "low-rank+outliers": low + np.where(rng.random(low.shape) < 0.01, 20 * np.abs(low).max(), 0.0),
        "low-rank+student-t": low + 0.05 * np.abs(low).max() * rng.standard_t(2, low.shape),
        "poly": synthetic((192, 160), kind="poly", rank=160, decay=0.5, chunks=(192, 160), seed=5)
        .compute()
        .astype(np.float64),
    }


def _zarr(path: Any, A: np.ndarray, chunks: tuple[int, int] = CHUNKS) -> str:
    z = zarr.create_array(os.fspath(path), shape=A.shape, chunks=chunks, dtype=A.dtype)
    z[...] = A
    return os.fspath(path)


@pytest.fixture
def outliers(tmp_path) -> tuple[str, np.ndarray]:
    A = _matrices()["low-rank+outliers"]
    return _zarr(tmp_path / "A.zarr", A), A


@pytest.mark.parametrize(("iters", "start"), [(1, "backbone"), (2, "backbone"), (1, "factors")])
def test_compress_with_a_backbone_equals_the_in_memory_reference(client, outliers, tmp_path, iters, start):
    src, A = outliers
    f = lplr_dask.compress(
        src,
        tmp_path / "o.lplr.zarr",
        rank=8,
        bits=(6, 6),
        quantizer="paper",
        backbone_bits=2,
        backbone_iters=iters,
        backbone_start=start,
        precision="float64",
        seed=4,
        log=_quiet,
    )
    Q, L, R = backbone_reference(
        A, 2, 8, (6, 6), iters=iters, start=start, quantizer="paper", seed=4, row_chunk=CHUNKS[0], keep="last"
    )
    # float64 products as the reference: the same codes, so the same decoded values
    np.testing.assert_allclose(f.Q().compute(), Q, rtol=0, atol=1e-12 * np.abs(A).max())
    np.testing.assert_allclose(f.L().compute(), L, rtol=0, atol=1e-9 * np.abs(L).max())
    np.testing.assert_allclose(f.R().compute(), R, rtol=0, atol=1e-6 * np.abs(R).max())
    group = zarr.open_group(os.fspath(tmp_path / "o.lplr.zarr"), mode="r")
    assert group["Q/codes"].shape == A.shape and group["Q/codes"].chunks == CHUNKS
    assert group["Q/codes"][...].max() <= 3  # 2-bit codes
    assert group["Q/scale"].shape == (3, 160) and group["Q/scale"].dtype == np.float32
    meta = group.attrs["lplr"]
    assert meta["version"] == 3 and meta["backbone"] == {
        "bits": 2,
        "iters": iters,
        "ranges": "clipped-column-per-row-chunk",
        **({"start": "factors"} if start == "factors" else {}),
    }
    assert meta["stage"] == "complete" and store.SCRATCH not in group
    # the attrs' norm is ‖A‖ (the error's denominator), and the estimate is of A ≈ Q + L·R
    assert meta["norm_fro"] == pytest.approx(np.linalg.norm(A), rel=1e-12)
    exact = relative_error(A, Q + L @ R)
    assert lplr_dask.evaluate(src, f) == pytest.approx(exact, rel=1e-9)
    assert meta["error_estimate"] == pytest.approx(exact, rel=0.5)


def test_a_store_with_a_backbone_reconstructs_and_multiplies_through_q(client, outliers, tmp_path):
    src, A = outliers
    f = lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=6, backbone_bits=3, log=_quiet)
    assert f.backbone_bits == 3 and "backbone_bits=3" in repr(f)
    L, R, Q = f.L().compute(), f.R().compute(), f.Q().compute()
    X = Q + L @ R
    np.testing.assert_allclose(np.asarray(f), X, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(f.to_dask().compute(), X, rtol=1e-12, atol=1e-9)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(160), rng.standard_normal((192, 3))
    np.testing.assert_allclose(f @ x, X @ x, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(y.T @ f, y.T @ X, rtol=1e-10, atol=1e-8)
    op = f.as_linear_operator()
    np.testing.assert_allclose(op.rmatvec(y[:, 0]), X.T @ y[:, 0], rtol=1e-10, atol=1e-8)
    for rows, cols in [
        (slice(3, 70), slice(None)),
        (5, slice(10, 90)),
        ([1, 100, 7], 3),
        (7, 9),
        (np.arange(192) % 3 == 0, [0, 159]),
    ]:
        want = X[rows][..., cols] if not isinstance(rows, int) else X[rows][cols]
        np.testing.assert_allclose(f[rows, cols], want, rtol=1e-12, atol=1e-9)
    queries = X[[4, 50]] + 0.01 * rng.standard_normal((2, 160))
    idx, _ = f.nearest_rows(queries, k=3)
    norms = np.linalg.norm(X, axis=1)
    want = np.argsort(-(queries @ X.T) / (norms * np.linalg.norm(queries, axis=1)[:, None]), axis=1)[:, :3]
    np.testing.assert_array_equal(idx, want)
    assert f.theoretical_bits_per_entry == pytest.approx(3 + 6 * (192 * 8 + 160 * 8) / (192 * 160))


def test_decompress_and_info_with_a_backbone(client, outliers, tmp_path, capsys):
    from lplr_dask.cli import main

    src, A = outliers
    out = os.fspath(tmp_path / "o.lplr.zarr")
    assert main(["compress", src, out, "--rank", "6", "--backbone", "2", "--quiet"]) == 0
    f = lplr_dask.open_factors(out)
    assert f.backbone_bits == 2
    dec = os.fspath(tmp_path / "d.zarr")
    assert main(["decompress", out, dec, "--quiet"]) == 0
    np.testing.assert_allclose(zarr.open_array(dec, mode="r")[...], np.asarray(f), rtol=1e-6, atol=1e-5)
    capsys.readouterr()
    assert main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backbone"] == {"bits": 2, "iters": 1, "ranges": "clipped-column-per-row-chunk"}


@pytest.mark.parametrize("name", list(_matrices()))
def test_the_backbone_never_raises_the_error_above_its_backbone_alone(client, tmp_path, name):
    """The factors only remove error from what the backbone leaves; and at the bytes on disk of
    the backbone store, LPLR alone does worse on these three matrices (none is low rank alone)."""
    A = _matrices()[name]
    src = _zarr(tmp_path / "A.zarr", A)
    f = lplr_dask.compress(src, tmp_path / "b.lplr.zarr", rank=8, bits=(8, 8), backbone_bits=2, log=_quiet)
    both = lplr_dask.evaluate(src, f)
    alone = relative_error(A, chunk_backbone(A, 2, CHUNKS[0]))
    assert both < alone
    plain = lplr_dask.compress(src, tmp_path / "p.lplr.zarr", bits_per_entry=f.bits_per_entry, log=_quiet)
    assert plain.nbytes <= f.nbytes
    assert both < lplr_dask.evaluate(src, plain)


def _started(path: Any, A: da.Array, p: factorize.Params) -> dict[str, Any]:
    group = store.create_group(os.fspath(path))
    meta = store.new_meta(
        {"shape": list(A.shape), "dtype": str(A.dtype), "chunks": list(A.chunksize)},
        p.as_attrs(),
        device="cpu",
        version="test",
    )
    store.write_meta(group, meta)
    return meta


def test_the_stages_of_a_backbone_run_in_rounds():
    p = factorize.Params(
        rank=4, bits=(8, 8), quantizer="paper", spec_l=None, spec_r=None, backbone_bits=2, backbone_iters=2
    )  # type: ignore[arg-type]
    names = [s.name for s in factorize.stages_of(p)]
    assert names == [
        "backbone", "basis", "projected", "coded",
        "backbone 2", "basis 2", "projected 2", "coded 2",
        "complete",
    ]  # fmt: skip
    assert [s.reads_input for s in factorize.stages_of(p)] == [True, False, False, False] * 2 + [False]
    assert [s.name for s in factorize.stages_after("coded", p)][0] == "backbone 2"
    assert factorize.stages_of(factorize.Params(4, (8, 8), "paper", None, None)) == factorize.STAGES  # type: ignore[arg-type]
    q = factorize.Params(4, (8, 8), "paper", None, None, backbone_bits=2, backbone_start="factors")  # type: ignore[arg-type]
    assert [(s.name, s.reads_input) for s in factorize.stages_of(q)] == [
        ("basis 0", True), ("projected 0", True), ("coded 0", True),
        ("backbone", True), ("basis", False), ("projected", False), ("coded", False),
        ("complete", False),
    ]  # fmt: skip


@pytest.mark.parametrize("stage", ["backbone", "basis", "projected", "coded", "backbone 2", "projected 2", "coded 2"])
def test_a_backbone_run_resumes_after_each_stage(tmp_path, stage):
    """Stopped after any stage (each pass of each round), the run resumes from the next and gives
    the codes of an uninterrupted run."""
    from lplr_dask.quantize import quantizer_pair

    A = da.from_array(_matrices()["low-rank+outliers"], chunks=CHUNKS)
    spec_l, spec_r = quantizer_pair("default")
    p = factorize.Params(6, (6, 6), "default", spec_l, spec_r, precision="float64", backbone_bits=2, backbone_iters=2)
    with dask.config.set(scheduler="sync"):
        ref = tmp_path / "ref.lplr.zarr"
        factorize.run(A, os.fspath(ref), p, _started(ref, A, p), log=_quiet)
        out = tmp_path / "o.lplr.zarr"
        meta = _started(out, A, p)
        stages = factorize.stages_of(p)
        stop = [s.name for s in stages].index(stage)

        def halt(job: Any) -> dict[str, Any]:
            raise KeyboardInterrupt

        cut = (*stages[: stop + 1], factorize.Stage(stages[stop + 1].name, halt))
        original = factorize.stages_of
        try:
            factorize.stages_of = lambda _p: cut  # type: ignore[assignment]
            with pytest.raises(KeyboardInterrupt):
                factorize.run(A, os.fspath(out), p, meta, log=_quiet)
        finally:
            factorize.stages_of = original  # type: ignore[assignment]
        meta = dict(zarr.open_group(os.fspath(out), mode="r").attrs["lplr"])
        assert meta["stage"] == stage
        final = factorize.run(A, os.fspath(out), p, meta, log=_quiet)
    assert final["complete"]
    got, want = zarr.open_group(os.fspath(out), mode="r"), zarr.open_group(os.fspath(ref), mode="r")
    for name in ("Q/codes", "Q/scale", "L/codes", "L/scale", "R/codes", "R/scale"):
        np.testing.assert_array_equal(got[name][...], want[name][...], err_msg=name)
    assert final["error_estimate"] == pytest.approx(want.attrs["lplr"]["error_estimate"], rel=1e-12)


def test_resume_with_another_backbone_is_refused(client, outliers, tmp_path):
    src, _ = outliers
    out = tmp_path / "o.lplr.zarr"
    lplr_dask.compress(src, out, rank=4, backbone_bits=2, log=_quiet)
    group = zarr.open_group(os.fspath(out), mode="r+")
    meta = dict(group.attrs["lplr"])
    group.attrs["lplr"] = {**meta, "complete": False, "stage": "started"}
    with pytest.raises(StoreFormatError, match="backbone"):
        lplr_dask.compress(src, out, rank=4, resume=True, log=_quiet)
    with pytest.raises(StoreFormatError, match="backbone"):
        lplr_dask.compress(src, out, rank=4, backbone_bits=3, resume=True, log=_quiet)
    f = lplr_dask.compress(src, out, rank=4, backbone_bits=2, resume=True, log=_quiet)
    assert f.attrs["complete"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone_bits": 17}, "backbone_bits"),
        ({"backbone_bits": -1}, "backbone_bits"),
        ({"backbone_bits": 2.0}, "backbone_bits"),
        ({"backbone_bits": 2, "backbone_iters": 0}, "backbone_iters"),
        ({"backbone_bits": 2, "passes": 1, "appendable": True}, "appendable"),
    ],
)
def test_bad_backbone_arguments_are_refused_before_anything_is_written(tmp_path, outliers, kwargs, match):
    src, _ = outliers
    with pytest.raises(LplrValueError, match=match):
        lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=4, log=_quiet, **kwargs)
    assert not (tmp_path / "o.lplr.zarr").exists()


def test_a_version_3_store_is_refused_by_a_reader_of_version_2(client, outliers, tmp_path, monkeypatch):
    src, _ = outliers
    out = tmp_path / "o.lplr.zarr"
    lplr_dask.compress(src, out, rank=4, backbone_bits=2, log=_quiet)
    monkeypatch.setattr(store, "FORMAT_VERSION", 2)
    with pytest.raises(StoreFormatError, match="version 3"):
        lplr_dask.open_factors(out)


def test_a_store_without_a_backbone_is_still_version_2(client, outliers, tmp_path):
    src, _ = outliers
    f = lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=4, log=_quiet)
    assert f.attrs["version"] == store.PLAIN_FORMAT_VERSION == 2
    assert f.attrs["backbone"] is None and f.Q() is None and f.backbone_bits == 0


def test_a_missing_backbone_chunk_is_named(client, outliers, tmp_path):
    import shutil

    src, _ = outliers
    out = tmp_path / "o.lplr.zarr"
    lplr_dask.compress(src, out, rank=4, backbone_bits=2, log=_quiet)
    shutil.rmtree(out / "Q" / "codes" / "c" / "1")
    with pytest.raises(StoreFormatError, match="Q/codes"):
        lplr_dask.open_factors(out)


def test_encode_chunk_codes_each_column_in_its_own_range():
    x = np.array([[0.0, 10.0], [1.0, 10.0], [3.0, 10.0]])
    codes, step, lo = backbone.encode_chunk(x, 2)
    np.testing.assert_array_equal(codes[:, 0], [0, 1, 3])
    np.testing.assert_array_equal(codes[:, 1], [0, 0, 0])  # a constant column: step 1, exact
    assert step.dtype == np.float32 and step.shape == (1, 2)
    np.testing.assert_allclose(backbone.decode_chunk(codes, step, lo), [[0, 10], [1, 10], [3, 10]])


def test_a_budget_search_may_choose_a_backbone(client, tmp_path):
    """``backbone_bits="auto"``: on the outliers matrix the search takes a backbone, within the
    budget on disk, and its error is below the search without one; invalid without a budget."""
    A = _matrices()["low-rank+outliers"]
    src = _zarr(tmp_path / "A.zarr", np.vstack([A] * 4), chunks=(128, 160))  # 768 × 160: room for scales
    lines: list[str] = []
    f = lplr_dask.compress(src, tmp_path / "b.lplr.zarr", bits_per_entry=4.0, backbone_bits="auto", log=lines.append)
    plain = lplr_dask.compress(src, tmp_path / "p.lplr.zarr", bits_per_entry=4.0, log=_quiet)
    assert f.backbone_bits in (1, 2, 3), lines
    assert f.bits_per_entry <= 4.0
    assert lplr_dask.evaluate(src, f) < lplr_dask.evaluate(src, plain)
    assert any("backbone 1 bits" in line for line in lines) and any("chose a" in line for line in lines)
    with pytest.raises(LplrValueError, match="auto"):
        lplr_dask.compress(src, tmp_path / "x.lplr.zarr", rank=4, backbone_bits="auto", log=_quiet)
    with pytest.raises(LplrValueError, match="auto"):
        lplr_dask.compress(src, tmp_path / "x.lplr.zarr", bits_per_entry=3, bits=(8, 8), backbone_bits="auto")


def test_the_budget_search_keeps_no_backbone_where_a_rank_fits(client, tmp_path):
    from lplr_dask.datasets import synthetic

    A = synthetic((768, 160), rank=6, decay=0.7, noise=0.001, chunks=(128, 160), seed=2).compute()
    src = _zarr(tmp_path / "A.zarr", np.asarray(A, dtype=np.float64), chunks=(128, 160))
    f = lplr_dask.compress(src, tmp_path / "b.lplr.zarr", bits_per_entry=2.0, backbone_bits="auto", log=_quiet)
    assert f.backbone_bits == 0 and f.attrs["version"] == 2


def test_compress_group_gives_each_matrix_a_backbone(client, tmp_path):
    A = _matrices()["low-rank+outliers"]
    root = zarr.open_group(os.fspath(tmp_path / "g.zarr"), mode="w")
    for name, M in (("a", A), ("b", A[:, :96].copy())):
        root.create_array(name, shape=M.shape, chunks=CHUNKS, dtype=M.dtype)[...] = M
    result = lplr_dask.compress_group(
        tmp_path / "g.zarr", tmp_path / "o.zarr", rank=4, backbone_bits=2, log=_quiet, evaluate=True
    )
    for entry in result["arrays"]:
        f = lplr_dask.open_factors(tmp_path / "o.zarr" / entry["name"])
        assert f.backbone_bits == 2
        M = A if entry["name"] == "a" else A[:, :96]
        assert entry["error_exact"] == pytest.approx(relative_error(M, np.asarray(f, dtype=np.float64)), rel=1e-6)


def test_the_cli_takes_backbone_auto_only_with_a_budget(tmp_path, outliers, capsys):
    from lplr_dask.cli import main

    src, _ = outliers
    assert main(["compress", src, os.fspath(tmp_path / "o.lplr.zarr"), "--rank", "4", "--backbone", "auto"]) == 2
    assert "--bits-per-entry" in capsys.readouterr().err
    assert not (tmp_path / "o.lplr.zarr").exists()
    assert main(["compress", src, os.fspath(tmp_path / "o.lplr.zarr"), "--rank", "4", "--backbone", "two"]) == 2
    assert "--backbone" in capsys.readouterr().err


def test_export_writes_a_backbone_store_dense_and_refuses_it_factorized(client, outliers, tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    src, _ = outliers
    f = lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=4, backbone_bits=2, log=_quiet)
    lplr_dask.export_safetensors(tmp_path / "o.lplr.zarr", tmp_path / "w.safetensors", log=_quiet)
    got = safetensors.load_file(os.fspath(tmp_path / "w.safetensors"))["weight"]
    np.testing.assert_allclose(got, np.asarray(f), rtol=1e-6, atol=1e-6)
    with pytest.raises(LplrValueError, match="backbone"):
        lplr_dask.export_safetensors(tmp_path / "o.lplr.zarr", tmp_path / "f.safetensors", factorized=True, log=_quiet)
    assert not (tmp_path / "f.safetensors").exists()


def test_an_all_zero_block_keeps_its_backbone_chunks_and_verifies(client, tmp_path):
    """Zero codes and zero offsets are stored too (zarr skips empty chunks unless told), and
    ``verify`` checks Q's codes against B0's range."""
    from lplr_dask.verify import verify

    A = np.random.default_rng(3).standard_normal((64, 64))
    A[:32, :32] = 0.0
    src = _zarr(tmp_path / "A.zarr", A, chunks=(32, 32))
    f = lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=2, bits=(8, 8), backbone_bits=2, log=_quiet)
    assert f.attrs["complete"] is True
    assert relative_error(A, np.asarray(f, dtype=np.float64)) < 1.0
    report = verify(tmp_path / "o.lplr.zarr")
    assert not report["problems"], report


def test_the_budget_search_predicts_the_backbone_from_the_factors(client, tmp_path):
    """On low rank plus outliers the factors-first start is predicted, logged and, where chosen,
    compressed from the factors within the budget; without it (start given) it is not weighed."""
    A = _matrices()["low-rank+outliers"]
    src = _zarr(tmp_path / "A.zarr", np.vstack([A] * 4), chunks=(128, 160))
    lines: list[str] = []
    f = lplr_dask.compress(src, tmp_path / "b.lplr.zarr", bits_per_entry=4.0, backbone_bits="auto", log=lines.append)
    assert any("from the factors, rank" in line for line in lines), lines
    assert f.bits_per_entry <= 4.0
    chosen = [line for line in lines if "chose a" in line]
    if chosen and "from the factors" in chosen[0]:
        assert f.attrs["backbone"]["start"] == "factors"
    lines.clear()
    lplr_dask.compress(
        src,
        tmp_path / "c.lplr.zarr",
        bits_per_entry=4.0,
        backbone_bits="auto",
        backbone_start="backbone",
        log=lines.append,
    )
    assert not any("from the factors" in line for line in lines), lines


@pytest.mark.parametrize("bits", [None, (4, 4)])
def test_a_fixed_backbone_counts_against_the_budget(client, tmp_path, bits):
    """``bits_per_entry`` with a fixed B0: the factors get what Q leaves, so the store on disk
    keeps the budget; a budget Q alone exceeds is refused with what it takes."""
    A = np.random.default_rng(4).standard_normal((512, 512))
    src = _zarr(tmp_path / "A.zarr", A, chunks=(128, 512))
    kwargs = {} if bits is None else {"bits": bits}
    f = lplr_dask.compress(src, tmp_path / "o.lplr.zarr", bits_per_entry=3.5, backbone_bits=2, log=_quiet, **kwargs)
    assert f.backbone_bits == 2 and f.rank >= 1
    assert f.bits_per_entry <= 3.5
    with pytest.raises(LplrValueError, match="what a 2-bit backbone takes"):
        lplr_dask.compress(src, tmp_path / "x.lplr.zarr", bits_per_entry=2.0, backbone_bits=2, log=_quiet, **kwargs)


def test_a_fixed_backbone_counts_against_match_nq(client, tmp_path):
    """``match_nq`` with a fixed B0: the factors match ``B_nq − B0`` bits, so the codes of Q, L
    and R together take no more than naive B_nq-bit quantization; ``B_nq <= B0`` is refused."""
    A = np.random.default_rng(5).standard_normal((384, 256))
    src = _zarr(tmp_path / "A.zarr", A, chunks=(128, 256))
    f = lplr_dask.compress(src, tmp_path / "o.lplr.zarr", match_nq=4, bits=(4, 4), backbone_bits=2, log=_quiet)
    assert f.rank == budget.fair_rank(384, 256, (4, 4), 2.0)
    assert budget.theoretical_bits_per_entry(384, 256, f.rank, (4, 4)) + 2 <= 4
    with pytest.raises(LplrValueError, match="2 bits per entry of codes"):
        lplr_dask.compress(src, tmp_path / "x.lplr.zarr", match_nq=2, bits=(4, 4), backbone_bits=2, log=_quiet)


def test_a_group_sizes_its_members_with_the_backbone():
    """compress-group's fair rank counts B0 in the budget, and copies a member whose Q and factors
    would take as many bits as its dtype."""
    from lplr_dask.group import plan_rank

    assert plan_rank((384, 256), "float32", (4, 4), bits_per_entry=4, backbone_bits=2) == (
        budget.fair_rank(384, 256, (4, 4), 2.0),
        "",
    )
    k, reason = plan_rank((384, 256), "float32", (4, 4), bits_per_entry=2, backbone_bits=2)
    assert k == 0 and "2-bit backbone takes the budget" in reason
    k, reason = plan_rank((384, 256), "float16", (8, 8), rank=160, backbone_bits=8)
    assert k == 0 and "with a 8-bit backbone" in reason
    assert plan_rank((384, 256), "float16", (8, 8), rank=160) == (160, "")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["compress-group", "G", "--rank", "4", "--backbone", "auto"], "compress-group sizes each matrix"),
        (["compress", "A", "--bits-per-entry", "3", "--backbone", "auto", "--appendable", "--passes", "1"], "append"),
        (["compress", "A", "--rank", "4", "--backbone-iters", "2"], "backbone_iters=2 (--backbone-iters)"),
        (["compress-group", "G", "--rank", "4", "--backbone-start", "factors"], "--backbone-start"),
    ],
)
def test_the_cli_refuses_backbone_flags_that_cannot_apply_before_a_cluster(
    tmp_path, outliers, capsys, monkeypatch, argv, says
):
    from lplr_dask import cluster
    from lplr_dask.cli import main

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster started")

    monkeypatch.setattr(cluster, "client_from_args", no_cluster)
    src, _ = outliers
    group = tmp_path / "g.zarr"
    zarr.open_group(os.fspath(group), mode="w").create_array("a", shape=(64, 64), dtype="f4")[...] = 1.0
    inputs = {"A": src, "G": os.fspath(group)}
    assert main([argv[0], inputs[argv[1]], os.fspath(tmp_path / "o.zarr"), *argv[2:]]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


def test_rounds_without_a_backbone_are_refused(tmp_path, outliers):
    src, _ = outliers
    with pytest.raises(LplrValueError, match="with a backbone"):
        lplr_dask.compress(src, tmp_path / "o.lplr.zarr", rank=4, backbone_start="factors", log=_quiet)
    with pytest.raises(LplrValueError, match="with a backbone"):
        lplr_dask.compress_group(src, tmp_path / "g.zarr", rank=4, backbone_iters=3, log=_quiet)
    assert not (tmp_path / "o.lplr.zarr").exists() and not (tmp_path / "g.zarr").exists()


def test_a_target_error_with_a_backbone_plans_on_what_q_leaves(client, tmp_path):
    """``target_error`` with a fixed B0 plans the factors' rank on ``A − Q̂`` (scaled to A's norm):
    the target is met at a lower rank than without a backbone, where Q takes most of the error."""
    A = _matrices()["low-rank+student-t"]
    src = _zarr(tmp_path / "A.zarr", A)
    plain = lplr_dask.compress(src, tmp_path / "p.lplr.zarr", target_error=0.3, log=_quiet)
    f = lplr_dask.compress(src, tmp_path / "b.lplr.zarr", target_error=0.3, backbone_bits=2, log=_quiet)
    assert f.backbone_bits == 2 and f.attrs["error_estimate"] <= 0.3
    assert relative_error(A, np.asarray(f, dtype=np.float64)) <= 0.3
    assert f.rank < plain.rank / 2

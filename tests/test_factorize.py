"""The passes: one-pass and power-iteration quality, the free error estimate, laziness."""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterator
from typing import Any

import dask
import dask.array as da
import dask.callbacks
import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask import blocks, factorize, store
from lplr_dask.datasets import synthetic
from lplr_dask.quantize import quantizer_pair


def _quiet(_: str) -> None:
    pass


def _params(rank: int, **kw: Any) -> factorize.Params:
    spec_l, spec_r = quantizer_pair("default")
    return factorize.Params(rank=rank, bits=(8, 8), quantizer="default", spec_l=spec_l, spec_r=spec_r, **kw)


def _codes(path: str) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    return np.asarray(g["L/codes"][...]), np.asarray(g["R/codes"][...])


class _CountingScheduler:
    """A dask scheduler that raises on compute number ``max_computes + 1`` (as xarray's tests do)."""

    def __init__(self, max_computes: int):
        self.max_computes = max_computes
        self.computes = 0

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.computes += 1
        if self.computes > self.max_computes:
            raise RuntimeError(f"Too many computes: {self.computes} > {self.max_computes}")
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[None]:
    with dask.config.set(scheduler=_CountingScheduler(max_computes)):
        yield


def test_raise_if_dask_computes_catches_a_compute():
    with raise_if_dask_computes(), pytest.raises(RuntimeError, match="Too many computes"):
        da.ones(4, chunks=2).sum().compute()


@pytest.mark.parametrize("passes", [1, 2])
def test_building_the_passes_computes_nothing(small_matrix, passes):
    p = _params(8, passes=passes)
    with raise_if_dask_computes():
        products = factorize.pass1(small_matrix, p)
        Q = factorize.orth(products["Y"])
        W = factorize.project(small_matrix, Q)
        back = blocks.right_multiply(small_matrix, W.T)
    assert set(products) == ({"Y", "AG", "sumsq", "Z"} if passes == 1 else {"Y", "AG", "sumsq"})
    assert products["Y"].shape == (600, 8) and products["AG"].shape == (600, p.test_columns)
    assert W.shape == (8, 400) and back.shape == (600, 8)
    if passes == 1:
        assert products["Z"].shape == (p.oversample, 400)


def test_pass1_products(small_matrix):
    """Y = A·S, AG = A·G and ‖A‖²_F from one read, against the dense computation."""
    from lplr_dask.sketch import STREAM_G, STREAM_S, sketch_matrix

    p = _params(8, test_columns=5)
    out = dask.compute(factorize.pass1(small_matrix, p), scheduler="sync")[0]
    A = small_matrix.compute().astype(np.float64)
    np.testing.assert_allclose(
        out["Y"], A @ sketch_matrix(0, STREAM_S, 400, 8, scale=1 / math.sqrt(8)), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(out["AG"], A @ sketch_matrix(0, STREAM_G, 400, 5), rtol=1e-10, atol=1e-12)
    assert float(out["sumsq"]) == pytest.approx(float((A**2).sum()), rel=1e-12)


def test_error_estimate_formula():
    # ‖E·G‖² = p·‖E‖² exactly gives the exact relative error
    assert factorize.error_estimate(10 * 0.09, 1.0, 10) == pytest.approx(0.3)
    assert factorize.error_estimate(4.0, 2.0, 1) == pytest.approx(1.0)
    assert factorize.error_estimate(0.0, 0.0, 10) == 0.0


def test_one_pass_error_within_1_3_of_two_pass(client, tmp_path):
    """Tropp et al. (2017): with ℓ = 4k + 1 the one-pass residual is (1 + k/(3k))^½ ≈ 1.15× in
    expectation; 1.3 leaves room for the spread over seeds and the sparse sign Ψ."""
    ratios = []
    for seed in range(5):
        A = synthetic((900, 600), rank=40, decay=0.9, noise=0.05, chunks=(256, 256), seed=seed)
        err = {}
        for passes in (1, 2):
            f = lplr_dask.compress(
                A, tmp_path / f"{seed}-{passes}.lplr.zarr", rank=20, passes=passes, seed=seed, log=_quiet
            )
            err[passes] = lplr_dask.evaluate(A, f)
        ratios.append(err[1] / err[2])
    # the two-pass W is the least-squares optimum for its basis: one pass cannot do much better
    assert 0.98 <= float(np.median(ratios)) <= 1.3, ratios


def test_power_iterations_lower_the_error_on_a_slow_spectrum(client, tmp_path):
    """Singular values (i + 1)^-0.5: the sketch's basis mixes in the long tail; each power
    iteration sharpens it (measured 0.82 → 0.70 → 0.68 on this kind of matrix)."""
    A = synthetic((800, 500), rank=500, decay=0.5, kind="poly", noise=0.0, chunks=(256, 256), seed=2)
    err = []
    for q in (0, 1, 2):
        f = lplr_dask.compress(A, tmp_path / f"q{q}.lplr.zarr", rank=20, power_iters=q, log=_quiet)
        assert f.attrs["power_iters"] == q
        err.append(lplr_dask.evaluate(A, f))
    assert err[1] < 0.92 * err[0], err
    assert err[2] <= err[1] * 1.01, err


@pytest.mark.parametrize(
    "kind, options",
    [
        ("lowrank", dict(rank=40, decay=0.9, noise=0.05)),
        ("poly", dict(rank=500, decay=1.0, noise=0.01)),
        ("student-t", dict(rank=40, decay=0.8, noise=0.2)),
    ],
)
def test_free_error_estimate_within_20_percent(client, tmp_path, kind, options):
    """The estimate's spread is about 1/sqrt(2·p·r) for p = 10 test columns and a residual of
    effective rank r ≥ 7 here: under 8%, so ±20% is 2.5σ or more."""
    for seed in range(3):
        A = synthetic((900, 600), kind=kind, chunks=(256, 256), seed=seed, **options)
        f = lplr_dask.compress(A, tmp_path / f"{kind}-{seed}.lplr.zarr", rank=15, seed=seed, log=_quiet)
        exact = lplr_dask.evaluate(A, f)
        assert f.attrs["error_estimate"] == pytest.approx(exact, rel=0.2), (seed, f.attrs["error_estimate"], exact)


@pytest.mark.parametrize(("precision", "rel"), [("float64", 1e-12), ("auto", 1e-6)])
def test_norm_is_recorded(client, small_matrix, tmp_path, precision, rel):
    """Exact in float64; with float32 products each row's sum of squares is float32 (it feeds the estimate only)."""
    f = lplr_dask.compress(small_matrix, tmp_path / "o.lplr.zarr", rank=8, precision=precision, log=_quiet)
    A = small_matrix.compute().astype(np.float64)
    assert f.attrs["norm_fro"] == pytest.approx(float(np.linalg.norm(A)), rel=rel)


def test_one_pass_codes_do_not_depend_on_chunking(client, small_matrix, tmp_path):
    kw = dict(rank=10, bits=(4, 4), passes=1, seed=3, precision="float64", log=_quiet)
    a = lplr_dask.compress(small_matrix, tmp_path / "a.lplr.zarr", **kw)
    b = lplr_dask.compress(small_matrix.rechunk((200, 100)), tmp_path / "b.lplr.zarr", **kw)
    for ca, cb in zip(_codes(a.path), _codes(b.path)):
        np.testing.assert_array_equal(ca, cb)
    assert a.attrs["sketch"]["co_range"] == {"kind": "sparse-sign", "nnz": 8}
    assert a.attrs["sketch"]["oversample"] == 41


def test_power_iteration_codes_do_not_depend_on_chunking(client, small_matrix, tmp_path):
    a = lplr_dask.compress(small_matrix, tmp_path / "a.lplr.zarr", rank=10, bits=(4, 4), power_iters=1, log=_quiet)
    b = lplr_dask.compress(
        small_matrix.rechunk((300, 200)), tmp_path / "b.lplr.zarr", rank=10, bits=(4, 4), power_iters=1, log=_quiet
    )
    for ca, cb in zip(_codes(a.path), _codes(b.path)):
        np.testing.assert_array_equal(ca, cb)


@pytest.mark.parametrize("passes", [1, 2])
def test_gptq_rounding_of_r_lowers_the_error(client, small_matrix, tmp_path, passes):
    """The same L and the same scales of R as nearest rounding; only R's codes differ, chosen
    against L̂ᵀL̂ (one-pass mode too, where W = (ΨL̂)^†Z). Measured ×0.79 (two passes) and ×0.81
    (one pass) of nearest rounding's error here."""
    kw = dict(rank=12, bits=(4, 3), passes=passes, seed=3, precision="float64", log=_quiet)
    near = lplr_dask.compress(small_matrix, tmp_path / "near.lplr.zarr", quantizer="channel", **kw)
    gptq = lplr_dask.compress(small_matrix, tmp_path / "gptq.lplr.zarr", quantizer="channel:channel-gptq", **kw)
    assert gptq.attrs["quantizer"]["R"]["rounding"] == "gptq" and gptq.attrs["quantizer"]["L"]["rounding"] == "nearest"
    for name in ("L/codes", "L/scale", "R/scale", "R/offset"):
        np.testing.assert_array_equal(gptq._group[name][...], near._group[name][...], err_msg=name)
    assert lplr_dask.evaluate(small_matrix, gptq) < 0.9 * lplr_dask.evaluate(small_matrix, near)


def test_resume_after_an_interrupted_gptq_coding_of_r(client, small_matrix, tmp_path, monkeypatch):
    """Interrupted while R is coded (W complete): --resume recomputes L̂ᵀL̂ from the stored L and
    gives the codes of an uninterrupted run."""
    kw = dict(rank=10, bits=(4, 4), quantizer="channel:channel-gptq", seed=4, log=_quiet)
    want = _codes(lplr_dask.compress(small_matrix, tmp_path / "ref.lplr.zarr", **kw).path)

    def interrupted(H: Any) -> Any:
        raise KeyboardInterrupt

    out = tmp_path / "o.lplr.zarr"
    with monkeypatch.context() as m:
        m.setattr(factorize, "gptq_factor", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lplr_dask.compress(small_matrix, out, **kw)
    assert zarr.open_group(str(out), mode="r").attrs["lplr"]["stage"] == "projected"
    f = lplr_dask.compress(small_matrix, out, resume=True, **kw)
    assert f.attrs["complete"] is True
    for got, ref in zip(_codes(f.path), want):
        np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------
# Range oversampling: the top k directions of k + p sketch columns
# ---------------------------------------------------------------------------------------------


def test_sketch_rotation_depends_on_the_top_subspace_only():
    """M = P·Ω·(ΩᵀPΩ)^(-1/2), P the projector on the top-k eigenvectors: whichever eigenvectors
    eigh returns for a repeated eigenvalue (here 5, three times), M is the same orthonormal matrix."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    gram = (Q * np.array([5.0, 5.0, 5.0, 2.0, 1.0, 0.5, 0.1])) @ Q.T
    M = factorize.sketch_rotation(gram, 3, seed=11)
    P = Q[:, :3] @ Q[:, :3].T
    Omega = np.random.default_rng(factorize._derived(11, 3)).standard_normal((7, 3))
    w, V = np.linalg.eigh(Omega.T @ P @ Omega)
    expected = P @ Omega @ (V / np.sqrt(w)) @ V.T
    np.testing.assert_allclose(M, expected, atol=1e-10)
    np.testing.assert_allclose(M.T @ M, np.eye(3), atol=1e-10)
    # another seed mixes differently, within the same subspace
    M2 = factorize.sketch_rotation(gram, 3, seed=12)
    assert not np.allclose(M, M2)
    np.testing.assert_allclose(P @ M2, M2, atol=1e-10)


def test_truncate_sketch_spans_the_top_singular_subspace(small_matrix):
    p = _params(6, range_oversample=6)
    Y = dask.compute(factorize.pass1(small_matrix, p), scheduler="sync")[0]["Y"]
    assert Y.shape == (600, 12)
    Yk = factorize.truncate_sketch(da.from_array(Y, chunks=(256, 12)), p).compute(scheduler="sync")
    U = np.linalg.svd(Y, full_matrices=False)[0][:, :6]
    np.testing.assert_allclose(U @ (U.T @ Yk), Yk, rtol=0, atol=1e-9 * np.abs(Yk).max())
    # the columns spread alike (a mix of every direction), unlike Y's singular vectors themselves
    norms = np.linalg.norm(Yk, axis=0)
    assert norms.max() < 3 * norms.min()
    Yd = da.from_array(Y)
    assert factorize.truncate_sketch(Yd, _params(12)) is Yd  # no oversampling: Y itself


def test_oversampling_lowers_the_error_at_equal_storage(client, tmp_path):
    """Singular values 1/(i + 1), where k sketch columns mix in the tail: measured 0.252 → 0.214
    with p = k here (×0.85); the stores have the same shapes and bits, so the same storage."""
    A = synthetic((800, 500), rank=500, decay=1.0, kind="poly", noise=0.0, chunks=(256, 256), seed=2)
    err, sizes = {}, {}
    for p in (0, None):
        f = lplr_dask.compress(A, tmp_path / f"p{p}.lplr.zarr", rank=20, bits=(6, 6), oversample=p, log=_quiet)
        assert f.attrs["sketch"]["range_oversample"] == (0 if p == 0 else 20)
        err[p], sizes[p] = lplr_dask.evaluate(A, f), (f.L().shape, f.R().shape)
    assert sizes[0] == sizes[None]
    assert err[None] < 0.92 * err[0], err


def test_resolve_oversample():
    assert factorize.resolve_oversample(None, 20, (500, 800)) == 20
    assert factorize.resolve_oversample(5, 20, (500, 800)) == 5
    assert factorize.resolve_oversample(None, 300, (500, 800)) == 200  # at most min(n, d) columns
    assert factorize.resolve_oversample(0, 20, (500, 800)) == 0
    for bad in (-1, 2.5, True, "k"):
        with pytest.raises(lplr_dask.LplrValueError, match="oversample"):
            factorize.resolve_oversample(bad, 20, (500, 800))


def test_bad_oversample_is_refused_before_anything_is_written(small_matrix, tmp_path):
    out = tmp_path / "o.lplr.zarr"
    with pytest.raises(lplr_dask.LplrValueError, match="Use 0 for the paper's sketch"):
        lplr_dask.compress(small_matrix, out, rank=4, oversample=-2, log=_quiet)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The stages one by one: each leaves in the store what the next one reads
# ---------------------------------------------------------------------------------------------


def _started(path: Any, A: da.Array, p: factorize.Params) -> dict[str, Any]:
    """A new store at ``path``, as a job starts it; its attrs."""
    group = store.create_group(path)
    meta = store.new_meta({"shape": list(A.shape)}, p.as_attrs(), device="cpu", version="test")
    store.write_meta(group, meta)
    return meta


def _counting(A: da.Array) -> tuple[da.Array, list[int]]:
    """A, with every chunk it gives a task counted in the list returned beside it."""
    reads: list[int] = []
    return A.map_blocks(lambda b: (reads.append(1), b)[1], dtype=A.dtype, meta=A._meta), reads


def _run_stage(job: factorize.StageContext, stage: factorize.Stage) -> dict[str, Any]:
    """Run one stage and write its attrs as :func:`factorize.run` does after each."""
    added = stage.step(job)
    job.meta.update(added, stage=stage.name, timings=job.runner.timings)
    store.write_meta(job.group, job.meta)
    return added


def test_the_stage_table_names_the_resume_stages():
    assert factorize.STAGE_NAMES == ("started", "basis", "projected", "coded", "complete")
    assert tuple(s.name for s in factorize.STAGES) == factorize.STAGE_NAMES[1:]
    assert [s.step for s in factorize.STAGES] == [
        factorize.sketch_and_code_basis,
        factorize.project_onto_basis,
        factorize.code_r,
        factorize.estimate_and_finish,
    ]
    assert factorize.stages_after("started") == factorize.STAGES
    assert [s.name for s in factorize.stages_after("projected")] == ["coded", "complete"]
    assert factorize.stages_after("complete") == ()
    for s in factorize.STAGES:  # each says what it reads and what it adds to the attrs
        assert "Reads" in s.step.__doc__ and "Returns" in s.step.__doc__, s.name


@pytest.mark.parametrize("passes", [1, 2])
def test_each_stage_leaves_what_the_next_reads(small_matrix, tmp_path, passes):
    """Run stage by stage, the store holds after each exactly what the next stage needs, and the
    codes are those of one call of :func:`factorize.run`."""
    p = _params(6, passes=passes, range_oversample=3)
    with dask.config.set(scheduler="sync"):
        ref = tmp_path / "ref.lplr.zarr"
        factorize.run(small_matrix, str(ref), p, _started(ref, small_matrix, p), log=_quiet)

        out = tmp_path / "o.lplr.zarr"
        job = factorize.StageContext.open(small_matrix, str(out), p, _started(out, small_matrix, p), log=_quiet)
        g = job.group
        basis, projected, coded, complete = factorize.STAGES

        added = _run_stage(job, basis)
        A = small_matrix.compute().astype(np.float64)
        assert added == {"norm_fro": pytest.approx(float(np.linalg.norm(A)), rel=1e-6)}
        assert g[store.scratch_name("Y")].shape == (600, 9) and g[store.scratch_name("AG")].shape == (600, 10)
        assert (store.scratch_name("Z") in g) == (passes == 1)
        assert g["L/codes"].shape == (600, 6) and "L/scale" in g and "L/offset" in g
        assert "W_done" not in g[store.SCRATCH] and "R" not in g

        assert _run_stage(job, projected) == {}
        assert np.asarray(g[store.scratch_name("W_done")][...]).tolist() == [1] * 4
        assert (store.scratch_name("PT") in g) == (passes == 2)
        W = np.asarray(g[store.scratch_name("W")][...])
        assert W.shape == (6, 400) and np.abs(W).min(axis=0).max() > 0  # every column chunk written

        assert _run_stage(job, coded) == {}
        assert g["R/codes"].shape == (6, 400) and "R/scale" in g and "R/offset" in g
        assert store.SCRATCH in g  # the estimate still needs AG

        added = _run_stage(job, complete)
    assert set(added) == {"error_estimate", "complete"} and added["complete"] is True
    assert 0 < added["error_estimate"] < 1
    assert store.SCRATCH not in zarr.open_group(str(out), mode="r")
    for got, want in zip(_codes(str(out)), _codes(str(ref))):
        np.testing.assert_array_equal(got, want)
    assert zarr.open_group(str(out), mode="r").attrs["lplr"]["error_estimate"] == pytest.approx(
        zarr.open_group(str(ref), mode="r").attrs["lplr"]["error_estimate"], rel=1e-12
    )


@pytest.mark.parametrize(("stage", "chunk_reads"), [("projected", 0), ("basis", 20), ("started", 40)])
def test_run_resumes_after_the_last_stage_done(small_matrix, tmp_path, stage, chunk_reads):
    """On a store whose attrs say ``stage``, :func:`factorize.run` reads A only for the stages
    after it (two-pass: pass 1 and pass 2 read each of its 20 chunks once), times only their steps,
    and gives the codes of an uninterrupted run."""
    p = _params(6, seed=2)
    with dask.config.set(scheduler="sync"):
        ref = tmp_path / "ref.lplr.zarr"
        factorize.run(small_matrix, str(ref), p, _started(ref, small_matrix, p), log=_quiet)

        out = tmp_path / "o.lplr.zarr"
        job = factorize.StageContext.open(small_matrix, str(out), p, _started(out, small_matrix, p), log=_quiet)
        for s in factorize.STAGES[: factorize.STAGE_NAMES.index(stage)]:
            _run_stage(job, s)
        meta = dict(zarr.open_group(str(out), mode="r").attrs["lplr"])  # as written
        assert meta["stage"] == stage
        timings_before = dict(meta["timings"])

        counted, reads = _counting(small_matrix)
        final = factorize.run(counted, str(out), p, meta, log=_quiet)
    assert len(reads) == chunk_reads
    assert final["stage"] == "complete" and final["complete"] is True
    redone = {k for k in final["timings"] if final["timings"][k] != timings_before.get(k)}
    assert ("pass 1: sketch" in redone) == (stage == "started")
    assert ("pass 2: project" in redone) == (stage in ("started", "basis"))
    assert {"code R", "error estimate"} <= redone
    for got, want in zip(_codes(str(out)), _codes(str(ref))):
        np.testing.assert_array_equal(got, want)


def test_run_codes_r_from_the_scratch_w_of_a_projected_store(small_matrix, tmp_path):
    """With ``stage`` "projected", run codes R from the W in the scratch, not a W of its own:
    doubled there, R's scales come out doubled."""
    p = _params(6)
    with dask.config.set(scheduler="sync"):
        out = tmp_path / "o.lplr.zarr"
        job = factorize.StageContext.open(small_matrix, str(out), p, _started(out, small_matrix, p), log=_quiet)
        for s in factorize.STAGES[:2]:
            _run_stage(job, s)
        W = job.scratch("W")
        W[...] = 2 * np.asarray(W[...])
        ref = tmp_path / "ref.lplr.zarr"
        factorize.run(small_matrix, str(ref), p, _started(ref, small_matrix, p), log=_quiet)
        factorize.run(small_matrix, str(out), p, dict(job.meta), log=_quiet)
    got, want = zarr.open_group(str(out), mode="r"), zarr.open_group(str(ref), mode="r")
    np.testing.assert_array_equal(got["L/codes"][...], want["L/codes"][...])
    np.testing.assert_allclose(got["R/scale"][...], 2 * want["R/scale"][...], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bounded tasks: the TSQR of pinv(L) and orth, whatever n (issue 15)
# ---------------------------------------------------------------------------------------------


class _ResultSizes(dask.callbacks.Callback):
    """Records the bytes of every task's result (so of every task's inputs) while dask computes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[Any, int] = {}

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
        if "finalize" not in str(key):  # the gathering of the result for the test itself
            self.sizes[key] = int(getattr(result, "nbytes", 0))


def test_pinv_factor_and_orth_have_no_task_above_a_row_block_in_the_cliff_case(monkeypatch):
    """A tall matrix in 128-row blocks with width k = 100 > 128/2: dask's TSQR on such blocks
    stacks all 32 R factors (3200 × 100) into one task, a task that grows with n; on blocks of
    at least 2k rows (:func:`blocks.qr_chunks`) it recurses, and no task holds more than a row
    block. The k×k inverse of pinv is computed once, not once per row block."""
    n, k = 4096, 100
    rng = np.random.default_rng(0)
    L = rng.standard_normal((n, k)) @ np.diag(np.logspace(0, -6, k))  # ill-conditioned, full rank
    L_hat = da.from_array(L, chunks=(128, k))
    calls: list[int] = []
    inverse = factorize._pinv_transposed
    monkeypatch.setattr(factorize, "_pinv_transposed", lambda R, m: (calls.append(1), inverse(R, m))[1])
    block_bytes = max(blocks.qr_chunks(n, k, 128)) * k * 8
    for lazy, want in [
        (factorize.pinv_factor(L_hat), np.linalg.pinv(L, rtol=n * np.finfo(np.float64).eps).T),
        (factorize.orth(L_hat), None),
    ]:
        sizes = _ResultSizes()
        with sizes:
            got = lazy.compute(scheduler="sync")
        assert max(sizes.sizes.values()) <= block_bytes < (n // 128) * k * k * 8, max(
            sizes.sizes.items(), key=lambda kv: kv[1]
        )
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
        else:
            Q_np, _ = np.linalg.qr(L)
            np.testing.assert_allclose(got.T @ got, np.eye(k), atol=1e-12)
            np.testing.assert_allclose(got @ (got.T @ Q_np), Q_np, atol=1e-10)  # the same column space
    assert len(calls) == 1


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_host_pinv_factor_equals_numpy_pinv_and_the_blocked_one(rank_deficient):
    """The in-memory CholeskyQR2 of the central steps in the client gives numpy's pseudo-inverse
    (condition 1e6, or two dependent columns: the minimum-norm solution) and the blocked dask
    version's result to rounding."""
    n, k = 2048, 40
    rng = np.random.default_rng(1)
    L = rng.standard_normal((n, k)) @ np.diag(np.logspace(0, -6, k))
    if rank_deficient:
        L[:, 5] = L[:, 3] * 2.0
    want = np.linalg.pinv(L, rtol=n * np.finfo(np.float64).eps).T
    got = factorize.host_pinv_factor(L)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
    blocked = factorize.pinv_factor(da.from_array(L, chunks=(256, k))).compute(scheduler="sync")
    np.testing.assert_allclose(got, blocked, rtol=0, atol=1e-9 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# Resume points in pass 1 (issue 15)
# ---------------------------------------------------------------------------------------------


def _by_strip(A: da.Array, fail_strip: int | None = None) -> tuple[da.Array, list[int]]:
    """A, with each chunk read recorded by its row strip, and raising on the chunks of ``fail_strip``."""
    reads: list[int] = []

    def read(b: Any, block_info: Any = None) -> Any:
        i = block_info[0]["chunk-location"][0]
        if i == fail_strip:
            raise RuntimeError(f"stopped in row strip {i}")
        reads.append(i)
        return b

    return A.map_blocks(read, dtype=A.dtype, meta=A._meta), reads


@pytest.mark.parametrize("passes", [2, 1])
def test_an_interrupted_pass1_resumes_from_its_marked_row_strips(small_matrix, tmp_path, passes):
    """Pass 1 stopped in row strip 3 of 5: two-pass, the strips written are marked in ``Y_done``
    and a resumed run reads only the others in pass 1 (then all in pass 2); one-pass (Z sums
    all rows) nothing is marked until Z is stored, and pass 1 is redone whole. The codes and the
    estimate are those of an undisturbed run."""
    p = _params(6, seed=2, passes=passes, range_oversample=3)
    strips, per_strip = small_matrix.numblocks
    with dask.config.set(scheduler="sync"):
        ref = tmp_path / "ref.lplr.zarr"
        factorize.run(small_matrix, str(ref), p, _started(ref, small_matrix, p), log=_quiet)

        out = tmp_path / "o.lplr.zarr"
        meta = _started(out, small_matrix, p)
        failing, _ = _by_strip(small_matrix, fail_strip=3)
        with pytest.raises(RuntimeError, match="stopped in row strip 3"):
            factorize.run(failing, str(out), p, dict(meta), log=_quiet)
        group = zarr.open_group(str(out), mode="r")
        assert group.attrs["lplr"]["stage"] == "started"
        marked = np.asarray(group[store.scratch_name("Y_done")][...]).astype(bool)
        assert not marked[3]
        if passes == 2:
            assert marked.any(), marked  # some strips were written before strip 3 failed
        else:
            assert not marked.any()

        counted, reads = _by_strip(small_matrix)
        logs: list[str] = []
        final = factorize.run(counted, str(out), p, dict(meta), log=logs.append)
    assert final["stage"] == "complete"
    reads_of = collections.Counter(reads)
    pass2 = per_strip if passes == 2 else 0  # one-pass: no second read
    for i in range(strips):
        assert reads_of[i] == pass2 + (0 if marked[i] else per_strip), (i, reads_of, marked)
    if marked.any():
        assert f"resume: {int(marked.sum())} of {strips} row strips of pass 1 already written" in "\n".join(logs)
    for got, want in zip(_codes(str(out)), _codes(str(ref))):
        np.testing.assert_array_equal(got, want)
    assert final["norm_fro"] == pytest.approx(zarr.open_group(str(ref), mode="r").attrs["lplr"]["norm_fro"], rel=1e-12)
    assert final["error_estimate"] == pytest.approx(
        zarr.open_group(str(ref), mode="r").attrs["lplr"]["error_estimate"], rel=1e-12
    )


def test_a_store_whose_pass1_is_all_marked_resumes_at_the_basis(small_matrix, tmp_path):
    """Every row strip marked: a resumed run at stage "started" reads A only in pass 2 and codes
    L from the stored Y, with the codes of an undisturbed run."""
    p = _params(6, seed=2)
    with dask.config.set(scheduler="sync"):
        ref = tmp_path / "ref.lplr.zarr"
        factorize.run(small_matrix, str(ref), p, _started(ref, small_matrix, p), log=_quiet)
        out = tmp_path / "o.lplr.zarr"
        meta = _started(out, small_matrix, p)
        job = factorize.StageContext.open(small_matrix, str(out), p, dict(meta), log=_quiet)
        factorize._write_sketches(job)  # pass 1 done, the basis not yet
        assert np.asarray(job.scratch("Y_done")[...]).all()
        counted, reads = _counting(small_matrix)
        factorize.run(counted, str(out), p, dict(meta), log=_quiet)
    assert len(reads) == 20  # pass 2 only
    for got, want in zip(_codes(str(out)), _codes(str(ref))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_pinv_scratch_is_stored_in_the_products_precision(small_matrix, tmp_path, precision):
    """``_work/PT`` is float32 under float32 products (half the bytes pass 2 reads), float64 otherwise."""
    p = _params(6, precision=precision)
    with dask.config.set(scheduler="sync"):
        out = tmp_path / "o.lplr.zarr"
        job = factorize.StageContext.open(small_matrix, str(out), p, _started(out, small_matrix, p), log=_quiet)
        basis, projected, *_ = factorize.STAGES
        _run_stage(job, basis)
        _run_stage(job, projected)
    assert job.scratch("PT").dtype == np.dtype(precision)

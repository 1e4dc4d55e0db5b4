"""Tests of lplr_dask/baselines.py: NQ, DSVD, LSVD, the in-memory LPLR reference, and LPLR
(through compress) against them."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

import lplr_dask
from lplr_dask.baselines import dsvd, lplr_codes, lplr_reference, lsvd, naive_quantize, relative_error
from lplr_dask.budget import fair_rank
from lplr_dask.errors import LplrValueError
from lplr_dask.quantize import quantizer_pair, ranges, scale_from_range


def _quiet(msg: str) -> None:
    pass


def _lowrank(n: int = 300, d: int = 200, r: int = 8, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, r)) @ rng.standard_normal((r, d)) + noise * rng.standard_normal((n, d))


def _assert_codes_equal_except_ties(got: np.ndarray, want: np.ndarray, unrounded: np.ndarray) -> None:
    """Codes equal, except by one level where the reference's value sits on a rounding tie.

    ``unrounded`` is ``(x - offset) / scale`` before rounding. Both computations accumulate in
    float64, so they differ by ~1e-12 relative at most: only values within 1e-6 of a half-level
    can round differently.
    """
    diff = got.astype(np.int64) - want.astype(np.int64)
    assert np.abs(diff).max(initial=0) <= 1
    at = diff != 0
    dist_to_tie = np.abs(unrounded - np.floor(unrounded) - 0.5)
    assert (dist_to_tie[at] < 1e-6).all(), f"{int(at.sum())} codes differ away from a tie"


def _unrounded(x: np.ndarray, bits: int, quantizer: str, channel_axis: int) -> np.ndarray:
    spec = quantizer_pair(quantizer)[1 - channel_axis]  # L's quantizer for channel axis 1, R's for 0
    scale, offset = scale_from_range(*ranges(x, spec, channel_axis=channel_axis), bits)
    return (x - offset) / scale


@pytest.mark.parametrize("quantizer", ["paper", "default", "channel:channel-gptq", "channel:tensor-gptq"])
def test_compress_equals_in_memory_reference(client, small_matrix, tmp_store, quantizer):
    bits = (4, 8)
    # float64 products, as the reference computes: codes then differ only at exact ties
    lplr_dask.compress(
        small_matrix, tmp_store, rank=12, bits=bits, quantizer=quantizer, seed=5, precision="float64", log=_quiet
    )
    group = zarr.open_group(tmp_store, mode="r")
    ref = lplr_codes(small_matrix.compute(), 12, bits, quantizer=quantizer, seed=5)
    _assert_codes_equal_except_ties(group["L/codes"][...], ref.L.codes, _unrounded(ref.Y, bits[0], quantizer, 1))
    if quantizer_pair(quantizer)[1].rounding == "gptq":
        # each rounding error moves the codes after it in its column, so a tie would move more
        # than one code; W and L̂ᵀL̂ agree with the reference to ~1e-12, far from any tie here
        np.testing.assert_array_equal(group["R/codes"][...], ref.R.codes)
    else:
        _assert_codes_equal_except_ties(group["R/codes"][...], ref.R.codes, _unrounded(ref.W, bits[1], quantizer, 0))
    np.testing.assert_allclose(group["L/scale"][...], np.broadcast_to(ref.L.scale, group["L/scale"].shape), rtol=1e-12)
    np.testing.assert_allclose(group["R/scale"][...], np.broadcast_to(ref.R.scale, group["R/scale"].shape), rtol=1e-9)


def test_reference_decodes_to_what_compress_reconstructs(client, small_matrix, tmp_store):
    f = lplr_dask.compress(
        small_matrix, tmp_store, rank=8, bits=(6, 6), quantizer="paper", precision="float64", log=_quiet
    )
    L, R = lplr_reference(small_matrix.compute(), 8, (6, 6), quantizer="paper")
    np.testing.assert_allclose(f.L().compute(), L, rtol=0, atol=1e-12)
    np.testing.assert_allclose(f.R().compute(), R, rtol=0, atol=1e-9 * np.abs(R).max())


def test_shepp_logan_lplr_beats_nq_and_dsvd(client, tmp_store):
    skimage = pytest.importorskip("skimage")
    import skimage.transform

    A = skimage.transform.resize(skimage.data.shepp_logan_phantom(), (1000, 1000)).astype(np.float64)
    bits, b_nq = (4, 8), 2
    k = fair_rank(1000, 1000, bits, b_nq)
    assert k == 166
    f = lplr_dask.compress(A, tmp_store, match_nq=b_nq, bits=bits, quantizer="paper", log=_quiet)
    assert f.rank == k
    e_lplr = lplr_dask.evaluate(A, f)
    e_nq = relative_error(A, naive_quantize(A, b_nq))
    e_dsvd = relative_error(A, dsvd(A, k, bits))
    e_lsvd = relative_error(A, lsvd(A, k, bits))
    print(
        f"\nShepp-Logan 1000x1000, rank {k}, bits {bits}, B_nq {b_nq}: LPLR {e_lplr:.4f}  NQ {e_nq:.4f}  "
        f"DSVD {e_dsvd:.4f}  LSVD {e_lsvd:.4f}"
    )
    assert e_lplr < e_nq
    assert e_lplr < e_dsvd


def test_error_falls_as_rank_grows(client, small_matrix, tmp_path):
    errors = [
        lplr_dask.evaluate(
            small_matrix,
            lplr_dask.compress(small_matrix, tmp_path / f"r{k}.lplr.zarr", rank=k, bits=(8, 8), log=_quiet),
        )
        for k in (2, 4, 8, 12)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_error_falls_as_bits_grow(client, small_matrix, tmp_path):
    errors = [
        lplr_dask.evaluate(
            small_matrix,
            lplr_dask.compress(small_matrix, tmp_path / f"b{b}.lplr.zarr", rank=12, bits=(b, b), log=_quiet),
        )
        for b in (2, 4, 8)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_naive_quantize_error_within_half_a_step():
    A = _lowrank()
    for bits in (2, 8):
        step = (A.max() - A.min()) / (2**bits - 1)
        assert np.abs(naive_quantize(A, bits) - A).max() <= step / 2 * (1 + 1e-12)
    assert relative_error(A, naive_quantize(A, 16)) < 1e-4


def test_naive_quantize_dask_equals_numpy():
    A = _lowrank()
    for quantizer in ("paper", "channel", "group64"):
        got = naive_quantize(da.from_array(A, chunks=(100, 64)), 3, quantizer=quantizer)
        assert isinstance(got, da.Array)
        np.testing.assert_array_equal(got.compute(), naive_quantize(A, 3, quantizer=quantizer))


@pytest.mark.parametrize("method", [dsvd, lsvd])
def test_svd_baselines_nearly_exact_at_full_rank_and_16_bits(method):
    A = _lowrank(120, 80)
    L, R = method(A, 80, (16, 16))
    assert L.shape == (120, 80) and R.shape == (80, 80) and L.dtype == R.dtype == np.float64
    # 16-bit codes: each factor entry is off by at most 2^-17 of its range; LSVD's least squares
    # through a random k×k rotation amplifies that by the rotation's condition number.
    assert relative_error(A, (L, R)) < 1e-2
    if method is dsvd:
        assert relative_error(A, (L, R)) < 1e-3


def test_dsvd_approaches_the_truncated_svd_at_high_bits():
    A = _lowrank(noise=0.3)
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    best = relative_error(A, (U[:, :4] * s[:4], Vt[:4]))  # Eckart–Young optimum at rank 4
    assert relative_error(A, dsvd(A, 4, (12, 12))) == pytest.approx(best, rel=1e-3)
    assert relative_error(A, dsvd(A, 4, (2, 2))) > relative_error(A, dsvd(A, 4, (4, 4))) > best


@pytest.mark.parametrize("method", [dsvd, lsvd])
def test_svd_baselines_with_gptq_rounding_of_r(method):
    """``Σ_k V_kᵀ`` (DSVD) or W (LSVD) coded against the quantized basis, numpy and dask alike."""
    A = _lowrank()
    k, bits = 8, (4, 3)
    e_near = relative_error(A, method(A, k, bits, quantizer="channel"))
    L, R = method(A, k, bits, quantizer="channel:channel-gptq")
    e_gptq = relative_error(A, (L, R))
    if method is dsvd:
        # Q(U_k) is nearly orthonormal: L̂ᵀL̂ ≈ I leaves almost nothing to feed back (measured ×0.999)
        assert e_gptq <= 1.01 * e_near
    else:
        # LSVD's basis U_k·Σ_k·S has correlated columns: measured ×0.83
        assert e_gptq < 0.95 * e_near
    Ld, Rd = method(da.from_array(A, chunks=(100, 100)), k, bits, quantizer="channel:channel-gptq")
    # a randomized SVD on dask (as below): the same subspace, another draw of the rounding noise
    assert 0.5 * e_gptq < relative_error(A, (Ld.compute(), Rd.compute())) < 2 * e_gptq


@pytest.mark.parametrize("method", [dsvd, lsvd])
def test_svd_baselines_on_dask_match_numpy(method):
    A = _lowrank(noise=0.05)
    Ad = da.from_array(A, chunks=(100, 100))
    L, R = method(Ad, 8, (8, 8))
    assert isinstance(L, da.Array) and isinstance(R, da.Array)
    e_dask, e_np = relative_error(Ad, (L, R)), relative_error(A, method(A, 8, (8, 8)))
    # a randomized SVD (2 power iterations) of a rank-8-plus-noise matrix: same subspace; the
    # quantization noise differs by draw, so agree within a factor, not exactly
    assert 0.5 * e_np < e_dask < 2 * e_np


def test_lsvd_matches_its_definition():
    A = _lowrank()
    k, bits = 8, (6, 7)
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    from lplr_dask.sketch import STREAM_S, sketch_matrix

    Z = (U[:, :k] * s[:k]) @ sketch_matrix(0, STREAM_S, k, k, scale=1 / np.sqrt(k))
    L = naive_quantize(Z, bits[0])
    R = naive_quantize(np.linalg.pinv(L) @ A, bits[1])
    L_got, R_got = lsvd(A, k, bits)
    np.testing.assert_allclose(L_got, L, atol=1e-12)
    np.testing.assert_allclose(L_got @ R_got, L @ R, atol=1e-6 * np.abs(A).max())


def test_relative_error_forms_agree(client, small_matrix, tmp_store):
    f = lplr_dask.compress(small_matrix, tmp_store, rank=6, bits=(4, 4), log=_quiet)
    A = small_matrix.compute().astype(np.float64)
    L, R = f.L().compute(), f.R().compute()
    dense = float(np.linalg.norm(A - L @ R) / np.linalg.norm(A))
    assert relative_error(A, f) == pytest.approx(dense, rel=1e-9)
    assert relative_error(A, (L, R)) == pytest.approx(dense, rel=1e-9)
    assert relative_error(small_matrix, (f.L(), f.R())) == pytest.approx(dense, rel=1e-9)
    assert relative_error(small_matrix, da.from_array(L @ R)) == pytest.approx(dense, rel=1e-9)
    assert relative_error(np.zeros((3, 3)), np.ones((3, 3))) == pytest.approx(3.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda A: dsvd(A, 0),
        lambda A: lsvd(A, 201),
        lambda A: dsvd(A, 4, (4, 17)),
        lambda A: naive_quantize(A, 0),
        lambda A: naive_quantize(A[None], 4),
        lambda A: naive_quantize(A, 4, quantizer="bogus"),
        lambda A: naive_quantize(A, 4, quantizer="channel-gptq"),  # no basis to feed errors through
        lambda A: dsvd(A, 4, quantizer="channel-gptq:channel"),  # gptq is for R only
    ],
)
def test_bad_arguments(call):
    with pytest.raises(LplrValueError):
        call(_lowrank())


# ---------------------------------------------------------------------------------------------
# backbone reference: A ≈ Q + L·R


def _backbone_matrices() -> dict[str, np.ndarray]:
    """A low-rank-plus-sparse-outliers matrix, a heavy-tailed one and a slow spectrum (float64)."""
    from lplr_dask.datasets import synthetic

    rng = np.random.default_rng(3)
    low = synthetic((300, 200), rank=8, decay=0.8, noise=0.01, chunks=(300, 200), seed=3).compute().astype(np.float64)
    outliers = np.where(rng.random(low.shape) < 0.01, 20 * np.abs(low).max(), 0.0)
    return {
        "low-rank+outliers": low + outliers,
        "student-t": synthetic((300, 200), kind="student-t", rank=10, chunks=(300, 200), seed=4).compute(),
        "poly": synthetic((300, 200), kind="poly", rank=200, decay=0.5, chunks=(300, 200), seed=5).compute(),
    }


def test_one_round_is_nq_of_a_then_lplr_of_the_residual():
    A = _backbone_matrices()["student-t"].astype(np.float64)
    Q, L, R = lplr_dask.baselines.backbone_reference(A, 2, 12, (8, 8), seed=1)
    np.testing.assert_array_equal(Q, naive_quantize(A, 2, quantizer="channel"))
    L2, R2 = lplr_reference(A - Q, 12, (8, 8), quantizer="default", seed=1)
    np.testing.assert_array_equal(L, L2)
    np.testing.assert_array_equal(R, R2)


@pytest.mark.parametrize(
    "name, beats_lplr",
    [("low-rank+outliers", True), ("poly", True), ("student-t", False)],
)
def test_the_backbone_with_the_better_start_beats_its_parts(name, beats_lplr):
    # Q first suits outliers, the factors first a slow spectrum; on a nearly low-rank matrix the
    # 2 bits of backbone gain nothing over LPLR alone (a budget search gives them to the factors)
    A = _backbone_matrices()[name].astype(np.float64)
    nq = relative_error(A, naive_quantize(A, 2, quantizer="channel"))
    both = min(
        relative_error(A, Q + L @ R)
        for Q, L, R in (
            lplr_dask.baselines.backbone_reference(A, 2, 16, (8, 8), iters=2, start=start)
            for start in ("backbone", "factors")
        )
    )
    L0, R0 = lplr_reference(A, 16, (8, 8), quantizer="default")
    lplr = relative_error(A, L0 @ R0)
    assert both < nq  # the factors only remove error from the backbone's residual
    if beats_lplr:
        assert both < 0.75 * lplr  # and the backbone removes error the rank cannot
    else:
        assert both < 1.1 * lplr


def test_more_rounds_do_not_raise_the_error():
    A = _backbone_matrices()["low-rank+outliers"]
    errors = []
    for iters in (1, 2, 4):  # the best round is kept: a later round that does worse is dropped
        Q, L, R = lplr_dask.baselines.backbone_reference(A, 1, 8, (8, 8), iters=iters, start="backbone")
        errors.append(relative_error(A, Q + L @ R))
    assert errors[2] <= errors[1] <= errors[0], errors


@pytest.mark.parametrize("iters", [0, -1, 1.5, True])
def test_backbone_refuses_bad_rounds(iters):
    with pytest.raises(LplrValueError, match="iters"):
        lplr_dask.baselines.backbone_reference(np.ones((20, 10)), 2, 2, iters=iters)
    with pytest.raises(LplrValueError, match="start"):
        lplr_dask.baselines.backbone_reference(np.ones((20, 10)), 2, 2, start="middle")


def test_clipped_ranges_never_do_worse_than_min_max_and_help_heavy_tails():
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((2000, 30))
    heavy = rng.standard_t(2, (2000, 30))
    for X, gain in ((gauss, 1.0), (heavy, 0.5)):
        for bits in (1, 2, 3):
            clipped = relative_error(X, lplr_dask.baselines.clipped_quantize(X, bits))
            minmax = relative_error(X, naive_quantize(X, bits, quantizer="channel"))
            assert clipped <= minmax * (1 + 1e-6) and clipped <= gain * minmax, (bits, clipped, minmax)
    Y = lplr_dask.baselines.clipped_quantize(gauss, 2)
    assert all(len(np.unique(Y[:, j])) <= 4 for j in range(Y.shape[1]))  # 2 bits: at most 4 levels per column

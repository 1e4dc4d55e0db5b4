"""Tests for lplr_dask/budget.py: bits per entry on disk never exceeded; rank and bits chosen."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lplr_dask
from lplr_dask import budget, store
from lplr_dask.baselines import relative_error
from lplr_dask.datasets import synthetic
from lplr_dask.errors import LplrValueError
from lplr_dask.quantize import quantizer_pair

QUIET = dict(log=lambda msg: None)


def _specs(name: str):
    return quantizer_pair(name)


# ---------------------------------------------------------------------------------------------
# The bound and the largest rank under it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, bits, quantizer, chunks",
    [
        ((1000, 600), (8, 8), "paper", None),
        ((4096, 300), (4, 6), "channel", (512, 300)),
        ((300, 5000), (2, 2), "group64", (300, 1000)),
    ],
)
def test_rank_for_bits_per_entry_is_the_largest_that_fits(shape, bits, quantizer, chunks):
    n, d = shape
    specs = _specs(quantizer)
    for x in (0.5, 1.0, 3.0):
        k = budget.rank_for_bits_per_entry(n, d, bits, x, specs=specs, chunks=chunks)
        allowed = x * n * d / 8
        assert budget.storage_bytes(n, d, k, bits, specs=specs, chunks=chunks) <= allowed
        assert k == min(n, d) or budget.storage_bytes(n, d, k + 1, bits, specs=specs, chunks=chunks) > allowed


def test_budget_below_rank_one_is_refused_with_what_it_needs():
    with pytest.raises(LplrValueError, match=r"below what rank 1 needs .* metadata included"):
        budget.rank_for_bits_per_entry(100, 100, (8, 8), 2.0)
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(LplrValueError, match="positive bits-per-entry"):
            budget.rank_for_bits_per_entry(1000, 1000, (8, 8), bad)


def test_scales_count_against_the_budget():
    # group scales (two float64 per group of 16) cost 8 bits per entry: much lower rank
    n, d = 4096, 2048
    k_channel = budget.rank_for_bits_per_entry(n, d, (4, 4), 1.0, specs=_specs("channel"))
    k_group = budget.rank_for_bits_per_entry(n, d, (4, 4), 1.0, specs=_specs("group16"))
    assert k_group < k_channel / 2


# A grid of shapes (tall, wide, square-ish, not multiples of the chunks), budgets and quantizers,
# compressed for real: the whole store, metadata included, stays within the budget.
GRID = [
    ((1024, 512), (256, 256), 1.0, (8, 8), "default"),
    ((1024, 512), (256, 256), 2.0, (2, 2), "paper"),
    ((700, 1300), (256, 512), 1.5, (4, 8), "group128-sym"),
    ((3000, 200), (1000, 200), 0.75, (6, 6), "channel-stochastic"),
    ((200, 3000), (200, 1024), 0.75, (3, 3), "paper"),
    ((1500, 900), (512, 300), 0.5, (8, 8), "channel:tensor"),
]


@pytest.mark.parametrize("shape, chunks, x, bits, quantizer", GRID)
def test_bits_per_entry_on_disk_never_exceeds_the_budget(client, tmp_store, shape, chunks, x, bits, quantizer):
    A = synthetic(shape, rank=20, decay=0.9, noise=0.05, chunks=chunks, seed=4)
    f = lplr_dask.compress(A, tmp_store, bits_per_entry=x, bits=bits, quantizer=quantizer, **QUIET)
    assert f.bits == bits
    assert store.bytes_on_disk(tmp_store) <= x * shape[0] * shape[1] / 8
    assert f.bits_per_entry <= x


# ---------------------------------------------------------------------------------------------
# Rank and bits from the budget
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind, x", [("lowrank", 0.5), ("poly", 1.0), ("student-t", 2.0)])
def test_bits_per_entry_chooses_rank_and_bits_within_the_budget(client, tmp_store, kind, x):
    n, d = 1024, 768
    A = synthetic(
        (n, d),
        kind=kind,
        rank=16 if kind != "poly" else 400,
        decay=0.8 if kind != "poly" else 0.5,
        noise=0.001 if kind == "lowrank" else 0.05,
        chunks=(256, 256),
        seed=5,
    )
    choice = budget.choose(A, x, specs=_specs("default"))
    assert tuple(choice.bits) in budget.BITS_GRID
    # the winner is the lowest predicted error among candidates that all fit
    assert choice.predicted == min(c[2] for c in choice.candidates)
    for k, bits, _ in choice.candidates:
        assert budget.storage_bytes(n, d, k, bits, specs=_specs("default"), chunks=(256, 256)) <= x * n * d / 8
    f = lplr_dask.compress(A, tmp_store, bits_per_entry=x, **QUIET)
    assert (f.rank, f.bits) == (choice.rank, choice.bits)  # deterministic: the same plan
    assert store.bytes_on_disk(tmp_store) <= x * n * d / 8
    # the plan's prediction is the compression's exact error within a quarter (the free estimate,
    # from 10 test columns, scatters by about as much again where the rank meets A's rank)
    assert relative_error(A, f) == pytest.approx(choice.predicted, rel=0.25)


def test_a_low_rank_matrix_gets_its_rank(client):
    A = synthetic((1024, 512), rank=12, decay=0.7, noise=0.001, chunks=(256, 256), seed=6)
    choice = budget.choose(A, 2.0, specs=_specs("default"), grid=((8, 8), (4, 4)))
    # 12 directions hold all but 0.1% of the energy: a rank below 12 leaves a tail of several
    # percent, which 8-bit or 4-bit rounding at rank 12 or more does not come near
    assert choice.rank >= 12 and choice.predicted < 0.05
    assert {bits for _, bits, _ in choice.candidates} == {(8, 8), (4, 4)}


def test_match_nq_gives_the_papers_fair_rank(client, tmp_store, small_matrix):
    n, d = small_matrix.shape
    f = lplr_dask.compress(small_matrix, tmp_store, match_nq=4, bits=(4, 8), **QUIET)
    assert f.rank == math.floor(n * d * 4 / (n * 4 + d * 8)) == budget.fair_rank(n, d, (4, 8), 4)


def test_cli_bits_per_entry_with_and_without_bits(client, tmp_path, capsys):
    import json

    from lplr_dask.cli import main

    src = str(tmp_path / "a.zarr")
    lplr_dask.generate(src, (1024, 512), rank=10, decay=0.8, noise=0.01, chunks=(256, 256), seed=7)
    out = str(tmp_path / "o.lplr.zarr")
    # the client fixture is current: the CLI runs on it
    assert main(["compress", src, out, "--bits-per-entry", "1", "--bits", "4", "6", "--json"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert fixed["bits"] == [4, 6] and fixed["bits_per_entry"] <= 1
    assert main(["compress", src, out, "--bits-per-entry", "1", "--overwrite", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert tuple(chosen["bits"]) in budget.BITS_GRID and chosen["bits_per_entry"] <= 1
    assert np.isfinite(chosen["error_estimate"])

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


# ---------------------------------------------------------------------------------------------
# The documented maximum rank (lplr.max-rank): a budget or a fair rank is capped, from the shape
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def virtual_source(tmp_path):
    """A 10^6 x 10^6 float32 Zarr array with no chunk written: a read gives fill values."""
    import zarr

    path = tmp_path / "virtual.zarr"
    zarr.create_array(store=str(path), shape=(10**6, 10**6), chunks=(4096, 4096), dtype="float32", fill_value=0)
    return str(path)


def test_max_rank_is_a_dask_setting_of_4096():
    import dask

    from lplr_dask.options import configured_max_rank

    assert configured_max_rank() == 4096 == dask.config.get("lplr.max-rank")
    with dask.config.set({"lplr.max-rank": "64"}):  # as the environment or a YAML file may give it
        assert configured_max_rank() == 64
    for bad in (0, -3, 2.5, "many", True):
        with dask.config.set({"lplr.max-rank": bad}), pytest.raises(LplrValueError, match="lplr.max-rank"):
            configured_max_rank()


@pytest.mark.parametrize(
    "size, rule",
    [
        (("match_nq", 4), "the fair rank against 4-bit quantization is 250000"),  # issue 15's number
        (("bits_per_entry", 1.0), "a budget of 1 bits per entry allows rank"),
    ],
)
def test_a_budget_or_fair_rank_above_the_maximum_is_capped_with_a_warning(size, rule):
    from lplr_dask.options import SizeRule

    lines: list[str] = []
    shape, chunks = (10**6, 10**6), (4096, 4096)
    if size[0] == "match_nq":
        uncapped = budget.fair_rank(*shape, (8, 8), size[1])
    else:
        uncapped = budget.rank_for_bits_per_entry(*shape, (8, 8), size[1], chunks=chunks)
    assert uncapped > 4096
    sized = budget.capped_rank(shape, (8, 8), SizeRule(*size), chunks=chunks, log=lines.append)
    assert sized == (4096, {"requested": uncapped, "max_rank": 4096})
    assert budget.resolve_rank(shape, (8, 8), SizeRule(*size), chunks=chunks, log=lines.append) == 4096
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0].startswith(f"warning: {rule}")
    for words in (f"rank {uncapped}", "capped at 4096 (lplr.max-rank)", "O(k^3)", f"DASK_LPLR__MAX_RANK={uncapped}"):
        assert words in lines[0], lines[0]


def test_a_rank_at_or_below_the_maximum_is_not_capped_and_an_explicit_rank_is_kept():
    import dask

    from lplr_dask.options import SizeRule

    lines: list[str] = []
    with dask.config.set({"lplr.max-rank": 120}):
        # 600x400 at (8, 8) and 4 bits: the fair rank is 120, at the maximum
        assert budget.capped_rank((600, 400), (8, 8), SizeRule("match_nq", 4), log=lines.append) == (120, None)
        assert not lines
        sized = budget.capped_rank((600, 400), (8, 8), SizeRule("rank", 300), log=lines.append)
    assert sized == (300, None)  # the user's own rank: allowed, with a note of what it costs
    assert (
        len(lines) == 1 and lines[0].startswith("note: rank 300 is above lplr.max-rank = 120") and "O(k^3)" in lines[0]
    )


def test_compress_caps_a_fair_rank_in_seconds_before_any_read_of_a(virtual_source, tmp_path, monkeypatch):
    """``--match-nq 4`` on 10^6 x 10^6 wanted rank 250,000: capped from the shape and chunks alone,
    before the job (here a stand-in that reads nothing) gets A."""
    import contextlib
    import time

    from lplr_dask import api, job

    calls = []

    def no_job(source, out, rank, options, **kwargs):
        calls.append((rank, kwargs["attrs"], kwargs["matrix"][1].shape))
        raise LplrValueError("the job is not run in this test")

    monkeypatch.setattr(job, "compress_at_rank", no_job)
    monkeypatch.setattr(api, "_client", lambda log, device="cpu": contextlib.nullcontext(None))
    lines: list[str] = []
    t0 = time.perf_counter()
    with pytest.raises(LplrValueError, match="not run in this test"):
        lplr_dask.compress(virtual_source, tmp_path / "o.lplr.zarr", match_nq=4, log=lines.append)
    assert time.perf_counter() - t0 < 5
    assert calls == [(4096, {"rank_cap": {"requested": 250_000, "max_rank": 4096}}, (10**6, 10**6))]
    assert any(line.startswith("warning: the fair rank against 4-bit quantization is 250000") for line in lines)


def test_compress_at_a_capped_rank_records_the_cap(client, tmp_store, small_matrix):
    import dask
    import zarr

    lines: list[str] = []
    n, d = small_matrix.shape
    assert budget.fair_rank(n, d, (8, 8), 4) == 120
    with dask.config.set({"lplr.max-rank": 50}):
        f = lplr_dask.compress(small_matrix, tmp_store, match_nq=4, log=lines.append)
    assert f.rank == 50 and f.L().shape == (n, 50)
    assert f.attrs["rank_cap"] == {"requested": 120, "max_rank": 50}
    assert zarr.open_group(tmp_store, mode="r").attrs["lplr"]["rank_cap"] == {"requested": 120, "max_rank": 50}
    assert [line for line in lines if "capped at 50 (lplr.max-rank)" in line]
    # under the maximum nothing is capped or recorded
    g = lplr_dask.compress(small_matrix, tmp_store, match_nq=4, overwrite=True, **QUIET)
    assert g.rank == 120 and "rank_cap" not in g.attrs


def test_plans_never_go_above_the_maximum(client):
    import dask

    A = synthetic((1024, 512), rank=40, decay=0.9, noise=0.01, chunks=(256, 256), seed=8)
    lines: list[str] = []
    with dask.config.set({"lplr.max-rank": 16}):
        choice = budget.choose(A, 4.0, specs=_specs("default"), grid=((8, 8), (4, 4)), log=lines.append)
    assert choice.rank <= 16 and max(k for k, _, _ in choice.candidates) <= 16
    assert "sketch spectrum up to rank 16" in lines[0]


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_caps_before_the_cluster_starts(virtual_source, tmp_path, capsys, monkeypatch, quiet):
    import time

    import dask

    from lplr_dask import cli

    def no_cluster(args, log):
        raise LplrValueError("no cluster in this test")

    monkeypatch.setattr(cli, "_cluster", no_cluster)
    t0 = time.perf_counter()
    with dask.config.set({"lplr.max-rank": 64}):
        argv = ["compress", virtual_source, str(tmp_path / "o.lplr.zarr"), "--match-nq", "4"]
        assert cli.main(argv + (["--quiet"] if quiet else [])) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: no cluster in this test"
    warned = [line for line in err if line.startswith("warning: ")]
    assert len(warned) == 1 and "is 250000, capped at 64 (lplr.max-rank)" in warned[0]
    with dask.config.set({"lplr.max-rank": 64}):  # a budget with bits: the same cap, before the cluster
        argv = ["compress", virtual_source, str(tmp_path / "o.lplr.zarr"), "--bits-per-entry", "1", "--bits", "8", "8"]
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "warning: a budget of 1 bits per entry allows rank" in err and "capped at 64 (lplr.max-rank)" in err

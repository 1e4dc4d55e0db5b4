"""The pipelines in ``pipelines/``: each runs in ``--quick`` mode and writes its report and figures.

The numbers asserted on are read from the run's ``results.json`` (the same numbers as the
markdown tables), and the relations asserted are those the paper's experiments must show.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# pipelines/ is a folder of the repository, not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lplr_dask.budget import fair_rank  # noqa: E402
from pipelines import common, embeddings_knn, huge_matrix, images, streaming  # noqa: E402


def _run(module, tmp_path, *extra):
    out = tmp_path / "results"
    if "--work" not in extra:
        extra = ("--work", str(tmp_path / "work"), *extra)
    assert module.main(["--quick", "--out", str(out), *extra]) == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert report.startswith("# ")
    assert f"Command: `python -m pipelines.{module.__name__.split('.')[-1]} --quick --out {out} --work" in report
    assert results["quick"] is True
    if "--keep-work" not in extra:
        assert not (tmp_path / "work").exists(), "the work folder is removed without --keep-work"
    return out, report, results


def _png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


# --------------------------------------------------------------------------------------------
# common


def test_markdown_table_and_spread():
    assert common.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    assert common.fmt_spread([0.3, 0.1, 0.2], digits=2) == "0.20 [0.10, 0.30]"
    assert common.fmt_spread([0.25], digits=2) == "0.25"
    assert common.fmt(None) == "—"


def test_tall_transposes_wide_matrices():
    A = np.zeros((2, 5))
    T, transposed = common.tall(A)
    assert T.shape == (5, 2) and transposed
    assert common.tall(T)[1] is False


def test_lplr_reconstruct_round_trips_through_zarr(client, tmp_path, small_matrix):
    A = small_matrix.compute()
    recon = common.lplr_reconstruct(A, tmp_path, "A", bits=(8, 8), match_nq=4, quantizer="paper", seed=0)
    assert zarr.open_array(str(tmp_path / "A.zarr"))[...].tolist() == A.tolist()
    assert recon.shape == A.shape and recon.dtype == A.dtype
    k = fair_rank(*A.shape, (8, 8), 4)
    stores = list(tmp_path.glob("*.lplr.zarr"))
    assert len(stores) == 1
    from lplr_dask import open_factors

    assert open_factors(stores[0]).rank == k
    # low rank plus 1% noise, rank 12 < k: the 8-bit factors are accurate
    assert np.linalg.norm(A - recon) / np.linalg.norm(A) < 0.05


def test_lplr_reconstruct_leaves_rank_zero_matrices_alone(tmp_path):
    A = np.ones((2, 384), dtype=np.float32)
    assert fair_rank(384, 2, (8, 8), 4) == 0
    assert common.lplr_reconstruct(A.T, tmp_path, "tiny", bits=(8, 8), match_nq=4) is None
    assert not any(tmp_path.iterdir()), "nothing is written for a matrix left uncompressed"


def test_usage_error_is_one_line_and_status_2(capsys, tmp_path):
    assert images.main(["--quick", "--out", str(tmp_path), "--seeds", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seeds" in err and "python -m pipelines.images" in err


# --------------------------------------------------------------------------------------------
# images


def test_images_quick(client, tmp_path):
    out, report, results = _run(images, tmp_path)
    _png(out / "phantom.png")
    _png(out / "hubble.png")
    settings = results["settings"]
    assert {s["image"] for s in settings} == {"phantom", "hubble"}
    for s in settings:
        assert s["rank"] == fair_rank(256 if s["image"] == "phantom" else 223, 256, tuple(s["bits"]), s["b_nq"])
        assert set(s["errors"]) == set(images.METHODS)
        assert f"| {s['errors']['NQ'][0]:.4f} |" in report  # the table shows the run's numbers
    (phantom_1,) = [s for s in settings if s["image"] == "phantom" and s["b_nq"] == 1]
    nq = phantom_1["errors"]["NQ"][0]
    # the paper's claim: at 1 bit per entry, LPLR beats naive quantization on the phantom
    assert np.median(phantom_1["errors"]["LPLR (paper)"]) < nq
    assert np.median(phantom_1["errors"]["LPLR (default)"]) < nq


# --------------------------------------------------------------------------------------------
# embeddings k-NN


def _within_five_points_at_4_bits(results, data):
    b = results["b_nq"].index(4)
    accuracy = results["accuracy"][data]
    base = accuracy["uncompressed"][b]
    for method, acc in accuracy.items():
        assert abs(acc[b] - base) <= 0.05, f"{data} {method}: {acc[b]:.3f} vs uncompressed {base:.3f}"


def test_embeddings_knn_quick_digits(client, tmp_path):
    out, report, results = _run(embeddings_knn, tmp_path, "--no-text")
    _png(out / "accuracy.png")
    assert list(results["accuracy"]) == ["digits"]
    assert results["b_nq"] == [1, 4]
    _within_five_points_at_4_bits(results, "digits")
    assert f"{100 * results['accuracy']['digits']['LPLR (paper)'][1]:.1f}%" in report
    # more bits, smaller error, for every method
    for method, errs in results["error"]["digits"].items():
        assert errs[1] < errs[0], method


def test_stdlib_docstrings_are_deterministic_and_labelled():
    texts, labels, names = embeddings_knn.stdlib_docstrings(["json", "logging"], per_class=5)
    again = embeddings_knn.stdlib_docstrings(["json", "logging"], per_class=5)
    assert (texts, labels.tolist(), names) == (again[0], again[1].tolist(), again[2])
    assert labels.tolist() == [0] * 5 + [1] * 5
    assert all(n.startswith("json") for n in names[:5]) and all(n.startswith("logging") for n in names[5:])
    assert len(set(texts)) == 10 and min(map(len, texts)) >= 40


@pytest.mark.slow
def test_embeddings_knn_quick_with_text(client, tmp_path):
    out, report, results = _run(embeddings_knn, tmp_path)
    text = "stdlib docstrings"
    assert list(results["accuracy"]) == ["digits", text]
    base = results["accuracy"][text]["uncompressed"][0]
    # 6 packages: chance is 1/6; the shipped model's embeddings separate them far better
    assert base > 0.5
    _within_five_points_at_4_bits(results, "digits")
    for method in ("NQ", "DSVD", "LPLR (paper)"):
        assert results["error"][text][method][1] < results["error"][text][method][0], method
    assert "| stdlib docstrings | 4 |" in report


# --------------------------------------------------------------------------------------------
# transformer weights


def test_neighbour_overlap():
    rng = np.random.default_rng(0)
    E = rng.standard_normal((300, 16)).astype(np.float32)
    tokens = np.arange(0, 300, 7)
    from pipelines.transformer_weights import neighbour_overlap

    assert neighbour_overlap(E, E, tokens) == 1.0
    assert neighbour_overlap(E, 3 * E, tokens) == 1.0  # cosine: scale-free
    shuffled = E[rng.permutation(300)]
    assert neighbour_overlap(E, shuffled, tokens) < 0.2


@pytest.mark.slow
def test_transformer_weights_quick(client, tmp_path):
    from pipelines import transformer_weights as tw

    out, report, results = _run(tw, tmp_path)
    _png(out / "errors.png")
    matrices = results["matrices"]
    assert tw.TOKEN_TABLE in matrices and matrices[tw.TOKEN_TABLE]["shape"] == [30522, 384]
    for name, m in matrices.items():
        n, d = sorted(m["shape"], reverse=True)
        assert m["rank"] == fair_rank(n, d, (8, 8), 4), name
    tiny = matrices["embeddings.token_type_embeddings.weight"]
    assert tiny["rank"] == 0 and tiny["errors"]["LPLR (paper)"] is None
    assert f"| `embeddings.token_type_embeddings.weight` | 2×384 (transposed) | {common.UNCOMPRESSED} |" in report
    for m in tw.METHODS:
        behaviour = results["behaviour"][m]
        # the compressed weights really are in the model: its embeddings and neighbours move
        assert behaviour["cosine_mean"] < 0.9999
        # --quick leaves the token table out of the backbone methods (tw.QUICK_BACKBONE_ENTRIES)
        backbone = m in tw.BACKBONE_METHODS
        assert 0.0 < behaviour["neighbours_kept"] <= 1.0 if backbone else 0.0 < behaviour["neighbours_kept"] < 1.0
        s = results["summary"][m]
        assert s["matrices"] == len(matrices) - (m != "NQ") - backbone
        errors = [e["errors"][m] for e in matrices.values() if e["errors"][m] is not None]
        assert s["mean"] == pytest.approx(np.mean(errors)) and s["std"] == pytest.approx(np.std(errors))
    # with only the embeddings and layer 0's attention compressed (--quick), LPLR keeps the
    # sentence embeddings pointing the same way (the full model, 40 matrices, drops to ~0.19)
    assert results["behaviour"]["LPLR (paper)"]["cosine_mean"] > 0.3
    assert results["tokens"] == 500
    for m in tw.EQUAL_CODES_METHODS:  # Q's codes and the factors' at the codes of 4-bit NQ
        disk = [e["bits_on_disk"][m] for e in matrices.values() if m in e["bits_on_disk"]]
        assert len(disk) == len(matrices) - 1 and results["summary"][m]["bits_on_disk"] == pytest.approx(np.mean(disk))
        assert all(3.5 < x < 6 for x in disk)  # 4 bits of codes (Blosc may shrink them), scales and metadata on top


# --------------------------------------------------------------------------------------------
# huge matrix


def test_huge_matrix_quick(client, tmp_path):
    work = tmp_path / "work"
    out, report, results = _run(huge_matrix, tmp_path, "--work", str(work), "--keep-work")
    _png(out / "timings.png")
    assert results["shape"] == [4096, 2048] and results["rank"] == 16
    A = zarr.open_array(str(work / "A.zarr"))[...].astype(np.float64)
    from lplr_dask import open_factors

    factors = open_factors(work / "A.lplr.zarr")
    recon = factors.to_dask(dtype=np.float64).compute()
    exact = np.linalg.norm(A - recon) / np.linalg.norm(A)
    assert results["error_exact"] == pytest.approx(exact, rel=1e-6)
    # the free estimate from 10 Gaussian test columns is a chi-square estimate: within 2x
    assert 0.5 < results["error_estimate"] / exact < 2
    assert {"compress: pass 1: sketch", "compress: pass 2: project", "generate"} <= set(results["timings"])
    assert f"{exact:.5f}" in report


# --------------------------------------------------------------------------------------------
# streaming


def test_streaming_quick(client, tmp_path):
    """5 appends of 8 snapshots to a 1024-row field: each appended store's exact error equals the
    recompression's (float32 products in the same chunks: sums in another order), and the store
    records the shape history of every step."""
    work = tmp_path / "work"
    out, report, results = _run(streaming, tmp_path, "--work", str(work), "--keep-work")
    _png(out / "streaming.png")
    steps = results["steps"]
    assert [s["snapshots"] for s in steps] == [40, 48, 56, 64, 72]
    for s in steps:
        assert s["error_append"] == pytest.approx(s["error_recompress"], rel=1e-5)
        assert 0 < s["error_append"] < 0.5
    from lplr_dask import open_factors

    factors = open_factors(work / "stream.lplr.zarr")
    assert factors.shape == (1024, 72)
    history = factors.attrs["history"]
    assert [h["op"] for h in history] == ["compress"] + ["append"] * 5
    assert [h["shape"] for h in history][-1] == [1024, 72]
    from lplr_dask.store import bytes_on_disk

    assert results["bytes_on_disk"] == factors.nbytes > 0 and results["bytes_sketches"] > 0
    assert factors.nbytes + results["bytes_sketches"] == bytes_on_disk(str(work / "stream.lplr.zarr"))
    assert f"{factors.nbytes:,} bytes of factors on disk, and {results['bytes_sketches']:,} more" in report
    assert f"{steps[-1]['error_append']:.5f}" in report

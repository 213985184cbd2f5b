"""The exact top-k over float16 unit vectors (both first passes against a float64 brute force, near ties
included), the cache files, and the prompt rules."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipscope_explorer.app.meaning import vectors
from clipscope_explorer.app.meaning.prompts import check_template, clean_text, prompt
from clipscope_explorer.app.meaning.torch_scan import TorchScorer
from clipscope_explorer.app.meaning.vectors import (
    NumpyScorer,
    UnitVectors,
    VectorsError,
    blob_matrix,
    exact_scores,
    float16_to_float32,
    load_vectors,
    scorer_is_within_bound,
)

SCORERS = [NumpyScorer(), TorchScorer()]


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def reference(ids: np.ndarray, matrix: np.ndarray, query: np.ndarray, k: int, rows=None) -> list[tuple]:
    start, stop = rows or (0, len(matrix))
    scores = (matrix[start:stop].astype(np.float64) * query.astype(np.float64)).sum(axis=1)
    order = np.lexsort((*ids[start:stop].T[::-1], -scores))[:k]
    return [tuple(int(v) for v in ids[start + i]) for i in order]


def test_widening_float16_bits_is_exact():
    half = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = half[np.isfinite(half)].reshape(1, -1)
    scratch = np.empty(finite.shape, dtype=np.uint32)
    converted = float16_to_float32(finite, scratch, np.empty_like(scratch))
    assert np.array_equal(converted, finite.astype(np.float32))
    assert np.array_equal(np.signbit(converted), np.signbit(finite))


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("k", [1, 10, 299, 300, 1000])
def test_top_equals_a_float64_brute_force(scorer, k, monkeypatch):
    monkeypatch.setattr(vectors, "CHUNK_ROWS", 64)
    monkeypatch.setattr(vectors, "EXACT_ROWS", 50)
    rng = np.random.default_rng(k)
    matrix = unit(rng.normal(size=(300, 48))).astype("<f2")
    matrix[[40, 41, 250]] = matrix[7]  # ties: broken by id
    ids = np.arange(300, dtype=np.int32)[:, None]
    found = UnitVectors(ids, matrix)
    for query in unit(rng.normal(size=(4, 48))).astype(np.float32):
        rows, scores = found.top(query, k, scorer)
        assert [tuple(ids[r]) for r in rows] == reference(ids, matrix, query, k)
        np.testing.assert_array_equal(scores, exact_scores(matrix, rows, query))
    query = matrix[7].astype(np.float32)
    rows, _ = found.top(query, 4, scorer)
    assert rows.tolist() == [7, 40, 41, 250]


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: type(s).__name__)
def test_near_ties_within_the_first_pass_error_rank_exactly(scorer):
    """Rows whose scores differ by far less than float16 resolves: the first pass cannot order them, the
    second does."""
    rng = np.random.default_rng(5)
    query = unit(rng.normal(size=64)).astype(np.float32)
    other = unit(rng.normal(size=64) - (rng.normal(size=64) @ query) * query)
    angles = 0.5 + rng.uniform(-2e-4, 2e-4, 2000)
    matrix = (np.cos(angles)[:, None] * query + np.sin(angles)[:, None] * other).astype("<f2")
    ids = np.stack([np.repeat([3, 9], 1000), np.tile(np.arange(1000), 2)], axis=1).astype(np.int32)
    found = UnitVectors(ids, matrix)
    for k in (1, 25, 201):
        rows, _ = found.top(query, k, scorer)
        assert [tuple(ids[r]) for r in rows] == reference(ids, matrix, query, k)
        rows, _ = found.top(query, k, scorer, rows=found.row_range(0, 9))
        assert [tuple(ids[r]) for r in rows] == reference(ids, matrix, query, k, rows=(1000, 2000))


class Noisy(NumpyScorer):
    """A first pass as wrong as its bound allows (the second pass must still rank exactly)."""

    bound = 1e-3

    def coarse(self, matrix, query, start, stop):
        scores, _ = super().coarse(matrix, query, start, stop)
        noise = np.random.default_rng(stop).uniform(-0.99, 0.99, len(scores)) * self.bound
        return (scores + noise).astype(np.float32), self.bound


def test_any_first_pass_within_its_bound_gives_the_exact_ranking():
    rng = np.random.default_rng(9)
    query = unit(rng.normal(size=32)).astype(np.float32)
    matrix = unit(query + rng.normal(size=(3000, 32)) * 0.02).astype("<f2")  # scores 0.99x, 1e-5 apart
    ids = np.arange(3000, dtype=np.int32)[:, None]
    for k in (1, 10, 100):
        rows, _ = UnitVectors(ids, matrix).top(query, k, Noisy())
        assert [tuple(ids[r]) for r in rows] == reference(ids, matrix, query, k)


def test_the_first_passes_keep_their_bounds_and_the_check_can_fail():
    rng = np.random.default_rng(2)
    sample = unit(rng.normal(size=(4096, 768))).astype("<f2")
    assert all(scorer_is_within_bound(scorer, sample) for scorer in SCORERS)

    class Sloppy(NumpyScorer):
        def coarse(self, matrix, query, start, stop):
            scores, bound = super().coarse(matrix, query, start, stop)
            return scores + np.float32(1e-3), bound

    assert not scorer_is_within_bound(Sloppy(), sample)


def test_row_range_and_empty_ranges():
    ids = np.array([[2, 0], [2, 1], [5, 0], [5, 1], [5, 2]], dtype=np.int32)
    found = UnitVectors(ids, unit(np.ones((5, 4))).astype("<f2"))
    assert found.row_range(0, 5) == (2, 5) and found.row_range(0, 3) == (2, 2)
    rows, scores = found.top(np.ones(4, np.float32) / 2, 3, NumpyScorer(), rows=(2, 2))
    assert len(rows) == 0 and len(scores) == 0


def blobs(matrix: np.ndarray) -> pa.Array:
    return pa.array([row.astype("<f2").tobytes() for row in matrix], pa.binary())


def test_blob_matrix_reads_float16_blobs_and_refuses_other_sizes():
    matrix = unit(np.random.default_rng(0).normal(size=(5, 8))).astype("<f2")
    column = blobs(matrix)
    np.testing.assert_array_equal(blob_matrix(column, 8, "samples.embedding"), matrix)
    np.testing.assert_array_equal(blob_matrix(column.slice(2), 8, "x"), matrix[2:])
    with pytest.raises(VectorsError, match="samples.embedding holds a 14-byte vector"):
        blob_matrix(pa.array([b"\0" * 16, b"\0" * 14], pa.binary()), 8, "samples.embedding")


def test_cache_files_are_written_once_and_rewritten_when_they_do_not_fit(tmp_path):
    matrix = unit(np.random.default_rng(1).normal(size=(10, 8))).astype("<f2")
    ids = np.arange(10, dtype=np.int32)
    calls = []

    def batches():
        calls.append(1)
        yield ids[:6], matrix[:6]
        yield ids[6:], matrix[6:]

    first = load_vectors(tmp_path, "images", 10, 8, (1,), batches)
    assert isinstance(first.matrix, np.memmap) and np.array_equal(first.matrix, matrix)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "images.ids.npy", "images.npy"]
    again = load_vectors(tmp_path, "images", 10, 8, (1,), batches)
    assert np.array_equal(again.ids[:, 0], ids) and len(calls) == 1
    (tmp_path / "images.npy").write_bytes(b"truncated")  # a damaged file is written again
    assert np.array_equal(load_vectors(tmp_path, "images", 10, 8, (1,), batches).matrix, matrix) and len(calls) == 2
    with pytest.raises(VectorsError, match="gave 10 vectors, not the 11"):
        load_vectors(tmp_path / "other", "images", 11, 8, (1,), batches)
    assert [p.name for p in (tmp_path / "other").iterdir()] == [".lock"]  # nothing half-written is left


def test_clean_text_and_templates():
    assert clean_text(" a\tdog\x00on\r\nthe\u202ebeach  ") == "a dog on the beach"
    assert clean_text("\x00\x01") == "" and clean_text(None) == ""
    assert check_template("a {x} photo of {}") == "a {x} photo of {}"
    assert prompt("dog {}", "a photo of {}") == "a photo of dog {}"
    for bad in ("a photo", "{} {}", "{0}"):
        with pytest.raises(ValueError, match="exactly one"):
            check_template(bad)

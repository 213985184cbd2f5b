"""The writer follows the schema module: it stamps the version, refuses meta keys and values the schema does
not define, and publishes only an index that the server's start-up check accepts (else --out is untouched)."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import duckdb
import numpy as np
import pytest

from clipscope_explorer.precompute.index.check import check_index_file
from clipscope_explorer.precompute.index.rows import (
    ACTIVE_THRESHOLD,
    LayerTotals,
    examples_columns,
    feature_columns,
    images_columns,
    layer_row,
    sample_codes_columns,
    samples_columns,
    vocabulary_columns,
)
from clipscope_explorer.precompute.index.schema import META, SCHEMA_MINOR, SCHEMA_VERSION, VERSIONED_PACKAGES
from clipscope_explorer.precompute.index.store import IndexWriteError, IndexWriter

GRID, N_FEATURES, N_IMAGES = (2, 2), 3, 2
N_TOKENS = 1 + GRID[0] * GRID[1]
EDGES = np.array([0.1, 1.0, 10.0])

META_VALUES = dict(
    model={"name": "local-dir:/models/tiny", "pretrained": None},
    sae={"source": "/saes/tiny", "checkpoint": None},
    released_suite=False,
    layers=[3],
    n_tokens=N_TOKENS,
    grid=list(GRID),
    d_model=8,
    image_size=28,
    normalisation="none",
    precision="fp32",
    normalisation_stats={},
    sample={"sources": ["/images"], "n_images": N_IMAGES, "n_skipped": 0, "skipped": []},
    top_n=2,
    band_count=0,
    band_size=0,
    active_threshold=ACTIVE_THRESHOLD,
    timings={},
    demo=False,
    embeddings=None,
    zero_shot=None,
)
DIM = 4
ZERO_SHOT = {
    "template": "a photo of {}",
    "vocabulary_size": 2,
    "min_count": 1,
    "user_vocabulary": None,
    "max_labels": 3,
    "false_label_rate": 0.05,
    "n_null": 3,
}


def write_small_index(writer: IndexWriter, vectors: dict | None = None, **meta_overrides) -> None:
    """One layer of 3 features (feature 2 dead) over 2 images, each shown by feature 0 or 1. `vectors`:
    {"samples": [2, DIM], "prototypes": [3, DIM], "terms": [2, DIM]} when the index holds embeddings."""
    vectors = vectors or {}
    totals = LayerTotals(
        n_images=N_IMAGES,
        n_tokens=N_IMAGES * N_TOKENS,
        fired=4,
        nonpositive_kept=0,
        sq_error_by_position=np.full(N_TOKENS, 2.0),
        explained_variance=5.0,
        fire_tokens=np.array([3, 1, 0]),
        fire_images=np.array([2, 1, 0]),
        fire_cls=np.array([1, 0, 0]),
        activation_sum=np.array([6.0, 2.0, 0.0]),
        max_activation=np.array([3.0, 2.0, 0.0]),
        position_sum=np.zeros((N_FEATURES, N_TOKENS)),
        histogram=np.array([[1, 2], [0, 1], [0, 0]]),
        edges=EDGES,
    )
    writer.add_layer(layer_row(3, totals, d_in=8, k=2, sae_file="/saes/tiny/3_resid/10.pt", checkpoint=10))
    writer.add_rows(
        "features",
        feature_columns(
            3,
            totals,
            [["red"], ["blue"], []],
            np.zeros((3, 2), np.int32),
            np.zeros((3, 2), np.float32),
            vectors.get("prototypes"),
            [[("red", 0.3, 0.1)], [], []] if vectors else None,
        ),
    )
    writer.add_rows(
        "examples",
        examples_columns(
            3,
            {
                "feature": [1, 0, 0],
                "kind": ["top"] * 3,
                "band": [0, 0, 0],
                "rank": [1, 2, 1],
                "image_id": [1, 0, 1],
                "activation": [2.0, 2.5, 3.0],
                "cls": [0.0, 0.0, 3.0],
                "scale": [2 / 255, 2.5 / 255, 3 / 255],
                "heat": np.full((3, GRID[0] * GRID[1]), 255, np.uint8),
            },
        ),
    )
    writer.add_rows(
        "images",
        images_columns(
            0,
            [(10, "/images", "a.png", None, "red", 4, 4, b"jpeg"), (20, "/images", "b.png", None, None, 4, 4, b"jpeg")],
        ),
    )
    embeddings = vectors.get("samples")
    blobs = [None, None] if embeddings is None else [v.astype("<f2").tobytes() for v in embeddings]
    writer.add_rows(
        "samples",
        samples_columns(
            [0, 1],
            [
                (10, "/images", "a.png", None, "red", 4, 4, blobs[0]),
                (20, "/images", "b.png", None, None, 4, 4, blobs[1]),
            ],
        ),
    )
    writer.add_rows("sample_codes", sample_codes_columns(3, [0, 1], [[0, 2], [1, 0]], [[3.0, -0.5], [2.0, 1.0]]))
    if "terms" in vectors:
        writer.add_rows(
            "vocabulary", vocabulary_columns([("red", "captions", 1), ("dog", "user", 0)], vectors["terms"])
        )
        meta_overrides = {"embeddings": {"dim": DIM, "dtype": "float16"}, "zero_shot": ZERO_SHOT, **meta_overrides}
    writer.put_meta(**{**META_VALUES, **meta_overrides})


def test_the_writer_stamps_version_ids_and_software_versions(tmp_path):
    with IndexWriter(tmp_path / "index.duckdb") as writer:
        write_small_index(writer)
        path = writer.finish()
    con = duckdb.connect(str(path), read_only=True)
    meta = {key: json.loads(value) for key, value in con.execute("SELECT key, value FROM meta").fetchall()}
    assert (meta["schema_version"], meta["schema_minor"]) == (SCHEMA_VERSION, SCHEMA_MINOR)
    assert len(meta["index_id"]) == 16 and meta["created_at"].endswith("+00:00")
    assert meta["versions"] == {package: metadata.version(package) for package in VERSIONED_PACKAGES}
    assert set(meta) == set(META)  # every key the schema defines, and no other
    checked_meta, layers = check_index_file(con, str(path))
    assert checked_meta == meta and layers[3]["n_features"] == N_FEATURES
    features = con.execute(
        "SELECT feature, frequency, mean_activation, max_activation, label FROM features ORDER BY feature"
    ).fetchall()
    assert features == [(0, 3 / 10, 2.0, 3.0, "red"), (1, 1 / 10, 2.0, 2.0, "blue"), (2, 0.0, None, None, "")]
    assert con.execute("SELECT feature, rank, image_id FROM examples").fetchall() == [(0, 1, 1), (0, 2, 0), (1, 1, 1)]


@pytest.mark.parametrize(
    "items, problem",
    [
        ({"normalisation_statistics": {}}, "meta.normalisation_statistics is not in the index schema"),
        ({"grid": [16]}, "meta.grid: has 1 items, not 2"),
        ({"model": "x"}, 'meta.model: "x" is not an object'),
        ({"versions": {"clipscope_explorer": "0.1.0"}}, "meta.versions: has unknown field 'clipscope_explorer'"),
        ({"sample": {**META_VALUES["sample"], "extra": 1}}, "meta.sample: has unknown field 'extra'"),
    ],
)
def test_meta_outside_the_schema_is_refused(tmp_path, items, problem):
    with IndexWriter(tmp_path / "index.duckdb") as writer:
        with pytest.raises(ValueError) as error:
            writer.put_meta(**items)
        writer.abandon()
    assert str(error.value).startswith(problem)


def test_columns_outside_the_schema_are_refused(tmp_path):
    with IndexWriter(tmp_path / "index.duckdb") as writer:
        with pytest.raises(ValueError, match="do not match the schema"):
            writer.add_rows("images", {"image_id": [0]})
        writer.abandon()


@pytest.mark.parametrize(
    "overrides, problem",
    [
        ({"layers": [3, 4]}, "meta.layers lists layer 4, which has no row in the layers table"),
        ({"n_tokens": 7}, "meta.n_tokens is 7, not 1 + 2 x 2"),
    ],
)
def test_an_index_the_server_would_refuse_is_not_published(tmp_path, overrides, problem):
    out = tmp_path / "index.duckdb"
    out.write_bytes(b"the previous index")
    with pytest.raises(IndexWriteError) as error:
        with IndexWriter(out) as writer:
            write_small_index(writer, **overrides)
            writer.finish()
    assert problem in str(error.value) and "\n" not in str(error.value)
    assert out.read_bytes() == b"the previous index"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.duckdb"]


def test_a_missing_meta_key_is_not_published(tmp_path):
    out = tmp_path / "index.duckdb"
    with pytest.raises(IndexWriteError, match="missing meta.timings"):
        with IndexWriter(out) as writer:
            write_small_index(writer)
            writer.con.execute("DELETE FROM meta WHERE key = 'timings'")
            writer.finish()
    assert not Path(out).exists()


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_vectors_are_stored_as_little_endian_float16_and_missing_ones_as_null(tmp_path):
    rng = np.random.default_rng(0)
    prototypes = unit(rng.normal(size=(3, DIM)))
    prototypes[2] = np.nan  # the dead feature shows no image
    vectors = {
        "samples": unit(rng.normal(size=(2, DIM))),
        "prototypes": prototypes,
        "terms": unit(rng.normal(size=(2, DIM))),
    }
    with IndexWriter(tmp_path / "index.duckdb") as writer:
        write_small_index(writer, vectors)
        path = writer.finish()
    con = duckdb.connect(str(path), read_only=True)
    check_index_file(con, str(path))

    def stored(sql: str) -> list:
        return [None if b is None else np.frombuffer(b, "<f2") for (b,) in con.execute(sql).fetchall()]

    for got, expected in zip(stored("SELECT embedding FROM samples ORDER BY image_id"), vectors["samples"]):
        assert got.tobytes() == expected.astype(np.float16).tobytes()
    protos = stored("SELECT prototype FROM features ORDER BY feature")
    assert protos[2] is None and all(np.array_equal(p, e.astype(np.float16)) for p, e in zip(protos[:2], prototypes))
    terms = stored("SELECT embedding FROM vocabulary ORDER BY term")
    assert np.array_equal(terms[0], vectors["terms"][1].astype(np.float16))  # "dog" sorts first
    assert con.execute("SELECT zero_shot_terms, zero_shot_scores FROM features WHERE feature = 0").fetchone() == (
        ["red"],
        [pytest.approx(0.3)],
    )
    assert con.execute("SELECT indices, activations FROM sample_codes ORDER BY image_id").fetchall() == [
        ([0, 2], [3.0, -0.5]),
        ([1, 0], [2.0, 1.0]),
    ]


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"embeddings": None}, "samples.embedding holds 2 vectors but meta.embeddings is null"),
        ({"embeddings": {"dim": 8, "dtype": "float16"}}, "holds a vector of 8 bytes, not 16"),
        ({"zero_shot": {**ZERO_SHOT, "vocabulary_size": 3}}, "vocabulary holds 2 terms, but meta.zero_shot says 3"),
        ({"sample": {**META_VALUES["sample"], "n_images": 3}}, "samples holds 2 images, but meta.sample.n_images is 3"),
    ],
)
def test_vectors_inconsistent_with_meta_are_not_published(tmp_path, change, problem):
    rng = np.random.default_rng(1)
    vectors = {"samples": unit(rng.normal(size=(2, DIM))), "prototypes": unit(rng.normal(size=(3, DIM)))}
    vectors["terms"] = unit(rng.normal(size=(2, DIM)))
    with pytest.raises(IndexWriteError) as error:
        with IndexWriter(tmp_path / "index.duckdb") as writer:
            write_small_index(writer, vectors, **change)
            writer.finish()
    assert problem in str(error.value)

"""`/samples/{image_id}` against the index read directly with DuckDB: the CLS features are the stored codes
that fire, the examples are every example row of the image, the nearest images are a numpy brute force
over the stored embeddings; an unknown id, an index built with --no-embeddings and one of schema 1.1."""

from __future__ import annotations

import html
import shutil
from collections import defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipscope_explorer.app.main import create_app
from clipscope_explorer.app.settings import Settings
from tests.app.conftest import DUPLICATE_IMAGES, N_SAMPLE, build_index

MAX_PAGE_SIZE = 8  # a small cap, so some images' example lists are truncated
SHIFT = 3.0  # taken off every stored CLS value, so some kept values are <= 0 (kept, but not firing)
NEAREST = 12


def sql(path: Path, query: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(query).fetchall()


def serve(path: Path, folder: Path) -> TestClient:
    settings = Settings(
        index=path,
        live=False,
        text=False,
        max_page_size=MAX_PAGE_SIZE,
        upload_store=folder / "uploads",
        search_cache=folder / "search",
    )
    return TestClient(create_app(settings), follow_redirects=False)


@pytest.fixture(scope="module")
def shifted_index(index_path, tmp_path_factory) -> Path:
    """The page tests' index with SHIFT taken off every CLS value (a TopK SAE keeps its k largest values,
    positive or not; only those > 0 fire)."""
    path = Path(shutil.copy(index_path, tmp_path_factory.mktemp("samples") / "index.duckdb"))
    with duckdb.connect(str(path)) as con:
        con.execute(f"UPDATE sample_codes SET activations = list_transform(activations, lambda x: x - {SHIFT})")
    return path


@pytest.fixture(scope="module")
def client(shifted_index, tmp_path_factory):
    """The app over a copy of `shifted_index` (DuckDB refuses a second connection to one file with another
    configuration, and the tests read `shifted_index` directly)."""
    folder = tmp_path_factory.mktemp("served")
    with serve(Path(shutil.copy(shifted_index, folder / "index.duckdb")), folder) as test_client:
        assert test_client.app.state.meaning.wait(60)
        yield test_client


@pytest.fixture(scope="module")
def labels(shifted_index) -> dict[tuple[int, int], str]:
    return {
        (layer, feature): label
        for layer, feature, label in sql(shifted_index, "SELECT layer, feature, label FROM features")
    }


def test_cls_features_are_the_stored_codes_that_fire(client, shifted_index, labels):
    codes = defaultdict(dict)
    for image_id, layer, indices, values in sql(
        shifted_index, "SELECT image_id, layer, indices, activations FROM sample_codes"
    ):
        codes[image_id][layer] = (indices, values)
    kept_not_firing = 0
    for image_id in range(N_SAMPLE):
        data = client.get(f"/api/samples/{image_id}").json()
        assert [group["layer"] for group in data["cls_features"]] == sorted(codes[image_id])
        for group in data["cls_features"]:
            indices, values = codes[image_id][group["layer"]]
            firing = sorted((-v, f) for f, v in zip(indices, values) if v > 0)
            kept_not_firing += len(indices) - len(firing)
            assert [f["feature"] for f in group["features"]] == [f for _, f in firing]
            assert [f["activation"] for f in group["features"]] == pytest.approx([-v for v, _ in firing], rel=1e-6)
            for feature in group["features"]:
                assert feature["label"] == labels[(group["layer"], feature["feature"])]
                assert feature["url"] == f"/layers/{group['layer']}/features/{feature['feature']}"
    assert kept_not_firing > 0  # the filter was exercised


def test_examples_are_every_example_row_of_the_image(client, shifted_index, labels):
    rows = defaultdict(list)
    for image_id, *row in sql(
        shifted_index, "SELECT image_id, layer, feature, kind, band, rank, activation FROM examples"
    ):
        rows[image_id].append(tuple(row))
    shown = {image_id for (image_id,) in sql(shifted_index, "SELECT image_id FROM images")}
    truncated = 0
    for image_id in range(N_SAMPLE):
        data = client.get(f"/api/samples/{image_id}").json()
        expected = sorted(rows[image_id], key=lambda r: (r[0], r[3], r[4], r[1]))  # layer, band, rank, feature
        got = data["examples"]
        assert data["examples_truncated"] == (len(expected) > MAX_PAGE_SIZE)
        truncated += data["examples_truncated"]
        assert [(e["layer"], e["feature"], e["kind"], e["band"], e["rank"]) for e in got] == [
            r[:5] for r in expected[:MAX_PAGE_SIZE]
        ]
        assert [e["activation"] for e in got] == pytest.approx([r[5] for r in expected[:MAX_PAGE_SIZE]], rel=1e-6)
        for e in got:
            assert e["label"] == labels[(e["layer"], e["feature"])]
            assert e["url"] == f"/layers/{e['layer']}/features/{e['feature']}"
            assert e["example_url"] == f"{e['url']}/examples/{image_id}"
            assert client.get(e["example_url"]).status_code == 200
        index_id = client.app.state.index.index_id
        assert data["thumbnail_url"] == (f"/images/{index_id}/{image_id}.jpg" if image_id in shown else None)
    assert 0 < truncated < len(rows)  # both kinds of list occur


def test_the_sample_row_is_the_stored_one(client, shifted_index):
    for image_id, key, caption, url, width, height in sql(
        shifted_index, "SELECT image_id, key, caption, url, width, height FROM samples WHERE image_id % 9 = 0"
    ):
        data = client.get(f"/api/samples/{image_id}").json()
        assert (data["key"], data["caption"], data["url"], data["width"], data["height"]) == (
            key,
            caption,
            url,
            width,
            height,
        )
        assert data["source"] in ("shards/00000.tar", "shards/00001.tar")


@pytest.mark.parametrize("image_id", [0, 7, 33, 70, 71, 90, 119])
def test_nearest_images_equal_a_brute_force(client, shifted_index, image_id):
    rows = sql(shifted_index, "SELECT image_id, embedding, key, caption FROM samples")
    ids = np.array([row[0] for row in rows])
    vectors = np.stack([np.frombuffer(row[1], dtype="<f2") for row in rows]).astype(np.float64)
    scores = vectors @ vectors[ids == image_id][0]
    order = [i for i in np.lexsort((ids, -scores)) if ids[i] != image_id][:NEAREST]
    data = client.get(f"/api/samples/{image_id}").json()
    nearest = data["nearest_images"]
    assert data["message"] is None
    assert [image["image_id"] for image in nearest] == ids[order].tolist()
    np.testing.assert_allclose([image["score"] for image in nearest], scores[order], rtol=0, atol=2e-6)
    for image, i in zip(nearest, order):
        assert (image["key"], image["caption"]) == (rows[i][2], rows[i][3])
        assert image["page_url"] == f"/samples/{image['image_id']}"


def test_duplicates_are_nearest_with_ties_by_id(client):
    twins = defaultdict(set)
    for image, same in DUPLICATE_IMAGES.items():
        twins[same] |= {image, same}
    for group in twins.values():
        for image_id in group:
            nearest = client.get(f"/api/samples/{image_id}").json()["nearest_images"]
            others = sorted(group - {image_id})
            assert [image["image_id"] for image in nearest[: len(others)]] == others
            assert len({image["score"] for image in nearest[: len(others)]}) == 1


def test_the_page_links_everything_it_lists(client):
    image_id = client.app.state.index.examples(20, 8, heatmaps=False)[0]["image_id"]
    text = client.get(f"/samples/{image_id}").text
    data = client.get(f"/api/samples/{image_id}").json()
    assert data["nearest_images"] and data["examples"] and data["cls_features"]
    for url in [data["nearest_images"][0]["page_url"], data["examples"][0]["example_url"]]:
        assert f'href="{url}"' in text
    assert f'href="{data["cls_features"][0]["features"][0]["url"]}"' in text
    assert f'<link rel="alternate" type="application/json" href="/api/samples/{image_id}">' in text


def test_an_example_links_to_its_image_page(client, shifted_index):
    layer, feature, image_id = sql(shifted_index, "SELECT layer, feature, image_id FROM examples LIMIT 1")[0]
    url = f"/layers/{layer}/features/{feature}/examples/{image_id}"
    assert client.get(f"/api{url}").json()["sample_url"] == f"/samples/{image_id}"
    assert f'href="/samples/{image_id}"' in client.get(url).text


@pytest.mark.parametrize("path", [f"/samples/{N_SAMPLE}", "/samples/-1", "/samples/x", "/samples/99999999999"])
def test_an_unknown_image_is_a_404(client, path):
    data = client.get(f"/api{path}")
    assert data.status_code == 404 and data.headers["content-type"] == "application/json"
    page = client.get(path)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    if path == f"/samples/{N_SAMPLE}":
        detail = data.json()["detail"]
        assert detail == f"This index has no sample image {N_SAMPLE}. Its sample images are numbered 0 to 119."
        assert html.escape(detail) in page.text


def test_without_embeddings_a_sample_page_says_why_it_has_no_neighbours(tmp_path):
    path = build_index(tmp_path / "plain.duckdb", embeddings=False)
    with serve(path, tmp_path) as plain:
        assert plain.app.state.meaning.wait(60)
        image_id = plain.app.state.index.examples(20, 8, heatmaps=False)[0]["image_id"]
        data = plain.get(f"/api/samples/{image_id}").json()
        assert data["nearest_images"] == [] and "--no-embeddings" in data["message"]
        assert data["cls_features"] and data["examples"]
        assert html.escape(data["message"], quote=False) in plain.get(f"/samples/{image_id}").text


def as_schema_1_1(good: Path, path: Path) -> Path:
    """`good` as an index of schema 1.1 would hold it: without what 1.2 added, images numbered densely."""
    shutil.copy(good, path)
    with duckdb.connect(str(path)) as con:
        for statement in [
            "DROP TABLE samples",
            "DROP TABLE sample_codes",
            "DROP TABLE vocabulary",
            *(
                f"ALTER TABLE features DROP COLUMN {column}"
                for column in ("prototype", "zero_shot_terms", "zero_shot_scores", "zero_shot_margins")
            ),
            "DELETE FROM meta WHERE key IN ('embeddings', 'zero_shot')",
            "UPDATE meta SET value = '1' WHERE key = 'schema_minor'",
            "CREATE TEMP TABLE renumber AS SELECT image_id AS old, "
            "(row_number() OVER (ORDER BY image_id) - 1)::INTEGER AS new FROM images",
            "UPDATE examples SET image_id = renumber.new FROM renumber WHERE examples.image_id = renumber.old",
            "UPDATE images SET image_id = renumber.new FROM renumber WHERE images.image_id = renumber.old",
        ]:
            con.execute(statement)
    return path


def test_an_index_of_schema_1_1_explains_that_it_has_no_sample_pages(index_path, tmp_path):
    path = as_schema_1_1(index_path, tmp_path / "old.duckdb")
    with serve(path, tmp_path) as old:
        assert old.app.state.meaning.wait(60)
        data = old.get("/api/samples/0")
        assert data.status_code == 404 and "schema version 1.2" in data.json()["detail"]
        assert old.get("/samples/0").status_code == 404
        feature = old.get("/api/layers/20/features/8").json()
        assert feature["zero_shot_labels"] == []
        example = old.get(f"/api/layers/20/features/8/examples/{feature['top_images'][0]['image_id']}").json()
        assert example["sample_url"] is None
        search = old.get("/api/search", params={"q": "cat", "by": "words"}).json()
        assert search["label_results"] and all(not row["zero_shot_terms"] for row in search["label_results"])

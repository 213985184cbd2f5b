"""Every page and its JSON twin against an index built by the real precompute job (tiny fixtures)."""

from __future__ import annotations

import html

import pytest
from fastapi.testclient import TestClient

from tests.app.test_pages import CHECKS, _kind, twin_of


@pytest.fixture(scope="module")
def real_client(tiny_index, tmp_path_factory):
    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    settings = Settings(index=tiny_index, live=False, upload_store=tmp_path_factory.mktemp("uploads_real"))
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert client.app.state.meaning.wait(60)  # loaded in the background: a page and its twin see one state
        yield client


def real_pages(client) -> list[str]:
    """Pages chosen from what the index holds: every layer, busy, quiet and dead features, examples, search."""
    pages = ["/", "/layers", "/search", "/search?q=zzzz", "/search/images"]
    for layer in [entry["layer"] for entry in client.get("/api/layers").json()["layers"]]:
        busiest = client.get(f"/api/layers/{layer}?sort=frequency&order=desc&page_size=5").json()
        quietest = client.get(f"/api/layers/{layer}?sort=frequency&order=asc&min_freq=0&page_size=1").json()
        pages += [f"/layers/{layer}", f"/layers/{layer}?sort=max_activation&order=desc&page=2&page_size=10"]
        for row in busiest["features"][:2] + quietest["features"]:
            pages.append(row["url"])
        feature = client.get("/api" + busiest["features"][0]["url"]).json()
        pages.append(feature["top_images"][0]["page_url"])
        pages.append(client.get("/api" + feature["top_images"][0]["page_url"]).json()["sample_url"])
        if busiest["density"]["dead"]:
            dead = client.get(f"/api/layers/{layer}?sort=frequency&order=asc&page_size=1").json()["features"][0]
            pages.append(dead["url"])
        labelled = next((f for f in busiest["features"] if f["label_terms"]), None)
        if labelled:
            pages.append(f"/search?q={labelled['label_terms'][0]}&layer={layer}")
    return pages


def test_every_page_of_a_real_index_and_its_twin(real_client):
    pages = real_pages(real_client)
    assert {_kind(url) for url in pages} == set(CHECKS)
    for url in pages:
        page = real_client.get(url)
        assert page.status_code == 200, url
        twin = twin_of(url)
        assert f'<link rel="alternate" type="application/json" href="{html.escape(twin)}">' in page.text, url
        data = real_client.get(twin)
        assert data.status_code == 200, twin
        CHECKS[_kind(url)](page.text, data.json())


def test_feature_json_matches_the_index_rows(real_client, tiny_index, tmp_path):
    import shutil

    import duckdb
    import numpy as np

    copy = shutil.copy(tiny_index, tmp_path / "copy.duckdb")  # the app holds the file open with its own settings
    con = duckdb.connect(str(copy), read_only=True)
    layer, feature = con.execute("SELECT layer, feature FROM features ORDER BY n_fired_images DESC LIMIT 1").fetchone()
    rows = con.execute(
        "SELECT e.rank, i.key, e.activation, e.heatmap_scale, e.heatmap FROM examples e JOIN images i "
        "USING (image_id) WHERE layer = ? AND feature = ? AND kind = 'top' ORDER BY rank",
        [layer, feature],
    ).fetchall()
    frequency = con.execute(
        "SELECT frequency FROM features WHERE layer = ? AND feature = ?", [layer, feature]
    ).fetchone()[0]
    con.close()
    data = real_client.get(f"/api/layers/{layer}/features/{feature}").json()
    assert data["frequency"] == pytest.approx(frequency)
    assert [(e["rank"], e["key"]) for e in data["top_images"]] == [(r[0], r[1]) for r in rows]
    for example, row in zip(data["top_images"], rows):
        assert example["activation"] == pytest.approx(row[2], rel=1e-6)
        expected = np.frombuffer(row[4], np.uint8) * row[3]
        np.testing.assert_allclose(example["heatmap"], expected, rtol=1e-5, atol=1e-6)

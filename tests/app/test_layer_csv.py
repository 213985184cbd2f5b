"""Per-page downloads: the layer table as CSV (`?format=csv`: every feature the page's filters select, in its
order) and the feature page's "Download JSON" link to its JSON twin."""

from __future__ import annotations

import csv
import html
import io
import re

import pytest

from clipscope_explorer.app.pages import layers
from tests.app.conftest import DEAD, N_FEATURES

FILTERS = [
    {},
    {"sort": "frequency", "order": "desc"},
    {"sort": "max_activation", "order": "asc", "min_freq": "0"},
    {"sort": "image_frequency", "order": "desc", "min_freq": "0.01", "max_freq": "0.05"},
    {"q": "dog"},
]


def _csv(response) -> list[dict]:
    return list(csv.DictReader(io.StringIO(response.text)))


def _as_json(value: str, like):
    """A CSV field read back as the JSON value it stands for (empty: null, or an empty text)."""
    if isinstance(like, str):
        return value
    if value == "":
        return None
    return type(like)(value) if like is not None else float(value)


@pytest.mark.parametrize("filters", FILTERS)
@pytest.mark.parametrize("prefix", ["", "/api"])
def test_the_csv_lists_every_feature_the_filters_select_in_the_pages_order(client, filters, prefix):
    response = client.get(f"{prefix}/layers/20", params={**filters, "format": "csv", "page": 2, "page_size": 5})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="layer-20-features.csv"'
    assert response.text.splitlines()[0] == ",".join(layers.CSV_COLUMNS)
    rows = _csv(response)
    page = client.get("/api/layers/20", params={**filters, "page_size": 200}).json()  # all of them, one page
    assert len(rows) == page["paging"]["total"] == len(page["features"])
    for row, feature in zip(rows, page["features"]):
        assert {name: _as_json(row[name], feature[name]) for name in layers.CSV_COLUMNS} == {
            name: feature[name] for name in layers.CSV_COLUMNS
        }
    if not filters:
        assert [int(r["feature"]) for r in rows] == list(range(N_FEATURES))
        assert {int(r["feature"]) for r in rows if r["max_activation"] == ""} == DEAD


def test_the_csv_streams_in_chunks_with_the_same_result(client, monkeypatch):
    whole = client.get("/layers/11", params={"format": "csv", "sort": "frequency", "order": "desc"}).text
    monkeypatch.setattr(layers, "CSV_CHUNK", 7)
    assert client.get("/layers/11", params={"format": "csv", "sort": "frequency", "order": "desc"}).text == whole


def test_the_layer_pages_json_links_its_csv(client):
    page = client.get("/api/layers/20", params={"sort": "frequency", "order": "desc", "q": "dog", "page": 2}).json()
    assert page["csv"] == "/layers/20?sort=frequency&order=desc&q=dog&format=csv"
    assert _csv(client.get(page["csv"])) == _csv(client.get("/api" + page["csv"]))


def test_without_format_csv_the_page_and_its_twin_answer_as_before(client):
    for params in ({}, {"format": "json"}, {"format": ""}):
        assert client.get("/layers/20", params=params).headers["content-type"].startswith("text/html")
        assert client.get("/api/layers/20", params=params).headers["content-type"] == "application/json"


def test_bad_filters_and_unknown_layers_are_refused(client):
    bad = client.get("/api/layers/20", params={"format": "csv", "sort": "label; DROP TABLE features"})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/json"
    assert client.get("/layers/20", params={"format": "csv", "min_freq": "2"}).status_code == 422
    missing = client.get("/layers/99", params={"format": "csv"})
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert client.get("/api/layers/99", params={"format": "csv"}).status_code == 404


def test_head_of_the_csv_has_the_get_headers(client):
    get, head = (client.request(m, "/layers/20?format=csv") for m in ("GET", "HEAD"))
    assert head.status_code == 200 and head.content == b""
    for name in ("content-type", "content-disposition"):
        assert head.headers[name] == get.headers[name]


def test_the_feature_page_offers_its_json_as_a_download(client):
    text = client.get("/layers/20/features/8").text
    [link] = re.findall(r'<a [^>]*download="[^"]*"[^>]*>Download JSON</a>', text)
    href = html.unescape(re.search(r'href="([^"]+)"', link).group(1))
    assert href == "/api/layers/20/features/8" and 'download="layer-20-feature-8.json"' in link
    assert 'hx-boost="false"' in link  # a download, not a page htmx would swap in
    response = client.get(href)
    assert response.headers["content-type"] == "application/json"
    assert response.json()["feature"] == 8 and response.json()["top_images"][0]["heatmap"]

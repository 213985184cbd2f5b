"""Lineage where it shows (issue 16): a feature's links and their page, the strip the feature page loads
lazily, the concept view, and search results linking to it. Indexes: the page tests' index given its
lineage by the real `lineage` step, and the same index without the table (an older one)."""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipscope_explorer.app.main import create_app
from clipscope_explorer.app.pages.features import FeaturePage
from clipscope_explorer.app.pages.lineage import concept_chain
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.app.templating import sig
from clipscope_explorer.app.urls import Urls
from clipscope_explorer.precompute.evaluate.lineage_run import LineageOptions, lineage
from tests.app.conftest import N_FEATURES
from tests.app.test_weight import BUDGET, _assets, full_size, render_feature

FEATURE = 8
HTMX = {"HX-Request": "true", "HX-Target": "lineage"}


@pytest.fixture(scope="module")
def lineage_index(index_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lineage_pages")
    source = Path(shutil.copy(index_path, folder / "source.duckdb"))
    return lineage(LineageOptions(index=source, out=folder / "lineage.duckdb", progress=False))


@pytest.fixture(scope="module")
def table(lineage_index) -> dict:
    """The `lineage` rows by (layer, feature), each feature's label and first top image, read with DuckDB."""
    with duckdb.connect(str(lineage_index), read_only=True) as con:
        links: dict[tuple[int, int], list[dict]] = {}
        cursor = con.execute("SELECT * FROM lineage")
        names = [d[0] for d in cursor.description]
        for row in cursor.fetchall():
            row = dict(zip(names, row))
            links.setdefault((row["layer"], row["feature"]), []).append(row)
        query = "SELECT layer, feature, label FROM features"
        labels = {(layer, feature): label for layer, feature, label in con.execute(query).fetchall()}
        query = "SELECT layer, feature, image_id FROM examples WHERE kind = 'top' AND rank = 1"
        firsts = {(layer, feature): image for layer, feature, image in con.execute(query).fetchall()}
    return {"links": links, "labels": labels, "firsts": firsts}


@contextmanager
def _serve(path: Path, folder: Path) -> Iterator[TestClient]:
    settings = Settings(index=path, live=False, text=False, upload_store=folder / "up", search_cache=folder / "sc")
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client


@pytest.fixture(scope="module")
def served(lineage_index, table, tmp_path_factory):
    with _serve(lineage_index, tmp_path_factory.mktemp("served")) as client:
        yield client


def expected_links(table, layer: int, feature: int) -> list[dict]:
    rows = sorted(
        table["links"].get((layer, feature), []),
        key=lambda r: (r["other_layer"], -r["score"], r["source"], r["other_feature"]),
    )
    return [
        {
            "layer": r["other_layer"],
            "feature": r["other_feature"],
            "score": r["score"],
            "support": r["support"],
            "source": r["source"],
            "label": table["labels"][r["other_layer"], r["other_feature"]],
            "image_id": table["firsts"].get((r["other_layer"], r["other_feature"])),
            "url": f"/layers/{r['other_layer']}/features/{r['other_feature']}",
        }
        for r in rows
    ]


@pytest.mark.parametrize("layer, feature", [(20, FEATURE), (11, FEATURE), (20, 0), (11, N_FEATURES - 1)])
def test_lineage_json_and_page_equal_the_table(served, table, layer, feature):
    data = served.get(f"/api/layers/{layer}/features/{feature}/lineage").json()
    links = expected_links(table, layer, feature)
    assert data["links"] == links and (data["layer"], data["feature"]) == (layer, feature)
    assert data["concept_url"] == f"/concepts?layer={layer}&feature={feature}"
    page = served.get(f"/layers/{layer}/features/{feature}/lineage").text
    for link in links:
        row = f'<a href="{link["url"]}">{link["layer"]}/{link["feature"]}</a>'
        assert row in page and f'<td class="num">{sig(link["score"], 3)}</td>' in page
    assert html.escape(data["concept_url"]) in page


def test_some_features_have_links_of_both_sources(table):
    sources = {r["source"] for rows in table["links"].values() for r in rows}
    assert sources == {"cls", "top_images"}


def test_the_feature_page_loads_the_strip_of_best_matches(served, table):
    data = served.get(f"/api/layers/20/features/{FEATURE}").json()
    url = f"/layers/20/features/{FEATURE}/lineage"
    assert data["links"]["lineage"] == url
    page = served.get(f"/layers/20/features/{FEATURE}").text
    assert f'hx-get="{url}" hx-trigger="toggle once" hx-target="#lineage"' in page
    strip = served.get(url, headers=HTMX)
    assert strip.status_code == 200 and "<html" not in strip.text
    best = {}
    for link in expected_links(table, 20, FEATURE):
        best.setdefault(link["layer"], link)
    shown = re.findall(r'<a href="([^"]+)" class="similar-link"', strip.text)
    assert shown == [link["url"] for link in best.values()] and shown
    for link in best.values():
        assert f'<span class="cos">{sig(link["score"], 3)}</span>' in strip.text
    assert html.escape(f"/concepts?layer=20&feature={FEATURE}") in strip.text


def test_the_full_size_feature_page_with_its_strip_fits_the_budget(served):
    page = FeaturePage.model_validate(served.get(f"/api/layers/20/features/{FEATURE}").json())
    links = page.links.model_copy(update={"lineage": "/layers/20/features/65535/lineage"})
    rendered = render_feature(served.app.state.templates, full_size(page, links=links), "0" * 16)
    assert 'hx-target="#lineage"' in rendered
    assert len(rendered.encode()) + _assets(rendered) <= BUDGET


def test_the_concept_view_follows_the_best_link(served, table):
    for layer, other in ((20, 11), (11, 20)):
        data = served.get(f"/api/concepts?layer={layer}&feature={FEATURE}").json()
        assert [s["layer"] for s in data["steps"]] == [11, 20]
        here = next(s for s in data["steps"] if s["layer"] == layer)
        assert (here["feature"], here["score"], here["source"]) == (FEATURE, None, None)
        best = expected_links(table, layer, FEATURE)[0]
        step = next(s for s in data["steps"] if s["layer"] == other)
        assert (step["feature"], step["score"], step["support"], step["source"]) == (
            best["feature"],
            best["score"],
            best["support"],
            best["source"],
        )
        assert step["label"] == best["label"] and step["url"] == best["url"]
        page = served.get(f"/concepts?layer={layer}&feature={FEATURE}").text
        assert f'<a href="{best["url"]}">{other}/{best["feature"]}</a>' in page
    assert served.get("/api/concepts?layer=20&feature=99999").status_code == 404
    assert served.get("/api/concepts?layer=3&feature=1").status_code == 404
    assert served.get("/api/concepts?layer=20").status_code == 422


def test_search_results_link_to_the_concept_view(served):
    data = served.get("/api/search?q=cat&by=words").json()
    results = data["label_results"] + data["caption_results"]
    assert results
    page = served.get("/search?q=cat&by=words").text
    for result in results:
        assert result["concept_url"] == f"/concepts?layer={result['layer']}&feature={result['feature']}"
        assert html.escape(result["concept_url"]) in page


class _StubIndex:
    """Four layers whose best links are given; the chain must hop from the feature it reached."""

    layers = {2: {}, 5: {}, 8: {}, 11: {}}

    def __init__(self, best: dict):
        self.best = best

    def best_lineage_link(self, layer, feature, other_layer):
        found = self.best.get((layer, feature, other_layer))
        return None if found is None else {"other_feature": found, "score": 0.5, "support": 9, "source": "cls"}

    def summaries(self, layer, features):
        return {f: {"label": f"L{layer}F{f}"} for f in features}

    def first_top_images(self, layer):
        return np.full(100, -1)


def test_the_chain_hops_outward_and_goes_past_a_gap():
    best = {(5, 1, 8): 2, (8, 2, 11): 3, (5, 1, 2): 4, (5, 1, 11): 99, (8, 7, 11): 98}
    steps = concept_chain(_StubIndex(best), Urls(""), 5, 1)
    assert [(s.layer, s.feature) for s in steps] == [(2, 4), (5, 1), (8, 2), (11, 3)]
    gap = {(5, 1, 8): None, (5, 1, 11): 6}  # no link at 8: the chain goes on from 5
    steps = concept_chain(_StubIndex({k: v for k, v in gap.items() if v is not None}), Urls(""), 5, 1)
    assert [(s.layer, s.feature) for s in steps] == [(2, None), (5, 1), (8, None), (11, 6)]
    assert steps[3].label == "L11F6" and steps[3].url == "/layers/11/features/6" and steps[0].url is None


@pytest.mark.parametrize("older", [True, False], ids=["without the table", "never computed"])
def test_an_index_without_lineage(index_path, tmp_path, older):
    path = Path(shutil.copy(index_path, tmp_path / "index.duckdb"))
    if older:  # as an index of schema 1.3 holds it
        with duckdb.connect(str(path)) as con:
            con.execute("DROP TABLE lineage")
            con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_minor'")
    with _serve(path, tmp_path) as client:
        assert client.get(f"/api/layers/20/features/{FEATURE}/lineage").json()["links"] == []
        assert "No related feature" in client.get(f"/layers/20/features/{FEATURE}/lineage").text
        assert client.get(f"/api/layers/20/features/{FEATURE}").json()["links"]["lineage"] is None
        assert 'hx-target="#lineage"' not in client.get(f"/layers/20/features/{FEATURE}").text
        steps = client.get(f"/api/concepts?layer=20&feature={FEATURE}").json()["steps"]
        assert [(s["layer"], s["feature"]) for s in steps] == [(11, None), (20, FEATURE)]
        results = client.get("/api/search?q=cat&by=words").json()["label_results"]
        assert results and all(r["concept_url"] is None for r in results)

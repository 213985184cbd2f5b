"""Occlusion faithfulness where it shows (issue 15): per feature its means and each example's bars (loaded on
demand), per layer a summary, the distributions, and the table's column, sort and filter. Indexes: the tiny index
evaluated by the real `evaluate --faithfulness`; the page tests' index (whose model cannot load offline) with rows
added through the real updater; that index with the tables empty, and without them (an older index)."""

from __future__ import annotations

import csv
import html
import io
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
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.app.sort_eval import FeatureSortEval
from clipscope_explorer.app.templating import percent, sig
from clipscope_explorer.app.urls import Urls
from clipscope_explorer.precompute.evaluate.faithfulness import TABLES, FaithfulnessOptions, run_faithfulness
from clipscope_explorer.precompute.index.store import IndexUpdater
from tests.app.conftest import DEAD, N_FEATURES
from tests.app.test_weight import BUDGET, _assets, full_size, render_feature

API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"
LAYER = 20
# Scores of the page index's evaluated features of layer 20: ties, both ends of the histogram and past them.
SCORES = [0.5, 0.5, -0.2, 0.9, 0.0, 1.0, -1.5, 0.35, 0.1, 0.62, 0.5, -0.05]


def _added(path: Path, out: Path) -> Path:
    """`path` with faithfulness rows for some live features of layer 20 (their top examples of rank 1 and 2),
    written by the real updater; activations drawn so that an occlusion can also raise one."""
    with duckdb.connect() as con:  # attached: the page tests' apps hold this file open with other settings
        con.execute(f"ATTACH '{path}' AS page_index (READ_ONLY)")
        tops = con.execute(
            "SELECT feature, rank, image_id FROM page_index.examples WHERE layer = ? AND kind = 'top' AND rank <= 2 "
            "ORDER BY feature, rank",
            [LAYER],
        ).fetchall()
    features = sorted({f for f, _, _ in tops} - DEAD)[: len(SCORES)]
    rng = np.random.default_rng(0)
    examples = [(f, rank, image) for f, rank, image in tops if f in features]
    before = rng.uniform(1, 5, len(examples))
    columns = {
        "layer": [LAYER] * len(examples),
        "feature": [f for f, _, _ in examples],
        "rank": [rank for _, rank, _ in examples],
        "image_id": [image for _, _, image in examples],
        "n_hot": rng.integers(1, 40, len(examples)).tolist(),
        "before": before.tolist(),
        "hot": (before * rng.uniform(0, 1.3, len(examples))).tolist(),
        "random": (before * rng.uniform(0.5, 1.1, len(examples))).tolist(),
        "insertion": (before * rng.uniform(0, 1, len(examples))).tolist(),
    }
    hot = rng.uniform(-0.5, 1, len(features))
    with IndexUpdater(path, out, TABLES) as writer:
        writer.add_rows("faithfulness_examples", columns)
        writer.add_rows(
            "faithfulness",
            {
                "layer": [LAYER] * len(features),
                "feature": features,
                "examples": [2] * len(features),
                "hot_drop": hot.tolist(),
                "random_drop": (hot - SCORES).tolist(),
                "kept": rng.uniform(0, 1, len(features)).tolist(),
                "score": SCORES,
            },
        )
        return writer.finish()


def _emptied(path: Path, out: Path) -> Path:
    shutil.copy(path, out)
    with duckdb.connect(str(out)) as con:
        for table in TABLES:
            con.execute(f"DELETE FROM {table}")
    return out


def _older(path: Path, out: Path) -> Path:
    """`path` as an index of schema 1.3 holds it: without the faithfulness tables."""
    shutil.copy(path, out)
    with duckdb.connect(str(out)) as con:
        for table in TABLES:
            con.execute(f"DROP TABLE IF EXISTS {table}")
    return out


@pytest.fixture(scope="module")
def indexes(index_path, tiny_index, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faithfulness_pages")
    options = FaithfulnessOptions(
        index=tiny_index, out=folder / "tiny.duckdb", top=2, draws=2, sample=8, device="cpu", progress=False
    )
    added = _added(index_path, folder / "added.duckdb")
    return {
        "tiny": run_faithfulness(options),
        "added": added,
        "empty": _emptied(added, folder / "empty.duckdb"),
        "older": _older(index_path, folder / "older.duckdb"),
    }


def _read(path: Path) -> dict[str, list[dict]]:
    """The two tables and the image ids the index holds, read with DuckDB before any server opens the file."""
    with duckdb.connect(str(path), read_only=True) as con:
        tables = {}
        for table, columns in [*((table, "*") for table in TABLES), ("images", "image_id")]:
            cursor = con.execute(f"SELECT {columns} FROM {table}")
            names = [d[0] for d in cursor.description]
            tables[table] = [dict(zip(names, row)) for row in cursor.fetchall()]
    return tables


@contextmanager
def _serve(path: Path, folder: Path) -> Iterator[TestClient]:
    settings = Settings(
        index=path, live=False, text=False, upload_store=folder / "up", search_cache=folder / "sc", max_page_size=5000
    )
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert client.app.state.meaning.wait(60)
        yield client


@pytest.fixture(scope="module")
def tables(indexes) -> dict[str, dict[str, list[dict]]]:
    """Each evaluated index's tables, read before a server opens it."""
    return {kind: _read(indexes[kind]) for kind in ("tiny", "added")}


@pytest.fixture(scope="module", params=["tiny", "added"])
def served(request, indexes, tables, tmp_path_factory):
    with _serve(indexes[request.param], tmp_path_factory.mktemp("served")) as client:
        yield client, tables[request.param]


def _expected_feature(rows, urls: Urls, layer: int, feature: int) -> dict | None:
    own = [r for r in rows["faithfulness"] if (r["layer"], r["feature"]) == (layer, feature)]
    if not own:
        return None
    shown = {r["image_id"] for r in rows["images"]}
    examples = sorted(
        (r for r in rows["faithfulness_examples"] if (r["layer"], r["feature"]) == (layer, feature)),
        key=lambda r: r["rank"],
    )
    keys = ("rank", "image_id", "n_hot", "before", "hot", "random", "insertion")
    return {
        **{key: own[0][key] for key in ("examples", "hot_drop", "random_drop", "kept", "score")},
        "per_example": [
            {
                **{key: r[key] for key in keys},
                "thumbnail_url": urls.thumbnail(r["image_id"]) if r["image_id"] in shown else None,
                "page_url": urls.example(layer, feature, r["image_id"]),
            }
            for r in examples
        ],
    }


def test_feature_json_equals_the_tables(served):
    client, rows = served
    urls = Urls(client.app.state.index.index_id)
    evaluated = {(r["layer"], r["feature"]) for r in rows["faithfulness"]}
    assert evaluated and all(r["examples"] > 0 for r in rows["faithfulness"])
    layers = sorted({layer for layer, _ in evaluated})
    others = [(layer, f) for layer in layers for f in range(4) if (layer, f) not in evaluated][:2]
    for layer, feature in sorted(evaluated) + others:
        data = client.get(f"/api/layers/{layer}/features/{feature}").json()["faithfulness"]
        assert data == _expected_feature(rows, urls, layer, feature), (layer, feature)
        assert (data is None) == ((layer, feature) not in evaluated)


def _scores(rows, layer: int, n_features: int) -> dict[int, float | None]:
    scores = {r["feature"]: r["score"] for r in rows["faithfulness"] if r["layer"] == layer}
    return {f: scores.get(f) for f in range(n_features)}


def test_layer_summary_and_distributions(served):
    client, rows = served
    for item in client.get("/api/layers").json()["layers"]:
        layer = item["layer"]
        data = client.get(f"/api/layers/{layer}").json()["faithfulness"]
        mine = [r for r in rows["faithfulness"] if r["layer"] == layer]
        if not mine:
            assert data is None
            continue
        assert data["features"] == len(mine)
        for key in ("score", "hot_drop", "random_drop"):
            assert data[f"mean_{key}"] == pytest.approx(sum(r[key] for r in mine) / len(mine), rel=1e-12)
            edges = data["histogram"]["edges"]
            expected = [0] * (len(edges) - 1)
            for r in mine:
                value = min(max(r[key], edges[0]), edges[-1])
                bin_ = next((i for i in range(len(edges) - 1) if edges[i] <= value < edges[i + 1]), len(edges) - 2)
                expected[bin_] += 1
            assert data["histogram"][key] == expected, key
        assert data["histogram"]["edges"][0] == -1 and data["histogram"]["edges"][-1] == 1


def _expected_summary(rows, layer: int) -> dict | None:
    mine = [r for r in rows["faithfulness"] if r["layer"] == layer]
    if not mine:
        return None
    means = {f"mean_{key}": sum(r[key] for r in mine) / len(mine) for key in ("score", "hot_drop", "random_drop")}
    return {"features": len(mine), **means}


def test_layer_list_carries_the_summary(served):
    client, rows = served
    items = client.get("/api/layers").json()["layers"]
    assert [item["layer"] for item in items] == sorted(client.app.state.index.layers)
    for item in items:
        expected = _expected_summary(rows, item["layer"])
        data = item["faithfulness"]
        if expected is None:
            assert data is None, item["layer"]
            continue
        assert data == pytest.approx(expected, rel=1e-12) and list(data) == list(expected)
        page = client.get(f"/api/layers/{item['layer']}").json()["faithfulness"]
        assert {key: page[key] for key in data} == data
    assert client.get("/api").json()["layers"] == items
    assert any(item["faithfulness"] for item in items)


def test_overview_shows_the_faithfulness_column(served):
    client, rows = served
    items = client.get("/api/layers").json()["layers"]
    text = html.unescape(client.get("/").text)
    assert "<h2>Faithfulness by layer</h2>" in text and '<th scope="col">Faithfulness</th>' in text
    table = text.split("<h2>Faithfulness by layer</h2>")[1].split("</table>")[0]
    for item in items:
        row = table.split(f'<th scope="row"><a href="{item["url"]}">{item["layer"]}</a></th>')[1].split("</tr>")[0]
        data = item["faithfulness"]
        if data is None:
            assert row.count("<td>—</td>") == 3, item["layer"]
            continue
        n = data["features"]
        assert f'title="mean over {n} evaluated feature{"s" if n != 1 else ""}"' in row
        assert f'<a href="{item["url"]}">{sig(data["mean_score"], 3)}</a>' in row
        assert f"<td>{sig(data['mean_hot_drop'], 3)}</td><td>{sig(data['mean_random_drop'], 3)}</td>" in row


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_layer_table_sorts_by_faithfulness(served, order):
    client, rows = served
    for layer in sorted({r["layer"] for r in rows["faithfulness"]}):
        data = client.get(
            f"/api/layers/{layer}", params={"sort": "faithfulness", "order": order, "page_size": 100_000}
        ).json()
        scores = _scores(rows, layer, data["n_features"])
        sign = 1 if order == "asc" else -1
        expected = sorted(scores, key=lambda f: (scores[f] is None, sign * (scores[f] or 0), f))
        assert [(r["feature"], r["faithfulness"]) for r in data["features"]] == [(f, scores[f]) for f in expected]
        assert any(s is None for s in scores.values())


def test_min_faithfulness_filter_pages_and_csv(served):
    client, rows = served
    layer = sorted({r["layer"] for r in rows["faithfulness"]})[-1]
    n_features = client.get(f"/api/layers/{layer}").json()["n_features"]
    scores = _scores(rows, layer, n_features)
    known = sorted(s for s in scores.values() if s is not None)
    threshold = known[len(known) // 2]
    params = {"min_faithfulness": repr(threshold), "sort": "frequency", "order": "desc", "page_size": 2}
    data = client.get(f"/api/layers/{layer}", params=params).json()
    kept = sorted(f for f, s in scores.items() if s is not None and s >= threshold)
    assert data["filters"]["min_faithfulness"] == threshold and data["paging"]["total"] == len(kept) > 2
    assert f"min_faithfulness={threshold!r}" in data["paging"]["next"]
    assert f"min_faithfulness={threshold!r}" in data["csv"]
    listed = client.get(f"/api/layers/{layer}", params={**params, "page_size": 100_000}).json()["features"]
    assert sorted(r["feature"] for r in listed) == kept
    frequencies = [r["frequency"] for r in listed]
    assert frequencies == sorted(frequencies, reverse=True)
    table = list(csv.DictReader(io.StringIO(client.get(data["csv"]).text)))
    assert [(int(r["feature"]), float(r["faithfulness"])) for r in table] == [
        (r["feature"], r["faithfulness"]) for r in listed
    ]
    for bad in ("nan", "inf", "-inf", "1e9", "high"):
        assert client.get(f"/api/layers/{layer}", params={"min_faithfulness": bad}).status_code == 422, bad
    assert client.get(f"/api/layers/{layer}", params={"min_faithfulness": ""}).json()["paging"]["total"] == n_features


def test_feature_page_shows_the_score_and_loads_the_bars_on_demand(served):
    client, rows = served
    layer, feature = min((r["layer"], r["feature"]) for r in rows["faithfulness"])
    data = client.get(f"/api/layers/{layer}/features/{feature}").json()["faithfulness"]
    page = html.unescape(client.get(f"/layers/{layer}/features/{feature}").text)
    line = f"Faithfulness {sig(data['score'], 2)} (drop {percent(data['hot_drop'], 2)} hot"
    assert f"{line}, {percent(data['random_drop'], 2)} random)</summary>" in page
    assert 'hx-target="#faithfulness"' in page and "<svg" not in page.split("Faithfulness ")[1].split("</details>")[0]
    headers = {"HX-Request": "true", "HX-Target": "faithfulness"}
    fragment = client.get(f"/layers/{layer}/features/{feature}", headers=headers)
    assert fragment.status_code == 200 and "<html" not in fragment.text and " style=" not in fragment.text
    items = fragment.text.split("<li>")[1:]
    assert len(items) == len(data["per_example"]) > 0
    for item, example in zip(items, data["per_example"]):
        values = [example[k] for k in ("before", "hot", "random", "insertion")]
        widths = [float(w) for w in re.findall(r'<rect class="bar" x="100" y="\d+" width="([\d.]+)"', item)]
        top = max(values)
        assert widths == pytest.approx([v / top * 200 if top > 0 else 0 for v in values], abs=0.006)
        assert f'<a href="{example["page_url"]}">' in item
        assert f"{example['n_hot']} hot patch" in item
    unevaluated = next(
        f for f in range(N_FEATURES) if (layer, f) not in {(r["layer"], r["feature"]) for r in rows["faithfulness"]}
    )
    assert 'hx-target="#faithfulness"' not in client.get(f"/layers/{layer}/features/{unevaluated}").text


def test_layer_page_shows_the_column_and_the_distributions(served):
    client, rows = served
    layer = sorted({r["layer"] for r in rows["faithfulness"]})[-1]
    data = client.get(f"/api/layers/{layer}", params={"sort": "faithfulness", "order": "desc"}).json()
    text = html.unescape(client.get(f"/layers/{layer}", params={"sort": "faithfulness", "order": "desc"}).text)
    assert "<h2>Faithfulness</h2>" in text and text.count('<svg class="chart"') >= 3  # density + two drops
    assert f"{data['faithfulness']['features']} feature" in text
    assert 'name="min_faithfulness"' in text and '<option value="faithfulness" selected>' in text
    assert 'aria-sort="descending"' in text.split(">Faithfulness</a>")[0].rsplit("<th", 1)[1]
    first = data["features"][0]
    assert f'<a href="{first["url"]}">{first["feature"]}</a>' in text
    assert f'<td class="num">{sig(first["faithfulness"], 2)}</td>' in text


@pytest.mark.parametrize("kind", ["empty", "older"])
def test_an_index_without_faithfulness_shows_nothing_and_fails_nowhere(indexes, tmp_path, kind):
    with _serve(indexes[kind], tmp_path) as client:
        data = client.get(f"/api/layers/{LAYER}", params={"sort": "faithfulness", "page_size": 200}).json()
        assert data["faithfulness"] is None
        assert all(item["faithfulness"] is None for item in client.get("/api/layers").json()["layers"])
        assert "Faithfulness by layer" not in client.get("/").text
        assert [r["feature"] for r in data["features"]] == list(range(N_FEATURES))
        assert all(r["faithfulness"] is None for r in data["features"])
        assert client.get(f"/api/layers/{LAYER}", params={"min_faithfulness": "-1"}).json()["paging"]["total"] == 0
        assert client.get(f"/api/layers/{LAYER}/features/8").json()["faithfulness"] is None
        for url in ("/", "/layers", f"/layers/{LAYER}", f"/layers/{LAYER}/features/8", f"/layers/{LAYER}?format=csv"):
            assert client.get(url).status_code == 200, url
        assert "Faithfulness" not in client.get(f"/layers/{LAYER}").text
        assert "faithfulness" not in client.get(f"/layers/{LAYER}/features/8").text
        table = list(csv.DictReader(io.StringIO(client.get(f"/layers/{LAYER}?format=csv").text)))
        assert len(table) == N_FEATURES and {r["faithfulness"] for r in table} == {""}


def test_full_size_feature_page_with_faithfulness_fits_the_budget(indexes, tables, tmp_path):
    """test_weight.py's full-size page, with a faithfulness line (the bars come on demand) beside two sort-eval
    scores."""
    feature = min(r["feature"] for r in tables["added"]["faithfulness"])
    with _serve(indexes["added"], tmp_path) as client:
        page = FeaturePage.model_validate(client.get(f"/api/layers/{LAYER}/features/{feature}").json())
        assert page.faithfulness and page.faithfulness.per_example
        scores = [  # as test_sort_eval_pages.py's full-size page: two run kinds' scores in one line
            FeatureSortEval(token=token, judge=judge, trials=40, correct=33, accuracy=0.825)
            for token, judge in (("cls", "embedding"), ("image", "openai"))
        ]
        big = full_size(page, sort_eval=scores)
        text = render_feature(client.app.state.templates, big, client.app.state.index.index_id)
    assert "Faithfulness " in text and "Sort eval 0.82 over 40 trials" in text
    weight = len(text.encode()) + _assets(text)
    assert weight <= BUDGET, f"{weight} bytes"


def test_api_docs_name_every_new_field_and_parameter():
    text = API_MD.read_text()
    for name in ("faithfulness", "min_faithfulness", "per_example", "mean_score", "mean_hot_drop"):
        assert f'"{name}"' in text or f"`{name}`" in text, name
    for name in ("mean_random_drop", "n_hot", "insertion", "thumbnail_url", "hot_drop", "random_drop", "kept"):
        assert name in text, name
    assert "`faithfulness`" in text.split("htmx: the same URL")[1].split("\n\n")[0]

"""The sort evaluation where it shows (issue 14): per layer beside the model card, per feature its score and
trials, and the layer table's sort and filter by score. Indexes: the page tests' index evaluated by the real
`evaluate` (CLS token, embedding judge), plus a second run kind (image token, openai judge) added through the
real writer; that index as one not of the released suite; and as an older one without the tables."""

from __future__ import annotations

import csv
import html
import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient

from clipscope_explorer.app.main import create_app
from clipscope_explorer.app.model_card import model_card_row
from clipscope_explorer.app.pages.features import FeaturePage
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.app.templating import percent, sig
from clipscope_explorer.app.urls import Urls
from clipscope_explorer.precompute.evaluate.run import TABLES, SortEvalOptions, evaluate
from clipscope_explorer.precompute.index.store import IndexUpdater
from tests.app.conftest import DEAD, N_FEATURES
from tests.app.test_weight import BUDGET, _assets, full_size, render_feature

API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"
OTHER_RUN = {"token": "image", "judge": "openai"}  # the second run kind, on layer 20 only
FEATURE = 8


def _other_run(path: Path, out: Path) -> Path:
    """`path` with an openai run on image tokens for layer 20: a layer row, three features' scores and three
    trials of feature 8 (one unanswered, one query image without a thumbnail), written by the real updater;
    and features 0 to 2 of layer 20 left without a score."""
    with duckdb.connect(str(path), read_only=True) as con:
        shown = {row[0] for row in con.execute("SELECT image_id FROM images").fetchall()}
    plain = min(set(range(120)) - shown)
    with IndexUpdater(path, out, TABLES) as writer:
        writer.delete_rows("sort_eval_features", "layer = 20 AND feature IN (0, 1, 2)", [])  # unscored features
        run = {"layer": [20], **{key: [value] for key, value in OTHER_RUN.items()}}
        writer.add_rows(
            "sort_eval",
            {
                **run,
                **{"judge_model": ["fake-vlm"], "accuracy": [0.75], "ci_low": [0.6], "ci_high": [0.86]},
                **{"answer_1_rate": [0.52], "trials": [40], "correct": [30], "unanswered": [2], "replaced": [1]},
                **{"null_accuracy": [0.48], "null_trials": [40], "seeds": [1], "pairs": [42]},
                **{"features_considered": [20], "per_feature": [0], "usage": ['{"requests": 84}']},
                "evaluated_at": ["2026-01-01T00:00:00+00:00"],
            },
        )
        features = [FEATURE, 9, 10]
        writer.add_rows(
            "sort_eval_features",
            {
                "layer": [20] * 3,
                "feature": features,
                **{key: [value] * 3 for key, value in OTHER_RUN.items()},
                "trials": [3, 4, 0],
                "correct": [2, 4, 0],
            },
        )
        writer.add_rows(
            "sort_eval_trials",
            {
                "layer": [20] * 3,
                **{key: [value] * 3 for key, value in OTHER_RUN.items()},
                "kind": ["pairs"] * 3,
                "seed": [0] * 3,
                "trial": [0, 1, 2],
                "grid1_feature": [FEATURE, 30, FEATURE],
                "grid2_feature": [12, FEATURE, 31],
                "query_feature": [FEATURE] * 3,
                "query_image": [min(shown), plain, max(shown)],
                "answer": [1, 1, None],
            },
        )
        return writer.finish()


def _released_suite(path: Path, out: Path, released: bool) -> Path:
    with IndexUpdater(path, out, TABLES) as writer:
        writer.put_meta(released_suite=released)
        return writer.finish()


def _older(path: Path, out: Path) -> Path:
    """`path` as an index of schema 1.2 holds it: without the sort-evaluation tables."""
    shutil.copy(path, out)
    with duckdb.connect(str(out)) as con:
        for table in TABLES:
            con.execute(f"DROP TABLE {table}")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_minor'")
    return out


def _read(path: Path) -> dict[str, list[dict]]:
    """The three tables as rows, read with DuckDB before any server opens the file."""
    with duckdb.connect(str(path), read_only=True) as con:
        tables = {}
        for table, columns in [*((table, "*") for table in TABLES), ("images", "image_id")]:
            cursor = con.execute(f"SELECT {columns} FROM {table}")
            names = [d[0] for d in cursor.description]
            tables[table] = [dict(zip(names, row)) for row in cursor.fetchall()]
    return tables


@pytest.fixture(scope="module")
def indexes(index_path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sort_eval_pages")
    source = Path(shutil.copy(index_path, folder / "source.duckdb"))
    options = SortEvalOptions(index=source, out=folder / "cls.duckdb", pairs=30, seeds=2, features=0, per_feature=3)
    evaluated = _other_run(evaluate(options), folder / "evaluated.duckdb")
    return {
        "evaluated": evaluated,
        "unreleased": _released_suite(evaluated, folder / "unreleased.duckdb", False),
        "older": _older(source, folder / "older.duckdb"),
    }


@pytest.fixture(scope="module")
def rows(indexes) -> dict[str, list[dict]]:
    return _read(indexes["evaluated"])


@contextmanager
def _serve(path: Path, folder: Path) -> Iterator[TestClient]:
    settings = Settings(index=path, live=False, text=False, upload_store=folder / "up", search_cache=folder / "sc")
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert client.app.state.meaning.wait(60)
        yield client


@pytest.fixture(scope="module")
def served(indexes, rows, tmp_path_factory):
    with _serve(indexes["evaluated"], tmp_path_factory.mktemp("served")) as client:
        yield client


def _expected_layer(rows, layer: int, released: bool) -> list[dict]:
    keys = ("token", "judge", "accuracy", "ci_low", "ci_high", "trials", "answer_1_rate", "null_accuracy")
    runs = sorted((r for r in rows["sort_eval"] if r["layer"] == layer), key=lambda r: (r["token"], r["judge"]))
    card = model_card_row(layer).sort_eval_cls if released else None
    return [{**{k: r[k] for k in keys}, "model_card": card if r["token"] == "cls" else None} for r in runs]


def test_layers_carry_each_run_kind_beside_the_model_card(served, rows):
    overview = served.get("/api").json()["layers"]
    for item in served.get("/api/layers").json()["layers"]:
        expected = _expected_layer(rows, item["layer"], released=True)
        assert item["sort_eval"] == expected and expected
        assert [layer for layer in overview if layer["layer"] == item["layer"]][0]["sort_eval"] == expected
        assert served.get(f"/api/layers/{item['layer']}").json()["sort_eval"] == expected
    kinds = [(s["token"], s["judge"]) for s in served.get("/api/layers/20").json()["sort_eval"]]
    assert kinds == [("cls", "embedding"), ("image", "openai")]
    assert [s["model_card"] for s in served.get("/api/layers/20").json()["sort_eval"]] == [0.9149, None]


def test_model_card_is_null_outside_the_released_suite(indexes, tmp_path):
    expected = _read(indexes["unreleased"])
    with _serve(indexes["unreleased"], tmp_path) as client:
        for item in client.get("/api/layers").json()["layers"]:
            assert item["model_card"] is None
            assert item["sort_eval"] == _expected_layer(expected, item["layer"], released=False)
            assert all(s["model_card"] is None for s in item["sort_eval"])
        text = client.get("/").text
        assert "Sort eval" in text and "card " not in text


def test_overview_and_layer_pages_show_score_interval_controls_and_card(served):
    for url in ("/", "/layers"):
        text = html.unescape(served.get(url).text)
        for item in served.get("/api/layers").json()["layers"]:
            for s in item["sort_eval"]:
                assert f"{sig(s['accuracy'], 3)} <small>[{sig(s['ci_low'], 3)}, {sig(s['ci_high'], 3)}]" in text
                assert f"answers 1: {percent(s['answer_1_rate'], 2)} · null {sig(s['null_accuracy'], 2)}" in text
            assert f"card {sig(item['model_card']['sort_eval_cls'], 4)} (CLS)" in text
    layer = served.get("/api/layers/20").json()
    text = html.unescape(served.get("/layers/20").text)
    for s in layer["sort_eval"]:
        head = f"Sort eval ({s['token'].upper()}, {s['judge']} judge): {sig(s['accuracy'], 3)}"
        assert head in text
    assert "; model card 0.9149." in text


def _scores(rows, layer: int, run: tuple[str, str] = ("cls", "embedding")) -> dict[int, float | None]:
    """Each feature's score in the table's run: correct over trials, None without trials or a row."""
    totals: dict[int, list[int]] = {f: [0, 0] for f in range(N_FEATURES)}
    for r in rows["sort_eval_features"]:
        if (r["layer"], r["token"], r["judge"]) == (layer, *run):
            totals[r["feature"]][0] += r["correct"]
            totals[r["feature"]][1] += r["trials"]
    return {f: (c / t if t else None) for f, (c, t) in totals.items()}


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_layer_table_sorts_by_score(served, rows, order):
    data = served.get("/api/layers/20", params={"sort": "sort_eval", "order": order, "page_size": 200}).json()
    assert data["sort_eval_scores"] == {"token": "cls", "judge": "embedding"}
    scores = _scores(rows, 20)
    sign = 1 if order == "asc" else -1
    expected = sorted(scores, key=lambda f: (scores[f] is None, sign * (scores[f] or 0), f))
    assert [(r["feature"], r["sort_eval"]) for r in data["features"]] == [(f, scores[f]) for f in expected]
    assert len({s for s in scores.values() if s is not None}) > 3
    assert any(s is None for s in scores.values())


def test_min_score_filter_pages_and_csv(served, rows):
    scores = _scores(rows, 20)
    threshold = sorted(s for s in scores.values() if s is not None)[len(scores) // 2]
    params = {"min_sort_eval": repr(threshold), "sort": "frequency", "order": "desc", "page_size": 5}
    data = served.get("/api/layers/20", params=params).json()
    kept = sorted(f for f, s in scores.items() if s is not None and s >= threshold)
    assert data["filters"]["min_sort_eval"] == threshold and data["paging"]["total"] == len(kept)
    assert f"min_sort_eval={threshold!r}" in data["paging"]["next"] and f"min_sort_eval={threshold!r}" in data["csv"]
    listed = served.get("/api/layers/20", params={**params, "page_size": 200}).json()["features"]
    assert sorted(r["feature"] for r in listed) == kept
    frequencies = [r["frequency"] for r in listed]
    assert frequencies == sorted(frequencies, reverse=True)
    table = list(csv.DictReader(io.StringIO(served.get(data["csv"]).text)))
    assert [int(r["feature"]) for r in table] == [r["feature"] for r in listed]
    assert served.get("/api/layers/20", params={"min_sort_eval": "1.5"}).status_code == 422
    page = served.get("/layers/20", params=params).text
    assert 'name="min_sort_eval"' in page and '<option value="sort_eval"' in page
    first = listed[0]
    assert f'title="{first["sort_eval_trials"]} trials">{sig(first["sort_eval"], 2)}</td>' in page


def _expected_trials(rows, layer: int, feature: int, urls: Urls) -> list[dict]:
    shown = {r["image_id"] for r in rows["images"]}
    mine = [
        r
        for r in rows["sort_eval_trials"]
        if (r["layer"], r["query_feature"]) == (layer, feature) and r["kind"] in ("pairs", "feature")
    ]
    mine.sort(key=lambda r: (r["token"], r["judge"], r["kind"] != "feature", -r["seed"], -r["trial"]))
    out = []
    for r in mine[:20]:
        first = r["grid1_feature"] == feature
        partner = r["grid2_feature"] if first else r["grid1_feature"]
        out.append(
            {
                **{key: r[key] for key in ("token", "judge", "kind", "query_image", "answer")},
                "partner": partner,
                "partner_url": urls.feature(layer, partner),
                "query_url": urls.sample(r["query_image"]),
                "query_thumbnail_url": urls.thumbnail(r["query_image"]) if r["query_image"] in shown else None,
                "correct": None if r["answer"] is None else r["answer"] == (1 if first else 2),
            }
        )
    return [{k: t[k] for k in sorted(t)} for t in out]


@pytest.mark.parametrize("layer, feature", [(20, FEATURE), (20, 9), (20, 10), (11, FEATURE), (20, min(DEAD))])
def test_feature_json_carries_its_score_and_trials(served, rows, layer, feature):
    data = served.get(f"/api/layers/{layer}/features/{feature}").json()
    own = sorted(
        (r for r in rows["sort_eval_features"] if (r["layer"], r["feature"]) == (layer, feature)),
        key=lambda r: (r["token"], r["judge"]),
    )
    assert data["sort_eval"] == [
        {
            **{key: r[key] for key in ("token", "judge", "trials", "correct")},
            "accuracy": r["correct"] / r["trials"] if r["trials"] else None,
        }
        for r in own
    ]
    urls = Urls(served.app.state.index.index_id)
    assert [{k: t[k] for k in sorted(t)} for t in data["sort_eval_trials"]] == _expected_trials(
        rows, layer, feature, urls
    )


def test_feature_trials_cover_both_kinds_answers_and_thumbnails(served):
    trials = served.get(f"/api/layers/20/features/{FEATURE}").json()["sort_eval_trials"]
    assert {(t["token"], t["judge"]) for t in trials} == {("cls", "embedding"), ("image", "openai")}
    openai = [t for t in trials if t["judge"] == "openai"]
    assert [(t["partner"], t["answer"], t["correct"]) for t in openai] == [
        (31, None, None),
        (30, 1, False),
        (12, 1, True),
    ]
    assert openai[1]["query_thumbnail_url"] is None and openai[0]["query_thumbnail_url"]


def test_feature_page_shows_the_score_and_loads_the_trials_on_demand(served):
    data = served.get(f"/api/layers/20/features/{FEATURE}").json()
    page = served.get(f"/layers/20/features/{FEATURE}").text
    for s in data["sort_eval"]:
        trials = f"{s['trials']} trial{'s' if s['trials'] != 1 else ''}"
        assert f"Sort eval {sig(s['accuracy'], 2)} over {trials}, {s['judge']} judge, {s['token'].upper()}" in page
    assert 'hx-target="#sort-eval-trials"' in page and 'class="trials"' not in page  # the list comes on demand
    headers = {"HX-Request": "true", "HX-Target": "sort-eval-trials"}
    fragment = served.get(f"/layers/20/features/{FEATURE}", headers=headers)
    assert fragment.status_code == 200 and "<html" not in fragment.text
    items = fragment.text.count("<li>")
    assert items == len(data["sort_eval_trials"])
    for t in data["sort_eval_trials"]:  # a card: it links to the partner, shows the query and the answer
        word = {True: "right", False: "wrong", None: "unanswered"}[t["correct"]]
        title = f"image {t['query_image']} against feature {t['partner']}, {t['judge']} judge, {t['token'].upper()}"
        card = f'<a href="{t["partner_url"]}" title="{title}">'
        assert card in fragment.text
        after = fragment.text.split(card, 1)[1].split("</a>", 1)[0]
        assert f'<span class="id">{word}</span><span class="label">vs {t["partner"]}</span>' in after
        if t["query_thumbnail_url"]:
            assert f'src="{t["query_thumbnail_url"]}"' in after
    unscored = served.get("/layers/20/features/0").text  # trials, but no score row
    assert "Sort eval 0" not in unscored and "<summary>Sort-eval trials</summary>" in unscored


def test_an_older_index_has_no_scores_and_no_errors(indexes, tmp_path):
    with _serve(indexes["older"], tmp_path) as client:
        for item in client.get("/api/layers").json()["layers"]:
            assert item["sort_eval"] == []
        data = client.get("/api/layers/20", params={"sort": "sort_eval", "page_size": 200}).json()
        assert data["sort_eval_scores"] is None and data["sort_eval"] == []
        assert [r["feature"] for r in data["features"]] == list(range(N_FEATURES))
        assert all(r["sort_eval"] is None and r["sort_eval_trials"] is None for r in data["features"])
        assert client.get("/api/layers/20", params={"min_sort_eval": "0"}).json()["paging"]["total"] == 0
        feature = client.get(f"/api/layers/20/features/{FEATURE}").json()
        assert feature["sort_eval"] == [] and feature["sort_eval_trials"] == []
        for url in ("/", "/layers", "/layers/20", f"/layers/20/features/{FEATURE}"):
            assert client.get(url).status_code == 200, url
        assert 'name="min_sort_eval"' not in client.get("/layers/20").text


def test_full_size_feature_page_with_scores_fits_the_budget(served):
    """test_weight.py's full-size page, with two scores and the most trials a page lists."""
    page = FeaturePage.model_validate(served.get(f"/api/layers/20/features/{FEATURE}").json())
    assert len(page.sort_eval) == 2 and page.sort_eval_trials
    big = full_size(page, sort_eval_trials=(page.sort_eval_trials * 20)[:20])
    html_text = render_feature(served.app.state.templates, big, served.app.state.index.index_id)
    weight = len(html_text.encode()) + _assets(html_text)
    assert weight <= BUDGET, f"{weight} bytes"


def test_api_docs_name_every_new_field_and_parameter():
    text = API_MD.read_text()
    for name in ("sort_eval", "sort_eval_trials", "sort_eval_scores", "min_sort_eval", "answer_1_rate"):
        assert f'"{name}"' in text or f"`{name}`" in text, name
    for name in ("partner_url", "query_thumbnail_url", "null_accuracy", "model_card"):
        assert name in text, name

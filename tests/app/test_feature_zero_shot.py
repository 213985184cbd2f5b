"""A feature's zero-shot labels: the page and its JSON carry the stored ones, and word search matches them
as it matches label terms (checked against the features table read with DuckDB)."""

from __future__ import annotations

import html

import duckdb
import pytest

from tests.app.conftest import LAYERS, N_FEATURES


@pytest.fixture(scope="module")
def features(client, index_path) -> dict[tuple[int, int], dict]:
    """Every feature's label, label terms, zero-shot labels and image frequency, by (layer, feature)."""
    with duckdb.connect(str(index_path), read_only=True, config={"threads": 1}) as con:  # as the app opened it
        cursor = con.execute(
            "SELECT layer, feature, label, label_terms, zero_shot_terms, zero_shot_scores, zero_shot_margins, "
            "image_frequency FROM features"
        )
        names = [d[0] for d in cursor.description]
        return {(row[0], row[1]): dict(zip(names, row)) for row in cursor.fetchall()}


def test_the_feature_json_and_page_carry_the_stored_labels(client, features):
    labelled = 0
    for layer in LAYERS:
        for feature in range(N_FEATURES):
            row = features[(layer, feature)]
            data = client.get(f"/api/layers/{layer}/features/{feature}").json()
            got = data["zero_shot_labels"]
            assert [label["text"] for label in got] == row["zero_shot_terms"]
            assert [label["score"] for label in got] == pytest.approx(row["zero_shot_scores"], rel=1e-6)
            assert [label["margin"] for label in got] == pytest.approx(row["zero_shot_margins"], rel=1e-6)
            labelled += bool(got)
    assert 0 < labelled < len(features)  # features with and without labels
    layer, feature = next(key for key, row in features.items() if row["zero_shot_terms"])
    text = client.get(f"/layers/{layer}/features/{feature}").text
    for term in features[(layer, feature)]["zero_shot_terms"]:
        assert f">{html.escape(term)}</span>" in text


def matches(row: dict, words: list[str]) -> bool:
    text = " ".join([row["label"], *row["zero_shot_terms"]]).lower()
    return all(word in text for word in words)


@pytest.mark.parametrize("q", ["flower", "cat", "dog beach", "mountain", "boat lake", "zebra"])
def test_word_search_matches_zero_shot_labels_like_label_terms(client, features, q):
    words = q.split()
    expected = [key for key, row in features.items() if matches(row, words)]
    exact = {
        key: len(set(words) & {*features[key]["label_terms"], *features[key]["zero_shot_terms"]}) for key in expected
    }
    expected.sort(key=lambda key: (-exact[key], -features[key]["image_frequency"], key))
    data = client.get("/api/search", params={"q": q, "by": "words", "limit": 200}).json()
    results = data["label_results"]
    assert [(r["layer"], r["feature"]) for r in results] == expected
    assert [r["exact_terms"] for r in results] == [exact[key] for key in expected]
    assert [r["zero_shot_terms"] for r in results] == [features[key]["zero_shot_terms"] for key in expected]


def test_some_feature_is_found_only_by_its_zero_shot_labels(client, features):
    key, row = next(
        (key, row)
        for key, row in features.items()
        if row["zero_shot_terms"] and row["zero_shot_terms"][0] not in row["label"].lower()
    )
    term = row["zero_shot_terms"][0]
    data = client.get("/api/search", params={"q": term, "by": "words", "limit": 200}).json()
    assert key in [(r["layer"], r["feature"]) for r in data["label_results"]]
    page = client.get("/search", params={"q": term, "by": "words", "limit": 200}).text
    assert f'<span class="muted">CLIP:</span> <span class="term">{html.escape(term)}</span>' in page

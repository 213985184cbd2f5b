"""Every page and its JSON twin: one parametrised walk, then page-specific contracts."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from markupsafe import escape

from clipscope_explorer.app.queries import dequantise
from clipscope_explorer.app.templating import percent, sig, thousands
from tests.app.conftest import DEAD, N_FEATURES
from tests.app.route_walk import endpoints

ALIVE, RARE = 8, 3  # feature 3 (% 11 == 3) has a single example and no bands


def _pages(index) -> list[str]:
    example = index.examples(20, ALIVE, heatmaps=False)[0]["image_id"]
    return [
        "/",
        "/layers",
        "/layers/11",
        "/layers/20?sort=frequency&order=desc&min_freq=0",
        "/layers/20?q=cat&sort=max_activation",
        "/layers/11?page=2&page_size=20",
        f"/layers/20/features/{ALIVE}",
        f"/layers/11/features/{ALIVE}",
        f"/layers/20/features/{min(DEAD)}",
        f"/layers/20/features/{RARE}",
        f"/layers/20/features/{N_FEATURES - 1}",
        "/layers/11/features/0",
        f"/layers/20/features/{ALIVE}/examples/{example}",
        f"/samples/{example}",
        "/samples/1",
        "/search",
        "/search?q=cat",
        "/search?q=red+car&layer=20",
        "/search?q=zzzz",
        "/search/images",
    ]


PAGE_COUNT = 20


def twin_of(url: str) -> str:
    return "/api" if url == "/" else "/api" + url


def _kind(url: str) -> str:
    path = url.split("?")[0]
    if path == "/":
        return "overview"
    if path == "/layers":
        return "layers"
    if path.startswith("/search/images"):
        return "image_search"
    if path.startswith("/search"):
        return "search"
    if path.startswith("/samples/"):
        return "sample"
    if "/examples/" in path:
        return "example"
    return "feature" if "/features/" in path else "layer"


def check_overview(text: str, data: dict) -> None:
    assert data["index"]["index_id"] in text
    check_layers(text, data)
    for layer in data["layers"]:
        assert f"{layer['layer']}/mse.png" in text


def check_layers(text: str, data: dict) -> None:
    for layer in data["layers"]:
        assert f'href="/layers/{layer["layer"]}"' in text
        assert sig(layer["mse"], 4) in text
        assert percent(layer["dead_fraction"], 3) in text
        if layer["model_card"]:
            assert f"card {sig(layer['model_card']['mse'], 5)}" in text


def check_layer(text: str, data: dict) -> None:
    assert f"Layer {data['layer']}" in text
    assert thousands(data["paging"]["total"]) in text
    for row in data["features"]:
        assert f'href="{row["url"]}"' in text
        assert sig(row["frequency"], 3) in text
    if data["paging"]["next"]:
        assert html.escape(data["paging"]["next"]) in text


def check_feature(text: str, data: dict) -> None:
    assert f"Layer {data['layer']} · feature {data['feature']}" in text
    assert sig(data["frequency"], 3) in text
    assert sig(data["max_activation"], 4) in text
    for term in data["label_terms"]:
        assert f'<span class="term">{html.escape(term)}</span>' in text
    for label in data["zero_shot_labels"]:
        assert f'margin {sig(label["margin"], 2)}">{html.escape(label["text"])}</span>' in text
    examples = data["top_images"] + [e for band in data["bands"] for e in band["examples"]]
    for example in examples:
        for key in ("thumbnail_url", "overlay_url", "page_url"):
            assert example[key] in text
        assert f"<b>{sig(example['activation'], 3)}</b>" in text
    for similar in data["similar"]:
        assert f'href="{similar["url"]}"' in text
    for link in data["links"]["other_layers"]:
        assert f'href="{link["url"]}"' in text
    assert data["links"]["positions"] in text


def check_example(text: str, data: dict) -> None:
    assert data["thumbnail_url"] in text
    assert sig(data["activation"], 4) in text
    assert text.count("<rect ") == len(data["heatmap"])
    assert sig(max(data["heatmap"]), 4) in text


def check_sample(text: str, data: dict) -> None:
    assert f"Sample image {data['image_id']}" in text and html.escape(data["key"]) in text
    if data["thumbnail_url"]:
        assert data["thumbnail_url"] in text
    for group in data["cls_features"]:
        for feature in group["features"]:
            assert f'href="{feature["url"]}"' in text
    for example in data["examples"]:
        assert f'href="{example["example_url"]}"' in text
    for image in data["nearest_images"]:
        assert f'href="{image["page_url"]}"' in text
    if data["message"]:
        assert data["message"] in html.unescape(text)


def check_search(text: str, data: dict) -> None:
    for result in data["label_results"] + data["caption_results"]:
        assert f'href="{result["url"]}"' in text
    if data["message"]:
        assert html.escape(data["message"]) in text


def check_image_search(text: str, data: dict) -> None:
    for image in data["images"]:
        assert f'href="{image["page_url"]}"' in text
    if data["meaning"]["message"]:  # the page says why search by meaning is off (the shared client has no text tower)
        assert str(escape(data["meaning"]["message"])) in text


CHECKS = {
    "overview": check_overview,
    "layers": check_layers,
    "layer": check_layer,
    "feature": check_feature,
    "example": check_example,
    "sample": check_sample,
    "search": check_search,
    "image_search": check_image_search,
}


@pytest.mark.parametrize("position", range(PAGE_COUNT))
def test_every_page_and_its_twin_carry_the_same_data(client, index, position):
    assert client.app.state.meaning.wait(60)  # loaded in the background: the page and its twin see one state
    url = _pages(index)[position]
    page = client.get(url)
    assert page.status_code == 200, url
    assert page.headers["content-type"].startswith("text/html")
    twin = twin_of(url)
    assert f'<link rel="alternate" type="application/json" href="{html.escape(twin)}">' in page.text
    data = client.get(twin)
    assert data.status_code == 200, twin
    assert data.headers["content-type"] == "application/json"
    CHECKS[_kind(url)](page.text, data.json())


def test_every_page_route_has_its_twin_with_the_same_parameters(client):
    gets = {e.path: e for e in endpoints(client.app) if "GET" in e.methods}
    pages = [
        path
        for path in gets
        if not path.startswith(("/api", "/images/", "/static", "/openapi.json", "/docs"))
        and not path.endswith((".jpg", ".png"))
    ]
    assert set(pages) == {
        "/",
        "/layers",
        "/layers/{layer}",
        "/layers/{layer}/random",
        "/layers/{layer}/checkpoints",
        "/layers/{layer}/features/{feature}",
        "/layers/{layer}/features/{feature}/examples/{image_id}",
        "/layers/{layer}/features/{feature}/embed",
        "/layers/{layer}/features/{feature}/lineage",
        "/concepts",
        "/samples/{image_id}",
        "/search",
        "/search/images",
        "/upload",
        "/uploads/{upload_id}",
        "/uploads/{upload_id}/interventions/{intervention_id}",
    }
    for path in pages:
        twin = gets[twin_of(path)]
        assert (twin.path_params, twin.query_params) == (gets[path].path_params, gets[path].query_params), path
    filters = ("sort", "order", "min_freq", "max_freq", "q", "min_sort_eval", "min_faithfulness")
    layer_query = (*filters, "page", "page_size")
    assert gets["/layers/{layer}"].query_params == layer_query


def test_the_walk_covers_every_page_kind(index):
    pages = _pages(index)
    assert len(pages) == PAGE_COUNT
    assert {_kind(u) for u in pages} == set(CHECKS)


def test_layers_json_contract(client):
    layers = client.get("/api/layers").json()["layers"]
    assert [layer["layer"] for layer in layers] == [11, 20]
    for layer in layers:
        for key in (
            "layer",
            "n_features",
            "n_images",
            "n_tokens",
            "mse",
            "explained_variance",
            "l0",
            "dead_fraction",
            "active_fraction",
            "mse_by_position",
            "model_card",
        ):
            assert key in layer
        assert len(layer["mse_by_position"]) == 257
    assert layers[1]["model_card"] == {
        "mse": 278.06,
        "explained_variance": 0.706,
        "dead_fraction": 0.0000763,
        "active_fraction": 0.2036,
        "sort_eval_cls": 0.9149,
    }


def test_layer_json_pages_and_sorts(client):
    data = client.get("/api/layers/20?sort=max_activation&order=desc&page_size=10").json()
    assert data["layer"] == 20 and data["n_features"] == N_FEATURES
    values = [row["max_activation"] for row in data["features"]]
    assert values == sorted(values, reverse=True) and len(values) == 10
    assert data["paging"] == {
        "page": 1,
        "page_size": 10,
        "total": N_FEATURES,
        "has_next": True,
        "next": "/layers/20?sort=max_activation&order=desc&page_size=10&page=2",
        "previous": None,
    }
    last = client.get("/api/layers/20?page_size=10&page=7").json()
    assert len(last["features"]) == N_FEATURES - 60 and not last["paging"]["has_next"]
    alive = client.get("/api/layers/20?min_freq=0&page_size=200").json()
    assert alive["paging"]["total"] == N_FEATURES - len(DEAD)
    assert sum(b["count"] for b in alive["density"]["bins"]) + alive["density"]["dead"] == N_FEATURES
    assert alive["density"]["dead"] == len(DEAD)


def test_page_size_is_capped(client):
    data = client.get("/api/layers/20?page_size=100000").json()
    assert data["paging"]["page_size"] == 200


def test_label_filter_treats_wildcards_literally(client):
    assert client.get("/api/layers/20?q=%25").json()["paging"]["total"] == N_FEATURES  # `%` is no word: no filter
    assert client.get("/api/layers/20?q=_").json()["paging"]["total"] == 0
    assert client.get("/api/layers/20?q=ca_").json()["paging"]["total"] == 0  # would match "cat" as a wildcard
    cats = client.get("/api/layers/20?q=cat").json()
    assert cats["paging"]["total"] > 0 and all("cat" in row["label"] for row in cats["features"])


@pytest.mark.parametrize(
    "q, words",
    [
        ("cat,", ["cat"]),
        ("Cat.", ["cat"]),
        ("(cat)", ["cat"]),
        ("cat;  sofa", ["cat", "sofa"]),
        ("red,car", ["red", "car"]),
        ("dog's-day", ["dog's-day"]),
        (",;.", []),
    ],
)
def test_label_filter_and_search_split_words_alike(client, q, words):
    labels = [row["label"] for row in client.get("/api/layers/20?page_size=200").json()["features"]]
    assert len(labels) == N_FEATURES
    expected = sum(all(word in label.lower() for word in words) for label in labels)
    assert client.get("/api/layers/20", params={"q": q}).json()["paging"]["total"] == expected, q
    search = client.get("/api/search", params={"q": q, "layer": 20, "by": "words", "limit": 200}).json()
    assert search["words"] == words
    if words:  # search matches the label or the zero-shot labels; the layer's filter, the label only
        for row in search["label_results"]:
            text = " ".join([row["label"], *row["zero_shot_terms"]]).lower()
            assert all(word in text for word in words), row
        same = client.get("/api/layers/20", params={"q": " ".join(words), "page_size": 200}).json()["features"]
        assert {row["feature"] for row in same} <= {row["feature"] for row in search["label_results"]}


def test_feature_json_contract_and_heatmaps(client, index):
    data = client.get(f"/api/layers/20/features/{ALIVE}").json()
    for key in (
        "layer",
        "feature",
        "frequency",
        "image_frequency",
        "cls_frequency",
        "max_activation",
        "mean_activation",
        "histogram",
        "top_images",
        "similar",
        "bands",
        "label_terms",
        "position_mean",
    ):
        assert key in data
    assert len(data["position_mean"]) == 257
    assert len(data["histogram"]["counts"]) == len(data["histogram"]["edges"]) - 1
    assert len(data["similar"]) == 10
    top = data["top_images"]
    assert [e["rank"] for e in top] == list(range(1, len(top) + 1))
    assert [e["activation"] for e in top] == sorted((e["activation"] for e in top), reverse=True)
    stored = {r["image_id"]: r for r in index.examples(20, ALIVE, heatmaps=True)}
    for example in top:
        for key in ("rank", "image_id", "key", "caption", "activation", "cls_activation", "heatmap"):
            assert key in example
        row = stored[example["image_id"]]
        expected = dequantise(row["heatmap_scale"], row["heatmap"])
        assert len(example["heatmap"]) == 256
        np.testing.assert_allclose(example["heatmap"], expected, atol=row["heatmap_scale"] / 2)
        assert max(example["heatmap"]) <= example["activation"] * (1 + 1e-6)
        assert example["activation"] <= data["max_activation"] * (1 + 1e-6)
    for band in data["bands"]:
        for example in band["examples"]:
            assert band["low"] - 1e-6 <= example["activation"] <= band["high"] + 1e-6


def test_dead_and_rare_features(client):
    dead = client.get(f"/api/layers/20/features/{min(DEAD)}").json()
    assert dead["dead"] and dead["top_images"] == [] and dead["max_activation"] is None
    assert "never fires" in client.get(f"/layers/20/features/{min(DEAD)}").text
    rare = client.get(f"/api/layers/20/features/{RARE}").json()
    assert len(rare["top_images"]) == 1 and all(not band["examples"] for band in rare["bands"])


def test_feature_navigation_links(client):
    first = client.get("/api/layers/11/features/0").json()["links"]
    assert first["previous"] is None and first["next"] == "/layers/11/features/1"
    assert first["other_layers"] == [{"layer": 20, "url": "/layers/20/features/0"}]
    last = client.get(f"/api/layers/11/features/{N_FEATURES - 1}").json()["links"]
    assert last["next"] is None


def test_feature_page_unfurls_with_a_preview_image(client):
    """OpenGraph and Twitter cards: absolute URLs, the title and numbers of the JSON, a 1200 x 630 preview."""
    from io import BytesIO

    from PIL import Image

    data = client.get(f"/api/layers/20/features/{ALIVE}").json()
    page = client.get(f"/layers/20/features/{ALIVE}").text
    meta = {
        key: html.unescape(value)
        for key, value in re.findall(r'<meta (?:property|name)="((?:og|twitter):[a-z:]+)" content="([^"]*)"', page)
    }
    title = f"Layer 20 · feature {ALIVE}" + (f": {data['label']}" if data["label"] else "")
    assert meta["og:title"] == meta["twitter:title"] == title
    assert meta["og:url"] == f"http://testserver/layers/20/features/{ALIVE}"
    assert percent(data["image_frequency"], 3) in meta["og:description"]
    assert sig(data["max_activation"], 3) in meta["og:description"]
    assert meta["twitter:card"] == "summary_large_image"
    assert meta["og:image"] == meta["twitter:image"] and meta["og:image"].startswith("http://testserver/images/")
    preview = client.get(meta["og:image"].removeprefix("http://testserver"))
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
    assert (
        Image.open(BytesIO(preview.content)).size
        == (int(meta["og:image:width"]), int(meta["og:image:height"]))
        == (1200, 630)
    )


def test_random_goes_to_a_feature_that_fires(client):
    for _ in range(10):
        response = client.get("/layers/20/random")
        assert response.status_code == 303
        feature = int(re.fullmatch(r"/layers/20/features/(\d+)", response.headers["location"]).group(1))
        assert feature not in DEAD
    api = client.get("/api/layers/20/random")
    assert api.status_code == 303 and api.headers["location"].startswith("/api/layers/20/features/")
    assert response.headers["cache-control"] == "no-store"


def test_search_by_label_caption_and_jump(client):
    data = client.get("/api/search?q=sofa").json()
    assert data["label_results"] and all("sofa" in r["label_terms"] for r in data["label_results"])
    assert data["caption_results"] and all(r["caption_matches"] >= 1 for r in data["caption_results"])
    layer_only = client.get("/api/search?q=sofa&layer=11").json()
    assert {r["layer"] for r in layer_only["label_results"] + layer_only["caption_results"]} == {11}
    for q in ("20/7", "L20 F7", "layer 20 feature 7", "20:7"):
        jump = client.get("/search", params={"q": q})
        assert jump.status_code == 303 and jump.headers["location"] == "/layers/20/features/7", q
    assert client.get("/api/search?q=20/7").headers["location"] == "/api/layers/20/features/7"
    missing = client.get("/api/search?q=20/999").json()
    assert missing["message"] and not missing["label_results"]
    limited = client.get("/api/search?q=a&limit=2").json()
    assert len(limited["caption_results"]) <= 2 and limited["caption_truncated"]


def test_search_words_are_not_sql(client):
    for q in ("%", "_", "' OR 1=1 --", "\\", "cat'; DROP TABLE features; --"):
        response = client.get("/api/search", params={"q": q})
        assert response.status_code == 200, q
        assert response.json()["label_results"] == [], q

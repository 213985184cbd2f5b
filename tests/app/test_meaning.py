"""Search by meaning over the real HTTP app with a tiny real text tower (open_clip code, `local-dir:`):
rankings equal a brute-force reference, the caches, bad input, the states where it is unavailable, the
words/meaning toggle and the JSON twins."""

from __future__ import annotations

import html
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from clipscope_explorer.app.main import create_app
from clipscope_explorer.app.settings import Settings
from tests.app.conftest import DUPLICATE_IMAGES, N_SAMPLE, SHARED_PROTOTYPES, build_index

QUERIES = ["dog", "a red car parked on a street", "snowy mountain", "犬 собака", "pasta"]


def meaning_client(index: Path, meaning_cache: Path, **overrides) -> TestClient:
    settings = Settings(**{"index": index, "live": False, "text": True, "search_cache": meaning_cache, **overrides})
    return TestClient(create_app(settings), follow_redirects=False)


def wait_meaning(client: TestClient) -> None:
    assert client.app.state.meaning.wait(120), "search by meaning did not finish loading"


@pytest.fixture(scope="module")
def truth(meaning_index) -> dict:
    """What the index holds, read with DuckDB before the app opens it (one configuration per file)."""
    with duckdb.connect(str(meaning_index), read_only=True) as con:
        return {
            "images": stored(con, "SELECT image_id, embedding FROM samples"),
            **{
                layer: stored(con, f"SELECT layer, feature, prototype FROM features WHERE {where}")
                for layer, where in ((None, "prototype IS NOT NULL"), (11, "layer = 11"), (20, "layer = 20"))
            },
            "samples": {r[0]: r[1:] for r in con.execute("SELECT image_id, key, caption, url FROM samples").fetchall()},
            "thumbnails": {r[0] for r in con.execute("SELECT image_id FROM images").fetchall()},
        }


@pytest.fixture(scope="module")
def client(meaning_index, meaning_cache, truth):
    """--no-live: text search works without live encoding."""
    with meaning_client(meaning_index, meaning_cache) as test_client:
        wait_meaning(test_client)
        assert test_client.app.state.meaning.text_state == "ready", test_client.app.state.meaning.text_message
        yield test_client


@pytest.fixture(scope="module")
def open_clip_text(tiny_model_spec):
    """open_clip itself: text embedding of a prompt, float64 (the independent side of the comparisons)."""
    import open_clip
    import torch

    model = open_clip.create_model(tiny_model_spec).eval()
    tokenizer = open_clip.get_tokenizer(tiny_model_spec)

    def embed(text: str) -> np.ndarray:
        with torch.inference_mode():
            return model.encode_text(tokenizer([text]), normalize=True)[0].double().numpy()

    return embed


def stored(con, sql: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, c], vectors [n, d] float64) of the float16 blobs the index holds (NULLs left out)."""
    rows = [row for row in con.execute(sql).fetchall() if row[-1] is not None]
    ids = np.array([row[:-1] for row in rows], dtype=np.int64)
    return ids, np.stack([np.frombuffer(row[-1], dtype="<f2") for row in rows]).astype(np.float64)


def reference(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray) -> tuple[list[tuple], np.ndarray]:
    """Brute force in float64 on the stored vectors: best first, ties by id."""
    scores = (vectors * query).sum(axis=1)  # row by row alike: equal rows score equal
    order = np.lexsort((*ids.T[::-1], -scores))
    return [tuple(int(v) for v in ids[i]) for i in order], scores[order]


@pytest.mark.parametrize("q", QUERIES)
def test_images_by_meaning_equal_a_brute_force_reference(client, truth, open_clip_text, q):
    data = client.get("/api/search/images", params={"q": q, "limit": N_SAMPLE}).json()
    assert data["q"] == q and data["template"] == "a photo of {}" and data["truncated"] is False
    order, scores = reference(*truth["images"], open_clip_text(f"a photo of {q}"))
    assert [(image["image_id"],) for image in data["images"]] == order
    np.testing.assert_allclose([image["score"] for image in data["images"]], scores, rtol=0, atol=2e-6)


def test_tied_images_rank_by_id(client):
    images = client.get("/api/search/images", params={"q": "dog", "limit": N_SAMPLE}).json()["images"]
    position = {image["image_id"]: n for n, image in enumerate(images)}
    for image, same in DUPLICATE_IMAGES.items():
        assert images[position[image]]["score"] == images[position[same]]["score"]
    assert position[7] + 1 == position[70] and position[70] + 1 == position[71]
    assert position[33] + 1 == position[90]


@pytest.mark.parametrize("layer", [None, 11, 20])
@pytest.mark.parametrize("q", QUERIES[:3])
def test_features_by_meaning_equal_a_brute_force_reference(client, truth, open_clip_text, q, layer):
    params = {"q": q, "by": "meaning", "limit": 200, **({"layer": layer} if layer is not None else {})}
    data = client.get("/api/search", params=params).json()
    assert data["by"] == "meaning" and not data["label_results"] and not data["caption_results"]
    order, scores = reference(*truth[layer], open_clip_text(f"a photo of {q}"))
    results = data["meaning_results"]
    assert [(r["layer"], r["feature"]) for r in results] == order
    np.testing.assert_allclose([r["score"] for r in results], scores, rtol=0, atol=2e-6)
    assert all(r["match"] == "meaning" and r["url"] == f"/layers/{r['layer']}/features/{r['feature']}" for r in results)


def test_tied_features_rank_by_layer_then_feature(client):
    results = client.get("/api/search", params={"q": "cat", "by": "meaning", "limit": 200}).json()["meaning_results"]
    position = {(r["layer"], r["feature"]): n for n, r in enumerate(results)}
    for feature, same in SHARED_PROTOTYPES.items():
        assert results[position[feature]]["score"] == results[position[same]]["score"]
        assert position[same] + 1 == position[feature]  # (11, 9) before (20, 9); (20, 10) before (20, 12)


def test_a_result_carries_the_word_search_fields_plus_score(client):
    words = client.get("/api/search", params={"q": "dog", "by": "words"}).json()["label_results"][0]
    meaning = client.get("/api/search", params={"q": "dog", "by": "meaning"}).json()["meaning_results"][0]
    assert set(meaning) == set(words) and meaning["score"] is not None and words["score"] is None


def test_limit_cuts_the_ranking_and_says_more_exist(client):
    full = client.get("/api/search", params={"q": "boat", "by": "meaning", "limit": 200}).json()
    few = client.get("/api/search", params={"q": "boat", "by": "meaning", "limit": 3}).json()
    assert few["meaning_results"] == full["meaning_results"][:3] and few["meaning_truncated"]
    assert not full["meaning_truncated"]
    images = client.get("/api/search/images", params={"q": "boat", "limit": 4}).json()
    assert images["limit"] == 4 and len(images["images"]) == 4


def test_image_hits_carry_their_sample_and_thumbnail(client, truth):
    images = client.get("/api/search/images", params={"q": "cat", "limit": N_SAMPLE}).json()["images"]
    samples, thumbnails = truth["samples"], truth["thumbnails"]
    assert 0 < len(thumbnails) < N_SAMPLE
    for image in images:
        assert (image["key"], image["caption"], image["url"]) == samples[image["image_id"]]
        assert image["page_url"] == f"/samples/{image['image_id']}"
        expected = f"/images/{client.app.state.index.index_id}/{image['image_id']}.jpg"
        assert image["thumbnail_url"] == (expected if image["image_id"] in thumbnails else None)


def test_the_query_embedding_is_open_clips_and_is_cached(client, open_clip_text, monkeypatch):
    service = client.app.state.meaning
    vector, truncated = service.embed("a zebra crossing", "a picture of {}")
    np.testing.assert_allclose(vector, open_clip_text("a picture of a zebra crossing"), atol=1e-6)
    calls = []
    encode = service.tower.encode
    monkeypatch.setattr(service.tower, "encode", lambda texts: calls.append(texts) or encode(texts))
    first = client.get("/api/search", params={"q": "a zebra on grass", "by": "meaning"}).json()
    hits = service.cache_info()["features"].hits
    again = client.get("/api/search", params={"q": "a zebra on grass", "by": "meaning"}).json()
    assert again == first and service.cache_info()["features"].hits == hits + 1
    images = client.get("/api/search/images", params={"q": "a zebra on grass"}).json()  # embedding from the cache
    assert calls == [["a photo of a zebra on grass"]] and images["images"]
    respaced = client.get("/api/search", params={"q": " a\tzebra  on\ngrass\x00", "by": "meaning"}).json()
    assert respaced["meaning_results"] == first["meaning_results"] and len(calls) == 1


def test_templates(client, open_clip_text, truth):
    data = client.get("/api/search/images", params={"q": "dog", "template": "a {x} drawing of {}", "limit": 5}).json()
    assert data["template"] == "a {x} drawing of {}"
    order, _ = reference(*truth["images"], open_clip_text("a {x} drawing of dog"))
    assert [(image["image_id"],) for image in data["images"]] == order[:5]
    for bad in ("a photo of", "{} and {}", "{0}", "x" * 201):
        for path in ("/api/search/images", "/api/search"):
            response = client.get(path, params={"q": "dog", "template": bad, "by": "meaning"})
            assert response.status_code == 422, (path, bad)
            assert response.json()["detail"][0]["loc"] == ["query", "template"]
    page = client.get("/search/images", params={"q": "dog", "template": "{} {}"})
    assert page.status_code == 422 and "Invalid value for template." in page.text


@pytest.mark.parametrize(
    "q, status, found",
    [
        ("", 200, False),
        ("   ", 200, False),
        ("\x00\x01\u202e", 200, False),
        ("d" * 10_000, 422, False),
        ("dog" + "\x00" * 3, 200, True),
        ("собака у моря", 200, True),
        ("犬", 200, True),
        ("🐕🐕", 200, True),
    ],
)
def test_bad_queries_get_a_clear_answer(client, q, status, found):
    for path, by, key in (("/api/search/images", {}, "images"), ("/api/search", {"by": "meaning"}, "meaning_results")):
        response = client.get(path, params={"q": q, **by})
        assert response.status_code == status, (path, q[:20])
        if status == 422:
            assert response.json()["detail"][0]["loc"] == ["query", "q"]
        else:
            assert bool(response.json()[key]) is found, (path, q[:20])
    page = client.get("/search/images", params={"q": q})
    assert page.status_code == status
    if status == 422:
        assert "Invalid value for q." in page.text


def test_a_prompt_longer_than_the_context_is_cut_and_says_so(client, open_clip_text):
    tower = client.app.state.meaning.tower
    long = " ".join(f"w{n}" for n in range(100))[:200]  # 200 characters, about 100 tokens
    assert len(tower.tokenizer.encode(f"a photo of {long}")) > tower.context_length
    data = client.get("/api/search/images", params={"q": long, "limit": 3}).json()
    assert data["truncated"] is True and data["images"]
    vector, truncated = client.app.state.meaning.embed(long, "a photo of {}")
    np.testing.assert_allclose(vector, open_clip_text(f"a photo of {long}"), atol=1e-6)  # what the tower reads
    assert truncated
    assert client.get("/api/search", params={"q": long, "by": "meaning"}).json()["truncated"] is True
    assert "cut to fit" in client.get("/search/images", params={"q": long}).text
    assert client.get("/api/search/images", params={"q": "dog"}).json()["truncated"] is False


def test_meaning_is_the_default_when_ready_and_words_stay_as_they_were(client):
    default = client.get("/api/search", params={"q": "dog"}).json()
    assert default["by"] == "meaning" and default["meaning_results"] and default["meaning"]["state"] == "ready"
    words = client.get("/api/search", params={"q": "dog", "by": "words"}).json()
    assert words["by"] == "words" and words["label_results"] and not words["meaning_results"]
    page = client.get("/search", params={"q": "dog"}).text
    assert 'value="meaning" checked' in page and 'value="words">' in page
    for result in default["meaning_results"]:
        assert f'href="{result["url"]}"' in page
    assert 'value="words" checked' in client.get("/search", params={"q": "dog", "by": "words"}).text
    assert client.get("/api/search", params={"q": "20/7", "by": "meaning"}).headers["location"] == (
        "/api/layers/20/features/7"
    )
    missing = client.get("/api/search", params={"q": "20/999", "by": "meaning"}).json()
    assert missing["message"] == "No feature 999 on layer 20 in this index." and not missing["meaning_results"]


def test_each_page_and_its_twin_carry_the_same_results(client):
    for url, key in (("/search/images?q=a+cat", "images"), ("/search?q=a+cat&by=meaning&layer=20", "meaning_results")):
        page = client.get(url)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        twin = "/api" + url
        assert f'<link rel="alternate" type="application/json" href="{html.escape(twin)}">' in page.text
        data = client.get(twin).json()
        assert data[key]
        for item in data[key]:
            assert f'href="{item["page_url"] if key == "images" else item["url"]}"' in page.text
    fragment = client.get("/search/images?q=dog", headers={"HX-Request": "true", "HX-Target": "results"}).text
    assert "<html" not in fragment and "/samples/" in fragment


def test_the_vectors_are_exported_once_per_index_and_shared(client, meaning_index, meaning_cache):
    folder = meaning_cache / client.app.state.index.index_id
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert files == ["features.ids.npy", "features.npy", "images.ids.npy", "images.npy"]
    written = {name: (folder / name).stat().st_mtime_ns for name in files}
    with meaning_client(meaning_index, meaning_cache, text=False) as second:
        wait_meaning(second)
        assert second.app.state.meaning.status("images", needs_text=False).ready
        assert isinstance(second.app.state.meaning.vectors["images"].matrix, np.memmap)
    assert {name: (folder / name).stat().st_mtime_ns for name in files} == written


def test_without_a_usable_cache_folder_the_vectors_stay_in_memory(meaning_index, tmp_path, client):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with meaning_client(meaning_index, blocker) as other:
        wait_meaning(other)
        assert not isinstance(other.app.state.meaning.vectors["images"].matrix, np.memmap)
        same = other.get("/api/search/images", params={"q": "dog", "limit": 50}).json()
    assert same == client.get("/api/search/images", params={"q": "dog", "limit": 50}).json()


def test_an_index_not_stored_in_id_order_is_read_in_id_order(meaning_index, tmp_path, client):
    shuffled = tmp_path / "shuffled.duckdb"
    shuffled.write_bytes(meaning_index.read_bytes())
    with duckdb.connect(str(shuffled)) as con:
        con.execute("CREATE TABLE reversed AS SELECT * FROM samples ORDER BY image_id DESC")
        con.execute("DROP TABLE samples")
        con.execute("ALTER TABLE reversed RENAME TO samples")
    with meaning_client(shuffled, tmp_path / "cache") as other:
        wait_meaning(other)
        found = other.get("/api/search/images", params={"q": "mountain", "limit": N_SAMPLE}).json()["images"]
    expected = client.get("/api/search/images", params={"q": "mountain", "limit": N_SAMPLE}).json()["images"]
    assert found == expected


# ---------------------------------------------------------------- when search by meaning is unavailable


def check_unavailable(client: TestClient, reason: str, status: int = 503) -> None:
    """JSON: `status` with the one-line reason; pages: explained; word search: as always."""
    for path in ("/api/search/images?q=dog", "/api/search?q=dog&by=meaning"):
        response = client.get(path)
        assert response.status_code == status, path
        detail = response.json()["detail"]
        assert reason in detail and "\n" not in detail, detail
    for path in ("/search/images?q=dog", "/search?q=dog&by=meaning", "/search?q=dog"):
        page = client.get(path)
        assert page.status_code == 200 and str(escape(reason)) in page.text, path
    words = client.get("/api/search", params={"q": "dog"}).json()
    assert words["by"] == "words" and words["label_results"] and reason in words["meaning"]["message"]
    assert client.get("/api/search/images").json()["images"] == []  # nothing asked: nothing to refuse


def test_text_tower_off(meaning_index, meaning_cache):
    with meaning_client(meaning_index, meaning_cache, text=False) as client:
        wait_meaning(client)
        check_unavailable(client, "Search by meaning is turned off (--no-text).")
        assert client.get("/api/search/images").json()["meaning"]["state"] == "off"


def test_text_tower_that_cannot_load(meaning_index, meaning_cache, tmp_path):
    with meaning_client(meaning_index, meaning_cache, live_model=f"local-dir:{tmp_path / 'missing'}") as client:
        wait_meaning(client)
        check_unavailable(client, "CLIP's text tower could not be loaded, so search by meaning is off")
        assert str(tmp_path) not in client.get("/api/search/images?q=dog").text  # local paths stay private


def test_text_tower_of_another_width(meaning_index, meaning_cache, tmp_path):
    from clipscope_explorer.precompute.demo.scenes import save_tiny_clip, tiny_clip_config

    config = tiny_clip_config()
    folder = save_tiny_clip(tmp_path / "wide", {**config, "embed_dim": 48})
    with meaning_client(meaning_index, meaning_cache, live_model=f"local-dir:{folder}") as client:
        wait_meaning(client)
        check_unavailable(client, "it embeds text in 48 dimensions, the index's images in 32")


def test_text_tower_still_loading(meaning_index, meaning_cache, monkeypatch):
    from clipscope_explorer.app.meaning.service import MeaningService

    release = threading.Event()
    load = MeaningService._load_tower
    monkeypatch.setattr(MeaningService, "_load_tower", lambda self: release.wait(60) and load(self))
    with meaning_client(meaning_index, meaning_cache) as client:
        response = client.get("/api/search/images?q=dog")
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        check_unavailable(client, "CLIP's text tower is loading")
        release.set()
        wait_meaning(client)
        assert client.get("/api/search/images?q=dog").status_code == 200


def test_index_built_without_embeddings(tmp_path, tiny_model_spec, meaning_cache):
    index = build_index(
        tmp_path / "plain.duckdb", model={"name": tiny_model_spec, "pretrained": None}, embeddings=False
    )
    with meaning_client(index, meaning_cache) as client:
        wait_meaning(client)
        check_unavailable(client, "This index was built with --no-embeddings")
        assert client.get("/api/search/images").json()["meaning"]["state"] == "off"
        assert client.app.state.meaning.tower is None  # nothing to search: the text tower is not loaded


def test_the_no_text_flag():
    from clipscope_explorer.app.serving.server import ServeOptions, live_environment
    from clipscope_explorer.cli import build_parser, options_from

    def environment(*flags: str) -> dict[str, str]:
        return live_environment(options_from(ServeOptions, build_parser().parse_args(["serve", "i.duckdb", *flags])))

    assert environment("--no-text")["CLIPSCOPE_TEXT"] == "false"
    assert "CLIPSCOPE_TEXT" not in environment() and "CLIPSCOPE_TEXT" not in environment("--no-live")


def test_hostile_values_with_the_text_tower_ready(client):
    """test_hostile.py's values in every parameter of both searches, now that they reach the text tower."""
    from tests.app.test_hostile import QUERY_VALUES, check_safe

    for path, names in (
        ("/api/search", ("q", "template", "by", "layer", "limit")),
        ("/api/search/images", ("q", "template", "limit")),
        ("/search/images", ("q", "template")),
    ):
        for name in names:
            for value in QUERY_VALUES:
                params = {"q": "dog", "by": "meaning", name: value} if path == "/api/search" else {name: value}
                check_safe(client.get(path, params=params), f"{path}?{name}={value[:40]!r}")

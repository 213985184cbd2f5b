"""Live encoding in the app: the upload page, results and their share links, the store, and
what the server does when live encoding is off or cannot load."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from tests import image_cases as cases
from tests.app.conftest import live_app_client, wait_live

HX = {"HX-Request": "true", "HX-Target": "upload-result"}


def image(seed: int) -> bytes:
    return cases.encode(cases.noisy((160, 120), seed=seed), "JPEG")


def upload(client, data: bytes, path: str = "/api/encode", headers=None, **fields):
    return client.post(path, files={"file": ("photo.jpg", data, "image/jpeg")}, data=fields, headers=headers or {})


def test_upload_page_offers_the_live_layers(live_client):
    text = live_client.get("/upload").text
    assert 'id="upload-form"' in text and 'enctype="multipart/form-data"' in text
    assert 'name="layers" value="1" checked' in text and 'name="layers" value="2" checked' in text
    assert 'href="/upload"' in text  # the nav link
    live = live_client.get("/api/upload").json()["live"]
    assert live["state"] == "ready" and live["layers"] == [1, 2] and live["index_layers"] == [1, 2]
    assert live["model"].startswith("local-dir:") and live["store_uploads"]
    assert live["precision"] == "fp32" and f"<code>{live['model']}</code>, fp32)" in text  # the tiny index: CPU, fp32


def test_every_page_links_to_upload(client):
    assert '<a href="/upload" hx-boost="false">Upload</a>' in client.get("/").text  # a full load: upload.js


def test_json_result_follows_the_contract(live_client):
    data = upload(live_client, image(1), layers="2", top="5").json()
    assert set(data) >= {"upload_id", "layers"} and re.fullmatch(r"[0-9a-f]{32}", data["upload_id"])
    layer = data["layers"]["2"]
    assert len(layer["features"]) == 5 and layer["n_firing"] >= 5 and layer["in_index"]
    first = layer["features"][0]
    assert set(first) >= {"feature", "activation", "cls_activation", "heatmap", "label_terms", "top_images", "url"}
    assert len(first["heatmap"]) == 256 and len(layer["winners"]) == 256
    assert first["url"] == f"/layers/2/features/{first['feature']}" and len(first["top_images"]) <= 4
    assert layer["patches"] is None
    with_patches = upload(live_client, image(1), layers="2", patches="true").json()["layers"]["2"]["patches"]
    assert len(with_patches) == 256 and all(v > 0 for patch in with_patches for _, v in patch)
    winners = with_patches and [patch[0][0] if patch else None for patch in with_patches]
    assert winners == layer["winners"]


def test_result_shows_each_features_first_top_images(live_client):
    features = upload(live_client, image(4), layers="2", top="12").json()["layers"]["2"]["features"]
    assert features and all(f["url"] for f in features) and any(f["top_images"] for f in features)
    for feature in features:
        page = live_client.get(f"/api{feature['url']}").json()
        expected = [example["image_id"] for example in page["top_images"][:4]]
        assert [image["image_id"] for image in feature["top_images"]] == expected
        assert all(image["thumbnail_url"].endswith(f"/{image['image_id']}.jpg") for image in feature["top_images"])


def test_html_upload_redirects_to_its_share_link(live_client):
    response = upload(live_client, image(2), path="/upload", sort="cls")
    assert response.status_code == 303
    location = response.headers["location"]
    assert re.fullmatch(r"/uploads/[0-9a-f]{32}\?sort=cls", location)
    page = live_client.get(location)
    assert page.status_code == 200 and '<b aria-current="true">CLS activation</b>' in page.text
    upload_id = location.split("/")[2].split("?")[0]
    assert f'<meta property="og:image" content="http://testserver/uploads/{upload_id}/preview.jpg">' in page.text
    assert '<link rel="alternate" type="application/json" href="/api/uploads/' in page.text
    twin = live_client.get(f"/api/uploads/{upload_id}?sort=cls").json()
    assert twin["upload_id"] == upload_id and twin["sort"] == "cls"
    cls = [f["cls_activation"] for f in twin["layers"]["1"]["features"]]
    assert cls == sorted(cls, reverse=True)


def test_htmx_upload_gets_the_fragment_and_a_pushed_url(live_client):
    response = upload(live_client, image(3), path="/upload", headers=HX)
    assert response.status_code == 200 and "<html" not in response.text
    assert 'class="upload-result"' in response.text and 'class="live-view"' in response.text
    assert re.fullmatch(r"/uploads/[0-9a-f]{32}\?sort=max", response.headers["HX-Push-Url"])
    assert "data-patches=" in response.text and response.text.count("<rect x=") == 256
    lazy = re.search(r'hx-get="(/uploads/[0-9a-f]{32}\?layers=1&amp;sort=max&amp;top=16)"', response.text)
    assert lazy, "the second layer loads when opened"
    assert 'class="live-view"' in live_client.get(lazy.group(1).replace("&amp;", "&")).text


def test_stored_images_and_preview_are_cacheable(live_client):
    data = upload(live_client, image(4)).json()
    for url, kind in ((data["image_url"], "image/jpeg"), (data["preview_url"], "image/jpeg")):
        first = live_client.get(url)
        assert first.status_code == 200 and first.headers["content-type"] == kind
        assert "immutable" in first.headers["cache-control"]
        again = live_client.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304
    with Image.open(io.BytesIO(live_client.get(data["preview_url"]).content)) as preview:
        assert (preview.format, preview.size) == ("JPEG", (1200, 630))  # the OpenGraph card size


def test_a_repeated_upload_is_not_encoded_again(live_client):
    data = image(5)
    first = upload(live_client, data).json()
    batches = live_client.app.state.live.encoder.batcher.batches
    again = upload(live_client, data).json()
    assert again == first and live_client.app.state.live.encoder.batcher.batches == batches


@pytest.mark.parametrize(
    "url, status",
    [
        ("/uploads/0123456789abcdef0123456789abcdef", 404),
        ("/uploads/../../etc/passwd", 404),
        ("/uploads/not-an-id", 404),
        ("/api/uploads/0123456789abcdef0123456789abcdef", 404),
        ("/uploads/0123456789abcdef0123456789abcdef/image.jpg", 404),
    ],
)
def test_unknown_uploads_are_404(live_client, url, status):
    response = live_client.get(url)
    assert response.status_code == status and "Traceback" not in response.text


def test_stored_result_with_bad_query_is_422(live_client):
    upload_id = upload(live_client, image(6)).json()["upload_id"]
    for query in ("layers=7", "layers=x", "sort=evil", "top=0"):
        for prefix in ("", "/api"):
            assert live_client.get(f"{prefix}/uploads/{upload_id}?{query}").status_code == 422, query


def test_an_unwritable_store_loses_only_the_share_links(live_index, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder")
    with live_app_client(live_index, blocker / "uploads") as client:
        wait_live(client)
        assert client.get("/api/upload").json()["live"]["store_uploads"] is False
        data = upload(client, image(12)).json()
        assert data["stored"] is False and data["url"] is None and data["layers"]["2"]["features"]


@pytest.mark.parametrize(
    "sort, key",
    [("max", "activation"), ("patch", "patch_activation"), ("cls", "cls_activation"), ("mean", "mean_activation")],
)
def test_each_ranking_lists_the_strongest_features_by_its_key(live_client, sort, key):
    everything = upload(live_client, image(13), layers="2", top="1000").json()["layers"]["2"]
    ranked = upload(live_client, image(13), layers="2", sort=sort, top="5").json()["layers"]["2"]["features"]
    assert len(everything["features"]) == everything["n_firing"] > 5
    values = [f[key] for f in ranked]
    assert values == sorted(values, reverse=True)
    assert values[0] == max(f[key] for f in everything["features"])
    assert values[-1] >= sorted((f[key] for f in everything["features"]), reverse=True)[4]
    for feature in everything["features"]:  # the heatmap's peak and mean over its 256 patches, CLS excluded
        assert feature["patch_activation"] == pytest.approx(max(feature["heatmap"]), rel=1e-6)
        assert feature["mean_activation"] == pytest.approx(sum(feature["heatmap"]) / 256, rel=1e-5, abs=1e-6)


def test_another_model_encodes_uploads_without_index_links(live_index, tmp_path):
    from clipscope_explorer.precompute.demo.scenes import save_tiny_clip

    other = f"local-dir:{save_tiny_clip(tmp_path / 'other_clip', seed=7)}"
    with live_app_client(live_index, tmp_path / "store", live_model=other) as client:
        wait_live(client)
        live = client.get("/api/upload").json()["live"]
        assert live["model"] == "local-dir:other_clip" and live["index_layers"] == []  # its folder's name
        data = upload(client, image(14), layers="2").json()
        layer = data["layers"]["2"]
        assert not layer["in_index"] and layer["features"]
        assert all(f["url"] is None and not f["top_images"] for f in layer["features"])
        assert data["nearest_images"] == [] and data["zero_shot_labels"] == []  # another embedding space


def test_no_store_keeps_nothing(live_index, tmp_path):
    store = tmp_path / "never"
    with live_app_client(live_index, None, upload_store=store) as client:
        wait_live(client)
        data = upload(client, image(7)).json()
        assert data["stored"] is False and data["url"] is None and data["image_url"] is None
        page = upload(client, image(7), path="/upload")
        assert page.status_code == 200 and 'src="data:image/jpeg;base64,' in page.text
        assert "not kept" in page.text
        assert client.get(f"/uploads/{data['upload_id']}").status_code == 404
    assert not store.exists()


def test_live_off_still_serves_the_index_and_explains(live_index, tmp_path):
    with live_app_client(live_index, tmp_path, live=False) as client:
        assert client.get("/").status_code == 200
        text = client.get("/upload").text
        assert "turned off" in text and "--live-model" in text and 'id="upload-form"' not in text
        response = upload(client, image(8))
        assert response.status_code == 503 and "--live-model" in response.json()["detail"]


def test_unloadable_weights_still_serve_the_index_and_explain(live_index, tmp_path):
    with live_app_client(live_index, tmp_path, live_model="local-dir:/nonexistent/model") as client:
        wait_live(client, "failed")
        assert client.get("/layers/1").status_code == 200
        text = client.get("/upload").text
        assert "could not be loaded" in text and "To enable uploads" in text
        assert client.get("/api/upload").json()["live"]["state"] == "failed"
        assert upload(client, image(9)).status_code == 503


def test_overridden_layers_and_sae(live_index, tiny_sae_repo, tmp_path):
    with live_app_client(live_index, tmp_path, live_layers=[2], live_sae=f"{tiny_sae_repo}/") as client:
        wait_live(client)
        assert client.get("/api/upload").json()["live"]["layers"] == [2]
        data = upload(client, image(10)).json()
        layer = data["layers"]["2"]
        assert list(data["layers"]) == ["2"] and not layer["in_index"]
        assert all(f["url"] is None and f["label"] is None for f in layer["features"])
        assert upload(client, image(10), layers="1").status_code == 422


def test_stored_results_outlive_the_encoder(live_index, tmp_path):
    # nearest images come from the vectors, mapped in the background: both apps wait for them
    with live_app_client(live_index, tmp_path) as client:
        wait_live(client)
        assert client.app.state.meaning.wait(120)
        data = upload(client, image(11)).json()
    with live_app_client(live_index, tmp_path, live=False) as client:  # a restart without a model
        assert client.app.state.meaning.wait(120)
        again = client.get(f"/api/uploads/{data['upload_id']}").json()
        assert again.pop("interventions") is False and data.pop("interventions") is True  # no model to edit with
        assert again == data
        page = client.get(data["url"])
        assert page.status_code == 200 and data["layers"]["2"]["features"][0]["url"] in page.text


def test_store_evicts_the_least_recently_used(tmp_path):
    import os

    import numpy as np

    from clipscope_explorer.app.live.store import UploadStore

    store = UploadStore(tmp_path, max_bytes=10**9)
    codes = {1: (np.ones((257, 8), np.float32), np.ones((257, 8), np.int32))}
    ids = [f"{n:032x}" for n in (1, 2, 3)]
    first = store.save(ids[0], 10, 10, b"\xff" * 5000, codes, [1])
    store.save(ids[1], 10, 10, b"\xff" * 5000, codes, [1])
    for age, upload_id in ((2000, ids[0]), (1000, ids[1])):  # the first is older...
        os.utime(store.get(upload_id, touch=False).folder / "meta.json", (age, age))
    assert store.get(ids[0]) is not None  # ...but viewed just now
    size = sum(p.stat().st_size for p in first.folder.iterdir())
    store.max_bytes = int(size * 2.5)
    store.save(ids[2], 10, 10, b"\xff" * 5000, codes, [1])
    assert store.get(ids[1]) is None and store.get(ids[0]) is not None and store.get(ids[2]) is not None
    assert store.get("../" + ids[0][3:]) is None


def test_while_loading_uploads_are_503_with_retry_after(live_index, tmp_path):
    with live_app_client(live_index, tmp_path) as client:
        wait_live(client)
        client.app.state.live.state = "loading"  # as between start and the end of loading
        response = upload(client, image(12))
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert "still loading" in client.get("/upload").text


def test_uploads_say_where_their_time_went(live_client):
    """`Server-Timing` (shown by browser devtools): every phase of a fresh upload, none of a stored one."""
    import time

    start = time.perf_counter()
    response = upload(live_client, image(41))
    elapsed_ms = (time.perf_counter() - start) * 1e3
    phases = dict(re.findall(r"(\w+);dur=([0-9.]+)", response.headers["server-timing"]))
    assert list(phases) == ["read", "decode", "encode", "store", "describe"]
    assert 0 < sum(map(float, phases.values())) <= elapsed_ms
    again = upload(live_client, image(41))  # the same bytes: answered from the store
    assert re.findall(r"(\w+);dur=", again.headers["server-timing"]) == ["read", "describe"]
    html = upload(live_client, image(42), path="/upload", headers=HX)
    assert "encode;dur=" in html.headers["server-timing"]

"""Thumbnails, overlays, position maps and preview cards: formats, colours and caching."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from clipscope_explorer.app.images import viridis
from clipscope_explorer.app.queries import dequantise


def _open(response) -> Image.Image:
    return Image.open(io.BytesIO(response.content))


def _top(index, layer=20, feature=8):
    return [r for r in index.examples(layer, feature, heatmaps=True) if r["kind"] == "top"]


def test_thumbnail_is_the_stored_jpeg_cached_forever(client, index):
    image_id = _top(index)[0]["image_id"]
    url = f"/images/{index.index_id}/{image_id}.jpg"
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == index.thumbnail(image_id)
    assert _open(response).size == (224, 224)
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    etag = response.headers["etag"]
    assert index.index_id in etag
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""


def test_overlay_is_one_pixel_per_patch_normalised_per_feature(client, index):
    row = _top(index)[0]
    feature_max = index.feature(20, 8)["max_activation"]
    response = client.get(f"/images/{index.index_id}/layers/20/features/8/{row['image_id']}.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    rgba = np.asarray(_open(response).convert("RGBA")).reshape(-1, 4)
    values = dequantise(row["heatmap_scale"], row["heatmap"])
    assert rgba.shape == (256, 4)
    assert (rgba[values == 0, 3] == 0).all(), "patches where the feature does not fire are transparent"
    assert (rgba[values > 0, 3] > 0).all()
    peak = int(np.argmax(values))
    expected = viridis()[int(round(min(values[peak] / feature_max, 1) * 255))]
    assert np.abs(rgba[peak, :3].astype(int) - expected.astype(int)).max() <= 1
    assert "r1-o20.8." in response.headers["etag"]


def test_positions_preview_and_mse_maps(client, index):
    base = f"/images/{index.index_id}"
    positions = client.get(f"{base}/layers/20/features/8/positions.png")
    assert positions.status_code == 200 and _open(positions).size == (16, 16)
    dead = client.get(f"{base}/layers/20/features/5/positions.png")
    assert dead.status_code == 200
    preview = client.get(f"{base}/layers/20/features/8/preview.jpg")
    assert preview.status_code == 200 and _open(preview).size == (1200, 630)
    assert client.get(f"{base}/layers/20/features/5/preview.jpg").status_code == 200
    mse = client.get(f"{base}/layers/11/mse.png")
    assert mse.status_code == 200 and _open(mse).size == (16, 16)
    corner, centre = np.asarray(_open(mse).convert("RGB"))[0, 0], np.asarray(_open(mse).convert("RGB"))[8, 8]
    assert tuple(corner) != tuple(centre)


def test_image_errors(client, index):
    base = f"/images/{index.index_id}"
    other = index.examples(20, 9, heatmaps=False)
    foreign = next(r["image_id"] for r in other if r["image_id"] not in {e["image_id"] for e in _top(index)})
    for url, status in [
        (f"/images/0000000000000000/{_top(index)[0]['image_id']}.jpg", 404),
        (f"{base}/999999.jpg", 404), (f"{base}/abc.jpg", 404),
        (f"{base}/layers/20/features/8/{foreign}.png", 404), (f"{base}/layers/99/features/8/1.png", 404),
        (f"{base}/layers/20/features/64/positions.png", 404), (f"{base}/layers/99/mse.png", 404),
    ]:
        response = client.get(url)
        assert response.status_code == status, url
        assert response.headers["content-type"].startswith("text/plain"), url


def test_viridis_endpoints():
    table = viridis()
    assert table.shape == (256, 3)
    assert tuple(table[0]) == (0x44, 0x01, 0x54) and tuple(table[-1]) == (0xfd, 0xe7, 0x25)

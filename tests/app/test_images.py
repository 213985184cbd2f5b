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
        (f"{base}/999999.jpg", 404),
        (f"{base}/abc.jpg", 404),
        (f"{base}/layers/20/features/8/{foreign}.png", 404),
        (f"{base}/layers/99/features/8/1.png", 404),
        (f"{base}/layers/20/features/64/positions.png", 404),
        (f"{base}/layers/99/mse.png", 404),
    ]:
        response = client.get(url)
        assert response.status_code == status, url
        assert response.headers["content-type"].startswith("text/plain"), url


def test_viridis_endpoints():
    table = viridis()
    assert table.shape == (256, 3)
    assert tuple(table[0]) == (0x44, 0x01, 0x54) and tuple(table[-1]) == (0xFD, 0xE7, 0x25)


def _revalidate(client, url: str, *values: str):
    return client.get(url, headers=[("If-None-Match", value) for value in values])


def test_a_validator_for_a_missing_image_is_a_404_not_a_304(client, index):
    """ETags follow `"<index id>-<object id>"`; one made up for an object that does not exist names nothing."""
    base = f"/images/{index.index_id}"
    other = index.examples(20, 9, heatmaps=False)
    foreign = next(r["image_id"] for r in other if r["image_id"] not in {e["image_id"] for e in _top(index)})
    for url, etag in [
        (f"{base}/999999.jpg", f'"{index.index_id}-t999999"'),
        (f"{base}/layers/20/features/8/{foreign}.png", f'"{index.index_id}-r1-o20.8.{foreign}"'),
        (f"{base}/layers/20/features/64/positions.png", f'"{index.index_id}-r1-p20.64"'),
        (f"{base}/layers/99/mse.png", f'"{index.index_id}-r1-m99"'),
    ]:
        for value in (etag, "*", f"W/{etag}"):
            response = _revalidate(client, url, value)
            assert response.status_code == 404, (url, value)
            assert "immutable" not in response.headers.get("cache-control", ""), url


def test_if_none_match_star_weak_and_lists(client, index):
    """RFC 9110: `*` matches any current representation; If-None-Match compares weakly (`W/"x"` matches
    `"x"`); a field is a comma-separated list and may come in several lines."""
    url = f"/images/{index.index_id}/{_top(index)[0]['image_id']}.jpg"
    fresh = client.get(url)
    etag = fresh.headers["etag"]
    for values in [
        ("*",),
        (f"W/{etag}",),
        (f'"other", {etag}',),
        (f'W/"a,b", W/{etag}, "c"',),
        ('"other"', etag),
        (f"{etag}, *",),
    ]:
        response = _revalidate(client, url, *values)
        assert response.status_code == 304 and response.content == b"", values
        assert response.headers["etag"] == etag and response.headers["cache-control"] == fresh.headers["cache-control"]
    for values in [('"other"',), ('W/"other", "x"',), (etag.strip('"'),), (etag.lower() + "x",), (f"w/{etag}",), ("",)]:
        response = _revalidate(client, url, *values)
        assert response.status_code == 200 and response.content == fresh.content, values


def test_none_match_parsing():
    from clipscope_explorer.app.caching import none_match

    assert none_match(['"a,b"'], '"a,b"') and not none_match(['"a,b"'], '"a"')
    assert none_match(['"x"', 'W/"y"'], '"y"') and none_match(['W/"y"'], 'W/"y"')
    assert not none_match([], '"y"') and not none_match(['"y'], '"y"') and not none_match(["y"], '"y"')

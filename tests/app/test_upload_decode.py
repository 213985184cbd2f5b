"""An upload is decoded as the precompute job decodes the same bytes (model input and size), whatever its shape,
format or mode; through the route, a strip thousands of times longer than wide is encoded like any image and
keeps its true size, and a format too costly to decode at that size is a one-line 413."""

from __future__ import annotations

import io

import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from clipscope_explorer.app.live.input import decode
from clipscope_explorer.app.live.store import VIEW_SIZE
from clipscope_explorer.precompute.sources import Shard, decode_sample
from tests import image_cases as cases

OPEN_CLIP = image_transform_v2(PreprocessCfg(size=224), is_train=False)
CASES = {
    "ordinary-jpeg": lambda: cases.encode(cases.noisy((320, 240)), "JPEG"),
    "strip-png": lambda: cases.encode(cases.noisy((3, 5000)), "PNG"),
    "wide-rgba-png": lambda: cases.encode(cases.in_mode("RGBA", (3000, 40)), "PNG"),
    "rotated-wide-jpeg": lambda: cases.oriented_jpeg(cases.noisy((900, 30)), 6),
    "tall-16-bit-png": lambda: cases.encode(cases.in_mode("I;16", (50, 1500)), "PNG"),
    "animated-strip-gif": lambda: cases.animated((2, 3000)),
    "cmyk-jpeg": lambda: cases.encode(cases.in_mode("CMYK", (700, 90)), "JPEG"),
    "rgba-webp": lambda: cases.encode(cases.in_mode("RGBA", (90, 2500)), "WEBP"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_upload_gets_the_pixels_and_size_the_index_gets(name):
    data = CASES[name]()
    sample = decode_sample(Shard(0, "folder", ("image",)), 0, "image", {"image": data}, OPEN_CLIP, 224)
    upload = decode(data, OPEN_CLIP)
    assert sample.error is None
    assert upload.size == (sample.width, sample.height)
    assert torch.equal(upload.pixels, sample.pixels)
    assert upload.image.size == (VIEW_SIZE, VIEW_SIZE)


def test_a_strip_is_encoded_with_its_true_size(live_client):
    data = cases.encode(cases.noisy((2, 30_000)), "PNG")
    response = live_client.post("/api/encode", files={"file": ("strip.png", data, "image/png")})
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["width"], result["height"]) == (2, 30_000)
    view = live_client.get(result["image_url"])
    assert view.status_code == 200
    assert Image.open(io.BytesIO(view.content)).size == (VIEW_SIZE, VIEW_SIZE)


def test_a_format_too_costly_to_decode_at_its_size_is_413(live_client, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # a budget of 160,000 bytes
    png = cases.encode(Image.new("RGBA", (120, 120), (1, 2, 3, 4)), "PNG")  # 8 bytes a pixel: 115,200
    webp = cases.encode(Image.new("RGB", (120, 120), (1, 2, 3)), "WEBP", lossless=True)  # 16: 230,400
    assert live_client.post("/api/encode", files={"file": ("a.png", png, "image/png")}).status_code == 200
    response = live_client.post("/api/encode", files={"file": ("a.webp", webp, "image/webp")})
    assert response.status_code == 413
    assert response.json() == {
        "detail": "the image is 120 x 120 pixels; a WEBP RGB image takes 16 bytes a pixel "
        "to decode, so at most 10,000 pixels are accepted"
    }

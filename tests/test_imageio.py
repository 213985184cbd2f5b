"""`clipscope_explorer.precompute.model.imageio.open_picture`, the one decoder of the job and of uploads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageOps

from clipscope_explorer.precompute.model.imageio import (
    BAND_PIXELS,
    MAX_ASPECT,
    ImageDecodeError,
    jpeg_bytes,
    open_picture,
    open_rgb,
    square_crop,
    to_rgb,
)
from tests import image_cases as cases

OPEN_CLIP = image_transform_v2(PreprocessCfg(size=224), is_train=False)  # CLIP ViT-L/14's own preprocessing


@pytest.mark.parametrize(
    "make",
    [
        cases.cmyk_jpeg,
        cases.palette_png,
        cases.palette_transparent_png,
        cases.grey_png,
        cases.grey_alpha_png,
        cases.rgba_png,
        cases.sixteen_bit_png,
        cases.animated_gif,
    ],
)
def test_every_mode_becomes_8_bit_rgb(make):
    image = open_rgb(make())
    assert image.mode == "RGB" and image.width > 0


def test_cmyk_colours_survive():
    red = np.asarray(open_rgb(cases.cmyk_jpeg()))[10, 10]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_sixteen_bit_is_scaled_not_clipped():
    assert np.asarray(open_rgb(cases.sixteen_bit_png(65535))).min() == 255
    assert abs(int(np.asarray(open_rgb(cases.sixteen_bit_png(32896)))[0, 0, 0]) - 128) <= 1


def test_transparency_is_matted_on_white():
    assert (np.asarray(open_rgb(cases.rgba_png(alpha=0))) == 255).all()
    opaque = np.asarray(open_rgb(cases.rgba_png(alpha=255)))[0, 0]
    assert opaque.tolist() == [10, 20, 30]
    palette = np.asarray(open_rgb(cases.palette_transparent_png()))
    assert palette[0, 0].tolist() == [255, 0, 0] and palette[0, 31].tolist() == [255, 255, 255]


def test_animation_gives_its_first_frame():
    assert np.asarray(open_rgb(cases.animated_gif()))[5, 5].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied():
    assert open_rgb(cases.exif_rotated_jpeg(6)).size == (30, 60)
    assert open_rgb(cases.exif_rotated_jpeg(1)).size == (60, 30)


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: b"", "empty"),
        (lambda: b"just some text, not an image", "not_image"),
        (cases.svg, "svg"),
        (cases.truncated_jpeg, "truncated"),
        (cases.corrupt_png, "corrupt"),
        (cases.bomb_png, "too_large"),
    ],
)
def test_bad_bytes_raise_one_line_errors(make, kind):
    with pytest.raises(ImageDecodeError) as error:
        open_rgb(make())
    assert error.value.kind == kind
    assert "\n" not in str(error.value) and str(error.value)


def test_pixel_limit_is_adjustable():
    with pytest.raises(ImageDecodeError, match="pixel limit"):
        open_rgb(cases.encode(cases.noisy((50, 50)), "PNG"), max_pixels=2000)


@pytest.mark.parametrize("size", list(cases.TINY.values()), ids=list(cases.TINY))
def test_tiny_and_thin_images_crop_to_the_model_square(size):
    image = open_rgb(cases.encode(Image.new("RGB", size, (1, 2, 3)), "PNG"))
    assert square_crop(image, 224).size == (224, 224)


def test_reencoded_jpeg_carries_no_metadata():
    clean = jpeg_bytes(open_rgb(cases.exif_with_gps_jpeg()))
    assert b"SecretCam" not in clean and b"secret" not in clean and b"Exif" not in clean
    assert Image.open(io.BytesIO(clean)).getexif() == {}


def centre_of_long_side(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box the decoder keeps, computed here from its definition."""
    width, height = size
    keep = MAX_ASPECT * min(size)
    if width > keep:
        return (width - keep) // 2, 0, (width - keep) // 2 + keep, height
    if height > keep:
        return 0, (height - keep) // 2, width, (height - keep) // 2 + keep
    return 0, 0, width, height


ORDINARY = [
    (1, 1),
    (2, 3),
    (7, 5),
    (224, 224),
    (225, 223),
    (300, 200),
    (199, 301),
    (640, 480),
    (480, 640),
    (997, 61),
    (61, 997),
    (1000, 50),
    (50, 1000),
    (21, 420),
    (1, 20),
    (20, 1),
]


@pytest.mark.parametrize("size", ORDINARY, ids=str)
def test_up_to_the_aspect_limit_the_model_gets_open_clips_own_pixels(size):
    data = cases.encode(cases.noisy(size, seed=sum(size)), "PNG")
    picture = open_picture(data)
    assert picture.size == size and picture.image.size == size
    assert torch.equal(OPEN_CLIP(picture.image), OPEN_CLIP(Image.open(io.BytesIO(data)).convert("RGB")))


def _on_white(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)).convert("RGB")


WHOLE_IMAGE = {  # each mode converted all at once, from its definition
    "RGBA": _on_white,
    "LA": _on_white,
    "PA": _on_white,
    "I;16": lambda image: _grey(np.asarray(image, np.float64) / 257),
    "I": lambda image: _grey(np.asarray(image, np.float64) / 257),  # some values are above 255
    "F": lambda image: _grey(np.asarray(image, np.float64)),
    "CMYK": lambda image: image.convert("RGB"),
    "P": lambda image: image.convert("RGB"),
    "1": lambda image: image.convert("RGB"),
    "L": lambda image: image.convert("RGB"),
}


@pytest.mark.parametrize("mode", sorted(WHOLE_IMAGE))
def test_conversion_band_by_band_equals_the_whole_image_at_once(mode):
    image = cases.in_mode(mode, (700, 900))
    assert image.mode == mode and image.width * image.height > 2 * BAND_PIXELS
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(WHOLE_IMAGE[mode](image)))


def test_whether_32_bit_integers_are_scaled_is_decided_for_the_whole_image():
    values = np.full((900, 700), 200, dtype=np.int32)
    values[-1, -1] = 65535  # in the last band only
    assert np.asarray(to_rgb(Image.fromarray(values)))[0, 0].tolist() == [1, 1, 1]  # 200 / 257, rounded


@pytest.mark.parametrize("size", [(1201, 50), (50, 1201), (1, 100), (100, 3), (30_000, 7), (4, 81)], ids=str)
def test_beyond_the_aspect_limit_the_centre_of_the_long_side_is_kept(size):
    whole = cases.noisy(size, seed=3)
    picture = open_picture(cases.encode(whole, "PNG"))
    assert picture.size == size
    assert np.array_equal(np.asarray(picture.image), np.asarray(whole.crop(centre_of_long_side(size))))
    assert max(picture.image.size) == MAX_ASPECT * min(size)


@pytest.mark.parametrize("size", [(1201, 50), (60, 2000)], ids=str)
def test_beyond_the_aspect_limit_the_model_still_sees_the_centre_square(size):
    """Resampled from the kept part, the model's input is that of open_clip on the whole strip within a
    fraction of a grey level on a smooth image (the sampling grid moves by less than a pixel)."""
    whole = cases.gradient(size)
    kept = OPEN_CLIP(open_rgb(cases.encode(whole, "PNG")))
    difference = (kept - OPEN_CLIP(whole)).abs() * torch.tensor([0.27, 0.26, 0.28])[:, None, None] * 255
    assert difference.max() < 3 and difference.mean() < 0.5


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_before_the_centre_is_kept(orientation):
    data = cases.oriented_jpeg(cases.noisy((1500, 30), seed=orientation), orientation)
    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    picture = open_picture(data)
    assert picture.size == displayed.size
    assert np.array_equal(np.asarray(picture.image), np.asarray(displayed.crop(centre_of_long_side(displayed.size))))


@pytest.mark.parametrize("size", [(4000, 3), (3, 4000)], ids=str)
@pytest.mark.parametrize("name", sorted(cases.FORMAT_CASES))
def test_every_format_and_mode_keeps_only_the_centre_of_a_strip(name, size):
    mode, fmt, options = cases.FORMAT_CASES[name]
    picture = open_picture(cases.encode(cases.in_mode(mode, size), fmt, **options))
    assert picture.size == size and picture.image.mode == "RGB"
    assert sorted(picture.image.size) == [3, 3 * MAX_ASPECT]
    assert OPEN_CLIP(picture.image).shape == (3, 224, 224) and square_crop(picture.image, 448).size == (448, 448)


def test_an_animated_strip_gives_the_centre_of_its_first_frame():
    picture = open_picture(cases.animated((2, 50_000)))
    assert picture.size == (2, 50_000) and picture.image.size == (2, 2 * MAX_ASPECT)
    assert np.asarray(picture.image).reshape(-1, 3).tolist() == [[255, 0, 0]] * 2 * 2 * MAX_ASPECT


@pytest.mark.filterwarnings("ignore:Image was not the expected size")
def test_an_icon_cannot_hide_a_strip_or_a_bomb(monkeypatch):
    strip = open_picture(cases.icon_around(cases.encode(Image.new("RGB", (2, 30_000), (9, 9, 9)), "PNG")))
    assert strip.size == (2, 30_000) and strip.image.size == (2, 2 * MAX_ASPECT)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the directory says 16 x 16; the frame is 120 x 100
    with pytest.raises(ImageDecodeError) as error:
        open_picture(cases.icon_around(cases.encode(Image.new("RGB", (120, 100)), "PNG")))
    assert error.value.kind == "too_large"


def test_formats_that_cost_more_to_decode_get_fewer_pixels():
    """A WebP decodes at 16 bytes a pixel, an RGBA PNG at 8: within a budget of 8 bytes a pixel of the
    limit, a WebP may have half as many pixels."""
    size, limit = (100, 100), 15_000
    assert open_picture(cases.encode(Image.new("RGBA", size), "PNG"), max_pixels=limit).size == size
    with pytest.raises(ImageDecodeError) as error:
        open_picture(cases.encode(Image.new("RGB", size), "WEBP", lossless=True), max_pixels=limit)
    assert error.value.kind == "too_large"
    assert str(error.value) == (
        "the image is 100 x 100 pixels; a WEBP RGB image takes 16 bytes a pixel to decode, "
        "so at most 7,500 pixels are accepted"
    )


def test_the_view_is_the_centre_square():
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (100, 0, 200, 100))
    view = np.asarray(square_crop(image, 64)).astype(int)
    assert (np.abs(view[:, 4:60] - [255, 0, 0]).max()) <= 2

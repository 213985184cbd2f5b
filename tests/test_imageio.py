"""`clipscope_explorer.precompute.model.imageio.open_rgb`, the one decoder of the job and of uploads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipscope_explorer.precompute.model.imageio import ImageDecodeError, jpeg_bytes, open_rgb, square_crop
from tests import image_cases as cases


@pytest.mark.parametrize("make", [cases.cmyk_jpeg, cases.palette_png, cases.palette_transparent_png, cases.grey_png,
                                  cases.grey_alpha_png, cases.rgba_png, cases.sixteen_bit_png, cases.animated_gif])
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


@pytest.mark.parametrize("make, kind", [
    (lambda: b"", "empty"), (lambda: b"just some text, not an image", "not_image"), (cases.svg, "svg"),
    (cases.truncated_jpeg, "truncated"), (cases.corrupt_png, "corrupt"), (cases.bomb_png, "too_large"),
])
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
    assert Image.open(__import__("io").BytesIO(clean)).getexif() == {}

"""Safe image decoding, shared by the precompute job and the server's live encoding.

`open_picture(data)` turns encoded bytes into an 8-bit RGB image and the
image's size, the one way every image is read in this project (so an uploaded
copy of an indexed image gives the pixels the index saw):
- only raster formats in `FORMATS` are tried (never SVG, EPS, PDF...);
- Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is enforced
  from the header, before any pixel is decoded, and so is a memory budget:
  `decode_cost` estimates from the header what a pixel costs to decode (the
  decoded pixel, then the larger of the decoder's own buffers and one RGB
  copy, made a band of rows at a time), and an image costing more than
  `BYTES_PER_PIXEL` times the pixel limit is refused (WebP: half the pixels);
- animations give their first frame; EXIF orientation is applied;
- greyscale, palette, CMYK, 16-bit and float modes become RGB; transparency
  is matted onto white, as img2dataset does when it writes LAION shards;
- an image longer than `MAX_ASPECT` times its short side keeps only the
  centre of its long side, `MAX_ASPECT` times the short side, before it is
  converted: the model and the thumbnails see only the centre square, and
  resizing a 1 x 20,000 strip whole took gigabytes. Up to that ratio the
  pixels are untouched, so the model's own preprocessing gives exactly what it
  gives on the whole image; beyond, the same centre square, resampled from
  the kept part (its sampling grid shifts by under a pixel).
Every failure is an `ImageDecodeError` with a one-line reason and a `kind`.
What follows decoding (model input, views, thumbnails) is sized by its
output; `tests/test_image_memory.py` measures both.

`square_crop` is the model's view (the centre square, resized), used for
thumbnails so that a heatmap covers the right pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Raster formats we decode (JPEG includes multi-picture MPO); anything else is refused before decoding.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "AVIF")
WHITE = (255, 255, 255)
MAX_ASPECT = 20  # longest side over shortest side kept whole; beyond, the centre of the long side
BAND_PIXELS = 1 << 18  # pixels converted to RGB at a time
BYTES_PER_PIXEL = 8  # decoding budget, in bytes per pixel of the pixel limit: an RGBA image and its RGB copy


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image. `kind`: empty, svg, not_image, truncated, corrupt, too_large."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Picture:
    """A decoded image: `image` (RGB) is the part the model may see, `size` the whole image's (width, height)."""

    image: Image.Image
    size: tuple[int, int]


def _formats() -> tuple[str, ...]:
    """FORMATS this Pillow build can open (AVIF is optional)."""
    Image.init()
    return tuple(name for name in FORMATS if name in Image.OPEN)


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in head)


def _to_l(image: Image.Image, full_range: bool) -> Image.Image:
    """Integer/float single-channel modes (16-bit PNG greyscale, TIFF) to 8-bit greyscale."""
    values = np.asarray(image, dtype=np.float64)
    if full_range:
        values = values / 257.0
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def _band_to_rgb(image: Image.Image, full_range: bool) -> Image.Image:
    """Any decoded mode as 8-bit RGB, pixel by pixel; transparency matted onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_l(image, full_range)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "L" and "transparency" in image.info:
        return _band_to_rgb(image.convert("LA"), full_range)
    if image.mode == "RGB" and "transparency" in image.info:
        return _band_to_rgb(image.convert("RGBA"), full_range)
    return image.convert("RGB")


def to_rgb(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """`image` (its `box` if given) as 8-bit RGB, converted a band of rows at a time so that the only
    full-size allocation is the result; an RGB image without transparency is returned as it is."""
    box = box or (0, 0, *image.size)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image if box == (0, 0, *image.size) else image.crop(box)
    # 16-bit samples are scaled to 8 bits; 32-bit integers only when some exceed 255 (a whole-image decision)
    full_range = image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255)
    left, top, right, bottom = box
    result = Image.new("RGB", (right - left, bottom - top))
    rows = max(1, BAND_PIXELS // result.width)
    for y in range(top, bottom, rows):
        band = image.crop((left, y, right, min(y + rows, bottom)))
        result.paste(_band_to_rgb(band, full_range), (0, y - top))
    return result


def model_region(width: int, height: int, max_aspect: int = MAX_ASPECT) -> tuple[int, int, int, int]:
    """The box kept of a width x height image: all of it, or the centre of its long side, `max_aspect` times
    the short side."""
    keep = max_aspect * min(width, height)
    if width > keep:
        left = (width - keep) // 2
        return left, 0, left + keep, height
    if height > keep:
        top = (height - keep) // 2
        return 0, top, width, top + keep
    return 0, 0, width, height


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():  # an icon decodes its frame while opening: bombs stop there too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_formats())
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            "not_image", "not an image in a supported format (JPEG, PNG, WebP, GIF, BMP, TIFF)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("too_large", "the image has too many pixels (decompression bomb limit)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageDecodeError("corrupt", f"the image cannot be read: {type(error).__name__}") from None


def decode_cost(raw: Image.Image) -> float:
    """Peak bytes a pixel of the opened (not yet decoded) `raw` costs until it is RGB: the decoded pixel,
    then the larger of the decoder's own buffers and the RGB copy. An upper bound for every format and mode
    measured in tests/test_image_memory.py."""
    decoded = 1 if raw.mode in ("1", "L", "P") else 2 if raw.mode.startswith("I;16") else 4
    working = 4.0  # the RGB copy
    if raw.format in ("WEBP", "AVIF"):
        working = 12.0  # libwebp: its canvas, the previous frame and the frame's bytes; libavif: YUVA planes, RGBA
    elif raw.format in ("JPEG", "MPO") and raw.layer:  # progressive or multi-scan: every block's coefficients
        most = max(h for _, h, _, _ in raw.layer) * max(v for _, _, v, _ in raw.layer)
        working = max(working, 2.0 * sum(h * v for _, h, v, _ in raw.layer) / most)
    elif raw.format == "TIFF":  # a compressed strip or tile is inflated whole: up to the image, as stored
        working = max(working, sum(raw.tag_v2.get(258, (8,))) / 8)
    return decoded + working


def open_picture(data: bytes, max_pixels: int | None = None) -> Picture:
    """Decode `data` (first frame, EXIF orientation applied); see the module docstring.

    max_pixels defaults to Pillow's `Image.MAX_IMAGE_PIXELS` (about 89 megapixels).
    """
    if not data:
        raise ImageDecodeError("empty", "the file is empty")
    if _looks_like_svg(data):
        raise ImageDecodeError("svg", "SVG is a vector format; upload a raster image (JPEG, PNG, WebP, GIF)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    raw = _open(data)
    width, height = raw.size
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt", "the image has no pixels")
    if limit and width * height > limit:
        raise ImageDecodeError(
            "too_large",
            f"the image is {width} x {height} pixels, more than the {limit:,}-pixel limit (decompression bomb guard)",
        )
    cost = decode_cost(raw)
    if limit and width * height * cost > BYTES_PER_PIXEL * limit:
        raise ImageDecodeError(
            "too_large",
            f"the image is {width} x {height} pixels; a {raw.format} {raw.mode} "
            f"image takes {cost:g} bytes a pixel to decode, so at most "
            f"{int(BYTES_PER_PIXEL * limit / cost):,} pixels are accepted",
        )
    return _decode(raw)


def _decode(raw: Image.Image) -> Picture:
    try:
        raw.seek(0)
        raw.load()
        ImageOps.exif_transpose(raw, in_place=True)
        size = raw.size
        return Picture(to_rgb(raw, model_region(*size)), size)
    except Image.DecompressionBombError:
        raise ImageDecodeError("too_large", "the image has too many pixels (decompression bomb limit)") from None
    except (OSError, EOFError) as error:
        text = str(error).lower()
        kind = "truncated" if "truncat" in text or isinstance(error, EOFError) else "corrupt"
        if kind == "truncated":
            raise ImageDecodeError(kind, "the image data is truncated") from None
        raise ImageDecodeError(kind, f"the image data is corrupt ({type(error).__name__})") from None
    except (ValueError, SyntaxError, TypeError, ZeroDivisionError, IndexError, MemoryError) as error:
        raise ImageDecodeError("corrupt", f"the image data is corrupt ({type(error).__name__})") from None


def open_rgb(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """The RGB image of `open_picture` (the centre of the long side beyond `MAX_ASPECT`)."""
    return open_picture(data, max_pixels).image


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """The model's view: the centre square resized to `size` (bicubic; reduced first when 3 times larger).
    Reads only the square, so its cost is bounded by the square, not by the image's length."""
    side = min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0)


def jpeg_bytes(image: Image.Image, quality: int = 85) -> bytes:
    """Re-encode as a baseline JPEG with no metadata (no EXIF, ICC or comments carried over)."""
    clean = image.convert("RGB")  # a copy, even when already RGB
    clean.info = {}  # Pillow would otherwise carry a JPEG comment (and more) over from the source
    buffer = io.BytesIO()
    clean.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()

"""Safe image decoding, shared by the precompute job and the server's live encoding.

`open_rgb(data)` turns encoded bytes into an 8-bit RGB image, the one way
every image is read in this project (so an uploaded copy of an indexed image
gives the pixels the index saw):
- only raster formats in `FORMATS` are tried (never SVG, EPS, PDF...);
- Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is enforced
  from the header, before any pixel is decoded;
- animations give their first frame; EXIF orientation is applied;
- greyscale, palette, CMYK, 16-bit and float modes become RGB; transparency
  is matted onto white, as img2dataset does when it writes LAION shards.
Every failure is an `ImageDecodeError` with a one-line reason and a `kind`.

`square_crop` is the model's view (shortest side to the input size, centre
crop), used for thumbnails so that a heatmap covers the right pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# Raster formats we decode (JPEG includes multi-picture MPO); anything else is refused before decoding.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "AVIF")
WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image. `kind`: empty, svg, not_image, truncated, corrupt, too_large."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _formats() -> tuple[str, ...]:
    """FORMATS this Pillow build can open (AVIF is optional)."""
    Image.init()
    return tuple(name for name in FORMATS if name in Image.OPEN)


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip().lower()
    return head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in head)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Integer/float single-channel modes (16-bit PNG greyscale, TIFF) to 8-bit greyscale."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded mode as 8-bit RGB; transparency matted onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _sixteen_bit_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "L" and "transparency" in image.info:
        return to_rgb(image.convert("LA"))
    if image.mode == "RGB" and "transparency" in image.info:
        return to_rgb(image.convert("RGBA"))
    return image.convert("RGB")


def open_rgb(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode `data` to an RGB image (first frame, EXIF orientation applied); see the module docstring.

    max_pixels defaults to Pillow's `Image.MAX_IMAGE_PIXELS` (about 89 megapixels).
    """
    if not data:
        raise ImageDecodeError("empty", "the file is empty")
    if _looks_like_svg(data):
        raise ImageDecodeError("svg", "SVG is a vector format; upload a raster image (JPEG, PNG, WebP, GIF)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            raw = Image.open(io.BytesIO(data), formats=_formats())
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not_image", "not an image in a supported format "
                                            "(JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("too_large", "the image has too many pixels (decompression bomb limit)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageDecodeError("corrupt", f"the image cannot be read: {type(error).__name__}") from None
    with raw:
        width, height = raw.size
        if width < 1 or height < 1:
            raise ImageDecodeError("corrupt", "the image has no pixels")
        if limit and width * height > limit:
            raise ImageDecodeError("too_large", f"the image is {width} x {height} pixels, more than the "
                                                f"{limit:,}-pixel limit (decompression bomb guard)")
        try:
            raw.seek(0)
            raw.load()
            image = ImageOps.exif_transpose(raw)
            return to_rgb(image)
        except Image.DecompressionBombError:
            raise ImageDecodeError("too_large", "the image has too many pixels (decompression bomb limit)") from None
        except (OSError, EOFError) as error:
            text = str(error).lower()
            kind = "truncated" if "truncat" in text or isinstance(error, EOFError) else "corrupt"
            reason = "the image data is truncated" if kind == "truncated" else f"the image data is corrupt ({type(error).__name__})"
            raise ImageDecodeError(kind, reason) from None
        except (ValueError, SyntaxError, TypeError, ZeroDivisionError, IndexError, MemoryError) as error:
            raise ImageDecodeError("corrupt", f"the image data is corrupt ({type(error).__name__})") from None


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """The model's view: shortest side to `size` (bicubic), centre crop."""
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def jpeg_bytes(image: Image.Image, quality: int = 85) -> bytes:
    """Re-encode as a baseline JPEG with no metadata (no EXIF, ICC or comments carried over)."""
    clean = image.convert("RGB")  # a copy, even when already RGB
    clean.info = {}  # Pillow would otherwise carry a JPEG comment (and more) over from the source
    buffer = io.BytesIO()
    clean.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()

"""Awkward images, made in memory: every mode, animation, EXIF rotation, bombs and broken files."""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image, features


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noisy(size=(200, 160), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")


def palette_png() -> bytes:
    return encode(noisy((48, 40)).quantize(16), "PNG")


def palette_transparent_png() -> bytes:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 16, 32))
    return encode(image, "PNG", transparency=0)


def grey_png() -> bytes:
    return encode(noisy((40, 40)).convert("L"), "PNG")


def grey_alpha_png() -> bytes:
    return encode(noisy((40, 40)).convert("LA"), "PNG")


def rgba_png(alpha: int = 0) -> bytes:
    return encode(Image.new("RGBA", (40, 30), (10, 20, 30, alpha)), "PNG")


def sixteen_bit_png(value: int = 65535) -> bytes:
    return encode(Image.fromarray(np.full((24, 24), value, dtype=np.uint16)), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (48, 48), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def red_png() -> bytes:
    return encode(Image.new("RGB", (48, 48), (255, 0, 0)), "PNG")


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 60 x 30 image whose EXIF says: rotate it (6: 90 degrees clockwise, so it shows as 30 x 60)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(noisy((60, 30)), "JPEG", exif=exif)


def exif_with_gps_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0131] = "secret-software"  # Software
    return encode(noisy((80, 60)), "JPEG", exif=exif, comment=b"secret comment")


def bomb_png() -> bytes:
    """100 megapixels of one colour in a few kilobytes: over Pillow's limit."""
    return encode(Image.new("1", (10_000, 10_000)), "PNG", optimize=False)


def truncated_jpeg() -> bytes:
    data = encode(noisy((300, 300)), "JPEG", quality=95)
    return data[: len(data) * 6 // 10]


def corrupt_png() -> bytes:
    """A PNG whose compressed pixel data is garbage (CRCs fixed, so only decoding fails)."""
    raw = bytearray(encode(noisy((64, 64)), "PNG"))
    start = raw.index(b"IDAT") + 4
    length = int.from_bytes(raw[start - 8 : start - 4], "big")
    raw[start + 2 : start + length] = bytes((b * 7 + 13) % 256 for b in raw[start + 2 : start + length])
    crc = zlib.crc32(bytes(raw[start - 4 : start + length])) & 0xFFFFFFFF
    raw[start + length : start + length + 4] = crc.to_bytes(4, "big")
    return bytes(raw)


def svg() -> bytes:
    return (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
        b'<rect width="64" height="64" fill="red"/></svg>'
    )


TINY = {"1x1": (1, 1), "2x2": (2, 2), "thin-tall": (1, 400), "thin-wide": (900, 3)}


def gradient(size: tuple[int, int]) -> Image.Image:
    """A smooth RGB image (sub-pixel shifts change it little), any shape."""
    x = np.linspace(0.0, 1.0, size[0])[None, :, None]
    y = np.linspace(0.0, 1.0, size[1])[:, None, None]
    return Image.fromarray((127.5 + 127.5 * np.sin(5 * x + 3 * y + np.array([0.0, 1.0, 2.0]))).astype(np.uint8))


def in_mode(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A noisy image in any Pillow mode (integers and floats above 255 for I and F, 16-bit range for I;16)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0])
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-10, 70_000, shape, dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-20.0, 300.0, shape).astype(np.float32))
    if mode == "P":
        return noisy(size, seed).quantize(64)
    if mode == "PA":
        image = noisy(size, seed).quantize(64).convert("PA")
        image.putalpha(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)))
        return image
    if mode in ("RGBA", "LA"):
        image = noisy(size, seed).convert(mode)
        image.putalpha(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)))
        return image
    return noisy(size, seed).convert(mode)


# (mode, format, save options) of every kind of file the decoder meets, each in a mode that format stores
FORMAT_CASES = {
    "png-rgb": ("RGB", "PNG", {}),
    "png-rgba": ("RGBA", "PNG", {}),
    "png-la": ("LA", "PNG", {}),
    "png-l": ("L", "PNG", {}),
    "png-p": ("P", "PNG", {}),
    "png-1": ("1", "PNG", {}),
    "png-16bit": ("I;16", "PNG", {}),
    "jpeg": ("RGB", "JPEG", {}),
    "jpeg-progressive": ("RGB", "JPEG", {"progressive": True, "subsampling": 0}),
    "jpeg-cmyk": ("CMYK", "JPEG", {}),
    "jpeg-grey": ("L", "JPEG", {}),
    "webp": ("RGB", "WEBP", {"lossless": True}),
    "webp-rgba": ("RGBA", "WEBP", {"lossless": True}),
    "gif": ("P", "GIF", {}),
    "bmp": ("RGB", "BMP", {}),
    "tga": ("RGB", "TGA", {}),
    "ppm": ("RGB", "PPM", {}),
    "tiff-float": ("F", "TIFF", {"compression": "tiff_deflate"}),
    "tiff-int": ("I", "TIFF", {}),
    "tiff-cmyk": ("CMYK", "TIFF", {"compression": "tiff_lzw"}),
}


def animated(size: tuple[int, int]) -> bytes:
    """A two-frame GIF of that size: red, then blue."""
    frames = [Image.new("RGB", size, colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def oriented_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def icon_around(frame: bytes) -> bytes:
    """An ICO whose directory claims a 16 x 16 icon while its frame (PNG bytes) is whatever it is."""
    header = (0).to_bytes(2, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    entry = bytes([16, 16, 0, 0]) + (1).to_bytes(2, "little") + (32).to_bytes(2, "little")
    return header + entry + len(frame).to_bytes(4, "little") + (6 + 16).to_bytes(4, "little") + frame


if features.check("avif"):  # an optional codec of Pillow
    FORMAT_CASES["avif"] = ("RGBA", "AVIF", {"subsampling": "4:4:4", "speed": 10})

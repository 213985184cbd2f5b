"""Server-side images: heatmap overlays, grid maps and the OpenGraph preview.

Colours come from viridis (perceptually uniform, readable with the common
colour-vision deficiencies), interpolated from ten anchor colours. Overlays are
one pixel per patch (16 x 16 for ViT-L/14 at 224 px) and are scaled up by the
browser with `image-rendering: pixelated`, so each square is exactly one
patch. Heatmaps are normalised per feature: a value is divided by the
feature's `max_activation` before it is coloured.
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache

import numpy as np
from PIL import Image

_VIRIDIS_ANCHORS = [
    "#440154",
    "#482878",
    "#3e4a89",
    "#31688e",
    "#26828e",
    "#1f9e89",
    "#35b779",
    "#6dcd59",
    "#b4de2c",
    "#fde725",
]

PREVIEW_SIZE = (1200, 630)
PREVIEW_TILE = 300


@lru_cache(maxsize=1)
def viridis() -> np.ndarray:
    """The colormap as a [256, 3] uint8 lookup table."""
    anchors = np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in _VIRIDIS_ANCHORS], dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    steps = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(steps, positions, anchors[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def colour_hex(fraction: float) -> str:
    """The colormap colour at `fraction` in [0, 1] as #rrggbb (for SVG and legends)."""
    r, g, b = viridis()[int(round(min(max(fraction, 0.0), 1.0) * 255))]
    return f"#{r:02x}{g:02x}{b:02x}"


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def normalised(values: np.ndarray, vmax: float | None) -> np.ndarray:
    """`values / vmax` clipped to [0, 1] (zeros when vmax is missing or not positive)."""
    if not vmax or vmax <= 0:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip(values / np.float32(vmax), 0.0, 1.0)


def overlay_rgba(values: np.ndarray, grid: tuple[int, int], vmax: float | None) -> np.ndarray:
    """[h, w, 4] uint8: viridis colour per patch, transparent where the feature does not fire."""
    fraction = normalised(values, vmax)
    rgba = np.empty((values.size, 4), dtype=np.uint8)
    rgba[:, :3] = viridis()[np.round(fraction * 255).astype(np.intp)]
    rgba[:, 3] = np.where(values > 0, np.round(110 + 145 * fraction), 0).astype(np.uint8)
    return rgba.reshape(grid[0], grid[1], 4)


def overlay_png(values: np.ndarray, grid: tuple[int, int], vmax: float | None) -> bytes:
    """A patch-resolution RGBA PNG of one example's heatmap, normalised by `vmax`."""
    return _encode(Image.fromarray(overlay_rgba(values, grid, vmax), "RGBA"), "PNG")


def grid_png(values: np.ndarray, grid: tuple[int, int]) -> bytes:
    """An opaque viridis PNG of per-patch values, scaled to their own min..max."""
    low, high = float(values.min()), float(values.max())
    fraction = (values - low) / (high - low) if high > low else np.zeros_like(values)
    rgb = viridis()[np.round(np.clip(fraction, 0, 1) * 255).astype(np.intp)].reshape(grid[0], grid[1], 3)
    return _encode(Image.fromarray(rgb, "RGB"), "PNG")


# Categorical colours for the winning-feature map (Tableau 10); features beyond them are grey.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]
OTHER = "#7f7f7f"


def palette_hex(rank: int) -> str:
    """Colour of the rank-th winning feature (by patches won), grey beyond the palette."""
    return PALETTE[rank] if 0 <= rank < len(PALETTE) else OTHER


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def overlay_data_url(values, vmax: float | None, grid) -> str:
    """`overlay_png` as a data: URL (upload results are not in the index, so their overlays travel inline)."""
    return _data_url(overlay_png(np.asarray(values, dtype=np.float32), tuple(grid), vmax))


def winner_data_url(winners: list[int | None], ranked: list[int], grid) -> str:
    """One RGBA pixel per patch: the colour of the patch's strongest feature, transparent where none fires.
    `ranked`: the winning features by patches won (the palette order)."""
    colour = {feature: palette_hex(rank) for rank, feature in enumerate(ranked)}
    rgba = np.zeros((len(winners), 4), dtype=np.uint8)
    for patch, feature in enumerate(winners):
        if feature is not None:
            hex_colour = colour.get(feature, OTHER)
            rgba[patch] = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)] + [235]
    return _data_url(_encode(Image.fromarray(rgba.reshape(grid[0], grid[1], 4), "RGBA"), "PNG"))


def upload_preview_jpeg(view_jpeg: bytes, tiles: list[tuple[list[float], float]], grid: tuple[int, int]) -> bytes:
    """The OpenGraph card of an upload, 1200 x 630: the image, then up to 7 of its features' overlays."""
    canvas = Image.new("RGB", PREVIEW_SIZE, (24, 24, 32))
    top = (PREVIEW_SIZE[1] - 2 * PREVIEW_TILE) // 2
    with Image.open(io.BytesIO(view_jpeg)) as source:
        base = source.convert("RGBA").resize((PREVIEW_TILE, PREVIEW_TILE), Image.Resampling.BICUBIC)
    canvas.paste(base.convert("RGB"), (0, top))
    for slot, (values, vmax) in enumerate(tiles[:7], start=1):
        _paste_tile(canvas, slot, top, base.copy(), np.asarray(values, dtype=np.float32), grid, vmax)
    return _encode(canvas, "JPEG", quality=82)


def preview_jpeg(tiles: list[tuple[bytes, np.ndarray]], grid: tuple[int, int], vmax: float | None) -> bytes:
    """The OpenGraph card: up to 8 thumbnails (4 x 2) with their overlays, 1200 x 630."""
    canvas = Image.new("RGB", PREVIEW_SIZE, (24, 24, 32))
    top = (PREVIEW_SIZE[1] - 2 * PREVIEW_TILE) // 2
    for slot, (thumbnail, values) in enumerate(tiles[:8]):
        with Image.open(io.BytesIO(thumbnail)) as source:
            tile = source.convert("RGBA").resize((PREVIEW_TILE, PREVIEW_TILE), Image.Resampling.BICUBIC)
        _paste_tile(canvas, slot, top, tile, values, grid, vmax)
    return _encode(canvas, "JPEG", quality=82)


def _paste_tile(
    canvas: Image.Image,
    slot: int,
    top: int,
    tile: Image.Image,
    values: np.ndarray,
    grid: tuple[int, int],
    vmax: float | None,
) -> None:
    """One preview-card tile: the image with its heatmap at 60 % opacity, in grid slot `slot` (4 per row)."""
    heat = Image.fromarray(overlay_rgba(values, grid, vmax), "RGBA")
    heat = heat.resize((PREVIEW_TILE, PREVIEW_TILE), Image.Resampling.NEAREST)
    alpha = np.asarray(heat.getchannel("A"), dtype=np.float32) * 0.6
    heat.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
    tile.alpha_composite(heat)
    canvas.paste(tile.convert("RGB"), ((slot % 4) * PREVIEW_TILE, top + (slot // 4) * PREVIEW_TILE))

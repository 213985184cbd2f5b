"""`/layers/{layer}/checkpoints`: the layer's SAE over its training checkpoints (`clipscope-explorer checkpoints`),
and each checkpoint's MSE-by-position map as an image.

The centre-versus-border ratio makes the release's claim ("outer tokens are easier to reconstruct than those in
the middle") checkable at every checkpoint. On the patch grid (CLS left out), the border is the outermost ring of
patches and the centre is the middle half of each side (rows and columns h//4 .. h - h//4 - 1: 8 x 8 of a 16 x 16
grid); the ratio is the centre patches' mean MSE over the border patches' mean. Above 1, the middle is harder.
"""

from __future__ import annotations

import io

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel

from clipscope_explorer.app import images
from clipscope_explorer.app.deps import IndexDep, LayerPath, UrlsDep, require_layer
from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.pages.images import RENDER_VERSION, cached
from clipscope_explorer.app.pages.twins import page

router = APIRouter()

CENTRE_BORDER = (
    "mean MSE of the centre patches (the middle half of each side of the patch grid) over the mean MSE of the "
    "border patches (its outermost ring); CLS excluded. Above 1: the middle is harder to reconstruct."
)


class CheckpointMetrics(BaseModel):
    """One training checkpoint of the layer's SAE, measured on `n_images` of the index's images (as the layer's
    own metrics are); `centre_border_ratio` as the page's `centre_border` says; `map_url`: its MSE by position."""

    tokens: int
    mse: float | None
    explained_variance: float | None
    mse_raw: float | None
    explained_variance_raw: float | None
    l0: float | None
    dead_fraction: float | None
    mse_by_position: list[float]
    n_images: int
    centre_border_ratio: float | None
    map_url: str


class TrainingPage(BaseModel):
    layer: int
    checkpoints: list[CheckpointMetrics]  # in training order; empty when the index holds none
    centre_border: str  # how centre_border_ratio is taken
    layer_url: str


def patch_masks(grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(centre, border) boolean masks over the row-major patches, or None on a grid too small to tell them apart."""
    h, w = grid
    if min(h, w) < 3:
        return None
    rows, columns = np.indices((h, w))
    border = (rows == 0) | (rows == h - 1) | (columns == 0) | (columns == w - 1)
    centre = (rows >= h // 4) & (rows < h - h // 4) & (columns >= w // 4) & (columns < w - w // 4) & ~border
    return centre.reshape(-1), border.reshape(-1)


def centre_border_ratio(mse_by_position: list[float], grid: tuple[int, int]) -> float | None:
    masks = patch_masks(grid)
    patches = np.asarray(list(mse_by_position or [])[1:], dtype=np.float64)
    if masks is None or patches.size != grid[0] * grid[1]:
        return None
    centre, border = masks
    outer = float(patches[border].mean())
    return float(patches[centre].mean()) / outer if outer > 0 else None


@page(
    router,
    "/layers/{layer}/checkpoints",
    template="training.html",
    summary="One layer's SAE over its training checkpoints: metrics, MSE by position, centre versus border",
)
def training_page(index: IndexDep, urls: UrlsDep, layer: LayerPath) -> TrainingPage:
    require_layer(index, layer)
    rows = index.checkpoints(layer)
    return TrainingPage(
        layer=layer,
        checkpoints=[
            CheckpointMetrics(
                **{name: row[name] for name in CheckpointMetrics.model_fields if name in row},
                centre_border_ratio=centre_border_ratio(row["mse_by_position"], index.grid),
                map_url=urls.checkpoint_map(layer, row["tokens"]),
            )
            for row in rows
        ],
        centre_border=CENTRE_BORDER,
        layer_url=urls.layer(layer),
    )


def shared_scale_png(values: np.ndarray, grid: tuple[int, int], low: float, high: float) -> bytes:
    """An opaque viridis PNG of per-patch values, scaled to low..high (shared by a layer's checkpoints)."""
    fraction = (values - low) / (high - low) if high > low else np.zeros_like(values)
    rgb = images.viridis()[np.round(np.clip(fraction, 0, 1) * 255).astype(np.intp)].reshape(grid[0], grid[1], 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _patches(values, grid: tuple[int, int]) -> np.ndarray:
    n = grid[0] * grid[1]
    patches = np.zeros(n, dtype=np.float64)
    given = np.asarray(list(values or [])[1:], dtype=np.float64)[:n]
    patches[: given.size] = given
    return patches


@router.get(
    "/images/{index_id}/layers/{layer}/checkpoints/{tokens}/mse.png",
    response_class=Response,
    summary="A training checkpoint's reconstruction MSE per patch position (viridis, one scale for the layer's "
    "checkpoints)",
    responses={200: {"content": {"image/png": {}}}},
    tags=["images"],
)
def checkpoint_map(request: Request, index: IndexDep, index_id: str, layer: LayerPath, tokens: int) -> Response:
    if index_id != index.index_id:
        raise NotFound("These images belong to another index than the one served here.")
    require_layer(index, layer)
    rows = index.checkpoints(layer)
    row = next((r for r in rows if r["tokens"] == tokens), None)
    if row is None:
        raise NotFound(f"Layer {layer} has no training checkpoint of {tokens} tokens in this index.")
    every = np.concatenate([_patches(r["mse_by_position"], index.grid) for r in rows])
    low, high = float(every.min()), float(every.max())
    return cached(
        request,
        index,
        f"{RENDER_VERSION}-c{layer}.{tokens}",
        "image/png",
        lambda: shared_scale_png(_patches(row["mse_by_position"], index.grid), index.grid, low, high),
    )

"""`/images/{index_id}/...`: thumbnails, heatmap overlays, position maps, preview cards.

The index is immutable and its id is in every image URL, so each response is
cacheable forever: `Cache-Control: immutable` and `ETag` = index id + object
id (+ the renderer version for drawn images), revalidated as `app/caching.py`
says, once the object is known to exist. A request for another index's id is
a 404: its URLs do not name anything here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from clipscope_explorer.app import images
from clipscope_explorer.app.caching import immutable
from clipscope_explorer.app.deps import FeaturePath, ImagePath, IndexDep, LayerPath, require_feature, require_layer
from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.queries import Index, dequantise

router = APIRouter(prefix="/images/{index_id}", tags=["images"])

RENDER_VERSION = "r1"  # bump when drawn images change, so their ETags change too


def _patches(index: Index, values) -> np.ndarray:
    """Per-patch values (CLS dropped) as exactly grid_h * grid_w floats."""
    n = index.grid[0] * index.grid[1]
    patches = np.zeros(n, dtype=np.float32)
    given = np.asarray(list(values or [])[1:], dtype=np.float32)[:n]
    patches[: given.size] = given
    return patches


def _check_index(index: Index, index_id: str) -> None:
    if index_id != index.index_id:
        raise NotFound("These images belong to another index than the one served here.")


def _exists(found):
    if found is None:
        raise NotFound("No such image in this index.")
    return found


def cached(request: Request, index: Index, object_id: str, media_type: str, produce: Callable[[], bytes]) -> Response:
    """An image of this index that exists, tagged index id + `object_id`."""
    return immutable(request, f'"{index.index_id}-{object_id}"', media_type, produce)


@router.get(
    "/{image_id}.jpg",
    summary="An image's thumbnail: the exact square the model saw (JPEG)",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
def thumbnail(request: Request, index: IndexDep, index_id: str, image_id: ImagePath) -> Response:
    _check_index(index, index_id)
    jpeg = _exists(index.thumbnail(image_id))
    return cached(request, index, f"t{image_id}", "image/jpeg", lambda: jpeg)


@router.get(
    "/layers/{layer}/features/{feature}/positions.png",
    response_class=Response,
    summary="A feature's mean activation per patch position (viridis, scaled to its own range)",
    responses={200: {"content": {"image/png": {}}}},
)
def positions(request: Request, index: IndexDep, index_id: str, layer: LayerPath, feature: FeaturePath) -> Response:
    _check_index(index, index_id)
    require_feature(index, layer, feature)
    values = _exists(index.position_mean(layer, feature))
    return cached(
        request,
        index,
        f"{RENDER_VERSION}-p{layer}.{feature}",
        "image/png",
        lambda: images.grid_png(_patches(index, values), index.grid),
    )


@router.get(
    "/layers/{layer}/features/{feature}/preview.jpg",
    response_class=Response,
    summary="OpenGraph preview card: the top images with their overlays, 1200 x 630 JPEG",
    responses={200: {"content": {"image/jpeg": {}}}},
)
def preview(request: Request, index: IndexDep, index_id: str, layer: LayerPath, feature: FeaturePath) -> Response:
    _check_index(index, index_id)
    require_feature(index, layer, feature)

    def produce() -> bytes:
        top = [r for r in index.examples(layer, feature, heatmaps=True) if r["kind"] == "top"][:8]
        thumbs = index.thumbnails([r["image_id"] for r in top])
        vmax = (index.feature(layer, feature) or {}).get("max_activation")
        tiles = [
            (thumbs[r["image_id"]], dequantise(r["heatmap_scale"], r["heatmap"]))
            for r in top
            if r["image_id"] in thumbs
        ]
        return images.preview_jpeg(tiles, index.grid, vmax)

    return cached(request, index, f"{RENDER_VERSION}-v{layer}.{feature}", "image/jpeg", produce)


@router.get(
    "/layers/{layer}/mse.png",
    response_class=Response,
    summary="A layer's reconstruction MSE per patch position (viridis, scaled to its own range)",
    responses={200: {"content": {"image/png": {}}}},
)
def mse_map(request: Request, index: IndexDep, index_id: str, layer: LayerPath) -> Response:
    _check_index(index, index_id)
    row = require_layer(index, layer)
    return cached(
        request,
        index,
        f"{RENDER_VERSION}-m{layer}",
        "image/png",
        lambda: images.grid_png(_patches(index, row.get("mse_by_position")), index.grid),
    )


# Registered last: its {image_id}.png would otherwise shadow positions.png.
@router.get(
    "/layers/{layer}/features/{feature}/{image_id}.png",
    response_class=Response,
    summary="One example's heatmap overlay: one RGBA pixel per patch, viridis, normalised per feature",
    responses={200: {"content": {"image/png": {}}}},
)
def overlay(
    request: Request, index: IndexDep, index_id: str, layer: LayerPath, feature: FeaturePath, image_id: ImagePath
) -> Response:
    _check_index(index, index_id)
    require_feature(index, layer, feature)
    row = _exists(index.example(layer, feature, image_id))
    return cached(
        request,
        index,
        f"{RENDER_VERSION}-o{layer}.{feature}.{image_id}",
        "image/png",
        lambda: images.overlay_png(dequantise(row["heatmap_scale"], row["heatmap"]), index.grid, row["max_activation"]),
    )

"""Typed dependencies for route functions, and the path-number checks they share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.app.urls import Urls

INT32_MAX = 2**31 - 1


async def get_index(request: Request) -> Index:
    return request.app.state.index


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


IndexDep = Annotated[Index, Depends(get_index)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
LayerPath = Annotated[int, Path(ge=0, le=INT32_MAX, description="SAE layer (block number)")]
FeaturePath = Annotated[int, Path(ge=0, le=INT32_MAX, description="feature (latent) index")]
ImagePath = Annotated[int, Path(ge=0, le=INT32_MAX, description="image id")]


def require_layer(index: Index, layer: int) -> dict:
    """The layer's row, or a 404 pointing at the layers that exist."""
    if layer not in index.layers:
        links = [("/", "Overview")] + [(Urls.layer(n), f"Layer {n}") for n in sorted(index.layers)]
        raise NotFound(f"This index has no layer {layer}.", links)
    return index.layers[layer]


def require_feature(index: Index, layer: int, feature: int) -> dict:
    row = require_layer(index, layer)
    if not 0 <= feature < row["n_features"]:
        raise NotFound(f"Layer {layer} has features 0 to {row['n_features'] - 1}; there is no feature {feature}.",
                       [(Urls.layer(layer), f"Layer {layer}"), ("/", "Overview")])
    return row

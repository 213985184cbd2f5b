"""Typed dependencies for route functions, the parameter types pages share, and the checks on path numbers."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import BeforeValidator, Field

from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.app.urls import PAGES, Urls, urls_for

INT32_MAX = 2**31 - 1
MAX_WORDS = 8
WORD = re.compile(r"[\w'-]+")


async def get_index(request: Request) -> Index:
    return request.app.state.index


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_urls(request: Request) -> Urls:
    return urls_for(request)


async def is_json_twin(request: Request) -> bool:
    """Whether this request came through the `/api` twin of a page (both share one data function)."""
    return request.scope["route"].path.startswith("/api")


IndexDep = Annotated[Index, Depends(get_index)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
UrlsDep = Annotated[Urls, Depends(get_urls)]
JsonTwin = Annotated[bool, Depends(is_json_twin)]
LayerPath = Annotated[int, Path(ge=0, le=INT32_MAX, description="SAE layer (block number)")]
FeaturePath = Annotated[int, Path(ge=0, le=INT32_MAX, description="feature (latent) index")]
ImagePath = Annotated[int, Path(ge=0, le=INT32_MAX, description="image id")]


def blank_is_none(value):
    """An empty form field (`?min_freq=`) means "not given"."""
    return None if isinstance(value, str) and not value.strip() else value


Fraction = Annotated[float, Field(ge=0, le=1)]
OptionalFraction = Annotated[Fraction | None, BeforeValidator(blank_is_none)]
OptionalLayer = Annotated[Annotated[int, Field(ge=0, le=INT32_MAX)] | None, BeforeValidator(blank_is_none)]


def words_of(text: str | None) -> list[str]:
    """The words of a search or filter text: lower-case runs of letters, digits, `_`, `'` and `-`
    (anything else separates words), at most 8."""
    return WORD.findall((text or "").lower())[:MAX_WORDS]


def require_layer(index: Index, layer: int) -> dict:
    """The layer's row, or a 404 pointing at the layers that exist."""
    if layer not in index.layers:
        links = [(PAGES.overview(), "Overview")] + [(PAGES.layer(n), f"Layer {n}") for n in sorted(index.layers)]
        raise NotFound(f"This index has no layer {layer}.", links)
    return index.layers[layer]


def require_feature(index: Index, layer: int, feature: int) -> dict:
    row = require_layer(index, layer)
    if not 0 <= feature < row["n_features"]:
        raise NotFound(
            f"Layer {layer} has features 0 to {row['n_features'] - 1}; there is no feature {feature}.",
            [(PAGES.layer(layer), f"Layer {layer}"), (PAGES.overview(), "Overview")],
        )
    return row

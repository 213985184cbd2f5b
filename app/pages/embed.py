"""`/layers/{layer}/features/{feature}/embed`: a feature as a compact card for an iframe of 600 x 400 on other
sites (label, statistics, top images with their heatmaps), linking to the feature page. It is the one page other
sites may frame (`CLIPSCOPE_EMBED_ORIGINS`, `app/serving/security.py`); its JSON twin is the feature page's data."""

from __future__ import annotations

from fastapi import APIRouter

from clipscope_explorer.app.deps import FeaturePath, IndexDep, JsonTwin, LayerPath, UrlsDep
from clipscope_explorer.app.pages.features import FeaturePage, feature_page
from clipscope_explorer.app.pages.twins import page

router = APIRouter()


@page(
    router,
    "/layers/{layer}/features/{feature}/embed",
    template="embed.html",
    summary="One feature as a compact card for an iframe (600 x 400); the JSON is the feature page's",
)
def embed_page(index: IndexDep, urls: UrlsDep, layer: LayerPath, feature: FeaturePath, detail: JsonTwin) -> FeaturePage:
    """The feature page's data (unknown layer or feature: its 404), drawn by `embed.html`."""
    return feature_page(index, urls, layer, feature, detail)

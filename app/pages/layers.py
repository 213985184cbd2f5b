"""`/layers/{layer}`: density histogram and the sortable, filterable feature table."""

from __future__ import annotations

import random
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, BeforeValidator, Field

from clipscope_explorer.app import htmx
from clipscope_explorer.app.deps import IndexDep, LayerPath, SettingsDep, require_layer
from clipscope_explorer.app.models import FeatureSummary, LayerInfo, feature_summary, layer_info
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.templating import render_page
from clipscope_explorer.app.urls import Urls

router = APIRouter()

SortKey = Literal["feature", "frequency", "image_frequency", "cls_frequency", "max_activation", "mean_activation"]
Order = Literal["asc", "desc"]
MAX_WORDS = 8


def _blank_is_none(value):
    return None if isinstance(value, str) and not value.strip() else value


Fraction = Annotated[float, Field(ge=0, le=1)]
OptionalFraction = Annotated[Fraction | None, BeforeValidator(_blank_is_none)]


def words_of(text: str | None) -> list[str]:
    """Lower-case words of a search text (at most 8)."""
    return re.findall(r"[\w'-]+", (text or "").lower())[:MAX_WORDS]


class DensityBin(BaseModel):
    log10_low: float
    log10_high: float
    count: int


class Density(BaseModel):
    """How many features fire at each log10(frequency), in quarter decades; `dead` never fire."""

    dead: int
    bins: list[DensityBin]


class TableRow(FeatureSummary):
    cls_frequency: float | None
    mean_activation: float | None


class Filters(BaseModel):
    sort: SortKey
    order: Order
    min_freq: float | None
    max_freq: float | None
    q: str


class Paging(BaseModel):
    page: int
    page_size: int
    total: int
    has_next: bool
    next: str | None
    previous: str | None


class LayerPage(LayerInfo):
    density: Density
    features: list[TableRow]
    filters: Filters
    paging: Paging
    random: str


def density_of(index: Index, layer: int) -> Density:
    counts = index.density(layer)
    bins = sorted(b for b in counts if b is not None)
    if not bins:
        return Density(dead=counts.get(None, 0), bins=[])
    return Density(dead=counts.get(None, 0), bins=[
        DensityBin(log10_low=b / 4, log10_high=(b + 1) / 4, count=counts.get(b, 0))
        for b in range(bins[0], max(bins[-1], -1) + 1)])


def layer_page(index: Index, layer: int, filters: Filters, page: int, page_size: int) -> LayerPage:
    require_layer(index, layer)
    offset = (page - 1) * page_size
    rows, total = index.feature_table(layer, filters.sort, filters.order, filters.min_freq, filters.max_freq,
                                      filters.q.lower().split()[:MAX_WORDS], offset, page_size + 1)
    has_next = len(rows) > page_size
    query = dict(sort=filters.sort, order=filters.order, min_freq=filters.min_freq, max_freq=filters.max_freq,
                 q=filters.q or None, page_size=page_size)
    features = [TableRow(**feature_summary(index, row).model_dump(), cls_frequency=row["cls_frequency"],
                         mean_activation=row["mean_activation"]) for row in rows[:page_size]]
    paging = Paging(page=page, page_size=page_size, total=total, has_next=has_next,
                    next=Urls.layer(layer, **query, page=page + 1) if has_next else None,
                    previous=Urls.layer(layer, **query, page=page - 1) if page > 1 else None)
    return LayerPage(**layer_info(index, layer).model_dump(), density=density_of(index, layer), features=features,
                     filters=filters, paging=paging, random=Urls.random(layer))


def _page(index: Index, settings, layer, sort, order, min_freq, max_freq, q, page, page_size) -> LayerPage:
    size = min(page_size or settings.page_size, settings.max_page_size)
    filters = Filters(sort=sort, order=order, min_freq=min_freq, max_freq=max_freq, q=q)
    return layer_page(index, layer, filters, page, size)


Sort = Annotated[SortKey, Query(description="column to sort by")]
OrderQ = Annotated[Order, Query(description="asc or desc")]
MinFreq = Annotated[OptionalFraction, Query(description="only features with frequency > this (0 hides dead ones)")]
MaxFreq = Annotated[OptionalFraction, Query(description="only features with frequency <= this")]
Text = Annotated[str, Query(max_length=200, description="words that must all occur in the label")]
PageQ = Annotated[int, Query(ge=1, le=1_000_000)]
PageSize = Annotated[int | None, Query(ge=1, le=100_000, description="rows per page (capped at max_page_size)")]


@router.get("/api/layers/{layer}", response_model=LayerPage, tags=["pages"],
            summary="One layer: metrics, density histogram and a page of its features")
def layer_json(index: IndexDep, settings: SettingsDep, layer: LayerPath, sort: Sort = "feature",
               order: OrderQ = "asc", min_freq: MinFreq = None, max_freq: MaxFreq = None, q: Text = "",
               page: PageQ = 1, page_size: PageSize = None) -> LayerPage:
    return _page(index, settings, layer, sort, order, min_freq, max_freq, q, page, page_size)


@router.get("/layers/{layer}", response_class=HTMLResponse, include_in_schema=False)
def layer_html(request: Request, index: IndexDep, settings: SettingsDep, layer: LayerPath, sort: Sort = "feature",
               order: OrderQ = "asc", min_freq: MinFreq = None, max_freq: MaxFreq = None, q: Text = "",
               page: PageQ = 1, page_size: PageSize = None):
    page_data = _page(index, settings, layer, sort, order, min_freq, max_freq, q, page, page_size)
    return render_page(request, "layer.html", page_data, fragments={"feature-table": "_feature_table.html"})


def random_feature(index: Index, layer: int) -> int:
    require_layer(index, layer)
    alive = index.alive_features(layer)
    if len(alive):
        return int(alive[random.randrange(len(alive))])
    return random.randrange(index.layers[layer]["n_features"])


@router.get("/api/layers/{layer}/random", tags=["pages"], status_code=303,
            summary="Redirect to the JSON of a random feature that fires",
            responses={303: {"description": "to /api/layers/{layer}/features/{feature}"}})
def random_json(request: Request, index: IndexDep, layer: LayerPath) -> Response:
    return htmx.navigate(request, "/api" + Urls.feature(layer, random_feature(index, layer)))


@router.get("/layers/{layer}/random", include_in_schema=False)
def random_html(request: Request, index: IndexDep, layer: LayerPath) -> Response:
    return htmx.navigate(request, Urls.feature(layer, random_feature(index, layer)))

"""`/layers/{layer}`: density histogram and the sortable, filterable feature table."""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.datastructures import QueryParams
from starlette.routing import Match

from clipscope_explorer.app.deps import (
    IndexDep,
    LayerPath,
    OptionalFraction,
    SettingsDep,
    UrlsDep,
    blank_is_none,
    require_layer,
    words_of,
)
from clipscope_explorer.app.faithfulness import LayerFaithfulness, layer_faithfulness
from clipscope_explorer.app.models import FeatureSummary, LayerInfo, feature_summary, layer_info
from clipscope_explorer.app.pages.twins import Redirect, page
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.sort_eval import RunKind
from clipscope_explorer.app.urls import PAGES, Urls

router = APIRouter()

SortKey = Literal[
    "feature",
    "frequency",
    "image_frequency",
    "cls_frequency",
    "max_activation",
    "mean_activation",
    "sort_eval",
    "faithfulness",
]
Order = Literal["asc", "desc"]
# a faithfulness score: a difference of two relative drops (each at most 1, below -1 when occlusion raises it)
OptionalScore = Annotated[
    Annotated[float, Field(ge=-1000, le=1000, allow_inf_nan=False)] | None, BeforeValidator(blank_is_none)
]


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
    sort_eval: float | None = None  # the feature's score in the page's `sort_eval_scores` run (null: none)
    sort_eval_trials: int | None = None
    faithfulness: float | None = None  # its occlusion faithfulness score (null: not evaluated)


class Filters(BaseModel):
    """Which features the table lists, in which order."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)  # always in the JSON

    sort: SortKey = Field("feature", description="column to sort by")
    order: Order = Field("asc", description="asc or desc")
    min_freq: OptionalFraction = Field(None, description="only features with frequency > this (0 hides dead ones)")
    max_freq: OptionalFraction = Field(None, description="only features with frequency <= this")
    q: str = Field("", max_length=200, description="words that must all occur in the label")
    min_sort_eval: OptionalFraction = Field(None, description="only features with a sort-evaluation score >= this")
    min_faithfulness: OptionalScore = Field(None, description="only features with a faithfulness score >= this")


class LayerQuery(Filters):
    """The layer page's query parameters: the filters and the page of the table."""

    page: int = Field(1, ge=1, le=1_000_000, description="page of the table, from 1")
    page_size: int | None = Field(None, ge=1, le=100_000, description="rows per page (capped at max_page_size)")


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
    sort_eval_scores: RunKind | None  # the run kind of the features' `sort_eval` (null: no per-feature scores)
    csv: str  # every feature the filters select, in their order, as CSV (all pages)
    training: str | None = None  # the layer's SAE over its training checkpoints (null: the index holds none)
    faithfulness: LayerFaithfulness | None = None  # its evaluated features' faithfulness (null: none)


def density_of(index: Index, layer: int) -> Density:
    counts = index.density(layer)
    bins = sorted(b for b in counts if b is not None)
    if not bins:
        return Density(dead=counts.get(None, 0), bins=[])
    return Density(
        dead=counts.get(None, 0),
        bins=[
            DensityBin(log10_low=b / 4, log10_high=(b + 1) / 4, count=counts.get(b, 0))
            for b in range(bins[0], max(bins[-1], -1) + 1)
        ],
    )


def layer_table(index: Index, urls: Urls, layer: int, filters: Filters, page: int, page_size: int) -> LayerPage:
    require_layer(index, layer)
    offset = (page - 1) * page_size
    rows, total = index.feature_table(
        layer,
        filters.sort,
        filters.order,
        filters.min_freq,
        filters.max_freq,
        words_of(filters.q),
        offset,
        page_size + 1,
        min_sort_eval=filters.min_sort_eval,
        min_faithfulness=filters.min_faithfulness,
    )
    has_next = len(rows) > page_size
    query = dict(
        sort=filters.sort,
        order=filters.order,
        min_freq=filters.min_freq,
        max_freq=filters.max_freq,
        q=filters.q or None,
        min_sort_eval=filters.min_sort_eval,
        min_faithfulness=filters.min_faithfulness,
        page_size=page_size,
    )
    features = [
        TableRow(
            **feature_summary(index, urls, row).model_dump(),
            cls_frequency=row["cls_frequency"],
            mean_activation=row["mean_activation"],
            sort_eval=row["sort_eval"],
            sort_eval_trials=row["sort_eval_trials"],
            faithfulness=row["faithfulness"],
        )
        for row in rows[:page_size]
    ]
    paging = Paging(
        page=page,
        page_size=page_size,
        total=total,
        has_next=has_next,
        next=urls.layer(layer, **query, page=page + 1) if has_next else None,
        previous=urls.layer(layer, **query, page=page - 1) if page > 1 else None,
    )
    scored = index.scored_run(layer)
    return LayerPage(
        **layer_info(index, urls, layer).model_dump(exclude={"faithfulness"}),
        density=density_of(index, layer),
        features=features,
        filters=filters,
        paging=paging,
        random=urls.random(layer),
        sort_eval_scores=RunKind(token=scored[0], judge=scored[1]) if scored else None,
        csv=urls.layer(layer, **{**query, "page_size": None}, format="csv"),
        training=urls.training(layer) if index.checkpoints(layer) else None,
        faithfulness=layer_faithfulness(index, layer),
    )


class CsvRoute(APIRoute):
    """A route that takes only the requests asking for `?format=csv`, so the page's own route, registered
    after it on the same path, answers every other request (and keeps its OpenAPI description)."""

    def matches(self, scope):
        match, child_scope = super().matches(scope)
        if match is not Match.NONE and QueryParams(scope.get("query_string", b"")).get("format") != "csv":
            return Match.NONE, {}
        return match, child_scope


CSV_COLUMNS = (  # the table's columns (`label` holds the label terms, space-separated)
    *("layer", "feature", "label", "frequency", "image_frequency", "cls_frequency", "max_activation"),
    *("mean_activation", "image_id", "url", "faithfulness"),
)
CSV_CHUNK = 10_000  # table rows per query while the CSV streams


def csv_lines(index: Index, urls: Urls, layer: int, filters: Filters) -> Iterator[str]:
    """The header, then every feature of `layer` that `filters` select, in their order, a chunk at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    args = (layer, filters.sort, filters.order, filters.min_freq, filters.max_freq, words_of(filters.q))
    offset = 0
    while True:
        rows, _ = index.feature_table(
            *args, offset, CSV_CHUNK, min_sort_eval=filters.min_sort_eval, min_faithfulness=filters.min_faithfulness
        )
        for row in rows:
            summary = feature_summary(index, urls, row).model_dump()
            extra = {name: row[name] for name in ("cls_frequency", "mean_activation", "faithfulness")}
            line = {**summary, **extra}
            writer.writerow(["" if line[name] is None else line[name] for name in CSV_COLUMNS])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        if len(rows) < CSV_CHUNK:
            return
        offset += CSV_CHUNK


def layer_csv(
    index: IndexDep, urls: UrlsDep, layer: LayerPath, query: Annotated[Filters, Query()]
) -> StreamingResponse:
    require_layer(index, layer)
    return StreamingResponse(
        csv_lines(index, urls, layer, query),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="layer-{layer}-features.csv"'},
    )


for _path in ("/layers/{layer}", PAGES.twin("/layers/{layer}")):  # before the page: see CsvRoute
    router.add_api_route(
        _path, layer_csv, methods=["GET"], route_class_override=CsvRoute, include_in_schema=False, name="layer_csv"
    )


@page(
    router,
    "/layers/{layer}",
    template="layer.html",
    fragments={"feature-table": "_feature_table.html"},
    summary="One layer: metrics, density histogram and a page of its features",
)
def layer_page(
    index: IndexDep, settings: SettingsDep, urls: UrlsDep, layer: LayerPath, query: Annotated[LayerQuery, Query()]
) -> LayerPage:
    size = min(query.page_size or settings.page_size, settings.max_page_size)
    filters = Filters(**query.model_dump(include=set(Filters.model_fields)))
    return layer_table(index, urls, layer, filters, query.page, size)


def random_feature(index: Index, layer: int) -> int:
    require_layer(index, layer)
    alive = index.alive_features(layer)
    if len(alive):
        return int(alive[random.randrange(len(alive))])
    return random.randrange(index.layers[layer]["n_features"])


@page(
    router,
    "/layers/{layer}/random",
    summary="Redirect to the JSON of a random feature that fires",
    responses={303: {"description": "to /api/layers/{layer}/features/{feature}"}},
)
def random_page(index: IndexDep, urls: UrlsDep, layer: LayerPath) -> Redirect:
    return Redirect(urls.feature(layer, random_feature(index, layer)))

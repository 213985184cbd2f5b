"""Lineage across layers (`clipscope-explorer lineage`): a feature's related features at the other layers
(`/layers/{layer}/features/{feature}/lineage`, shown on the feature page as a lazily loaded strip), and the
concept view (`/concepts?layer=&feature=`): the chain of best matches from the first to the last layer
through one feature. Read by `LineageQueries` (app/lineage_queries.py); an index without the table has none."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from clipscope_explorer.app.deps import INT32_MAX, FeaturePath, IndexDep, LayerPath, UrlsDep, require_feature
from clipscope_explorer.app.pages.twins import page
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls

router = APIRouter()


class LineageLink(BaseModel):
    """A related feature at another layer: `score` is the normalised PMI of the two features' co-occurrence
    over the sample (1: always together, 0: independent), `support` the images it rests on, `source` what
    co-occurs (`cls`: firing on the CLS token; `top_images`: shared top images). docs/schema.md says how."""

    layer: int
    feature: int
    score: float
    support: int
    source: str
    label: str
    image_id: int | None  # its top image, for a thumbnail
    url: str


class LineagePage(BaseModel):
    layer: int
    feature: int
    label: str
    links: list[LineageLink]  # by layer, then score descending: the first of a layer is its best match
    feature_url: str
    concept_url: str


class ConceptStep(BaseModel):
    """One layer of a concept chain: its feature (null where no link reaches this layer), and the link that
    reached it from the chain's feature at the layer before it, going outward from the given feature (null
    for the given feature itself)."""

    layer: int
    feature: int | None
    score: float | None
    support: int | None
    source: str | None
    label: str
    image_id: int | None
    url: str | None
    concept_url: str | None


class ConceptPage(BaseModel):
    layer: int
    feature: int
    label: str
    steps: list[ConceptStep]  # one per layer of the index, first to last
    lineage_url: str


class ConceptQuery(BaseModel):
    layer: int = Field(ge=0, le=INT32_MAX, description="the feature's layer")
    feature: int = Field(ge=0, le=INT32_MAX, description="the feature the chain goes through")


def _card(index: Index, layer: int, feature: int) -> tuple[str, int | None]:
    """A feature's label and top image."""
    label = index.summaries(layer, [feature]).get(feature, {}).get("label") or ""
    first = index.first_top_images(layer)
    return label, int(first[feature]) if 0 <= feature < len(first) and first[feature] >= 0 else None


def lineage_links(index: Index, urls: Urls, layer: int, feature: int) -> list[LineageLink]:
    links = []
    for row in index.lineage_links(layer, feature):
        other_layer, other = row["other_layer"], row["other_feature"]
        if index.has_feature(other_layer, other):
            label, image_id = _card(index, other_layer, other)
            links.append(
                LineageLink(
                    **{name: row[name] for name in ("score", "support", "source")},
                    layer=other_layer,
                    feature=other,
                    label=label,
                    image_id=image_id,
                    url=urls.feature(other_layer, other),
                )
            )
    return links


@page(
    router,
    "/layers/{layer}/features/{feature}/lineage",
    template="lineage.html",
    fragments={"lineage": "_lineage_strip.html"},
    summary="A feature's related features at the other layers, by co-occurrence over the sample",
)
def lineage_page(index: IndexDep, urls: UrlsDep, layer: LayerPath, feature: FeaturePath) -> LineagePage:
    require_feature(index, layer, feature)
    return LineagePage(
        layer=layer,
        feature=feature,
        label=_card(index, layer, feature)[0],
        links=lineage_links(index, urls, layer, feature),
        feature_url=urls.feature(layer, feature),
        concept_url=urls.concepts(layer, feature),
    )


def add_concept_urls(index: Index, urls: Urls, results: list) -> None:
    """Give each feature in `results` (models with `layer`, `feature` and `concept_url`) its concept view's URL,
    where its layer has lineage."""
    layers = index.lineage_layers()
    for result in results:
        if result.layer in layers:
            result.concept_url = urls.concepts(result.layer, result.feature)


def _step(index: Index, urls: Urls, layer: int, feature: int | None, link: dict | None) -> ConceptStep:
    label, image_id = _card(index, layer, feature) if feature is not None else ("", None)
    return ConceptStep(
        layer=layer,
        feature=feature,
        score=link["score"] if link else None,
        support=link["support"] if link else None,
        source=link["source"] if link else None,
        label=label,
        image_id=image_id,
        url=urls.feature(layer, feature) if feature is not None else None,
        concept_url=urls.concepts(layer, feature) if feature is not None else None,
    )


def concept_chain(index: Index, urls: Urls, layer: int, feature: int) -> list[ConceptStep]:
    """Outward from (layer, feature), each layer's best match of the chain's feature at the nearest layer
    before it that has one (a layer without a link leaves a gap and the chain goes on past it)."""
    layers = sorted(index.layers)
    at = layers.index(layer)
    steps = {layer: _step(index, urls, layer, feature, None)}
    for outward in (layers[at + 1 :], layers[:at][::-1]):
        current = (layer, feature)
        for other in outward:
            link = index.best_lineage_link(*current, other)
            steps[other] = _step(index, urls, other, link["other_feature"] if link else None, link)
            if link:
                current = (other, link["other_feature"])
    return [steps[n] for n in layers]


@page(
    router,
    "/concepts",
    template="concepts.html",
    summary="The chain of best matches through one feature, from the first to the last layer",
)
def concept_page(index: IndexDep, urls: UrlsDep, query: Annotated[ConceptQuery, Query()]) -> ConceptPage:
    require_feature(index, query.layer, query.feature)
    return ConceptPage(
        layer=query.layer,
        feature=query.feature,
        label=_card(index, query.layer, query.feature)[0],
        steps=concept_chain(index, urls, query.layer, query.feature),
        lineage_url=urls.lineage(query.layer, query.feature),
    )

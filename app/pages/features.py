"""`/layers/{layer}/features/{feature}`: the feature page, and the large view of one example."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from clipscope_explorer.app.deps import FeaturePath, ImagePath, IndexDep, JsonTwin, LayerPath, UrlsDep, require_feature
from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.faithfulness import FeatureFaithfulness, feature_faithfulness
from clipscope_explorer.app.models import round_sig, rounded_list
from clipscope_explorer.app.pages.twins import page
from clipscope_explorer.app.queries import Index, dequantise
from clipscope_explorer.app.sort_eval import FeatureSortEval, SortEvalTrial, feature_sort_eval, feature_sort_eval_trials
from clipscope_explorer.app.urls import PAGES, Urls

router = APIRouter()


def heatmap_values(scale: float, heatmap: bytes) -> list[float]:
    """Dequantised heatmap as floats (the quantisation step is far above float32's precision)."""
    return rounded_list(dequantise(scale, heatmap))


class Example(BaseModel):
    """One image shown for a feature; `heatmap` is per patch in activation units (CLS excluded)."""

    rank: int
    image_id: int
    key: str | None
    caption: str | None
    url: str | None
    activation: float
    cls_activation: float
    heatmap: list[float] | None = None
    thumbnail_url: str
    overlay_url: str
    page_url: str


class Band(BaseModel):
    """Examples whose activation lies in (low, high], a slice below the top list."""

    band: int
    low: float
    high: float
    examples: list[Example]


class Histogram(BaseModel):
    """Firing-token counts per bin; bin i spans edges[i]..edges[i+1] (log-spaced, fixed per layer)."""

    edges: list[float]
    counts: list[int]


class Similar(BaseModel):
    feature: int
    cosine: float
    label: str
    frequency: float | None
    max_activation: float | None
    image_id: int | None
    url: str


class LayerLink(BaseModel):
    layer: int
    url: str


class FeatureLinks(BaseModel):
    layer: str
    previous: str | None
    next: str | None
    random: str
    other_layers: list[LayerLink]
    preview: str
    positions: str
    lineage: str | None = None  # its related features at the other layers (null when the index has no lineage)


class ZeroShotLabel(BaseModel):
    """A label from CLIP's text space: the term's cosine with the feature's prototype (`score`) and its lead
    over the next candidate and the shuffled-prototype baseline (`margin`); docs/schema.md says how."""

    text: str
    score: float
    margin: float


class FirstSeen(BaseModel):
    """Since when the feature exists in training: the earliest checkpoint from which on its best decoder match
    has a cosine above 0.9 at every later checkpoint, and that match's cosine."""

    tokens: int
    cosine: float


class FeaturePage(BaseModel):
    layer: int
    feature: int
    n_features: int
    dead: bool
    label: str
    label_terms: list[str]
    zero_shot_labels: list[ZeroShotLabel]
    n_fired_tokens: int
    n_fired_images: int
    n_fired_cls: int
    frequency: float
    image_frequency: float
    cls_frequency: float
    max_activation: float | None
    mean_activation: float | None
    histogram: Histogram
    position_mean: list[float] | None
    grid: list[int]
    top_images: list[Example]
    bands: list[Band]
    similar: list[Similar]
    sort_eval: list[FeatureSortEval]  # its own score per run kind (app/sort_eval.py)
    sort_eval_trials: list[SortEvalTrial]
    links: FeatureLinks
    first_seen: FirstSeen | None = None  # null: no earlier checkpoint matches, or the index holds none
    faithfulness: FeatureFaithfulness | None = None  # null: not evaluated (app/faithfulness.py)


def _example(urls: Urls, layer: int, feature: int, row: dict, image: dict | None, detail: bool) -> Example:
    image = image or {}
    return Example(
        rank=row["rank"],
        image_id=row["image_id"],
        key=image.get("key"),
        caption=image.get("caption"),
        url=image.get("url"),
        activation=round_sig(row["activation"]),
        cls_activation=round_sig(row["cls_activation"]),
        heatmap=heatmap_values(row["heatmap_scale"], row["heatmap"]) if detail else None,
        thumbnail_url=urls.thumbnail(row["image_id"]),
        overlay_url=urls.overlay(layer, feature, row["image_id"]),
        page_url=urls.example(layer, feature, row["image_id"]),
    )


def zero_shot_labels(row: dict) -> list[ZeroShotLabel]:
    """A feature row's zero-shot labels, best first (none from an index of schema 1.1)."""
    columns = (row.get(name) or [] for name in ("zero_shot_terms", "zero_shot_scores", "zero_shot_margins"))
    return [
        ZeroShotLabel(text=text, score=round_sig(score), margin=round_sig(margin))
        for text, score, margin in zip(*columns)
    ]


def _bands(index: Index, examples: list[Example], rows: list[dict], max_activation: float | None) -> list[Band]:
    count = int(index.meta.get("band_count") or 0) or max((r["band"] for r in rows), default=0)
    top = max_activation or 0.0
    return [
        Band(
            band=b,
            low=round_sig(top * (1 - b / count)),
            high=round_sig(top * (1 - (b - 1) / count)),
            examples=[e for e, r in zip(examples, rows) if r["kind"] == "band" and r["band"] == b],
        )
        for b in range(1, count + 1)
    ]


@page(
    router,
    "/layers/{layer}/features/{feature}",
    template="feature.html",
    fragments={"sort-eval-trials": "_sort_eval_trials.html", "faithfulness": "_faithfulness.html"},
    summary="One feature: statistics, histogram, examples with heatmaps, similar features",
)
def feature_page(
    index: IndexDep, urls: UrlsDep, layer: LayerPath, feature: FeaturePath, detail: JsonTwin
) -> FeaturePage:
    """The feature page's data. `detail` (the JSON) adds heatmaps and position means; the HTML page
    shows those as images, so it skips reading them."""
    layer_row = require_feature(index, layer, feature)
    row = index.feature(layer, feature)
    if row is None:
        raise NotFound(
            f"Feature {feature} of layer {layer} is missing from this index.", [(PAGES.layer(layer), f"Layer {layer}")]
        )
    rows = index.examples(layer, feature, heatmaps=detail)
    images = index.images([r["image_id"] for r in rows])
    examples = [_example(urls, layer, feature, r, images.get(r["image_id"]), detail) for r in rows]
    similar_ids = [int(f) for f in row["similar_features"] or []]
    summaries = index.summaries(layer, similar_ids)
    first = index.first_top_images(layer)
    similar = [
        Similar(
            feature=f,
            cosine=round_sig(c, 4),
            label=summaries.get(f, {}).get("label") or "",
            frequency=summaries.get(f, {}).get("frequency"),
            max_activation=summaries.get(f, {}).get("max_activation"),
            image_id=int(first[f]) if 0 <= f < len(first) and first[f] >= 0 else None,
            url=urls.feature(layer, f),
        )
        for f, c in zip(similar_ids, row["similar_cosines"] or [])
    ]
    n_features = layer_row["n_features"]
    links = FeatureLinks(
        layer=urls.layer(layer),
        previous=urls.feature(layer, feature - 1) if feature > 0 else None,
        next=urls.feature(layer, feature + 1) if feature + 1 < n_features else None,
        random=urls.random(layer),
        other_layers=[
            LayerLink(layer=n, url=urls.feature(n, feature))
            for n in sorted(index.layers)
            if n != layer and feature < index.layers[n]["n_features"]
        ],
        preview=urls.preview(layer, feature),
        positions=urls.positions(layer, feature),
        lineage=urls.lineage(layer, feature) if layer in index.lineage_layers() else None,
    )
    return FeaturePage(
        layer=layer,
        feature=feature,
        n_features=n_features,
        dead=not row["n_fired_tokens"],
        label=row["label"] or "",
        label_terms=list(row["label_terms"] or []),
        zero_shot_labels=zero_shot_labels(row),
        n_fired_tokens=row["n_fired_tokens"],
        n_fired_images=row["n_fired_images"],
        n_fired_cls=row["n_fired_cls"],
        frequency=row["frequency"],
        image_frequency=row["image_frequency"],
        cls_frequency=row["cls_frequency"],
        max_activation=row["max_activation"],
        mean_activation=row["mean_activation"],
        histogram=Histogram(edges=list(layer_row["histogram_edges"] or []), counts=list(row["histogram"] or [])),
        position_mean=index.position_mean(layer, feature) if detail else None,
        grid=list(index.grid),
        top_images=[e for e, r in zip(examples, rows) if r["kind"] == "top"],
        bands=_bands(index, examples, rows, row["max_activation"]),
        similar=similar,
        sort_eval=feature_sort_eval(index, layer, feature),
        sort_eval_trials=feature_sort_eval_trials(index, urls, layer, feature),
        links=links,
        first_seen=index.first_seen(layer, feature),
        faithfulness=feature_faithfulness(index, urls, layer, feature),
    )


class ExamplePage(BaseModel):
    """One example of a feature in full: the image, its activation and per-patch values."""

    layer: int
    feature: int
    image_id: int
    kind: str
    band: int
    rank: int
    key: str | None
    caption: str | None
    url: str | None
    source: str | None
    width: int | None
    height: int | None
    activation: float
    cls_activation: float
    max_activation: float | None
    grid: list[int]
    heatmap: list[float]
    thumbnail_url: str
    overlay_url: str
    feature_url: str
    sample_url: str | None  # the image's own page (null for an index without sample images)


@page(
    router,
    "/layers/{layer}/features/{feature}/examples/{image_id}",
    template="example.html",
    fragments={"modal-body": "_example.html"},
    summary="One example of a feature with its per-patch heatmap",
)
def example_page(
    index: IndexDep, urls: UrlsDep, layer: LayerPath, feature: FeaturePath, image_id: ImagePath
) -> ExamplePage:
    require_feature(index, layer, feature)
    row = index.example(layer, feature, image_id)
    if row is None:
        raise NotFound(
            f"Image {image_id} is not an example of feature {feature} on layer {layer}.",
            [(PAGES.feature(layer, feature), f"Feature {feature}"), (PAGES.layer(layer), f"Layer {layer}")],
        )
    image = index.images([image_id]).get(image_id, {})
    return ExamplePage(
        layer=layer,
        feature=feature,
        image_id=image_id,
        kind=row["kind"],
        band=row["band"],
        rank=row["rank"],
        key=image.get("key"),
        caption=image.get("caption"),
        url=image.get("url"),
        source=index.names.name(image.get("source")),
        width=image.get("width"),
        height=image.get("height"),
        activation=round_sig(row["activation"]),
        cls_activation=round_sig(row["cls_activation"]),
        max_activation=row["max_activation"],
        grid=list(index.grid),
        heatmap=heatmap_values(row["heatmap_scale"], row["heatmap"]),
        thumbnail_url=urls.thumbnail(image_id),
        overlay_url=urls.overlay(layer, feature, image_id),
        feature_url=urls.feature(layer, feature),
        sample_url=urls.sample(image_id) if index.has("samples") else None,
    )

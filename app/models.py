"""JSON shapes shared by several pages (documented in docs/API.md), and the decimal form of their numbers."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel

from clipscope_explorer.app.faithfulness import FaithfulnessSummary, faithfulness_summary
from clipscope_explorer.app.model_card import ModelCardRow, model_card_row
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.sort_eval import LayerSortEval, layer_sort_eval
from clipscope_explorer.app.urls import Urls


def round_sig(value: float | None, digits: int = 7) -> float | None:
    """A float32-born value without float32 noise in its decimal form."""
    return None if value is None else float(f"{value:.{digits}g}")


def rounded_list(values: np.ndarray) -> list[float]:
    """float32 values as floats to 7 significant digits of their peak (float32's precision), so a list
    such as a heatmap prints without noise yet keeps every value's precision relative to the largest."""
    values = np.asarray(values, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0:
        return values.tolist()
    return np.round(values, max(0, 7 - math.ceil(math.log10(peak)))).tolist()


class LayerInfo(BaseModel):
    """One layer's SAE and its reconstruction metrics measured on this index."""

    layer: int
    sae_file: str | None
    checkpoint: int | None
    d_in: int
    n_features: int
    k: int
    n_images: int
    n_tokens: int
    mse: float | None
    explained_variance: float | None
    mse_raw: float | None
    explained_variance_raw: float | None
    l0: float | None
    dead_fraction: float | None
    active_fraction: float | None
    nonpositive_kept_fraction: float | None
    mse_by_position: list[float]
    model_card: ModelCardRow | None
    sort_eval: list[LayerSortEval]  # one per run kind in the index, by token then judge
    faithfulness: FaithfulnessSummary | None  # its evaluated features' means (null: none evaluated)
    url: str


class FeatureSummary(BaseModel):
    """A feature in a list: its label, headline numbers and top image (for a thumbnail)."""

    layer: int
    feature: int
    label: str
    label_terms: list[str]
    frequency: float | None
    image_frequency: float | None
    max_activation: float | None
    image_id: int | None
    url: str


def layer_info(index: Index, urls: Urls, layer: int) -> LayerInfo:
    row = index.layers[layer]
    fields = {
        name: row.get(name)
        for name in LayerInfo.model_fields
        if name not in ("model_card", "sort_eval", "faithfulness", "url")
    }
    fields["mse_by_position"] = list(row.get("mse_by_position") or [])
    fields["sae_file"] = index.names.name(row.get("sae_file"))
    card = model_card_row(layer) if index.meta.get("released_suite") else None
    return LayerInfo(
        **fields,
        model_card=card,
        sort_eval=layer_sort_eval(index, layer),
        faithfulness=faithfulness_summary(index, layer),
        url=urls.layer(layer),
    )


def feature_summary(index: Index, urls: Urls, row: dict) -> FeatureSummary:
    first = index.first_top_images(row["layer"])[row["feature"]]
    return FeatureSummary(
        layer=row["layer"],
        feature=row["feature"],
        label=row.get("label") or "",
        label_terms=list(row.get("label_terms") or []),
        frequency=row.get("frequency"),
        image_frequency=row.get("image_frequency"),
        max_activation=row.get("max_activation"),
        image_id=int(first) if first >= 0 else None,
        url=urls.feature(row["layer"], row["feature"]),
    )


class ImageHit(BaseModel):
    """A sample image and its score: the cosine of its CLIP embedding with a query's (a text, another
    sample image, an upload)."""

    image_id: int
    key: str
    caption: str | None
    score: float
    url: str | None  # the original image URL, when known (as an Example's)
    page_url: str  # the sample's own page
    thumbnail_url: str | None  # when the index holds its thumbnail (images some feature shows)


def image_hits(index: Index, urls: Urls, found: Iterable[tuple[int, float]]) -> list[ImageHit]:
    """`ImageHit`s of (image_id, score) pairs, in their order."""
    found = [(int(image_id), float(score)) for image_id, score in found]
    ids = [image_id for image_id, _ in found]
    samples = index.samples_by_id(ids)
    shown = index.images(ids)  # the images with a thumbnail
    return [
        ImageHit(
            image_id=image_id,
            key=samples.get(image_id, {}).get("key") or "",
            caption=samples.get(image_id, {}).get("caption"),
            score=round_sig(score),
            url=samples.get(image_id, {}).get("url"),
            page_url=urls.sample(image_id),
            thumbnail_url=urls.thumbnail(image_id) if image_id in shown else None,
        )
        for image_id, score in found
    ]

"""JSON shapes shared by several pages (documented in docs/API.md)."""

from __future__ import annotations

from pydantic import BaseModel

from clipscope_explorer.app.model_card import ModelCardRow, model_card_row
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls


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


def layer_info(index: Index, layer: int) -> LayerInfo:
    row = index.layers[layer]
    fields = {name: row.get(name) for name in LayerInfo.model_fields if name not in ("model_card", "url")}
    fields["mse_by_position"] = list(row.get("mse_by_position") or [])
    card = model_card_row(layer) if index.meta.get("released_suite") else None
    return LayerInfo(**fields, model_card=card, url=Urls.layer(layer))


def feature_summary(index: Index, row: dict) -> FeatureSummary:
    first = index.first_top_images(row["layer"])[row["feature"]]
    return FeatureSummary(
        layer=row["layer"], feature=row["feature"], label=row.get("label") or "",
        label_terms=list(row.get("label_terms") or []), frequency=row.get("frequency"),
        image_frequency=row.get("image_frequency"), max_activation=row.get("max_activation"),
        image_id=int(first) if first >= 0 else None, url=Urls.feature(row["layer"], row["feature"]))

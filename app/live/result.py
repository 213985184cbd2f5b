"""The data of an upload's result (`POST /api/encode`, `/uploads/{id}` and its JSON twin).

Built from the upload's sparse codes with `clipscope_explorer.precompute.index.image_features`,
the definitions of docs/schema.md, so an image that is also in the index gets
the activations and heatmaps the index holds for it. Features of layers whose
SAE is the index's carry their label terms, four top images and a link to
their feature page. The upload's CLIP embedding, when it has one, finds its
nearest sample images and zero-shot labels (`neighbours.py`).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from clipscope_explorer.app.live.neighbours import ZeroShotScore, nearest_images, zero_shot_labels
from clipscope_explorer.app.meaning.service import MeaningService
from clipscope_explorer.app.models import ImageHit, round_sig, rounded_list
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls
from clipscope_explorer.precompute.index.image_features import image_features


class IndexImage(BaseModel):
    image_id: int
    thumbnail_url: str
    page_url: str


class UploadFeature(BaseModel):
    """A feature firing on the upload; `heatmap` per patch in activation units (CLS excluded)."""

    feature: int
    activation: float
    cls_activation: float
    patch_activation: float
    mean_activation: float
    heatmap: list[float]
    label: str | None = None
    label_terms: list[str] = []
    max_activation: float | None = None
    top_images: list[IndexImage] = []
    url: str | None = None


class WinnerCount(BaseModel):
    feature: int
    patches: int


class UploadLayer(BaseModel):
    layer: int
    n_firing: int
    in_index: bool
    features: list[UploadFeature]
    winners: list[int | None]
    winner_counts: list[WinnerCount]
    patches: list[list[tuple[int, float]]] | None = None


class UploadResult(BaseModel):
    upload_id: str
    url: str | None
    stored: bool
    width: int
    height: int
    grid: list[int]
    image_url: str | None
    preview_url: str | None
    json_url: str | None
    sort: str
    top: int
    layers: dict[str, UploadLayer]
    nearest_images: list[ImageHit] = []
    zero_shot_labels: list[ZeroShotScore] = []
    interventions: bool = False  # whether POST /api/intervene can edit this upload here (stored, and on)


def upload_urls(urls: Urls, upload_id: str) -> dict[str, str]:
    page = urls.upload_result(upload_id)
    return {
        "url": page,
        "image_url": urls.upload_image(upload_id),
        "preview_url": urls.upload_preview(upload_id),
        "json_url": urls.twin(page),
    }


def _winners(values: np.ndarray, indices: np.ndarray) -> tuple[list[int | None], list[WinnerCount]]:
    """The strongest firing feature on each patch (None where nothing fires), and patches won per feature."""
    patch_values, patch_indices = values[1:], indices[1:]
    masked = np.where(patch_values > 0, patch_values, -np.inf)
    best = masked.argmax(axis=1)
    any_fires = (patch_values > 0).any(axis=1)
    winner = np.where(any_fires, patch_indices[np.arange(len(best)), best], -1)
    features, counts = np.unique(winner[winner >= 0], return_counts=True)
    order = np.lexsort((features, -counts))
    return (
        [int(w) if w >= 0 else None for w in winner],
        [WinnerCount(feature=int(features[i]), patches=int(counts[i])) for i in order],
    )


def _patch_lists(values: np.ndarray, indices: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per patch, the features firing there with their values, strongest first."""
    out = []
    for row_values, row_indices in zip(values[1:], indices[1:]):
        order = np.argsort(-row_values, kind="stable")
        out.append([(int(row_indices[j]), round_sig(float(row_values[j]), 4)) for j in order if row_values[j] > 0])
    return out


def _rank(features, sort: str) -> np.ndarray:
    key = {
        "max": features.activation,
        "patch": features.patch_activation,
        "cls": features.cls_activation,
        "mean": features.mean_activation,
    }[sort]
    return np.argsort(-key, kind="stable")  # ties keep activation order


def upload_layer(
    index: Index,
    urls: Urls,
    layer: int,
    values: np.ndarray,
    indices: np.ndarray,
    in_index: bool,
    sort: str,
    top: int,
    patches: bool,
) -> UploadLayer:
    summary = image_features(values, indices)
    chosen = _rank(summary, sort)[:top]
    feature_ids = [int(summary.features[i]) for i in chosen]
    known = in_index and layer in index.layers
    n_index = index.layers[layer]["n_features"] if known else 0
    listed = [f for f in feature_ids if f < n_index]
    rows = index.summaries(layer, listed) if listed else {}
    top_images = index.top_images(layer) if listed else None
    heatmaps = summary.heatmaps(chosen) if len(chosen) else np.zeros((0, 0))
    features = []
    for n, (i, feature) in enumerate(zip(chosen, feature_ids)):
        row = rows.get(feature, {})
        image_ids = [image_id for image_id in top_images[feature].tolist() if image_id >= 0] if row else []
        features.append(
            UploadFeature(
                feature=feature,
                activation=round_sig(float(summary.activation[i])),
                cls_activation=round_sig(float(summary.cls_activation[i])),
                patch_activation=round_sig(float(summary.patch_activation[i])),
                mean_activation=round_sig(float(summary.mean_activation[i])),
                heatmap=rounded_list(heatmaps[n]),
                label=row.get("label"),
                label_terms=list(row.get("label_terms") or []),
                max_activation=row.get("max_activation"),
                top_images=[
                    IndexImage(
                        image_id=image_id,
                        thumbnail_url=urls.thumbnail(image_id),
                        page_url=urls.example(layer, feature, image_id),
                    )
                    for image_id in image_ids
                ],
                url=urls.feature(layer, feature) if feature in rows else None,
            )
        )
    winners, counts = _winners(values, indices)
    return UploadLayer(
        layer=layer,
        n_firing=len(summary.features),
        in_index=known,
        features=features,
        winners=winners,
        winner_counts=counts,
        patches=_patch_lists(values, indices) if patches else None,
    )


def upload_result(
    index: Index,
    urls: Urls,
    upload_id: str,
    width: int,
    height: int,
    grid: tuple[int, int],
    codes: dict,
    index_layers: tuple[int, ...],
    stored: bool,
    sort: str,
    top: int,
    patches: bool,
    embedding: np.ndarray | None = None,
    meaning: MeaningService | None = None,
) -> UploadResult:
    layers = {
        str(layer): upload_layer(index, urls, layer, values, indices, layer in index_layers, sort, top, patches)
        for layer, (values, indices) in sorted(codes.items())
    }
    links = upload_urls(urls, upload_id) if stored else dict.fromkeys(("url", "image_url", "preview_url", "json_url"))
    return UploadResult(
        upload_id=upload_id,
        stored=stored,
        width=width,
        height=height,
        grid=list(grid),
        sort=sort,
        top=top,
        layers=layers,
        nearest_images=nearest_images(index, urls, meaning, embedding),
        zero_shot_labels=zero_shot_labels(index, embedding),
        **links,
    )

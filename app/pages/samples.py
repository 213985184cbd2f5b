"""`/samples/{image_id}`: one sample image: its caption and key, the features its CLS token keeps on each
layer, the features whose top lists or bands show it, and the sample images nearest it by CLIP embedding."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from clipscope_explorer.app.deps import ImagePath, IndexDep, SettingsDep, UrlsDep
from clipscope_explorer.app.errors import NotFound
from clipscope_explorer.app.live.neighbours import NEAREST
from clipscope_explorer.app.meaning.info import MeaningDep
from clipscope_explorer.app.meaning.service import MeaningService
from clipscope_explorer.app.models import ImageHit, image_hits, round_sig
from clipscope_explorer.app.pages.twins import page
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import PAGES, Urls

router = APIRouter()


class ClsFeature(BaseModel):
    feature: int
    activation: float  # its value on the CLS token
    label: str
    url: str


class ClsLayer(BaseModel):
    """The features firing on the image's CLS token at one layer (kept by the SAE and > 0), strongest first."""

    layer: int
    features: list[ClsFeature]


class ShownBy(BaseModel):
    """A feature that shows the image among its examples: in its top list (`band` 0) or an activation band."""

    layer: int
    feature: int
    kind: Literal["top", "band"]
    band: int
    rank: int
    activation: float  # the image's max over its tokens for this feature
    label: str
    url: str  # the feature's page
    example_url: str  # the image as this feature's example, with its heatmap


class SamplePage(BaseModel):
    image_id: int
    key: str
    caption: str | None
    url: str | None
    source: str | None
    width: int
    height: int
    thumbnail_url: str | None  # when the index holds its thumbnail (images some feature shows)
    cls_features: list[ClsLayer]
    examples: list[ShownBy]
    examples_truncated: bool
    nearest_images: list[ImageHit]
    message: str | None  # why nearest images are missing, when they are


def require_sample(index: Index, image_id: int) -> dict:
    """The sample's row, or a 404 saying why there is none."""
    if not index.has("samples"):
        raise NotFound(
            "This index records no sample images (it was built before schema version 1.2): rebuild it with "
            "clipscope-explorer precompute to see them."
        )
    row = index.sample(image_id)
    if row is None:
        n_images = (index.meta.get("sample") or {}).get("n_images")
        numbered = f" Its sample images are numbered 0 to {n_images - 1}." if n_images else ""
        raise NotFound(f"This index has no sample image {image_id}.{numbered}", [(PAGES.overview(), "Overview")])
    return row


def cls_features(index: Index, urls: Urls, image_id: int) -> list[ClsLayer]:
    out = []
    for layer, (indices, values) in index.sample_codes(image_id).items():
        firing = sorted(((f, v) for f, v in zip(indices, values) if v > 0), key=lambda fv: (-fv[1], fv[0]))
        labels = index.summaries(layer, [f for f, _ in firing]) if layer in index.layers else {}
        features = [
            ClsFeature(
                feature=f,
                activation=round_sig(v),
                label=labels.get(f, {}).get("label") or "",
                url=urls.feature(layer, f),
            )
            for f, v in firing
        ]
        out.append(ClsLayer(layer=layer, features=features))
    return out


def shown_by(index: Index, urls: Urls, image_id: int, rows: list[dict]) -> list[ShownBy]:
    labels = {
        layer: index.summaries(layer, [r["feature"] for r in rows if r["layer"] == layer]) for layer in index.layers
    }
    return [
        ShownBy(
            **{name: r[name] for name in ("layer", "feature", "kind", "band", "rank")},
            activation=round_sig(r["activation"]),
            label=labels.get(r["layer"], {}).get(r["feature"], {}).get("label") or "",
            url=urls.feature(r["layer"], r["feature"]),
            example_url=urls.example(r["layer"], r["feature"], image_id),
        )
        for r in rows
    ]


def nearest_images(
    index: Index, urls: Urls, meaning: MeaningService, image_id: int
) -> tuple[list[ImageHit], str | None]:
    """The NEAREST sample images by cosine of their embeddings with this one's (itself left out; ties: the
    smaller id), or none and why."""
    status = meaning.status("images", needs_text=False)
    if not status.ready:
        return [], index.names.text(status.message)
    vector = meaning.image_vector(image_id)
    if vector is None:
        return [], "This image has no stored CLIP embedding, so it has no nearest images."
    found = [(i, s) for i, s in meaning.nearest_images(vector, NEAREST + 1) if i != image_id][:NEAREST]
    return image_hits(index, urls, found), None


@page(
    router,
    "/samples/{image_id}",
    template="sample.html",
    summary="One sample image: its CLS features per layer, the features that show it, its nearest images",
)
def sample_page(
    index: IndexDep, settings: SettingsDep, urls: UrlsDep, meaning: MeaningDep, image_id: ImagePath
) -> SamplePage:
    row = require_sample(index, image_id)
    limit = settings.max_page_size
    examples = index.image_examples(image_id, limit + 1)
    nearest, message = nearest_images(index, urls, meaning, image_id)
    return SamplePage(
        image_id=image_id,
        key=row["key"],
        caption=row["caption"],
        url=row["url"],
        source=index.names.name(row["source"]),
        width=row["width"],
        height=row["height"],
        thumbnail_url=urls.thumbnail(image_id) if index.images([image_id]) else None,
        cls_features=cls_features(index, urls, image_id),
        examples=shown_by(index, urls, image_id, examples[:limit]),
        examples_truncated=len(examples) > limit,
        nearest_images=nearest,
        message=message,
    )

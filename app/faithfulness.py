"""Occlusion faithfulness as pages show it (docs/API.md): per feature its means and each evaluated example's
activations, per layer a summary and the distributions of the drops. Read by `FaithfulnessQueries`
(app/faithfulness_queries.py)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls

# Relative drops in tenths; values outside count in the end bins.
HISTOGRAM_EDGES = np.round(np.linspace(-1.0, 1.0, 21), 10)


class FaithfulnessExample(BaseModel):
    """One evaluated top example: the feature's activation on it encoded again as it is (`before`), with its
    `n_hot` hottest patches occluded (`hot`), with as many random ones occluded (`random`, mean of the draws),
    and with only the hot patches kept (`insertion`)."""

    rank: int
    image_id: int
    thumbnail_url: str | None
    page_url: str
    n_hot: int
    before: float
    hot: float
    random: float
    insertion: float


class FeatureFaithfulness(BaseModel):
    """Means over the `examples` evaluated images: the relative drop with the hot patches occluded and with
    random ones, the share the hot patches alone keep, and `score` = `hot_drop - random_drop`."""

    examples: int
    hot_drop: float
    random_drop: float
    kept: float
    score: float
    per_example: list[FaithfulnessExample]


class FaithfulnessHistogram(BaseModel):
    """Evaluated features per bin of each measure; bin i spans edges[i]..edges[i+1]."""

    edges: list[float]
    hot_drop: list[int]
    random_drop: list[int]
    score: list[int]


class FaithfulnessSummary(BaseModel):
    """The layer's evaluated features: how many, their mean score and their mean drops."""

    features: int
    mean_score: float
    mean_hot_drop: float
    mean_random_drop: float


class LayerFaithfulness(FaithfulnessSummary):
    """The layer's summary and the distributions."""

    histogram: FaithfulnessHistogram


def feature_faithfulness(index: Index, urls: Urls, layer: int, feature: int) -> FeatureFaithfulness | None:
    row = index.feature_faithfulness(layer, feature)
    if row is None:
        return None
    rows = index.faithfulness_examples(layer, feature)
    shown = index.images([r["image_id"] for r in rows])  # the images with a thumbnail
    per_example = [
        FaithfulnessExample(
            **r,
            thumbnail_url=urls.thumbnail(r["image_id"]) if r["image_id"] in shown else None,
            page_url=urls.example(layer, feature, r["image_id"]),
        )
        for r in rows
    ]
    return FeatureFaithfulness(**row, per_example=per_example)


def counts(values: np.ndarray) -> list[int]:
    """How many of `values` fall in each bin of HISTOGRAM_EDGES (a value on an edge counts in the bin above)."""
    bins = np.clip(np.searchsorted(HISTOGRAM_EDGES, values, side="right") - 1, 0, len(HISTOGRAM_EDGES) - 2)
    return np.bincount(bins, minlength=len(HISTOGRAM_EDGES) - 1).tolist()


def faithfulness_summary(index: Index, layer: int) -> FaithfulnessSummary | None:
    means = index.layer_faithfulness_means(layer)
    return None if means is None else FaithfulnessSummary(**means)


def layer_faithfulness(index: Index, layer: int) -> LayerFaithfulness | None:
    summary = faithfulness_summary(index, layer)
    rows = index.layer_faithfulness(layer)
    if summary is None or not rows:
        return None
    measures = {name: np.array([r[name] for r in rows], dtype=np.float64) for name in rows[0]}
    return LayerFaithfulness(
        **summary.model_dump(),
        histogram=FaithfulnessHistogram(edges=HISTOGRAM_EDGES.tolist(), **{k: counts(v) for k, v in measures.items()}),
    )

"""The rows of the index tables (schema.py), computed from a layer's totals as plain numpy arrays.

The job fills `LayerTotals` from its accumulators (precompute/tables.py); anything else that writes an
index (the page tests' small index) fills it from small arrays and gets the same derived columns
(frequencies, means, fractions, labels, example order, heatmap blobs) by the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipscope_explorer.precompute.index.store import blob_column, list_column, vector_column

ACTIVE_THRESHOLD = 0.01  # image frequency at or above which a feature counts as active (meta.active_threshold)


@dataclass(frozen=True)
class LayerTotals:
    """What was counted over the sample for one layer's SAE (F features, T token positions, B bins)."""

    n_images: int
    n_tokens: int
    fired: int  # firing (token, feature) pairs
    nonpositive_kept: int  # kept (top-k) values <= 0
    sq_error_by_position: np.ndarray  # [T] squared reconstruction error summed over images
    explained_variance: float  # per-token explained variance, summed over tokens
    fire_tokens: np.ndarray  # [F] tokens on which each feature fires
    fire_images: np.ndarray  # [F] images with a firing token
    fire_cls: np.ndarray  # [F] images whose CLS token fires
    activation_sum: np.ndarray  # [F] sum of firing values
    max_activation: np.ndarray  # [F] largest firing value (0 if dead)
    position_sum: np.ndarray  # [F, T] firing values summed over images, per position
    histogram: np.ndarray  # [F, B] firing tokens per bin of `edges`
    edges: np.ndarray  # [B + 1] histogram edges
    sq_error_raw: float | None = None  # the same two sums on raw activations (normalised runs)
    explained_variance_raw: float | None = None

    @property
    def n_features(self) -> int:
        return len(self.fire_tokens)


def layer_row(
    layer: int, totals: LayerTotals, *, d_in: int, k: int, sae_file: str | None, checkpoint: int | None
) -> dict:
    """The `layers` row of one layer."""
    t = totals
    n_tokens = max(t.n_tokens, 1)
    mse = float(np.sum(t.sq_error_by_position)) / n_tokens
    ev = float(t.explained_variance) / n_tokens
    raw_mse = mse if t.sq_error_raw is None else float(t.sq_error_raw) / n_tokens
    raw_ev = ev if t.explained_variance_raw is None else float(t.explained_variance_raw) / n_tokens
    image_frequency = np.asarray(t.fire_images) / max(t.n_images, 1)
    return {
        "layer": layer,
        "sae_file": sae_file,
        "checkpoint": checkpoint,
        "d_in": d_in,
        "n_features": t.n_features,
        "k": k,
        "n_images": t.n_images,
        "n_tokens": t.n_tokens,
        "mse": mse,
        "explained_variance": ev,
        "mse_raw": raw_mse,
        "explained_variance_raw": raw_ev,
        "l0": t.fired / n_tokens,
        "dead_fraction": float((np.asarray(t.fire_tokens) == 0).mean()),
        "active_fraction": float((image_frequency >= ACTIVE_THRESHOLD).mean()),
        "nonpositive_kept_fraction": t.nonpositive_kept / max(t.n_tokens * k, 1),
        "mse_by_position": (np.asarray(t.sq_error_by_position, dtype=np.float64) / max(t.n_images, 1)).tolist(),
        "histogram_edges": np.asarray(t.edges, dtype=np.float64).tolist(),
    }


def feature_columns(
    layer: int,
    totals: LayerTotals,
    label_terms: list[list[str]],
    similar_features: np.ndarray,
    similar_cosines: np.ndarray,
    prototypes: np.ndarray | None = None,
    zero_shot: Sequence[Sequence[tuple[str, float, float]]] | None = None,
) -> dict:
    """The `features` rows of one layer, as columns (every feature, in order). prototypes: [F, d] unit
    vectors, a row of NaN where a feature has none (None: no feature has one); zero_shot: per feature its
    labels (text, score, margin), best first (None: none has any)."""
    t, n = totals, totals.n_features
    n_images, n_tokens = max(t.n_images, 1), max(t.n_tokens, 1)
    fired = np.asarray(t.fire_tokens, dtype=np.int64)
    dead = fired == 0
    mean = np.asarray(t.activation_sum, dtype=np.float64) / np.maximum(fired, 1)
    maximum = np.asarray(t.max_activation, dtype=np.float64)
    return {
        "layer": np.full(n, layer, dtype=np.int32),
        "feature": np.arange(n, dtype=np.int32),
        "n_fired_tokens": fired,
        "n_fired_images": np.asarray(t.fire_images, dtype=np.int64),
        "n_fired_cls": np.asarray(t.fire_cls, dtype=np.int64),
        "frequency": fired / n_tokens,
        "image_frequency": np.asarray(t.fire_images) / n_images,
        "cls_frequency": np.asarray(t.fire_cls) / n_images,
        "mean_activation": [None if d else float(m) for d, m in zip(dead, mean)],
        "max_activation": [None if d else float(m) for d, m in zip(dead, maximum)],
        "histogram": np.asarray(t.histogram).astype(np.int32),
        "position_mean": (np.asarray(t.position_sum, dtype=np.float64) / n_images).astype(np.float32),
        "label_terms": label_terms,
        "label": [" ".join(terms) for terms in label_terms],
        "similar_features": np.asarray(similar_features).astype(np.int32),
        "similar_cosines": np.asarray(similar_cosines).astype(np.float32),
        "prototype": [None] * n if prototypes is None else vector_column(prototypes),
        "zero_shot_terms": [[text for text, _, _ in labels] for labels in zero_shot or [[]] * n],
        "zero_shot_scores": [[float(score) for _, score, _ in labels] for labels in zero_shot or [[]] * n],
        "zero_shot_margins": [[float(margin) for *_, margin in labels] for labels in zero_shot or [[]] * n],
    }


def examples_columns(layer: int, examples: dict) -> dict:
    """The `examples` rows of one layer, sorted by (feature, band, rank). `examples` holds flat arrays:
    feature, kind ("top"/"band"), band, rank, image_id, activation, cls, scale and heat ([n, patches]
    uint8: value = byte * scale)."""
    order = np.lexsort((examples["rank"], examples["band"], examples["feature"]))
    return {
        "layer": np.full(len(order), layer, dtype=np.int32),
        "feature": np.asarray(examples["feature"], dtype=np.int32)[order],
        "kind": np.asarray(examples["kind"], dtype=object)[order].tolist(),
        "band": np.asarray(examples["band"], dtype=np.int8)[order],
        "rank": np.asarray(examples["rank"], dtype=np.int32)[order],
        "image_id": np.asarray(examples["image_id"], dtype=np.int32)[order],
        "activation": np.asarray(examples["activation"], dtype=np.float32)[order],
        "cls_activation": np.asarray(examples["cls"], dtype=np.float32)[order],
        "heatmap_scale": np.asarray(examples["scale"], dtype=np.float32)[order],
        "heatmap": blob_column(np.asarray(examples["heat"], dtype=np.uint8)[order]),
    }


def _image_metadata(image_ids: Sequence[int], rows: Sequence[tuple]) -> tuple[dict, list]:
    """The columns `images` and `samples` share, from rows of (ordinal, source, key, url, caption, width,
    height, last); and the rows' last column."""
    columns = list(zip(*rows)) if rows else [[] for _ in range(8)]
    metadata = {
        "image_id": np.asarray(image_ids, dtype=np.int32),
        "source": list(columns[1]),
        "key": list(columns[2]),
        "url": list(columns[3]),
        "caption": list(columns[4]),
        "width": np.array(columns[5], dtype=np.int32),
        "height": np.array(columns[6], dtype=np.int32),
    }
    return metadata, list(columns[7])


def images_columns(first_id: int, rows: Sequence[tuple], image_ids: Sequence[int] | None = None) -> dict:
    """`images` rows for `rows` of (ordinal, source, key, url, caption, width, height, thumbnail), with the
    given `image_ids` (default: ids from `first_id` on in order)."""
    ids = np.arange(first_id, first_id + len(rows)) if image_ids is None else image_ids
    metadata, thumbnails = _image_metadata(ids, rows)
    return {**metadata, "thumbnail": thumbnails}


def samples_columns(image_ids: Sequence[int], rows: Sequence[tuple]) -> dict:
    """`samples` rows for `rows` of (ordinal, source, key, url, caption, width, height, embedding), the
    embedding as little-endian float16 bytes or None."""
    metadata, embeddings = _image_metadata(image_ids, rows)
    return {**metadata, "embedding": pa.array(embeddings, pa.binary())}


def sample_codes_columns(layer: int, image_ids: Sequence[int], indices: np.ndarray, values: np.ndarray) -> dict:
    """`sample_codes` rows of one layer: per image its CLS token's k kept latents (indices [n, k],
    values [n, k]) in the order the SAE kept them."""
    return {
        "layer": np.full(len(image_ids), layer, dtype=np.int32),
        "image_id": np.asarray(image_ids, dtype=np.int32),
        "indices": list_column(np.asarray(indices, dtype=np.int32)),
        "activations": list_column(np.asarray(values, dtype=np.float32)),
    }


def vocabulary_columns(terms: Sequence[tuple[str, str, int]], vectors: np.ndarray) -> dict:
    """`vocabulary` rows: (term, origin, n_captions) and its text embedding ([V, d] unit vectors)."""
    return {
        "term": [term for term, _, _ in terms],
        "origin": [origin for _, origin, _ in terms],
        "n_captions": np.array([count for *_, count in terms], dtype=np.int32),
        "embedding": vector_column(vectors),
    }

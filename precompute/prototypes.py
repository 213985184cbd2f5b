"""Feature prototypes in CLIP's embedding space, and the shuffled prototypes that are their chance baseline.

A feature's prototype is the activation-weighted mean of the final embeddings of the images it shows (its
top list and band examples), L2-normalised: where in the joint image-text space the feature points, so a
text query or a zero-shot label can be compared with it. A null prototype pairs one feature's activation
weights with images drawn at random from the sample: what a prototype looks like when its images have
nothing in common, the baseline a zero-shot label must beat (precompute/zero_shot.py).
"""

from __future__ import annotations

import numpy as np
import torch

NULL_PROTOTYPES = 4096  # per layer (at most one per feature that shows images)
NULL_POOL = 16_384  # images drawn once from the sample; null prototypes draw their images from them
CHUNK = 16_384  # example rows gathered at a time


def _weighted_sums(
    embeddings: np.ndarray, rows: np.ndarray, groups: np.ndarray, weights: np.ndarray, n_groups: int
) -> np.ndarray:
    """sum over i with groups[i] = g of weights[i] * embeddings[rows[i]], for every g: [n_groups, d] float32."""
    sums = torch.zeros(n_groups, embeddings.shape[1], dtype=torch.float32)
    for start in range(0, len(rows), CHUNK):
        part = slice(start, start + CHUNK)
        vectors = torch.from_numpy(embeddings[rows[part]].astype(np.float32))
        scaled = vectors * torch.from_numpy(np.asarray(weights[part], dtype=np.float32))[:, None]
        sums.index_add_(0, torch.from_numpy(np.asarray(groups[part], dtype=np.int64)), scaled)
    return sums.numpy()


def _unit_rows(sums: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; a zero row becomes NaN (no vector)."""
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, sums / norms, np.nan).astype(np.float32)


def feature_prototypes(
    embeddings: np.ndarray, rows: np.ndarray, features: np.ndarray, activations: np.ndarray, n_features: int
) -> np.ndarray:
    """Prototypes [n_features, d] float32: for each feature, the unit-length sum of activation x embedding
    over its examples (example i: feature features[i], image embeddings[rows[i]], weight activations[i]);
    NaN rows for features without examples."""
    return _unit_rows(_weighted_sums(embeddings, rows, features, activations, n_features))


def null_prototypes(
    pool: np.ndarray, features: np.ndarray, activations: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Shuffled prototypes [S, d] float32, S = min(features showing examples, NULL_PROTOTYPES): each takes
    the activation weights of one such feature (drawn without replacement) and pairs them with images
    drawn at random (with replacement) from `pool`, embeddings of images drawn at random from the sample."""
    shown = np.unique(features)
    if len(pool) == 0 or len(shown) == 0:
        return np.zeros((0, pool.shape[1]), np.float32)
    chosen = np.sort(rng.choice(shown, size=min(len(shown), NULL_PROTOTYPES), replace=False))
    keep = np.isin(features, chosen)
    groups = np.searchsorted(chosen, features[keep])
    draws = rng.integers(0, len(pool), size=int(keep.sum()))
    return _unit_rows(_weighted_sums(pool, draws, groups, activations[keep], len(chosen)))


def pool_ordinals(ordinals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The images null prototypes draw from: NULL_POOL of the sample's ordinals at random (all when
    fewer), ascending."""
    if len(ordinals) <= NULL_POOL:
        return ordinals
    return np.sort(rng.choice(ordinals, size=NULL_POOL, replace=False))

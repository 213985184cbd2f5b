"""What one image's sparse code says, by the definitions of docs/schema.md (torch-free, so showing an
upload never loads torch):
- a feature fires on a token when it is among the k kept latents AND its value is > 0;
- an image's activation for a feature is its max firing value over all tokens, CLS included; its CLS
  activation is its firing value on token 0; its patch activation the max over the patches only (the
  peak of its heatmap);
- its heatmap is its firing value on each patch token (CLS excluded), row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageFeatures:
    """The features that fire anywhere in one image, strongest first (ties: lower feature first).

    features:        [U] int64
    activation:      [U] float32, max firing value over all tokens (CLS included)
    cls_activation:  [U] float32, firing value on CLS (0 if it does not fire there)
    patch_activation:[U] float32, max firing value over the patches (0 if it fires on CLS only)
    mean_activation: [U] float32, mean firing value over the patches (0 where it does not fire)
    `heatmaps(rows)` gives the per-patch values of some of them (dense only for those asked for).
    """

    features: np.ndarray
    activation: np.ndarray
    cls_activation: np.ndarray
    patch_activation: np.ndarray
    mean_activation: np.ndarray
    n_tokens: int
    _row: np.ndarray  # per firing (token, slot): the feature's row in the lists above
    _token: np.ndarray
    _value: np.ndarray

    def heatmaps(self, rows) -> np.ndarray:
        """[len(rows), P] firing values per patch (CLS excluded, row-major) of the features at `rows`."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        where = np.full(len(self.features), -1, dtype=np.int64)
        where[rows] = np.arange(len(rows))
        target = where[self._row]
        keep = target >= 0
        dense = np.zeros((len(rows), self.n_tokens), dtype=np.float32)
        dense[target[keep], self._token[keep]] = self._value[keep]
        return dense[:, 1:]


def image_features(values_tk: np.ndarray, indices_tk: np.ndarray) -> ImageFeatures:
    """Per-feature summary of one image's code: values and indices [T, k], CLS at token 0."""
    values = np.asarray(values_tk, dtype=np.float32)
    indices = np.asarray(indices_tk, dtype=np.int64)
    tokens = values.shape[0]
    fires = values > 0
    token = np.nonzero(fires)[0]
    fired, fired_values = indices[fires], values[fires]
    features, slot = np.unique(fired, return_inverse=True)  # a token keeps each feature at most once
    n = len(features)
    activation = np.zeros(n, dtype=np.float32)
    np.maximum.at(activation, slot, fired_values)
    on_cls = token == 0
    cls = np.zeros(n, dtype=np.float32)
    cls[slot[on_cls]] = fired_values[on_cls]
    patch_max = np.zeros(n, dtype=np.float32)
    np.maximum.at(patch_max, slot[~on_cls], fired_values[~on_cls])
    patch_sum = np.zeros(n, dtype=np.float32)
    np.add.at(patch_sum, slot[~on_cls], fired_values[~on_cls])
    mean = patch_sum / np.float32(max(tokens - 1, 1))
    order = np.argsort(-activation, kind="stable")  # unique() sorted features ascending
    rank = np.empty_like(order)
    rank[order] = np.arange(n)
    return ImageFeatures(
        features[order],
        activation[order],
        cls[order],
        patch_max[order],
        mean[order],
        tokens,
        rank[slot],
        token,
        fired_values,
    )

"""Preprocessed pixels -> residual stream -> sparse codes, and what one image's codes say.

The one forward path of the project: the precompute job (`job.encode_batch`)
and the server's live encoding (`app/live/encoder.py`) both call `encode_pixels`, and
the definitions of docs/schema.md are computed here for a single image by
`image_features`:
- a feature fires on a token when it is among the k kept latents AND its
  value is > 0;
- an image's activation for a feature is its max firing value over all tokens,
  CLS included; its CLS activation is its firing value on token 0; its patch
  activation the max over the patches only (the peak of its heatmap);
- its heatmap is its firing value on each patch token (CLS excluded), row-major.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from clipscope_explorer.precompute.model.sae import SparseCode, TopKSAE
from clipscope_explorer.precompute.model.vision import VisionTower


@dataclass(frozen=True)
class LayerCodes:
    """One layer of a batch: the residual stream as captured and its sparse code.

    acts: [B, T, d] float32 (raw; `sae.prepare(acts)` is what the SAE read)
    code: SparseCode of [B, T, k]
    """

    acts: torch.Tensor
    code: SparseCode


@torch.inference_mode()
def encode_pixels(tower: VisionTower, saes: Mapping[int, TopKSAE], pixels_bchw: torch.Tensor,
                  precision: str | None = None) -> dict[int, LayerCodes]:
    """Run the tower once (up to the deepest layer asked for) and each layer's SAE on its output, both in
    `precision` (`fp32`, `bf16`; None: the device's default)."""
    acts = tower.capture(pixels_bchw, list(saes), precision)
    return {layer: LayerCodes(acts[layer], sae.encode(acts[layer], precision=precision)) for layer, sae in saes.items()}


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

    features: torch.Tensor
    activation: torch.Tensor
    cls_activation: torch.Tensor
    patch_activation: torch.Tensor
    mean_activation: torch.Tensor
    n_tokens: int
    _row: torch.Tensor  # per firing (token, slot): the feature's row in the lists above
    _token: torch.Tensor
    _value: torch.Tensor

    def heatmaps(self, rows) -> torch.Tensor:
        """[len(rows), P] firing values per patch (CLS excluded, row-major) of the features at `rows`."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        where = torch.full((len(self.features),), -1, dtype=torch.long)
        where[rows] = torch.arange(len(rows))
        target = where[self._row]
        keep = target >= 0
        dense = torch.zeros(len(rows), self.n_tokens)
        dense[target[keep], self._token[keep]] = self._value[keep]
        return dense[:, 1:]


@torch.inference_mode()
def image_features(values_tk: torch.Tensor, indices_tk: torch.Tensor) -> ImageFeatures:
    """Per-feature summary of one image's code: values and indices [T, k], CLS at token 0."""
    values, indices = values_tk.float().cpu(), indices_tk.long().cpu()
    tokens = values.shape[0]
    fires = values > 0
    token, _ = torch.nonzero(fires, as_tuple=True)
    fired, fired_values = indices[fires], values[fires]
    features, slot = torch.unique(fired, return_inverse=True)  # a token keeps each feature at most once
    n = len(features)
    activation = torch.zeros(n).scatter_reduce_(0, slot, fired_values, reduce="amax")
    on_cls = token == 0
    cls = torch.zeros(n)
    cls[slot[on_cls]] = fired_values[on_cls]
    patch_max = torch.zeros(n).scatter_reduce_(0, slot[~on_cls], fired_values[~on_cls], reduce="amax")
    patch_sum = torch.zeros(n).index_add_(0, slot[~on_cls], fired_values[~on_cls])
    mean = patch_sum / max(tokens - 1, 1)
    order = torch.argsort(activation, descending=True, stable=True)  # unique() sorted features ascending
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    return ImageFeatures(features[order], activation[order], cls[order], patch_max[order], mean[order], tokens,
                         rank[slot], token, fired_values)

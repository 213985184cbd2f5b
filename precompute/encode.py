"""Preprocessed pixels -> residual stream -> sparse codes, and what one image's codes say.

The one forward path of the project: the precompute job (`job.encode_batch`)
and the server's live encoding (`app/live.py`) both call `encode_pixels`, and
the definitions of docs/schema.md are computed here for a single image by
`image_features`:
- a feature fires on a token when it is among the k kept latents AND its
  value is > 0;
- an image's activation for a feature is its max firing value over all tokens,
  CLS included; its CLS activation is its firing value on token 0;
- its heatmap is its firing value on each patch token (CLS excluded), row-major.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch

from precompute.sae import SparseCode, TopKSAE
from precompute.vision import VisionTower


@dataclass(frozen=True)
class LayerCodes:
    """One layer of a batch: the residual stream as captured and its sparse code.

    acts: [B, T, d] float32 (raw; `sae.prepare(acts)` is what the SAE read)
    code: SparseCode of [B, T, k]
    """

    acts: torch.Tensor
    code: SparseCode


@torch.inference_mode()
def encode_pixels(tower: VisionTower, saes: Mapping[int, TopKSAE], pixels_bchw: torch.Tensor) -> dict[int, LayerCodes]:
    """Run the tower once (up to the deepest layer asked for) and each layer's SAE on its output."""
    acts = tower.capture(pixels_bchw, list(saes))
    return {layer: LayerCodes(acts[layer], sae.encode(acts[layer])) for layer, sae in saes.items()}


class ImageFeatures(NamedTuple):
    """The features that fire anywhere in one image, strongest first (ties: lower feature first).

    features:       [U] int64
    activation:     [U] float32, max firing value over all tokens (CLS included)
    cls_activation: [U] float32, firing value on CLS (0 if it does not fire there)
    mean_activation:[U] float32, mean firing value over the patches (0 where it does not fire)
    heatmap:        [U, P] float32, firing value per patch (CLS excluded), row-major
    """

    features: torch.Tensor
    activation: torch.Tensor
    cls_activation: torch.Tensor
    mean_activation: torch.Tensor
    heatmap: torch.Tensor


@torch.inference_mode()
def image_features(values_tk: torch.Tensor, indices_tk: torch.Tensor) -> ImageFeatures:
    """Per-feature summary of one image's code: values and indices [T, k], CLS at token 0."""
    values, indices = values_tk.float().cpu(), indices_tk.long().cpu()
    tokens = values.shape[0]
    fires = values > 0
    token_idx, _ = torch.nonzero(fires, as_tuple=True)
    fired, fired_values = indices[fires], values[fires]
    features, slot = torch.unique(fired, return_inverse=True)
    dense = torch.zeros(len(features), tokens)
    dense[slot, token_idx] = fired_values  # a token keeps each feature at most once (top-k indices are distinct)
    activation = dense.max(dim=1).values if len(features) else torch.zeros(0)
    order = torch.argsort(activation, descending=True, stable=True)  # unique() sorted features ascending
    dense = dense[order]
    heatmap = dense[:, 1:]
    return ImageFeatures(features[order], activation[order], dense[:, 0].clone(),
                         heatmap.mean(dim=1) if tokens > 1 else torch.zeros(len(features)), heatmap.contiguous())

"""Preprocessed pixels -> residual stream -> sparse codes.

The one forward path of the project: the precompute job (`job.encode_batch`)
and the server's live encoding (`app/live/encoder.py`) both call `encode_pixels`.
What one image's codes say is `precompute/index/image_features.py` (torch-free).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from clipscope_explorer.precompute.model.sae import SAEEncoder, SparseCode, Standardisation
from clipscope_explorer.precompute.model.vision import VisionTower


@dataclass(frozen=True)
class LayerCodes:
    """One layer of a batch: the residual stream as captured and its sparse code.

    acts: [B, T, d] float32, raw (the SAE read `normalisation.apply(acts)` when given a normalisation)
    code: SparseCode of [B, T, k]
    """

    acts: torch.Tensor
    code: SparseCode


@torch.inference_mode()
def encode_pixels(
    tower: VisionTower,
    saes: Mapping[int, SAEEncoder],
    pixels_bchw: torch.Tensor,
    precision: str | None = None,
    normalisation: Mapping[int, Standardisation] | None = None,
) -> dict[int, LayerCodes]:
    """Run the tower once (up to the deepest layer asked for) and each layer's SAE on its output, both in
    `precision` (`fp32`, `bf16`; None: the device's default). A layer in `normalisation` is standardised
    with its statistics before its SAE reads it; the others are encoded raw."""
    acts = tower.capture(pixels_bchw, list(saes), precision)
    normalisation = normalisation or {}
    return {
        layer: LayerCodes(
            acts[layer], sae.encode(acts[layer], normalisation=normalisation.get(layer), precision=precision)
        )
        for layer, sae in saes.items()
    }

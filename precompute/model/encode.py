"""Preprocessed pixels -> residual stream -> sparse codes.

The one forward path of the project: the precompute job (`job.encode_batch`)
and the server's live encoding (`app/live/encoder.py`) both call `encode_pixels`,
which also gives the final CLIP image embedding when asked (`embed=True`).
What one image's codes say is `precompute/index/image_features.py` (torch-free).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, overload

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


@overload
def encode_pixels(
    tower: VisionTower,
    saes: Mapping[int, SAEEncoder],
    pixels_bchw: torch.Tensor,
    precision: str | None = None,
    normalisation: Mapping[int, Standardisation] | None = None,
    embed: Literal[False] = False,
) -> dict[int, LayerCodes]: ...


@overload
def encode_pixels(
    tower: VisionTower,
    saes: Mapping[int, SAEEncoder],
    pixels_bchw: torch.Tensor,
    precision: str | None = None,
    normalisation: Mapping[int, Standardisation] | None = None,
    *,
    embed: Literal[True],
) -> tuple[dict[int, LayerCodes], torch.Tensor]: ...


@torch.inference_mode()
def encode_pixels(tower, saes, pixels_bchw, precision=None, normalisation=None, embed=False):
    """Run the tower once (up to the deepest layer asked for) and each layer's SAE on its output, both in
    `precision` (`fp32`, `bf16`; None: the device's default). A layer in `normalisation` is standardised
    with its statistics before its SAE reads it; the others are encoded raw.

    Returns {layer: LayerCodes}; with `embed`, the tower runs to its end and the result is
    ({layer: LayerCodes}, embedding): the final CLIP image embedding [B, d], float32, L2-normalised
    (`VisionTower.capture`)."""
    captured = tower.capture(pixels_bchw, list(saes), precision, embed=embed)
    acts, embedding = captured if embed else (captured, None)
    normalisation = normalisation or {}
    codes = {
        layer: LayerCodes(
            acts[layer], sae.encode(acts[layer], normalisation=normalisation.get(layer), precision=precision)
        )
        for layer, sae in saes.items()
    }
    return (codes, embedding) if embed else codes

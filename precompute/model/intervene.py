"""Interventions: scale one SAE feature in the residual stream at one layer and run the rest of the tower.

At the edited layer L the stream is encoded by L's SAE, as an upload is; at each chosen token t the feature's
firing value a_t (its kept value when it is among the k kept latents and > 0, else 0) is scaled by adding

    (scale - 1) * a_t * d_f                        to the stream x_t,

where d_f is the feature's decoder row. A layer whose SAE reads standardised input z = (x - mean) / std
is edited in z's units, which is (scale - 1) * a_t * d_f * std in x. So scale 0 removes the feature's
contribution to the reconstruction, 2 doubles it, and 1 adds exactly nothing: the run is then the
unedited one, bit for bit. Tokens not chosen, and tokens where the feature does not fire, keep their
values exactly; blocks up to L are not touched. The blocks after L run on the edited stream
(`VisionTower.capture`'s `edit`), through the same code as every other encode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from clipscope_explorer.precompute.model.encode import LayerCodes
from clipscope_explorer.precompute.model.sae import SAEEncoder, SparseCode, Standardisation
from clipscope_explorer.precompute.model.vision import VisionTower

MAX_SCALE = 10.0


@dataclass(frozen=True)
class FeatureEdit:
    """Scale `feature` of layer `layer`'s SAE by `scale` ([-10, 10]) at `tokens` (indices into the 1 + grid
    tokens, CLS = 0; None: every token)."""

    layer: int
    feature: int
    scale: float
    tokens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EditedRun:
    """One image's run with an edit.

    firing: [B, T] float32, the feature's firing value at the edited layer before the edit
    codes:  {layer: LayerCodes} of the edited run; at the edited layer, the edited stream encoded again
    embedding: [B, d] float32 unit final CLIP embedding of the edited run, or None
    """

    firing: torch.Tensor
    codes: dict[int, LayerCodes]
    embedding: torch.Tensor | None


def firing_values(code: SparseCode, feature: int) -> torch.Tensor:
    """[..., T]: the feature's value at each token where it fires (kept by top-k and > 0), else 0."""
    kept = (code.indices == feature) & (code.values > 0)
    return torch.where(kept, code.values.float(), 0.0).sum(-1)


def edit_direction(decoder_row: torch.Tensor, normalisation: Standardisation | None) -> torch.Tensor:
    """The change of the raw stream per unit of the feature: its decoder row, in x's units."""
    row = decoder_row.float()
    if normalisation is None:
        return row
    return row * normalisation.std.to(row.device, torch.float32).clamp_min(1e-6)


def token_mask(tokens: tuple[int, ...] | None, n_tokens: int, device) -> torch.Tensor:
    """[T] bool: the tokens an edit may change."""
    if tokens is None:
        return torch.ones(n_tokens, dtype=torch.bool, device=device)
    mask = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    mask[list(tokens)] = True
    return mask


def check_edit(edit: FeatureEdit, n_features: int, n_tokens: int) -> None:
    if not 0 <= edit.feature < n_features:
        raise ValueError(f"feature {edit.feature} is not in 0..{n_features - 1}")
    if not -MAX_SCALE <= edit.scale <= MAX_SCALE:  # NaN fails too
        raise ValueError(f"scale {edit.scale} is not in [-{MAX_SCALE:g}, {MAX_SCALE:g}]")
    if edit.tokens is not None and (not edit.tokens or not all(0 <= t < n_tokens for t in edit.tokens)):
        raise ValueError(f"tokens must be a non-empty list of indices in 0..{n_tokens - 1}")


@torch.inference_mode()
def encode_edited(
    tower: VisionTower,
    saes: Mapping[int, SAEEncoder],
    decoder_row: torch.Tensor,
    pixels_bchw: torch.Tensor,
    edit: FeatureEdit,
    precision: str | None = None,
    normalisation: Mapping[int, Standardisation] | None = None,
    embed: bool = False,
) -> EditedRun:
    """Run the tower on `pixels_bchw` with `edit` applied after block `edit.layer`, and encode every layer
    of `saes` (which must include the edited one; layers before it see the unedited stream, so they are the
    plain run's). decoder_row: [d] the feature's decoder row of that layer's SAE."""
    sae = saes[edit.layer]
    check_edit(edit, sae.n_features, tower.n_tokens)
    normalisation = normalisation or {}
    norm = normalisation.get(edit.layer)
    direction = edit_direction(decoder_row.to(tower.device), norm)
    mask = token_mask(edit.tokens, tower.n_tokens, tower.device)
    seen: dict[str, torch.Tensor] = {}

    def apply(stream_btd: torch.Tensor) -> torch.Tensor:
        firing = firing_values(sae.encode(stream_btd, normalisation=norm, precision=precision), edit.feature)
        seen["firing"] = firing
        changed = stream_btd + ((edit.scale - 1.0) * firing)[..., None] * direction
        return torch.where((mask & (firing > 0))[..., None], changed, stream_btd)

    captured = tower.capture(pixels_bchw, list(saes), precision, embed=embed, edit=(edit.layer, apply))
    acts, embedding = captured if embed else (captured, None)
    codes = {
        layer: LayerCodes(
            acts[layer], encoder.encode(acts[layer], normalisation=normalisation.get(layer), precision=precision)
        )
        for layer, encoder in saes.items()
    }
    return EditedRun(seen["firing"], codes, embedding)

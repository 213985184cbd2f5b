"""The model and SAE encoders an index was built with, loaded again for the steps that encode its images
anew (the faithfulness check): the model its meta records, each layer's SAE file (or its recorded source
and checkpoint), the index's precision and normalisation, so a re-encoded image reads as the job read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipscope_explorer.precompute.model.checkpoints import load_checkpoint_file, load_sae
from clipscope_explorer.precompute.model.encode import encode_pixels
from clipscope_explorer.precompute.model.precision import resolve_precision
from clipscope_explorer.precompute.model.sae import SAEEncoder, Standardisation
from clipscope_explorer.precompute.model.vision import ModelSpec, VisionTower, load_tower, resolve_device


@dataclass
class IndexModel:
    tower: VisionTower
    saes: dict[int, SAEEncoder]
    precision: str
    normalisation: dict[int, Standardisation]

    @classmethod
    def load(
        cls, meta: dict, layer_rows: dict[int, dict], layers: list[int], device: str = "auto", sae: str | None = None
    ):
        """ModelLoadError / SAELoadError when the model or an SAE cannot be loaded; `sae` replaces the recorded
        SAE source (a local copy)."""
        target = resolve_device(device)
        precision = resolve_precision("auto", target, meta.get("precision"))
        model = meta.get("model") or {}
        tower = load_tower(
            ModelSpec(model.get("name"), model.get("pretrained")), device=target, weights_precision=precision
        )
        source = sae or str((meta.get("sae") or {}).get("source") or "")
        how = dict(purpose="encode", weights_precision=precision, device=target)
        saes = {}
        for layer in layers:
            file = layer_rows[layer].get("sae_file")
            if sae is None and file and Path(file).is_file():  # the very file the index was built from
                saes[layer] = load_checkpoint_file(file, source=source, layer=layer, **how)
            else:
                saes[layer] = load_sae(source, layer, layer_rows[layer].get("checkpoint"), **how)
            saes[layer].check_fits(tower.width)
        stats = (meta.get("normalisation_stats") or {}) if meta.get("normalisation") == "sample" else {}
        normalisation = {
            layer: Standardisation(torch.tensor(stats[str(layer)]["mean"]), torch.tensor(stats[str(layer)]["std"]))
            for layer in layers
            if str(layer) in stats
        }
        return cls(tower, saes, precision, normalisation)

    def activations(self, pixels: torch.Tensor, wanted: list[tuple[int, int]]) -> np.ndarray:
        """For each image of the batch [B, 3, H, W] and its (layer, feature) in `wanted`, the feature's
        activation: its largest firing value over all tokens (0 where it does not fire), as the index's."""
        layers = sorted({layer for layer, _ in wanted})
        codes = encode_pixels(
            self.tower, {layer: self.saes[layer] for layer in layers}, pixels.to(self.tower.device), self.precision,
            self.normalisation,
        )  # fmt: skip
        out = np.zeros(len(wanted))
        for row, (layer, feature) in enumerate(wanted):
            code = codes[layer].code
            hit = code.indices[row] == feature
            if bool(hit.any()):
                out[row] = max(0.0, float(code.values[row][hit].float().max()))
        return out

    def firing(self, pixels: torch.Tensor, layer: int) -> list[np.ndarray]:
        """Per image of the batch, the layer's features with a positive value on some token, sorted."""
        codes = encode_pixels(
            self.tower, {layer: self.saes[layer]}, pixels.to(self.tower.device), self.precision, self.normalisation
        )[layer].code
        return [np.unique(codes.indices[b][codes.values[b] > 0].cpu().numpy()) for b in range(len(pixels))]

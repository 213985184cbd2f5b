"""What live encoding loads, read from the index and the server's settings (torch-free).

`LiveSpec.from_index` picks by default exactly what the index was built with
(its model, and per layer the SAE file it read, or the same source and
checkpoint, its normalisation statistics and its precision), overridden by
`--live-model/--live-sae/--live-layers`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LiveSpec:
    """What live encoding loads; `index_layers` are the layers whose features are the index's."""

    model: str
    pretrained: str | None
    sae: str
    layers: tuple[int, ...]
    sae_files: dict[int, str] = field(default_factory=dict)
    checkpoints: dict[int, int | None] = field(default_factory=dict)
    normalisation: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)
    index_layers: tuple[int, ...] = ()
    device: str = "auto"
    precision: str = "auto"
    index_precision: str | None = None  # meta.precision: what `auto` follows
    embed: bool = False  # also compute each upload's CLIP embedding (to compare with the index's)
    interventions: bool = False  # keep the SAE decoders, so a feature can be edited and the model run on

    @classmethod
    def from_index(cls, meta: dict, layer_rows: dict[int, dict], settings) -> LiveSpec:
        model_meta, sae_meta = meta.get("model") or {}, meta.get("sae") or {}
        model = settings.live_model or str(model_meta.get("name") or "")
        pretrained = settings.live_pretrained if settings.live_model else model_meta.get("pretrained")
        same_model = model == model_meta.get("name") and pretrained == model_meta.get("pretrained")
        sae = settings.live_sae or str(sae_meta.get("source") or "")
        same_sae = sae == sae_meta.get("source")
        layers = tuple(sorted(set(settings.live_layers or layer_rows)))
        index_layers = tuple(n for n in layers if same_model and same_sae and n in layer_rows)
        stats = (meta.get("normalisation_stats") or {}) if meta.get("normalisation") == "sample" else {}
        return cls(
            model=model,
            pretrained=pretrained,
            sae=sae,
            layers=layers,
            sae_files={n: layer_rows[n]["sae_file"] for n in index_layers if layer_rows[n].get("sae_file")},
            checkpoints={n: layer_rows[n].get("checkpoint") for n in index_layers},
            normalisation={n: (stats[str(n)]["mean"], stats[str(n)]["std"]) for n in index_layers if str(n) in stats},
            index_layers=index_layers,
            device=settings.live_device,
            precision=settings.live_precision,
            index_precision=meta.get("precision"),
            embed=same_model and bool(meta.get("embeddings") or meta.get("zero_shot")),
            interventions=settings.interventions,
        )

    def identity(self, precision: str) -> str:
        """A short hash of everything that decides an upload's codes (part of upload ids)."""
        blob = json.dumps(
            [self.model, self.pretrained, self.sae, self.checkpoints, sorted(self.normalisation.items()), precision],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

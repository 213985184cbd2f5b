"""Live encoding of uploaded images with the precompute job's own model and SAE code.

`LiveSpec.from_index` picks what to load: by default exactly what the index
was built with (its model, and per layer the SAE file it read, or the same
source and checkpoint), overridden by `--live-model/--live-sae/--live-layers`.
`LiveService` loads it in a background thread when the server starts, so the
index is served at once; its `status` says `off`, `loading`, `ready` or
`failed` (with a one-line reason), and the upload page explains how to enable
uploads when they are not available. `LiveEncoder` runs
`clipscope_explorer.precompute.model.encode.encode_pixels` in one worker thread (`app/live/batcher.py`)
that micro-batches concurrent uploads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from typing import TYPE_CHECKING

import numpy as np

from clipscope_explorer.app.live.batcher import MicroBatcher

if TYPE_CHECKING:  # torch and the model code load with the encoder, so `--no-live` servers never import them
    import torch

    from clipscope_explorer.precompute.model.sae import TopKSAE
    from clipscope_explorer.precompute.model.vision import VisionTower

log = logging.getLogger(__name__)

Codes = dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (values [T, k] float32, indices [T, k] int32)


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

    @classmethod
    def from_index(cls, meta: dict, layer_rows: dict[int, dict], settings) -> "LiveSpec":
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
            model=model, pretrained=pretrained, sae=sae, layers=layers,
            sae_files={n: layer_rows[n]["sae_file"] for n in index_layers if layer_rows[n].get("sae_file")},
            checkpoints={n: layer_rows[n].get("checkpoint") for n in index_layers},
            normalisation={n: (stats[str(n)]["mean"], stats[str(n)]["std"]) for n in index_layers if str(n) in stats},
            index_layers=index_layers, device=settings.live_device, precision=settings.live_precision,
            index_precision=meta.get("precision"))

    def identity(self, precision: str) -> str:
        """A short hash of everything that decides an upload's codes (part of upload ids)."""
        blob = json.dumps([self.model, self.pretrained, self.sae, self.checkpoints,
                           sorted(self.normalisation.items()), precision], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_layer_sae(spec: LiveSpec, layer: int) -> TopKSAE:
    from clipscope_explorer.precompute.model.checkpoints import load_checkpoint_file, load_sae

    file = spec.sae_files.get(layer)
    if file and Path(file).is_file():  # the very file the index was built from
        return load_checkpoint_file(file, source=spec.sae, layer=layer)
    return load_sae(spec.sae, layer, spec.checkpoints.get(layer))


def load_encoder(spec: LiveSpec, batch_size: int, queue_size: int) -> "LiveEncoder":
    """Load model and SAEs (ModelLoadError / SAELoadError / ValueError when impossible)."""
    import torch

    from clipscope_explorer.precompute.model.precision import resolve_precision
    from clipscope_explorer.precompute.model.sae import SAELoadError
    from clipscope_explorer.precompute.model.vision import ModelLoadError, ModelSpec, load_tower

    if not spec.model:
        raise ModelLoadError("the index records no model; pass --live-model")
    if not spec.sae:
        raise SAELoadError("the index records no SAE source; pass --live-sae")
    tower = load_tower(ModelSpec(spec.model, spec.pretrained), device=spec.device)
    layers = tower.check_layers(spec.layers)
    saes = {}
    for layer in layers:
        sae = _load_layer_sae(spec, layer)
        sae.check_fits(tower.width)
        sae.to(tower.device)
        if layer in spec.normalisation:
            mean, std = spec.normalisation[layer]
            sae.set_normalisation(torch.tensor(mean), torch.tensor(std))
        saes[layer] = sae
    precision = resolve_precision(spec.precision, tower.device, spec.index_precision)
    keep_for_encoding(tower, saes, precision)
    return LiveEncoder(tower, saes, spec, batch_size, queue_size, precision)


def keep_for_encoding(tower: VisionTower, saes: dict[int, TopKSAE], precision: str) -> None:
    """What live encoding keeps: no SAE decoders, and the matrix weights in the forward precision (bf16 halves
    the tower and the encoders, and saves casting them on every upload; the codes stay the same)."""
    tower.keep_weights_in(precision)
    for sae in saes.values():
        sae.keep_for_encoding(precision)


class LiveEncoder:
    """The loaded model and SAEs, and the worker thread that runs them."""

    def __init__(self, tower: VisionTower, saes: dict[int, TopKSAE], spec: LiveSpec, batch_size: int = 8,
                 queue_size: int = 16, precision: str | None = None):
        from clipscope_explorer.precompute.model.precision import effective

        self.tower, self.saes, self.spec = tower, saes, spec
        self.precision = effective(precision, tower.device)
        self.layers = sorted(saes)
        self.identity = spec.identity(self.precision)
        self.grid = tower.grid
        self.image_size = int(tower.visual.image_size[0])
        self.batcher: MicroBatcher = MicroBatcher(self._run_batch, batch_size, queue_size)

    def preprocess(self, image) -> torch.Tensor:
        """The model's own preprocessing (open_clip's transform), as in the precompute job."""
        return self.tower.preprocess(image)

    def _run_batch(self, jobs: Sequence[tuple[torch.Tensor, tuple[int, ...]]]) -> list[Codes]:
        import torch

        from clipscope_explorer.precompute.model.encode import encode_pixels

        wanted = sorted({layer for _, layers in jobs for layer in layers})
        pixels = torch.stack([pixels for pixels, _ in jobs])
        encoded = encode_pixels(self.tower, {n: self.saes[n] for n in wanted}, pixels, self.precision)
        out = []
        for row, (_, layers) in enumerate(jobs):
            out.append({n: (encoded[n].code.values[row].float().cpu().numpy(),
                            encoded[n].code.indices[row].to(torch.int32).cpu().numpy()) for n in layers})
        return out

    async def encode(self, pixels: torch.Tensor, layers: Sequence[int], slot=None) -> Codes:
        """Codes of one preprocessed image [3, H, W] on `layers`, computed in the worker thread.
        `slot`: the request's admission (`batcher.admit()`), which lets the worker batch it with others."""
        submit = slot.submit if slot is not None else self.batcher.submit
        return await asyncio.wrap_future(submit((pixels, tuple(layers))))

    def close(self) -> None:
        self.batcher.close()


HOW_TO_ENABLE = ("To enable uploads, make the weights loadable offline (a local-dir:/path model folder, a local "
                 "SAE folder in the hub layout, or a pre-filled Hugging Face cache) and start the server with "
                 "--live-model, --live-sae and --live-layers as needed.")


class LiveService:
    """Live encoding's state for the app: off, loading, ready or failed."""

    def __init__(self, spec: LiveSpec | None, settings, encoder: LiveEncoder | None = None):
        self.spec = spec
        self.settings = settings
        self.encoder = encoder
        self.state = "ready" if encoder else ("loading" if spec else "off")
        self.message = "" if spec or encoder else "Live encoding is turned off (--no-live)."
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        if encoder is not None or spec is None:
            self._ready.set()

    def start(self) -> None:
        if self.state == "loading":
            self._thread = threading.Thread(target=self._load, name="clipscope-live-load", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        try:
            encoder = load_encoder(self.spec, self.settings.live_batch_size, self.settings.live_queue_size)
        except Exception as error:  # noqa: BLE001 - whatever stops loading (a hub client error included)
            # leaves the index served and the upload page explaining; it must not kill the server
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.message = f"The model or SAEs for live encoding could not be loaded: {first}"
            self.state = "failed"
            log.warning("live encoding disabled: %s", first)
        else:
            self.encoder, self.state = encoder, "ready"
            log.info("live encoding ready: %s, layers %s, %s", self.spec.model, encoder.layers, encoder.precision)
        finally:
            self._ready.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self.encoder is not None:
            self.encoder.close()

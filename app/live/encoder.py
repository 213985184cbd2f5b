"""Live encoding of uploaded images with the precompute job's own model and SAE code (the torch side).

`load_encoder` loads what a `LiveSpec` names, as encoding needs it and nothing
more: SAE encoders without decoders in memory (uploads are never reconstructed), and the
matrix weights of the tower and the encoders stored in the forward precision
(in bf16 the operands autocast would make on every call, so the codes are the
same; half the memory, no casting per upload). `LiveEncoder` runs
`clipscope_explorer.precompute.model.encode.encode_pixels` in one worker thread
(`app/live/batcher.py`) that micro-batches concurrent uploads; when the spec asks
(`LiveSpec.embed`: the index's own model, and an index with CLIP embeddings), the
tower runs to its end and each upload also gets its final CLIP image embedding.
With interventions on (`LiveSpec.interventions`), each layer's SAE decoder is kept too, memory-mapped
from its checkpoint file (`DecoderRows`: an intervention reads one row), and the same worker runs edited
passes (`precompute/model/intervene.py`), one image at a time.
Only `app/live/service.py` imports this module, when live encoding is asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipscope_explorer.app.live.batcher import MicroBatcher
from clipscope_explorer.app.live.spec import LiveSpec
from clipscope_explorer.precompute.model.checkpoints import DecoderRows, load_checkpoint_file, load_sae
from clipscope_explorer.precompute.model.encode import LayerCodes, encode_pixels
from clipscope_explorer.precompute.model.intervene import FeatureEdit, encode_edited
from clipscope_explorer.precompute.model.precision import effective, resolve_precision
from clipscope_explorer.precompute.model.sae import SAEEncoder, SAELoadError, Standardisation
from clipscope_explorer.precompute.model.vision import (
    ModelLoadError,
    ModelSpec,
    VisionTower,
    load_tower,
    resolve_device,
)

Codes = dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (values [T, k] float32, indices [T, k] int32)


@dataclass(frozen=True)
class Encoded:
    """One upload's codes on the layers it asked for, and its CLIP image embedding ([d] float32, unit;
    None when the encoder does not embed)."""

    codes: Codes
    embedding: np.ndarray | None


@dataclass(frozen=True)
class EditJob:
    """An intervention for the worker: the image's model input [3, H, W] (a tensor, or the stored array), the
    edit, and the layers to encode after it (the edited one is encoded too)."""

    pixels: torch.Tensor | np.ndarray
    edit: FeatureEdit
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Edited(Encoded):
    """An edited run: its codes and embedding, and the feature's firing value at the edited layer before the
    edit ([T] float32)."""

    firing: np.ndarray


def _numpy_codes(encoded: dict[int, LayerCodes], row: int, layers) -> Codes:
    return {
        n: (
            encoded[n].code.values[row].float().cpu().numpy(),
            encoded[n].code.indices[row].to(torch.int32).cpu().numpy(),
        )
        for n in layers
    }


def _numpy_row(tensor: torch.Tensor | None, row: int) -> np.ndarray | None:
    return None if tensor is None else tensor[row].float().cpu().numpy()


def _load_layer_encoder(spec: LiveSpec, layer: int, device: torch.device, precision: str) -> SAEEncoder:
    how = dict(purpose="encode", weights_precision=precision, device=device)
    file = spec.sae_files.get(layer)
    if file and Path(file).is_file():  # the very file the index was built from
        return load_checkpoint_file(file, source=spec.sae, layer=layer, **how)
    return load_sae(spec.sae, layer, spec.checkpoints.get(layer), **how)


def load_encoder(spec: LiveSpec, batch_size: int, queue_size: int) -> LiveEncoder:
    """Load model and SAE encoders (ModelLoadError / SAELoadError / ValueError when impossible)."""
    if not spec.model:
        raise ModelLoadError("the index records no model; pass --live-model")
    if not spec.sae:
        raise SAELoadError("the index records no SAE source; pass --live-sae")
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device, spec.index_precision)
    tower = load_tower(ModelSpec(spec.model, spec.pretrained), device=device, weights_precision=precision)
    saes, decoders = {}, {}
    for layer in tower.check_layers(spec.layers):
        saes[layer] = _load_layer_encoder(spec, layer, device, precision)
        saes[layer].check_fits(tower.width)
        if spec.interventions:
            decoders[layer] = DecoderRows(saes[layer].origin.file)
            decoders[layer].check_fits(saes[layer])
    return LiveEncoder(tower, saes, spec, batch_size, queue_size, precision, decoders)


class LiveEncoder:
    """The loaded model and SAE encoders, and the worker thread that runs them. Layers with normalisation
    statistics in `spec` are standardised with them before their SAE reads them, as the job did."""

    def __init__(
        self,
        tower: VisionTower,
        saes: dict[int, SAEEncoder],
        spec: LiveSpec,
        batch_size: int = 8,
        queue_size: int = 16,
        precision: str | None = None,
        decoders: dict[int, DecoderRows] | None = None,
    ):
        self.tower, self.saes, self.spec = tower, saes, spec
        self.decoders = decoders or {}
        self.precision = effective(precision, tower.device)
        self.layers = sorted(saes)
        self.normalisation = {
            layer: Standardisation(torch.tensor(mean, device=tower.device), torch.tensor(std, device=tower.device))
            for layer, (mean, std) in spec.normalisation.items()
            if layer in saes
        }
        self.identity = spec.identity(self.precision)
        self.embed = spec.embed
        self.grid = tower.grid
        self.image_size = int(tower.visual.image_size[0])
        self.batcher: MicroBatcher = MicroBatcher(self._run_batch, batch_size, queue_size)

    def preprocess(self, image) -> torch.Tensor:
        """The model's own preprocessing (open_clip's transform), as in the precompute job."""
        return self.tower.preprocess(image)

    @property
    def interventions(self) -> bool:
        """Whether this encoder keeps the decoders that interventions need."""
        return bool(self.decoders)

    def _run_batch(self, jobs: Sequence[tuple[torch.Tensor, tuple[int, ...]] | EditJob]) -> list[Encoded]:
        plain = [job for job in jobs if not isinstance(job, EditJob)]
        encoded = iter(self._encode_batch(plain) if plain else [])
        return [self._run_edit(job) if isinstance(job, EditJob) else next(encoded) for job in jobs]

    def _encode_batch(self, jobs: Sequence[tuple[torch.Tensor, tuple[int, ...]]]) -> list[Encoded]:
        wanted = sorted({layer for _, layers in jobs for layer in layers})
        pixels = torch.stack([torch.as_tensor(pixels) for pixels, _ in jobs])  # a stored upload's are an array
        saes = {n: self.saes[n] for n in wanted}
        result = encode_pixels(self.tower, saes, pixels, self.precision, self.normalisation, embed=self.embed)
        encoded, embeddings = result if self.embed else (result, None)
        return [
            Encoded(_numpy_codes(encoded, row, layers), _numpy_row(embeddings, row))
            for row, (_, layers) in enumerate(jobs)
        ]

    def _run_edit(self, job: EditJob) -> Edited:
        layer = job.edit.layer
        saes = {n: self.saes[n] for n in sorted({layer, *job.layers})}
        row = self.decoders[layer].row(job.edit.feature)
        pixels = torch.as_tensor(job.pixels)[None]
        run = encode_edited(
            self.tower, saes, row, pixels, job.edit, self.precision, self.normalisation, embed=self.embed
        )
        return Edited(_numpy_codes(run.codes, 0, saes), _numpy_row(run.embedding, 0), _numpy_row(run.firing, 0))

    async def encode_image(self, pixels: torch.Tensor, layers: Sequence[int], slot=None) -> Encoded:
        """Codes of one preprocessed image [3, H, W] on `layers` (and its embedding when this encoder embeds),
        computed in the worker thread. `slot`: the request's admission (`batcher.admit()`), which lets the
        worker batch it with others."""
        submit = slot.submit if slot is not None else self.batcher.submit
        return await asyncio.wrap_future(submit((pixels, tuple(layers))))

    async def encode(self, pixels: torch.Tensor, layers: Sequence[int], slot=None) -> Codes:
        """Codes of one preprocessed image [3, H, W] on `layers` (`encode_image` without the embedding)."""
        return (await self.encode_image(pixels, layers, slot)).codes

    def submit_edit(self, pixels: torch.Tensor | np.ndarray, edit, layers: Sequence[int], slot=None) -> Future:
        """The edited run of one preprocessed image [3, H, W] (`encode_edited`), its codes on `layers` and on the
        edited layer, computed in the worker thread between micro-batches: a future of `Edited`. `edit`:
        anything with the fields of a `FeatureEdit` (layer, feature, scale, tokens)."""
        if not self.interventions:
            raise RuntimeError("this encoder keeps no decoders: interventions are off")
        job = EditJob(pixels, FeatureEdit(edit.layer, edit.feature, edit.scale, edit.tokens), tuple(layers))
        return (slot.submit if slot is not None else self.batcher.submit)(job)

    async def intervene(self, pixels: torch.Tensor | np.ndarray, edit, layers: Sequence[int], slot=None) -> Edited:
        """`submit_edit`, awaited."""
        return await asyncio.wrap_future(self.submit_edit(pixels, edit, layers, slot))

    def close(self) -> None:
        self.batcher.close()

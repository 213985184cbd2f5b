"""What `open_index` loads only when asked: search by meaning (`app/meaning/`: CLIP's text tower and the
index's vectors) and live encoding (`app/live/`: the model and SAEs), each as the server loads it, but in the
foreground on first use. Torch is imported only then (`app/live/service.py`, `app/meaning/service.py`)."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from clipscope_explorer.app.live.input import UploadRejected, decode, parse_options
from clipscope_explorer.app.live.intervention import InterventionResult, intervention_result, parse_intervention
from clipscope_explorer.app.live.result import UploadResult, upload_result
from clipscope_explorer.app.live.service import LiveService
from clipscope_explorer.app.live.spec import LiveSpec
from clipscope_explorer.app.meaning.service import MeaningService
from clipscope_explorer.app.pages.uploads import _upload_id as upload_id
from clipscope_explorer.app.queries import Index as IndexData
from clipscope_explorer.app.settings import Settings
from clipscope_explorer.app.urls import Urls

if TYPE_CHECKING:
    from clipscope_explorer.app.live.encoder import LiveEncoder

HOW_TO_CHOOSE = "open_index(..., model=, pretrained=, sae=, layers=) chooses another model or SAEs"


class Unavailable(RuntimeError):
    """Search by meaning or encoding cannot run here (a model that cannot be loaded); one line says why."""


def image_bytes(image) -> bytes:
    """The bytes of an image given as a path, bytes, a binary file or a PIL image (saved as PNG, losslessly)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if hasattr(image, "read"):
        return image.read()
    if hasattr(image, "save") and hasattr(image, "mode"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image is a path, bytes, a binary file or a PIL image, not {type(image).__name__}")


class Services:
    """Search by meaning and live encoding over one open index, loaded once each, when first needed."""

    def __init__(self, data: IndexData, settings: Settings, urls: Urls):
        self.data, self.settings, self.urls = data, settings, urls
        self._meaning: MeaningService | None = None
        self._live: LiveService | None = None
        self._lock = threading.Lock()

    def meaning(self, text: bool) -> MeaningService:
        """The search-by-meaning service, its text tower loaded when `text` (and `open_index(text=True)`)."""
        text = text and self.settings.text
        with self._lock:
            service = self._meaning
            if service is None or (text and service.text_state == "off"):
                if service is not None:
                    service.close()
                service = MeaningService(self.data, self.settings.model_copy(update={"text": text}))
                service.start()
                service.wait()
                self._meaning = service
            return service

    def encoder(self) -> LiveEncoder:
        """The live encoder (`Unavailable` when its model or SAEs cannot be loaded)."""
        with self._lock:
            if self._live is None:
                spec = LiveSpec.from_index(self.data.meta, self.data.layers, self.settings)
                self._live = LiveService(spec, self.settings)
                self._live.start()
                self._live.wait()
        if self._live.encoder is None:
            raise Unavailable(f"{self._live.message} ({HOW_TO_CHOOSE})")
        return self._live.encoder

    def encode(self, image, layers, sort: str, top: int, patches: bool) -> UploadResult:
        """`POST /api/encode`'s answer for `image`, not stored."""
        encoder = self.encoder()
        data = image_bytes(image)
        layers = [layers] if isinstance(layers, int) else list(layers or [])
        fields = {"layers": [",".join(map(str, layers))], "sort": [str(sort)], "top": [str(top)]}
        try:
            options = parse_options(fields, encoder.layers)
            decoded = decode(data, encoder.preprocess)
        except UploadRejected as error:
            raise ValueError(error.message) from None
        encoded = encoder.batcher.submit((decoded.pixels, tuple(options.layers))).result()
        width, height = decoded.size
        return upload_result(
            self.data,
            self.urls,
            upload_id(encoder.identity, data),
            width,
            height,
            encoder.grid,
            encoded.codes,
            encoder.spec.index_layers,
            False,
            options.sort,
            options.top,
            bool(patches),
            encoded.embedding,
            self.meaning(text=False) if encoded.embedding is not None else None,
        )

    def intervene(self, image, fields: dict[str, list[str]]) -> InterventionResult:
        """`POST /api/intervene`'s answer for a new `image` with the form's `fields`, not stored."""
        encoder = self.encoder()
        if not encoder.interventions:
            raise Unavailable("interventions are off (interventions=False)")
        data = image_bytes(image)
        try:
            n_features = {layer: encoder.saes[layer].n_features for layer in encoder.layers}
            ask = parse_intervention(fields, n_features, encoder.grid[0] * encoder.grid[1])
            decoded = decode(data, encoder.preprocess)
        except UploadRejected as error:
            raise ValueError(error.message) from None
        later = [n for n in encoder.layers if n > ask.layer]
        before = encoder.batcher.submit((decoded.pixels, (ask.layer, *later))).result()
        edited = encoder.submit_edit(decoded.pixels, ask, later).result()
        image_id = upload_id(encoder.identity, data)
        return intervention_result(
            self.data,
            self.urls,
            self.meaning(text=ask.prompts is not None),
            image_id,
            ask.identity(image_id),
            False,
            encoder.grid,
            ask,
            before.codes,
            before.embedding,
            edited.codes,
            edited.embedding,
            edited.firing,
            encoder.spec.index_layers,
        )

    def close(self) -> None:
        for service in (self._live, self._meaning):
            if service is not None:
                service.close()

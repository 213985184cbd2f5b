"""Live encoding's state for the app (torch-free): off, loading, ready or failed.

`LiveService` loads the encoder in a background thread when the server
starts, so the index is served at once; its `status` says `off`, `loading`,
`ready` or `failed` (with a one-line reason), and the upload page explains how
to enable uploads when they are not available. The one place the web side
reaches torch is `_load`, which imports `app/live/encoder.py` when a spec asks
for live encoding: a `--no-live` server never imports torch or the model code.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from clipscope_explorer.app.live.spec import LiveSpec

if TYPE_CHECKING:
    from clipscope_explorer.app.live.encoder import LiveEncoder

log = logging.getLogger(__name__)

HOW_TO_ENABLE = (
    "To enable uploads, make the weights loadable offline (a local-dir:/path model folder, a local "
    "SAE folder in the hub layout, or a pre-filled Hugging Face cache) and start the server with "
    "--live-model, --live-sae and --live-layers as needed."
)


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
            from clipscope_explorer.app.live.encoder import load_encoder  # torch and the model code load here

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

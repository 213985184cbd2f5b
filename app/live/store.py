"""The upload store: a writable folder, apart from the read-only index, of past uploads.

An upload's id is a hash of the encoder's identity and the uploaded bytes, so
the same image sent twice is the same upload (and is not encoded again). An
entry is a folder ``<id[:2]>/<id>/`` holding:
- ``view.jpg``: the model's view of the image (shortest side resized, centre
  crop) at `VIEW_SIZE` pixels, re-encoded from decoded pixels, so no EXIF or
  other metadata and none of the uploaded bytes are ever kept or served;
- ``L<layer>.npz``: that layer's sparse code (values float32 [T, k], indices int32 [T, k]);
- ``embedding.npy``: the image's CLIP embedding (float32 [d]), when the encoder made one (its
  nearest sample images and zero-shot labels are found again from it);
- ``pixels.npz``: the model's input (the preprocessed pixels, float32 [3, H, W], compressed), when
  interventions are on: an intervention on a stored upload runs the model again on exactly these;
- ``edit-<id>.json`` and ``edit-<id>.npz``: an intervention on the upload (its request; the edited run's
  codes per layer, the feature's firing at the edited layer, the edited embedding), kept and evicted
  with the upload;
- ``meta.json``: original width and height, the layers stored and those whose
  SAE was the index's (labels apply), whether the embedding is stored; written last, so only
  complete entries are seen.
Every file is written to a temporary name and renamed. The store is shared by
server processes. Least recently used entries (by ``meta.json``'s mtime,
touched on every read) are evicted once the store exceeds its size cap. Client
file names are never used: paths come from hex ids only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

UPLOAD_ID = re.compile(r"[0-9a-f]{32}")  # always used with fullmatch (`$` would accept a trailing newline)
VIEW_SIZE = 448
RESCAN_EVERY = 64  # saves between full rescans (other processes write too)


@dataclass
class StoredUpload:
    upload_id: str
    width: int
    height: int
    layers: list[int]
    folder: Path
    index_layers: list[int]  # layers whose SAE was the index's when it was encoded
    has_embedding: bool = False
    has_pixels: bool = False

    def pixels(self) -> np.ndarray:
        """The model's input as stored ([3, H, W] float32)."""
        with np.load(self.folder / "pixels.npz") as data:
            return data["pixels"]

    def edit(self, edit_id: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        """A stored intervention's request and arrays, or None when it is not stored."""
        if not UPLOAD_ID.fullmatch(edit_id):
            return None
        try:
            request = json.loads((self.folder / f"edit-{edit_id}.json").read_text())
            with np.load(self.folder / f"edit-{edit_id}.npz") as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError):
            return None
        return request, arrays

    def embedding(self) -> np.ndarray | None:
        """The stored CLIP embedding ([d] float32), or None when none was stored."""
        return np.load(self.folder / "embedding.npy") if self.has_embedding else None

    def codes(self, layers: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for layer in layers:
            with np.load(self.folder / f"L{layer}.npz") as data:
                out[layer] = (data["values"], data["indices"])
        return out

    @property
    def view_path(self) -> Path:
        return self.folder / "view.jpg"


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _npz(values: np.ndarray, indices: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, values=values.astype(np.float32), indices=indices.astype(np.int32))
    return buffer.getvalue()


def _npy(vector: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(vector, dtype=np.float32))
    return buffer.getvalue()


def _npz_compressed(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _folder_size(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    except OSError:
        return 0


class UploadStore:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._saves = 0
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / ".write-test"
        probe.write_bytes(b"")  # fail at start, not on the first upload, when the folder is read-only
        probe.unlink()
        self._estimate = self._scan_total()

    def _folder(self, upload_id: str) -> Path:
        """`<root>/<id[:2]>/<id>`; anything but 32 lower-case hex digits is refused, so no path leaves the root."""
        if not isinstance(upload_id, str) or not UPLOAD_ID.fullmatch(upload_id):
            raise ValueError(f"not an upload id: {upload_id[:80] if isinstance(upload_id, str) else upload_id!r}")
        return self.root / upload_id[:2] / upload_id

    def get(self, upload_id: str, touch: bool = True) -> StoredUpload | None:
        if not isinstance(upload_id, str) or not UPLOAD_ID.fullmatch(upload_id):
            return None
        folder = self._folder(upload_id)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if touch:
                os.utime(folder / "meta.json")
        except (OSError, ValueError):
            return None
        return StoredUpload(
            upload_id,
            int(meta["width"]),
            int(meta["height"]),
            sorted(meta["layers"]),
            folder,
            sorted(meta.get("index_layers", [])),
            bool(meta.get("embedding")),
            bool(meta.get("pixels")),
        )

    def save(
        self,
        upload_id: str,
        width: int,
        height: int,
        view_jpeg: bytes,
        codes: dict,
        index_layers: list[int],
        embedding: np.ndarray | None = None,
        pixels: np.ndarray | None = None,
    ) -> StoredUpload:
        """Add an upload (or more layers of one, its embedding, its pixels); evict old entries when over the cap."""
        folder = self._folder(upload_id)
        folder.mkdir(parents=True, exist_ok=True)
        previous = self.get(upload_id, touch=False)
        if previous is None or not previous.view_path.is_file():
            _write_atomic(folder / "view.jpg", view_jpeg)
        for layer, (values, indices) in codes.items():
            _write_atomic(folder / f"L{layer}.npz", _npz(values, indices))
        if embedding is not None:
            _write_atomic(folder / "embedding.npy", _npy(embedding))
        if pixels is not None:
            _write_atomic(folder / "pixels.npz", _npz_compressed(pixels=np.asarray(pixels, dtype=np.float32)))
        has_embedding = embedding is not None or (previous is not None and previous.has_embedding)
        has_pixels = pixels is not None or (previous is not None and previous.has_pixels)
        layers = sorted(set(codes) | set(previous.layers if previous else []))
        index_layers = sorted(set(index_layers) & set(layers))
        _write_atomic(
            folder / "meta.json",
            json.dumps(
                {
                    "width": width,
                    "height": height,
                    "layers": layers,
                    "index_layers": index_layers,
                    "embedding": has_embedding,
                    "pixels": has_pixels,
                    "saved": time.time(),
                }
            ).encode(),
        )
        self._added(folder)
        return StoredUpload(upload_id, width, height, layers, folder, index_layers, has_embedding, has_pixels)

    def save_edit(self, upload: StoredUpload, edit_id: str, request: dict, arrays: dict[str, np.ndarray]) -> None:
        """Keep an intervention on a stored upload (arrays first: the request file marks it complete)."""
        if not UPLOAD_ID.fullmatch(edit_id):
            raise ValueError(f"not an intervention id: {edit_id[:80]!r}")
        _write_atomic(upload.folder / f"edit-{edit_id}.npz", _npz_compressed(**arrays))
        _write_atomic(upload.folder / f"edit-{edit_id}.json", json.dumps(request).encode())
        self._added(upload.folder)

    def _added(self, folder: Path) -> None:
        with self._lock:
            self._estimate += _folder_size(folder)
            self._saves += 1
            rescan = self._saves % RESCAN_EVERY == 0
        if rescan or self._estimate > self.max_bytes:
            self.evict()

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for meta in self.root.glob("??/*/meta.json"):
            try:
                entries.append((meta.stat().st_mtime, _folder_size(meta.parent), meta.parent))
            except OSError:
                continue
        return entries

    def _scan_total(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self) -> int:
        """Remove least recently used entries until the store fits its cap; return how many."""
        with self._lock:
            entries = sorted(self._entries())
            total = sum(size for _, size, _ in entries)
            removed = 0
            while entries and total > self.max_bytes:
                _, size, folder = entries.pop(0)
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
                removed += 1
            self._estimate = total
        if removed:
            log.info("upload store: evicted %d least recently used uploads", removed)
        return removed

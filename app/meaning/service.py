"""Search by meaning for the app (torch-free): CLIP's text tower and the index's vectors, loaded in the
background, with per-process caches.

`MeaningService` starts two background threads when the server starts, so the index is served at once:
one loads the text tower (`precompute/model/text.py`, imported inside `_load_tower` only when the tower is
on: `--no-text` never imports torch here), the other maps the index's vectors (`vectors.py`: sample image
embeddings and feature prototypes, which need no torch, so nearest images work with the tower off). Once
torch is loaded (by the tower, or by live encoding), scans take torch's fast first pass (`torch_scan.py`).
`status(kind)` says `off`, `loading`, `ready` or `failed` with a one-line reason for `images` or
`features`. Query embeddings, and the best rows of each query, are cached per process (LRU, keyed by
template and cleaned query): the index never changes.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np

from clipscope_explorer.app.meaning.export import ID_COLUMNS, export_in_child, map_vectors
from clipscope_explorer.app.meaning.prompts import prompt
from clipscope_explorer.app.meaning.vectors import (
    NumpyScorer,
    Scorer,
    UnitVectors,
    scorer_is_within_bound,
)
from clipscope_explorer.app.queries import VECTOR_COLUMNS

if TYPE_CHECKING:
    from clipscope_explorer.app.queries import Index
    from clipscope_explorer.app.settings import Settings
    from clipscope_explorer.precompute.model.text import TextTower

log = logging.getLogger(__name__)

Kind = Literal["images", "features"]
State = Literal["off", "loading", "ready", "failed"]
WHAT = {"images": "sample images' embeddings", "features": "feature prototypes"}


@dataclass(frozen=True)
class TextSpec:
    """What the text tower loads: the index's model unless `--live-model` names another."""

    model: str
    pretrained: str | None
    device: str = "auto"
    precision: str = "auto"
    index_precision: str | None = None

    @classmethod
    def from_index(cls, meta: dict, settings: Settings) -> TextSpec:
        recorded = meta.get("model") or {}
        return cls(
            model=settings.live_model or str(recorded.get("name") or ""),
            pretrained=settings.live_pretrained if settings.live_model else recorded.get("pretrained"),
            device=settings.live_device,
            precision=settings.live_precision,
            index_precision=meta.get("precision"),
        )


@dataclass(frozen=True)
class Status:
    state: State
    message: str | None  # why search by meaning is not available (None when ready)

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class MeaningUnavailable(RuntimeError):
    """Search by meaning cannot answer now; `status` says why (`loading`: try again soon)."""

    def __init__(self, status: Status):
        super().__init__(status.message)
        self.status = status


@dataclass(frozen=True)
class Ranking:
    """The best rows of one query: ids [n, 1] (image_id) or [n, 2] (layer, feature), scores [n], best
    first; `truncated`: the prompt did not fit the text tower's context."""

    ids: np.ndarray
    scores: np.ndarray
    truncated: bool


class MeaningService:
    """CLIP's text tower and the index's vectors for search by meaning: off, loading, ready or failed."""

    def __init__(self, index: Index, settings: Settings, tower: TextTower | None = None):
        self.index = index
        self.settings = settings
        self.spec = TextSpec.from_index(index.meta, settings) if settings.text or tower else None
        self.tower = tower
        self.text_state: State = "ready" if tower else ("loading" if self.spec else "off")
        self.text_message = None if self.spec else "Search by meaning is turned off (--no-text)."
        self.dim = self._index_dim()
        self.vectors: dict[str, UnitVectors | None] = {"images": None, "features": None}
        self.vector_state: dict[str, State] = {}
        self.vector_message: dict[str, str | None] = {}
        for kind in ID_COLUMNS:
            missing = self._missing(kind)
            self.vector_state[kind] = "off" if missing else "loading"
            self.vector_message[kind] = missing
        if self.text_state == "loading" and all(state == "off" for state in self.vector_state.values()):
            self.text_state, self.text_message = "off", self.vector_message["images"]  # nothing to search
        self.limit = settings.max_page_size + 1  # rankings hold the longest list a request may ask for
        self.scorer: Scorer = (tower and _fast_scorer(tower.dim)) or NumpyScorer()  # torch's once torch is loaded
        self._tried_fast = tower is not None
        self._encode_lock = threading.Lock()
        self._done = {name: threading.Event() for name in ("text", "vectors")}
        self._workers: list[threading.Thread] = []
        size = settings.query_cache_size
        self._embed = lru_cache(maxsize=size)(self._embed_uncached)
        self._images = lru_cache(maxsize=size)(self._rank_images)
        self._features = lru_cache(maxsize=size)(self._rank_features)

    # -- what the index holds ------------------------------------------------
    def _index_dim(self) -> int | None:
        embeddings = self.index.meta.get("embeddings")
        return int(embeddings["dim"]) if isinstance(embeddings, dict) else None

    def _missing(self, kind: Kind) -> str | None:
        """Why the index has no vectors of `kind` (None when it has some)."""
        minor = self.index.meta.get("schema_minor", 0)
        if minor < 2 or not self.index.has(*VECTOR_COLUMNS[kind][:2]):
            return (
                f"This index (schema 1.{minor}) was built before search by meaning: rebuild it with "
                "clipscope-explorer precompute to search by meaning."
            )
        if self.dim is None:
            return "This index was built with --no-embeddings: it holds no CLIP embeddings to search by meaning."
        if self.index.vector_count(kind) == 0:
            return f"This index holds no {WHAT[kind]} to search by meaning."
        return None

    # -- loading -------------------------------------------------------------
    def start(self) -> None:
        jobs = {"text": self._load_tower if self.text_state == "loading" else None, "vectors": self._load_vectors}
        for name, job in jobs.items():
            if job is None:
                self._done[name].set()
                continue
            thread = threading.Thread(target=job, name=f"clipscope-meaning-{name}", daemon=True)
            self._workers.append(thread)
            thread.start()

    def _load_tower(self) -> None:
        try:
            from clipscope_explorer.app.meaning.tower_process import RemoteTextTower

            remote = RemoteTextTower.from_environment()  # set by `serve`: one tower for all its workers
            tower = remote.connect() if remote else load_tower_for(asdict(self.spec))
            if self.dim is not None and tower.dim != self.dim:
                raise ValueError(
                    f"it embeds text in {tower.dim} dimensions, the index's images in {self.dim}: not the index's model"
                )
        except Exception as error:  # noqa: BLE001 - whatever stops loading leaves word search working
            self.text_message = f"CLIP's text tower could not be loaded, so search by meaning is off: {_first(error)}"
            self.text_state = "failed"
            log.warning("search by meaning disabled: %s", _first(error))
        else:
            self.scorer, self._tried_fast = _fast_scorer(tower.dim) or self.scorer, True  # torch loads here
            self.tower, self.text_state = tower, "ready"
            log.info("text tower ready: %s (%s)%s", self.spec.model, tower.precision, " shared" if remote else "")
        finally:
            self._done["text"].set()

    def _load_vectors(self) -> None:
        folder = self.settings.search_cache / self.index.index_id
        kinds = [kind for kind in ID_COLUMNS if self.vector_state[kind] == "loading"]
        try:
            if kinds:
                export_in_child(self.index.path, folder, kinds)
            for kind in kinds:
                try:
                    self.vectors[kind] = map_vectors(self.index, folder, kind, self.dim)
                except Exception as error:  # noqa: BLE001 - a bad blob or a closed index: this search is off
                    self.vector_message[kind] = f"The index's {WHAT[kind]} could not be read: {_first(error)}"
                    self.vector_state[kind] = "failed"
                    log.warning("search by meaning over %s disabled: %s", kind, _first(error))
                else:
                    self.vector_state[kind] = "ready"
        finally:
            self._done["vectors"].set()

    def wait(self, timeout: float | None = None) -> bool:
        return all(done.wait(timeout) for done in self._done.values())

    def close(self) -> None:
        for thread in self._workers:
            thread.join(timeout=1)

    # -- state ---------------------------------------------------------------
    def status(self, kind: Kind, needs_text: bool = True) -> Status:
        """Whether `kind` can be searched (by text when `needs_text`, else by a vector), and if not, why."""
        if self.vector_state[kind] == "off":
            return Status("off", self.vector_message[kind])
        if needs_text and self.text_state != "ready":
            return self._text_status()
        if self.vector_state[kind] == "loading":
            return Status("loading", f"The index's {WHAT[kind]} are being prepared for search; try again in a moment.")
        if self.vector_state[kind] == "failed":
            return Status("failed", self.vector_message[kind])
        return Status("ready", None)

    def _text_status(self) -> Status:
        if self.text_state == "loading":
            return Status("loading", "CLIP's text tower is loading; search by meaning starts in a moment.")
        return Status(self.text_state, self.text_message)

    def _require(self, kind: Kind, needs_text: bool = True) -> UnitVectors:
        status = self.status(kind, needs_text)
        if not status.ready:
            raise MeaningUnavailable(status)
        return self.vectors[kind]

    # -- queries -------------------------------------------------------------
    def embed(self, q: str, template: str) -> tuple[np.ndarray, bool]:
        """The text embedding of the prompt for `q` ([d] float32, unit) and whether it was truncated to the
        tower's context; cached. `q` and `template` are cleaned and checked already (`prompts.py`)."""
        if self.text_state != "ready":
            raise MeaningUnavailable(self._text_status())
        return self._embed(template, q)

    def _embed_uncached(self, template: str, q: str) -> tuple[np.ndarray, bool]:
        with self._encode_lock:  # one forward pass at a time: they would only share the same cores
            try:
                embedding = self.tower.encode([prompt(q, template)])
            except (OSError, EOFError, RuntimeError) as error:  # the shared tower process stopped answering
                log.warning("the text tower did not answer: %s", _first(error))
                message = f"CLIP's text tower did not answer, so search by meaning is off for now: {_first(error)}"
                raise MeaningUnavailable(Status("failed", message)) from error
        vector = embedding.vectors[0]
        vector.setflags(write=False)
        return vector, bool(embedding.truncated[0])

    def images(self, q: str, template: str) -> Ranking:
        """The sample images best matching `q`, best first (up to max_page_size + 1); cached."""
        self._require("images")
        return self._images(template, q)

    def features(self, q: str, template: str, layer: int | None) -> Ranking:
        """The features whose prototypes best match `q`, on `layer` or all layers; cached."""
        self._require("features")
        return self._features(template, q, layer)

    def _rank_images(self, template: str, q: str) -> Ranking:
        vector, truncated = self.embed(q, template)
        return self._ranking(self.vectors["images"], vector, self.limit, None, truncated)

    def _rank_features(self, template: str, q: str, layer: int | None) -> Ranking:
        vector, truncated = self.embed(q, template)
        vectors = self.vectors["features"]
        rows = vectors.row_range(0, layer) if layer is not None else None
        return self._ranking(vectors, vector, self.limit, rows, truncated)

    def _ranking(self, vectors: UnitVectors, vector, k: int, rows, truncated: bool) -> Ranking:
        found, scores = vectors.top(vector, k, self.scorer, rows)
        return Ranking(np.asarray(vectors.ids[found]), scores, truncated)

    def nearest_images(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(image_id, score) of the k sample images nearest `vector` ([d] unit, the joint space), best
        first; needs no text tower."""
        vectors = self._require("images", needs_text=False)
        if not self._tried_fast and "torch" in sys.modules:  # loaded by live encoding: its first pass is faster
            self._tried_fast = True
            self.scorer = _fast_scorer(self.dim) or self.scorer
        found, scores = vectors.top(np.asarray(vector, dtype=np.float32), k, self.scorer)
        return [(int(i), float(s)) for i, s in zip(vectors.ids[found, 0], scores)]

    def image_vector(self, image_id: int) -> np.ndarray | None:
        """The stored embedding of sample image `image_id` as float32, or None when it has none."""
        vectors = self._require("images", needs_text=False)
        row = int(np.searchsorted(vectors.ids[:, 0], image_id))
        if row >= len(vectors) or vectors.ids[row, 0] != image_id:
            return None
        return np.asarray(vectors.matrix[row], dtype=np.float32)

    def cache_info(self) -> dict[str, object]:
        """Hits and misses of the per-process caches (functools' CacheInfo) by name."""
        return {
            "embeddings": self._embed.cache_info(),
            "images": self._images.cache_info(),
            "features": self._features.cache_info(),
        }


def _fast_scorer(dim: int) -> Scorer | None:
    """torch's float16 scorer when it keeps to its error bound here, else None."""
    from clipscope_explorer.app.meaning.torch_scan import TorchScorer  # the torch side: torch is loaded now

    rows = np.random.default_rng(1).normal(size=(4096, dim))
    sample = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype("<f2")
    if scorer_is_within_bound(TorchScorer(), sample):
        return TorchScorer()
    log.warning("torch's float16 product exceeds its error bound here: search by meaning scans with numpy")
    return None


def load_tower_for(spec: dict) -> TextTower:
    """The text tower a `TextSpec` (as a dict) names, loaded in this process (torch loads here)."""
    from clipscope_explorer.precompute.model.precision import resolve_precision
    from clipscope_explorer.precompute.model.text import load_text_tower
    from clipscope_explorer.precompute.model.vision import ModelSpec, resolve_device

    device = resolve_device(spec["device"])
    precision = resolve_precision(spec["precision"], device, spec["index_precision"])
    tower = load_text_tower(ModelSpec(spec["model"], spec["pretrained"]), device, precision)
    release_freed_memory()  # the loader built the whole CLIP model, then dropped its vision half
    return tower


def release_freed_memory() -> None:
    """Hand memory freed on the heap back to the system (glibc keeps large freed blocks otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _first(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

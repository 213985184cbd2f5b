"""The resumable state of a precompute run, kept in ``<out>.work/`` beside the index.

- ``state.pt``: accumulators, position in every shard, caption statistics;
  replaced atomically (write, fsync, rename) every checkpoint.
- ``images.sqlite``: metadata and thumbnails of every image that entered some
  example list, committed before each checkpoint. Rows written after the last
  checkpoint are harmless: the final index takes only referenced images.
  The same file holds one row per encoded image (`samples`: metadata and the
  final CLIP embedding) and its CLS token's kept SAE latents per layer
  (`codes`), keyed by ordinal: a resumed run re-encodes the batches after the
  checkpoint and replaces their rows, so the spill ends with exactly the
  encoded images.

A work folder belongs to one configuration (its fingerprint); running a
different command against it is refused rather than mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from clipscope_explorer.precompute.sources import Sample


class WorkDirError(RuntimeError):
    """The work folder belongs to another run or cannot be written."""


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _explain(error: Exception, folder: Path) -> str:
    """torch.save reports a full disk as an opaque zip-writer error: say what it is."""
    free = shutil.disk_usage(folder).free
    if isinstance(error, RuntimeError) and free < 16 * 2**20:
        return f"No space left on device ({free // 1024} KiB free)"
    return str(error)


class WorkDir:
    def __init__(self, out: Path, config: dict):
        self.path = out.with_name(out.name + ".work")
        self.fingerprint = fingerprint(config)
        self.config = config
        self.state_file = self.path / "state.pt"
        self._db: sqlite3.Connection | None = None

    def open(self) -> dict | None:
        """Create or reopen the folder; return the saved state to resume from, if any."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WorkDirError(f"cannot create {self.path}: {error}") from error
        stamp = self.path / "run.json"
        if stamp.is_file():
            saved = json.loads(stamp.read_text())
            if saved.get("fingerprint") != self.fingerprint:
                raise WorkDirError(
                    f"{self.path} holds an unfinished run of a different command; "
                    f"rerun that command to resume it, or pass --fresh to discard it"
                )
        else:
            stamp.write_text(json.dumps({"fingerprint": self.fingerprint, "config": self.config}, default=str))
        if not self.state_file.is_file():
            return None
        return torch.load(self.state_file, map_location="cpu", weights_only=False)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.path / "images.sqlite")
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS images (ordinal INTEGER PRIMARY KEY, source TEXT, key TEXT, "
                "url TEXT, caption TEXT, width INTEGER, height INTEGER, thumbnail BLOB);"
                "CREATE TABLE IF NOT EXISTS samples (ordinal INTEGER PRIMARY KEY, source TEXT, key TEXT, "
                "url TEXT, caption TEXT, width INTEGER, height INTEGER, embedding BLOB);"
                "CREATE TABLE IF NOT EXISTS codes (layer INTEGER, ordinal INTEGER, indices BLOB, activations BLOB, "
                "PRIMARY KEY (layer, ordinal)) WITHOUT ROWID;"
            )
        return self._db

    def keep_images(self, samples: Iterable[Sample]) -> None:
        self.keep_rows((s.ordinal, s.source, s.key, s.url, s.caption, s.width, s.height, s.thumbnail) for s in samples)

    def keep_rows(self, rows: Iterable[tuple], table: str = "images") -> None:
        """Insert spilled rows (by ordinal, replacing): `images` (thumbnails), `samples` or `codes`."""
        marks = ", ".join("?" * {"images": 8, "samples": 8, "codes": 4}[table])
        try:
            self.db.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", rows)
        except sqlite3.Error as error:
            raise WorkDirError(f"cannot write {self.path / 'images.sqlite'}: {error}") from error

    def keep_samples(self, samples: list[Sample], embeddings: np.ndarray | None, cls_codes: dict) -> None:
        """One row per encoded image: metadata and embedding ([n, d] float16, or None), and per layer its CLS
        token's kept latents (cls_codes: {layer: (indices [n, k] int32, values [n, k] float32)})."""
        self.keep_rows(
            (
                (
                    s.ordinal,
                    s.source,
                    s.key,
                    s.url,
                    s.caption,
                    s.width,
                    s.height,
                    None if embeddings is None else embeddings[i].tobytes(),
                )
                for i, s in enumerate(samples)
            ),
            "samples",
        )
        for layer, (indices, values) in cls_codes.items():
            self.keep_rows(
                ((layer, s.ordinal, indices[i].tobytes(), values[i].tobytes()) for i, s in enumerate(samples)), "codes"
            )

    def sample_ordinals(self) -> np.ndarray:
        """The ordinals of every encoded image, ascending (int64)."""
        cursor = self.db.execute("SELECT ordinal FROM samples ORDER BY ordinal")
        return np.fromiter((row[0] for row in cursor), dtype=np.int64)

    def sample_rows(self, chunk: int) -> Iterator[list[tuple]]:
        """Every `samples` row (ordinal, source, key, url, caption, width, height, embedding), by ordinal, in
        lists of up to `chunk` rows."""
        return self._chunks("SELECT * FROM samples ORDER BY ordinal", (), chunk)

    def code_rows(self, layer: int, chunk: int) -> Iterator[list[tuple]]:
        """One layer's `codes` rows (layer, ordinal, indices, activations), by ordinal, in chunks."""
        return self._chunks("SELECT * FROM codes WHERE layer = ? ORDER BY ordinal", (layer,), chunk)

    def spilled_samples(self) -> tuple[list[tuple], list[tuple]]:
        """Every `samples` and `codes` row (what a Ray worker hands back)."""
        return (
            self.db.execute("SELECT * FROM samples").fetchall(),
            self.db.execute("SELECT * FROM codes").fetchall(),
        )

    def captions_of_samples(self, chunk: int = 10_000) -> Iterator[str | None]:
        """The caption of every encoded image, by ordinal."""
        for rows in self._chunks("SELECT caption FROM samples ORDER BY ordinal", (), chunk):
            yield from (row[0] for row in rows)

    def embeddings(self, ordinals: np.ndarray, dim: int) -> np.ndarray:
        """The stored embeddings [n, dim] float16 of `ordinals`, in their order (each must have one)."""
        out = np.empty((len(ordinals), dim), np.float16)
        for start in range(0, len(ordinals), 500):
            chunk = [int(o) for o in ordinals[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            found = dict(
                self.db.execute(f"SELECT ordinal, embedding FROM samples WHERE ordinal IN ({marks})", chunk).fetchall()
            )
            out[start : start + len(chunk)] = [np.frombuffer(found[o], np.float16) for o in chunk]
        return out

    def _chunks(self, sql: str, params: tuple, chunk: int) -> Iterator[list[tuple]]:
        cursor = self.db.cursor()  # its own cursor: the caller may query in between
        cursor.execute(sql, params)
        while rows := cursor.fetchmany(chunk):
            yield rows

    def image_rows(self, ordinals: list[int], columns: str = "*") -> list[tuple]:
        """Rows (ordinal, source, key, url, caption, width, height, thumbnail), sorted by ordinal."""
        rows = []
        for start in range(0, len(ordinals), 500):
            chunk = ordinals[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self.db.execute(f"SELECT {columns} FROM images WHERE ordinal IN ({marks})", chunk).fetchall()
        return sorted(rows)

    def captions(self, ordinals: list[int]) -> dict[int, str | None]:
        return dict(self.image_rows(ordinals, columns="ordinal, caption"))

    def save(self, state: dict) -> None:
        """Commit the image spill, then replace state.pt atomically."""
        try:
            self.db.commit()
            partial = self.state_file.with_suffix(".partial")
            with open(partial, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            partial.replace(self.state_file)
        except (OSError, RuntimeError, sqlite3.Error) as error:
            raise WorkDirError(f"cannot write checkpoint in {self.path}: {_explain(error, self.path)}") from error

    def prune_images(self, keep: set[int]) -> None:
        """Forget spilled images that no example list references any more."""
        try:
            present = [row[0] for row in self.db.execute("SELECT ordinal FROM images")]
            self.db.executemany("DELETE FROM images WHERE ordinal = ?", [(o,) for o in present if o not in keep])
            self.db.commit()
        except sqlite3.Error as error:
            raise WorkDirError(f"cannot update {self.path / 'images.sqlite'}: {error}") from error

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

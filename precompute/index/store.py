"""Writes the feature index: all SQL that writes it lives here (docs/schema.md).

The index is built in ``<out>.partial`` and renamed over ``<out>`` only by
`IndexWriter.finish`, so ``--out`` never holds a half-written index and a
previous index stays untouched until the new one is complete.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import duckdb
import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

DDL = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value JSON);
CREATE TABLE layers (
    layer INTEGER PRIMARY KEY, sae_file VARCHAR, checkpoint BIGINT,
    d_in INTEGER, n_features INTEGER, k INTEGER, n_images BIGINT, n_tokens BIGINT,
    mse DOUBLE, explained_variance DOUBLE, mse_raw DOUBLE, explained_variance_raw DOUBLE,
    l0 DOUBLE, dead_fraction DOUBLE, active_fraction DOUBLE, nonpositive_kept_fraction DOUBLE,
    mse_by_position DOUBLE[], histogram_edges DOUBLE[]
);
CREATE TABLE features (
    layer INTEGER, feature INTEGER,
    n_fired_tokens BIGINT, n_fired_images BIGINT, n_fired_cls BIGINT,
    frequency DOUBLE, image_frequency DOUBLE, cls_frequency DOUBLE,
    mean_activation DOUBLE, max_activation DOUBLE,
    histogram INTEGER[], position_mean FLOAT[],
    label_terms VARCHAR[], label VARCHAR,
    similar_features INTEGER[], similar_cosines FLOAT[]
);
CREATE TABLE examples (
    layer INTEGER, feature INTEGER, kind VARCHAR, band TINYINT, rank INTEGER,
    image_id INTEGER, activation FLOAT, cls_activation FLOAT,
    heatmap_scale FLOAT, heatmap BLOB
);
CREATE TABLE images (
    image_id INTEGER PRIMARY KEY, source VARCHAR, key VARCHAR, url VARCHAR,
    caption VARCHAR, width INTEGER, height INTEGER, thumbnail BLOB
);
"""

TABLE_COLUMNS = {
    "features": [
        "layer", "feature", "n_fired_tokens", "n_fired_images", "n_fired_cls", "frequency",
        "image_frequency", "cls_frequency", "mean_activation", "max_activation", "histogram",
        "position_mean", "label_terms", "label", "similar_features", "similar_cosines",
    ],
    "examples": [
        "layer", "feature", "kind", "band", "rank", "image_id", "activation", "cls_activation",
        "heatmap_scale", "heatmap",
    ],
    "images": ["image_id", "source", "key", "url", "caption", "width", "height", "thumbnail"],
}


class IndexWriteError(RuntimeError):
    """The index could not be written (disk full, bad path, ...); --out is untouched."""


def list_column(rows_by_width: np.ndarray) -> pa.Array:
    """A 2-D numpy array [n, w] as an Arrow list column of n lists of w values."""
    n, width = rows_by_width.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(rows_by_width).reshape(-1)))


def blob_column(rows_by_width: np.ndarray) -> pa.Array:
    """A 2-D uint8 array [n, w] as an Arrow binary column of n w-byte blobs."""
    n, width = rows_by_width.shape
    data = pa.py_buffer(np.ascontiguousarray(rows_by_width, dtype=np.uint8).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, data]).cast(pa.binary())


def _as_arrow(value) -> pa.Array:
    if isinstance(value, pa.Array | pa.ChunkedArray):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 2:
        return list_column(value)
    return pa.array(value)


class IndexWriter:
    """Builds one index file; nothing appears at `out` until `finish()`."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            for stale in (self.partial, self.partial.with_name(self.partial.name + ".wal")):
                stale.unlink(missing_ok=True)
            self.con = duckdb.connect(str(self.partial))
            self.con.execute(DDL)
        except (OSError, duckdb.Error) as error:
            raise IndexWriteError(f"cannot create index {self.partial}: {error}") from error
        self.index_id = uuid.uuid4().hex[:16]
        self.put_meta(schema_version=SCHEMA_VERSION, index_id=self.index_id)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abandon()

    def _run(self, sql: str, params=None) -> None:
        try:
            self.con.execute(sql, params)
        except (OSError, duckdb.Error) as error:
            raise IndexWriteError(f"writing {self.partial} failed: {error}") from error

    def put_meta(self, **items) -> None:
        for key, value in items.items():
            self._run("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])

    def add_layer(self, row: Mapping) -> None:
        columns = list(row)
        placeholders = ", ".join("?" for _ in columns)
        self._run(f"INSERT INTO layers ({', '.join(columns)}) VALUES ({placeholders})", list(row.values()))

    def add_rows(self, table: str, columns: Mapping) -> None:
        """Bulk insert column arrays (2-D numpy arrays become list columns)."""
        expected = TABLE_COLUMNS[table]
        if sorted(columns) != sorted(expected):
            raise ValueError(f"{table}: columns {sorted(columns)} do not match the schema {sorted(expected)}")
        batch = pa.table({name: _as_arrow(columns[name]) for name in expected})
        self.con.register("incoming_batch", batch)
        try:
            self._run(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_batch")
        finally:
            self.con.unregister("incoming_batch")

    def finish(self) -> Path:
        """Stamp completion, flush, and rename the file over `out` atomically."""
        self.put_meta(created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        try:
            self.con.execute("CHECKPOINT")
            self.con.close()
            with open(self.partial, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(self.partial, self.out)
        except (OSError, duckdb.Error) as error:
            self.abandon()
            raise IndexWriteError(f"finishing {self.out} failed: {error}") from error
        return self.out

    def abandon(self) -> None:
        """Close and delete the partial file; `out` is left as it was."""
        try:
            self.con.close()
        except duckdb.Error:
            pass
        for leftover in (self.partial, self.partial.with_name(self.partial.name + ".wal")):
            leftover.unlink(missing_ok=True)

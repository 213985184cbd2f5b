"""Writes the feature index: all SQL that writes it lives here; its format is `schema.py` (docs/schema.md).

The index is built in ``<out>.partial`` and renamed over ``<out>`` only by
`IndexWriter.finish`, after the same check the server runs at start, so ``--out``
never holds a half-written or inconsistent index and a previous index stays
untouched until the new one is complete. The writer stamps the schema version,
index id, software versions and completion time itself.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from clipscope_explorer.precompute.index.check import IndexCheckError, check_index_file
from clipscope_explorer.precompute.index.schema import (
    META,
    SCHEMA_MINOR,
    SCHEMA_VERSION,
    TABLES,
    VERSIONED_PACKAGES,
    ddl,
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


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


def vector_column(vectors: np.ndarray) -> pa.Array:
    """Vectors [n, d] as an Arrow binary column of little-endian float16 blobs (2 d bytes each); a row
    holding a NaN (no vector) becomes NULL."""
    vectors = np.asarray(vectors)
    missing = np.isnan(vectors).any(axis=1) if len(vectors) else np.zeros(0, bool)
    blobs = blob_column(np.ascontiguousarray(np.nan_to_num(vectors).astype("<f2")).view(np.uint8))
    return pa.compute.if_else(pa.array(missing), pa.scalar(None, pa.binary()), blobs)


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
            self.con.execute(ddl())
        except (OSError, duckdb.Error) as error:
            raise IndexWriteError(f"cannot create index {self.partial}: {error}") from error
        self.index_id = uuid.uuid4().hex[:16]
        self.put_meta(
            schema_version=SCHEMA_VERSION,
            schema_minor=SCHEMA_MINOR,
            index_id=self.index_id,
            versions={package: _version(package) for package in VERSIONED_PACKAGES},
        )

    def __enter__(self) -> IndexWriter:
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
        """Set meta keys; a key the schema does not define, or a value not of its type, is a ValueError."""
        for key, value in items.items():
            if key not in META:
                raise ValueError(f"meta.{key} is not in the index schema (precompute/index/schema.py)")
            problem = META[key].type.check(value, strict=True)
            if problem:
                raise ValueError(f"meta.{key}: {problem}")
            self._run("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])

    def add_layer(self, row: Mapping) -> None:
        self._check_columns("layers", row)
        columns = list(row)
        placeholders = ", ".join("?" for _ in columns)
        self._run(f"INSERT INTO layers ({', '.join(columns)}) VALUES ({placeholders})", list(row.values()))

    def add_rows(self, table: str, columns: Mapping) -> None:
        """Bulk insert column arrays (2-D numpy arrays become list columns)."""
        self._check_columns(table, columns)
        expected = TABLES[table].names
        batch = pa.table({name: _as_arrow(columns[name]) for name in expected})
        self.con.register("incoming_batch", batch)
        try:
            self._run(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_batch")
        finally:
            self.con.unregister("incoming_batch")

    @staticmethod
    def _check_columns(table: str, columns: Mapping) -> None:
        expected = TABLES[table].names
        if sorted(columns) != sorted(expected):
            raise ValueError(f"{table}: columns {sorted(columns)} do not match the schema {sorted(expected)}")

    def delete_rows(self, table: str, where: str, params: list) -> None:
        """Delete the rows of `table` matching `where` (results an update replaces)."""
        if table not in TABLES:
            raise ValueError(f"{table} is not a table of the index schema")
        self._run(f"DELETE FROM {table} WHERE {where}", params)

    def stamp(self) -> None:
        self.put_meta(created_at=datetime.now(UTC).isoformat(timespec="seconds"))

    def finish(self) -> Path:
        """Stamp completion, check the index as a reader would, flush, and rename it over `out` atomically."""
        self.stamp()
        try:
            check_index_file(self.con, str(self.out), thorough=True)
        except IndexCheckError as error:
            self.abandon()
            raise IndexWriteError(f"not writing an index that the explorer would refuse: {error}") from error
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
            if hasattr(self, "con"):
                self.con.close()
        except duckdb.Error:
            pass
        for leftover in (self.partial, self.partial.with_name(self.partial.name + ".wal")):
            leftover.unlink(missing_ok=True)


class IndexUpdater(IndexWriter):
    """Adds to a built index: a copy of `source` in ``<out>.partial``, given the tables of this schema version
    it lacks, renamed over `out` (which may be `source`) by `finish()` as a new index is. A server keeps
    serving the file it opened; its workers pick up the new one when restarted (docs/OPERATIONS.md). The
    index id stays: the images and vectors are the same, so image URLs and search caches stay valid."""

    def __init__(self, source: str | Path, out: str | Path, tables: tuple[str, ...]):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        try:
            for stale in (self.partial, self.partial.with_name(self.partial.name + ".wal")):
                stale.unlink(missing_ok=True)
            shutil.copyfile(source, self.partial)
            self.con = duckdb.connect(str(self.partial))
            present = {row[0] for row in self.con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
            for statement in ddl().splitlines():
                name = statement.split()[2]
                if name in tables and name not in present:
                    self.con.execute(statement)
        except (OSError, duckdb.Error) as error:
            self.abandon()
            raise IndexWriteError(f"cannot copy {source} to {self.partial}: {error}") from error
        minor = self.con.execute("SELECT value FROM meta WHERE key = 'schema_minor'").fetchall()
        needed = max(TABLES[name].since for name in tables)
        if not minor or json.loads(minor[0][0]) < needed:
            self.put_meta(schema_minor=needed)

    def stamp(self) -> None:
        pass  # created_at stays the build's

"""The files of an export: Parquet and JSONL writers, and the staging that makes an export all or nothing.

Each table is written under a temporary name in the output folder (`.{file}.{random}.partial`); `commit`
gives every table its final name only once all are complete, and writes `dataset_info.json` last, so a
folder that has one holds a whole export. On any failure (a full disk, an unreadable index) the temporary
files are removed and nothing under a final name has changed.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

FORMATS = ("parquet", "jsonl")
INFO = "dataset_info.json"
PARTIAL = ".partial"
TABLES = ("layers", "features", "examples", "images")
EXPORT_NAMES = {f"{table}.{ext}" for table in TABLES for ext in FORMATS} | {INFO}


class ExportError(ValueError):
    """The export cannot be made; the message is one line naming the file or the flag."""


def check_folder(out: Path, overwrite: bool) -> None:
    """`out` may receive an export: a folder that does not exist yet, is empty, or may be overwritten."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"argument --out: {out} is a file, not a folder")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise ExportError(f"argument --out: {out} is not empty (add --overwrite to replace an export in it)")


class ParquetSink:
    """One Parquet file, written a batch (one row group) at a time."""

    def __init__(self, path: Path):
        self.path, self.writer, self.schema = path, None, None

    def write(self, batch: pa.Table | pa.RecordBatch) -> None:
        if self.writer is None:
            self.schema = batch.schema
            self.writer = pq.ParquetWriter(self.path, batch.schema, compression="zstd")
        if batch.num_rows:
            self.writer.write_table(pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def discard(self) -> None:
        try:
            self.close()
        except Exception:  # the file is about to be removed: its own error is not the one to report
            pass


class JsonlSink:
    """One JSON object per line, a batch at a time (DuckDB's `to_json`). Binary values are base64 and 32-bit
    floats are written in their shortest decimal form, which reads back to the same float32."""

    def __init__(self, path: Path):
        self.path, self.schema = path, None
        self.file = open(path, "w", encoding="utf-8", newline="\n")
        self.con = duckdb.connect()

    def _json_ready(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        columns = {}
        for field, column in zip(batch.schema, batch.columns):
            if pa.types.is_float32(field.type):
                column = column.cast(pa.string()).cast(pa.float64())
            elif pa.types.is_list(field.type) and pa.types.is_float32(field.type.value_type):
                column = column.cast(pa.list_(pa.string())).cast(pa.list_(pa.float64()))
            columns[field.name] = column
        return pa.table(columns)

    def write(self, batch: pa.Table | pa.RecordBatch) -> None:
        self.schema = self.schema or batch.schema
        if not batch.num_rows:
            return
        names = [f.name for f in batch.schema]
        binary = {f.name for f in batch.schema if pa.types.is_binary(f.type)}
        select = ", ".join(f'to_base64("{n}") AS "{n}"' if n in binary else f'"{n}"' for n in names)
        self.con.register("batch", self._json_ready(batch))
        try:
            lines = self.con.sql(f"SELECT to_json(t)::VARCHAR FROM (SELECT {select} FROM batch) t").fetchall()
        finally:
            self.con.unregister("batch")
        self.file.write("".join(line + "\n" for (line,) in lines))

    def close(self) -> None:
        self.con.close()
        self.file.close()

    def discard(self) -> None:
        try:
            self.close()
        except Exception:
            pass


SINKS = {"parquet": ParquetSink, "jsonl": JsonlSink}


@dataclass(frozen=True)
class Written:
    file: str
    rows: int
    schema: pa.Schema


class Staging:
    """Tables written under temporary names in `out`, renamed into place together by `commit`."""

    def __init__(self, out: Path, format: str, progress: bool):
        self.out, self.format, self.progress = out, format, progress
        self.made = False  # whether `out` was made here (and is removed again if the export fails)
        self.temps: list[Path] = []
        self.pending: dict[str, Path] = {}  # final name -> its temporary file
        self.written: dict[str, Written] = {}

    def __enter__(self) -> Staging:
        try:
            self.made = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ExportError(f"argument --out: cannot make {self.out} ({error.strerror or error})") from error
        return self

    def __exit__(self, kind, error, trace) -> None:
        for temp in self.temps:
            temp.unlink(missing_ok=True)
        if kind is not None and self.made:
            try:
                self.out.rmdir()
            except OSError:  # something else was written there meanwhile: leave it
                pass

    def _temp(self, final: str) -> Path:
        temp = self.out / f".{final}.{secrets.token_hex(6)}{PARTIAL}"
        self.temps.append(temp)
        return temp

    def write(self, table: str, batches, total: int) -> None:
        """Write `table` from `batches` (Arrow tables or record batches); `total` rows are expected (progress)."""
        final = f"{table}.{self.format}"
        temp = self._temp(final)
        sink, rows = None, 0
        bar = tqdm(
            total=total,
            desc=table,
            unit=" rows",
            unit_scale=total >= 100_000,
            disable=not self.progress,
            file=sys.stderr,
        )
        try:
            sink = SINKS[self.format](temp)
            for batch in batches:
                sink.write(batch)
                rows += batch.num_rows
                bar.update(batch.num_rows)
            sink.close()
        except BaseException as error:
            if sink is not None:
                sink.discard()
            if isinstance(error, OSError):
                raise ExportError(f"cannot write {self.out / final}: {error.strerror or error}") from error
            raise
        finally:
            bar.close()
        self.pending[final] = temp
        self.written[table] = Written(final, rows, sink.schema)

    def commit(self, info: dict) -> Path:
        """Put every table under its final name, removing what an earlier export left here, then write
        `dataset_info.json`; return its path."""
        try:
            (self.out / INFO).unlink(missing_ok=True)
            ours = set(self.pending) | {t.name for t in self.temps}
            for path in self.out.iterdir():
                stale = path.name in EXPORT_NAMES or (path.name.startswith(".") and path.name.endswith(PARTIAL))
                if stale and path.name not in ours:
                    path.unlink()
            for final, temp in self.pending.items():
                os.replace(temp, self.out / final)
            temp = self._temp(INFO)
            temp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(temp, self.out / INFO)
        except OSError as error:
            raise ExportError(f"cannot write in {self.out}: {error.strerror or error}") from error
        return self.out / INFO

"""Opening an index file: a read-only DuckDB connection, and the check that it is a complete, consistent
index of a schema version this explorer reads (`precompute/index/check.py` against
`precompute/index/schema.py`, docs/schema.md). Every failure is an `IndexOpenError` whose one-line
message names the file."""

from __future__ import annotations

from pathlib import Path

import duckdb

from clipscope_explorer.precompute.index.check import IndexCheckError, check_index_file, first_line


class IndexOpenError(RuntimeError):
    """The index cannot be served; the message is one line naming the file."""


def connect(path: Path, threads: int = 1, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    if not path.exists():
        raise IndexOpenError(f"index not found: {path}")
    if not path.is_file():
        raise IndexOpenError(f"index is not a file: {path}")
    config: dict[str, object] = {"threads": threads}
    if memory_limit:
        config["memory_limit"] = memory_limit
    try:
        return duckdb.connect(str(path), read_only=True, config=config)
    except duckdb.Error as error:
        raise IndexOpenError(f"cannot open {path} as a DuckDB index: {first_line(error)}") from error


def validate(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[dict, dict[int, dict]]:
    """Check the file is a servable index (everything the pages rely on); return (meta, layers)."""
    try:
        return check_index_file(con, str(path))
    except IndexCheckError as error:
        raise IndexOpenError(str(error)) from error


def check_index(path: str | Path) -> dict:
    """The index's meta; raise `IndexOpenError` (one line) unless `path` is a servable index."""
    path = Path(path)
    con = connect(path)
    try:
        return validate(con, path)[0]
    finally:
        con.close()

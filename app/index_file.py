"""Opening an index file: a read-only DuckDB connection, and the check that it is a complete index of
the schema version this explorer reads (docs/schema.md). Every failure is an `IndexOpenError` whose
one-line message names the file."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

READS_SCHEMA_VERSION = 1

REQUIRED_COLUMNS = {
    "meta": {"key", "value"},
    "layers": {"layer", "sae_file", "checkpoint", "d_in", "n_features", "k", "n_images", "n_tokens", "mse",
               "explained_variance", "mse_raw", "explained_variance_raw", "l0", "dead_fraction",
               "active_fraction", "nonpositive_kept_fraction", "mse_by_position", "histogram_edges"},
    "features": {"layer", "feature", "n_fired_tokens", "n_fired_images", "n_fired_cls", "frequency",
                 "image_frequency", "cls_frequency", "mean_activation", "max_activation", "histogram",
                 "position_mean", "label_terms", "label", "similar_features", "similar_cosines"},
    "examples": {"layer", "feature", "kind", "band", "rank", "image_id", "activation", "cls_activation",
                 "heatmap_scale", "heatmap"},
    "images": {"image_id", "source", "key", "url", "caption", "width", "height", "thumbnail"},
}


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
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise IndexOpenError(f"cannot open {path} as a DuckDB index: {first_line}") from error


def validate(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[dict, dict[int, dict]]:
    """Check the file is a complete index of a known schema; return (meta, layers)."""
    try:
        found: dict[str, set[str]] = {}
        for table, column in con.execute(
                "SELECT table_name, column_name FROM duckdb_columns() "
                "WHERE database_name = current_database() AND schema_name = 'main'").fetchall():
            found.setdefault(table, set()).add(column)
        if "meta" not in found:
            raise IndexOpenError(f"{path} is not a CLIP-Scope index (it has no meta table)")
        meta = {key: json.loads(value) for key, value in con.execute("SELECT key, value FROM meta").fetchall()}
        version = meta.get("schema_version")
        if version is None:
            raise IndexOpenError(f"{path} is not a CLIP-Scope index (meta has no schema_version)")
        if version != READS_SCHEMA_VERSION:
            raise IndexOpenError(f"{path} has index schema version {version}; "
                                 f"this explorer reads schema version {READS_SCHEMA_VERSION}")
        missing = sorted(f"{table}.{column}" for table, columns in REQUIRED_COLUMNS.items()
                         for column in columns - found.get(table, set()))
        if missing:
            raise IndexOpenError(f"{path} does not match schema version {READS_SCHEMA_VERSION}: "
                                 f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if "created_at" not in meta or "index_id" not in meta:
            raise IndexOpenError(f"{path} is an incomplete index (meta has no created_at/index_id)")
        cursor = con.execute("SELECT * FROM layers ORDER BY layer")
        names = [d[0] for d in cursor.description]
        layers = {row[0]: dict(zip(names, row)) for row in cursor.fetchall()}
    except duckdb.Error as error:
        raise IndexOpenError(f"cannot read {path} as an index: {str(error).strip().splitlines()[0]}") from error
    except (ValueError, TypeError) as error:
        raise IndexOpenError(f"{path} has malformed metadata: {error}") from error
    if not layers:
        raise IndexOpenError(f"{path} holds no layers")
    return meta, layers


def check_index(path: str | Path) -> None:
    """Raise `IndexOpenError` (one line) unless `path` is a servable index."""
    path = Path(path)
    con = connect(path)
    try:
        validate(con, path)
    finally:
        con.close()

"""All SQL that reads the index (format: docs/schema.md; any divergence is a bug).

`open_index` validates the file (`app/index_file.py`) and returns an `Index`: one read-only DuckDB
connection, a cursor per server thread (DuckDB connections must not be shared
across threads), and the small tables (`meta`, `layers`) held in memory. Every
query is parameterised; the only identifiers put into SQL text are sort keys
looked up in `SORT_COLUMNS` / `SORT_ORDERS`. Lists are bounded by the caller's
limit (callers ask for n + 1 rows to detect truncation).

The index is immutable, so anything derived from it may be cached for the
life of the process (image captions, each feature's first top images, the
per-layer density histogram).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from clipscope_explorer.app.checkpoint_queries import CheckpointQueries
from clipscope_explorer.app.faithfulness_queries import FaithfulnessQueries
from clipscope_explorer.app.index_file import IndexOpenError, connect, validate
from clipscope_explorer.app.lineage_queries import LineageQueries
from clipscope_explorer.app.public_names import PublicNames
from clipscope_explorer.app.sort_eval_queries import SortEvalQueries
from clipscope_explorer.precompute.index.schema import select_list

# Column lists are checked against the index schema (precompute/index/schema.py) when this module loads.
SORT_COLUMNS = {
    name: select_list("features", name)
    for name in ("feature", "frequency", "image_frequency", "cls_frequency", "max_activation", "mean_activation")
} | {
    "sort_eval": "sort_eval",  # the feature's sort-evaluation score (`SortEvalQueries.scores_source`)
    "faithfulness": "faithfulness",  # its occlusion faithfulness (`FaithfulnessQueries.with_faithfulness`)
}
SORT_ORDERS = {"asc": "ASC", "desc": "DESC"}

FEATURE_COLUMNS = select_list(
    "features",
    "feature",
    "n_fired_tokens",
    "n_fired_images",
    "n_fired_cls",
    "frequency",
    "image_frequency",
    "cls_frequency",
    "mean_activation",
    "max_activation",
    "histogram",
    "label_terms",
    "label",
    "similar_features",
    "similar_cosines",
)
SUMMARY_COLUMNS = select_list(
    "features", "layer", "feature", "label", "label_terms", "frequency", "image_frequency", "max_activation"
)
EXAMPLE_COLUMNS = select_list("examples", "kind", "band", "rank", "image_id", "activation", "cls_activation")
IMAGE_COLUMNS = select_list("images", "image_id", "source", "key", "url", "caption", "width", "height")
ZERO_SHOT_COLUMNS = select_list("features", "zero_shot_terms", "zero_shot_scores", "zero_shot_margins")
SAMPLE_COLUMNS = select_list("samples", "image_id", "source", "key", "url", "caption", "width", "height")
TOP_IMAGES = 4  # top images per feature kept in memory (`Index.top_images`)
# The unit vectors search by meaning scans (schema 1.2): table, float16 blob column, id columns (rows in id order).
VECTOR_COLUMNS = {
    "images": ("samples", select_list("samples", "embedding"), select_list("samples", "image_id")),
    "features": ("features", select_list("features", "prototype"), select_list("features", "layer", "feature")),
}


class RowsOutOfOrder(ValueError):
    """A table's rows are not stored in the order of its ids."""


def _packed(keys: np.ndarray) -> np.ndarray:
    """Id rows [n, 1 or 2] of non-negative int32s as one int64 per row, ordered as the rows."""
    keys = keys.astype(np.int64)
    return keys[:, 0] if keys.shape[1] == 1 else (keys[:, 0] << 32) | keys[:, 1]


def like_pattern(word: str) -> str:
    """`word` as an ILIKE substring pattern, its wildcards escaped (ESCAPE '\\')."""
    escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def dequantise(scale: float, heatmap: bytes) -> np.ndarray:
    """A stored heatmap (one byte per patch) in activation units, float32."""
    return np.frombuffer(heatmap, dtype=np.uint8).astype(np.float32) * np.float32(scale)


def open_index(
    path: str | Path,
    threads: int = 1,
    memory_limit: str | None = None,
    image_cache_size: int = 100_000,
    show_local_paths: bool = False,
) -> Index:
    path = Path(path)
    con = connect(path, threads, memory_limit)
    try:
        meta, layers = validate(con, path)
    except IndexOpenError:
        con.close()
        raise
    return Index(path, con, meta, layers, image_cache_size, PublicNames(show_local_paths))


class Index(SortEvalQueries, CheckpointQueries, LineageQueries, FaithfulnessQueries):
    """A validated, read-only index. Thread-safe: each thread gets its own cursor."""

    def __init__(
        self,
        path: Path,
        con: duckdb.DuckDBPyConnection,
        meta: dict,
        layers: dict[int, dict],
        image_cache_size: int,
        names: PublicNames | None = None,
    ):
        self.path = path
        self.names = names or PublicNames()  # how pages name the local files the index records (app/public_names.py)
        self.meta = meta
        self.layers = layers
        self.index_id = str(meta["index_id"])
        grid = meta.get("grid") or [16, 16]
        self.grid = (int(grid[0]), int(grid[1]))
        self._con = con
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self._image_cache: dict[int, dict] = {}
        self._image_cache_size = image_cache_size
        self._derived: dict[tuple, object] = {}

    # -- plumbing -----------------------------------------------------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._con.cursor()
            self._local.cursor = cursor
            with self._lock:
                self._cursors.append(cursor)
        return cursor

    def _dicts(self, sql: str, params) -> list[dict]:
        cursor = self._cursor().execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def _cached(self, key: tuple, build):
        value = self._derived.get(key)
        if value is None:
            value = build()
            self._derived[key] = value
        return value

    def close(self) -> None:
        # The closed cursors stay referenced here until the Index itself goes. Otherwise the last reference
        # is a server thread's local, freed when that thread exits; if the interpreter is shutting down by
        # then, DuckDB's destructor cannot retake the GIL and the process aborts (duckdb/duckdb#13904).
        with self._lock:
            for cursor in self._cursors:
                cursor.close()
        self._con.close()

    def has_feature(self, layer: int, feature: int) -> bool:
        return layer in self.layers and 0 <= feature < self.layers[layer]["n_features"]

    def has(self, table: str, column: str | None = None) -> bool:
        """Whether the file has `table` (and its `column`): what a later schema minor added (`needed=False`
        in precompute/index/schema.py) may be missing from an older index."""
        catalogue = self._cached(("catalogue",), self._catalogue)
        return table in catalogue and (column is None or column in catalogue[table])

    def _catalogue(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for table, column in (
            self._cursor()
            .execute(
                "SELECT table_name, column_name FROM duckdb_columns() "
                "WHERE database_name = current_database() AND schema_name = 'main'"
            )
            .fetchall()
        ):
            found.setdefault(table, set()).add(column)
        return found

    # -- features -----------------------------------------------------------
    def feature(self, layer: int, feature: int) -> dict | None:
        """A feature's row; with its zero-shot labels (`ZERO_SHOT_COLUMNS`) when the index has them."""
        columns = FEATURE_COLUMNS + (f", {ZERO_SHOT_COLUMNS}" if self.has("features", "zero_shot_terms") else "")
        rows = self._dicts(f"SELECT {columns} FROM features WHERE layer = ? AND feature = ?", [layer, feature])
        return rows[0] if rows else None

    def position_mean(self, layer: int, feature: int) -> list[float] | None:
        row = (
            self._cursor()
            .execute("SELECT position_mean FROM features WHERE layer = ? AND feature = ?", [layer, feature])
            .fetchone()
        )
        return row[0] if row else None

    def summaries(self, layer: int, features: list[int]) -> dict[int, dict]:
        """Label and headline numbers of some features of one layer, by feature (from a per-layer cache)."""
        table = self._summary_table(layer)
        names = SUMMARY_COLUMNS.split(", ")
        return {
            int(f): {name: table[name][f] for name in names}
            for f in features
            if 0 <= f < self.layers[layer]["n_features"]
        }

    def _summary_table(self, layer: int) -> dict[str, list]:
        """SUMMARY_COLUMNS of every feature of `layer`, as columns indexed by feature; cached.

        Similar-feature cards need these for ten features per page; one columnar
        scan per layer replaces a query per page (the index never changes).
        """

        def build() -> dict[str, list]:
            rows = (
                self._cursor()
                .execute(f"SELECT {SUMMARY_COLUMNS} FROM features WHERE layer = ? ORDER BY feature", [layer])
                .fetchall()
            )
            return {name: list(values) for name, values in zip(SUMMARY_COLUMNS.split(", "), zip(*rows))}

        return self._cached(("summaries", layer), build)

    def warm_images(self) -> None:
        """Fill the image cache (up to its size) in one scan, so pages need no image query."""
        if not self._image_cache_size:
            return
        rows = self._dicts(f"SELECT {IMAGE_COLUMNS} FROM images ORDER BY image_id LIMIT ?", [self._image_cache_size])
        with self._lock:
            for row in rows:
                self._image_cache.setdefault(row["image_id"], row)

    def examples(self, layer: int, feature: int, heatmaps: bool) -> list[dict]:
        """All example rows of a feature (top, then bands), ordered by band and rank."""
        columns = EXAMPLE_COLUMNS + (", heatmap_scale, heatmap" if heatmaps else "")
        rows = self._dicts(f"SELECT {columns} FROM examples WHERE layer = ? AND feature = ?", [layer, feature])
        rows.sort(key=lambda r: (r["band"], r["rank"]))
        return rows

    def example(self, layer: int, feature: int, image_id: int) -> dict | None:
        """One example with its heatmap and the feature's max_activation."""
        rows = self._dicts(
            f"SELECT {', '.join('e.' + c.strip() for c in EXAMPLE_COLUMNS.split(','))}, e.heatmap_scale, "
            "e.heatmap, f.max_activation FROM examples e, features f WHERE e.layer = $layer AND "
            "e.feature = $feature AND e.image_id = $image AND f.layer = $layer AND f.feature = $feature "
            "ORDER BY e.band LIMIT 1",
            {"layer": layer, "feature": feature, "image": image_id},
        )
        return rows[0] if rows else None

    def top_images(self, layer: int) -> np.ndarray:
        """[n_features, TOP_IMAGES] image_ids of each feature's first top examples by rank (-1: none); cached.
        Upload results show these for each feature they list, and feature cards show the first."""

        def build() -> np.ndarray:
            table = np.full((self.layers[layer]["n_features"], TOP_IMAGES), -1, dtype=np.int32)
            rows = (
                self._cursor()
                .execute(
                    "SELECT feature, rank, image_id FROM examples "
                    "WHERE layer = ? AND kind = 'top' AND rank BETWEEN 1 AND ?",
                    [layer, TOP_IMAGES],
                )
                .fetchnumpy()
            )
            table[np.asarray(rows["feature"], dtype=np.int64), np.asarray(rows["rank"], dtype=np.int64) - 1] = (
                np.asarray(rows["image_id"], dtype=np.int32)
            )
            return table

        return self._cached(("top_images", layer), build)

    def first_top_images(self, layer: int) -> np.ndarray:
        """Per feature of `layer`, the image_id of its top example (-1 if none)."""
        return self.top_images(layer)[:, 0]

    def alive_features(self, layer: int) -> np.ndarray:
        """Features of `layer` that fire at least once; cached."""
        return self._cached(
            ("alive", layer),
            lambda: np.asarray(
                self._cursor()
                .execute(
                    "SELECT feature FROM features WHERE layer = ? AND n_fired_tokens > 0 ORDER BY feature", [layer]
                )
                .fetchnumpy()["feature"],
                dtype=np.int64,
            ),
        )

    def density(self, layer: int) -> dict[int | None, int]:
        """Feature counts per quarter-decade of log10(frequency); None counts dead ones."""
        return self._cached(
            ("density", layer),
            lambda: dict(
                self._cursor()
                .execute(
                    "SELECT CASE WHEN frequency > 0 THEN floor(log10(frequency) * 4)::INTEGER END AS bin, count(*) "
                    "FROM features WHERE layer = ? GROUP BY bin",
                    [layer],
                )
                .fetchall()
            ),
        )

    def feature_table(
        self,
        layer: int,
        sort: str,
        order: str,
        min_freq: float | None,
        max_freq: float | None,
        words: list[str],
        offset: int,
        limit: int,
        min_sort_eval: float | None = None,
        min_faithfulness: float | None = None,
    ) -> tuple[list[dict], int]:
        """One page of a layer's features (rows, total matching), each with its sort-evaluation score
        (`sort_eval`, `sort_eval_trials`) and faithfulness (`faithfulness`), null without one; sort keys
        whitelisted."""
        column, direction = SORT_COLUMNS[sort], SORT_ORDERS[order]
        source, scores = self.scores_source(layer)
        source = self.with_faithfulness(layer, source)
        where, params = ["layer = $layer"], {"layer": layer, **scores}
        if min_sort_eval is not None:
            where.append("sort_eval >= $min_sort_eval")
            params["min_sort_eval"] = min_sort_eval
        if min_faithfulness is not None:
            where.append("faithfulness >= $min_faithfulness")
            params["min_faithfulness"] = min_faithfulness
        if min_freq is not None:
            where.append("frequency > $min_freq")
            params["min_freq"] = min_freq
        if max_freq is not None:
            where.append("frequency <= $max_freq")
            params["max_freq"] = max_freq
        for i, word in enumerate(words):
            where.append(f"label ILIKE $w{i} ESCAPE '\\'")
            params[f"w{i}"] = like_pattern(word)
        condition = " AND ".join(where)
        total = self._cursor().execute(f"SELECT count(*) FROM {source} WHERE {condition}", params).fetchone()[0]
        rows = self._dicts(
            f"SELECT {SUMMARY_COLUMNS}, cls_frequency, mean_activation, sort_eval, sort_eval_trials, faithfulness "
            f"FROM {source} WHERE {condition} "
            f"ORDER BY {column} {direction} NULLS LAST, feature LIMIT $limit OFFSET $offset",
            {**params, "limit": limit, "offset": offset},
        )
        return rows, total

    # -- search -------------------------------------------------------------
    def search_labels(self, words: list[str], layer: int | None, limit: int) -> list[dict]:
        """Features whose label terms, or zero-shot labels (schema 1.2), hold every word; `exact_terms`
        counts the terms of either kind equal to a word."""
        text, terms, extra = "label", "label_terms", ""
        if self.has("features", "zero_shot_terms"):
            text = "label || ' ' || array_to_string(zero_shot_terms, ' ')"
            terms, extra = "list_concat(label_terms, zero_shot_terms)", ", zero_shot_terms"
        where, params = [], {"terms": words, "limit": limit}
        for i, word in enumerate(words):
            where.append(f"{text} ILIKE $w{i} ESCAPE '\\'")
            params[f"w{i}"] = like_pattern(word)
        if layer is not None:
            where.append("layer = $layer")
            params["layer"] = layer
        return self._dicts(
            f"SELECT {SUMMARY_COLUMNS}{extra}, len(list_intersect({terms}, $terms)) AS exact_terms "
            f"FROM features WHERE {' AND '.join(where)} "
            "ORDER BY exact_terms DESC, image_frequency DESC, layer, feature LIMIT $limit",
            params,
        )

    def search_captions(self, words: list[str], layer: int | None, limit: int, max_images: int = 2000) -> list[dict]:
        """Features ranked by how many of their top images have captions holding every word."""
        where, params = [], {"limit": limit, "max_images": max_images}
        for i, word in enumerate(words):
            where.append(f"caption ILIKE $w{i} ESCAPE '\\'")
            params[f"w{i}"] = like_pattern(word)
        layer_filter = ""
        if layer is not None:
            layer_filter = "AND e.layer = $layer"
            params["layer"] = layer
        return self._dicts(
            "WITH hits AS (SELECT image_id FROM images WHERE "
            + " AND ".join(where)
            + " ORDER BY image_id LIMIT $max_images), "
            "matched AS (SELECT e.layer, e.feature, count(*) AS caption_matches FROM examples e "
            f"WHERE e.kind = 'top' AND e.image_id IN (SELECT image_id FROM hits) {layer_filter} GROUP BY ALL) "
            f"SELECT m.caption_matches, {', '.join('f.' + c.strip() for c in SUMMARY_COLUMNS.split(','))} "
            "FROM matched m JOIN features f ON f.layer = m.layer AND f.feature = m.feature "
            "ORDER BY m.caption_matches DESC, f.layer, f.feature LIMIT $limit",
            params,
        )

    # -- images -------------------------------------------------------------
    def images(self, image_ids: list[int]) -> dict[int, dict]:
        """Image rows (no thumbnail) by id; cached, first in first out."""
        cache = self._image_cache
        found: dict[int, dict] = {}
        missing = set()
        for image_id in image_ids:
            row = cache.get(image_id)  # atomic; eviction happens under the lock
            if row is None:
                missing.add(image_id)
            else:
                found[image_id] = row
        if missing:
            rows = self._dicts(f"SELECT {IMAGE_COLUMNS} FROM images WHERE image_id = ANY(?)", [sorted(missing)])
            with self._lock:
                for row in rows:
                    found[row["image_id"]] = row
                    if self._image_cache_size:
                        cache[row["image_id"]] = row
                while len(cache) > self._image_cache_size:
                    del cache[next(iter(cache))]
        return found

    def thumbnail(self, image_id: int) -> bytes | None:
        row = self._cursor().execute("SELECT thumbnail FROM images WHERE image_id = ?", [image_id]).fetchone()
        return row[0] if row else None

    def thumbnails(self, image_ids: list[int]) -> dict[int, bytes]:
        return dict(
            self._cursor()
            .execute("SELECT image_id, thumbnail FROM images WHERE image_id = ANY(?)", [list(image_ids)])
            .fetchall()
        )

    # -- sample images (schema 1.2: `samples`, `sample_codes`; absent from older indexes) --
    def sample(self, image_id: int) -> dict | None:
        """A sample image's row (without its embedding); None when there is none (or no `samples` table)."""
        if not self.has("samples"):
            return None
        rows = self._dicts(f"SELECT {SAMPLE_COLUMNS} FROM samples WHERE image_id = ?", [image_id])
        return rows[0] if rows else None

    def sample_codes(self, image_id: int) -> dict[int, tuple[list[int], list[float]]]:
        """The CLS token's kept latents of a sample image by layer: (indices, activations), as the SAE kept them."""
        if not self.has("sample_codes"):
            return {}
        rows = (
            self._cursor()
            .execute(
                "SELECT layer, indices, activations FROM sample_codes WHERE image_id = ? ORDER BY layer", [image_id]
            )
            .fetchall()
        )
        return {layer: (indices, activations) for layer, indices, activations in rows}

    def vocabulary(self) -> tuple[list[str], np.ndarray]:
        """The zero-shot vocabulary's terms (sorted) and their text embeddings as one [V, d] float16 matrix
        (schema 1.2; no terms when the index has none); cached. A blob of the wrong size is a ValueError."""

        def build() -> tuple[list[str], np.ndarray]:
            rows = self._cursor().execute("SELECT term, embedding FROM vocabulary ORDER BY term").fetchall()
            dim = len(rows[0][1]) // 2 if rows else 0
            bad = next((term for term, blob in rows if len(blob) != 2 * dim or not dim), None)
            if bad is not None:
                raise ValueError(f"vocabulary.embedding of {bad!r} is not {dim} float16 values")
            matrix = np.frombuffer(b"".join(blob for _, blob in rows), dtype="<f2").reshape(len(rows), dim)
            return [term for term, _ in rows], matrix

        if not self.has("vocabulary"):
            return [], np.zeros((0, 0), dtype="<f2")
        return self._cached(("vocabulary",), build)

    def image_examples(self, image_id: int, limit: int) -> list[dict]:
        """The examples that show an image (in any feature's top list or bands), by layer, band, rank and
        feature; at most `limit` rows."""
        return self._dicts(
            "SELECT layer, feature, kind, band, rank, activation FROM examples WHERE image_id = ? "
            "ORDER BY layer, band, rank, feature LIMIT ?",
            [image_id, limit],
        )

    # -- vectors for search by meaning (schema 1.2; app/meaning/) ------------
    def vector_count(self, kind: str) -> int:
        """How many rows of `kind` (`VECTOR_COLUMNS`) hold a vector."""
        table, column, _ = VECTOR_COLUMNS[kind]
        return self._cursor().execute(f"SELECT count(*) FROM {table} WHERE {column} IS NOT NULL").fetchall()[0][0]

    def vector_batches(
        self, kind: str, ordered: bool = False, rows: int = 16_384
    ) -> Iterator[tuple[np.ndarray, pa.Array]]:
        """The vectors of `kind` in id order, in batches of (ids [b, id columns] int32, float16 blobs). The
        writer stores rows in id order, so a plain scan gives that order (checked: `RowsOutOfOrder`);
        `ordered` sorts them instead, which sorts every blob."""
        table, column, ids = VECTOR_COLUMNS[kind]
        order = f" ORDER BY {ids}" if ordered else ""
        cursor = self._con.cursor()  # its own: the stream stays open between batches
        try:
            relation = cursor.sql(f"SELECT {ids}, {column} FROM {table} WHERE {column} IS NOT NULL{order}")
            reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_record_batch  # DuckDB 2 / 1
            last = None
            for batch in reader(rows):
                keys = np.stack([batch.column(i).to_numpy() for i in range(batch.num_columns - 1)], axis=1)
                if len(keys) == 0:
                    continue
                packed = _packed(keys)
                if np.any(np.diff(packed) <= 0) or (last is not None and packed[0] <= last):
                    raise RowsOutOfOrder(f"{table} rows are not stored in ({ids}) order")
                last = packed[-1]
                yield keys.astype(np.int32), batch.column(batch.num_columns - 1)
        finally:
            cursor.close()

    def samples_by_id(self, image_ids: list[int]) -> dict[int, dict]:
        """Sample image rows (without embeddings) by id; those without a row are left out."""
        if not image_ids or not self.has("samples"):
            return {}
        rows = self._dicts(f"SELECT {SAMPLE_COLUMNS} FROM samples WHERE image_id = ANY(?)", [list(image_ids)])
        return {row["image_id"]: row for row in rows}

"""`clipscope-explorer export`: an index as a dataset, one Parquet (or JSONL) file per table.

Tables (their columns and meanings: `export_info.COLUMNS`, written to `dataset_info.json`, and docs/API.md):
`layers`, `features`, `examples` (one row per image a feature shows, with the image's key and caption and,
with `heatmaps`, the per-patch heatmap exactly as the feature page's JSON gives it) and `images`.

The index is opened read-only and checked as `serve` checks it (`app/index_file.py`). Rows are read a chunk
of features at a time and written in batches, so memory stays bounded whatever the index size; examples come
sorted by layer, feature, band and rank (the feature page's order). Files are written under temporary names
in the output folder (`export_files.Staging`) and get their final names only once every table is complete,
`dataset_info.json` last; on any failure nothing is left under a final name. Bad input is an `ExportError`
(or `IndexOpenError`) whose one-line message names the file or the flag.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscope_explorer.app.index_file import IndexOpenError, connect, validate
from clipscope_explorer.app.pages.features import heatmap_values
from clipscope_explorer.app.public_names import public_name
from clipscope_explorer.export_files import FORMATS, ExportError, Staging, check_folder
from clipscope_explorer.export_info import dataset_info
from clipscope_explorer.precompute.index.check import first_line
from clipscope_explorer.precompute.index.schema import select_list

__all__ = ["ExportError", "ExportOptions", "FORMATS", "export", "heatmap_lists"]

LAYER_COLUMNS = select_list(
    "layers",
    *("layer", "sae_file", "checkpoint", "d_in", "n_features", "k", "n_images", "n_tokens", "mse"),
    *("explained_variance", "mse_raw", "explained_variance_raw", "l0", "dead_fraction", "active_fraction"),
    *("nonpositive_kept_fraction", "mse_by_position", "histogram_edges"),
)
FEATURE_COLUMNS = select_list(
    "features",
    *("layer", "feature", "n_fired_tokens", "n_fired_images", "n_fired_cls", "frequency", "image_frequency"),
    *("cls_frequency", "mean_activation", "max_activation", "histogram", "position_mean", "label_terms", "label"),
    *("similar_features", "similar_cosines"),
)
ZERO_SHOT_COLUMNS = select_list("features", "zero_shot_terms", "zero_shot_scores", "zero_shot_margins")
IMAGE_COLUMNS = select_list("images", "image_id", "source", "key", "url", "caption", "width", "height")
EXAMPLES_SQL = (
    "SELECT layer, feature, kind, rank, band, image_id, activation, cls_activation{heatmap} FROM examples "
    "WHERE layer = $layer AND feature BETWEEN $low AND $high ORDER BY feature, band, rank"
)
# The key and caption of the images a chunk of examples shows: a join built on those ids alone, whatever the
# number of images in the index.
IMAGE_TEXT_SQL = (
    "SELECT i.image_id, i.key, i.caption FROM (SELECT UNNEST($ids) AS image_id) e "
    "JOIN images i ON i.image_id = e.image_id"
)
INT32_MAX = 2**31 - 1
FEATURES_PER_READ = 4096  # feature rows per read (a few MB: each holds n_tokens position means)


@dataclass(frozen=True)
class ExportOptions:
    """What `export` writes: `features` is an inclusive (first, last) range of feature numbers; `layers`
    None means every layer of the index."""

    index: Path
    out: Path
    format: str = "parquet"
    layers: list[int] | None = None
    features: tuple[int, int] | None = None
    with_heatmaps: bool = False
    with_images: bool = False
    overwrite: bool = False
    progress: bool = True
    batch_rows: int = 16_384  # example rows per read and written batch (a Parquet row group)
    memory_limit: str = "256MB"  # DuckDB's buffer pool: what it may cache of the index while reading


def heatmap_lists(scales: np.ndarray, blobs: pa.Array) -> pa.Array:
    """A batch of stored heatmaps (one byte per patch, and each row's scale) as `list<double>`, value for value
    the feature page's `heatmap` (`app.pages.features.heatmap_values`: `dequantise`, then `rounded_list`),
    decoded for the whole batch at once; a batch of unequal lengths falls back to that function row by row."""
    buffers = blobs.buffers()
    width = np.int64 if pa.types.is_large_binary(blobs.type) else np.int32
    offsets = np.frombuffer(buffers[1], width)[blobs.offset : blobs.offset + len(blobs) + 1]
    lengths = np.diff(offsets)
    if len(blobs) == 0 or blobs.null_count or np.any(lengths != lengths[0]):
        rows = [heatmap_values(float(s), b.as_py()) for s, b in zip(scales, blobs)]
        return pa.array(rows, pa.list_(pa.float64()))
    n, patches = len(blobs), int(lengths[0])
    data = np.frombuffer(buffers[2], np.uint8)[offsets[0] : offsets[-1]].reshape(n, patches)
    values = (data.astype(np.float32) * np.asarray(scales, np.float32)[:, None]).astype(np.float64)
    peaks = values.max(axis=1) if patches else np.zeros(n)
    # rounded_list: to 7 significant digits of the row's peak (math.log10, as it takes it, for the same ceil)
    digits = np.array([max(0, 7 - math.ceil(math.log10(p))) if p > 0 else -1 for p in peaks.tolist()], np.int64)
    for d in np.unique(digits[digits >= 0]).tolist():
        rows = digits == d
        values[rows] = np.round(values[rows], d)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * patches)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: dict) -> pa.Table:
    relation = con.sql(sql, params=params)
    return (getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table)()  # DuckDB 2 / 1


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: dict) -> int:
    return con.execute(f"SELECT count(*) FROM ({sql})", params).fetchall()[0][0]


def _batches(con: duckdb.DuckDBPyConnection, sql: str, params: dict, rows: int) -> Iterator[pa.RecordBatch]:
    """The rows of `sql` streamed in batches (at least one, maybe empty, so the schema is known)."""
    cursor = con.cursor()  # its own: the stream stays open between batches
    try:
        relation = cursor.sql(sql, params=params)
        reader = (getattr(relation, "to_arrow_reader", None) or relation.fetch_record_batch)(rows)  # DuckDB 2 / 1
        empty = True
        for batch in reader:
            empty = False
            yield batch
        if empty:
            yield pa.RecordBatch.from_pylist([], schema=reader.schema)
    finally:
        cursor.close()


def _public(column: pa.Array) -> pa.Array:
    """A column of sources or SAE files as the pages name them (local paths shortened: app/public_names.py)."""
    encoded = pa.chunked_array([column]).combine_chunks().dictionary_encode()
    names = pa.array([public_name(v) for v in encoded.dictionary.to_pylist()], pa.string())
    return names.take(encoded.indices)


def _replace(table: pa.Table | pa.RecordBatch, name: str, column: pa.Array):
    return table.set_column(table.schema.get_field_index(name), name, column)


def _with_image_text(con: duckdb.DuckDBPyConnection, examples: pa.Table) -> pa.Table:
    """`examples` with the `key` and `caption` of each one's image after `image_id` (null if it has no row)."""
    ids = pc.unique(examples.column("image_id")).to_pylist()
    found = _arrow(con, IMAGE_TEXT_SQL, {"ids": ids})
    where = pc.index_in(examples.column("image_id"), value_set=found.column("image_id").combine_chunks())
    at = examples.schema.get_field_index("image_id") + 1
    for offset, name in enumerate(("key", "caption")):
        examples = examples.add_column(at + offset, name, found.column(name).take(where))
    return examples


@dataclass(frozen=True)
class Selection:
    layers: list[int]
    low: int
    high: int  # the last feature asked for (INT32_MAX: every feature from `low` on)
    last: dict[int, int]  # per layer, the last feature exported
    whole: bool  # every feature of every layer: all images are shown by some exported example


def _select(options: ExportOptions, layers: dict[int, dict]) -> Selection:
    chosen = sorted(options.layers or layers)
    unknown = [layer for layer in chosen if layer not in layers]
    if unknown:
        known = ", ".join(str(n) for n in sorted(layers))
        raise ExportError(f"argument --layers: the index has no layer {unknown[0]} (its layers: {known})")
    low, high = options.features or (0, INT32_MAX)
    for layer in chosen:
        last = layers[layer]["n_features"] - 1
        if low > last or (options.features and high > last):
            raise ExportError(f"argument --features: {low}-{high} is outside layer {layer}'s features 0-{last}")
    ends = {layer: min(high, layers[layer]["n_features"] - 1) for layer in chosen}
    whole = set(chosen) == set(layers) and low == 0 and all(ends[n] == layers[n]["n_features"] - 1 for n in chosen)
    return Selection(chosen, low, high, ends, whole)


class _Reader:
    """The tables of one index as Arrow batches, and their row counts (for progress)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, options: ExportOptions, selection: Selection):
        self.con, self.options, self.selection = con, options, selection
        sql = "SELECT column_name FROM duckdb_columns() WHERE table_name = 'features' AND schema_name = 'main'"
        found = {row[0] for row in con.execute(sql).fetchall()}
        self.feature_columns = FEATURE_COLUMNS + (f", {ZERO_SHOT_COLUMNS}" if "zero_shot_terms" in found else "")

    def _where(self) -> tuple[str, dict]:
        """The condition on `layer` and `feature` that selects the exported rows, and its parameters."""
        params = {"layers": self.selection.layers, "low": self.selection.low, "high": self.selection.high}
        return "list_contains($layers, layer) AND feature BETWEEN $low AND $high", params

    def count(self, table: str) -> int:
        if table == "layers":
            return len(self.selection.layers)
        if table == "images":
            return _count(self.con, self._images_sql(), self._images_params())
        where, params = self._where()
        return _count(self.con, f"SELECT * FROM {table} WHERE {where}", params)

    def layers(self) -> Iterator[pa.Table]:
        sql = f"SELECT {LAYER_COLUMNS} FROM layers WHERE list_contains($layers, layer) ORDER BY layer"
        table = _arrow(self.con, sql, {"layers": self.selection.layers})
        yield _replace(table, "sae_file", _public(table.column("sae_file")))

    def _chunks(self, layer: int, per_read: int) -> Iterator[dict]:
        last = self.selection.last[layer]
        for low in range(self.selection.low, last + 1, per_read):
            yield {"layer": layer, "low": low, "high": min(low + per_read - 1, last)}

    def features(self) -> Iterator[pa.Table]:
        sql = (
            f"SELECT {self.feature_columns} FROM features "
            "WHERE layer = $layer AND feature BETWEEN $low AND $high ORDER BY feature"
        )
        for layer in self.selection.layers:
            for params in self._chunks(layer, FEATURES_PER_READ):
                yield _arrow(self.con, sql, params)

    def examples(self, per_feature: int) -> Iterator[pa.Table]:
        heatmaps = self.options.with_heatmaps
        sql = EXAMPLES_SQL.format(heatmap=", heatmap_scale, heatmap" if heatmaps else "")
        per_read = max(1, self.options.batch_rows // max(1, per_feature))
        for layer in self.selection.layers:
            for params in self._chunks(layer, per_read):
                table = _with_image_text(self.con, _arrow(self.con, sql, params))
                if heatmaps:
                    scales = table.column("heatmap_scale").to_numpy()
                    lists = heatmap_lists(scales, table.column("heatmap").combine_chunks())
                    table = _replace(table.drop_columns(["heatmap_scale"]), "heatmap", lists)
                yield table

    def _images_sql(self) -> str:
        columns = IMAGE_COLUMNS + (", thumbnail" if self.options.with_images else "")
        if self.selection.whole:
            return f"SELECT {columns} FROM images"
        where, _ = self._where()
        return f"SELECT {columns} FROM images WHERE image_id IN (SELECT image_id FROM examples WHERE {where})"

    def _images_params(self) -> dict:
        return {} if self.selection.whole else self._where()[1]

    def images(self) -> Iterator[pa.RecordBatch]:
        rows = 1024 if self.options.with_images else self.options.batch_rows
        for batch in _batches(self.con, self._images_sql(), self._images_params(), rows):
            yield _replace(batch, "source", _public(batch.column("source")))


def _connect(path: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    """The index, read-only, with a bounded buffer pool; or, when this process already has it open (a server or
    an `open_index` in a notebook), with the configuration a server opens it with, as DuckDB shares one
    instance per file and process and refuses a second configuration."""
    try:
        return connect(path, threads=1, memory_limit=memory_limit)
    except IndexOpenError as error:
        if "different configuration" not in str(error):
            raise
    return connect(path, threads=1)


def export(options: ExportOptions) -> Path:
    """Write the export into `options.out`; return the path of its `dataset_info.json`."""
    if options.format not in FORMATS:
        raise ExportError(f"argument --format: {options.format!r} is not one of {', '.join(FORMATS)}")
    check_folder(options.out, options.overwrite)
    con = _connect(Path(options.index), options.memory_limit)
    try:
        meta, layers = validate(con, Path(options.index))
        selection = _select(options, layers)
        reader = _Reader(con, options, selection)
        per_feature = int(meta.get("top_n") or 0) + int(meta.get("band_count") or 0) * int(meta.get("band_size") or 0)
        tables = {
            "layers": reader.layers,
            "features": reader.features,
            "examples": lambda: reader.examples(per_feature),
            "images": reader.images,
        }
        with Staging(options.out, options.format, options.progress) as staging:
            for name, batches in tables.items():
                staging.write(name, batches(), reader.count(name))
            info = dataset_info(meta, options, selection.layers, staging.written)
            return staging.commit(info)
    except duckdb.Error as error:
        raise ExportError(f"cannot read {options.index}: {first_line(error)}") from error
    finally:
        con.close()

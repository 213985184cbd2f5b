"""Whether a DuckDB file is a complete, consistent index of the schema (`schema.py`), checked cheaply.

The server runs this at start and the writer before it publishes an index, so a page never meets a meta
value of the wrong type, a NULL where the schema has none, or a row that points at nothing. The index
may be ~10 GB, so every check reads the catalogue, O(layers) rows, or one aggregate query per large table;
NULLs are counted only in columns the file does not declare NOT NULL (indexes of schema 1.0); list and
heatmap lengths are checked on one row per layer.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import duckdb

from clipscope_explorer.precompute.index.schema import META, SCHEMA_VERSION, TABLES, version_text


class IndexCheckError(ValueError):
    """The file is not a servable index; the message is one line naming the file."""


@dataclass(frozen=True)
class FoundColumn:
    type: str
    nullable: bool  # False: the file declares NOT NULL, so DuckDB has enforced it


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_index_file(con: duckdb.DuckDBPyConnection, name: str, thorough: bool = False) -> tuple[dict, dict[int, dict]]:
    """Check the index open on `con` (`name` names it in messages); return (meta, layer rows by layer).
    `thorough` (the writer's check) adds what costs a pass over a large table: that every example names an
    image `images` holds (1.5 s for 25 million examples on 2 cores; at start only the extreme ids are looked up)."""
    try:
        return _Checker(con, name, thorough).run()
    except duckdb.Error as error:
        raise IndexCheckError(f"cannot read {name} as an index: {first_line(error)}") from error


def rebuild_command(meta: dict, out: str) -> str:
    """The command that writes this index again (from what its meta records)."""
    quote = shlex.quote
    if meta.get("demo") is True:
        sized = re.fullmatch(r"demo-(\d+)\.duckdb", Path(out).name)
        images = f" --images {sized.group(1)}" if sized else ""
        return f"clipscope-explorer demo --data {quote(str(Path(out).parent))}{images} --fresh --build-only"
    sample, model, sae = (meta[key] if isinstance(meta.get(key), dict) else {} for key in ("sample", "model", "sae"))
    sources = [str(s) for s in sample.get("sources") or []] or ["SOURCES"]
    parts = ["clipscope-explorer precompute --images", *map(quote, sources)]
    if isinstance(model.get("name"), str):
        parts += ["--model", quote(model["name"])]
    if isinstance(model.get("pretrained"), str):
        parts += ["--pretrained", quote(model["pretrained"])]
    if isinstance(sae.get("source"), str):
        parts += ["--sae", quote(sae["source"])]
    if isinstance(meta.get("layers"), list) and meta["layers"]:
        parts += ["--layers", ",".join(str(n) for n in meta["layers"])]
    if meta.get("normalisation") == "sample":
        parts += ["--normalise", "sample"]
    return " ".join(parts + ["--out", quote(out)])


class _Checker:
    def __init__(self, con: duckdb.DuckDBPyConnection, name: str, thorough: bool = False):
        self.con, self.name, self.thorough = con, name, thorough
        self.found: dict[str, dict[str, FoundColumn]] = {}
        self.meta: dict = {}
        self.minor = 0

    # -- refusals (each one line) -------------------------------------------
    def _refuse(self, text: str) -> NoReturn:
        raise IndexCheckError(f"{self.name} {text}")

    def mismatch(self, detail: str) -> NoReturn:
        self._refuse(f"does not match schema version {version_text(self.minor)}: {detail}")

    def inconsistent(self, detail: str) -> NoReturn:
        self._refuse(f"is inconsistent: {detail}")

    def outdated(self, what: str, since: int) -> NoReturn:
        self._refuse(
            f"is an index of schema version {version_text(self.minor)}, without {what} (schema version "
            f"{version_text(since)}) that this explorer needs; rebuild it: "
            f"{rebuild_command(self.meta, self.name)}"
        )

    # -- the checks, in order -----------------------------------------------
    def run(self) -> tuple[dict, dict[int, dict]]:
        self.found = self._catalogue()
        if "meta" not in self.found:
            self._refuse("is not a CLIP-Scope index (it has no meta table)")
        self._read_meta()
        self._check_structure()
        self._check_meta_values()
        layers = self._layer_rows()
        self._check_meta_against(layers)
        n_samples = self._check_samples()
        n_images = self._check_images(n_samples)
        self._check_features(layers)
        self._check_examples(layers, n_images if n_samples is None else n_samples)
        if n_samples is not None:
            self._check_examples_have_images()
        self._check_sample_codes(layers, n_samples)
        self._check_vocabulary()
        self._check_one_row_per_layer(layers)
        return self.meta, layers

    def _catalogue(self) -> dict[str, dict[str, FoundColumn]]:
        found: dict[str, dict[str, FoundColumn]] = {}
        for table, column, type_, nullable in self.con.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM duckdb_columns() "
            "WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall():
            found.setdefault(table, {})[column] = FoundColumn(type_, bool(nullable))
        return found

    def _read_meta(self) -> None:
        try:
            self.meta = {
                key: json.loads(value) for key, value in self.con.execute("SELECT key, value FROM meta").fetchall()
            }
        except (TypeError, ValueError) as error:
            self._refuse(f"has malformed metadata: {first_line(error)}")
        version = self.meta.get("schema_version")
        if version is None:
            self._refuse("is not a CLIP-Scope index (meta has no schema_version)")
        problem = META["schema_version"].type.check(version)
        if problem:
            self._refuse(f"has malformed metadata: meta.schema_version: {problem}")
        if version > SCHEMA_VERSION:
            self._refuse(
                f"has index schema version {version}; this explorer reads schema version "
                f"{SCHEMA_VERSION} (a newer clipscope-explorer serves it)"
            )
        if version < SCHEMA_VERSION:
            self._refuse(
                f"has index schema version {version}; this explorer reads schema version "
                f"{SCHEMA_VERSION}; rebuild it: {rebuild_command(self.meta, self.name)}"
            )
        minor = self.meta.get("schema_minor", 0)
        problem = META["schema_minor"].type.check(minor)
        if problem:
            self._refuse(f"has malformed metadata: meta.schema_minor: {problem}")
        self.minor = minor

    def _check_structure(self) -> None:
        missing: list[tuple[str, int]] = []
        for table in TABLES.values():
            columns = self.found.get(table.name)
            if columns is None:
                if table.needed:
                    missing.append((f"table {table.name}", table.since))
                continue
            for column in table.columns:
                found = columns.get(column.name)
                if found is None:
                    if table.needed and column.needed:
                        missing.append((f"{table.name}.{column.name}", column.since))
                elif found.type != column.type:
                    self.mismatch(f"{table.name}.{column.name} is {found.type}, not {column.type}")
        missing += [
            (f"meta.{key.name}", key.since) for key in META.values() if key.needed and key.name not in self.meta
        ]
        self._report_missing(missing)

    def _report_missing(self, missing: list[tuple[str, int]]) -> None:
        newer = [(what, since) for what, since in missing if since > self.minor]
        if newer:
            self.outdated(*newer[0])
        if missing:
            names = [what for what, _ in missing]
            self.mismatch(f"missing {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")

    def _check_meta_values(self) -> None:
        for key in META.values():
            if key.name in self.meta:
                problem = key.type.check(self.meta[key.name])
                if problem:
                    self._refuse(f"has malformed metadata: meta.{key.name}: {problem}")
        grid_h, grid_w = self.meta["grid"]
        if self.meta["n_tokens"] != 1 + grid_h * grid_w:
            self.inconsistent(
                f"meta.n_tokens is {self.meta['n_tokens']}, not 1 + {grid_h} x {grid_w} (CLS and the meta.grid patches)"
            )

    def _layer_rows(self) -> dict[int, dict]:
        cursor = self.con.execute("SELECT * FROM layers ORDER BY layer")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        if not rows:
            self._refuse("holds no layers")
        layers = TABLES["layers"]
        for row in rows:
            for column in layers.columns:
                if not column.nullable and row[column.name] is None:
                    self.mismatch(f"layers.{column.name} is NULL (layer {row['layer']})")
            for name, least in (
                ("layer", 0),
                ("d_in", 1),
                ("n_features", 1),
                ("k", 1),
                ("n_images", 0),
                ("n_tokens", 0),
            ):
                if row[name] < least:
                    self.inconsistent(f"layers.{name} is {row[name]} (layer {row['layer']}), below {least}")
            if len(row["histogram_edges"]) < 2:
                self.inconsistent(f"layer {row['layer']} has {len(row['histogram_edges'])} histogram edges")
            if len(row["mse_by_position"]) != self.meta["n_tokens"]:
                self.inconsistent(
                    f"layer {row['layer']} has {len(row['mse_by_position'])} mse_by_position "
                    f"values for meta.n_tokens = {self.meta['n_tokens']}"
                )
        return {row["layer"]: row for row in rows}

    def _check_meta_against(self, layers: dict[int, dict]) -> None:
        listed = self.meta["layers"]
        for layer in listed:
            if layer not in layers:
                self.inconsistent(f"meta.layers lists layer {layer}, which has no row in the layers table")
        for layer in layers:
            if layer not in listed:
                self.inconsistent(f"the layers table has layer {layer}, which meta.layers does not list")
        if self.meta["normalisation"] == "sample":
            stats = self.meta.get("normalisation_stats") or {}
            for layer in layers:
                if str(layer) not in stats:
                    self.inconsistent(f'meta.normalisation is "sample" but normalisation_stats has no layer {layer}')

    def _unenforced_nulls(self, table: str) -> list[str]:
        """SELECT items counting NULLs in the columns that must hold none but are not declared NOT NULL."""
        found = self.found[table]
        return [
            f"count(*) - count({c.name}) AS null_{c.name}"
            for c in TABLES[table].columns
            if not c.nullable and c.name in found and found[c.name].nullable  # a `needed=False` one may be missing
        ]

    def _null_columns(self, table: str, row: dict, where: str) -> None:
        for name, value in row.items():
            if name.startswith("null_") and value:
                self.mismatch(f"{table}.{name[5:]} is NULL in {value} row{'s' if value > 1 else ''}{where}")

    def _grouped(self, table: str, items: list[str], by_layer: bool = True) -> list[dict]:
        select = ", ".join((["layer"] if by_layer else []) + items + self._unenforced_nulls(table))
        cursor = self.con.execute(f"SELECT {select} FROM {table}{' GROUP BY layer' if by_layer else ''}")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def _check_images(self, n_samples: int | None) -> int:
        """The images' ids: dense from 0 without a `samples` table (schema 1.0, 1.1), else ids of samples."""
        (row,) = self._grouped(
            "images",
            ["count(*) AS n", "count(DISTINCT image_id) AS ids", "min(image_id) AS lo", "max(image_id) AS hi"],
            by_layer=False,
        )
        self._null_columns("images", row, "")
        if n_samples is None:
            if row["n"] and (row["lo"] != 0 or row["hi"] != row["n"] - 1 or row["ids"] != row["n"]):
                self.inconsistent(
                    f"images.image_id is not dense from 0 ({row['n']} rows, ids {row['lo']} to {row['hi']})"
                )
        elif row["n"] and (row["lo"] < 0 or row["hi"] >= n_samples or row["ids"] != row["n"]):
            self.inconsistent(
                f"images.image_id are not distinct ids of samples ({row['n']} rows, ids {row['lo']} to "
                f"{row['hi']}, {n_samples} samples)"
            )
        return row["n"]

    def _embedding_bytes(self) -> int | None:
        """Bytes of one stored vector (float16), or None when the index holds no embeddings."""
        embeddings = self.meta.get("embeddings")
        return None if embeddings is None else 2 * embeddings["dim"]

    def _check_vectors(self, row: dict, table: str, column: str, every: bool, layer: int | None = None) -> None:
        """A blob column's count of vectors (`vectors`; `n` rows): no vectors without meta.embeddings, else
        one in every row when `every`, and of the right size. The size is read from one vector only: the
        check runs in every worker at start, and reading every blob would hold them all in its memory (the
        search cache's export checks every vector's size)."""
        what = f"{table}.{column}" + ("" if layer is None else f" (layer {layer})")
        size = self._embedding_bytes()
        if size is None:
            if row["vectors"]:
                self.inconsistent(f"{what} holds {row['vectors']} vectors but meta.embeddings is null")
            return
        if every and row["vectors"] != row["n"]:
            self.inconsistent(f"{what} is NULL in {row['n'] - row['vectors']} rows, but meta.embeddings is set")
        if not row["vectors"]:
            return
        where = f"{column} IS NOT NULL" + ("" if layer is None else " AND layer = ?")
        (bytes_,) = self.con.execute(
            f"SELECT octet_length({column}) FROM {table} WHERE {where} LIMIT 1", [] if layer is None else [layer]
        ).fetchone()
        if bytes_ != size:
            self.inconsistent(
                f"{what} holds a vector of {bytes_} bytes, not {size} (meta.embeddings.dim float16 values)"
            )

    @staticmethod
    def _vector_items(column: str) -> list[str]:
        return [f"count({column}) AS vectors"]

    def _check_samples(self) -> int | None:
        """Every encoded image, ids dense from 0 (schema 1.2 on); None when the file has no `samples`."""
        if "samples" not in self.found:
            return None
        (row,) = self._grouped(
            "samples",
            ["count(*) AS n", "count(DISTINCT image_id) AS ids", "min(image_id) AS lo", "max(image_id) AS hi"]
            + self._vector_items("embedding"),
            by_layer=False,
        )
        self._null_columns("samples", row, "")
        if row["n"] and (row["lo"] != 0 or row["hi"] != row["n"] - 1 or row["ids"] != row["n"]):
            self.inconsistent(f"samples.image_id is not dense from 0 ({row['n']} rows, ids {row['lo']} to {row['hi']})")
        if row["n"] != self.meta["sample"]["n_images"]:
            self.inconsistent(
                f"samples holds {row['n']} images, but meta.sample.n_images is {self.meta['sample']['n_images']}"
            )
        self._check_vectors(row, "samples", "embedding", every=True)
        return row["n"]

    def _check_sample_codes(self, layers: dict[int, dict], n_samples: int | None) -> None:
        if "sample_codes" not in self.found:
            return
        for row in self._grouped("sample_codes", ["count(*) AS n", "min(image_id) AS lo", "max(image_id) AS hi"]):
            layer = row["layer"]
            self._null_columns("sample_codes", row, f" (layer {layer})")
            if layer not in layers:
                self.inconsistent(f"sample_codes holds rows of layer {layer}, which is not in the layers table")
            if row["lo"] < 0 or row["hi"] >= (n_samples or 0):
                self.inconsistent(
                    f"sample_codes of layer {layer} name images {row['lo']} to {row['hi']}, but samples holds "
                    f"{n_samples or 0}"
                )
            lengths = self.con.execute(
                "SELECT len(indices), len(activations) FROM sample_codes WHERE layer = ? LIMIT 1", [layer]
            ).fetchone()
            if lengths != (layers[layer]["k"], layers[layer]["k"]):
                self.inconsistent(
                    f"a sample code of layer {layer} has {lengths[0]} indices and {lengths[1]} activations, "
                    f"not k = {layers[layer]['k']}"
                )

    def _check_vocabulary(self) -> None:
        if "vocabulary" not in self.found:
            return
        (row,) = self._grouped(
            "vocabulary",
            ["count(*) AS n", "count(*) FILTER (WHERE origin NOT IN ('captions', 'user')) AS odd_origin"]
            + self._vector_items("embedding"),
            by_layer=False,
        )
        self._null_columns("vocabulary", row, "")
        if row["odd_origin"]:
            self.inconsistent(f"{row['odd_origin']} vocabulary terms have an origin other than captions or user")
        zero_shot = self.meta.get("zero_shot")
        if (zero_shot["vocabulary_size"] if zero_shot else 0) != row["n"]:
            self.inconsistent(
                f"vocabulary holds {row['n']} terms, but meta.zero_shot says "
                f"{zero_shot['vocabulary_size'] if zero_shot else 'none (null)'}"
            )
        self._check_vectors(row, "vocabulary", "embedding", every=True)

    def _check_features(self, layers: dict[int, dict]) -> None:
        seen = set()
        for row in self._grouped(
            "features",
            [
                "count(*) AS n",
                "count(DISTINCT feature) AS ids",
                "min(feature) AS lo",
                "max(feature) AS hi",
                "count(*) FILTER (WHERE n_fired_tokens > 0 AND (mean_activation IS NULL OR max_activation IS NULL))"
                " AS unmeasured",
                *self._meaning_items(),
            ],
        ):
            layer = row["layer"]
            self._null_columns("features", row, f" (layer {layer})")
            self._check_meaning(row, layer)
            if layer not in layers:
                self.inconsistent(f"features holds rows of layer {layer}, which is not in the layers table")
            if row["unmeasured"]:
                self.inconsistent(
                    f"layer {layer} has {row['unmeasured']} features that fire but have a NULL mean or max activation"
                )
            n_features = layers[layer]["n_features"]
            if (row["n"], row["ids"], row["lo"], row["hi"]) != (n_features, n_features, 0, n_features - 1):
                self.inconsistent(
                    f"layer {layer} has {n_features} features, but features holds {row['n']} rows "
                    f"for features {row['lo']} to {row['hi']}"
                )
            seen.add(layer)
        for layer in layers.keys() - seen:
            self.inconsistent(f"layer {layer} has no rows in the features table")

    def _meaning_items(self) -> list[str]:
        """Aggregates over the features' prototype and zero-shot columns, those the file has."""
        found = self.found["features"]
        items = self._vector_items("prototype") if "prototype" in found else []
        if {"zero_shot_terms", "zero_shot_scores", "zero_shot_margins"} <= found.keys():
            items.append(
                "count(*) FILTER (WHERE len(zero_shot_terms) <> len(zero_shot_scores) "
                "OR len(zero_shot_terms) <> len(zero_shot_margins)) AS odd_zero_shot"
            )
        return items

    def _check_meaning(self, row: dict, layer: int) -> None:
        if "vectors" in row:
            self._check_vectors(row, "features", "prototype", every=False, layer=layer)
        if row.get("odd_zero_shot"):
            self.inconsistent(
                f"layer {layer} has {row['odd_zero_shot']} features whose zero-shot terms, scores and margins "
                f"differ in length"
            )

    def _check_examples(self, layers: dict[int, dict], n_images: int) -> None:
        band_count = self.meta["band_count"]
        for row in self._grouped(
            "examples",
            [
                "min(feature) AS lo",
                "max(feature) AS hi",
                "min(image_id) AS first_image",
                "max(image_id) AS last_image",
                "min(rank) AS rank",
                "min(band) AS low_band",
                "max(band) AS high_band",
                "count(*) FILTER (WHERE kind NOT IN ('top', 'band')) AS odd_kind",
                "count(*) FILTER (WHERE (kind = 'top') <> (band = 0)) AS odd_band",
            ],
        ):
            layer = row["layer"]
            self._null_columns("examples", row, f" (layer {layer})")
            if layer not in layers:
                self.inconsistent(f"examples holds rows of layer {layer}, which is not in the layers table")
            where = f"examples of layer {layer}"
            if row["lo"] < 0 or row["hi"] >= layers[layer]["n_features"]:
                self.inconsistent(
                    f"{where} name features {row['lo']} to {row['hi']}, outside the layer's "
                    f"{layers[layer]['n_features']}"
                )
            if row["first_image"] < 0 or row["last_image"] >= n_images:
                self.inconsistent(
                    f"{where} name images {row['first_image']} to {row['last_image']}, but there are {n_images}"
                )
            if row["rank"] < 1:
                self.inconsistent(f"{where} have rank {row['rank']}; ranks start at 1")
            if row["odd_kind"] or row["odd_band"] or row["low_band"] < 0 or row["high_band"] > band_count:
                self.inconsistent(
                    f"{where} have kinds other than top (band 0) and band (bands 1 to meta.band_count = {band_count})"
                )

    def _check_examples_have_images(self) -> None:
        """With ids of samples, ids below the bound may still name no `images` row: count those (at start,
        only among the smallest and largest id the examples name)."""
        shown = "SELECT DISTINCT image_id FROM examples"
        if not self.thorough:
            shown = "SELECT min(image_id) AS image_id FROM examples UNION SELECT max(image_id) FROM examples"
        (missing,) = self.con.execute(
            f"SELECT count(*) FROM (SELECT image_id FROM ({shown}) WHERE image_id IS NOT NULL) AS shown "
            "ANTI JOIN images USING (image_id)"
        ).fetchone()
        if missing:
            self.inconsistent(f"examples name {missing} images that the images table does not hold")

    def _check_one_row_per_layer(self, layers: dict[int, dict]) -> None:
        grid_h, grid_w = self.meta["grid"]
        for layer, row in layers.items():
            lengths = self.con.execute(
                "SELECT len(histogram), len(position_mean), len(similar_features), len(similar_cosines) "
                "FROM features WHERE layer = ? LIMIT 1",
                [layer],
            ).fetchone()
            expected = (len(row["histogram_edges"]) - 1, self.meta["n_tokens"], lengths[2], lengths[2])
            if lengths != expected:
                self.inconsistent(
                    f"a feature of layer {layer} has list lengths (histogram, position_mean, "
                    f"similar_features, similar_cosines) {lengths}, not {expected}"
                )
            heatmap = self.con.execute(
                "SELECT octet_length(heatmap) FROM examples WHERE layer = ? LIMIT 1", [layer]
            ).fetchone()
            if heatmap is not None and heatmap[0] != grid_h * grid_w:
                self.inconsistent(
                    f"an example of layer {layer} has a {heatmap[0]}-byte heatmap for a {grid_h} x {grid_w} grid"
                )

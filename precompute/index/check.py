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


def check_index_file(con: duckdb.DuckDBPyConnection, name: str) -> tuple[dict, dict[int, dict]]:
    """Check the index open on `con` (`name` names it in messages); return (meta, layer rows by layer)."""
    try:
        return _Checker(con, name).run()
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
    def __init__(self, con: duckdb.DuckDBPyConnection, name: str):
        self.con, self.name = con, name
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
        n_images = self._check_images()
        self._check_features(layers)
        self._check_examples(layers, n_images)
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
            if not c.nullable and found[c.name].nullable
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

    def _check_images(self) -> int:
        (row,) = self._grouped(
            "images",
            ["count(*) AS n", "count(DISTINCT image_id) AS ids", "min(image_id) AS lo", "max(image_id) AS hi"],
            by_layer=False,
        )
        self._null_columns("images", row, "")
        if row["n"] and (row["lo"] != 0 or row["hi"] != row["n"] - 1 or row["ids"] != row["n"]):
            self.inconsistent(f"images.image_id is not dense from 0 ({row['n']} rows, ids {row['lo']} to {row['hi']})")
        return row["n"]

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
            ],
        ):
            layer = row["layer"]
            self._null_columns("features", row, f" (layer {layer})")
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
                    f"{where} name images {row['first_image']} to {row['last_image']}, but the "
                    f"images table holds {n_images}"
                )
            if row["rank"] < 1:
                self.inconsistent(f"{where} have rank {row['rank']}; ranks start at 1")
            if row["odd_kind"] or row["odd_band"] or row["low_band"] < 0 or row["high_band"] > band_count:
                self.inconsistent(
                    f"{where} have kinds other than top (band 0) and band (bands 1 to meta.band_count = {band_count})"
                )

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

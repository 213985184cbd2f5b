"""The index schema: every table, column (DuckDB type) and meta key (JSON type), and the schema version.

This module is the one definition of the index format. The writer (`store.IndexWriter`) creates its tables
from `ddl()` and refuses meta keys or values it does not define; the reader's check (`check.py`) holds a
file to it; docs/schema.md must list exactly what it defines (tests/test_schema_doc.py).

Versions: `SCHEMA_VERSION` (meta `schema_version`) is the major version: a reader refuses any other.
`SCHEMA_MINOR` (meta `schema_minor`; absent means 0) counts additive changes. To add a table, a column
or a meta key: add it below with `since=` the next minor, raise `SCHEMA_MINOR` to it, have the writer
fill it, and document it in docs/schema.md. An element with `needed=False` may be missing (code that
uses it checks that the file has it); a `needed` one missing from an older index refuses that index
with the command that rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipscope_explorer.precompute.index.jsontype import (
    Boolean,
    Integer,
    JsonType,
    ListOf,
    MapOf,
    Nullable,
    Number,
    Record,
    String,
)

SCHEMA_VERSION = 1
SCHEMA_MINOR = 4


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as DuckDB's duckdb_columns() spells it
    nullable: bool = False
    since: int = 0
    needed: bool = True


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: str | None = None
    since: int = 0
    needed: bool = True

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


@dataclass(frozen=True)
class MetaKey:
    name: str
    type: JsonType
    since: int = 0
    needed: bool = True


def _columns(
    type_: str, *names: str, nullable: bool = False, since: int = 0, needed: bool = True
) -> tuple[Column, ...]:
    return tuple(Column(name, type_, nullable, since, needed) for name in names)


TABLES: dict[str, Table] = {
    table.name: table
    for table in (
        Table("meta", _columns("VARCHAR", "key") + _columns("JSON", "value"), primary_key="key"),
        Table(
            "layers",
            (
                *_columns("INTEGER", "layer"),
                *_columns("VARCHAR", "sae_file", nullable=True),
                *_columns("BIGINT", "checkpoint", nullable=True),
                *_columns("INTEGER", "d_in", "n_features", "k"),
                *_columns("BIGINT", "n_images", "n_tokens"),
                *_columns(
                    "DOUBLE",
                    "mse",
                    "explained_variance",
                    "mse_raw",
                    "explained_variance_raw",
                    "l0",
                    "dead_fraction",
                    "active_fraction",
                    "nonpositive_kept_fraction",
                ),
                *_columns("DOUBLE[]", "mse_by_position", "histogram_edges"),
            ),
            primary_key="layer",
        ),
        Table(
            "features",
            (
                *_columns("INTEGER", "layer", "feature"),
                *_columns("BIGINT", "n_fired_tokens", "n_fired_images", "n_fired_cls"),
                *_columns("DOUBLE", "frequency", "image_frequency", "cls_frequency"),
                *_columns("DOUBLE", "mean_activation", "max_activation", nullable=True),
                *_columns("INTEGER[]", "histogram"),
                *_columns("FLOAT[]", "position_mean"),
                *_columns("VARCHAR[]", "label_terms"),
                *_columns("VARCHAR", "label"),
                *_columns("INTEGER[]", "similar_features"),
                *_columns("FLOAT[]", "similar_cosines"),
                *_columns("BLOB", "prototype", nullable=True, since=2, needed=False),
                *_columns("VARCHAR[]", "zero_shot_terms", since=2, needed=False),
                *_columns("FLOAT[]", "zero_shot_scores", "zero_shot_margins", since=2, needed=False),
            ),
        ),
        Table(
            "examples",
            (
                *_columns("INTEGER", "layer", "feature"),
                *_columns("VARCHAR", "kind"),
                *_columns("TINYINT", "band"),
                *_columns("INTEGER", "rank", "image_id"),
                *_columns("FLOAT", "activation", "cls_activation", "heatmap_scale"),
                *_columns("BLOB", "heatmap"),
            ),
        ),
        Table(
            "images",
            (
                *_columns("INTEGER", "image_id"),
                *_columns("VARCHAR", "source", "key"),
                *_columns("VARCHAR", "url", "caption", nullable=True),
                *_columns("INTEGER", "width", "height"),
                *_columns("BLOB", "thumbnail"),
            ),
            primary_key="image_id",
        ),
        Table(
            "samples",
            (
                *_columns("INTEGER", "image_id"),
                *_columns("VARCHAR", "source", "key"),
                *_columns("VARCHAR", "url", "caption", nullable=True),
                *_columns("INTEGER", "width", "height"),
                *_columns("BLOB", "embedding", nullable=True),
            ),
            primary_key="image_id",
            since=2,
            needed=False,
        ),
        Table(
            "sample_codes",
            (
                *_columns("INTEGER", "layer", "image_id"),
                *_columns("INTEGER[]", "indices"),
                *_columns("FLOAT[]", "activations"),
            ),
            since=2,
            needed=False,
        ),
        Table(
            "vocabulary",
            (
                *_columns("VARCHAR", "term"),
                *_columns("VARCHAR", "origin"),
                *_columns("INTEGER", "n_captions"),
                *_columns("BLOB", "embedding"),
            ),
            primary_key="term",
            since=2,
            needed=False,
        ),
        # written by `evaluate` (precompute/evaluate/), which adds them to a built index
        Table(
            "sort_eval",
            (
                *_columns("INTEGER", "layer"),
                *_columns("VARCHAR", "token", "judge"),
                *_columns("VARCHAR", "judge_model", nullable=True),
                *_columns("DOUBLE", "accuracy", "ci_low", "ci_high", "answer_1_rate", nullable=True),
                *_columns("INTEGER", "trials", "correct", "unanswered", "replaced"),
                *_columns("DOUBLE", "null_accuracy", nullable=True),
                *_columns("INTEGER", "null_trials", "seeds", "pairs", "features_considered", "per_feature"),
                *_columns("JSON", "usage"),
                *_columns("VARCHAR", "evaluated_at"),
            ),
            since=3,
            needed=False,
        ),
        Table(
            "sort_eval_features",
            (
                *_columns("INTEGER", "layer", "feature"),
                *_columns("VARCHAR", "token", "judge"),
                *_columns("INTEGER", "trials", "correct"),
            ),
            since=3,
            needed=False,
        ),
        Table(
            "sort_eval_trials",
            (
                *_columns("INTEGER", "layer"),
                *_columns("VARCHAR", "token", "judge", "kind"),
                *_columns("INTEGER", "seed", "trial", "grid1_feature", "grid2_feature", "query_feature", "query_image"),
                *_columns("TINYINT", "answer", nullable=True),
            ),
            since=3,
            needed=False,
        ),
        # lineage across layers, and the SAEs' training checkpoints (precompute/evaluate/)
        Table(
            "lineage",
            (
                *_columns("INTEGER", "layer", "feature", "other_layer", "other_feature"),
                *_columns("VARCHAR", "source"),
                *_columns("DOUBLE", "score"),
                *_columns("INTEGER", "support"),
            ),
            since=4,
            needed=False,
        ),
        Table(
            "checkpoints",
            (
                *_columns("INTEGER", "layer"),
                *_columns("BIGINT", "tokens"),
                *_columns(
                    "DOUBLE", "mse", "explained_variance", "mse_raw", "explained_variance_raw", "l0", "dead_fraction"
                ),
                *_columns("DOUBLE[]", "mse_by_position"),
                *_columns("INTEGER", "n_images"),
            ),
            since=4,
            needed=False,
        ),
        Table(
            "checkpoint_matches",
            (
                *_columns("INTEGER", "layer", "feature"),
                *_columns("BIGINT", "tokens"),
                *_columns("INTEGER", "match"),
                *_columns("FLOAT", "cosine"),
            ),
            since=4,
            needed=False,
        ),
        # occlusion faithfulness of the heatmaps (precompute/evaluate/faithfulness.py)
        Table(
            "faithfulness",
            (
                *_columns("INTEGER", "layer", "feature", "examples"),
                *_columns("DOUBLE", "hot_drop", "random_drop", "kept", "score"),
            ),
            since=4,
            needed=False,
        ),
        Table(
            "faithfulness_examples",
            (
                *_columns("INTEGER", "layer", "feature", "rank", "image_id", "n_hot"),
                *_columns("DOUBLE", "before", "hot", "random", "insertion"),
            ),
            since=4,
            needed=False,
        ),
    )
}

VERSIONED_PACKAGES = ("clipscope-explorer", "torch", "open_clip_torch", "duckdb")  # meta.versions: the writer's

_NAME = String()
_COUNT = Integer(minimum=0)
_SIZE = Integer(minimum=1)
_SKIPPED = Record({"source": String(), "key": String(), "reason": String()})
_FAILED_SHARD = Record({"shard": Integer(minimum=0), "reason": String()})

META: dict[str, MetaKey] = {
    key.name: key
    for key in (
        MetaKey("schema_version", Integer(minimum=1)),
        MetaKey("schema_minor", Integer(minimum=0), since=1, needed=False),
        MetaKey("index_id", _NAME),
        MetaKey("created_at", _NAME),
        MetaKey("model", Record({"name": String(), "pretrained": Nullable(String())})),
        MetaKey("sae", Record({"source": String(), "checkpoint": Nullable(_COUNT)})),
        MetaKey("released_suite", Boolean()),
        MetaKey("layers", ListOf(_COUNT, min_length=1)),
        MetaKey("n_tokens", Integer(minimum=2)),
        MetaKey("grid", ListOf(_SIZE, length=2)),
        MetaKey("d_model", _SIZE),
        MetaKey("image_size", _SIZE),
        MetaKey("normalisation", String(("none", "sample"))),
        MetaKey("precision", String(("fp32", "bf16")), needed=False),
        MetaKey(
            "normalisation_stats",
            MapOf(Record({"mean": ListOf(Number()), "std": ListOf(Number())}), key="layer"),
            needed=False,
        ),
        MetaKey(
            "sample",
            Record(
                {
                    "sources": ListOf(String()),
                    "n_images": _COUNT,
                    "n_skipped": _COUNT,
                    "skipped": ListOf(_SKIPPED),
                    "failed_shards": ListOf(_FAILED_SHARD),
                    "max_images": Nullable(_SIZE),
                },
                optional=frozenset({"failed_shards", "max_images"}),
            ),
        ),
        MetaKey("top_n", _COUNT),
        MetaKey("band_count", _COUNT),
        MetaKey("band_size", _COUNT),
        MetaKey("active_threshold", Number()),
        MetaKey("timings", MapOf(Number(), key="phase")),
        MetaKey(
            "versions",
            Record({name: Nullable(String()) for name in VERSIONED_PACKAGES}, optional=frozenset(VERSIONED_PACKAGES)),
        ),
        MetaKey("demo", Boolean()),
        MetaKey(
            "embeddings",
            Nullable(Record({"dim": _SIZE, "dtype": String(("float16",))})),
            since=2,
            needed=False,
        ),
        MetaKey(
            "zero_shot",
            Nullable(
                Record(
                    {
                        "template": String(),
                        "vocabulary_size": _COUNT,
                        "min_count": _SIZE,
                        "user_vocabulary": Nullable(String()),
                        "max_labels": _SIZE,
                        "false_label_rate": Number(),
                        "n_null": _COUNT,
                        # the earlier rule's parameters, in indexes built with it
                        "baseline_quantile": Number(),
                        "min_margin": Number(),
                    },
                    optional=frozenset({"false_label_rate", "baseline_quantile", "min_margin"}),
                )
            ),
            since=2,
            needed=False,
        ),
    )
}


def version_text(minor: int = SCHEMA_MINOR) -> str:
    return f"{SCHEMA_VERSION}.{minor}"


def column_sql(table: Table, column: Column) -> str:
    """The column's type and constraint as the DDL declares it, e.g. `BIGINT NOT NULL`."""
    if column.name == table.primary_key:
        return f"{column.type} PRIMARY KEY"
    return column.type if column.nullable else f"{column.type} NOT NULL"


def ddl() -> str:
    """CREATE TABLE statements for every table of this version (NOT NULL declared, so DuckDB enforces it)."""
    return "\n".join(
        f"CREATE TABLE {table.name} ({', '.join(f'{c.name} {column_sql(table, c)}' for c in table.columns)});"
        for table in TABLES.values()
    )


def additions(minor: int) -> list[str]:
    """What schema 1.`minor` added: `table x`, `x.column` and `meta.key` names."""
    added = [f"table {t.name}" for t in TABLES.values() if t.since == minor]
    added += [f"{t.name}.{c.name}" for t in TABLES.values() if t.since < minor for c in t.columns if c.since == minor]
    return added + [f"meta.{key.name}" for key in META.values() if key.since == minor]


def select_list(table: str, *names: str) -> str:
    """`names` of `table` as a SELECT list, refusing a name the schema does not define (so a query's
    column list cannot drift from the schema)."""
    unknown = [name for name in names if name not in TABLES[table].names]
    if unknown:
        raise KeyError(f"{table} has no column {unknown[0]!r} in the index schema")
    return ", ".join(names)

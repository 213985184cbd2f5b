"""docs/schema.md is normative: it lists exactly the tables, columns (with types), meta keys (with types) and
versions that precompute/index/schema.py defines, and the writer creates exactly those tables."""

import re
from pathlib import Path

import duckdb
import pytest

from clipscope_explorer.precompute.index.schema import (
    META,
    SCHEMA_MINOR,
    SCHEMA_VERSION,
    TABLES,
    additions,
    column_sql,
    ddl,
    version_text,
)

DOC = (Path(__file__).resolve().parent.parent / "docs" / "schema.md").read_text()


def section(title: str, level: str = "#+") -> str:
    """The text under a heading, up to the next heading (of `level`)."""
    return re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^{level} |\Z)", DOC, re.S | re.M).group(1)


def table_rows(text: str, header: str) -> list[tuple[list[str], str, str]]:
    """(names, type, meaning) of each row of the markdown table headed `| {header} | type | ...`."""
    rows, inside = [], False
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if cells[:2] == [header, "type"]:
            inside = True
        elif not line.startswith("|"):
            inside = False
        elif inside and cells[0].startswith("`"):
            type_cell = re.fullmatch(r"`([^`]*)`", cells[1])
            assert type_cell, f"the type of {cells[0]} is not one `code span`"
            rows.append((re.findall(r"`([a-z_0-9-]+)`", cells[0]), type_cell.group(1), cells[2]))
    return rows


def documented(text: str, header: str) -> list[tuple[str, str]]:
    return [(name, type_) for names, type_, _ in table_rows(text, header) for name in names]


@pytest.mark.parametrize("table", list(TABLES))
def test_documented_columns_and_types_are_the_schemas(table):
    assert documented(section(f"`{table}`"), "column") == [
        (c.name, column_sql(TABLES[table], c)) for c in TABLES[table].columns
    ]


def test_every_table_is_documented():
    assert re.findall(r"^### `(\w+)`", section("Tables", level="##"), re.M) == list(TABLES)


def test_documented_meta_keys_and_types_are_the_schemas():
    assert documented(section("`meta`"), "key") == [(key.name, key.type.describe()) for key in META.values()]


def test_optional_meta_keys_are_said_to_be():
    for names, _, meaning in table_rows(section("`meta`"), "key"):
        for name in names:
            assert ("optional" in meaning.lower()) == (not META[name].needed), name


def test_the_writer_creates_exactly_the_documented_tables():
    con = duckdb.connect()
    con.execute(ddl())
    created = {}
    for table, column, type_, nullable in con.execute(
        "SELECT table_name, column_name, data_type, is_nullable FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = 'main'"
    ).fetchall():
        created.setdefault(table, []).append((column, type_, nullable))
    assert created == {name: [(c.name, c.type, c.nullable) for c in table.columns] for name, table in TABLES.items()}


def test_schema_version_and_every_minor_are_documented():
    assert f"Schema version **{version_text()}**" in DOC
    changes = section("Versioning")
    for minor in range(1, SCHEMA_MINOR + 1):
        line = re.search(rf"^- \*\*{SCHEMA_VERSION}\.{minor}\*\*: (.*?)(?=^- |^$)", changes, re.S | re.M)
        assert line, f"docs/schema.md does not say what {SCHEMA_VERSION}.{minor} added"
        for name in additions(minor):
            assert f"`{name}`" in line.group(1), (minor, name)

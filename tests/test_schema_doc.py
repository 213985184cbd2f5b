"""docs/schema.md is normative: its tables must list exactly the columns the writer creates."""

import re
from pathlib import Path

import duckdb
import pytest

from clipscope_explorer.precompute.index.store import DDL, SCHEMA_VERSION, TABLE_COLUMNS

DOC = (Path(__file__).resolve().parent.parent / "docs" / "schema.md").read_text()


def documented_columns(table: str) -> list[str]:
    section = re.search(rf"^### `{table}[` ].*?$(.*?)(?=^### |^## |\Z)", DOC, re.S | re.M).group(1)
    names = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) >= 2 and cells[0].startswith("`"):
            names += re.findall(r"`([a-z_0-9]+)`", cells[0])
    return names


def created_columns(table: str) -> list[str]:
    con = duckdb.connect()
    con.execute(DDL)
    return [row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()]


@pytest.mark.parametrize("table", ["layers", "features", "examples", "images"])
def test_documented_columns_match_the_writer(table):
    assert documented_columns(table) == created_columns(table)
    if table in TABLE_COLUMNS:
        assert TABLE_COLUMNS[table] == created_columns(table)


def test_schema_version_documented():
    assert f"Schema version **{SCHEMA_VERSION}**" in DOC

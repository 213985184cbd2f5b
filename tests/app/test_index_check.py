"""Start-up refuses an index that the pages could not serve: each case writes a good index with the real
writer, corrupts one thing with DuckDB, and expects `check_index` to raise `IndexOpenError` and
`clipscope-explorer serve` to exit 2, each with one line that names the file and the problem.
What the check accepts (a newer minor version, NULL where the schema allows it) serves every page."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient

from clipscope_explorer.app.index_file import IndexOpenError, check_index
from clipscope_explorer.precompute.index import schema
from tests.app.route_walk import endpoints, fill


def not_null_dropped(table: str, column: str) -> str:
    return f"ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL"


def meta(key: str, json_text: str) -> str:
    return f"UPDATE meta SET value = '{json_text}' WHERE key = '{key}'"


CORRUPTIONS = {  # name: (SQL run on a copy of the good index, part of the expected message)
    "meta grid a string": ([meta("grid", '"ab"')], 'meta.grid: "ab" is not a list'),
    "meta grid of one": ([meta("grid", "[16]")], "meta.grid: has 1 items, not 2"),
    "meta model a string": ([meta("model", '"x"')], 'meta.model: "x" is not an object'),
    "meta model name a number": ([meta("model", '{"name": 3, "pretrained": null}')], "meta.model: 'name': 3"),
    "meta sample a string": ([meta("sample", '"x"')], 'meta.sample: "x" is not an object'),
    "meta sample without sources": (
        [meta("sample", '{"n_images": 1, "n_skipped": 0, "skipped": []}')],
        "meta.sample: has no 'sources'",
    ),
    "meta layers of strings": ([meta("layers", '["11", "20"]')], 'meta.layers: item 0: "11" is not an integer'),
    "meta layers empty": ([meta("layers", "[]")], "meta.layers: has 0 items"),
    "meta released_suite a string": ([meta("released_suite", '"yes"')], "meta.released_suite"),
    "meta normalisation unknown": ([meta("normalisation", '"zscore"')], "meta.normalisation"),
    "meta band_count negative": ([meta("band_count", "-1")], "meta.band_count: -1 is below 0"),
    "meta timings a list": ([meta("timings", "[1]")], "meta.timings"),
    "meta schema_version a string": ([meta("schema_version", '"1"')], 'meta.schema_version: "1" is not an integer'),
    "meta schema_minor a string": ([meta("schema_minor", '"1"')], "meta.schema_minor"),
    "meta without created_at": (["DELETE FROM meta WHERE key = 'created_at'"], "missing meta.created_at"),
    "meta without sample": (["DELETE FROM meta WHERE key = 'sample'"], "missing meta.sample"),
    "newer major version": (
        [meta("schema_version", "2")],
        "schema version 2; this explorer reads schema version 1 (a newer clipscope-explorer",
    ),
    "n_tokens not the grid's": ([meta("n_tokens", "100")], "meta.n_tokens is 100, not 1 + 16 x 16"),
    "sample normalisation without its statistics": (
        [meta("normalisation", '"sample"')],
        "normalisation_stats has no layer 11",
    ),
    "layers.n_features NULL": (
        [not_null_dropped("layers", "n_features"), "UPDATE layers SET n_features = NULL WHERE layer = 20"],
        "layers.n_features is NULL (layer 20)",
    ),
    "layers.mse NULL": ([not_null_dropped("layers", "mse"), "UPDATE layers SET mse = NULL"], "layers.mse is NULL"),
    "layers.n_features zero": (["UPDATE layers SET n_features = 0 WHERE layer = 11"], "layers.n_features is 0"),
    "a layer without its row": (
        ["DELETE FROM layers WHERE layer = 11"],
        "meta.layers lists layer 11, which has no row in the layers table",
    ),
    "a row of an unlisted layer": (
        ["INSERT INTO layers SELECT * REPLACE (5 AS layer) FROM layers WHERE layer = 20"],
        "the layers table has layer 5, which meta.layers does not list",
    ),
    "no layers": (["DELETE FROM layers"], "holds no layers"),
    "mse_by_position too short": (
        ["UPDATE layers SET mse_by_position = [1.0, 2.0] WHERE layer = 20"],
        "layer 20 has 2 mse_by_position values",
    ),
    "a feature row missing": (
        ["DELETE FROM features WHERE layer = 20 AND feature = 63"],
        "layer 20 has 64 features, but features holds 63 rows",
    ),
    "a feature beyond n_features": (
        ["UPDATE features SET feature = 64 WHERE layer = 20 AND feature = 63"],
        "for features 0 to 64",
    ),
    "features of an unknown layer": (
        ["UPDATE features SET layer = 7 WHERE layer = 20"],
        "features holds rows of layer 7",
    ),
    "features.label NULL": (
        [not_null_dropped("features", "label"), "UPDATE features SET label = NULL WHERE feature = 8"],
        "features.label is NULL in 1 row (",
    ),
    "max_activation NULL on a feature that fires": (
        ["UPDATE features SET max_activation = NULL WHERE layer = 20 AND feature = 8"],
        "layer 20 has 1 features that fire but have a NULL mean or max activation",
    ),
    "features.frequency NULL": (
        [
            not_null_dropped("features", "frequency"),
            "UPDATE features SET frequency = NULL WHERE layer = 11 AND feature < 3",
        ],
        "features.frequency is NULL in 3 rows (layer 11)",
    ),
    "position_mean too short": (
        ["UPDATE features SET position_mean = position_mean[1:10] WHERE layer = 11"],
        "a feature of layer 11 has list lengths",
    ),
    "histogram of the wrong bins": (
        ["UPDATE features SET histogram = histogram[1:3] WHERE layer = 20"],
        "a feature of layer 20 has list lengths",
    ),
    "an example of a feature beyond n_features": (
        ["UPDATE examples SET feature = 99 WHERE layer = 20 AND feature = 8 AND kind = 'top' AND rank = 1"],
        "examples of layer 20 name features 0 to 99",
    ),
    "an example of an image not stored": (
        ["UPDATE examples SET image_id = 9999 WHERE layer = 11 AND feature = 8 AND kind = 'top' AND rank = 1"],
        "to 9999, but there are",
    ),
    "an image row missing": (
        ["DELETE FROM images WHERE image_id = (SELECT max(image_id) FROM images)"],
        "examples name 1 images that the images table does not hold",
    ),
    "image ids not of samples": (
        ["UPDATE images SET image_id = 100000 WHERE image_id = (SELECT min(image_id) FROM images)"],
        "images.image_id are not distinct ids of samples",
    ),
    "sample ids not dense": (
        ["UPDATE samples SET image_id = 100000 WHERE image_id = 0"],
        "samples.image_id is not dense from 0",
    ),
    "a sample row missing": (
        ["DELETE FROM samples WHERE image_id = (SELECT max(image_id) FROM samples)"],
        "but meta.sample.n_images is",
    ),
    "sample codes of an unknown image": (
        ["UPDATE sample_codes SET image_id = 100000 WHERE layer = 20 AND image_id = 0"],
        "sample_codes of layer 20 name images 1 to 100000",
    ),
    "sample codes of an unknown layer": (["UPDATE sample_codes SET layer = 7 WHERE layer = 20"], "layer 7"),
    "sample codes not of k latents": (
        ["UPDATE sample_codes SET indices = indices[1:2] WHERE layer = 11"],
        "a sample code of layer 11 has 2 indices",
    ),
    "embeddings said absent": ([meta("embeddings", "null")], "but meta.embeddings is null"),
    "an embedding missing": (
        ["UPDATE samples SET embedding = NULL WHERE image_id = 3"],
        "samples.embedding is NULL in 1 rows, but meta.embeddings is set",
    ),
    "prototypes of the wrong size": (  # the start checks one vector; the search cache's export checks each
        ["UPDATE features SET prototype = '\\x00\\x01'::BLOB WHERE layer = 20 AND prototype IS NOT NULL"],
        "features.prototype (layer 20) holds a vector of 2 bytes, not",
    ),
    "zero-shot lists of different lengths": (
        ["UPDATE features SET zero_shot_scores = [0.5, 0.4, 0.3, 0.2, 0.1, 0.0] WHERE layer = 11 AND feature = 9"],
        "layer 11 has 1 features whose zero-shot terms, scores and margins differ in length",
    ),
    "a vocabulary term missing": (
        ["DELETE FROM vocabulary WHERE term = (SELECT min(term) FROM vocabulary)"],
        "terms, but meta.zero_shot says",
    ),
    "an example of an unknown kind": (
        ["UPDATE examples SET kind = 'odd' WHERE feature = 8 AND rank = 1"],
        "have kinds other than top",
    ),
    "a top example in a band": (
        ["UPDATE examples SET band = 1 WHERE kind = 'top' AND feature = 8 AND rank = 1"],
        "have kinds other than top",
    ),
    "a band beyond band_count": (
        ["UPDATE examples SET band = 7 WHERE kind = 'band' AND layer = 20"],
        "bands 1 to meta.band_count = 2",
    ),
    "rank 0": (["UPDATE examples SET rank = 0 WHERE kind = 'top' AND feature = 8 AND rank = 1"], "have rank 0"),
    "examples.heatmap NULL": (
        [not_null_dropped("examples", "heatmap"), "UPDATE examples SET heatmap = NULL WHERE feature = 9"],
        "examples.heatmap is NULL",
    ),
    "heatmaps not of the grid": (
        ["UPDATE examples SET heatmap = '\\x00\\x01'::BLOB WHERE layer = 11"],
        "has a 2-byte heatmap for a 16 x 16 grid",
    ),
    "images.thumbnail NULL": (
        [not_null_dropped("images", "thumbnail"), "UPDATE images SET thumbnail = NULL"],
        "images.thumbnail is NULL",
    ),
    "a column of another type": (
        ["ALTER TABLE features ALTER frequency TYPE VARCHAR"],
        "features.frequency is VARCHAR, not DOUBLE",
    ),
    "a column missing": (
        ["ALTER TABLE images DROP COLUMN caption"],
        f"does not match schema version {schema.version_text()}: missing images.caption",
    ),
    "a table missing": (["DROP TABLE examples"], "missing table examples"),
}


def corrupted(good: Path, folder: Path, statements: list[str]) -> Path:
    path = folder / "index.duckdb"
    shutil.copy(good, path)
    con = duckdb.connect(str(path))
    for statement in statements:
        con.execute(statement)
    con.close()
    return path


@pytest.fixture
def restored_environment():
    """`serve` exports CLIPSCOPE_* variables for its workers; put the environment back afterwards."""
    from clipscope_explorer.app.settings import get_settings

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    get_settings.cache_clear()


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_index_is_refused_at_start_in_one_line(index_path, tmp_path, case, capsys, restored_environment):
    from clipscope_explorer.cli import main

    statements, expected = CORRUPTIONS[case]
    path = corrupted(index_path, tmp_path, statements)
    with pytest.raises(IndexOpenError) as error:
        check_index(path)
    message = str(error.value)
    assert expected in message and str(path) in message and "\n" not in message, message

    assert main(["serve", str(path), "--no-live"]) == 2
    err = capsys.readouterr().err
    assert err == f"clipscope-explorer: error: {message}\n"


def test_the_console_script_refuses_it_too(index_path, tmp_path):
    path = corrupted(index_path, tmp_path, CORRUPTIONS["layers.n_features NULL"][0])
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from clipscope_explorer.cli import main; raise SystemExit(main())",
            "serve",
            str(path),
            "--no-live",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("CLIPSCOPE_")},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "layers.n_features is NULL (layer 20)" in result.stderr


def test_an_index_lacking_what_newer_code_needs_names_the_command_that_rebuilds_it(index_path, tmp_path, monkeypatch):
    """A table that a later minor version adds, and that this code needs, refuses an index written before it
    with the precompute command for the same sources, model, SAEs and layers."""
    from clipscope_explorer.cli import build_parser

    current, later = schema.SCHEMA_MINOR, schema.SCHEMA_MINOR + 1
    future = schema.Table("future_table", (schema.Column("layer", "INTEGER", since=later),), since=later)
    monkeypatch.setitem(schema.TABLES, "future_table", future)
    monkeypatch.setattr(schema, "SCHEMA_MINOR", later)
    path = Path(shutil.copy(index_path, tmp_path / "old index.duckdb"))
    with pytest.raises(IndexOpenError) as error:
        check_index(path)
    message = str(error.value)
    assert message.startswith(
        f"{path} is an index of schema version 1.{current}, without table future_table (schema version "
        f"1.{later}) that this explorer needs; rebuild it: clipscope-explorer precompute "
    )
    command = shlex.split(message.split("rebuild it: ", 1)[1])
    assert command[:2] == ["clipscope-explorer", "precompute"]
    args = build_parser().parse_args(command[1:])
    assert (args.images, args.model, args.pretrained, args.sae, args.layers, Path(args.out)) == (
        ["shards/00000.tar", "shards/00001.tar"],
        "ViT-L-14",
        "laion2b_s32b_b82k",
        "lewington/CLIP-ViT-L-scope",
        [11, 20],
        path,
    )


def test_an_index_of_an_older_major_version_names_the_command_that_rebuilds_it(index_path, tmp_path, monkeypatch):
    from clipscope_explorer.precompute.index import check

    monkeypatch.setattr(check, "SCHEMA_VERSION", 2)
    with pytest.raises(IndexOpenError) as error:
        check_index(index_path)
    assert str(error.value).startswith(
        f"{index_path} has index schema version 1; this explorer reads schema "
        "version 2; rebuild it: clipscope-explorer precompute --images "
    )


def test_what_the_check_accepts_serves_every_page(index_path, tmp_path):
    """A newer minor version (a table, a column and a meta key this code does not know) and NULL where the
    schema allows it (captions, URLs, a layer's SAE file and checkpoint) are served:
    no page answers 500."""
    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    path = corrupted(
        index_path,
        tmp_path,
        [
            meta("schema_minor", "7"),
            "INSERT INTO meta VALUES ('future_source', '{\"runs\": 3}')",
            "CREATE TABLE future_table (layer INTEGER, feature INTEGER)",
            "ALTER TABLE features ADD COLUMN future_score DOUBLE",
            "UPDATE images SET caption = NULL, url = NULL",
            "UPDATE layers SET sae_file = NULL, checkpoint = NULL WHERE layer = 11",
        ],
    )
    check_index(path)
    settings = Settings(index=path, live=False, upload_store=tmp_path / "uploads")
    with TestClient(create_app(settings), follow_redirects=False) as client:
        index = client.app.state.index
        image_id = index.examples(20, 9, heatmaps=False)[0]["image_id"]
        values = {
            "layer": "20",
            "feature": "9",
            "image_id": str(image_id),
            "index_id": index.index_id,
            "upload_id": "0" * 32,
        }
        walked = 0
        for endpoint in endpoints(client.app):
            if "GET" in endpoint.methods and set(endpoint.path_params) <= set(values):
                response = client.get(fill(endpoint.path, values))
                assert response.status_code < 500, (endpoint.path, response.status_code)
                walked += 1
        assert walked > 20

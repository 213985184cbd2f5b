"""`clipscope-explorer export`: the files read back with pyarrow and DuckDB hold what the server's JSON says
for the same features, JSONL holds what Parquet holds, dataset_info.json describes exactly what was written,
and bad input or a failed write leaves nothing under a final name."""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from clipscope_explorer.app.models import round_sig
from clipscope_explorer.app.pages.features import heatmap_values
from clipscope_explorer.cli import build_parser, main, options_from
from clipscope_explorer.export import ExportError, ExportOptions, export
from clipscope_explorer.export_files import ParquetSink
from tests.app.conftest import DEAD, LAYERS, N_FEATURES, build_index

TABLES = ("layers", "features", "examples", "images")
SAMPLE = [(11, 0), (11, 3), (11, 5), (20, 8), (20, 9), (20, 14), (20, 40), (20, 63)]  # alive, rare, dead, ...


@pytest.fixture(scope="module")
def index_path(tmp_path_factory) -> Path:
    return build_index(tmp_path_factory.mktemp("export_index") / "index.duckdb")


@pytest.fixture(scope="module")
def client(index_path, tmp_path_factory):
    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    settings = Settings(index=index_path, live=False, text=False, upload_store=tmp_path_factory.mktemp("uploads"))
    with TestClient(create_app(settings), follow_redirects=False) as test_client:
        yield test_client


def _query(index_path: Path, sql: str) -> list[tuple]:
    """Rows of `sql` on the index (opened as the test server opens it: DuckDB shares one instance per file)."""
    con = duckdb.connect(str(index_path), read_only=True, config={"threads": 1})
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _export(index_path: Path, out: Path, **options) -> Path:
    export(ExportOptions(index=index_path, out=out, progress=False, **options))
    return out


@pytest.fixture(scope="module")
def parquet_dir(index_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parquet") / "export"
    return _export(index_path, out, with_heatmaps=True, with_images=True, batch_rows=100)


@pytest.fixture(scope="module")
def tables(parquet_dir) -> dict:
    return {name: pq.read_table(parquet_dir / f"{name}.parquet") for name in TABLES}


def _rows(table, layer: int, feature: int) -> list[dict]:
    return [r for r in table.to_pylist() if r["layer"] == layer and r["feature"] == feature]


def test_the_files_hold_every_row_of_the_index(parquet_dir, tables, index_path):
    assert sorted(p.name for p in parquet_dir.iterdir()) == sorted(
        [f"{name}.parquet" for name in TABLES] + ["dataset_info.json"]
    )
    for name in TABLES:
        assert tables[name].num_rows == _query(index_path, f"SELECT count(*) FROM {name}")[0][0], name
    assert tables["features"].num_rows == len(LAYERS) * N_FEATURES
    keys = [(r["layer"], r["feature"]) for r in tables["features"].select(["layer", "feature"]).to_pylist()]
    assert keys == sorted(keys)


def test_duckdb_reads_the_files_and_joins_them(parquet_dir, tables):
    folder = str(parquet_dir)
    rows = duckdb.sql(
        f"SELECT count(*), count(i.image_id), sum((e.key = i.key)::INTEGER) FROM '{folder}/examples.parquet' e "
        f"LEFT JOIN '{folder}/images.parquet' i USING (image_id)"
    ).fetchall()[0]
    assert rows == (tables["examples"].num_rows,) * 3
    dead = duckdb.sql(f"SELECT count(*) FROM '{folder}/features.parquet' WHERE n_fired_tokens = 0").fetchall()[0][0]
    assert dead == len(DEAD) * len(LAYERS)
    first = duckdb.sql(
        f"SELECT heatmap FROM '{folder}/examples.parquet' WHERE layer = 20 AND feature = 8 AND kind = 'top' "
        "ORDER BY rank LIMIT 1"
    ).fetchall()[0][0]
    assert len(first) == 256 and max(first) > 0


@pytest.mark.parametrize("layer, feature", SAMPLE)
def test_features_and_examples_equal_the_feature_pages_json(client, tables, layer, feature):
    page = client.get(f"/api/layers/{layer}/features/{feature}").json()
    [row] = _rows(tables["features"], layer, feature)
    for name in ("n_fired_tokens", "n_fired_images", "n_fired_cls", "frequency", "image_frequency", "cls_frequency"):
        assert row[name] == page[name], name
    assert (row["max_activation"], row["mean_activation"]) == (page["max_activation"], page["mean_activation"])
    assert (row["label"], row["label_terms"]) == (page["label"], page["label_terms"])
    assert row["histogram"] == page["histogram"]["counts"] and row["position_mean"] == page["position_mean"]
    assert row["similar_features"] == [s["feature"] for s in page["similar"]]
    assert [round_sig(c, 4) for c in row["similar_cosines"]] == [s["cosine"] for s in page["similar"]]
    labels = zip(row["zero_shot_terms"], row["zero_shot_scores"], row["zero_shot_margins"])
    assert [{"text": t, "score": round_sig(s), "margin": round_sig(m)} for t, s, m in labels] == page[
        "zero_shot_labels"
    ]

    shown = [("top", 0, e) for e in page["top_images"]]
    shown += [("band", band["band"], e) for band in page["bands"] for e in band["examples"]]
    examples = _rows(tables["examples"], layer, feature)
    assert len(examples) == len(shown) and (feature not in DEAD or not examples)
    for got, (kind, band, want) in zip(examples, shown):
        assert (got["kind"], got["band"], got["rank"], got["image_id"]) == (kind, band, want["rank"], want["image_id"])
        assert (got["key"], got["caption"]) == (want["key"], want["caption"])
        assert round_sig(got["activation"]) == want["activation"]
        assert round_sig(got["cls_activation"]) == want["cls_activation"]
        assert got["heatmap"] == want["heatmap"]  # the page's own values, exactly


def test_every_heatmap_is_decoded_as_the_page_decodes_it(tables, index_path):
    stored = {
        (layer, feature, kind, band, rank): (scale, blob)
        for layer, feature, kind, band, rank, scale, blob in _query(
            index_path, "SELECT layer, feature, kind, band, rank, heatmap_scale, heatmap FROM examples"
        )
    }
    exported = tables["examples"].to_pylist()
    assert len(exported) == len(stored)
    for row in exported:
        scale, blob = stored[row["layer"], row["feature"], row["kind"], row["band"], row["rank"]]
        assert row["heatmap"] == heatmap_values(scale, blob)


def test_layers_and_images_equal_the_server_json(client, tables):
    for row in tables["layers"].to_pylist():
        page = client.get(f"/api/layers/{row['layer']}").json()
        common = [name for name in row if name in page]
        assert len(common) == len(row) - 1 and {name: page[name] for name in common} == {n: row[n] for n in common}
        edges = client.get(f"/api/layers/{row['layer']}/features/8").json()["histogram"]["edges"]
        assert row["histogram_edges"] == edges
    examples = tables["examples"].to_pylist()
    for image in tables["images"].to_pylist()[::7]:
        shown = next(e for e in examples if e["image_id"] == image["image_id"])
        page = client.get(f"/api/layers/{shown['layer']}/features/{shown['feature']}/examples/{image['image_id']}")
        page = page.json()
        for name in ("source", "key", "url", "caption", "width", "height"):
            assert image[name] == page[name], name
        assert image["thumbnail"] == client.get(page["thumbnail_url"]).content


def test_dataset_info_describes_exactly_the_columns_written(parquet_dir, tables, index_path):
    info = json.loads((parquet_dir / "dataset_info.json").read_text())
    assert set(info["tables"]) == set(TABLES)
    for name, table in tables.items():
        described = info["tables"][name]
        assert described["file"] == f"{name}.parquet" and described["rows"] == table.num_rows
        assert [c["name"] for c in described["columns"]] == table.schema.names
        assert all(c["type"] and len(c["description"]) > 10 for c in described["columns"])
    types = {(t, c["name"]): c["type"] for t, d in info["tables"].items() for c in d["columns"]}
    assert types["examples", "heatmap"] == "list<float64>" and types["examples", "activation"] == "float32"
    assert types["images", "thumbnail"] == "binary" and types["features", "label_terms"] == "list<string>"
    meta = {key: json.loads(value) for key, value in _query(index_path, "SELECT key, value FROM meta")}
    provenance = info["index"]
    assert provenance["schema_version"] == f"{meta['schema_version']}.{meta['schema_minor']}"
    assert (provenance["model"], provenance["sae"]) == (meta["model"], meta["sae"])
    assert provenance["index_id"] == meta["index_id"] and provenance["file"] == index_path.name
    assert info["selection"] == {"layers": list(LAYERS), "features": None, "heatmaps": True, "thumbnails": True}


def test_without_the_options_there_are_no_heatmaps_or_thumbnails(index_path, tmp_path):
    out = _export(index_path, tmp_path / "plain")
    assert "heatmap" not in pq.read_schema(out / "examples.parquet").names
    assert "thumbnail" not in pq.read_schema(out / "images.parquet").names
    info = json.loads((out / "dataset_info.json").read_text())
    assert [c["name"] for c in info["tables"]["examples"]["columns"]][-1] == "cls_activation"


def test_jsonl_holds_what_parquet_holds(index_path, tables, tmp_path):
    out = _export(index_path, tmp_path / "jsonl", format="jsonl", with_heatmaps=True, with_images=True)
    info = json.loads((out / "dataset_info.json").read_text())
    for name, table in tables.items():
        lines = (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [c["name"] for c in info["tables"][name]["columns"]] == table.schema.names
        assert len(lines) == table.num_rows == info["tables"][name]["rows"]
        for line, expected in zip(lines, table.to_pylist()):
            row = json.loads(line)
            assert list(row) == list(expected)
            for column, field in zip(expected, table.schema):
                value, want = row[column], expected[column]
                if pa.types.is_float32(field.type):
                    value = float(np.float32(value))
                elif pa.types.is_list(field.type) and pa.types.is_float32(field.type.value_type):
                    value = np.asarray(value, np.float32).tolist()
                elif pa.types.is_binary(field.type):
                    value = base64.b64decode(value)
                assert value == want, (name, column)


def test_a_selection_of_layers_and_features(index_path, client, tmp_path):
    assert main(["export", str(index_path), "--out", str(tmp_path / "some"), "--layers", "20", "--features", "8-12",
                 "--no-progress"]) == 0  # fmt: skip
    features = pq.read_table(tmp_path / "some" / "features.parquet").select(["layer", "feature"]).to_pylist()
    assert features == [{"layer": 20, "feature": f} for f in range(8, 13)]
    examples = pq.read_table(tmp_path / "some" / "examples.parquet").to_pylist()
    assert {(e["layer"], e["feature"]) for e in examples} == {(20, f) for f in range(8, 13) if f not in DEAD}
    shown = {e["image_id"] for f in range(8, 13) for e in _page_examples(client, 20, f)}
    images = pq.read_table(tmp_path / "some" / "images.parquet").column("image_id").to_pylist()
    assert sorted(images) == sorted(shown) and len(images) == len(set(images))
    info = json.loads((tmp_path / "some" / "dataset_info.json").read_text())
    assert info["selection"]["layers"] == [20] and info["selection"]["features"] == [8, 12]


def _page_examples(client, layer: int, feature: int) -> list[dict]:
    page = client.get(f"/api/layers/{layer}/features/{feature}").json()
    return page["top_images"] + [e for band in page["bands"] for e in band["examples"]]


def test_progress_bars_show_rate_and_eta_on_stderr(index_path, tmp_path, capsys):
    assert main(["export", str(index_path), "--out", str(tmp_path / "p")]) == 0
    out, err = capsys.readouterr()
    assert out == f"export written: {tmp_path / 'p'} (described in dataset_info.json)\n"
    for table in TABLES:
        assert f"{table}: 100%" in err
    assert "rows/s" in err and "<00:00" in err


def test_every_flag_reaches_the_export_options(tmp_path):
    commands = build_parser()._subparsers._group_actions[0].choices
    dests = {action.dest for action in commands["export"]._actions} - {"help"}
    assert dests <= {field.name for field in dataclasses.fields(ExportOptions)}
    argv = ["export", "i.duckdb", "--out", str(tmp_path / "o"), "--features", "7", "--layers", "22,20"]
    options = options_from(ExportOptions, build_parser().parse_args(argv))
    assert (options.index, options.out, options.features, options.layers) == (
        Path("i.duckdb"),
        tmp_path / "o",
        (7, 7),
        [22, 20],
    )
    assert (options.format, options.with_heatmaps, options.with_images, options.overwrite) == ("parquet", *[False] * 3)


def _refused(capsys, args: list[str]) -> str:
    """The one-line error of the command (argparse refuses a bad flag value by exiting, the export by returning)."""
    try:
        status = main(["export", *args, "--no-progress"])
    except SystemExit as exit:
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("clipscope-explorer export: error: ") and err.count("\n") == 1, err
    return err


def _index_copy(index_path: Path, folder: Path, *statements: str) -> Path:
    path = Path(shutil.copy(index_path, folder / "copy.duckdb"))
    con = duckdb.connect(str(path))
    for statement in statements:
        con.execute(statement)
    con.close()
    return path


def test_bad_input_is_refused_in_one_line_and_writes_nothing(index_path, tmp_path, capsys):
    out = tmp_path / "out"
    cases = {
        "missing": ([str(tmp_path / "nope.duckdb")], "index not found"),
        "not duckdb": ([str(_write(tmp_path / "junk.duckdb", b"not a database" * 100))], "junk.duckdb"),
        "no tables": ([str(_empty_duckdb(tmp_path / "empty.duckdb"))], "empty.duckdb"),
        "newer schema": (
            [str(_index_copy(index_path, tmp_path, "UPDATE meta SET value = '2' WHERE key = 'schema_version'"))],
            "schema version 2; this explorer reads schema version 1",
        ),
        "unknown layer": ([str(index_path), "--layers", "11,3"], "argument --layers: the index has no layer 3"),
        "range out of bounds": ([str(index_path), "--features", "60-64"], "argument --features: 60-64 is outside"),
        "range past the end": ([str(index_path), "--features", "64"], "argument --features: 64-64 is outside"),
        "empty range": ([str(index_path), "--features", "9-3"], "argument --features: '9-3' is an empty range"),
        "not a range": ([str(index_path), "--features", "1..9"], "argument --features: '1..9' is not a feature range"),
        "negative": ([str(index_path), "--features=-1-4"], "argument --features: '-1-4' is not a feature range"),
    }
    for name, (args, expected) in cases.items():
        err = _refused(capsys, [*args, "--out", str(out)])
        assert expected in err, (name, err)
        assert not out.exists(), name


def test_an_older_schema_is_refused_with_the_command_that_rebuilds_it(index_path, tmp_path, capsys, monkeypatch):
    from clipscope_explorer.precompute.index import check

    monkeypatch.setattr(check, "SCHEMA_VERSION", 2)
    err = _refused(capsys, [str(index_path), "--out", str(tmp_path / "out")])
    assert "has index schema version 1; this explorer reads schema version 2; rebuild it:" in err
    assert not (tmp_path / "out").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _empty_duckdb(path: Path) -> Path:
    duckdb.connect(str(path)).close()
    return path


def test_a_folder_that_is_not_empty_is_refused_unless_overwrite(index_path, tmp_path, capsys):
    out = tmp_path / "out"
    _export(index_path, out, format="jsonl")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = _refused(capsys, [str(index_path), "--out", str(out)])
    assert f"argument --out: {out} is not empty (add --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["export", str(index_path), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{t}.parquet" for t in TABLES] + ["dataset_info.json", "notes.txt"])  # jsonl gone
    assert (out / "notes.txt").read_text() == "mine"
    file = tmp_path / "a-file"
    file.write_text("x")
    assert "is a file, not a folder" in _refused(capsys, [str(index_path), "--out", str(file)])


@pytest.mark.parametrize("format", ["parquet", "jsonl"])
def test_a_write_that_fails_midway_leaves_no_partial_file(index_path, tmp_path, monkeypatch, format):
    from clipscope_explorer.export_files import JsonlSink

    out = tmp_path / "out"
    _export(index_path, out)  # an earlier export, to be replaced
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sink = {"parquet": ParquetSink, "jsonl": JsonlSink}[format]
    write, calls = sink.write, []

    def full_disk(self, batch):
        calls.append(batch.num_rows)
        if len(calls) == 6:  # in the examples table, after rows of it were written
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, batch)

    monkeypatch.setattr(sink, "write", full_disk)
    with pytest.raises(ExportError) as error:
        _export(index_path, out, format=format, overwrite=True, with_heatmaps=True, batch_rows=100)
    assert str(error.value) == f"cannot write {out / f'examples.{format}'}: No space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial file, the old export whole
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(sink, "write", full_disk)
    calls.clear()
    with pytest.raises(ExportError):
        _export(index_path, fresh, format=format, with_heatmaps=True, batch_rows=100)
    assert not fresh.exists()  # made for the export, removed with it


def test_hugging_face_datasets_loads_the_parquet_files(parquet_dir, tables):
    """Each table on its own (the loader wants one set of columns per call)."""
    datasets = pytest.importorskip("datasets")
    for name in TABLES:
        loaded = datasets.load_dataset("parquet", data_files=str(parquet_dir / f"{name}.parquet"), split="train")
        assert loaded.num_rows == tables[name].num_rows and loaded.column_names == tables[name].schema.names
        assert loaded[0] == tables[name].slice(0, 1).to_pylist()[0]

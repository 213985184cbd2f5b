"""Startup: a missing, corrupt, foreign or wrong-version index is refused with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from clipscope_explorer.app.index_file import IndexOpenError, check_index
from clipscope_explorer.app.serving.server import ServeOptions, serve

REPO = Path(__file__).resolve().parents[2]


def _meta_only(path: Path, **meta) -> Path:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value JSON)")
    for key, value in meta.items():
        con.execute("INSERT INTO meta VALUES (?, ?)", [key, json.dumps(value)])
    con.close()
    return path


@pytest.fixture(scope="module")
def bad_indexes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    corrupt = root / "corrupt.duckdb"
    corrupt.write_bytes(os.urandom(4096))
    foreign = root / "foreign.duckdb"
    con = duckdb.connect(str(foreign))
    con.execute("CREATE TABLE people (name VARCHAR)")
    con.close()
    return {
        "missing": root / "missing.duckdb",
        "directory": root,
        "corrupt": corrupt,
        "foreign": foreign,
        "version": _meta_only(root / "v99.duckdb", schema_version=99, index_id="x", created_at="t"),
        "incomplete": _meta_only(root / "v1.duckdb", schema_version=1),
    }


EXPECTED = {
    "missing": "index not found",
    "directory": "not a file",
    "corrupt": "cannot open",
    "foreign": "no meta table",
    "version": "schema version 99; this explorer reads schema version 1",
    "incomplete": "does not match schema version 1",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_index_is_refused_with_one_line(bad_indexes, kind):
    with pytest.raises(IndexOpenError) as error:
        check_index(bad_indexes[kind])
    message = str(error.value)
    assert EXPECTED[kind] in message and "\n" not in message
    assert str(bad_indexes[kind]) in message


@pytest.mark.parametrize("kind", ["missing", "corrupt", "version"])
def test_serve_exits_2_with_one_line(bad_indexes, kind, capsys, monkeypatch):
    monkeypatch.delenv("CLIPSCOPE_INDEX", raising=False)
    code = serve(ServeOptions(index=bad_indexes[kind], port=0))
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clipscope-explorer: error: ")


def test_serve_refuses_a_taken_port_before_loading_anything(index_path, capsys, monkeypatch):
    """One worker binds its socket before uvicorn starts (and before the app loads a model), as N workers do."""
    for name in ("CLIPSCOPE_INDEX", "CLIPSCOPE_LIVE"):
        monkeypatch.setenv(name, "")  # restored afterwards: serve() sets them
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = serve(ServeOptions(index=index_path, port=port, live=False))
    assert code == 2
    assert capsys.readouterr().err == (
        f"clipscope-explorer: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def test_the_good_index_passes(index_path):
    check_index(index_path)


def test_uvicorn_entry_point_refuses_a_bad_index_in_one_line(bad_indexes):
    env = {**os.environ, "CLIPSCOPE_INDEX": str(bad_indexes["version"])}
    result = subprocess.run(
        [sys.executable, "-c", "import clipscope_explorer.app.main as m; m.app"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "schema version 99" in result.stderr


def test_importing_the_app_module_builds_nothing():
    result = subprocess.run(
        [sys.executable, "-c", "import clipscope_explorer.app.main as m; print('app' in vars(m))"],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "CLIPSCOPE_INDEX"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "False"


def test_a_server_without_live_encoding_never_imports_torch(index_path, tmp_path):
    """--no-live workers stay small: torch and the model code load only with the encoder."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from clipscope_explorer.app.main import create_app\n"
        "from clipscope_explorer.app.settings import Settings\n"
        f"settings = Settings(index={str(index_path)!r}, live=False, upload_store={str(tmp_path)!r})\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    assert client.get('/layers/20/features/8').status_code == 200\n"
        "    assert client.get('/upload').status_code == 200\n"
        "print(sorted(m for m in sys.modules"
        " if m == 'torch' or m.startswith(('clipscope_explorer.precompute.', 'open_clip'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = eval(result.stdout.strip())  # a printed list of module names
    assert "torch" not in loaded and not any(name.startswith("open_clip") for name in loaded)
    model_side = {name for name in loaded if name.startswith("clipscope_explorer.precompute.model")}
    assert model_side == {"clipscope_explorer.precompute.model", "clipscope_explorer.precompute.model.imageio"}


def test_closing_the_index_keeps_thread_cursors_until_it_goes(index_path, tmp_path):
    """A DuckDB connection object freed by a server thread that exits while the interpreter shuts down
    aborts the process (duckdb/duckdb#13904: 5 of 60 `--no-live` server processes died so at exit). The
    index keeps every thread's cursor, closed, so none is freed by the exiting thread."""
    import shutil
    import threading

    from clipscope_explorer.app.queries import open_index

    index = open_index(shutil.copy(index_path, tmp_path / "index.duckdb"))
    cursors = []
    worker = threading.Thread(target=lambda: cursors.append(index._cursor()) or index.feature(20, 8))
    worker.start()
    worker.join()
    cursor = cursors.pop()
    index.close()
    assert any(kept is cursor for kept in index._cursors)
    with pytest.raises(duckdb.ConnectionException):
        cursor.execute("SELECT 1")  # closed all the same


def test_serve_flags_reach_the_settings(monkeypatch, tmp_path):
    """`serve`'s live-encoding flags travel as CLIPSCOPE_* variables (so `--workers N` processes see them)."""
    from clipscope_explorer.app.serving.server import live_environment
    from clipscope_explorer.app.settings import Settings
    from clipscope_explorer.cli import build_parser, options_from

    def environment(*flags: str) -> dict[str, str]:
        args = build_parser().parse_args(["serve", "index.duckdb", *flags])
        return live_environment(options_from(ServeOptions, args))

    for name, value in environment(
        "--live-model",
        "local-dir:/models/vit",
        "--live-sae",
        "/saes/scope",
        "--live-layers",
        "20,5",
        "--live-device",
        "cuda:1",
        "--live-precision",
        "bf16",
        "--no-store-uploads",
        "--upload-store",
        str(tmp_path / "store"),
        "--max-upload-mb",
        "2.5",
    ).items():
        monkeypatch.setenv(name, value)
    settings = Settings(index=tmp_path / "index.duckdb")
    assert (settings.live, settings.live_model, settings.live_sae) == (True, "local-dir:/models/vit", "/saes/scope")
    assert (settings.live_layers, settings.live_device, settings.live_precision) == ([20, 5], "cuda:1", "bf16")
    assert not settings.store_uploads and settings.upload_store == tmp_path / "store"
    assert settings.max_upload_bytes == 2_500_000

    monkeypatch.setenv("CLIPSCOPE_LIVE", environment("--no-live")["CLIPSCOPE_LIVE"])
    assert not Settings(index=tmp_path / "index.duckdb").live
    for name in ("CLIPSCOPE_LIVE", "CLIPSCOPE_MAX_UPLOAD_BYTES"):
        monkeypatch.delenv(name)
    assert Settings(index=tmp_path / "index.duckdb").max_upload_bytes == 20_000_000  # 20 MB by default
    assert environment() == {}  # no flag given: every setting keeps its variable or default
    assert environment("--max-upload-mb", "1e-9")["CLIPSCOPE_MAX_UPLOAD_BYTES"] == "1"  # never below one byte

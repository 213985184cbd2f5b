"""The text-tower process a server's workers share (app/meaning/tower_process.py), on the tiny CLIP: workers
that use it answer exactly as one with its own tower; a tower that cannot load, a wrong key, a process that
died and a killed parent are each handled without a 500 or a stray process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipscope_explorer.app.meaning.service import TextSpec
from clipscope_explorer.app.meaning.tower_process import (
    ADDRESS_VARIABLE,
    AUTHKEY_VARIABLE,
    RemoteTextTower,
    TowerProcess,
)
from tests.app.test_meaning import QUERIES, meaning_client, wait_meaning


def tower_process(model: str) -> TowerProcess:
    return TowerProcess(TextSpec(model=model, pretrained=None, device="cpu")).start()


@pytest.fixture(scope="module")
def shared(tiny_model_spec):
    tower = tower_process(tiny_model_spec)
    yield tower
    tower.stop()


def worker(index: Path, meaning_cache: Path, monkeypatch, environment: dict[str, str]):
    """An app as a `serve` worker makes it: the tower's address in its environment."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return meaning_client(index, meaning_cache)


def test_workers_share_the_tower_and_answer_as_their_own_would(meaning_index, meaning_cache, shared, monkeypatch):
    with meaning_client(meaning_index, meaning_cache) as own:  # a tower of its own, in process
        wait_meaning(own)
        expected = [
            (
                own.get("/api/search", params={"q": q, "by": "meaning"}).json(),
                own.get(f"/api/search/images?q={q}").json(),
            )
            for q in QUERIES
        ]
    with worker(meaning_index, meaning_cache, monkeypatch, shared.environment()) as first:
        with meaning_client(meaning_index, meaning_cache) as second:
            for client in (first, second):
                wait_meaning(client)
                service = client.app.state.meaning
                assert isinstance(service.tower, RemoteTextTower) and service.text_state == "ready"
                got = [
                    (
                        client.get("/api/search", params={"q": q, "by": "meaning"}).json(),
                        client.get(f"/api/search/images?q={q}").json(),
                    )
                    for q in QUERIES
                ]
                assert got == expected
                assert any(result["meaning_results"] for result, _ in got)  # not vacuous
    assert "torch" in sys.modules  # (this test process has it anyway; the subprocess test below checks workers)


def test_a_tower_that_cannot_load_says_why(meaning_index, meaning_cache, tmp_path, monkeypatch):
    tower = tower_process(f"local-dir:{tmp_path / 'missing'}")
    try:
        with worker(meaning_index, meaning_cache, monkeypatch, tower.environment()) as client:
            wait_meaning(client)
            service = client.app.state.meaning
            assert service.text_state == "failed"
            assert service.text_message.startswith("CLIP's text tower could not be loaded")
            assert "could not load the text tower" in service.text_message
            response = client.get("/api/search/images?q=dog")
            assert response.status_code == 503 and str(tmp_path) not in response.text
    finally:
        tower.stop()


def test_a_wrong_key_is_refused(meaning_index, meaning_cache, shared, monkeypatch):
    environment = {ADDRESS_VARIABLE: shared.address, AUTHKEY_VARIABLE: os.urandom(32).hex()}
    with worker(meaning_index, meaning_cache, monkeypatch, environment) as client:
        wait_meaning(client)
        assert client.app.state.meaning.text_state == "failed"
        assert client.get("/api/search?q=dog&by=words").status_code == 200


def test_a_tower_that_died_gives_503_and_word_search_goes_on(
    meaning_index, meaning_cache, tiny_model_spec, monkeypatch
):
    tower = tower_process(tiny_model_spec)
    with worker(meaning_index, meaning_cache, monkeypatch, tower.environment()) as client:
        wait_meaning(client)
        assert client.get("/api/search/images?q=a red car").status_code == 200
        tower.stop()
        for path in ("/api/search/images?q=a blue car", "/api/search?by=meaning&q=a blue car"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert "text tower did not answer" in response.json()["detail"]
        page = client.get("/search/images?q=a green car")
        assert page.status_code == 200 and "did not answer" in page.text
        assert client.get("/api/search?q=dog&by=words").status_code == 200
        assert client.get("/api/search/images?q=a red car").status_code == 200  # asked before: cached


def test_the_tower_ends_with_its_parent(tiny_model_spec):
    """A parent killed without stopping it (SIGKILL, or os._exit here) leaves no tower behind."""
    code = (
        "import os, sys\n"
        "from clipscope_explorer.app.meaning.service import TextSpec\n"
        "from clipscope_explorer.app.meaning.tower_process import RemoteTextTower, TowerProcess\n"
        f"tower = TowerProcess(TextSpec(model={tiny_model_spec!r}, pretrained=None, device='cpu')).start()\n"
        "RemoteTextTower(tower.address, tower.authkey).connect()\n"
        "print(tower.folder, tower.process.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder, pid = result.stdout.split()[-2], int(result.stdout.split()[-1])
    deadline = time.monotonic() + 15
    while alive(pid):
        assert time.monotonic() < deadline, "the tower process outlived its parent"
        time.sleep(0.2)
    assert not Path(folder).exists()  # nor its socket


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_worker_that_shares_the_tower_loads_no_model(meaning_index, tmp_path, shared):
    """Only torch's scan comes into the worker: neither open_clip nor the text tower's weights."""
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from clipscope_explorer.app.main import create_app\n"
        "from clipscope_explorer.app.settings import Settings\n"
        f"settings = Settings(index={str(meaning_index)!r}, live=False, text=True, search_cache={str(tmp_path)!r})\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    assert client.app.state.meaning.wait(120)\n"
        "    assert client.get('/api/search/images?q=dog').status_code == 200\n"
        "print(sorted(m for m in sys.modules if m.startswith(('open_clip', 'clipscope_explorer.precompute.model'))))\n"
    )
    environment = {**os.environ, **shared.environment()}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=environment)
    assert result.returncode == 0, result.stderr
    loaded = eval(result.stdout.strip().splitlines()[-1])  # a printed list of module names
    assert loaded == ["clipscope_explorer.precompute.model", "clipscope_explorer.precompute.model.imageio"]

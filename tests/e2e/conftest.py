"""End-to-end fixtures: a real `clipscope-explorer serve` on a free port, and Debian's Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import build_index

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("CLIPSCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def e2e_index(tmp_path_factory) -> Path:
    return build_index(tmp_path_factory.mktemp("e2e") / "index.duckdb")


def run_server(
    index: Path,
    *options: str,
    ready: str = "/",
    log_path: Path | None = None,
    processes: list | None = None,
    cwd: Path = REPO,
    env: dict | None = None,
    program: tuple[str, ...] = (sys.executable, "-m", "clipscope_explorer.cli"),
):
    """Start `clipscope-explorer serve INDEX` (`program`, run in `cwd` with `env`) on a free port; yield its base
    URL; stop it. Its output goes to `log_path` (default INDEX.log); `processes`, when given, receives the server's
    `Popen`."""
    port = _free_port()
    log = open(tmp_log := log_path or index.with_suffix(".log"), "w")
    process = subprocess.Popen(
        [*program, "serve", str(index), "--port", str(port), *options],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if processes is not None:
        processes.append(process)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + ready, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not start:\n{tmp_log.read_text()}")
        time.sleep(0.2)
    try:
        yield base
    finally:
        stop_process(process)
        log.close()


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a server process; kill it if it does not stop within 15 s."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def server(e2e_index, tmp_path_factory):
    """Base URL of a running server (the CLI path, two workers sharing the read-only index). The synthetic
    index names the real ViT-L/14 release, which cannot load offline, so live encoding is off."""
    yield from run_server(
        e2e_index, "--workers", "2", "--no-live", "--upload-store", str(tmp_path_factory.mktemp("e2e_uploads"))
    )


@pytest.fixture(scope="session")
def live_server(tiny_index, tmp_path_factory):
    """A server over an index built by the real precompute job, with live encoding of its own model and SAEs."""
    import shutil

    index = Path(shutil.copy(tiny_index, tmp_path_factory.mktemp("e2e_live") / "tiny.duckdb"))
    running = run_server(index, "--upload-store", str(tmp_path_factory.mktemp("e2e_live_uploads")))
    base = next(running)
    try:
        deadline = time.monotonic() + 60
        while httpx.get(base + "/api/upload", timeout=5).json()["live"]["state"] == "loading":
            assert time.monotonic() < deadline, "live encoder did not load"
            time.sleep(0.2)
        yield base
    finally:
        running.close()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must install it (.ci/run)")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def new_tab(browser, server: str):
    """A fresh page that records console errors and failed same-origin requests (close its context after)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server)
    tab = context.new_page()
    tab.problems = []
    tab.on(
        "console",
        lambda m: tab.problems.append(f"console {m.type}: {m.text} at {m.location}") if m.type == "error" else None,
    )
    tab.on("pageerror", lambda e: tab.problems.append(f"page error: {e}"))
    tab.on(
        "response",
        lambda r: tab.problems.append(f"{r.status} {r.url}") if r.status >= 400 and r.url.startswith(server) else None,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    return tab


@pytest.fixture()
def page(browser, server):
    tab = new_tab(browser, server)
    yield tab
    tab.context.close()


@pytest.fixture()
def live_page(browser, live_server):
    tab = new_tab(browser, live_server)
    yield tab
    tab.context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

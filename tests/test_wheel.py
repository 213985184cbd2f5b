"""The built wheel works on its own: installed into a fresh virtual environment outside the checkout, its
`clipscope-explorer serve` renders every kind of page, JSON twin and static file from the installed copy.

The environment sees the test interpreter's packages (torch and the rest are not installed again) but gets its
own copy of clipscope_explorer from the wheel, which it imports ahead of the editable checkout (checked).
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import build_index
from tests.e2e.conftest import REPO, run_server

# top-level folders that the wheel is not built from (and that may be large)
NOT_PACKAGED = {
    ".git",
    ".ci",
    "build",
    "dist",
    "data",
    "docs",
    "tests",
    "bench",
    "test-artifacts",
    ".whl",
    ".pytest_cache",
}
SOURCES = {
    "clipscope_explorer": "clipscope_explorer",
    "app": "clipscope_explorer/app",
    "precompute": "clipscope_explorer/precompute",
    "templates": "clipscope_explorer/templates",
    "static": "clipscope_explorer/static",
}  # checkout folder -> installed folder (pyproject's package-dir)


def _ignored(folder: str, names: list[str]) -> set[str]:
    top = Path(folder).resolve() == REPO
    return {
        n for n in names if (top and n in NOT_PACKAGED) or n == "__pycache__" or n.endswith((".egg-info", ".duckdb"))
    }


def _run(*command, cwd: Path, env: dict) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, command))}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


class Links(HTMLParser):
    """Same-site URLs a page refers to (href and src), and its JSON twin (`<link rel="alternate">`)."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.twin: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and attrs.get("rel") == "alternate" and attrs.get("type") == "application/json":
            self.twin = attrs.get("href")
        for name in ("href", "src"):
            url = attrs.get(name)
            if url and url.startswith("/") and not url.startswith("//"):
                self.urls.append(url.split("#")[0])


def _kind(url: str) -> str:
    """A URL's shape: /layers/20/features/8?page=2 -> /layers/N/features/N?page (one visit per shape)."""
    path, _, query = url.partition("?")
    names = sorted(part.split("=")[0] for part in query.split("&") if part)
    return re.sub(r"/[0-9a-f]*[0-9][0-9a-f]*(?=/|\.|$)", "/N", path) + ("?" + "&".join(names) if names else "")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh virtual environment with the wheel built from a copy of the checkout installed (no deps)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=_ignored)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        source,
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        work / "dist",
        cwd=work,
        env=env,
    )
    (wheel,) = (work / "dist").glob("clipscope_explorer-*.whl")
    root = work / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root, cwd=work, env=env)
    python = root / "bin" / "python"
    own = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work, env=env).strip())
    # the test interpreter's packages come after the venv's own (also when this interpreter is itself a venv)
    dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if Path(d).is_dir()]
    (own / "zz_test_interpreter.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    _run(
        python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", "-q", wheel, cwd=work, env=env
    )
    return root, env


def test_the_environment_imports_its_own_copy(venv, tmp_path):
    root, env = venv
    where = _run(
        root / "bin" / "python",
        "-c",
        "import clipscope_explorer; print(clipscope_explorer.__file__)",
        cwd=tmp_path,
        env=env,
    ).strip()
    installed = Path(where).resolve().parent
    assert installed.is_relative_to(root.resolve()) and not installed.is_relative_to(REPO), where
    for folder, target in SOURCES.items():  # every module, template and static file of the checkout is in the wheel
        wanted = {f for f in _files(REPO / folder) if not f.endswith((".pyc", ".egg-info"))}
        missing = wanted - _files(installed.parent / target)
        assert not missing, f"the wheel lacks {sorted(missing)} from {folder}/"


def test_the_installed_server_renders_every_page(venv, tmp_path):
    root, env = venv
    index = build_index(tmp_path / "index.duckdb")
    servers = run_server(
        index,
        "--no-live",
        "--upload-store",
        str(tmp_path / "uploads"),
        program=(str(root / "bin" / "clipscope-explorer"),),
        cwd=tmp_path,
        env=env,
    )
    base = next(servers)
    try:
        seen: dict[str, str] = {}
        todo = [
            "/",
            "/layers/20",
            "/layers/20/features/8",
            "/search?q=dog",
            "/upload",
            "/docs",
            "/api",
            "/openapi.json",
        ]
        with httpx.Client(base_url=base, timeout=30, follow_redirects=True) as client:
            while todo and len(seen) < 200:
                url = todo.pop(0)
                if _kind(url) in seen:
                    continue
                response = client.get(url)
                if url.startswith("/api/search/images") and response.status_code == 503:  # served --no-text
                    assert response.json()["detail"].startswith("Search by meaning is turned off"), response.text
                    seen[_kind(url)] = url
                    continue
                assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:300]}"
                seen[_kind(url)] = url
                if response.headers["content-type"].startswith("text/html"):
                    links = Links()
                    links.feed(response.text)
                    assert links.twin or url in ("/docs", "/upload"), f"{url} names no JSON twin"
                    todo += ([links.twin] if links.twin else []) + links.urls
            assert client.get("/layers/20/features/8", headers={"HX-Request": "true"}).status_code == 200
        kinds = set(seen)
        for wanted in (
            "/",
            "/layers/N",
            "/layers/N/features/N",
            "/search?q",
            "/upload",
            "/api",
            "/api/layers/N",
            "/api/layers/N/features/N",
            "/api/search?q",
            "/openapi.json",
            "/static/style.css",
            "/static/app.js",
            "/static/vendor/htmx.min.js",
        ):
            assert wanted in kinds, f"{wanted} was not reached from the pages: {sorted(kinds)}"
        for name in _files(REPO / "static"):  # every static file, byte for byte
            assert httpx.get(f"{base}/static/{name}").content == (REPO / "static" / name).read_bytes(), name
    finally:
        servers.close()

"""Serving under a path prefix behind a reverse proxy: every link, form action, image and static URL,
redirect, `HX-Location` and JSON URL carries the prefix, and every one of them answers.

Two ways to get a prefix, both walked: `CLIPSCOPE_ROOT_PATH` (requests arrive with the prefix, as from a
proxy that keeps it, or without, as from one that strips it), and an ASGI server's own `root_path`
(`uvicorn --root-path`), with the setting unset.
"""

from __future__ import annotations

import html
import re

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from clipscope_explorer.app.main import create_app
from clipscope_explorer.app.settings import Settings
from tests.app.test_pages import _pages, twin_of

PREFIX = "/explorer"
ORIGIN = "http://testserver"
ATTRIBUTE = re.compile(r'\s(href|src|action|hx-get|hx-post|data-copy|data-feature-base|content)="([^"]*)"')


@pytest.fixture(scope="module", params=["setting", "server"])
def prefixed(request, index_path, tmp_path_factory):
    """A client for the app under PREFIX, by the setting or by the server's root_path."""
    if request.param == "setting":
        settings = Settings(
            index=index_path, live=False, upload_store=tmp_path_factory.mktemp("up"), root_path=PREFIX + "/"
        )
        client = TestClient(create_app(settings), follow_redirects=False)
    else:
        settings = Settings(index=index_path, live=False, upload_store=tmp_path_factory.mktemp("up"))
        client = TestClient(create_app(settings), follow_redirects=False, root_path=PREFIX)
    with client:
        yield client


def links(text: str) -> list[str]:
    """Every URL of this server that a page writes (attributes, and absolute URLs in meta tags)."""
    found = []
    for name, value in ATTRIBUTE.findall(text):
        value = html.unescape(value)
        if value.startswith(ORIGIN):
            value = value.removeprefix(ORIGIN)
        elif name == "content" or not value.startswith("/"):
            continue  # meta text, external links, data: images
        found.append(value)
    return found


def json_paths(data) -> list[str]:
    """Every string in a JSON document that is a path on this server."""
    if isinstance(data, dict):
        return [path for value in data.values() for path in json_paths(value)]
    if isinstance(data, list):
        return [path for value in data for path in json_paths(value)]
    return [data] if isinstance(data, str) and data.startswith("/") else []


def test_every_page_and_twin_under_the_prefix(prefixed, index):
    pages = _pages(index) + ["/upload", "/docs", "/layers/99", "/nowhere"]
    checked = set()
    for url in pages:
        for asked in (PREFIX + url, url):  # a proxy that keeps the prefix, and one that strips it
            page = prefixed.get(asked)
            assert page.status_code in (200, 404), asked
            found = links(page.text)
            assert len(found) > 10, asked
            bad = [link for link in found if not link.startswith(PREFIX + "/")]
            assert not bad, (asked, bad)
            if page.status_code == 200:  # (a 404 page's canonical link is the missing page)
                checked.update(found)
        if url not in ("/docs", "/nowhere"):
            data = prefixed.get(PREFIX + twin_of(url)).json()
            bad = [path for path in json_paths(data) if not path.startswith(PREFIX + "/")]
            assert not bad, (url, bad)
            checked.update(path for path in json_paths(data) if "/random" not in path and "/layers/99" not in path)
    assert any("/static/" in link for link in checked) and any("/images/" in link for link in checked)
    for link in sorted(checked):  # and each of them answers
        if "/layers/99" in link or "/random" in link:
            continue
        response = prefixed.get(link)
        assert response.status_code == 200, link


def test_redirects_and_hx_location_carry_the_prefix(prefixed):
    for url, target in [
        ("/layers/20/random", r"/layers/20/features/\d+"),
        ("/api/layers/20/random", r"/api/layers/20/features/\d+"),
        ("/search?q=20/7", r"/layers/20/features/7"),
        ("/api/search?q=20/7", r"/api/layers/20/features/7"),
    ]:
        for asked in (PREFIX + url, url):
            response = prefixed.get(asked)
            assert response.status_code == 303, asked
            assert re.fullmatch(re.escape(PREFIX) + target, response.headers["location"]), asked
            assert prefixed.get(response.headers["location"]).status_code == 200
    jump = prefixed.get(PREFIX + "/search?q=20/7", headers={"HX-Request": "true", "HX-Target": "results"})
    assert jump.headers["HX-Location"] == PREFIX + "/layers/20/features/7"
    slash = prefixed.get(PREFIX + "/layers/")
    assert slash.status_code in (307, 308) and slash.headers["location"] == PREFIX + "/layers"


def test_the_overview_without_a_trailing_slash_and_absolute_urls(prefixed):
    assert prefixed.get(PREFIX).status_code == 200
    text = prefixed.get(PREFIX + "/layers/20/features/8").text
    assert f'<meta property="og:url" content="{ORIGIN}{PREFIX}/layers/20/features/8">' in text
    assert f'<link rel="alternate" type="application/json" href="{PREFIX}/api/layers/20/features/8">' in text
    assert f'<meta property="og:image" content="{ORIGIN}{PREFIX}/images/' in text


def test_errors_link_under_the_prefix(prefixed):
    links_ = prefixed.get(PREFIX + "/api/layers/99").json()["links"]
    assert {"href": f"{PREFIX}/layers/20", "text": "Layer 20"} in links_
    assert all(link["href"].startswith(PREFIX + "/") for link in links_)
    assert f'href="{PREFIX}/layers/11"' in prefixed.get(PREFIX + "/layers/99").text
    assert prefixed.get(PREFIX + "/api/layers/99").headers["content-type"] == "application/json"
    assert prefixed.get(PREFIX + "/images/x/1.jpg").headers["content-type"].startswith("text/plain")


def test_openapi_and_cross_origin_reads_under_the_prefix(prefixed):
    schema = prefixed.get(PREFIX + "/openapi.json").json()
    assert schema["servers"][0]["url"] == PREFIX and "/api/layers/{layer}" in schema["paths"]
    read = prefixed.get(PREFIX + "/api/layers", headers={"Origin": "https://notebook.example.org"})
    assert read.headers["access-control-allow-origin"] == "*"


def test_a_prefix_must_be_a_path_the_app_does_not_serve(index_path):
    for root in ("/api", "/layers/old", "/static"):
        with pytest.raises(ValueError, match="ROOT_PATH"):
            create_app(Settings(index=index_path, live=False, root_path=root))
    for root in ("explorer", "/a b", '/x"', "/x?y"):
        with pytest.raises(ValidationError, match="root_path"):
            Settings(index=index_path, root_path=root)
    with pytest.raises(ValidationError, match="CLIPSCOPE_ROOT_PATH"):
        Settings(index=index_path, public_url="https://example.org/explorer")
    assert Settings(index=index_path, root_path="/apis/v1/").root_path == "/apis/v1"


def test_a_bad_prefix_stops_both_ways_of_starting_with_the_same_line(index_path, monkeypatch, capsys):
    """`serve` (its typed options) and `uvicorn clipscope_explorer.app.main:app` report settings alike."""
    from clipscope_explorer.app import main
    from clipscope_explorer.app.serving.server import ServeOptions, serve
    from clipscope_explorer.app.settings import get_settings

    monkeypatch.setenv("CLIPSCOPE_INDEX", str(index_path))
    monkeypatch.setenv("CLIPSCOPE_ROOT_PATH", "explorer")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as stop:
            main.app_from_environment()
        assert stop.value.code == 2
        from_uvicorn = capsys.readouterr().err
        assert serve(ServeOptions(index=index_path, root_path="explorer")) == 2
        from_serve = capsys.readouterr().err
        monkeypatch.setenv("CLIPSCOPE_ROOT_PATH", "/api")
        get_settings.cache_clear()
        with pytest.raises(SystemExit):
            main.app_from_environment()
        clash = capsys.readouterr().err
    finally:
        get_settings.cache_clear()
    assert from_uvicorn == from_serve and from_serve.count("\n") == 1
    assert from_serve.startswith("clipscope-explorer: error: bad settings: CLIPSCOPE_ROOT_PATH: ")
    assert clash.count("\n") == 1 and "CLIPSCOPE_ROOT_PATH /api" in clash


def test_the_root_path_flag(capsys):
    from clipscope_explorer.app.serving.server import ServeOptions
    from clipscope_explorer.cli import build_parser, main, options_from

    args = build_parser().parse_args(["serve", "i.duckdb", "--root-path", "/explorer/"])
    assert options_from(ServeOptions, args).root_path == "/explorer"
    assert build_parser().parse_args(["serve", "i.duckdb"]).root_path is None
    for value in ("explorer", "/a b", "/x?y"):
        with pytest.raises(SystemExit) as stop:
            main(["serve", "i.duckdb", "--root-path", value])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and "--root-path" in err and repr(value) in err


def test_uploads_under_the_prefix(live_index, tmp_path):
    from tests import image_cases as cases
    from tests.app.conftest import live_app_client, wait_live

    files = {"file": ("photo.jpg", cases.encode(cases.noisy((160, 120), seed=5), "JPEG"), "image/jpeg")}
    with live_app_client(live_index, tmp_path / "store", root_path=PREFIX) as client:
        wait_live(client)
        form = client.get(PREFIX + "/upload").text
        assert f'action="{PREFIX}/upload"' in form and f'hx-post="{PREFIX}/upload"' in form
        posted = client.post(PREFIX + "/upload", files=files)
        assert posted.status_code == 303 and posted.headers["location"].startswith(PREFIX + "/uploads/")
        page = client.get(posted.headers["location"])
        assert page.status_code == 200 and f'data-feature-base="{PREFIX}/layers/' in page.text
        found = set(links(page.text))
        assert f'action="{PREFIX}/intervene"' in page.text
        found.discard(PREFIX + "/intervene")  # the intervention form's action: posted below
        assert not [link for link in found if not link.startswith(PREFIX + "/")]
        assert any("/image.jpg" in link for link in found) and any("/features/" in link for link in found)
        for link in found:  # (a feature base is a feature's URL less its number)
            assert client.get(link + "0" if link.endswith("/features/") else link).status_code == 200, link
        hx = client.post(PREFIX + "/upload", files=files, headers={"HX-Request": "true", "HX-Target": "upload-result"})
        assert hx.headers["HX-Push-Url"].startswith(PREFIX + "/uploads/")
        result = client.post(PREFIX + "/api/encode", files=files).json()
        paths = json_paths(result)
        assert paths and all(path.startswith(PREFIX + "/") for path in paths)
        assert client.get(result["json_url"]).json()["url"] == result["url"]
        form = {"upload_id": result["upload_id"], "layer": "1", "feature": "0", "patches": ""}
        edited = client.post(PREFIX + "/intervene", data=form)
        assert edited.status_code == 303 and edited.headers["location"].startswith(PREFIX + "/uploads/")
        shown = client.get(edited.headers["location"])
        assert shown.status_code == 200 and f'href="{PREFIX}/uploads/{result["upload_id"]}"' in shown.text
        gone = client.get(PREFIX + "/uploads/" + "0" * 32)
        assert gone.status_code == 404 and f'href="{PREFIX}/upload"' in gone.text

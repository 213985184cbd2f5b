"""Hostile requests against every real route (walked from `clipscope_explorer.app.pages`, so new routes are covered):
path traversal and junk in every path parameter, SQL metacharacters and over-long or huge values in
every query parameter, CRLF meant to be reflected into headers, odd methods. Every answer is a 4xx
or a safe 200/303; never a 500, never a traceback, never a file from outside the app's folders."""

from __future__ import annotations

import pytest

from tests.app.route_walk import endpoints, fill, mounts

PATH_VALUES = [
    "..",
    "%2e%2e",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fpyproject.toml",
    "..%5c..%5cpyproject.toml",
    "%252e%252e%252fetc",
    "%00",
    "8%00",
    "-1",
    "1e3",
    "0x10",
    "%208",
    "%EF%BC%98",
    "9" * 30,
    "1%20OR%201%3D1",
    "8'%20OR%20'1'%3D'1",
    "8%3BDROP%20TABLE%20features",
    "%0d%0aX-Injected:%201",
    "%E2%80%AE",
    "%ff%fe",
    "a" * 4000,
    "1" * 4000,
    "%7B%7D",
    "null",
]
QUERY_VALUES = [
    "' OR 1=1 --",
    '"; DROP TABLE features; --',
    "%",
    "_",
    "\\",
    "*",
    "\x00",
    "x\r\nX-Injected: 1",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "-1",
    "0",
    "9" * 30,
    "a" * 5000,
    "[]",
    '{"$gt": ""}',
    "asc; DROP TABLE x",
    "frequency DESC, (SELECT 1)",
    "../../etc/passwd",
    "\u202e",
    "20/8\r\nX-Injected: 1",
    "\u00b2",
    "\u0661\u0662",
    "9" * 5000,  # digits to str.isdigit but not to int(); past int()'s 4,300 digits
]
LEAKS = ("Traceback", 'File "', "root:x:0:0", "[project]", "duckdb.")  # a traceback, a file, an error class
EXTRA_METHODS = ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")


def refused_as_unavailable(response) -> bool:
    """A documented 503: a service the server runs without (search by meaning off), one line of JSON."""
    if response.status_code != 503 or response.headers.get("content-type") != "application/json":
        return False
    detail = response.json().get("detail")
    return isinstance(detail, str) and "\n" not in detail


def check_safe(response, what: str) -> None:
    ok = response.status_code < 500 or refused_as_unavailable(response)
    assert ok, (what, response.status_code, response.text[:300])
    body = response.text if len(response.content) < 2_000_000 else ""
    for leak in LEAKS:
        assert leak not in body, (what, leak)
    for name, value in response.headers.items():
        assert name.lower() != "x-injected" and "\r" not in value and "\n" not in value, (what, name, value)
        assert "x-injected" not in value.lower(), (what, name, value)


@pytest.fixture(scope="module")
def valid(index) -> dict[str, str]:
    """A value for every path parameter that names something real, so each hostile value is the only fault."""
    image_id = index.examples(20, 8, heatmaps=False)[0]["image_id"]
    ids = {"image_id": str(image_id), "index_id": index.index_id, "upload_id": "0" * 32, "intervention_id": "1" * 32}
    return {"layer": "20", "feature": "8", **ids, "tokens": "1000"}


def _gets(client):
    return [e for e in endpoints(client.app) if "GET" in e.methods]


def test_the_walk_sees_every_route(client):
    paths = {e.path for e in endpoints(client.app)}
    assert len(paths) >= 25 and "/api/encode" in paths and "/images/{index_id}/{image_id}.jpg" in paths
    assert mounts(client.app) == ["/static"]


def test_hostile_path_parameters(client, valid):
    tried = 0
    for endpoint in _gets(client):
        for name in endpoint.path_params:
            assert name in valid, f"give {name} a valid value in this test"
            for value in PATH_VALUES:
                url = fill(endpoint.path, {**valid, name: value})
                check_safe(client.get(url), url)
                tried += 1
    assert tried > 500


def test_hostile_query_parameters(client, valid):
    tried = 0
    for endpoint in _gets(client):
        base = fill(endpoint.path, valid)
        for name in endpoint.query_params:
            for value in QUERY_VALUES:
                check_safe(client.get(base, params={name: value}), f"{base}?{name}={value[:40]!r}")
                tried += 1
    assert tried > 300


def test_hostile_htmx_requests(client, valid):
    """htmx headers select fragments and HX-Location jumps; junk in them changes nothing dangerous."""
    for endpoint in _gets(client):
        url = fill(endpoint.path, valid)
        for target in ("results", "feature-table", "../../etc", "x" * 3000):
            check_safe(client.get(url, headers={"HX-Request": "true", "HX-Target": target}), f"{url} {target}")


def test_other_methods_are_405(client, valid):
    for endpoint in endpoints(client.app):
        url = fill(endpoint.path, valid)
        for method in EXTRA_METHODS:
            if method in endpoint.methods:
                continue
            response = client.request(method, url)
            check_safe(response, f"{method} {url}")
            assert response.status_code == 405, (method, url, response.status_code)


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2fpyproject.toml",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/%2e%2e/app/settings.py",
        "/static/vendor/..%2f..%2fapp%2fsettings.py",
        "/static/%00",
        "/static/style.css%00.js",
        "/static/..%5csettings.py",
        "/static/" + "a" * 4000,
        "/static/%ff%fe",
        "/static/",
        "/static",
        "/static/vendor",
    ],
)
def test_static_files_stay_in_their_folder(client, path):
    response = client.get(path)
    check_safe(response, path)
    assert response.status_code in (404, 405, 307), (path, response.status_code)


@pytest.mark.parametrize(
    "range_header",
    [
        "bytes=abc",
        "bytes=5-1",
        "bytes=" + ",".join(["0-0"] * 300),
        "bytes=99999999999999999999-",
        "lines=1-2",
        "bytes=-0",
    ],
)
def test_static_ranges(client, range_header):
    check_safe(client.get("/static/style.css", headers={"Range": range_header}), range_header)


def test_sql_wildcards_are_literal(client):
    """`c_t` would match "cat" if LIKE wildcards were not escaped; `%` and `\\` separate words, as in search."""
    cat = client.get("/api/layers/20", params={"q": "cat"}).json()["paging"]["total"]
    assert cat > 0
    for q in ("c_t", "_", "' OR 1=1 --"):
        assert client.get("/api/layers/20", params={"q": q}).json()["paging"]["total"] == 0, q
    for q, words in (("c%t", "c t"), ("%", ""), ("\\", "")):
        total = client.get("/api/layers/20", params={"q": q}).json()["paging"]["total"]
        assert total == client.get("/api/layers/20", params={"q": words}).json()["paging"]["total"], q
    found = client.get("/api/search", params={"q": "cat"}).json()
    assert found["label_results"] and found["caption_results"]
    for q in ("c_t", "_", "' OR '1'='1' --"):  # (search splits `c%t` into the words c and t)
        found = client.get("/api/search", params={"q": q}).json()
        assert not found["label_results"] and not found["caption_results"], q


@pytest.mark.parametrize(
    "query, status",
    [
        ("page=1000000&page_size=100000", 200),
        ("page=1000001", 422),
        ("page=" + "9" * 40, 422),
        ("page_size=" + "9" * 40, 422),
        ("page=-5", 422),
        ("page_size=100000", 200),
    ],
)
def test_huge_pages(client, query, status):
    for path in ("/layers/20", "/api/layers/20"):
        response = client.get(f"{path}?{query}")
        check_safe(response, query)
        assert response.status_code == status, (path, query)
    if status == 200:
        page = client.get(f"/api/layers/20?{query}").json()
        assert page["paging"]["page_size"] == client.app.state.settings.max_page_size


@pytest.mark.parametrize("query, status", [("limit=" + "9" * 40, 422), ("limit=100000", 200), ("limit=0", 422)])
def test_huge_search_limits(client, query, status):
    response = client.get(f"/api/search?q=cat&{query}")
    check_safe(response, query)
    assert response.status_code == status
    if status == 200:
        assert response.json()["limit"] == client.app.state.settings.max_page_size


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_jumps_do_not_carry_injected_text(client, prefix):
    """`q=20/8` answers 303 (or HX-Location for htmx); the target is rebuilt from numbers, never from q."""
    for q in ("20/8\r\nX-Injected: 1", "20/8\r\n", " 20/8 ", "20/8%0d%0aSet-Cookie:x=1"):
        for headers in ({}, {"HX-Request": "true", "HX-Target": "results"}):
            response = client.get(f"{prefix}/search", params={"q": q}, headers=headers)
            check_safe(response, q)
            target = response.headers.get("location") or response.headers.get("hx-location")
            if target is not None:
                assert target == f"{prefix}/layers/20/features/8", (q, target)


def test_public_url_keeps_a_forged_host_out_of_pages(index_path, tmp_path):
    """Absolute URLs (OpenGraph, copy-link) come from CLIPSCOPE_PUBLIC_URL when set, never from `Host`."""
    from fastapi.testclient import TestClient

    from clipscope_explorer.app.main import create_app
    from clipscope_explorer.app.settings import Settings

    settings = Settings(index=index_path, live=False, upload_store=tmp_path, public_url="https://explorer.example.org")
    with TestClient(create_app(settings)) as test_client:
        for url in ("/", "/layers/20/features/8", "/search?q=cat"):
            text = test_client.get(url, headers={"Host": "evil.example"}).text
            assert "evil.example" not in text and "https://explorer.example.org/" in text, url

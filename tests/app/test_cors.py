"""Cross-origin rules: any site may GET the JSON API; only listed origins may POST /api/encode and /api/intervene."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from clipscope_explorer.app.main import create_app
from clipscope_explorer.app.settings import Settings
from tests import image_cases as cases

NOTEBOOK = "https://notebook.example.org"
EVIL = "https://evil.example.com"


@pytest.fixture(scope="module")
def open_to(index_path, tmp_path_factory):
    settings = Settings(
        index=index_path,
        live=False,
        upload_store=tmp_path_factory.mktemp("cors"),
        cors_origins=f"{NOTEBOOK}/, http://localhost:8888",
        public_url="https://explorer.example.org",
    )
    with TestClient(create_app(settings), follow_redirects=False) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "url", ["/api", "/api/layers/20", "/api/layers/20/features/8", "/api/search?q=cat", "/openapi.json", "/api/nothing"]
)
def test_json_is_readable_from_any_origin(client, url):
    for headers in ({}, {"Origin": EVIL}):
        response = client.get(url, headers=headers)
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize("url", ["/", "/layers/20", "/upload", "/static/style.css"])
def test_pages_are_not_opened_to_other_origins(client, url):
    assert "access-control-allow-origin" not in client.get(url, headers={"Origin": EVIL}).headers


def test_preflight_for_json_reads(client):
    response = client.options(
        "/api/layers/20",
        headers={
            "Origin": EVIL,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-requested-with",
        },
    )
    assert response.status_code == 204 and response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-headers"] == "x-requested-with"
    assert response.headers["content-security-policy"]  # security headers on preflights too


@pytest.mark.parametrize("path", ["/api/encode", "/upload", "/api/intervene", "/intervene"])
def test_cross_origin_posts_are_refused_by_default(client, path):
    preflight = client.options(path, headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    response = client.post(path, headers={"Origin": EVIL}, files={"file": ("a.jpg", b"x", "image/jpeg")})
    assert response.status_code == 403 and "access-control-allow-origin" not in response.headers
    assert "CLIPSCOPE_CORS_ORIGINS" in response.text
    for origin in ("null", "http://testserver.evil.com", "https://testserver:1", "file://"):
        assert client.post(path, headers={"Origin": origin}).status_code == 403, origin


@pytest.mark.parametrize("path", ["/api/encode", "/upload", "/api/intervene", "/intervene"])
def test_same_origin_and_originless_posts_pass(client, path):
    for headers in ({}, {"Origin": "http://testserver"}):  # live encoding is off here: 503 means it got through
        assert client.post(path, headers=headers, files={"file": ("a.jpg", b"x", "image/jpeg")}).status_code == 503


@pytest.mark.parametrize("path", ["/api/encode", "/api/intervene"])
def test_listed_origins_may_post_to_the_encoder(open_to, path):
    for origin in (NOTEBOOK, "http://localhost:8888"):
        preflight = open_to.options(
            path,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == origin
        assert preflight.headers["access-control-allow-methods"] == "POST"
        assert "Origin" in preflight.headers["vary"].split(", ")  # the answer depends on the origin
        response = open_to.post(path, headers={"Origin": origin}, files={"file": ("a.jpg", b"x")})
        assert response.status_code == 503 and response.headers["access-control-allow-origin"] == origin
    for form in ("/upload", "/intervene"):  # the HTML forms: never
        assert open_to.post(form, headers={"Origin": NOTEBOOK}).status_code == 403
    assert open_to.post(path, headers={"Origin": EVIL}).status_code == 403
    public = open_to.post("/upload", headers={"Origin": "https://explorer.example.org"})  # behind a proxy
    assert public.status_code == 503


def test_any_origin_when_asked(index_path, tmp_path):
    settings = Settings(index=index_path, live=False, upload_store=tmp_path, cors_origins="*")
    with TestClient(create_app(settings)) as test_client:
        response = test_client.post("/api/encode", headers={"Origin": EVIL}, files={"file": ("a.jpg", b"x")})
        assert response.status_code == 503 and response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("value", ["notanorigin", "https://x.org/path", "javascript:alert(1)", "https://a b"])
def test_bad_origin_settings_are_refused(index_path, value):
    with pytest.raises(ValueError):
        Settings(index=index_path, cors_origins=value)


def test_a_real_upload_from_another_origin_is_refused(live_client):
    data = cases.encode(cases.noisy((32, 32), seed=99), "JPEG")
    same = live_client.post("/api/encode", headers={"Origin": "http://testserver"}, files={"file": ("a.jpg", data)})
    assert same.status_code == 200
    other = live_client.post("/api/encode", headers={"Origin": EVIL}, files={"file": ("a.jpg", data)})
    assert other.status_code == 403

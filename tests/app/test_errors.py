"""Unknown things are 404 pages that point somewhere useful; malformed input is 404/422; never a traceback."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from clipscope_explorer.app.main import create_app
from tests.app.conftest import N_FEATURES
from tests.app.test_security import assert_secured


@pytest.mark.parametrize(
    "url",
    [
        "/layers/99",
        "/layers/-1",
        "/layers/abc",
        "/layers/1e3",
        "/layers/99999999999999999999999999",
        "/layers/20/features/64",
        "/layers/20/features/-1",
        "/layers/20/features/x",
        "/layers/20/features/2.5",
        "/layers/20/features/99999999999999999999",
        "/layers/20/features/8/examples/999999",
        "/layers/20/features/8/examples/abc",
        "/layers/20/random/x",
        "/nothing/here",
        "/layers/99/random",
    ],
)
def test_not_found_pages(client, url):
    for path in (url, "/api" + url):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "Traceback" not in response.text
        if path.startswith("/api"):
            assert response.headers["content-type"] == "application/json"
            assert "detail" in response.json()
        else:
            assert response.headers["content-type"].startswith("text/html")
            assert 'href="/"' in response.text


def test_unknown_layer_links_to_the_layers(client):
    text = client.get("/layers/99").text
    assert "no layer 99" in text
    assert 'href="/layers/11"' in text and 'href="/layers/20"' in text


def test_unknown_feature_links_to_its_layer(client):
    text = client.get(f"/layers/20/features/{N_FEATURES}").text
    assert f"no feature {N_FEATURES}" in text and 'href="/layers/20"' in text
    links = client.get(f"/api/layers/20/features/{N_FEATURES}").json()["links"]
    assert {"href": "/layers/20", "text": "Layer 20"} in links


@pytest.mark.parametrize(
    "query",
    [
        "page=0",
        "page=x",
        "sort=evil",
        "sort=frequency;DROP%20TABLE%20features",
        "order=sideways",
        "min_freq=abc",
        "min_freq=2",
        "max_freq=-1",
        "page_size=0",
        "q=" + "x" * 201,
    ],
)
def test_malformed_query_is_422(client, query):
    for path in ("/layers/20", "/api/layers/20"):
        response = client.get(f"{path}?{query}")
        assert response.status_code == 422, (path, query)
        assert "Traceback" not in response.text


def test_blank_form_fields_mean_no_filter(client):
    assert client.get("/layers/20?min_freq=&max_freq=&q=").status_code == 200
    assert client.get("/search?q=cat&layer=").status_code == 200
    assert client.get("/api/search?layer=abc").status_code == 422


def test_unexpected_errors_are_500_without_details(settings):
    application = create_app(settings)

    def boom():
        raise RuntimeError("secret internals")

    application.add_api_route("/boom", boom)
    application.add_api_route("/api/boom", boom)
    with TestClient(application, raise_server_exceptions=False) as test_client:
        for path in ("/boom", "/api/boom"):
            response = test_client.get(path)
            assert response.status_code == 500
            assert "secret internals" not in response.text and "Traceback" not in response.text
            assert_secured(response, path)  # Starlette answers 500s outside every middleware

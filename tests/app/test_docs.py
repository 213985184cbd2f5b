"""docs/API.md documents every route and every setting; a new one without docs fails here."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Mount

from clipscope_explorer.app.settings import Settings

API_MD = Path(__file__).resolve().parents[2] / "docs" / "API.md"


def route_paths(routes) -> list[str]:
    """Every path served, including those of included routers (however FastAPI nests them)."""
    paths = []
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            paths += route_paths(nested.routes)
        elif isinstance(route, Mount):
            paths.append(route.path + "/{path}")
        elif hasattr(route, "path"):
            paths.append(route.path)
    return paths


def _documented_paths() -> set[str]:
    return set(re.findall(r"`(?:GET|POST) (/[^`\s?]*)", API_MD.read_text()))


def test_every_route_is_documented(client):
    documented = _documented_paths()
    missing = [path for path in route_paths(client.app.routes) if path not in documented]
    assert len(route_paths(client.app.routes)) >= 20
    assert not missing, f"routes missing from docs/API.md: {missing}"


def test_documented_routes_exist(client):
    paths = set(route_paths(client.app.routes))
    stale = sorted(_documented_paths() - paths)
    assert not stale, f"docs/API.md documents routes that do not exist: {stale}"


def test_every_setting_is_documented():
    text = API_MD.read_text()
    missing = [name for name in Settings.model_fields if f"CLIPSCOPE_{name.upper()}" not in text]
    assert not missing, f"settings missing from docs/API.md: {missing}"


def test_openapi_lists_every_json_route(client):
    schema = client.get("/openapi.json").json()
    api_routes = {p for p in route_paths(client.app.routes) if p.startswith("/api")}
    assert api_routes <= set(schema["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/api/layers/{layer}/features/{feature}" in docs.text
    assert '<link rel="alternate" type="application/json" href="/openapi.json">' in docs.text


def test_openapi_describes_each_twin_with_its_query_and_model(client):
    schema = client.get("/openapi.json").json()
    for path, model, query in [
        (
            "/api/layers/{layer}",
            "LayerPage",
            ["sort", "order", "min_freq", "max_freq", "q", "min_sort_eval", "min_faithfulness", "page", "page_size"],
        ),
        ("/api/search", "SearchPage", ["q", "layer", "limit", "by", "template"]),
        ("/api/search/images", "ImageSearchPage", ["q", "template", "limit"]),
        ("/api/layers/{layer}/features/{feature}", "FeaturePage", []),
        ("/api", "OverviewPage", []),
        ("/api/uploads/{upload_id}", "UploadResult", ["layers", "sort", "top", "patches"]),
    ]:
        operation = schema["paths"][path]["get"]
        parameters = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}
        assert list(parameters) == query, path
        assert all(p.get("description") for p in parameters.values()), path
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ok.endswith("/" + model), path
    assert set(schema["paths"]["/api/layers/{layer}/random"]["get"]["responses"]) >= {"303"}
    operation_ids = [op["operationId"] for methods in schema["paths"].values() for op in methods.values()]
    assert len(operation_ids) == len(set(operation_ids))

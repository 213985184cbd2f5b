"""`HEAD` wherever `GET` is: every GET route (walked from the app, so a new route is covered) answers HEAD
with GET's status and headers and no body."""

from __future__ import annotations

import re

import pytest

from tests.app.route_walk import endpoints, fill, mounts

RANDOM = re.compile(r"(/api)?/layers/20/features/\d+")


@pytest.fixture(scope="module")
def valid(index) -> dict[str, str]:
    image_id = index.examples(20, 8, heatmaps=False)[0]["image_id"]
    return {"layer": "20", "feature": "8", "image_id": str(image_id), "index_id": index.index_id, "upload_id": "0" * 32}


def _same_answer(client, url: str, headers: dict | None = None) -> int:
    get = client.get(url, headers=headers)
    head = client.head(url, headers=headers)
    assert head.status_code == get.status_code, url
    assert head.content == b"", url
    if get.status_code == 303 and url.endswith("/random"):  # a fresh random feature each time: alike places
        assert RANDOM.fullmatch(get.headers.pop("location")) and RANDOM.fullmatch(head.headers.pop("location"))
    assert dict(head.headers) == dict(get.headers), url
    return get.status_code


def test_every_get_route_answers_head(client, valid):
    statuses = set()
    gets = [e for e in endpoints(client.app) if "GET" in e.methods]
    assert len(gets) >= 25
    for endpoint in gets:
        for values in (valid, {**valid, "layer": "99", "index_id": "0" * 16, "upload_id": "f" * 32}):
            statuses.add(_same_answer(client, fill(endpoint.path, values)))
    assert {200, 303, 404} <= statuses


@pytest.mark.parametrize("url", ["/", "/api", "/layers/11", "/nowhere", "/layers/20?page=x", "/search?q=20/7"])
def test_head_of_pages_errors_and_redirects(client, url):
    _same_answer(client, url)
    _same_answer(client, url, headers={"HX-Request": "true", "HX-Target": "feature-table"})


def test_head_of_static_files_and_conditional_images(client, index):
    for mount in mounts(client.app):
        assert _same_answer(client, f"{mount}/style.css") == 200
    thumbnail = f"/images/{index.index_id}/{index.examples(20, 8, heatmaps=False)[0]['image_id']}.jpg"
    etag = client.get(thumbnail).headers["etag"]
    assert _same_answer(client, thumbnail, headers={"If-None-Match": etag}) == 304


def test_head_is_a_read_for_cross_origin_rules(client):
    head = client.head("/api/layers", headers={"Origin": "https://notebook.example.org"})
    assert head.status_code == 200 and head.headers["access-control-allow-origin"] == "*"

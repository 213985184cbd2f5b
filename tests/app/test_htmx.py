"""One URL, whole page or fragment: the decisions in app/htmx.py."""

from __future__ import annotations

import re

HX = {"HX-Request": "true"}


def test_layer_table_fragment(client):
    full = client.get("/layers/20?page=2&page_size=10")
    fragment = client.get("/layers/20?page=2&page_size=10", headers={**HX, "HX-Target": "feature-table"})
    assert "<html" in full.text and "<html" not in fragment.text
    assert '<table class="features">' in fragment.text and 'href="/layers/20/features/10"' in fragment.text
    for response in (full, fragment):
        assert "HX-Request" in response.headers["vary"]


def test_boosted_and_history_requests_get_the_whole_page(client):
    for extra in ({"HX-Boosted": "true"}, {"HX-History-Restore-Request": "true"}):
        response = client.get("/layers/20", headers={**HX, "HX-Target": "feature-table", **extra})
        assert "<html" in response.text


def test_unknown_targets_get_the_whole_page(client):
    assert "<html" in client.get("/layers/20", headers={**HX, "HX-Target": "something-else"}).text


def test_example_opens_as_a_modal_fragment(client, index):
    image_id = index.examples(20, 8, heatmaps=False)[0]["image_id"]
    url = f"/layers/20/features/8/examples/{image_id}"
    fragment = client.get(url, headers={**HX, "HX-Target": "modal-body"}).text
    assert '<article class="example"' in fragment and "<html" not in fragment
    assert "<html" in client.get(url).text


def test_search_results_fragment_and_jump(client):
    fragment = client.get("/search?q=cat", headers={**HX, "HX-Target": "results"})
    assert "<html" not in fragment.text and "Labels matching" in fragment.text
    jump = client.get("/search?q=20/7", headers={**HX, "HX-Target": "results"})
    assert jump.status_code == 200 and jump.headers["HX-Location"] == "/layers/20/features/7"
    boosted = client.get("/search?q=20/7", headers={**HX, "HX-Boosted": "true"})
    assert boosted.status_code == 303


def test_pages_use_boost_once_and_every_hx_get_has_a_real_link(client):
    text = client.get("/layers/20").text
    assert text.count('hx-boost="true"') == 1
    for tag in re.findall(r"<(?:a|form)\b[^>]*hx-get=[^>]*>", text):
        target = re.search(r'hx-get="([^"]+)"', tag).group(1)
        assert f'href="{target}"' in tag or f'action="{target}"' in tag, tag

"""Security headers everywhere; templates carry no inline script, style or handlers (CSP)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.security import CONTENT_SECURITY_POLICY

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


@pytest.mark.parametrize("url", ["/", "/api", "/layers/20", "/layers/20/features/8", "/static/style.css",
                                 "/static/vendor/htmx.min.js", "/layers/99", "/api/nothing", "/docs", "/openapi.json"])
def test_security_headers(client, url):
    headers = client.get(url).headers
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert headers["x-frame-options"] == "DENY"


def test_policy_allows_nothing_inline_or_remote():
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY


def test_images_carry_security_headers(client, index):
    image_id = index.examples(20, 8, heatmaps=False)[0]["image_id"]
    headers = client.get(f"/images/{index.index_id}/{image_id}.jpg").headers
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.html")))
def test_templates_have_no_inline_script_style_or_handlers(template):
    text = (TEMPLATES / template).read_text()
    assert not re.search(r"<script(?![^>]*\ssrc=)", text), "inline <script>"
    assert not re.search(r"<style", text), "<style> element"
    assert not re.search(r"\sstyle=", text), "style= attribute"
    assert not re.search(r"\son[a-z]+=", text), "on*= handler"
    assert not re.search(r"(src|href)=\"(https?:)?//", text), "remote asset"


def test_rendered_pages_have_no_inline_script(client):
    for url in ("/", "/layers/20", "/layers/20/features/8", "/search?q=cat", "/docs"):
        text = client.get(url).text
        assert not re.search(r"<script(?![^>]*\ssrc=)", text), url
        assert not re.search(r"\sstyle=", text), url


def test_user_text_is_escaped(client):
    text = client.get("/search", params={"q": "<script>alert(1)</script>"}).text
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;" in text


def test_htmx_is_served_locally_with_its_licence(client):
    assert client.get("/static/vendor/htmx.min.js").status_code == 200
    assert "Zero-Clause BSD" in client.get("/static/vendor/htmx.LICENSE").text or \
        "BSD" in client.get("/static/vendor/htmx.LICENSE").text

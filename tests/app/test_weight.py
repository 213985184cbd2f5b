"""The feature page stays under 150 KB of HTML + CSS + JS before images, even at full size
(32 top images and 3 bands of 8 with long captions), and its images load lazily."""

from __future__ import annotations

import re
from pathlib import Path

from clipscope_explorer.app.pages.features import FeaturePage
from clipscope_explorer.app.templating import SiteInfo
from clipscope_explorer.app.urls import Urls

STATIC = Path(__file__).resolve().parents[2] / "static"
BUDGET = 150 * 1024


def _assets(text: str) -> int:
    total = 0
    for ref in re.findall(r'<(?:script|link)[^>]*(?:src|href)="(/static/[^"]+\.(?:js|css))"', text):
        total += (STATIC / ref.removeprefix("/static/")).stat().st_size
    return total


def test_fixture_feature_page_weight_and_lazy_images(client):
    text = client.get("/layers/20/features/8").text
    assert len(text.encode()) + _assets(text) <= BUDGET
    for tag in re.findall(r"<img\b[^>]*>", text):
        assert 'loading="lazy"' in tag, tag


def full_size(page: FeaturePage, **updates) -> FeaturePage:
    """`page` at full size: 32 top images and 3 bands of 8, long captions, the last feature of a 65,536-feature
    layer, plus `updates` (the panels a test adds)."""
    example = page.top_images[0].model_copy(update={"caption": "a long LAION caption " * 12, "heatmap": None})
    top = [example.model_copy(update={"rank": r, "image_id": 10_000_000 + r}) for r in range(1, 33)]
    bands = [band.model_copy(update={"examples": top[:8]}) for band in page.bands[:1]] * 3
    size = {"top_images": top, "bands": bands, "feature": 65535, "n_features": 65536, "position_mean": None}
    return page.model_copy(update=size | updates)


def render_feature(templates, page: FeaturePage, index_id: str) -> str:
    """The feature page's HTML for `page`, as the server renders it for a public URL."""
    site = SiteInfo(index_id=index_id, layers=[2, 5, 8, 11, 14, 17, 20, 22], model="ViT-L-14", public_url=None)
    return templates.get_template("feature.html").render(
        page=page,
        site=site,
        urls=Urls(index_id),
        twin="/api/layers/20/features/65535",
        canonical="https://explorer.example.org/layers/20/features/65535",
        base="https://explorer.example.org",
    )


def test_full_size_feature_page_fits_the_budget(client, index):
    page = FeaturePage.model_validate(client.get("/api/layers/20/features/8").json())
    html = render_feature(client.app.state.templates, full_size(page), index.index_id)
    weight = len(html.encode()) + _assets(html)
    assert weight <= BUDGET, f"{weight} bytes"

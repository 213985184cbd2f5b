"""The embeddable feature card (`/layers/{layer}/features/{feature}/embed`): what it shows, the headers that let
other sites frame it (and only it), `CLIPSCOPE_EMBED_ORIGINS`, its 404s, and the snippet every feature page offers."""

from __future__ import annotations

import html
import re

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from clipscope_explorer.app.main import create_app
from clipscope_explorer.app.serving.security import CONTENT_SECURITY_POLICY, POLICY, SECURITY_HEADERS
from clipscope_explorer.app.settings import Settings, settings_error
from tests.app.conftest import DEAD

EMBED = "/layers/20/features/8/embed"
SNIPPET = re.compile(r'<details class="embed"><summary>Embed</summary>\s*<textarea readonly[^>]*>([^<]*)</textarea>')


def frame_policy(ancestors: str) -> str:
    return POLICY.format(ancestors=ancestors)


def assert_not_frameable(response) -> None:
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-frame-options"] == "DENY"


def app_client(settings, **overrides) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=overrides)), follow_redirects=False)


def test_the_card_shows_label_statistics_and_top_images(client):
    data = client.get("/api/layers/20/features/8").json()
    response = client.get(EMBED)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    text = response.text
    assert f"Layer 20 · feature 8 <span>{html.escape(data['label'])}</span>" in text
    assert f"{data['image_frequency'] * 100:.3g}%" in text and f"{data['max_activation']:.3g}" in text
    images = re.findall(r'<img src="([^"]+)"', text)
    expected = [url for e in data["top_images"][:10] for url in (e["thumbnail_url"], e["overlay_url"])]
    assert images == expected and len(images) > 2
    assert all(client.get(url).status_code == 200 for url in images)
    assert '<a href="http://testserver/layers/20/features/8" target="_blank" rel="noopener">' in text
    assert '<link rel="stylesheet" href="/static/embed.css">' in text
    assert client.get("/static/embed.css").status_code == 200
    assert "<script" not in text and " style=" not in text and len(response.content) < 8000
    assert "og:image" not in text  # link previews are the feature page's


def test_a_dead_feature_has_a_card_without_images(client):
    text = client.get(f"/layers/20/features/{min(DEAD)}/embed").text
    assert "never fires" in text and "<img" not in text


def test_the_json_twin_is_the_feature_json(client):
    assert client.get("/api/layers/20/features/8/embed").json() == client.get("/api/layers/20/features/8").json()


def test_only_the_card_may_be_framed_by_default_by_any_site(client):
    card = client.get(EMBED)
    assert card.headers["content-security-policy"] == frame_policy("*")
    assert "x-frame-options" not in card.headers
    for name, value in SECURITY_HEADERS:
        if name not in (b"content-security-policy", b"x-frame-options"):
            assert card.headers[name.decode()] == value.decode()
    head = client.head(EMBED)
    assert head.status_code == 200 and head.content == b"" and "x-frame-options" not in head.headers
    for url in ("/layers/20/features/8", "/api/layers/20/features/8/embed", "/layers/20", "/", "/static/embed.css"):
        assert_not_frameable(client.get(url))


@pytest.mark.parametrize("layer, feature", [(20, 999), (99, 1), ("x", 1), (20, -1)])
def test_unknown_features_get_the_feature_pages_404_inside_the_frame(client, layer, feature):
    page = client.get(f"/layers/{layer}/features/{feature}")
    card = client.get(f"/layers/{layer}/features/{feature}/embed")
    assert card.status_code == page.status_code == 404
    message = re.search(r'<p class="lead">(.*?)</p>', page.text).group(0)
    assert message in card.text
    assert card.headers["content-security-policy"] == frame_policy("*")  # the frame shows why


@pytest.mark.parametrize(
    "value, ancestors",
    [
        ("https://blog.example.org", "https://blog.example.org"),
        ("https://a.org, HTTPS://B.org:8443/", "https://a.org https://b.org:8443"),
        ("*", "*"),
        ("", "'none'"),
    ],
)
def test_embed_origins_are_configurable(settings, monkeypatch, value, ancestors):
    monkeypatch.setenv("CLIPSCOPE_EMBED_ORIGINS", value)
    configured = Settings(**settings.model_dump(exclude={"embed_origins"}))
    with TestClient(create_app(configured), follow_redirects=False) as client:
        assert client.get(EMBED).headers["content-security-policy"] == frame_policy(ancestors)
        assert client.get("/layers/20/features/99/embed").headers["content-security-policy"] == frame_policy(ancestors)
        assert_not_frameable(client.get("/layers/20/features/8"))


def test_a_bad_embed_origin_is_refused_by_name(settings, monkeypatch):
    monkeypatch.setenv("CLIPSCOPE_EMBED_ORIGINS", "https://a.org,javascript:alert(1)")
    with pytest.raises(ValidationError) as error:
        Settings(**settings.model_dump(exclude={"embed_origins"}))
    assert "CLIPSCOPE_EMBED_ORIGINS" in settings_error(error.value)


def test_under_a_path_prefix_and_a_public_url(settings):
    options = dict(root_path="/explorer", public_url="https://explorer.example.org")
    with app_client(settings, **options) as client:
        card = client.get("/explorer" + EMBED)
        assert card.status_code == 200 and card.headers["content-security-policy"] == frame_policy("*")
        assert 'href="https://explorer.example.org/explorer/layers/20/features/8" target="_blank"' in card.text
        assert all(src.startswith("/explorer/images/") for src in re.findall(r'<img src="([^"]+)"', card.text))
        assert '<link rel="stylesheet" href="/explorer/static/embed.css">' in card.text
        page = client.get("/explorer/layers/20/features/8")
        assert_not_frameable(page)
        snippet = html.unescape(SNIPPET.search(page.text).group(1))
        assert 'src="https://explorer.example.org/explorer/layers/20/features/8/embed"' in snippet


@pytest.mark.parametrize("feature", [8, min(DEAD)])
def test_every_feature_page_offers_the_snippet(client, feature):
    page = client.get(f"/layers/20/features/{feature}").text
    snippet = html.unescape(SNIPPET.search(page).group(1))
    match = re.fullmatch(
        r'<iframe src="http://testserver(/layers/20/features/(\d+)/embed)" width="600" height="400" '
        r'title="Layer 20 · feature (\d+)" loading="lazy"></iframe>',
        snippet,
    )
    assert match and match.group(2) == match.group(3) == str(feature), snippet
    assert client.get(match.group(1)).status_code == 200

"""HTML rendering: the Jinja2 environment, number filters, and `render_page`.

Template context (the same for every page template and partial):
- `page`: the page's data model, exactly what its JSON twin serialises;
- `request`: the Starlette request;
- `site`: `SiteInfo` (index id, layers, model name) for the header and footer;
- `urls`: `clipscope_explorer.app.urls.Urls` for this index under the request's path prefix
  (every URL a template writes comes from it or from `page`);
- `twin`: this page's JSON URL (advertised with <link rel="alternate">);
- `canonical`: this page's absolute URL (OpenGraph, copy-link);
- `base`: the absolute origin (`CLIPSCOPE_PUBLIC_URL`, else the request's) that `urls` paths follow;
- the upload form's answer to a POST adds `result` (the `UploadResult`) and `image_src`
  (its image URL, or a data: URL when uploads are not stored); a stored result's own
  page has the `UploadResult` as `page`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel

from clipscope_explorer.app import htmx
from clipscope_explorer.app.images import colour_hex, overlay_data_url, palette_hex, winner_data_url
from clipscope_explorer.app.urls import Urls, app_path, urls_for

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


@dataclass(frozen=True)
class SiteInfo:
    index_id: str
    layers: list[int]
    model: str
    public_url: str | None
    demo: bool = False


def sig(value, digits: int = 3) -> str:
    """A number to `digits` significant digits ('–' for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0"
    text = f"{value:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    return text


def percent(value, digits: int = 3) -> str:
    return "–" if value is None else f"{sig(value * 100, digits)}%"


def thousands(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.filters.update(
        sig=sig,
        percent=percent,
        thousands=thousands,
        colour=colour_hex,
        overlay_src=overlay_data_url,
        winner_src=winner_data_url,
        palette=palette_hex,
    )
    env.globals.update(min=min, max=max)
    env.trim_blocks = True
    env.lstrip_blocks = True
    return templates


def absolute_origin(request: Request, site: SiteInfo | None) -> str:
    """`scheme://host[:port]` for absolute URLs: `CLIPSCOPE_PUBLIC_URL` when set, never a forged `Host` then."""
    if site is not None and site.public_url:
        return site.public_url.rstrip("/")
    return f"{request.url.scheme}://{request.url.netloc}"


def _here(request: Request, urls: Urls) -> str:
    """This request's URL as the client sees it: the path prefix, the path and the query."""
    query = request.url.query
    return urls.root + app_path(request.scope) + (f"?{query}" if query else "")


def common_context(request: Request) -> dict:
    """The context every template gets (`base.html` needs it): `site`, `urls`, `base`, `canonical`."""
    site = getattr(request.app.state, "site", None)
    base = absolute_origin(request, site)
    urls = urls_for(request)
    return {"site": site, "urls": urls, "base": base, "canonical": base + _here(request, urls)}


def render_page(
    request: Request,
    template: str,
    page: BaseModel,
    *,
    fragments: dict[str, str] | None = None,
    status_code: int = 200,
    extra: dict | None = None,
) -> HTMLResponse:
    """Render `page` with `template`, or only one of its `fragments` when htmx asks for it.
    `extra` adds page-specific names to the context (the upload result and its image source)."""
    name = htmx.choose_template(request, template, fragments or {})
    context = common_context(request)
    context.update(page=page, twin=context["urls"].twin(_here(request, context["urls"])), **(extra or {}))
    response = request.app.state.templates.TemplateResponse(request, name, context, status_code=status_code)
    return htmx.add_vary(response)

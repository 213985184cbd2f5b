"""`/search?q=`: features by label terms and by the captions of their top images, across
layers; `20/1234` (or `L20 F1234`, `20:1234`) jumps straight to a feature."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, BeforeValidator, Field

from clipscope_explorer.app import htmx
from clipscope_explorer.app.deps import INT32_MAX, IndexDep, SettingsDep
from clipscope_explorer.app.models import FeatureSummary, feature_summary
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.pages.layers import words_of
from clipscope_explorer.app.templating import render_page
from clipscope_explorer.app.urls import Urls

router = APIRouter()

JUMP = re.compile(r"^\s*l(?:ayer)?\s*(\d{1,9})\s*(?:[/:,]|\s)\s*f?(?:eature)?\s*(\d{1,9})\s*$|^\s*(\d{1,9})\s*[/:]\s*(\d{1,9})\s*$",
                  re.IGNORECASE)


class SearchResult(FeatureSummary):
    match: Literal["label", "caption"]
    exact_terms: int | None = None
    caption_matches: int | None = None


class SearchPage(BaseModel):
    q: str
    layer: int | None
    words: list[str]
    limit: int
    label_results: list[SearchResult]
    label_truncated: bool
    caption_results: list[SearchResult]
    caption_truncated: bool
    message: str | None


def parse_jump(q: str) -> tuple[int, int] | None:
    """`20/1234`, `20:1234`, `L20 F1234`, `layer 20 feature 1234` -> (20, 1234)."""
    match = JUMP.match(q or "")
    if not match:
        return None
    numbers = [g for g in match.groups() if g is not None]
    return int(numbers[0]), int(numbers[1])


def search_page(index: Index, q: str, layer: int | None, limit: int) -> SearchPage:
    words = words_of(q)
    message = None
    label_rows: list[dict] = []
    caption_rows: list[dict] = []
    if layer is not None and layer not in index.layers:
        message = f"This index has no layer {layer}; searching all layers."
        layer = None
    jump = parse_jump(q)
    if jump and not index.has_feature(*jump):
        message = f"No feature {jump[1]} on layer {jump[0]} in this index."
    elif words:
        label_rows = index.search_labels(words, layer, limit + 1)
        caption_rows = index.search_captions(words, layer, limit + 1)
    elif q.strip():
        message = "Type a word to search labels and captions, or layer/feature such as 20/1234."

    def results(rows: list[dict], kind: str) -> list[SearchResult]:
        return [SearchResult(**feature_summary(index, r).model_dump(), match=kind, exact_terms=r.get("exact_terms"),
                             caption_matches=r.get("caption_matches")) for r in rows[:limit]]

    return SearchPage(q=q, layer=layer, words=words, limit=limit, label_results=results(label_rows, "label"),
                      label_truncated=len(label_rows) > limit, caption_results=results(caption_rows, "caption"),
                      caption_truncated=len(caption_rows) > limit, message=message)


def _blank_is_none(value):
    return None if isinstance(value, str) and not value.strip() else value


Q = Annotated[str, Query(max_length=200, description="words, or layer/feature such as 20/1234")]
LayerNumber = Annotated[int, Field(ge=0, le=INT32_MAX)]
LayerQ = Annotated[LayerNumber | None, BeforeValidator(_blank_is_none), Query(description="search this layer only")]
Limit = Annotated[int | None, Query(ge=1, le=100_000, description="results per list (capped at max_page_size)")]


def _jump_target(index: Index, q: str) -> tuple[int, int] | None:
    jump = parse_jump(q)
    return jump if jump and index.has_feature(*jump) else None


@router.get("/api/search", response_model=SearchPage, tags=["pages"], status_code=200,
            summary="Features by label terms and caption words; layer/feature redirects to that feature",
            responses={303: {"description": "q was layer/feature: to /api/layers/{layer}/features/{feature}"}})
def search_json(request: Request, index: IndexDep, settings: SettingsDep, q: Q = "", layer: LayerQ = None,
                limit: Limit = None):
    jump = _jump_target(index, q)
    if jump:
        return htmx.navigate(request, "/api" + Urls.feature(*jump))
    return search_page(index, q, layer, min(limit or settings.page_size, settings.max_page_size))


@router.get("/search", response_class=HTMLResponse, include_in_schema=False)
def search_html(request: Request, index: IndexDep, settings: SettingsDep, q: Q = "", layer: LayerQ = None,
                limit: Limit = None):
    jump = _jump_target(index, q)
    if jump:
        return htmx.navigate(request, Urls.feature(*jump))
    page = search_page(index, q, layer, min(limit or settings.page_size, settings.max_page_size))
    return render_page(request, "search.html", page, fragments={"results": "_search_results.html"})

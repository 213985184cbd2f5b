"""`/search?q=`: features by label terms and by the captions of their top images, across
layers; `20/1234` (or `L20 F1234`, `20:1234`) jumps straight to a feature."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from clipscope_explorer.app.deps import IndexDep, OptionalLayer, SettingsDep, UrlsDep, words_of
from clipscope_explorer.app.models import FeatureSummary, feature_summary
from clipscope_explorer.app.pages.twins import Redirect, page
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls

router = APIRouter()

JUMP = re.compile(
    r"^\s*l(?:ayer)?\s*(\d{1,9})\s*(?:[/:,]|\s)\s*f?(?:eature)?\s*(\d{1,9})\s*$|^\s*(\d{1,9})\s*[/:]\s*(\d{1,9})\s*$",
    re.IGNORECASE,
)


class SearchQuery(BaseModel):
    """The search page's query parameters."""

    q: str = Field("", max_length=200, description="words, or layer/feature such as 20/1234")
    layer: OptionalLayer = Field(None, description="search this layer only")
    limit: int | None = Field(None, ge=1, le=100_000, description="results per list (capped at max_page_size)")


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


def search_results(index: Index, urls: Urls, q: str, layer: int | None, limit: int) -> SearchPage:
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
        return [
            SearchResult(
                **feature_summary(index, urls, r).model_dump(),
                match=kind,
                exact_terms=r.get("exact_terms"),
                caption_matches=r.get("caption_matches"),
            )
            for r in rows[:limit]
        ]

    return SearchPage(
        q=q,
        layer=layer,
        words=words,
        limit=limit,
        label_results=results(label_rows, "label"),
        label_truncated=len(label_rows) > limit,
        caption_results=results(caption_rows, "caption"),
        caption_truncated=len(caption_rows) > limit,
        message=message,
    )


@page(
    router,
    "/search",
    template="search.html",
    fragments={"results": "_search_results.html"},
    summary="Features by label terms and caption words; layer/feature redirects to that feature",
    responses={303: {"description": "q was layer/feature: to /api/layers/{layer}/features/{feature}"}},
)
def search_page(
    index: IndexDep, settings: SettingsDep, urls: UrlsDep, query: Annotated[SearchQuery, Query()]
) -> SearchPage | Redirect:
    jump = parse_jump(query.q)
    if jump and index.has_feature(*jump):
        return Redirect(urls.feature(*jump))
    limit = min(query.limit or settings.page_size, settings.max_page_size)
    return search_results(index, urls, query.q, query.layer, limit)

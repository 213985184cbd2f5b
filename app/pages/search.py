"""`/search?q=`: features by label terms and by the captions of their top images, or by meaning (cosine
between CLIP's text embedding of the query and each feature's prototype), across layers; `20/1234` (or
`L20 F1234`, `20:1234`) jumps straight to a feature."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, Field

from clipscope_explorer.app.deps import IndexDep, JsonTwin, OptionalLayer, SettingsDep, UrlsDep, blank_is_none, words_of
from clipscope_explorer.app.meaning.info import MeaningDep, MeaningInfo, Template, explain, meaning_info
from clipscope_explorer.app.meaning.prompts import DEFAULT_TEMPLATE, clean_text
from clipscope_explorer.app.meaning.service import MeaningService, MeaningUnavailable
from clipscope_explorer.app.models import FeatureSummary, feature_summary, round_sig
from clipscope_explorer.app.pages.lineage import add_concept_urls
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
    by: Annotated[Literal["words", "meaning"] | None, BeforeValidator(blank_is_none)] = Field(
        None, description="words (labels and captions) or meaning (default when the index and text tower allow it)"
    )
    template: Template = None


class SearchResult(FeatureSummary):
    match: Literal["label", "caption", "meaning"]
    exact_terms: int | None = None
    caption_matches: int | None = None
    zero_shot_terms: list[str] = []  # by label: its zero-shot labels, which the words may match too
    score: float | None = None  # by meaning: cosine between the query's text embedding and the prototype
    concept_url: str | None = None  # its chain of best matches across layers (where the index has lineage)


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
    by: Literal["words", "meaning"] = "words"
    template: str = DEFAULT_TEMPLATE
    truncated: bool = False  # by meaning: the prompt was cut to the text tower's context length
    meaning_results: list[SearchResult] = []
    meaning_truncated: bool = False
    meaning: MeaningInfo | None = None


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
                zero_shot_terms=list(r.get("zero_shot_terms") or []),
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


def meaning_results(
    index: Index,
    urls: Urls,
    service: MeaningService,
    q: str,
    template: str,
    layer: int | None,
    limit: int,
    detail: bool,
) -> SearchPage:
    """Features ranked by cosine between the text embedding of `template` around `q` and their prototypes."""
    message, results, truncated, more = None, [], False, False
    if layer is not None and layer not in index.layers:
        message = f"This index has no layer {layer}; searching all layers."
        layer = None
    text, status, jump = clean_text(q), service.status("features"), parse_jump(q)
    if jump and not index.has_feature(*jump):
        message = f"No feature {jump[1]} on layer {jump[0]} in this index."
    elif not text:
        message = message or ("Type what the features should respond to, e.g. “dog ears”." if q.strip() else None)
    elif not status.ready:
        message = explain(index, status, detail)
    else:
        try:
            ranking = service.features(text, template, layer)
        except MeaningUnavailable as error:  # the text tower stopped answering
            message = explain(index, error.status, detail)
        else:
            truncated, more = ranking.truncated, len(ranking.ids) > limit
            results = [
                SearchResult(
                    **feature_summary(index, urls, row).model_dump(), match="meaning", score=round_sig(float(score))
                )
                for row, score in zip(_summaries(index, ranking.ids[:limit]), ranking.scores[:limit])
            ]
    return SearchPage(
        q=q,
        layer=layer,
        words=words_of(q),
        limit=limit,
        label_results=[],
        label_truncated=False,
        caption_results=[],
        caption_truncated=False,
        message=message,
        by="meaning",
        template=template,
        truncated=truncated,
        meaning_results=results,
        meaning_truncated=more,
    )


def _summaries(index: Index, ids) -> list[dict]:
    """The summary rows of (layer, feature) pairs, in their order."""
    by_layer: dict[int, list[int]] = {}
    for layer, feature in ids.tolist():
        by_layer.setdefault(layer, []).append(feature)
    found = {layer: index.summaries(layer, features) for layer, features in by_layer.items()}
    return [found[layer][feature] for layer, feature in ids.tolist()]


@page(
    router,
    "/search",
    template="search.html",
    fragments={"results": "_search_results.html"},
    summary="Features by label terms and caption words, or by meaning; layer/feature redirects to that feature",
    responses={
        303: {"description": "q was layer/feature: to /api/layers/{layer}/features/{feature}"},
        503: {"description": "by=meaning, and search by meaning is not available here (the reason in one line)"},
    },
)
def search_page(
    index: IndexDep,
    settings: SettingsDep,
    urls: UrlsDep,
    meaning: MeaningDep,
    detail: JsonTwin,
    query: Annotated[SearchQuery, Query()],
) -> SearchPage | Redirect:
    jump = parse_jump(query.q)
    if jump and index.has_feature(*jump):
        return Redirect(urls.feature(*jump))
    limit = min(query.limit or settings.page_size, settings.max_page_size)
    by = query.by or ("meaning" if meaning.status("features").ready else "words")
    if by == "meaning":
        template = query.template or DEFAULT_TEMPLATE
        found = meaning_results(index, urls, meaning, query.q, template, query.layer, limit, detail)
    else:
        found = search_results(index, urls, query.q, query.layer, limit)
    found = found.model_copy(update={"meaning": meaning_info(index, meaning, "features")})
    add_concept_urls(index, urls, found.label_results + found.caption_results + found.meaning_results)
    return found

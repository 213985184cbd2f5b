"""`/search/images?q=`: the sample's images ranked by cosine between CLIP's text embedding of the query
(in a prompt template) and their stored image embeddings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from clipscope_explorer.app.deps import IndexDep, JsonTwin, SettingsDep, UrlsDep
from clipscope_explorer.app.meaning.info import MeaningDep, MeaningInfo, Template, explain, meaning_info
from clipscope_explorer.app.meaning.prompts import DEFAULT_TEMPLATE, MAX_QUERY_CHARS, clean_text
from clipscope_explorer.app.meaning.service import MeaningService, MeaningUnavailable
from clipscope_explorer.app.models import ImageHit, image_hits
from clipscope_explorer.app.pages.twins import page
from clipscope_explorer.app.queries import Index
from clipscope_explorer.app.urls import Urls

router = APIRouter()


class ImageSearchQuery(BaseModel):
    """The image search page's query parameters."""

    q: str = Field("", max_length=MAX_QUERY_CHARS, description="what the images should show, in words")
    template: Template = None
    limit: int | None = Field(None, ge=1, le=100_000, description="images to list (capped at max_page_size)")


class ImageSearchPage(BaseModel):
    q: str
    template: str
    truncated: bool  # the prompt was cut to the text tower's context length
    limit: int
    images: list[ImageHit]
    meaning: MeaningInfo
    message: str | None


def image_search(
    index: Index, urls: Urls, service: MeaningService, q: str, template: str, limit: int, detail: bool
) -> ImageSearchPage:
    text, hits, truncated, message = clean_text(q), [], False, None
    status = service.status("images")
    if not text:
        message = "Type what the images should show, e.g. “a dog on a beach”." if q.strip() else None
    elif not status.ready:
        message = explain(index, status, detail)
    else:
        try:
            ranking = service.images(text, template)
        except MeaningUnavailable as error:  # the text tower stopped answering
            message = explain(index, error.status, detail)
        else:
            hits = image_hits(index, urls, zip(ranking.ids[:limit, 0], ranking.scores[:limit]))
            truncated = ranking.truncated
    return ImageSearchPage(
        q=q,
        template=template,
        truncated=truncated,
        limit=limit,
        images=hits,
        meaning=meaning_info(index, service, "images"),
        message=message,
    )


@page(
    router,
    "/search/images",
    template="image_search.html",
    fragments={"results": "_image_results.html"},
    summary="Sample images ranked by cosine with CLIP's text embedding of the query",
    responses={503: {"description": "search by meaning is not available here (the reason in one line)"}},
)
def image_search_page(
    index: IndexDep,
    settings: SettingsDep,
    urls: UrlsDep,
    meaning: MeaningDep,
    detail: JsonTwin,
    query: Annotated[ImageSearchQuery, Query()],
) -> ImageSearchPage:
    limit = min(query.limit or settings.page_size, settings.max_page_size)
    return image_search(index, urls, meaning, query.q, query.template or DEFAULT_TEMPLATE, limit, detail)

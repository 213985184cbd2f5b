"""Each page registered once, from its data function: `page(router, "/x", ...)` serves `/x` as HTML
and `/api/x` as JSON, both from the same function with the same parameters.

The data function declares what it needs as FastAPI parameters (path numbers, dependencies, one
query model such as `Annotated[LayerQuery, Query()]`) and returns the page's pydantic model, or a
`Redirect` to another page (whose twin the JSON route redirects to). The JSON route is described in
the OpenAPI schema with that model; the HTML route renders it with the page's template, or only one
of its fragments when htmx asks (`app/htmx.py`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import UnionType

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from clipscope_explorer.app import htmx
from clipscope_explorer.app.templating import render_page
from clipscope_explorer.app.urls import PAGES, urls_for


@dataclass(frozen=True)
class Redirect:
    """Send the client to a page URL (built by `Urls`); the JSON route sends it to that page's twin."""

    url: str


def _page_model(annotation) -> type[BaseModel] | None:
    """The page model of a data function's return annotation (`X`, or `X | Redirect`)."""
    if typing.get_origin(annotation) in (typing.Union, UnionType):
        models = [a for a in typing.get_args(annotation) if a is not Redirect]
        return models[0] if len(models) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _endpoint(data: Callable, name: str, finish: Callable[[Request, object], object]) -> Callable:
    """A route function with `data`'s parameters (plus the request) that passes `data`'s result to `finish`."""
    signature = inspect.signature(data, eval_str=True)
    wants_request = "request" in signature.parameters
    params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values() if p.name != "request"
    ]

    def endpoint(request: Request, **values):
        if wants_request:
            values["request"] = request
        return finish(request, data(**values))

    request_param = inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
    endpoint.__signature__ = signature.replace(
        parameters=[request_param, *params], return_annotation=inspect.Signature.empty
    )
    endpoint.__name__ = endpoint.__qualname__ = name
    return endpoint


def page(
    router: APIRouter,
    path: str,
    *,
    summary: str,
    template: str | None = None,
    fragments: Mapping[str, str] | None = None,
    tags: tuple[str, ...] = ("pages",),
    responses: dict | None = None,
) -> Callable[[Callable], Callable]:
    """Register the decorated data function as the page `path` and its JSON twin `/api` + `path`.
    `template` renders the page (`fragments`: element id -> partial for htmx); a page that only
    redirects (a random feature) has none."""

    def register(data: Callable) -> Callable:
        model = _page_model(inspect.signature(data, eval_str=True).return_annotation)
        name = data.__name__.removesuffix("_page")  # operation ids: overview_json, layer_json, ...

        def as_json(request: Request, result):
            if isinstance(result, Redirect):
                return htmx.navigate(request, urls_for(request).twin(result.url))
            return result

        def as_html(request: Request, result) -> Response:
            if isinstance(result, Redirect):
                return htmx.navigate(request, result.url)
            return render_page(request, template, result, fragments=fragments or {})

        router.add_api_route(
            PAGES.twin(path),
            _endpoint(data, f"{name}_json", as_json),
            methods=["GET"],
            response_model=model,
            summary=summary,
            tags=list(tags),
            status_code=None if model else 303,
            responses=responses,
        )
        router.add_api_route(
            path,
            _endpoint(data, f"{name}_html", as_html),
            methods=["GET"],
            response_class=HTMLResponse,
            include_in_schema=False,
        )
        return data

    return register

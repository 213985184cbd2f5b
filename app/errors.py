"""Error responses: a 404 page that points somewhere useful, 422 for malformed
input, and never a traceback. `/api/...` paths get JSON, `/images/...` plain
text, everything else an HTML page.

A malformed number in the path (`/layers/abc`) names nothing, so it is a 404;
a malformed query parameter (`?page=x`) is a 422.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipscope_explorer.app import htmx
from clipscope_explorer.app.serving.cors import is_api
from clipscope_explorer.app.serving.security import SECURITY_HEADERS
from clipscope_explorer.app.templating import common_context
from clipscope_explorer.app.urls import app_path, urls_for

log = logging.getLogger(__name__)


class NotFound(Exception):
    """Nothing at this URL; `links` are (path, text) pairs to offer instead, paths inside the app
    (`urls.PAGES`): the answer puts the path prefix in front."""

    def __init__(self, message: str, links: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.links = links or [("/", "Overview")]


def _kind(request: Request) -> str:
    path = app_path(request.scope)
    if is_api(path):
        return "json"
    if path.startswith(("/images/", "/static/")) or (path.startswith("/uploads/") and path.endswith((".jpg", ".png"))):
        return "text"
    return "html"


def error_response(
    request: Request, status: int, title: str, message: str, links: list[tuple[str, str]] | None = None, detail=None
) -> Response:
    kind = _kind(request)
    urls = urls_for(request)
    offered = [(urls.app(path), text) for path, text in links or []]
    if kind == "json":
        body = {"detail": detail if detail is not None else message}
        if offered:
            body["links"] = [{"href": href, "text": text} for href, text in offered]
        return JSONResponse(body, status_code=status)
    if kind == "text":
        return PlainTextResponse(message, status_code=status)
    templates = getattr(request.app.state, "templates", None)
    if templates is None:
        return PlainTextResponse(message, status_code=status)
    context = {
        **common_context(request),
        "title": title,
        "message": message,
        "links": offered or [(urls.overview(), "Overview")],
        "status": status,
    }
    return htmx.add_vary(templates.TemplateResponse(request, "error.html", context, status_code=status))


async def _not_found(request: Request, exc: NotFound) -> Response:
    return error_response(request, 404, "Not found", exc.message, exc.links)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        return error_response(request, 404, "Not found", "There is no page at this address.")
    message = exc.detail if isinstance(exc.detail, str) else "Request not allowed."
    response = error_response(request, exc.status_code, f"Error {exc.status_code}", message)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    in_path = any(error.get("loc", ("",))[0] == "path" for error in errors)
    fields = ", ".join(str(error.get("loc", ("", "?"))[-1]) for error in errors)
    if in_path:
        return error_response(request, 404, "Not found", f"Not a valid address: bad {fields}.")
    clean = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    return error_response(request, 422, "Invalid request", f"Invalid value for {fields}.", detail=clean)


async def _unexpected(request: Request, exc: Exception) -> Response:
    """500 without details. Starlette sends this from outside every middleware, so the security headers
    are added here."""
    log.exception("unhandled error on %s", app_path(request.scope))
    response = error_response(request, 500, "Server error", "Something went wrong on our side; it has been logged.")
    for name, value in SECURITY_HEADERS:
        response.headers[name.decode()] = value.decode()
    return response


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)

"""Every decision made from htmx request headers, and every HX- response header.

One URL serves a whole page or, when htmx asks for one element of it
(`HX-Target` names a known fragment), only that fragment. Boosted navigation
(`hx-boost` on <body>) and history restores get the whole page. Responses
that differ by these headers say so with `Vary: HX-Request`.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request, Response
from fastapi.responses import RedirectResponse


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def fragment_target(request: Request) -> str | None:
    """The element id htmx wants filled, or None when it wants (or may need) the whole page."""
    if not is_htmx(request):
        return None
    if request.headers.get("HX-Boosted") == "true" or request.headers.get("HX-History-Restore-Request") == "true":
        return None
    return request.headers.get("HX-Target") or None


def choose_template(request: Request, page: str, fragments: Mapping[str, str]) -> str:
    """`fragments` maps element ids to partial templates; anything else gets `page`."""
    target = fragment_target(request)
    return fragments.get(target, page) if target else page


def add_vary(response: Response) -> Response:
    existing = response.headers.get("Vary")
    if not existing:
        response.headers["Vary"] = "HX-Request"
    elif "hx-request" not in existing.lower():
        response.headers["Vary"] = f"{existing}, HX-Request"
    return response


def navigate(request: Request, url: str) -> Response:
    """Send the browser to `url`: a 303, or for a targeted htmx request an `HX-Location`,
    so the new page replaces the whole body instead of landing inside the target."""
    if fragment_target(request):
        response = Response(status_code=200, headers={"HX-Location": url})
    else:
        response = RedirectResponse(url, status_code=303)
    response.headers["Cache-Control"] = "no-store"
    return add_vary(response)

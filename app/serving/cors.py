"""Cross-origin rules: the JSON API is readable from any site; uploads only from this one (or those listed).

- `GET`/`HEAD` of `/api...` and `/openapi.json` carry `Access-Control-Allow-Origin: *`
  (no credentials are involved anywhere), so notebooks and embeds on other
  sites can read the JSON. Their preflights (`OPTIONS` with
  `Access-Control-Request-Method: GET`) are answered 204.
- A `POST` that a browser sends from another origin (its `Origin` header names
  neither this server's host nor `CLIPSCOPE_PUBLIC_URL`) is refused with 403
  before its body is read: a form on another site cannot make visitors upload
  through this server. `POST /api/encode` and `POST /api/intervene` from an origin listed in
  `CLIPSCOPE_CORS_ORIGINS` (or any origin, with `*`) is allowed, and its
  preflight is answered 204 with that origin; an unlisted origin's preflight
  gets 403. Requests without `Origin` (curl, Python, notebooks' kernels) are
  not cross-origin requests and pass.

Starlette's `CORSMiddleware` writes the CORS headers, one instance per rule (reads: any origin; uploads: the
listed origins). This wrapper keeps what it cannot express: rules per path and method, refusing a cross-origin
POST (browsers send a form's POST without a preflight, so only the server can stop it), and the documented
preflight answers (Starlette answers 200 or 400; here 204 or 403, like every other refusal).
Pure ASGI, like `app/serving/security.py`, which adds its headers to these responses too.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipscope_explorer.app.urls import app_path

READ_METHODS = ("GET", "HEAD")
CROSS_ORIGIN_POSTS = ("/api/encode", "/api/intervene")  # the only POSTs another origin may be allowed to make
MAX_AGE = 600


def is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/") or path == "/openapi.json"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class CrossOriginMiddleware:
    def __init__(self, app: ASGIApp, allowed_origins: list[str], public_url: str | None = None):
        self.app = app
        self.public_origin = _origin(public_url) if public_url else None
        self.reads = CORSMiddleware(
            app, allow_origins=["*"], allow_methods=READ_METHODS, allow_headers=["*"], max_age=MAX_AGE
        )
        self.uploads = CORSMiddleware(
            app, allow_origins=allowed_origins, allow_methods=["POST"], allow_headers=["*"], max_age=MAX_AGE
        )

    def same_origin(self, origin: str, headers: Headers) -> bool:
        origin = origin.strip().lower()
        netloc = urlsplit(origin).netloc if "://" in origin else None
        return bool(netloc) and (netloc == headers.get("host", "").lower() or origin == self.public_origin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], app_path(scope)  # the path inside the app, without a root_path prefix
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and method == "OPTIONS" and "access-control-request-method" in headers:
            await self.preflight(path, origin, headers)(scope, receive, send)
        elif method in READ_METHODS:
            await self.app(scope, receive, _any_origin(send) if is_api(path) else send)
        elif origin is None or self.same_origin(origin, headers):
            await self.app(scope, receive, send)
        elif path in CROSS_ORIGIN_POSTS and self.uploads.is_allowed_origin(origin):
            await self.uploads(scope, receive, send)
        else:
            await _refusal(path, origin)(scope, receive, send)

    def preflight(self, path: str, origin: str, headers: Headers) -> Response:
        wanted = headers["access-control-request-method"]
        if wanted in READ_METHODS and is_api(path):
            answer = self.reads.preflight_response(request_headers=headers)
        elif wanted == "POST" and path in CROSS_ORIGIN_POSTS:
            answer = self.uploads.preflight_response(request_headers=headers)
        else:
            return _refusal(path, origin)
        if answer.status_code != 200:
            return _refusal(path, origin)
        kept = {name: value for name, value in answer.headers.items() if name not in ("content-type", "content-length")}
        return Response(status_code=204, headers=kept)


def _any_origin(send: Send) -> Send:
    """Every JSON read says `Access-Control-Allow-Origin: *`, also to requests without `Origin` (Starlette
    adds it only when there is one), so one cached copy serves every site."""

    async def send_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"access-control-allow-origin", b"*")]}
        await send(message)

    return send_with_header


def _refusal(path: str, origin: str) -> Response:
    """403, in the body's usual form (JSON under /api, else text); sent before the request body is read."""
    message = (
        f"cross-origin request from {origin.strip()[:200]} refused: only GET of the JSON API is open to "
        "other sites (the server's CLIPSCOPE_CORS_ORIGINS lists origins allowed to POST /api/encode and /api/intervene)"
    )
    if is_api(path):
        return JSONResponse({"detail": message}, status_code=403, headers={"Vary": "Origin"})
    return PlainTextResponse(message, status_code=403, headers={"Vary": "Origin"})

"""Cross-origin rules: the JSON API is readable from any site; uploads only from this one (or those listed).

- `GET`/`HEAD` of `/api...` and `/openapi.json` carry `Access-Control-Allow-Origin: *`
  (no credentials are involved anywhere), so notebooks and embeds on other
  sites can read the JSON. Their preflights (`OPTIONS` with
  `Access-Control-Request-Method: GET`) are answered 204.
- A `POST` that a browser sends from another origin (its `Origin` header names
  neither this server's host nor `CLIPSCOPE_PUBLIC_URL`) is refused with 403
  before its body is read: a form on another site cannot make visitors upload
  through this server. `POST /api/encode` from an origin listed in
  `CLIPSCOPE_CORS_ORIGINS` (or any origin, with `*`) is allowed, and its
  preflight is answered 204 with that origin; an unlisted origin's preflight
  gets 403. Requests without `Origin` (curl, Python, notebooks' kernels) are
  not cross-origin requests and pass.
Pure ASGI, like `app/serving/security.py`, which adds its headers to these responses too.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

READ_METHODS = ("GET", "HEAD")
CROSS_ORIGIN_POSTS = ("/api/encode",)  # the only POST another origin may be allowed to make
MAX_AGE = "600"
TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/") or path == "/openapi.json"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _request_headers(headers: Headers) -> str:
    """The preflight's requested header names, reduced to well-formed tokens."""
    names = [name.strip() for name in headers.get("access-control-request-headers", "").split(",")]
    return ", ".join(name for name in names if TOKEN.fullmatch(name))[:1000]


class CrossOriginMiddleware:
    def __init__(self, app: ASGIApp, allowed_origins: list[str], public_url: str | None = None):
        self.app = app
        self.allowed = set(allowed_origins)
        self.public_origin = _origin(public_url) if public_url else None

    def same_origin(self, origin: str, headers: Headers) -> bool:
        netloc = urlsplit(origin).netloc.lower() if "://" in origin else None
        return bool(netloc) and (netloc == headers.get("host", "").lower() or origin == self.public_origin)

    def post_allowed(self, path: str, origin: str) -> bool:
        return path in CROSS_ORIGIN_POSTS and ("*" in self.allowed or origin in self.allowed)

    def allow_origin_value(self, origin: str) -> bytes:
        return b"*" if "*" in self.allowed else origin.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        extra: list[tuple[bytes, bytes]] = []
        if method == "OPTIONS" and origin and "access-control-request-method" in headers:
            await self.preflight(path, origin.strip().lower(), headers, send)
            return
        if method not in READ_METHODS and origin is not None:
            origin = origin.strip().lower()
            if not self.same_origin(origin, headers):
                if not self.post_allowed(path, origin):
                    await _refuse(path, origin, send)
                    return
                extra = [(b"access-control-allow-origin", self.allow_origin_value(origin)), (b"vary", b"Origin")]
        elif method in READ_METHODS and is_api(path):
            extra = [(b"access-control-allow-origin", b"*")]
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def preflight(self, path: str, origin: str, headers: Headers, send: Send) -> None:
        wanted = headers.get("access-control-request-method", "").upper()
        allowed_headers = _request_headers(headers).encode("latin-1")
        if wanted in READ_METHODS and is_api(path):
            out = [(b"access-control-allow-origin", b"*"), (b"access-control-allow-methods", b"GET, HEAD")]
        elif wanted == "POST" and (self.post_allowed(path, origin) or
                                   (path in CROSS_ORIGIN_POSTS and self.same_origin(origin, headers))):
            out = [(b"access-control-allow-origin", self.allow_origin_value(origin)),
                   (b"access-control-allow-methods", b"POST"), (b"vary", b"Origin")]
        else:
            await _refuse(path, origin, send)
            return
        if allowed_headers:
            out.append((b"access-control-allow-headers", allowed_headers))
        out.append((b"access-control-max-age", MAX_AGE.encode()))
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})


async def _refuse(path: str, origin: str, send: Send) -> None:
    """403, in the body's usual form (JSON under /api, else text), before the request body is read."""
    message = (f"cross-origin request from {origin[:200]} refused: only GET of the JSON API is open to other "
               "sites (the server's CLIPSCOPE_CORS_ORIGINS lists origins allowed to POST /api/encode)")
    if is_api(path):
        body, media = json.dumps({"detail": message}).encode(), b"application/json"
    else:
        body, media = message.encode(), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode()),
                            (b"vary", b"Origin")]})
    await send({"type": "http.response.body", "body": body})

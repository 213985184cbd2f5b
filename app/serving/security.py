"""Security headers on every response (pages, JSON, images, static files), and redirects that never
name the host the client claimed.

The Content-Security-Policy allows only this origin's scripts, styles and
images (and `data:` images): no inline script or style, no frames around the
app, no plug-ins. Templates therefore carry no `<script>` bodies, no `on*=`
attributes and no `style=` attributes; htmx is told not to inject its
indicator styles (see base.html). The one route other sites may frame is the
embeddable feature card (`/layers/{layer}/features/{feature}/embed`, its 404s
included): its policy's `frame-ancestors` names `CLIPSCOPE_EMBED_ORIGINS`
(default any) and it carries no `X-Frame-Options`.

A redirect's `Location` that points back at this server (the framework builds
the trailing-slash redirect from the request's `Host` header) is sent as a
relative reference, so a forged `Host` never comes back as a link to another
site. The security headers on answers the HTTP protocol writes itself (400,
408, 503) are added in `transport.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipscope_explorer.app.urls import app_path

POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors {ancestors}"
)
CONTENT_SECURITY_POLICY = POLICY.format(ancestors="'none'")
EMBED_PATH = re.compile(r"/layers/[^/]+/features/[^/]+/embed")  # answers (its 404s too) may be framed

SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"strict-origin-when-cross-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]


def frame_ancestors(origins: Sequence[str]) -> str:
    """The `frame-ancestors` sources of the embed route: `*` (any site), the origins listed, or `'none'`."""
    return "*" if "*" in origins else " ".join(origins) or "'none'"


def embed_headers(origins: Sequence[str]) -> list[tuple[bytes, bytes]]:
    """`SECURITY_HEADERS` for the embed route: framing allowed to `origins`, no `X-Frame-Options`."""
    policy = POLICY.format(ancestors=frame_ancestors(origins)).encode()
    return [
        (name, policy if name == b"content-security-policy" else value)
        for name, value in SECURITY_HEADERS
        if name != b"x-frame-options"
    ]


def own_authorities(scope: Scope) -> set[str]:
    """The host[:port] forms a URL built from this request would carry: its `Host`, or the server address."""
    hosts = {value.decode("latin-1").lower() for name, value in scope.get("headers", []) if name == b"host"}
    if scope.get("server"):
        host, port = scope["server"]
        hosts |= {str(host).lower(), f"{host}:{port}".lower()}
    return hosts


def relative_location(location: bytes, authorities: set[str]) -> bytes:
    """`location` without scheme and host when it names one of `authorities` (one leading slash: browsers read
    `//x` and `/\\x` as another host)."""
    parts = urlsplit(location.decode("latin-1"))
    if parts.scheme.lower() not in ("http", "https") or parts.netloc.lower() not in authorities:
        return location
    return ("/" + parts.path.lstrip("/\\") + (f"?{parts.query}" if parts.query else "")).encode("latin-1")


class SecurityHeadersMiddleware:
    """Pure ASGI middleware (no per-request task overhead) adding `SECURITY_HEADERS` (`embed_headers` on the embed
    route) and making redirects to this server relative."""

    def __init__(self, app: ASGIApp, embed_origins: Sequence[str] = ("*",)):
        self.app = app
        self.embed = embed_headers(embed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        secured = self.embed if EMBED_PATH.fullmatch(app_path(scope)) else SECURITY_HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, relative_location(value, own_authorities(scope)) if name.lower() == b"location" else value)
                    for name, value in message.get("headers", [])
                ]
                present = {name.lower() for name, _ in headers}
                extra = [(name, value) for name, value in secured if name not in present]
                message = {**message, "headers": [*headers, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

"""Serving under a path prefix behind a reverse proxy (`CLIPSCOPE_ROOT_PATH`, e.g. `/explorer`).

The prefix becomes the request's ASGI `root_path`, and its `path` carries the
prefix in front (as the ASGI spec has it) whether the proxy forwarded
`/explorer/layers` as it came or stripped it to `/layers`; routing takes it
off again, and every URL the app writes puts it back (`app/urls.py`). So that
telling the two apart is never ambiguous, the prefix may not start with a
segment the app serves itself (`/api`, `/layers`, `/static`, ...):
`check_root_path` refuses that when the app is built.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class RootPathMiddleware:
    """Pure ASGI: sets `root_path` and puts the prefix in front of `path` when the proxy stripped it; `/explorer`
    itself is the overview, `/explorer/`."""

    def __init__(self, app: ASGIApp, root_path: str):
        self.app = app
        self.root = root_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = self.root or scope.get("root_path", "").rstrip("/")  # the setting, else the server's (uvicorn's)
        if root and scope["type"] in ("http", "websocket"):
            path, raw = scope["path"], scope.get("raw_path")
            if path == root:
                path, raw = path + "/", raw and raw + b"/"
            elif not path.startswith(root + "/"):
                path, raw = root + path, raw and root.encode() + raw
            # in place: Starlette's 500 handler, outside every middleware, reads this same scope
            scope.update(root_path=root, path=path, raw_path=raw)
        await self.app(scope, receive, send)


def _paths(routes):
    for route in routes:
        nested = getattr(route, "original_router", None)  # a router FastAPI included
        yield from _paths(nested.routes) if nested is not None else [getattr(route, "path", "")]


def check_root_path(root_path: str, routes) -> None:
    """A ValueError when the prefix's first segment is one the app's own routes start with."""
    if not root_path:
        return
    first = root_path.split("/")[1]
    served = {path.split("/")[1] for path in _paths(routes) if path.startswith("/")}
    if first in served:
        raise ValueError(
            f"CLIPSCOPE_ROOT_PATH {root_path} starts with /{first}, a path the app serves itself; pick another prefix"
        )

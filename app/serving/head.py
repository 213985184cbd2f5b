"""`HEAD` wherever `GET` is: the same status and headers, no body (RFC 9110, section 9.3.2).

FastAPI routes answer only the methods they list, so one pure ASGI middleware
serves every `HEAD` as a `GET` and drops the body on the way out; pages, JSON,
images, `/openapi.json` and static files behave alike. The `Content-Length`
stays that of the `GET` answer, as the RFC allows.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        finished = False

        async def send_without_body(message: Message) -> None:
            nonlocal finished
            if message["type"] in ("http.response.body", "http.response.pathsend"):
                if finished or message.get("more_body", False):
                    return
                finished = True
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)

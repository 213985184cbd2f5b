"""Hostile bytes on the wire, against the real server (uvicorn + the app): requests no HTTP client
library would send. Each is refused (4xx, or the connection closed) or answered safely; the server
answers normally afterwards."""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

import httpx
import pytest


def raw(server: str, request: bytes, timeout: float = 10) -> bytes:
    """Send `request` as is; return the first response (b'' when the server just closes the connection)."""
    parts = urlsplit(server)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                if _ and length and len(body) >= int(length.group(1)):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return data


def status_and_head(response: bytes) -> tuple[int | None, bytes]:
    head = response.split(b"\r\n\r\n", 1)[0]
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(match.group(1)) if match else None), head


def get(target: bytes, *headers: bytes) -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


CASES = {
    "dot-segments-static": get(b"/static/../pyproject.toml"),
    "dot-segments-deep": get(b"/static/../../../../../../etc/passwd"),
    "dot-segments-images": get(b"/images/../../../../etc/passwd"),
    "dot-segments-route": get(b"/layers/20/../../static/../app/settings.py"),
    "backslashes": get(b"/static/..\\..\\pyproject.toml"),
    "encoded-crlf-in-jump": get(b"/search?q=20/8%0d%0aX-Injected:%201"),
    "encoded-crlf-in-path": get(b"/layers/20%0d%0aX-Injected:%201"),
    "raw-cr-in-target": b"GET /search?q=20/8\rX-Injected: 1 HTTP/1.1\r\nHost: t\r\n\r\n",
    "raw-lf-in-target": b"GET /search?q=20/8\nX-Injected: 1 HTTP/1.1\r\nHost: t\r\n\r\n",
    "nul-in-target": get(b"/layers/20\x00/features/8"),
    "long-target": get(b"/search?q=" + b"a" * 100_000),
    "many-headers": get(b"/", *[b"X-H%d: v" % n for n in range(2000)]),
    "header-folding": get(b"/", b"X-A: 1", b" X-Injected: folded"),
    "bad-header-name": get(b"/", b"Bad Header: 1"),
    "bad-version": b"GET / HTTP/9.9\r\nHost: t\r\n\r\n",
    "no-version": b"GET /\r\n\r\n",
    "absolute-form": get(b"http://evil.example/layers/20"),
    "garbage": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)),
    "conflicting-lengths": b"POST /api/encode HTTP/1.1\r\nHost: t\r\n"
    b"Content-Length: 5\r\nContent-Length: 50\r\n\r\nhello",
    "chunked-and-length": b"POST /api/encode HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk": b"POST /api/encode HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: multipart/form-data; boundary=x\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
}


POSTS = ("conflicting-lengths", "chunked-and-length", "bad-chunk")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_bytes(server, case):
    """Answered without a 500 (503 here is the server's live encoding being off, for the POSTs), with no
    injected header and no file from outside `static/`; or refused by closing the connection."""
    response = raw(server, CASES[case])
    status, head = status_and_head(response)
    assert status is None or status < 500 or (status == 503 and case in POSTS), (case, head[:300])
    assert b"x-injected" not in head.lower(), (case, head[:300])
    assert b"[project]" not in response and b"root:x:0:0" not in response and b"Traceback" not in response
    assert httpx.get(server + "/api", timeout=10).status_code == 200  # and the server is fine


def test_nothing_outside_static_is_served(server):
    for target in (b"/static/../pyproject.toml", b"/static/%2e%2e/pyproject.toml", b"/static/..%2fpyproject.toml"):
        response = raw(server, get(target))
        assert b"[project]" not in response and status_and_head(response)[0] == 404, target

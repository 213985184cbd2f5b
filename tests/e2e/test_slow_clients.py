"""Slow and idle clients against a real `clipscope-explorer serve` at its default settings, over raw sockets
on loopback only (127.0.0.1, and 127.0.0.2 as a second client address). Bounded: a fixed number of
sockets, every wait has a deadline, and each server is stopped at the end.

- Connections that send nothing, part of their headers, or trickle them, are closed once the read timeout
  has passed (408 when part of a request came), and a flood of them past the connection cap neither locks
  other clients out nor takes a worker's file descriptors.
- An upload holds its slot only while its body keeps coming at the minimum rate, and one address holds at
  most its share of the slots: another address is served meanwhile.
- The answers uvicorn's protocol writes itself carry the security headers; redirects never repeat `Host`.
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from clipscope_explorer.app.serving.transport import FD_RESERVE
from clipscope_explorer.app.settings import Settings
from tests import image_cases as cases
from tests.e2e.conftest import run_server
from tests.e2e.test_hostile_http import status_and_head

DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}
READ_TIMEOUT = DEFAULTS["read_timeout"]
MAX_CONNECTIONS = DEFAULTS["max_connections"]
SHARE = DEFAULTS["upload_slots_per_client"]
MARGIN = 5.0  # seconds allowed beyond a limit for the server's timer and this test's polling
CSP = b"content-security-policy: default-src 'self'"


def address(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    return parts.hostname, parts.port


def connect(base: str, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(address(base))
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a `Content-Length` (the connection stays open)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if length and len(body) >= int(length.group(1)):
            break
    return data


def worker_pids(pid: int) -> list[int]:
    """The server's worker processes (itself with one worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children] or [pid]


class Watched:
    """Sockets read without blocking until the server closes them; what each received and when it closed."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.received: dict[socket.socket, bytes] = {}
        self.closed_at: dict[socket.socket, float] = {}

    def add(self, sock: socket.socket) -> socket.socket:
        sock.setblocking(False)
        self.received[sock] = b""
        self.selector.register(sock, selectors.EVENT_READ)
        return sock

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BlockingIOError) as error:
                data = b"" if isinstance(error, ConnectionResetError) else None
            if data is None:
                continue
            self.received[sock] += data
            if not data:
                self.selector.unregister(sock)
                self.closed_at[sock] = time.monotonic()

    def open(self) -> list[socket.socket]:
        return [sock for sock in self.received if sock not in self.closed_at]

    def close(self) -> None:
        for sock in self.received:
            sock.close()
        self.selector.close()


@pytest.fixture()
def descriptors():
    """Room in this process for a flood past two workers' connection caps."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * MAX_CONNECTIONS + 500
    assert hard == resource.RLIM_INFINITY or hard >= needed, f"raise the hard open-file limit to {needed}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_and_slow_connections_are_closed_and_never_lock_others_out(e2e_index, tmp_path, descriptors):
    processes: list = []
    running = run_server(e2e_index, "--workers", "2", "--no-live", log_path=tmp_path / "serve.log", processes=processes)
    base = next(running)
    watched = Watched()
    try:
        flood = 2 * MAX_CONNECTIONS + 500  # idle connections, past the cap of both workers
        flooders = [watched.add(connect(base)) for _ in range(flood)]
        for n, sock in enumerate(flooders):
            if n % 2:
                sock.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # half a request, then nothing
            watched.poll(0)
        opened = time.monotonic()
        silent = [watched.add(connect(base)) for _ in range(20)]
        partial = [watched.add(connect(base)) for _ in range(20)]
        trickling = [watched.add(connect(base)) for _ in range(10)]
        kept_alive = [connect(base) for _ in range(5)]
        for sock in partial + trickling:
            sock.send(b"GET /api HTTP/1.1\r\nHost: t\r\n")
        for sock in kept_alive:  # one whole request, answered; then the next one trickles in
            sock.sendall(b"GET /api HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status_and_head(read_response(sock))[0] == 200
            watched.add(sock)
        trickling += kept_alive
        reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # asks for 6 MB, reads nothing for a while
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.settimeout(10)
        reader.connect(address(base))
        asset = len(httpx.get(base + "/static/vendor/htmx.min.js", timeout=10).content)
        pipelined = 6_000_000 // asset + 1
        reader.sendall(b"GET /static/vendor/htmx.min.js HTTP/1.1\r\nHost: t\r\n\r\n" * pipelined)

        with httpx.Client(timeout=10) as client:  # fresh connections: each finds room
            for _ in range(20):
                assert client.get(base + "/api", headers={"Connection": "close"}).status_code == 200
        for pid in worker_pids(processes[0].pid):
            assert len(os.listdir(f"/proc/{pid}/fd")) <= MAX_CONNECTIONS + FD_RESERVE, pid

        deadline = opened + READ_TIMEOUT + MARGIN
        while watched.open() and time.monotonic() < deadline:
            for sock in trickling:
                if sock not in watched.closed_at:
                    try:
                        sock.send(b"X")  # a header byte a second: never silent, never finished
                    except OSError:
                        pass
            watched.poll(1.0)
        assert not watched.open(), f"{len(watched.open())} connections still open after {READ_TIMEOUT + MARGIN} s"
        for sock in silent + partial + trickling:  # none was evicted: they were the newest
            assert watched.closed_at[sock] - opened >= READ_TIMEOUT - 1.0
        for sock in partial + trickling:
            status, head = status_and_head(watched.received[sock])
            assert status == 408 and CSP in head.lower(), watched.received[sock][:400]
        assert all(watched.received[sock] == b"" for sock in silent)
        time.sleep(max(0.0, opened + READ_TIMEOUT + 2.0 - time.monotonic()))
        taken = 0
        try:
            while chunk := reader.recv(1 << 20):  # what was in flight, then the end: it was dropped
                taken += len(chunk)
        except ConnectionResetError:
            pass
        reader.close()
        assert taken < pipelined * asset / 2, taken
        assert httpx.get(base + "/api", timeout=10).status_code == 200
    finally:
        watched.close()
        running.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


BOUNDARY = "slowclientboundary"


def upload_request(image: bytes) -> tuple[bytes, bytes]:
    """(head, body) of a `POST /api/encode` carrying `image`."""
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /api/encode HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def in_progress(client: httpx.Client, base: str) -> int:
    return client.get(base + "/api/upload").json()["live"]["in_progress"]


def test_slow_uploads_hold_a_bounded_share_of_slots_for_a_bounded_time(tiny_index, tmp_path):
    index = Path(shutil.copy(tiny_index, tmp_path / "tiny.duckdb"))
    running = run_server(index, "--upload-store", str(tmp_path / "uploads"), log_path=tmp_path / "serve.log")
    base = next(running)
    image = cases.encode(cases.noisy((120, 90), seed=5), "PNG")
    head, body = upload_request(image)
    watched = Watched()
    other = httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    try:
        deadline = time.monotonic() + 60
        while other.get(base + "/api/upload").json()["live"]["state"] == "loading":
            assert time.monotonic() < deadline, "live encoder did not load"
            time.sleep(0.2)
        holders = []
        for n in range(SHARE):  # headers and a little of the body; then nothing, or a byte a second
            sock = connect(base)
            sock.sendall(head + body[:100])
            holders.append(watched.add(sock))
            while in_progress(other, base) < n + 1:  # admitted: its slot is taken
                assert time.monotonic() < deadline, "a slow upload was never admitted"
                time.sleep(0.05)
        admitted = time.monotonic()
        trickling = holders[SHARE // 2 :]

        for _ in range(2):  # the same address again: refused at once, its body unread
            sock = connect(base)
            sock.sendall(head + body)
            status, refused = status_and_head(read_response(sock))
            sock.close()
            assert status == 429 and b"retry-after:" in refused.lower() and CSP in refused.lower(), refused
        served = other.post(base + "/api/encode", files={"file": ("x.png", image, "image/png")})
        assert served.status_code == 200, served.text  # another address is served meanwhile
        assert served.json()["upload_id"] and in_progress(other, base) == SHARE

        sent = 100
        limit = admitted + READ_TIMEOUT + len(body) / DEFAULTS["upload_min_rate"] + MARGIN
        while watched.open() and time.monotonic() < limit:
            for sock in trickling:
                if sock not in watched.closed_at and sent < len(body) - 1:
                    try:
                        sock.send(body[sent : sent + 1])  # never pausing, far below the minimum rate
                    except OSError:
                        pass
            sent += 1
            watched.poll(1.0)
        assert not watched.open(), "a slow upload kept its slot"
        for sock in holders:
            status, answer = status_and_head(watched.received[sock])
            assert status == 408 and CSP in answer.lower() and b"connection: close" in answer.lower(), answer
            assert watched.closed_at[sock] - admitted >= READ_TIMEOUT - 1.0
        assert in_progress(other, base) == 0
        with httpx.Client(timeout=30) as same:  # the slow address may upload again
            again = same.post(base + "/api/encode", files={"file": ("x.png", image, "image/png")})
        assert again.status_code == 200 and again.json()["upload_id"] == served.json()["upload_id"]
    finally:
        other.close()
        watched.close()
        running.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_protocol_errors_carry_the_security_headers(server):
    for request in (
        b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: 1\r\n\r\n",  # a bad header line
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ):  # two
        with connect(server) as sock:
            sock.sendall(request)
            status, head = status_and_head(read_response(sock))
        assert status == 400 and CSP in head.lower() and b"x-frame-options: deny" in head.lower(), (request, head)


def test_trailing_slash_redirect_does_not_repeat_a_forged_host(server):
    with connect(server) as sock:
        sock.sendall(b"GET /layers/20/?page=2 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        status, head = status_and_head(read_response(sock))
    assert status == 307 and re.search(rb"(?im)^location: /layers/20\?page=2\r?$", head), head
    assert b"evil.example" not in head

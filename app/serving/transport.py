"""The HTTP protocol the server runs: uvicorn's h11 protocol, guarded against slow and idle clients.

- Nagle's algorithm is off on every connection. With `--workers N > 1`,
  uvicorn binds the listening socket itself with protocol number 0, and
  asyncio only sets TCP_NODELAY on sockets whose protocol is IPPROTO_TCP.
  Responses on kept-alive connections then wait for the client's delayed ACK
  (the cost is in bench/RESULTS.md, serving).
- Read timeout (`timeout_keep_alive`, from `CLIPSCOPE_READ_TIMEOUT`): a
  connection waiting for a request (just opened, or after a response) must
  deliver that request's headers within that many seconds of when the wait
  began, however it trickles them; otherwise it is closed (with 408 when part
  of a request came). uvicorn itself only times out connections that send
  nothing at all. A connection whose client takes nothing of a response for
  as long (its write buffer stays above the high-water mark) is dropped too.
- Connection cap (`limit_concurrency`, from `CLIPSCOPE_MAX_CONNECTIONS`; never
  above the open-file limit less `FD_RESERVE`): a connection opened at the cap
  closes the connection that has waited longest for a request, so idle
  connections cannot lock clients out; when every connection has a request in
  progress, the new one is answered 503. (uvicorn's own use of the option,
  503 for every request once the cap is reached, is turned off.)
- The answers written here rather than by the app (400 for a malformed
  request, 408, 503) carry the same security headers as every app response.
"""

from __future__ import annotations

import resource
import socket
from http import HTTPStatus
from weakref import WeakKeyDictionary

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from clipscope_explorer.app.serving.security import SECURITY_HEADERS

DEFAULT_MAX_CONNECTIONS = 1000
FD_RESERVE = 128  # descriptors left for the index, the upload store, logs and libraries

_WAITING: WeakKeyDictionary = WeakKeyDictionary()  # server state -> {protocol: None}, longest waiting first


def connection_cap(limit: int | None) -> int:
    """`limit` (or the default), lowered to fit this process's open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = limit or DEFAULT_MAX_CONNECTIONS
    return cap if soft == resource.RLIM_INFINITY else max(1, min(cap, soft - FD_RESERVE))


def plain_response(status: int, message: str, *headers: tuple[bytes, bytes]) -> bytes:
    """A complete `Connection: close` response with a text body and the security headers."""
    body = message.encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode(),
        b"content-type: text/plain; charset=utf-8",
        b"content-length: %d" % len(body),
        b"connection: close",
        *(name + b": " + value for name, value in (*headers, *SECURITY_HEADERS)),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class ServerHTTPProtocol(H11Protocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = connection_cap(self.limit_concurrency)
        self.limit_concurrency = None  # enforced here per connection, not as a 503 for every request
        self.read_timeout = self.timeout_keep_alive
        self.waiting = _WAITING.setdefault(self.server_state, {})
        self.read_deadline = None
        self.write_deadline = None

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        crowded = len(self.connections) >= self.max_connections
        super().connection_made(transport)
        if crowded and not self.waiting:
            transport.write(plain_response(503, "too many connections; try again shortly", (b"retry-after", b"1")))
            transport.close()
            return
        if crowded:
            next(iter(self.waiting)).close_idle()
        self.wait_for_request()

    def wait_for_request(self) -> None:
        self.stop_waiting()
        self.waiting[self] = None
        self.read_deadline = self.loop.call_later(self.read_timeout, self.read_timed_out)

    def stop_waiting(self) -> None:
        self.waiting.pop(self, None)
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def close_idle(self) -> None:
        """Close now: a client that does not read its last response would keep a closing transport forever."""
        self.stop_waiting()
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def read_timed_out(self) -> None:
        self.read_deadline = None
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and not self.transport.is_closing():
            self.transport.write(plain_response(408, "the request's headers took too long"))
        self.close_idle()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.request_in_progress():
            self.stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.request_in_progress():
            self.wait_for_request()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_deadline is None:
            self.write_deadline = self.loop.call_later(self.read_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_waiting()
        if self.write_deadline is not None:
            self.write_deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self.stop_waiting()
        self.transport.write(plain_response(400, msg))
        self.transport.close()

"""The HTTP protocol the server runs: uvicorn's own, with Nagle's algorithm off on every connection.

With `--workers N > 1`, uvicorn binds the listening socket itself with
protocol number 0, and asyncio only sets TCP_NODELAY on sockets whose
protocol is IPPROTO_TCP. Responses on kept-alive connections then wait for
the client's delayed ACK: about 40 ms per request (measured with
bench/serve.py). Setting the option on each accepted connection restores
sub-millisecond responses in every worker mode.
"""

from __future__ import annotations

import socket

from uvicorn.protocols.http.auto import AutoHTTPProtocol


class NoDelayHTTPProtocol(AutoHTTPProtocol):
    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

"""Every accepted connection gets TCP_NODELAY, also in uvicorn's multi-worker mode (protocol number 0)."""

import asyncio
import socket

import uvicorn

from clipscope_explorer.app.serving.transport import ServerHTTPProtocol


class Transport(asyncio.Transport):
    def __init__(self, sock):
        super().__init__()
        self.sock = sock

    def get_extra_info(self, name, default=None):
        return {"socket": self.sock, "peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def is_closing(self):
        return False


def test_connection_made_turns_nagle_off():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0, as uvicorn binds for --workers > 1
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        config = uvicorn.Config(app=lambda *a: None)
        config.load()
        loop = asyncio.new_event_loop()
        try:
            protocol = ServerHTTPProtocol(
                config=config, server_state=uvicorn.server.ServerState(), app_state={}, _loop=loop
            )
            protocol.connection_made(Transport(accepted))
        finally:
            loop.close()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        for sock in (client, accepted, listener):
            sock.close()

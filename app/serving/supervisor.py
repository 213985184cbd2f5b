"""`serve --workers N` (N > 1): N uvicorn worker processes on one port, each accepting on a socket of its own.

uvicorn's own multi-worker mode hands every worker one shared listening socket,
and the worker whose event loop wakes first accepts every pending connection:
connections opened in a burst and kept alive (a proxy's upstream pool, a load
test) all land on one worker (32/0 measured). Here each worker slot has its own
socket in one SO_REUSEPORT group, and the kernel spreads new connections over
the slots. The parent keeps every socket open, so connections hashed to a slot
wait in its backlog while that slot's worker restarts, and none is refused.

Signals: SIGINT and SIGTERM stop the workers and the parent. SIGHUP replaces
the workers one slot at a time, each replacement serving (it has opened and
checked the index) before its predecessor stops; a replacement that does not
start aborts the restart and the old workers go on. A worker that dies is
replaced on its slot; one that fails at start-up stops the server, since it
would fail the same way again.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Process

logger = logging.getLogger("uvicorn.error")
READY_TIMEOUT_S = 120  # a replacement opens and warms the index (seconds on a full-size one) before it serves


def listening_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """`count` listening sockets on one address, in one SO_REUSEPORT group. Raises OSError when the port is
    taken, even by another process's SO_REUSEPORT group (which would otherwise silently share the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # no SO_REUSEPORT: fails on any listener
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Supervisor:
    def __init__(self, config: Config, sockets: list[socket.socket]):
        self.config, self.sockets = config, sockets
        self.workers: list[Process] = []
        self.should_exit = threading.Event()
        self.signals: list[int] = []
        self.exit_code = 0

    def spawn(self, slot: int) -> Process:
        worker = Process(self.config, [self.sockets[slot]])
        worker.start()
        return worker

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda number, frame: self.signals.append(number))
        host, port = self.sockets[0].getsockname()[:2]
        logger.info(
            f"Running on http://{host}:{port} with {len(self.sockets)} workers, one socket each (Press CTRL+C to quit)"
        )
        self.workers = [self.spawn(slot) for slot in range(len(self.sockets))]
        while not self.should_exit.wait(0.5):
            while self.signals:
                if self.signals.pop(0) == signal.SIGHUP:
                    self.restart_all()
                else:
                    self.should_exit.set()
            self.replace_dead()
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.join()
        for sock in self.sockets:
            sock.close()
        return self.exit_code

    def restart_all(self) -> None:
        logger.info("Received SIGHUP, replacing the workers one at a time.")
        for slot, old in enumerate(self.workers):
            new = self.spawn(slot)
            if not new.wait_until_ready(READY_TIMEOUT_S, self.should_exit):
                new.kill()
                new.join()
                logger.error(
                    f"New worker [{new.pid}] did not start serving; keeping worker [{old.pid}] "
                    "and aborting the restart."
                )
                return
            old.terminate()
            old.join()
            self.workers[slot] = new

    def replace_dead(self) -> None:
        for slot, worker in enumerate(self.workers):
            if self.should_exit.is_set() or worker.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            worker.kill()  # gone or hung
            worker.join()
            if worker.exitcode == STARTUP_FAILURE:
                logger.error(f"Worker [{worker.pid}] failed to start; stopping the server.")
                self.exit_code = 1
                self.should_exit.set()
                return
            logger.warning(f"Worker [{worker.pid}] died (exit code {worker.exitcode}); starting another.")
            self.workers[slot] = self.spawn(slot)

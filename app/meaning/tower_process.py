"""One text tower for every worker of a server: a process of its own that embeds queries for all of them.

A text tower in each worker would cost each one torch, open_clip and the weights (about 730 MB for ViT-L/14);
`serve` starts this process once instead (`TowerProcess`), before the workers, and hands them its address
(`CLIPSCOPE_TEXT_ADDRESS`, a Unix socket in a private folder, with `CLIPSCOPE_TEXT_AUTHKEY`: connections
are authenticated). A worker's `MeaningService` then talks to it through `RemoteTextTower`, which answers
like `precompute/model/text.py`'s `TextTower` (`encode`, `dim`, `context_length`, `precision`).

The process listens at once and loads the tower in the background, so a worker can ask how loading goes:
requests are `("status",)` and `("encode", texts)`; answers `("loading",)`, `("ready", dim, context_length,
precision)`, `("failed", message)`, `("embedded", vectors, truncated)` or `("error", message)`. It encodes one
request at a time (they would only share the same cores) and ends with its parent. This module imports no
torch: only the process's own entry point does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from clipscope_explorer.app.meaning.service import TextSpec

log = logging.getLogger(__name__)

ADDRESS_VARIABLE, AUTHKEY_VARIABLE = "CLIPSCOPE_TEXT_ADDRESS", "CLIPSCOPE_TEXT_AUTHKEY"
POLL_S = 0.2
UNREACHABLE_S = 30.0  # how long a worker waits for the process to listen before it gives up


class TowerProcess:
    """The shared text-tower process of a server (started by `serve`, stopped with it)."""

    def __init__(self, spec: TextSpec):
        self.folder = Path(tempfile.mkdtemp(prefix="clipscope-text-"))  # mode 0700: only this user connects
        self.address = str(self.folder / "tower.sock")
        self.authkey = secrets.token_bytes(32)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: the server's state is not copied
        self.process = context.Process(
            target=serve_tower, args=(asdict(spec), self.address, self.authkey), name="clipscope-text", daemon=True
        )

    def start(self) -> TowerProcess:
        self.process.start()
        return self

    def environment(self) -> dict[str, str]:
        """What the workers need to reach the process."""
        return {ADDRESS_VARIABLE: self.address, AUTHKEY_VARIABLE: self.authkey.hex()}

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


def serve_tower(spec: dict, address: str, authkey: bytes) -> None:
    """The process's entry point: listen, load the tower in the background, answer until the parent ends."""
    state: dict = {"answer": ("loading",)}
    lock = threading.Lock()
    threading.Thread(target=_load, args=(spec, state), daemon=True).start()
    threading.Thread(target=_end_with_parent, args=(os.getppid(), Path(address).parent), daemon=True).start()
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        while True:
            try:
                connection = listener.accept()
            except (OSError, EOFError, multiprocessing.AuthenticationError):
                continue
            threading.Thread(target=_answer, args=(connection, state, lock), daemon=True).start()


def _end_with_parent(parent: int, folder: Path) -> None:
    """Exit once the parent is gone, even killed without the chance to stop this process (and its folder)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def _load(spec: dict, state: dict) -> None:
    try:
        from clipscope_explorer.app.meaning.service import load_tower_for  # torch loads here

        tower = load_tower_for(spec)
    except Exception as error:  # noqa: BLE001 - the workers report it and keep word search
        text = str(error).strip()
        state["answer"] = ("failed", text.splitlines()[0] if text else type(error).__name__)
    else:
        state["tower"] = tower
        state["answer"] = ("ready", tower.dim, tower.context_length, tower.precision)


def _answer(connection: Connection, state: dict, lock: threading.Lock) -> None:
    with connection:
        while True:
            try:
                request = connection.recv()
            except (EOFError, OSError):
                return
            if request[0] == "encode" and "tower" in state:
                try:
                    with lock:
                        embedding = state["tower"].encode(list(request[1]))
                    reply = ("embedded", embedding.vectors, list(embedding.truncated))
                except Exception as error:  # noqa: BLE001 - one bad request must not end the process
                    reply = ("error", str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
            else:
                reply = state["answer"]
            connection.send(reply)


class TextEmbedding:
    """As `precompute/model/text.py`'s: vectors [n, d] float32 unit, truncated[i] for text i."""

    def __init__(self, vectors: np.ndarray, truncated: list[bool]):
        self.vectors, self.truncated = vectors, truncated


class RemoteTextTower:
    """A worker's view of the shared process, answering as a `TextTower` does. `connect` waits until the
    process has loaded the tower, and raises RuntimeError (one line) when it failed or cannot be reached."""

    def __init__(self, address: str, authkey: bytes):
        self.address, self.authkey = address, authkey
        self.connection: Connection | None = None
        self.dim = self.context_length = 0
        self.precision = ""

    @classmethod
    def from_environment(cls) -> RemoteTextTower | None:
        address = os.environ.get(ADDRESS_VARIABLE)
        return cls(address, bytes.fromhex(os.environ.get(AUTHKEY_VARIABLE, ""))) if address else None

    def connect(self) -> RemoteTextTower:
        unreachable_since = time.monotonic()
        while True:
            try:
                answer = self._ask(("status",))
            except (OSError, EOFError) as error:
                if time.monotonic() - unreachable_since > UNREACHABLE_S:
                    raise RuntimeError(f"the server's text-tower process cannot be reached ({error})") from error
            else:
                unreachable_since = time.monotonic()
                if answer[0] == "ready":
                    self.dim, self.context_length, self.precision = answer[1:]
                    return self
                if answer[0] == "failed":
                    raise RuntimeError(answer[1])
            time.sleep(POLL_S)

    def encode(self, texts) -> TextEmbedding:
        """Callers serialise: one request at a time on the one connection (MeaningService's encode lock)."""
        try:
            answer = self._ask(("encode", list(texts)))
        except (OSError, EOFError):  # the connection broke (the process restarted, say): once more, afresh
            self.connection = None
            answer = self._ask(("encode", list(texts)))
        if answer[0] != "embedded":
            raise RuntimeError(answer[-1] if len(answer) > 1 else "the text tower is not ready")
        return TextEmbedding(answer[1], answer[2])

    def _ask(self, request: tuple):
        if self.connection is None:
            self.connection = Client(self.address, family="AF_UNIX", authkey=self.authkey)
        try:
            self.connection.send(request)
            return self.connection.recv()
        except (OSError, EOFError):
            self.connection.close()
            self.connection = None
            raise

"""A local OpenAI-compatible chat-completions server for the judge's tests and bench: a real aiohttp server on
127.0.0.1 in a thread of its own (`with FakeOpenAI(...) as server:`; `server.url` is the API base, `/v1`), or
in a process of its own (`python -m tests.fake_openai --latency 0.2`, which prints its URL).

Each request takes the next behaviour of its script (`behaviours`, `then(...)`), then `default`:
- "nearest": answers from the images it was sent: the grid holding the cell nearest to the query (mean absolute
  pixel difference), so a judge that sends the right images in the right places is always right when the
  query is one of a grid's images;
- "one", "two": always that answer; "switch": changes its mind, ending with the nearest answer in lower case;
- "no_answer": a reply without an ANSWER line; "malformed": a 200 whose body is not JSON;
- "429" (with `Retry-After: retry_after`), "500", "401", "404": those statuses;
- "hang": answers after `hang_s` (or when the server stops), past any sensible client timeout.
Every request is recorded (headers, parsed body, behaviour) and so is the peak number of requests in flight.
The replies carry `usage` (`prompt_tokens`, `completion_tokens`) and wait `latency_s` first.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
from aiohttp import web
from PIL import Image

USAGE = {"prompt_tokens": 1000, "completion_tokens": 20, "total_tokens": 1020}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict | None
    behaviour: str


def images_of(body: dict) -> list[Image.Image]:
    """The images of a chat request, in order, decoded from their base64 data URLs."""
    images = []
    for message in body["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part.get("type") == "image_url":
                head, _, data = part["image_url"]["url"].partition(",")
                assert head == "data:image/jpeg;base64", head
                images.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return images


def nearest(body: dict) -> int:
    """1 or 2: the grid whose closest cell is closest to the query."""
    grid1, grid2, query = images_of(body)
    side = grid1.width // 3
    target = np.asarray(query.convert("RGB").resize((side, side)), dtype=np.float32)

    def best(grid: Image.Image) -> float:
        cells = np.asarray(grid.convert("RGB"), dtype=np.float32)
        return min(
            float(np.abs(cells[r * side : (r + 1) * side, c * side : (c + 1) * side] - target).mean())
            for r in range(3)
            for c in range(3)
        )

    return 1 if best(grid1) <= best(grid2) else 2


class FakeOpenAI:
    def __init__(
        self,
        behaviours=(),
        default: str = "nearest",
        latency_s: float = 0.0,
        retry_after: str = "0",
        hang_s: float = 30.0,
        port: int = 0,
    ):
        self.script, self.default = deque(behaviours), default
        self.latency_s, self.retry_after, self.hang_s, self.port = latency_s, retry_after, hang_s, port
        self.requests: list[Recorded] = []
        self.in_flight = self.peak = 0
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def then(self, *behaviours: str) -> FakeOpenAI:
        self.script.extend(behaviours)
        return self

    def __enter__(self) -> FakeOpenAI:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name="fake-openai")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake OpenAI server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._closing.set)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self, ready: threading.Event) -> None:
        self._loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._handle)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.port = runner.addresses[0][1]
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    async def _handle(self, request: web.Request) -> web.Response:
        behaviour = self.script.popleft() if self.script else self.default
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            self.requests.append(Recorded(request.path, dict(request.headers), body, behaviour))
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return await self._respond(behaviour, body)
        finally:
            self.in_flight -= 1

    async def _respond(self, behaviour: str, body: dict | None) -> web.Response:
        if behaviour in ("401", "404", "500"):
            error = {"error": {"message": f"fake error {behaviour}", "type": "fake", "code": behaviour}}
            return web.json_response(error, status=int(behaviour))
        if behaviour == "429":
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers=self._retry())
        if behaviour == "malformed":
            return web.Response(text='{"choices": [{"message": ', content_type="application/json")
        if behaviour == "hang":
            try:
                await asyncio.wait_for(self._closing.wait(), self.hang_s)
            except TimeoutError:
                pass
        answer = {"one": 1, "two": 2}.get(behaviour)
        if answer is None and behaviour != "no_answer":
            answer = await asyncio.get_running_loop().run_in_executor(None, nearest, body)
        content = {
            "no_answer": "Both neurons look alike to me; I cannot tell.",
            "switch": f"At first: ANSWER: {3 - (answer or 1)}. On reflection, the query fits better.\nanswer: {answer}",
        }.get(behaviour, f"The query looks like neuron {answer}'s examples.\nANSWER: {answer}")
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": (body or {}).get("model"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": USAGE,
            }
        )

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after is not None else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--default", default="nearest")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with FakeOpenAI(default=args.default, latency_s=args.latency, port=args.port) as server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()

"""Sort-evaluation trials judged by a vision-language model behind any OpenAI-compatible chat-completions
endpoint (vLLM, llama.cpp, Ollama, a hosted API): `OpenAIJudge`, a `Judge`.

A trial is one request to `{url}/chat/completions` in the release's prompt shape: an introduction, "Neuron 1
examples:" and grid 1, "Neuron 2 examples:" and grid 2, "Query image:" and the query, then the request to
reason briefly and end with `ANSWER: 1` or `ANSWER: 2`; the answer is the reply's last such line. A grid is one
image, the 3 x 3 montage of its images (centre squares of CELL px; fewer than 9 leave white cells); every image
goes inline as a base64 JPEG data URL. The key is read from the environment variable `key_env` (none: no
Authorization header, as a local server wants).

Nothing that goes wrong with one request stops the run. Connection errors, timeouts, HTTP 408, 429 (after its
Retry-After) and 5xx, and a body that is not a chat completion's JSON are retried `retries` times with
exponential backoff and jitter; then the trial is unanswered (None) and counted `failed`. A reply without an
ANSWER line is asked once more, then counted `unparseable`. When `stop_after_failures` trials in a row have
failed (an endpoint that is down), the rest are counted failed without asking. Any other HTTP 4xx (a bad key,
an unknown model, a wrong URL) would fail every trial alike: a `JudgeError` at once, naming the URL and status.

Answers are kept in `cache_dir`, one small JSON file per trial, written atomically and keyed by a hash of the
endpoint, model, prompt version and the trial's images (their recorded source and key, so answers outlive a
rebuilt index): a rerun, or an interrupted run started again, pays only for the trials not yet answered.
Throughput is bounded by `concurrency` requests in flight (bench/judge.py).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path

import aiohttp
from PIL import Image
from tqdm import tqdm

from clipscope_explorer.precompute.evaluate.judging import Trial
from clipscope_explorer.precompute.evaluate.sample_images import SampleImageError, SampleImages
from clipscope_explorer.precompute.model.imageio import square_crop

log = logging.getLogger(__name__)

PROMPT_VERSION = 1  # change it with the prompt or the images sent: cached answers are keyed by it
INTRO = (
    "We are studying neurons in a computer vision model. Each neuron is shown by a 3 x 3 grid of the images "
    "that activate it most. Below are the examples of two neurons, then a query image that activates exactly "
    "one of them. Decide which neuron the query image belongs to."
)
REQUEST = "Reason briefly about what each neuron responds to, then end your reply with `ANSWER: 1` or `ANSWER: 2`."
CELL = 224  # pixels a side of each image sent
JPEG_QUALITY = 90
ANSWER = re.compile(r"ANSWER\**\s*:\s*\**\s*(?:neuron\s*)?([12])(?!\d)", re.IGNORECASE)
RETRYABLE = {408, 429}  # and every 5xx
MAX_RETRY_AFTER_S = 60.0
COUNTS = ("requests", "cached", "prompt_tokens", "completion_tokens", "unparseable", "failed")


class JudgeError(RuntimeError):
    """The endpoint refuses the run itself (a bad key, an unknown model, a wrong URL): not worth retrying."""


def parse_answer(reply: str) -> int | None:
    """The last `ANSWER: 1` or `ANSWER: 2` of a reply (any case, markdown bold allowed), else None."""
    found = ANSWER.findall(reply or "")
    return int(found[-1]) if found else None


def montage(images: Sequence[Image.Image], cell: int = CELL, columns: int = 3) -> Image.Image:
    """The images' centre squares, `cell` px each, row by row on a `columns` x `columns` white canvas."""
    canvas = Image.new("RGB", (columns * cell, columns * cell), (255, 255, 255))
    for n, image in enumerate(images[: columns * columns]):
        canvas.paste(square_crop(image, cell), ((n % columns) * cell, (n // columns) * cell))
    return canvas


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (a number or an HTTP date), capped at MAX_RETRY_AFTER_S."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class OpenAIJudge:
    name = "openai"

    def __init__(
        self,
        url: str,
        model: str,
        images: SampleImages,
        key_env: str = "OPENAI_API_KEY",
        cache_dir: Path | str | None = None,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 4,
        progress: bool = True,
        backoff_s: float = 1.0,
        temperature: float | None = 0.0,
        max_tokens: int | None = None,
        stop_after_failures: int | None = 16,
    ):
        self.url, self.model, self.images = url.rstrip("/"), model, images
        self.endpoint = f"{self.url}/chat/completions"
        self.key_env, self.key = key_env, os.environ.get(key_env) or None
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.concurrency, self.retries, self.backoff_s = max(1, concurrency), retries, backoff_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.progress, self.temperature, self.max_tokens = progress, temperature, max_tokens
        self.stop_after_failures = stop_after_failures
        self.counts = dict.fromkeys(COUNTS, 0)
        self.failures: list[str] = []  # why trials went unanswered (the first few)
        self._failed_in_a_row = 0
        self._grid = functools.lru_cache(maxsize=256)(self._grid_url)

    def report(self) -> dict[str, int]:
        return dict(self.counts)

    def close(self) -> None:
        self.images.close()

    def answer(self, trials: Sequence[Trial]) -> list[int | None]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._answer_all(list(trials)))
        with ThreadPoolExecutor(1) as thread:  # called from a running event loop (a notebook): a loop of its own
            return thread.submit(asyncio.run, self._answer_all(list(trials))).result()

    async def _answer_all(self, trials: list[Trial]) -> list[int | None]:
        names = self.images.identities({i for trial in trials for i in (*trial.grid1, *trial.grid2, trial.query)})
        keys = [self._cache_key(trial, names) for trial in trials]
        answers: list[int | None] = [None] * len(trials)
        todo = deque()
        for n, key in enumerate(keys):
            hit = self._cached(key)
            if hit is None:
                todo.append(n)
                continue
            answers[n] = hit.get("answer")
            self.counts["cached"] += 1
            self.counts["unparseable"] += answers[n] is None
        done = len(trials) - len(todo)
        bar = tqdm(total=len(trials), initial=done, desc="judge", unit="trial", disable=not self.progress)  # stderr
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.key}"} if self.key else {})
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, 4), thread_name_prefix="judge-prompt")
        try:
            connector = aiohttp.TCPConnector(limit=self.concurrency)
            async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=self.timeout) as session:
                work = (session, pool, todo, trials, keys, answers, bar)
                tasks = [asyncio.create_task(self._worker(*work)) for _ in range(min(self.concurrency, len(todo)))]
                if tasks:
                    finished, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    for task in finished:
                        if task.exception() is not None:
                            raise task.exception()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return answers

    async def _worker(self, session, pool, todo: deque, trials, keys, answers, bar) -> None:
        loop = asyncio.get_running_loop()
        while todo:
            n = todo.popleft()
            if self.stop_after_failures is not None and self._failed_in_a_row >= self.stop_after_failures:
                self._unanswered("failed", None)
            else:
                try:
                    body = await loop.run_in_executor(pool, self._body, trials[n])
                except SampleImageError as error:
                    self._unanswered("failed", str(error))
                else:
                    answers[n] = await self._judge(session, body, keys[n])
            bar.update()
            tokens = self.counts["prompt_tokens"] + self.counts["completion_tokens"]
            bar.set_postfix(
                requests=self.counts["requests"], tokens=tokens, failed=self.counts["failed"], refresh=False
            )

    async def _judge(self, session, body: bytes, key: str) -> int | None:
        """Ask (once more when the reply has no ANSWER line); cache what was answered."""
        for _ in range(2):
            reply = await self._complete(session, body)
            if reply is None:
                self._failed_in_a_row += 1
                if self._failed_in_a_row == self.stop_after_failures:
                    log.warning(
                        "judge %s: %d trials in a row failed, asking no more", self.endpoint, self._failed_in_a_row
                    )
                return None
            self._failed_in_a_row = 0
            answer = parse_answer(reply["content"])
            if answer is not None:
                break
        else:
            self._unanswered("unparseable", f"no ANSWER line in the reply: {reply['content'][-200:]!r}")
        self._store(key, {"answer": answer, "reply": reply["content"][-4000:], "usage": reply["usage"]})
        return answer

    async def _complete(self, session, body: bytes) -> dict | None:
        """The reply's message content and usage, or None after `retries` retries (counted failed)."""
        reason = ""
        for attempt in range(self.retries + 1):
            wait = None
            self.counts["requests"] += 1
            try:
                async with session.post(self.endpoint, data=body) as response:
                    if 200 <= response.status < 300:
                        try:
                            return self._reply(await response.json(content_type=None))
                        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
                            reason = f"a reply that is not a chat completion ({type(error).__name__})"
                    elif response.status in RETRYABLE or response.status >= 500:
                        reason, wait = f"HTTP {response.status}", retry_after(response.headers.get("Retry-After"))
                    else:
                        raise JudgeError(self._refusal(response.status, await response.text()))
            except (aiohttp.ClientError, TimeoutError) as error:
                reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            if attempt < self.retries:
                backoff = self.backoff_s * 2**attempt + random.uniform(0, self.backoff_s)
                await asyncio.sleep(wait if wait is not None else backoff)
        self._unanswered("failed", f"gave up after {self.retries + 1} attempts: {reason}")
        return None

    def _reply(self, data: dict) -> dict:
        message = data["choices"][0]["message"]
        usage = data.get("usage") or {}
        for name in ("prompt_tokens", "completion_tokens"):
            self.counts[name] += int(usage.get(name) or 0)
        content = message.get("content") or ""
        if isinstance(content, list):  # some servers answer in parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise TypeError("message content is not text")
        return {"content": content, "usage": {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}}

    def _refusal(self, status: int, text: str) -> str:
        hints = {
            401: f"the key in ${self.key_env} was refused" if self.key else f"it wants a key: set ${self.key_env}",
            403: f"the key in ${self.key_env} may not use this model",
            404: f"no such endpoint or model: is {self.url} the API base (e.g. http://127.0.0.1:8000/v1), "
            f"and {self.model!r} a model it serves?",
        }
        hint = hints.get(status, f"the request for model {self.model!r} was refused")
        return f"judge {self.endpoint} answered HTTP {status}: {hint} ({' '.join(text.split())[:200]})"

    def _unanswered(self, kind: str, reason: str | None) -> None:
        self.counts[kind] += 1
        if reason and len(self.failures) < 20:
            if not self.failures:
                log.warning("judge %s: a trial went unanswered: %s", self.endpoint, reason)
            self.failures.append(reason)

    def _body(self, trial: Trial) -> bytes:
        """The request, as JSON bytes (built in a worker thread: decoding and JPEG encoding)."""

        def text(value: str) -> dict:
            return {"type": "text", "text": value}

        def image(url: str) -> dict:
            return {"type": "image_url", "image_url": {"url": url}}

        query = data_url(square_crop(self.images.image(trial.query), CELL))
        content = [text(INTRO), text("Neuron 1 examples:"), image(self._grid(tuple(trial.grid1)))]
        content += [text("Neuron 2 examples:"), image(self._grid(tuple(trial.grid2)))]
        content += [text("Query image:"), image(query), text(REQUEST)]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], **self._options()}
        return json.dumps(body).encode()

    def _options(self) -> dict:
        options = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        return {name: value for name, value in options.items() if value is not None}

    def _grid_url(self, ids: tuple[int, ...]) -> str:
        return data_url(montage(self.images.images(ids)))

    def _cache_key(self, trial: Trial, names: dict[int, str]) -> str:
        def named(ids) -> list[str]:
            return [names.get(i, f"id {i}") for i in ids]

        images = [named(trial.grid1), named(trial.grid2), named([trial.query])]
        what = [self.url, self.model, PROMPT_VERSION, self._options(), images]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, key: str) -> dict | None:
        if self.cache_dir is None:
            return None
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def _store(self, key: str, entry: dict) -> None:
        if self.cache_dir is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        partial.write_text(json.dumps(entry))
        os.replace(partial, path)

"""The openai judge against a real local HTTP server speaking the OpenAI chat-completions API (tests/fake_openai.py),
on the images of an index built by the real precompute job: the prompt and images it sends, the answers it
reads back, and every way a judge can fail (each retried, then counted, never a crash)."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from clipscope_explorer.precompute.evaluate.judging import Trial
from clipscope_explorer.precompute.evaluate.openai_judge import (
    CELL,
    INTRO,
    JudgeError,
    OpenAIJudge,
    parse_answer,
    retry_after,
)
from clipscope_explorer.precompute.evaluate.sample_images import SampleImages
from clipscope_explorer.precompute.model.imageio import square_crop
from tests.fake_openai import FakeOpenAI, images_of

FAST = {"backoff_s": 0.001, "progress": False}  # keep retries quick; no progress bar unless a test asks


@pytest.fixture(scope="module")
def images(tiny_index):
    with SampleImages(tiny_index) as sample_images:
        yield sample_images


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def make_trials(count: int, seed: int = 0, n_images: int = 41) -> tuple[list[Trial], list[int]]:
    """Trials whose query is one of grid 1's or grid 2's images (so the right answer is known), and the answers."""
    rng = random.Random(seed)
    trials, expected = [], []
    for _ in range(count):
        ids = rng.sample(range(n_images), 18)
        grid1, grid2 = tuple(ids[:9]), tuple(ids[9:])
        answer = rng.choice((1, 2))
        trials.append(Trial(grid1, grid2, rng.choice(grid1 if answer == 1 else grid2)))
        expected.append(answer)
    return trials, expected


def judge_for(server_url: str, images, **options) -> OpenAIJudge:
    return OpenAIJudge(server_url, "fake-vlm", images, **(FAST | options))


def counts(judge: OpenAIJudge, *names: str) -> dict:
    """Those counts of the judge's report (whose keys are checked)."""
    report = judge.report()
    assert set(report) == {"requests", "cached", "prompt_tokens", "completion_tokens", "unparseable", "failed"}
    return {name: report[name] for name in names}


def test_the_prompt_holds_the_release_shape_and_the_trial_images(images, tiny_index):
    trial = Trial((0, 1, 2, 3, 4, 5, 6, 7, 8), (9, 10, 11, 12), 10)
    with FakeOpenAI() as server:
        assert judge_for(server.url, images, cache_dir=None).answer([trial]) == [2]
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Content-Type"] == "application/json"
    assert "Authorization" not in request.headers  # no key in the environment: fine for a local server
    body = request.body
    assert body["model"] == "fake-vlm" and body["temperature"] == 0
    (message,) = body["messages"]
    assert message["role"] == "user"
    kinds = [(part["type"], part.get("text")) for part in message["content"]]
    assert kinds[:7] == [
        ("text", INTRO),
        ("text", "Neuron 1 examples:"),
        ("image_url", None),
        ("text", "Neuron 2 examples:"),
        ("image_url", None),
        ("text", "Query image:"),
        ("image_url", None),
    ]
    assert len(kinds) == 8 and "`ANSWER: 1` or `ANSWER: 2`" in kinds[7][1]
    grid1, grid2, query = images_of(body)
    assert [image.format for image in (grid1, grid2, query)] == ["JPEG"] * 3
    assert grid1.size == grid2.size == (3 * CELL, 3 * CELL) and query.size == (CELL, CELL)

    def cell(grid: Image.Image, n: int) -> np.ndarray:
        box = ((n % 3) * CELL, (n // 3) * CELL, (n % 3 + 1) * CELL, (n // 3 + 1) * CELL)
        return np.asarray(grid.convert("RGB").crop(box), dtype=np.float32)

    def thumbnail(image_id: int) -> np.ndarray:
        return np.asarray(square_crop(images.image(image_id), CELL), dtype=np.float32)

    for n, image_id in enumerate(trial.grid1):
        assert np.abs(cell(grid1, n) - thumbnail(image_id)).mean() < 4  # JPEG noise only
    for n, image_id in enumerate(trial.grid2):
        assert np.abs(cell(grid2, n) - thumbnail(image_id)).mean() < 4
    for n in range(4, 9):  # fewer than 9 images: blank cells
        assert cell(grid2, n).min() > 240
    assert np.abs(np.asarray(query.convert("RGB"), dtype=np.float32) - thumbnail(10)).mean() < 4


def test_answers_come_back_in_trial_order(images):
    trials, expected = make_trials(24)
    with FakeOpenAI(latency_s=0.02) as server:
        judge = judge_for(server.url, images, concurrency=4)
        assert judge.answer(trials) == expected
    assert judge.report() == {
        "requests": 24,
        "cached": 0,
        "prompt_tokens": 24_000,
        "completion_tokens": 480,
        "unparseable": 0,
        "failed": 0,
    }


def test_the_last_answer_line_counts(images):
    assert parse_answer("ANSWER: 2\nthinking again... answer: 1") == 1
    assert parse_answer("**ANSWER:** 2") == 2 and parse_answer("**Answer: 1**") == 1
    assert parse_answer("ANSWER: Neuron 2.") == 2
    assert parse_answer("ANSWER: 12") is None and parse_answer("neuron 1") is None and parse_answer("") is None
    trials, expected = make_trials(3, seed=1)
    with FakeOpenAI(default="switch") as server:
        assert judge_for(server.url, images).answer(trials) == expected
    with FakeOpenAI(default="one") as server:
        assert judge_for(server.url, images).answer(trials) == [1, 1, 1]


def test_the_key_comes_from_the_named_environment_variable(images, monkeypatch):
    monkeypatch.setenv("CLIPSCOPE_TEST_JUDGE_KEY", "sk-test-123")
    with FakeOpenAI(default="one") as server:
        judge_for(server.url, images, key_env="CLIPSCOPE_TEST_JUDGE_KEY").answer(make_trials(2)[0])
    assert [request.headers["Authorization"] for request in server.requests] == ["Bearer sk-test-123"] * 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_judge_leaves_trials_unanswered(images):
    judge = judge_for(f"http://127.0.0.1:{free_port()}/v1", images, retries=2)
    assert judge.answer(make_trials(3)[0]) == [None, None, None]
    assert counts(judge, "requests", "failed", "cached") == {"requests": 9, "failed": 3, "cached": 0}
    assert "gave up after 3 attempts: ClientConnectorError" in judge.failures[0]


def test_a_timeout_is_retried(images):
    trials, expected = make_trials(2)
    with FakeOpenAI(["hang"]) as server:
        judge = judge_for(server.url, images, timeout_s=0.5, retries=1, concurrency=1)
        assert judge.answer(trials) == expected
    assert counts(judge, "requests", "failed") == {"requests": 3, "failed": 0}
    with FakeOpenAI(default="hang") as server:
        judge = judge_for(server.url, images, timeout_s=0.2, retries=1, concurrency=2)
        assert judge.answer(trials) == [None, None]
    assert counts(judge, "requests", "failed") == {"requests": 4, "failed": 2}
    assert "Timeout" in judge.failures[0]


def test_429_waits_for_retry_after_then_answers(images):
    trials, expected = make_trials(1)
    with FakeOpenAI(["429", "429"], retry_after="0.25") as server:
        judge = judge_for(server.url, images)
        start = time.perf_counter()
        assert judge.answer(trials) == expected
    assert time.perf_counter() - start >= 0.5  # the backoff alone is a millisecond
    assert [r.behaviour for r in server.requests] == ["429", "429", "nearest"]
    assert counts(judge, "requests", "failed") == {"requests": 3, "failed": 0}


def test_retry_after_is_read_as_seconds_or_a_date():
    assert retry_after("2") == 2.0 and retry_after("0.5") == 0.5 and retry_after("86400") == 60.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert 3 < retry_after(formatdate(time.time() + 5, usegmt=True)) <= 5


def test_500s_until_giving_up_are_counted_failed(images):
    trials, expected = make_trials(4)
    with FakeOpenAI(["500"] * 3, default="500") as server:
        judge = judge_for(server.url, images, retries=2, concurrency=2)
        assert judge.answer(trials) == [None] * 4
    assert counts(judge, "requests", "failed", "unparseable") == {"requests": 12, "failed": 4, "unparseable": 0}
    assert judge.failures[0] == "gave up after 3 attempts: HTTP 500"
    with FakeOpenAI(["500", "500"]) as server:  # recovers within the retries
        assert judge_for(server.url, images, retries=2, concurrency=1).answer(trials[:1]) == expected[:1]


def test_an_endpoint_that_keeps_failing_stops_being_asked(images):
    with FakeOpenAI(default="500") as server:
        judge = judge_for(server.url, images, retries=1, concurrency=1, stop_after_failures=3)
        assert judge.answer(make_trials(10)[0]) == [None] * 10
    assert len(server.requests) == 6
    assert counts(judge, "requests", "failed") == {"requests": 6, "failed": 10}


def test_a_reply_without_an_answer_is_asked_once_more_then_counted(images):
    trials, expected = make_trials(3)
    with FakeOpenAI(default="no_answer") as server:
        judge = judge_for(server.url, images, retries=3)
        assert judge.answer(trials) == [None] * 3
    assert counts(judge, "requests", "unparseable", "failed") == {"requests": 6, "unparseable": 3, "failed": 0}
    assert "no ANSWER line" in judge.failures[0]
    with FakeOpenAI(["no_answer"]) as server:
        judge = judge_for(server.url, images, concurrency=1)
        assert judge.answer(trials) == expected
    assert counts(judge, "requests", "unparseable") == {"requests": 4, "unparseable": 0}


def test_malformed_json_is_retried_then_counted(images):
    trials, expected = make_trials(1)
    with FakeOpenAI(["malformed", "malformed"]) as server:
        judge = judge_for(server.url, images)
        assert judge.answer(trials) == expected
    assert counts(judge, "requests", "failed") == {"requests": 3, "failed": 0}
    with FakeOpenAI(default="malformed") as server:
        judge = judge_for(server.url, images, retries=1)
        assert judge.answer(trials) == [None]
    assert counts(judge, "requests", "failed") == {"requests": 2, "failed": 1}
    assert "not a chat completion" in judge.failures[0]


@pytest.mark.parametrize("status, says", [("401", "set $OPENAI_API_KEY"), ("404", "API base")])
def test_a_refusal_fails_fast_naming_url_and_status(images, status, says):
    with FakeOpenAI(default=status) as server:
        judge = judge_for(server.url, images, concurrency=2)
        with pytest.raises(JudgeError) as error:
            judge.answer(make_trials(12)[0])
    message = str(error.value)
    assert f"{server.url}/chat/completions answered HTTP {status}" in message and says in message
    assert len(server.requests) <= 2  # no retry storm


def test_a_wrong_api_base_is_a_404_refusal(images):
    with FakeOpenAI() as server:
        with pytest.raises(JudgeError, match=r"/chat/completions answered HTTP 404"):
            judge_for(server.url.removesuffix("/v1"), images).answer(make_trials(1)[0])


def test_an_unreadable_image_leaves_its_trial_unanswered(images):
    trials, expected = make_trials(2)
    broken = Trial(trials[0].grid1, trials[0].grid2, 99_999)
    with FakeOpenAI() as server:
        judge = judge_for(server.url, images)
        assert judge.answer([broken, trials[1]]) == [None, expected[1]]
    assert len(server.requests) == 1
    assert counts(judge, "failed") == {"failed": 1}
    assert "sample image 99999" in judge.failures[0]


def test_answers_are_cached_on_disk(images, tmp_path):
    trials, expected = make_trials(6)
    cache = tmp_path / "cache"
    with FakeOpenAI() as server:
        first = judge_for(server.url, images, cache_dir=cache)
        assert first.answer(trials) == expected
        second = judge_for(server.url, images, cache_dir=cache)
        assert second.answer(trials) == expected
        assert len(server.requests) == 6  # the second run sent none
        assert counts(second, "requests", "cached") == {"requests": 0, "cached": 6}
        other_model = OpenAIJudge(server.url, "other-vlm", images, cache_dir=cache, **FAST)
        other_model.answer(trials[:2])
        assert len(server.requests) == 8
    files = sorted(cache.rglob("*.json"))
    assert len(files) == 8 and not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".json"]


def test_unparseable_answers_are_cached_and_still_reported(images, tmp_path):
    trials, _ = make_trials(2)
    with FakeOpenAI(default="no_answer") as server:
        judge_for(server.url, images, cache_dir=tmp_path).answer(trials)
        again = judge_for(server.url, images, cache_dir=tmp_path)
        assert again.answer(trials) == [None, None]
    assert len(server.requests) == 4
    assert counts(again, "requests", "cached", "unparseable") == {"requests": 0, "cached": 2, "unparseable": 2}


def test_an_interrupted_run_resumes_paying_only_for_the_rest(images, tmp_path):
    trials, expected = make_trials(10)
    with FakeOpenAI(["nearest"] * 4, default="401") as server:
        with pytest.raises(JudgeError):
            judge_for(server.url, images, cache_dir=tmp_path, concurrency=1).answer(trials)
    with FakeOpenAI(port=server.port) as server:  # the same endpoint: its URL is part of the cache key
        judge = judge_for(server.url, images, cache_dir=tmp_path, concurrency=3)
        assert judge.answer(trials) == expected
    assert len(server.requests) == 6
    assert counts(judge, "requests", "cached") == {"requests": 6, "cached": 4}


def test_concurrency_never_exceeds_the_bound(images):
    trials, _ = make_trials(12)
    with FakeOpenAI(latency_s=0.15, default="one") as server:
        judge_for(server.url, images, concurrency=3).answer(trials)
    assert server.peak == 3


def test_the_progress_bar_shows_requests_and_tokens(images, capsys):
    with FakeOpenAI(default="one") as server:
        OpenAIJudge(server.url, "fake-vlm", images, backoff_s=0.001, progress=True).answer(make_trials(3)[0])
    err = capsys.readouterr().err
    assert "3/3" in err and "requests=3" in err and "tokens=3060" in err


def test_it_answers_from_inside_a_running_event_loop(images):
    trials, expected = make_trials(2)

    async def notebook_cell():
        return judge.answer(trials)

    with FakeOpenAI() as server:
        judge = judge_for(server.url, images)
        # a thread of its own: earlier tests (a browser's sync API) may leave a loop running in this one
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(asyncio.run, notebook_cell()).result() == expected


def test_cached_answers_follow_the_images_into_a_rebuilt_index(images, tiny_index, tmp_path):
    """The cache names each image by its recorded source and key, not its id: an index whose ids moved keeps
    its answers, and the same images in other places are a new trial."""
    trials, expected = make_trials(3)
    rebuilt = Path(shutil.copy(tiny_index, tmp_path / "rebuilt.duckdb"))
    with duckdb.connect(str(rebuilt)) as con:
        for table in ("samples", "images"):
            con.execute(
                f"CREATE OR REPLACE TABLE {table} AS SELECT * REPLACE (image_id + 1000 AS image_id) FROM {table}"
            )
    shift = np.int64(1000)  # ids as a planner's numpy arrays hold them
    moved = [
        Trial(tuple(i + shift for i in t.grid1), tuple(i + shift for i in t.grid2), t.query + shift) for t in trials
    ]
    swapped = Trial(moved[0].grid2, moved[0].grid1, moved[0].query)
    with FakeOpenAI() as server, SampleImages(rebuilt) as rebuilt_images:
        judge_for(server.url, images, cache_dir=tmp_path / "cache").answer(trials)
        again = judge_for(server.url, rebuilt_images, cache_dir=tmp_path / "cache")
        assert again.answer(moved) == expected
        assert len(server.requests) == 3
        assert again.answer([swapped]) == [3 - expected[0]]
        assert len(server.requests) == 4

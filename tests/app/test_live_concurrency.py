"""Concurrent uploads: all answered (200 or 503 with Retry-After), none lost or crossed between
clients, micro-batched in one worker; and the worker's admission control on its own.

The app-level tests hold the live worker at the start of a batch (a forward pre-hook on the tower's
patch embedding) until every upload has been admitted or refused, so what is answered, refused and
batched together does not depend on thread scheduling.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import numpy as np
import pytest

from clipscope_explorer.app.live.batcher import Busy, MicroBatcher
from tests import image_cases as cases
from tests.app.conftest import live_app_client, wait_live

N_CLIENTS = 20


def image(seed: int) -> bytes:
    return cases.encode(cases.noisy((96 + seed, 80), seed=100 + seed), "PNG")


def post(client, data: bytes):
    return client.post("/api/encode", files={"file": ("x.png", data, "image/png")}, data={"top": "1000"})


def same_result(got: dict, expected: dict) -> None:
    assert got["upload_id"] == expected["upload_id"]
    for layer, data in expected["layers"].items():
        assert [f["feature"] for f in got["layers"][layer]["features"]] == [f["feature"] for f in data["features"]]
        np.testing.assert_allclose(
            [f["activation"] for f in got["layers"][layer]["features"]],
            [f["activation"] for f in data["features"]],
            rtol=1e-4,
            atol=1e-5,
        )


def assert_busy(response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1 and "busy" in response.json()["detail"]


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextmanager
def held_worker(encoder):
    """Yield (running, release): the live worker stops at the start of its next batch and sets `running`;
    it goes on once `release` is set (at the latest when the block ends)."""
    running, release = threading.Event(), threading.Event()

    def hold(module, inputs):
        running.set()
        release.wait(120)

    handle = encoder.tower.visual.conv1.register_forward_pre_hook(hold)
    try:
        yield running, release
    finally:
        release.set()
        handle.remove()


@pytest.fixture(scope="module")
def busy_client(live_index):
    """No store (every upload is encoded), a queue of 8, batches of up to 4."""
    with live_app_client(live_index, None, live_queue_size=8, live_batch_size=4) as client:
        wait_live(client)
        yield client


def test_concurrent_uploads_are_all_answered_and_never_crossed(busy_client):
    images = [image(n) for n in range(N_CLIENTS + 1)]
    expected = [post(busy_client, data).json() for data in images]  # one at a time
    assert len({e["upload_id"] for e in expected}) == N_CLIENTS + 1
    encoder = busy_client.app.state.live.encoder
    batcher = encoder.batcher
    capacity, max_batch = batcher.capacity, batcher.max_batch
    admitted = capacity - 1  # besides the upload the worker is held on
    batches_before = batcher.batches
    with ThreadPoolExecutor(N_CLIENTS + 1) as pool, held_worker(encoder) as (running, release):
        first = pool.submit(post, busy_client, images[0])
        assert running.wait(60), "the first upload never reached the worker"
        start = threading.Barrier(N_CLIENTS)

        def client(n: int):
            start.wait()
            return post(busy_client, images[n])

        others = {pool.submit(client, n): n for n in range(1, N_CLIENTS + 1)}
        done = as_completed(others, timeout=60)
        refused = [next(done) for _ in range(N_CLIENTS - admitted)]  # nothing admitted can finish yet
        for future in refused:
            assert_busy(future.result())
        wait_until(lambda: batcher.queued == admitted, f"{admitted} admitted uploads to queue up")
        assert batcher.in_progress == capacity
        release.set()
        same_result(first.result(60).json(), expected[0])
        answered = {n: future.result(60) for future, n in others.items() if future not in refused}
    assert len(answered) == admitted
    for n, response in answered.items():
        assert response.status_code == 200, response.text
        same_result(response.json(), expected[n])
    assert batcher.batches - batches_before == 1 + math.ceil(admitted / max_batch)  # the held one, then batches
    assert batcher.largest_batch == max_batch
    assert batcher.in_progress == 0


def test_a_full_queue_answers_503_with_retry_after(busy_client):
    encoder = busy_client.app.state.live.encoder
    capacity = encoder.batcher.capacity
    with ThreadPoolExecutor(capacity) as pool, held_worker(encoder) as (running, release):
        waiting = [pool.submit(post, busy_client, image(50 + n)) for n in range(capacity)]
        assert running.wait(60), "no upload reached the worker"
        wait_until(lambda: encoder.batcher.in_progress == capacity, "every slot to be taken")
        refused = post(busy_client, image(60))
        browse = busy_client.get("/layers/1/features/3")  # browsing is not held up by the queue
        release.set()
        answered = [f.result(timeout=60) for f in waiting]
    assert_busy(refused)
    assert browse.status_code == 200
    assert [r.status_code for r in answered] == [200] * capacity


def test_batcher_admission_and_errors():
    release = threading.Event()

    def run(jobs):
        release.wait(5)
        if "boom" in jobs:
            raise RuntimeError("boom")
        return [job * 2 for job in jobs]

    batcher = MicroBatcher(run, max_batch=4, capacity=2)
    try:
        with batcher.admit(), batcher.admit():
            with pytest.raises(Busy) as busy:
                with batcher.admit():
                    pass
            assert busy.value.retry_after >= 1
            futures = [batcher.submit(n) for n in (1, 2)]
            release.set()
            assert [f.result(5) for f in futures] == [2, 4]
        assert batcher.in_progress == 0
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit("boom").result(5)
        assert batcher.submit(21).result(5) == 42  # the worker survives a failed batch
    finally:
        release.set()
        batcher.close()
